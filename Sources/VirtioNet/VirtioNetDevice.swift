import DPDK
import Logging
import VirtioCore
#if canImport(Glibc)
import Glibc
#endif

/// What a virtio-net device is opened with.
public struct VirtioNetOptions: Sendable {
    public var ringSize = 256
    /// Queue pairs to set up (VIRTIO_NET_F_MQ when more than one); all of them are active at start.
    public var queuePairs = 1
    /// Ring layout: `auto` takes packed when the device offers VIRTIO_F_RING_PACKED.
    public var ring: RingLayoutChoice = .auto
    /// Negotiate VIRTIO_F_IN_ORDER when offered (off: exercise the out-of-order path).
    public var allowInOrder = true
    /// Negotiate VIRTIO_NET_F_MRG_RXBUF when offered (needed for frames larger than one mbuf).
    public var allowMergeableRxBuffers = true
    /// The port's MAC address; with a control queue and VIRTIO_NET_F_CTRL_MAC_ADDR it is also
    /// given to the device (MAC_ADDR_SET).
    public var mac: EthernetAddress?
    /// RX modes set through the control queue at start (VIRTIO_NET_F_CTRL_RX); on vhost-user the
    /// frontend's state only.
    public var promiscuous: Bool?
    public var allMulticast: Bool?
    /// The port number of the device (every queue pair's `VirtioNetPort` carries it, with its pair).
    public var portID: UInt16 = 0
    /// Ride through a loss of the device (vhost-user: the backend restarts): the link goes down,
    /// each port's `maintainLink` hands back its mbufs, and the device is reconnected with the
    /// same features. nil: a loss is final. Ignored where the transport cannot reconnect (PCI).
    public var reconnect: ReconnectPolicy?
    public init() {}
}

/// Runs with the devices of `VirtioNetDevice.open`, specialised for the ring layout they use.
public protocol VirtioNetDeviceBody {
    associatedtype Output
    func run<Ring: Virtqueue & ~Copyable>(_ devices: [VirtioNetDevice<Ring>]) throws -> Output
}

/// A failure to open one of several devices: which one, and why.
public struct VirtioNetOpenError: Error, CustomStringConvertible {
    public var device: Int
    public var error: any Error
    public var description: String { "\(error)" }
}

/// Opens every transport's virtio-net device with one ring layout (`options.ring`, resolved over
/// all of them: `auto` is packed only if every device offers it) and runs `body` with them,
/// specialised for that layout. Device k is port `options.portID + k`. Inlinable: the body is
/// specialised in the caller's module, so its loops call the ports' bursts directly.
@inlinable
public func openVirtioNetDevices<Body: VirtioNetDeviceBody>(
    _ transports: [any VirtioTransport], pool: PacketPool, options: VirtioNetOptions = VirtioNetOptions(),
    logger: Logger = Logger(label: "virtio-net"), _ body: Body) throws -> Body.Output
{
    let layout = try resolveLayout(transports, options.ring)
    return try layout.dispatch(NetOpener(transports: transports, pool: pool, options: options, logger: logger, body: body))
}

@usableFromInline
func resolveLayout(_ transports: [any VirtioTransport], _ ring: RingLayoutChoice) throws -> RingLayoutChoice {
    guard let layout = ring.resolve(offeredByAll: transports.map(\.deviceFeatures)) else {
        let i = transports.firstIndex { ring.resolve(offered: $0.deviceFeatures) == nil } ?? 0
        throw VirtioNetOpenError(device: i, error: VirtioNetError.layoutNotOffered(ring.rawValue))
    }
    return layout
}

