import DPDK
import VirtioCore

/// One request's slot in a queue's slab: header (16) · discard/write-zeroes range (16) · status (1) · padding.
@usableFromInline enum BlkSlot {
    @usableFromInline static let bytes = 64
    @usableFromInline static let rangeOffset = 16
    @usableFromInline static let statusOffset = 32
}

/// One virtio-blk request queue, polled by one lcore (non-copyable; pass it `inout`), on a split
/// or packed ring (`Ring`, chosen once by the device's `ringLayout`; every call is specialised).
///
/// SPDK's four steps on the shared queue core: a request gets a slot (header, optional discard
/// range, status byte, in DPDK memory) and a descriptor chain — header, the caller's data
/// segments, status — or one indirect descriptor when negotiated; `commit` publishes everything
/// submitted since the last call with at most one notification; `poll` hands back completions
/// with the caller's tag. Nothing is hidden: a full queue is an error the caller sees.
public struct VirtioBlkQueue<Ring: Virtqueue & ~Copyable>: ~Copyable {
    @usableFromInline struct Context {
        @usableFromInline var tag: UInt64
        @usableFromInline var operation: BlkOperation
        @usableFromInline var bytes: UInt32
        @inlinable init(tag: UInt64, operation: BlkOperation, bytes: UInt32) { self.tag = tag; self.operation = operation; self.bytes = bytes }
    }

    public let index: Int
    @usableFromInline let device: VirtioBlkDevice<Ring>
    /// The device's transport, held here so a notification is a direct call (no reference counting).
    @usableFromInline let transport: any VirtioTransport
    /// The device's link, shared by every queue: one relaxed load per poll tells whether any of
    /// them failed or the device stopped. The device (which holds it) outlives the queue.
    @usableFromInline unowned(unsafe) let link: DeviceLink
    @usableFromInline var vq: Ring
    @usableFromInline let slab: UnsafeMutableRawPointer
    /// The slab's address as the device sees it (IOVA for virtio-pci, else `slab`).
    @usableFromInline let slabAddress: UInt64
    @usableFromInline let usesIOVA: Bool
    /// Bus addresses of one request's data segments (virtio-pci), allocated once.
    @usableFromInline let busAddresses: UnsafeMutablePointer<UInt64>
    @usableFromInline let contexts: UnsafeMutablePointer<Context>
    @usableFromInline let freeContexts: UnsafeMutablePointer<UInt16>
    /// Free contexts, `freeTop` of them from `freeFirst` on in a circular array of the queue size:
    /// reused oldest first, so request slots (header and status) go round the slab in order.
    @usableFromInline var freeTop: Int
    @usableFromInline var freeFirst = 0
    @usableFromInline let contextMask: Int
    @usableFromInline let cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    @usableFromInline let lengths: UnsafeMutablePointer<UInt32>
    /// Contexts of requests failed by a stop, still to be reported.
    @usableFromInline let dying: UnsafeMutablePointer<UInt16>
    @usableFromInline var dyingCount = 0
    @usableFromInline var idlePolls = 0
    /// Kicks sent to the device (an increment per kick, none per request), for the bench.
    /// Poll pacing: while at least `pacingMinInFlight` requests are out, a poll that comes sooner
    /// than `nextPollAt` (TSC) returns at once without reading the ring. Each look at the used
    /// index while the device is writing it moves that cache line to us and back; spacing polls
    /// so that each finds about a quarter of what is in flight (at most 16) spares the device
    /// those transfers, which cost it more than the work of a request (Bench/RESULTS.md).
    public var pollPacing: Bool
    @usableFromInline var nextPollAt: UInt64 = 0
    @usableFromInline var lastHarvestAt: UInt64 = 0
    /// Estimated TSC cycles between completions at the device (moving average).
    @usableFromInline var cyclesPerCompletion: UInt64 = 0
    @usableFromInline let maxPollGap: UInt64
    @usableFromInline static var pacingMinInFlight: Int { 8 }
    @usableFromInline var kicks: UInt64 = 0
    public var notifications: UInt64 { kicks }
    /// Poll pacing: the most completions a paced poll waits for (a quarter of what is in flight,
    /// at most this).
    public var pollBatch = 16
    /// Whether completed descriptor chains are reused oldest first (see
    /// `SplitVirtqueue.recycleInTableOrder`).
    public var recycleInTableOrder: Bool {
        get { vq.recycleInTableOrder }
        set { vq.recycleInTableOrder = newValue }
    }
    /// With indirect descriptors: descriptors direct chains leave free for requests in tables
    /// (see `SplitVirtqueue.tableReserve`).
    public var tableReserve: Int {
        get { vq.tableReserve }
        set { vq.tableReserve = newValue }
    }
    /// With indirect descriptors: the longest request chain that still goes into the ring itself
    /// (see `SplitVirtqueue.directChainLimit`); it may change between requests.
    public var directChainLimit: Int {
        get { vq.directChainLimit }
        set { vq.directChainLimit = newValue }
    }
    public internal(set) var stopReason: String?
    @usableFromInline let capacity: UInt64
    /// Operations the device did not negotiate (bit `1 << type`), and those a read-only device
    /// refuses: worked out once, so a request tests a bit instead of the feature set.
    @usableFromInline let unsupportedOperations: UInt32
    @usableFromInline let readOnlyRefuses: UInt32
    @usableFromInline let maxSegments: Int
    @usableFromInline let maxSegmentBytes: Int
    @usableFromInline let maxDiscardSectors: UInt32
    @usableFromInline let maxWriteZeroesSectors: UInt32
    // Reconnect: each request's data segments are kept (`keepsSegments`, with a reconnect policy)
    // so that what was in flight at a loss can be submitted again once the device is back.
    @usableFromInline let keepsSegments: Bool
    @usableFromInline let savedSegments: UnsafeMutablePointer<VirtqSegment>
    @usableFromInline let savedCounts: UnsafeMutablePointer<UInt16>
    /// While the device is lost: requests to submit again (contexts, oldest first) and the ring
    /// descriptors they will take.
    @usableFromInline var suspended = false
    @usableFromInline let pending: UnsafeMutablePointer<UInt16>
    @usableFromInline var pendingCount = 0
    @usableFromInline var pendingDescriptors = 0
    /// Of `pending`, those taken back from the ring at the loss (the rest were submitted during it).
    var keptFromRing = 0
    var linkEpoch: UInt64
    /// The backend resumes what is in flight after a reconnect (INFLIGHT_SHMFD): the ring is kept
    /// as it is through an outage, not reset.
    @usableFromInline let resumesInflight: Bool
    /// Requests submitted again after a reconnect, and the outages this queue rode through.
    public private(set) var resubmitted: UInt64 = 0
    public private(set) var outagesSurvived = 0

