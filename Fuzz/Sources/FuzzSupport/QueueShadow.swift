import VirtioCore

/// The driver's own record of what it handed to a virtqueue, kept next to the queue under test
/// and checked against everything the queue gives back while a fuzzed device writes the rings:
///
/// - a cookie comes back only while in flight, and only once;
/// - its length is at most the bytes of the buffer the device may write;
/// - in order, buffers come back oldest first;
/// - once `failure` is set it stays the same and nothing more comes back;
/// - `reclaimAll` returns exactly the cookies still in flight, each once (in order: oldest first);
/// - `inFlight` and `freeCount` always agree with what is in flight.
///
/// Cookie k (k ≥ 1) is the pointer with bit pattern k; cookies grow with posting order.
public final class QueueShadow {
    public struct Posted {
        public var writable: UInt32
        /// Ring descriptors the buffer takes (an indirect chain: 1).
        public var descriptors: Int
    }

    public let size: Int
    public let inOrder: Bool
    public private(set) var inFlight: [Int: Posted] = [:]
    public private(set) var nextCookie = 1
    /// The queue's failure as first seen.
    public private(set) var failure: VirtqueueError?
    /// Scratch for `harvest(into:lengths:max:)`.
    public static let maxBurst = 64
    let cookies = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: QueueShadow.maxBurst)
    let lengths = UnsafeMutablePointer<UInt32>.allocate(capacity: QueueShadow.maxBurst)

    public init(size: Int, inOrder: Bool) {
        self.size = size
        self.inOrder = inOrder
    }

    deinit { cookies.deallocate(); lengths.deallocate() }

    public static func cookie(_ k: Int) -> UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: k)! }
    /// A device address for cookie k's segment i (never dereferenced by the queue).
    public static func address(_ k: Int, _ i: Int = 0) -> UInt64 { UInt64(k) << 16 | UInt64(i) << 12 }

    /// A buffer length to post: small, page-sized or large (kept below 2^24 so a chain's
    /// writable total cannot wrap).
    public static func postedLength(_ input: inout FuzzInput) -> UInt32 {
        switch input.u8() & 3 {
        case 0: return UInt32(input.u8())
        case 1: return 2048
        case 2: return 1 + UInt32(input.u16())
        default: return input.u32() & 0xff_ffff
        }
    }

    // MARK: Posting

    /// Up to 4 single-descriptor buffers with `addBurst`, if the queue is healthy and has room.
    public func postBurst<Q: Virtqueue & ~Copyable>(_ q: inout Q, _ input: inout FuzzInput) {
        guard q.failure == nil, q.freeCount > 0 else { return }
        let n = input.int(1...Swift.min(q.freeCount, 4))
        let writable = input.bool()
        var lens: [UInt32] = []
        for _ in 0..<n { lens.append(Self.postedLength(&input)) }
        let first = nextCookie
        q.addBurst(count: n, deviceWritable: writable) { i in
            (addr: Self.address(first + i), len: lens[i], cookie: Self.cookie(first + i))
        }
        for i in 0..<n { inFlight[first + i] = Posted(writable: writable ? lens[i] : 0, descriptors: 1) }
        nextCookie += n
    }

    /// One chain of 1–6 segments with `addChain` (readable ones first unless the input says
    /// otherwise), if the queue is healthy. It must be taken exactly when there is room.
    public func postChain<Q: Virtqueue & ~Copyable>(_ q: inout Q, _ input: inout FuzzInput) {
        guard q.failure == nil else { return }
        let count = input.int(1...6)
        let mixed = input.u8() & 7 == 0
        let firstWritable = input.int(0...count)
        var segments: [VirtqSegment] = []
        var writable: UInt32 = 0
        let k = nextCookie
        for i in 0..<count {
            let w = mixed ? input.bool() : i >= firstWritable
            let len = Self.postedLength(&input)
            segments.append(VirtqSegment(addr: Self.address(k, i), len: len, deviceWritable: w))
            if w { writable &+= len }
        }
        let needed = q.descriptorsNeeded(forSegments: count)
        let free = q.freeCount
        let added = q.addChain(count: count, cookie: Self.cookie(k)) { segments[$0] }
        invariant(added == (needed <= free), "addChain(\(count)) returned \(added) with \(free) free, \(needed) needed")
        guard added else { return }
        inFlight[k] = Posted(writable: writable, descriptors: needed)
        nextCookie += 1
    }

    // MARK: Completions

    /// Checks one harvest's results: `returned` (cookie, length) pairs of a call with `max`,
    /// which reported `count`, made when the queue's failure was `failureBefore`.
    public func accept(_ returned: [(UnsafeMutableRawPointer?, UInt32)], count: Int, max: Int,
                       failureBefore: VirtqueueError?) {
        invariant(count == returned.count, "harvest said \(count), handed out \(returned.count)")
        invariant(count >= 0 && count <= max, "harvest of at most \(max) returned \(count)")
        if failureBefore != nil {
            invariant(count == 0, "harvest returned \(count) buffers after failure \(failureBefore!)")
        }
        for (c, len) in returned {
            let key = Int(bitPattern: c)
            if inOrder {
                let oldest = inFlight.keys.min()
                invariant(oldest == key, "in order: cookie \(key) returned while \(oldest.map(String.init) ?? "none") is the oldest in flight")
            }
            guard let p = inFlight.removeValue(forKey: key) else {
                fatalError("fuzz invariant violated: cookie \(key) returned but not in flight (returned twice, or never posted)")
            }
            invariant(len <= p.writable, "cookie \(key) returned with length \(len) > \(p.writable) writable bytes posted")
        }
    }

    /// `harvest(into:lengths:max:)` with every check.
    @discardableResult
    public func harvest<Q: Virtqueue & ~Copyable>(_ q: inout Q, max: Int) -> Int {
        let m = Swift.min(Swift.max(max, 0), Self.maxBurst)
        let before = q.failure
        let n = q.harvest(into: cookies, lengths: lengths, max: m)
        invariant(n >= 0 && n <= m, "harvest(into:) of at most \(m) returned \(n)")
        var pairs: [(UnsafeMutableRawPointer?, UInt32)] = []
        for i in 0..<n { pairs.append((cookies[i], lengths[i])) }
        accept(pairs, count: n, max: m, failureBefore: before)
        return n
    }

    /// `forEachInFlight` sees exactly what is in flight and changes nothing.
    public func checkForEach<Q: Virtqueue & ~Copyable>(_ q: borrowing Q) {
        var seen: [Int] = []
        let n = q.forEachInFlight { seen.append(Int(bitPattern: $0)) }
        invariant(n == seen.count, "forEachInFlight said \(n), visited \(seen.count)")
        checkExactlyInFlight(seen, "forEachInFlight")
    }

    /// `reclaimAll` returns exactly the cookies in flight, each once (in order: oldest first),
    /// and leaves a fresh, healthy, empty queue.
    public func reclaimAll<Q: Virtqueue & ~Copyable>(_ q: inout Q) {
        var back: [Int] = []
        let n = q.reclaimAll { back.append(Int(bitPattern: $0)) }
        invariant(n == back.count, "reclaimAll said \(n), returned \(back.count)")
        checkExactlyInFlight(back, "reclaimAll")
        inFlight = [:]
        failure = nil
        invariant(q.failure == nil, "failure \(q.failure!) after reclaimAll")
        invariant(q.inFlight == 0 && q.freeCount == size, "after reclaimAll: inFlight \(q.inFlight), freeCount \(q.freeCount) of \(size)")
    }

    func checkExactlyInFlight(_ cookies: [Int], _ what: String) {
        invariant(Set(cookies).count == cookies.count, "\(what) returned a cookie twice: \(cookies)")
        invariant(Set(cookies) == Set(inFlight.keys),
                  "\(what) returned \(cookies.sorted()), in flight \(inFlight.keys.sorted())")
        if inOrder { invariant(cookies == cookies.sorted(), "\(what) in order, not oldest first: \(cookies)") }
    }

    /// After every step: the first failure stays, and the counters match what is in flight.
    public func check<Q: Virtqueue & ~Copyable>(_ q: borrowing Q) {
        if let f = failure {
            invariant(q.failure == f, "failure changed from \(f) to \(q.failure.map { "\($0)" } ?? "nil")")
        } else {
            failure = q.failure
        }
        invariant(q.inFlight == inFlight.count, "queue says \(q.inFlight) in flight, driver posted \(inFlight.count)")
        let descriptors = inFlight.values.reduce(0) { $0 + $1.descriptors }
        invariant(q.freeCount == size - descriptors,
                  "freeCount \(q.freeCount) but \(descriptors) of \(size) descriptors are in flight")
    }
}
