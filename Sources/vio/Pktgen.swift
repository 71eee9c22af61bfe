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
    var mbufCapacity: Int
    var mbufsInUseAfterStop: Int = 0
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

    func validate() throws {
        try dataplane.validate(portCount: 1...1)
        if count == nil && duration == nil { throw ValidationError("give --count or --duration") }
        if rxOnly && count != nil && duration == nil { throw ValidationError("--rx-only takes --duration") }
        if let n = restartEvery, n < 1 || rxOnly { throw ValidationError("--restart-every takes a frame count ≥ 1, and not with --rx-only") }
        if let w = window, w != "auto", Int(w) == nil || Int(w)! < 1 { throw ValidationError("--window takes a number ≥ 1 or 'auto'") }
        guard (1...60000).contains(flows) else { throw ValidationError("--flows must be 1...60000") }
    }

    func run() throws { try reportingFailures { try generate() } }

    func generate() throws {
        installStopHandler()
        let dp = try Dataplane(dataplane)
        let (transports, layout) = try dp.connect(dataplane)
        try Run(pktgen: self, dp: dp, transport: transports[0]).run(layout: layout)
    }

    struct Run: LayoutGeneric {
        let pktgen: Pktgen, dp: Dataplane, transport: any VirtioTransport
        func run<Ring: Virtqueue & ~Copyable>(_: Ring.Type) throws { try pktgen.generate(dp, transport, as: Ring.self) }
    }

    func generate<R: Virtqueue & ~Copyable>(_ dp: Dataplane, _ transport: any VirtioTransport, as _: R.Type) throws {
        let o = dataplane
        var port = try dp.openPort(transport, o.ports[0], id: 0, o, as: R.self)
        let g = Generator(pool: dp.pool, mac: port.mac, size: size, flows: flows, verify: verify,
                          segmentRoom: dp.pool.dataRoom - Int(Mbuf.headroom))
        let burst = o.burst
        let bufs = UnsafeMutablePointer<Mbuf>.allocate(capacity: burst)
        defer { bufs.deallocate() }
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
        // seq + 1 of the last frame seen in each slot: a repeat within 65 536 numbers is a duplicate.
        var seen = [UInt64](repeating: 0, count: 1 << 16)
        var highest: UInt64 = 0
        let mac = port.mac.array
        let expectedDst = expectMacswap ? mac : Frames.peerMAC
        let expectedSrc = expectMacswap ? Frames.peerMAC : mac
        var sending = !rxOnly
        var sendStopped = start
        var lastRx = start
        var before = port.counters
        var failure: String?
        var nextRestart = restartEvery ?? .max

        while true {
            var now = TSC.now()
            if r.sent >= nextRestart && (r.received >= r.sent || Double(now &- lastRx) / hz > drainTimeout) {
                // Everything sent is back: stop both queues and start them from where the device stopped.
                do { try port.restart() } catch { failure = "port 0 (\(o.ports[0])): restart: \(error)"; break }
                r.restarts += 1
                r.restartSeconds += Double(TSC.now() &- now) / hz
                nextRestart = r.sent + restartEvery!
            }
            if sending && (r.sent >= total || now >= sendEnd || stopRequested.load(ordering: .relaxed)) {
                sending = false; sendStopped = now
            }
            if rxOnly && (now >= sendEnd || stopRequested.load(ordering: .relaxed)) { break }
            if sending {
                var room = min(UInt64(burst), total - r.sent, nextRestart - min(nextRestart, r.sent))
                if let w = limit { room = min(room, w > r.sent - r.received ? w - (r.sent - r.received) : 0) }
                if let cpp = cyclesPerPacket {
                    let due = Double(now) - nextSend
                    room = due < 0 ? 0 : min(room, UInt64(due / cpp) + 1)
                }
                if room > 0 {
                    let n = g.build(bufs, count: Int(room), firstSeq: r.sent, tsc: now)
                    let sent = port.txBurst(bufs, count: n)
                    for i in 0..<sent { r.bytesSent &+= UInt64(bufs[i].packetLength) }
                    if sent < n { freeBulk(bufs + sent, count: n - sent) }  // not sent: same numbers go next time
                    r.sent &+= UInt64(sent)
                    if let cpp = cyclesPerPacket {
                        nextSend += Double(sent) * cpp
                        if Double(now) - nextSend > hz / 100 { nextSend = Double(now) }  // never catch up more than 10 ms
                    }
                }
            }
            let got = port.rxBurst(bufs, max: burst)
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
                    let seq = p.loadUnaligned(fromByteOffset: Frames.seqOffset, as: UInt64.self)
                    guard seq < r.sent else { r.foreign &+= 1; continue }
                    let slot = Int(seq & 0xffff)
                    if seen[slot] == seq &+ 1 { r.duplicates &+= 1; continue }
                    seen[slot] = seq &+ 1
                    r.received &+= 1
                    if seq < highest { r.reordered &+= 1 } else { highest = seq }
                    let sentAt = p.loadUnaligned(fromByteOffset: Frames.tscOffset, as: UInt64.self)
                    if sentAt <= now { _ = latency.record(UInt64(Double(now &- sentAt) * nsPerCycle)) }
                    if length != size.size(seq) || (verify && !g.verify(m, seq: seq, length: length)) { r.corrupt &+= 1 }
                    if !p.bytesEqual(expectedDst, at: 0) || !p.bytesEqual(expectedSrc, at: 6) { r.macMismatch &+= 1 }
                }
                freeBulk(bufs, count: got)
            }
            if !sending && !rxOnly {
                if r.received >= r.sent { break }
                let quiet = Double(now &- max(lastRx, sendStopped)) / hz
                if quiet > drainTimeout || stopRequested.load(ordering: .relaxed) && quiet > 0.1 { break }
            }
            guard let tick = clock.tick() else { continue }
            if !port.isLinkUp { failure = "port 0 (\(o.ports[0])): \(port.linkError ?? "link down")"; break }
            if tick.stats {
                let c = port.counters
                print(RateLine.format(port: 0, now: c, before: before, seconds: tick.seconds)
                      + " | sent \(r.sent) received \(r.received)"
                      + (latency.totalCount > 0 ? String(format: " | latency p50 %.1f µs p99 %.1f µs",
                                                         Double(latency.valueAtPercentile(50)) / 1000, Double(latency.valueAtPercentile(99)) / 1000) : ""))
                before = c
            }
        }
        let end = TSC.now()
        r.seconds = Double(end - start) / hz
        let sendSeconds = Double((rxOnly ? end : sendStopped) - start) / hz
        r.txMpps = sendSeconds > 0 ? Double(r.sent) / sendSeconds / 1e6 : 0
        r.rxMpps = r.seconds > 0 ? Double(port.counters.rxPackets) / r.seconds / 1e6 : 0
        r.lost = rxOnly ? 0 : r.sent - min(r.sent, r.received)
        if latency.totalCount > 0 {
            r.latency = LatencyReport(samples: latency.totalCount, minNs: latency.min, p50Ns: latency.valueAtPercentile(50),
                                      p99Ns: latency.valueAtPercentile(99), p999Ns: latency.valueAtPercentile(99.9),
                                      maxNs: latency.max, meanNs: latency.mean)
        }
        r.port = PortReport(port, path: o.ports[0].path)
        if rxOnly { r.received = port.counters.rxPackets }
        _ = port.close()
        r.mbufsInUseAfterStop = dp.pool.inUseCount
        r.error = failure
        print("sent \(r.sent) received \(r.received) lost \(r.lost) reordered \(r.reordered) duplicates \(r.duplicates) "
              + "corrupt \(r.corrupt) mac-mismatch \(r.macMismatch) foreign \(r.foreign) max-segments \(r.maxSegments) "
              + (restartEvery != nil ? String(format: "restarts %d (%.3f s) ", r.restarts, r.restartSeconds) : "")
              + String(format: "in %.2f s (tx %.3f Mpps, rx %.3f Mpps); mbufs in use after stop: %d", r.seconds, r.txMpps, r.rxMpps, r.mbufsInUseAfterStop))
        if let l = r.latency {
            print(String(format: "latency: p50 %.2f µs, p99 %.2f µs, p99.9 %.2f µs, max %.2f µs (%llu samples)",
                         Double(l.p50Ns) / 1000, Double(l.p99Ns) / 1000, Double(l.p999Ns) / 1000, Double(l.maxNs) / 1000, l.samples))
        }
        try writeJSON(r, to: o.json)
        EAL.cleanup()
        if let failure { throw VioFailure(description: failure, exitCode: 2) }
    }
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

    /// Fills `out[0..<count]` with frames `firstSeq…`; returns how many (fewer if the pool ran dry).
    @inline(__always)
    func build(_ out: UnsafeMutablePointer<Mbuf>, count: Int, firstSeq: UInt64, tsc: UInt64) -> Int {
        var n = 0
        while n < count {
            let seq = firstSeq &+ UInt64(n)
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
