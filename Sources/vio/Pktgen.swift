import VhostUser
import VirtioCore
import ArgumentParser
import DPDK
import Foundation
import Histogram
import VirtioNet

/// Frame sizes for pktgen.
enum SizeSpec: ExpressibleByArgument, CustomStringConvertible {
    case fixed(Int)
    /// 60...1514, a different size for every sequence number (deterministic).
    case mixed
    /// 64/594/1518 in 7:4:1.
    case imix

    init?(argument: String) {
        switch argument {
        case "mixed": self = .mixed
        case "imix": self = .imix
        default:
            guard let n = Int(argument), (Frames.minSize...Frames.maxSize).contains(n) else { return nil }
            self = .fixed(n)
        }
    }
    @inline(__always) func size(_ seq: UInt64) -> Int {
        switch self { case .fixed(let n): n; case .mixed: Frames.mixedSize(seq); case .imix: Frames.imixSize(seq) }
    }
    var largest: Int { switch self { case .fixed(let n): n; case .mixed: 1514; case .imix: 1518 } }
    var average: Double { switch self { case .fixed(let n): Double(n); case .mixed: 787; case .imix: (7 * 64 + 4 * 594 + 1518) / 12 } }
    var description: String { switch self { case .fixed(let n): "\(n)"; case .mixed: "mixed"; case .imix: "imix" } }
}

struct LatencyReport: Codable {
    var samples: UInt64
    var minNs: UInt64, p50Ns: UInt64, p99Ns: UInt64, p999Ns: UInt64, maxNs: UInt64
    var meanNs: Double
}

struct PktgenReport: Codable {
    var mode: String
    var size: String
    var flows: Int
    var rate: String?
    var sent: UInt64 = 0
    var received: UInt64 = 0
    var lost: UInt64 = 0
    var reordered: UInt64 = 0
    var duplicates: UInt64 = 0
    var corrupt: UInt64 = 0
    var macMismatch: UInt64 = 0
    var foreign: UInt64 = 0
    var bytesSent: UInt64 = 0
    var bytesReceived: UInt64 = 0
    var maxSegments: Int = 0
    var restarts: Int = 0
    /// Time spent stopping and restarting the port (all restarts).
    var restartSeconds: Double = 0
    var seconds: Double = 0
    var txMpps: Double = 0
    var rxMpps: Double = 0
    var latency: LatencyReport?
    var memory: String
    var port: PortReport?
    /// Per queue pair and per flow, with more than one queue.
    var queues: [PortReport]?
    var perFlow: [FlowReport]?
    /// With --pairs-schedule: what each queue carried in each phase.
    var pairsPhases: [PairsPhase]?
    var mbufCapacity: Int
    var mbufsInUseAfterStop: Int = 0
    /// With --reconnect: every loss of the device; frames in flight at a loss (lost with it);
    /// frames lost while the link was up (`lost` minus those); TX attempts while it was down.
    var outages: [DeviceOutage]?
    var lostInOutages: UInt64?
    var lostWhileUp: UInt64?
    var txLinkDown: UInt64?
    var error: String?
}

