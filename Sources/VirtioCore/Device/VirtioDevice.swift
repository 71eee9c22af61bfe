import Synchronization

/// Errors of the device core, shared by every device type (the device name says which).
public enum VirtioDeviceError: Error, CustomStringConvertible, Equatable, Sendable {
    case missingFeatures(device: String, VirtioFeatures)
    case layoutNotOffered(device: String, RingLayoutChoice)
    /// The device (or its transport) gave a queue count the driver cannot use.
    case invalidQueueCount(device: String, String)
    case restartUnsupported(String)

    public var description: String {
        switch self {
        case let .missingFeatures(d, f): return "the \(d) device lacks required features: \(f)"
        case let .layoutNotOffered(d, l): return "the \(d) device does not offer \(l) virtqueues (VIRTIO_F_RING_PACKED)"
        case let .invalidQueueCount(d, why): return "\(d): \(why)"
        case .restartUnsupported(let why): return "cannot restart the device: \(why)"
        }
    }
}

/// The features a driver and a device agreed on, and the ring layout that follows from them
/// (VIRTIO 1.2 §3.1.1 step 4: the driver accepts a subset of what the device offers). Decided
/// once, when a device is opened.
public struct VirtioNegotiation: Sendable, Equatable {
    public let offered: VirtioFeatures
    public let chosen: VirtioFeatures
    /// `.split` or `.packed` (never `.auto`).
    public let layout: RingLayoutChoice

    /// `required` must all be offered; of `wanted` what is offered is taken. `ring` picks the
    /// layout (`auto`: packed when offered). Bits of the other layout are never negotiated.
    public init(offered: VirtioFeatures, required: VirtioFeatures, wanted: VirtioFeatures, ring: RingLayoutChoice,
                device: String) throws(VirtioDeviceError) {
        guard offered.isSuperset(of: required) else { throw .missingFeatures(device: device, required.subtracting(offered)) }
        guard let layout = ring.resolve(offered: offered) else { throw .layoutNotOffered(device: device, ring) }
        var want = wanted.union(required)
        if layout == .packed { want.insert(.ringPacked) } else { want.remove(.ringPacked) }
        self.offered = offered
        chosen = offered.intersection(want)
        self.layout = layout
    }
}

/// Code to run with the ring type a device negotiated. The device core calls it once, with
/// `SplitVirtqueue` or `PackedVirtqueue`, so everything inside is specialised for one layout.
public protocol VirtqueueLayoutBody {
    associatedtype Output
    func run<Ring: Virtqueue & ~Copyable>(_ ring: Ring.Type) throws -> Output
}

extension RingLayoutChoice {
    /// Runs `body` with the ring type of this layout (`.auto` counts as split here: resolve first).
    /// Inlinable, so the caller's body is specialised for each layout in the caller's module.
    @inlinable
    public func dispatch<Body: VirtqueueLayoutBody>(_ body: Body) throws -> Body.Output {
        switch self {
        case .packed: try body.run(PackedVirtqueue.self)
        case .split, .auto: try body.run(SplitVirtqueue.self)
        }
    }

    /// The one layout every device of `offers` can use (`auto`: packed only if all offer it);
    /// nil when a forced layout is missing on one of them.
    public func resolve(offeredByAll offers: [VirtioFeatures]) -> RingLayoutChoice? {
        var layout = self == .auto ? RingLayoutChoice.packed : self
        for f in offers {
            guard let l = resolve(offered: f) else { return nil }
            if l == .split { layout = .split }
        }
        return layout
    }
}

/// One virtqueue a device uses: its index at the device and its size.
public struct VirtqueueSpec: Sendable, Equatable {
    public var index: Int
    /// The ring size, or 0: the device's own size for this queue (read after FEATURES_OK), at
    /// most `sizeLimit` (a legacy device fixes it: then exactly the device's).
    public var size: Int
    public var sizeLimit: Int
    public init(index: Int, size: Int) { self.index = index; self.size = size; sizeLimit = size }
    /// A queue whose size the device decides, up to `atMost` (a net control queue).
    public static func deviceSized(index: Int, atMost: Int) -> VirtqueueSpec {
        var s = VirtqueueSpec(index: index, size: 0)
        s.sizeLimit = atMost
        return s
    }
}

