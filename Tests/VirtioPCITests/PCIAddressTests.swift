import VirtioPCI
import XCTest

final class PCIAddressTests: XCTestCase {
    func testParsesFullAndShortForms() {
        XCTAssertEqual(PCIAddress("0000:00:04.0"), PCIAddress(domain: 0, bus: 0, device: 4, function: 0))
        XCTAssertEqual(PCIAddress("00:1f.7"), PCIAddress(domain: 0, bus: 0, device: 0x1f, function: 7))
        XCTAssertEqual(PCIAddress("10000:00:04.0"), nil)
        XCTAssertEqual(PCIAddress("0000:00:20.0"), nil, "device numbers stop at 31")
        XCTAssertEqual(PCIAddress("0000:00:04.8"), nil, "functions stop at 7")
        XCTAssertEqual(PCIAddress("0000:00:04"), nil)
        XCTAssertEqual(PCIAddress("vhost:/tmp/x"), nil)
        XCTAssertEqual(PCIAddress("0000:0g:04.0"), nil)
        XCTAssertEqual(PCIAddress("00:04.0")?.description, "0000:00:04.0")
        XCTAssertEqual(PCIAddress("abcd:ef:1a.3")?.description, "abcd:ef:1a.3")
    }
}
