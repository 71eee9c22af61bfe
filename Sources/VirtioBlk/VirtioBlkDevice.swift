import DPDK
import Logging
import VirtioCore

public enum VirtioBlkError: Error, CustomStringConvertible {
    case missingFeatures(VirtioFeatures)
    case noConfigSpace
    case invalidQueueSize(Int)
    case invalidDirectChainLimit(Int)
    case layoutNotOffered(RingLayoutChoice)
    /// The device (config space or transport) gave a queue count the driver cannot use.
    case badQueueCount(String)
    /// A config-space value no device can mean (VIRTIO 1.2 §5.2.4), named with its value.
    case badConfig(String)

    public var description: String {
        switch self {
        case .missingFeatures(let f): return "the virtio-blk device lacks required features: \(f)"
        case .noConfigSpace: return "the device has no config space (vhost-user: VHOST_USER_PROTOCOL_F_CONFIG not offered); capacity unknown"
        case .invalidQueueSize(let s): return "queue size \(s) must be a power of two from 4 to 4096"
        case .invalidDirectChainLimit(let n): return "direct chain limit \(n) must be at least 1"
        case .layoutNotOffered(let l): return "the device does not offer \(l) virtqueues (VIRTIO_F_RING_PACKED)"
        case .badQueueCount(let s): return "virtio-blk: \(s)"
        case .badConfig(let s): return "virtio-blk config space: \(s)"
        }
    }
}

public struct VirtioBlkOptions: Sendable {
    /// Queues to use (capped by what the device offers).
    public var queues = 1
    public var queueSize = 256
    public var allowInOrder = true
    public var allowIndirect = true
    public var allowEventIndex = true
    /// Split rings with VIRTIO_F_INDIRECT_DESC: requests of at most this many descriptors
    /// (header, data segments, status) go straight into the ring while a quarter of it stays
    /// free; longer ones, and the rest, take an indirect table. 1: every request takes a table.
    public var directChainLimit = 4
    /// Spaces polls while many requests are in flight, so that each poll finds a batch of
    /// completions (see `VirtioBlkQueue.pollPacing`).
    public var pollPacing = true
    /// Ride through a loss of the device (vhost-user: the storage daemon restarts): each queue
    /// keeps what it had in flight, the device is reconnected with the same features, and the
    /// requests are submitted again (a read or write of the same sectors is idempotent). nil: a
    /// loss fails what is in flight with `.deviceGone`. Ignored where the transport cannot
    /// reconnect (virtio-pci).
    public var reconnect: ReconnectPolicy?
    /// With `reconnect`: let a backend that offers it track the requests in flight itself
    /// (vhost-user INFLIGHT_SHMFD), so a restarted backend resumes them from the rings as they
    /// were; otherwise (or false) the queues submit them again.
    public var allowInflightTracking = true
    /// Ring layout: `auto` takes packed when the device offers VIRTIO_F_RING_PACKED.
    public var ring: RingLayoutChoice = .auto
    public init() {}
}

/// Runs with the device `VirtioBlkDevice.open` opened, specialised for its ring layout.
public protocol VirtioBlkDeviceBody {
    associatedtype Output
    func run<Ring: Virtqueue & ~Copyable>(_ device: VirtioBlkDevice<Ring>) throws -> Output
}

/// Opens the virtio-blk device on `transport` with the layout `options.ring` resolves to and runs
/// `body` with it, specialised for that layout (inlinable: in the caller's module).
@inlinable
public func openVirtioBlkDevice<Body: VirtioBlkDeviceBody>(transport: any VirtioTransport, options: VirtioBlkOptions = VirtioBlkOptions(),
                                                          logger: Logger = Logger(label: "virtio-blk"), _ body: Body) throws -> Body.Output {
    guard let layout = options.ring.resolve(offered: transport.deviceFeatures) else { throw VirtioBlkError.layoutNotOffered(options.ring) }
    return try layout.dispatch(BlkOpener(transport: transport, options: options, logger: logger, body: body))
}

@usableFromInline
struct BlkOpener<Body: VirtioBlkDeviceBody>: VirtqueueLayoutBody {
    @usableFromInline let transport: any VirtioTransport, options: VirtioBlkOptions, logger: Logger, body: Body
    @inlinable init(transport: any VirtioTransport, options: VirtioBlkOptions, logger: Logger, body: Body) {
        self.transport = transport; self.options = options; self.logger = logger; self.body = body
    }
    @inlinable
    func run<R: Virtqueue & ~Copyable>(_: R.Type) throws -> Body.Output {
        try body.run(try VirtioBlkDevice<R>(transport: transport, options: options, logger: logger))
    }
}

