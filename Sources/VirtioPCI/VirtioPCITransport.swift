import DPDK
import Logging
import Synchronization
import VirtioCore

/// A virtio device on the PCI bus, driven from user space through `uio_pci_generic` (BARs mapped
/// from sysfs, config space through sysfs, no interrupts: poll mode). Modern devices (VIRTIO 1.x
/// capabilities) are preferred; a legacy-only (transitional with modern disabled) device is
/// driven through its I/O BAR. Descriptor and ring addresses are IOVAs (DPDK `--iova-mode pa` in
/// a guest without an IOMMU: physical addresses).
public final class VirtioPCITransport: VirtioTransport, @unchecked Sendable {
    /// Which interface to use on a transitional device that offers both.
    public enum InterfaceChoice: String, Sendable { case auto, modern, legacy }

    public let address: PCIAddress
    public let interface: VirtioPCIInterface
    public let deviceType: Int
    public private(set) var deviceFeatures: VirtioFeatures
    public private(set) var negotiatedFeatures: VirtioFeatures = []
    /// num_queues, read when asked: QEMU's virtio-net changes it when VIRTIO_NET_F_MQ is accepted
    /// (3 before FEATURES_OK, 2·max_virtqueue_pairs + 1 after).
    public var queueLimit: QueueLimit? { interface.queueCount.map(QueueLimit.virtqueues) }
    let logger: Logger
    /// VA range → IOVA, nil when the range is not IOVA-contiguous DPDK memory.
    let translate: (UInt64, Int) -> UInt64?
    private var queueCount = 0
    /// Queues set up since the last reset, in order: `start` enables these (a net device's
    /// unused pairs below its control queue stay disabled).
    private var setUpQueues: [Int] = []
    private var started = false
    /// `stop` reset the device: the next `setupQueue` first runs initialisation again (§3.1.1
    /// steps 1–6 with the negotiated features), so a stopped port can be set up and started anew.
    private var needsReinit = false
    private let alive = Atomic<Bool>(true)
    private let recoverable = Atomic<Bool>(false)
    private let reasonLock = Mutex<String?>(nil)
    private let stopLock = Mutex<Void>(())
    /// Keeps the mapped BARs alive as long as the transport.
    private let mappings: [AnyObject]

    /// Opens the device at `address` (`DDDD:BB:DD.F`), checks it is a virtio device of type
    /// `expecting` bound to uio_pci_generic, resets it and reads its features.
    public convenience init(address text: String, expecting: VirtioDeviceType? = nil, choice: InterfaceChoice = .auto,
                            sysfsRoot: String = "/sys/bus/pci/devices", logger: Logger = Logger(label: "virtio-pci")) throws {
        let fn = try Self.probe(address: text, expecting: expecting, sysfsRoot: sysfsRoot)
        let address = fn.address
        let caps = try VirtioPCICapabilities(configSpace: try fn.configSpace())
        let bars = try fn.resources()
        var maps: [Int: RegisterSpace] = [:]
        func bar(_ i: Int) throws(VirtioPCIError) -> RegisterSpace {
            if let m = maps[i] { return m }
            guard i < bars.count, bars[i].size > 0 else { throw .barOutOfRange("BAR \(i) is not present") }
            let m: RegisterSpace = bars[i].isIO ? try PortIOBAR(path: fn.resourcePath(i), length: bars[i].size)
                                                : try MappedBAR(path: fn.resourcePath(i), length: bars[i].size)
            maps[i] = m
            return m
        }
        func window(_ c: VirtioPCICapability) throws(VirtioPCIError) -> RegisterSpace {
            let b = try bar(c.bar)
            guard UInt64(c.offset) + UInt64(c.length) <= UInt64(b.length) else {
                throw .barOutOfRange("\(c.kind) structure at \(c.offset)+\(c.length) in BAR \(c.bar) of \(b.length) bytes")
            }
            return RegisterWindow(b, offset: Int(c.offset), length: Int(c.length))
        }
        let useModern: Bool
        switch choice {
        case .auto: useModern = caps.isModern
        case .modern: useModern = true
        case .legacy: useModern = false
        }
        let iface: VirtioPCIInterface
        if useModern {
            guard let common = caps.common, let notify = caps.notify, let isr = caps.isr else {
                throw VirtioPCIError.noUsableInterface(address, "no modern capabilities (common, notify, ISR)")
            }
            iface = try ModernInterface(common: try window(common), notify: try window(notify),
                                        notifyMultiplier: notify.notifyOffsetMultiplier, isr: try window(isr),
                                        device: try caps.device.map { c throws(VirtioPCIError) in try window(c) })
            // Memory space, bus master, INTx disable (0x400): poll mode, no interrupts at all.
            try fn.enableCommandBits(0x2 | 0x4 | 0x400)
        } else {
            guard fn.isTransitional, bars.first?.isIO == true else {
                throw VirtioPCIError.noUsableInterface(address, fn.isTransitional ? "BAR 0 is not an I/O BAR" : "a non-transitional id has no legacy interface")
            }
            iface = try LegacyInterface(io: try bar(0), msixEnabled: caps.msixEnabled)
            try fn.enableCommandBits(0x1 | 0x4 | 0x400)
        }
        try self.init(address: address, interface: iface, deviceType: fn.virtioType, logger: logger,
                      mappings: Array(maps.values), translate: Self.dpdkTranslate)
    }

