import VirtioCore
import VirtioTestSupport
import XCTest

/// Available-buffer notification suppression (split §2.7.10, packed §2.8.14 and §2.8.21.3):
/// `publish()` says whether to kick. The shared topics run on both layouts; the packed
/// `off_wrap` cases and the pure `virtqNeedEvent` helper have their own tests.
final class NotificationTests: XCTestCase {
    /// Reference for `vring_need_event`, written independently: with EVENT_IDX the device wants a
    /// kick once the avail index moves past `event`, i.e. when `event` is in [old, new) mod 2^16.
    func wantsKick(event: UInt16, new: UInt16, old: UInt16) -> Bool {
        event &- old < new &- old
    }

    /// The same for both layouts, counting ring entries from the start of the ring: the device
    /// asked for entry `event`, which names the same entry every `period` entries (split: avail
    /// entries mod 2^16; packed: descriptor positions, two laps). A kick is due when one of those
    /// entries is in [old, new); at most one ring's worth lies between them.
    func wantsKick(entry event: Int, old: Int, new: Int, period: Int) -> Bool {
        precondition(new - old <= period)
        return ((event - old) % period + period) % period < new - old
    }

    func add<Q: TestedQueue & ~Copyable>(_ q: inout Q, _ n: Int) {
        q.addBurst(count: n, deviceWritable: false) { _ in (addr: 0x1000, len: 64, cookie: fillerCookie) }
    }

    // MARK: Both layouts

