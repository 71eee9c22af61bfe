import VirtioCore
import VirtioTestSupport
import XCTest

/// Used-buffer notifications on demand (an idle poll loop that sleeps): `enableUsedNotifications`
/// asks the device for one (split: avail flags 0, or `used_event` = the last used index seen with
/// EVENT_IDX; packed: driver event flags ENABLE) and says whether it is safe to sleep — false when
/// used buffers already wait; `disableUsedNotifications` goes back to suppression.
final class UsedNotificationTests: XCTestCase {
    func usedEvent(_ ring: Ring<SplitVirtqueue>) throws -> UInt16 {
        let layout = try SplitRingLayout(size: ring.size)
        return ring.memory.load(fromByteOffset: layout.availOffset + 4 + 2 * ring.size, as: UInt16.self)
    }

    func testSplitWithoutEventIndexTogglesNoInterrupt() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: true)
        var q = ring.queue(inOrder: true)
        XCTAssertEqual(ring.device.availFlags, virtqAvailFlagNoInterrupt, "poll mode from the start")
        addSingle(&q, 1, len: 64, writable: true)
        addSingle(&q, 2, len: 64, writable: true)
        _ = q.publish()
        ring.device.popBuffers()
        ring.device.completeInOrder(count: 1, lengths: nil)
        XCTAssertFalse(q.enableUsedNotifications(), "a used buffer waits: do not sleep")
        XCTAssertEqual(ring.device.availFlags, 0)
        XCTAssertEqual(harvested(&q, max: 8).count, 1)
        XCTAssertTrue(q.enableUsedNotifications(), "nothing waits: sleep")
        XCTAssertEqual(ring.device.availFlags, 0, "the device may notify")
        q.disableUsedNotifications()
        XCTAssertEqual(ring.device.availFlags, virtqAvailFlagNoInterrupt)
        ring.device.completeInOrder(count: 1, lengths: nil)
        XCTAssertFalse(q.enableUsedNotifications())
        XCTAssertEqual(harvested(&q, max: 8).count, 1)
        XCTAssertEqual(ring.device.violations, [])
    }

    func testSplitWithEventIndexSetsUsedEvent() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: true)
        var q = ring.queue(inOrder: true, eventIndex: true)
        for k in 1...3 { addSingle(&q, k, len: 64, writable: true) }
        _ = q.publish()
        ring.device.popBuffers()
        ring.device.completeInOrder(count: 2, lengths: nil)
        XCTAssertEqual(harvested(&q, max: 8).count, 2)
        XCTAssertTrue(q.enableUsedNotifications())
        XCTAssertEqual(try usedEvent(ring), 2, "notify once the used index passes 2")
        q.disableUsedNotifications()
        XCTAssertEqual(try usedEvent(ring), 1, "behind the used index: no notification for 2^16 buffers")
        ring.device.completeInOrder(count: 1, lengths: nil)
        XCTAssertFalse(q.enableUsedNotifications(), "the third buffer is used")
        XCTAssertEqual(harvested(&q, max: 8).count, 1)
        XCTAssertTrue(q.enableUsedNotifications())
        XCTAssertEqual(try usedEvent(ring), 3)
    }

    func testPackedTogglesDriverEventFlags() throws {
        let ring = try makeRing(PackedVirtqueue.self, size: 8, inOrder: true)
        var q = ring.queue(inOrder: true)
        XCTAssertTrue(ring.device.driverSuppressesUsedNotifications)
        XCTAssertTrue(q.enableUsedNotifications(), "nothing posted: sleep")
        XCTAssertEqual(ring.device.driverEventFlags, PackedEventFlags.enable)
        q.disableUsedNotifications()
        XCTAssertTrue(ring.device.driverSuppressesUsedNotifications)
        addSingle(&q, 1, len: 64, writable: true)
        addSingle(&q, 2, len: 64, writable: true)
        _ = q.publish()
        ring.device.popBuffers()
        XCTAssertTrue(q.enableUsedNotifications(), "posted, not used yet: sleep")
        ring.device.completeInOrder(count: 1, lengths: nil)
        XCTAssertFalse(q.enableUsedNotifications(), "a used buffer waits")
        XCTAssertEqual(harvested(&q, max: 8).count, 1)
        XCTAssertTrue(q.enableUsedNotifications())
        q.disableUsedNotifications()
        XCTAssertEqual(ring.device.driverEventFlags, PackedEventFlags.disable)
        XCTAssertEqual(ring.device.violations, [])
    }
}
