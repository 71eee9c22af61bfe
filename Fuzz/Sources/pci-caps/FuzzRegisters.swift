import FuzzSupport
import VirtioPCI

/// A device register space whose contents come from the fuzz input: backed by memory (so what
/// the driver writes reads back, as with most registers), but a read may instead return a value
/// the input chooses (a register that changes by itself: status, generation, queue size). Every
/// access must stay inside `length` (the structure the capability described, or the BAR).
final class FuzzRegisters: RegisterSpace {
    let length: Int
    let name: String
    private var memory: [UInt8]
    /// The device's choices for reads, shared by every space of one device.
    let stream: FuzzStream

    init(_ name: String, length: Int, initial: [UInt8], stream: FuzzStream) {
        self.name = name
        self.length = length
        memory = initial + [UInt8](repeating: 0, count: max(0, length - initial.count))
        self.stream = stream
    }

    private func check(_ o: Int, _ width: Int) {
        invariant(o >= 0 && o + width <= length, "\(width)-byte access at \(o) of the \(length)-byte \(name) structure")
    }

    private func load(_ o: Int, _ width: Int) -> UInt64 {
        check(o, width)
        if let v = stream.volatileRead() { return v }
        var v: UInt64 = 0
        for k in 0..<width { v |= UInt64(memory[o + k]) << (8 * UInt64(k)) }
        return v
    }

    private func store(_ o: Int, _ width: Int, _ v: UInt64) {
        check(o, width)
        for k in 0..<width { memory[o + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) }
    }

    func read8(_ o: Int) -> UInt8 { UInt8(truncatingIfNeeded: load(o, 1)) }
    func read16(_ o: Int) -> UInt16 { UInt16(truncatingIfNeeded: load(o, 2)) }
    func read32(_ o: Int) -> UInt32 { UInt32(truncatingIfNeeded: load(o, 4)) }
    func write8(_ o: Int, _ v: UInt8) { store(o, 1, UInt64(v)) }
    func write16(_ o: Int, _ v: UInt16) { store(o, 2, UInt64(v)) }
    func write32(_ o: Int, _ v: UInt32) { store(o, 4, UInt64(v)) }
}

/// The bytes of the input that decide register reads: one byte per read says whether it is a
/// plain read (high bit clear) or returns the next 4 bytes. Exhausted: every read is plain, so
/// every poll loop ends.
final class FuzzStream {
    var bytes: [UInt8]
    var position = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    private func next() -> UInt8 {
        guard position < bytes.count else { return 0 }
        defer { position += 1 }
        return bytes[position]
    }
    func volatileRead() -> UInt64? {
        guard position < bytes.count else { return nil }
        guard next() & 0x80 != 0 else { return nil }
        return UInt64(next()) | UInt64(next()) << 8 | UInt64(next()) << 16 | UInt64(next()) << 24
    }
}
