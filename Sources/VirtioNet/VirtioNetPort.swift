import DPDK
import Logging
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
    /// TX packets offered while the device's link was down (not taken: `txBurst` returned 0).
    public var txLinkDown: UInt64 = 0
    public init() {}
}

public enum VirtioNetError: Error, CustomStringConvertible {
    case missingFeatures(VirtioFeatures)
    case invalidRingSize(Int)
    case queueFailed(queue: String, VirtqueueError)
    case poolTooSmall(need: Int, have: Int)
    case layoutNotOffered(String)
    case restartInconsistent(queue: String, device: UInt32, driver: UInt32)
    case restartNeedsOnePair(Int)
    case invalidQueuePairs(requested: Int, max: Int, why: String)
    case portTaken(Int)
    /// The device's config space holds a value the driver cannot use.
    case badConfig(String)
    case controlUnsupported(String)
    case controlFailed(String, String)

    public var description: String {
        switch self {
        case .missingFeatures(let f): return "the virtio-net device lacks required features: \(f)"
        case .invalidRingSize(let s): return "ring size \(s) must be a power of two from 64 to 4096"
        case let .queueFailed(q, e): return "\(q) queue stopped: \(e)"
        case let .poolTooSmall(need, have): return "mbuf pool of \(have) cannot fill the rings (\(need) needed plus bursts in flight)"
        case .layoutNotOffered(let l): return "the virtio-net device does not offer \(l) virtqueues"
        case .restartNeedsOnePair(let n): return "a restart of one port stops the whole device; it has \(n) queue pairs (restart them together)"
        case let .invalidQueuePairs(r, m, why): return "\(r) queue pair(s) requested, at most \(m): \(why)"
        case .portTaken(let p): return "queue pair \(p) already has its port"
        case .badConfig(let s): return "virtio-net device config: \(s)"
        case .controlUnsupported(let f): return "the device does not offer \(f) for this control command"
        case let .controlFailed(c, why): return "\(c): \(why)"
        case let .restartInconsistent(q, device, driver):
            return "\(q) ring: the device stopped at 0x\(String(device, radix: 16)) but every buffer up to 0x\(String(driver, radix: 16)) was completed"
        }
    }
}

/// One queue pair of a `VirtioNetDevice` (RX queue 2·pair, TX queue 2·pair+1), polled by one
/// lcore. Owns its rings by value (non-copyable: no reference counting on the data path); pass it
/// `inout` to the loop. Generic over the ring layout the device negotiated, so every burst is
/// specialised for it; the address mode (process virtual or IOVA) is an mbuf field offset chosen
/// when the port is made, so no burst asks.
public struct VirtioNetPort<Ring: Virtqueue & ~Copyable>: ~Copyable {
    public let portID: UInt16
    /// The queue pair this port drives.
    public let queuePair: Int
    public let mac: EthernetAddress
    public let features: VirtioFeatures
    public let ringSize: Int
    public let device: VirtioNetDevice<Ring>
    /// vhost-user or virtio-pci: any transport; `notify` is the only data-path call.
    public let transport: any VirtioTransport
    public let pool: PacketPool
    public var counters = NetCounters()

    @usableFromInline var rx: Ring
    @usableFromInline var tx: Ring
    @usableFromInline let rxQueueIndex: Int
    @usableFromInline let txQueueIndex: Int
    @usableFromInline let mergeable: Bool
    /// Where in an mbuf the buffer address the device understands lives (`buf_addr` or
    /// `buf_iova`), fixed at setup.
    @usableFromInline let addressField: Int
    /// Scratch arrays sized to the ring, allocated once.
    @usableFromInline let cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    @usableFromInline let lengths: UnsafeMutablePointer<UInt32>
    @usableFromInline let staging: UnsafeMutablePointer<Mbuf>
    /// A merged frame whose later buffers have not completed yet.
    @usableFromInline var partialHead: Mbuf?
    @usableFromInline var partialTail: Mbuf?
    @usableFromInline var partialRemaining = 0
    var closed = false
    /// The device's link (the device outlives the port): one relaxed load per TX burst, so
    /// nothing is queued on a ring whose device is gone.
    @usableFromInline unowned(unsafe) let link: DeviceLink
    /// The link epoch the rings were last set up for, and whether they were reset in this outage.
    var linkEpoch: UInt64
    var resetThisOutage = false
    /// Mbufs reclaimed from the rings at losses of the device (with a reconnect policy).
    public private(set) var reclaimedAtOutages = 0
    /// How many times the rings were reset for an outage.
    public private(set) var outageResets = 0
    /// TX frames in flight (queued, not completed) at each loss, summed.
    public private(set) var txLostAtOutages: UInt64 = 0

