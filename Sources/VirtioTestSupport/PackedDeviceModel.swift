import Synchronization
import VirtioCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The *device* side of a packed virtqueue (VIRTIO 1.2 §2.8), stepped by hand from a test.
///
/// It is laid over the same memory as a `PackedVirtqueue` and finds the three areas from the same
/// `PackedRingLayout`: the descriptor ring at `descOffset` (16 bytes a descriptor, flags at +14,
/// §2.8.13), the driver event suppression area at `driverEventOffset` and the device event
/// suppression area at `deviceEventOffset` (off_wrap at +0, flags at +2, §2.8.14).
///
/// Like the driver, the device keeps its own position and ring wrap counter (both counters start
/// at 1, §2.8.1) for the descriptors it reads (`availPosition`, `availWrap`) and for the used
/// descriptors it writes (`usedPosition`, `usedWrap`). Nothing runs on its own: the test pops
/// what the driver made available, then completes it in order, in a given order or as one used
/// descriptor for an in-order batch (§2.8.11), or writes whatever a faulty device would
/// (`writeUsed`, `injectUsed`, `injectUsedWithWrongWrap`).
///
/// The model also checks the *driver*: a chain longer than the ring, a descriptor of a chain
/// that is not available with the head's wrap counter, a readable descriptor after a writable one,
/// a buffer ID reused while in flight — each is recorded in `violations` rather than trapping.
public final class PackedDeviceModel {
    /// One descriptor of a buffer as the device read it (§2.8.4): the same as the split model's.
    public typealias Segment = DeviceSegment

    /// One available buffer: its buffer ID (from the chain's last descriptor, §2.8.6), where it
    /// starts in the ring and its descriptors in order.
    public struct Buffer: Equatable, Sendable {
        public let id: UInt16
        /// Ring position of its first descriptor, and the driver wrap counter it was read with.
        public let position: UInt16
        public let wrap: Bool
        public let segments: [Segment]
        /// Bytes the device may write: the largest length a used descriptor may report.
        public let writableBytes: UInt32
        /// Descriptors the buffer takes in the ring: how far a used descriptor for it moves the
        /// used position (§2.8.6).
        public var descriptorCount: Int { segments.count }

        public init(id: UInt16, position: UInt16, wrap: Bool, segments: [Segment]) {
            var w: UInt32 = 0
            for s in segments where s.writable { w &+= s.len }
            self.init(id: id, position: position, wrap: wrap, segments: segments, writableBytes: w)
        }

        init(id: UInt16, position: UInt16, wrap: Bool, segments: [Segment], writableBytes: UInt32) {
            self.id = id; self.position = position; self.wrap = wrap; self.segments = segments
            self.writableBytes = writableBytes
        }
    }

    public let memory: UnsafeMutableRawPointer
    public let layout: PackedRingLayout
    public var size: Int { layout.size }

    /// Next ring position to read a driver descriptor from, and the wrap counter it must carry.
    public private(set) var availPosition: UInt16 = 0
    public private(set) var availWrap = true
    /// Next ring position to write a used descriptor at, and the device ring wrap counter.
    public private(set) var usedPosition: UInt16 = 0
    public private(set) var usedWrap = true
    /// What the driver did against the spec, in the order seen.
    public private(set) var violations: [String] = []
    /// Buffers popped and not yet completed, oldest first (a deque: `pendingHead` is the oldest).
    private var pendingStorage: [Buffer] = []
    private var pendingHead = 0
    /// Buffer IDs popped and not yet completed (to catch an ID the driver reuses too early).
    private var idInFlight: [Bool]
    /// Scratch for `complete(ids:)`: index in `pendingStorage` by buffer ID, -1 when none.
    private var indexOfID: [Int]

    /// A device over ring memory laid out by `layout` (normally the memory of a `PackedVirtqueue`).
    public init(memory: UnsafeMutableRawPointer, layout: PackedRingLayout) {
        self.memory = memory
        self.layout = layout
        idInFlight = Array(repeating: false, count: 1 << 16)
        indexOfID = Array(repeating: -1, count: 1 << 16)
    }

    /// Buffers popped and not yet completed, oldest first.
    public var pending: ArraySlice<Buffer> { pendingStorage[pendingHead...] }
    public var pendingCount: Int { pendingStorage.count - pendingHead }
    /// The `i`th oldest pending buffer (0 is the oldest).
    public func pending(_ i: Int) -> Buffer { pendingStorage[pendingHead + i] }

