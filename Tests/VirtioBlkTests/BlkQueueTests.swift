import DPDK
import Foundation
import VirtioBlk
import VirtioCore
import VirtioTestSupport
import XCTest

enum TestEAL {
    static func require() throws {
        do { try InProcessEAL.require() } catch { throw XCTSkip("DPDK EAL could not start here: \(error)") }
    }
}

/// A virtio-blk device in this process: the shared `FakeTransport` with a blk config space; the
/// test then plays the device on its rings with the split or packed device model, executing
/// requests against an in-memory disk.
extension FakeTransport {
    static func blk(offered: VirtioFeatures, capacitySectors: UInt64, segMax: UInt32 = 0, numQueues: UInt16 = 1) -> FakeTransport {
        var c = [UInt8](repeating: 0, count: BlkConfig.size)
        func put<T: FixedWidthInteger>(_ v: T, at o: Int) { for k in 0..<(T.bitWidth / 8) { c[o + k] = UInt8(truncatingIfNeeded: v >> (8 * k)) } }
        put(capacitySectors, at: 0)
        put(segMax, at: 12)
        put(UInt32(512), at: 20)
        put(numQueues, at: 34)
        return FakeTransport(offered: offered, config: c, queueLimit: .deviceUnits(Int(numQueues)))
    }
}

/// The device side of either layout, reduced to what these tests need.
struct RingDevice {
    typealias Segment = SplitDeviceModel.Segment
    /// Available buffers: ID, segments, and descriptors taken in the ring (1 for an indirect table).
    var pop: () -> [(id: UInt16, segments: [Segment], ringDescriptors: Int)]
    var complete: ([UInt16], [UInt32]) -> Void
    var completeBatchAsOne: (Int, UInt32) -> Void
    var injectUsed: (UInt16, UInt32) -> Void
    var violations: () -> [String]

    static func split(_ a: QueueAddresses, indirect: Bool, inOrder: Bool) throws -> RingDevice {
        let layout = try SplitRingLayout(size: a.size)
        let m = SplitDeviceModel(memory: UnsafeMutableRawPointer(bitPattern: UInt(a.desc))! - layout.descOffset, layout: layout, inOrder: inOrder)
        m.indirectNegotiated = indirect
        return RingDevice(pop: { m.popAvailable().map { ($0.headId, $0.segments, $0.descriptors.count) } },
                          complete: { m.complete(ids: $0, lengths: $1) },
                          completeBatchAsOne: { m.completeBatchAsOne(count: $0, lastLength: $1) },
                          injectUsed: { m.injectUsed(id: UInt32($0), len: $1) },
                          violations: { m.violations })
    }

    static func packed(_ a: QueueAddresses) throws -> RingDevice {
        let layout = try PackedRingLayout(size: a.size)
        let m = PackedDeviceModel(memory: UnsafeMutableRawPointer(bitPattern: UInt(a.desc))! - layout.descOffset, layout: layout)
        return RingDevice(pop: { m.popAvailable().map { ($0.id, $0.segments, $0.descriptorCount) } },
                          complete: { m.complete(ids: $0, lengths: $1) },
                          completeBatchAsOne: { m.completeBatchAsOne(count: $0, lastLength: $1) },
                          injectUsed: { m.injectUsed(id: $0, len: $1) },
                          violations: { m.violations })
    }
}

/// What the device did with one request.
struct Served {
    var id: UInt16
    var operation: UInt32
    var sector: UInt64
    var dataSegments: Int
    /// Bytes written into device-writable buffers (data read + the status byte).
    var written: UInt32
}

/// `VirtioBlkDevice`/`VirtioBlkQueue` on both ring layouts against an in-process device: the
/// request layout on the ring (header, data, status as one chain; split may use an indirect
/// table, packed never does), completions in any order and as in-order batches, many laps of a
/// small ring, and a device that breaks the ring or disappears with requests in flight.
final class BlkQueueTests: XCTestCase {
    static let capacity: UInt64 = 2048  // 1 MiB
    var disk = [UInt8](repeating: 0, count: Int(capacity) * 512)

    override func setUpWithError() throws { try TestEAL.require() }

    let base: VirtioFeatures = [.version1, .blkFlush, .blkSegMax, .eventIndex]

    /// Poll pacing is off unless a test turns it on: these tests complete requests and poll
    /// once, and pacing may defer that poll (`testPollPacing` covers it).
    var directChainLimit = 4
    var pollPacing = false

    func options(ring: RingLayoutChoice, queueSize: Int, inOrder: Bool) -> VirtioBlkOptions {
        var o = VirtioBlkOptions()
        o.directChainLimit = directChainLimit
        o.pollPacing = pollPacing
        o.queueSize = queueSize
        o.ring = ring
        o.allowInOrder = inOrder
        return o
    }

