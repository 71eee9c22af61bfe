import Synchronization
import VirtioCore
import VirtioTestSupport

/// A minimal packed-ring device (§2.8) for the fuzzer: what `VirtioTestSupport.PackedDeviceModel`
/// does, without its two 64 Ki-entry ID tables (rebuilding them on every reset costs more than a
/// whole fuzz input in a debug build). It pops what the driver made available and writes used
/// descriptors; it checks nothing about the driver (QueueShadow checks the driver's results).
public final class PackedDevice {
    public struct Buffer {
        public var id: UInt16
        public var descriptors: Int
        public var writableBytes: UInt32
        public var segments: [DeviceSegment]
    }

    public let memory: UnsafeMutableRawPointer
    public let layout: PackedRingLayout
    public var size: Int { layout.size }
    public private(set) var availPosition: UInt16 = 0
    public private(set) var availWrap = true
    public private(set) var usedPosition: UInt16 = 0
    public private(set) var usedWrap = true
    public private(set) var pending: [Buffer] = []

    public init(memory: UnsafeMutableRawPointer, layout: PackedRingLayout) {
        self.memory = memory
        self.layout = layout
    }

    public func reset(toBase base: UInt32 = 1 << 15) {
        availPosition = UInt16(base & 0x7fff); availWrap = base & 0x8000 != 0
        usedPosition = availPosition; usedWrap = availWrap
        pending = []
    }

    private func flagsWord(_ position: UInt16) -> UnsafeMutablePointer<Atomic<UInt16>> {
        (memory + layout.descOffset + 16 * Int(position) + 14).assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    private func isAvailable(_ f: UInt16, wrap: Bool) -> Bool {
        (f & PackedDesc.flagAvail != 0) == wrap && (f & PackedDesc.flagUsed != 0) != wrap
    }

    /// Every buffer available at the device's position, in ring order (at most a ring's worth).
    public func popAvailable() {
        var budget = size
        while budget > 0 {
            var pos = availPosition, wrap = availWrap
            var count = 0, writable: UInt32 = 0, id: UInt16 = 0
            var segments: [DeviceSegment] = []
            while count < size {
                let f = flagsWord(pos).pointee.load(ordering: .acquiring)
                guard isAvailable(f, wrap: wrap) else { return }
                let d = memory.load(fromByteOffset: layout.descOffset + 16 * Int(pos), as: PackedDesc.self)
                if f & VirtqDesc.flagWrite != 0 { writable &+= d.len }
                segments.append(DeviceSegment(addr: d.addr, len: d.len, writable: f & VirtqDesc.flagWrite != 0))
                id = d.id
                count += 1
                pos &+= 1
                if Int(pos) == size { pos = 0; wrap.toggle() }
                if f & VirtqDesc.flagNext == 0 { break }
            }
            availPosition = pos; availWrap = wrap
            pending.append(Buffer(id: id, descriptors: count, writableBytes: writable, segments: segments))
            budget -= count
        }
    }

    /// Any descriptor contents at `position` (< size); flags stored last, with release.
    public func writeUsed(at position: UInt16, id: UInt16, len: UInt32, flags: UInt16) {
        let base = layout.descOffset + 16 * Int(position)
        memory.storeBytes(of: len, toByteOffset: base + 8, as: UInt32.self)
        memory.storeBytes(of: id, toByteOffset: base + 12, as: UInt16.self)
        flagsWord(position).pointee.store(flags, ordering: .releasing)
    }

    /// A used descriptor at the used position with this lap's wrap bits (WRITE when `len` > 0),
    /// then the used position moves on by `advance`.
    public func injectUsed(id: UInt16, len: UInt32, advance: Int, wrongWrap: Bool = false) {
        let wrap = usedWrap != wrongWrap
        var f: UInt16 = wrap ? PackedDesc.flagAvail | PackedDesc.flagUsed : 0
        if len > 0 { f |= VirtqDesc.flagWrite }
        writeUsed(at: usedPosition, id: id, len: len, flags: f)
        advanceUsed(advance)
    }

    private func advanceUsed(_ n: Int) {
        for _ in 0..<n {
            usedPosition &+= 1
            if Int(usedPosition) == size { usedPosition = 0; usedWrap.toggle() }
        }
    }

    /// Completes pending buffers `indices` (positions in `pending`, distinct), in that order,
    /// one used descriptor each.
    public func complete(indices: [Int], lengths: [UInt32]) {
        for (k, i) in indices.enumerated() {
            let b = pending[i]
            injectUsed(id: b.id, len: lengths[k], advance: b.descriptors)
        }
        for i in indices.sorted(by: >) { pending.remove(at: i) }
    }

    /// One used descriptor for the `count` oldest pending buffers (§2.8.11).
    public func completeBatchAsOne(count: Int, lastLength: UInt32) {
        let last = pending[count - 1]
        let descriptors = pending.prefix(count).reduce(0) { $0 + $1.descriptors }
        injectUsed(id: last.id, len: lastLength, advance: descriptors)
        pending.removeFirst(count)
    }

    public func setDeviceEvent(flags: UInt16, offWrap: UInt16) {
        (memory + layout.deviceEventOffset).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.store(offWrap, ordering: .releasing)
        (memory + layout.deviceEventOffset + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.store(flags, ordering: .releasing)
    }
}
