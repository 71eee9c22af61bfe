import FuzzSupport
import VirtioCore
import VirtioPCI
import VirtioTestSupport
#if canImport(Glibc)
import Glibc
#endif

// pci-caps: the virtio-pci parsers of device-given bytes.
//
//  1. VirtioPCICapabilities(configSpace:) on any bytes (any length).
//  2. The whole VirtioPCITransport open over a fake sysfs tree (config space, `resource`, BAR
//     files with input bytes): capability list → BAR windows → modern or legacy interface → reset,
//     features, config reads, negotiation, DRIVER_OK, stop.
//  3. ModernInterface / LegacyInterface over FuzzRegisters (every access bounds-checked, reads
//     partly chosen by the input) under VirtioPCITransport and the device core (VirtioDevice with
//     normal and device-sized queues over heap memory): negotiation, queue setup (sizes,
//     notify_off × multiplier), start, status checks, stop, restart.
//
// Input: byte 0 = which parts run and how, then the parts' bytes in order.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    var input = FuzzInput(data, size)
    let mode = input.u8()
    // 1: the capability list alone.
    let configLength = input.u8() & 1 == 0 ? 256 : Int(input.u8())
    let config = input.paddedBytes(configLength)
    let caps = try? VirtioPCICapabilities(configSpace: config)
    if let caps {
        for c in [caps.common, caps.notify, caps.isr, caps.device].compactMap({ $0 }) {
            invariant(c.bar >= 0 && c.bar <= 5, "capability \(c.kind) names BAR \(c.bar)")
        }
    }
    if mode & 1 != 0 { openThroughSysfs(config: config, &input, mode: mode) }
    if mode & 2 != 0 { driveInterface(&input, mode: mode) }
    return 0
}

// MARK: 2. Through sysfs

enum FakeSysfs {
    static let root = ScratchDirectory.make("vio-fuzz-pci")
    static let address = "0000:00:04.0"
    static var device: String { root + "/" + address }
    static let ready: Void = {
        mkdir(device, 0o755)
        mkdir(root + "/drivers", 0o755)
        for d in ["uio_pci_generic", "vfio-pci", "virtio-pci"] { mkdir(root + "/drivers/" + d, 0o755) }
    }()
}

func openThroughSysfs(config: [UInt8], _ input: inout FuzzInput, mode: UInt8) {
    _ = FakeSysfs.ready
    let dir = FakeSysfs.device
    // Identity: modern net/blk, transitional net/blk, or any device id.
    let ids: [(UInt16, UInt16)] = [(0x1041, 0), (0x1042, 0), (0x1000, 1), (0x1001, 2)]
    let pick = Int(input.u8())
    let (deviceID, subsystem) = pick < 240 ? ids[pick % ids.count] : (input.u16(), input.u16())
    writeFile(dir + "/vendor", "0x1af4\n")
    writeFile(dir + "/device", "0x" + String(deviceID, radix: 16) + "\n")
    writeFile(dir + "/subsystem_device", "0x" + String(subsystem, radix: 16) + "\n")
    unlink(dir + "/driver")
    let driver = input.u8()
    if driver < 250 { symlink("../drivers/uio_pci_generic", dir + "/driver") } else if driver < 253 { symlink("../drivers/vfio-pci", dir + "/driver") }
    writeFile(dir + "/config", config)
    // Six BARs: absent, a small I/O BAR, or a memory BAR of up to 64 KiB; each file holds the
    // BAR's registers (input bytes, then zeros).
    var lines = ""
    for i in 0..<6 {
        let kind = input.u8()
        var size = 0
        var flags: UInt64 = 0
        switch kind & 3 {
        case 0: break
        case 1: size = [32, 64, 8, 24][Int(kind >> 2 & 3)]; flags = 0x101
        default: size = [0x1000, 0x2000, 0x4000, 0x100][Int(kind >> 2 & 3)]; flags = 0x40200
        }
        if kind >> 4 == 0xf { size = Int(input.u16()) }
        let start: UInt64 = flags & 0x100 != 0 ? 0xc000 + UInt64(i) * 0x100 : 0xfe00_0000 + UInt64(i) << 16
        let end = size > 0 ? start + UInt64(size) - 1 : 0
        lines += "0x" + hex16(size > 0 ? start : 0) + " 0x" + hex16(end) + " 0x" + hex16(size > 0 ? flags : 0) + "\n"
        let path = dir + "/resource\(i)"
        unlink(path)
        if size > 0 {
            var contents = input.bytes(min(size, Int(input.u8()) * 4))
            contents += [UInt8](repeating: 0, count: size - contents.count)
            writeFile(path, contents)
        }
    }
    for _ in 6..<13 { lines += "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" }
    writeFile(dir + "/resource", lines)
    let choice: VirtioPCITransport.InterfaceChoice = [.auto, .modern, .legacy, .auto][Int(mode >> 2 & 3)]
    let expecting: VirtioDeviceType? = mode & 0x10 != 0 ? (mode & 0x20 != 0 ? .block : .net) : nil
    do {
        let t = try VirtioPCITransport(address: FakeSysfs.address, expecting: expecting, choice: choice, sysfsRoot: FakeSysfs.root)
        verbose("pci-caps sysfs: opened \(t.deviceDescription)")
        try exercise(t, &input, setUpQueues: false)
        verbose("pci-caps sysfs: every step done")
    } catch {
        verbose("pci-caps sysfs: \(error)")
    }
}

