import DPDK
import VirtioNet

/// The UDP/IPv4 frames `vio fwd --mode txonly` and `vio pktgen` send.
///
///     0  Ethernet: dst 02:00:00:00:00:01, src = port MAC, type IPv4
///     14 IPv4 198.18.0.1 → 198.18.0.2, UDP
///     34 UDP: source port 1024 + flow, destination port 30313 (marks a pktgen probe)
///     42 sequence number (u64)          — pktgen only
///     50 transmit TSC (u64)             — pktgen only
///     58 check (u16): with --verify, a hash of sequence, size and bytes 60…; otherwise 0
///     60 payload: with --verify, a pattern derived from the sequence number; otherwise zeros
///
/// So the smallest frame (60 bytes) still carries a sequence number and a timestamp.
enum Frames {
    static let peerMAC: [UInt8] = [0x02, 0, 0, 0, 0, 0x01]
    static let probePort: UInt16 = 30313
    static let seqOffset = 42
    static let tscOffset = 50
    static let checkOffset = 58
    static let payloadOffset = 60
    static let minSize = 60
    static let maxSize = 9018

    /// A whole frame of `size` bytes: headers for that size, zero payload.
    static func template(src: EthernetAddress, size: Int) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: max(size, 42))
        f.replaceSubrange(0..<6, with: peerMAC)
        f.replaceSubrange(6..<12, with: src.array)
        f[12] = 0x08; f[13] = 0x00
        f[14] = 0x45; f[22] = 64; f[23] = 17
        f.replaceSubrange(26..<30, with: [198, 18, 0, 1])
        f.replaceSubrange(30..<34, with: [198, 18, 0, 2])
        f[34] = 0x04; f[35] = 0x00                       // source port 1024
        f[36] = UInt8(probePort >> 8); f[37] = UInt8(probePort & 0xff)
        f.withUnsafeMutableBytes { setLengths($0.baseAddress!, size: size) }
        return f
    }

    /// IPv4 total length and header checksum, UDP length, for a frame of `size` bytes.
    @inline(__always)
    static func setLengths(_ p: UnsafeMutableRawPointer, size: Int) {
        p.storeBytes(of: UInt16(size - 14).bigEndian, toByteOffset: 16, as: UInt16.self)
        p.storeBytes(of: UInt16(size - 34).bigEndian, toByteOffset: 38, as: UInt16.self)
        p.storeBytes(of: 0, toByteOffset: 24, as: UInt16.self)
        var sum: UInt32 = 0
        for i in stride(from: 14, to: 34, by: 2) { sum &+= UInt32(UInt16(bigEndian: p.loadUnaligned(fromByteOffset: i, as: UInt16.self))) }
        while sum > 0xffff { sum = (sum & 0xffff) &+ (sum >> 16) }
        p.storeBytes(of: (~UInt16(truncatingIfNeeded: sum)).bigEndian, toByteOffset: 24, as: UInt16.self)
    }

    /// Deterministic frame size for sequence number `seq` in `mixed` mode: 60...1514.
    static func mixedSize(_ seq: UInt64) -> Int {
        var x = seq &* 0x9E37_79B9_7F4A_7C15
        x ^= x >> 29
        return 60 + Int(x % 1455)
    }

    /// Simple IMIX, 7:4:1 of 64, 594 and 1518 bytes.
    static func imixSize(_ seq: UInt64) -> Int {
        switch seq % 12 { case 0..<7: 64; case 7..<11: 594; default: 1518 }
    }

    /// FNV-1a over 8-byte words and the tail, folded to 16 bits, seeded with sequence and size.
    static func check(_ p: UnsafeRawPointer, count: Int, seq: UInt64, size: Int) -> UInt16 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        h = (h ^ seq) &* 0x0000_0100_0000_01b3
        h = (h ^ UInt64(size)) &* 0x0000_0100_0000_01b3
        var i = 0
        while i + 8 <= count {
            h = (h ^ p.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* 0x0000_0100_0000_01b3
            i += 8
        }
        while i < count {
            h = (h ^ UInt64(p.load(fromByteOffset: i, as: UInt8.self))) &* 0x0000_0100_0000_01b3
            i += 1
        }
        let f = UInt32(truncatingIfNeeded: h ^ (h >> 32))
        return UInt16(truncatingIfNeeded: f ^ (f >> 16))
    }

    /// The --verify payload pattern.
    static func fillPattern(_ p: UnsafeMutableRawPointer, seq: UInt64, size: Int) {
        var k = payloadOffset
        let base = UInt8(truncatingIfNeeded: seq &* 31)
        while k < size { p.storeBytes(of: base &+ UInt8(truncatingIfNeeded: k), toByteOffset: k, as: UInt8.self); k += 1 }
    }
}
