import VhostUser
import VirtioCore
import ArgumentParser
import DPDK
import Foundation
import VirtioNet

enum FwdMode: String, ExpressibleByArgument, CaseIterable, Codable {
    /// Forward as received: port 0 → port 1 and back (one port: back out of the same port).
    case io
    /// As io, with source and destination MAC swapped (an echo).
    case macswap
    /// Receive and free.
    case rxonly
    /// Send generated UDP frames; also receive and count whatever comes back.
    case txonly
}

struct FwdReport: Codable {
    var mode: FwdMode
    var seconds: Double
    var memory: String
    var ports: [PortReport]
    var mbufCapacity: Int
    var mbufsInUseAfterStop: Int
    var cycles: CycleReport?
    var error: String?
}

/// TSC cycles on the forwarding core, as `dpdk-testpmd --record-core-cycles` counts them: busy
/// cycles are those of loop iterations that moved at least one packet.
struct CycleReport: Codable {
    var busyCycles: UInt64
    var totalCycles: UInt64
    var packets: UInt64
    var busyCyclesPerPacket: Double
    var totalCyclesPerPacket: Double
}

struct CycleMeter {
    var busy: UInt64 = 0
    var packets: UInt64 = 0
    var total: UInt64 = 0
}

/// `vio fwd`: testpmd-style forwarding over one or two virtio-net ports on one lcore.
struct Fwd: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Forward packets between virtio-net ports (testpmd-style io, macswap, rxonly, txonly).")

    @OptionGroup var dataplane: DataplaneOptions
    @Option(help: "Forwarding mode: io, macswap, rxonly, txonly.")
    var mode: FwdMode = .io
    @Option(help: "Stop after this many seconds (default: run until SIGINT/SIGTERM).")
    var duration: Double?
    @Option(help: "Frame size for txonly (60...2048).")
    var size = 64
    @Option(help: "Inject this many bursts of generated frames on every port before forwarding (testpmd's tx_first).")
    var txFirst = 0
    @Option(help: "Stop after this many packets forwarded (received; sent for txonly), summed over ports.")
    var count: UInt64?
    @Flag(help: "Count TSC cycles per packet on the forwarding core (testpmd's --record-core-cycles).")
    var recordCycles = false

    func validate() throws {
        try dataplane.validate(portCount: 1...2)
        guard (60...2048).contains(size) else { throw ValidationError("--size must be 60...2048 for fwd") }
        if let d = duration, d <= 0 { throw ValidationError("--duration must be positive") }
    }

    func run() throws { try reportingFailures { try forward() } }

    func forward() throws {
        installStopHandler()
        let dp = try Dataplane(dataplane)
        let (transports, layout) = try dp.connect(dataplane)
        try FwdRun(fwd: self, dp: dp, transports: transports).run(layout: layout)
    }

    func forward<R: Virtqueue & ~Copyable>(_ dp: Dataplane, _ transports: [any VirtioTransport], as _: R.Type) throws {
        let o = dataplane
        let burst = o.burst
        let bufs = UnsafeMutablePointer<Mbuf>.allocate(capacity: burst)
        defer { bufs.deallocate() }
        var p0 = try dp.openPort(transports[0], o.ports[0], id: 0, o, as: R.self)
        let t0 = Frames.template(src: p0.mac, size: size)
        let template0 = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
        defer { template0.deallocate() }
        t0.withUnsafeBytes { template0.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[..<size])) }
        let hz = Double(TSC.hz)
        var failure: String?
        var meter = CycleMeter()

        if o.ports.count == 1 {
            for _ in 0..<txFirst { _ = sendGenerated(&p0, bufs, burst, UnsafeRawBufferPointer(template0)) }
            let start = TSC.now()
            var clock = Clock(start: start, end: duration.map { start + UInt64($0 * hz) } ?? .max,
                              period: o.statsPeriod > 0 ? UInt64(o.statsPeriod * hz) : .max)
            var before = p0.counters
            while true {
                if recordCycles {
                    let c0 = TSC.now()
                    let n = step(&p0, mode, bufs, burst, UnsafeRawBufferPointer(template0))
                    if n > 0 { meter.busy &+= TSC.now() &- c0; meter.packets &+= UInt64(n) }
                } else {
                    _ = step(&p0, mode, bufs, burst, UnsafeRawBufferPointer(template0))
                }
                guard let tick = clock.tick() else { continue }
                if !p0.isLinkUp { failure = "port 0 (\(o.ports[0])): \(p0.linkError ?? "link down")"; break }
                if tick.stats {
                    print(RateLine.format(port: 0, now: p0.counters, before: before, seconds: tick.seconds))
                    before = p0.counters
                }
                if tick.done || count.map({ forwarded(p0.counters) >= $0 }) == true { break }
            }
            meter.total = TSC.now() - start
            let reports = [PortReport(p0, path: o.ports[0].path)]
            _ = p0.close()
            try finish(dp, reports, seconds: Double(meter.total) / hz, meter: meter, failure: failure)
        } else {
            var p1 = try dp.openPort(transports[1], o.ports[1], id: 1, o, as: R.self)
            let t1 = Frames.template(src: p1.mac, size: size)
            let template1 = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
            defer { template1.deallocate() }
            t1.withUnsafeBytes { template1.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[..<size])) }
            for _ in 0..<txFirst {
                _ = sendGenerated(&p0, bufs, burst, UnsafeRawBufferPointer(template0))
                _ = sendGenerated(&p1, bufs, burst, UnsafeRawBufferPointer(template1))
            }
            let start = TSC.now()
            var clock = Clock(start: start, end: duration.map { start + UInt64($0 * hz) } ?? .max,
                              period: o.statsPeriod > 0 ? UInt64(o.statsPeriod * hz) : .max)
            var before = (p0.counters, p1.counters)
            while true {
                if recordCycles {
                    let c0 = TSC.now()
                    let n = step(&p0, &p1, mode, bufs, burst, UnsafeRawBufferPointer(template0), UnsafeRawBufferPointer(template1))
                    if n > 0 { meter.busy &+= TSC.now() &- c0; meter.packets &+= UInt64(n) }
                } else {
                    _ = step(&p0, &p1, mode, bufs, burst, UnsafeRawBufferPointer(template0), UnsafeRawBufferPointer(template1))
                }
                guard let tick = clock.tick() else { continue }
                if !p0.isLinkUp { failure = "port 0 (\(o.ports[0])): \(p0.linkError ?? "link down")"; break }
                if !p1.isLinkUp { failure = "port 1 (\(o.ports[1])): \(p1.linkError ?? "link down")"; break }
                if tick.stats {
                    print(RateLine.format(port: 0, now: p0.counters, before: before.0, seconds: tick.seconds))
                    print(RateLine.format(port: 1, now: p1.counters, before: before.1, seconds: tick.seconds))
                    before = (p0.counters, p1.counters)
                }
                if tick.done || count.map({ forwarded(p0.counters) + forwarded(p1.counters) >= $0 }) == true { break }
            }
            meter.total = TSC.now() - start
            let reports = [PortReport(p0, path: o.ports[0].path), PortReport(p1, path: o.ports[1].path)]
            _ = p0.close()
            _ = p1.close()
            try finish(dp, reports, seconds: Double(meter.total) / hz, meter: meter, failure: failure)
        }
    }

    struct FwdRun: LayoutGeneric {
        let fwd: Fwd, dp: Dataplane, transports: [any VirtioTransport]
        func run<Ring: Virtqueue & ~Copyable>(_: Ring.Type) throws { try fwd.forward(dp, transports, as: Ring.self) }
    }

    func forwarded(_ c: NetCounters) -> UInt64 { mode == .txonly ? c.txPackets : c.rxPackets }

    func finish(_ dp: Dataplane, _ reports: [PortReport], seconds: Double, meter: CycleMeter, failure: String?) throws {
        let inUse = dp.pool.inUseCount
        for r in reports {
            print("port \(r.port) totals: rx \(r.rxPackets) packets \(r.rxBytes) bytes, tx \(r.txPackets) packets \(r.txBytes) bytes, "
                  + "drops \(r.txDrops), errors \(r.rxErrors + r.txErrors), rx-nombuf \(r.rxNoMbuf)")
        }
        print(String(format: "%.2f s; mbufs in use after stop: %d of %d", seconds, inUse, dp.pool.capacity))
        var cycles: CycleReport?
        if recordCycles, meter.packets > 0 {
            let forwarded = reports.reduce(UInt64(0)) { $0 + (mode == .txonly ? $1.txPackets : $1.rxPackets) }
            cycles = CycleReport(busyCycles: meter.busy, totalCycles: meter.total, packets: meter.packets,
                                 busyCyclesPerPacket: Double(meter.busy) / Double(meter.packets),
                                 totalCyclesPerPacket: forwarded > 0 ? Double(meter.total) / Double(forwarded) : 0)
            print(String(format: "CPU cycles/packet: %.1f busy (%llu busy cycles / %llu packets), %.1f overall", cycles!.busyCyclesPerPacket,
                         meter.busy, meter.packets, cycles!.totalCyclesPerPacket))
        }
        let report = FwdReport(mode: mode, seconds: seconds, memory: dp.eal.mode.rawValue, ports: reports,
                               mbufCapacity: dp.pool.capacity, mbufsInUseAfterStop: inUse, cycles: cycles, error: failure)
        try writeJSON(report, to: dataplane.json)
        EAL.cleanup()
        if let failure { throw VioFailure(description: failure, exitCode: 2) }
    }
}