    /// Forgets all state, as a device reset does (use after `PackedVirtqueue.reclaimAll`, which
    /// zeroes the ring).
    public func reset() {
        availPosition = 0; availWrap = true; usedPosition = 0; usedWrap = true
        pendingStorage = []; pendingHead = 0
        // A new table rather than a loop over 65,536 entries (slow in debug builds).
        idInFlight = Array(repeating: false, count: 1 << 16)
    }

    /// Where the device stopped, as vhost-user GET_VRING_BASE reports it: the next position to
    /// read, with its wrap counter in bit 15.
    public var stoppedBase: UInt32 { UInt32(availPosition) | (availWrap ? 1 << 15 : 0) }

    /// A device started again at `base` (vhost-user SET_VRING_BASE): reads and writes continue at
    /// that position and wrap counter; everything pending is forgotten.
    public func reset(toBase base: UInt32) {
        reset()
        availPosition = UInt16(base & 0x7fff); availWrap = base & 0x8000 != 0
        usedPosition = availPosition; usedWrap = availWrap
    }

    // MARK: Ring memory

    /// Zeroed, 4 KiB-aligned heap memory for a ring of `size` (with `posix_memalign`), and its
    /// layout. Release it with `freeRing`.
    public static func allocateRing(size: Int) throws -> (UnsafeMutableRawPointer, PackedRingLayout) {
        let layout = try PackedRingLayout(size: size)
        return (zeroedRingMemory(bytes: layout.totalBytes), layout)
    }

    /// Frees memory from `allocateRing`.
    public static func freeRing(_ memory: UnsafeMutableRawPointer) {
        free(memory)
    }

