import VirtioCore

/// One descriptor of a buffer as the device read it (split §2.7.5, packed §2.8.4).
public struct DeviceSegment: Equatable, Sendable {
    public var addr: UInt64
    public var len: UInt32
    /// VIRTQ_DESC_F_WRITE: the device may write this part.
    public var writable: Bool
    public init(addr: UInt64, len: UInt32, writable: Bool) {
        self.addr = addr; self.len = len; self.writable = writable
    }
}

/// One available buffer as the device read it, the same for both layouts.
public struct DeviceBuffer: Equatable, Sendable, CustomStringConvertible {
    /// What a used entry names to give it back: split, the head descriptor's index (§2.7.8);
    /// packed, the buffer ID of its last descriptor (§2.8.6).
    public var id: UInt16
    /// Its descriptors' contents, in chain order (an indirect table's entries for split).
    public var segments: [DeviceSegment]
    /// The ring slots it takes, first to last: split, indices in the descriptor table (one for an
    /// indirect table); packed, positions in the descriptor ring (consecutive, wrapping at the end).
    public var descriptors: [UInt16]
    /// Bytes the device may write: the largest length a used entry for it may report.
    public var writableBytes: UInt32
    /// Ring descriptors it takes (split with an indirect table: 1).
    public var descriptorCount: Int { descriptors.count }

    public init(id: UInt16, segments: [DeviceSegment], descriptors: [UInt16]) {
        var writable: UInt32 = 0
        for s in segments where s.writable { writable &+= s.len }
        self.init(id: id, segments: segments, descriptors: descriptors, writableBytes: writable)
    }

    init(id: UInt16, segments: [DeviceSegment], descriptors: [UInt16], writableBytes: UInt32) {
        self.id = id; self.segments = segments; self.descriptors = descriptors; self.writableBytes = writableBytes
    }

    public var description: String {
        "buffer \(id) at \(descriptors): " + segments.map { "\($0.len)\($0.writable ? "w" : "r")@0x\(String($0.addr, radix: 16))" }
            .joined(separator: " ")
    }
}

/// The device side of a virtqueue, whatever its layout, as the tests step it: `SplitDeviceModel`
/// (§2.7) and `PackedDeviceModel` (§2.8) both conform. A test generic over it is written once and
/// runs on both ring layouts; what only one layout has (split: the used index, indirect tables;
/// packed: wrap counters, event offsets) stays on the concrete models.
///
/// Buffers come out as `DeviceBuffer`s and are completed by the `id` they carry. Positions are
/// reported as vhost-user bases (split: a free-running index; packed: a position with the ring
/// wrap counter in bit 15), like `QueueAddresses.base`.
///
/// There is no common knob for a corrupt *used position*: split has a used index a device can
/// move too far or backwards (`SplitDeviceModel.setUsedIdx`, `VirtqueueError.usedIndexJump`),
/// packed has none and instead wrap bits a device can get wrong
/// (`PackedDeviceModel.injectUsedWithWrongWrap`, `.usedWrapMismatch`).
public protocol VirtqueueDeviceModel: AnyObject {
    /// How the model's layout describes ring memory (`SplitRingLayout`, `PackedRingLayout`).
    associatedtype RingLayout
    /// `.split` or `.packed`: the `Virtqueue.layout` of the queues this model serves.
    static var layout: RingLayoutChoice { get }
    /// Zeroed, 4 KiB-aligned heap memory for a ring of `size`, and its layout; release it with
    /// `freeRing`.
    static func allocateRing(size: Int) throws -> (UnsafeMutableRawPointer, RingLayout)
    /// Frees memory from `allocateRing`.
    static func freeRing(_ memory: UnsafeMutableRawPointer)
    /// The largest ID a used entry can carry: split, a 32-bit `id` (§2.7.8); packed, a 16-bit
    /// buffer ID (§2.8.13).
    static var maxUsedID: UInt32 { get }