    func open<Ring: Virtqueue & ~Copyable>(_: Ring.Type, offered: VirtioFeatures, queueSize: Int = 16, segMax: UInt32 = 0,
                                           inOrder: Bool = true) throws -> (FakeTransport, VirtioBlkDevice<Ring>) {
        let t = FakeTransport.blk(offered: offered, capacitySectors: Self.capacity, segMax: segMax)
        return (t, try VirtioBlkDevice<Ring>(transport: t, options: options(ring: Ring.layout, queueSize: queueSize, inOrder: inOrder)))
    }

    /// What `openVirtioBlkDevice` chose for `ring` (the layout is the device's type parameter).
    struct Chosen: VirtioBlkDeviceBody {
        func run<Ring: Virtqueue & ~Copyable>(_ d: VirtioBlkDevice<Ring>) throws -> (layout: RingLayoutChoice, maxSegments: Int) {
            (d.ringLayout, d.maxSegments)
        }
    }

    func open(offered: VirtioFeatures, ring: RingLayoutChoice = .auto, queueSize: Int = 16, segMax: UInt32 = 0)
        throws -> (FakeTransport, (layout: RingLayoutChoice, maxSegments: Int)) {
        let t = FakeTransport.blk(offered: offered, capacitySectors: Self.capacity, segMax: segMax)
        return (t, try openVirtioBlkDevice(transport: t, options: options(ring: ring, queueSize: queueSize, inOrder: true), Chosen()))
    }

    func ringDevice<Ring: Virtqueue & ~Copyable>(_ t: FakeTransport, _ d: VirtioBlkDevice<Ring>) throws -> RingDevice {
        let a = try XCTUnwrap(t.queueAddresses.first)
        return d.ringLayout == .packed ? try .packed(a)
            : try .split(a, indirect: d.features.contains(.indirectDescriptors), inOrder: d.features.contains(.inOrder))
    }

