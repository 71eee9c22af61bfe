import Synchronization
import VirtioCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The *device* side of a split virtqueue (VIRTIO 1.2 §2.7), stepped by hand from a test.
///
/// It is laid over the same memory as a `SplitVirtqueue` and finds the three areas from the same
/// `SplitRingLayout`: the descriptor table at `descOffset` (§2.7.5); the available ring's flags,
/// idx and ring at `availOffset` + 0/2/4 (§2.7.6); the used ring's flags, idx, 8-byte elements and
/// `avail_event` at `usedOffset` + 0/2/4/4+8·size (§2.7.8). Nothing runs on its own: the test pops
/// what the driver published, then completes it in order, in a permutation or as one element for a
/// batch, or writes whatever a faulty device would (`injectUsed`, `setUsedIdx`).
///
/// The model also checks the *driver*: anything the driver did against the spec (an avail index
/// more than a queue ahead, a descriptor out of the table or already in use, a loop, a readable
/// descriptor after a writable one, descriptors out of ring order under IN_ORDER) is recorded in
/// `violations` rather than trapping, so a test can assert it stays empty.
public final class SplitDeviceModel {
    /// One descriptor of a chain as the device read it (§2.7.5).
    public typealias Segment = DeviceSegment

    /// One available buffer: its head descriptor (the id a used element gives back, §2.7.8) and
    /// its descriptors in chain order.
    public struct Chain: Equatable, Sendable {
        public var headId: UInt16
        /// Descriptor indices, head first.
        public var descriptors: [UInt16]
        public var segments: [Segment]
        /// Bytes the device may write: the largest length a used element may report.
        public var writableBytes: UInt32 {
            segments.reduce(0) { $1.writable ? $0 &+ $1.len : $0 }
        }
    }

    public let memory: UnsafeMutableRawPointer
    public let layout: SplitRingLayout
    /// Whether VIRTIO_F_INDIRECT_DESC is assumed (the model then follows indirect tables, whose
    /// addresses must be real pointers in this process).
    public var indirectNegotiated = false
    /// Whether VIRTIO_F_IN_ORDER is assumed: then the driver must use descriptors in ring order (§2.7.9).
    public let inOrder: Bool
    public var size: Int { layout.size }
    private let mask: UInt16

    /// Next available-ring entry to read, the device's `last_avail_idx` (free-running).
    public private(set) var lastAvail: UInt16 = 0
    /// Next used-ring entry to write; also the used index last published (free-running).
    public private(set) var usedIdx: UInt16 = 0
    /// Chains popped and not yet completed, oldest first.
    public private(set) var pending: [Chain] = []
    /// What the driver did against the spec, in the order seen.
    public private(set) var violations: [String] = []
    /// Descriptors that belong to a popped chain not yet completed.
    private var descriptorInUse: [Bool]
    /// IN_ORDER: the descriptor the driver must use next (free-running).
    private var nextInOrderDescriptor: UInt16 = 0

    /// A device over ring memory laid out by `layout` (normally the memory of a `SplitVirtqueue`).
    public init(memory: UnsafeMutableRawPointer, layout: SplitRingLayout, inOrder: Bool = false) {
        self.memory = memory
        self.layout = layout
        self.inOrder = inOrder
        self.mask = UInt16(truncatingIfNeeded: layout.size - 1)
        self.descriptorInUse = Array(repeating: false, count: layout.size)
    }

    /// Forgets all state, as a device reset does (use after `SplitVirtqueue.reclaimAll`, which
    /// zeroes the rings).
    public func reset() {
        lastAvail = 0; usedIdx = 0; pending = []; nextInOrderDescriptor = 0
        for i in 0..<size { descriptorInUse[i] = false }
    }

    /// Where the device stopped, as vhost-user GET_VRING_BASE reports it: the next avail index.
    public var stoppedBase: UInt32 { UInt32(lastAvail) }

    /// A device started again at `base` (vhost-user SET_VRING_BASE): the avail and used indexes,
    /// and the in-order descriptor sequence, continue from it.
    public func reset(toBase base: UInt32) {
        reset()
        lastAvail = UInt16(truncatingIfNeeded: base); usedIdx = lastAvail; nextInOrderDescriptor = lastAvail
    }

    // MARK: Ring memory

    /// Zeroed, 4 KiB-aligned heap memory for a ring of `size` (with `posix_memalign`), and its
    /// layout. Release it with `freeRing`.
    public static func allocateRing(size: Int) throws -> (UnsafeMutableRawPointer, SplitRingLayout) {
        let layout = try SplitRingLayout(size: size)
        return (zeroedRingMemory(bytes: layout.totalBytes), layout)
    }