/// Paces the housekeeping of a poll loop by the TSC: a tick every ~1 ms, stats every `period`.
struct Clock {
    let end: UInt64, period: UInt64
    var nextTick: UInt64, nextStats: UInt64, lastStats: UInt64
    let tickCycles: UInt64
    init(start: UInt64, end: UInt64, period: UInt64) {
        self.end = end; self.period = period
        tickCycles = TSC.hz / 1000
        nextTick = start + tickCycles
        nextStats = period == .max ? .max : start + period
        lastStats = start
    }
    struct Tick { var stats: Bool; var done: Bool; var seconds: Double }
    @inline(__always) mutating func tick() -> Tick? {
        let now = TSC.now()
        guard now >= nextTick else { return nil }
        nextTick = now + tickCycles
        var t = Tick(stats: false, done: now >= end || stopRequested.load(ordering: .relaxed), seconds: 0)
        if now >= nextStats {
            t.stats = true
            t.seconds = Double(now - lastStats) / Double(TSC.hz)
            lastStats = now
            nextStats = now + period
        }
        return t
    }
}

// MARK: Per-burst work (no allocation, no locks, no syscalls)

/// One iteration of the one-port loop; returns the packets it forwarded (received, or sent for
/// txonly). Not inlined, so its code can be checked for ARC and allocation calls.
@inline(never)
func step<R: Virtqueue & ~Copyable>(_ p: inout VirtioNetPort<R>, _ mode: FwdMode, _ bufs: UnsafeMutablePointer<Mbuf>, _ burst: Int,
          _ template: UnsafeRawBufferPointer) -> Int {
    switch mode {
    case .io: return echoBurst(&p, bufs, burst, macswap: false)
    case .macswap: return echoBurst(&p, bufs, burst, macswap: true)
    case .rxonly: return drain(&p, bufs, burst)
    case .txonly: _ = drain(&p, bufs, burst); return sendGenerated(&p, bufs, burst, template)
    }
}

