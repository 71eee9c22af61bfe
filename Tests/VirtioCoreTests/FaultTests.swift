import VirtioCore
import VirtioTestSupport
import XCTest

/// A device that breaks §2.7.8 (bad id, duplicate id, length too large, used index jumping or
/// going backwards, an in-order id beyond the completed range). Each time: the exact error in
/// `failure`; harvest hands back only the good buffers before the bad element; later harvests
/// return nothing; `reclaimAll` returns every other cookie exactly once; and after it, with the
/// device reset, the queue works again.
final class FaultTests: XCTestCase {
    /// Everything harvested in one test, in order.
    final class Returned {
        var pairs: [(Int, UInt32)] = []
        @discardableResult
        func harvest(_ q: inout SplitVirtqueue, max: Int) -> [(Int, UInt32)] {
            let got = harvested(&q, max: max)
            pairs += got
            return got
        }
    }

    /// A queue of `size` with buffers 1...count posted (buffer k: one descriptor, writable length
    /// 100·k, read-only when k is in `readOnly`), published and popped by the device, after
    /// `start` filler round trips; then `fault` (the device misbehaves, given the heads of the
    /// buffers by cookie), one harvest of everything, and every check listed above.
    /// `alsoPosted`: cookies `fault` posts itself. `fault` harvests through `returned` only.
    func check(inOrder: Bool, size: Int = 8, start: Int = 0, count: Int = 4, readOnly: Set<Int> = [],
               alsoPosted: [Int] = [],
               expectedError: (_ heads: [Int: UInt32]) -> VirtqueueError,
               good: [(Int, UInt32)],
               file: StaticString = #filePath, line: UInt = #line,
               _ fault: (_ device: SplitDeviceModel, _ heads: [Int: UInt32], _ q: inout SplitVirtqueue,
                         _ returned: Returned) -> Void) throws {
        let ring = try makeRing(SplitVirtqueue.self, size: size, inOrder: inOrder)
        let device = ring.device
        var q = ring.queue(inOrder: inOrder)
        fastForward(&q, device, by: start, file: file, line: line)
        for k in 1...count {
            q.add(addr: address(k), len: UInt32(100 * k), deviceWritable: !readOnly.contains(k), cookie: cookie(k))
        }
        _ = q.publish()
        var heads: [Int: UInt32] = [:]
        for chain in device.popAvailable() { heads[owner(chain)] = UInt32(chain.headId) }
        XCTAssertEqual(heads.count, count, file: file, line: line)

        let returned = Returned()
        fault(device, heads, &q, returned)
        returned.harvest(&q, max: Int.max)
        let got = returned.pairs
        XCTAssertPairs(got, good, file: file, line: line)
        XCTAssertEqual(q.failure, expectedError(heads), file: file, line: line)

        // Stopped: nothing more comes out, however the device goes on.
        device.completeInOrder(count: device.pending.count)
        XCTAssertEqual(q.completedCount(), 0, file: file, line: line)
        XCTAssertEqual(q.harvest(max: Int.max) { _, _ in XCTFail("harvest after failure", file: file, line: line) }, 0,
                       file: file, line: line)
        XCTAssertEqual(q.failure, expectedError(heads), "the first error stays", file: file, line: line)

        // Every other cookie comes back exactly once.
        var back: [Int] = []
        let n = q.reclaimAll { back.append(key($0)) }
        XCTAssertEqual(n, back.count, file: file, line: line)
        XCTAssertEqual(back.sorted(), Array(Set(1...count).union(alsoPosted).subtracting(got.map(\.0))).sorted(), file: file, line: line)
        XCTAssertNil(q.failure, file: file, line: line)
        XCTAssertEqual(q.freeCount, size, file: file, line: line)
        XCTAssertEqual(q.inFlight, 0, file: file, line: line)

        // And the queue is usable again after a device reset.
        device.reset()
        for k in 1...size { q.add(addr: address(k), len: 10, deviceWritable: true, cookie: cookie(k)) }
        _ = q.publish()
        device.popAvailable()
        device.completeInOrder(count: size) { _ in 3 }
        XCTAssertPairs(harvested(&q, max: Int.max), (1...size).map { ($0, 3) }, file: file, line: line)
        XCTAssertNil(q.failure, file: file, line: line)
        XCTAssertEqual(device.violations, [], file: file, line: line)
    }

    // MARK: id out of range

