import DPDK
import Foundation
import Synchronization
import VirtioCore
import VirtioNet

/// testpmd's `fwd_stream`: an RX queue and the TX queue it feeds, as indices into one lcore's
/// ports. One port: each queue pair feeds itself; two ports: queue q of one port feeds queue q
/// of the other.
struct Stream {
    var rx: Int
    var tx: Int
}

/// What one lcore polls: the queue pairs it owns (device, pair) and its streams over them.
struct LcorePlan {
    var pairs: [(device: Int, pair: Int)] = []
    var streams: [Stream] = []

    /// Queue pair q goes to lcore q mod L, with that pair of every port, so each stream's RX and
    /// TX queues are polled by the same lcore and no queue is shared.
    static func spread(devices: Int, pairs: Int, lcores: Int) -> [LcorePlan] {
        (0..<lcores).map { l in
            var plan = LcorePlan()
            for q in stride(from: l, to: pairs, by: lcores) {
                for d in 0..<devices { plan.pairs.append((d, q)) }
            }
            for (i, p) in plan.pairs.enumerated() {
                let peer = devices == 2 ? 1 - p.device : p.device
                let tx = plan.pairs.firstIndex { $0.device == peer && $0.pair == p.pair }!
                plan.streams.append(Stream(rx: i, tx: tx))
            }
            return plan
        }
    }
}

/// A port's counters as its lcore last published them (once per housekeeping tick), for the
/// stats lines another lcore prints. Relaxed atomics: nothing on the data path touches them.
final class PublishedCounters: @unchecked Sendable {
    private let rxPackets = Atomic<UInt64>(0), rxBytes = Atomic<UInt64>(0)
    private let txPackets = Atomic<UInt64>(0), txBytes = Atomic<UInt64>(0)
    private let txDrops = Atomic<UInt64>(0), rxErrors = Atomic<UInt64>(0)
    private let txErrors = Atomic<UInt64>(0), rxNoMbuf = Atomic<UInt64>(0)

    func publish(_ c: NetCounters) {
        rxPackets.store(c.rxPackets, ordering: .relaxed); rxBytes.store(c.rxBytes, ordering: .relaxed)
        txPackets.store(c.txPackets, ordering: .relaxed); txBytes.store(c.txBytes, ordering: .relaxed)
        txDrops.store(c.txDrops, ordering: .relaxed); rxErrors.store(c.rxErrors, ordering: .relaxed)
        txErrors.store(c.txErrors, ordering: .relaxed); rxNoMbuf.store(c.rxNoMbuf, ordering: .relaxed)
    }

    var counters: NetCounters {
        var c = NetCounters()
        c.rxPackets = rxPackets.load(ordering: .relaxed); c.rxBytes = rxBytes.load(ordering: .relaxed)
        c.txPackets = txPackets.load(ordering: .relaxed); c.txBytes = txBytes.load(ordering: .relaxed)
        c.txDrops = txDrops.load(ordering: .relaxed); c.rxErrors = rxErrors.load(ordering: .relaxed)
        c.txErrors = txErrors.load(ordering: .relaxed); c.rxNoMbuf = rxNoMbuf.load(ordering: .relaxed)
        return c
    }
}

/// What the lcores of one run share: the stop flag and the first failure. Touched once per tick.
final class RunControl: @unchecked Sendable {
    let stop = Atomic<Bool>(false)
    private let firstFailure = Mutex<(String, Int32)?>(nil)
    func fail(_ reason: String, exitCode: Int32 = 2) {
        firstFailure.withLock { if $0 == nil { $0 = (reason, exitCode) } }
        stop.store(true, ordering: .relaxed)
    }
    var failure: String? { firstFailure.withLock { $0?.0 } }
    var exitCode: Int32 { firstFailure.withLock { $0?.1 } ?? 2 }
    var shouldStop: Bool { stop.load(ordering: .relaxed) || stopRequested.load(ordering: .relaxed) }
}

/// The ports one lcore owns, in one raw buffer (no class boxes, no copy-on-write): the lcore
/// polls them through `UnsafeMutablePointer`s, so a stream whose RX and TX are the same port is
/// two plain accesses, not overlapping `inout`s.
struct LcorePorts<Ring: Virtqueue & ~Copyable>: ~Copyable {
    let base: UnsafeMutablePointer<VirtioNetPort<Ring>>
    let count: Int
    let published: [PublishedCounters]

