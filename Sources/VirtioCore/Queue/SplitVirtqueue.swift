import Synchronization

/// One part of a buffer chain handed to `SplitVirtqueue.addChain`.
@frozen public struct VirtqSegment: Sendable {
    public var addr: UInt64
    public var len: UInt32
    public var deviceWritable: Bool
    @inlinable public init(addr: UInt64, len: UInt32, deviceWritable: Bool) {
        self.addr = addr; self.len = len; self.deviceWritable = deviceWritable
    }
}

/// Indirect descriptor tables (VIRTIO_F_INDIRECT_DESC, §2.7.5.3): one table of
/// `entriesPerTable` descriptors per ring descriptor, in memory the device can read. A chain in
/// an indirect table takes one ring descriptor whatever its length.
@frozen public struct IndirectTables: @unchecked Sendable {
    public let base: UnsafeMutablePointer<VirtqDesc>
    /// Address of `base` as the device sees it.
    public let baseAddress: UInt64
    public let entriesPerTable: Int
    public init(base: UnsafeMutablePointer<VirtqDesc>, baseAddress: UInt64, entriesPerTable: Int) {
        self.base = base; self.baseAddress = baseAddress; self.entriesPerTable = entriesPerTable
    }
    /// Bytes needed for a queue of `queueSize`.
    public static func bytes(queueSize: Int, entriesPerTable: Int) -> Int { queueSize * entriesPerTable * 16 }
}

/// What the driver remembers about a buffer in flight, indexed by its head descriptor.
@usableFromInline @frozen struct SlotInfo {
    @usableFromInline var cookie: UnsafeMutableRawPointer?
    /// Bytes of the chain the device may write: the most a used element may claim.
    @usableFromInline var writable: UInt32
    /// Descriptors in the chain; 0 means "not in flight".
    @usableFromInline var ndesc: UInt16
    /// Last descriptor of the chain (to splice it back onto the free list).
    @usableFromInline var last: UInt16
    @inlinable init(cookie: UnsafeMutableRawPointer?, writable: UInt32, ndesc: UInt16, last: UInt16) {
        self.cookie = cookie; self.writable = writable; self.ndesc = ndesc; self.last = last
    }
}

/// The driver side of a split virtqueue (VIRTIO 1.2 §2.7) over memory someone else owns (DPDK
/// memory for a real device, heap memory in tests). It knows nothing of packets or block requests:
/// a buffer is a chain of (address, length, direction) with an opaque cookie that comes back when
/// the device has used it.
///
/// Two modes, fixed at creation:
/// - **in order** (VIRTIO_F_IN_ORDER negotiated, §2.7.9): descriptors are taken from the table in
///   ring order, so there is no free list; completion only moves counters. The device may write a
///   single used element for a batch (its id is the head of the batch's last buffer, placed at the
///   batch's first used slot); every buffer before it counts as fully written.
/// - **out of order**: a free list of descriptors, kept in private memory (the `next` links the
///   device sees are written from it, never read back).
///
/// Everything the device writes is checked before use; the first bad value stops the queue
/// (`failure`) without touching anything outside our buffers, and `reclaimAll` still returns
/// every cookie.
public struct SplitVirtqueue: ~Copyable {
    public let size: Int
    public let inOrder: Bool
    public let eventIndex: Bool
    @usableFromInline let mask: UInt16
    @usableFromInline let desc: UnsafeMutablePointer<VirtqDesc>
    @usableFromInline let availIdx: UnsafeMutablePointer<Atomic<UInt16>>
    @usableFromInline let availRing: UnsafeMutablePointer<UInt16>
    @usableFromInline let usedFlags: UnsafeMutablePointer<Atomic<UInt16>>
    @usableFromInline let usedIdx: UnsafeMutablePointer<Atomic<UInt16>>
    @usableFromInline let usedRing: UnsafeMutablePointer<VirtqUsedElem>
    @usableFromInline let availEvent: UnsafeMutablePointer<Atomic<UInt16>>
    @usableFromInline let slots: UnsafeMutablePointer<SlotInfo>
    /// Out of order: our private copy of the chain links / free list. The device can write the
    /// descriptor table; we never read a link back from it.
    @usableFromInline let links: UnsafeMutablePointer<UInt16>
    /// Out of order: true while a head has been published to the device and not yet used.
    @usableFromInline let published: UnsafeMutablePointer<Bool>
    public let memory: UnsafeMutableRawPointer
    public let layout: SplitRingLayout