/// The device core shared by every device type (net, blk): what VIRTIO 1.2 §3.1.1 asks of a driver
/// after the transport has read the device's features — accept features, give the device its
/// queues (memory from a `DMAAllocator`, one `Ring` type for all of them) and the memory table,
/// DRIVER_OK — plus stop, restart and the one `DeviceLink` every queue watches.
///
/// The layout is the type parameter, fixed when the device is opened, and so is the address mode
/// (`addressing`, from the transport): queues handed out are fully specialised and never ask.
/// The core knows neither DPDK nor any transport, nor what its queues carry.
public final class VirtioDevice<Ring: Virtqueue & ~Copyable>: @unchecked Sendable {
    public let transport: any VirtioTransport
    public let features: VirtioFeatures
    /// The queues, each with its final size.
    public let queues: [VirtqueueSpec]
    /// How descriptors address memory: process virtual (vhost-user) or IOVA (virtio-pci).
    public let addressing: BufferAddressing
    public let link = DeviceLink()
    let allocator: any DMAAllocator
    /// Ring memory, one region per entry of `queues`; device-type memory (`allocate`) after it.
    private var ringMemory: [any DMARegion]
    private var memory: [any DMARegion] = []
    /// The rings, laid over their memory once, before the device sees them: a ring handed out
    /// later is this one, not a fresh one (zeroing the ring again after DRIVER_OK would wipe what
    /// the device wrote into it by then, such as VRING_USED_F_NO_NOTIFY or its event suppression
    /// flags, and every burst would then kick the device).
    private let rings: UnsafeMutablePointer<Ring>
    /// Where each ring starts, as `start` tells the device.
    private let initialAddresses: [QueueAddresses]
    private var taken: [Bool]
    /// Whether the device runs (shared with the reconnect agent).
    private let run = DeviceRunState()
    private let stopError = Mutex<String?>(nil)
    private let transportQueueCount: Int
    private let queuesPerUnit: Int
    private var agent: ReconnectAgent?
    /// Set by `enableReconnect`: what happens when the device is lost.
    public private(set) var reconnectPolicy: ReconnectPolicy?

    /// Accepts `negotiation.chosen` for a device that will use `queues` (§3.1.1 steps 4–6;
    /// `transportQueueCount` is what the transport must provide for, e.g. a net control queue's
    /// index + 1; `queuesPerUnit` is how many queues one unit of the transport's `queueLimit`
    /// counts, 2 for net's pairs), and allocates every ring. Call `start` once the device type has allocated
    /// the rest of its memory.
    public init(transport: any VirtioTransport, negotiation: VirtioNegotiation, queues: [VirtqueueSpec],
                transportQueueCount: Int? = nil, queuesPerUnit: Int = 1, memory allocator: any DMAAllocator) throws {
        precondition(Ring.layoutFeatures.isSubset(of: negotiation.chosen), "ring layout \(Ring.layoutName) was not negotiated")
        self.transport = transport
        features = negotiation.chosen
        addressing = transport.bufferAddressing
        self.allocator = allocator
        let queueCount = transportQueueCount ?? (queues.map(\.index).max().map { $0 + 1 } ?? 0)
        self.transportQueueCount = queueCount
        self.queuesPerUnit = queuesPerUnit
        try transport.negotiate(negotiation.chosen, queueCount: queueCount, queuesPerUnit: queuesPerUnit)
        // Sizes the device decides are read now: some queues exist only once features are set.
        self.queues = try queues.map { q in
            guard q.size == 0 else { return q }
            let max = transport.maxQueueSize(q.index) ?? q.sizeLimit
            // A modern device takes any power of two up to its maximum (§4.1.4.3.2): the largest
            // that fits both. A legacy device's size is fixed.
            var size = transport.isLegacy ? max : Swift.min(q.sizeLimit, max)
            if !transport.isLegacy, size > 0 { size = 1 << (Int.bitWidth - 1 - size.leadingZeroBitCount) }
            guard size > 0, size & (size - 1) == 0, size <= 32768 else {
                throw VirtioDeviceError.invalidQueueCount(device: transport.deviceDescription, "queue \(q.index) has size \(max)")
            }
            return VirtqueueSpec(index: q.index, size: size)
        }
        let memory = try self.queues.map { try allocator.allocate(bytes: try Ring.ringBytes(size: $0.size)) }
        ringMemory = memory
        let specs = self.queues
        rings = .allocate(capacity: specs.count)
        var addresses: [QueueAddresses] = []
        for (slot, q) in specs.enumerated() {
            // Sizes and memory were checked by `ringBytes` above.
            (rings + slot).initialize(to: try! Ring(memory: memory[slot].pointer, size: q.size, inOrder: negotiation.chosen.contains(.inOrder),
                                                    eventIndex: negotiation.chosen.contains(.eventIndex)))
            addresses.append(rings[slot].addresses)
        }
        initialAddresses = addresses
        taken = Array(repeating: false, count: specs.count)
        transport.attach(link)
    }

