import VirtioCore
import VirtioTestSupport
import XCTest

/// Seeded random interleavings of the driver's and the device's steps, on both layouts: add
/// chains of 1–3 descriptors (readable then writable parts) and, in the second case set, bursts
/// of single-descriptor buffers; publish; device pop; device completion (a random permutation of
/// a random subset out of order; random runs, some collapsed into one used entry, in order);
/// harvest with a random `max`; and now and then `reclaimAll` with a device reset. In the first
/// case set half the cases start a few hundred buffers before the `UInt16` wrap (the filler
/// round trips that get there cost more than the random part). After every step: no failure,
/// no driver violation seen by the device, `inFlight` and `freeCount` match the test's own
/// books; every harvest hands back exactly as many buffers as it may, and every cookie comes back
/// exactly once with the length the device wrote.
final class RandomInterleavingTests: XCTestCase {
    /// Chains only, near the wrap or not.
    static let sizes = [1, 2, 4, 8, 256]
    static let seeds: [UInt64] = [1, 2, 3, 0xC0FFEE, 0xDEAD_BEEF]
    static let steps = 3000
    /// Chains and single-descriptor bursts, from the start of the ring (packed: every size
    /// from 1 to 5, not only powers of two).
    static let burstSizes = [1, 2, 3, 4, 5, 8, 16]
    static let burstSeeds: [UInt64] = [1, 2, 3]
    static let burstSteps = 2500

    enum Mode: String {
        /// Random subsets in random order, harvests of random size.
        case outOfOrder
        /// Runs, one used entry per buffer, harvests of random size.
        case inOrder
        /// Runs, half of them collapsed into one used entry; every harvest takes all completed.
        case inOrderCollapsed
        /// Runs, half of them collapsed, harvests of random size that can end inside a run.
        case inOrderCollapsedSmallHarvests

        var inOrder: Bool { self != .outOfOrder }
        var collapse: Bool { self == .inOrderCollapsed || self == .inOrderCollapsedSmallHarvests }
        var smallHarvests: Bool { self != .inOrderCollapsed }
    }

    func runAll<Q: TestedQueue & ~Copyable>(_: Q.Type, _ mode: Mode) throws {
        for size in Self.sizes where allows(Q.self, size: size) {
            for (i, seed) in Self.seeds.enumerated() {
                try run(Q.self, size: size, seed: seed &* 0x9E37 &+ UInt64(size), nearWrap: i % 2 == 0, mode,
                        singles: false, steps: Self.steps)
            }
        }
        // Out of order, and in order with collapsed runs and small harvests.
        guard mode == .outOfOrder || mode == .inOrderCollapsedSmallHarvests else { return }
        for size in Self.burstSizes where allows(Q.self, size: size) {
            for seed in Self.burstSeeds {
                try run(Q.self, size: size, seed: seed &* 7919 &+ UInt64(size) &* 31 &+ (mode.inOrder ? 1 : 0),
                        nearWrap: false, mode, singles: true, steps: Self.burstSteps)
            }
        }
    }

    func testOutOfOrderSplit() throws { try runAll(SplitVirtqueue.self, .outOfOrder) }
    func testOutOfOrderPacked() throws { try runAll(PackedVirtqueue.self, .outOfOrder) }
    func testInOrderSplit() throws { try runAll(SplitVirtqueue.self, .inOrder) }
    func testInOrderPacked() throws { try runAll(PackedVirtqueue.self, .inOrder) }
    func testInOrderCollapsedBatchesSplit() throws { try runAll(SplitVirtqueue.self, .inOrderCollapsed) }
    func testInOrderCollapsedBatchesPacked() throws { try runAll(PackedVirtqueue.self, .inOrderCollapsed) }
    func testInOrderCollapsedBatchesSmallHarvestsSplit() throws { try runAll(SplitVirtqueue.self, .inOrderCollapsedSmallHarvests) }
    func testInOrderCollapsedBatchesSmallHarvestsPacked() throws { try runAll(PackedVirtqueue.self, .inOrderCollapsedSmallHarvests) }

