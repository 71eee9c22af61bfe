import VirtioCore
import VirtioTestSupport
import XCTest

/// STYLE.md "Every layout", on both ring layouts: queue sizes {1, 2, 3 (packed), 4, 8, 256} ×
/// bursts {1, 32, size} × completion modes. Each case drives single-descriptor buffers through
/// one queue across the point where the ring's counters wrap, with the ring at every fill level
/// and start slot:
/// - split: cheap filler round trips (`fastForward`) up to `window` before the UInt16 wrap of
///   the avail and used indices, then a checked stretch to `window` after it;
/// - packed: positions and wrap counters flip every lap; more than 2 × 65,536 buffers, every one
///   checked, from position 0, out of order and with in-order runs of both kinds mixed. Runs of
///   one kind only take the split stretch instead (the long one would add seconds of debug-build
///   time to what the mixed mode covers).
/// Every cookie must come back exactly once, in the order the device wrote used entries, with
/// the length it wrote; the device must see exactly what was posted, in ring slots in ring order
/// where the layout promises it; `freeCount + inFlight == size` after every round; and both
/// sides end where the spec says.
final class EveryLayoutTests: XCTestCase {
    static let sizes = [1, 2, 3, 4, 8, 256]
    static func bursts(_ size: Int) -> [Int] { Array(Set([1, min(32, size), size])).sorted() }

    /// Where a case starts (filler round trips) and how many checked buffers follow.
    static func stretch(_ layout: RingLayoutChoice, _ mode: Completion, size: Int) -> (start: Int, total: Int) {
        if layout == .packed && (mode == .outOfOrder || mode == .inOrderMixed) {
            return (0, 2 * 65536 + 3 * size + 7)
        }
        let window = 4 * size + 500
        return (65536 - window, 2 * window)
    }

    enum Completion: String {
        /// A random subset of what the device holds, in a random order.
        case outOfOrder
        /// Oldest first, runs of buffers, one used entry per buffer.
        case inOrder
        /// Oldest first, runs of buffers collapsed into one used entry each (split §2.7.9,
        /// packed §2.8.11); runs may straddle harvest calls.
        case inOrderBatched
        /// Oldest first, each run either way at random.
        case inOrderMixed
    }

    func runAll<Q: TestedQueue & ~Copyable>(_: Q.Type, _ mode: Completion) throws {
        for size in Self.sizes where allows(Q.self, size: size) {
            for burst in Self.bursts(size) { try run(Q.self, size: size, burst: burst, mode) }
        }
    }

    func testOutOfOrderSplit() throws { try runAll(SplitVirtqueue.self, .outOfOrder) }
    func testOutOfOrderPacked() throws { try runAll(PackedVirtqueue.self, .outOfOrder) }
    func testInOrderSplit() throws { try runAll(SplitVirtqueue.self, .inOrder) }
    func testInOrderPacked() throws { try runAll(PackedVirtqueue.self, .inOrder) }
    func testInOrderBatchedSplit() throws { try runAll(SplitVirtqueue.self, .inOrderBatched) }
    func testInOrderBatchedPacked() throws { try runAll(PackedVirtqueue.self, .inOrderBatched) }
    func testInOrderMixedSplit() throws { try runAll(SplitVirtqueue.self, .inOrderMixed) }
    func testInOrderMixedPacked() throws { try runAll(PackedVirtqueue.self, .inOrderMixed) }

    /// Buffer k's length; a burst is all writable or all read-only.
    static func length(_ k: Int) -> UInt32 { UInt32(1 + k % 1500) }