@usableFromInline
struct NetOpener<Body: VirtioNetDeviceBody>: VirtqueueLayoutBody {
    @usableFromInline let transports: [any VirtioTransport], pool: PacketPool, options: VirtioNetOptions, logger: Logger, body: Body
    @inlinable init(transports: [any VirtioTransport], pool: PacketPool, options: VirtioNetOptions, logger: Logger, body: Body) {
        self.transports = transports; self.pool = pool; self.options = options; self.logger = logger; self.body = body
    }
    @inlinable
    func run<R: Virtqueue & ~Copyable>(_: R.Type) throws -> Body.Output {
        try body.run(try openDevices(R.self, transports, pool: pool, options: options, logger: logger))
    }
}

/// Opens each transport's device as `VirtioNetDevice<R>`; on a failure the ones opened are stopped.
@usableFromInline
func openDevices<R: Virtqueue & ~Copyable>(_: R.Type, _ transports: [any VirtioTransport], pool: PacketPool, options: VirtioNetOptions,
                                          logger: Logger) throws -> [VirtioNetDevice<R>] {
    var devices: [VirtioNetDevice<R>] = []
    for (i, t) in transports.enumerated() {
        var o = options
        o.portID = options.portID &+ UInt16(truncatingIfNeeded: i)
        do { devices.append(try VirtioNetDevice<R>(transport: t, pool: pool, options: o, logger: logger)) } catch {
            for d in devices { d.stop() }
            throw VirtioNetOpenError(device: i, error: error)
        }
    }
    return devices
}

/// A virtio-net device (VIRTIO 1.2 §5.1) on the shared device core: negotiation, config space
/// (MAC, status, MTU, max_virtqueue_pairs), the control queue, and its queue pairs, each handed
/// out once as a `VirtioNetPort` owned by one lcore.
///
/// Control commands (VQ_PAIRS_SET, promiscuous / all-multicast, MAC_ADDR_SET) go to the device's
/// control queue when the transport carries one (virtio-pci). A vhost-user backend never sees a
/// control queue (QEMU and DPDK's virtio_user handle it in the frontend), so there the device
/// applies them itself: VQ_PAIRS_SET enables and disables the pairs' rings (SET_VRING_ENABLE);
/// the RX mode and MAC have no vhost-user message and are kept as the frontend's state.
public final class VirtioNetDevice<Ring: Virtqueue & ~Copyable>: @unchecked Sendable {
    public let core: VirtioDevice<Ring>
    public let pool: PacketPool
    public private(set) var mac: EthernetAddress
    /// The device's MTU (VIRTIO_NET_F_MTU), if it gives one.
    public let mtu: Int?
    /// The most queue pairs the device takes (config `max_virtqueue_pairs` with MQ, or the
    /// vhost-user backend's GET_QUEUE_NUM; 1 without MQ).
    public let maxQueuePairs: Int
    /// Queue pairs set up (`options.queuePairs`), each a `makePort`.
    public let queuePairs: Int
    /// Pairs the device uses now (VQ_PAIRS_SET); the others carry nothing.
    public private(set) var activeQueuePairs: Int
    public private(set) var promiscuous = false
    public private(set) var allMulticast = false
    public let ringSize: Int
    public let options: VirtioNetOptions
    public var features: VirtioFeatures { core.features }
    public var transport: any VirtioTransport { core.transport }
    let control: NetControlQueue<Ring>?
    let logger: Logger

