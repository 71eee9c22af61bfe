import VirtioCore
import VirtioPCI
import XCTest

/// The driver's register sequences (VIRTIO 1.2 §3.1.1, §4.1.4.3, §4.1.5.2, §4.1.4.8) against fake BARs.
final class TransportSequenceTests: XCTestCase {
    let address = PCIAddress("0000:00:04.0")!
    let offered: VirtioFeatures = [.version1, .inOrder, .eventIndex, VirtioFeatures(bit: 5) /* MAC */]

    func modern(_ bar: FakeModernBAR, translate: @escaping (UInt64, Int) -> UInt64? = testTranslate) throws -> VirtioPCITransport {
        try VirtioPCITransport(address: address, interface: try bar.interface(), deviceType: 1, translate: translate)
    }

    func addresses(size: Int = 256) throws -> QueueAddresses {
        let l = try SplitRingLayout(size: size)
        let base: UInt64 = 0x7f00_0000_0000
        return QueueAddresses(size: size, desc: base, avail: base + UInt64(l.availOffset), used: base + UInt64(l.usedOffset))
    }

    func testModernInitializationSequence() throws {
        let bar = FakeModernBAR(features: offered.rawValue)
        bar.status = 0x0f      // left over from a previous driver
        bar.resetLag = 3        // the reset takes a few reads
        let t = try modern(bar)
        XCTAssertEqual(bar.statusHistory, [0, 1, 3], "reset, ACKNOWLEDGE, DRIVER (§3.1.1)")
        XCTAssertEqual(t.deviceFeatures, offered)
        XCTAssertEqual(t.queueLimit, .virtqueues(2))
        XCTAssertEqual(t.bufferAddressing, .iova)
        XCTAssertFalse(t.isLegacy)
        XCTAssertEqual(t.deviceDescription, "virtio-pci 0000:00:04.0 (modern)")

        try t.negotiate([.version1, .inOrder], queueCount: 2)
        XCTAssertEqual(bar.driverFeatures, VirtioFeatures([.version1, .inOrder]).rawValue, "both feature halves written")
        XCTAssertEqual(bar.statusHistory.last, 0x0b, "FEATURES_OK set and kept")

        let a = try addresses(size: 128)
        try t.setupQueue(0, addresses: a)
        try t.setupQueue(1, addresses: a)
        for q in bar.queues {
            XCTAssertEqual(q.size, 128, "a smaller queue size is written")
            XCTAssertEqual(q.desc, a.desc + testIOVAOffset, "the transport writes IOVAs, not virtual addresses")
            XCTAssertEqual(q.driver, a.avail + testIOVAOffset)
            XCTAssertEqual(q.device, a.used + testIOVAOffset)
            XCTAssertEqual(q.msix, 0xffff, "VIRTIO_MSI_NO_VECTOR: poll mode")
            XCTAssertEqual(q.enable, 0, "not enabled before start")
        }
        try t.start()
        XCTAssertEqual(bar.queues.map(\.enable), [1, 1])
        XCTAssertEqual(bar.statusHistory.last, 0x0f, "DRIVER_OK after the queues are enabled")
        XCTAssertTrue(t.isConnected)

        // §4.1.4.4: queue q notifies at queue_notify_off(q) × multiplier; the value is the queue index.
        t.notify(queue: 1)
        t.notify(queue: 0)
        XCTAssertEqual(bar.notifies.map(\.offset), [12, 0])
        XCTAssertEqual(bar.notifies.map(\.value), [1, 0])

        XCTAssertEqual(try t.readConfig(offset: 1, count: 6), [1, 2, 3, 4, 5, 6])
        XCTAssertThrowsError(try t.readConfig(offset: 12, count: 8), "beyond the device config")

        try t.stop()
        XCTAssertEqual(bar.status, 0, "stop resets the device: it touches none of our memory afterwards")
        XCTAssertEqual(bar.queues.map(\.enable), [0, 0])
    }