    /// A device over the ring a queue in this process describes with `addresses` (as the
    /// transport would send them: the addresses are pointers here), starting at
    /// `addresses.base`. `inOrder`: VIRTIO_F_IN_ORDER was negotiated (the split model then
    /// checks that the driver uses descriptors in ring order; the packed model keeps no
    /// in-order rules of its own).
    init(addresses: QueueAddresses, inOrder: Bool)
    var size: Int { get }
    /// What the driver did against the spec, in the order seen.
    var violations: [String] { get }

    // MARK: Available side

    /// Every buffer the driver made available since the last call, in ring order; they join
    /// `pendingBuffers`.
    @discardableResult func popBuffers() -> [DeviceBuffer]
    /// Buffers popped and not yet completed, oldest first.
    var pendingBuffers: [DeviceBuffer] { get }
    var pendingCount: Int { get }
    /// Buffers the driver has made available that the device has not popped yet. Reads the
    /// ring and changes nothing.
    var availableCount: Int { get }
    /// Pops every available buffer and completes it at once, in order, without keeping it
    /// (split: length 0; packed: its writable bytes). Requires nothing pending. Returns how many.
    @discardableResult func echoAvailable() -> Int

    // MARK: Used side

    /// Completes the `count` oldest pending buffers in order, one used entry each. `lengths[i]`
    /// goes with the i-th (default: every writable byte).
    func completeInOrder(count: Int, lengths: [UInt32]?)
    /// Completes the pending buffers with IDs `ids`, in that order. `lengths[i]` goes with `ids[i]`
    /// (default: every writable byte).
    func complete(ids: [UInt16], lengths: [UInt32]?)
    /// The in-order batch shortcut (split §2.7.9, packed §2.8.11): ONE used entry for the
    /// `count` oldest pending buffers, naming the last with `lastLength` (default: its writable
    /// bytes).
    func completeBatchAsOne(count: Int, lastLength: UInt32?)
    /// Fault knob: a used entry with any `id` (up to `maxUsedID`) and `len` at the next used
    /// slot, as for one single-descriptor buffer; the pending buffers are left alone. An id out
    /// of range, not in flight, or a length larger than the buffer's, is the driver's to catch.
    func injectUsed(id: UInt32, len: UInt32)
    /// Where the device writes its next used entry, encoded like `stoppedBase` (split: the used
    /// index; packed: the used position with the device's wrap counter in bit 15).
    var usedBase: UInt32 { get }

    // MARK: Notification suppression

    /// Whether the driver asked for no used-buffer notifications, as a poll-mode driver does
    /// (split: VRING_AVAIL_F_NO_INTERRUPT, §2.7.7; packed: driver event flags DISABLE, §2.8.14).
    var driverSuppressesUsedNotifications: Bool { get }
    /// Asks the driver not to send available-buffer notifications, or to send them again
    /// (split: VRING_USED_F_NO_NOTIFY, §2.7.10, ignored by a driver that negotiated EVENT_IDX;
    /// packed: device event flags DISABLE / ENABLE, §2.8.14, which replace a `setEventIndex`).
    func setNoNotify(_ on: Bool)
    /// VIRTIO_F_EVENT_IDX: asks for a notification when the driver makes ring entry `entry`
    /// available, counting entries from the start of the ring since the last reset (split: avail
    /// ring entries, `avail_event` = `entry` mod 2^16, §2.7.10; packed: descriptor positions,
    /// device event flags DESC with `off_wrap` = `entry` mod `size` and the wrap counter of lap
    /// `entry / size`, §2.8.14). Negative entries count back from the start.
    func setEventIndex(_ entry: Int)

    // MARK: Reset

    /// Where the device stopped, as vhost-user GET_VRING_BASE reports it.
    var stoppedBase: UInt32 { get }
    /// Forgets all state, as a device reset does (after the queue's `reclaimAll`).
    func reset()
    /// A device started again at `base` (vhost-user SET_VRING_BASE).
    func reset(toBase base: UInt32)
}