    init(index: Int, queue: consuming Ring, slab: UnsafeMutableRawPointer, slabAddress: UInt64, device: VirtioBlkDevice<Ring>) {
        self.index = index
        self.device = device
        transport = device.transport
        link = device.core.link
        let size = queue.size
        vq = queue
        self.slab = slab
        self.slabAddress = slabAddress
        usesIOVA = device.usesIOVA
        busAddresses = .allocate(capacity: max(1, device.maxSegments))
        contexts = .allocate(capacity: size)
        freeContexts = .allocate(capacity: size)
        for i in 0..<size { freeContexts[i] = UInt16(i) }
        freeTop = size
        contextMask = size - 1
        pollPacing = device.pollPacing
        // At most 20 µs between polls, whatever the estimate says.
        maxPollGap = TSC.hz / 50_000
        cookies = .allocate(capacity: size)
        lengths = .allocate(capacity: size)
        dying = .allocate(capacity: size)
        capacity = device.config.capacity
        let f = device.features
        func bit(_ op: BlkOperation) -> UInt32 { 1 << op.rawValue }
        unsupportedOperations = (f.contains(.blkFlush) ? 0 : bit(.flush)) | (f.contains(.blkDiscard) ? 0 : bit(.discard))
            | (f.contains(.blkWriteZeroes) ? 0 : bit(.writeZeroes))
        readOnlyRefuses = f.contains(.blkReadOnly) ? bit(.write) | bit(.discard) | bit(.writeZeroes) : 0
        maxSegments = device.maxSegments
        maxSegmentBytes = device.maxSegmentBytes ?? Int.max
        maxDiscardSectors = device.config.maxDiscardSectors
        maxWriteZeroesSectors = device.config.maxWriteZeroesSectors
        keepsSegments = device.core.reconnectPolicy != nil
        savedSegments = .allocate(capacity: keepsSegments ? size * max(1, device.maxSegments) : 1)
        savedCounts = .allocate(capacity: size)
        pending = .allocate(capacity: size)
        linkEpoch = device.core.link.epoch
        resumesInflight = device.inflightTracked
    }

