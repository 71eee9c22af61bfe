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
    var slotsOutstandingAtExit: Int
    var memory: String
    var features: String
    var ring: String
    var error: String?
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

/// Boxes a queue so several can sit in an array (one box per queue; accessed per poll, not per byte).
final class QueueBox<Ring: Virtqueue & ~Copyable> {
    var queue: VirtioBlkQueue<Ring>
    init(_ q: consuming VirtioBlkQueue<Ring>) { queue = q }
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
    @Option(help: "Write the final report as JSON to this file.") var json: String?

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
        guard bs % blkSectorSize == 0, bs > 0 else { throw VioFailure(description: "--bs must be a multiple of 512") }
        guard (1...4096).contains(iodepth), (1...64).contains(nq), (0...100).contains(mix) else {
            throw VioFailure(description: "--iodepth 1...4096, --queues 1...64, --rwmixread 0...100")
        }

        let setup = try BlkSetup(blk, queues: nq)
        let dev = setup.device
        let capacityBytes = Int(dev.config.capacity) * blkSectorSize
        let region = try min((self.size ?? jf?.get("size") ?? ByteSize(bytes: 1 << 30)).bytes, capacityBytes)
        let blocks = region / bs
        guard blocks >= 1 else { throw VioFailure(description: "the device (\(capacityBytes) bytes) is smaller than one block of \(bs)") }
        if dev.readOnly && rw != .read && rw != .randread { throw VioFailure(description: "the device is read-only; use --rw read or randread") }
        let limitBytes: UInt64? = runtime == nil ? UInt64(region) : nil
        // Each request's data in one buffer, split to the device's size_max if it has one.
        let segBytes = dev.maxSegmentBytes.map { min($0, bs) } ?? bs
        let segsPerIO = (bs + segBytes - 1) / segBytes
        guard segsPerIO <= dev.maxSegments else { throw VioFailure(description: "--bs \(bs) needs \(segsPerIO) segments; the device takes \(dev.maxSegments)") }
        let queuesUsed = dev.queueCount
        let slots = queuesUsed * iodepth
        let data = try DMAMemory(size: slots * bs + 4096)
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: bs, alignment: 64)
        defer { scratch.deallocate() }
        // Everything from here on is specialised for the device's ring layout.
        func body<Ring: Virtqueue & ~Copyable>(_: Ring.Type) throws {
            let boxes = (0..<queuesUsed).map { QueueBox(dev.makeQueue($0, as: Ring.self)) }
            let completions = UnsafeMutablePointer<BlkCompletion>.allocate(capacity: 64)
            defer { completions.deallocate() }
            // Per-request state in raw buffers allocated once: the loop takes no copy-on-write
            // checks or reference counts per I/O.
            let segs = UnsafeMutablePointer<BlkBuffer>.allocate(capacity: segsPerIO)
            segs.initialize(repeating: BlkBuffer(data.pointer, length: 0), count: segsPerIO)
            defer { segs.deallocate() }

            // Per slot: what is in flight.
            let slotBlock = UnsafeMutableBufferPointer<Int>.allocate(capacity: slots); slotBlock.initialize(repeating: -1)
            let slotWrite = UnsafeMutableBufferPointer<Bool>.allocate(capacity: slots); slotWrite.initialize(repeating: false)
            let slotStart = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: slots); slotStart.initialize(repeating: 0)
            let slotVerifyPass = UnsafeMutableBufferPointer<Bool>.allocate(capacity: slots); slotVerifyPass.initialize(repeating: false)
            let slotCounted = UnsafeMutableBufferPointer<Bool>.allocate(capacity: slots); slotCounted.initialize(repeating: false)
            defer { slotBlock.deallocate(); slotWrite.deallocate(); slotStart.deallocate(); slotVerifyPass.deallocate(); slotCounted.deallocate() }
            // --verify: generation last written per block (0: never), and blocks with a request out.
            let generation = UnsafeMutableBufferPointer<UInt32>.allocate(capacity: verify ? blocks : 0); generation.initialize(repeating: 0)
            let busy = UnsafeMutableBufferPointer<Bool>.allocate(capacity: verify ? blocks : 0); busy.initialize(repeating: false)
            defer { generation.deallocate(); busy.deallocate() }
            var nextGeneration: UInt32 = 1
            var rng = seed | 1
            var cursor = 0
            var latency = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
            var r = BlkbenchReport(rw: rw, bs: bs, iodepth: iodepth, queues: queuesUsed, seconds: 0, reads: 0, writes: 0, iops: 0,
                                   mibPerSecond: 0, errors: 0, verified: 0, verifyErrors: 0, failedInFlight: 0, slotsOutstandingAtExit: 0,
                                   memory: setup.eal.mode.rawValue, features: dev.features.description, ring: Ring.layoutName)
            let hz = Double(TSC.hz)
            let nsPerCycle = 1e9 / hz
            var bytesDone: UInt64 = 0
            var bytesIssued: UInt64 = 0
            var outstanding = 0
            var failure: String?

            func random() -> UInt64 { rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27; return rng &* 2_685_821_657_736_338_717 }
            func buffer(_ slot: Int) -> UnsafeMutableRawPointer { data.pointer + slot * bs }
            func stamp(_ p: UnsafeMutableRawPointer, block: Int, gen: UInt32) {
                var s = UInt64(block) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(gen)
                var i = 0
                while i < bs {
                    if i % blkSectorSize == 0 {
                        p.storeBytes(of: UInt64(block), toByteOffset: i, as: UInt64.self)
                        p.storeBytes(of: UInt64(gen), toByteOffset: i + 8, as: UInt64.self)
                        i += 16; continue
                    }
                    s ^= s >> 12; s ^= s << 25; s ^= s >> 27
                    p.storeBytes(of: s, toByteOffset: i, as: UInt64.self)
                    i += 8
                }
            }
            /// Picks the next request for `slot`, or nil when the job has issued all it should.
            func plan(_ slot: Int, verifyPass: Bool) -> (block: Int, write: Bool)? {
                // A size-limited job issues exactly `size` bytes (after the ramp), as fio does.
                if let limit = limitBytes, measuring, bytesIssued >= limit { return nil }
                var write: Bool
                switch rw {
                case .read, .randread: write = false
                case .write, .randwrite: write = true
                case .randrw: write = Int(random() % 100) >= mix
                }
                for _ in 0..<64 {
                    let b: Int
                    if rw.random { b = Int(random() % UInt64(blocks)) } else { b = cursor; cursor = (cursor + 1) % blocks }
                    if verify && busy[b] { continue }
                    if verify && !write && generation[b] == 0 && rw == .randrw { write = true }
                    return (b, write)
                }
                return nil
            }
            func submit(_ q: inout VirtioBlkQueue<Ring>, _ slot: Int, block: Int, write: Bool) throws -> Bool {
                let p = buffer(slot)
                if write && verify {
                    stamp(p, block: block, gen: nextGeneration)
                }
                for k in 0..<segsPerIO { segs[k] = BlkBuffer(p + k * segBytes, length: min(segBytes, bs - k * segBytes)) }
                let sector = UInt64(block * (bs / blkSectorSize))
                do {
                    let b = UnsafeBufferPointer(start: segs, count: segsPerIO)
                    if write { try q.write(sector: sector, from: b, tag: UInt64(slot)) }
                    else { try q.read(sector: sector, into: b, tag: UInt64(slot)) }
                } catch .queueFull {
                    return false
                } catch {
                    throw VioFailure(description: "request rejected: \(error)")
                }
                if write && verify { generation[block] = nextGeneration; nextGeneration &+= 1 }
                if verify { busy[block] = true }
                slotBlock[slot] = block; slotWrite[slot] = write; slotStart[slot] = TSC.now()
                slotCounted[slot] = measuring
                if measuring { bytesIssued &+= UInt64(bs) }
                outstanding += 1
                return true
            }

            let start = TSC.now()
            let rampEnd = start + UInt64(ramp * hz)
            var measuring = ramp == 0
            var measureStart = start
            let end = runtime.map { rampEnd + UInt64($0 * hz) } ?? .max
            var clock = Clock(start: start, end: .max, period: UInt64(hz))
            var beforeIOs: UInt64 = 0, beforeBytes: UInt64 = 0
            var issuing = true
            var verifyPass = false
            var verifyCursor = 0
            var idleSlots: [Int] = []

            // Fill every slot.
            for (qi, box) in boxes.enumerated() {
                for d in 0..<iodepth {
                    let slot = qi * iodepth + d
                    if let p = plan(slot, verifyPass: false), try submit(&box.queue, slot, block: p.block, write: p.write) {} else { idleSlots.append(slot) }
                }
                box.queue.commit()
            }

            /// Completions of one queue, and the next request on every slot that freed up; one
            /// exclusive access to the queue for the whole batch.
            func service(_ q: inout VirtioBlkQueue<Ring>) throws {
                let n = q.poll(into: completions, max: 64)
                if n == 0 { return }
                let now = TSC.now()
                for i in 0..<n {
                    let c = completions[i]
                    let slot = Int(c.tag)
                    outstanding -= 1
                    let block = slotBlock[slot]
                    if c.status == .deviceGone { r.failedInFlight += 1; continue }
                    if verify { busy[block] = false }
                    if c.status != .ok { r.errors += 1 } else {
                        if slotVerifyPass[slot] || (verify && !slotWrite[slot] && generation[block] != 0) {
                            stamp(scratch, block: block, gen: generation[block])
                            r.verified += 1
                            if memcmp(scratch, buffer(slot), bs) != 0 { r.verifyErrors += 1 }
                        }
                        if slotCounted[slot] && !slotVerifyPass[slot] {
                            if slotWrite[slot] { r.writes += 1 } else { r.reads += 1 }
                            bytesDone &+= UInt64(bs)
                            _ = latency.record(UInt64(Double(now &- slotStart[slot]) * nsPerCycle))
                        }
                    }
                    slotVerifyPass[slot] = false
                    if issuing, let p = plan(slot, verifyPass: false), try submit(&q, slot, block: p.block, write: p.write) {
                    } else if verifyPass, verifyCursor < blocks {
                        while verifyCursor < blocks && generation[verifyCursor] == 0 { verifyCursor += 1 }
                        if verifyCursor < blocks, try submit(&q, slot, block: verifyCursor, write: false) {
                            slotVerifyPass[slot] = true; verifyCursor += 1
                        } else { idleSlots.append(slot) }
                    } else {
                        idleSlots.append(slot)
                    }
                }
                q.commit()
            }

            mainLoop: while true {
                for box in boxes { try service(&box.queue) }
                guard let tick = clock.tick() else { continue }
                let now = TSC.now()
                if !measuring && now >= rampEnd {
                    measuring = true; measureStart = now
                }
                // Slots idle because the job had issued all it should stay idle; a size limit ends the
                // job once everything issued is back.
                if issuing, limitBytes != nil, idleSlots.count == slots, outstanding == 0 { issuing = false; r.seconds = Double(now - measureStart) / hz }
                for box in boxes {
                    box.queue.checkDevice()
                    if let reason = box.queue.stopReason, failure == nil { failure = "virtio-blk queue \(box.queue.index): \(reason)" }
                }
                if failure != nil && outstanding == 0 { break mainLoop }
                if failure != nil { issuing = false; verifyPass = false; continue }
                if issuing && (now >= end || tick.done || (limitBytes.map { bytesDone >= $0 } ?? false)) {
                    issuing = false
                    r.seconds = Double(now - measureStart) / hz
                    if verify && !tick.done {
                        verifyPass = true
                        // Idle slots start the read-back.
                        let waiting = idleSlots; idleSlots = []
                        for slot in waiting {
                            while verifyCursor < blocks && generation[verifyCursor] == 0 { verifyCursor += 1 }
                            guard verifyCursor < blocks else { idleSlots.append(slot); continue }
                            let box = boxes[slot / iodepth]
                            if try submit(&box.queue, slot, block: verifyCursor, write: false) { slotVerifyPass[slot] = true; verifyCursor += 1 } else { idleSlots.append(slot) }
                        }
                        for box in boxes { box.queue.commit() }
                    }
                }
                if !issuing && outstanding == 0 && (!verifyPass || verifyCursor >= blocks) { break mainLoop }
                if tick.stats && measuring {
                    let ios = r.reads + r.writes
                    let s = tick.seconds
                    print(String(format: "%@ %dk qd%d: %.0f IOPS, %.1f MiB/s, latency p50 %.1f µs p99 %.1f µs",
                                 rw.rawValue, bs / 1024, iodepth, Double(ios - beforeIOs) / s, Double(bytesDone - beforeBytes) / s / 1_048_576,
                                 Double(latency.valueAtPercentile(50)) / 1000, Double(latency.valueAtPercentile(99)) / 1000))
                    beforeIOs = ios; beforeBytes = bytesDone
                }
            }
            if r.seconds == 0 { r.seconds = Double(TSC.now() - measureStart) / hz }
            let ios = r.reads + r.writes
            r.iops = r.seconds > 0 ? Double(ios) / r.seconds : 0
            r.mibPerSecond = r.seconds > 0 ? Double(bytesDone) / r.seconds / 1_048_576 : 0
            if latency.totalCount > 0 {
                r.latency = LatencyReport(samples: latency.totalCount, minNs: latency.min, p50Ns: latency.valueAtPercentile(50),
                                          p99Ns: latency.valueAtPercentile(99), p999Ns: latency.valueAtPercentile(99.9),
                                          maxNs: latency.max, meanNs: latency.mean)
            }
            r.slotsOutstandingAtExit = outstanding
            r.error = failure
            dev.stop()
            print(String(format: "%@ bs=%d iodepth=%d queues=%d: %llu reads, %llu writes in %.2f s: %.0f IOPS, %.1f MiB/s, %llu errors",
                         rw.rawValue, bs, iodepth, queuesUsed, r.reads, r.writes, r.seconds, r.iops, r.mibPerSecond, r.errors))
            if let l = r.latency {
                print(String(format: "latency: p50 %.1f µs, p99 %.1f µs, p99.9 %.1f µs, max %.1f µs", Double(l.p50Ns) / 1000,
                             Double(l.p99Ns) / 1000, Double(l.p999Ns) / 1000, Double(l.maxNs) / 1000))
            }
            if verify { print("verify: \(r.verified) blocks checked, \(r.verifyErrors) mismatches") }
            if r.failedInFlight > 0 { print("\(r.failedInFlight) requests in flight failed with the device") }
            try writeJSON(r, to: json)
            EAL.cleanup()
            if let failure { throw VioFailure(description: failure, exitCode: 2) }
            if r.verifyErrors > 0 { throw VioFailure(description: "verify found \(r.verifyErrors) mismatching blocks") }
            if r.errors > 0 { throw VioFailure(description: "\(r.errors) requests failed") }
        }
        switch dev.ringLayout {
        case .packed: try body(PackedVirtqueue.self)
        case .split, .auto: try body(SplitVirtqueue.self)
        }
    }
}
