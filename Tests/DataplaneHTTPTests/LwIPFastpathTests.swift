import CVioLwIP
import XCTest

/// fastpath.c's checksum and allocator, which take the place of liblwip's own.
final class LwIPFastpathTests: XCTestCase {
    override class func setUp() {
        super.setUp()
        LeakCheckRoots.install
    }

    /// RFC 1071's sum as lwIP defines it: 16-bit words in memory order (little-endian here),
    /// a last odd byte padded with zero, folded with end-around carry, not complemented.
    func reference(_ b: UnsafeRawBufferPointer) -> UInt16 {
        var sum: UInt32 = 0
        var i = 0
        while i + 1 < b.count { sum &+= UInt32(b[i]) | UInt32(b[i + 1]) << 8; i += 2 }
        if i < b.count { sum &+= UInt32(b[i]) }
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        return UInt16(sum)
    }

    func testChecksumOfRFC1071sExample() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2 in network order.
        let bytes: [UInt8] = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]
        let sum = bytes.withUnsafeBytes { vlw_checksum($0.baseAddress, $0.count) }
        XCTAssertEqual(sum.byteSwapped, 0xddf2)
    }

    /// Every length up to two segments, at every alignment, on random bytes and on the inputs
    /// whose sums are 0 and 0xffff: the same value as a plain reference and as liblwip's own
    /// lwip_standard_chksum (found past ours with dlsym(RTLD_NEXT)).
    func testChecksumMatchesTheLibrarysOwnAtEveryLengthAndAlignment() throws {
        var rng = SystemRandomNumberGenerator()
        let size = 3000 + 16
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
        defer { buf.deallocate() }
        for fill in ["random", "zero", "ones"] {
            for i in 0..<size { buf[i] = fill == "random" ? UInt8.random(in: 0...255, using: &rng) : fill == "zero" ? 0 : 0xff }
            var lens = Array(0...64) + Array(stride(from: 65, through: 3000, by: 7)) + [1459, 1460, 1461, 1514, 2047, 2048, 3000]
            if fill != "random" { lens = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1460, 1461] }
            for offset in 0..<8 {
                for len in lens {
                    let p = UnsafeRawBufferPointer(rebasing: buf[offset..<(offset + len)])
                    let ours = vlw_checksum(p.baseAddress, len)
                    let want = reference(p)
                    XCTAssertEqual(ours, want, "\(fill) length \(len) offset \(offset)")
                    let lib = vlw_library_checksum(p.baseAddress, Int32(len))
                    XCTAssertNotEqual(lib, -1, "liblwip's own lwip_standard_chksum was not found")
                    XCTAssertEqual(Int(ours), Int(lib), "\(fill) length \(len) offset \(offset): liblwip says \(lib)")
                    if ours != want || Int(ours) != Int(lib) { return }
                }
            }
        }
        // The sums at the edges: nothing but zeros is 0; nothing but 0xff is 0xffff.
        XCTAssertEqual(vlw_checksum(buf.baseAddress, 100), 0xffff)
    }

    /// liblwip's own code (inet_chksum, pbuf_alloc, pbuf_free) reaches this executable's checksum
    /// and allocator, and a freed block is handed out again from its list.
    func testLibraryCallsReachTheReplacements() throws {
        let data = [UInt8](repeating: 0x5a, count: 1500)
        let before = vlw_fastpath_get_stats()
        let active = data.withUnsafeBytes { vlw_fastpath_probe($0.baseAddress, 1500) }
        XCTAssertEqual(active, 3, "1: only the checksum is bound, 2: only the allocator, 0: neither (liblwip's own run)")
        _ = data.withUnsafeBytes { vlw_fastpath_probe($0.baseAddress, 1500) }
        let after = vlw_fastpath_get_stats()
        XCTAssertGreaterThan(after.from_list + after.from_malloc, before.from_list + before.from_malloc)
        XCTAssertGreaterThan(after.from_list, before.from_list, "the second pbuf did not reuse the first one's block")
    }
}