    deinit {
        contexts.deallocate(); freeContexts.deallocate(); cookies.deallocate(); lengths.deallocate(); dying.deallocate()
        busAddresses.deallocate(); savedSegments.deallocate(); savedCounts.deallocate(); pending.deallocate()
    }

    /// Requests submitted and not yet completed.
    @inlinable
    public var inFlight: Int { vq.inFlight + dyingCount + pendingCount }
    /// True while the device is lost and being reconnected: requests are kept, and submitted
    /// (again) once it is back.
    public var isSuspended: Bool { suspended }
    /// True once the queue has stopped (device gone or ring broken); see `stopReason`.
    @inlinable
    public var isStopped: Bool { stopReason != nil }

    // MARK: Submit

    @inlinable
    public mutating func read(sector: UInt64, into buffers: UnsafeBufferPointer<BlkBuffer>, tag: UInt64) throws(BlkRequestError) {
        try submit(.read, sector: sector, buffers: buffers, sectors: 0, unmap: false, tag: tag)
    }
    @inlinable
    public mutating func write(sector: UInt64, from buffers: UnsafeBufferPointer<BlkBuffer>, tag: UInt64) throws(BlkRequestError) {
        try submit(.write, sector: sector, buffers: buffers, sectors: 0, unmap: false, tag: tag)
    }
    @inlinable
    public mutating func flush(tag: UInt64) throws(BlkRequestError) {
        try submit(.flush, sector: 0, buffers: UnsafeBufferPointer(start: nil, count: 0), sectors: 0, unmap: false, tag: tag)
    }
    @inlinable
    public mutating func discard(sector: UInt64, sectors: UInt32, tag: UInt64) throws(BlkRequestError) {
        try submit(.discard, sector: sector, buffers: UnsafeBufferPointer(start: nil, count: 0), sectors: sectors, unmap: false, tag: tag)
    }
    @inlinable
    public mutating func writeZeroes(sector: UInt64, sectors: UInt32, unmap: Bool = false, tag: UInt64) throws(BlkRequestError) {
        try submit(.writeZeroes, sector: sector, buffers: UnsafeBufferPointer(start: nil, count: 0), sectors: sectors, unmap: unmap, tag: tag)
    }
    /// The device's identifier string (up to 20 bytes) into `buffer` (at least 20 bytes).
    @inlinable
    public mutating func getID(into buffer: BlkBuffer, tag: UInt64) throws(BlkRequestError) {
        var b = buffer
        try withUnsafePointer(to: &b) { (p) throws(BlkRequestError) in
            try submit(.getID, sector: 0, buffers: UnsafeBufferPointer(start: p, count: 1), sectors: 0, unmap: false, tag: tag)
        }
    }

