import VirtioCore
import VirtioTestSupport
import XCTest

/// A device that breaks the ring (split §2.7.8, packed §2.8.7): a bad id, a duplicate id, a
/// length too large, an in-order id that is not next or beyond what was completed; split only:
/// the used index jumping or going backwards, an id inside a chain; packed only: a used
/// descriptor with the other lap's wrap counter. Each time: the exact error in `failure`; harvest
/// hands back only the good buffers before the bad entry; later harvests return nothing; `reclaimAll`
/// returns every other cookie exactly once (in order: oldest first); and after it, with the
/// device reset, the queue works again. Topics both layouts share run on both.
final class FaultTests: XCTestCase {
    /// Everything harvested in one test, in order.
    final class Returned {
        var pairs: [(Int, UInt32)] = []
        @discardableResult
        func harvest<Q: TestedQueue & ~Copyable>(_ q: inout Q, max: Int) -> [(Int, UInt32)] {
            let got = harvested(&q, max: max)
            pairs += got
            return got
        }
    }

    /// A queue of `size` with buffers 1...count posted (buffer k: one descriptor, writable length
    /// 100·k, read-only when k is in `readOnly`), published and popped by the device, after
    /// `start` filler round trips; then `fault` (the device misbehaves, given the IDs of the
    /// buffers by cookie), one harvest of everything, and every check listed above.
    /// `alsoPosted`: cookies `fault` posts itself (after 1...count). `fault` harvests through
    /// `returned` only.
    func check<Q: TestedQueue & ~Copyable>(
        _: Q.Type, inOrder: Bool, size: Int = 8, start: Int = 0, count: Int = 4, readOnly: Set<Int> = [],
        alsoPosted: [Int] = [],
        expectedError: (_ ids: [Int: UInt16]) -> VirtqueueError,
        good: [(Int, UInt32)],
        file: StaticString = #filePath, line: UInt = #line,
        _ fault: (_ device: Q.Device, _ ids: [Int: UInt16], _ q: inout Q, _ returned: Returned) -> Void
    ) throws {
        let what = "\(Q.layoutName) \(inOrder ? "in order" : "out of order") start \(start)"
        let ring = try makeRing(Q.self, size: size, inOrder: inOrder)
        let device = ring.device
        var q = ring.queue(inOrder: inOrder)
        fastForward(&q, device, by: start, file: file, line: line)
        for k in 1...count { addSingle(&q, k, len: UInt32(100 * k), writable: !readOnly.contains(k)) }
        _ = q.publish()
        var ids: [Int: UInt16] = [:]
        for buffer in device.popBuffers() { ids[owner(buffer)] = buffer.id }
        XCTAssertEqual(ids.count, count, what, file: file, line: line)

        let returned = Returned()
        fault(device, ids, &q, returned)
        returned.harvest(&q, max: Int.max)
        XCTAssertPairs(returned.pairs, good, what, file: file, line: line)
        XCTAssertEqual(q.failure, expectedError(ids), what, file: file, line: line)

        // Stopped: nothing more comes out, however the device goes on.
        device.completeInOrder(count: device.pendingCount, lengths: nil)
        if let ready = q.completedCountIfAny() { XCTAssertEqual(ready, 0, what, file: file, line: line) }
        XCTAssertEqual(q.harvest(max: Int.max) { _, _ in XCTFail("harvest after failure; \(what)", file: file, line: line) }, 0,
                       what, file: file, line: line)
        XCTAssertEqual(q.failure, expectedError(ids), "the first error stays; \(what)", file: file, line: line)

        // Every other cookie comes back exactly once.
        var back: [Int] = []
        let n = q.reclaimAll { back.append(key($0)) }
        let goodSet = Set(good.map(\.0))
        let rest = (Array(1...count) + alsoPosted).filter { !goodSet.contains($0) }
        XCTAssertEqual(n, back.count, what, file: file, line: line)
        if inOrder {
            XCTAssertEqual(back, rest, "in order: oldest first; \(what)", file: file, line: line)
        } else {
            XCTAssertEqual(back.sorted(), rest.sorted(), what, file: file, line: line)
        }
        XCTAssertNil(q.failure, what, file: file, line: line)
        XCTAssertEqual(q.freeCount, size, what, file: file, line: line)
        XCTAssertEqual(q.inFlight, 0, what, file: file, line: line)

        // And the queue is usable again after a device reset: one buffer, then a full ring.
        device.reset()
        addSingle(&q, 99, len: 64, writable: true)
        XCTAssertTrue(q.publish(), what, file: file, line: line)
        XCTAssertEqual(device.popBuffers().map(owner), [99], what, file: file, line: line)
        device.completeInOrder(count: 1, lengths: [64])
        XCTAssertPairs(harvested(&q, max: 8), [(99, 64)], what, file: file, line: line)
        for k in 1...size { addSingle(&q, k, len: 10, writable: true) }
        _ = q.publish()
        device.popBuffers()
        device.completeInOrder(count: size, lengths: Array(repeating: 3, count: size))
        XCTAssertPairs(harvested(&q, max: Int.max), (1...size).map { ($0, 3) }, what, file: file, line: line)
        XCTAssertNil(q.failure, what, file: file, line: line)
        XCTAssertEqual(device.violations, [], what, file: file, line: line)
    }