    private func atomic16(_ offset: Int) -> UnsafeMutablePointer<Atomic<UInt16>> {
        (memory + offset).assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    /// Descriptor `position`'s flags, read with acquire ordering: what the driver wrote before
    /// them is visible once they are (§2.8.21.1).
    public func flags(at position: UInt16) -> UInt16 {
        atomic16(layout.descOffset + 16 * Int(position) + 14).pointee.load(ordering: .acquiring)
    }

    /// The descriptor at `position` as it is in memory now (flags read with acquire first).
    public func descriptor(at position: UInt16) -> PackedDesc {
        let f = flags(at: position)
        var d = memory.load(fromByteOffset: layout.descOffset + 16 * Int(position), as: PackedDesc.self)
        d.flags = f
        return d
    }

    /// Driver event suppression flags (§2.8.14): RING_EVENT_FLAGS_ENABLE/DISABLE/DESC for used
    /// buffer notifications. A poll-mode driver writes DISABLE.
    public var driverEventFlags: UInt16 { atomic16(layout.driverEventOffset + 2).pointee.load(ordering: .acquiring) }
    /// Driver event suppression off_wrap (offset in bits 0–14, wrap counter in bit 15).
    public var driverEventOffWrap: UInt16 { atomic16(layout.driverEventOffset).pointee.load(ordering: .acquiring) }

    // MARK: Available descriptors

    /// Every buffer the driver made available since the last call, in ring order (§2.8.21): a
    /// descriptor is available when its AVAIL bit equals the device's avail wrap counter and its
    /// USED bit does not. Chains (VIRTQ_DESC_F_NEXT) occupy consecutive positions, wrapping at
    /// `size`; the buffer ID is the last descriptor's. The buffers join `pending`.
    @discardableResult
    public func popAvailable() -> [Buffer] {
        var buffers: [Buffer] = []
        while let buffer = readBuffer() {
            buffers.append(buffer)
        }
        pendingStorage.append(contentsOf: buffers)
        return buffers
    }

    private func isAvailable(_ f: UInt16, wrap: Bool) -> Bool {
        (f & PackedDesc.flagAvail != 0) == wrap && (f & PackedDesc.flagUsed != 0) != wrap
    }

    /// Reads one buffer at `availPosition`; nil when the descriptor there is not available or the
    /// chain is broken (then a violation is recorded and the device stops reading).
    private func readBuffer() -> Buffer? {
        let start = availPosition, startWrap = availWrap
        var pos = start, wrap = startWrap
        guard isAvailable(flags(at: pos), wrap: wrap) else { return nil }
        var segments: [Segment] = []
        var id: UInt16 = 0
        var writableBytes: UInt32 = 0
        while true {
            guard segments.count < size else {
                violation("chain at \(start) is longer than the ring of \(size)"); return nil
            }
            let f = flags(at: pos)
            guard isAvailable(f, wrap: wrap) else {
                violation("chain at \(start): descriptor \(pos) is not available (flags \(hex(f)), wrap \(wrap))")
                return nil
            }
            let d = memory.load(fromByteOffset: layout.descOffset + 16 * Int(pos), as: PackedDesc.self)
            let writable = f & VirtqDesc.flagWrite != 0
            if f & VirtqDesc.flagIndirect != 0 { violation("descriptor \(pos) is indirect (not negotiated)") }
            // §2.8.17: device-writable elements come after every device-readable one.
            if !writable, segments.last?.writable == true {
                violation("chain at \(start): readable descriptor \(pos) after a writable one")
            }
            segments.append(Segment(addr: d.addr, len: d.len, writable: writable))
            if writable { writableBytes &+= d.len }
            id = d.id      // the buffer ID is the last descriptor's (§2.8.6)
            pos &+= 1
            if Int(pos) == size { pos = 0; wrap.toggle() }
            if f & VirtqDesc.flagNext == 0 { break }
        }
        if Int(id) >= size { violation("buffer at \(start) has ID \(id) outside a ring of \(size)") }
        if idInFlight[Int(id)] { violation("buffer ID \(id) made available again while in flight") }
        idInFlight[Int(id)] = true
        availPosition = pos; availWrap = wrap
        return Buffer(id: id, position: start, wrap: startWrap, segments: segments, writableBytes: writableBytes)
    }

    /// Uses every available buffer at once, in ring order, each with its own used descriptor
    /// carrying its writable byte count, with nothing allocated (for benchmarks): what
    /// `popAvailable` + `completeInOrder` do, without the bookkeeping. Expects nothing pending.
    /// Returns how many buffers.
    @discardableResult
    public func echoAvailable() -> Int {
        precondition(pendingCount == 0, "echoAvailable with buffers pending")
        var n = 0
        while isAvailable(flags(at: availPosition), wrap: availWrap) {
            var id: UInt16 = 0, written: UInt32 = 0, count = 0
            while true {
                let f = flags(at: availPosition)
                let d = memory.load(fromByteOffset: layout.descOffset + 16 * Int(availPosition), as: PackedDesc.self)
                if f & VirtqDesc.flagWrite != 0 { written &+= d.len }
                id = d.id
                count += 1
                availPosition &+= 1
                if Int(availPosition) == size { availPosition = 0; availWrap.toggle() }
                if f & VirtqDesc.flagNext == 0 { break }
            }
            writeUsedAndAdvance(id: id, len: written, descriptors: count)
            n += 1
        }
        return n
    }

    // MARK: Used descriptors

    /// Completes the `count` oldest pending buffers in order, one used descriptor each at the
    /// used position (§2.8.7, §2.8.22). `written` gives each buffer's length (default: every
    /// writable byte).
    public func completeInOrder(count: Int, written: (Buffer) -> UInt32 = { $0.writableBytes }) {
        precondition(count >= 0 && count <= pendingCount, "completing \(count) of \(pendingCount) pending buffers")
        for i in 0..<count {
            let buffer = pendingStorage[pendingHead + i]
            writeUsedAndAdvance(id: buffer.id, len: written(buffer), descriptors: buffer.descriptorCount)
            idInFlight[Int(buffer.id)] = false
        }
        dropOldest(count)
    }

    /// Completes the pending buffers with IDs `ids`, in that order (out of order). `lengths[i]`
    /// goes with `ids[i]` (default: every writable byte).
    public func complete(ids: [UInt16], lengths: [UInt32]? = nil) {
        precondition(lengths == nil || lengths!.count == ids.count)
        guard !ids.isEmpty else { return }
        // (Plain loops over an ID-indexed table: this runs millions of times in debug builds.)
        for i in pendingHead..<pendingStorage.count { indexOfID[Int(pendingStorage[i].id)] = i }
        for i in 0..<ids.count {
            let id = ids[i]
            let at = indexOfID[Int(id)]
            precondition(at >= 0, "no pending buffer with ID \(id)")
            indexOfID[Int(id)] = -1
            let buffer = pendingStorage[at]
            writeUsedAndAdvance(id: id, len: lengths?[i] ?? buffer.writableBytes, descriptors: buffer.descriptorCount)
            idInFlight[Int(id)] = false
        }
        // Keep the rest, oldest first.
        var kept = pendingHead
        for i in pendingHead..<pendingStorage.count {
            let id = Int(pendingStorage[i].id)
            guard indexOfID[id] == i else { continue }
            indexOfID[id] = -1
            if kept != i { pendingStorage.swapAt(kept, i) }
            kept += 1
        }
        pendingStorage.removeSubrange(kept...)
        dropOldest(0)
    }

    /// The in-order batch shortcut (§2.8.11): completes the `count` oldest pending buffers with
    /// ONE used descriptor, written at the used position (the batch's first buffer's position
    /// when everything so far was in order), carrying the ID of the batch's last buffer and
    /// `lastLength` (default: that buffer's writable bytes); then skips the used position past
    /// every descriptor of the batch.
    public func completeBatchAsOne(count: Int, lastLength: UInt32? = nil) {
        precondition(count >= 1 && count <= pendingCount, "batch of \(count) with \(pendingCount) pending")
        let last = pendingStorage[pendingHead + count - 1]
        var descriptors = 0
        for i in pendingHead..<pendingHead + count {
            descriptors += pendingStorage[i].descriptorCount
            idInFlight[Int(pendingStorage[i].id)] = false
        }
        writeUsedAndAdvance(id: last.id, len: lastLength ?? last.writableBytes, descriptors: descriptors)
        dropOldest(count)
    }

    private func dropOldest(_ count: Int) {
        pendingHead += count
        // Compact now and then, not every call (this runs millions of times in debug builds).
        if pendingHead >= 1024 {
            pendingStorage.removeFirst(pendingHead); pendingHead = 0
        }
    }

    /// Writes a used descriptor at the used position with the device's wrap counter, then moves
    /// the position on by `descriptors` (toggling the wrap counter each time it passes the end).
    private func writeUsedAndAdvance(id: UInt16, len: UInt32, descriptors: Int) {
        writeUsed(at: usedPosition, id: id, len: len, wrap: usedWrap)
        advanceUsed(by: descriptors)
    }

    private func advanceUsed(by descriptors: Int) {
        for _ in 0..<descriptors {
            usedPosition &+= 1
            if Int(usedPosition) == size { usedPosition = 0; usedWrap.toggle() }
        }
    }

    // MARK: Event suppression

    /// Writes the device event suppression area (§2.8.14), which tells the *driver* when to send
    /// available buffer notifications: `offWrap` (descriptor offset in bits 0–14, wrap counter in
    /// bit 15) first, then `flags` (PackedEventFlags.enable/disable/desc) with release ordering.
    public func setDeviceEvent(flags: UInt16, offWrap: UInt16 = 0) {
        atomic16(layout.deviceEventOffset).pointee.store(offWrap, ordering: .releasing)
        atomic16(layout.deviceEventOffset + 2).pointee.store(flags, ordering: .releasing)
    }

    /// `off_wrap` for "notify me when the descriptor at `position` is made available with driver
    /// wrap counter `wrap`".
    public static func offWrap(position: UInt16, wrap: Bool) -> UInt16 {
        position & 0x7fff | (wrap ? 1 << 15 : 0)
    }

    // MARK: Fault knobs (a device that breaks §2.8)

    /// Writes a used descriptor at `position` with any ID and length, AVAIL and USED both set to
    /// `wrap` (VIRTQ_DESC_F_WRITE when `len` > 0), flags last with release ordering. Changes no
    /// device state.
    public func writeUsed(at position: UInt16, id: UInt16, len: UInt32, wrap: Bool) {
        var f: UInt16 = wrap ? PackedDesc.flagAvail | PackedDesc.flagUsed : 0
        if len > 0 { f |= VirtqDesc.flagWrite }
        writeUsed(at: position, id: id, len: len, flags: f)
    }

    /// Writes descriptor `position` with any flags (the wrap bits included), ID and length; the
    /// flags are stored last, with release ordering. Changes no device state. (A test can also
    /// use it to write what a broken *driver* would.)
    public func writeUsed(at position: UInt16, id: UInt16, len: UInt32, flags: UInt16) {
        precondition(Int(position) < size)
        let base = layout.descOffset + 16 * Int(position)
        memory.storeBytes(of: len, toByteOffset: base + 8, as: UInt32.self)
        memory.storeBytes(of: id, toByteOffset: base + 12, as: UInt16.self)
        atomic16(base + 14).pointee.store(flags, ordering: .releasing)
    }

    /// Writes a used descriptor with any `id` and `len` at the used position and the right wrap
    /// counter, then moves the used position on by `advance` descriptors. `pending` is left alone.
    public func injectUsed(id: UInt16, len: UInt32, advance: Int = 1) {
        writeUsed(at: usedPosition, id: id, len: len, wrap: usedWrap)
        advanceUsed(by: advance)
    }

    /// Writes a used descriptor at the used position whose AVAIL and USED bits carry the
    /// *inverse* of the device's wrap counter (a used descriptor of another lap). No state moves.
    public func injectUsedWithWrongWrap(id: UInt16, len: UInt32) {
        writeUsed(at: usedPosition, id: id, len: len, wrap: !usedWrap)
    }

    private func violation(_ message: String) {
        violations.append(message)
    }

    private func hex(_ v: UInt16) -> String { "0x" + String(v, radix: 16) }
}

extension PackedDeviceModel: VirtqueueDeviceModel {
    public static var layout: RingLayoutChoice { .packed }
    public static var maxUsedID: UInt32 { UInt32(UInt16.max) }