    /// The checks made before touching the device, from sysfs only (no DPDK needed, so the CLI can
    /// report a wrong address before it sets up memory): the address exists, is a virtio function
    /// of the expected type, and is bound to uio_pci_generic.
    public static func probe(address text: String, expecting: VirtioDeviceType? = nil,
                             sysfsRoot: String = "/sys/bus/pci/devices") throws(VirtioPCIError) -> SysfsPCIFunction {
        guard let address = PCIAddress(text) else { throw .badAddress(text) }
        let fn = try SysfsPCIFunction(address: address, root: sysfsRoot)
        guard fn.isVirtio else { throw .notVirtio(address, vendor: fn.vendor, device: fn.deviceID) }
        if let e = expecting, fn.virtioType != e.rawValue {
            throw .wrongDeviceType(address, expected: e.description, found: VirtioDeviceType.name(fn.virtioType))
        }
        switch fn.driver {
        case nil: throw .notBound(address)
        case "uio_pci_generic": break
        case "vfio-pci": throw .vfioNotSupported(address)
        case let d?: throw .boundToKernelDriver(address, driver: d)
        }
        return fn
    }

    /// DPDK's translation: `rte_mem_virt2iova`, with a contiguity check over the range.
    public static let dpdkTranslate: (UInt64, Int) -> UInt64? = { va, count in
        guard let p = UnsafeRawPointer(bitPattern: UInt(va)) else { return nil }
        return IOVA.of(p, count: count)
    }

    /// Drives `interface` (also a fake one in tests): reset, ACKNOWLEDGE | DRIVER, read features.
    public init(address: PCIAddress, interface: VirtioPCIInterface, deviceType: Int, logger: Logger = Logger(label: "virtio-pci"),
                mappings: [AnyObject] = [], translate: @escaping (UInt64, Int) -> UInt64?) throws {
        self.address = address
        self.interface = interface
        self.deviceType = deviceType
        self.logger = logger
        self.translate = translate
        self.mappings = mappings
        // §3.1.1 steps 1–3: reset, ACKNOWLEDGE, DRIVER.
        try interface.reset()
        interface.setStatus(DeviceStatus.acknowledge.rawValue)
        interface.setStatus(DeviceStatus([.acknowledge, .driver]).rawValue)
        let offered = VirtioFeatures(rawValue: interface.deviceFeatures())
        if !interface.isLegacy && !offered.contains(.version1) {
            interface.setStatus(interface.status | DeviceStatus.failed.rawValue)
            throw VirtioPCIError.missingVersion1
        }
        deviceFeatures = offered
        logger.debug("virtio-pci \(address): \(interface.isLegacy ? "legacy" : "modern") interface, device features \(offered)")
    }