    /// Made by `VirtioNetDevice.makePort`: takes the pair's two rings and fills the RX ring.
    init(device d: VirtioNetDevice<Ring>, pair: Int) {
        device = d
        queuePair = pair
        portID = d.options.portID
        mac = d.mac
        features = d.features
        ringSize = d.ringSize
        transport = d.transport
        pool = d.pool
        rxQueueIndex = 2 * pair
        txQueueIndex = 2 * pair + 1
        rx = d.core.makeQueue(2 * pair)
        tx = d.core.makeQueue(2 * pair + 1)
        mergeable = d.features.contains(.netMergeableRxBuffers)
        addressField = Mbuf.addressField(for: d.core.addressing)
        cookies = .allocate(capacity: d.ringSize)
        lengths = .allocate(capacity: d.ringSize)
        staging = .allocate(capacity: d.ringSize)
        link = d.core.link
        linkEpoch = d.core.link.epoch
        refill()
    }

    deinit {
        if !closed { _ = shutdown() }
        cookies.deallocate(); lengths.deallocate(); staging.deallocate()
    }

    /// Link is up while the device runs and no queue of it failed. A failed ring of this port
    /// takes the device's link down, so every other port of the device sees it too. Off the data
    /// path (once per housekeeping tick).
    public var isLinkUp: Bool {
        if let e = rx.failure ?? tx.failure, device.core.link.isUp {
            device.core.link.markDown("port \(portID) pair \(queuePair): " + VirtioNetError.queueFailed(queue: rx.failure != nil ? "RX" : "TX", e).description)
        }
        return device.isLinkUp
    }

    /// Why the link is down, if it is.
    public var linkError: String? {
        if let e = rx.failure { return VirtioNetError.queueFailed(queue: "RX", e).description }
        if let e = tx.failure { return VirtioNetError.queueFailed(queue: "TX", e).description }
        return device.isLinkUp ? nil : device.core.link.reason ?? "device disconnected"
    }

    /// The link as the port's owner must act on it, once per housekeeping tick (off the data
    /// path). With a reconnect policy on the device, the first check after a loss hands every
    /// mbuf the rings held back to the pool and resets both rings (the device reconnects them from
    /// their reset position); the first check after the device is back refills RX.
    public mutating func maintainLink() -> PortLinkState {
        let core = device.core
        if core.isLinkUp && rx.failure == nil && tx.failure == nil {
            let e = link.epoch
            guard e != linkEpoch else { return .up }
            linkEpoch = e
            resetThisOutage = false
            refill()
            return .reconnected
        }
        _ = isLinkUp  // a broken ring of ours takes the device's link down, with its reason
        let reason = linkError ?? "link down"
        guard core.isReconnecting else {
            return .failed(core.reconnectFailure?.description ?? reason, exitCode: core.reconnectFailure?.exitCode ?? 2)
        }
        if !resetThisOutage && core.mayResetRings {
            // The device let go of them (the backend is gone, or the PCI device was reset): the
            // rings are ours alone.
            reclaimTX()
            txLostAtOutages &+= UInt64(tx.inFlight)
            var n = rx.reclaimAll(Self.freeMbuf) + tx.reclaimAll(Self.freeMbuf)
            if let p = partialHead { p.free(); n += 1; partialHead = nil; partialTail = nil; partialRemaining = 0 }
            rx.restart(at: Ring.resetBase)
            tx.restart(at: Ring.resetBase)
            reclaimedAtOutages += n
            outageResets += 1
            resetThisOutage = true
            core.ringsReset([rxQueueIndex, txQueueIndex])
        }
        return .down(reason)
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
        let field = addressField
        rx.addBurst(count: free, deviceWritable: true) { k in
            let m = staging[k]
            return (m.deviceBufferAddress(field: field) &+ back, UInt32(m.bufferLength) &- UInt32(back), m.cookie)
        }
        if rx.publish() { transport.notify(queue: rxQueueIndex) }
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
        guard link.isUp else { counters.txLinkDown &+= UInt64(count); return 0 }
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
        let field = addressField
        if simple {
            tx.addBurst(count: n, deviceWritable: false) { i in
                let m = pkts[i]
                let h = m.data - Int(hdr)
                h.storeBytes(of: UInt64(0), as: UInt64.self)
                h.storeBytes(of: UInt32(0), toByteOffset: 8, as: UInt32.self)
                let len = m.dataLength
                bytes &+= UInt64(len)
                return (m.deviceBufferAddress(field: field) &+ UInt64(m.dataOffset &- hdr), UInt32(len &+ hdr), m.cookie)
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
                let addr = m.deviceBufferAddress(field: field) &+ UInt64(m.dataOffset &- hdr)
                var seg = m
                _ = tx.addChain(count: segs, cookie: m.cookie) { k in
                    if k == 0 { return VirtqSegment(addr: addr, len: UInt32(m.dataLength &+ hdr), deviceWritable: false) }
                    seg = seg.next.unsafelyUnwrapped
                    let a = seg.deviceBufferAddress(field: field) &+ UInt64(seg.dataOffset)
                    return VirtqSegment(addr: a, len: UInt32(seg.dataLength), deviceWritable: false)
                }
                bytes &+= UInt64(m.packetLength)
                sent &+= 1
            }
        }
        if tx.publish() { transport.notify(queue: txQueueIndex) }
        counters.txPackets &+= UInt64(sent)
        counters.txBytes &+= bytes
        return sent
    }

