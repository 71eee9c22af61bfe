import VirtioCore
import VirtioTestSupport
import XCTest

/// `reclaimAll` on a healthy queue: every buffer the driver still owns comes back exactly once,
/// whatever state it is in (unpublished, published, popped by the device, completed but not
/// harvested), and the queue is as new afterwards. Every topic runs on both layouts.
final class ReclaimTests: XCTestCase {
    func reclaimAllReturnsEveryBufferInFlight<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for inOrder in [false, true] {
            for size in [1, 8, 256] {
                try reclaimEverywhere(Q.self, size: size, inOrder: inOrder)
            }
        }
    }

    func testReclaimAllReturnsEveryBufferInFlightSplit() throws { try reclaimAllReturnsEveryBufferInFlight(SplitVirtqueue.self) }
    func testReclaimAllReturnsEveryBufferInFlightPacked() throws { try reclaimAllReturnsEveryBufferInFlight(PackedVirtqueue.self) }

    func reclaimEverywhere<Q: TestedQueue & ~Copyable>(_: Q.Type, size: Int, inOrder: Bool) throws {
        let what = "\(Q.layoutName) size \(size) inOrder \(inOrder)"
        let ring = try makeRing(Q.self, size: size, inOrder: inOrder)
        let device = ring.device
        var q = ring.queue(inOrder: inOrder)
        fastForward(&q, device, by: 1000 + size / 2)       // not at slot 0

        // Chains of 1–3 descriptors until the table is full; then publish, pop, complete and
        // harvest only parts of them, leaving buffers in every state.
        var k = 0
        var chainLengths = 0
        while true {
            let n = min(1 + k % 3, size)
            guard q.addChain(count: n, cookie: cookie(k + 1), { VirtqSegment(addr: address(k + 1, segment: $0), len: 64, deviceWritable: true) })
            else { break }
            k += 1
            chainLengths += n
            if k == max(1, size / 4) { _ = q.publish(); device.popBuffers() }
            if k == max(1, size / 2) { _ = q.publish() }
        }
        XCTAssertEqual(q.freeCount, size - chainLengths, what)
        let heldByDevice = device.pendingCount
        device.completeInOrder(count: heldByDevice / 2, lengths: nil)
        var harvested = Set<Int>()
        _ = q.harvest(max: heldByDevice / 4) { c, _ in harvested.insert(key(c)) }
        XCTAssertEqual(q.inFlight, k - harvested.count, what)

        // forEachInFlight shows the same buffers and changes nothing.
        var seen: [Int] = []
        let free = q.freeCount
        XCTAssertEqual(q.forEachInFlight { seen.append(key($0)) }, k - harvested.count, what)
        XCTAssertEqual(q.freeCount, free, what)
        XCTAssertEqual(q.inFlight, k - harvested.count, what)

        var back: [Int] = []
        XCTAssertEqual(q.reclaimAll { back.append(key($0)) }, k - harvested.count, what)
        XCTAssertEqual(back, seen, what)
        if inOrder { XCTAssertEqual(back, back.sorted(), "\(what): oldest first") }
        XCTAssertEqual(back.count, Set(back).count, "\(what): a cookie came back twice")
        XCTAssertEqual(Set(back).union(harvested), Set(1...k), what)
        XCTAssertTrue(Set(back).isDisjoint(with: harvested), what)
        XCTAssertEqual(q.freeCount, size, what)
        XCTAssertEqual(q.inFlight, 0, what)
        XCTAssertNil(q.failure, what)
        if let ready = q.completedCountIfAny() { XCTAssertEqual(ready, 0, what) }
        XCTAssertEqual(q.reclaimAll { _ in XCTFail("\(what): second reclaim") }, 0, what)
        XCTAssertEqual(q.addresses.base, Q.resetBase, what)

        // The rings are as new: a reset device finds nothing available, and poll mode is asked
        // for again.
        device.reset()
        XCTAssertEqual(device.availableCount, 0, what)
        XCTAssertTrue(device.driverSuppressesUsedNotifications, what)

        // Reusable: a restarted device sees descriptors from slot 0 again, and round trips work
        // (across the wrap, to be sure no stale state survived).
        fastForward(&q, device, by: 65536 - size)
        for j in 1...size { addSingle(&q, j, len: 32, writable: true) }
        _ = q.publish()
        XCTAssertEqual(device.popBuffers().map(owner), Array(1...size), what)
        device.completeInOrder(count: size, lengths: Array(repeating: 31, count: size))
        var again: [Int] = []
        XCTAssertEqual(q.harvest(max: size) { c, len in again.append(key(c)); XCTAssertEqual(len, 31) }, size, what)
        XCTAssertEqual(again, Array(1...size), what)
        XCTAssertEqual(device.usedBase, Q.expectedBase(buffers: 65536, descriptors: 65536, size: size),
                       "\(what): crossed the wrap after the reset")
        XCTAssertEqual(q.freeCount, size, what)
        XCTAssertEqual(device.violations, [], what)
    }

    /// Buffers in every state (completed and harvested; completed, not harvested; popped, not
    /// completed; not popped), after 0 and 13 round trips: `reclaimAll` returns each one not
    /// harvested exactly once (in order: oldest first), zeroes the ring, and the queue and a
    /// reset device start over with a full ring, completed in a random order (or as one batch in
    /// order).
    func reclaimAllWithBuffersInFlightAndReuse<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for inOrder in [false, true] {
            for start in [0, 13] {
                let what = "\(Q.layoutName) \(inOrder ? "in order" : "out of order") start \(start)"
                let size = 8
                let ring = try makeRing(Q.self, size: size, inOrder: inOrder)
                let device = ring.device
                var q = ring.queue(inOrder: inOrder)
                fastForward(&q, device, by: start)
                XCTAssertTrue(q.addChain(count: 2, cookie: cookie(1)) { i in VirtqSegment(addr: address(1, segment: i), len: 10, deviceWritable: i == 1) })
                addSingle(&q, 2, len: 20, writable: true)
                XCTAssertTrue(q.addChain(count: 3, cookie: cookie(3)) { i in VirtqSegment(addr: address(3, segment: i), len: 30, deviceWritable: true) })
                _ = q.publish()
                XCTAssertEqual(device.popBuffers().count, 3, what)
                addSingle(&q, 4, len: 40, writable: true)     // never popped
                device.completeInOrder(count: 1, lengths: nil)
                XCTAssertPairs(harvested(&q, max: 8), [(1, 10)], what)
                if inOrder {
                    device.completeInOrder(count: 1, lengths: nil)
                } else {
                    device.complete(ids: [device.pendingBuffers.last!.id], lengths: nil)
                }
                // 2 (or 3) completed but not harvested; the other popped; 4 not popped.
                XCTAssertEqual(q.inFlight, 3, what)
                XCTAssertEqual(q.freeCount, 3, what)
                var seen: [Int] = []
                XCTAssertEqual(q.forEachInFlight { seen.append(key($0)) }, 3, what)
                XCTAssertEqual(q.inFlight, 3, "forEachInFlight changes nothing; \(what)")
                var back: [Int] = []
                XCTAssertEqual(q.reclaimAll { back.append(key($0)) }, 3, what)
                if inOrder { XCTAssertEqual(back, [2, 3, 4], what) } else { XCTAssertEqual(back.sorted(), [2, 3, 4], what) }
                XCTAssertEqual(seen, back, what)
                XCTAssertEqual(q.inFlight, 0, what)
                XCTAssertEqual(q.freeCount, size, what)
                XCTAssertNil(q.failure, what)
                XCTAssertEqual(q.addresses.base, Q.resetBase, what)
                XCTAssertEqual(q.reclaimAll { _ in XCTFail("twice") }, 0, what)
                XCTAssertTrue(device.driverSuppressesUsedNotifications, what)
                XCTAssertFalse(q.publish(), "nothing added since the reset; \(what)")

                // Reuse: a full ring, completed in a random order (or as one batch in order).
                device.reset()
                q.addBurst(count: size, deviceWritable: true) { i in (addr: address(10 + i), len: UInt32(i + 1), cookie: cookie(10 + i)) }
                XCTAssertEqual(q.freeCount, 0, what)
                XCTAssertTrue(q.publish(), what)
                let popped = device.popBuffers()
                XCTAssertEqual(popped.map(\.descriptors), (0..<UInt16(size)).map { [$0] }, what)
                XCTAssertEqual(Set(popped.map(\.id)).count, size, "distinct IDs; \(what)")
                if inOrder {
                    XCTAssertEqual(popped.map(\.id), (0..<UInt16(size)).map { $0 }, what)
                    device.completeBatchAsOne(count: size, lastLength: 1)
                    XCTAssertPairs(harvested(&q, max: 100), (10..<10 + size).map { ($0, $0 == 9 + size ? 1 : UInt32($0 - 9)) }, what)
                } else {
                    var rng = SplitMix64(seed: UInt64(start))
                    let order = popped.shuffled(using: &rng)
                    device.complete(ids: order.map(\.id), lengths: order.map { $0.writableBytes - 1 })
                    XCTAssertPairs(harvested(&q, max: 100), order.map { (owner($0), $0.writableBytes - 1) }, what)
                }
                XCTAssertEqual(q.freeCount, size, what)
                XCTAssertEqual(q.addresses.base, Q.expectedBase(buffers: size, descriptors: size, size: size),
                               "one full lap (packed: position 0, wrap 0); \(what)")
                XCTAssertEqual(device.violations, [], what)
            }
        }
    }

    func testReclaimAllWithBuffersInFlightAndReuseSplit() throws { try reclaimAllWithBuffersInFlightAndReuse(SplitVirtqueue.self) }
    func testReclaimAllWithBuffersInFlightAndReusePacked() throws { try reclaimAllWithBuffersInFlightAndReuse(PackedVirtqueue.self) }

    func reclaimAllOnEmptyQueue<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let ring = try makeRing(Q.self, size: 4, inOrder: false)
        var q = ring.queue(inOrder: false)
        XCTAssertEqual(q.reclaimAll { _ in XCTFail() }, 0)
        XCTAssertEqual(q.freeCount, 4)
    }

    func testReclaimAllOnEmptyQueueSplit() throws { try reclaimAllOnEmptyQueue(SplitVirtqueue.self) }
    func testReclaimAllOnEmptyQueuePacked() throws { try reclaimAllOnEmptyQueue(PackedVirtqueue.self) }

    /// `harvest(into:lengths:max:)` fills the two arrays like `harvest(max:)` calls its body.
    func harvestIntoArrays<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let ring = try makeRing(Q.self, size: 8, inOrder: false)
        var q = ring.queue(inOrder: false)
        for k in 1...6 { addSingle(&q, k, len: 100, writable: true) }
        _ = q.publish()
        let ids = ring.device.popBuffers().map(\.id)
        ring.device.complete(ids: [ids[4], ids[1], ids[5], ids[0]], lengths: [50, 20, 60, 10])
        let cookies = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: 8)
        let lengths = UnsafeMutablePointer<UInt32>.allocate(capacity: 8)
        defer { cookies.deallocate(); lengths.deallocate() }
        XCTAssertEqual(q.harvest(into: cookies, lengths: lengths, max: 3), 3)
        XCTAssertEqual((0..<3).map { key(cookies[$0]) }, [5, 2, 6])
        XCTAssertEqual((0..<3).map { lengths[$0] }, [50, 20, 60])
        XCTAssertEqual(q.harvest(into: cookies, lengths: lengths, max: 8), 1)
        XCTAssertEqual(key(cookies[0]), 1)
        XCTAssertEqual(lengths[0], 10)
        XCTAssertEqual(q.harvest(into: cookies, lengths: lengths, max: 8), 0)
        XCTAssertEqual(q.inFlight, 2)
        XCTAssertEqual(q.freeCount, 6)
    }

    func testHarvestIntoArraysSplit() throws { try harvestIntoArrays(SplitVirtqueue.self) }
    func testHarvestIntoArraysPacked() throws { try harvestIntoArrays(PackedVirtqueue.self) }
}