    deinit {
        // Leave the device reset: it must not touch our memory after we are gone, and the next
        // driver finds it as after power-on.
        try? interface.reset()
    }

    public var isLegacy: Bool { interface.isLegacy }
    public func maxQueueSize(_ index: Int) -> Int? { interface.maxQueueSize(index) }
    /// A PCI device processes its control queue itself.
    public var carriesControlQueue: Bool { true }
    public var bufferAddressing: BufferAddressing { .iova }
    public var hasConfigSpace: Bool { interface.configLength > 0 }
    public var deviceDescription: String { "virtio-pci \(address) (\(interface.isLegacy ? "legacy" : "modern"))" }

    public func readConfig(offset: Int, count: Int) throws -> [UInt8] {
        guard offset >= 0, count >= 0, offset + count <= interface.configLength else {
            throw VirtioPCIError.barOutOfRange("config read \(offset)+\(count) beyond the \(interface.configLength)-byte device config")
        }
        return try interface.readConfig(offset: offset, count: count)
    }

    /// §3.1.1 steps 4–6: write the features, set FEATURES_OK and check the device kept it.
    public func negotiate(_ features: VirtioFeatures, queueCount: Int) throws {
        precondition(deviceFeatures.isSuperset(of: features), "negotiating features the device does not offer")
        interface.setDriverFeatures(features.rawValue)
        if !interface.isLegacy {
            let s = DeviceStatus([.acknowledge, .driver, .featuresOK]).rawValue
            interface.setStatus(s)
            guard interface.status & DeviceStatus.featuresOK.rawValue != 0 else {
                interface.setStatus(interface.status | DeviceStatus.failed.rawValue)
                throw VirtioPCIError.featuresRejected(features.rawValue)
            }
        }
        // Checked after FEATURES_OK: the number of queues may depend on the features (QEMU's
        // virtio-net adds its pairs when MQ is accepted).
        if let m = queueLimit?.value, queueCount > m {
            interface.setStatus(interface.status | DeviceStatus.failed.rawValue)
            throw VirtioPCIError.tooManyQueues(requested: queueCount, device: m)
        }
        negotiatedFeatures = features
        self.queueCount = queueCount
        logger.debug("virtio-pci \(address): negotiated \(features)")
    }

    /// Nothing to tell: a PCI device reaches all guest memory (no IOMMU to program in no-IOMMU mode).
    public func setMemory(_ regions: [MemoryRegion]) throws {}

    /// Programs queue `index` with the IOVAs of its rings (the addresses passed in are process
    /// virtual addresses of DPDK memory; each ring part must be IOVA-contiguous).
    public func setupQueue(_ index: Int, addresses a: QueueAddresses) throws {
        if needsReinit {
            needsReinit = false
            try interface.reset()
            interface.setStatus(DeviceStatus.acknowledge.rawValue)
            interface.setStatus(DeviceStatus([.acknowledge, .driver]).rawValue)
            try negotiate(negotiatedFeatures, queueCount: queueCount)
            setUpQueues = []
        }
        func iova(_ va: UInt64, _ bytes: Int, _ what: String) throws -> UInt64 {
            guard let v = translate(va, bytes) else {
                throw VirtioPCIError.notDMAMemory("queue \(index) \(what) at 0x\(String(va, radix: 16)) (\(bytes) bytes)")
            }
            return v
        }
        // After a reset the device starts at position 0 (packed: with wrap counter 1, bit 15).
        guard a.base & 0x7fff == 0 else { throw VirtioPCIError.ringBaseNotZero(queue: index, base: a.base) }
        let n = a.size
        // Split: avail and used rings; packed: the driver and device event suppression areas.
        let packed = negotiatedFeatures.contains(.ringPacked)
        try interface.setupQueue(index, size: n, desc: try iova(a.desc, 16 * n, "descriptor table"),
                                 avail: try iova(a.avail, packed ? 4 : 6 + 2 * n, packed ? "driver event area" : "avail ring"),
                                 used: try iova(a.used, packed ? 4 : 6 + 8 * n, packed ? "device event area" : "used ring"))
        if !setUpQueues.contains(index) { setUpQueues.append(index) }
    }

