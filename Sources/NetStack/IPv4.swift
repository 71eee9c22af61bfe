/// An IPv4 address. `networkOrder` is the address as it sits in a packet, read as a native
/// `UInt32` (what lwIP's `ip4_addr_t.addr` holds).
public struct IPv4Address: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var octets: (UInt8, UInt8, UInt8, UInt8)

    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) { octets = (a, b, c, d) }

    /// Dotted quad, e.g. "198.18.0.2".
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var o = [UInt8]()
        for p in parts {
            guard !p.isEmpty, p.count <= 3, p.allSatisfy({ $0 >= "0" && $0 <= "9" }), let v = UInt8(p) else { return nil }
            o.append(v)
        }
        octets = (o[0], o[1], o[2], o[3])
    }

    public init(networkOrder v: UInt32) {
        let b = v.littleEndian
        octets = (UInt8(b & 0xff), UInt8(b >> 8 & 0xff), UInt8(b >> 16 & 0xff), UInt8(b >> 24))
    }

    public var networkOrder: UInt32 {
        UInt32(littleEndian: UInt32(octets.0) | UInt32(octets.1) << 8 | UInt32(octets.2) << 16 | UInt32(octets.3) << 24)
    }

    public var description: String { "\(octets.0).\(octets.1).\(octets.2).\(octets.3)" }

    public static func == (a: Self, b: Self) -> Bool { a.networkOrder == b.networkOrder }
    public func hash(into h: inout Hasher) { h.combine(networkOrder) }
}

/// An interface address with its prefix: "198.18.0.2/24".
public struct IPv4Interface: Equatable, Sendable, CustomStringConvertible {
    public var address: IPv4Address
    public var prefixLength: Int

    public init(address: IPv4Address, prefixLength: Int) {
        precondition((0...32).contains(prefixLength))
        self.address = address
        self.prefixLength = prefixLength
    }

    /// "A.B.C.D/N" (N from 1 to 32).
    public init?(cidr: some StringProtocol) {
        let parts = cidr.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let a = IPv4Address(parts[0]), let n = Int(parts[1]), (1...32).contains(n) else { return nil }
        self.init(address: a, prefixLength: n)
    }

    public var netmask: IPv4Address {
        let host: UInt32 = prefixLength == 0 ? 0 : ~UInt32(0) << (32 - prefixLength)
        return IPv4Address(UInt8(host >> 24), UInt8(host >> 16 & 0xff), UInt8(host >> 8 & 0xff), UInt8(host & 0xff))
    }

    public var description: String { "\(address)/\(prefixLength)" }
}
