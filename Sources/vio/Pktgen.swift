import ArgumentParser
import DPDK
import Foundation
import VirtioNet

/// Frame sizes for pktgen.
enum SizeSpec: ExpressibleByArgument, CustomStringConvertible {
    case fixed(Int)
    /// 60...1514, a different size for every sequence number (deterministic).
    case mixed
    init?(argument: String) {
        if argument == "mixed" { self = .mixed; return }
        guard let n = Int(argument), (Frames.minSize...Frames.maxSize).contains(n) else { return nil }
        self = .fixed(n)
    }
    func size(_ seq: UInt64) -> Int {
        switch self { case .fixed(let n): n; case .mixed: Frames.mixedSize(seq) }
    }
    var description: String { switch self { case .fixed(let n): "\(n)"; case .mixed: "mixed" } }
}

struct PktgenReport: Codable {
    var sent: UInt64
    var received: UInt64
    var lost: UInt64
    var reordered: UInt64
    var duplicates: UInt64
    var corrupt: UInt64
    var macMismatch: UInt64
    var foreign: UInt64
    var bytesSent: UInt64
    var bytesReceived: UInt64
    var maxSegments: Int
    var seconds: Double
    var memory: String
    var port: PortReport
    var mbufCapacity: Int
    var mbufsInUseAfterStop: Int
    var error: String?
}