    /// A device over the packed ring at `addresses` (descriptor ring, driver and device event
    /// suppression areas as `PackedRingLayout` places them), starting at `addresses.base`.
    /// `inOrder` changes nothing here.
    public convenience init(addresses: QueueAddresses, inOrder: Bool) {
        guard let layout = try? PackedRingLayout(size: addresses.size),
              let desc = UnsafeMutableRawPointer(bitPattern: UInt(addresses.desc)) else {
            preconditionFailure("no packed ring at \(addresses)")
        }
        precondition(addresses.avail == addresses.desc + UInt64(layout.driverEventOffset - layout.descOffset)
                     && addresses.used == addresses.desc + UInt64(layout.deviceEventOffset - layout.descOffset),
                     "\(addresses) is not a packed ring laid out as PackedRingLayout(size: \(addresses.size))")
        self.init(memory: desc - layout.descOffset, layout: layout)
        reset(toBase: addresses.base)
    }

    // (Plain loops, not `map`: the EveryLayout tests convert millions of buffers in debug builds.)
    @discardableResult
    public func popBuffers() -> [DeviceBuffer] { Self.deviceBuffers(popAvailable()[...], ringSize: size) }
    public var pendingBuffers: [DeviceBuffer] { Self.deviceBuffers(pending, ringSize: size) }