    // MARK: Sleeping

    /// What a sleeping poll loop waits on for frames: the RX queue's notification descriptor
    /// (nil where the transport cannot deliver notifications).
    public var rxNotificationDescriptor: Int32? { transport.notificationDescriptor(queue: rxQueueIndex) }

    /// Asks the device to notify when it fills an RX buffer; false when frames are already
    /// waiting (then poll instead of sleeping). `disableRxNotifications` afterwards.
    public mutating func enableRxNotifications() -> Bool { rx.enableUsedNotifications() }
    public mutating func disableRxNotifications() { rx.disableUsedNotifications() }

    // MARK: Stop

    /// Stops the device (if it is still there: every pair of it stops, since the device must be
    /// done with the rings before their mbufs go back) and returns every mbuf this port's rings
    /// held to the pool. Returns how many mbufs were reclaimed. Dropping a port without
    /// `close()` does the same.
    @discardableResult
    public consuming func close() -> Int {
        let n = shutdown()
        closed = true
        return n
    }

    /// After GET_VRING_BASE (or with the backend gone) the rings are ours alone: free every mbuf
    /// they still hold. The ring memory itself is released with the port.
    func shutdown() -> Int {
        device.stop(reason: "port \(portID) closed")
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
        guard device.queuePairs == 1 else { throw VirtioNetError.restartNeedsOnePair(device.queuePairs) }
        reclaimTX()
        let txIdle = tx.inFlight == 0 && tx.failure == nil
        let txExpected = tx.addresses.base
        let core = device.core
        // vhost-user reports where each ring stopped; a transport that resets the device (PCI)
        // starts every ring afresh.
        let bases = try core.beginRestart()
        let rxBase = bases[rxQueueIndex]!, txBase = bases[txQueueIndex]!
        if transport.stoppedBases != nil && txIdle && txBase != txExpected {
            throw VirtioNetError.restartInconsistent(queue: "TX", device: txBase, driver: txExpected)
        }
        var reclaimed = rx.reclaimAll(Self.freeMbuf) + tx.reclaimAll(Self.freeMbuf)
        if let p = partialHead { p.free(); reclaimed += 1; partialHead = nil; partialTail = nil; partialRemaining = 0 }
        rx.restart(at: rxBase)
        tx.restart(at: txBase)
        try core.resume(rxQueueIndex, addresses: rx.addresses)
        try core.resume(txQueueIndex, addresses: tx.addresses)
        try device.resumeControlQueue()
        try core.finishRestart()
        refill()
        return reclaimed
    }
}

/// What `VirtioNetPort.maintainLink` found.
public enum PortLinkState: Equatable, Sendable {
    case up
    /// The device came back since the last check: the rings were restarted, RX refilled.
    case reconnected
    /// Lost; a reconnect is under way (the port's rings are reset and empty).
    case down(String)
    /// Lost for good (no reconnect policy, or it gave up): the run ends with `exitCode`.
    case failed(String, exitCode: Int32)
}

@usableFromInline func getpidValue() -> UInt32 {
    UInt32(truncatingIfNeeded: getpid())
}
#if canImport(Glibc)
import Glibc
#endif