    /// Next available-ring position to fill (free-running).
    @usableFromInline var nextAvail: UInt16 = 0
    /// Value last stored to `avail->idx`.
    @usableFromInline var publishedAvail: UInt16 = 0
    /// Next used-ring position to consume (free-running).
    @usableFromInline var lastUsed: UInt16 = 0
    @usableFromInline var freeDescs: Int
    /// In order: next descriptor to hand out (free-running). Out of order: head of the free list.
    @usableFromInline var descHead: UInt16 = 0
    /// Out of order: last descriptor of the free list (valid while the list is not empty).
    @usableFromInline var freeTail: UInt16 = 0
    /// Out of order: completed chains join the end of the free list, so descriptors are handed out
    /// in a cycle over the whole table (the device then reads the table front to back, as with
    /// IN_ORDER); false puts them at the front (the most recently used descriptors first).
    public var recycleInTableOrder = false
    /// In order: first descriptor of the oldest buffer not yet completed (free-running).
    @usableFromInline var oldestDesc: UInt16 = 0
    /// In order: a single used element covers buffers up to `batchEnd`, which gets `batchLen`.
    @usableFromInline var inBatch = false
    @usableFromInline var batchEnd: UInt16 = 0
    @usableFromInline var batchLen: UInt32 = 0
    /// Buffers posted and not yet completed (published or not).
    @usableFromInline var outstanding: Int = 0
    /// The first device error seen; once set, the queue hands out and takes back nothing more.
    public private(set) var failure: VirtqueueError?
    /// Set when indirect descriptors were negotiated: chains longer than one go into a table.
    public private(set) var indirect: IndirectTables?

    /// Uses `tables` for every chain of two or more descriptors (after VIRTIO_F_INDIRECT_DESC).
    @discardableResult public mutating func useIndirect(_ tables: IndirectTables) -> Bool {
        precondition(tables.entriesPerTable >= 2)
        indirect = tables
        return true
    }

    /// With indirect tables: chains of at most this many descriptors still go into the ring
    /// itself (the device then reads one line fewer per request), as long as `tableReserve`
    /// descriptors stay free for chains in tables: the queue then still holds at least that many
    /// buffers however long they are. 1 (the default) puts every chain longer than one into a table.
    public var directChainLimit = 1
    /// Descriptors direct chains leave free for chains in tables (default: half the ring).
    public var tableReserve: Int

    /// Whether a chain of `count` descriptors goes into an indirect table.
    @inlinable func goesIndirect(_ count: Int) -> Bool {
        guard let t = indirect, count > 1, count <= t.entriesPerTable else { return false }
        return count > directChainLimit || freeDescs &- count < tableReserve
    }

    /// Ring descriptors a chain of `count` segments takes.
    @inlinable public func descriptorsNeeded(forSegments count: Int) -> Int {
        goesIndirect(count) ? 1 : count
    }