    /// Frees memory from `allocateRing`.
    public static func freeRing(_ memory: UnsafeMutableRawPointer) {
        free(memory)
    }

    private func atomic16(_ offset: Int) -> UnsafeMutablePointer<Atomic<UInt16>> {
        (memory + offset).assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    /// `avail->idx` as the driver last published it.
    public var availIdx: UInt16 { atomic16(layout.availOffset + 2).pointee.load(ordering: .acquiring) }
    /// `avail->flags` (VRING_AVAIL_F_NO_INTERRUPT, §2.7.7).
    public var availFlags: UInt16 { memory.load(fromByteOffset: layout.availOffset, as: UInt16.self) }
    /// `used->flags` (VRING_USED_F_NO_NOTIFY, §2.7.10).
    public var usedFlags: UInt16 { atomic16(layout.usedOffset).pointee.load(ordering: .relaxed) }
    /// `avail_event`, at the end of the used ring (§2.7.10).
    public var availEvent: UInt16 { atomic16(layout.usedOffset + 4 + 8 * size).pointee.load(ordering: .relaxed) }

    // MARK: Available ring

    /// Every chain the driver made available since the last call, in avail-ring order (§2.7.13).
    /// Reads `avail->idx` with acquire ordering, then the entries and descriptors it covers.
    /// The chains join `pending`.
    @discardableResult
    public func popAvailable() -> [Chain] {
        let published = availIdx
        let count = published &- lastAvail
        guard Int(count) <= size else {
            violation("avail idx \(published) is \(count) entries past \(lastAvail), more than a queue of \(size)")
            return []
        }
        var chains: [Chain] = []
        chains.reserveCapacity(Int(count))
        for _ in 0..<count {
            let head = memory.load(fromByteOffset: layout.availOffset + 4 + 2 * Int(lastAvail & mask), as: UInt16.self)
            lastAvail &+= 1
            if let chain = readChain(head: head) { chains.append(chain) }
        }
        pending.append(contentsOf: chains)
        return chains
    }

    /// Follows VIRTQ_DESC_F_NEXT from `head`, at most `size` descriptors (§2.7.5.2).
    private func readChain(head: UInt16) -> Chain? {
        var chain = Chain(headId: head, descriptors: [], segments: [])
        var index = head
        while true {
            guard Int(index) < size else {
                violation("chain from \(head) names descriptor \(index) outside a table of \(size)"); return nil
            }
            guard chain.descriptors.count < size else {
                violation("chain from \(head) is longer than the table of \(size) (a loop?)"); return nil
            }
            let d = memory.load(fromByteOffset: layout.descOffset + 16 * Int(index), as: VirtqDesc.self)
            if d.flags & VirtqDesc.flagIndirect != 0 {
                guard indirectNegotiated else { violation("descriptor \(index) is indirect (not negotiated)"); return nil }
                // §2.7.5.3: an indirect descriptor is alone in its chain; its table holds the chain.
                if d.flags & VirtqDesc.flagNext != 0 { violation("indirect descriptor \(index) also has NEXT") }
                if descriptorInUse[Int(index)] { violation("descriptor \(index) made available while still in use") }
                guard d.len % 16 == 0, d.len >= 16, let table = UnsafeRawPointer(bitPattern: UInt(d.addr)) else {
                    violation("indirect descriptor \(index) has table length \(d.len)"); return nil
                }
                let entries = Int(d.len / 16)
                var k = 0
                while true {
                    let e = table.load(fromByteOffset: 16 * k, as: VirtqDesc.self)
                    let w = e.flags & VirtqDesc.flagWrite != 0
                    if e.flags & VirtqDesc.flagIndirect != 0 { violation("nested indirect descriptor in table of \(index)") }
                    if !w, chain.segments.last?.writable == true { violation("indirect table of \(index): readable after writable") }
                    chain.segments.append(Segment(addr: e.addr, len: e.len, writable: w))
                    guard e.flags & VirtqDesc.flagNext != 0 else { break }
                    k = Int(e.next)
                    guard k < entries, chain.segments.count < entries else { violation("indirect table of \(index) overruns"); return nil }
                }
                chain.descriptors.append(index)
                break
            }
            if descriptorInUse[Int(index)] { violation("descriptor \(index) made available while still in use") }
            let writable = d.flags & VirtqDesc.flagWrite != 0
            // §2.7.4.2: device-writable descriptors come after every device-readable one.
            if !writable, chain.segments.last?.writable == true {
                violation("chain from \(head): readable descriptor \(index) after a writable one")
            }
            chain.descriptors.append(index)
            chain.segments.append(Segment(addr: d.addr, len: d.len, writable: writable))
            guard d.flags & VirtqDesc.flagNext != 0 else { break }
            index = d.next
        }
        if inOrder {
            // §2.7.9: the driver uses descriptors in ring order, wrapping at the end of the table.
            for (k, index) in chain.descriptors.enumerated()
            where index != (nextInOrderDescriptor &+ UInt16(truncatingIfNeeded: k)) & mask {
                violation("IN_ORDER: chain from \(head) uses descriptor \(index) out of ring order")
            }
            nextInOrderDescriptor &+= UInt16(truncatingIfNeeded: chain.descriptors.count)
        }
        for index in chain.descriptors { descriptorInUse[Int(index)] = true }
        return chain
    }

    // MARK: Used ring

    /// Completes the `count` oldest pending chains, one used element each, in order (§2.7.8),
    /// then publishes the used index once. `written` gives each chain's length (default: every
    /// writable byte).
    public func completeInOrder(count: Int, written: (Chain) -> UInt32 = { $0.writableBytes }) {
        precondition(count <= pending.count, "completing \(count) of \(pending.count) pending chains")
        var slot = usedIdx
        for chain in pending.prefix(count) {
            writeUsed(at: slot, id: UInt32(chain.headId), len: written(chain))
            release(chain)
            slot &+= 1
        }
        pending.removeFirst(count)
        publishUsed(slot)
    }

    /// Completes the pending chains with heads `ids`, in that order (out of order, §2.7.8), then
    /// publishes the used index once. `lengths[i]` goes with `ids[i]` (default: every writable byte).
    public func complete(ids: [UInt16], lengths: [UInt32]? = nil) {
        precondition(lengths == nil || lengths!.count == ids.count)
        var slot = usedIdx
        for (i, id) in ids.enumerated() {
            guard let at = pending.firstIndex(where: { $0.headId == id }) else {
                preconditionFailure("no pending chain with head \(id)")
            }
            let chain = pending.remove(at: at)
            writeUsed(at: slot, id: UInt32(id), len: lengths?[i] ?? chain.writableBytes)
            release(chain)
            slot &+= 1
        }
        publishUsed(slot)
    }

    /// The in-order batch shortcut (§2.7.9): completes the `count` oldest pending chains with ONE
    /// used element, placed at the batch's first used slot, whose id is the head of the batch's
    /// last chain and whose length is `lastLength` (default: that chain's writable bytes); then
    /// moves the used index by `count`.
    public func completeBatchAsOne(count: Int, lastLength: UInt32? = nil) {
        precondition(count >= 1 && count <= pending.count, "batch of \(count) with \(pending.count) pending")
        let last = pending[count - 1]
        writeUsed(at: usedIdx, id: UInt32(last.headId), len: lastLength ?? last.writableBytes)
        for chain in pending.prefix(count) { release(chain) }
        pending.removeFirst(count)
        publishUsed(usedIdx &+ UInt16(truncatingIfNeeded: count))
    }

    /// Fast forward: pops every newly available chain and completes it at once, in order, with
    /// length 0 (always legal), without building `Chain` values. Tests use it to run thousands
    /// of cheap round trips and bring both indices next to the `UInt16` wrap before the
    /// interesting part. Requires `pending` to be empty. Returns how many chains it completed.
    @discardableResult
    public func echoAvailable() -> Int {
        precondition(pending.isEmpty, "echoAvailable with \(pending.count) chains pending")
        let published = availIdx
        let count = published &- lastAvail
        guard Int(count) <= size else {
            violation("avail idx \(published) is \(count) entries past \(lastAvail), more than a queue of \(size)")
            return 0
        }
        var slot = usedIdx
        for _ in 0..<count {
            let head = memory.load(fromByteOffset: layout.availOffset + 4 + 2 * Int(lastAvail & mask), as: UInt16.self)
            lastAvail &+= 1
            if inOrder {
                if head != nextInOrderDescriptor & mask { violation("IN_ORDER: chain from \(head) out of ring order") }
                var index = head
                var length: UInt16 = 1
                while Int(length) <= size,
                      memory.load(fromByteOffset: layout.descOffset + 16 * Int(index) + 12, as: UInt16.self) & VirtqDesc.flagNext != 0 {
                    index = memory.load(fromByteOffset: layout.descOffset + 16 * Int(index) + 14, as: UInt16.self) & mask
                    length &+= 1
                }
                nextInOrderDescriptor &+= length
            }
            writeUsed(at: slot, id: UInt32(head), len: 0)
            slot &+= 1
        }
        publishUsed(slot)
        return Int(count)
    }

    /// VRING_USED_F_NO_NOTIFY in `used->flags` (§2.7.10): the device does not want kicks.
    public func setNoNotify(_ on: Bool) {
        atomic16(layout.usedOffset).pointee.store(on ? virtqUsedFlagNoNotify : 0, ordering: .releasing)
    }

    /// Writes `avail_event` (§2.7.10, VIRTIO_F_EVENT_IDX): kick me once avail idx passes `value`.
    public func setAvailEvent(_ value: UInt16) {
        atomic16(layout.usedOffset + 4 + 8 * size).pointee.store(value, ordering: .releasing)
    }

    // MARK: Fault knobs (a device that breaks §2.7.8)

    /// Writes a used element with any `id` and `len` at the next used slot and moves the used
    /// index by `advance` (any amount, 0 included). `pending` is left alone.
    public func injectUsed(id: UInt32, len: UInt32, advance: UInt16 = 1) {
        writeUsed(at: usedIdx, id: id, len: len)
        publishUsed(usedIdx &+ advance)
    }

    /// Stores `value` as the used index (a jump forward, a stale value backwards).
    public func setUsedIdx(_ value: UInt16) {
        publishUsed(value)
    }

    /// Writes used element `slot` (free-running; masked here) without publishing it.
    public func writeUsed(at slot: UInt16, id: UInt32, len: UInt32) {
        memory.storeBytes(of: VirtqUsedElem(id: id, len: len),
                          toByteOffset: layout.usedOffset + 4 + 8 * Int(slot & mask), as: VirtqUsedElem.self)
    }

    /// Stores `used->idx` with release ordering: the elements written before are visible first.
    private func publishUsed(_ value: UInt16) {
        usedIdx = value
        atomic16(layout.usedOffset + 2).pointee.store(value, ordering: .releasing)
    }

    private func release(_ chain: Chain) {
        for index in chain.descriptors { descriptorInUse[Int(index)] = false }
    }

    private func violation(_ message: String) {
        violations.append(message)
    }
}

extension SplitDeviceModel: VirtqueueDeviceModel {
    public static var layout: RingLayoutChoice { .split }
    public static var maxUsedID: UInt32 { .max }

