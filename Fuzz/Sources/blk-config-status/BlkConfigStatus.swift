import FuzzSupport
import VirtioBlk
import VirtioCore
import VirtioTestSupport
#if canImport(Glibc)
import Glibc
#endif

// blk-config-status: VirtioBlkDevice opened over FakeTransport with config space (capacity,
// size_max, seg_max, blk_size, num_queues, discard/write-zeroes limits, topology), offered
// features, queue limit and options from the input; then requests of every kind submitted,
// committed and completed by the device (split or packed, in order, out of order, batched,
// bogus used entries) with input-chosen status bytes and used lengths; stops and polls.
// Thrown errors are fine; traps are bugs.
//
// Checked: a device that opens has a queue; every completion is for a request in flight, comes
// back once, with its operation, and bytes = the request's bytes when OK, else 0; after a
// stop every request comes back (deviceGone) and the queue holds nothing.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    var input = FuzzInput(data, size)
    let cfg = input.u8()
    // Offered features: VERSION_1 (nearly always), then any of the blk and ring bits.
    var offered: VirtioFeatures = cfg & 0x80 == 0 ? [.version1] : []
    let known: [VirtioFeatures] = [.blkSizeMax, .blkSegMax, .blkGeometry, .blkReadOnly, .blkBlockSize, .blkFlush,
                                   .blkTopology, .blkConfigWCE, .blkMultiQueue, .blkDiscard, .blkWriteZeroes,
                                   .indirectDescriptors, .eventIndex, .inOrder, .ringPacked]
    let bits = input.u16()
    for (i, f) in known.enumerated() where bits & (1 << UInt16(i)) != 0 { offered.insert(f) }
    // Config space: the 60-byte struct virtio_blk_config, sometimes short or missing.
    let configLength = cfg & 0x40 == 0 ? BlkConfig.size : [0, 8, 36, 59, 64][Int(input.u8() % 5)]
    let config = input.paddedBytes(configLength)
    // What the transport says about queues (0: virtio-pci num_queues 0, refused since 193972d;
    // Regressions/blk-config-status/crash-zero-queue-limit).
    let limit: QueueLimit?
    switch input.u8() & 3 {
    case 0: limit = nil
    case 1: limit = .deviceUnits(Int(input.u8() % 5))
    case 2: limit = .virtqueues(Int(input.u8() % 5))
    default: limit = .deviceUnits(1)
    }
    var o = VirtioBlkOptions()
    o.queues = 1 + Int(input.u8() & 3)
    // Mostly small rings (many laps, cheap inputs); the largest now and then.
    let sizeChoice = input.u8()
    o.queueSize = sizeChoice == 0xff ? 4096 : [16, 4, 8, 64, 256, 2, 32, 16][Int(sizeChoice & 7)]
    let flags = input.u8()
    o.allowInOrder = flags & 1 != 0
    o.allowIndirect = flags & 2 != 0
    o.allowEventIndex = flags & 4 != 0
    o.pollPacing = flags & 8 != 0
    o.ring = [.auto, .split, .packed, .split][Int(flags >> 4 & 3)]
    o.directChainLimit = Int(flags >> 6) + (flags & 0x80 != 0 ? 0 : 1)
    let t = FakeTransport(offered: offered, config: config, queueLimit: limit)
    guard let layout = o.ring.resolve(offered: offered) else { return 0 }
    if layout == .packed { run(PackedVirtqueue.self, t, o, &input) } else { run(SplitVirtqueue.self, t, o, &input) }
    return 0
}

/// A request the harness submitted: its operation, data bytes and buffers (freed when it is back).
struct Request {
    var operation: BlkOperation
    var bytes: Int
    var buffers: [UnsafeMutableRawPointer]
}

