import VirtioCore
import VirtioTestSupport
import XCTest

/// Stop and restart of a queue, as a vhost-user port does it: the device stops (GET_VRING_BASE
/// reports where), the driver reclaims what is in flight, and both sides continue from the
/// reported position — for packed rings that includes the wrap counter — through many more laps.
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

    func testPackedRestartKeepsWrapCounters() throws {
        for inOrder in [true, false] {
            for start in [0, 5, 8, 13, 21] {
                let what = "packed \(inOrder ? "in order" : "out of order") start \(start)"
                let (memory, layout) = try PackedDeviceModel.allocateRing(size: 8)
                defer { PackedDeviceModel.freeRing(memory) }
                let device = PackedDeviceModel(memory: memory, layout: layout)
                var q = PackedVirtqueue(memory: memory, layout: layout, inOrder: inOrder)
                let reclaimed = exercise(&q, start: start, pop: { device.popAvailable().count },
                                         complete: { device.completeInOrder(count: $0) },
                                         stoppedBase: { device.stoppedBase }, resetDevice: { device.reset(toBase: $0) }, what)
                XCTAssertEqual(reclaimed, 3, what)
                XCTAssertEqual(device.violations, [], what)
            }
        }
    }

    func testPackedBaseCarriesWrapCounter() throws {
        let (memory, layout) = try PackedDeviceModel.allocateRing(size: 8)
        defer { PackedDeviceModel.freeRing(memory) }
        let device = PackedDeviceModel(memory: memory, layout: layout)
        var q = PackedVirtqueue(memory: memory, layout: layout, inOrder: true)
        roundTrips(&q, pop: { device.popAvailable().count }, complete: { device.completeInOrder(count: $0) }, 13, "13")
        // 13 = one lap (wrap flips to 0) + 5.
        XCTAssertEqual(device.stoppedBase, 5)
        XCTAssertEqual(q.addresses.base, 5)
        _ = q.reclaimAll { _ in }
        q.restart(at: 5)
        device.reset(toBase: 5)
        roundTrips(&q, pop: { device.popAvailable().count }, complete: { device.completeInOrder(count: $0) }, 3, "3 more")
        XCTAssertEqual(q.addresses.base, 1 << 15, "position 0 of the next lap: wrap back to 1")
        XCTAssertEqual(device.violations, [])
    }

    func testSplitRestartContinuesIndexes() throws {
        for inOrder in [true, false] {
            for start in [0, 5, 8, 13, 65_533] {
                let what = "split \(inOrder ? "in order" : "out of order") start \(start)"
                let (memory, layout) = try SplitDeviceModel.allocateRing(size: 8)
                defer { SplitDeviceModel.freeRing(memory) }
                let device = SplitDeviceModel(memory: memory, layout: layout, inOrder: inOrder)
                var q = SplitVirtqueue(memory: memory, layout: layout, inOrder: inOrder)
                let reclaimed = exercise(&q, start: start, pop: { device.popAvailable().count },
                                         complete: { device.completeInOrder(count: $0) },
                                         stoppedBase: { device.stoppedBase }, resetDevice: { device.reset(toBase: $0) }, what)
                XCTAssertEqual(reclaimed, 3, what)
                XCTAssertEqual(device.violations, [], what)
            }
        }
    }
}