func hex16(_ v: UInt64) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 16 - s.count)) + s
}

// MARK: 3. Interfaces over fuzzed registers

func driveInterface(_ input: inout FuzzInput, mode: UInt8) {
    // Register contents, the bytes that decide volatile reads, then the driver's steps.
    let legacy = mode & 0x40 != 0
    let initial = input.bytes(Int(input.u8()))
    let stream = FuzzStream(input.bytes(Int(input.u8()) * 2))
    if legacy {
        // Short BARs too: LegacyInterface refuses one that cannot hold the registers
        // (Fuzz/Regressions/pci-caps/crash-legacy-io-bar-too-short).
        let length = [20, 24, 32, 64, 8, 0][Int(input.u8() % 6)]
        let io = FuzzRegisters("legacy I/O", length: length, initial: initial, stream: stream)
        guard let legacy = try? LegacyInterface(io: io, msixEnabled: input.bool()) else { return }
        return runInterface(legacy, &input)
    }
    let commonLength = [56, 64, 55, 0x100][Int(input.u8() & 3)]
    let notifyLength = input.bool() ? 0x100 : Int(input.u16() & 0x1fff)
    let multiplier: UInt32 = [4, 0, 2, UInt32.max, 0x1000][Int(input.u8() % 5)]
    let deviceLength = [16, 0, 60, 4, 256][Int(input.u8() % 5)]
    do {
        let m = try ModernInterface(common: FuzzRegisters("common config", length: commonLength, initial: initial, stream: stream),
                                    notify: FuzzRegisters("notify", length: notifyLength, initial: [], stream: stream),
                                    notifyMultiplier: multiplier,
                                    isr: FuzzRegisters("ISR", length: 4, initial: [], stream: stream),
                                    device: deviceLength == 0 ? nil : FuzzRegisters("device config", length: deviceLength,
                                                                                    initial: Array(initial.reversed()), stream: stream))
        runInterface(m, &input)
    } catch {
        verbose("pci-caps modern interface: \(error)")
    }
}

func runInterface(_ interface: VirtioPCIInterface, _ input: inout FuzzInput) {
    // The address translation a DPDK build does; here identity, or "not DMA memory".
    let translate: (UInt64, Int) -> UInt64? = { va, _ in va & 0xf == 1 ? nil : va }
    do {
        let t = try VirtioPCITransport(address: PCIAddress(bus: 0, device: 4, function: 0), interface: interface,
                                       deviceType: 1, translate: translate)
        try exercise(t, &input, setUpQueues: true)
        verbose("pci-caps interface: every step done")
    } catch {
        verbose("pci-caps transport: \(error)")
    }
}

