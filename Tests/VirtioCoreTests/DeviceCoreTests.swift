import VirtioCore
import VirtioTestSupport
import XCTest

/// The device core on its own (no DPDK: heap memory, the fake transport): feature negotiation,
/// the §3.1.1 sequence, queues handed out once over one ring type, stop and restart, and the
/// one link every queue sees.
final class DeviceCoreTests: XCTestCase {
    func testNegotiationTakesTheOfferedPartOfWhatIsWanted() throws {
        let offered: VirtioFeatures = [.version1, .inOrder, .ringPacked, .eventIndex, .indirectDescriptors]
        let packed = try VirtioNegotiation(offered: offered, required: [.version1], wanted: [.inOrder, .accessPlatform], ring: .auto, device: "test")
        XCTAssertEqual(packed.layout, .packed)
        XCTAssertEqual(packed.chosen, [.version1, .inOrder, .ringPacked], "wanted ∩ offered, plus the layout bit")
        let split = try VirtioNegotiation(offered: offered, required: [.version1], wanted: [.ringPacked, .eventIndex], ring: .split, device: "test")
        XCTAssertEqual(split.chosen, [.version1, .eventIndex], "a split ring never negotiates RING_PACKED")
        XCTAssertThrowsError(try VirtioNegotiation(offered: [.inOrder], required: [.version1], wanted: [], ring: .auto, device: "test")) { e in
            XCTAssertEqual(e as? VirtioDeviceError, .missingFeatures(device: "test", .version1))
            XCTAssertEqual("\(e)", "the test device lacks required features: VERSION_1")
        }
        XCTAssertThrowsError(try VirtioNegotiation(offered: [.version1], required: [], wanted: [], ring: .packed, device: "test")) { e in
            XCTAssertEqual(e as? VirtioDeviceError, .layoutNotOffered(device: "test", .packed))
        }
        XCTAssertEqual(RingLayoutChoice.auto.resolve(offeredByAll: [[.ringPacked], [.ringPacked]]), .packed)
        XCTAssertEqual(RingLayoutChoice.auto.resolve(offeredByAll: [[.ringPacked], []]), .split, "auto: packed only if every device offers it")
        XCTAssertNil(RingLayoutChoice.packed.resolve(offeredByAll: [[.ringPacked], []]))
    }

    func core<Ring: Virtqueue & ~Copyable>(_: Ring.Type, _ t: FakeTransport) throws -> VirtioDevice<Ring> {
        let n = try VirtioNegotiation(offered: t.offered, required: [.version1], wanted: [.inOrder], ring: Ring.layout, device: "test")
        return try VirtioDevice<Ring>(transport: t, negotiation: n, queues: [VirtqueueSpec(index: 0, size: 8), VirtqueueSpec(index: 2, size: 16)],
                                      memory: HeapDMAAllocator())
    }

    /// Start: memory table, every queue at its reset position, DRIVER_OK, link up. Stop: once at
    /// the transport however often asked, link down with the first reason.
    func lifecycle<Ring: Virtqueue & ~Copyable>(_ r: Ring.Type) throws {
        let t = FakeTransport(offered: VirtioFeatures([.version1, .inOrder]).union(Ring.layoutFeatures))
        let d = try core(r, t)
        XCTAssertEqual(t.negotiatedQueueCount, 3, "queues 0 and 2: the transport provides for index 2")
        XCTAssertFalse(d.link.isUp, "down until started")
        try d.start()
        XCTAssertEqual(t.memoryTables, 1)
        XCTAssertEqual(t.setups.map(\.index), [0, 2])
        XCTAssertEqual(t.setups.map(\.addresses.size), [8, 16])
        XCTAssertEqual(t.setups.map(\.addresses.base), [Ring.resetBase, Ring.resetBase])
        XCTAssertTrue(d.link.isUp)
        XCTAssertNil(d.link.reason)
        var q = d.makeQueue(1)
        XCTAssertEqual(q.size, 16)
        XCTAssertEqual(q.addresses.desc, t.latest(2)?.desc, "the queue handed out lies on the ring the device was given")
        XCTAssertTrue(q.inOrder)
        XCTAssertTrue(d.isTaken(1))
        XCTAssertFalse(d.isTaken(0))
        _ = q.reclaimAll { _ in }
        d.stop(reason: "first")
        d.stop(reason: "second")
        XCTAssertEqual(t.stops, 1, "the transport is stopped once")
        XCTAssertFalse(d.link.isUp)
        XCTAssertEqual(d.link.reason, "first")
    }

    func testLifecycleSplit() throws { try lifecycle(SplitVirtqueue.self) }
    func testLifecyclePacked() throws { try lifecycle(PackedVirtqueue.self) }

    /// A transport that reports its loss (vhost-user's monitor) takes the link down at once; one
    /// that only answers when asked (virtio-pci) does so at the next `isLinkUp`.
    func testTransportLossReachesTheLink() throws {
        let t = FakeTransport(offered: [.version1])
        let d = try core(SplitVirtqueue.self, t)
        try d.start()
        t.disconnect("gone", notifyLink: false)
        XCTAssertTrue(d.link.isUp, "nobody asked yet")
        XCTAssertFalse(d.isLinkUp)
        XCTAssertEqual(d.link.reason, "gone")
        let t2 = FakeTransport(offered: [.version1])
        let d2 = try core(SplitVirtqueue.self, t2)
        try d2.start()
        t2.disconnect("hung up")
        XCTAssertFalse(d2.link.isUp, "the monitor marked it down")
        XCTAssertEqual(d2.link.reason, "hung up")
    }

