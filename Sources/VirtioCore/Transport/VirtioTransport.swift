/// A piece of driver memory the device must be able to reach: process virtual address, length,
/// and the file that backs it (so a vhost-user backend can map it).
public struct MemoryRegion: Sendable, Equatable {
    public var address: UInt64
    public var size: UInt64
    public var fd: Int32
    public var fileOffset: UInt64
    public init(address: UInt64, size: UInt64, fd: Int32, fileOffset: UInt64) {
        self.address = address; self.size = size; self.fd = fd; self.fileOffset = fileOffset
    }
}

/// Where a queue's rings are, as the transport must tell the device. For a packed ring `avail`
/// is the driver event suppression area and `used` the device's (vhost-user and virtio-pci put
/// them in the same fields).
public struct QueueAddresses: Sendable, Equatable {
    public var size: Int
    public var desc: UInt64
    public var avail: UInt64
    public var used: UInt64
    /// Where the device starts (vhost-user SET_VRING_BASE): split, the avail index; packed, the
    /// ring position with the wrap counter in bit 15.
    public var base: UInt32
    public init(size: Int, desc: UInt64, avail: UInt64, used: UInt64, base: UInt32 = 0) {
        self.size = size; self.desc = desc; self.avail = avail; self.used = used; self.base = base
    }
}

/// How the device reads the addresses in descriptors and ring registers.
public enum BufferAddressing: Sendable, Equatable {
    /// Process virtual addresses (vhost-user: the backend maps our memory table).
    case processVirtual
    /// Bus addresses (virtio-pci): DPDK IOVAs, physical addresses in a guest without an IOMMU
    /// (`rte_mem_virt2iova`, an mbuf's `buf_iova`).
    case iova
}

