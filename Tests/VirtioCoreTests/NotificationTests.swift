import VirtioCore
import VirtioTestSupport
import XCTest

/// Available-buffer notification suppression (§2.7.10): `publish()` says whether to kick.
final class NotificationTests: XCTestCase {
    /// Reference for `vring_need_event`, written independently: with EVENT_IDX the device wants a
    /// kick once the avail index moves past `event`, i.e. when `event` is in [old, new) mod 2^16.
    func wantsKick(event: UInt16, new: UInt16, old: UInt16) -> Bool {
        event &- old < new &- old
    }

    func add(_ q: inout SplitVirtqueue, _ n: Int) {
        for _ in 0..<n { q.add(addr: 0x1000, len: 64, deviceWritable: false, cookie: fillerCookie) }
    }

    func testPublishFollowsUsedFlagsWithoutEventIndex() throws {
        for inOrder in [false, true] {
            let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: inOrder)
            let device = ring.device
            var q = ring.queue(inOrder: inOrder)
            // Poll mode: the driver asks for no used-buffer notifications (§2.7.7).
            XCTAssertEqual(device.availFlags, virtqAvailFlagNoInterrupt)

            XCTAssertFalse(q.publish(), "nothing new")
            add(&q, 1)
            XCTAssertTrue(q.publish(), "flags 0: kick")
            XCTAssertEqual(device.availIdx, 1)
            XCTAssertFalse(q.publish(), "nothing new since the last publish")

            device.setNoNotify(true)
            add(&q, 2)
            XCTAssertFalse(q.publish(), "VRING_USED_F_NO_NOTIFY: no kick")
            XCTAssertEqual(device.availIdx, 3, "published anyway")
            XCTAssertFalse(q.publish())

            device.setNoNotify(false)
            add(&q, 3)
            XCTAssertTrue(q.publish())
            XCTAssertEqual(device.availIdx, 6)
            // The device ignores avail_event unless EVENT_IDX was negotiated.
            device.setAvailEvent(100)
            add(&q, 1)
            XCTAssertTrue(q.publish())
            XCTAssertEqual(device.violations, [])
        }
    }

    func testPublishFollowsAvailEventWithEventIndex() throws {
        for inOrder in [false, true] {
            let ring = try makeRing(SplitVirtqueue.self, size: 16, inOrder: inOrder)
            let device = ring.device
            var q = ring.queue(inOrder: inOrder, eventIndex: true)
            XCTAssertFalse(q.publish(), "nothing new")
            add(&q, 1)
            XCTAssertTrue(q.publish(), "avail_event 0, index 0 → 1")
            device.setAvailEvent(2)
            add(&q, 1)
            XCTAssertFalse(q.publish(), "index 1 → 2 does not pass 2")
            add(&q, 1)
            XCTAssertTrue(q.publish(), "index 2 → 3 passes 2")
            device.setAvailEvent(3)
            XCTAssertFalse(q.publish(), "nothing new")
            // With EVENT_IDX, VRING_USED_F_NO_NOTIFY is not what the driver reads.
            device.setNoNotify(true)
            add(&q, 1)
            XCTAssertTrue(q.publish(), "index 3 → 4 passes 3")
            device.setNoNotify(false)
            add(&q, 1)
            XCTAssertFalse(q.publish(), "index 4 → 5: event 3 already passed")
            device.setAvailEvent(6)
            add(&q, 3)
            XCTAssertTrue(q.publish(), "index 5 → 8 passes 6 inside the batch")
            device.setAvailEvent(7)
            add(&q, 2)
            XCTAssertFalse(q.publish(), "index 8 → 10: 7 is behind")
            XCTAssertEqual(device.availIdx, 10)
        }
    }

    /// Random batches and avail_event values around the current index, across the UInt16 wrap:
    /// `publish()` must agree with the reference every time.
    func testEventIndexAcrossWrapMatchesReference() throws {
        for size in [1, 8, 256] {
            let ring = try makeRing(SplitVirtqueue.self, size: size, inOrder: false)
            let device = ring.device
            var q = ring.queue(inOrder: false, eventIndex: true)
            var rng = SplitMix64(seed: UInt64(size))
            let start = 65536 - 3 * size - 20
            fastForward(&q, device, by: start)
            var old = device.availIdx
            var published = 0
            for round in 0..<200 {
                let n = rng.int(1...size)
                let event = old &+ UInt16(truncatingIfNeeded: rng.int(-3...n + 3))
                device.setAvailEvent(event)
                device.setNoNotify(rng.chance(50))
                add(&q, n)
                let new = old &+ UInt16(n)
                XCTAssertEqual(q.publish(), wantsKick(event: event, new: new, old: old),
                               "size \(size) round \(round): old \(old) new \(new) event \(event)")
                XCTAssertEqual(device.availIdx, new)
                XCTAssertEqual(device.echoAvailable(), n)
                XCTAssertEqual(q.harvest(max: size) { _, _ in }, n)
                old = new
                published += n
            }
            XCTAssertGreaterThan(start + published, 65536, "crossed the wrap")
        }
    }

    /// The exported helper against the reference, exhaustively near the wrap.
    func testNeedEventHelperMatchesReference() {
        for old: UInt16 in [0, 1, 100, 65530, 65535] {
            for d in 0...10 {
                let new = old &+ UInt16(d)
                for e in -12...12 {
                    let event = old &+ UInt16(bitPattern: Int16(e))
                    XCTAssertEqual(virtqNeedEvent(event: event, new: new, old: old),
                                   wantsKick(event: event, new: new, old: old), "old \(old) new \(new) event \(event)")
                }
            }
        }
    }
}
