import VirtioCore
import VirtioTestSupport
import XCTest

/// STYLE.md "Every layout": queue sizes {1, 2, 4, 8, 256} × bursts {1, 32, size} × completion
/// modes. Each case drives more than 65,536 single-descriptor buffers through one queue so the
/// avail and used indices cross the `UInt16` wrap: the first ones as cheap filler round trips
/// (`fastForward`), then a checked stretch from `window` before the wrap to `window` after it,
/// with the rings at every fill level and start slot. Every checked cookie must come back exactly
/// once, in used-ring order (FIFO in order), with the length the device wrote, and
/// `freeCount + inFlight == size` after every round.
final class EveryLayoutTests: XCTestCase {
    static let sizes = [1, 2, 4, 8, 256]
    static func bursts(_ size: Int) -> [Int] { Array(Set([1, min(32, size), size])).sorted() }

    enum Completion: String {
        /// A random subset of what the device holds, in a random order.
        case outOfOrder
        /// Oldest first, one used element per buffer.
        case inOrder
        /// Oldest first, runs of buffers collapsed into one used element (§2.7.9).
        case inOrderBatched
    }

    // Buffer k: length, direction and what the device writes into it.
    static func length(_ k: Int) -> UInt32 { UInt32(1 + k % 2000) }
    static func writable(_ k: Int) -> Bool { k % 7 != 3 }
    static func fullLength(_ k: Int) -> UInt32 { writable(k) ? length(k) : 0 }
    static func written(_ k: Int) -> UInt32 {
        writable(k) ? UInt32(UInt64(k) &* 2_654_435_761 % UInt64(length(k) + 1)) : 0
    }

    func testOutOfOrderAcrossIndexWrap() throws { try runAll(.outOfOrder) }
    func testInOrderAcrossIndexWrap() throws { try runAll(.inOrder) }
    func testInOrderOneUsedElementPerBatchAcrossIndexWrap() throws { try runAll(.inOrderBatched) }

    func runAll(_ mode: Completion) throws {
        for size in Self.sizes {
            for burst in Self.bursts(size) { try run(size: size, burst: burst, mode) }
        }
    }

    func run(size: Int, burst: Int, _ mode: Completion) throws {
        let what = "\(mode) size \(size) burst \(burst)"
        let inOrder = mode != .outOfOrder
        let ring = try makeRing(SplitVirtqueue.self, size: size, inOrder: inOrder)
        let device = ring.device
        var q = ring.queue(inOrder: inOrder)
        var rng = SplitMix64(seed: UInt64(size &* 1000 &+ burst))
        let window = 4 * size + 500
        fastForward(&q, device, by: 65536 - window)
        XCTAssertEqual(device.usedIdx, UInt16(65536 - window), what)
        let total = 2 * window
        var nextCookie = 1
        var returned = [Bool](repeating: false, count: total + 1)
        var returnedCount = 0
        // What the device completed, in used-ring order: what harvest must hand back.
        var expected: [(cookie: Int, len: UInt32)] = []
        var expectedHead = 0

        func check(_ ok: Bool, _ message: @autoclosure () -> String, line: UInt = #line) -> Bool {
            if !ok { XCTFail("\(what): \(message())", line: line) }
            return ok
        }

        while returnedCount < total {
            // Driver: post up to a burst and publish it.
            let first = nextCookie
            let posted = min(burst, q.freeCount, total + 1 - nextCookie)
            for _ in 0..<posted {
                let k = nextCookie
                q.add(addr: address(k), len: Self.length(k), deviceWritable: Self.writable(k), cookie: cookie(k))
                nextCookie += 1
            }
            _ = q.publish()

            // Device: it must see exactly those buffers.
            let chains = device.popAvailable()
            guard check(chains.map(owner) == Array(first..<nextCookie), "popped \(chains.map(owner)), posted \(first)..<\(nextCookie)")
            else { return }
            for chain in chains {
                let k = owner(chain)
                let seg = SplitDeviceModel.Segment(addr: address(k), len: Self.length(k), writable: Self.writable(k))
                guard check(chain.segments == [seg], "chain \(chain) for cookie \(k)") else { return }
            }

            // Device: complete all it holds, or (a quarter of the time) only some of it, so
            // buffers stay in flight across rounds and the ring positions drift.
            let held = device.pending.count
            let count = rng.chance(25) ? rng.int(0...held) : held
            switch mode {
            case .outOfOrder:
                var ids = device.pending.map(\.headId)
                ids.shuffle(using: &rng)
                ids.removeLast(held - count)
                let owners = ids.map { id in owner(device.pending.first { $0.headId == id }!) }
                device.complete(ids: ids, lengths: owners.map(Self.written))
                expected += owners.map { ($0, Self.written($0)) }
            case .inOrder:
                expected += device.pending.prefix(count).map { (owner($0), Self.written(owner($0))) }
                device.completeInOrder(count: count) { Self.written(owner($0)) }
            case .inOrderBatched:
                // Runs never cross a multiple of `burst`, where the harvest calls below stop (a
                // run split across harvest calls has its own test in InOrderBatchTests).
                var done = 0
                while done < count {
                    let run = rng.int(1...min(burst - done % burst, count - done))
                    let owners = device.pending.prefix(run).map(owner)
                    expected += owners.dropLast().map { ($0, Self.fullLength($0)) }
                    expected.append((owners.last!, Self.written(owners.last!)))
                    device.completeBatchAsOne(count: run, lastLength: Self.written(owners.last!))
                    done += run
                }
            }

            // Driver: harvest a burst at a time until nothing is left.
            while true {
                var got: [(Int, UInt32)] = []
                let n = q.harvest(max: burst) { c, len in got.append((key(c), len)) }
                guard check(n == got.count && n <= burst, "harvest returned \(n), body saw \(got.count)") else { return }
                if n == 0 { break }
                for (k, len) in got {
                    guard check(expectedHead < expected.count, "harvested \(k) that was never completed"),
                          check(k == expected[expectedHead].cookie && len == expected[expectedHead].len,
                                "harvested \(k):\(len), expected \(expected[expectedHead])"),
                          check(k >= 1 && k <= total && !returned[k], "cookie \(k) returned twice")
                    else { return }
                    returned[k] = true
                    returnedCount += 1
                    expectedHead += 1
                }
            }
            let outstanding = nextCookie - 1 - returnedCount
            guard check(q.failure == nil, "failure \(String(describing: q.failure))"),
                  check(expectedHead == expected.count, "\(expected.count - expectedHead) completed buffers not harvested"),
                  check(q.inFlight == outstanding, "inFlight \(q.inFlight), expected \(outstanding)"),
                  check(q.inFlight == device.pending.count, "inFlight \(q.inFlight), device holds \(device.pending.count)"),
                  check(q.freeCount + outstanding == size, "freeCount \(q.freeCount) + \(outstanding) in flight != \(size)"),
                  check(device.violations.isEmpty, "driver violations: \(device.violations)")
            else { return }
            if expectedHead > 4096 { expected.removeFirst(expectedHead); expectedHead = 0 }
        }
        XCTAssertEqual(returnedCount, total, what)
        XCTAssertTrue(returned.dropFirst().allSatisfy { $0 }, what)
        // The indices went all the way round.
        XCTAssertEqual(device.usedIdx, UInt16(window), what)
        XCTAssertEqual(device.lastAvail, UInt16(window), what)
        XCTAssertEqual(q.freeCount, size, what)
        XCTAssertEqual(q.inFlight, 0, what)
        XCTAssertEqual(q.reclaimAll { _ in }, 0, what)
    }
}