    /// Lays a fresh queue over `memory` (at least `layout.totalBytes`, 4 KiB aligned), zeroing it.
    public init(memory: UnsafeMutableRawPointer, layout: SplitRingLayout, inOrder: Bool, eventIndex: Bool = false) {
        precondition(Int(bitPattern: memory) & (SplitRingLayout.alignment - 1) == 0, "ring memory must be 4 KiB aligned")
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self.inOrder = inOrder
        self.eventIndex = eventIndex
        self.mask = UInt16(truncatingIfNeeded: layout.size - 1)
        let avail = memory + layout.availOffset
        let used = memory + layout.usedOffset
        desc = (memory + layout.descOffset).bindMemory(to: VirtqDesc.self, capacity: layout.size)
        availIdx = (avail + 2).assumingMemoryBound(to: Atomic<UInt16>.self)
        availRing = (avail + 4).bindMemory(to: UInt16.self, capacity: layout.size)
        usedFlags = used.assumingMemoryBound(to: Atomic<UInt16>.self)
        usedIdx = (used + 2).assumingMemoryBound(to: Atomic<UInt16>.self)
        usedRing = (used + 4).bindMemory(to: VirtqUsedElem.self, capacity: layout.size)
        availEvent = (used + 4 + 8 * layout.size).assumingMemoryBound(to: Atomic<UInt16>.self)
        slots = .allocate(capacity: layout.size)
        links = .allocate(capacity: layout.size)
        published = .allocate(capacity: layout.size)
        freeDescs = layout.size
        tableReserve = layout.size / 2
        resetRing()
    }

    deinit {
        slots.deallocate()
        links.deallocate()
        published.deallocate()
    }

    /// `used_event` (§2.7.10): the last slot of the avail ring.
    @inline(__always) var usedEvent: UnsafeMutablePointer<Atomic<UInt16>> {
        (memory + layout.availOffset + 4 + 2 * layout.size).assumingMemoryBound(to: Atomic<UInt16>.self)
    }
    @inline(__always) var availFlags: UnsafeMutablePointer<Atomic<UInt16>> {
        (memory + layout.availOffset).assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    public mutating func enableUsedNotifications() -> Bool {
        if eventIndex {
            // Notify once the used index moves past what we have seen (§2.7.10).
            usedEvent.pointee.store(lastUsed, ordering: .relaxed)
        } else {
            availFlags.pointee.store(0, ordering: .relaxed)
        }
        // The device must see the request before we look at the used index again: a store-load
        // fence, or a buffer used in between would neither be seen nor notified.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return !inBatch && usedIdx.pointee.load(ordering: .acquiring) == lastUsed
    }

    public mutating func disableUsedNotifications() {
        if eventIndex {
            // An event index behind the used index is crossed only after 2^16 more buffers.
            usedEvent.pointee.store(lastUsed &- 1, ordering: .relaxed)
        } else {
            availFlags.pointee.store(virtqAvailFlagNoInterrupt, ordering: .relaxed)
        }
    }

    /// Zeroes the rings and forgets every buffer (after `reclaimAll`, before a device restart).
    public mutating func resetRing() {
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: layout.totalBytes)
        // Poll mode: ask for no used-buffer notifications (VRING_AVAIL_F_NO_INTERRUPT, §2.7.7).
        (memory + layout.availOffset).storeBytes(of: virtqAvailFlagNoInterrupt, as: UInt16.self)
        // Chain links: in order, descriptor i continues in i+1 and is never relinked; out of order
        // the same links form the initial free list.
        for i in 0..<size {
            links[i] = UInt16(truncatingIfNeeded: (i + 1) & Int(mask))
            desc[i].next = links[i]
        }
        published.initialize(repeating: false, count: size)
        slots.initialize(repeating: SlotInfo(cookie: nil, writable: 0, ndesc: 0, last: 0), count: size)
        nextAvail = 0; publishedAvail = 0; lastUsed = 0; descHead = 0; oldestDesc = 0
        freeTail = UInt16(truncatingIfNeeded: size - 1)
        freeDescs = size; outstanding = 0; inBatch = false; failure = nil
    }

    // MARK: Addresses for the transport
    public var descAddress: UInt64 { UInt64(UInt(bitPattern: desc)) }
    public var availAddress: UInt64 { UInt64(UInt(bitPattern: memory + layout.availOffset)) }
    public var usedAddress: UInt64 { UInt64(UInt(bitPattern: memory + layout.usedOffset)) }

