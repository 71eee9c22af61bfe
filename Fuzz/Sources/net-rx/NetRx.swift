import DPDK
import FuzzSupport
import VirtioCore
import VirtioNet
import VirtioTestSupport

// net-rx: VirtioNetDevice / VirtioNetPort over FakeTransport, split or packed, with the device
// played by the input: RX buffers completed with input-chosen virtio-net headers (num_buffers,
// flags, GSO and checksum fields) and lengths, one by one, out of order or as in-order batches,
// sometimes a bogus used entry; TX completions; restarts; config space and features from the
// input. Mbufs come from a DPDK pool (EAL with --no-huge, once per process); rings on the heap.
//
// Checked: every mbuf rxBurst returns is a well-formed chain (segment count, packet length =
// sum of segment lengths, data inside each buffer) not returned before; and after the port is
// closed and the device released, every mbuf is back in the pool.

enum Net {
    static let pool: PacketPool = {
        do {
            try InProcessEAL.require()
            return try InProcessEAL.pool(count: 1024)
        } catch {
            fatalError("net-rx needs DPDK's EAL (--no-huge) and an mbuf pool: \(error)")
        }
    }()
    static let out = UnsafeMutablePointer<Mbuf>.allocate(capacity: 64)
    static let tx = UnsafeMutablePointer<Mbuf>.allocate(capacity: 64)
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    var input = FuzzInput(data, size)
    let pool = Net.pool
    invariant(pool.inUseCount == 0, "\(pool.inUseCount) mbufs out of the pool before the input")
    let cfg = input.u8()
    let packed = cfg & 1 != 0
    var offered: VirtioFeatures = [.version1]
    if cfg & 2 != 0 { offered.insert(.netMergeableRxBuffers) }
    if cfg & 4 != 0 { offered.insert(.inOrder) }
    if packed { offered.insert(.ringPacked) }
    var config: [UInt8] = []
    var limit: QueueLimit? = nil
    if cfg & 8 != 0 {
        // Config space (MAC, status, max_virtqueue_pairs, MTU) and the bits that make it read.
        config = input.paddedBytes(input.u8() & 7 == 0 ? Int(input.u8() % 12) : 12)
        offered.formUnion(VirtioFeatures(rawValue: input.u64() & (VirtioFeatures.netMAC.union(.netMTU).union(.netMultiQueue).union(.netStatus)).rawValue))
    }
    if cfg & 0x10 != 0 {
        offered.insert(.netMultiQueue)
        limit = input.bool() ? .deviceUnits(Int(input.u16())) : .virtqueues(Int(input.u8()))
    }
    var o = VirtioNetOptions()
    o.ringSize = 64
    o.queuePairs = cfg & 0x20 != 0 ? 2 : 1
    o.ring = packed ? .packed : .split
    o.allowInOrder = cfg & 0x40 != 0
    o.allowMergeableRxBuffers = cfg & 0x80 != 0
    let t = FakeTransport(offered: offered, config: config, queueLimit: limit)
    if packed { run(PackedVirtqueue.self, t, o, pool, &input) } else { run(SplitVirtqueue.self, t, o, pool, &input) }
    invariant(pool.inUseCount == 0, "\(pool.inUseCount) mbufs not back in the pool after the port closed")
    invariant(pool.availableCount == pool.capacity, "pool holds \(pool.availableCount) of \(pool.capacity) mbufs (one freed twice?)")
    return 0
}

func run<R: Virtqueue & ~Copyable>(_: R.Type, _ t: FakeTransport, _ o: VirtioNetOptions, _ pool: PacketPool, _ input: inout FuzzInput) {
    let device: VirtioNetDevice<R>
    do {
        device = try VirtioNetDevice<R>(transport: t, pool: pool, options: o, memory: FuzzDMAAllocator())
    } catch {
        verbose("net-rx: open: \(error)")
        return
    }
    invariant(device.queuePairs == o.queuePairs && device.maxQueuePairs >= device.queuePairs,
              "opened \(device.queuePairs) of \(device.maxQueuePairs) pairs, asked for \(o.queuePairs)")
    guard var port = try? device.makePort(0) else { fatalError("makePort(0) of a fresh device failed") }
    let inOrder = device.features.contains(.inOrder)
    let mergeable = device.features.contains(.netMergeableRxBuffers)
    var rx = RingDevice(layout: R.layout, addresses: t.latest(0)!, inOrder: inOrder, indirect: false)
    var tx = RingDevice(layout: R.layout, addresses: t.latest(1)!, inOrder: inOrder, indirect: false)
    /// Mbufs the application holds (from rxBurst), by address.
    var held: [Mbuf] = []
    var seen = Set<UnsafeMutableRawPointer>()
    var received: UInt64 = 0

    var steps = 0
    while !input.isEmpty && steps < 256 {
        steps += 1
        switch input.u8() % 10 {
        case 0, 1, 2:
            // The device fills RX buffers: a header (num_buffers mostly sensible) and a length.
            rx.step(&input) { b, input in fillReceiveBuffer(b, &input, mergeable: mergeable) }
        case 3, 4:
            let max = input.int(1...64)
            let n = port.rxBurst(Net.out, max: max)
            invariant(n >= 0 && n <= max, "rxBurst(max: \(max)) returned \(n)")
            received += UInt64(n)
            for i in 0..<n {
                let m = Net.out[i]
                checkChain(m, ringSize: o.ringSize)
                invariant(seen.insert(m.cookie).inserted, "rxBurst returned mbuf \(m.cookie) the application already holds")
                held.append(m)
            }
            // The application lets go of some of what it holds.
            if input.bool() { release(&held, &seen, keep: Int(input.u8() & 7)) }
        case 5:
            transmit(&port, pool, &input)
        case 6:
            tx.step(&input) { b, input in input.u8() & 7 == 0 ? input.length(around: b.writableBytes) : 0 }
        case 7:
            _ = port.isLinkUp
            _ = port.linkError
        case 8:
            guard input.u8() & 7 == 0 else { break }
            // Stop and start again on the same connection: the device resets its rings.
            do {
                try port.restart()
                rx = RingDevice(layout: R.layout, addresses: t.latest(0)!, inOrder: inOrder, indirect: false)
                tx = RingDevice(layout: R.layout, addresses: t.latest(1)!, inOrder: inOrder, indirect: false)
            } catch {
                verbose("net-rx: restart: \(error)")
            }
        default:
            if o.queuePairs > 1 { try? device.setQueuePairs(1 + Int(input.u8() & 1)) }
        }
    }
    release(&held, &seen, keep: 0)
    invariant(port.counters.rxPackets == received, "rxPackets \(port.counters.rxPackets), rxBurst returned \(received)")
    _ = port.close()
    device.stop()
}

