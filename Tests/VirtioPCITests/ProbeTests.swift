import Foundation
import VirtioPCI
import XCTest

/// `VirtioPCITransport.probe` against a fake sysfs tree: every refusal has its own error.
final class ProbeTests: XCTestCase {
    var root: URL!

    override func setUpWithError() throws {
        root = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("vio-sysfs-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: root.appendingPathComponent("drivers"), withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: root) }

    func add(_ address: String, vendor: String, device: String, subsystem: String = "0x0001", driver: String?) throws {
        let d = root.appendingPathComponent("devices/\(address)")
        try FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
        try "\(vendor)\n".write(to: d.appendingPathComponent("vendor"), atomically: true, encoding: .utf8)
        try "\(device)\n".write(to: d.appendingPathComponent("device"), atomically: true, encoding: .utf8)
        try "\(subsystem)\n".write(to: d.appendingPathComponent("subsystem_device"), atomically: true, encoding: .utf8)
        if let driver {
            let target = root.appendingPathComponent("drivers/\(driver)")
            try FileManager.default.createDirectory(at: target, withIntermediateDirectories: true)
            try FileManager.default.createSymbolicLink(atPath: d.appendingPathComponent("driver").path, withDestinationPath: target.path)
        }
    }

    func probe(_ a: String, _ type: VirtioDeviceType? = .net) throws -> SysfsPCIFunction {
        try VirtioPCITransport.probe(address: a, expecting: type, sysfsRoot: root.appendingPathComponent("devices").path)
    }

    func expect(_ a: String, _ type: VirtioDeviceType? = .net, error: VirtioPCIError, line: UInt = #line) {
        XCTAssertThrowsError(try probe(a, type), line: line) { XCTAssertEqual($0 as? VirtioPCIError, error, line: line) }
    }

    func testRefusals() throws {
        try add("0000:00:02.0", vendor: "0x1234", device: "0x1111", driver: nil)
        try add("0000:00:03.0", vendor: "0x1af4", device: "0x1041", driver: "virtio-pci")
        try add("0000:00:04.0", vendor: "0x1af4", device: "0x1041", driver: nil)
        try add("0000:00:05.0", vendor: "0x1af4", device: "0x1042", driver: "uio_pci_generic")
        try add("0000:00:06.0", vendor: "0x1af4", device: "0x1041", driver: "vfio-pci")
        try add("0000:00:07.0", vendor: "0x1af4", device: "0x1000", subsystem: "0x0001", driver: "uio_pci_generic")
        try add("0000:00:08.0", vendor: "0x1af4", device: "0x1001", subsystem: "0x0002", driver: "uio_pci_generic")
        let a = { PCIAddress($0)! }
        expect("00:04", error: .badAddress("00:04"))
        expect("0000:00:1f.0", error: .noSuchDevice(a("0000:00:1f.0")))
        expect("0000:00:02.0", error: .notVirtio(a("0000:00:02.0"), vendor: 0x1234, device: 0x1111))
        expect("0000:00:03.0", error: .boundToKernelDriver(a("0000:00:03.0"), driver: "virtio-pci"))
        expect("0000:00:04.0", error: .notBound(a("0000:00:04.0")))
        expect("0000:00:05.0", .net, error: .wrongDeviceType(a("0000:00:05.0"), expected: "network", found: "block"))
        expect("0000:00:06.0", error: .vfioNotSupported(a("0000:00:06.0")))
        expect("0000:00:08.0", .net, error: .wrongDeviceType(a("0000:00:08.0"), expected: "network", found: "block"))
        let blk = try probe("0000:00:05.0", .block)
        XCTAssertFalse(blk.isTransitional)
        XCTAssertEqual(blk.virtioType, 2)
        let legacyNet = try probe("00:07.0", .net)
        XCTAssertTrue(legacyNet.isTransitional, "0x1000: transitional id, type from the subsystem id")
        XCTAssertEqual(legacyNet.driver, "uio_pci_generic")
        XCTAssertTrue(VirtioPCIError.boundToKernelDriver(a("0000:00:03.0"), driver: "virtio-pci").description.contains("Scripts/pci-bind.sh"))
    }
}
