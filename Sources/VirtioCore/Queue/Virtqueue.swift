/// What a device driver needs from a virtqueue, whatever its layout: `SplitVirtqueue` (§2.7) and
/// `PackedVirtqueue` (§2.8) both conform. Drivers are generic over it (`VirtioNetPort<Ring>`), so
/// in a release build every call is specialised and inlined: the protocol costs nothing per packet.
///
/// The life of a buffer: `add…` (the caller checked `freeCount`), `publish` once per burst (true:
/// notify the device), `harvest` its completion with the cookie it was added with. After the
/// device stops, `reclaimAll` hands back every cookie still in flight, and `restart(at:)` lines
/// the ring up with the position the device reported so the device can be started again.
public protocol Virtqueue: ~Copyable {
    /// `.split` or `.packed`.
    static var layout: RingLayoutChoice { get }
    /// Feature bits this layout needs negotiated (packed: VIRTIO_F_RING_PACKED).
    static var layoutFeatures: VirtioFeatures { get }
    /// Bytes of 4 KiB-aligned memory a ring of `size` descriptors needs; throws for a size the
    /// layout does not allow.
    static func ringBytes(size: Int) throws(VirtqueueError) -> Int
    /// Lays a fresh queue over `memory` (at least `ringBytes(size:)`, 4 KiB aligned), zeroing it.
    init(memory: UnsafeMutableRawPointer, size: Int, inOrder: Bool, eventIndex: Bool) throws(VirtqueueError)

    var size: Int { get }
    var inOrder: Bool { get }
    /// Descriptors free for `addBurst`/`addChain`.
    var freeCount: Int { get }
    /// Buffers added and not yet returned by `harvest`/`reclaimAll`.
    var inFlight: Int { get }
    /// The first device error seen; once set the queue takes and returns nothing more.
    var failure: VirtqueueError? { get }
    /// Where the transport must tell the device the ring lives, and where the device starts.
    var addresses: QueueAddresses { get }

    /// `count` single-descriptor buffers: `buffer(i)` gives the i-th (address, length, cookie).
    mutating func addBurst(count: Int, deviceWritable: Bool,
                           _ buffer: (Int) -> (addr: UInt64, len: UInt32, cookie: UnsafeMutableRawPointer?))
    /// Puts chains of two or more segments into `tables` from now on (after
    /// VIRTIO_F_INDIRECT_DESC); false when the layout does not implement indirect descriptors
    /// (packed), so the caller must not negotiate them.
    mutating func useIndirect(_ tables: IndirectTables) -> Bool
    /// With indirect tables: the longest chain that still goes into the ring itself while
    /// `tableReserve` descriptors stay free (1: every longer chain takes a table). Layouts without
    /// tables ignore it.
    var directChainLimit: Int { get set }
    /// With indirect tables: descriptors direct chains leave free for chains in tables.
    var tableReserve: Int { get set }
    /// Out of order: whether completed descriptors are reused in table order (see
    /// `SplitVirtqueue.recycleInTableOrder`). Layouts that always hand out in ring order ignore it.
    var recycleInTableOrder: Bool { get set }
    /// Ring descriptors a buffer of `count` segments takes (split with indirect tables: one).
    func descriptorsNeeded(forSegments count: Int) -> Int
    /// One buffer of `count` descriptors; false (adding nothing) when there is no room.
    mutating func addChain(count: Int, cookie: UnsafeMutableRawPointer?, _ segment: (Int) -> VirtqSegment) -> Bool
    /// Makes what was added visible (if the layout defers that) and says whether to notify.
    mutating func publish() -> Bool
    /// Asks the device for a used-buffer notification (split: clears VRING_AVAIL_F_NO_INTERRUPT,
    /// or with EVENT_IDX sets `used_event` to the last used index seen; packed: the driver event
    /// area's flags to ENABLE), then looks at the ring once more after a full fence. False when
    /// used buffers are already waiting (harvest them rather than sleep).
    mutating func enableUsedNotifications() -> Bool
    /// Back to polling: no used-buffer notifications.
    mutating func disableUsedNotifications()
    /// Up to `max` completions (cookie, bytes the device wrote) into two arrays.
    mutating func harvest(into cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>,
                          lengths: UnsafeMutablePointer<UInt32>, max: Int) -> Int
    /// Every cookie in flight, without changing anything. Returns how many.
    @discardableResult func forEachInFlight(_ body: (UnsafeMutableRawPointer?) -> Void) -> Int
    /// After the device stopped: every cookie in flight to `body`, then a fresh, empty ring.
    @discardableResult mutating func reclaimAll(_ body: (UnsafeMutableRawPointer?) -> Void) -> Int
    /// After `reclaimAll`: continue from the ring position the device reported when it stopped
    /// (vhost-user GET_VRING_BASE: split, the avail index; packed, the position with the wrap
    /// counter in bit 15), so driver and device agree where the next buffer goes.
    mutating func restart(at base: UInt32)
    /// Where a ring starts after a device reset (split: 0; packed: position 0, wrap counter 1).
    static var resetBase: UInt32 { get }
}

extension Virtqueue where Self: ~Copyable {
    /// "split" or "packed".
    public static var layoutName: String { layout.rawValue }
    /// Without indirect tables every segment takes a ring descriptor.
    @inlinable public func descriptorsNeeded(forSegments count: Int) -> Int { count }
    /// Indirect tables are not implemented for this layout.
    public mutating func useIndirect(_ tables: IndirectTables) -> Bool { false }
    public var directChainLimit: Int { get { 0 } set {} }
    public var tableReserve: Int { get { 0 } set {} }
    public var recycleInTableOrder: Bool { get { true } set {} }
}

/// The ring layout a driver asks for: `auto` takes packed when the device offers it.
public enum RingLayoutChoice: String, Sendable, CaseIterable {
    case auto, split, packed

    /// The layout to use with a device that offers `offered`; nil when a forced layout is not
    /// offered.
    public func resolve(offered: VirtioFeatures) -> RingLayoutChoice? {
        switch self {
        case .split: return .split
        case .packed: return offered.contains(.ringPacked) ? .packed : nil
        case .auto: return offered.contains(.ringPacked) ? .packed : .split
        }
    }
}