/// `vio pktgen`: pktgen-style traffic on one virtio-net port. Sends numbered, time-stamped UDP
/// frames at full speed or a given rate and, at the same time, receives: counts, loss (sequence
/// numbers), reordering, duplicates, latency (TSC stamp → HdrHistogram), and with `--verify`
/// the whole payload of every frame.
struct Pktgen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate UDP traffic on a virtio-net port and measure what comes back.")

    @OptionGroup var dataplane: DataplaneOptions
    @Option(help: "Frame size: 60...9018, 'imix' (64/594/1518, 7:4:1) or 'mixed' (60...1514, varying).")
    var size: SizeSpec = .fixed(64)
    @Option(help: "Transmit rate: e.g. 5Mpps, 500kpps, 40% (of 10 Gbit/s). Default: as fast as possible.")
    var rate: RateSpec?
    @Option(help: "Flows (UDP source ports 1024…1024+N-1).")
    var flows = 1
    @Option(help: "Frames to send.")
    var count: UInt64?
    @Option(help: "Seconds to send for.")
    var duration: Double?
    @Option(help: "Most frames in flight (sent, not back yet): a number, or 'auto' (half the RX ring). Default: no limit.")
    var window: String?
    @Flag(help: "Fill every payload with a pattern and check every byte that comes back.")
    var verify = false
    @Flag(help: "Expect the peer to swap MAC addresses (testpmd macswap).")
    var expectMacswap = false
    @Flag(help: "Do not send; count what the peer sends (e.g. testpmd txonly).")
    var rxOnly = false
    @Option(help: "After sending, wait this long for frames still out.")
    var drainTimeout = 1.0
    @Option(help: "Stop and restart the port (testpmd's port stop/start) each time this many more frames are sent and back.")
    var restartEvery: UInt64?
    @Option(help: "Change the active queue pairs (VQ_PAIRS_SET) during the run: AT:PAIRS,… where AT is frames sent (everything sent is back first), or seconds with --rx-only.")
    var pairsSchedule: PairsSchedule?

    func validate() throws {
        try dataplane.validate(portCount: 1...1)
        if count == nil && duration == nil { throw ValidationError("give --count or --duration") }
        if rxOnly && count != nil && duration == nil { throw ValidationError("--rx-only takes --duration") }
        if let n = restartEvery, n < 1 || rxOnly { throw ValidationError("--restart-every takes a frame count ≥ 1, and not with --rx-only") }
        if restartEvery != nil && dataplane.queues > 1 { throw ValidationError("--restart-every restarts a one-queue port; not with --queues") }
        if let s = pairsSchedule, s.steps.contains(where: { $0.pairs > dataplane.queues }) {
            throw ValidationError("--pairs-schedule names more pairs than --queues \(dataplane.queues)")
        }
        if dataplane.lcores.map({ $0.cpus.count > 1 }) == true { throw ValidationError("pktgen runs on one lcore (give one CPU to --lcores)") }
        if let w = window, w != "auto", Int(w) == nil || Int(w)! < 1 { throw ValidationError("--window takes a number ≥ 1 or 'auto'") }
        guard (1...60000).contains(flows) else { throw ValidationError("--flows must be 1...60000") }
    }

    func run() throws { try reportingFailures { try generate() } }

    func generate() throws {
        installStopHandler()
        let dp = try Dataplane(dataplane)
        try dp.open(dataplane, Run(pktgen: self, dp: dp))
    }

    struct Run: VirtioNetDeviceBody {
        let pktgen: Pktgen, dp: Dataplane
        func run<Ring: Virtqueue & ~Copyable>(_ devices: [VirtioNetDevice<Ring>]) throws { try pktgen.generate(dp, devices[0]) }
    }

    /// The pktgen engine over every queue pair of the port, on one lcore: flow f goes out on TX
    /// queue f mod N (and, through a peer that answers on the queue it received on, comes back on
    /// that queue); every RX queue is received. A frame carries its key, flowSeq · flows + f, so
    /// loss, duplicates and reordering are counted per flow.
    func generate<R: Virtqueue & ~Copyable>(_ dp: Dataplane, _ device: VirtioNetDevice<R>) throws {
        let o = dataplane
        let nq = o.queues
        var plan = LcorePlan()
        for q in 0..<nq { plan.pairs.append((0, q)); plan.streams.append(Stream(rx: q, tx: q)) }
        let lane: LcorePorts<R>
        do { lane = try LcorePorts([device], plan: plan) } catch { throw VioFailure(description: "port 0 (\(o.ports[0])): \(error)") }
        let ports = lane.base
        let flows = max(self.flows, nq)
        if flows != self.flows { print("pktgen: \(flows) flows, one or more per TX queue") }
        let g = Generator(pool: dp.pool, mac: device.mac, size: size, flows: flows, verify: verify,
                          segmentRoom: dp.pool.dataRoom - Int(Mbuf.headroom))
        let burst = o.burst
        let bufs = UnsafeMutablePointer<Mbuf>.allocate(capacity: burst)
        let keys = UnsafeMutablePointer<UInt64>.allocate(capacity: burst)
        defer { bufs.deallocate(); keys.deallocate() }
        // Per flow: frames sent (the next flowSeq), received, highest flowSeq seen.
        var flowSent = [UInt64](repeating: 0, count: flows)
        var flowReceived = [UInt64](repeating: 0, count: flows)
        var flowHighest = [UInt64](repeating: 0, count: flows)
        var flowReordered = [UInt64](repeating: 0, count: flows)
        // Each TX queue cycles over its own flows.
        let queueFlows = (0..<nq).map { q in Array(stride(from: q, to: flows, by: nq)) }
        var queueCursor = [Int](repeating: 0, count: nq)
        let buffersPerFrame = (size.largest + VirtioNetHeader.size + g.segmentRoom - 1) / g.segmentRoom
        let limit: UInt64? = window.map { $0 == "auto" ? UInt64(max(1, o.ringSize / 2 / buffersPerFrame)) : UInt64($0)! }
        let hz = Double(TSC.hz)
        let nsPerCycle = 1e9 / hz
        let start = TSC.now()
        let sendEnd = duration.map { start + UInt64($0 * hz) } ?? .max
        let total = rxOnly ? 0 : (count ?? .max)
        let cyclesPerPacket = rate.map { hz / $0.packetsPerSecond(averageFrameSize: size.average) }
        var nextSend = Double(start)
        var clock = Clock(start: start, end: .max, period: o.statsPeriod > 0 ? UInt64(o.statsPeriod * hz) : .max)
        var r = PktgenReport(mode: rxOnly ? "rx-only" : "tx+rx", size: size.description, flows: flows, rate: rate?.description,
                             memory: dp.eal.mode.rawValue, mbufCapacity: dp.pool.capacity)
        var latency = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        // key + 1 of the last frame seen in each slot: a repeat within 65 536 keys is a duplicate.
        var seen = [UInt64](repeating: 0, count: 1 << 16)
        let mac = device.mac.array
        let expectedDst = expectMacswap ? mac : Frames.peerMAC
        let expectedSrc = expectMacswap ? Frames.peerMAC : mac
        var sending = !rxOnly
        var sendStopped = start
        var lastRx = start
        var before = NetCounters.sum((0..<nq).map { ports[$0].counters })
        var failure: String?
        var failureCode: Int32 = 2
        // Frames sent and not back when the device was lost: the reset rings dropped them.
        var lostInOutages: UInt64 = 0
        var outageResets = 0
        var nextRestart = restartEvery ?? .max
        // VQ_PAIRS_SET schedule: queues at or above `active` send nothing; each phase's per-queue
        // counts start once the change has settled.
        var active = nq
        var steps = pairsSchedule?.steps ?? []
        var phases: [PairsPhase] = []
        func queueCounts() -> [QueueCounts] { (0..<nq).map { QueueCounts(tx: ports[$0].counters.txPackets, rx: ports[$0].counters.rxPackets) } }
        var phaseStart = queueCounts(), phaseSettle: UInt64 = 0, phaseSeconds = Double(start)
        let settleCycles = UInt64(hz * 0.05)
        func closePhase(_ now: UInt64) {
            let end = queueCounts()
            phases.append(PairsPhase(pairs: active, seconds: (Double(now) - phaseSeconds) / hz,
                                     queues: (0..<nq).map { QueueCounts(tx: end[$0].tx - phaseStart[$0].tx, rx: end[$0].rx - phaseStart[$0].rx) }))
        }

        while true {
            var now = TSC.now()
            if let step = steps.first, rxOnly ? Double(now &- start) / hz >= step.at
                : (r.sent >= UInt64(step.at) && (r.received &+ lostInOutages >= r.sent || Double(now &- lastRx) / hz > drainTimeout)) {
                closePhase(now)
                do { try device.setQueuePairs(step.pairs) } catch { failure = "port 0 (\(o.ports[0])): VQ_PAIRS_SET \(step.pairs): \(error)"; break }
                active = step.pairs
                steps.removeFirst()
                phaseSettle = rxOnly ? now &+ settleCycles : now
                phaseStart = queueCounts(); phaseSeconds = Double(now)
            }
            if phaseSettle != 0 && now >= phaseSettle { phaseStart = queueCounts(); phaseSeconds = Double(now); phaseSettle = 0 }
            let pauseAt = steps.first.map { rxOnly ? UInt64.max : UInt64($0.at) } ?? .max
            if r.sent >= nextRestart && (r.received &+ lostInOutages >= r.sent || Double(now &- lastRx) / hz > drainTimeout) {
                // Everything sent is back: stop both queues and start them from where the device stopped.
                do { try ports[0].restart() } catch { failure = "port 0 (\(o.ports[0])): restart: \(error)"; break }
                r.restarts += 1
                r.restartSeconds += Double(TSC.now() &- now) / hz
                nextRestart = r.sent + restartEvery!
            }
            if sending && (r.sent >= total || now >= sendEnd || stopRequested.load(ordering: .relaxed)) {
                sending = false; sendStopped = now
            }
            if rxOnly && (now >= sendEnd || stopRequested.load(ordering: .relaxed)) { break }
            for q in 0..<nq {
                if sending && q < active && !queueFlows[q].isEmpty {
                    var room = min(UInt64(burst), total - r.sent, nextRestart - min(nextRestart, r.sent), pauseAt - min(pauseAt, r.sent))
                    if let w = limit { let out = r.sent - r.received - lostInOutages; room = min(room, w > out ? w - out : 0) }
                    if let cpp = cyclesPerPacket {
                        let due = Double(now) - nextSend
                        room = due < 0 ? 0 : min(room, UInt64(due / cpp) + 1)
                    }
                    if room > 0 {
                        let fl = queueFlows[q]
                        var c = queueCursor[q]
                        for k in 0..<Int(room) {
                            let f = fl[c]
                            keys[k] = (flowSent[f] &+ UInt64(k / fl.count)) &* UInt64(flows) &+ UInt64(f)
                            c = c + 1 == fl.count ? 0 : c + 1
                        }
                        let n = g.build(bufs, count: Int(room), keys: keys, tsc: now)
                        let sent = ports[q].txBurst(bufs, count: n)
                        for i in 0..<sent { r.bytesSent &+= UInt64(bufs[i].packetLength) }
                        if sent < n { freeBulk(bufs + sent, count: n - sent) }  // not sent: same keys go next time
                        for k in 0..<sent {
                            let f = Int(keys[k] % UInt64(flows))
                            flowSent[f] = max(flowSent[f], keys[k] / UInt64(flows) + 1)
                        }
                        queueCursor[q] = (queueCursor[q] + sent) % fl.count
                        r.sent &+= UInt64(sent)
                        if let cpp = cyclesPerPacket {
                            nextSend += Double(sent) * cpp
                            if Double(now) - nextSend > hz / 100 { nextSend = Double(now) }  // never catch up more than 10 ms
                        }
                    }
                }
                let got = ports[q].rxBurst(bufs, max: burst)
                if got > 0 {
                    now = TSC.now()
                    lastRx = now
                    for i in 0..<got {
                        let m = bufs[i]
                        let length = Int(m.packetLength)
                        r.bytesReceived &+= UInt64(length)
                        r.maxSegments = max(r.maxSegments, Int(m.segmentCount))
                        let p = UnsafeRawPointer(m.data)
                        guard m.dataLength >= UInt16(Frames.minSize),
                              UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 36, as: UInt16.self)) == Frames.probePort else {
                            r.foreign &+= 1; continue
                        }
                        let key = p.loadUnaligned(fromByteOffset: Frames.seqOffset, as: UInt64.self)
                        let f = Int(key % UInt64(flows)), flowSeq = key / UInt64(flows)
                        guard flowSeq < flowSent[f] else { r.foreign &+= 1; continue }
                        let slot = Int(key & 0xffff)
                        if seen[slot] == key &+ 1 { r.duplicates &+= 1; continue }
                        seen[slot] = key &+ 1
                        r.received &+= 1
                        flowReceived[f] &+= 1
                        if flowSeq < flowHighest[f] { r.reordered &+= 1; flowReordered[f] &+= 1 } else { flowHighest[f] = flowSeq }
                        let sentAt = p.loadUnaligned(fromByteOffset: Frames.tscOffset, as: UInt64.self)
                        if sentAt <= now { _ = latency.record(UInt64(Double(now &- sentAt) * nsPerCycle)) }
                        if length != size.size(key) || (verify && !g.verify(m, seq: key, length: length)) { r.corrupt &+= 1 }
                        if !p.bytesEqual(expectedDst, at: 0) || !p.bytesEqual(expectedSrc, at: 6) { r.macMismatch &+= 1 }
                    }
                    freeBulk(bufs, count: got)
                }
            }
            if !sending && !rxOnly {
                if r.received &+ lostInOutages >= r.sent { break }
                let quiet = Double(now &- max(lastRx, sendStopped)) / hz
                if quiet > drainTimeout || stopRequested.load(ordering: .relaxed) && quiet > 0.1 { break }
            }
            guard let tick = clock.tick() else { continue }
            if let f = lane.linkFailure() {
                failure = "port 0 (\(o.ports[0]))\(nq > 1 ? " queue \(f.queue)" : ""): \(f.reason)"; failureCode = f.exitCode; break
            }
            let resets = (0..<nq).reduce(0) { $0 + ports[$1].outageResets }
            if resets != outageResets {
                // Every queue reset its rings just now: nothing sent before can come back.
                outageResets = resets
                lostInOutages = r.sent - min(r.sent, r.received)
                print("pktgen: link down (\(device.core.link.reason ?? "device lost")); \(lostInOutages) frames lost so far in outages; reconnecting")
            }
            if tick.stats {
                let c = NetCounters.sum((0..<nq).map { ports[$0].counters })
                print(RateLine.format(port: 0, now: c, before: before, seconds: tick.seconds)
                      + " | sent \(r.sent) received \(r.received)" + linkState(device.core)
                      + (latency.totalCount > 0 ? String(format: " | latency p50 %.1f µs p99 %.1f µs",
                                                         Double(latency.valueAtPercentile(50)) / 1000, Double(latency.valueAtPercentile(99)) / 1000) : ""))
                before = c
            }
        }
        let end = TSC.now()
        if pairsSchedule != nil { closePhase(end); r.pairsPhases = phases }
        r.seconds = Double(end - start) / hz
        let sendSeconds = Double((rxOnly ? end : sendStopped) - start) / hz
        let queueReports = (0..<nq).map { PortReport(ports[$0], path: o.ports[0].path) }
        let portReport = PortReport.sum(queueReports)
        r.txMpps = sendSeconds > 0 ? Double(r.sent) / sendSeconds / 1e6 : 0
        r.rxMpps = r.seconds > 0 ? Double(portReport.rxPackets) / r.seconds / 1e6 : 0
        r.lost = rxOnly ? 0 : r.sent - min(r.sent, r.received)
        if latency.totalCount > 0 {
            r.latency = LatencyReport(samples: latency.totalCount, minNs: latency.min, p50Ns: latency.valueAtPercentile(50),
                                      p99Ns: latency.valueAtPercentile(99), p999Ns: latency.valueAtPercentile(99.9),
                                      maxNs: latency.max, meanNs: latency.mean)
        }
        r.port = portReport
        if nq > 1 {
            r.queues = queueReports
            r.perFlow = (0..<flows).map { f in
                FlowReport(flow: f, queue: f % nq, sent: flowSent[f], received: flowReceived[f],
                           lost: flowSent[f] - min(flowSent[f], flowReceived[f]), reordered: flowReordered[f])
            }
        }
        if rxOnly { r.received = portReport.rxPackets }
        if device.core.reconnectPolicy != nil {
            r.outages = device.core.outages
            r.lostInOutages = lostInOutages
            r.lostWhileUp = r.lost - min(r.lost, lostInOutages)
            r.txLinkDown = portReport.txLinkDown ?? 0
        }
        lane.close()
        r.mbufsInUseAfterStop = dp.pool.inUseCount
        // A final stop the backend did not confirm (GET_VRING_BASE) fails the run too.
        if failure == nil, let s = device.core.stopFailure { failure = "port 0 (\(o.ports[0])): stopping the device: \(s)" }
        r.error = failure
        print("sent \(r.sent) received \(r.received) lost \(r.lost) reordered \(r.reordered) duplicates \(r.duplicates) "
              + "corrupt \(r.corrupt) mac-mismatch \(r.macMismatch) foreign \(r.foreign) max-segments \(r.maxSegments) "
              + (restartEvery != nil ? String(format: "restarts %d (%.3f s) ", r.restarts, r.restartSeconds) : "")
              + String(format: "in %.2f s (tx %.3f Mpps, rx %.3f Mpps); mbufs in use after stop: %d", r.seconds, r.txMpps, r.rxMpps, r.mbufsInUseAfterStop))
        if let outages = r.outages {
            // Frames not taken while the link was down are sent once it is back: only those in
            // flight at a loss are lost with it.
            print(String(format: "outages %d (%.2f s down): lost in outages %llu, lost while up %llu",
                         outages.count, outages.reduce(0) { $0 + $1.seconds }, lostInOutages, r.lostWhileUp ?? 0))
        }
        if nq > 1 {
            for q in queueReports { print("queue \(q.queue): tx \(q.txPackets) rx \(q.rxPackets)") }
        }
        if let l = r.latency {
            print(String(format: "latency: p50 %.2f µs, p99 %.2f µs, p99.9 %.2f µs, max %.2f µs (%llu samples)",
                         Double(l.p50Ns) / 1000, Double(l.p99Ns) / 1000, Double(l.p999Ns) / 1000, Double(l.maxNs) / 1000, l.samples))
        }
        try writeJSON(r, to: o.json)
        EAL.cleanup()
        if let failure { throw VioFailure(description: failure, exitCode: failureCode) }
    }
}