/// A virtio-blk device (VIRTIO 1.2 §5.2) on the shared device core, over any transport: negotiation,
/// config space, and the memory of its queues. Each queue is handed out once (`makeQueue`) and then
/// polled by one lcore, like a DPDK queue. All queues watch the device's one link: a stop or a
/// failure of any of them fails the requests in flight on every queue with `.deviceGone`.
public final class VirtioBlkDevice<Ring: Virtqueue & ~Copyable>: @unchecked Sendable {
    public let core: VirtioDevice<Ring>
    public var transport: any VirtioTransport { core.transport }
    /// Descriptors carry IOVAs (virtio-pci) instead of process virtual addresses.
    public var usesIOVA: Bool { core.addressing == .iova }
    public var features: VirtioFeatures { core.features }
    public let config: BlkConfig
    public let queueCount: Int
    public let queueSize: Int
    let directChainLimit: Int
    let pollPacing: Bool
    /// The most data segments a request of this driver has (the indirect tables are sized by it).
    public static var segmentLimit: Int { 256 }
    /// Data segments per request the device accepts (seg_max, or what fits the ring).
    public let maxSegments: Int
    /// Bytes per data segment, or nil for no limit (size_max 0 is "no limit", as SPDK treats it).
    public let maxSegmentBytes: Int?
    public var readOnly: Bool { features.contains(.blkReadOnly) }
    /// The layout every queue uses (the type parameter's).
    public var ringLayout: RingLayoutChoice { Ring.layout }
    /// The backend tracks the requests in flight and resumes them after a reconnect.
    public let inflightTracked: Bool
    let slabs: [any DMARegion]
    let tables: [(any DMARegion)?]
    let logger: Logger

