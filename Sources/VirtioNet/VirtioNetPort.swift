import DPDK
import Logging
import VhostUser
import VirtioCore

/// Per-port counters, updated once per burst.
public struct NetCounters: Sendable, Equatable {
    public var rxPackets: UInt64 = 0
    public var rxBytes: UInt64 = 0
    public var txPackets: UInt64 = 0
    public var txBytes: UInt64 = 0
    /// Packets the caller offered that did not fit in the TX ring.
    public var txDrops: UInt64 = 0
    /// Malformed receive buffers (shorter than the header, bad `num_buffers`), dropped.
    public var rxErrors: UInt64 = 0
    /// TX packets we could not describe (too little headroom, too many segments), dropped.
    public var txErrors: UInt64 = 0
    /// Refills that found the mempool empty.
    public var rxNoMbuf: UInt64 = 0
    public init() {}
}

public enum VirtioNetError: Error, CustomStringConvertible {
    case missingFeatures(VirtioFeatures)
    case invalidRingSize(Int)
    case queueFailed(queue: String, VirtqueueError)
    case poolTooSmall(need: Int, have: Int)
    case layoutNotOffered(String)
    case restartUnsupported
    case restartInconsistent(queue: String, device: UInt32, driver: UInt32)

    public var description: String {
        switch self {
        case .missingFeatures(let f): return "the virtio-net device lacks required features: \(f)"
        case .invalidRingSize(let s): return "ring size \(s) must be a power of two from 64 to 4096"
        case let .queueFailed(q, e): return "\(q) queue stopped: \(e)"
        case let .poolTooSmall(need, have): return "mbuf pool of \(have) cannot fill the rings (\(need) needed plus bursts in flight)"
        case .restartUnsupported: return "the transport did not report where the device stopped its rings"
        case .layoutNotOffered(let l): return "the virtio-net device does not offer \(l) virtqueues"
        case let .restartInconsistent(q, device, driver):
            return "\(q) ring: the device stopped at 0x\(String(device, radix: 16)) but every buffer up to 0x\(String(driver, radix: 16)) was completed"
        }
    }
}

/// What a port is opened with.
public struct VirtioNetOptions: Sendable {
    public var ringSize = 256
    /// Negotiate VIRTIO_F_IN_ORDER when offered (off: exercise the out-of-order path).
    public var allowInOrder = true
    /// Negotiate VIRTIO_NET_F_MRG_RXBUF when offered (needed for frames larger than one mbuf).
    public var allowMergeableRxBuffers = true
    public var mac: EthernetAddress?
    public var portID: UInt16 = 0
    public init() {}
}

/// A virtio-net port with one RX and one TX queue, polled by one lcore. Owns its rings by value
/// (non-copyable: no reference counting on the data path); pass it `inout` to the loop.
/// Generic over the ring layout (`SplitVirtqueue` or `PackedVirtqueue`): callers pick it once, at
/// open, and every burst is specialised for it.
public struct VirtioNetPort<Ring: Virtqueue & ~Copyable>: ~Copyable {
    public let portID: UInt16
    public let mac: EthernetAddress
    public let features: VirtioFeatures
    public let ringSize: Int
    /// vhost-user or virtio-pci (issue 7): any transport; `notify` is the only data-path call.
    public let transport: any VirtioTransport
    public let pool: PacketPool
    public var counters = NetCounters()

    @usableFromInline var rx: Ring
    @usableFromInline var tx: Ring
    let rxMemory: DMAMemory
    let txMemory: DMAMemory
    @usableFromInline let mergeable: Bool
    /// The transport wants bus addresses (virtio-pci): descriptors carry `buf_iova`-based IOVAs
    /// instead of process virtual addresses. Chosen once at init.
    @usableFromInline let iova: Bool
    /// Scratch arrays sized to the ring, allocated once.
    @usableFromInline let cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    @usableFromInline let lengths: UnsafeMutablePointer<UInt32>
    @usableFromInline let staging: UnsafeMutablePointer<Mbuf>
    /// A merged frame whose later buffers have not completed yet.
    @usableFromInline var partialHead: Mbuf?
    @usableFromInline var partialTail: Mbuf?
    @usableFromInline var partialRemaining = 0
    var closed = false

    /// Connects to the vhost-user backend at `path`, negotiates, and starts the port with its RX
    /// ring full of mbufs from `pool`. Create every pool before the first port: the memory table
    /// the backend gets is DPDK's memory at this moment.
    public init(vhostUserPath path: String, pool: PacketPool, options: VirtioNetOptions = VirtioNetOptions(),
                logger: Logger = Logger(label: "virtio-net")) throws {
        try self.init(transport: try VhostUserConnection(path: path, logger: logger), pool: pool, options: options, logger: logger)
    }