    // MARK: id out of range

    /// Every ID the entry can carry from the queue size up (packed IDs have 16 bits), at ring
    /// positions before and after the first lap.
    func usedIDOutOfRange<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for inOrder in [false, true] {
            for start in [0, 6, 13] {
                for badID: UInt32 in [8, 9, 0xFFFF, 0xFFFF_FFFF] where badID <= Q.Device.maxUsedID {
                    try check(Q.self, inOrder: inOrder, start: start,
                              expectedError: { _ in .usedIDOutOfRange(id: badID, size: 8) },
                              good: [(1, 10)]) { device, _, _, _ in
                        device.completeInOrder(count: 1, lengths: [10])
                        device.injectUsed(id: badID, len: 0)
                    }
                }
            }
        }
    }

    func testUsedIDOutOfRangeSplit() throws { try usedIDOutOfRange(SplitVirtqueue.self) }
    func testUsedIDOutOfRangePacked() throws { try usedIDOutOfRange(PackedVirtqueue.self) }

    // MARK: duplicate id

    /// Out of order: the same id twice in one harvest.
    func duplicateIDOutOfOrder<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for (k, len): (Int, UInt32) in [(2, 5), (3, 7)] {
            try check(Q.self, inOrder: false, expectedError: { .usedIDNotInFlight(id: UInt32($0[k]!)) },
                      good: [(k, len)]) { device, ids, _, _ in
                device.complete(ids: [ids[k]!], lengths: [len])
                device.injectUsed(id: UInt32(ids[k]!), len: len)
            }
        }
    }

    func testDuplicateIDOutOfOrderSplit() throws { try duplicateIDOutOfOrder(SplitVirtqueue.self) }
    func testDuplicateIDOutOfOrderPacked() throws { try duplicateIDOutOfOrder(PackedVirtqueue.self) }

    /// Out of order: the duplicate comes after the first completion was harvested.
    func duplicateIDAcrossHarvestsOutOfOrder<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for start in [0, 11] {
            for (k, len): (Int, UInt32) in [(3, 7), (2, 5)] {
                try check(Q.self, inOrder: false, start: start, expectedError: { .usedIDNotInFlight(id: UInt32($0[k]!)) },
                          good: [(k, len)]) { device, ids, q, returned in
                    device.complete(ids: [ids[k]!], lengths: [len])
                    XCTAssertPairs(returned.harvest(&q, max: 8), [(k, len)])
                    device.injectUsed(id: UInt32(ids[k]!), len: len)
                }
            }
        }
    }

    func testDuplicateIDAcrossHarvestsOutOfOrderSplit() throws { try duplicateIDAcrossHarvestsOutOfOrder(SplitVirtqueue.self) }
    func testDuplicateIDAcrossHarvestsOutOfOrderPacked() throws { try duplicateIDAcrossHarvestsOutOfOrder(PackedVirtqueue.self) }

    /// Out of order: an id in range that no buffer was given (never posted): 6, and the first
    /// not handed out.
    func unpostedIDOutOfOrder<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        let six: ([Int: UInt16]) -> UInt32 = { _ in 6 }
        let firstUnused: ([Int: UInt16]) -> UInt32 = { ids in UInt32((0..<8).first { !ids.values.contains(UInt16($0)) }!) }
        for unposted in [six, firstUnused] {
            try check(Q.self, inOrder: false, expectedError: { .usedIDNotInFlight(id: unposted($0)) },
                      good: [(1, 1)]) { device, ids, _, _ in
                XCTAssertFalse(ids.values.contains(UInt16(unposted(ids))), "\(unposted(ids)) is in flight")
                device.completeInOrder(count: 1, lengths: [1])
                device.injectUsed(id: unposted(ids), len: 0)
            }
        }
    }

    func testUnpostedIDOutOfOrderSplit() throws { try unpostedIDOutOfOrder(SplitVirtqueue.self) }
    func testUnpostedIDOutOfOrderPacked() throws { try unpostedIDOutOfOrder(PackedVirtqueue.self) }

    /// In order: the id of a buffer already completed, where the next one is due: out of order,
    /// with the oldest id in flight expected.
    func duplicateIDInOrder<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        try check(Q.self, inOrder: true, expectedError: { .usedIDOutOfOrder(id: UInt32($0[1]!), expected: $0[2]!) },
                  good: [(1, 4)]) { device, ids, _, _ in
            device.completeInOrder(count: 1, lengths: [4])
            device.injectUsed(id: UInt32(ids[1]!), len: 4)
        }
    }

    func testDuplicateIDInOrderSplit() throws { try duplicateIDInOrder(SplitVirtqueue.self) }
    func testDuplicateIDInOrderPacked() throws { try duplicateIDInOrder(PackedVirtqueue.self) }

    /// In order: an id in range that is not among the buffers in flight (never handed out).
    func unpostedIDInOrder<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        // 3 round trips first: buffers 1...4 get IDs 3...6, so 7 was never handed out.
        try check(Q.self, inOrder: true, start: 3, expectedError: { .usedIDOutOfOrder(id: 7, expected: $0[2]!) },
                  good: [(1, 4)]) { device, ids, _, _ in
            XCTAssertEqual(ids[4], 6)
            device.completeInOrder(count: 1, lengths: [4])
            device.injectUsed(id: 7, len: 0)
        }
    }

    func testUnpostedIDInOrderSplit() throws { try unpostedIDInOrder(SplitVirtqueue.self) }
    func testUnpostedIDInOrderPacked() throws { try unpostedIDInOrder(PackedVirtqueue.self) }

    // MARK: length too large

    func lengthLargerThanWritable<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for inOrder in [false, true] {
            // Buffer 2 has 200 writable bytes; 200 is fine, 201 is not: in an injected entry...
            try check(Q.self, inOrder: inOrder, expectedError: { .usedLengthTooLarge(id: UInt32($0[2]!), length: 201, posted: 200) },
                      good: [(1, 100)]) { device, ids, _, _ in
                device.completeInOrder(count: 1, lengths: nil)       // exactly the writable length
                device.injectUsed(id: UInt32(ids[2]!), len: 201)
            }
            // ... and in a completion, after 7 round trips.
            try check(Q.self, inOrder: inOrder, start: 7,
                      expectedError: { .usedLengthTooLarge(id: UInt32($0[2]!), length: 201, posted: 200) },
                      good: [(1, 100)]) { device, ids, _, _ in
                device.completeInOrder(count: 1, lengths: [100])
                device.complete(ids: [ids[2]!], lengths: [201])
            }
            // A read-only buffer: any length is too large (after a good buffer, and first).
            try check(Q.self, inOrder: inOrder, readOnly: [2],
                      expectedError: { .usedLengthTooLarge(id: UInt32($0[2]!), length: 1, posted: 0) },
                      good: [(1, 100)]) { device, ids, _, _ in
                device.completeInOrder(count: 1, lengths: nil)
                device.injectUsed(id: UInt32(ids[2]!), len: 1)
            }
            try check(Q.self, inOrder: inOrder, readOnly: [1],
                      expectedError: { .usedLengthTooLarge(id: UInt32($0[1]!), length: 1, posted: 0) },
                      good: []) { device, _, _, _ in
                device.completeInOrder(count: 1, lengths: [1])
            }
        }
    }

    func testLengthLargerThanWritableSplit() throws { try lengthLargerThanWritable(SplitVirtqueue.self) }
    func testLengthLargerThanWritablePacked() throws { try lengthLargerThanWritable(PackedVirtqueue.self) }

    /// In order: the single entry for a batch claims more than its last buffer can hold (after
    /// a single entry, and as the first entry of the harvest).
    func batchLengthLargerThanWritable<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        try check(Q.self, inOrder: true, expectedError: { .usedLengthTooLarge(id: UInt32($0[3]!), length: 301, posted: 300) },
                  good: [(1, 100)]) { device, _, _, _ in
            device.completeInOrder(count: 1, lengths: nil)
            device.completeBatchAsOne(count: 2, lastLength: 301)
        }
        try check(Q.self, inOrder: true, start: 6,
                  expectedError: { .usedLengthTooLarge(id: UInt32($0[3]!), length: 301, posted: 300) },
                  good: []) { device, _, _, _ in
            device.completeBatchAsOne(count: 3, lastLength: 301)
        }
    }

    func testBatchLengthLargerThanWritableSplit() throws { try batchLengthLargerThanWritable(SplitVirtqueue.self) }
    func testBatchLengthLargerThanWritablePacked() throws { try batchLengthLargerThanWritable(PackedVirtqueue.self) }

    // MARK: Split only: the used index

    /// The used index moves past what is in flight (4 published, 1 harvested; 2 more posted but
    /// not published, which the device cannot have used). Starts next to the UInt16 wrap.
    func testUsedIndexJump() throws {
        for inOrder in [false, true] {
            let start = 65534
            try check(SplitVirtqueue.self, inOrder: inOrder, start: start, alsoPosted: [5, 6],
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
            try check(SplitVirtqueue.self, inOrder: inOrder, start: 65535,
                      expectedError: { _ in .usedIndexJump(usedIdx: 0, lastSeen: 1, inFlight: 2) },
                      good: [(1, 100), (2, 200)]) { device, _, q, returned in
                device.completeInOrder(count: 2)
                XCTAssertPairs(returned.harvest(&q, max: 8), [(1, 100), (2, 200)])
                device.setUsedIdx(device.usedIdx &- 1)
            }
        }
    }

    /// In order: one element for "two buffers" names the fifth, which was posted but not
    /// completed. (Packed has no used index to say how many the device completed: there one
    /// descriptor naming the fifth is a legal batch of four.)
    func testInOrderIDBeyondCompletedRange() throws {
        try check(SplitVirtqueue.self, inOrder: true, count: 5,
                  expectedError: { .usedIDOutOfOrder(id: UInt32($0[5]!), expected: $0[2]!) },
                  good: [(1, 10)]) { device, ids, _, _ in
            device.completeInOrder(count: 1) { _ in 10 }
            device.injectUsed(id: UInt32(ids[5]!), len: 0, advance: 2)
        }
    }

    // MARK: Split only: ids are descriptor indices

    /// Out of order: an id naming a buffer that was added but not yet published. The device
    /// cannot have seen it (its avail entry is past `avail->idx`); if the driver took it back, the
    /// next `publish()` would hand the device a buffer the driver no longer owns. (A packed
    /// descriptor is the device's as soon as it is written.)
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

    // MARK: Packed only: wrap counters

    /// A used descriptor whose AVAIL/USED bits carry the other lap's wrap counter (§2.8.1).
    func testUsedDescriptorWithWrongWrapCounter() throws {
        for inOrder in [false, true] {
            // Lap 0 (wrap 1), position 1.
            try check(PackedVirtqueue.self, inOrder: inOrder, expectedError: { _ in .usedWrapMismatch(position: 1, expectedWrap: true) },
                      good: [(1, 3)]) { device, ids, _, _ in
                device.completeInOrder(count: 1) { _ in 3 }
                device.injectUsedWithWrongWrap(id: ids[2]!, len: 0)
            }
            // Lap 1 (wrap 0): 13 round trips put the buffers at 5, 6, 7, 0.
            try check(PackedVirtqueue.self, inOrder: inOrder, start: 13,
                      expectedError: { _ in .usedWrapMismatch(position: 6, expectedWrap: false) },
                      good: [(1, 3)]) { device, ids, _, _ in
                device.completeInOrder(count: 1) { _ in 3 }
                device.injectUsedWithWrongWrap(id: ids[2]!, len: 0)
            }
            // Just past the end of the ring: the driver's used wrap counter has flipped back to 1.
            try check(PackedVirtqueue.self, inOrder: inOrder, start: 13,
                      expectedError: { _ in .usedWrapMismatch(position: 0, expectedWrap: true) },
                      good: [(1, 3), (2, 3), (3, 3)]) { device, ids, _, _ in
                device.completeInOrder(count: 3) { _ in 3 }
                device.injectUsedWithWrongWrap(id: ids[4]!, len: 0)
            }
            // Raw: a stale used descriptor from the previous lap left at the next position.
            try check(PackedVirtqueue.self, inOrder: inOrder, start: 8,
                      expectedError: { _ in .usedWrapMismatch(position: 0, expectedWrap: false) },
                      good: []) { device, ids, _, _ in
                device.writeUsed(at: 0, id: ids[1]!, len: 0, flags: PackedDesc.flagAvail | PackedDesc.flagUsed)
            }
        }
    }
}