    /// Executes one request the way a device does: header, data, status byte.
    func serve(_ id: UInt16, _ segs: [RingDevice.Segment], writeStatus: Bool = true) -> Served {
        func ptr(_ a: UInt64) -> UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: UInt(a))! }
        XCTAssertGreaterThanOrEqual(segs.count, 2)
        XCTAssertEqual(segs.first?.len, 16, "the header comes first, 16 bytes")
        XCTAssertEqual(segs.first?.writable, false)
        XCTAssertEqual(segs.last?.len, 1, "the status byte comes last")
        XCTAssertEqual(segs.last?.writable, true)
        let header = ptr(segs[0].addr)
        let op = header.load(as: UInt32.self), sector = header.load(fromByteOffset: 8, as: UInt64.self)
        let data = segs.dropFirst().dropLast()
        var offset = Int(sector) * 512
        var written: UInt32 = 0
        for s in data {
            switch op {
            case BlkOperation.read.rawValue:
                XCTAssertTrue(s.writable, "read buffers are device-writable")
                disk.withUnsafeBytes { ptr(s.addr).copyMemory(from: $0.baseAddress! + offset, byteCount: Int(s.len)) }
                written += s.len
            case BlkOperation.write.rawValue:
                XCTAssertFalse(s.writable, "write buffers are device-readable")
                disk.withUnsafeMutableBytes { ($0.baseAddress! + offset).copyMemory(from: ptr(s.addr), byteCount: Int(s.len)) }
            default: break
            }
            offset += Int(s.len)
        }
        if writeStatus { ptr(segs.last!.addr).storeBytes(of: UInt8(0), as: UInt8.self) }
        return Served(id: id, operation: op, sector: sector, dataSegments: data.count, written: written + (writeStatus ? 1 : 0))
    }

    /// Pops everything available and serves it.
    func serveAll(_ dev: RingDevice) -> [Served] { dev.pop().map { serve($0.id, $0.segments) } }

    func poll<Ring: Virtqueue & ~Copyable>(_ q: inout VirtioBlkQueue<Ring>, upTo n: Int) -> [BlkCompletion] {
        let out = UnsafeMutablePointer<BlkCompletion>.allocate(capacity: 64)
        defer { out.deallocate() }
        var all: [BlkCompletion] = []
        for _ in 0..<8 where all.count < n {
            let k = q.poll(into: out, max: 64)
            all += (0..<k).map { out[$0] }
        }
        return all
    }

    // MARK: Negotiation

    func testLayoutFollowsTheOfferAndTheChoice() throws {
        // Packed offered: auto takes it, without indirect descriptors, whose chains must fit the ring.
        let (t, d) = try open(offered: base.union([.ringPacked, .indirectDescriptors, .inOrder]), queueSize: 16, segMax: 126)
        XCTAssertEqual(d.layout, .packed)
        XCTAssertTrue(t.negotiated.contains(.ringPacked))
        XCTAssertFalse(t.negotiated.contains(.indirectDescriptors))
        XCTAssertEqual(d.maxSegments, 14)
        XCTAssertEqual(t.queueAddresses.first?.base, PackedVirtqueue.resetBase)
        // Split forced on the same offer: indirect tables, so seg_max is the limit.
        let (t2, d2) = try open(offered: base.union([.ringPacked, .indirectDescriptors]), ring: .split, queueSize: 16, segMax: 126)
        XCTAssertEqual(d2.layout, .split)
        XCTAssertFalse(t2.negotiated.contains(.ringPacked))
        XCTAssertTrue(t2.negotiated.contains(.indirectDescriptors))
        XCTAssertEqual(d2.maxSegments, 126)
        // Packed forced on a device without it: a clear error.
        XCTAssertThrowsError(try open(offered: base, ring: .packed)) { e in
            XCTAssertEqual("\(e)", "the device does not offer packed virtqueues (VIRTIO_F_RING_PACKED)")
        }
        XCTAssertEqual(try open(offered: base).1.layout, .split)
    }

    // MARK: Requests on both layouts

    /// Writes and reads over scattered buffers, completed in reverse order; the device sees one
    /// chain per request and the data lands where it should.
    func roundTrip<Ring: Virtqueue & ~Copyable>(_ ring: Ring.Type, offered: VirtioFeatures, expectIndirect: Bool) throws {
        let (t, d) = try open(Ring.self, offered: offered, queueSize: 32)
        let dev = try ringDevice(t, d)
        var q = d.makeQueue(0)
        let arena = try DMAMemory(size: 1 << 20)
        // Four writes of 8 sectors in 1, 2, 3 and 4 pieces, at sectors 100, 200, 300, 400.
        var tag: UInt64 = 0
        for k in 0..<4 {
            let base = arena.pointer + k * 65536
            for i in 0..<4096 { base.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 &+ k), toByteOffset: i, as: UInt8.self) }
            let pieces = k + 1
            let lens = (0..<pieces).map { $0 == 0 ? 4096 - (4096 / pieces) * (pieces - 1) : 4096 / pieces }
            var off = 0
            let bufs = lens.map { len -> BlkBuffer in defer { off += len }; return BlkBuffer(base + off, length: len) }
            tag += 1
            try bufs.withUnsafeBufferPointer { (p) throws(BlkRequestError) in try q.write(sector: UInt64(100 * (k + 1)), from: p, tag: tag) }
        }
        q.commit()
        XCTAssertEqual(q.inFlight, 4)
        let avail = dev.pop()
        XCTAssertEqual(avail.count, 4, "each request is one buffer")
        for (k, a) in avail.enumerated() {
            // Split with indirect tables reads the chain from the table; packed always has it in the ring.
            XCTAssertEqual(a.segments.count, 2 + k + 1)
            XCTAssertEqual(a.ringDescriptors, expectIndirect && a.segments.count > directChainLimit ? 1 : a.segments.count)
            _ = serve(a.id, a.segments)
        }
        dev.complete(avail.reversed().map(\.id), avail.reversed().map { _ in 1 })
        let done = poll(&q, upTo: 4)
        XCTAssertEqual(done.map(\.tag), [4, 3, 2, 1], "completions come back in the device's order")
        XCTAssertTrue(done.allSatisfy { $0.status == .ok && $0.operation == .write && $0.bytes == 4096 })
        for k in 0..<4 {
            let at = 100 * (k + 1) * 512
            XCTAssertTrue((0..<4096).allSatisfy { disk[at + $0] == UInt8(truncatingIfNeeded: $0 &* 7 &+ k) }, "write \(k) in the disk")
        }
        // Read them back into 3 pieces each; complete two, then the other two in one go.
        let readBase = arena.pointer + 4 * 65536
        readBase.initializeMemory(as: UInt8.self, repeating: 0xA5, count: 4 * 4096)
        for k in 0..<4 {
            let b = readBase + k * 4096
            let bufs = [BlkBuffer(b, length: 512), BlkBuffer(b + 512, length: 1536), BlkBuffer(b + 2048, length: 2048)]
            tag += 1
            try bufs.withUnsafeBufferPointer { (p) throws(BlkRequestError) in try q.read(sector: UInt64(100 * (k + 1)), into: p, tag: tag) }
        }
        q.commit()
        let reads = dev.pop()
        let served = reads.map { serve($0.id, $0.segments) }
        XCTAssertEqual(served.map(\.written), [4097, 4097, 4097, 4097], "data and status")
        dev.complete([reads[2].id, reads[0].id], [4097, 4097])
        let first = poll(&q, upTo: 2)
        XCTAssertEqual(first.map(\.tag), [7, 5])
        dev.complete([reads[3].id, reads[1].id], [4097, 4097])
        let second = poll(&q, upTo: 2)
        XCTAssertEqual(second.map(\.tag), [8, 6])
        XCTAssertTrue((first + second).allSatisfy { $0.status == .ok && $0.bytes == 4096 })
        for k in 0..<4 {
            let b = readBase + k * 4096
            XCTAssertTrue((0..<4096).allSatisfy { b.load(fromByteOffset: $0, as: UInt8.self) == UInt8(truncatingIfNeeded: $0 &* 7 &+ k) }, "read \(k)")
        }
        XCTAssertEqual(q.inFlight, 0)
        XCTAssertEqual(dev.violations(), [])
    }

    func testRoundTripPacked() throws {
        try roundTrip(PackedVirtqueue.self, offered: base.union([.ringPacked, .indirectDescriptors]), expectIndirect: false)
    }
    func testRoundTripSplitIndirect() throws {
        directChainLimit = 1
        try roundTrip(SplitVirtqueue.self, offered: base.union([.indirectDescriptors]), expectIndirect: true)
    }
    /// The default limit (4): the 3- and 4-descriptor requests go straight into the ring, the
    /// 5- and 6-descriptor ones into tables.
    func testRoundTripSplitShortChainsDirect() throws {
        XCTAssertEqual(VirtioBlkOptions().directChainLimit, 4)
        try roundTrip(SplitVirtqueue.self, offered: base.union([.indirectDescriptors]), expectIndirect: true)
    }

    /// A short request takes a table when its chain would eat into the quarter of the ring kept
    /// for tables, and a queue with no descriptor left is full.
    func testDirectChainFallsBackToTableWhenRingIsShort() throws {
        let (t, d) = try open(SplitVirtqueue.self, offered: base.union([.indirectDescriptors]), queueSize: 8)
        let dev = try ringDevice(t, d)
        var q = d.makeQueue(0)
        let arena = try DMAMemory(size: 1 << 16)
        var used: [Int] = []
        for k in 0..<7 {
            let b = [BlkBuffer(arena.pointer + k * 4096, length: 4096)]
            // (Returned, not caught in the loop: Swift 6.3.1's ownership verifier crashes on that.)
            if let e = Self.read(&q, b, sector: UInt64(k * 8), tag: UInt64(k)) {
                XCTAssertEqual(e, .queueFull); used.append(-1); continue
            }
            q.commit()
            used += dev.pop().map(\.ringDescriptors)
        }
        // Two chains of 3 in the ring leave 2 free; direct chains never take the last quarter of
        // the ring, so the next two requests take a table each, then the queue is full.
        XCTAssertEqual(used, [3, 3, 1, 1, -1, -1, -1])
        XCTAssertEqual(dev.violations(), [])
    }

    static func read(_ q: inout VirtioBlkQueue<SplitVirtqueue>, _ b: [BlkBuffer], sector: UInt64, tag: UInt64) -> BlkRequestError? {
        do {
            try b.withUnsafeBufferPointer { (p) throws(BlkRequestError) in try q.read(sector: sector, into: p, tag: tag) }
            return nil
        } catch { return error }
    }

    /// With pacing on, a queue kept 24 deep completes thousands of requests, each once, while
    /// the device completes two at a time: a deferred poll only waits, it loses nothing; and a
    /// poll right after one that harvested is deferred.
    func testPollPacing() throws {
        pollPacing = true
        let (t, d) = try open(SplitVirtqueue.self, offered: base.union([.indirectDescriptors]), queueSize: 64)
        let dev = try ringDevice(t, d)
        var q = d.makeQueue(0)
        XCTAssertTrue(q.pollPacing)
        let arena = try DMAMemory(size: 32 * 4096)
        var tag: UInt64 = 0
        var outstanding = Set<UInt64>()
        func submit(_ q: inout VirtioBlkQueue<SplitVirtqueue>, slot: Int) throws {
            tag += 1
            let b = [BlkBuffer(arena.pointer + slot * 4096, length: 4096)]
            try b.withUnsafeBufferPointer { (p) throws(BlkRequestError) in try q.read(sector: UInt64(slot * 8), into: p, tag: tag) }
            outstanding.insert(tag)
        }
        for s in 0..<24 { try submit(&q, slot: s) }
        q.commit()
        var done = 0
        let out = UnsafeMutablePointer<BlkCompletion>.allocate(capacity: 64)
        defer { out.deallocate() }
        /// Checks `n` completions in `out` and submits a request for each.
        func take(_ q: inout VirtioBlkQueue<SplitVirtqueue>, _ n: Int) throws {
            for i in 0..<n {
                XCTAssertEqual(out[i].status, .ok)
                XCTAssertNotNil(outstanding.remove(out[i].tag), "tag \(out[i].tag) completed once")
                done += 1
                try submit(&q, slot: Int(out[i].tag % 24))
            }
        }
        let deadline = Date().addingTimeInterval(20)
        var waiting: [UInt16] = []
        // The device completes exactly 5000 (completions pile up while polls are deferred, so
        // it stops there and the second part starts with nothing left over).
        var completedByDevice = 0
        while done < 5000 && Date() < deadline {
            for a in dev.pop() { _ = serve(a.id, a.segments); waiting.append(a.id) }
            let now = waiting.prefix(min(2, 5000 - completedByDevice))
            if !now.isEmpty { dev.complete(Array(now), now.map { _ in 4097 }) }
            completedByDevice += now.count
            waiting.removeFirst(now.count)
            let n = q.poll(into: out, max: 64)
            try take(&q, n)
            q.commit()
        }
        XCTAssertEqual(done, 5000, "pacing must not stall the queue")
        XCTAssertEqual(q.inFlight, 24)

        // Two polls back to back while completions wait: the first takes two, the second is
        // deferred (returns 0 without looking); after a pause the rest comes. Without pacing
        // the second poll would return the other two. (Not timed: the gap after a harvest is
        // several µs at least, two calls in a row are well under one.)
        var deferred = 0
        for _ in 0..<10 {
            usleep(200)
            for a in dev.pop() { _ = serve(a.id, a.segments); waiting.append(a.id) }
            let now = waiting.prefix(4)
            dev.complete(Array(now), now.map { _ in 4097 })
            waiting.removeFirst(now.count)
            let first = q.poll(into: out, max: 2)
            let second = q.poll(into: out + first, max: 2)
            if first == 2 && second == 0 { deferred += 1 }
            try take(&q, first + second)
            var rest = 4 - first - second
            while rest > 0 && Date() < deadline {
                usleep(50)
                let n = q.poll(into: out, max: 64)
                try take(&q, n)
                rest -= n
            }
            q.commit()
        }
        XCTAssertGreaterThanOrEqual(deferred, 8, "a poll right after a harvest, with 24 in flight, waits")
        XCTAssertEqual(done, 5040)
        XCTAssertEqual(q.inFlight, 24)
        XCTAssertEqual(dev.violations(), [])
    }
    func testRoundTripSplitChains() throws {
        try roundTrip(SplitVirtqueue.self, offered: base, expectIndirect: false)
    }

    /// Thousands of requests of 3 to 5 descriptors through an 8-entry ring: the packed wrap
    /// counters flip hundreds of times, requests straddle the end of the ring, and an in-order
    /// device answers batches with one used entry.
    func laps<Ring: Virtqueue & ~Copyable>(_ ring: Ring.Type, offered: VirtioFeatures, inOrder: Bool) throws {
        let (t, d) = try open(Ring.self, offered: offered, queueSize: 8, inOrder: inOrder)
        XCTAssertEqual(d.features.contains(.inOrder), inOrder)
        let dev = try ringDevice(t, d)
        var q = d.makeQueue(0)
        let arena = try DMAMemory(size: 64 * 1024)
        var tag: UInt64 = 0, completed = 0, rounds = 0
        var rng: UInt64 = 0x1234_5678
        func next() -> Int { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return Int(rng % 1000) }
        while completed < 3000 {
            rounds += 1
            // Fill what fits: 1 to 3 data segments per write, each of a different sector.
            var submitted = 0
            while true {
                let pieces = 1 + next() % 3
                let sector = UInt64(next() % 2000)
                let bufs = (0..<pieces).map { BlkBuffer(arena.pointer + Int(tag % 8) * 8192 + $0 * 512, length: 512) }
                let refused = bufs.withUnsafeBufferPointer { p -> BlkRequestError? in
                    do throws(BlkRequestError) { try q.write(sector: sector, from: p, tag: tag); return nil } catch { return error }
                }
                if let refused {
                    XCTAssertEqual(refused, .queueFull)
                    break
                }
                tag += 1; submitted += 1
            }
            q.commit()
            XCTAssertGreaterThan(submitted, 0)
            let avail = dev.pop()
            XCTAssertEqual(avail.count, submitted)
            for a in avail { _ = serve(a.id, a.segments) }
            if inOrder && rounds % 2 == 0 {
                dev.completeBatchAsOne(avail.count, 1)
            } else if inOrder {
                dev.complete(avail.map(\.id), avail.map { _ in 1 })
            } else {
                let order = avail.indices.sorted { ($0 * 7919 + rounds) % 13 < ($1 * 7919 + rounds) % 13 }
                dev.complete(order.map { avail[$0].id }, order.map { _ in 1 })
            }
            let done = poll(&q, upTo: submitted)
            XCTAssertEqual(done.count, submitted, "round \(rounds)")
            XCTAssertTrue(done.allSatisfy { $0.status == .ok }, "round \(rounds)")
            completed += done.count
            if q.isStopped { XCTFail("stopped: \(q.stopReason ?? "")"); return }
        }
        XCTAssertEqual(q.inFlight, 0)
        XCTAssertEqual(dev.violations(), [])
        XCTAssertGreaterThan(t.notifications, 0)
    }

    func testManyLapsPackedInOrderWithBatches() throws {
        try laps(PackedVirtqueue.self, offered: base.union([.ringPacked, .inOrder]), inOrder: true)
    }
    func testManyLapsPackedOutOfOrder() throws {
        try laps(PackedVirtqueue.self, offered: base.union([.ringPacked]), inOrder: false)
    }
    func testManyLapsSplitInOrderWithBatches() throws {
        try laps(SplitVirtqueue.self, offered: base.union([.inOrder]), inOrder: true)
    }

    // MARK: A device that misbehaves

    /// A used entry with an ID that was never posted stops the queue; every request in flight
    /// comes back failed, nothing is lost, and nothing new is taken.
    func brokenRing<Ring: Virtqueue & ~Copyable>(_ ring: Ring.Type, offered: VirtioFeatures,
                                                  fault: (RingDevice, [(id: UInt16, segments: [RingDevice.Segment], ringDescriptors: Int)]) -> Void,
                                                  expect: String) throws {
        let (t, d) = try open(Ring.self, offered: offered, queueSize: 16, inOrder: false)
        let dev = try ringDevice(t, d)
        var q = d.makeQueue(0)
        let arena = try DMAMemory(size: 65536)
        for k in 0..<3 {
            let b = [BlkBuffer(arena.pointer + k * 4096, length: 4096)]
            try b.withUnsafeBufferPointer { (p) throws(BlkRequestError) in try q.read(sector: UInt64(k * 8), into: p, tag: UInt64(10 + k)) }
        }
        q.commit()
        let avail = dev.pop()
        for a in avail { _ = serve(a.id, a.segments) }
        fault(dev, avail)
        let out = poll(&q, upTo: 3)
        XCTAssertTrue(q.isStopped)
        XCTAssertTrue(q.stopReason?.contains(expect) == true, q.stopReason ?? "not stopped")
        XCTAssertEqual(t.stops, 1, "the device was stopped")
        XCTAssertEqual(Set(out.map(\.tag)), [10, 11, 12], "every request comes back once")
        XCTAssertTrue(out.allSatisfy { $0.status == .deviceGone })
        XCTAssertEqual(q.inFlight, 0)
        XCTAssertThrowsError(try q.flush(tag: 99)) { XCTAssertEqual($0 as? BlkRequestError, .queueStopped(q.stopReason!)) }
    }

    func testPackedUnknownIDStopsTheQueue() throws {
        try brokenRing(PackedVirtqueue.self, offered: base.union(.ringPacked), fault: { dev, _ in dev.injectUsed(15, 1) }, expect: "not in flight")
    }
    func testPackedOutOfRangeIDStopsTheQueue() throws {
        try brokenRing(PackedVirtqueue.self, offered: base.union(.ringPacked), fault: { dev, _ in dev.injectUsed(16, 1) }, expect: "outside")
    }
    func testPackedLengthPastTheBufferStopsTheQueue() throws {
        try brokenRing(PackedVirtqueue.self, offered: base.union(.ringPacked),
                       fault: { dev, a in dev.complete([a[1].id], [4098]) }, expect: "4098")
    }
    func testSplitLengthPastTheBufferStopsTheQueue() throws {
        try brokenRing(SplitVirtqueue.self, offered: base, fault: { dev, a in dev.complete([a[0].id], [5000]) }, expect: "5000")
    }

    /// A completion whose status byte the device never wrote is not taken for success.
    func testUnwrittenStatusIsNotSuccess() throws {
        let (t, d) = try open(PackedVirtqueue.self, offered: base.union(.ringPacked), queueSize: 16)
        let dev = try ringDevice(t, d)
        var q = d.makeQueue(0)
        try q.flush(tag: 1)
        q.commit()
        let a = dev.pop()
        XCTAssertEqual(a.count, 1)
        XCTAssertEqual(serve(a[0].id, a[0].segments, writeStatus: false).operation, BlkOperation.flush.rawValue)
        dev.complete([a[0].id], [0])
        let c = poll(&q, upTo: 1)
        XCTAssertEqual(c.first?.status, .badStatus(0xff))
        XCTAssertFalse(q.isStopped)
    }

    /// The device disappears with requests in flight and the transport only says so when asked
    /// (virtio-pci's status register): they come back failed after `checkDevice`.
    func testDeviceGoneFailsRequestsInFlight() throws {
        let (t, d) = try open(PackedVirtqueue.self, offered: base.union(.ringPacked), queueSize: 16)
        var q = d.makeQueue(0)
        try q.flush(tag: 1)
        try q.flush(tag: 2)
        q.commit()
        t.disconnect(notifyLink: false)
        q.checkDevice()
        XCTAssertEqual(q.stopReason, "the fake device was unplugged")
        let c = poll(&q, upTo: 2)
        XCTAssertEqual(Set(c.map(\.tag)), [1, 2])
        XCTAssertTrue(c.allSatisfy { $0.status == .deviceGone })
        XCTAssertEqual(q.inFlight, 0)
    }

    /// A hang-up the transport reports itself (vhost-user's monitor) reaches the queue through
    /// the device's link at the next poll, without `checkDevice`.
    func testTransportLossReachesTheQueueThroughTheLink() throws {
        let (t, d) = try open(SplitVirtqueue.self, offered: base, queueSize: 16)
        var q = d.makeQueue(0)
        try q.flush(tag: 7)
        q.commit()
        t.disconnect("backend hung up")
        let c = poll(&q, upTo: 1)
        XCTAssertEqual(c.map(\.tag), [7])
        XCTAssertEqual(c.first?.status, .deviceGone)
        XCTAssertEqual(q.stopReason, "backend hung up")
        XCTAssertEqual(q.inFlight, 0)
    }

    /// One queue of three breaks its ring while every queue has requests in flight: the device is
    /// stopped once, and every request of every queue comes back once as `.deviceGone` (the broken
    /// queue's at its poll, its siblings' at theirs, through the device's one link); every slot is
    /// free again and new requests are refused with the reason.
    func siblingsFail<Ring: Virtqueue & ~Copyable>(_: Ring.Type, offered: VirtioFeatures) throws {
        let t = FakeTransport.blk(offered: offered.union(.blkMultiQueue), capacitySectors: Self.capacity, numQueues: 3)
        var o = options(ring: Ring.layout, queueSize: 8, inOrder: true)
        o.queues = 3
        let d = try VirtioBlkDevice<Ring>(transport: t, options: o)
        XCTAssertEqual(d.queueCount, 3)
        var q0 = d.makeQueue(0), q1 = d.makeQueue(1), q2 = d.makeQueue(2)
        for k in 0..<3 {
            try q0.flush(tag: UInt64(k)); try q1.flush(tag: UInt64(10 + k)); try q2.flush(tag: UInt64(20 + k))
        }
        q0.commit(); q1.commit(); q2.commit()
        XCTAssertEqual(q0.inFlight + q1.inFlight + q2.inFlight, 9)
        // Queue 0's device returns an id that is not in flight.
        let a = t.queueAddresses
        XCTAssertEqual(a.count, 3)
        let bad: RingDevice = Ring.layout == .packed ? try .packed(a[0]) : try .split(a[0], indirect: false, inOrder: true)
        _ = bad.pop()
        bad.injectUsed(7, 1)
        var c0 = poll(&q0, upTo: 3)
        XCTAssertTrue(q0.isStopped)
        XCTAssertEqual(t.stops, 1, "the device stopped once, before any buffer went back")
        // Its siblings never saw their rings fail; the link tells them.
        let c1 = poll(&q1, upTo: 3), c2 = poll(&q2, upTo: 3)
        c0 += poll(&q0, upTo: 3)
        XCTAssertEqual(Set(c0.map(\.tag)), [0, 1, 2])
        XCTAssertEqual(Set(c1.map(\.tag)), [10, 11, 12])
        XCTAssertEqual(Set(c2.map(\.tag)), [20, 21, 22])
        XCTAssertTrue((c0 + c1 + c2).allSatisfy { $0.status == .deviceGone }, "\(c0 + c1 + c2)")
        XCTAssertEqual(c0.count + c1.count + c2.count, 9, "each request returned once")
        XCTAssertEqual(q0.inFlight + q1.inFlight + q2.inFlight, 0, "every slot is free")
        XCTAssertTrue(q1.isStopped && q2.isStopped)
        XCTAssertTrue(q1.stopReason?.contains("queue 0: the device broke the ring") == true, q1.stopReason ?? "nil")
        XCTAssertEqual(t.stops, 1)
        XCTAssertThrowsError(try q2.flush(tag: 99)) { e in
            guard case .queueStopped = e as? BlkRequestError else { return XCTFail("\(e)") }
        }
    }

    // MARK: Reconnect

    /// Polls until `cond` or a second passes, collecting completions.
    func pollUntil<Ring: Virtqueue & ~Copyable>(_ q: inout VirtioBlkQueue<Ring>, _ cond: (borrowing VirtioBlkQueue<Ring>) -> Bool) -> [BlkCompletion] {
        var got: [BlkCompletion] = []
        let end = Date().addingTimeInterval(2)
        while !cond(q) && Date() < end { got += poll(&q, upTo: 8); usleep(500) }
        return got
    }

    /// The device is lost with two requests in flight, one of which it completed before it went;
    /// a third is submitted during the outage. That one is kept for later, the completed one is
    /// reported, and after the reconnect the unfinished one is submitted again on the reset ring
    /// (`inflight` false) — or, with a device that tracks in-flight requests itself, the ring is
    /// handed back as it was and the device finishes it there. Nothing is reported twice or lost.
    func reconnect(inflight: Bool) throws {
        let t = FakeTransport.blk(offered: base, capacitySectors: Self.capacity)
        t.reconnectable = true
        t.tracksInflight = inflight
        var o = options(ring: .split, queueSize: 16, inOrder: true)
        o.reconnect = ReconnectPolicy(timeout: 5)
        let d = try VirtioBlkDevice<SplitVirtqueue>(transport: t, options: o)
        XCTAssertEqual(d.inflightTracked, inflight)
        var q = d.makeQueue(0)
        try q.flush(tag: 1); try q.flush(tag: 2)
        q.commit()
        let dev = try ringDevice(t, d)
        // The device's side of a flush: status OK into the last segment.
        func ok(_ p: [(id: UInt16, segments: [RingDevice.Segment], ringDescriptors: Int)]) -> [UInt16] {
            for r in p { UnsafeMutableRawPointer(bitPattern: UInt(r.segments.last!.addr))!.storeBytes(of: UInt8(0), as: UInt8.self) }
            return p.map(\.id)
        }
        let popped = dev.pop()
        XCTAssertEqual(popped.count, 2)
        dev.complete(ok([popped[0]]), [1])
        t.disconnect("daemon killed")
        var got = pollUntil(&q) { $0.isSuspended }
        XCTAssertTrue(q.isSuspended)
        XCTAssertEqual(got.map(\.tag), [1], "what the device completed before it went is reported")
        XCTAssertEqual(got.first?.status, .ok)
        try q.flush(tag: 3)  // during the outage: kept for later
        q.commit()
        XCTAssertEqual(q.inFlight, 2)
        t.comeBack()
        got = pollUntil(&q) { !$0.isSuspended }
        XCTAssertEqual(got.count, 0)
        XCTAssertFalse(q.isSuspended)
        let a = try XCTUnwrap(t.latest(0))
        if inflight {
            XCTAssertEqual(a.base, 2, "the ring is handed back where it stood")
            // The same device (same ring memory) finishes what it had, then takes the new one.
            dev.complete(ok([popped[1]]), [1])
            let next = dev.pop()
            XCTAssertEqual(next.count, 1)
            dev.complete(ok(next), [1])
            XCTAssertEqual(q.resubmitted, 0)
        } else {
            XCTAssertEqual(a.base, 0, "a fresh ring")
            let fresh = try RingDevice.split(a, indirect: false, inOrder: true)
            let again = fresh.pop()
            XCTAssertEqual(again.count, 2, "the unfinished request, then the new one")
            fresh.complete(ok(again), [1, 1])
            XCTAssertEqual(q.resubmitted, 1)
        }
        got = pollUntil(&q) { $0.inFlight == 0 }
        XCTAssertEqual(got.map(\.tag).sorted(), [2, 3])
        XCTAssertTrue(got.allSatisfy { $0.status == .ok }, "\(got)")
        XCTAssertEqual(q.outagesSurvived, 1)
        XCTAssertEqual(d.core.outages.map(\.recovered), [true])
    }

    func testReconnectSubmitsAgain() throws { try reconnect(inflight: false) }
    func testReconnectWithDeviceTrackedInflight() throws { try reconnect(inflight: true) }

    func testOneQueueFailingFailsItsSiblingsSplit() throws { try siblingsFail(SplitVirtqueue.self, offered: base) }
    func testOneQueueFailingFailsItsSiblingsPacked() throws { try siblingsFail(PackedVirtqueue.self, offered: base.union(.ringPacked)) }

    /// A device offering VIRTIO_BLK_F_MQ with num_queues 0 is refused with the value named.
    func testMultiQueueWithZeroQueuesIsRefused() throws {
        let t = FakeTransport.blk(offered: base.union(.blkMultiQueue), capacitySectors: Self.capacity, numQueues: 0)
        XCTAssertThrowsError(try VirtioBlkDevice<SplitVirtqueue>(transport: t, options: options(ring: .split, queueSize: 8, inOrder: true))) { e in
            XCTAssertEqual("\(e)", "virtio-blk: the device offers VIRTIO_BLK_F_MQ with num_queues 0")
        }
    }

    /// Found by the blk-config-status fuzz target (Fuzz/Regressions/blk-config-status): a transport
    /// that allows 0 queues (virtio-pci num_queues 0) opened a device without queues, and the
    /// first `makeQueue(0)` trapped.
    func testTransportWithZeroQueuesIsRefused() throws {
        for limit in [QueueLimit.virtqueues(0), .deviceUnits(0)] {
            var c = [UInt8](repeating: 0, count: BlkConfig.size)
            c[0] = 64
            let t = FakeTransport(offered: base, config: c, queueLimit: limit)
            XCTAssertThrowsError(try VirtioBlkDevice<SplitVirtqueue>(transport: t, options: options(ring: .split, queueSize: 8, inOrder: true))) { e in
                XCTAssertTrue("\(e)".hasSuffix("offers 0 queues"), "\(e)")
            }
        }
    }
}
