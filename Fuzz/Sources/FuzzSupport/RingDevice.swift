import VirtioCore
import VirtioTestSupport

/// The device side of one queue of a device under test (net, blk), either layout: the split
/// ring through VirtioTestSupport's SplitDeviceModel, the packed ring through PackedDevice.
/// Buffers are completed by their position in `pending` (oldest first).
public final class RingDevice {
    public struct Buffer {
        public var id: UInt16
        public var segments: [DeviceSegment]
        public var writableBytes: UInt32
    }

    enum Model { case split(SplitDeviceModel), packed(PackedDevice) }
    let model: Model

    /// The device for the queue a transport was given at `addresses` (pointers in this process).
    public init(layout: RingLayoutChoice, addresses a: QueueAddresses, inOrder: Bool, indirect: Bool) {
        if layout == .packed {
            let l = try! PackedRingLayout(size: a.size)
            let d = PackedDevice(memory: UnsafeMutableRawPointer(bitPattern: UInt(a.desc))! - l.descOffset, layout: l)
            d.reset(toBase: a.base)
            model = .packed(d)
        } else {
            let m = SplitDeviceModel(addresses: a, inOrder: inOrder)
            m.indirectNegotiated = indirect
            model = .split(m)
        }
    }

    public var size: Int {
        switch model { case .split(let m): m.size; case .packed(let d): d.size }
    }

    /// Buffers made available and not completed yet, oldest first.
    public var pending: [Buffer] {
        switch model {
        case .split(let m): return m.pending.map { Buffer(id: $0.headId, segments: $0.segments, writableBytes: $0.writableBytes) }
        case .packed(let d): return d.pending.map { Buffer(id: $0.id, segments: $0.segments, writableBytes: $0.writableBytes) }
        }
    }

    public func pop() {
        switch model { case .split(let m): m.popAvailable(); case .packed(let d): d.popAvailable() }
    }

    /// Completes `pending[indices[k]]` with `lengths[k]`, in that order (distinct indices).
    public func complete(indices: [Int], lengths: [UInt32]) {
        switch model {
        case .split(let m):
            let p = m.pending
            var ids: [UInt16] = [], lens: [UInt32] = []
            for (k, i) in indices.enumerated() where !ids.contains(p[i].headId) { ids.append(p[i].headId); lens.append(lengths[k]) }
            m.complete(ids: ids, lengths: lens)
        case .packed(let d): d.complete(indices: indices, lengths: lengths)
        }
    }

    /// One used entry for the `count` oldest pending buffers (in-order batch).
    public func completeBatchAsOne(count: Int, lastLength: UInt32) {
        switch model {
        case .split(let m): m.completeBatchAsOne(count: count, lastLength: lastLength)
        case .packed(let d): d.completeBatchAsOne(count: count, lastLength: lastLength)
        }
    }

    /// A used entry with any id and length at the next used slot.
    public func injectUsed(id: UInt32, len: UInt32) {
        switch model {
        case .split(let m): m.injectUsed(id: id, len: len)
        case .packed(let d): d.injectUsed(id: UInt16(truncatingIfNeeded: id), len: len, advance: 1)
        }
    }

    /// Forgets everything, as after a device reset (the ring was reset too).
    public func reset(toBase base: UInt32) {
        switch model { case .split(let m): m.reset(toBase: base); case .packed(let d): d.reset(toBase: base) }
    }

    /// A step of the device, as the input says: pop, complete some buffers (in order, in any
    /// order, or as one batch; lengths mostly what `length` proposes), or write a bogus used
    /// entry. `prepare(buffer, &input)` writes into a buffer before it is completed (a header,
    /// a status byte) and returns the length to report.
    public func step(_ input: inout FuzzInput, prepare: (Buffer, inout FuzzInput) -> UInt32) {
        switch input.u8() % 8 {
        case 0, 1: pop()
        case 2, 3, 4:
            let p = pending
            let k = input.int(0...Swift.min(p.count, 16))
            var indices = Array(0..<k)
            if input.u8() & 3 == 0 {
                var left = Array(p.indices)
                indices = []
                for _ in 0..<k { indices.append(left.remove(at: input.int(0...left.count - 1))) }
            }
            var lengths: [UInt32] = []
            for i in indices { lengths.append(prepare(p[i], &input)) }
            complete(indices: indices, lengths: lengths)
        case 5:
            let p = pending
            guard !p.isEmpty else { return }
            let k = input.int(1...p.count)
            completeBatchAsOne(count: k, lastLength: prepare(p[k - 1], &input))
        case 6:
            // Rare: a used entry the driver must refuse.
            guard input.u8() & 7 == 0 else { return }
            let p = pending
            let id: UInt32 = p.isEmpty || input.bool() ? input.u32() % UInt32(2 * size + 1) : UInt32(p[input.int(0...p.count - 1)].id)
            injectUsed(id: id, len: input.length(around: 2048))
        default:
            pop()
            let p = pending
            var lengths: [UInt32] = []
            for b in p { lengths.append(prepare(b, &input)) }
            complete(indices: Array(p.indices), lengths: lengths)
        }
    }
}
