import VirtioCore
import VirtioTestSupport
import XCTest

/// Stop and restart of a queue, as a vhost-user port does it: the device stops (GET_VRING_BASE
/// reports where), the driver reclaims what is in flight, and both sides continue from the
/// reported position — for packed rings that includes the wrap counter — through many more laps.
/// Every topic runs on both layouts.
final class RestartTests: XCTestCase {
    static let cookie = UnsafeMutableRawPointer(bitPattern: 0xC000)!

    /// Moves `count` one-descriptor buffers through the queue and the device, a ring at a time.
    func roundTrips<Q: Virtqueue & ~Copyable>(_ q: inout Q, pop: () -> Int, complete: (Int) -> Void, _ count: Int,
                                              _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        var left = count
        let cookies = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: q.size)
        let lengths = UnsafeMutablePointer<UInt32>.allocate(capacity: q.size)
        defer { cookies.deallocate(); lengths.deallocate() }
        while left > 0 {
            let n = min(left, q.size)
            q.addBurst(count: n, deviceWritable: true) { _ in (addr: 0x1000, len: 64, cookie: Self.cookie) }
            _ = q.publish()
            XCTAssertEqual(pop(), n, what, file: file, line: line)
            complete(n)
            XCTAssertEqual(q.harvest(into: cookies, lengths: lengths, max: q.size), n, "\(what): \(String(describing: q.failure))",
                           file: file, line: line)
            left -= n
        }
    }

    /// Runs `start` round trips, leaves buffers in three states (harvested, popped and not
    /// completed, never popped), stops, reclaims, restarts at the device's base, runs three laps
    /// more; returns the cookies reclaimed.
    func exercise<Q: Virtqueue & ~Copyable>(_ q: inout Q, start: Int, pop: () -> Int, complete: (Int) -> Void,
                                            stoppedBase: () -> UInt32, resetDevice: (UInt32) -> Void, _ what: String) -> Int {
        roundTrips(&q, pop: pop, complete: complete, start, what)
        q.addBurst(count: 3, deviceWritable: true) { _ in (addr: 0x2000, len: 64, cookie: Self.cookie) }
        _ = q.publish()
        XCTAssertEqual(pop(), 3, what)
        complete(1)
        var c: UnsafeMutableRawPointer?, l: UInt32 = 0
        XCTAssertEqual(q.harvest(into: &c, lengths: &l, max: 1), 1, what)
        q.addBurst(count: 1, deviceWritable: true) { _ in (addr: 0x3000, len: 64, cookie: Self.cookie) }  // never popped
        let base = stoppedBase()
        let reclaimed = q.reclaimAll { _ in }
        q.restart(at: base)
        resetDevice(base)
        XCTAssertEqual(q.addresses.base, base, "the driver continues where the device stopped; \(what)")
        roundTrips(&q, pop: pop, complete: complete, 3 * q.size + 5, what)
        XCTAssertEqual(q.addresses.base, stoppedBase(), "driver and device agree after three more laps; \(what)")
        XCTAssertNil(q.failure, what)
        return reclaimed
    }

    /// Both layouts from the same starts: within the first lap, at its end, a lap and more
    /// later, and next to the UInt16 wrap of the split indexes.
    func restartContinues<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for inOrder in [true, false] {
            for start in [0, 5, 8, 13, 21, 65_533] {
                let what = "\(Q.layoutName) \(inOrder ? "in order" : "out of order") start \(start)"
                let ring = try makeRing(Q.self, size: 8, inOrder: inOrder)
                let device = ring.device
                var q = ring.queue(inOrder: inOrder)
                let reclaimed = exercise(&q, start: start, pop: { device.popBuffers().count },
                                         complete: { device.completeInOrder(count: $0, lengths: nil) },
                                         stoppedBase: { device.stoppedBase }, resetDevice: { device.reset(toBase: $0) }, what)
                XCTAssertEqual(reclaimed, 3, what)
                XCTAssertEqual(device.violations, [], what)
            }
        }
    }

    /// After 13 round trips the base is `at13`; restarted there, three more reach `at16`.
    func baseCarriesPosition<Q: TestedQueue & ~Copyable>(_: Q.Type, at13: UInt32, at16: UInt32) throws {
        let ring = try makeRing(Q.self, size: 8, inOrder: true)
        let device = ring.device
        var q = ring.queue(inOrder: true)
        let pop = { device.popBuffers().count }, complete = { device.completeInOrder(count: $0, lengths: nil) }
        roundTrips(&q, pop: pop, complete: complete, 13, "13")
        XCTAssertEqual(device.stoppedBase, at13)
        XCTAssertEqual(q.addresses.base, at13)
        _ = q.reclaimAll { _ in }
        q.restart(at: at13)
        device.reset(toBase: at13)
        roundTrips(&q, pop: pop, complete: complete, 3, "3 more")
        XCTAssertEqual(q.addresses.base, at16)
        XCTAssertEqual(device.stoppedBase, at16)
        XCTAssertEqual(device.violations, [])
    }

    func testRestartContinuesSplit() throws { try restartContinues(SplitVirtqueue.self) }
    func testRestartContinuesPacked() throws { try restartContinues(PackedVirtqueue.self) }
    /// Split: the avail index, 13 and then 16.
    func testBaseCarriesAvailIndexSplit() throws { try baseCarriesPosition(SplitVirtqueue.self, at13: 13, at16: 16) }
    /// Packed: 13 = one lap (wrap flips to 0) + 5; three more reach position 0 of the next lap,
    /// wrap back to 1.
    func testBaseCarriesWrapCounterPacked() throws { try baseCarriesPosition(PackedVirtqueue.self, at13: 5, at16: 1 << 15) }
}