    /// A buffer the driver owns (posted and not returned), as the test remembers it.
    struct Posted {
        var segments: [DeviceSegment]
        var writable: UInt32 { segments.reduce(0) { $1.writable ? $0 + $1.len : $0 } }
    }

    func run<Q: TestedQueue & ~Copyable>(_: Q.Type, size: Int, seed: UInt64, nearWrap: Bool, _ mode: Mode,
                                         singles: Bool, steps: Int) throws {
        let what = "\(Q.layoutName) size \(size) seed \(seed) nearWrap \(nearWrap) \(mode) singles \(singles)"
        let inOrder = mode.inOrder
        let ring = try makeRing(Q.self, size: size, inOrder: inOrder)
        let device = ring.device
        var q = ring.queue(inOrder: inOrder)
        var rng = SplitMix64(seed: seed)
        if nearWrap { fastForward(&q, device, by: 65536 - rng.int(1...400)) }

        var owned: [Int: Posted] = [:]          // posted, not yet returned
        var descriptorsOwned = 0
        var everPosted = 0
        var returned = Set<Int>()
        var expected: [(cookie: Int, len: UInt32)] = []   // completed by the device, in used order
        var expectedHead = 0
        var failed = false
        var chains = 0, batches = 0

        func check(_ ok: Bool, _ message: @autoclosure () -> String, line: UInt = #line) -> Bool {
            if !ok && !failed { XCTFail("\(what): \(message())", line: line); failed = true }
            return ok
        }
        func giveBack(_ k: Int, _ len: UInt32?) -> Bool {
            guard check(returned.insert(k).inserted, "cookie \(k) returned twice"),
                  let p = owned.removeValue(forKey: k) else { return check(false, "cookie \(k) not owned") }
            descriptorsOwned -= p.segments.count
            if let len {
                guard check(expectedHead < expected.count, "harvested \(k) never completed"),
                      check(expected[expectedHead].cookie == k && expected[expectedHead].len == len,
                            "harvested \(k):\(len), expected \(expected[expectedHead])")
                else { return false }
                expectedHead += 1
            }
            return true
        }
        func harvest(max: Int) -> Bool {
            var got: [(Int, UInt32)] = []
            let completed = expected.count - expectedHead
            let n = q.harvest(max: max) { c, len in got.append((key(c), len)) }
            guard check(n == got.count && n == min(max, completed),
                        "harvest said \(n), gave \(got.count), max \(max), \(completed) completed") else { return false }
            return got.allSatisfy { giveBack($0.0, $0.1) }
        }
        func deviceLength(_ buffer: DeviceBuffer) -> UInt32 {
            UInt32(rng.int(0...Int(buffer.writableBytes)))
        }
        func post(_ k: Int, _ segments: [DeviceSegment]) {
            everPosted = k
            owned[k] = Posted(segments: segments)
            descriptorsOwned += segments.count
        }

        for _ in 0..<steps where !failed {
            switch rng.int(0...99) {
            case 0..<35 where singles && rng.chance(30):   // driver adds a burst of single descriptors
                guard q.freeCount > 0 else { break }
                let n = rng.int(1...min(4, q.freeCount))
                let writable = rng.chance(70)
                let first = everPosted + 1
                q.addBurst(count: n, deviceWritable: writable) { i in
                    (addr: address(first + i), len: UInt32(100 + first + i), cookie: cookie(first + i))
                }
                for k in first..<first + n {
                    post(k, [DeviceSegment(addr: address(k), len: UInt32(100 + k), writable: writable)])
                }
            case 0..<35:   // driver adds a chain
                let count = rng.int(1...min(3, size))
                let k = everPosted + 1
                let firstWritable = rng.int(0...count)
                let segments = (0..<count).map { i in
                    DeviceSegment(addr: address(k, segment: i), len: UInt32(rng.int(1...4096)), writable: i >= firstWritable)
                }
                let free = q.freeCount, inFlight = q.inFlight
                let added = q.addChain(count: count, cookie: cookie(k)) { i in
                    VirtqSegment(addr: segments[i].addr, len: segments[i].len, deviceWritable: segments[i].writable)
                }
                guard check(added == (count <= free), "addChain(\(count)) with \(free) free returned \(added)") else { break }
                if added {
                    post(k, segments)
                    if count > 1 { chains += 1 }
                } else {
                    _ = check(q.freeCount == free && q.inFlight == inFlight, "a refused addChain changed the queue")
                }
            case 35..<50:
                _ = q.publish()
            case 50..<65:  // device pops; it must see exactly what the driver posted
                for buffer in device.popBuffers() {
                    let k = owner(buffer)
                    guard check(owned[k]?.segments == buffer.segments, "device saw \(buffer) for \(k)") else { break }
                }
            case 65..<82:  // device completes
                let held = device.pendingCount
                guard held > 0 else { break }
                let pending = device.pendingBuffers
                let count = rng.int(1...held)
                if !inOrder {
                    var picked = Array(pending.shuffled(using: &rng).prefix(count))
                    picked.shuffle(using: &rng)
                    let lengths = picked.map(deviceLength)
                    device.complete(ids: picked.map(\.id), lengths: lengths)
                    expected += zip(picked.map(owner), lengths).map { ($0, $1) }
                    break
                }
                var done = 0
                while done < count {
                    let run = rng.int(1...count - done)
                    let buffers = pending[done..<done + run]
                    if mode.collapse && rng.chance(50) {
                        let last = deviceLength(buffers.last!)
                        expected += buffers.dropLast().map { (owner($0), $0.writableBytes) }
                        expected.append((owner(buffers.last!), last))
                        device.completeBatchAsOne(count: run, lastLength: last)
                        if run > 1 { batches += 1 }
                    } else {
                        let lengths = buffers.map(deviceLength)
                        expected += zip(buffers.map(owner), lengths).map { ($0, $1) }
                        device.completeInOrder(count: run, lengths: lengths)
                    }
                    done += run
                }
            case 82..<99:  // driver harvests
                _ = harvest(max: mode.smallHarvests ? rng.int(1...size + 2) : Int.max)
            default:       // device stops; the driver takes everything back
                var back: [Int] = []
                q.reclaimAll { back.append(key($0)) }
                _ = check(Set(back) == Set(owned.keys) && back.count == owned.count,
                          "reclaimAll gave \(back.sorted()), owned \(owned.keys.sorted())")
                for k in back { _ = giveBack(k, nil) }
                device.reset()
                expected = []; expectedHead = 0
            }
            _ = check(q.failure == nil, "failure \(String(describing: q.failure))")
                && check(device.violations.isEmpty, "driver violations: \(device.violations)")
                && check(q.inFlight == owned.count, "inFlight \(q.inFlight), owned \(owned.count)")
                && check(q.freeCount + descriptorsOwned == size,
                         "freeCount \(q.freeCount) + \(descriptorsOwned) descriptors owned != \(size)")
        }
        guard !failed else { return }

        // Drain: publish, complete and harvest everything left.
        _ = q.publish()
        for buffer in device.popBuffers() { _ = check(owned[owner(buffer)]?.segments == buffer.segments, "drain pop") }
        expected += device.pendingBuffers.map { (owner($0), $0.writableBytes) }
        device.completeInOrder(count: device.pendingCount, lengths: nil)
        while !failed && harvest(max: size) && q.inFlight > 0 {}
        XCTAssertNil(q.failure, what)
        XCTAssertTrue(owned.isEmpty, "\(what): never returned: \(owned.keys.sorted())")
        XCTAssertEqual(returned.count, everPosted, what)
        XCTAssertEqual(q.freeCount, size, what)
        XCTAssertEqual(q.inFlight, 0, what)
        XCTAssertEqual(device.violations, [], what)
        if singles && size >= 2 { XCTAssertGreaterThan(chains, 0, what) }
        if singles && mode.collapse && size >= 2 { XCTAssertGreaterThan(batches, 0, what) }
    }
}