    init(_ devices: [VirtioNetDevice<Ring>], plan: LcorePlan) throws {
        base = .allocate(capacity: plan.pairs.count)
        var made = 0
        do {
            for (device, pair) in plan.pairs {
                (base + made).initialize(to: try devices[device].makePort(pair))
                made += 1
            }
        } catch {
            base.deinitialize(count: made); base.deallocate()
            throw error
        }
        count = made
        published = (0..<made).map { _ in PublishedCounters() }
    }

    /// Closes every port (the device stops first) and frees the buffer.
    consuming func close() {
        for i in 0..<count { _ = (base + i).move().close() }
        base.deallocate()
    }

    func publish() { for i in 0..<count { published[i].publish(base[i].counters) } }

    /// Each port's link check (`maintainLink`: with --reconnect a lost port hands its mbufs back
    /// and waits); returns the first port lost for good: (port, queue pair, reason, exit status).
    func linkFailure() -> (port: Int, queue: Int, reason: String, exitCode: Int32)? {
        var failed: (Int, Int, String, Int32)?
        for i in 0..<count {
            if case let .failed(why, code) = base[i].maintainLink(), failed == nil { failed = (Int(base[i].portID), base[i].queuePair, why, code) }
        }
        return failed
    }
}

// MARK: Per-burst work (no allocation, no locks, no syscalls)

/// One turn of an lcore over its streams with a forwarding engine; returns the packets it
/// forwarded (received, or sent for txonly). Not inlined, so its code can be checked for ARC and
/// allocation calls (Bench/check-hot-path.sh).
@inline(never)
func step<R: Virtqueue & ~Copyable>(_ ports: UnsafeMutablePointer<VirtioNetPort<R>>, _ streams: UnsafePointer<Stream>, _ streamCount: Int,
                                    _ mode: FwdMode, _ bufs: UnsafeMutablePointer<Mbuf>, _ burst: Int,
                                    _ templates: UnsafePointer<UnsafeRawBufferPointer>) -> Int {
    var total = 0
    for s in 0..<streamCount {
        let st = streams[s]
        let rx = ports + st.rx, tx = ports + st.tx
        switch mode {
        case .io: total &+= forwardBurst(rx, tx, bufs, burst, macswap: false)
        case .macswap: total &+= forwardBurst(rx, tx, bufs, burst, macswap: true)
        case .rxonly: total &+= drain(rx, bufs, burst)
        case .txonly:
            _ = drain(rx, bufs, burst)
            total &+= sendGenerated(tx, bufs, burst, templates[st.tx])
        }
    }
    return total
}

@inline(__always)
func swapMACs(_ bufs: UnsafeMutablePointer<Mbuf>, _ n: Int) {
    for i in 0..<n {
        let p = bufs[i].data
        let dst = p.loadUnaligned(as: UInt32.self), dst2 = p.loadUnaligned(fromByteOffset: 4, as: UInt16.self)
        let src = p.loadUnaligned(fromByteOffset: 6, as: UInt32.self), src2 = p.loadUnaligned(fromByteOffset: 10, as: UInt16.self)
        p.storeBytes(of: src, as: UInt32.self); p.storeBytes(of: src2, toByteOffset: 4, as: UInt16.self)
        p.storeBytes(of: dst, toByteOffset: 6, as: UInt32.self); p.storeBytes(of: dst2, toByteOffset: 10, as: UInt16.self)
    }
}

/// Sends `bufs[0..<n]` on `port`; frees and counts as drops what the ring cannot take.
@inline(__always)
func sendOrDrop<R: Virtqueue & ~Copyable>(_ port: UnsafeMutablePointer<VirtioNetPort<R>>, _ bufs: UnsafeMutablePointer<Mbuf>, _ n: Int) {
    let sent = port.pointee.txBurst(bufs, count: n)
    if sent < n {
        freeBulk(bufs + sent, count: n - sent)
        port.pointee.counters.txDrops &+= UInt64(n - sent)
    }
}