    /// Free descriptors.
    @inlinable public var freeCount: Int { freeDescs }
    /// Buffers handed to the queue and not yet returned by `harvest`/`reclaimAll`.
    @inlinable public var inFlight: Int { outstanding }

    // MARK: Posting

    /// One single-descriptor buffer (in order: into the next slot). The caller has checked
    /// `freeCount`. For more than one, `addBurst` keeps the counters in registers.
    @inlinable @inline(__always)
    public mutating func add(addr: UInt64, len: UInt32, deviceWritable: Bool, cookie: UnsafeMutableRawPointer?) {
        addBurst(count: 1, deviceWritable: deviceWritable) { _ in (addr, len, cookie) }
    }

    /// `add` for a queue known to be in order (kept for callers that state it).
    @inlinable @inline(__always)
    public mutating func addInOrder(addr: UInt64, len: UInt32, deviceWritable: Bool, cookie: UnsafeMutableRawPointer?) {
        precondition(inOrder)
        add(addr: addr, len: len, deviceWritable: deviceWritable, cookie: cookie)
    }

    /// `count` single-descriptor buffers at once; `buffer(i)` gives the i-th (address, length,
    /// cookie). The caller has checked `freeCount >= count`. The queue's counters live in
    /// registers for the whole burst and are written back once: stores through the ring
    /// pointers could alias `self`, so a per-buffer `add` must reload and re-store them.
    @inlinable @inline(__always)
    public mutating func addBurst(count: Int, deviceWritable: Bool,
                                  _ buffer: (Int) -> (addr: UInt64, len: UInt32, cookie: UnsafeMutableRawPointer?)) {
        precondition(count <= freeDescs && failure == nil)
        let desc = self.desc, slots = self.slots, ring = self.availRing, links = self.links, mask = self.mask
        let flags: UInt16 = deviceWritable ? VirtqDesc.flagWrite : 0
        var head = descHead
        var avail = nextAvail
        if inOrder {
            for i in 0..<count {
                let b = buffer(i)
                let d = head & mask
                let p = desc + Int(d)
                p.pointee.addr = b.addr
                p.pointee.len = b.len
                p.pointee.flags = flags
                slots[Int(d)] = SlotInfo(cookie: b.cookie, writable: deviceWritable ? b.len : 0, ndesc: 1, last: d)
                ring[Int(avail & mask)] = d
                head &+= 1
                avail &+= 1
            }
        } else {
            for i in 0..<count {
                let b = buffer(i)
                let d = head
                let p = desc + Int(d)
                head = links[Int(d)]
                p.pointee.addr = b.addr
                p.pointee.len = b.len
                p.pointee.flags = flags
                slots[Int(d)] = SlotInfo(cookie: b.cookie, writable: deviceWritable ? b.len : 0, ndesc: 1, last: d)
                ring[Int(avail & mask)] = d
                avail &+= 1
            }
        }
        descHead = head
        nextAvail = avail
        freeDescs &-= count
        outstanding &+= count
    }

    /// A chain of `count` descriptors (e.g. a block request: header, data, status). Returns false,
    /// adding nothing, when fewer than `count` descriptors are free.
    @inlinable
    public mutating func addChain(count: Int, cookie: UnsafeMutableRawPointer?, _ segment: (Int) -> VirtqSegment) -> Bool {
        precondition(count >= 1 && failure == nil)
        if goesIndirect(count), let t = indirect {
            return addIndirect(t, count: count, cookie: cookie, segment)
        }
        guard count <= freeDescs else { return false }
        let head: UInt16 = inOrder ? descHead & mask : descHead
        var d = head
        var writable: UInt32 = 0
        for i in 0..<count {
            let s = segment(i)
            let p = desc + Int(d)
            p.pointee.addr = s.addr
            p.pointee.len = s.len
            var flags: UInt16 = s.deviceWritable ? VirtqDesc.flagWrite : 0
            if i < count - 1 { flags |= VirtqDesc.flagNext }
            p.pointee.flags = flags
            if s.deviceWritable { writable &+= s.len }
            if i < count - 1 {
                let next = inOrder ? (d &+ 1) & mask : links[Int(d)]
                p.pointee.next = next
                d = next
            }
        }
        if inOrder { descHead &+= UInt16(truncatingIfNeeded: count) } else { descHead = links[Int(d)] }
        slots[Int(head)] = SlotInfo(cookie: cookie, writable: writable, ndesc: UInt16(truncatingIfNeeded: count), last: d)
        availRing[Int(nextAvail & mask)] = head
        nextAvail &+= 1
        freeDescs &-= count
        outstanding &+= 1
        return true
    }