    // Inlinable so callers get it specialised for their ring; never inlined, so each request
    // costs one call and Bench/blk.py can attribute the driver's instructions (submit/poll/commit).
    @inlinable @inline(never)
    mutating func submit(_ op: BlkOperation, sector: UInt64, buffers: UnsafeBufferPointer<BlkBuffer>, sectors rangeSectors: UInt32,
                         unmap: Bool, tag: UInt64) throws(BlkRequestError) {
        if stopReason != nil { throw stoppedError() }
        let opBit: UInt32 = 1 << op.rawValue
        if unsupportedOperations & opBit != 0 { throw .unsupported(op) }
        if readOnlyRefuses & opBit != 0 { throw .readOnly }
        var bytes = 0
        if op == .read || op == .write || op == .getID {
            guard buffers.count >= 1 else { throw .misaligned("\(op) needs at least one data buffer") }
            guard buffers.count <= maxSegments else { throw .tooManySegments(buffers.count, max: maxSegments) }
            for b in buffers {
                guard b.length > 0 else { throw .misaligned("empty data segment") }
                guard b.length <= maxSegmentBytes else { throw .segmentTooLarge(b.length, max: maxSegmentBytes) }
                bytes += b.length
            }
        }
        if op == .read || op == .write {
            guard bytes % blkSectorSize == 0 else { throw .misaligned("\(bytes) bytes is not a whole number of 512-byte sectors") }
            let n = UInt64(bytes / blkSectorSize)
            guard sector <= capacity, n <= capacity - sector else { throw .outOfRange(sector: sector, sectors: n, capacity: capacity) }
        }
        if op == .discard || op == .writeZeroes {
            guard rangeSectors > 0 else { throw .misaligned("\(op) of 0 sectors") }
            let limit = op == .discard ? maxDiscardSectors : maxWriteZeroesSectors
            if limit > 0 && rangeSectors > limit { throw .rangeTooLarge(op, sectors: rangeSectors, max: limit) }
            guard sector <= capacity, UInt64(rangeSectors) <= capacity - sector else {
                throw .outOfRange(sector: sector, sectors: UInt64(rangeSectors), capacity: capacity)
            }
        }
        if op == .getID { guard bytes >= 20 else { throw .misaligned("get-id needs a 20-byte buffer") } }
        let hasRange = op == .discard || op == .writeZeroes
        let segments = 2 + buffers.count + (hasRange ? 1 : 0)
        let need = vq.descriptorsNeeded(forSegments: segments)
        guard freeTop > 0, need <= (suspended ? (resumesInflight ? vq.freeCount : vq.size) - pendingDescriptors : vq.freeCount) else { throw .queueFull }
        // virtio-pci: data buffers go to the device as IOVAs, each checked to be contiguous.
        let busAddresses = self.busAddresses
        if usesIOVA {
            for (k, b) in buffers.enumerated() {
                guard let a = IOVA.of(b.address, count: b.length) else { throw .notDMAMemory("\(b.length) bytes at \(b.address)") }
                busAddresses[k] = a
            }
        }

        freeTop -= 1
        let ctx = Int(freeContexts[freeFirst])
        freeFirst = (freeFirst &+ 1) & contextMask
        contexts[ctx] = Context(tag: tag, operation: op, bytes: UInt32(bytes))
        let slot = slab + ctx * BlkSlot.bytes
        slot.storeBytes(of: op.rawValue.littleEndian, as: UInt32.self)
        slot.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        slot.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
        if hasRange {
            slot.storeBytes(of: sector.littleEndian, toByteOffset: BlkSlot.rangeOffset, as: UInt64.self)
            slot.storeBytes(of: rangeSectors.littleEndian, toByteOffset: BlkSlot.rangeOffset + 8, as: UInt32.self)
            slot.storeBytes(of: UInt32(unmap ? 1 : 0).littleEndian, toByteOffset: BlkSlot.rangeOffset + 12, as: UInt32.self)
        }
        // A status the device never wrote reads as invalid, not as OK.
        slot.storeBytes(of: UInt8(0xff), toByteOffset: BlkSlot.statusOffset, as: UInt8.self)
        let dataWritable = op == .read || op == .getID
        if keepsSegments {
            let saved = savedSegments + ctx * maxSegments
            for k in 0..<buffers.count {
                let b = buffers[k]
                saved[k] = VirtqSegment(addr: usesIOVA ? busAddresses[k] : UInt64(UInt(bitPattern: b.address)), len: UInt32(b.length), deviceWritable: dataWritable)
            }
            savedCounts[ctx] = UInt16(buffers.count)
            if _slowPath(suspended) {
                // The device is lost: the request goes out after the reconnect.
                pending[pendingCount] = UInt16(ctx); pendingCount += 1; pendingDescriptors += need
                return
            }
        }
        let iova = usesIOVA
        let ok = addChain(ctx: ctx, segments: segments, hasRange: hasRange) { i in
            let b = buffers[i]
            let addr = iova ? busAddresses[i] : UInt64(UInt(bitPattern: b.address))
            return VirtqSegment(addr: addr, len: UInt32(b.length), deviceWritable: dataWritable)
        }
        precondition(ok, "descriptor space was checked")
    }

    /// A request's chain — header, range or data segments, status — for context `ctx`.
    @inlinable
    mutating func addChain(ctx: Int, segments: Int, hasRange: Bool, _ data: (Int) -> VirtqSegment) -> Bool {
        let slotAddress = slabAddress + UInt64(ctx * BlkSlot.bytes)
        return vq.addChain(count: segments, cookie: UnsafeMutableRawPointer(bitPattern: ctx + 1)) { i in
            if i == 0 { return VirtqSegment(addr: slotAddress, len: UInt32(BlkRequestHeader.size), deviceWritable: false) }
            if i == segments - 1 { return VirtqSegment(addr: slotAddress + UInt64(BlkSlot.statusOffset), len: 1, deviceWritable: true) }
            if hasRange { return VirtqSegment(addr: slotAddress + UInt64(BlkSlot.rangeOffset), len: 16, deviceWritable: false) }
            return data(i - 1)
        }
    }

