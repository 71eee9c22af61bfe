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
/// The cookie of the buffer a device-side buffer belongs to.
func owner(_ buffer: DeviceBuffer) -> Int { Int(buffer.segments[0].addr >> 16) }
func owner(_ chain: SplitDeviceModel.Chain) -> Int { Int(chain.segments[0].addr >> 16) }

// MARK: Both layouts

/// A ring layout as the tests drive it: the queue, the device model for it, and what the spec
/// says about the layout that the tests need to predict (reference values, written here, not
/// taken from the code under test).
protocol TestedQueue: Virtqueue, ~Copyable {
    associatedtype Device: VirtqueueDeviceModel
    /// Both layouts have it, `Virtqueue` does not: up to `max` completions to `body`.
    mutating func harvest(max: Int, _ body: (UnsafeMutableRawPointer?, UInt32) -> Void) -> Int
    /// Split: `completedCount()`, what the used index says is ready. Packed has no used index: nil.
    mutating func completedCountIfAny() -> Int?
    /// `addresses.base` (and a device's `stoppedBase`) after `buffers` buffers of `descriptors`
    /// descriptors in all since a reset.
    static func expectedBase(buffers: Int, descriptors: Int, size: Int) -> UInt32
    /// After how many ring entries an event index names the same entry again.
    static func eventPeriod(size: Int) -> Int
    /// Whether a driver that negotiated EVENT_IDX ignores the device's "no notify" flag.
    static var ignoresNoNotifyWithEventIndex: Bool { get }
    /// Whether buffers always take ring slots in ring order (else only in order).
    static var slotsAlwaysInRingOrder: Bool { get }
}

extension SplitVirtqueue: TestedQueue {
    typealias Device = SplitDeviceModel
    mutating func completedCountIfAny() -> Int? { completedCount() }
    /// The avail index (§2.7.6): one entry a buffer, free-running mod 2^16.
    static func expectedBase(buffers: Int, descriptors: Int, size: Int) -> UInt32 {
        UInt32(UInt16(truncatingIfNeeded: buffers))
    }
    /// `avail_event` is a 16-bit avail index (§2.7.10).
    static func eventPeriod(size: Int) -> Int { 65536 }
    /// §2.7.10: with VIRTIO_F_EVENT_IDX the driver reads `avail_event`, not `used->flags`.
    static var ignoresNoNotifyWithEventIndex: Bool { true }
    /// Out of order, descriptors come from a free list.
    static var slotsAlwaysInRingOrder: Bool { false }
}

extension PackedVirtqueue: TestedQueue {
    typealias Device = PackedDeviceModel
    func completedCountIfAny() -> Int? { nil }
    /// Position = descriptors mod size; the wrap counter, 1 in lap 0, flips every lap (§2.8.1),
    /// in bit 15.
    static func expectedBase(buffers: Int, descriptors: Int, size: Int) -> UInt32 {
        UInt32(descriptors % size) | ((descriptors / size) % 2 == 0 ? 1 << 15 : 0)
    }
    /// `off_wrap` names a position and a wrap counter (§2.8.14): the same every two laps.
    static func eventPeriod(size: Int) -> Int { 2 * size }
    /// §2.8.14: one flags field says enable, disable or "at the descriptor in off_wrap".
    static var ignoresNoNotifyWithEventIndex: Bool { false }
    /// §2.8.21: descriptors are made available in ring order.
    static var slotsAlwaysInRingOrder: Bool { true }
}

/// Whether the layout allows a ring of `size` (split: powers of two).
func allows<Q: TestedQueue & ~Copyable>(_: Q.Type, size: Int) -> Bool { (try? Q.ringBytes(size: size)) != nil }

/// Ring memory of one layout and the device over it, for one test case.
struct Ring<Q: TestedQueue & ~Copyable> {
    let memory: UnsafeMutableRawPointer
    let size: Int
    let device: Q.Device
    /// The driver side over the same memory (zeroes it).
    func queue(inOrder: Bool, eventIndex: Bool = false) -> Q {
        try! Q(memory: memory, size: size, inOrder: inOrder, eventIndex: eventIndex)
    }
}

extension XCTestCase {
    /// Heap ring memory of `size` for layout `Q` and a device over it, made from a queue's
    /// `addresses`. The memory is freed when the test ends, not when the last reference to the
    /// `Ring` goes (the queue and device keep raw pointers).
    func makeRing<Q: TestedQueue & ~Copyable>(_: Q.Type, size: Int, inOrder: Bool) throws -> Ring<Q> {
        precondition(Q.layout == Q.Device.layout)
        let (memory, _) = try Q.Device.allocateRing(size: size)
        addTeardownBlock { Q.Device.freeRing(memory) }
        let q = try Q(memory: memory, size: size, inOrder: inOrder, eventIndex: false)
        return Ring(memory: memory, size: size, device: Q.Device(addresses: q.addresses, inOrder: inOrder))
    }
}

/// One `harvest(max:)`, as (cookie, length) pairs.
func harvested<Q: TestedQueue & ~Copyable>(_ q: inout Q, max: Int) -> [(Int, UInt32)] {
    var out: [(Int, UInt32)] = []
    _ = q.harvest(max: max) { c, len in out.append((key(c), len)) }
    return out
}

/// Adds buffer `k` as one descriptor at `address(k)`.
func addSingle<Q: TestedQueue & ~Copyable>(_ q: inout Q, _ k: Int, len: UInt32, writable: Bool) {
    q.addBurst(count: 1, deviceWritable: writable) { _ in (addr: address(k), len: len, cookie: cookie(k)) }
}

/// Compares (cookie, length) lists, printed as "cookie:length".
func XCTAssertPairs(_ got: [(Int, UInt32)], _ expected: [(Int, UInt32)], _ message: @autoclosure () -> String = "",
                    file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(got.map { "\($0.0):\($0.1)" }, expected.map { "\($0.0):\($0.1)" }, message(), file: file, line: line)
}

/// The cookie of the filler buffers `fastForward` sends.
let fillerCookie = UnsafeMutableRawPointer(bitPattern: 0xF111_0000)!

/// Runs `count` cheap round trips (one read-only descriptor each, completed at once with length
/// 0 by the device's `echoAvailable`) so that both sides' ring positions (split: the avail and
/// used indices, the descriptor cursor and the free list; packed: positions, wrap counters and
/// buffer IDs) move by `count`. The queue must be empty and healthy.
func fastForward<Q: TestedQueue & ~Copyable>(_ q: inout Q, _ device: Q.Device, by count: Int,
                                             file: StaticString = #filePath, line: UInt = #line) {
    precondition(q.inFlight == 0 && device.pendingCount == 0)
    var left = count
    var wrong = 0
    while left > 0 {
        let n = min(left, q.size)
        q.addBurst(count: n, deviceWritable: false) { _ in (addr: 0, len: 64, cookie: fillerCookie) }
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

extension VirtqueueDeviceModel {
    /// `completeInOrder(count:lengths:)` with each length computed from its buffer. (On a
    /// concrete model the model's own `completeInOrder(count:written:)` is taken instead; both
    /// compute the same lengths.)
    func completeInOrder(count: Int, written: (DeviceBuffer) -> UInt32) {
        completeInOrder(count: count, lengths: pendingBuffers.prefix(count).map(written))
    }
}