    /// Negotiates with the device on `transport` for `Ring`'s layout, sets up
    /// `options.queuePairs` pairs (and the control queue, where the device has one) and starts it.
    public init(transport t: any VirtioTransport, pool: PacketPool, options: VirtioNetOptions = VirtioNetOptions(),
                memory: any DMAAllocator = DPDKDMAAllocator(), logger: Logger = Logger(label: "virtio-net")) throws {
        VirtioFeatures.registerNetNames()
        guard options.ringSize >= 64, options.ringSize <= 4096, options.ringSize & (options.ringSize - 1) == 0 else {
            throw VirtioNetError.invalidRingSize(options.ringSize)
        }
        guard options.queuePairs >= 1 else { throw VirtioNetError.invalidQueuePairs(requested: options.queuePairs, max: 1, why: "at least one pair is needed") }
        let need = options.ringSize * 2 * options.queuePairs
        guard pool.capacity >= need else { throw VirtioNetError.poolTooSmall(need: need, have: pool.capacity) }
        let offered = t.deviceFeatures
        // A legacy (pre-1.0) PCI device has no VERSION_1; our 12-byte header is its header with
        // MRG_RXBUF, so that is what it must offer instead.
        let required: VirtioFeatures = t.isLegacy ? [.netMergeableRxBuffers] : [.version1]
        var wanted: VirtioFeatures = [.version1, .netStatus]
        if options.allowInOrder { wanted.insert(.inOrder) }
        if options.allowMergeableRxBuffers || t.isLegacy { wanted.insert(.netMergeableRxBuffers) }
        if t.hasConfigSpace { wanted.formUnion([.netMAC, .netMTU]) }
        // MQ only for more than one pair (as DPDK's virtio_user): one pair needs no steering.
        let multiQueue = options.queuePairs > 1
        if t.carriesControlQueue {
            // MQ needs the control queue (§5.1.3.1); the RX mode and MAC commands ride on it.
            wanted.formUnion([.netControlQueue, .netControlRx, .netControlMACAddress])
            if multiQueue && offered.contains(.netControlQueue) { wanted.insert(.netMultiQueue) }
        } else if multiQueue {
            // The frontend carries the control queue; the backend needs only MQ to serve N pairs.
            wanted.insert(.netMultiQueue)
        }
        let negotiation: VirtioNegotiation
        do { negotiation = try VirtioNegotiation(offered: offered, required: required, wanted: wanted, ring: Ring.layout, device: "virtio-net") } catch {
            switch error {
            case .missingFeatures(_, let f): throw VirtioNetError.missingFeatures(f)
            case .layoutNotOffered: throw VirtioNetError.layoutNotOffered(Ring.layoutName)
            default: throw error
            }
        }
        let chosen = negotiation.chosen
        // Config space before the rings (DESIGN.md order: GET_CONFIG, then SET_VRING_CALL).
        func config16(_ offset: Int) throws -> UInt16 {
            let b = try t.readConfig(offset: offset, count: 2)
            guard b.count == 2 else { throw VirtioNetError.badConfig("a 2-byte read at \(offset) returned \(b.count) bytes") }
            return UInt16(b[0]) | UInt16(b[1]) << 8
        }
        var mac = options.mac ?? EthernetAddress.local(seed: UInt32(truncatingIfNeeded: getpidValue() << 8) | UInt32(options.portID))
        if options.mac == nil, chosen.contains(.netMAC) {
            let b = try t.readConfig(offset: VirtioNetConfig.macOffset, count: 6)
            guard b.count == 6 else { throw VirtioNetError.badConfig("the MAC read returned \(b.count) bytes") }
            mac = EthernetAddress(b)
        }
        mtu = chosen.contains(.netMTU) ? Int(try config16(VirtioNetConfig.mtuOffset)) : nil
        // How many pairs the device takes: config space with MQ (PCI), or the backend's
        // GET_QUEUE_NUM (vhost-user, which has no config space for net). Validated before use.
        var limit = 1
        if chosen.contains(.netMultiQueue) {
            if t.hasConfigSpace {
                let m = Int(try config16(VirtioNetConfig.maxQueuePairsOffset))
                guard VirtioNetConfig.queuePairRange.contains(m) else {
                    throw VirtioNetError.badConfig("max_virtqueue_pairs is \(m) (must be 1...32768)")
                }
                limit = m
            } else if case .deviceUnits(let n)? = t.queueLimit {
                guard VirtioNetConfig.queuePairRange.contains(n) else {
                    throw VirtioNetError.badConfig("the backend supports \(n) queue pairs (must be 1...32768)")
                }
                limit = n
            }
        }
        guard options.queuePairs <= limit else {
            throw VirtioNetError.invalidQueuePairs(requested: options.queuePairs, max: limit,
                                                   why: chosen.contains(.netMultiQueue) ? "the device offers \(limit)"
                                                       : "the device does not offer VIRTIO_NET_F_MQ\(t.carriesControlQueue ? " with a control queue" : "")")
        }
        var specs = (0..<(2 * options.queuePairs)).map { VirtqueueSpec(index: $0, size: options.ringSize) }
        var transportQueues = 2 * options.queuePairs
        if chosen.contains(.netControlQueue) {
            // The control queue follows the device's largest pair count (§5.1.2: index 2N).
            let index = 2 * limit
            // Its size is read after FEATURES_OK (QEMU adds the MQ queues then); at most 64.
            specs.append(.deviceSized(index: index, atMost: 64))
            transportQueues = index + 1
        }
        let core = try VirtioDevice<Ring>(transport: t, negotiation: negotiation, queues: specs,
                                          transportQueueCount: transportQueues, queuesPerUnit: 2, memory: memory)
        if case .virtqueues(let n)? = t.queueLimit {
            // A PCI device's num_queues (read after FEATURES_OK: it may follow MQ) must hold the
            // pairs and the control queue after them.
            let control = chosen.contains(.netControlQueue) ? 1 : 0
            guard n >= 2 * limit + control else {
                core.stop(reason: "bad queue count")
                throw VirtioNetError.badConfig("num_queues \(n) cannot hold \(limit) queue pair(s)\(control == 1 ? " and the control queue" : "")")
            }
        }
        control = chosen.contains(.netControlQueue) ? try NetControlQueue(core: core, slot: specs.count - 1) : nil
        try core.start()
        self.core = core
        self.pool = pool
        self.mac = mac
        maxQueuePairs = limit
        queuePairs = options.queuePairs
        // A device with a control queue starts on one pair (§5.1.6.5.5); vhost-user rings are
        // all enabled by `start`.
        activeQueuePairs = control != nil ? 1 : options.queuePairs
        ringSize = options.ringSize
        self.options = options
        self.logger = logger
        if control != nil && options.queuePairs > 1 { try setQueuePairs(options.queuePairs) }
        if let m = options.mac, control != nil, chosen.contains(.netControlMACAddress) { try setMAC(m) }
        if let on = options.promiscuous { try setPromiscuous(on) }
        if let on = options.allMulticast { try setAllMulticast(on) }
        if let policy = options.reconnect {
            // The device comes back as after a reset. Weak: the device core (which keeps these)
            // must not keep us.
            core.enableReconnect(policy, beforeSetup: { [weak self] in
                try self?.control?.resetRing()
            }, afterStart: { [weak self] in try self?.restoreAfterReconnect() })
            // The control queue is the device's own: reset in `beforeSetup`, not by a port.
            if let control { core.ownsRingReset([control.slot]) }
        }
        let modes = [options.promiscuous.map { "promiscuous \($0 ? "on" : "off")" }, options.allMulticast.map { "all-multicast \($0 ? "on" : "off")" }]
            .compactMap { $0 }.joined(separator: ", ")
        logger.info("port \(options.portID): \(t.deviceDescription) mac \(mac), \(Ring.layoutName) ring \(options.ringSize), \(options.queuePairs) of \(limit) queue pair(s)\(control != nil ? ", control queue" : "")\(modes.isEmpty ? "" : ", " + modes), features \(chosen)\(chosen.contains(.inOrder) ? "" : " (out-of-order path)")")
    }