    /// Negotiates for `Ring`'s layout, reads the config, sets up the queues and starts the device.
    public init(transport t: any VirtioTransport, options: VirtioBlkOptions = VirtioBlkOptions(),
                memory: any DMAAllocator = DPDKDMAAllocator(), logger: Logger = Logger(label: "virtio-blk")) throws {
        VirtioFeatures.registerBlkNames()
        guard options.queueSize >= 4, options.queueSize <= 4096, options.queueSize & (options.queueSize - 1) == 0 else {
            throw VirtioBlkError.invalidQueueSize(options.queueSize)
        }
        guard options.directChainLimit >= 1 else { throw VirtioBlkError.invalidDirectChainLimit(options.directChainLimit) }
        let offered = t.deviceFeatures
        guard offered.contains(.version1) || t.isLegacy else { throw VirtioBlkError.missingFeatures(.version1) }
        guard offered.isSuperset(of: Ring.layoutFeatures) else { throw VirtioBlkError.layoutNotOffered(Ring.layout) }
        var wanted: VirtioFeatures = [.version1, .blkSizeMax, .blkSegMax, .blkBlockSize, .blkFlush, .blkDiscard,
                                      .blkWriteZeroes, .blkReadOnly, .blkMultiQueue, .blkTopology]
        if options.allowInOrder { wanted.insert(.inOrder) }
        // Indirect tables are used with split rings only; a packed request is a descriptor chain.
        if options.allowIndirect && Ring.layout == .split { wanted.insert(.indirectDescriptors) }
        // EVENT_IDX (§2.7.10): the device says at which avail index it wants the next kick, so a
        // kick is skipped while it is still working through what we published before.
        if options.allowEventIndex { wanted.insert(.eventIndex) }
        let negotiation = try VirtioNegotiation(offered: offered, required: [], wanted: wanted, ring: Ring.layout, device: "virtio-blk")
        let chosen = negotiation.chosen
        guard t.hasConfigSpace else { throw VirtioBlkError.noConfigSpace }
        // No more than struct virtio_blk_config: qemu-storage-daemon refuses larger reads.
        let cfg = BlkConfig(bytes: try t.readConfig(offset: 0, count: BlkConfig.size))
        var queues = max(1, options.queues)
        if chosen.contains(.blkMultiQueue) {
            guard cfg.numQueues >= 1 else { throw VirtioBlkError.badQueueCount("the device offers VIRTIO_BLK_F_MQ with num_queues 0") }
            queues = min(queues, Int(cfg.numQueues))
        } else {
            queues = 1
        }
        if let m = t.queueLimit?.value { queues = min(queues, m) }
        // virtio-pci num_queues 0 (vhost-user's GET_QUEUE_NUM 0 is refused by the transport).
        guard queues >= 1 else { throw VirtioBlkError.badQueueCount("\(t.deviceDescription) offers 0 queues") }
        // Byte offsets and sizes are Ints: a capacity past 2^63 bytes is no real device.
        guard cfg.capacity <= UInt64(Int.max) / UInt64(blkSectorSize) else {
            throw VirtioBlkError.badConfig("capacity \(cfg.capacity) sectors is more than 2^63 bytes")
        }
        if chosen.contains(.blkBlockSize) {
            guard cfg.blockSize >= 512, cfg.blockSize <= 1 << 20, cfg.blockSize & (cfg.blockSize - 1) == 0 else {
                throw VirtioBlkError.badConfig("blk_size \(cfg.blockSize) is not a power of two from 512 to 1 MiB")
            }
        }
        var segMax = chosen.contains(.blkSegMax) && cfg.segMax > 0 ? Int(cfg.segMax) : options.queueSize - 2
        // seg_max sizes every request's indirect table: more than the driver ever sends is capped.
        if segMax > Self.segmentLimit {
            logger.warning("virtio-blk \(t.deviceDescription): seg_max \(cfg.segMax) is more than this driver uses; using \(Self.segmentLimit)")
            segMax = Self.segmentLimit
        }
        let indirect = chosen.contains(.indirectDescriptors)
        // Without indirect descriptors a request's chain (header, data, status) must fit the ring.
        maxSegments = indirect ? segMax : min(segMax, options.queueSize - 2)
        maxSegmentBytes = chosen.contains(.blkSizeMax) && cfg.sizeMax > 0 ? Int(cfg.sizeMax) : nil
        let core = try VirtioDevice<Ring>(transport: t, negotiation: negotiation,
                                          queues: (0..<queues).map { VirtqueueSpec(index: $0, size: options.queueSize) }, memory: memory)
        var slabs: [any DMARegion] = [], tables: [(any DMARegion)?] = []
        for _ in 0..<queues {
            slabs.append(try core.allocate(bytes: options.queueSize * BlkSlot.bytes))
            tables.append(indirect ? try core.allocate(bytes: IndirectTables.bytes(queueSize: options.queueSize,
                                                                                   entriesPerTable: maxSegments + 2)) : nil)
        }
        var tracked = false
        if options.reconnect != nil && options.allowInflightTracking {
            tracked = try t.setUpInflightTracking(queueCount: queues, queueSize: options.queueSize)
        }
        inflightTracked = tracked
        try core.start()
        if let policy = options.reconnect { core.enableReconnect(policy) }
        self.core = core
        config = cfg
        queueCount = queues
        queueSize = options.queueSize
        self.slabs = slabs; self.tables = tables
        self.logger = logger
        directChainLimit = options.directChainLimit
        pollPacing = options.pollPacing
        let mib = cfg.capacity / 2048
        logger.info("virtio-blk \(t.deviceDescription): \(cfg.capacity) sectors (\(mib) MiB), block \(cfg.blockSize), seg_max \(cfg.segMax), size_max \(cfg.sizeMax), \(queues) \(Ring.layoutName) queue(s) of \(options.queueSize), features \(chosen)\(inflightTracked ? ", in-flight tracking by the backend" : "")")
    }

    deinit { core.stop() }

    /// Queue `index`, once, on the device's ring layout. The device must outlive it.
    public func makeQueue(_ index: Int) -> VirtioBlkQueue<Ring> {
        precondition(index >= 0 && index < queueCount, "queue \(index) does not exist")
        var vq = core.makeQueue(index)
        if let t = tables[index] {
            let tables = IndirectTables(base: t.pointer.bindMemory(to: VirtqDesc.self, capacity: queueSize * (maxSegments + 2)),
                                        baseAddress: core.deviceAddress(of: t), entriesPerTable: maxSegments + 2)
            let used = vq.useIndirect(tables)
            precondition(used, "indirect descriptors are negotiated for split rings only")
        }
        vq.directChainLimit = directChainLimit
        // A quarter of the ring stays for requests in tables: a queue of 512 then holds 128
        // 4 KiB requests as direct chains (all of QD128) and still 128 requests of any length.
        vq.tableReserve = queueSize / 4
        // Without VIRTIO_F_IN_ORDER, descriptors still go round the table in order: the device
        // reads it front to back, each line once, as its prefetcher expects.
        vq.recycleInTableOrder = true
        let slab = slabs[index]
        return VirtioBlkQueue(index: index, queue: vq, slab: slab.pointer, slabAddress: core.deviceAddress(of: slab), device: self)
    }

    /// Stops every queue at the device; afterwards the device touches none of our memory, and every
    /// queue fails what it has in flight with `.deviceGone` at its next poll.
    public func stop(reason: String = "device stopped") { core.stop(reason: reason) }
}