    func testUsedIDOutOfRange() throws {
        for inOrder in [false, true] {
            for badID: UInt32 in [8, 9, 0xFFFF, 0xFFFF_FFFF] {
                try check(inOrder: inOrder, expectedError: { _ in .usedIDOutOfRange(id: badID, size: 8) },
                          good: [(1, 10)]) { device, _, _, _ in
                    device.completeInOrder(count: 1) { _ in 10 }
                    device.injectUsed(id: badID, len: 0)
                }
            }
        }
    }

    // MARK: duplicate id

    /// Out of order: the same id twice in one harvest.
    func testDuplicateIDOutOfOrder() throws {
        try check(inOrder: false, expectedError: { .usedIDNotInFlight(id: $0[2]!) }, good: [(2, 5)]) { device, heads, _, _ in
            device.complete(ids: [UInt16(heads[2]!)], lengths: [5])
            device.injectUsed(id: heads[2]!, len: 5)
        }
    }

    /// Out of order: the duplicate comes after the first completion was harvested.
    func testDuplicateIDAcrossHarvestsOutOfOrder() throws {
        try check(inOrder: false, expectedError: { .usedIDNotInFlight(id: $0[3]!) }, good: [(3, 7)]) { device, heads, q, returned in
            device.complete(ids: [UInt16(heads[3]!)], lengths: [7])
            XCTAssertPairs(returned.harvest(&q, max: 8), [(3, 7)])
            device.injectUsed(id: heads[3]!, len: 7)
        }
    }

    /// Out of order: an id in range that heads no buffer (never posted).
    func testUnpostedIDOutOfOrder() throws {
        try check(inOrder: false, expectedError: { _ in .usedIDNotInFlight(id: 6) }, good: [(1, 1)]) { device, _, _, _ in
            device.completeInOrder(count: 1) { _ in 1 }
            device.injectUsed(id: 6, len: 0)
        }
    }