/// One iteration of the two-port loop.
@inline(never)
func step<R: Virtqueue & ~Copyable>(_ p0: inout VirtioNetPort<R>, _ p1: inout VirtioNetPort<R>, _ mode: FwdMode, _ bufs: UnsafeMutablePointer<Mbuf>,
          _ burst: Int, _ template0: UnsafeRawBufferPointer, _ template1: UnsafeRawBufferPointer) -> Int {
    switch mode {
    case .io, .macswap:
        return forwardBurst(from: &p0, to: &p1, bufs, burst, macswap: mode == .macswap)
            + forwardBurst(from: &p1, to: &p0, bufs, burst, macswap: mode == .macswap)
    case .rxonly: return drain(&p0, bufs, burst) + drain(&p1, bufs, burst)
    case .txonly:
        _ = drain(&p0, bufs, burst); _ = drain(&p1, bufs, burst)
        return sendGenerated(&p0, bufs, burst, template0) + sendGenerated(&p1, bufs, burst, template1)
    }
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
func sendOrDrop<R: Virtqueue & ~Copyable>(_ port: inout VirtioNetPort<R>, _ bufs: UnsafeMutablePointer<Mbuf>, _ n: Int) {
    let sent = port.txBurst(bufs, count: n)
    if sent < n {
        freeBulk(bufs + sent, count: n - sent)
        port.counters.txDrops &+= UInt64(n - sent)
    }
}

/// One port: receive a burst and send it back out of the same port.
@inline(__always)
func echoBurst<R: Virtqueue & ~Copyable>(_ port: inout VirtioNetPort<R>, _ bufs: UnsafeMutablePointer<Mbuf>, _ burst: Int, macswap: Bool) -> Int {
    let n = port.rxBurst(bufs, max: burst)
    guard n > 0 else { return 0 }
    if macswap { swapMACs(bufs, n) }
    sendOrDrop(&port, bufs, n)
    return n
}

/// Two ports: receive a burst on `rx` and send it out of `tx`.
@inline(__always)
func forwardBurst<R: Virtqueue & ~Copyable>(from rx: inout VirtioNetPort<R>, to tx: inout VirtioNetPort<R>, _ bufs: UnsafeMutablePointer<Mbuf>, _ burst: Int, macswap: Bool) -> Int {
    let n = rx.rxBurst(bufs, max: burst)
    guard n > 0 else { return 0 }
    if macswap { swapMACs(bufs, n) }
    sendOrDrop(&tx, bufs, n)
    return n
}

/// Receives and frees (rxonly; and txonly, so echoed traffic is counted and never backs up).
@inline(__always)
func drain<R: Virtqueue & ~Copyable>(_ port: inout VirtioNetPort<R>, _ bufs: UnsafeMutablePointer<Mbuf>, _ burst: Int) -> Int {
    let n = port.rxBurst(bufs, max: burst)
    if n > 0 { freeBulk(bufs, count: n) }
    return n
}

/// Allocates a burst, writes the template's headers into each mbuf and sends it.
@inline(__always)
func sendGenerated<R: Virtqueue & ~Copyable>(_ port: inout VirtioNetPort<R>, _ bufs: UnsafeMutablePointer<Mbuf>, _ burst: Int, _ template: UnsafeRawBufferPointer) -> Int {
    guard port.pool.allocate(bufs, count: burst) else { return 0 }
    let size = template.count
    // Like testpmd's txonly, write the headers (first cache line) and leave the payload as the
    // mbuf has it: a full-frame copy per packet would measure memcpy, not the driver.
    let header = Swift.min(size, 64)
    let t = template.baseAddress.unsafelyUnwrapped
    for i in 0..<burst {
        let m = bufs[i]
        m.data.copyMemory(from: t, byteCount: header)
        m.dataLength = UInt16(truncatingIfNeeded: size)
        m.packetLength = UInt32(truncatingIfNeeded: size)
    }
    let sent = port.txBurst(bufs, count: burst)
    if sent < burst { freeBulk(bufs + sent, count: burst - sent); port.counters.txDrops &+= UInt64(burst - sent) }
    return sent
}