    private static func deviceBuffers(_ buffers: ArraySlice<Buffer>, ringSize: Int) -> [DeviceBuffer] {
        var out: [DeviceBuffer] = []
        out.reserveCapacity(buffers.count)
        for b in buffers { out.append(DeviceBuffer(b, ringSize: ringSize)) }
        return out
    }

    /// Walks the descriptors from `availPosition` while they are available with the right wrap
    /// counter, counting the chains that end there (at most a ring's worth).
    public var availableCount: Int {
        var pos = availPosition, wrap = availWrap
        var buffers = 0
        for _ in 0..<size {
            let f = flags(at: pos)
            guard isAvailable(f, wrap: wrap) else { break }
            if f & VirtqDesc.flagNext == 0 { buffers += 1 }
            pos &+= 1
            if Int(pos) == size { pos = 0; wrap.toggle() }
        }
        return buffers
    }

    public func completeInOrder(count: Int, lengths: [UInt32]?) {
        precondition(lengths == nil || lengths!.count == count)
        var i = 0
        completeInOrder(count: count) { buffer in
            defer { i += 1 }
            return lengths?[i] ?? buffer.writableBytes
        }
    }

    /// One used descriptor at the used position with the right wrap counter; the used position
    /// moves on by one.
    public func injectUsed(id: UInt32, len: UInt32) {
        precondition(id <= Self.maxUsedID, "a packed buffer ID has 16 bits; \(id) does not fit")
        injectUsed(id: UInt16(id), len: len, advance: 1)
    }
    public var usedBase: UInt32 { UInt32(usedPosition) | (usedWrap ? 1 << 15 : 0) }

    public var driverSuppressesUsedNotifications: Bool { driverEventFlags == PackedEventFlags.disable }
    public func setNoNotify(_ on: Bool) {
        setDeviceEvent(flags: on ? PackedEventFlags.disable : PackedEventFlags.enable)
    }
    /// Flags DESC, `off_wrap` = position `entry` mod `size` in lap `entry / size` (the wrap
    /// counter is 1 in even laps, §2.8.1); laps repeat every two, so `entry` counts mod 2·size.
    public func setEventIndex(_ entry: Int) {
        let twoLaps = 2 * size
        let e = (entry % twoLaps + twoLaps) % twoLaps
        setDeviceEvent(flags: PackedEventFlags.desc,
                       offWrap: Self.offWrap(position: UInt16(e % size), wrap: e < size))
    }
}

extension DeviceBuffer {
    /// A packed buffer: its buffer ID, and the consecutive ring positions from where it starts.
    public init(_ buffer: PackedDeviceModel.Buffer, ringSize: Int) {
        var descriptors: [UInt16] = [buffer.position]
        var pos = Int(buffer.position)
        for _ in 1..<max(1, buffer.descriptorCount) {
            pos += 1
            if pos == ringSize { pos = 0 }
            descriptors.append(UInt16(pos))
        }
        self.init(id: buffer.id, segments: buffer.segments, descriptors: descriptors, writableBytes: buffer.writableBytes)
    }
}