    deinit {
        stop(reason: "device closed")
        for slot in taken.indices where !taken[slot] { (rings + slot).deinitialize(count: 1) }
        rings.deallocate()
    }

    /// More DMA memory for the device type (blk request slabs, indirect tables, control buffers),
    /// kept as long as the device. Allocate it before `start`: the memory table is sent then.
    public func allocate(bytes: Int) throws -> any DMARegion {
        let r = try allocator.allocate(bytes: bytes)
        memory.append(r)
        return r
    }

    /// The address the device must be given for `region`.
    @inlinable public func deviceAddress(of region: any DMARegion) -> UInt64 { addressing.address(of: region) }

    /// A fresh ring for `queues[slot]`, laid over its memory. Each queue is handed out once; the
    /// device must outlive it.
    public func makeQueue(_ slot: Int) -> Ring {
        precondition(slot >= 0 && slot < queues.count && !taken[slot], "queue \(slot) does not exist or was already taken")
        taken[slot] = true
        agent?.mustReset.withLock { _ = $0.insert(slot) }
        return (rings + slot).move()
    }

    /// Whether `makeQueue(slot)` was called.
    public func isTaken(_ slot: Int) -> Bool { taken[slot] }

    /// Sends the memory table, hands every queue to the device at its reset position and sets
    /// DRIVER_OK (§3.1.1 steps 7–8). The link goes up.
    public func start() throws {
        try transport.setMemory(try allocator.memoryTable())
        for slot in queues.indices {
            try transport.setupQueue(queues[slot].index, addresses: initialAddresses[slot])
        }
        try transport.start()
        run.running.withLock { $0 = true }
        link.markUp()
    }

    /// Whether the device is usable: the link is up and the transport still has the device (a
    /// register read for virtio-pci; an atomic load for vhost-user). Off the data path.
    public var isLinkUp: Bool {
        if link.isUp && !transport.isConnected { link.markDown(transport.disconnectReason ?? "device disconnected") }
        return link.isUp
    }

    /// Stops the device (afterwards it touches none of our memory), then marks the link down with
    /// `reason`, so every queue, on any lcore, fails what it has in flight at its next poll.
    /// Safe from any thread; the first stop does the work.
    public func stop(reason: String = "device stopped") {
        run.stopped.store(true, ordering: .releasing)
        agent?.shutdown()
        run.running.withLock { r in
            guard r else { return }
            r = false
            do { try transport.stop() } catch { stopError.withLock { $0 = "\(error)" } }
        }
        link.markDown(reason)
    }

    /// Why the last stop could not confirm that the device let go of our memory (vhost-user: a
    /// GET_VRING_BASE unanswered or garbage), or nil. Apps report it and end with a failure status.
    public var stopFailure: String? { stopError.withLock { $0 } }

    // MARK: Restart (stop and start again on the same connection)

    /// Stops the device for a restart and returns where each queue stood (index → base): what
    /// the transport reported (vhost-user GET_VRING_BASE) or the reset position (PCI resets).
    /// The link stays up: the caller restarts every queue, then calls `finishRestart`.
    public func beginRestart() throws -> [Int: UInt32] {
        try run.running.withLock { r throws in try transport.stop(); r = false }
        let reported = transport.stoppedBases
        var bases: [Int: UInt32] = [:]
        for q in queues {
            if let r = reported {
                guard q.index < r.count else { throw VirtioDeviceError.restartUnsupported("no ring base reported for queue \(q.index)") }
                bases[q.index] = r[q.index]
            } else {
                bases[q.index] = Ring.resetBase
            }
        }
        return bases
    }