    /// Starts a port on an open transport (vhost-user, virtio-pci): negotiates, sets up both
    /// queues and fills the RX ring.
    public init(transport t: any VirtioTransport, pool: PacketPool, options: VirtioNetOptions = VirtioNetOptions(),
                logger: Logger = Logger(label: "virtio-net")) throws {
        VirtioFeatures.registerNetNames()
        guard options.ringSize >= 64, options.ringSize <= 4096, options.ringSize & (options.ringSize - 1) == 0 else {
            throw VirtioNetError.invalidRingSize(options.ringSize)
        }
        guard pool.capacity >= options.ringSize * 2 else { throw VirtioNetError.poolTooSmall(need: options.ringSize * 2, have: pool.capacity) }
        let offered = t.deviceFeatures
        // A legacy (pre-1.0) PCI device has no VERSION_1; our 12-byte header is its header with
        // MRG_RXBUF, so that is what it must offer instead.
        let required: VirtioFeatures = t.isLegacy ? [.netMergeableRxBuffers] : [.version1]
        guard offered.isSuperset(of: required) else { throw VirtioNetError.missingFeatures(required.subtracting(offered)) }
        guard offered.isSuperset(of: Ring.layoutFeatures) else { throw VirtioNetError.layoutNotOffered(Ring.layoutName) }
        var wanted: VirtioFeatures = [.version1, .netStatus]
        wanted.formUnion(Ring.layoutFeatures)
        if options.allowInOrder { wanted.insert(.inOrder) }
        if options.allowMergeableRxBuffers || t.isLegacy { wanted.insert(.netMergeableRxBuffers) }
        if t.hasConfigSpace { wanted.formUnion([.netMAC, .netMTU]) }
        let chosen = offered.intersection(wanted)
        // Config space before the rings (DESIGN.md order: GET_CONFIG, then SET_VRING_CALL).
        var mac = options.mac ?? EthernetAddress.local(seed: UInt32(truncatingIfNeeded: getpidValue() << 8) | UInt32(options.portID))
        if options.mac == nil, chosen.contains(.netMAC) {
            mac = EthernetAddress(try t.readConfig(offset: 0, count: 6))
        }
        try t.negotiate(chosen, queueCount: 2)
        let ringBytes = try Ring.ringBytes(size: options.ringSize)
        let rxMem = try DMAMemory(size: ringBytes)
        let txMem = try DMAMemory(size: ringBytes)
        let inOrder = chosen.contains(.inOrder)
        let rxq = try Ring(memory: rxMem.pointer, size: options.ringSize, inOrder: inOrder, eventIndex: false)
        let txq = try Ring(memory: txMem.pointer, size: options.ringSize, inOrder: inOrder, eventIndex: false)
        // Every pool and ring exists now, so the memory table covers all the device will see.
        try t.setMemory(try DPDKMemory.regions())
        try t.setupQueue(0, addresses: rxq.addresses)
        try t.setupQueue(1, addresses: txq.addresses)
        try t.start()
        rx = rxq
        tx = txq
        rxMemory = rxMem
        txMemory = txMem
        transport = t
        self.pool = pool
        portID = options.portID
        self.mac = mac
        features = chosen
        ringSize = options.ringSize
        mergeable = chosen.contains(.netMergeableRxBuffers)
        iova = t.bufferAddressing == .iova
        cookies = .allocate(capacity: options.ringSize)
        lengths = .allocate(capacity: options.ringSize)
        staging = .allocate(capacity: options.ringSize)
        refill()
        logger.info("port \(portID): \(t.deviceDescription) mac \(mac), \(Ring.layoutName) ring \(options.ringSize), features \(chosen)\(inOrder ? "" : " (out-of-order path)")")
    }

    deinit {
        if !closed { _ = shutdown() }
        cookies.deallocate(); lengths.deallocate(); staging.deallocate()
    }

    /// Link is up while the backend is connected and both queues are healthy.
    public var isLinkUp: Bool { transport.isConnected && rx.failure == nil && tx.failure == nil }

    /// Why the link is down, if it is.
    public var linkError: String? {
        if let e = rx.failure { return VirtioNetError.queueFailed(queue: "RX", e).description }
        if let e = tx.failure { return VirtioNetError.queueFailed(queue: "TX", e).description }
        if !transport.isConnected { return transport.disconnectReason ?? "device disconnected" }
        return nil
    }

    // MARK: Receive