    /// Buffers 1...total, posted a burst at a time (a random direction per burst) and popped.
    /// Out of order the device completes a random subset in a random order; in order it
    /// completes runs oldest first as `mode` says. The device completes all it holds, or (a
    /// quarter of the time) only part, so buffers stay in flight across rounds and positions
    /// drift; harvests take a random `max` until nothing is left.
    ///
    /// The loop runs millions of times in a debug build, so it avoids per-buffer `XCTAssert`
    /// calls: the first failed check reports and ends the case.
    func run<Q: TestedQueue & ~Copyable>(_: Q.Type, size: Int, burst: Int, _ mode: Completion) throws {
        let what = "\(Q.layoutName) \(mode) size \(size) burst \(burst)"
        let (start, total) = Self.stretch(Q.layout, mode, size: size)
        let inOrder = mode != .outOfOrder
        let ringOrdered = inOrder || Q.slotsAlwaysInRingOrder
        let ring = try makeRing(Q.self, size: size, inOrder: inOrder)
        let device = ring.device
        var q = ring.queue(inOrder: inOrder)
        var rng = SplitMix64(seed: UInt64(size &* 1000 &+ burst &* 2 &+ (inOrder ? 1 : 0)))
        /// Uniform in 0..<n (SplitMix64.int's generic range arithmetic is slow unoptimised).
        func below(_ n: Int) -> Int { Int(truncatingIfNeeded: rng.next() % UInt64(n)) }
        fastForward(&q, device, by: start)
        XCTAssertEqual(device.usedBase, Q.expectedBase(buffers: start, descriptors: start, size: size), what)
        var writableBytes = [UInt32](repeating: 0, count: total + 1)
        var returned = [Bool](repeating: false, count: total + 1)
        var returnedCount = 0
        var nextCookie = 1
        // What the device completed, in the order of its used entries: what harvest must hand
        // back (cookie, length).
        var expectedCookie: [Int] = [], expectedLength: [UInt32] = []
        var expectedHead = 0
        var laps = 0
        var failed = false
        var order: [Int] = [], ids: [UInt16] = [], lengths: [UInt32] = []   // reused every round

        func check(_ ok: Bool, _ message: @autoclosure () -> String, line: UInt = #line) -> Bool {
            if !ok && !failed { XCTFail("\(what): \(message())", line: line); failed = true }
            return ok
        }
        func expect(_ k: Int, _ len: UInt32) { expectedCookie.append(k); expectedLength.append(len) }

        while returnedCount < total {
            // Driver: a burst of one direction.
            let first = nextCookie
            let posted = min(burst, q.freeCount, total + 1 - nextCookie)
            let writable = below(5) != 0
            if posted > 0 {
                q.addBurst(count: posted, deviceWritable: writable) { i in
                    let k = first + i
                    return (addr: address(k), len: Self.length(k), cookie: cookie(k))
                }
                for k in first..<first + posted { writableBytes[k] = writable ? Self.length(k) : 0 }
                nextCookie += posted
            }
            guard check(q.publish() == (posted > 0), "publish after \(posted) adds") else { return }

            // Device: exactly those buffers, in order (and in ring order where the layout says so).
            let popped = device.popBuffers()
            guard check(popped.count == posted, "popped \(popped.count), posted \(posted)") else { return }
            var k = first
            for b in popped {
                let s = b.segments[0]
                if b.segments.count != 1 || b.descriptorCount != 1 || s.addr != address(k) || s.len != Self.length(k)
                    || s.writable != writable || Int(b.id) >= size {
                    _ = check(false, "\(b) for cookie \(k)"); return
                }
                if ringOrdered {
                    let slot = (start + k - 1) % size
                    guard check(Int(b.descriptors[0]) == slot, "\(b) for cookie \(k), expected at \(slot)") else { return }
                    if slot == 0 && k > 1 { laps += 1 }   // a new lap starts
                }
                k += 1
            }

            // Device: complete all it holds, or (a quarter of the time) only part.
            // (What it holds is what it just popped unless an earlier round left some: then ask.)
            let pending = device.pendingCount == popped.count ? popped : device.pendingBuffers
            let held = pending.count
            let count = below(4) == 0 ? below(held + 1) : held
            if inOrder {
                var done = 0
                while done < count {
                    let run = 1 + below(min(count - done, 2 * burst))
                    let batched: Bool
                    switch mode {
                    case .inOrder: batched = false
                    case .inOrderBatched: batched = true
                    default: batched = below(2) == 0
                    }
                    if batched {
                        let last = owner(pending[done + run - 1])
                        let lastLength = UInt32(below(Int(writableBytes[last]) + 1))
                        for i in 0..<run - 1 { let o = owner(pending[done + i]); expect(o, writableBytes[o]) }
                        expect(last, lastLength)
                        device.completeBatchAsOne(count: run, lastLength: lastLength)
                    } else {
                        lengths.removeAll(keepingCapacity: true)
                        for i in 0..<run {
                            let o = owner(pending[done + i])
                            let len = UInt32(truncatingIfNeeded: o &* 2_654_435_761) % (writableBytes[o] + 1)
                            expect(o, len)
                            lengths.append(len)
                        }
                        device.completeInOrder(count: run, lengths: lengths)
                    }
                    done += run
                }
            } else if count > 0 {
                // `count` of the held buffers, in a random order (a partial Fisher–Yates shuffle).
                order.removeAll(keepingCapacity: true)
                for i in 0..<held { order.append(i) }
                ids.removeAll(keepingCapacity: true); lengths.removeAll(keepingCapacity: true)
                for i in 0..<count {
                    let j = i + below(held - i)
                    if j != i { order.swapAt(i, j) }
                    let b = pending[order[i]]
                    let len = UInt32(below(Int(b.writableBytes) + 1))
                    ids.append(b.id)
                    lengths.append(len)
                    expect(owner(b), len)
                }
                device.complete(ids: ids, lengths: lengths)
            }

            // Driver: harvest with a random max until nothing is left.
            while true {
                let max = 1 + below(burst)
                var seen = 0
                let n = q.harvest(max: max) { c, len in
                    seen += 1
                    let k = key(c)
                    if expectedHead >= expectedCookie.count || k != expectedCookie[expectedHead]
                        || len != expectedLength[expectedHead] || k < 1 || k > total || returned[k] {
                        _ = check(expectedHead < expectedCookie.count, "harvested \(k) that was never completed")
                            && check(k == expectedCookie[expectedHead] && len == expectedLength[expectedHead],
                                     "harvested \(k):\(len), expected \(expectedCookie[expectedHead]):\(expectedLength[expectedHead])")
                            && check(false, "cookie \(k) returned twice")
                        return
                    }
                    returned[k] = true
                    returnedCount += 1
                    expectedHead += 1
                }
                guard !failed, check(n == seen && n <= max, "harvest returned \(n), body saw \(seen)") else { return }
                if n == 0 { break }
            }
            let outstanding = nextCookie - 1 - returnedCount
            // (One cheap test first; the checks below only run to say what went wrong.)
            if q.failure == nil && expectedHead == expectedCookie.count && q.inFlight == outstanding
                && q.inFlight == device.pendingCount && q.freeCount + q.inFlight == size && device.violations.isEmpty {
                expectedCookie.removeAll(keepingCapacity: true); expectedLength.removeAll(keepingCapacity: true)
                expectedHead = 0
                continue
            }
            _ = check(q.failure == nil, "failure \(String(describing: q.failure))")
                && check(expectedHead == expectedCookie.count, "\(expectedCookie.count - expectedHead) completed buffers not harvested")
                && check(q.inFlight == outstanding, "inFlight \(q.inFlight), expected \(outstanding)")
                && check(q.inFlight == device.pendingCount, "inFlight \(q.inFlight), device holds \(device.pendingCount)")
                && check(q.freeCount + q.inFlight == size, "freeCount \(q.freeCount) + inFlight \(q.inFlight) != \(size)")
                && check(device.violations.isEmpty, "driver violations: \(device.violations)")
            return
        }
        XCTAssertEqual(returnedCount, total, what)
        XCTAssertTrue(returned.dropFirst().allSatisfy { $0 }, what)
        // A lap starts at every slot 0 after the first buffer's.
        if ringOrdered { XCTAssertEqual(laps, (start + total - 1) / size - start / size, what) }
        // Both sides went all the way round: split, indices back past the UInt16 wrap;
        // packed, the position with the wrap counter flipped once a lap.
        let end = Q.expectedBase(buffers: start + total, descriptors: start + total, size: size)
        XCTAssertEqual(q.addresses.base, end, what)
        XCTAssertEqual(device.stoppedBase, end, what)
        XCTAssertEqual(device.usedBase, end, what)
        XCTAssertEqual(q.freeCount, size, what)
        XCTAssertEqual(q.inFlight, 0, what)
        XCTAssertEqual(q.reclaimAll { _ in }, 0, what)
    }
}