    /// Hands queue `slot` to the device again, at the position its restarted ring starts from.
    public func resume(_ slot: Int, addresses: QueueAddresses) throws {
        try transport.setupQueue(queues[slot].index, addresses: addresses)
    }

    /// Ends a restart: every queue was resumed; the device runs again.
    public func finishRestart() throws {
        try transport.start()
        run.running.withLock { $0 = true }
    }

    // MARK: Reconnect (a new connection to a backend that came back)

    /// From now on a lost device is brought back (`policy`): every queue owner must call
    /// `ringsReset` once per outage for the rings it owns, after handing back what they held; a
    /// thread of the device waits for the backend, checks its features and starts the device
    /// again with every ring from its reset position. `beforeSetup` runs before the rings are
    /// handed over (reset the rings the device type owns itself, see `ownsRingReset`);
    /// `afterStart` once the link is up again (net: pairs, RX modes and MAC restored). Call once,
    /// after `start`. A loss the transport cannot repair (`canReconnect` false then: a ring the
    /// device broke, a PCI function that reads all-ones) ends the device as without a policy.
    public func enableReconnect(_ policy: ReconnectPolicy, beforeSetup: (() throws -> Void)? = nil, afterStart: (() throws -> Void)? = nil) {
        precondition(agent == nil, "reconnect is already enabled")
        reconnectPolicy = policy
        let table = { [allocator] in try allocator.memoryTable() }
        let a = ReconnectAgent(transport: transport, link: link, policy: policy, features: features, queueCount: transportQueueCount,
                               queuesPerUnit: queuesPerUnit, indices: queues.map(\.index), addresses: initialAddresses,
                               mustReset: Set(taken.indices.filter { taken[$0] }), memoryTable: table, run: run)
        a.afterStart.withLock { $0 = afterStart }
        a.beforeSetup.withLock { $0 = beforeSetup }
        agent = a
        a.start()
    }

    /// Whether a lost link is being (or may yet be) repaired: a reconnect policy, no final failure, not stopped.
    public var isReconnecting: Bool {
        guard let agent else { return false }
        return agent.failure.withLock { $0 } == nil && !run.stopped.load(ordering: .relaxed)
    }

    /// Why reconnecting gave up, if it did (the link stays down for good).
    public var reconnectFailure: ReconnectFailure? { agent?.failure.withLock { $0 } }

    /// Every loss of the device since it started, with how long each lasted.
    public var outages: [DeviceOutage] { agent?.allOutages ?? [] }

    /// During an outage: whether the device has let go of our memory, so that queue owners may
    /// take their buffers back and reset their rings (then `ringsReset`). False while the link is up.
    public var mayResetRings: Bool { agent?.quiesced.load(ordering: .acquiring) ?? false }

    /// Called by a queue owner during an outage, once its rings (`slots`) hold nothing and are
    /// back at their reset position (`reclaimAll`, then `restart(at: Ring.resetBase)`): the
    /// device may hand them to the backend again from there.
    public func ringsReset(_ slots: [Int]) {
        agent?.reset.withLock { $0.formUnion(slots) }
    }

    /// Instead of `ringsReset`: the ring of `slot` is handed back as it is, with what it holds in
    /// flight (a device that tracks its in-flight requests itself, see
    /// `VirtioTransport.setUpInflightTracking`, resumes them); `addresses` says where it continues.
    public func ringKept(_ slot: Int, addresses: QueueAddresses) {
        agent?.kept.withLock { $0[slot] = addresses }
        agent?.reset.withLock { _ = $0.insert(slot) }
    }

    /// Slots the device core owns itself are excluded from the wait (a queue never handed out
    /// is still fresh; the device type resets its own, e.g. a control queue, in `afterStart`).
    public func ownsRingReset(_ slots: [Int]) {
        agent?.mustReset.withLock { $0.subtract(slots) }
    }
}