/// `--pairs-schedule 20000:1,40000:4`.
struct PairsSchedule: ExpressibleByArgument {
    var steps: [(at: Double, pairs: Int)]
    init?(argument: String) {
        var out: [(Double, Int)] = []
        for part in argument.split(separator: ",") {
            let kv = part.split(separator: ":")
            guard kv.count == 2, let at = Double(kv[0]), at >= 0, let n = Int(kv[1]), n >= 1 else { return nil }
            out.append((at, n))
        }
        guard !out.isEmpty, zip(out, out.dropFirst()).allSatisfy({ $0.0 < $1.0 }) else { return nil }
        steps = out
    }
}

struct QueueCounts: Codable { var tx: UInt64; var rx: UInt64 }

/// One phase of a --pairs-schedule run: the pairs active and what every queue carried.
struct PairsPhase: Codable {
    var pairs: Int
    var seconds: Double
    var queues: [QueueCounts]
}

/// Loss and order of one flow (pktgen with several queues).
struct FlowReport: Codable {
    var flow: Int
    var queue: Int
    var sent: UInt64
    var received: UInt64
    var lost: UInt64
    var reordered: UInt64
}

extension UnsafeRawPointer {
    func bytesEqual(_ b: [UInt8], at offset: Int) -> Bool {
        for i in 0..<b.count where load(fromByteOffset: offset + i, as: UInt8.self) != b[i] { return false }
        return true
    }
}

