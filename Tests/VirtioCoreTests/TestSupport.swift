import VirtioCore
import VirtioTestSupport
import XCTest

/// SplitMix64: a tiny seeded generator, so every random test replays exactly from its seed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in `range` (the modulo bias is irrelevant here).
    mutating func int(_ range: ClosedRange<Int>) -> Int {
        range.lowerBound + Int(next() % UInt64(range.count))
    }
    mutating func chance(_ percent: Int) -> Bool { int(0...99) < percent }
}

/// Cookie `k` (k ≥ 1) as the opaque pointer the queue hands back.
func cookie(_ k: Int) -> UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: k)! }
/// The `k` of a cookie (0 for nil).
func key(_ cookie: UnsafeMutableRawPointer?) -> Int { Int(bitPattern: cookie) }

/// Buffer `k`'s segment `i` lives at `k << 16 | i << 12`, so the device can tell whose it is.
func address(_ k: Int, segment i: Int = 0) -> UInt64 { UInt64(k) << 16 | UInt64(i) << 12 }
/// The cookie of the buffer a chain belongs to.
func owner(_ chain: SplitDeviceModel.Chain) -> Int { Int(chain.segments[0].addr >> 16) }

/// Ring memory and the device over it, for one test case.
struct Ring {
    let memory: UnsafeMutableRawPointer
    let layout: SplitRingLayout
    let device: SplitDeviceModel
    /// The driver side over the same memory (zeroes it).
    func queue(inOrder: Bool, eventIndex: Bool = false) -> SplitVirtqueue {
        SplitVirtqueue(memory: memory, layout: layout, inOrder: inOrder, eventIndex: eventIndex)
    }
}

extension XCTestCase {
    /// Heap ring memory of `size` and a device over it. The memory is freed when the test ends,
    /// not when the last reference to the `Ring` goes (the queue and device keep raw pointers).
    func makeRing(size: Int, inOrder: Bool) throws -> Ring {
        let (memory, layout) = try SplitDeviceModel.allocateRing(size: size)
        addTeardownBlock { SplitDeviceModel.freeRing(memory) }
        return Ring(memory: memory, layout: layout,
                    device: SplitDeviceModel(memory: memory, layout: layout, inOrder: inOrder))
    }
}

/// One `harvest(max:)`, as (cookie, length) pairs.
func harvested(_ q: inout SplitVirtqueue, max: Int) -> [(Int, UInt32)] {
    var out: [(Int, UInt32)] = []
    _ = q.harvest(max: max) { c, len in out.append((key(c), len)) }
    return out
}

/// Compares (cookie, length) lists, printed as "cookie:length".
func XCTAssertPairs(_ got: [(Int, UInt32)], _ expected: [(Int, UInt32)],
                    file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(got.map { "\($0.0):\($0.1)" }, expected.map { "\($0.0):\($0.1)" }, file: file, line: line)
}

/// The cookie of the filler buffers `fastForward` sends.
let fillerCookie = UnsafeMutableRawPointer(bitPattern: 0xF111_0000)!

/// Runs `count` cheap round trips (one read-only descriptor each, completed at once with length
/// 0 by `SplitDeviceModel.echoAvailable`) so that the avail and used indices, the descriptor
/// cursor and the free list all move by `count`. The queue must be empty and healthy.
func fastForward(_ q: inout SplitVirtqueue, _ device: SplitDeviceModel, by count: Int,
                 file: StaticString = #filePath, line: UInt = #line) {
    precondition(q.inFlight == 0 && device.pending.isEmpty)
    var left = count
    var wrong = 0
    while left > 0 {
        let n = min(left, q.size)
        for _ in 0..<n { q.add(addr: 0, len: 64, deviceWritable: false, cookie: fillerCookie) }
        _ = q.publish()
        device.echoAvailable()
        let got = q.harvest(max: n) { c, len in if c != fillerCookie || len != 0 { wrong += 1 } }
        guard got == n, wrong == 0 else {
            XCTFail("fast forward: harvested \(got) of \(n), \(wrong) wrong, failure \(String(describing: q.failure))",
                    file: file, line: line)
            return
        }
        left -= n
    }
}