    /// A chain written into the head descriptor's indirect table; one ring descriptor points at it.
    @inlinable
    mutating func addIndirect(_ t: IndirectTables, count: Int, cookie: UnsafeMutableRawPointer?,
                              _ segment: (Int) -> VirtqSegment) -> Bool {
        guard freeDescs >= 1 else { return false }
        let head: UInt16 = inOrder ? descHead & mask : descHead
        let table = t.base + Int(head) * t.entriesPerTable
        var writable: UInt32 = 0
        for i in 0..<count {
            let s = segment(i)
            var flags: UInt16 = s.deviceWritable ? VirtqDesc.flagWrite : 0
            if i < count - 1 { flags |= VirtqDesc.flagNext }
            table[i] = VirtqDesc(addr: s.addr, len: s.len, flags: flags, next: UInt16(truncatingIfNeeded: i + 1))
            if s.deviceWritable { writable &+= s.len }
        }
        let p = desc + Int(head)
        p.pointee.addr = t.baseAddress &+ UInt64(Int(head) * t.entriesPerTable * 16)
        p.pointee.len = UInt32(count * 16)
        p.pointee.flags = VirtqDesc.flagIndirect
        if inOrder { descHead &+= 1 } else { descHead = links[Int(head)] }
        slots[Int(head)] = SlotInfo(cookie: cookie, writable: writable, ndesc: 1, last: head)
        availRing[Int(nextAvail & mask)] = head
        nextAvail &+= 1
        freeDescs &-= 1
        outstanding &+= 1
        return true
    }

