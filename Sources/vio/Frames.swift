import DPDK
import VirtioNet

/// Builds the UDP/IPv4 frames `vio fwd --mode txonly` and `vio pktgen` send.
/// Layout: Ethernet (14) · IPv4 (20) · UDP (8) · payload. pktgen's payload starts with a probe:
/// sequence number (u64 @42), checksum (u32 @50) of bytes [58, size), frame length (u16 @54),
/// magic 0x7669 (u16 @56), then a pattern that depends on the sequence number.
enum Frames {
    static let peerMAC: [UInt8] = [0x02, 0, 0, 0, 0, 0x01]
    static let probeOffset = 42
    static let dataOffset = 58
    static let magic: UInt16 = 0x7669
    static let minSize = 60
    static let maxSize = 9018

    /// Ethernet + IPv4 + UDP headers for a frame of `size` bytes (without FCS).
    static func headers(src: EthernetAddress, size: Int, flow: Int = 0) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: 42)
        f.replaceSubrange(0..<6, with: peerMAC)
        f.replaceSubrange(6..<12, with: src.array)
        f[12] = 0x08; f[13] = 0x00
        let ipLen = size - 14
        f[14] = 0x45; f[16] = UInt8(ipLen >> 8 & 0xff); f[17] = UInt8(ipLen & 0xff)
        f[22] = 64; f[23] = 17                         // TTL, UDP
        f.replaceSubrange(26..<30, with: [198, 18, 0, 1])
        f.replaceSubrange(30..<34, with: [198, 18, 0, 2])
        var sum: UInt32 = 0
        for i in stride(from: 14, to: 34, by: 2) { sum += UInt32(f[i]) << 8 | UInt32(f[i + 1]) }
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        let ck = ~UInt16(sum)
        f[24] = UInt8(ck >> 8); f[25] = UInt8(ck & 0xff)
        let sport = 1024 + flow
        f[34] = UInt8(sport >> 8 & 0xff); f[35] = UInt8(sport & 0xff); f[36] = 0x04; f[37] = 0x00
        let udpLen = size - 34
        f[38] = UInt8(udpLen >> 8 & 0xff); f[39] = UInt8(udpLen & 0xff)
        return f
    }

    /// A whole frame (headers + zero padding) for txonly.
    static func template(src: EthernetAddress, size: Int) -> [UInt8] {
        headers(src: src, size: size) + [UInt8](repeating: 0, count: size - 42)
    }

    /// Deterministic frame size for sequence number `seq` in `mixed` mode: 60...1514.
    static func mixedSize(_ seq: UInt64) -> Int {
        var x = seq &* 0x9E37_79B9_7F4A_7C15
        x ^= x >> 29
        return 60 + Int(x % 1455)
    }

    /// FNV-1a over 8-byte words (and the tail bytes): cheap enough for debug builds, and any
    /// changed, moved or missing byte changes it.
    static func checksum(_ p: UnsafeRawPointer, _ count: Int) -> UInt32 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        var i = 0
        while i + 8 <= count {
            h = (h ^ p.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* 0x0000_0100_0000_01b3
            i += 8
        }
        while i < count {
            h = (h ^ UInt64(p.load(fromByteOffset: i, as: UInt8.self))) &* 0x0000_0100_0000_01b3
            i += 1
        }
        return UInt32(truncatingIfNeeded: h ^ (h >> 32))
    }

    /// Writes the probe frame for `seq` into `buf` (capacity ≥ size).
    static func fillProbe(_ buf: UnsafeMutableRawPointer, headers: [UInt8], seq: UInt64, size: Int) {
        headers.withUnsafeBytes { buf.copyMemory(from: $0.baseAddress!, byteCount: 42) }
        // Per-frame lengths in the IPv4 and UDP headers (the template was built for one size).
        let ipLen = UInt16(size - 14), udpLen = UInt16(size - 34)
        buf.storeBytes(of: ipLen.bigEndian, toByteOffset: 16, as: UInt16.self)
        buf.storeBytes(of: 0, toByteOffset: 24, as: UInt16.self)  // IPv4 checksum left to the receiver
        buf.storeBytes(of: udpLen.bigEndian, toByteOffset: 38, as: UInt16.self)
        buf.storeBytes(of: seq, toByteOffset: 42, as: UInt64.self)
        buf.storeBytes(of: UInt16(size), toByteOffset: 54, as: UInt16.self)
        buf.storeBytes(of: magic, toByteOffset: 56, as: UInt16.self)
        for k in dataOffset..<size {
            buf.storeBytes(of: UInt8(truncatingIfNeeded: seq &* 31 &+ UInt64(k)), toByteOffset: k, as: UInt8.self)
        }
        buf.storeBytes(of: checksum(buf + dataOffset, size - dataOffset), toByteOffset: 50, as: UInt32.self)
    }
}