/// Writes the 12-byte virtio-net header into the buffer's first segment and returns the length
/// to report: the header's num_buffers is 1–3 mostly, else anything.
func fillReceiveBuffer(_ b: RingDevice.Buffer, _ input: inout FuzzInput, mergeable: Bool) -> UInt32 {
    guard let s = b.segments.first, s.writable, let p = UnsafeMutableRawPointer(bitPattern: UInt(s.addr)) else { return 0 }
    var header = [UInt8](repeating: 0, count: 12)
    switch input.u8() & 3 {
    case 0: break
    case 1: header = input.paddedBytes(12)
    default:
        header[0] = input.u8()          // flags (NEEDS_CSUM, DATA_VALID)
        header[1] = input.u8() & 0x87   // gso_type
        let numBuffers: UInt16 = input.u8() & 3 == 3 ? input.u16() : UInt16(1 + input.u8() % 3)
        header[10] = UInt8(truncatingIfNeeded: numBuffers); header[11] = UInt8(numBuffers >> 8)
    }
    let count = min(12, Int(s.len))
    for i in 0..<count { p.storeBytes(of: header[i], toByteOffset: i, as: UInt8.self) }
    switch input.u8() & 3 {
    case 0: return UInt32(input.u8())
    case 1: return b.writableBytes
    case 2: return UInt32(12 + Int(input.u16()) % 1600)
    default: return input.length(around: b.writableBytes)
    }
}

/// A chain from rxBurst: as many segments as it says, packet length = the sum of its segments,
/// every segment's data inside its buffer.
func checkChain(_ m: Mbuf, ringSize: Int) {
    var seg: Mbuf? = m
    var count = 0
    var total: UInt32 = 0
    while let s = seg {
        count += 1
        invariant(count <= ringSize, "mbuf chain longer than the ring")
        invariant(Int(s.dataOffset) + Int(s.dataLength) <= Int(s.bufferLength),
                  "segment data \(s.dataOffset)+\(s.dataLength) past a \(s.bufferLength)-byte buffer")
        total += UInt32(s.dataLength)
        seg = s.next
    }
    invariant(count == Int(m.segmentCount), "chain of \(count) segments says \(m.segmentCount)")
    invariant(total == m.packetLength, "packet length \(m.packetLength), segments hold \(total)")
}

func release(_ held: inout [Mbuf], _ seen: inout Set<UnsafeMutableRawPointer>, keep: Int) {
    while held.count > keep {
        let m = held.removeFirst()
        seen.remove(m.cookie)
        m.free()
    }
}

/// Up to 8 packets (some of two segments) handed to txBurst; what it does not take is freed here.
func transmit<R: Virtqueue & ~Copyable>(_ port: inout VirtioNetPort<R>, _ pool: PacketPool, _ input: inout FuzzInput) {
    let n = input.int(0...8)
    var made = 0
    for _ in 0..<n {
        guard let m = pool.allocate() else { break }
        let len = UInt16(1 + Int(input.u16()) % 1500)
        m.dataLength = len
        m.packetLength = UInt32(len)
        if input.u8() & 3 == 0, let m2 = pool.allocate() {
            let len2 = UInt16(1 + Int(input.u8()))
            m2.dataLength = len2
            m.next = m2
            m.segmentCount = 2
            m.packetLength += UInt32(len2)
        }
        Net.tx[made] = m
        made += 1
    }
    let sent = port.txBurst(Net.tx, count: made)
    invariant(sent >= 0 && sent <= made, "txBurst of \(made) took \(sent)")
    for i in sent..<made { Net.tx[i].free() }
}