    /// After `stop` (a reset), setting the queues up again re-runs initialisation with the same
    /// features, so the device can be started anew (fresh rings: PCI has no way to set a base).
    func testRestartAfterStopReinitializes() throws {
        let bar = FakeModernBAR(features: offered.rawValue)
        let t = try modern(bar)
        try t.negotiate([.version1, .inOrder], queueCount: 2)
        let a = try addresses(size: 64)
        try t.setupQueue(0, addresses: a); try t.setupQueue(1, addresses: a)
        try t.start()
        try t.stop()
        bar.statusHistory = []
        try t.setupQueue(0, addresses: a); try t.setupQueue(1, addresses: a)
        XCTAssertEqual(bar.statusHistory, [0, 1, 3, 0x0b], "reset, ACKNOWLEDGE, DRIVER, FEATURES_OK again")
        XCTAssertEqual(bar.driverFeatures, VirtioFeatures([.version1, .inOrder]).rawValue)
        try t.start()
        XCTAssertEqual(bar.statusHistory.last, 0x0f)
        XCTAssertEqual(bar.queues.map(\.enable), [1, 1])
        XCTAssertTrue(t.isConnected)
    }

    func testMissingVersion1IsRefused() {
        let bar = FakeModernBAR(features: VirtioFeatures.inOrder.rawValue)
        XCTAssertThrowsError(try modern(bar)) { XCTAssertEqual($0 as? VirtioPCIError, .missingVersion1) }
        XCTAssertEqual(bar.status & 0x80, 0x80, "FAILED set")
    }

    func testRejectedFeaturesAreReported() throws {
        let bar = FakeModernBAR(features: offered.rawValue)
        bar.acceptFeatures = false
        let t = try modern(bar)
        XCTAssertThrowsError(try t.negotiate([.version1], queueCount: 2)) {
            XCTAssertEqual($0 as? VirtioPCIError, .featuresRejected(VirtioFeatures.version1.rawValue))
        }
        XCTAssertEqual(bar.status & 0x80, 0x80, "FAILED set")
    }

    func testQueueErrors() throws {
        let bar = FakeModernBAR(features: offered.rawValue, numQueues: 2, maxSize: 128)
        let t = try modern(bar)
        XCTAssertThrowsError(try t.negotiate([.version1], queueCount: 3)) {
            XCTAssertEqual($0 as? VirtioPCIError, .tooManyQueues(requested: 3, device: 2))
        }
        try t.negotiate([.version1], queueCount: 2)
        XCTAssertThrowsError(try t.setupQueue(0, addresses: try addresses(size: 256))) {
            XCTAssertEqual($0 as? VirtioPCIError, .queueTooLarge(queue: 0, requested: 256, max: 128))
        }
        bar.queues[1].size = 0
        XCTAssertThrowsError(try t.setupQueue(1, addresses: try addresses(size: 64))) {
            XCTAssertEqual($0 as? VirtioPCIError, .queueUnavailable(1))
        }
    }

    func testNotifyOffsetOutsideTheNotifyStructureIsAnError() throws {
        let bar = FakeModernBAR(features: offered.rawValue)
        let t = try VirtioPCITransport(address: address, interface: try bar.interface(notifyLength: 8), deviceType: 1, translate: testTranslate)
        try t.negotiate([.version1], queueCount: 2)
        try t.setupQueue(0, addresses: try addresses(size: 64))  // offset 0: fits
        XCTAssertThrowsError(try t.setupQueue(1, addresses: try addresses(size: 64))) { e in
            guard case .barOutOfRange? = e as? VirtioPCIError else { return XCTFail("\(e)") }
        }
    }

    func testUntranslatableRingIsAnError() throws {
        let bar = FakeModernBAR(features: offered.rawValue)
        let t = try modern(bar, translate: { _, _ in nil })
        try t.negotiate([.version1], queueCount: 2)
        XCTAssertThrowsError(try t.setupQueue(0, addresses: try addresses())) { e in
            guard case .notDMAMemory? = e as? VirtioPCIError else { return XCTFail("\(e)") }
        }
    }

