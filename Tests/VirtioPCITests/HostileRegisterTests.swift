import VirtioCore
import VirtioPCI
import VirtioTestSupport
import XCTest

/// PCI registers a broken or hostile device could show: every value is checked before use and
/// gives a typed error, never a trap or a torn read.
final class HostileRegisterTests: XCTestCase {
    let address = PCIAddress("0000:00:04.0")!
    let offered: VirtioFeatures = [.version1, VirtioFeatures(bit: 5) /* MAC */]

    func addresses(size: Int) throws -> QueueAddresses {
        let l = try SplitRingLayout(size: size)
        let base: UInt64 = 0x7f00_0000_0000
        return QueueAddresses(size: size, desc: base, avail: base + UInt64(l.availOffset), used: base + UInt64(l.usedOffset))
    }

    /// §4.1.4.3.1: config_generation changing under every read is an error naming the bytes, not
    /// a value torn between two generations; one that changes a few times and then holds is read.
    func testConfigGenerationThatNeverSettles() throws {
        let bar = FakeModernBAR(features: offered.rawValue)
        let t = try VirtioPCITransport(address: address, interface: try bar.interface(), deviceType: 1, translate: testTranslate)
        bar.generationChangesLeft = 5
        XCTAssertEqual(try t.readConfig(offset: 0, count: 6), [0, 1, 2, 3, 4, 5])
        bar.generationChangesLeft = .max
        XCTAssertThrowsError(try t.readConfig(offset: 0, count: 6)) { e in
            XCTAssertEqual(e as? VirtioPCIError, .configGenerationUnstable(offset: 0, count: 6, attempts: ModernInterface.configReadAttempts))
            XCTAssertTrue("\(e)".contains("never settles"), "\(e)")
        }
    }

    /// notify_off_multiplier near 2^32 with queue_notify_off 0xffff: the product is checked
    /// against the notify structure (no overflow, no write outside the BAR).
    func testHugeNotifyMultiplier() throws {
        let bar = FakeModernBAR(features: offered.rawValue)
        bar.queues[0].notifyOff = 0xffff
        let t = try VirtioPCITransport(address: address, interface: try bar.interface(notifyMultiplier: .max), deviceType: 1, translate: testTranslate)
        try t.negotiate([.version1], queueCount: 2)
        XCTAssertThrowsError(try t.setupQueue(0, addresses: try addresses(size: 64))) { e in
            guard case .barOutOfRange(let m)? = e as? VirtioPCIError else { return XCTFail("\(e)") }
            XCTAssertTrue(m.contains("\(0xffff * Int(UInt32.max))"), m)
        }
        XCTAssertTrue(bar.notifies.isEmpty)
    }

    /// A device-sized queue (a net control queue) on a device that says 0xffff, 48 or 0: the
    /// largest power of two up to the driver's limit and the device's maximum, or a typed error.
    func testHugeAndOddQueueSizes() throws {
        for (deviceSize, expected) in [(0xffff, 64), (48, 32), (1, 1), (0, nil)] as [(Int, Int?)] {
            let bar = FakeModernBAR(features: offered.rawValue, numQueues: 1, maxSize: deviceSize)
            let t = try VirtioPCITransport(address: address, interface: try bar.interface(), deviceType: 1, translate: testTranslate)
            let n = try VirtioNegotiation(offered: t.deviceFeatures, required: [.version1], wanted: [], ring: .split, device: "test")
            do {
                let d = try VirtioDevice<SplitVirtqueue>(transport: t, negotiation: n, queues: [.deviceSized(index: 0, atMost: 64)],
                                                         memory: HeapDMAAllocator())
                XCTAssertEqual(d.queues.map(\.size), [expected ?? -1], "device size \(deviceSize)")
            } catch {
                XCTAssertNil(expected, "device size \(deviceSize): \(error)")
                XCTAssertTrue("\(error)".contains("queue 0 has size 0"), "\(error)")
            }
        }
    }

    /// Found by the pci-caps fuzz target: a legacy I/O BAR shorter than the legacy registers
    /// was used anyway. Refused before any register is touched.
    func testShortLegacyIOBarIsRefused() {
        for (length, msix) in [(0, false), (19, false), (23, true)] {
            let io = ShortIO(length: length)
            XCTAssertThrowsError(try LegacyInterface(io: io, msixEnabled: msix)) { e in
                guard case .barOutOfRange(let m)? = e as? VirtioPCIError else { return XCTFail("\(e)") }
                XCTAssertTrue(m.contains("is \(length) bytes"), m)
            }
            XCTAssertEqual(io.accesses, 0, "no register touched")
        }
        XCTAssertNoThrow(try LegacyInterface(io: ShortIO(length: 24), msixEnabled: true))
    }
}

/// An I/O BAR of `length` bytes that counts every access.
final class ShortIO: RegisterSpace {
    let length: Int
    var accesses = 0
    init(length: Int) { self.length = length }
    func read8(_ o: Int) -> UInt8 { accesses += 1; return 0 }
    func read16(_ o: Int) -> UInt16 { accesses += 1; return 0 }
    func read32(_ o: Int) -> UInt32 { accesses += 1; return 0 }
    func write8(_ o: Int, _ v: UInt8) { accesses += 1 }
    func write16(_ o: Int, _ v: UInt16) { accesses += 1 }
    func write32(_ o: Int, _ v: UInt32) { accesses += 1 }
}