    deinit { stop() }

    /// Port for queue pair `pair` (RX queue 2·pair, TX queue 2·pair+1), once: its RX ring is
    /// filled from the pool. Owned by one lcore; the device must outlive it.
    public func makePort(_ pair: Int) throws -> VirtioNetPort<Ring> {
        guard pair >= 0, pair < queuePairs else { throw VirtioNetError.invalidQueuePairs(requested: pair + 1, max: queuePairs, why: "only \(queuePairs) were set up") }
        guard !core.isTaken(2 * pair) else { throw VirtioNetError.portTaken(pair) }
        return VirtioNetPort(device: self, pair: pair)
    }

    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: the device uses pairs 0..<n from now on (§5.1.6.5.5).
    public func setQueuePairs(_ n: Int) throws {
        guard n >= 1, n <= queuePairs else {
            throw VirtioNetError.invalidQueuePairs(requested: n, max: queuePairs, why: "\(queuePairs) pair(s) were set up")
        }
        if let control {
            if features.contains(.netMultiQueue) {
                try control.command(VirtioNetControl.classMQ, VirtioNetControl.mqVQPairsSet, [UInt8(n & 0xff), UInt8(n >> 8)])
            }
        } else if features.contains(.netMultiQueue) || queuePairs > 1 {
            // vhost-user: rings of the pairs in use enabled, the others disabled.
            for p in 0..<queuePairs {
                try transport.setQueueEnabled(2 * p, p < n)
                try transport.setQueueEnabled(2 * p + 1, p < n)
            }
        }
        activeQueuePairs = n
        logger.debug("virtio-net \(transport.deviceDescription): \(n) queue pair(s) active")
    }