    /// Makes everything added since the last call visible to the device with one store of
    /// `avail->idx`, and says whether the device asked to be notified (§2.7.13.3–4).
    @inlinable
    public mutating func publish() -> Bool {
        let new = nextAvail, old = publishedAvail
        guard new != old else { return false }
        if !inOrder {
            var i = old
            while i != new { published[Int(availRing[Int(i & mask)])] = true; i &+= 1 }
        }
        // Release: the descriptors and avail entries written above are visible before the index.
        availIdx.pointee.store(new, ordering: .releasing)
        publishedAvail = new
        // Full fence: the index store must be visible before we read the device's suppression
        // field, or we could miss a notification the device is about to ask for (§2.7.13.4).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if eventIndex {
            return virtqNeedEvent(event: availEvent.pointee.load(ordering: .relaxed), new: new, old: old)
        }
        return usedFlags.pointee.load(ordering: .relaxed) & virtqUsedFlagNoNotify == 0
    }

    // MARK: Completions

    /// Buffers the device has completed and we have not harvested yet. Checks the used index
    /// against what is in flight; a jump stops the queue.
    @inlinable
    public mutating func completedCount() -> Int {
        guard failure == nil else { return 0 }
        // Acquire: the used elements the device wrote before moving the index are visible to us.
        let usedNow = usedIdx.pointee.load(ordering: .acquiring)
        let ready = usedNow &- lastUsed
        let inFlight = publishedAvail &- lastUsed
        if ready > inFlight {
            fail(.usedIndexJump(usedIdx: usedNow, lastSeen: lastUsed, inFlight: inFlight))
            return 0
        }
        return Int(ready)
    }

    /// Hands up to `max` completed buffers to `body` (cookie, bytes written by the device), oldest
    /// first in order mode. Returns how many; fewer than completed only when `max` or a device
    /// error (see `failure`) stops it.
    @inlinable
    public mutating func harvest(max: Int, _ body: (UnsafeMutableRawPointer?, UInt32) -> Void) -> Int {
        let ready = completedCount()
        let n = Swift.min(ready, max)
        return inOrder ? harvestInOrder(n, ready: ready) { _, c, l in body(c, l) } : harvestOutOfOrder(n) { _, c, l in body(c, l) }
    }

    @inlinable
    mutating func harvestInOrder(_ n: Int, ready: Int, _ body: (Int, UnsafeMutableRawPointer?, UInt32) -> Void) -> Int {
        // Counters in locals for the loop (see `addBurst`); written back once at the end.
        let slots = self.slots, usedRing = self.usedRing, mask = self.mask
        var oldest = oldestDesc, used = lastUsed
        var freed = 0
        var i = 0
        while i < n {
            let head = oldest & mask
            let slot = slots[Int(head)]
            let len: UInt32
            if _slowPath(inBatch) {
                if head == batchEnd { len = batchLen; inBatch = false } else { len = slot.writable }
            } else {
                let e = usedRing[Int(used & mask)]
                if _fastPath(e.id == UInt32(head)) {
                    guard e.len <= slot.writable else {
                        fail(.usedLengthTooLarge(id: e.id, length: e.len, posted: slot.writable)); break
                    }
                    len = e.len
                } else {
                    // One element for several buffers: it must name a later buffer among those the
                    // device has completed (possibly beyond this call's `max`); every buffer up to
                    // it is fully written.
                    guard startBatch(e, head: head, completed: ready - i) else { break }
                    len = batchEnd == head ? batchLen : slot.writable
                    if batchEnd == head { inBatch = false }
                }
            }
            oldest &+= slot.ndesc
            freed &+= Int(slot.ndesc)
            used &+= 1
            body(i, slot.cookie, len)
            i &+= 1
        }
        oldestDesc = oldest
        lastUsed = used
        freeDescs &+= freed
        outstanding &-= i
        return i
    }

    /// Checks a used element that does not name the next buffer (slow path, once per batch).
    @usableFromInline
    mutating func startBatch(_ e: VirtqUsedElem, head: UInt16, completed: Int) -> Bool {
        guard e.id < UInt32(size) else { fail(.usedIDOutOfRange(id: e.id, size: size)); return false }
        var h = head
        var k = 0
        while k < completed {
            if UInt32(h) == e.id {
                let posted = slots[Int(h)].writable
                guard e.len <= posted else { fail(.usedLengthTooLarge(id: e.id, length: e.len, posted: posted)); return false }
                inBatch = true; batchEnd = h; batchLen = e.len
                return true
            }
            h = (h &+ slots[Int(h)].ndesc) & mask
            k += 1
        }
        fail(.usedIDOutOfOrder(id: e.id, expected: head))
        return false
    }

    @inlinable
    mutating func harvestOutOfOrder(_ n: Int, _ body: (Int, UnsafeMutableRawPointer?, UInt32) -> Void) -> Int {
        let slots = self.slots, usedRing = self.usedRing, links = self.links, published = self.published
        let mask = self.mask, size = UInt32(self.size)
        var used = lastUsed, freeHead = descHead, freeTail = self.freeTail
        let fifo = recycleInTableOrder, freeBefore = freeDescs
        var freed = 0
        var i = 0
        while i < n {
            let e = usedRing[Int(used & mask)]
            guard e.id < size else { fail(.usedIDOutOfRange(id: e.id, size: Int(size))); break }
            let id = Int(e.id)
            let slot = slots[id]
            guard slot.ndesc != 0, published[id] else { fail(.usedIDNotInFlight(id: e.id)); break }
            guard e.len <= slot.writable else {
                fail(.usedLengthTooLarge(id: e.id, length: e.len, posted: slot.writable)); break
            }
            // Splice the chain back onto the free list: its end (table order) or its front.
            let h = UInt16(truncatingIfNeeded: id)
            if freeBefore &+ freed == 0 {
                freeHead = h; freeTail = slot.last
            } else if fifo {
                links[Int(freeTail)] = h; freeTail = slot.last
            } else {
                links[Int(slot.last)] = freeHead; freeHead = h
            }
            freed &+= Int(slot.ndesc)
            slots[id].ndesc = 0
            published[id] = false
            used &+= 1
            body(i, slot.cookie, e.len)
            i &+= 1
        }
        lastUsed = used
        descHead = freeHead
        self.freeTail = freeTail
        freeDescs &+= freed
        outstanding &-= i
        return i
    }

    @usableFromInline
    mutating func fail(_ error: VirtqueueError) {
        if failure == nil { failure = error }
    }

    /// After the device has stopped (or vanished): hands every buffer still in flight to `body`,
    /// then resets the rings. Returns how many.
    @discardableResult
    public mutating func reclaimAll(_ body: (UnsafeMutableRawPointer?) -> Void) -> Int {
        let count = forEachInFlight(body)
        resetRing()
        return count
    }

    /// Visits the cookie of every buffer in flight (oldest first in order mode) without changing
    /// anything. Returns how many.
    @discardableResult
    public func forEachInFlight(_ body: (UnsafeMutableRawPointer?) -> Void) -> Int {
        var count = 0
        if inOrder {
            var d = oldestDesc
            while count < outstanding {
                let slot = slots[Int(d & mask)]
                body(slot.cookie)
                d &+= slot.ndesc
                count += 1
            }
        } else {
            for i in 0..<size where slots[i].ndesc != 0 {
                body(slots[i].cookie)
                count += 1
            }
        }
        return count
    }
}