/// Builds pktgen frames into mbufs: a prebuilt frame copied in, then sequence number, timestamp,
/// flow and (with --verify) pattern and check written; chained when a frame exceeds one mbuf.
final class Generator {
    let pool: PacketPool
    let size: SizeSpec
    let flows: Int
    let verify: Bool
    let segmentRoom: Int
    let template: UnsafeMutableRawPointer
    let templateSize: Int
    let scratch: UnsafeMutableRawPointer

    init(pool: PacketPool, mac: EthernetAddress, size: SizeSpec, flows: Int, verify: Bool, segmentRoom: Int) {
        self.pool = pool; self.size = size; self.flows = flows; self.verify = verify; self.segmentRoom = segmentRoom
        templateSize = size.largest
        let t = Frames.template(src: mac, size: templateSize)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: Frames.maxSize, alignment: 64)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: Frames.maxSize)
        t.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: t.count) }
        template = buffer
        scratch = .allocate(byteCount: Frames.maxSize, alignment: 64)
    }

    deinit {
        template.deallocate()
        scratch.deallocate()
    }

    /// Writes a template's headers (its first cache line) into fresh mbufs and sets their length,
    /// leaving the payload as the mbuf has it, like testpmd's txonly: a full-frame copy per packet
    /// would measure memcpy, not the driver.
    @inline(__always)
    static func writeHeaders(_ bufs: UnsafeMutablePointer<Mbuf>, count: Int, template: UnsafeRawBufferPointer) {
        let size = template.count
        let header = Swift.min(size, 64)
        let t = template.baseAddress.unsafelyUnwrapped
        for i in 0..<count {
            let m = bufs[i]
            m.data.copyMemory(from: t, byteCount: header)
            m.dataLength = UInt16(truncatingIfNeeded: size)
            m.packetLength = UInt32(truncatingIfNeeded: size)
        }
    }

    /// Fills `out[0..<count]` with the frames of `keys[0..<count]`; returns how many (fewer if the
    /// pool ran dry).
    @inline(__always)
    func build(_ out: UnsafeMutablePointer<Mbuf>, count: Int, keys: UnsafePointer<UInt64>, tsc: UInt64) -> Int {
        var n = 0
        while n < count {
            let seq = keys[n]
            let len = size.size(seq)
            let m: Mbuf?
            if len <= segmentRoom && !verify {
                guard let single = pool.allocate() else { break }
                let d = single.data
                d.copyMemory(from: template, byteCount: len)
                if len != templateSize { Frames.setLengths(d, size: len) }
                stamp(d, seq: seq, tsc: tsc)
                single.dataLength = UInt16(len)
                single.packetLength = UInt32(len)
                m = single
            } else {
                scratch.copyMemory(from: template, byteCount: len)
                if len != templateSize { Frames.setLengths(scratch, size: len) }
                stamp(scratch, seq: seq, tsc: tsc)
                if verify {
                    Frames.fillPattern(scratch, seq: seq, size: len)
                    scratch.storeBytes(of: Frames.check(scratch + Frames.payloadOffset, count: len - Frames.payloadOffset, seq: seq, size: len),
                                       toByteOffset: Frames.checkOffset, as: UInt16.self)
                }
                m = chain(len)
            }
            guard let frame = m else { break }
            out[n] = frame
            n += 1
        }
        return n
    }

    @inline(__always)
    func stamp(_ d: UnsafeMutableRawPointer, seq: UInt64, tsc: UInt64) {
        d.storeBytes(of: seq, toByteOffset: Frames.seqOffset, as: UInt64.self)
        d.storeBytes(of: tsc, toByteOffset: Frames.tscOffset, as: UInt64.self)
        if flows > 1 { d.storeBytes(of: UInt16(1024 + Int(seq % UInt64(flows))).bigEndian, toByteOffset: 34, as: UInt16.self) }
    }

    /// Copies `len` bytes of `scratch` into a chain of mbufs.
    func chain(_ len: Int) -> Mbuf? {
        guard let head = pool.allocate() else { return nil }
        var tail = head
        var off = 0
        while true {
            let chunk = min(segmentRoom, len - off)
            tail.data.copyMemory(from: scratch + off, byteCount: chunk)
            tail.dataLength = UInt16(chunk)
            off += chunk
            if off == len { break }
            guard let next = pool.allocate() else { head.free(); return nil }
            tail.next = next
            head.segmentCount += 1
            tail = next
        }
        head.packetLength = UInt32(len)
        return head
    }

    /// Checks the whole received frame against what was sent (--verify).
    func verify(_ m: Mbuf, seq: UInt64, length: Int) -> Bool {
        guard length <= Frames.maxSize, length >= Frames.payloadOffset else { return false }
        var p = UnsafeRawPointer(m.data)
        if m.segmentCount > 1 {
            var off = 0
            var seg: Mbuf? = m
            while let s = seg {
                guard off + Int(s.dataLength) <= Frames.maxSize else { return false }
                (scratch + off).copyMemory(from: s.data, byteCount: Int(s.dataLength))
                off += Int(s.dataLength); seg = s.next
            }
            guard off == length else { return false }
            p = UnsafeRawPointer(scratch)
        }
        return p.loadUnaligned(fromByteOffset: Frames.checkOffset, as: UInt16.self)
            == Frames.check(p + Frames.payloadOffset, count: length - Frames.payloadOffset, seq: seq, size: length)
    }
}