    /// VIRTIO_NET_CTRL_RX_PROMISC.
    public func setPromiscuous(_ on: Bool) throws {
        try rxMode(VirtioNetControl.rxPromisc, on)
        promiscuous = on
    }

    /// VIRTIO_NET_CTRL_RX_ALLMULTI.
    public func setAllMulticast(_ on: Bool) throws {
        try rxMode(VirtioNetControl.rxAllMulti, on)
        allMulticast = on
    }

    private func rxMode(_ cmd: UInt8, _ on: Bool) throws {
        guard let control else { return }
        guard features.contains(.netControlRx) else { throw VirtioNetError.controlUnsupported("VIRTIO_NET_F_CTRL_RX") }
        try control.command(VirtioNetControl.classRx, cmd, [on ? 1 : 0])
    }

    /// VIRTIO_NET_CTRL_MAC_ADDR_SET: the device's own address. Ports made afterwards use it.
    public func setMAC(_ address: EthernetAddress) throws {
        if let control {
            guard features.contains(.netControlMACAddress) else { throw VirtioNetError.controlUnsupported("VIRTIO_NET_F_CTRL_MAC_ADDR") }
            try control.command(VirtioNetControl.classMAC, VirtioNetControl.macAddrSet, address.array)
        }
        mac = address
    }

    /// Whether the device runs and no queue failed (off the data path).
    public var isLinkUp: Bool { core.isLinkUp }

    /// Stops the device: every pair stops. Ports still open see the link down; their `close`
    /// then frees their mbufs.
    public func stop(reason: String = "device stopped") { core.stop(reason: reason) }

    /// After a reconnect: what the device had been told before, again. A vhost-user backend
    /// starts with every ring enabled (the pairs not in use are disabled); a reset PCI device
    /// starts on one pair with the default RX modes and its own MAC.
    func restoreAfterReconnect() throws {
        if control != nil {
            if activeQueuePairs > 1 { try control!.command(VirtioNetControl.classMQ, VirtioNetControl.mqVQPairsSet, [UInt8(activeQueuePairs & 0xff), UInt8(activeQueuePairs >> 8)]) }
            if options.mac != nil, features.contains(.netControlMACAddress) { try setMAC(mac) }
            if promiscuous { try setPromiscuous(true) }
            if allMulticast { try setAllMulticast(true) }
        } else if activeQueuePairs < queuePairs {
            for p in activeQueuePairs..<queuePairs {
                try transport.setQueueEnabled(2 * p, false)
                try transport.setQueueEnabled(2 * p + 1, false)
            }
        }
    }

    /// The control queue again after a restart (PCI resets the device, so it starts afresh).
    func resumeControlQueue() throws { try control?.resume() }
}

