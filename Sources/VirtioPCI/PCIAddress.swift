/// A PCI function address, `DDDD:BB:DD.F` (domain, bus, device, function), as sysfs names it.
public struct PCIAddress: Hashable, Sendable, CustomStringConvertible {
    public var domain: UInt32
    public var bus: UInt8
    public var device: UInt8
    public var function: UInt8

    public init(domain: UInt32 = 0, bus: UInt8, device: UInt8, function: UInt8) {
        self.domain = domain; self.bus = bus; self.device = device; self.function = function
    }

    /// Parses `0000:00:04.0` or `00:04.0` (domain 0). Device is 0...31, function 0...7.
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2 || parts.count == 3 else { return nil }
        let df = parts.last!.split(separator: ".", omittingEmptySubsequences: false)
        guard df.count == 2 else { return nil }
        func hex(_ s: Substring, digits: ClosedRange<Int>) -> UInt32? {
            guard digits.contains(s.count), s.allSatisfy(\.isHexDigit) else { return nil }
            return UInt32(s, radix: 16)
        }
        let domainText: Substring = parts.count == 3 ? parts[0] : "0"
        guard let d = hex(domainText, digits: 1...4), let b = hex(parts[parts.count - 2], digits: 1...2),
              let dev = hex(df[0], digits: 1...2), dev < 32, let f = hex(df[1], digits: 1...1), f < 8 else { return nil }
        self.init(domain: d, bus: UInt8(b), device: UInt8(dev), function: UInt8(f))
    }

    public var description: String {
        func h(_ v: UInt32, _ n: Int) -> String {
            let s = String(v, radix: 16)
            return String(repeating: "0", count: max(0, n - s.count)) + s
        }
        return "\(h(domain, 4)):\(h(UInt32(bus), 2)):\(h(UInt32(device), 2)).\(h(UInt32(function), 1))"
    }
}
