import Foundation
import XCTest

/// `pci:` URIs on the host's own PCI bus: a missing address, a non-virtio function and a virtio
/// function the kernel drives are refused with a clear message (exit 1) before any device or
/// memory is touched. The devices are found by reading sysfs, not assumed.
final class PCIHostErrorTests: XCTestCase {
    struct Function { var address: String; var vendor: String; var device: String; var driver: String? }

    func hostFunctions() -> [Function] {
        let root = "/sys/bus/pci/devices"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return names.sorted().compactMap { a in
            func read(_ f: String) -> String? {
                (try? String(contentsOfFile: "\(root)/\(a)/\(f)", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
            }
            guard let v = read("vendor"), let d = read("device") else { return nil }
            let driver = (try? FileManager.default.destinationOfSymbolicLink(atPath: "\(root)/\(a)/driver")).map { URL(fileURLWithPath: $0).lastPathComponent }
            return Function(address: a, vendor: v, device: d, driver: driver)
        }
    }

    func runFwd(_ address: String) throws -> VioRun {
        let dir = try TempDir()
        return try Vio.run(["fwd", "--port", "pci:\(address)", "--mode", "rxonly", "--duration", "1"], dir: dir, timeout: 30, json: false)
    }

    func testNonexistentAddress() throws {
        let taken = Set(hostFunctions().map(\.address))
        let free = (0..<32).map { String(format: "0000:00:%02x.7", $0) }.first { !taken.contains($0) }!
        let r = try runFwd(free)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("no PCI device \(free)"), "\(r)")
    }

    func testNotVirtio() throws {
        guard let f = hostFunctions().first(where: { $0.vendor != "0x1af4" }) else { throw XCTSkip("every PCI function on this host is virtio") }
        let r = try runFwd(f.address)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("\(f.address) is not a virtio device (vendor \(f.vendor)"), "\(r)")
    }

    func testBoundToKernelDriver() throws {
        let netIDs: Set = ["0x1041", "0x1000"], blkIDs: Set = ["0x1042", "0x1001"]
        guard let f = hostFunctions().first(where: {
            $0.vendor == "0x1af4" && $0.driver != nil && $0.driver != "uio_pci_generic" && (netIDs.contains($0.device) || blkIDs.contains($0.device))
        }) else {
            throw XCTSkip("no virtio-net or virtio-blk PCI function bound to a kernel driver on this host")
        }
        // The type check comes before the driver check, so use the command that fits the type.
        let dir = try TempDir()
        let isNet = netIDs.contains(f.device)
        let r = isNet ? try runFwd(f.address)
                      : try Vio.run(["blkbench", "--dev", "pci:\(f.address)", "--runtime", "1s"], dir: dir, timeout: 30, json: false)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("\(f.address) is bound to the kernel driver \(f.driver!)"), "\(r)")
    }

    func testMalformedAddressIsAUsageError() throws {
        let dir = try TempDir()
        let r = try Vio.run(["fwd", "--port", "pci:00:4", "--mode", "rxonly"], dir: dir, timeout: 30, json: false)
        XCTAssertEqual(r.status, 64, "\(r)")
        XCTAssertTrue(r.stderr.contains("not a PCI address"), "\(r)")
    }
}
