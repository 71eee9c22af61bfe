import VirtioCore
import VirtioTestSupport
import XCTest

/// `reclaimAll` on a healthy queue: every buffer the driver still owns comes back exactly once,
/// whatever state it is in (unpublished, published, popped by the device, completed but not
/// harvested), and the queue is as new afterwards.
final class ReclaimTests: XCTestCase {
    func testReclaimAllReturnsEveryBufferInFlight() throws {
        for inOrder in [false, true] {
            for size in [1, 8, 256] {
                try reclaimEverywhere(size: size, inOrder: inOrder)
            }
        }
    }

    func reclaimEverywhere(size: Int, inOrder: Bool) throws {
        let what = "size \(size) inOrder \(inOrder)"
        let ring = try makeRing(SplitVirtqueue.self, size: size, inOrder: inOrder)
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
            if k == max(1, size / 4) { _ = q.publish(); device.popAvailable() }
            if k == max(1, size / 2) { _ = q.publish() }
        }
        XCTAssertEqual(q.freeCount, size - chainLengths, what)
        let heldByDevice = device.pending.count
        device.completeInOrder(count: heldByDevice / 2)
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
        XCTAssertEqual(q.completedCount(), 0, what)
        XCTAssertEqual(q.reclaimAll { _ in XCTFail("\(what): second reclaim") }, 0, what)
        // The rings are as new.
        XCTAssertEqual(device.availIdx, 0, what)
        XCTAssertEqual(device.availFlags, virtqAvailFlagNoInterrupt, what)

        // Reusable: a restarted device sees descriptors from slot 0 again, and round trips work
        // (across the wrap, to be sure no stale state survived).
        device.reset()
        fastForward(&q, device, by: 65536 - size)
        for j in 1...size { q.add(addr: address(j), len: 32, deviceWritable: true, cookie: cookie(j)) }
        _ = q.publish()
        XCTAssertEqual(device.popAvailable().map(owner), Array(1...size), what)
        device.completeInOrder(count: size) { _ in 31 }
        var again: [Int] = []
        XCTAssertEqual(q.harvest(max: size) { c, len in again.append(key(c)); XCTAssertEqual(len, 31) }, size, what)
        XCTAssertEqual(again, Array(1...size), what)
        XCTAssertEqual(device.usedIdx, 0, "\(what): crossed the wrap after the reset")
        XCTAssertEqual(q.freeCount, size, what)
        XCTAssertEqual(device.violations, [], what)
    }

    func testReclaimAllOnEmptyQueue() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 4, inOrder: false)
        var q = ring.queue(inOrder: false)
        XCTAssertEqual(q.reclaimAll { _ in XCTFail() }, 0)
        XCTAssertEqual(q.freeCount, 4)
    }

    /// `harvest(into:lengths:max:)` fills the two arrays like `harvest(max:)` calls its body.
    func testHarvestIntoArrays() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: false)
        var q = ring.queue(inOrder: false)
        for k in 1...6 { q.add(addr: address(k), len: 100, deviceWritable: true, cookie: cookie(k)) }
        _ = q.publish()
        let heads = ring.device.popAvailable().map(\.headId)
        ring.device.complete(ids: [heads[4], heads[1], heads[5], heads[0]], lengths: [50, 20, 60, 10])
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
}