func run<R: Virtqueue & ~Copyable>(_: R.Type, _ t: FakeTransport, _ o: VirtioBlkOptions, _ input: inout FuzzInput) {
    let device: VirtioBlkDevice<R>
    do {
        device = try VirtioBlkDevice<R>(transport: t, options: o, memory: FuzzDMAAllocator())
    } catch {
        verbose("blk: open: \(error)")
        return
    }
    invariant(device.queueCount >= 1, "the device opened with \(device.queueCount) queues")
    invariant(device.maxSegments >= 1, "the device opened with maxSegments \(device.maxSegments)")
    var q = device.makeQueue(0)
    let model = RingDevice(layout: R.layout, addresses: t.latest(0)!, inOrder: device.features.contains(.inOrder),
                           indirect: device.features.contains(.indirectDescriptors))
    let capacity = device.config.capacity
    var inFlight: [UInt64: Request] = [:]
    var nextTag: UInt64 = 1
    let out = UnsafeMutablePointer<BlkCompletion>.allocate(capacity: 64)
    defer { out.deallocate() }

    func poll(_ q: inout VirtioBlkQueue<R>, max: Int) -> Int {
        let n = q.poll(into: out, max: max)
        invariant(n >= 0 && n <= max, "poll(max: \(max)) returned \(n)")
        for i in 0..<n {
            let c = out[i]
            guard let r = inFlight.removeValue(forKey: c.tag) else {
                fatalError("fuzz invariant violated: completion for tag \(c.tag), which is not in flight (twice, or never submitted)")
            }
            invariant(c.operation == r.operation, "tag \(c.tag): completed as \(c.operation), submitted as \(r.operation)")
            invariant(c.bytes == (c.status == .ok ? UInt32(r.bytes) : 0),
                      "tag \(c.tag) \(c.status): \(c.bytes) bytes, the request had \(r.bytes)")
            for b in r.buffers { b.deallocate() }
        }
        return n
    }

    var steps = 0
    while !input.isEmpty && steps < 256 {
        steps += 1
        switch input.u8() % 8 {
        case 0, 1:
            // Submit one request of any kind, near the ends of the disk mostly.
            let tag = nextTag
            nextTag += 1
            let kind = input.u8()
            let sector: UInt64
            switch input.u8() & 3 {
            case 0: sector = 0
            case 1: sector = capacity &- UInt64(input.u8())
            case 2: sector = UInt64(input.u16())
            default: sector = input.u64()
            }
            var buffers: [UnsafeMutableRawPointer] = []
            var lengths: [Int] = []
            let op: BlkOperation = [.read, .write, .flush, .discard, .writeZeroes, .getID, .read, .write][Int(kind & 7)]
            if op == .read || op == .write || op == .getID {
                // get-id takes one buffer; reads and writes up to four segments.
                for _ in 0..<(op == .getID ? 1 : 1 + Int(input.u8() % 4)) {
                    let len = input.u8() & 3 == 0 ? Int(input.u16() % 4097) : 512 * (1 + Int(input.u8() & 7))
                    lengths.append(len)
                    buffers.append(.allocate(byteCount: max(len, 1), alignment: 512))
                }
            }
            let blkBuffers = zip(buffers, lengths).map { BlkBuffer($0, length: $1) }
            do throws(BlkRequestError) {
                try blkBuffers.withUnsafeBufferPointer { (b) throws(BlkRequestError) in
                    switch op {
                    case .read: try q.read(sector: sector, into: b, tag: tag)
                    case .write: try q.write(sector: sector, from: b, tag: tag)
                    case .flush: try q.flush(tag: tag)
                    case .discard: try q.discard(sector: sector, sectors: input.length(around: 8), tag: tag)
                    case .writeZeroes: try q.writeZeroes(sector: sector, sectors: input.length(around: 8), unmap: input.bool(), tag: tag)
                    case .getID: try q.getID(into: b[0], tag: tag)
                    }
                }
                inFlight[tag] = Request(operation: op, bytes: op == .read || op == .write || op == .getID ? lengths.reduce(0, +) : 0,
                                        buffers: buffers)
            } catch {
                verbose("blk: \(op): \(error)")
                for b in buffers { b.deallocate() }
            }
        case 2: q.commit()
        case 3, 4:
            model.step(&input) { b, input in
                // The status byte is the chain's last, 1-byte, device-writable segment.
                if input.u8() & 7 != 0, let s = b.segments.last, s.writable, s.len >= 1,
                   let p = UnsafeMutableRawPointer(bitPattern: UInt(s.addr)) {
                    let status: UInt8 = input.u8() & 3 == 3 ? input.u8() : input.u8() % 3
                    p.storeBytes(of: status, as: UInt8.self)
                }
                return input.u8() & 3 == 0 ? input.length(around: b.writableBytes) : b.writableBytes
            }
        case 5, 6:
            _ = poll(&q, max: input.int(1...64))
        default:
            switch input.u8() & 7 {
            case 0: device.stop(reason: "fuzz")
            case 1: q.checkDevice()
            default: q.commit()
            }
        }
        invariant(q.inFlight == inFlight.count, "queue has \(q.inFlight) in flight, \(inFlight.count) submitted")
    }
    // The device stops: every request comes back.
    device.stop(reason: "end of input")
    var rounds = 0
    while !inFlight.isEmpty && rounds < 100 {
        _ = poll(&q, max: 64)
        rounds += 1
    }
    invariant(inFlight.isEmpty, "\(inFlight.count) requests never came back after the device stopped")
    invariant(q.inFlight == 0, "queue still has \(q.inFlight) in flight after the stop")
    _ = model
}