    /// A restart continues every queue from the base the transport reports, or from the reset
    /// position when it reports none (a device reset); a missing base is an error.
    func testRestartBases() throws {
        let t = FakeTransport(offered: [.version1])
        let d = try core(SplitVirtqueue.self, t)
        try d.start()
        t.basesAtStop = { [5, 0, 9] }
        XCTAssertEqual(try d.beginRestart(), [0: 5, 2: 9])
        XCTAssertTrue(d.link.isUp, "a restart is no link loss")
        t.basesAtStop = nil
        XCTAssertEqual(try d.beginRestart(), [0: 0, 2: 0])
        t.basesAtStop = { [5] }
        XCTAssertThrowsError(try d.beginRestart()) { e in
            XCTAssertEqual(e as? VirtioDeviceError, .restartUnsupported("no ring base reported for queue 2"))
        }
    }

    // MARK: Reconnect

    func waitUntil(_ what: String, timeout: Double = 5, _ cond: () -> Bool) {
        let end = Date().addingTimeInterval(timeout)
        while !cond() {
            if Date() > end { XCTFail("timed out waiting for \(what)"); return }
            usleep(1000)
        }
    }

    /// A lost device with a reconnect policy: the device core waits for the queue owner to reset
    /// its ring (`ringsReset`), not before, then gives the device the memory table and every ring
    /// from its reset position again, starts it and takes the link up in a new epoch; the outage
    /// is recorded.
    func reconnectCycle<Ring: Virtqueue & ~Copyable>(_ r: Ring.Type) throws {
        let t = FakeTransport(offered: VirtioFeatures([.version1, .inOrder]).union(Ring.layoutFeatures))
        t.reconnectable = true
        let d = try core(r, t)
        try d.start()
        var q = d.makeQueue(1)
        d.enableReconnect(ReconnectPolicy(timeout: 5))
        let epoch = d.link.epoch
        q.addBurst(count: 3, deviceWritable: true) { i in (UInt64(0x1000 * (i + 1)), 64, UnsafeMutableRawPointer(bitPattern: i + 1)) }
        _ = q.publish()
        t.disconnect("backend killed")
        XCTAssertFalse(d.link.isUp)
        XCTAssertTrue(d.isReconnecting)
        t.comeBack()
        usleep(100_000)
        XCTAssertEqual(t.starts, 1, "no start before the owner reset its ring")
        XCTAssertEqual(t.memoryTables, 1)
        var cookies: [Int] = []
        XCTAssertEqual(q.reclaimAll { cookies.append(Int(bitPattern: $0)) }, 3)
        XCTAssertEqual(cookies.sorted(), [1, 2, 3])
        q.restart(at: Ring.resetBase)
        d.ringsReset([1])
        waitUntil("the link to come back") { d.link.isUp }
        XCTAssertEqual(d.link.epoch, epoch + 1)
        XCTAssertEqual(t.reconnects, 1)
        XCTAssertEqual(t.starts, 2)
        XCTAssertEqual(t.memoryTables, 2, "the new backend gets the memory table")
        XCTAssertEqual(t.setups.suffix(2).map(\.index), [0, 2])
        XCTAssertEqual(t.latest(2), q.addresses, "the ring is handed over from where the owner reset it")
        XCTAssertEqual(t.latest(2)?.base, Ring.resetBase)
        XCTAssertEqual(d.outages.count, 1)
        XCTAssertEqual(d.outages.first?.recovered, true)
        XCTAssertEqual(d.outages.first?.reason, "backend killed")
        d.stop()
        XCTAssertFalse(d.isReconnecting)
    }

    func testReconnectSplit() throws { try reconnectCycle(SplitVirtqueue.self) }
    func testReconnectPacked() throws { try reconnectCycle(PackedVirtqueue.self) }

    /// A device back without a feature negotiated before is refused (exit status 1, naming it);
    /// one that does not come back in time ends with status 2 and the time; a broken ring (the
    /// transport still connected) is no loss to repair.
    func testReconnectGivesUp() throws {
        let t = FakeTransport(offered: [.version1, .inOrder])
        t.reconnectable = true
        t.offeredAfterReconnect = [.version1]
        let d = try core(SplitVirtqueue.self, t)
        try d.start()
        d.enableReconnect(ReconnectPolicy(timeout: 5))
        t.disconnect("gone")
        t.comeBack()
        waitUntil("the failure") { d.reconnectFailure != nil }
        XCTAssertEqual(d.reconnectFailure?.exitCode, 1)
        XCTAssertTrue(d.reconnectFailure?.description.contains("IN_ORDER") == true, "\(String(describing: d.reconnectFailure))")
        XCTAssertFalse(d.isReconnecting)
        XCTAssertEqual(d.outages.first?.recovered, false)

        let t2 = FakeTransport(offered: [.version1])
        t2.reconnectable = true
        let d2 = try core(SplitVirtqueue.self, t2)
        try d2.start()
        d2.enableReconnect(ReconnectPolicy(timeout: 0.2))
        t2.disconnect("gone")
        waitUntil("the timeout") { d2.reconnectFailure != nil }
        XCTAssertEqual(d2.reconnectFailure?.exitCode, 2)
        XCTAssertTrue(d2.reconnectFailure?.description.contains("did not come back within 0.2 s") == true, "\(String(describing: d2.reconnectFailure))")

        let t3 = FakeTransport(offered: [.version1])
        t3.reconnectable = true
        let d3 = try core(SplitVirtqueue.self, t3)
        try d3.start()
        d3.enableReconnect(ReconnectPolicy())
        d3.link.markDown("the device broke the ring")
        waitUntil("the failure") { d3.reconnectFailure != nil }
        XCTAssertEqual(d3.reconnectFailure?.description, "the device broke the ring")
        XCTAssertEqual(t3.reconnects, 0)
    }
}
