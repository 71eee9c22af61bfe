/// One entry of the descriptor table (VIRTIO 1.2 §2.7.5, `struct virtq_desc`), little-endian.
@frozen public struct VirtqDesc: Sendable {
    public var addr: UInt64
    public var len: UInt32
    public var flags: UInt16
    public var next: UInt16
    @inlinable public init(addr: UInt64 = 0, len: UInt32 = 0, flags: UInt16 = 0, next: UInt16 = 0) {
        self.addr = addr; self.len = len; self.flags = flags; self.next = next
    }
    /// VIRTQ_DESC_F_NEXT: the buffer continues in `next`.
    public static let flagNext: UInt16 = 1
    /// VIRTQ_DESC_F_WRITE: device-writable (otherwise device-readable).
    public static let flagWrite: UInt16 = 2
    /// VIRTQ_DESC_F_INDIRECT: the buffer holds a table of descriptors.
    public static let flagIndirect: UInt16 = 4
}

/// One used-ring element (§2.7.8, `struct virtq_used_elem`): the head id of a used chain and the
/// number of bytes the device wrote into it.
@frozen public struct VirtqUsedElem: Sendable {
    public var id: UInt32
    public var len: UInt32
    @inlinable public init(id: UInt32, len: UInt32) { self.id = id; self.len = len }
}

/// Where the three parts of a split virtqueue live inside one block of memory (§2.7).
/// The used ring starts on its own 4 KiB page: it is the only part the device writes, and keeping
/// it off the driver-written lines avoids false sharing (and matches the legacy PCI alignment).
public struct SplitRingLayout: Sendable, Equatable {
    public let size: Int
    public let descOffset: Int
    public let availOffset: Int
    public let usedOffset: Int
    public let totalBytes: Int
    public static let alignment = 4096

    /// `size` must be a power of two from 1 to 32768 (§2.7: "Queue Size ... is always a power of 2").
    public init(size: Int) throws(VirtqueueError) {
        guard size >= 1, size <= 32768, size & (size - 1) == 0 else { throw .invalidSize(size) }
        self.size = size
        descOffset = 0
        availOffset = 16 * size
        let availEnd = availOffset + 6 + 2 * size          // flags, idx, ring[size], used_event
        usedOffset = (availEnd + Self.alignment - 1) & ~(Self.alignment - 1)
        let usedEnd = usedOffset + 6 + 8 * size            // flags, idx, ring[size], avail_event
        totalBytes = (usedEnd + Self.alignment - 1) & ~(Self.alignment - 1)
    }
}

/// VRING_AVAIL_F_NO_INTERRUPT (§2.7.6): the driver does not want used-buffer notifications.
public let virtqAvailFlagNoInterrupt: UInt16 = 1
/// VRING_USED_F_NO_NOTIFY (§2.7.8): the device does not want available-buffer notifications.
public let virtqUsedFlagNoNotify: UInt16 = 1

/// `vring_need_event` (§2.7.10): with EVENT_IDX, notify iff the device's `event` index lies in
/// [old, new), i.e. it asked to be woken at an entry this publish made available.
@inlinable public func virtqNeedEvent(event: UInt16, new: UInt16, old: UInt16) -> Bool {
    (new &- event &- 1) < (new &- old)
}