/// The control virtqueue of a device that processes one itself (virtio-pci): one command at a
/// time, synchronously, off the data path. A command is a chain of the 2-byte header (class,
/// command), its data and the device-written ack byte, in one small DMA buffer.
final class NetControlQueue<Ring: Virtqueue & ~Copyable> {
    let core: VirtioDevice<Ring>
    let slot: Int
    var ring: Ring
    let buffer: any DMARegion
    let bufferAddress: UInt64
    static var dataOffset: Int { 16 }
    static var ackOffset: Int { 64 }
    static var maxData: Int { 48 }
    /// How long a command may take before the device counts as broken.
    let timeoutNanoseconds: UInt64 = 2_000_000_000

    init(core: VirtioDevice<Ring>, slot: Int) throws {
        self.core = core
        self.slot = slot
        buffer = try core.allocate(bytes: 4096)
        bufferAddress = core.deviceAddress(of: buffer)
        ring = core.makeQueue(slot)
    }

    /// Back to a fresh ring (the device was reset; a command in flight is abandoned).
    func resetRing() {
        _ = ring.reclaimAll { _ in }
        ring.restart(at: Ring.resetBase)
    }

    func resume() throws {
        _ = ring.reclaimAll { _ in }
        ring.restart(at: Ring.resetBase)
        try core.resume(slot, addresses: ring.addresses)
    }

    func command(_ cls: UInt8, _ cmd: UInt8, _ data: [UInt8]) throws {
        precondition(data.count <= Self.maxData)
        let name = "control command class \(cls) command \(cmd)"
        if let e = ring.failure { throw VirtioNetError.controlFailed(name, "the control queue stopped: \(e)") }
        let p = buffer.pointer
        p.storeBytes(of: cls, as: UInt8.self)
        p.storeBytes(of: cmd, toByteOffset: 1, as: UInt8.self)
        for (i, b) in data.enumerated() { p.storeBytes(of: b, toByteOffset: Self.dataOffset + i, as: UInt8.self) }
        // An ack the device never wrote reads as neither OK nor ERR.
        p.storeBytes(of: UInt8(0xff), toByteOffset: Self.ackOffset, as: UInt8.self)
        let base = bufferAddress
        let segments = data.isEmpty ? 2 : 3
        let added = ring.addChain(count: segments, cookie: UnsafeMutableRawPointer(bitPattern: 1)) { i in
            if i == 0 { return VirtqSegment(addr: base, len: 2, deviceWritable: false) }
            if i == segments - 1 { return VirtqSegment(addr: base + UInt64(Self.ackOffset), len: 1, deviceWritable: true) }
            return VirtqSegment(addr: base + UInt64(Self.dataOffset), len: UInt32(data.count), deviceWritable: false)
        }
        guard added else { throw VirtioNetError.controlFailed(name, "the control queue is full (a command never completed)") }
        if ring.publish() { core.transport.notify(queue: core.queues[slot].index) }
        var cookie: UnsafeMutableRawPointer? = nil
        var length: UInt32 = 0
        let start = monotonicNanoseconds()
        while true {
            if ring.harvest(into: &cookie, lengths: &length, max: 1) == 1 { break }
            if let e = ring.failure { throw VirtioNetError.controlFailed(name, "the device broke the control queue: \(e)") }
            if !core.isLinkUp { throw VirtioNetError.controlFailed(name, core.link.reason ?? "device gone") }
            if monotonicNanoseconds() - start > timeoutNanoseconds {
                throw VirtioNetError.controlFailed(name, "no answer within \(timeoutNanoseconds / 1_000_000) ms")
            }
        }
        let ack = p.load(fromByteOffset: Self.ackOffset, as: UInt8.self)
        guard ack == VirtioNetControl.ok else {
            throw VirtioNetError.controlFailed(name, ack == VirtioNetControl.err ? "the device answered VIRTIO_NET_ERR" : "invalid ack byte 0x\(String(ack, radix: 16))")
        }
    }
}

func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