    /// Publishes what was submitted since the last commit; notifies the device if it asked.
    @inlinable @inline(never)
    public mutating func commit() {
        if vq.publish() { kicks &+= 1; transport.notify(queue: index) }
    }

    // MARK: Complete

    /// Completed requests into `out` (at most `max`). After the device goes away every request
    /// still in flight comes back here with `.deviceGone`.
    @inlinable @inline(never)
    public mutating func poll(into out: UnsafeMutablePointer<BlkCompletion>, max: Int) -> Int {
        if dyingCount > 0 || stopReason != nil { return drainDying(into: out, max: max) }
        if _slowPath(!link.isUp || suspended) { return pollLinkDown(into: out, max: max) }
        let before = vq.inFlight
        let paced = pollPacing && before >= Self.pacingMinInFlight
        var now: UInt64 = 0
        if paced {
            now = TSC.now()
            if now < nextPollAt { return 0 }
        }
        let n = vq.harvest(into: cookies, lengths: lengths, max: Swift.min(max, vq.size))
        if paced {
            // Nothing yet: look again after about one request's time.
            if n > 0 { pace(harvested: n, inFlight: before, now: now) } else { nextPollAt = now &+ Swift.min(cyclesPerCompletion, maxPollGap) }
        }
        complete(n, into: out)
        if let e = vq.failure {
            stopBrokenRing(e)
        } else if n == 0 && vq.inFlight > 0 {
            // Asking the transport (virtio-pci: a register read) is for now and then, not per poll.
            idlePolls &+= 1
            if idlePolls & 4095 == 0 && !device.core.isLinkUp && !keepsSegments { stopLinkDown() }
        } else {
            idlePolls = 0
        }
        return n
    }

    /// The `n` harvested completions (in `cookies`) into `out`, their contexts free again.
    @inlinable @inline(__always)
    mutating func complete(_ n: Int, into out: UnsafeMutablePointer<BlkCompletion>) {
        for i in 0..<n {
            let ctx = Int(bitPattern: cookies[i]) - 1
            let c = contexts[ctx]
            let status = BlkStatus(byte: slab.load(fromByteOffset: ctx * BlkSlot.bytes + BlkSlot.statusOffset, as: UInt8.self))
            out[i] = BlkCompletion(tag: c.tag, operation: c.operation, status: status, bytes: status == .ok ? c.bytes : 0)
            freeContexts[(freeFirst &+ freeTop) & contextMask] = UInt16(ctx)
            freeTop += 1
        }
    }

    /// After a paced poll that found `harvested` of `inFlight`: update the estimate of the
    /// device's time per request and set when the next poll may look at the ring.
    @inlinable
    mutating func pace(harvested n: Int, inFlight: Int, now: UInt64) {
        let sample = (now &- lastHarvestAt) / UInt64(n)
        lastHarvestAt = now
        var c = cyclesPerCompletion
        if 2 * n > inFlight {
            // Half or more was done: the device may have run dry while we waited.
            c /= 2
        } else if c == 0 {
            c = Swift.min(sample, maxPollGap)
        } else {
            c = (3 &* c &+ Swift.min(sample, 2 &* c)) / 4
        }
        cyclesPerCompletion = c
        let target = UInt64(Swift.min(pollBatch, inFlight / 4))
        nextPollAt = now &+ Swift.min(c &* target, maxPollGap)
    }

    // Cold paths, out of line: building a message is no work for the hot functions.
    @usableFromInline
    mutating func stopBrokenRing(_ e: VirtqueueError) { stop(because: "the device broke the ring: \(e)") }

