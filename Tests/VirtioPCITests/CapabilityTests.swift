import VirtioPCI
import XCTest

/// The capability list parser against real config space bytes and broken lists.
final class CapabilityTests: XCTestCase {
    /// Config space of a modern virtio-net function (1af4:1041) on a cloud VM, read from sysfs:
    /// common cfg, ISR, device cfg, notify (multiplier 4), PCI cfg access, MSI-X (enabled).
    static let cloudNet: [UInt8] = bytes("""
    f41a4110060410000100000200000000 04001000400000000000000000000000
    000000000000000000000000f41a4110 00000000400000000000000000000000
    09501001000000000000000038000000 09601003000000000020000001000000
    09701004000000000040000000100000 09841402000000000060000000100000
    04000000099814050000000000000000 00000000000000001100028000800000
    00800400000000000000000000000000 00000000000000000000000000000000
    00000000000000000000000000000000 00000000000000000000000000000000
    00000000000000000000000000000000 00000000000000000000000000000000
    """)

    static func bytes(_ hex: String) -> [UInt8] {
        let digits = Array(hex.filter(\.isHexDigit))
        return stride(from: 0, to: digits.count, by: 2).map { UInt8(String(digits[$0...$0 + 1]), radix: 16)! }
    }

    func testParsesRealModernNetFunction() throws {
        XCTAssertEqual(Self.cloudNet.count, 256)
        let c = try VirtioPCICapabilities(configSpace: Self.cloudNet)
        XCTAssertEqual(c.common, VirtioPCICapability(kind: .common, bar: 0, offset: 0, length: 0x38))
        XCTAssertEqual(c.isr, VirtioPCICapability(kind: .isr, bar: 0, offset: 0x2000, length: 1))
        XCTAssertEqual(c.device, VirtioPCICapability(kind: .device, bar: 0, offset: 0x4000, length: 0x1000))
        XCTAssertEqual(c.notify, VirtioPCICapability(kind: .notify, bar: 0, offset: 0x6000, length: 0x1000, notifyOffsetMultiplier: 4))
        XCTAssertTrue(c.msixEnabled)
        XCTAssertTrue(c.isModern)
    }

    func testNoCapabilityListMeansNotModern() throws {
        var c = Self.cloudNet
        c[6] &= ~0x10  // PCI_STATUS_CAP_LIST off
        let caps = try VirtioPCICapabilities(configSpace: c)
        XCTAssertFalse(caps.isModern)
        XCTAssertNil(caps.common)
    }

    func testFirstCapabilityOfAKindWins() throws {
        var c = Self.cloudNet
        // Turn the device-cfg capability at 0x60 into a second common cfg: the first (0x40) stays.
        c[0x63] = 1
        let caps = try VirtioPCICapabilities(configSpace: c)
        XCTAssertEqual(caps.common?.offset, 0)
        XCTAssertNil(caps.device)
    }

    func testLoopIsAnError() {
        var c = Self.cloudNet
        c[0x61] = 0x40  // 0x60 points back to 0x40
        XCTAssertThrowsError(try VirtioPCICapabilities(configSpace: c)) { e in
            XCTAssertEqual(e as? VirtioPCIError, .badCapabilityList("capability list loops at 0x40"))
        }
    }

    func testPointerOutsideConfigSpaceIsAnError() {
        var c = Self.cloudNet
        c[0x34] = 0x20  // inside the standard header
        XCTAssertThrowsError(try VirtioPCICapabilities(configSpace: c))
        let short = Array(Self.cloudNet[0..<0x74])  // the notify capability at 0x70 is cut
        XCTAssertThrowsError(try VirtioPCICapabilities(configSpace: short)) { e in
            XCTAssertEqual(e as? VirtioPCIError, .badCapabilityList("virtio capability at 0x70 is truncated"))
        }
    }

    func testNotifyCapabilityWithoutMultiplierIsAnError() {
        var c = Self.cloudNet
        c[0x72] = 0x10  // cap_len 16: no notify_off_multiplier
        XCTAssertThrowsError(try VirtioPCICapabilities(configSpace: c)) { e in
            XCTAssertEqual(e as? VirtioPCIError, .badCapabilityList("notify capability at 0x70 lacks notify_off_multiplier"))
        }
    }

    func testBadBarIsIgnored() throws {
        var c = Self.cloudNet
        c[0x44] = 7  // BAR 7 does not exist: the common capability is skipped, so not modern
        let caps = try VirtioPCICapabilities(configSpace: c)
        XCTAssertNil(caps.common)
        XCTAssertFalse(caps.isModern)
    }

    func testShortConfigSpace() {
        XCTAssertThrowsError(try VirtioPCICapabilities(configSpace: [UInt8](repeating: 0, count: 32)))
    }
}
