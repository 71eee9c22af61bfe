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

/// The glue's reading of a peer's SYN (the MSS it offers), on frames the device hands over.
final class SynMSSTests: XCTestCase {
    override class func setUp() {
        super.setUp()
        LeakCheckRoots.install
    }

    /// Ethernet + IPv4 + TCP SYN from 198.18.0.1:40000 with `options` (padded to 4 bytes).
    func syn(flags: UInt8 = 0x02, options: [UInt8], ethertype: [UInt8] = [0x08, 0x00]) -> [UInt8] {
        var opts = options
        while opts.count % 4 != 0 { opts.append(0) }
        var f = [UInt8](repeating: 0, count: 12) + ethertype
        f += [0x45, 0, 0, UInt8(40 + opts.count), 0, 0, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]
        f += [0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, UInt8((20 + opts.count) / 4) << 4, flags, 0xff, 0xff, 0, 0, 0, 0]
        return f + opts
    }

    func parse(_ f: [UInt8]) -> (mss: UInt16, ip: UInt32, port: UInt16) {
        // An exact-size heap copy, so that a read past `len` is out of bounds (AddressSanitizer).
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(1, f.count), alignment: 1)
        defer { p.deallocate() }
        f.withUnsafeBytes { if !$0.isEmpty { p.copyMemory(from: $0.baseAddress!, byteCount: f.count) } }
        var ip: UInt32 = 0, port: UInt16 = 0
        let mss = vlw_syn_mss(p, UInt16(f.count), &ip, &port)
        return (mss, ip, port)
    }

    func testReadsTheMSSOptionOfASyn() {
        // MSS 8960, SACK permitted, timestamps, NOP, window scale: what Linux sends.
        let f = syn(options: [2, 4, 0x23, 0x00, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])
        let r = parse(f)
        XCTAssertEqual(r.mss, 8960)
        XCTAssertEqual(r.ip, UInt32(198) | UInt32(18) << 8 | UInt32(0) << 16 | UInt32(1) << 24)   // network order in memory
        XCTAssertEqual(r.port, 40000)
        XCTAssertEqual(parse(syn(options: [1, 1, 2, 4, 0x05, 0xb4])).mss, 1460, "after NOPs")
    }

    func testIgnoresWhatIsNotAConnectionRequestOrIsMalformed() {
        let mssOption: [UInt8] = [2, 4, 0x23, 0x00]
        XCTAssertEqual(parse(syn(flags: 0x12, options: mssOption)).mss, 0, "SYN+ACK")
        XCTAssertEqual(parse(syn(flags: 0x10, options: mssOption)).mss, 0, "ACK")
        XCTAssertEqual(parse(syn(options: mssOption, ethertype: [0x86, 0xdd])).mss, 0, "not IPv4")
        XCTAssertEqual(parse(syn(options: [])).mss, 0, "no options")
        XCTAssertEqual(parse(syn(options: [3, 0, 2, 4, 0x23, 0x00])).mss, 0, "an option of length 0 stops the walk")
        XCTAssertEqual(parse(syn(options: [8, 40, 2, 4, 0x23, 0x00])).mss, 0, "an option longer than the header")
        XCTAssertEqual(parse(syn(options: [2, 3, 0x23, 0x00])).mss, 0, "an MSS option of the wrong length")
        XCTAssertEqual(parse(syn(options: [0, 0, 2, 4, 0x23, 0x00])).mss, 0, "after end-of-options")
        // Cut short anywhere: nothing until the whole TCP header (with its options) is there.
        let full = syn(options: mssOption)
        for n in 0..<full.count { XCTAssertEqual(parse(Array(full.prefix(n))).mss, 0, "\(n) of \(full.count) bytes") }
        XCTAssertEqual(parse(full).mss, 8960)
        // A data offset past the frame, an IP header length under 20.
        var f = full; f[14 + 20 + 12] = 0xf0
        XCTAssertEqual(parse(f).mss, 0)
        f = full; f[14] = 0x44
        XCTAssertEqual(parse(f).mss, 0)
    }

    /// Random headers and options after a valid start: never a read past the frame (the
    /// sanitizer run checks it), and any MSS found came from an MSS option in the frame.
    func testRandomFramesStayInBounds() {
        var rng = SystemRandomNumberGenerator()
        let base = syn(options: [2, 4, 0x23, 0x00])
        for _ in 0..<20_000 {
            var f = Array(base.prefix(14 + 20 + 12))
            f += [UInt8.random(in: 0...255, using: &rng), 0x02]
            f += (0..<Int.random(in: 0...60, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if Bool.random(using: &rng) { f[14] = 0x40 | UInt8.random(in: 0...15, using: &rng) }
            let r = parse(f)
            if r.mss != 0 { XCTAssertTrue(f.count >= 54, "\(f)") }
        }
    }
}
