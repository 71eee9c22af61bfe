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
    /// Per queue pair, with more than one.
    var queues: [PortReport]?
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
        try dp.open(dataplane, FwdRun(fwd: self, dp: dp))
    }

    struct FwdRun: VirtioNetDeviceBody {
        let fwd: Fwd, dp: Dataplane
        func run<Ring: Virtqueue & ~Copyable>(_ devices: [VirtioNetDevice<Ring>]) throws { try fwd.forward(dp, devices) }
    }

    /// testpmd's shape: each lcore runs the engine over its streams; the main lcore also prints
    /// the stats lines (from counters the lcores publish once per tick) and ends the run.
    func forward<R: Virtqueue & ~Copyable>(_ dp: Dataplane, _ devices: [VirtioNetDevice<R>]) throws {
        let o = dataplane
        let lcoreCount = o.lcores?.cpus.count ?? 1
        let plans = LcorePlan.spread(devices: devices.count, pairs: o.queues, lcores: lcoreCount)
        let lanes = UnsafeMutablePointer<LcorePorts<R>>.allocate(capacity: lcoreCount)
        var made = 0
        defer { lanes.deallocate() }
        do {
            for plan in plans { (lanes + made).initialize(to: try LcorePorts(devices, plan: plan)); made += 1 }
        } catch {
            for k in 0..<made { (lanes + k).move().close() }
            throw VioFailure(description: "\(error)")
        }
        // One template per port (its own MAC as source), for txonly and --tx-first.
        let templates = devices.map { d -> UnsafeRawBufferPointer in
            let t = Frames.template(src: d.mac, size: size)
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
            t.withUnsafeBytes { b.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[..<size])) }
            return UnsafeRawBufferPointer(b)
        }
        defer { for t in templates { t.deallocate() } }
        let control = RunControl()
        let meters = UnsafeMutablePointer<CycleMeter>.allocate(capacity: lcoreCount)
        meters.initialize(repeating: CycleMeter(), count: lcoreCount)
        defer { meters.deallocate() }
        let hz = Double(TSC.hz)
        let start = TSC.now()
        let end = duration.map { start + UInt64($0 * hz) } ?? .max
        let workers = EAL.workerLcores
        for l in 1..<max(1, lcoreCount) {
            let lane = lanes + l, meter = meters + l, plan = plans[l]
            do {
                try EAL.launch(onWorker: workers[l - 1]) {
                    self.poll(lane, plan, templates, control, meter, report: nil)
                }
            } catch { control.fail("\(error)") }
        }
        // The main lcore: its own streams, the clock, stats and the stop decision.
        var before = [NetCounters](repeating: NetCounters(), count: devices.count * o.queues)
        let reporter = StatsReporter(lanes: lanes, count: lcoreCount, plans: plans, devices: devices.count, pairs: o.queues)
        poll(lanes, plans[0], templates, control, meters, report: { tick in
            let now = reporter.snapshot()
            if tick.stats {
                for p in 0..<devices.count {
                    let range = (p * o.queues)..<((p + 1) * o.queues)
                    print(RateLine.format(port: p, now: NetCounters.sum(now[range]), before: NetCounters.sum(before[range]), seconds: tick.seconds)
                          + linkState(devices[p].core))
                    if o.perQueue {
                        for q in 0..<o.queues {
                            print("  queue \(q): " + RateLine.format(port: p, now: now[p * o.queues + q], before: before[p * o.queues + q], seconds: tick.seconds))
                        }
                    }
                }
                before = now
            }
            let ended = tick.done || TSC.now() >= end
                || count.map { c in now.reduce(0) { $0 + forwarded($1) } >= c } == true
            if ended { control.stop.store(true, ordering: .relaxed) }
        })
        EAL.waitForWorkers()
        let total = TSC.now() - start
        var meter = CycleMeter()
        for l in 0..<lcoreCount { meter.busy &+= meters[l].busy; meter.packets &+= meters[l].packets }
        meter.total = total
        // Per-queue reports, then every port closed (each device stops before its mbufs go back).
        var queueReports: [PortReport] = []
        for l in 0..<lcoreCount {
            let lane = lanes + l
            for i in 0..<lane.pointee.count {
                var q = PortReport(lane.pointee.base[i], path: o.ports[Int(lane.pointee.base[i].portID)].path)
                q.lcore = l
                queueReports.append(q)
            }
        }
        for l in 0..<lcoreCount { (lanes + l).move().close() }
        queueReports.sort { ($0.port, $0.queue) < ($1.port, $1.queue) }
        let reports = (0..<devices.count).map { p in PortReport.sum(queueReports.filter { $0.port == p }) }
        // A final stop the backend did not confirm (GET_VRING_BASE) fails the run too.
        let stopFailure = devices.indices.lazy.compactMap { p in devices[p].core.stopFailure.map { "port \(p) (\(o.ports[p])): stopping the device: \($0)" } }.first
        try finish(dp, reports, queues: o.queues > 1 ? queueReports : nil, seconds: Double(total) / hz, meter: meter, failure: control.failure ?? stopFailure,
                   exitCode: control.failure != nil ? control.exitCode : 2)
    }

    /// One lcore's loop over its streams until the run stops; `report` runs on the main lcore
    /// at each housekeeping tick.
    func poll<R: Virtqueue & ~Copyable>(_ lane: UnsafeMutablePointer<LcorePorts<R>>, _ plan: LcorePlan, _ deviceTemplates: [UnsafeRawBufferPointer],
                                        _ control: RunControl, _ meter: UnsafeMutablePointer<CycleMeter>, report: ((Clock.Tick) -> Void)?) {
        let burst = dataplane.burst
        let bufs = UnsafeMutablePointer<Mbuf>.allocate(capacity: burst)
        defer { bufs.deallocate() }
        let ports = lane.pointee.base
        let streams = UnsafeMutablePointer<Stream>.allocate(capacity: max(1, plan.streams.count))
        streams.initialize(from: plan.streams, count: plan.streams.count)
        defer { streams.deallocate() }
        let templates = UnsafeMutablePointer<UnsafeRawBufferPointer>.allocate(capacity: max(1, lane.pointee.count))
        for i in 0..<lane.pointee.count { (templates + i).initialize(to: deviceTemplates[plan.pairs[i].device]) }
        defer { templates.deallocate() }
        for _ in 0..<txFirst {
            for i in 0..<lane.pointee.count { _ = sendGenerated(ports + i, bufs, burst, templates[i]) }
        }
        let hz = Double(TSC.hz)
        var clock = Clock(start: TSC.now(), end: .max,
                          period: report != nil && dataplane.statsPeriod > 0 ? UInt64(dataplane.statsPeriod * hz) : .max)
        let n = plan.streams.count
        while true {
            if recordCycles {
                let c0 = TSC.now()
                let got = step(ports, streams, n, mode, bufs, burst, templates)
                if got > 0 { meter.pointee.busy &+= TSC.now() &- c0; meter.pointee.packets &+= UInt64(got) }
            } else {
                _ = step(ports, streams, n, mode, bufs, burst, templates)
            }
            guard let tick = clock.tick() else { continue }
            lane.pointee.publish()
            if let f = lane.pointee.linkFailure() {
                control.fail("port \(f.port) (\(dataplane.ports[f.port]))\(dataplane.queues > 1 ? " queue \(f.queue)" : ""): \(f.reason)", exitCode: f.exitCode)
            }
            report?(tick)
            if control.shouldStop { break }
        }
        lane.pointee.publish()
    }

    func forwarded(_ c: NetCounters) -> UInt64 { mode == .txonly ? c.txPackets : c.rxPackets }

    func finish(_ dp: Dataplane, _ reports: [PortReport], queues: [PortReport]?, seconds: Double, meter: CycleMeter, failure: String?,
                exitCode: Int32 = 2) throws {
        let inUse = dp.pool.inUseCount
        for r in reports {
            print("port \(r.port) totals: rx \(r.rxPackets) packets \(r.rxBytes) bytes, tx \(r.txPackets) packets \(r.txBytes) bytes, "
                  + "drops \(r.txDrops), errors \(r.rxErrors + r.txErrors), rx-nombuf \(r.rxNoMbuf)")
            if let o = r.outages { print("port \(r.port) " + outageSummary(o, offeredWhileDown: r.txLinkDown ?? 0, inFlightAtLoss: r.txLostAtOutages ?? 0)) }
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
        if let queues {
            for r in queues {
                print("port \(r.port) queue \(r.queue): rx \(r.rxPackets) packets, tx \(r.txPackets) packets, drops \(r.txDrops)")
            }
        }
        let report = FwdReport(mode: mode, seconds: seconds, memory: dp.eal.mode.rawValue, ports: reports, queues: queues,
                               mbufCapacity: dp.pool.capacity, mbufsInUseAfterStop: inUse, cycles: cycles, error: failure)
        try writeJSON(report, to: dataplane.json)
        EAL.cleanup()
        if let failure { throw VioFailure(description: failure, exitCode: exitCode) }
    }
}

/// ` | link down (reconnecting)` for a stats line while a port's device is lost.
func linkState<R: Virtqueue & ~Copyable>(_ core: VirtioDevice<R>) -> String {
    if core.link.isUp { return core.reconnectPolicy != nil ? " | link up" : "" }
    return core.isReconnecting ? " | link down (reconnecting)" : " | link down"
}

/// `outages 1 (2.31 s down), tx lost while down 1234 (1200 offered while down, 34 in flight at the loss)`.
func outageSummary(_ o: [DeviceOutage], offeredWhileDown: UInt64, inFlightAtLoss: UInt64) -> String {
    let down = o.reduce(0) { $0 + $1.seconds }
    return String(format: "outages %d (%.2f s down)", o.count, down)
        + ", tx lost while down \(offeredWhileDown + inFlightAtLoss) (\(offeredWhileDown) offered while down, \(inFlightAtLoss) in flight at the loss)"
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