    /// Receives up to `max` packets into `out`; a frame spread over several buffers (MRG_RXBUF)
    /// comes back as one chained mbuf. Refills the ring and publishes it once.
    @inlinable
    public mutating func rxBurst(_ out: UnsafeMutablePointer<Mbuf>, max: Int) -> Int {
        let got = rx.harvest(into: cookies, lengths: lengths, max: Swift.min(max, ringSize))
        let headroom = Mbuf.headroom
        let hdr = UInt16(VirtioNetHeader.size)
        var n = 0
        var bytes: UInt64 = 0
        var i = 0
        while i < got {
            let m = Mbuf(OpaquePointer(cookies[i].unsafelyUnwrapped))
            let len = lengths[i]
            i &+= 1
            if partialRemaining == 0 {
                guard len >= UInt32(hdr) else { counters.rxErrors &+= 1; m.free(); continue }
                let dataLen = UInt16(truncatingIfNeeded: len) &- hdr
                m.dataLength = dataLen
                m.packetLength = UInt32(dataLen)
                var buffers = 1
                if mergeable {
                    buffers = Int(m.bufferAddress.loadUnaligned(fromByteOffset: Int(headroom &- hdr) + VirtioNetHeader.numBuffersOffset, as: UInt16.self))
                    if buffers == 0 || buffers > ringSize { counters.rxErrors &+= 1; m.free(); continue }
                }
                if buffers == 1 {
                    out[n] = m; n &+= 1; bytes &+= UInt64(dataLen)
                } else {
                    partialHead = m; partialTail = m; partialRemaining = buffers &- 1
                }
            } else {
                // A continuation buffer: payload from the first byte we posted (no header).
                let head = partialHead.unsafelyUnwrapped
                m.dataOffset = headroom &- hdr
                m.dataLength = UInt16(truncatingIfNeeded: len)
                partialTail.unsafelyUnwrapped.next = m
                partialTail = m
                head.packetLength &+= len
                head.segmentCount &+= 1
                partialRemaining &-= 1
                if partialRemaining == 0 {
                    out[n] = head; n &+= 1; bytes &+= UInt64(head.packetLength)
                    partialHead = nil; partialTail = nil
                }
            }
        }
        counters.rxPackets &+= UInt64(n)
        counters.rxBytes &+= bytes
        if got > 0 || rx.freeCount >= 32 { refill() }
        return n
    }

    /// Fills every free RX descriptor with a fresh mbuf, the virtio-net header just in front of
    /// the mbuf's data room, and publishes them with one index store.
    @inlinable
    mutating func refill() {
        let free = rx.freeCount
        guard free > 0, rx.failure == nil else { return }
        guard pool.allocate(staging, count: free) else { counters.rxNoMbuf &+= 1; return }
        let back = UInt64(Mbuf.headroom) &- UInt64(VirtioNetHeader.size)
        let staging = self.staging
        let iova = self.iova
        rx.addBurst(count: free, deviceWritable: true) { k in
            let m = staging[k]
            let base = iova ? m.bufferIOVA : UInt64(UInt(bitPattern: m.bufferAddress))
            return (base &+ back, UInt32(m.bufferLength) &- UInt32(back), m.cookie)
        }
        if rx.publish() { transport.notify(queue: 0) }
    }

    // MARK: Transmit

    /// Frees the mbufs of completed transmissions, in bulk.
    @inlinable
    mutating func reclaimTX() {
        let done = tx.harvest(into: cookies, lengths: lengths, max: ringSize)
        if done > 0 {
            cookies.withMemoryRebound(to: Mbuf.self, capacity: done) { freeBulk($0, count: done) }
        }
    }

