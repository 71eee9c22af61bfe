/// The fuzz input read front to back as a stream of little-endian integers. Past the end every
/// read returns 0 (so a short input is a valid, boring one, and loops driven by it end).
public struct FuzzInput {
    public let base: UnsafePointer<UInt8>?
    public let count: Int
    public private(set) var position = 0

    public init(_ data: UnsafePointer<UInt8>?, _ size: Int) {
        base = data
        count = data == nil ? 0 : size
    }

    /// Whether every byte has been read.
    public var isEmpty: Bool { position >= count }
    public var remaining: Int { Swift.max(0, count - position) }

    public mutating func u8() -> UInt8 {
        guard position < count, let base else { return 0 }
        defer { position += 1 }
        return base[position]
    }
    public mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    public mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    public mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
    public mutating func bool() -> Bool { u8() & 1 != 0 }

    /// A value in `range` (modulo: the bias does not matter to a fuzzer).
    public mutating func int(_ range: ClosedRange<Int>) -> Int {
        let span = UInt64(range.upperBound - range.lowerBound) + 1
        let raw = span <= 0x100 ? UInt64(u8()) : span <= 0x1_0000 ? UInt64(u16()) : UInt64(u32())
        return range.lowerBound + Int(raw % span)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    public mutating func bytes(_ n: Int) -> [UInt8] {
        let k = Swift.min(Swift.max(0, n), remaining)
        guard k > 0, let base else { return [] }
        defer { position += k }
        return Array(UnsafeBufferPointer(start: base + position, count: k))
    }

    /// Exactly `n` bytes: the input's next bytes, zero-padded at the end.
    public mutating func paddedBytes(_ n: Int) -> [UInt8] {
        var b = bytes(n)
        if b.count < n { b += [UInt8](repeating: 0, count: n - b.count) }
        return b
    }

    /// Everything not read yet.
    public mutating func rest() -> [UInt8] { bytes(remaining) }

    /// A 32-bit length that is mostly interesting relative to `limit` (the largest legal value):
    /// at or just under it, just over it, small, or anything at all.
    public mutating func length(around limit: UInt32) -> UInt32 {
        switch u8() & 7 {
        case 0: return limit
        case 1: return limit &+ 1
        case 2: return UInt32(UInt64(u16()) % (UInt64(limit) + 1))
        case 3: return limit &- UInt32(u8() & 3)
        case 4: return UInt32.max &- UInt32(u8() & 3)
        case 5: return UInt32(u8())
        default: return u32()
        }
    }
}

/// A fuzz-checked invariant: traps (so libFuzzer reports the input) with `message` when it
/// does not hold.
@inline(__always)
public func invariant(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
                      file: StaticString = #fileID, line: UInt = #line) {
    if !condition() { fatalError("fuzz invariant violated: \(message())", file: file, line: line) }
}
