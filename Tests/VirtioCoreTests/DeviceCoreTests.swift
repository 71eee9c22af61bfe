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
}