/// `vio pktgen`: sends numbered, checksummed UDP frames and checks what comes back: counts, loss,
/// order, payload integrity and (for a `macswap` peer) swapped addresses.
struct Pktgen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate numbered UDP frames on a virtio-net port and verify the echo.")

    @OptionGroup var dataplane: DataplaneOptions
    @Option(help: "Frame size in bytes (60...9018) or 'mixed' (60...1514, varying).")
    var size: SizeSpec = .fixed(64)
    @Option(help: "Frames to send (default: until --duration or a signal).")
    var count: UInt64?
    @Option(help: "Seconds to send for.")
    var duration: Double?
    @Option(help: "Most frames in flight (sent, not yet back); 0 = no limit. Default: half the RX ring's worth of buffers.")
    var window: Int?
    @Flag(help: "Expect the peer to swap MAC addresses (testpmd macswap).")
    var expectMacswap = false
    @Option(help: "Seconds without progress after which the frames still out count as lost.")
    var drainTimeout = 2.0

    func validate() throws {
        try dataplane.validate(portCount: 1...1)
        if count == nil && duration == nil { throw ValidationError("give --count or --duration") }
        if let w = window, w < 0 { throw ValidationError("--window must be ≥ 0") }
    }

    func run() throws {
        do { try generate() } catch let f as VioFailure {
            FileHandle.standardError.write(Data("vio: error: \(f.description)\n".utf8))
            throw ExitCode(f.exitCode)
        }
    }

    func generate() throws {
        installStopHandler()
        let maxSize: Int = { if case .fixed(let n) = size { return n }; return 1514 }()
        let dp = try Dataplane(dataplane)
        let o = dataplane
        var port = try dp.openPort(o.ports[0], id: 0, o)
        let burst = o.burst
        let bufs = UnsafeMutablePointer<Mbuf>.allocate(capacity: burst)
        let frame = UnsafeMutableRawPointer.allocate(byteCount: Frames.maxSize, alignment: 64)
        defer { bufs.deallocate(); frame.deallocate() }
        let headers = Frames.headers(src: port.mac, size: 64)
        let mac = port.mac.array
        let segmentRoom = dp.pool.dataRoom - Int(Mbuf.headroom)
        // An echoed frame takes ceil(size / buffer) RX buffers; keep the echo within half the ring
        // so the peer never finds our RX ring full.
        let buffersPerFrame = (maxSize + VirtioNetHeader.size + segmentRoom - 1) / segmentRoom
        let window = self.window ?? max(1, o.ringSize / 2 / buffersPerFrame)
        let hz = Double(TSC.hz)
        let start = TSC.now()
        let sendEnd = duration.map { start + UInt64($0 * hz) } ?? .max
        let limit = count ?? .max
        let period = o.statsPeriod > 0 ? UInt64(o.statsPeriod * hz) : UInt64.max
        var clock = Clock(start: start, end: .max, period: period)
        var r = PktgenReport(sent: 0, received: 0, lost: 0, reordered: 0, duplicates: 0, corrupt: 0, macMismatch: 0,
                             foreign: 0, bytesSent: 0, bytesReceived: 0, maxSegments: 0, seconds: 0,
                             memory: dp.eal.mode.rawValue, port: PortReport(port, path: o.ports[0].path),
                             mbufCapacity: dp.pool.capacity, mbufsInUseAfterStop: 0)
        var highest: UInt64 = 0
        // seq + 1 of the last frame received in each slot: frames in flight never exceed the window,
        // so a repeat within 65 536 sequence numbers is a duplicate.
        var seen = [UInt64](repeating: 0, count: 1 << 16)
        var lastProgress = start
        var before = port.counters
        var failure: String?
        var sending = true

        while true {
            // Send.
            let now = TSC.now()
            if sending && (r.sent >= limit || now >= sendEnd || stopRequested.load(ordering: .relaxed)) { sending = false }
            if sending {
                var room = window == 0 ? burst : min(burst, window - Int(r.sent - r.received - r.lost))
                room = min(room, Int(min(UInt64(burst), limit - r.sent)))
                var n = 0
                while n < room {
                    let seq = r.sent + UInt64(n)
                    let len = size.size(seq)
                    guard let m = buildFrame(dp.pool, frame, headers: headers, seq: seq, size: len, segmentRoom: segmentRoom) else { break }
                    bufs[n] = m
                    n += 1
                }
                if n > 0 {
                    var bytes: UInt64 = 0
                    for i in 0..<n { bytes += UInt64(bufs[i].packetLength) }
                    let sent = port.txBurst(bufs, count: n)
                    if sent < n {
                        // The ring is full: keep sequence numbers dense, send the rest next time.
                        for i in sent..<n { bytes -= UInt64(bufs[i].packetLength) }
                        freeBulk(bufs + sent, count: n - sent)
                    }
                    r.sent += UInt64(sent)
                    r.bytesSent += bytes
                }
            }
            // Receive and verify.
            let got = port.rxBurst(bufs, max: burst)
            for i in 0..<got {
                let m = bufs[i]
                r.maxSegments = max(r.maxSegments, Int(m.segmentCount))
                let total = Int(m.packetLength)
                r.bytesReceived += UInt64(total)
                var p = UnsafeRawPointer(m.data)
                if m.segmentCount > 1 || total > Int(m.dataLength) {
                    guard total <= Frames.maxSize else { r.corrupt += 1; continue }
                    var off = 0
                    var seg: Mbuf? = m
                    while let s = seg { (frame + off).copyMemory(from: s.data, byteCount: Int(s.dataLength)); off += Int(s.dataLength); seg = s.next }
                    p = UnsafeRawPointer(frame)
                }
                guard total >= Frames.minSize, p.loadUnaligned(fromByteOffset: 56, as: UInt16.self) == Frames.magic else {
                    r.foreign += 1; continue
                }
                let seq = p.loadUnaligned(fromByteOffset: 42, as: UInt64.self)
                guard seq < r.sent else { r.foreign += 1; continue }
                let slot = Int(seq & 0xffff)
                if seen[slot] == seq &+ 1 { r.duplicates += 1; continue }
                seen[slot] = seq &+ 1
                r.received += 1
                if seq < highest { r.reordered += 1 } else { highest = seq }
                let len = Int(p.loadUnaligned(fromByteOffset: 54, as: UInt16.self))
                if len != total || len != size.size(seq)
                    || p.loadUnaligned(fromByteOffset: 50, as: UInt32.self) != Frames.checksum(p + Frames.dataOffset, total - Frames.dataOffset) {
                    r.corrupt += 1
                }
                let dst = (0..<6).map { p.load(fromByteOffset: $0, as: UInt8.self) }
                let src = (0..<6).map { p.load(fromByteOffset: 6 + $0, as: UInt8.self) }
                if expectMacswap ? (dst != mac || src != Frames.peerMAC) : (src != mac || dst != Frames.peerMAC) { r.macMismatch += 1 }
            }
            if got > 0 { freeBulk(bufs, count: got); lastProgress = TSC.now() }
            if !sending && r.received + r.lost >= r.sent { break }
            if !sending && Double(TSC.now() - lastProgress) / hz > drainTimeout { break }
            if sending && window > 0 && r.sent - r.received >= UInt64(window) && Double(TSC.now() - lastProgress) / hz > drainTimeout {
                // Nothing comes back: frames were lost; count them and open the window again.
                r.lost = r.sent - r.received
                lastProgress = TSC.now()
            }
            guard let tick = clock.tick() else { continue }
            if !port.isLinkUp { failure = "port 0 (\(o.ports[0])): \(port.linkError ?? "link down")"; break }
            if tick.stats {
                print(RateLine.format(port: 0, now: port.counters, before: before, seconds: tick.seconds)
                      + " | sent \(r.sent) received \(r.received)")
                before = port.counters
            }
        }
        r.lost = r.sent - min(r.sent, r.received)
        r.seconds = Double(TSC.now() - start) / hz
        r.port = PortReport(port, path: o.ports[0].path)
        _ = port.close()
        r.mbufsInUseAfterStop = dp.pool.inUseCount
        r.error = failure
        print("sent \(r.sent) received \(r.received) lost \(r.lost) reordered \(r.reordered) duplicates \(r.duplicates) "
              + "corrupt \(r.corrupt) mac-mismatch \(r.macMismatch) foreign \(r.foreign) max-segments \(r.maxSegments) "
              + String(format: "in %.2f s; mbufs in use after stop: %d", r.seconds, r.mbufsInUseAfterStop))
        try writeJSON(r, to: o.json)
        EAL.cleanup()
        if let failure { throw VioFailure(description: failure, exitCode: 2) }
    }

    /// Builds probe frame `seq` of `size` bytes, chained over several mbufs when it does not fit one.
    func buildFrame(_ pool: PacketPool, _ scratch: UnsafeMutableRawPointer, headers: [UInt8], seq: UInt64, size: Int, segmentRoom: Int) -> Mbuf? {
        Frames.fillProbe(scratch, headers: headers, seq: seq, size: size)
        guard let head = pool.allocate() else { return nil }
        var tail = head
        var off = 0
        while true {
            let chunk = min(segmentRoom, size - off)
            tail.data.copyMemory(from: scratch + off, byteCount: chunk)
            tail.dataLength = UInt16(chunk)
            off += chunk
            if off == size { break }
            guard let next = pool.allocate() else { head.free(); return nil }
            tail.next = next
            head.segmentCount += 1
            tail = next
        }
        head.packetLength = UInt32(size)
        return head
    }
}
