import VirtioCore
import VirtioTestSupport
import XCTest

/// VIRTIO_F_IN_ORDER (split §2.7.9, packed §2.8.11): "the device can write out a single used
/// ring entry with the id corresponding to the head entry of the descriptor chain describing the
/// last buffer in the batch" (packed: one used descriptor with the batch's last buffer ID), and
/// moves its used position past the whole batch. The driver must recycle every buffer of the
/// batch, give the earlier ones their full writable length and the last one the entry's. Every
/// topic runs on both layouts.
final class InOrderBatchTests: XCTestCase {
    /// Posts single-descriptor buffers with cookies `cookies` and writable length `100 * k`,
    /// publishes them and lets the device pop them.
    func post<Q: TestedQueue & ~Copyable>(_ q: inout Q, _ device: Q.Device, _ cookies: ClosedRange<Int>,
                                          file: StaticString = #filePath, line: UInt = #line) {
        for k in cookies { addSingle(&q, k, len: UInt32(100 * k), writable: true) }
        _ = q.publish()
        XCTAssertEqual(device.popBuffers().map(owner), Array(cookies), file: file, line: line)
    }

    func oneUsedElementForWholeBatch<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let ring = try makeRing(Q.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        post(&q, device, 1...5)
        device.completeBatchAsOne(count: 5, lastLength: 17)
        if let ready = q.completedCountIfAny() { XCTAssertEqual(ready, 5) }
        XCTAssertPairs(harvested(&q, max: 8), [(1, 100), (2, 200), (3, 300), (4, 400), (5, 17)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
        XCTAssertEqual(q.inFlight, 0)

        // The used slots the batch skipped still hold old data; the next completions, one entry
        // each, must be read at the right slots anyway.
        post(&q, device, 6...8)
        device.completeInOrder(count: 3) { $0.writableBytes - 1 }
        XCTAssertPairs(harvested(&q, max: 8), [(6, 599), (7, 699), (8, 799)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
        XCTAssertEqual(device.violations, [])
    }

    func testOneUsedElementForWholeBatchSplit() throws { try oneUsedElementForWholeBatch(SplitVirtqueue.self) }
    func testOneUsedElementForWholeBatchPacked() throws { try oneUsedElementForWholeBatch(PackedVirtqueue.self) }

    func batchesAndSingleElementsMixedInOneHarvest<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let ring = try makeRing(Q.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        post(&q, device, 1...7)
        device.completeBatchAsOne(count: 3, lastLength: 1)     // 1, 2, 3
        device.completeInOrder(count: 1, lengths: [2])         // 4
        device.completeBatchAsOne(count: 2, lastLength: nil)   // 5, 6 (full length)
        device.completeBatchAsOne(count: 1, lastLength: 0)     // 7: a batch of one is an ordinary entry
        XCTAssertPairs(harvested(&q, max: 100),
                       [(1, 100), (2, 200), (3, 1), (4, 2), (5, 500), (6, 600), (7, 0)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
    }

    func testBatchesAndSingleElementsMixedInOneHarvestSplit() throws { try batchesAndSingleElementsMixedInOneHarvest(SplitVirtqueue.self) }
    func testBatchesAndSingleElementsMixedInOneHarvestPacked() throws { try batchesAndSingleElementsMixedInOneHarvest(PackedVirtqueue.self) }

    /// A batch of multi-descriptor chains (readable header, writable data), whose descriptors
    /// wrap round the end of the table: the full length of a chain is its writable bytes only.
    func batchOfChainsAcrossTableEnd<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let ring = try makeRing(Q.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        fastForward(&q, device, by: 6)                         // next descriptor: 6
        let shapes: [[(UInt32, Bool)]] = [[(12, false), (1000, true)],
                                          [(12, false), (300, true), (200, true)],
                                          [(2000, true)]]
        for (i, shape) in shapes.enumerated() {
            XCTAssertTrue(q.addChain(count: shape.count, cookie: cookie(i + 1)) { j in
                VirtqSegment(addr: address(i + 1, segment: j), len: shape[j].0, deviceWritable: shape[j].1)
            })
        }
        XCTAssertEqual(q.freeCount, 2)
        _ = q.publish()
        let chains = device.popBuffers()
        XCTAssertEqual(chains.map(\.descriptors), [[6, 7], [0, 1, 2], [3]])
        device.completeBatchAsOne(count: 3, lastLength: 1999)
        XCTAssertPairs(harvested(&q, max: 8), [(1, 1000), (2, 500), (3, 1999)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
        XCTAssertEqual(device.violations, [])
    }

    func testBatchOfChainsAcrossTableEndSplit() throws { try batchOfChainsAcrossTableEnd(SplitVirtqueue.self) }
    func testBatchOfChainsAcrossTableEndPacked() throws { try batchOfChainsAcrossTableEnd(PackedVirtqueue.self) }

    /// A batch's used entry skips every descriptor of every buffer in it, and the harvest stops
    /// inside the batch: chains of 3, 1 and 2 descriptors from position 5; the first two as one
    /// entry, harvested one at a time.
    func batchOfChainsStraddlingHarvests<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let ring = try makeRing(Q.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        fastForward(&q, device, by: 5)
        for (k, n) in [(1, 3), (2, 1), (3, 2)] {
            XCTAssertTrue(q.addChain(count: n, cookie: cookie(k)) { i in
                VirtqSegment(addr: address(k, segment: i), len: 100, deviceWritable: i == n - 1)
            })
        }
        _ = q.publish()
        XCTAssertEqual(device.popBuffers().map(\.descriptors), [[5, 6, 7], [0], [1, 2]])
        device.completeBatchAsOne(count: 2, lastLength: 3)
        XCTAssertPairs(harvested(&q, max: 1), [(1, 100)])
        XCTAssertEqual(q.freeCount, 5)
        device.completeInOrder(count: 1, lengths: nil)
        XCTAssertPairs(harvested(&q, max: 8), [(2, 3), (3, 100)])
        // 5 fillers, then 3 buffers of 6 descriptors in all.
        XCTAssertEqual(q.addresses.base, Q.expectedBase(buffers: 8, descriptors: 11, size: 8))
        XCTAssertEqual(device.usedBase, Q.expectedBase(buffers: 8, descriptors: 11, size: 8))
        XCTAssertEqual(q.freeCount, 8)
        XCTAssertEqual(device.violations, [])
    }

    func testBatchOfChainsStraddlingHarvestsSplit() throws { try batchOfChainsStraddlingHarvests(SplitVirtqueue.self) }
    func testBatchOfChainsStraddlingHarvestsPacked() throws { try batchOfChainsStraddlingHarvests(PackedVirtqueue.self) }

    /// The batch is longer than `max`: the first harvest stops inside it. The device did nothing
    /// wrong; the rest of the batch must come out of the next harvests.
    func batchStraddlingTwoHarvests<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let ring = try makeRing(Q.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        post(&q, device, 1...5)
        device.completeBatchAsOne(count: 5, lastLength: 17)
        XCTAssertPairs(harvested(&q, max: 2), [(1, 100), (2, 200)])
        XCTAssertNil(q.failure)
        XCTAssertPairs(harvested(&q, max: 2), [(3, 300), (4, 400)])
        XCTAssertPairs(harvested(&q, max: 2), [(5, 17)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
        XCTAssertEqual(q.inFlight, 0)
    }

    func testBatchStraddlingTwoHarvestsSplit() throws { try batchStraddlingTwoHarvests(SplitVirtqueue.self) }
    func testBatchStraddlingTwoHarvestsPacked() throws { try batchStraddlingTwoHarvests(PackedVirtqueue.self) }

    /// Same, with the harvest stopping right before the batch's last buffer.
    func batchStraddlingHarvestsBeforeLastBuffer<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let ring = try makeRing(Q.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        post(&q, device, 1...3)
        device.completeBatchAsOne(count: 3, lastLength: 5)
        XCTAssertPairs(harvested(&q, max: 2), [(1, 100), (2, 200)])
        XCTAssertPairs(harvested(&q, max: 2), [(3, 5)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
    }

    func testBatchStraddlingHarvestsBeforeLastBufferSplit() throws { try batchStraddlingHarvestsBeforeLastBuffer(SplitVirtqueue.self) }
    func testBatchStraddlingHarvestsBeforeLastBufferPacked() throws { try batchStraddlingHarvestsBeforeLastBuffer(PackedVirtqueue.self) }

    /// One used entry for five buffers, harvested two at a time, across the end of the ring, with
    /// a buffer added (and popped) in the middle of the batch.
    func batchStraddlingHarvestsWithAddsBetween<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let ring = try makeRing(Q.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        fastForward(&q, device, by: 6)
        for k in 1...6 { addSingle(&q, k, len: UInt32(10 * k), writable: true) }
        _ = q.publish()
        XCTAssertEqual(device.popBuffers().map(\.descriptors), [[6], [7], [0], [1], [2], [3]])
        device.completeBatchAsOne(count: 5, lastLength: 7)
        XCTAssertPairs(harvested(&q, max: 2), [(1, 10), (2, 20)])
        XCTAssertEqual(q.inFlight, 4)
        XCTAssertEqual(q.freeCount, 4)
        XCTAssertPairs(harvested(&q, max: 2), [(3, 30), (4, 40)])
        addSingle(&q, 7, len: 70, writable: true)      // position 4, mid-batch
        _ = q.publish()
        XCTAssertEqual(device.popBuffers().map(\.descriptors), [[4]])
        XCTAssertPairs(harvested(&q, max: 8), [(5, 7)])
        XCTAssertPairs(harvested(&q, max: 8), [])
        device.completeInOrder(count: 2) { $0.writableBytes - 1 }
        XCTAssertPairs(harvested(&q, max: 8), [(6, 59), (7, 69)])
        XCTAssertEqual(q.freeCount, 8)
        XCTAssertNil(q.failure)
        XCTAssertEqual(device.violations, [])
    }

    func testBatchStraddlingHarvestsWithAddsBetweenSplit() throws { try batchStraddlingHarvestsWithAddsBetween(SplitVirtqueue.self) }
    func testBatchStraddlingHarvestsWithAddsBetweenPacked() throws { try batchStraddlingHarvestsWithAddsBetween(PackedVirtqueue.self) }
}
