import VirtioCore
import VirtioTestSupport
import XCTest

/// VIRTIO_F_IN_ORDER (§2.7.9): "the device can write out a single used ring entry with the id
/// corresponding to the head entry of the descriptor chain describing the last buffer in the
/// batch", and moves the used index by the whole batch. The driver must recycle every buffer of
/// the batch, give the earlier ones their full writable length and the last one the element's.
final class InOrderBatchTests: XCTestCase {
    /// Posts single-descriptor buffers with cookies `cookies` and writable length `100 * k`,
    /// publishes them and lets the device pop them.
    func post(_ q: inout SplitVirtqueue, _ device: SplitDeviceModel, _ cookies: ClosedRange<Int>) {
        for k in cookies { q.add(addr: address(k), len: UInt32(100 * k), deviceWritable: true, cookie: cookie(k)) }
        _ = q.publish()
        XCTAssertEqual(device.popAvailable().map(owner), Array(cookies))
    }

    func testOneUsedElementForWholeBatch() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        post(&q, device, 1...5)
        device.completeBatchAsOne(count: 5, lastLength: 17)
        XCTAssertEqual(q.completedCount(), 5)
        XCTAssertPairs(harvested(&q, max: 8), [(1, 100), (2, 200), (3, 300), (4, 400), (5, 17)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
        XCTAssertEqual(q.inFlight, 0)

        // The used slots the batch skipped still hold old data; the next completions, one element
        // each, must be read at the right slots anyway.
        post(&q, device, 6...8)
        device.completeInOrder(count: 3) { $0.writableBytes - 1 }
        XCTAssertPairs(harvested(&q, max: 8), [(6, 599), (7, 699), (8, 799)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
        XCTAssertEqual(device.violations, [])
    }

    func testBatchesAndSingleElementsMixedInOneHarvest() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        post(&q, device, 1...7)
        device.completeBatchAsOne(count: 3, lastLength: 1)     // 1, 2, 3
        device.completeInOrder(count: 1) { _ in 2 }            // 4
        device.completeBatchAsOne(count: 2)                    // 5, 6 (full length)
        device.completeBatchAsOne(count: 1, lastLength: 0)     // 7: a batch of one is an ordinary element
        XCTAssertPairs(harvested(&q, max: 100),
                       [(1, 100), (2, 200), (3, 1), (4, 2), (5, 500), (6, 600), (7, 0)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
    }

    /// A batch of multi-descriptor chains (readable header, writable data), whose descriptors
    /// wrap round the end of the table: the full length of a chain is its writable bytes only.
    func testBatchOfChainsAcrossTableEnd() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: true)
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
        let chains = device.popAvailable()
        XCTAssertEqual(chains.map(\.descriptors), [[6, 7], [0, 1, 2], [3]])
        device.completeBatchAsOne(count: 3, lastLength: 1999)
        XCTAssertPairs(harvested(&q, max: 8), [(1, 1000), (2, 500), (3, 1999)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
        XCTAssertEqual(device.violations, [])
    }

    /// The batch is longer than `max`: the first harvest stops inside it. The device did nothing
    /// wrong; the rest of the batch must come out of the next harvests.
    func testBatchStraddlingTwoHarvests() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: true)
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

    /// Same, with the harvest stopping right before the batch's last buffer.
    func testBatchStraddlingHarvestsBeforeLastBuffer() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        post(&q, device, 1...3)
        device.completeBatchAsOne(count: 3, lastLength: 5)
        XCTAssertPairs(harvested(&q, max: 2), [(1, 100), (2, 200)])
        XCTAssertPairs(harvested(&q, max: 2), [(3, 5)])
        XCTAssertNil(q.failure)
        XCTAssertEqual(q.freeCount, 8)
    }
}