    /// §3.1.1 steps 7–8: enable the queues, then DRIVER_OK.
    public func start() throws {
        for i in setUpQueues { interface.enableQueue(i) }
        let ok = interface.isLegacy ? DeviceStatus([.acknowledge, .driver, .driverOK]) : DeviceStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        interface.setStatus(ok.rawValue)
        started = true
        if let reason = checkStatus() { throw PCIStartFailure(description: "after DRIVER_OK: \(reason)") }
        logger.debug("virtio-pci \(address): DRIVER_OK, queues \(setUpQueues)")
    }

    /// Resets the device (§4.1.4.3.2): afterwards it touches none of our memory.
    public func stop() throws {
        try stopLock.withLock { _ throws in
            guard started else { return }
            started = false
            needsReinit = true
            try interface.reset()
        }
    }

    @inline(never)
    public func notify(queue index: Int) { interface.notify(index) }

    /// Reads device_status (one register read, off the data path): DEVICE_NEEDS_RESET, a reset
    /// by the device, or all-ones (the device is gone) end the link with the reason.
    public var isConnected: Bool {
        guard alive.load(ordering: .relaxed) else { return false }
        if started, let reason = checkStatus() { lost(reason); return false }
        return true
    }

    public var disconnectReason: String? { reasonLock.withLock { $0 } }

    /// A device that asked for a reset (DEVICE_NEEDS_RESET) or reset itself can be initialised
    /// again; one that reads all-ones is gone.
    public var canReconnect: Bool { !alive.load(ordering: .relaxed) && recoverable.load(ordering: .relaxed) }

    /// §2.1.2: after DEVICE_NEEDS_RESET the driver resets the device and initialises it again.
    /// Reset, ACKNOWLEDGE, DRIVER, read the features; `negotiate`, `setupQueue` (every ring from
    /// position 0) and `start` follow. Nothing to wait for: the device is there.
    public func reconnect(deadline: UInt64, abort: () -> Bool) throws {
        if abort() { throw ReconnectError.aborted }
        try stopLock.withLock { _ throws in
            started = false
            needsReinit = false
            setUpQueues = []
            try interface.reset()
            interface.setStatus(DeviceStatus.acknowledge.rawValue)
            interface.setStatus(DeviceStatus([.acknowledge, .driver]).rawValue)
            deviceFeatures = VirtioFeatures(rawValue: interface.deviceFeatures())
            reasonLock.withLock { $0 = nil }
            alive.store(true, ordering: .relaxed)
        }
        logger.info("virtio-pci \(address): reset and initialised again; device features \(deviceFeatures)")
    }

    private func lost(_ reason: String) {
        recoverable.store(interface.status != 0xff, ordering: .relaxed)
        reasonLock.withLock { if $0 == nil { $0 = reason } }
        alive.store(false, ordering: .relaxed)
        logger.error("virtio-pci \(address): \(reason)")
    }

    func checkStatus() -> String? {
        let s = interface.status
        if s == 0xff { return "virtio-pci device \(address) is gone (device_status reads 0xff)" }
        if s & DeviceStatus.deviceNeedsReset.rawValue != 0 {
            return "virtio-pci device \(address): \(VirtioPCIError.deviceNeedsReset(status: s))"
        }
        if s & DeviceStatus.driverOK.rawValue == 0 {
            return "virtio-pci device \(address) was reset by the device (device_status 0x\(String(s, radix: 16)))"
        }
        return nil
    }
}

struct PCIStartFailure: Error, CustomStringConvertible { var description: String }