/// Receives a burst on `rx` and sends it out of `tx` (the same port for one-port io/macswap).
@inline(__always)
func forwardBurst<R: Virtqueue & ~Copyable>(_ rx: UnsafeMutablePointer<VirtioNetPort<R>>, _ tx: UnsafeMutablePointer<VirtioNetPort<R>>,
                                            _ bufs: UnsafeMutablePointer<Mbuf>, _ burst: Int, macswap: Bool) -> Int {
    let n = rx.pointee.rxBurst(bufs, max: burst)
    guard n > 0 else { return 0 }
    if macswap { swapMACs(bufs, n) }
    sendOrDrop(tx, bufs, n)
    return n
}

/// Receives and frees (rxonly; and txonly, so echoed traffic is counted and never backs up).
@inline(__always)
func drain<R: Virtqueue & ~Copyable>(_ port: UnsafeMutablePointer<VirtioNetPort<R>>, _ bufs: UnsafeMutablePointer<Mbuf>, _ burst: Int) -> Int {
    let n = port.pointee.rxBurst(bufs, max: burst)
    if n > 0 { freeBulk(bufs, count: n) }
    return n
}

/// Allocates a burst, writes the template's headers into each mbuf and sends it.
@inline(__always)
func sendGenerated<R: Virtqueue & ~Copyable>(_ port: UnsafeMutablePointer<VirtioNetPort<R>>, _ bufs: UnsafeMutablePointer<Mbuf>, _ burst: Int,
                                             _ template: UnsafeRawBufferPointer) -> Int {
    guard port.pointee.pool.allocate(bufs, count: burst) else { return 0 }
    Generator.writeHeaders(bufs, count: burst, template: template)
    let sent = port.pointee.txBurst(bufs, count: burst)
    if sent < burst { freeBulk(bufs + sent, count: burst - sent); port.pointee.counters.txDrops &+= UInt64(burst - sent) }
    return sent
}

/// Reads what every lcore published, per (port, queue pair): index `port · pairs + pair`.
struct StatsReporter<Ring: Virtqueue & ~Copyable> {
    let slots: [(index: Int, counters: PublishedCounters)]
    let size: Int

    init(lanes: UnsafeMutablePointer<LcorePorts<Ring>>, count: Int, plans: [LcorePlan], devices: Int, pairs: Int) {
        var s: [(Int, PublishedCounters)] = []
        for l in 0..<count {
            for (i, p) in plans[l].pairs.enumerated() { s.append((p.device * pairs + p.pair, lanes[l].published[i])) }
        }
        slots = s
        size = devices * pairs
    }

    func snapshot() -> [NetCounters] {
        var out = [NetCounters](repeating: NetCounters(), count: size)
        for s in slots { out[s.index] = s.counters.counters }
        return out
    }
}

extension NetCounters {
    static func sum<C: Collection>(_ all: C) -> NetCounters where C.Element == NetCounters {
        var t = NetCounters()
        for c in all {
            t.rxPackets &+= c.rxPackets; t.rxBytes &+= c.rxBytes; t.txPackets &+= c.txPackets; t.txBytes &+= c.txBytes
            t.txDrops &+= c.txDrops; t.rxErrors &+= c.rxErrors; t.txErrors &+= c.txErrors; t.rxNoMbuf &+= c.rxNoMbuf
        }
        return t
    }
}

extension PortReport {
    /// A port's totals over its queue pairs (the first one's path, features, ring and error).
    static func sum(_ queues: [PortReport]) -> PortReport {
        var r = queues[0]
        for q in queues.dropFirst() {
            r.rxPackets += q.rxPackets; r.rxBytes += q.rxBytes; r.txPackets += q.txPackets; r.txBytes += q.txBytes
            r.txDrops += q.txDrops; r.rxErrors += q.rxErrors; r.txErrors += q.txErrors; r.rxNoMbuf += q.rxNoMbuf
            if r.linkError == nil { r.linkError = q.linkError }
            if let d = q.txLinkDown { r.txLinkDown = (r.txLinkDown ?? 0) + d }
            if let l = q.txLostAtOutages { r.txLostAtOutages = (r.txLostAtOutages ?? 0) + l }
        }
        r.queue = queues.count == 1 ? r.queue : -1
        return r
    }
}