    /// The link is down, or the queue waits for a reconnect. Without a reconnect policy (or once
    /// it gave up) the queue stops and fails what it has. With one, the first call harvests what
    /// the device completed before it went, keeps the rest (to submit again), resets the ring and
    /// tells the device core; once the device is back (a new link epoch) everything kept goes out
    /// again in its order, with one commit.
    @usableFromInline @inline(never)
    mutating func pollLinkDown(into out: UnsafeMutablePointer<BlkCompletion>, max: Int) -> Int {
        let core = device.core
        guard keepsSegments, core.isReconnecting else {
            stopLinkDown()
            return drainDying(into: out, max: max)
        }
        if !suspended {
            // Not before the device let go of our memory (a PCI device is reset first).
            if link.isUp || !core.mayResetRings { return 0 }
            // The backend is gone; its used entries are still in our memory.
            let n = vq.failure == nil ? vq.harvest(into: cookies, lengths: lengths, max: Swift.min(max, vq.size)) : 0
            complete(n, into: out)
            if resumesInflight {
                // The backend resumes what the ring holds: it stays as it is.
                suspended = true
                nextPollAt = 0; idlePolls = 0
                core.ringKept(index, addresses: vq.addresses)
                return n
            }
            let pending = self.pending
            var k = pendingCount
            vq.reclaimAll { cookie in pending[k] = UInt16(Int(bitPattern: cookie) - 1); k += 1 }
            keptFromRing = k - pendingCount
            pendingCount = k
            pendingDescriptors = 0
            for i in 0..<k { pendingDescriptors += vq.descriptorsNeeded(forSegments: segmentsOf(Int(pending[i]))) }
            vq.restart(at: Ring.resetBase)
            suspended = true
            nextPollAt = 0; idlePolls = 0
            core.ringsReset([index])
            return n
        }
        let epoch = link.epoch
        guard link.isUp, epoch != linkEpoch else { return 0 }
        // Back: a fresh ring at the device; what was kept goes out again, oldest first.
        linkEpoch = epoch
        suspended = false
        for i in 0..<pendingCount {
            let ctx = Int(pending[i])
            slab.storeBytes(of: UInt8(0xff), toByteOffset: ctx * BlkSlot.bytes + BlkSlot.statusOffset, as: UInt8.self)
            let op = contexts[ctx].operation
            let saved = savedSegments + ctx * maxSegments
            let hasRange = op == .discard || op == .writeZeroes
            let ok = addChain(ctx: ctx, segments: segmentsOf(ctx), hasRange: hasRange) { saved[$0] }
            precondition(ok, "every kept request fitted the ring together")
        }
        // (Kept rings: what they held is the backend's to resume; the pending ones are new.)
        if !resumesInflight { resubmitted &+= UInt64(keptFromRing) }
        keptFromRing = 0
        outagesSurvived += 1
        pendingCount = 0; pendingDescriptors = 0
        commit()
        return 0
    }

    /// Segments of the chain of the request in context `ctx` (header and status included).
    @usableFromInline
    func segmentsOf(_ ctx: Int) -> Int {
        let op = contexts[ctx].operation
        return 2 + (op == .discard || op == .writeZeroes ? 1 : Int(savedCounts[ctx]))
    }

    /// Another queue failed, the device was stopped, or the transport lost it.
    @usableFromInline
    mutating func stopLinkDown() {
        stop(because: device.core.reconnectFailure?.description ?? device.core.link.reason ?? transport.disconnectReason ?? "device disconnected")
    }

    @usableFromInline func stoppedError() -> BlkRequestError { .queueStopped(stopReason ?? "") }

    /// Fails every request in flight (their buffers are the caller's again once reported). The
    /// device is stopped first (so it touches none of them any more), which takes the link down
    /// for every other queue of the device.
    @usableFromInline
    mutating func stop(because reason: String) {
        guard stopReason == nil else { return }
        stopReason = reason
        device.stop(reason: "queue \(index): \(reason)")
        let dying = self.dying
        var k = 0
        vq.reclaimAll { cookie in dying[k] = UInt16(Int(bitPattern: cookie) - 1); k += 1 }
        // Requests kept for a reconnect that will not come fail too.
        for i in 0..<pendingCount { dying[k] = pending[i]; k += 1 }
        pendingCount = 0; pendingDescriptors = 0; suspended = false
        dyingCount = k
    }

    @usableFromInline
    mutating func drainDying(into out: UnsafeMutablePointer<BlkCompletion>, max: Int) -> Int {
        var n = 0
        while dyingCount > 0 && n < max {
            dyingCount -= 1
            let ctx = Int(dying[dyingCount])
            let c = contexts[ctx]
            out[n] = BlkCompletion(tag: c.tag, operation: c.operation, status: .deviceGone, bytes: 0)
            freeContexts[(freeFirst &+ freeTop) & contextMask] = UInt16(ctx)
            freeTop += 1
            n += 1
        }
        return n
    }

    /// Checks the connection now (off the data path), stopping the queue if the device is gone.
    public mutating func checkDevice() {
        if stopReason == nil && !device.core.isLinkUp && !(keepsSegments && device.core.isReconnecting) { stopLinkDown() }
    }
}
