import Synchronization

/// The driver side of a packed virtqueue (VIRTIO 1.2 §2.8), with the same shape as
/// `SplitVirtqueue`: add buffers (`addBurst`, `addChain`), `publish`, `harvest` completions with
/// their cookies, `reclaimAll` after a stop.
///
/// Descriptors are made available in ring order with AVAIL = the driver's wrap counter and
/// USED = its inverse; the device marks a buffer used by writing one descriptor with both bits
/// equal to its own wrap counter, carrying the buffer ID. Out of order, IDs come from a free stack;
/// in order (§2.8.11) they are handed out in sequence, and a device may write one used descriptor
/// for a batch (the batch's last ID, at the batch's first position): every earlier buffer then
/// counts as fully written.
///
/// Everything the device writes is checked: ID in range and in flight (and, in order, not
/// before the next expected one), length within the buffer's writable bytes, and wrap bits that
/// match a used descriptor of the current lap. The first bad value stops the queue (`failure`).
public struct PackedVirtqueue: ~Copyable {
    public let size: Int
    public let inOrder: Bool
    public let eventIndex: Bool
    public let memory: UnsafeMutableRawPointer
    public let layout: PackedRingLayout
    @usableFromInline let desc: UnsafeMutablePointer<PackedDesc>
    @usableFromInline let deviceEvent: UnsafeMutableRawPointer
    @usableFromInline let slots: UnsafeMutablePointer<SlotInfo>
    /// Out of order: free buffer IDs (a stack).
    @usableFromInline let freeIDs: UnsafeMutablePointer<UInt16>
    @usableFromInline var freeIDCount: Int = 0

    /// Next ring position to fill, and the wrap counter that goes with it.
    @usableFromInline var nextAvail: UInt16 = 0
    @usableFromInline var availWrap = true
    /// Position and wrap at the last `publish`.
    @usableFromInline var publishedAvail: UInt16 = 0
    @usableFromInline var publishedWrap = true
    /// Next ring position to look at for a used descriptor, and its wrap counter.
    @usableFromInline var nextUsed: UInt16 = 0
    @usableFromInline var usedWrap = true
    @usableFromInline var freeDescs: Int
    @usableFromInline var outstanding = 0
    /// Descriptors added since the last `publish` (they are visible already; `publish` only
    /// decides whether to notify).
    @usableFromInline var addedSincePublish = 0
    /// In order: next ID to hand out and the ID of the oldest buffer in flight.
    @usableFromInline var nextID: UInt16 = 0
    @usableFromInline var oldestID: UInt16 = 0
    /// In order: a used descriptor covers buffers up to `batchEnd`, which gets `batchLen`.
    @usableFromInline var inBatch = false
    @usableFromInline var batchEnd: UInt16 = 0
    @usableFromInline var batchLen: UInt32 = 0
    public private(set) var failure: VirtqueueError?

    public init(memory: UnsafeMutableRawPointer, layout: PackedRingLayout, inOrder: Bool, eventIndex: Bool = false) {
        precondition(Int(bitPattern: memory) & 4095 == 0, "ring memory must be 4 KiB aligned")
        self.memory = memory
        self.layout = layout
        size = layout.size
        self.inOrder = inOrder
        self.eventIndex = eventIndex
        desc = memory.bindMemory(to: PackedDesc.self, capacity: layout.size)
        deviceEvent = memory + layout.deviceEventOffset
        slots = .allocate(capacity: layout.size)
        freeIDs = .allocate(capacity: layout.size)
        freeDescs = layout.size
        resetRing()
    }

    deinit {
        slots.deallocate()
        freeIDs.deallocate()
    }