/// What a device driver (net, blk) needs from whatever carries virtio to the device: vhost-user
/// today, virtio-pci later. The data path never calls it except `notify`, and only when the
/// device asked for a notification.
public protocol VirtioTransport: AnyObject {
    /// Features the device offers (transport-only bits removed).
    var deviceFeatures: VirtioFeatures { get }
    /// How many queues the transport says the device has, or nil if it does not say.
    var queueLimit: QueueLimit? { get }
    /// The largest size the device allows for queue `index`, or nil if any size goes (vhost-user).
    /// A legacy PCI device fixes it: the ring must have exactly this size.
    func maxQueueSize(_ index: Int) -> Int?
    /// From now on, waits at most `seconds` for each control reply (a run being ended by a
    /// signal must not wait the full reply timeout on a backend that stopped answering).
    func limitReplyWait(seconds: Double)
    /// Whether the device itself processes a virtio-net control queue (virtio-pci). A vhost-user
    /// backend never sees one: the frontend carries out the commands itself, as QEMU and DPDK's
    /// virtio_user do.
    var carriesControlQueue: Bool { get }
    /// Enables or disables ring `index` while the device runs (vhost-user SET_VRING_ENABLE, how a
    /// frontend applies VQ_PAIRS_SET). Throws where the transport cannot (virtio-pci: the device
    /// applies VQ_PAIRS_SET from its control queue).
    func setQueueEnabled(_ index: Int, _ enabled: Bool) throws
    /// Gives the transport the device's link, which it marks down when it loses the device
    /// (vhost-user: the hang-up monitor), so every queue sees the loss at its next poll.
    func attach(_ link: DeviceLink)
    /// How buffer addresses in descriptors must be expressed. The transport decides, not the queue
    /// core: the devices translate their buffers once per descriptor when this is `.iova`.
    var bufferAddressing: BufferAddressing { get }
    /// A legacy (pre-1.0) device: no VIRTIO_F_VERSION_1, guest-endian, fixed queue sizes (legacy
    /// virtio-pci). False for everything else.
    var isLegacy: Bool { get }
    /// Whether `readConfig` works (vhost-user needs VHOST_USER_PROTOCOL_F_CONFIG; PCI always can).
    var hasConfigSpace: Bool { get }
    /// A short description of the device for logs ("vhost-user /tmp/x.sock", "virtio-pci 0000:00:04.0 (modern)").
    var deviceDescription: String { get }
    /// Reads `count` bytes of device config space at `offset`.
    func readConfig(offset: Int, count: Int) throws -> [UInt8]
    /// Accepts `features` (a subset of `deviceFeatures`) for a device that will use `queueCount` queues.
    func negotiate(_ features: VirtioFeatures, queueCount: Int) throws
    /// The same, for a device type whose `queueLimit` unit is `queuesPerUnit` queues (net: a pair
    /// is 2), so a transport can refuse more than its limit before it sets any ring up.
    func negotiate(_ features: VirtioFeatures, queueCount: Int, queuesPerUnit: Int) throws
    /// Tells the device which memory it may access.
    func setMemory(_ regions: [MemoryRegion]) throws
    /// Hands queue `index` to the device.
    func setupQueue(_ index: Int, addresses: QueueAddresses) throws
    /// Sets DRIVER_OK / enables the queues: the device may now use them.
    func start() throws
    /// Stops every queue; afterwards the device touches none of our memory. `setupQueue` and
    /// `start` may follow to run the device again.
    func stop() throws
    /// Where each queue stood when the last `stop` stopped it (the value to `restart(at:)` the
    /// rings from), or nil when a restart begins from a fresh ring.
    var stoppedBases: [UInt32]? { get }
    /// Available-buffer notification for queue `index` (§2.7.13.4).
    func notify(queue index: Int)
    /// A descriptor that becomes readable when the device sends queue `index` a used-buffer
    /// notification (vhost-user: the ring's call eventfd), or nil where notifications cannot be
    /// waited for (virtio-pci through uio here).
    func notificationDescriptor(queue index: Int) -> Int32?
    /// False once the device has gone away (checked off the data path).
    var isConnected: Bool { get }
    /// Why the connection was lost, if it was.
    var disconnectReason: String? { get }
    /// Whether `reconnect` can bring the device back after it was lost (vhost-user: the backend
    /// hung up; it is looked for again on the same socket). False: a loss is final.
    var canReconnect: Bool { get }
    /// After a loss: waits until `deadline` (CLOCK_MONOTONIC ns) for the device to come back, and
    /// runs the first part of the handshake again, so `deviceFeatures` and `queueLimit` are the new
    /// device's; `negotiate`, `setMemory`, `setupQueue` and `start` follow. `abort` is asked at
    /// least every 100 ms. Throws `ReconnectError` when it gives up; other errors (a backend that
    /// went away again) may be retried.
    func reconnect(deadline: UInt64, abort: () -> Bool) throws
    /// Lets the device keep track of the requests in flight in memory that outlives it (vhost-user
    /// INFLIGHT_SHMFD), so that after a reconnect the device itself resumes them from the rings as
    /// they were. Call after `negotiate`, before `setMemory`; false where the device cannot.
    func setUpInflightTracking(queueCount: Int, queueSize: Int) throws -> Bool
}

/// What a transport says about the number of queues.
public enum QueueLimit: Sendable, Equatable {
    /// Virtqueues, every kind counted (virtio-pci `num_queues`, control queue included).
    case virtqueues(Int)
    /// In the device type's own unit (vhost-user GET_QUEUE_NUM): queue pairs for net, as QEMU and
    /// DPDK read it, queues for blk.
    case deviceUnits(Int)

    public var value: Int {
        switch self { case .virtqueues(let n), .deviceUnits(let n): n }
    }
}

public struct TransportError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension VirtioTransport {
    public var stoppedBases: [UInt32]? { nil }
    public func maxQueueSize(_ index: Int) -> Int? { nil }
    public func limitReplyWait(seconds: Double) {}
    public var carriesControlQueue: Bool { false }
    public func setQueueEnabled(_ index: Int, _ enabled: Bool) throws {
        throw TransportError("\(deviceDescription) cannot enable or disable single queues")
    }
    public func attach(_ link: DeviceLink) {}
    public func negotiate(_ features: VirtioFeatures, queueCount: Int, queuesPerUnit: Int) throws {
        try negotiate(features, queueCount: queueCount)
    }
    public var bufferAddressing: BufferAddressing { .processVirtual }
    public var isLegacy: Bool { false }
    public var canReconnect: Bool { false }
    public func setUpInflightTracking(queueCount: Int, queueSize: Int) throws -> Bool { false }
    public func reconnect(deadline: UInt64, abort: () -> Bool) throws {
        throw TransportError("\(deviceDescription) cannot reconnect")
    }
}

extension VirtioTransport {
    public func notificationDescriptor(queue index: Int) -> Int32? { nil }
}
