import VirtioCore
import VirtioTestSupport
import XCTest

/// Seeded random interleavings of the driver's and the device's steps: add chains of 1–3
/// descriptors (readable then writable parts), publish, device pop, device completion (a random
/// permutation of a random subset out of order; random runs, some collapsed into one used
/// element, in order), harvest with a random `max`, and now and then `reclaimAll` with a device
/// reset. Half the cases start a few hundred buffers before the `UInt16` wrap (the filler round
/// trips that get there cost more than the random part). After every step:
/// no failure, no driver violation seen by the device, `inFlight` and `freeCount` match the
/// test's own books; every cookie comes back exactly once with the length the device wrote.
final class RandomInterleavingTests: XCTestCase {
    static let sizes = [1, 2, 4, 8, 256]
    static let seeds: [UInt64] = [1, 2, 3, 0xC0FFEE, 0xDEAD_BEEF]
    static let steps = 3000

    func testOutOfOrder() throws {
        try runAll(inOrder: false, collapse: false, smallHarvests: true)
    }

    func testInOrder() throws {
        try runAll(inOrder: true, collapse: false, smallHarvests: true)
    }

    /// In order, with runs collapsed into one used element; every harvest takes all completed.
    func testInOrderCollapsedBatches() throws {
        try runAll(inOrder: true, collapse: true, smallHarvests: false)
    }

    /// In order, collapsed runs, and harvests with a random `max` that can end inside a run.
    func testInOrderCollapsedBatchesSmallHarvests() throws {
        try runAll(inOrder: true, collapse: true, smallHarvests: true)
    }

    func runAll(inOrder: Bool, collapse: Bool, smallHarvests: Bool) throws {
        for size in Self.sizes {
            for (i, seed) in Self.seeds.enumerated() {
                try run(size: size, seed: seed, nearWrap: i % 2 == 0,
                        inOrder: inOrder, collapse: collapse, smallHarvests: smallHarvests)
            }
        }
    }

    /// A buffer the driver owns (posted and not returned), as the test remembers it.
    struct Posted {
        var segments: [SplitDeviceModel.Segment]
        var writable: UInt32 { segments.reduce(0) { $1.writable ? $0 + $1.len : $0 } }
    }

    func run(size: Int, seed: UInt64, nearWrap: Bool, inOrder: Bool, collapse: Bool, smallHarvests: Bool) throws {
        let what = "size \(size) seed \(seed) nearWrap \(nearWrap) inOrder \(inOrder) collapse \(collapse) smallHarvests \(smallHarvests)"
        let ring = try makeRing(SplitVirtqueue.self, size: size, inOrder: inOrder)
        let device = ring.device
        var q = ring.queue(inOrder: inOrder)
        var rng = SplitMix64(seed: seed &* 0x9E37 &+ UInt64(size))
        if nearWrap { fastForward(&q, device, by: 65536 - rng.int(1...400)) }

        var owned: [Int: Posted] = [:]          // posted, not yet returned
        var descriptorsOwned = 0
        var everPosted = 0
        var returned = Set<Int>()
        var expected: [(cookie: Int, len: UInt32)] = []   // completed by the device, in used order
        var expectedHead = 0
        var failed = false

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
            let n = q.harvest(max: max) { c, len in got.append((key(c), len)) }
            guard check(n == got.count && n <= max, "harvest said \(n), gave \(got.count), max \(max)") else { return false }
            return got.allSatisfy { giveBack($0.0, $0.1) }
        }
        func deviceLength(_ chain: SplitDeviceModel.Chain) -> UInt32 {
            UInt32(rng.int(0...Int(chain.writableBytes)))
        }

        for _ in 0..<Self.steps where !failed {
            switch rng.int(0...99) {
            case 0..<35:   // driver adds a chain
                let count = rng.int(1...min(3, size))
                let k = everPosted + 1
                let firstWritable = rng.int(0...count)
                let segments = (0..<count).map { i in
                    SplitDeviceModel.Segment(addr: address(k, segment: i), len: UInt32(rng.int(1...4096)),
                                             writable: i >= firstWritable)
                }
                let free = q.freeCount
                let added = q.addChain(count: count, cookie: cookie(k)) { i in
                    VirtqSegment(addr: segments[i].addr, len: segments[i].len, deviceWritable: segments[i].writable)
                }
                guard check(added == (count <= free), "addChain(\(count)) with \(free) free returned \(added)") else { break }
                if added {
                    everPosted = k
                    owned[k] = Posted(segments: segments)
                    descriptorsOwned += count
                } else {
                    _ = check(q.freeCount == free, "a refused addChain changed freeCount")
                }
            case 35..<50:
                _ = q.publish()
            case 50..<65:  // device pops; it must see exactly what the driver posted
                for chain in device.popAvailable() {
                    let k = owner(chain)
                    guard check(owned[k]?.segments == chain.segments, "device saw \(chain.segments) for \(k)") else { break }
                }
            case 65..<82:  // device completes
                let held = device.pending.count
                guard held > 0 else { break }
                let count = rng.int(1...held)
                if !inOrder {
                    var picked = Array(device.pending.shuffled(using: &rng).prefix(count))
                    picked.shuffle(using: &rng)
                    let lengths = picked.map(deviceLength)
                    device.complete(ids: picked.map(\.headId), lengths: lengths)
                    expected += zip(picked.map(owner), lengths).map { ($0, $1) }
                    break
                }
                var done = 0
                while done < count {
                    let run = rng.int(1...count - done)
                    let chains = Array(device.pending.prefix(run))
                    if collapse && rng.chance(50) {
                        let last = deviceLength(chains.last!)
                        expected += chains.dropLast().map { (owner($0), $0.writableBytes) }
                        expected.append((owner(chains.last!), last))
                        device.completeBatchAsOne(count: run, lastLength: last)
                    } else {
                        let lengths = chains.map(deviceLength)
                        expected += zip(chains.map(owner), lengths).map { ($0, $1) }
                        var i = 0
                        device.completeInOrder(count: run) { _ in defer { i += 1 }; return lengths[i] }
                    }
                    done += run
                }
            case 82..<99:  // driver harvests
                _ = harvest(max: smallHarvests ? rng.int(1...size + 2) : Int.max)
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
        for chain in device.popAvailable() { _ = check(owned[owner(chain)]?.segments == chain.segments, "drain pop") }
        expected += device.pending.map { (owner($0), $0.writableBytes) }
        device.completeInOrder(count: device.pending.count)
        while !failed && harvest(max: size) && q.inFlight > 0 {}
        XCTAssertNil(q.failure, what)
        XCTAssertTrue(owned.isEmpty, "\(what): never returned: \(owned.keys.sorted())")
        XCTAssertEqual(returned.count, everPosted, what)
        XCTAssertEqual(q.freeCount, size, what)
        XCTAssertEqual(q.inFlight, 0, what)
        XCTAssertEqual(device.violations, [], what)
    }
}