    /// Zeroes the ring and forgets every buffer; wrap counters start at 1 (§2.8.1).
    public mutating func resetRing() {
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: layout.totalBytes)
        // Poll mode: no used-buffer notifications (driver event suppression: disable).
        (memory + layout.driverEventOffset + 2).storeBytes(of: PackedEventFlags.disable, as: UInt16.self)
        slots.initialize(repeating: SlotInfo(cookie: nil, writable: 0, ndesc: 0, last: 0), count: size)
        for i in 0..<size { freeIDs[i] = UInt16(size - 1 - i) }
        freeIDCount = size
        nextAvail = 0; availWrap = true; publishedAvail = 0; publishedWrap = true
        nextUsed = 0; usedWrap = true; freeDescs = size; outstanding = 0; addedSincePublish = 0
        nextID = 0; oldestID = 0; inBatch = false; failure = nil
    }

    // MARK: Addresses and state for the transport
    public var descAddress: UInt64 { UInt64(UInt(bitPattern: memory)) }
    public var driverEventAddress: UInt64 { UInt64(UInt(bitPattern: memory + layout.driverEventOffset)) }
    public var deviceEventAddress: UInt64 { UInt64(UInt(bitPattern: deviceEvent)) }
    /// SET_VRING_BASE value for a packed ring: the position and wrap counter the device starts
    /// from (bit 15). Meaningful when nothing is in flight, as at setup before buffers are added.
    public var vhostBase: UInt32 { UInt32(nextAvail) | (availWrap ? 1 << 15 : 0) }

    @inlinable public var freeCount: Int { freeDescs }
    @inlinable public var inFlight: Int { outstanding }

    // MARK: Posting

    @inlinable @inline(__always)
    func flags(writable: Bool, next: Bool, wrap: Bool) -> UInt16 {
        var f: UInt16 = writable ? VirtqDesc.flagWrite : 0
        if next { f |= VirtqDesc.flagNext }
        return f | (wrap ? PackedDesc.flagAvail : PackedDesc.flagUsed)
    }

    /// The flags word of descriptor `d`: the device reads it with acquire, so it is stored last,
    /// with release, after the address, length and ID (§2.8.21).
    @inlinable @inline(__always)
    static func flagsWord(_ d: UnsafeMutablePointer<PackedDesc>) -> UnsafeMutablePointer<Atomic<UInt16>> {
        UnsafeMutableRawPointer(d).advanced(by: 14).assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    /// Writes one descriptor and makes it available (the flags store, with release, comes last).
    @inlinable @inline(__always)
    static func post(_ d: UnsafeMutablePointer<PackedDesc>, addr: UInt64, len: UInt32, id: UInt16, flags: UInt16) {
        d.pointee.addr = addr
        d.pointee.len = len
        d.pointee.id = id
        flagsWord(d).pointee.store(flags, ordering: .releasing)
    }

    @inlinable @inline(__always)
    mutating func takeID() -> UInt16 {
        if inOrder {
            let id = nextID
            nextID = nextID &+ 1 == UInt16(size) ? 0 : nextID &+ 1
            return id
        }
        freeIDCount &-= 1
        return freeIDs[freeIDCount]
    }

    @inlinable @inline(__always)
    mutating func advanceAvail() {
        nextAvail &+= 1
        if nextAvail == UInt16(size) { nextAvail = 0; availWrap.toggle() }
    }

    /// `count` single-descriptor buffers; the caller has checked `freeCount >= count`. The
    /// descriptors become visible as their flags are stored (release); nothing waits for `publish`
    /// except the notification decision. Counters stay in registers for the burst (stores through
    /// the ring could alias `self`) and are written back once.
    @inlinable @inline(__always)
    public mutating func addBurst(count: Int, deviceWritable: Bool,
                                  _ buffer: (Int) -> (addr: UInt64, len: UInt32, cookie: UnsafeMutableRawPointer?)) {
        precondition(count <= freeDescs && failure == nil)
        let desc = self.desc, slots = self.slots, size16 = UInt16(truncatingIfNeeded: size)
        let writeFlag: UInt16 = deviceWritable ? VirtqDesc.flagWrite : 0
        var pos = nextAvail, wrap = availWrap
        // AVAIL = wrap, USED = !wrap (§2.8.1); recomputed only when the ring wraps.
        var flags = writeFlag | (wrap ? PackedDesc.flagAvail : PackedDesc.flagUsed)
        if inOrder {
            var id = nextID
            for i in 0..<count {
                let b = buffer(i)
                Self.post(desc + Int(pos), addr: b.addr, len: b.len, id: id, flags: flags)
                slots[Int(id)] = SlotInfo(cookie: b.cookie, writable: deviceWritable ? b.len : 0, ndesc: 1, last: pos)
                id &+= 1
                if id == size16 { id = 0 }
                pos &+= 1
                if pos == size16 {
                    pos = 0; wrap.toggle()
                    flags = writeFlag | (wrap ? PackedDesc.flagAvail : PackedDesc.flagUsed)
                }
            }
            nextID = id
        } else {
            let freeIDs = self.freeIDs
            var top = freeIDCount
            for i in 0..<count {
                let b = buffer(i)
                top &-= 1
                let id = freeIDs[top]
                Self.post(desc + Int(pos), addr: b.addr, len: b.len, id: id, flags: flags)
                slots[Int(id)] = SlotInfo(cookie: b.cookie, writable: deviceWritable ? b.len : 0, ndesc: 1, last: pos)
                pos &+= 1
                if pos == size16 {
                    pos = 0; wrap.toggle()
                    flags = writeFlag | (wrap ? PackedDesc.flagAvail : PackedDesc.flagUsed)
                }
            }
            freeIDCount = top
        }
        nextAvail = pos
        availWrap = wrap
        freeDescs &-= count
        outstanding &+= count
        addedSincePublish &+= count
    }

    /// One buffer of `count` descriptors in consecutive ring positions; false (adding nothing)
    /// when there is no room. The head's flags are stored last, so the device sees the chain whole.
    @inlinable
    public mutating func addChain(count: Int, cookie: UnsafeMutableRawPointer?, _ segment: (Int) -> VirtqSegment) -> Bool {
        precondition(count >= 1 && failure == nil)
        guard count <= freeDescs, inOrder || freeIDCount > 0 else { return false }
        let id = takeID()
        let head = Int(nextAvail)
        var headFlags: UInt16 = 0
        var writable: UInt32 = 0
        for i in 0..<count {
            let s = segment(i)
            let d = desc + Int(nextAvail)
            if s.deviceWritable { writable &+= s.len }
            let f = flags(writable: s.deviceWritable, next: i < count - 1, wrap: availWrap)
            if i == 0 {
                // The head goes last, so the device never sees a partial chain.
                d.pointee.addr = s.addr; d.pointee.len = s.len; d.pointee.id = id
                headFlags = f
            } else {
                Self.post(d, addr: s.addr, len: s.len, id: id, flags: f)
            }
            advanceAvail()
        }
        slots[Int(id)] = SlotInfo(cookie: cookie, writable: writable, ndesc: UInt16(count), last: UInt16(head))
        Self.flagsWord(desc + head).pointee.store(headFlags, ordering: .releasing)
        freeDescs &-= count
        outstanding &+= 1
        addedSincePublish &+= count
        return true
    }

    /// Says whether the device wants a notification for what was added since the last call
    /// (§2.8.21.3). The descriptors themselves were already visible.
    @inlinable
    public mutating func publish() -> Bool {
        let old = publishedAvail, new = nextAvail, oldWrap = publishedWrap
        guard addedSincePublish > 0 else { return false }
        addedSincePublish = 0
        publishedAvail = new
        publishedWrap = availWrap
        // The flag stores must be visible before we read the device's suppression area.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let flags = (deviceEvent + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.load(ordering: .relaxed)
        switch flags {
        case PackedEventFlags.disable: return false
        case PackedEventFlags.desc where eventIndex:
            // Measure from the current lap (as Linux does): an event or an old position from
            // the previous lap sits `size` positions back.
            let offWrap = deviceEvent.assumingMemoryBound(to: Atomic<UInt16>.self).pointee.load(ordering: .relaxed)
            var event = offWrap & 0x7fff
            if (offWrap >> 15 != 0) != availWrap { event &-= UInt16(size) }
            let oldIndex = oldWrap != availWrap ? old &- UInt16(size) : old
            return virtqNeedEvent(event: event, new: new, old: oldIndex)
        default: return true
        }
    }

    // MARK: Completions

    /// Hands up to `max` used buffers to `body` (cookie, bytes written). Stops at the first
    /// descriptor the device has not marked used, or at a device error (see `failure`).
    @inlinable
    public mutating func harvest(max: Int, _ body: (UnsafeMutableRawPointer?, UInt32) -> Void) -> Int {
        guard failure == nil else { return 0 }
        return inOrder ? harvestInOrder(max) { _, c, l in body(c, l) } : harvestOutOfOrder(max) { _, c, l in body(c, l) }
    }

    @inline(__always) var driverEventFlags: UnsafeMutablePointer<Atomic<UInt16>> {
        (memory + layout.driverEventOffset + 2).assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    public mutating func enableUsedNotifications() -> Bool {
        driverEventFlags.pointee.store(PackedEventFlags.enable, ordering: .relaxed)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if inBatch || outstanding == 0 { return !inBatch }
        let expected = usedWrap ? PackedDesc.flagAvail | PackedDesc.flagUsed : 0
        let mask = PackedDesc.flagAvail | PackedDesc.flagUsed
        return usedFlags(at: nextUsed) & mask != expected
    }

    public mutating func disableUsedNotifications() {
        driverEventFlags.pointee.store(PackedEventFlags.disable, ordering: .relaxed)
    }

    /// The flags of the descriptor at `pos`, read with acquire: its ID and length are read after.
    @inlinable @inline(__always)
    func usedFlags(at pos: UInt16) -> UInt16 {
        Self.flagsWord(desc + Int(pos)).pointee.load(ordering: .acquiring)
    }

    /// Used in this lap: AVAIL = USED = the wrap counter (`expected` holds both bits). AVAIL ≠
    /// USED: not used yet. Both equal but for the other lap: the device broke §2.8.1.
    @inlinable @inline(__always)
    mutating func isUsed(_ flags: UInt16, _ expected: UInt16, at pos: UInt16) -> Bool {
        let mask = PackedDesc.flagAvail | PackedDesc.flagUsed
        let bits = flags & mask
        if _fastPath(bits == expected) { return true }
        if bits == 0 || bits == mask { fail(.usedWrapMismatch(position: pos, expectedWrap: expected != 0)) }
        return false
    }

    /// Moves a used-side position past `count` descriptors, flipping the expected wrap bits at the
    /// end of the ring.
    @inlinable @inline(__always)
    static func skip(_ count: UInt16, _ pos: inout UInt16, _ expected: inout UInt16, size: UInt16) {
        pos &+= count
        if pos >= size { pos &-= size; expected ^= PackedDesc.flagAvail | PackedDesc.flagUsed }
    }

    /// In order: the oldest buffer is done; its descriptors are free again and the next used
    /// descriptor follows them.
    @inlinable @inline(__always)
    static func pass(_ slot: SlotInfo, _ pos: inout UInt16, _ expected: inout UInt16, _ freed: inout Int,
                     _ oldest: inout UInt16, size: UInt16) {
        skip(slot.ndesc, &pos, &expected, size: size)
        freed &+= Int(slot.ndesc)
        oldest &+= 1
        if oldest == size { oldest = 0 }
    }

    /// In order, a used descriptor names the last buffer of a run that starts at the oldest one
    /// in flight (a run of one unless the device batched, §2.8.11). The run is handed out in a
    /// tight loop; a run cut short by `max` carries over to the next call (`inBatch`).
    @inlinable
    mutating func harvestInOrder(_ max: Int, _ body: (Int, UnsafeMutableRawPointer?, UInt32) -> Void) -> Int {
        // Counters in locals for the loop (see `addBurst`); written back once at the end.
        let desc = self.desc, slots = self.slots, size = self.size, size16 = UInt16(truncatingIfNeeded: size)
        var pos = nextUsed, oldest = oldestID
        var usedBits = usedWrap ? PackedDesc.flagAvail | PackedDesc.flagUsed : 0
        let limit = Swift.min(max, outstanding)
        // Buffers left in the current run, and the length the device wrote into its last one.
        var runLeft = 0
        var lastLen: UInt32 = 0
        if _slowPath(inBatch) {
            runLeft = (batchEnd >= oldest ? Int(batchEnd &- oldest) : Int(batchEnd) &+ size &- Int(oldest)) &+ 1
            lastLen = batchLen
        }
        var freed = 0
        var i = 0
        while i < limit {
            if runLeft == 0 {
                let f = usedFlags(at: pos)
                guard isUsed(f, usedBits, at: pos) else { break }
                let d = desc[Int(pos)]
                // §2.8.4: the length means something only with VIRTQ_DESC_F_WRITE; otherwise 0.
                let written = f & VirtqDesc.flagWrite != 0 ? d.len : 0
                if _fastPath(d.id == oldest) {
                    // A run of one (the device did not batch): the common case on receive.
                    let slot = slots[Int(oldest)]
                    guard written <= slot.writable else {
                        fail(.usedLengthTooLarge(id: UInt32(d.id), length: written, posted: slot.writable)); break
                    }
                    Self.pass(slot, &pos, &usedBits, &freed, &oldest, size: size16)
                    body(i, slot.cookie, written)
                    i &+= 1
                    continue
                }
                guard d.id < size16 else { fail(.usedIDOutOfRange(id: UInt32(d.id), size: size)); break }
                // The run must end at a buffer in flight, after the oldest.
                let distance = d.id > oldest ? Int(d.id &- oldest) : Int(d.id) &+ size &- Int(oldest)
                guard distance < outstanding &- i else { fail(.usedIDOutOfOrder(id: UInt32(d.id), expected: oldest)); break }
                let posted = slots[Int(d.id)].writable
                guard written <= posted else { fail(.usedLengthTooLarge(id: UInt32(d.id), length: written, posted: posted)); break }
                runLeft = distance &+ 1
                lastLen = written
            }
            let n = Swift.min(runLeft, limit &- i)
            for j in 0..<n {
                let slot = slots[Int(oldest)]
                runLeft &-= 1
                // Buffers before the run's last one count as fully written.
                let len = runLeft == 0 ? lastLen : slot.writable
                Self.pass(slot, &pos, &usedBits, &freed, &oldest, size: size16)
                body(i &+ j, slot.cookie, len)
            }
            i &+= n
        }
        inBatch = runLeft > 0
        if inBatch {
            let end = Int(oldest) &+ runLeft &- 1
            batchEnd = UInt16(truncatingIfNeeded: end >= size ? end &- size : end)
            batchLen = lastLen
        }
        nextUsed = pos
        usedWrap = usedBits != 0
        oldestID = oldest
        freeDescs &+= freed
        outstanding &-= i
        return i
    }

    @inlinable
    mutating func harvestOutOfOrder(_ max: Int, _ body: (Int, UnsafeMutableRawPointer?, UInt32) -> Void) -> Int {
        let desc = self.desc, slots = self.slots, freeIDs = self.freeIDs, size16 = UInt16(truncatingIfNeeded: size)
        var pos = nextUsed, top = freeIDCount
        var usedBits = usedWrap ? PackedDesc.flagAvail | PackedDesc.flagUsed : 0
        let limit = Swift.min(max, outstanding)
        var freed = 0
        var i = 0
        while i < limit {
            let f = usedFlags(at: pos)
            guard isUsed(f, usedBits, at: pos) else { break }
            let d = desc[Int(pos)]
            guard d.id < size16 else { fail(.usedIDOutOfRange(id: UInt32(d.id), size: size)); break }
            let written = f & VirtqDesc.flagWrite != 0 ? d.len : 0
            let slot = slots[Int(d.id)]
            guard slot.ndesc != 0 else { fail(.usedIDNotInFlight(id: UInt32(d.id))); break }
            guard written <= slot.writable else {
                fail(.usedLengthTooLarge(id: UInt32(d.id), length: written, posted: slot.writable)); break
            }
            slots[Int(d.id)].ndesc = 0
            freeIDs[top] = d.id
            top &+= 1
            Self.skip(slot.ndesc, &pos, &usedBits, size: size16)
            freed &+= Int(slot.ndesc)
            body(i, slot.cookie, written)
            i &+= 1
        }
        nextUsed = pos
        usedWrap = usedBits != 0
        freeIDCount = top
        freeDescs &+= freed
        outstanding &-= i
        return i
    }

    @usableFromInline
    mutating func fail(_ e: VirtqueueError) { if failure == nil { failure = e } }

    /// `harvest` into arrays.
    @inlinable
    public mutating func harvest(into cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>,
                                 lengths: UnsafeMutablePointer<UInt32>, max: Int) -> Int {
        // The body gets the index, so it captures nothing mutable and stays in registers.
        guard failure == nil else { return 0 }
        if inOrder { return harvestInOrder(max) { k, c, l in cookies[k] = c; lengths[k] = l } }
        return harvestOutOfOrder(max) { k, c, l in cookies[k] = c; lengths[k] = l }
    }

    /// Visits the cookie of every buffer in flight without changing anything. Returns how many.
    @discardableResult
    public func forEachInFlight(_ body: (UnsafeMutableRawPointer?) -> Void) -> Int {
        var count = 0
        if inOrder {
            var id = oldestID
            while count < outstanding {
                body(slots[Int(id)].cookie)
                id = id &+ 1 == UInt16(size) ? 0 : id &+ 1
                count += 1
            }
        } else {
            for i in 0..<size where slots[i].ndesc != 0 { body(slots[i].cookie); count += 1 }
        }
        return count
    }

    /// After the device has stopped: every buffer in flight to `body`, then a fresh ring.
    @discardableResult
    public mutating func reclaimAll(_ body: (UnsafeMutableRawPointer?) -> Void) -> Int {
        let n = forEachInFlight(body)
        resetRing()
        return n
    }
}

extension PackedVirtqueue: Virtqueue {
    public static var layout: RingLayoutChoice { .packed }
    public static var layoutFeatures: VirtioFeatures { .ringPacked }
    public static var resetBase: UInt32 { 1 << 15 }
    public static func ringBytes(size: Int) throws(VirtqueueError) -> Int { try PackedRingLayout(size: size).totalBytes }

    public init(memory: UnsafeMutableRawPointer, size: Int, inOrder: Bool, eventIndex: Bool) throws(VirtqueueError) {
        self.init(memory: memory, layout: try PackedRingLayout(size: size), inOrder: inOrder, eventIndex: eventIndex)
    }

    public var addresses: QueueAddresses {
        QueueAddresses(size: size, desc: descAddress, avail: driverEventAddress, used: deviceEventAddress, base: vhostBase)
    }

    /// Continues at the device's position and wrap counter. The ring was zeroed by `reclaimAll`:
    /// flags 0 (AVAIL = USED) read as "not available" on either lap, so nothing stale is offered.
    public mutating func restart(at base: UInt32) {
        precondition(outstanding == 0, "restart(at:) follows reclaimAll")
        let pos = UInt16(truncatingIfNeeded: base & 0x7fff) % UInt16(size)
        let wrap = base & 0x8000 != 0
        nextAvail = pos; publishedAvail = pos; nextUsed = pos
        availWrap = wrap; publishedWrap = wrap; usedWrap = wrap
        nextID = pos; oldestID = pos
    }
}