    /// DEVICE_NEEDS_RESET (§2.1.2) ends the link with the reason; so does a device that reset itself
    /// or reads all-ones (gone).
    func testDeviceNeedsResetIsReported() throws {
        for (status, text) in [(UInt8(0x4f), "DEVICE_NEEDS_RESET (device_status 0x4f)"), (0x00, "was reset by the device"), (0xff, "is gone")] {
            let bar = FakeModernBAR(features: offered.rawValue)
            let t = try modern(bar)
            try t.negotiate([.version1], queueCount: 2)
            try t.setupQueue(0, addresses: try addresses(size: 64))
            try t.setupQueue(1, addresses: try addresses(size: 64))
            try t.start()
            XCTAssertTrue(t.isConnected)
            bar.status = status
            XCTAssertFalse(t.isConnected)
            XCTAssertTrue(t.disconnectReason?.contains(text) == true, t.disconnectReason ?? "no reason")
            bar.status = 0x0f
            XCTAssertFalse(t.isConnected, "once lost, stays lost")
        }
    }

    func testLegacySequence() throws {
        let io = FakeLegacyIO(features: 1 << 15 | 1 << 5)  // MRG_RXBUF, MAC
        // Physical addresses below 16 TiB (a legacy queue address is a 32-bit page number).
        let low: (UInt64, Int) -> UInt64? = { va, _ in va - 0x7f00_0000_0000 + 0x4000_0000 }
        let t = try VirtioPCITransport(address: address, interface: try LegacyInterface(io: io, msixEnabled: false), deviceType: 1, translate: low)
        XCTAssertTrue(t.isLegacy)
        XCTAssertNil(t.queueLimit)
        XCTAssertEqual(t.deviceFeatures.rawValue, 1 << 15 | 1 << 5)
        try t.negotiate(VirtioFeatures(rawValue: 1 << 15), queueCount: 2)
        XCTAssertEqual(io.driverFeatures, 1 << 15)
        XCTAssertEqual(io.statusHistory, [0, 1, 3], "no FEATURES_OK on a legacy device")
        XCTAssertEqual(try t.readConfig(offset: 0, count: 6), [0x52, 0x54, 0, 0x12, 0x34, 0x56])
        XCTAssertThrowsError(try t.setupQueue(0, addresses: try addresses(size: 128))) {
            XCTAssertEqual($0 as? VirtioPCIError, .legacyQueueSize(queue: 0, requested: 128, device: 256))
        }
        let a = try addresses(size: 256)
        try t.setupQueue(0, addresses: a)
        XCTAssertEqual(io.pfn[0], UInt32(0x4000_0000 >> 12), "the ring as a page frame number")
        var bad = a
        bad.used += 8
        XCTAssertThrowsError(try t.setupQueue(1, addresses: bad)) { e in
            guard case .legacyLayout? = e as? VirtioPCIError else { return XCTFail("\(e)") }
        }
        try t.setupQueue(1, addresses: a)
        try t.start()
        XCTAssertEqual(io.statusHistory.last, 0x07)
        t.notify(queue: 1)
        XCTAssertEqual(io.notifies, [1])
        try t.stop()
        XCTAssertEqual(io.pfn, [0, 0])
    }

    func testLegacyRingAbove16TiBIsRefused() throws {
        let io = FakeLegacyIO(features: 1 << 15)
        let t = try VirtioPCITransport(address: address, interface: try LegacyInterface(io: io, msixEnabled: false), deviceType: 1,
                                       translate: { va, _ in va })
        try t.negotiate(VirtioFeatures(rawValue: 1 << 15), queueCount: 2)
        XCTAssertThrowsError(try t.setupQueue(0, addresses: try addresses(size: 256))) { e in
            XCTAssertEqual(e as? VirtioPCIError, .legacyLayout("ring above 16 TiB cannot be given as a 32-bit page number"))
        }
        XCTAssertEqual(io.pfn, [0, 0])
    }

    func testLegacyConfigOffsetWithMSIX() {
        let io = FakeLegacyIO(features: 0)
        XCTAssertEqual(try LegacyInterface(io: io, msixEnabled: false).readConfig(offset: 0, count: 2), [0x52, 0x54])
        XCTAssertEqual(try LegacyInterface(io: io, msixEnabled: true).readConfig(offset: 0, count: 2), [0x34, 0x56], "config moves to 24 with MSI-X")
    }
}
