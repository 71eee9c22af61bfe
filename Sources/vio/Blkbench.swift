import ArgumentParser
import DPDK
import Foundation
import Histogram
import VirtioBlk
import VirtioCore

enum BlkPattern: String, ExpressibleByArgument, Codable {
    case read, write, randread, randwrite, randrw
    var random: Bool { self == .randread || self == .randwrite || self == .randrw }
}

struct BlkbenchReport: Codable {
    var rw: BlkPattern
    var bs: Int
    var iodepth: Int
    var queues: Int
    /// Lcores the queues were spread over.
    var lcores: Int = 1
    var seconds: Double
    var reads: UInt64
    var writes: UInt64
    var iops: Double
    var mibPerSecond: Double
    var latency: LatencyReport?
    var errors: UInt64
    var verified: UInt64
    var verifyErrors: UInt64
    var failedInFlight: UInt64
    /// With --reconnect: every loss of the device, and the requests submitted again after one.
    var outages: [DeviceOutage]?
    var resubmitted: UInt64?
    /// With --reconnect: the backend tracked the requests in flight (INFLIGHT_SHMFD) and resumes them itself.
    var inflightTracking: Bool?
    var slotsOutstandingAtExit: Int
    /// Kicks (available-buffer notifications) sent, over the whole run.
    var notifications: UInt64 = 0
    /// Completions with an invalid or unwritten status byte (counted in `errors` too).
    var invalidStatus: UInt64 = 0
    /// The first failed request and its status.
    var firstError: String?
    var memory: String
    var features: String
    var ring: String
    /// Descriptors per queue.
    var queueSize: Int?
    var error: String?
    /// --alternate: I/Os per phase.
    var alternate: BlkAlternateReport?
}

/// A flat TOML job file (`key = value`, `#` comments): the defaults for `vio blkbench`.
struct JobFile {
    var values: [String: String] = [:]
    init(path: String) throws {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw VioFailure(description: "cannot read job file \(path)") }
        for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
            let t = line.trimmingCharacters(in: .whitespaces)
            if t.isEmpty || t.hasPrefix("[") { continue }
            let kv = t.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            guard kv.count == 2, !kv[0].isEmpty else { throw VioFailure(description: "\(path):\(n + 1): expected key = value") }
            var v = kv[1]
            if v.hasPrefix("\""), v.hasSuffix("\""), v.count >= 2 { v = String(v.dropFirst().dropLast()) }
            values[kv[0].replacingOccurrences(of: "-", with: "_")] = v
        }
    }
    func get<T: ExpressibleByArgument>(_ key: String) throws -> T? {
        guard let v = values[key] else { return nil }
        guard let t = T(argument: v) else { throw VioFailure(description: "job file: bad value for \(key): \(v)") }
        return t
    }
}