    func publishFalseWhenNothingWasAdded<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for eventIndex in [false, true] {
            let ring = try makeRing(Q.self, size: 8, inOrder: false)
            var q = ring.queue(inOrder: false, eventIndex: eventIndex)
            XCTAssertFalse(q.publish(), "fresh queue; eventIndex \(eventIndex)")
            addSingle(&q, 1, len: 1, writable: true)
            XCTAssertTrue(q.publish(), "nothing suppressed yet; eventIndex \(eventIndex)")
            XCTAssertFalse(q.publish(), "nothing since the last publish; eventIndex \(eventIndex)")
            ring.device.popBuffers()
            ring.device.completeInOrder(count: 1, lengths: nil)
            XCTAssertEqual(harvested(&q, max: 8).count, 1)
            XCTAssertFalse(q.publish(), "harvesting adds nothing; eventIndex \(eventIndex)")
        }
    }

    func testPublishFalseWhenNothingWasAddedSplit() throws { try publishFalseWhenNothingWasAdded(SplitVirtqueue.self) }
    func testPublishFalseWhenNothingWasAddedPacked() throws { try publishFalseWhenNothingWasAdded(PackedVirtqueue.self) }

    /// Without EVENT_IDX: the device's "no notify" switch decides (split VRING_USED_F_NO_NOTIFY,
    /// packed DISABLE/ENABLE), and an event index request is ignored. Packed: DISABLE holds with
    /// EVENT_IDX too; split: with EVENT_IDX the flag is not what the driver reads (see
    /// `publishFollowsEventIndex`).
    func publishFollowsNoNotify<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for inOrder in [false, true] {
            let ring = try makeRing(Q.self, size: 8, inOrder: inOrder)
            let device = ring.device
            var q = ring.queue(inOrder: inOrder)
            // Poll mode: the driver asks for no used-buffer notifications.
            XCTAssertTrue(device.driverSuppressesUsedNotifications)

            XCTAssertFalse(q.publish(), "nothing new")
            add(&q, 1)
            XCTAssertTrue(q.publish(), "notifications on: kick")
            XCTAssertEqual(device.availableCount, 1)
            XCTAssertFalse(q.publish(), "nothing new since the last publish")

            device.setNoNotify(true)
            add(&q, 2)
            XCTAssertFalse(q.publish(), "no notify: no kick")
            XCTAssertEqual(device.availableCount, 3, "published anyway")
            XCTAssertFalse(q.publish())

            device.setNoNotify(false)
            add(&q, 3)
            XCTAssertTrue(q.publish())
            XCTAssertEqual(device.availableCount, 6)
            // The driver ignores an event index unless EVENT_IDX was negotiated (packed: flags
            // DESC, off_wrap 100 mod 8 / wrap 1, then 3 / wrap 0).
            for entry in [100, 11] {
                device.setEventIndex(entry)
                add(&q, 1)
                XCTAssertTrue(q.publish(), "event index \(entry) without EVENT_IDX")
            }
            XCTAssertEqual(device.availableCount, 8)
            XCTAssertEqual(device.violations, [])
        }

        // On and off, one buffer each, across the end of a small ring.
        for eventIndex in Q.ignoresNoNotifyWithEventIndex ? [false] : [false, true] {
            let ring = try makeRing(Q.self, size: 4, inOrder: true)
            let device = ring.device
            var q = ring.queue(inOrder: true, eventIndex: eventIndex)
            var k = 0
            func post(_ q: inout Q, kick: Bool, _ message: String) {
                k += 1
                addSingle(&q, k, len: 1, writable: false)
                XCTAssertEqual(q.publish(), kick, message)
                device.popBuffers()
                device.completeInOrder(count: 1, lengths: nil)
                XCTAssertEqual(harvested(&q, max: 1).count, 1, message)
            }
            for round in 0..<6 {
                device.setNoNotify(true)
                post(&q, kick: false, "no notify, round \(round), eventIndex \(eventIndex)")
                device.setNoNotify(false)
                post(&q, kick: true, "notify, round \(round), eventIndex \(eventIndex)")
            }
            XCTAssertEqual(device.violations, [])
        }
    }

    func testPublishFollowsNoNotifySplit() throws { try publishFollowsNoNotify(SplitVirtqueue.self) }
    func testPublishFollowsNoNotifyPacked() throws { try publishFollowsNoNotify(PackedVirtqueue.self) }

    /// With EVENT_IDX the device names the entry it wants a kick for.
    func publishFollowsEventIndex<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for inOrder in [false, true] {
            let ring = try makeRing(Q.self, size: 16, inOrder: inOrder)
            let device = ring.device
            var q = ring.queue(inOrder: inOrder, eventIndex: true)
            XCTAssertFalse(q.publish(), "nothing new")
            add(&q, 1)
            XCTAssertTrue(q.publish(), "split avail_event 0, packed notifications on; index 0 → 1")
            device.setEventIndex(2)
            add(&q, 1)
            XCTAssertFalse(q.publish(), "index 1 → 2 does not pass 2")
            add(&q, 1)
            XCTAssertTrue(q.publish(), "index 2 → 3 passes 2")
            device.setEventIndex(3)
            XCTAssertFalse(q.publish(), "nothing new")
            // Split, with EVENT_IDX: VRING_USED_F_NO_NOTIFY is not what the driver reads.
            if Q.ignoresNoNotifyWithEventIndex { device.setNoNotify(true) }
            add(&q, 1)
            XCTAssertTrue(q.publish(), "index 3 → 4 passes 3")
            if Q.ignoresNoNotifyWithEventIndex { device.setNoNotify(false) }
            add(&q, 1)
            XCTAssertFalse(q.publish(), "index 4 → 5: event 3 already passed")
            device.setEventIndex(6)
            add(&q, 3)
            XCTAssertTrue(q.publish(), "index 5 → 8 passes 6 inside the batch")
            device.setEventIndex(7)
            add(&q, 2)
            XCTAssertFalse(q.publish(), "index 8 → 10: 7 is behind")
            XCTAssertEqual(device.availableCount, 10)
        }
    }

    func testPublishFollowsEventIndexSplit() throws { try publishFollowsEventIndex(SplitVirtqueue.self) }
    func testPublishFollowsEventIndexPacked() throws { try publishFollowsEventIndex(PackedVirtqueue.self) }

    enum Events {
        /// A few entries either side of the batch.
        case near
        /// Anywhere in the two laps the batch starts in (packed: every `off_wrap` there is).
        case twoLaps
    }

    /// Seeded random batches of 1...size entries on one queue after `start` round trips, each
    /// with an event index drawn as `events` says: `publish()` must agree with the reference
    /// every time.
    func eventIndexRun<Q: TestedQueue & ~Copyable>(_: Q.Type, size: Int, inOrder: Bool, seed: UInt64, start: Int,
                                                   steps: Int, events: Events) throws {
        let what = "\(Q.layoutName) size \(size) start \(start) \(events)"
        let ring = try makeRing(Q.self, size: size, inOrder: inOrder)
        let device = ring.device
        var q = ring.queue(inOrder: inOrder, eventIndex: true)
        var rng = SplitMix64(seed: seed)
        fastForward(&q, device, by: start)
        let period = Q.eventPeriod(size: size)
        var old = start
        var mismatches: [String] = []
        var kicks = 0
        for step in 0..<steps {
            let n = rng.int(1...size)
            let event: Int
            switch events {
            case .near:
                event = old + rng.int(-3...n + 3)
                // Ignored with EVENT_IDX where the flag is separate (split); packed's is the same field.
                if Q.ignoresNoNotifyWithEventIndex { device.setNoNotify(rng.chance(50)) }
            case .twoLaps:
                let off = rng.int(0...size - 1), wrap = rng.chance(50)
                event = old - old % (2 * size) + (wrap ? 0 : size) + off
            }
            device.setEventIndex(event)
            add(&q, n)
            let new = old + n
            let got = q.publish(), want = wantsKick(entry: event, old: old, new: new, period: period)
            if got != want {
                mismatches.append("step \(step): \(old) → \(new), event \(event): publish \(got), expected \(want)")
            }
            if want { kicks += 1 }
            guard device.availableCount == n, device.echoAvailable() == n, q.harvest(max: size, { _, _ in }) == n else {
                XCTFail("\(what) step \(step): \(n) buffers did not make the round trip; failure \(String(describing: q.failure))")
                return
            }
            old = new
        }
        XCTAssertGreaterThan(kicks, 0, what)
        XCTAssert(mismatches.isEmpty, "\(what): \(mismatches.count) of \(steps) publishes differ; first: "
                  + mismatches.prefix(4).joined(separator: "; "))
        if start > 0 { XCTAssertGreaterThan(old, 65536, "\(what): crossed the UInt16 wrap") }
        XCTAssertEqual(device.violations, [], what)
    }

    func eventIndexMatchesReference<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        // Across the UInt16 wrap, events around the batch.
        for size in [1, 8, 256] where allows(Q.self, size: size) {
            try eventIndexRun(Q.self, size: size, inOrder: false, seed: UInt64(size), start: 65536 - 3 * size - 20,
                              steps: 200, events: .near)
        }
        // From the start of the ring, events anywhere in the current two laps.
        for size in [1, 3, 8, 256] where allows(Q.self, size: size) {
            try eventIndexRun(Q.self, size: size, inOrder: size % 2 == 0, seed: UInt64(size) &* 101, start: 0,
                              steps: size == 256 ? 300 : 1500, events: .twoLaps)
        }
    }

    func testEventIndexMatchesReferenceSplit() throws { try eventIndexMatchesReference(SplitVirtqueue.self) }
    func testEventIndexMatchesReferencePacked() throws { try eventIndexMatchesReference(PackedVirtqueue.self) }

    // MARK: The helper

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

    // MARK: Packed only: off_wrap

    /// Reference for RING_EVENT_FLAGS_DESC: the device wants a notification when the driver makes
    /// available the descriptor at offset `off` in a lap whose driver wrap counter is `wrap`
    /// (lap L has wrap counter 1 when L is even, §2.8.1). Positions are counted from the ring's
    /// start (`oldAbs` = descriptors made available before the previous publish, `newAbs` = now);
    /// at most one ring's worth between them, so at most two laps are touched.
    static func referenceKick(size: Int, oldAbs: Int, newAbs: Int, offWrap: UInt16) -> Bool {
        precondition(newAbs - oldAbs <= size)
        guard newAbs > oldAbs else { return false }
        let off = Int(offWrap & 0x7fff), wrap = offWrap >> 15 != 0
        for lap in Set([oldAbs / size, (newAbs - 1) / size]) where (lap % 2 == 0) == wrap {
            let event = lap * size + off
            if oldAbs <= event && event < newAbs { return true }
        }
        return false
    }

    /// A fresh packed queue of `size` with event index, `start` descriptors made available (and
    /// used) and published, then `added` more; the device asks for (off, wrap). What `publish` says.
    func eventIndexPublish(size: Int, start: Int, added: Int, off: UInt16, wrap: Bool) throws -> Bool {
        let ring = try makeRing(PackedVirtqueue.self, size: size, inOrder: false)
        var q = ring.queue(inOrder: false, eventIndex: true)
        fastForward(&q, ring.device, by: start)
        for k in 1...added { addSingle(&q, k, len: 1, writable: false) }
        ring.device.setDeviceEvent(flags: PackedEventFlags.desc, offWrap: PackedDeviceModel.offWrap(position: off, wrap: wrap))
        return q.publish()
    }

    /// A few hand-checked cases on a ring of 8: within a lap, landing on the end of the ring, and
    /// across the wrap (lap 0 → 1 and lap 1 → 2). An event in the *new* lap, at or after its
    /// start and before the new position (start 6 +4 → event 0 or 1 with wrap 0), must notify:
    /// the driver made that descriptor available in this publish. Both references agree.
    func testPackedEventIndexCases() throws {
        // (start, added, off, wrap, expected)
        let cases: [(Int, Int, UInt16, Bool, Bool)] = [
            // Lap 0 (wrap 1), positions 0, 1, 2.
            (0, 3, 0, true, true), (0, 3, 2, true, true), (0, 3, 3, true, false), (0, 3, 2, false, false),
            // Lap 1 (wrap 0), positions 2, 3.
            (10, 2, 3, false, true), (10, 2, 3, true, false), (10, 2, 1, false, false),
            // Up to the end of the ring: positions 5, 6, 7 (wrap 1); the next is 0 with wrap 0.
            (5, 3, 7, true, true), (5, 3, 0, false, false), (5, 3, 4, true, false),
            // Across the wrap: 6, 7 (wrap 1), then 0, 1 (wrap 0).
            (6, 4, 7, true, true), (6, 4, 6, true, true), (6, 4, 5, true, false),
            (6, 4, 0, false, true), (6, 4, 1, false, true), (6, 4, 2, false, false),
            // Across the next wrap: 6, 7 (wrap 0), then 0, 1 (wrap 1).
            (14, 4, 7, false, true), (14, 4, 0, true, true), (14, 4, 1, true, true), (14, 4, 2, true, false),
        ]
        for (start, added, off, wrap, expected) in cases {
            let what = "start \(start) +\(added), event \(off)/wrap \(wrap ? 1 : 0)"
            let offWrap = PackedDeviceModel.offWrap(position: off, wrap: wrap)
            XCTAssertEqual(Self.referenceKick(size: 8, oldAbs: start, newAbs: start + added, offWrap: offWrap), expected,
                           "reference: \(what)")
            XCTAssertEqual(wantsKick(entry: (wrap ? 0 : 8) + Int(off), old: start, new: start + added,
                                     period: PackedVirtqueue.eventPeriod(size: 8)), expected, "entry reference: \(what)")
            XCTAssertEqual(try eventIndexPublish(size: 8, start: start, added: added, off: off, wrap: wrap), expected,
                           "publish: \(what)")
        }
    }
}
