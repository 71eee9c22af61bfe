/// One descriptor of a packed ring (VIRTIO 1.2 §2.8.13, `struct pvirtq_desc`), little-endian.
@frozen public struct PackedDesc: Sendable {
    public var addr: UInt64
    public var len: UInt32
    /// Buffer ID: written by the driver, returned by the device in the used descriptor.
    public var id: UInt16
    public var flags: UInt16
    @inlinable public init(addr: UInt64 = 0, len: UInt32 = 0, id: UInt16 = 0, flags: UInt16 = 0) {
        self.addr = addr; self.len = len; self.id = id; self.flags = flags
    }
    /// VIRTQ_DESC_F_AVAIL (bit 7) and VIRTQ_DESC_F_USED (bit 15), §2.8.1.
    public static let flagAvail: UInt16 = 1 << 7
    public static let flagUsed: UInt16 = 1 << 15
}

/// Event suppression flags (§2.8.14, `struct pvirtq_event_suppress.flags`).
public enum PackedEventFlags {
    public static let enable: UInt16 = 0
    public static let disable: UInt16 = 1
    /// Notify at the descriptor named by `off_wrap` (needs VIRTIO_F_EVENT_IDX).
    public static let desc: UInt16 = 2
}

/// Where the parts of a packed virtqueue live in one block (§2.8): descriptor ring (16 × size,
/// 16-aligned), driver event suppression (4 bytes), device event suppression (4 bytes) on its own
/// cache line, since only the device writes it.
public struct PackedRingLayout: Sendable, Equatable {
    public let size: Int
    public let descOffset = 0
    public let driverEventOffset: Int
    public let deviceEventOffset: Int
    public let totalBytes: Int

    /// `size` from 1 to 32768; unlike split rings it need not be a power of two (§2.8).
    public init(size: Int) throws(VirtqueueError) {
        guard size >= 1, size <= 32768 else { throw .invalidSize(size) }
        self.size = size
        driverEventOffset = 16 * size
        deviceEventOffset = (16 * size + 4 + 63) & ~63
        totalBytes = (deviceEventOffset + 4 + 4095) & ~4095
    }
}