extension SplitVirtqueue: Virtqueue {
    public static var layout: RingLayoutChoice { .split }
    public static var layoutFeatures: VirtioFeatures { [] }
    public static var resetBase: UInt32 { 0 }
    public static func ringBytes(size: Int) throws(VirtqueueError) -> Int { try SplitRingLayout(size: size).totalBytes }

    public init(memory: UnsafeMutableRawPointer, size: Int, inOrder: Bool, eventIndex: Bool) throws(VirtqueueError) {
        self.init(memory: memory, layout: try SplitRingLayout(size: size), inOrder: inOrder, eventIndex: eventIndex)
    }

    public var addresses: QueueAddresses {
        QueueAddresses(size: size, desc: descAddress, avail: availAddress, used: usedAddress, base: UInt32(nextAvail))
    }

    /// Both indexes (ours and the ring's, which the device reads) continue from `base`; so does
    /// the in-order descriptor sequence, keeping descriptor = avail position as after a reset.
    public mutating func restart(at base: UInt32) {
        precondition(outstanding == 0, "restart(at:) follows reclaimAll")
        let b = UInt16(truncatingIfNeeded: base)
        nextAvail = b; publishedAvail = b; lastUsed = b
        if inOrder { descHead = b; oldestDesc = b }
        availIdx.pointee.store(b, ordering: .relaxed)
        usedIdx.pointee.store(b, ordering: .relaxed)
    }
}

extension SplitVirtqueue {
    /// `harvest` into two arrays (cookies, lengths) for callers that keep their own state.
    @inlinable
    public mutating func harvest(into cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>,
                                 lengths: UnsafeMutablePointer<UInt32>, max: Int) -> Int {
        // The body gets the index, so it captures nothing mutable and stays in registers.
        let ready = completedCount()
        let n = Swift.min(ready, max)
        if inOrder { return harvestInOrder(n, ready: ready) { k, c, l in cookies[k] = c; lengths[k] = l } }
        return harvestOutOfOrder(n) { k, c, l in cookies[k] = c; lengths[k] = l }
    }
}
