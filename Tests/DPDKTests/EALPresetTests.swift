import DPDK
import XCTest

/// The EAL presets in Configs/eal are the ones the code uses.
final class EALPresetTests: XCTestCase {
    func configs(_ name: String) throws -> String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return try String(contentsOf: root.appendingPathComponent("Configs/eal/\(name).conf"), encoding: .utf8)
    }

    func testHugepagePresetMatchesConfigs() throws {
        XCTAssertEqual(EALPreset(fileContents: try configs("hugepages")), EALPreset.hugepages)
        XCTAssertTrue(EALPreset.hugepages.arguments.contains("--single-file-segments"))
    }

    func testNoHugePresetMatchesConfigs() throws {
        XCTAssertEqual(EALPreset(fileContents: try configs("nohuge")), EALPreset.nohuge)
        XCTAssertTrue(EALPreset.nohuge.arguments.contains("--no-huge"))
    }

    func testPresetParsingSkipsCommentsAndBlanks() {
        let p = EALPreset(fileContents: "# c\n\n  -m \n{MB}\n")
        XCTAssertEqual(p.arguments, ["-m", "{MB}"])
    }
}

final class EALPCIPresetTests: XCTestCase {
    func testPCIPresetMatchesConfigs() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = try String(contentsOf: root.appendingPathComponent("Configs/eal/pci.conf"), encoding: .utf8)
        XCTAssertEqual(EALPreset(fileContents: text), EALPreset.pci)
        XCTAssertEqual(EALPreset.pci.arguments.split(separator: "--iova-mode").last?.first, "pa")
    }
}