    /// Out of order: an id naming a buffer that was added but not yet published. The device
    /// cannot have seen it (its avail entry is past `avail->idx`); if the driver took it back, the
    /// next `publish()` would hand the device a buffer the driver no longer owns.
    func testUnpublishedIDOutOfOrder() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: false)
        var q = ring.queue(inOrder: false)
        q.add(addr: address(1), len: 100, deviceWritable: true, cookie: cookie(1))
        _ = q.publish()
        XCTAssertEqual(ring.device.popAvailable().map(\.headId), [0])
        q.add(addr: address(2), len: 100, deviceWritable: true, cookie: cookie(2))   // head 1, not published
        ring.device.injectUsed(id: 1, len: 0)
        XCTAssertPairs(harvested(&q, max: 8), [])
        XCTAssertEqual(q.failure, .usedIDNotInFlight(id: 1))
        var back: [Int] = []
        q.reclaimAll { back.append(key($0)) }
        XCTAssertEqual(back.sorted(), [1, 2])
        XCTAssertEqual(q.freeCount, 8)
    }

    /// Out of order: an id that is the second descriptor of a chain in flight, not its head.
    func testIDInsideChainOutOfOrder() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: false)
        var q = ring.queue(inOrder: false)
        XCTAssertTrue(q.addChain(count: 3, cookie: cookie(1)) { VirtqSegment(addr: address(1, segment: $0), len: 8, deviceWritable: true) })
        _ = q.publish()
        let chain = ring.device.popAvailable()[0]
        ring.device.injectUsed(id: UInt32(chain.descriptors[1]), len: 0)
        XCTAssertEqual(q.harvest(max: 8) { _, _ in XCTFail() }, 0)
        XCTAssertEqual(q.failure, .usedIDNotInFlight(id: UInt32(chain.descriptors[1])))
        var back: [Int] = []
        q.reclaimAll { back.append(key($0)) }
        XCTAssertEqual(back, [1])
        XCTAssertEqual(q.freeCount, 8)
    }

    /// In order: the id of a buffer already completed, where the next one is expected.
    func testDuplicateIDInOrder() throws {
        try check(inOrder: true, expectedError: { .usedIDOutOfOrder(id: $0[1]!, expected: UInt16($0[2]!)) },
                  good: [(1, 4)]) { device, heads, _, _ in
            device.completeInOrder(count: 1) { _ in 4 }
            device.injectUsed(id: heads[1]!, len: 4)
        }
    }

    // MARK: length too large

    func testLengthLargerThanWritable() throws {
        for inOrder in [false, true] {
            // Buffer 2 has 200 writable bytes; 200 is fine, 201 is not.
            try check(inOrder: inOrder, expectedError: { .usedLengthTooLarge(id: $0[2]!, length: 201, posted: 200) },
                      good: [(1, 100)]) { device, heads, _, _ in
                device.completeInOrder(count: 1)                      // exactly the writable length
                device.injectUsed(id: heads[2]!, len: 201)
            }
            // Buffer 2 is read-only: any length is too large.
            try check(inOrder: inOrder, readOnly: [2],
                      expectedError: { .usedLengthTooLarge(id: $0[2]!, length: 1, posted: 0) },
                      good: [(1, 100)]) { device, heads, _, _ in
                device.completeInOrder(count: 1)
                device.injectUsed(id: heads[2]!, len: 1)
            }
        }
    }

    /// In order: the single element for a batch claims more than its last buffer can hold.
    func testBatchLengthLargerThanWritable() throws {
        try check(inOrder: true, expectedError: { .usedLengthTooLarge(id: $0[3]!, length: 301, posted: 300) },
                  good: [(1, 100)]) { device, _, _, _ in
            device.completeInOrder(count: 1)
            device.completeBatchAsOne(count: 2, lastLength: 301)
        }
    }

    // MARK: used index

    /// The used index moves past what is in flight (4 published, 1 harvested; 2 more posted but
    /// not published, which the device cannot have used). Starts next to the UInt16 wrap.
    func testUsedIndexJump() throws {
        for inOrder in [false, true] {
            let start = 65534
            try check(inOrder: inOrder, start: start, alsoPosted: [5, 6],
                      expectedError: { _ in .usedIndexJump(usedIdx: 3, lastSeen: 65535, inFlight: 3) },
                      good: [(1, 9)]) { device, _, q, returned in
                device.completeInOrder(count: 1) { _ in 9 }
                XCTAssertPairs(returned.harvest(&q, max: 8), [(1, 9)])
                for k in 5...6 { q.add(addr: address(k), len: 1, deviceWritable: true, cookie: cookie(k)) }
                device.setUsedIdx(device.usedIdx &+ 4)          // 3 in flight, claims 4
            }
        }
    }

    /// The used index goes backwards (a stale value).
    func testStaleUsedIndex() throws {
        for inOrder in [false, true] {
            try check(inOrder: inOrder, start: 65535,
                      expectedError: { _ in .usedIndexJump(usedIdx: 0, lastSeen: 1, inFlight: 2) },
                      good: [(1, 100), (2, 200)]) { device, _, q, returned in
                device.completeInOrder(count: 2)
                XCTAssertPairs(returned.harvest(&q, max: 8), [(1, 100), (2, 200)])
                device.setUsedIdx(device.usedIdx &- 1)
            }
        }
    }

    // MARK: in order, beyond the completed range

    /// In order: one element for "two buffers" names the fifth, which was posted but not completed.
    func testInOrderIDBeyondCompletedRange() throws {
        try check(inOrder: true, count: 5,
                  expectedError: { .usedIDOutOfOrder(id: $0[5]!, expected: UInt16($0[2]!)) },
                  good: [(1, 10)]) { device, heads, _, _ in
            device.completeInOrder(count: 1) { _ in 10 }
            device.injectUsed(id: heads[5]!, len: 0, advance: 2)
        }
    }

    /// In order: an element names a descriptor that is inside a chain, not a head.
    func testInOrderIDInsideChain() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: true)
        var q = ring.queue(inOrder: true)
        for k in 1...2 {
            XCTAssertTrue(q.addChain(count: 2, cookie: cookie(k)) { VirtqSegment(addr: address(k, segment: $0), len: 8, deviceWritable: true) })
        }
        _ = q.publish()
        XCTAssertEqual(ring.device.popAvailable().map(\.descriptors), [[0, 1], [2, 3]])
        ring.device.injectUsed(id: 1, len: 0, advance: 2)
        XCTAssertEqual(q.harvest(max: 8) { _, _ in XCTFail() }, 0)
        XCTAssertEqual(q.failure, .usedIDOutOfOrder(id: 1, expected: 0))
        var back: [Int] = []
        q.reclaimAll { back.append(key($0)) }
        XCTAssertEqual(back, [1, 2])
        XCTAssertEqual(q.freeCount, 8)
    }
}