/// `vio blkbench`: fio-style block I/O against a virtio-blk device, polled on one lcore.
struct Blkbench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "fio-style block I/O benchmark on a virtio-blk device.",
        discussion: "Job files (e.g. Configs/blk/randread-4k-qd32.toml) set defaults with the same names (rw, bs, iodepth, runtime, size, ramp_time, rwmixread, queues, verify); flags override them.")

    @OptionGroup var blk: BlkOptions
    @Option(help: "Job file (flat TOML).") var job: String?
    @Option(help: "read, write, randread, randwrite or randrw.") var rw: BlkPattern?
    @Option(help: "Read share of randrw, percent.") var rwmixread: Int?
    @Option(help: "Block size (e.g. 4k, 128k).") var bs: ByteSize?
    @Option(help: "Requests in flight per queue.") var iodepth: Int?
    @Option(help: "Run time (e.g. 10s); without it, run until --size bytes are done.") var runtime: Seconds?
    @Option(help: "Region of the device to use, from sector 0 (default: all of it, at most 1g).") var size: ByteSize?
    @Option(help: "Queues (polled round-robin on this lcore).") var queues: Int?
    @Option(help: "Time before measuring starts (e.g. 2s).") var rampTime: Seconds?
    @Flag(help: "Stamp every written block and check every read; read back all written blocks at the end.") var verify = false
    @Option(help: "Random seed.") var seed: UInt64 = 1
    @Option(help: ArgumentHelp("Switch between the job's own setting and this one every --alternate-period while measuring, and report the IOPS of each phase: direct-chain-limit=N, poll-pacing=on|off, poll-batch=N (the most completions a paced poll waits for; default 16) or table-order=on|off (completed descriptors reused oldest first).", valueName: "setting=value"))
    var alternate: BlkAlternate?
    @Option(help: "Phase length for --alternate (e.g. 50ms).") var alternatePeriod: Seconds = Seconds(0.05)
    @Option(help: "Write the final report as JSON to this file.") var json: String?
    @Option(help: "With --verify: write, for every block written, its device sector and the generation last written there (one 'SECTOR GENERATION' line each; every 512-byte sector of the block starts with the block number and the generation as two little-endian UInt64s).")
    var verifyManifest: String?

    func validate() throws {
        if blk.dev == nil { throw ValidationError("give --dev vhost-user-blk:PATH") }
    }

    func run() throws { try reportingFailures { try bench() } }

    func bench() throws {
        installStopHandler()
        let jf = try job.map { try JobFile(path: $0) }
        let rw: BlkPattern = try self.rw ?? jf?.get("rw") ?? .randread
        let bs = try (self.bs ?? jf?.get("bs") ?? ByteSize(bytes: 4096)).bytes
        let iodepth: Int = try self.iodepth ?? jf?.get("iodepth") ?? 1
        let runtime: Double? = try (self.runtime ?? jf?.get("runtime")).map(\.value)
        let ramp = try (self.rampTime ?? jf?.get("ramp_time"))?.value ?? 0
        let mix: Int = try self.rwmixread ?? jf?.get("rwmixread") ?? 50
        let nq: Int = try self.queues ?? jf?.get("queues") ?? 1
        let verify = try self.verify || (jf?.get("verify") as Bool?) == true
        let size = try (self.size ?? jf?.get("size") ?? ByteSize(bytes: 1 << 30)).bytes
        guard bs % blkSectorSize == 0, bs > 0 else { throw VioFailure(description: "--bs must be a multiple of 512") }
        guard (1...4096).contains(iodepth), (1...64).contains(nq), (0...100).contains(mix) else {
            throw VioFailure(description: "--iodepth 1...4096, --queues 1...64, --rwmixread 0...100")
        }

        if alternate != nil, (blk.lcores?.cpus.count ?? 1) > 1 {
            throw ValidationError("--alternate runs on one lcore (each lcore would switch on its own clock)")
        }
        guard alternatePeriod.value >= 0.002 else { throw ValidationError("--alternate-period must be at least 2ms") }
        if let l = blk.lcores?.cpus.count, l > nq {
            throw ValidationError("--lcores gives \(l) lcores for \(nq) queue(s): each lcore needs at least one")
        }
        let setup = try BlkSetup(blk, queues: nq, iodepth: iodepth)
        var (r, failure, stopFailure, failureCode) = try setup.open(Run(size: size, verify: verify, lcores: blk.lcores?.cpus.count ?? 1, rw: rw, bs: bs, iodepth: iodepth, mix: mix, ramp: ramp, runtime: runtime, seed: seed,
                                              ioTimeout: blk.ioTimeout.value, memory: setup.eal.mode.rawValue, manifest: verify ? verifyManifest : nil,
                                              alternate: alternate, alternatePeriod: alternatePeriod.value))
        r.error = failure
        print(String(format: "%@ bs=%d iodepth=%d queues=%d: %llu reads, %llu writes in %.2f s: %.0f IOPS, %.1f MiB/s, %llu errors",
                     rw.rawValue, bs, iodepth, r.queues, r.reads, r.writes, r.seconds, r.iops, r.mibPerSecond, r.errors))
        if let l = r.latency {
            print(String(format: "latency: p50 %.1f µs, p99 %.1f µs, p99.9 %.1f µs, max %.1f µs", Double(l.p50Ns) / 1000,
                         Double(l.p99Ns) / 1000, Double(l.p999Ns) / 1000, Double(l.maxNs) / 1000))
        }
        if verify { print("verify: \(r.verified) blocks checked, \(r.verifyErrors) mismatches") }
        if let a = r.alternate {
            print(String(format: "alternate %@ every %.0f ms: %d phases, A (own) %.0f IOPS, B %.0f IOPS, B/A %.3f",
                         a.setting, a.periodMs, a.phases, a.aIOPS, a.bIOPS, a.ratio))
        }
        if r.failedInFlight > 0 { print("\(r.failedInFlight) requests in flight failed with the device") }
        if let o = r.outages {
            print(String(format: "outages %d (%.2f s down), %llu requests submitted again after a reconnect%@", o.count, o.reduce(0) { $0 + $1.seconds }, r.resubmitted ?? 0,
                         r.inflightTracking == true ? " (the backend tracked and resumed the requests in flight)" : ""))
        }
        try writeJSON(r, to: json)
        EAL.cleanup()
        if let failure { throw VioFailure(description: failure, exitCode: failureCode) }
        if let s = stopFailure { throw VioFailure(description: "stopping the device: \(s)", exitCode: 2) }
        let first = r.firstError.map { " (first: \($0))" } ?? ""
        if r.invalidStatus > 0 {
            throw VioFailure(description: "the device completed \(r.invalidStatus) requests with an invalid status byte\(first)", exitCode: 2)
        }
        if r.verifyErrors > 0 { throw VioFailure(description: "verify found \(r.verifyErrors) mismatching blocks") }
        if r.errors > 0 { throw VioFailure(description: "\(r.errors) requests failed\(first)") }
    }
}