    /// A device over the split ring at `addresses` (descriptor table, available and used ring
    /// as `SplitRingLayout` places them), starting at `addresses.base`.
    public convenience init(addresses: QueueAddresses, inOrder: Bool) {
        guard let layout = try? SplitRingLayout(size: addresses.size),
              let desc = UnsafeMutableRawPointer(bitPattern: UInt(addresses.desc)) else {
            preconditionFailure("no split ring at \(addresses)")
        }
        precondition(addresses.avail == addresses.desc + UInt64(layout.availOffset - layout.descOffset)
                     && addresses.used == addresses.desc + UInt64(layout.usedOffset - layout.descOffset),
                     "\(addresses) is not a split ring laid out as SplitRingLayout(size: \(addresses.size))")
        self.init(memory: desc - layout.descOffset, layout: layout, inOrder: inOrder)
        reset(toBase: addresses.base)
    }

    @discardableResult
    public func popBuffers() -> [DeviceBuffer] { popAvailable().map(DeviceBuffer.init) }
    public var pendingBuffers: [DeviceBuffer] { pending.map(DeviceBuffer.init) }
    public var pendingCount: Int { pending.count }
    public var availableCount: Int { Int(availIdx &- lastAvail) }

    public func completeInOrder(count: Int, lengths: [UInt32]?) {
        precondition(lengths == nil || lengths!.count == count)
        var i = 0
        completeInOrder(count: count) { chain in
            defer { i += 1 }
            return lengths?[i] ?? chain.writableBytes
        }
    }

    /// One used element at the next used slot, used index + 1.
    public func injectUsed(id: UInt32, len: UInt32) { injectUsed(id: id, len: len, advance: 1) }
    public var usedBase: UInt32 { UInt32(usedIdx) }

    public var driverSuppressesUsedNotifications: Bool { availFlags & virtqAvailFlagNoInterrupt != 0 }
    /// `avail_event` = `entry` mod 2^16.
    public func setEventIndex(_ entry: Int) { setAvailEvent(UInt16(truncatingIfNeeded: entry)) }
}

extension DeviceBuffer {
    /// A split chain: its head is its ID, its table descriptors its slots.
    public init(_ chain: SplitDeviceModel.Chain) {
        self.init(id: chain.headId, segments: chain.segments, descriptors: chain.descriptors)
    }
}

/// Zeroed, 4 KiB-aligned heap memory for a stand-in device's ring (split or packed); `free` it.
func zeroedRingMemory(bytes: Int) -> UnsafeMutableRawPointer {
    var raw: UnsafeMutableRawPointer?
    let rc = posix_memalign(&raw, 4096, bytes)
    guard rc == 0, let memory = raw else { fatalError("posix_memalign(\(bytes)) failed: \(rc)") }
    memory.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
    return memory
}