/// What a driver does with an opened transport, as the input says; the first error ends it.
func exercise(_ t: VirtioPCITransport, _ input: inout FuzzInput, setUpQueues: Bool) throws {
    _ = t.deviceFeatures
    _ = t.queueLimit
    if t.hasConfigSpace {
        for _ in 0..<Int(input.u8() & 3) {
            let offset = input.int(0...300), count = input.int(0...64)
            if let b = try? t.readConfig(offset: offset, count: count) {
                invariant(b.count == count, "readConfig(\(offset), \(count)) returned \(b.count) bytes")
                invariant(offset + count <= 4096, "readConfig past any config space succeeded")
            }
        }
    }
    for i in 0..<Int(input.u8() & 3) { _ = t.maxQueueSize(i) }
    let features = t.deviceFeatures.intersection(VirtioFeatures(rawValue: input.u64() | VirtioFeatures.version1.rawValue))
    let queues = 1 + Int(input.u8() & 3)
    guard setUpQueues else {
        try t.negotiate(features, queueCount: queues)
        try t.start()
        _ = t.isConnected
        try t.stop()
        return
    }
    if input.bool() {
        // Through the device core: ring memory on the heap, normal and device-sized queues.
        let layout: RingLayoutChoice = features.contains(.ringPacked) && input.bool() ? .packed : .split
        let n = try VirtioNegotiation(offered: t.deviceFeatures, required: [], wanted: features, ring: layout, device: "fuzz")
        var specs = (0..<queues).map { VirtqueueSpec(index: $0, size: [64, 256, 16, 1024][Int(input.u8() & 3)]) }
        if input.bool() { specs.append(.deviceSized(index: queues, atMost: 64)) }
        try core(layout, t, n, specs)
        return
    }
    try t.negotiate(features, queueCount: queues)
    var ready: [Int] = []
    for round in 0..<(input.bool() ? 2 : 1) {
        for i in 0..<queues {
            let size = [256, 64, 1, 1000, 0x8000, 0x10000][Int(input.u8() % 6)]
            // Rings high in the address space, or low enough for a legacy 32-bit page number.
            let base: UInt64 = (input.bool() ? 0x7f00_0000_0000 : 0x1_0000_0000) + UInt64(i) << 20
            let a = QueueAddresses(size: size, desc: base | UInt64(input.u8() & 1), avail: base + 0x1000, used: base + 0x2000,
                                   base: input.u8() == 0xff ? 0x8001 : 0)
            do {
                try t.setupQueue(i, addresses: a)
                if round == 0 { ready.append(i) }
            } catch {
                verbose("pci-caps setupQueue(\(i)): \(error)")
            }
        }
        try t.start()
        for i in ready where input.bool() { t.notify(queue: i) }
        _ = t.isConnected
        _ = t.disconnectReason
        try t.stop()
    }
}

func core(_ layout: RingLayoutChoice, _ t: VirtioPCITransport, _ n: VirtioNegotiation, _ specs: [VirtqueueSpec]) throws {
    if layout == .packed {
        let d = try VirtioDevice<PackedVirtqueue>(transport: t, negotiation: n, queues: specs, memory: FuzzDMAAllocator())
        try runCore(d)
    } else {
        let d = try VirtioDevice<SplitVirtqueue>(transport: t, negotiation: n, queues: specs, memory: FuzzDMAAllocator())
        try runCore(d)
    }
}

func runCore<R: Virtqueue & ~Copyable>(_ d: VirtioDevice<R>) throws {
    for q in d.queues {
        invariant(q.size > 0 && q.size <= 32768, "queue \(q.index) got size \(q.size)")
        if R.layout == .split { invariant(q.size & (q.size - 1) == 0, "split queue \(q.index) of size \(q.size)") }
    }
    try d.start()
    _ = d.isLinkUp
    d.stop()
}