extension Blkbench {
    /// Sizes the job for the device and runs a `BlkJob` on its queues; its report and failure.
    struct Run: VirtioBlkDeviceBody {
        let size: Int, verify: Bool, lcores: Int, rw: BlkPattern, bs: Int, iodepth: Int, mix: Int, ramp: Double, runtime: Double?, seed: UInt64
        let ioTimeout: Double, memory: String, manifest: String?
        var alternate: BlkAlternate? = nil, alternatePeriod: Double = 0.05
        /// The report, the run's failure, why the final stop failed (if it did), and the exit
        /// status of the failure (1: the device came back unusable, else 2).
        func run<Ring: Virtqueue & ~Copyable>(_ dev: VirtioBlkDevice<Ring>) throws -> (BlkbenchReport, String?, String?, Int32) {
            defer { dev.stop() }
            let capacityBytes = Int(dev.config.capacity) * blkSectorSize
            let region = min(size, capacityBytes)
            let blocks = region / bs
            guard blocks >= 1 else { throw VioFailure(description: "the device (\(capacityBytes) bytes) is smaller than one block of \(bs)") }
            if dev.readOnly && rw != .read && rw != .randread { throw VioFailure(description: "the device is read-only; use --rw read or randread") }
            let limitBytes: UInt64? = runtime == nil ? UInt64(region) : nil
            // Each request's data in one buffer, split to the device's size_max if it has one.
            let segBytes = dev.maxSegmentBytes.map { min($0, bs) } ?? bs
            let segsPerIO = (bs + segBytes - 1) / segBytes
            guard segsPerIO <= dev.maxSegments else { throw VioFailure(description: "--bs \(bs) needs \(segsPerIO) segments; the device takes \(dev.maxSegments)") }
            let params = BlkJobParameters(rw: rw, bs: bs, iodepth: iodepth, mix: mix, verify: verify, blocks: blocks, limitBytes: limitBytes,
                                          segmentBytes: segBytes, segmentsPerIO: segsPerIO, ramp: ramp, runtime: runtime, seed: seed, ioTimeout: ioTimeout,
                                          alternate: alternate, alternatePeriod: alternatePeriod)
            let data = try DMAMemory(size: dev.queueCount * iodepth * bs + 4096)
            // Queue q on lcore q mod L, each lcore's jobs on their own slice of the region.
            // A device that offers fewer queues than asked leaves some lcores without one.
            let lanes = max(1, min(lcores, dev.queueCount))
            let jobs = UnsafeMutablePointer<BlkJob<Ring>>.allocate(capacity: lanes)
            defer { jobs.deinitialize(count: lanes); jobs.deallocate() }
            let control = RunControl()
            let perLane = params.blocks / lanes
            var slotBase = 0
            for l in 0..<lanes {
                var pl = params
                pl.blocks = perLane
                pl.firstBlock = l * perLane
                if let limit = params.limitBytes { pl.limitBytes = limit / UInt64(lanes) }
                let qs = Array(stride(from: l, to: dev.queueCount, by: lanes))
                (jobs + l).initialize(to: BlkJob<Ring>(device: dev, queueIndices: qs, params: pl,
                                                      data: data.pointer + slotBase * bs, memory: memory))
                jobs[l].printStats = l == 0
                if lanes > 1 { jobs[l].statsLabel = " (lcore 0 of \(lanes))" }
                jobs[l].shared = control
                slotBase += qs.count * iodepth
            }
            let workers = EAL.workerLcores
            let errors = UnsafeMutablePointer<String?>.allocate(capacity: lanes)
            errors.initialize(repeating: nil, count: lanes)
            defer { errors.deinitialize(count: lanes); errors.deallocate() }
            for l in 1..<lanes {
                let job = jobs + l, err = errors + l
                try EAL.launch(onWorker: workers[l - 1]) {
                    do { try job.pointee.run() } catch { err.pointee = "\(error)"; control.fail("\(error)") }
                }
            }
            do { try jobs[0].run() } catch { errors[0] = "\(error)"; control.fail("\(error)") }
            EAL.waitForWorkers()
            if let e = (0..<lanes).lazy.compactMap({ errors[$0] }).first { throw VioFailure(description: e) }
            var r = jobs[0].r
            var latency = jobs[0].latency
            var bytes = jobs[0].bytesDone
            var failure = jobs[0].failure
            for l in 1..<lanes {
                let o = jobs[l].r
                r.reads += o.reads; r.writes += o.writes; r.errors += o.errors; r.verified += o.verified
                r.verifyErrors += o.verifyErrors; r.failedInFlight += o.failedInFlight; r.notifications += o.notifications
                r.slotsOutstandingAtExit += o.slotsOutstandingAtExit
                r.invalidStatus += o.invalidStatus
                if r.firstError == nil { r.firstError = o.firstError }
                r.seconds = max(r.seconds, o.seconds)
                latency.add(jobs[l].latency)
                bytes += jobs[l].bytesDone
                if failure == nil { failure = jobs[l].failure }
            }
            if lanes > 1 {
                r.queues = dev.queueCount
                r.lcores = lanes
                r.iops = r.seconds > 0 ? Double(r.reads + r.writes) / r.seconds : 0
                r.mibPerSecond = r.seconds > 0 ? Double(bytes) / r.seconds / 1_048_576 : 0
                if latency.totalCount > 0 {
                    r.latency = LatencyReport(samples: latency.totalCount, minNs: latency.min, p50Ns: latency.valueAtPercentile(50),
                                              p99Ns: latency.valueAtPercentile(99), p999Ns: latency.valueAtPercentile(99.9),
                                              maxNs: latency.max, meanNs: latency.mean)
                }
            }
            if let path = manifest {
                var text = "# sector generation (block size \(bs))\n"
                for l in 0..<lanes {
                    let g = jobs[l].generation, first = jobs[l].p.firstBlock
                    for b in 0..<g.count where g[b] != 0 { text += "\((first + b) * (bs / blkSectorSize)) \(g[b])\n" }
                }
                do { try text.write(toFile: path, atomically: true, encoding: .utf8) } catch {
                    throw VioFailure(description: "cannot write \(path): \(error.localizedDescription)")
                }
            }
            if dev.core.reconnectPolicy != nil {
                r.outages = dev.core.outages
                r.resubmitted = (0..<lanes).reduce(0) { $0 + jobs[$1].resubmitted }
                r.inflightTracking = dev.inflightTracked
            }
            dev.stop()
            return (r, failure, dev.core.stopFailure, dev.core.reconnectFailure?.exitCode ?? 2)
        }
    }
}
