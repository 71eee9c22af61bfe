import DPDK
import Logging
import VhostUser
import VirtioCore

public enum VirtioBlkError: Error, CustomStringConvertible {
    case missingFeatures(VirtioFeatures)
    case noConfigSpace
    case invalidQueueSize(Int)
    case layoutNotOffered(RingLayoutChoice)

    public var description: String {
        switch self {
        case .missingFeatures(let f): return "the virtio-blk device lacks required features: \(f)"
        case .noConfigSpace: return "the device has no config space (vhost-user: VHOST_USER_PROTOCOL_F_CONFIG not offered); capacity unknown"
        case .invalidQueueSize(let s): return "queue size \(s) must be a power of two from 4 to 4096"
        case .layoutNotOffered(let l): return "the device does not offer \(l) virtqueues (VIRTIO_F_RING_PACKED)"
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
    /// Ring layout: `auto` takes packed when the device offers VIRTIO_F_RING_PACKED.
    public var ring: RingLayoutChoice = .auto
    public init() {}
}

/// A virtio-blk device over any transport (vhost-user, virtio-pci): negotiation, config space, and the memory of its queues.
/// Each queue is handed out once (`makeQueue`) and then polled by one lcore, like a DPDK queue.
public final class VirtioBlkDevice {
    public let transport: any VirtioTransport
    /// Descriptors carry IOVAs (virtio-pci) instead of process virtual addresses.
    public let usesIOVA: Bool
    public let features: VirtioFeatures
    public let config: BlkConfig
    public let queueCount: Int
    public let queueSize: Int
    /// The layout every queue uses (`.split` or `.packed`); `makeQueue(_:as:)` takes the matching type.
    public let ringLayout: RingLayoutChoice
    /// Data segments per request the device accepts (seg_max, or what fits the ring).
    public let maxSegments: Int
    /// Bytes per data segment, or nil for no limit (size_max 0 is "no limit", as SPDK treats it).
    public let maxSegmentBytes: Int?
    public var readOnly: Bool { features.contains(.blkReadOnly) }
    let rings: [DMAMemory]
    let slabs: [DMAMemory]
    let tables: [DMAMemory?]
    private var taken: [Bool]
    let logger: Logger

    public convenience init(vhostUserPath path: String, options: VirtioBlkOptions = VirtioBlkOptions(),
                            logger: Logger = Logger(label: "virtio-blk")) throws {
        try self.init(transport: try VhostUserConnection(path: path, logger: logger), options: options, logger: logger)
    }

    public init(transport t: any VirtioTransport, options: VirtioBlkOptions = VirtioBlkOptions(),
                logger: Logger = Logger(label: "virtio-blk")) throws {
        VirtioFeatures.registerBlkNames()
        guard options.queueSize >= 4, options.queueSize <= 4096, options.queueSize & (options.queueSize - 1) == 0 else {
            throw VirtioBlkError.invalidQueueSize(options.queueSize)
        }
        let offered = t.deviceFeatures
        guard offered.contains(.version1) || t.isLegacy else { throw VirtioBlkError.missingFeatures(.version1) }
        var wanted: VirtioFeatures = [.version1, .blkSizeMax, .blkSegMax, .blkBlockSize, .blkFlush, .blkDiscard,
                                      .blkWriteZeroes, .blkReadOnly, .blkMultiQueue, .blkTopology]
        guard let layout = options.ring.resolve(offered: offered) else { throw VirtioBlkError.layoutNotOffered(options.ring) }
        if options.allowInOrder { wanted.insert(.inOrder) }
        // Indirect tables are used with split rings only; a packed request is a descriptor chain.
        if options.allowIndirect && layout == .split { wanted.insert(.indirectDescriptors) }
        if layout == .packed { wanted.insert(.ringPacked) }
        // EVENT_IDX (§2.7.10): the device says at which avail index it wants the next kick, so a
        // kick is skipped while it is still working through what we published before.
        if options.allowEventIndex { wanted.insert(.eventIndex) }
        let chosen = offered.intersection(wanted)
        guard t.hasConfigSpace else { throw VirtioBlkError.noConfigSpace }
        // No more than struct virtio_blk_config: qemu-storage-daemon refuses larger reads.
        let cfg = BlkConfig(bytes: try t.readConfig(offset: 0, count: BlkConfig.size))
        var queues = max(1, options.queues)
        if chosen.contains(.blkMultiQueue) { queues = min(queues, max(1, Int(cfg.numQueues))) } else { queues = 1 }
        if let m = t.maxQueues { queues = min(queues, m) }
        try t.negotiate(chosen, queueCount: queues)

        let segMax = chosen.contains(.blkSegMax) && cfg.segMax > 0 ? Int(cfg.segMax) : options.queueSize - 2
        let indirect = chosen.contains(.indirectDescriptors)
        // Without indirect descriptors a request's chain (header, data, status) must fit the ring.
        maxSegments = indirect ? segMax : min(segMax, options.queueSize - 2)
        maxSegmentBytes = chosen.contains(.blkSizeMax) && cfg.sizeMax > 0 ? Int(cfg.sizeMax) : nil
        let rings = try layout == .packed ? Self.rings(PackedVirtqueue.self, count: queues, size: options.queueSize)
                                          : Self.rings(SplitVirtqueue.self, count: queues, size: options.queueSize)
        var slabs: [DMAMemory] = [], tables: [DMAMemory?] = []
        for _ in 0..<queues {
            slabs.append(try DMAMemory(size: options.queueSize * BlkSlot.bytes))
            tables.append(indirect ? try DMAMemory(size: IndirectTables.bytes(queueSize: options.queueSize,
                                                                              entriesPerTable: maxSegments + 2)) : nil)
        }
        try t.setMemory(try DPDKMemory.regions())
        for (q, ring) in rings.enumerated() { try t.setupQueue(q, addresses: ring.addresses) }
        try t.start()
        transport = t
        usesIOVA = t.bufferAddressing == .iova
        features = chosen
        config = cfg
        queueCount = queues
        queueSize = options.queueSize
        ringLayout = layout
        self.rings = rings.map(\.memory); self.slabs = slabs; self.tables = tables
        taken = Array(repeating: false, count: queues)
        self.logger = logger
        logger.info("virtio-blk \(t.deviceDescription): \(cfg.capacity) sectors (\(cfg.capacity * 512 / 1_048_576) MiB), block \(cfg.blockSize), seg_max \(cfg.segMax), size_max \(cfg.sizeMax), \(queues) \(layout) queue(s) of \(options.queueSize), features \(chosen)")
    }

    /// Memory for `count` rings of `Ring`, each with the addresses and base of a fresh ring on it
    /// (the queue `makeQueue` lays over the same memory later starts there too).
    static func rings<Ring: Virtqueue & ~Copyable>(_: Ring.Type, count: Int, size: Int) throws -> [(memory: DMAMemory, addresses: QueueAddresses)] {
        let bytes = try Ring.ringBytes(size: size)
        return try (0..<count).map { _ in
            let m = try DMAMemory(size: bytes)
            return (m, try Ring(memory: m.pointer, size: size, inOrder: false, eventIndex: false).addresses)
        }
    }

    /// Queue `index`, once, with the ring type of `ringLayout` (`SplitVirtqueue` or
    /// `PackedVirtqueue`). The device must outlive it.
    public func makeQueue<Ring: Virtqueue & ~Copyable>(_ index: Int, as _: Ring.Type) -> VirtioBlkQueue<Ring> {
        precondition(index < queueCount && !taken[index], "queue \(index) does not exist or was already taken")
        precondition(Ring.layoutName == ringLayout.rawValue, "the device's queues are \(ringLayout), not \(Ring.layoutName)")
        taken[index] = true
        var vq = try! Ring(memory: rings[index].pointer, size: queueSize, inOrder: features.contains(.inOrder),
                           eventIndex: features.contains(.eventIndex))
        if let t = tables[index] {
            let tables = IndirectTables(base: t.pointer.bindMemory(to: VirtqDesc.self, capacity: queueSize * (maxSegments + 2)),
                                        baseAddress: usesIOVA ? t.iova : UInt64(UInt(bitPattern: t.pointer)), entriesPerTable: maxSegments + 2)
            let used = vq.useIndirect(tables)
            precondition(used, "indirect descriptors are negotiated for split rings only")
        }
        let slab = slabs[index]
        return VirtioBlkQueue(index: index, queue: vq, slab: slab.pointer,
                              slabAddress: usesIOVA ? slab.iova : UInt64(UInt(bitPattern: slab.pointer)), device: self)
    }

    /// Stops every queue at the device; afterwards the device touches none of our memory.
    public func stop() { try? transport.stop() }
}