    /// Queues up to `count` packets; returns how many were taken (the rest stay the caller's).
    /// The virtio-net header goes into each mbuf's headroom, so a one-segment packet is one
    /// descriptor; a chained mbuf becomes a descriptor chain.
    @inlinable
    public mutating func txBurst(_ pkts: UnsafeMutablePointer<Mbuf>, count: Int) -> Int {
        reclaimTX()
        guard tx.failure == nil else { return 0 }
        let hdr = UInt16(VirtioNetHeader.size)
        var sent = 0
        var bytes: UInt64 = 0
        // Fast path, chosen once per burst: every packet is one segment with room for the header
        // in front of its data, so each is exactly one descriptor.
        let n = Swift.min(count, tx.freeCount)
        var simple = true
        for i in 0..<n where pkts[i].segmentCount != 1 || pkts[i].dataOffset < hdr { simple = false; break }
        let iova = self.iova
        if simple {
            tx.addBurst(count: n, deviceWritable: false) { i in
                let m = pkts[i]
                let h = m.data - Int(hdr)
                h.storeBytes(of: UInt64(0), as: UInt64.self)
                h.storeBytes(of: UInt32(0), toByteOffset: 8, as: UInt32.self)
                let len = m.dataLength
                bytes &+= UInt64(len)
                let addr = iova ? m.bufferIOVA &+ UInt64(m.dataOffset &- hdr) : UInt64(UInt(bitPattern: h))
                return (addr, UInt32(len &+ hdr), m.cookie)
            }
            sent = n
        } else {
            while sent < count {
                let m = pkts[sent]
                let segs = Int(m.segmentCount)
                guard tx.freeCount >= segs else { break }
                guard m.dataOffset >= hdr, segs <= ringSize else {
                    // Cannot describe it; drop it rather than stall the queue.
                    counters.txErrors &+= 1; m.free(); sent &+= 1; continue
                }
                let h = m.data - Int(hdr)
                h.storeBytes(of: UInt64(0), as: UInt64.self)
                h.storeBytes(of: UInt32(0), toByteOffset: 8, as: UInt32.self)
                let addr = iova ? m.bufferIOVA &+ UInt64(m.dataOffset &- hdr) : UInt64(UInt(bitPattern: h))
                var seg = m
                _ = tx.addChain(count: segs, cookie: m.cookie) { k in
                    if k == 0 { return VirtqSegment(addr: addr, len: UInt32(m.dataLength &+ hdr), deviceWritable: false) }
                    seg = seg.next.unsafelyUnwrapped
                    let a = iova ? seg.bufferIOVA &+ UInt64(seg.dataOffset) : UInt64(UInt(bitPattern: seg.data))
                    return VirtqSegment(addr: a, len: UInt32(seg.dataLength), deviceWritable: false)
                }
                bytes &+= UInt64(m.packetLength)
                sent &+= 1
            }
        }
        if tx.publish() { transport.notify(queue: 1) }
        counters.txPackets &+= UInt64(sent)
        counters.txBytes &+= bytes
        return sent
    }

    // MARK: Stop

    /// Stops the device (if it is still there) and returns every mbuf the rings held to the pool.
    /// Returns how many mbufs were reclaimed. Dropping a port without `close()` does the same.
    @discardableResult
    public consuming func close() -> Int {
        let n = shutdown()
        closed = true
        return n
    }

    /// After GET_VRING_BASE (or with the backend gone) the rings are ours alone: free every mbuf
    /// they still hold. The ring memory itself is released with the port.
    func shutdown() -> Int {
        try? transport.stop()
        var reclaimed = rx.forEachInFlight(Self.freeMbuf) + tx.forEachInFlight(Self.freeMbuf)
        if let p = partialHead { p.free(); reclaimed += 1 }
        return reclaimed
    }

    /// A ring cookie is an mbuf: back to its pool.
    static func freeMbuf(_ cookie: UnsafeMutableRawPointer?) {
        if let m = Mbuf(cookie: cookie) { m.free() }
    }

    /// Stops both queues and starts them again on the same connection, each continuing from the
    /// ring position (and, packed, the wrap counter) the device reported at the stop: what the
    /// device had not consumed is reclaimed, the RX ring is refilled. Checks that the device's
    /// TX position is where our completions say it must be. Returns the mbufs reclaimed.
    @discardableResult
    public mutating func restart() throws -> Int {
        reclaimTX()
        let txIdle = tx.inFlight == 0 && tx.failure == nil
        let txExpected = tx.addresses.base
        try transport.stop()
        // vhost-user reports where each ring stopped; a transport that resets the device (PCI)
        // starts both rings afresh.
        let reported = transport.stoppedBases
        let bases = reported ?? [Ring.resetBase, Ring.resetBase]
        guard bases.count == 2 else { throw VirtioNetError.restartUnsupported }
        if reported != nil && txIdle && bases[1] != txExpected {
            throw VirtioNetError.restartInconsistent(queue: "TX", device: bases[1], driver: txExpected)
        }
        var reclaimed = rx.reclaimAll(Self.freeMbuf) + tx.reclaimAll(Self.freeMbuf)
        if let p = partialHead { p.free(); reclaimed += 1; partialHead = nil; partialTail = nil; partialRemaining = 0 }
        rx.restart(at: bases[0])
        tx.restart(at: bases[1])
        try transport.setupQueue(0, addresses: rx.addresses)
        try transport.setupQueue(1, addresses: tx.addresses)
        try transport.start()
        refill()
        return reclaimed
    }
}

@usableFromInline func getpidValue() -> UInt32 {
    UInt32(truncatingIfNeeded: getpid())
}
#if canImport(Glibc)
import Glibc
#endif
