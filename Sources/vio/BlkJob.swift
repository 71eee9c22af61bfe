import ArgumentParser
import DPDK
import Foundation
import Histogram
import VirtioBlk
import VirtioCore

/// What `vio blkbench` was asked to do, resolved from flags and the job file.
struct BlkJobParameters {
    var rw: BlkPattern
    var bs: Int
    var iodepth: Int
    /// Read share of randrw, percent.
    var mix: Int
    var verify: Bool
    /// Blocks of `bs` in the region used.
    var blocks: Int
    /// Where the region starts, in blocks of `bs` (each lcore's job has its own region).
    var firstBlock = 0
    /// A size-limited job issues exactly this many bytes after the ramp (nil: run for `runtime`).
    var limitBytes: UInt64?
    var segmentBytes: Int
    var segmentsPerIO: Int
    var ramp: Double
    var runtime: Double?
    var seed: UInt64
    /// A request outstanding longer than this fails the run (the device lost it or stopped).
    var ioTimeout: Double = 5
    /// --alternate: a setting switched on and off in turns during the measured run.
    var alternate: BlkAlternate?
    var alternatePeriod: Double = 0.05
}

/// `--alternate SETTING=VALUE`: the measured run switches between the job's own setting (phase A)
/// and this one (phase B) every `period`, counting the I/Os completed in each phase. Both run in
/// one process against one device within milliseconds of each other, so the VM's swings in speed
/// (about 2x over seconds here) fall on both alike: a ratio from separate runs cannot get that.
struct BlkAlternate: ExpressibleByArgument, CustomStringConvertible {
    enum Setting: Equatable {
        /// `VirtioBlkQueue.directChainLimit`.
        case directChainLimit(Int)
        /// `VirtioBlkQueue.pollPacing`.
        case pollPacing(Bool)
        /// `VirtioBlkQueue.pollBatch`.
        case pollBatch(Int)
        /// `VirtioBlkQueue.recycleInTableOrder`.
        case tableOrder(Bool)
        /// `VirtioBlkQueue.tableReserve`.
        case tableReserve(Int)
    }
    var setting: Setting
    var description: String {
        switch setting {
        case .directChainLimit(let n): return "direct-chain-limit=\(n)"
        case .pollPacing(let on): return "poll-pacing=\(on ? "on" : "off")"
        case .pollBatch(let n): return "poll-batch=\(n)"
        case .tableOrder(let on): return "table-order=\(on ? "on" : "off")"
        case .tableReserve(let n): return "table-reserve=\(n)"
        }
    }
    init?(argument: String) {
        let kv = argument.split(separator: "=", maxSplits: 1).map(String.init)
        guard kv.count == 2 else { return nil }
        switch kv[0] {
        case "direct-chain-limit":
            guard let n = Int(kv[1]), n >= 1 else { return nil }
            setting = .directChainLimit(n)
        case "poll-pacing":
            guard kv[1] == "on" || kv[1] == "off" else { return nil }
            setting = .pollPacing(kv[1] == "on")
        case "poll-batch":
            guard let n = Int(kv[1]), n >= 1 else { return nil }
            setting = .pollBatch(n)
        case "table-order":
            guard kv[1] == "on" || kv[1] == "off" else { return nil }
            setting = .tableOrder(kv[1] == "on")
        case "table-reserve":
            guard let n = Int(kv[1]), n >= 0 else { return nil }
            setting = .tableReserve(n)
        default: return nil
        }
    }
}

/// What --alternate measured: I/Os and seconds in each phase (whole phases after the ramp).
struct BlkAlternateReport: Codable {
    var setting: String
    var periodMs: Double
    var phases: Int
    var aIOs: UInt64, bIOs: UInt64
    var aSeconds: Double, bSeconds: Double
    var aIOPS: Double, bIOPS: Double
    /// bIOPS / aIOPS.
    var ratio: Double
}

/// One blkbench job on every queue of a device, specialised for its ring layout.
///
/// The loop's state lives in this struct and in raw memory allocated once (the queues themselves
/// sit in one buffer, not in class boxes): no closures capture anything, so a request costs no
/// reference counting, copy-on-write check or allocation. `Bench/blk.py` counts runtime calls.
struct BlkJob<Ring: Virtqueue & ~Copyable>: ~Copyable {
    let p: BlkJobParameters
    let queueCount: Int
    let slots: Int
    let queues: UnsafeMutablePointer<VirtioBlkQueue<Ring>>
    /// `slots` buffers of `bs`, one per slot, in DMA memory owned by the caller.
    let data: UnsafeMutableRawPointer
    let scratch: UnsafeMutableRawPointer
    let completions: UnsafeMutablePointer<BlkCompletion>
    let segments: UnsafeMutablePointer<BlkBuffer>
    // Per slot: what is in flight.
    let slotBlock: UnsafeMutableBufferPointer<Int>
    let slotWrite: UnsafeMutableBufferPointer<Bool>
    let slotStart: UnsafeMutableBufferPointer<UInt64>
    let slotVerifyPass: UnsafeMutableBufferPointer<Bool>
    let slotCounted: UnsafeMutableBufferPointer<Bool>
    /// Whether the slot has a request at the device (for the --io-timeout scan).
    let slotBusy: UnsafeMutableBufferPointer<Bool>
    /// Slots with nothing in flight (a stack).
    let idle: UnsafeMutablePointer<Int>
    var idleCount = 0
    // --verify: generation last written per block (0: never), and blocks with a request out.
    let generation: UnsafeMutableBufferPointer<UInt32>
    let busy: UnsafeMutableBufferPointer<Bool>
    var nextGeneration: UInt32 = 1
    var rng: UInt64
    var cursor = 0
    var latency = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
    let nsPerCycle: Double
    var bytesDone: UInt64 = 0
    var bytesIssued: UInt64 = 0
    var outstanding = 0
    var measuring: Bool
    var issuing = true
    var verifyPass = false
    var verifyCursor = 0
    var r: BlkbenchReport
    var failure: String?
    /// Completions whose status byte was invalid or unwritten (a device fault, not an I/O error).
    var invalidStatus: UInt64 = 0
    /// The first failed request, described.
    var firstError: String?
    /// The device, stopped when a request times out or a stop leaves requests stuck, so every
    /// slot comes back (as `.deviceGone`).
    let device: VirtioBlkDevice<Ring>
    /// Whether this job prints the live line (only the main lcore's job does), and what it adds
    /// to it (with several lcores: "lcore 0 of N", since the line counts that lcore's share).
    var printStats = true
    var statsLabel = ""
    /// Set by any lcore's job that fails, so the others stop issuing.
    var shared: RunControl?
    /// --alternate: the settings of phase A (the job's own, per queue) and whether B is on.
    var alternateA: [(directChainLimit: Int, pollPacing: Bool, pollBatch: Int, tableOrder: Bool, tableReserve: Int)] = []
    var inPhaseB = false
    var phaseStart: UInt64 = 0
    var phaseStartIOs: UInt64 = 0
    var phaseCount = 0
    var phaseIOs: (a: UInt64, b: UInt64) = (0, 0)
    var phaseCycles: (a: UInt64, b: UInt64) = (0, 0)

    /// A job on the device's queues `queueIndices` (one lcore's share).
    init(device: VirtioBlkDevice<Ring>, queueIndices: [Int], params: BlkJobParameters, data: UnsafeMutableRawPointer, memory: String) {
        p = params
        self.device = device
        queueCount = queueIndices.count
        slots = queueCount * params.iodepth
        queues = .allocate(capacity: queueCount)
        for (i, q) in queueIndices.enumerated() { (queues + i).initialize(to: device.makeQueue(q)) }
        self.data = data
        scratch = .allocate(byteCount: params.bs, alignment: 64)
        completions = .allocate(capacity: 64)
        segments = .allocate(capacity: params.segmentsPerIO)
        segments.initialize(repeating: BlkBuffer(data, length: 0), count: params.segmentsPerIO)
        slotBlock = .allocate(capacity: slots); slotBlock.initialize(repeating: -1)
        slotWrite = .allocate(capacity: slots); slotWrite.initialize(repeating: false)
        slotStart = .allocate(capacity: slots); slotStart.initialize(repeating: 0)
        slotVerifyPass = .allocate(capacity: slots); slotVerifyPass.initialize(repeating: false)
        slotCounted = .allocate(capacity: slots); slotCounted.initialize(repeating: false)
        slotBusy = .allocate(capacity: slots); slotBusy.initialize(repeating: false)
        idle = .allocate(capacity: slots)
        generation = .allocate(capacity: params.verify ? params.blocks : 0); generation.initialize(repeating: 0)
        busy = .allocate(capacity: params.verify ? params.blocks : 0); busy.initialize(repeating: false)
        rng = params.seed | 1
        nsPerCycle = 1e9 / Double(TSC.hz)
        measuring = params.ramp == 0
        r = BlkbenchReport(rw: params.rw, bs: params.bs, iodepth: params.iodepth, queues: queueCount, seconds: 0, reads: 0, writes: 0,
                           iops: 0, mibPerSecond: 0, errors: 0, verified: 0, verifyErrors: 0, failedInFlight: 0,
                           slotsOutstandingAtExit: 0, memory: memory, features: device.features.description, ring: Ring.layoutName)
        r.queueSize = device.queueSize
    }

    deinit {
        queues.deinitialize(count: queueCount); queues.deallocate()
        scratch.deallocate(); completions.deallocate(); segments.deallocate()
        slotBlock.deallocate(); slotWrite.deallocate(); slotStart.deallocate(); slotVerifyPass.deallocate(); slotCounted.deallocate(); slotBusy.deallocate()
        idle.deallocate(); generation.deallocate(); busy.deallocate()
    }

    mutating func random() -> UInt64 {
        rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27
        return rng &* 2_685_821_657_736_338_717
    }

    func buffer(_ slot: Int) -> UnsafeMutableRawPointer { data + slot * p.bs }

    /// Fills a block with data derived from (block, generation); every sector starts with both.
    func stamp(_ to: UnsafeMutableRawPointer, block: Int, gen: UInt32) {
        var s = UInt64(block) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(gen)
        var i = 0
        while i < p.bs {
            if i % blkSectorSize == 0 {
                to.storeBytes(of: UInt64(block), toByteOffset: i, as: UInt64.self)
                to.storeBytes(of: UInt64(gen), toByteOffset: i + 8, as: UInt64.self)
                i += 16; continue
            }
            s ^= s >> 12; s ^= s << 25; s ^= s >> 27
            to.storeBytes(of: s, toByteOffset: i, as: UInt64.self)
            i += 8
        }
    }

    /// The next request for a slot, or nil when the job has issued all it should.
    mutating func plan() -> (block: Int, write: Bool)? {
        // A size-limited job issues exactly `size` bytes (after the ramp), as fio does.
        if let limit = p.limitBytes, measuring, bytesIssued >= limit { return nil }
        var write: Bool
        switch p.rw {
        case .read, .randread: write = false
        case .write, .randwrite: write = true
        case .randrw: write = Int(random() % 100) >= p.mix
        }
        for _ in 0..<64 {
            let b: Int
            if p.rw.random { b = Int(random() % UInt64(p.blocks)) } else { b = cursor; cursor = (cursor + 1) % p.blocks }
            if p.verify && busy[b] { continue }
            if p.verify && !write && generation[b] == 0 && p.rw == .randrw { write = true }
            return (b, write)
        }
        return nil
    }

    /// Submits a request for `slot` on queue `q`; false when the queue is full.
    mutating func submit(queue q: Int, slot: Int, block: Int, write: Bool) throws -> Bool {
        let queues = self.queues  // (see `run`)
        let buf = buffer(slot)
        if write && p.verify { stamp(buf, block: block, gen: nextGeneration) }
        for k in 0..<p.segmentsPerIO {
            segments[k] = BlkBuffer(buf + k * p.segmentBytes, length: min(p.segmentBytes, p.bs - k * p.segmentBytes))
        }
        let sector = UInt64((p.firstBlock + block) * (p.bs / blkSectorSize))
        let b = UnsafeBufferPointer(start: segments, count: p.segmentsPerIO)
        do {
            if write { try queues[q].write(sector: sector, from: b, tag: UInt64(slot)) }
            else { try queues[q].read(sector: sector, into: b, tag: UInt64(slot)) }
        } catch .queueFull {
            return false
        } catch {
            throw VioFailure(description: "request rejected: \(error)")
        }
        if write && p.verify { generation[block] = nextGeneration; nextGeneration &+= 1 }
        if p.verify { busy[block] = true }
        slotBlock[slot] = block; slotWrite[slot] = write; slotStart[slot] = TSC.now()
        slotCounted[slot] = measuring
        slotBusy[slot] = true
        if measuring { bytesIssued &+= UInt64(p.bs) }
        outstanding += 1
        return true
    }

    /// The next block of the read-back after a --verify job, submitted on `slot`; false if none.
    mutating func submitReadBack(queue q: Int, slot: Int) throws -> Bool {
        while verifyCursor < p.blocks && generation[verifyCursor] == 0 { verifyCursor += 1 }
        guard verifyCursor < p.blocks, try submit(queue: q, slot: slot, block: verifyCursor, write: false) else { return false }
        slotVerifyPass[slot] = true
        verifyCursor += 1
        return true
    }

    /// Completions of one queue, and the next request on every slot that freed up; one commit.
    mutating func service(queue q: Int) throws {
        let queues = self.queues  // (see `run`)
        let n = queues[q].poll(into: completions, max: 64)
        if n == 0 { return }
        let now = TSC.now()
        for i in 0..<n {
            let c = completions[i]
            let slot = Int(c.tag)
            outstanding -= 1
            slotBusy[slot] = false
            let block = slotBlock[slot]
            if c.status == .deviceGone { r.failedInFlight += 1; continue }
            if p.verify { busy[block] = false }
            if c.status != .ok { noteError(c, slot: slot) } else {
                if slotVerifyPass[slot] || (p.verify && !slotWrite[slot] && generation[block] != 0) {
                    stamp(scratch, block: block, gen: generation[block])
                    r.verified += 1
                    if memcmp(scratch, buffer(slot), p.bs) != 0 { r.verifyErrors += 1 }
                }
                if slotCounted[slot] && !slotVerifyPass[slot] {
                    if slotWrite[slot] { r.writes += 1 } else { r.reads += 1 }
                    bytesDone &+= UInt64(p.bs)
                    _ = latency.record(UInt64(Double(now &- slotStart[slot]) * nsPerCycle))
                }
            }
            slotVerifyPass[slot] = false
            if issuing, let next = plan(), try submit(queue: q, slot: slot, block: next.block, write: next.write) {
            } else if verifyPass, try submitReadBack(queue: q, slot: slot) {
            } else {
                idle[idleCount] = slot; idleCount += 1
            }
        }
        queues[q].commit()
    }

    /// Counts a failed completion; the first is kept, described.
    @inline(never)
    mutating func noteError(_ c: BlkCompletion, slot: Int) {
        r.errors += 1
        if case .badStatus = c.status { invalidStatus += 1 }
        if firstError == nil { firstError = "\(describe(slot: slot)): \(c.status)" }
    }

    /// What slot `slot` has in flight, for messages: "write of 8 sectors at sector 1024 (slot 3)".
    func describe(slot: Int) -> String {
        let sectors = p.bs / blkSectorSize
        return "\(slotWrite[slot] ? "write" : "read") of \(sectors) sectors at sector \((p.firstBlock + slotBlock[slot]) * sectors) (slot \(slot))"
    }

    /// Requests submitted again after reconnects, over the job's queues.
    var resubmitted: UInt64 {
        var n: UInt64 = 0
        for q in 0..<queueCount { n += queues[q].resubmitted }
        return n
    }

    /// The oldest request outstanding longer than `limit` cycles at `now`, if any; time before
    /// `since` (the device's return after an outage) does not count.
    func overdue(now: UInt64, limit: UInt64, since: UInt64 = 0) -> Int? {
        var oldest: Int?
        for s in 0..<slots where slotBusy[s] && now &- max(slotStart[s], since) > limit {
            if oldest == nil || slotStart[s] < slotStart[oldest!] { oldest = s }
        }
        return oldest
    }

    /// Ends the run with `reason`: stops the device, so every request still out comes back
    /// as `.deviceGone` at the next poll and no slot is left behind.
    @inline(never)
    mutating func abandon(_ reason: String) {
        if failure == nil { failure = reason; shared?.fail(reason) }
        issuing = false; verifyPass = false
        device.stop(reason: reason)
    }

    /// --alternate: ends the phase running since `phaseStart` at `now` (counted if measured
    /// whole) and starts the other one.
    @inline(never)
    mutating func switchPhase(now: UInt64, measuredFrom: UInt64) {
        guard let alt = p.alternate else { return }
        let queues = self.queues  // (see `run`: not through the stored pointer, for -sanitize=thread)
        let ios = r.reads + r.writes
        if phaseStart >= measuredFrom && measuring && issuing {
            if inPhaseB { phaseIOs.b += ios - phaseStartIOs; phaseCycles.b += now - phaseStart }
            else { phaseIOs.a += ios - phaseStartIOs; phaseCycles.a += now - phaseStart }
            phaseCount += 1
        }
        inPhaseB.toggle()
        for q in 0..<queueCount {
            switch alt.setting {
            case .directChainLimit(let n): queues[q].directChainLimit = inPhaseB ? n : alternateA[q].directChainLimit
            case .pollPacing(let on): queues[q].pollPacing = inPhaseB ? on : alternateA[q].pollPacing
            case .pollBatch(let n): queues[q].pollBatch = inPhaseB ? n : alternateA[q].pollBatch
            case .tableOrder(let on): queues[q].recycleInTableOrder = inPhaseB ? on : alternateA[q].tableOrder
            case .tableReserve(let n): queues[q].tableReserve = inPhaseB ? n : alternateA[q].tableReserve
            }
        }
        phaseStart = now
        phaseStartIOs = ios
    }

    /// What --alternate measured, if it ran.
    var alternateReport: BlkAlternateReport? {
        guard let alt = p.alternate else { return nil }
        let hz = Double(TSC.hz)
        let a = Double(phaseCycles.a) / hz, b = Double(phaseCycles.b) / hz
        let ai = a > 0 ? Double(phaseIOs.a) / a : 0, bi = b > 0 ? Double(phaseIOs.b) / b : 0
        return BlkAlternateReport(setting: alt.description, periodMs: p.alternatePeriod * 1000, phases: phaseCount,
                                  aIOs: phaseIOs.a, bIOs: phaseIOs.b, aSeconds: a, bSeconds: b, aIOPS: ai, bIOPS: bi,
                                  ratio: ai > 0 ? bi / ai : 0)
    }

    /// Runs the job to its end (time, size, a signal or a failed device); the results are in `r`
    /// and `failure`.
    mutating func run() throws {
        // Through a local copy of the pointer: Swift 6.3.1 with -sanitize=thread crashes
        // ("Broken module found") on a mutating method of this ~Copyable struct that calls a
        // mutating method through the stored pointer's subscript (Scripts/sanitize.sh).
        let queues = self.queues
        let hz = Double(TSC.hz)
        let start = TSC.now()
        let rampEnd = start + UInt64(p.ramp * hz)
        var measureStart = start
        let end = p.runtime.map { rampEnd + UInt64($0 * hz) } ?? .max
        var clock = Clock(start: start, end: .max, period: UInt64(hz))
        var beforeIOs: UInt64 = 0, beforeBytes: UInt64 = 0
        let timeoutCycles = UInt64(p.ioTimeout * hz)
        var nextTimeoutCheck = start
        // When a signal (or another lcore's failure) asked to stop: what is still out then must
        // be back within `stopGrace`, or the device is stopped to get it back.
        var stopAskedAt: UInt64?
        let stopGrace = UInt64(0.5 * hz)
        // With --reconnect: while the device is lost nothing can complete, so --io-timeout
        // counts from its return.
        var resumedAt: UInt64 = 0

        let alternatePeriod = UInt64(p.alternatePeriod * hz)
        var nextSwitch = UInt64.max
        if p.alternate != nil {
            alternateA = (0..<queueCount).map {
                (queues[$0].directChainLimit, queues[$0].pollPacing, queues[$0].pollBatch, queues[$0].recycleInTableOrder, queues[$0].tableReserve)
            }
            phaseStart = start
            nextSwitch = start + alternatePeriod
        }
        // Fill every slot.
        for q in 0..<queueCount {
            for d in 0..<p.iodepth {
                let slot = q * p.iodepth + d
                if let next = plan(), try submit(queue: q, slot: slot, block: next.block, write: next.write) {} else {
                    idle[idleCount] = slot; idleCount += 1
                }
            }
            queues[q].commit()
        }

        while true {
            for q in 0..<queueCount { try service(queue: q) }
            guard let tick = clock.tick() else { continue }
            let now = TSC.now()
            if !measuring && now >= rampEnd {
                measuring = true; measureStart = now
            }
            if now >= nextSwitch {
                switchPhase(now: now, measuredFrom: measureStart)
                nextSwitch = now + alternatePeriod
            }
            // Slots idle because the job had issued all it should stay idle; a size limit ends the
            // job once everything issued is back.
            if issuing, p.limitBytes != nil, idleCount == slots, outstanding == 0 { issuing = false; r.seconds = Double(now - measureStart) / hz }
            for q in 0..<queueCount {
                queues[q].checkDevice()
                if let reason = queues[q].stopReason, failure == nil {
                    failure = "virtio-blk queue \(queues[q].index): \(reason)"
                    shared?.fail(failure!)
                }
            }
            if failure != nil && outstanding == 0 { break }
            let suspended = device.core.reconnectPolicy != nil && !device.core.link.isUp
            if suspended { resumedAt = now }
            if now >= nextTimeoutCheck && !suspended {
                nextTimeoutCheck = now + UInt64(hz / 20)
                if let slot = overdue(now: now, limit: timeoutCycles, since: resumedAt) {
                    let waited = Double(now - max(slotStart[slot], resumedAt)) / hz
                    abandon(String(format: "the device did not complete the %@ in %.1f s (--io-timeout %g s); %d requests outstanding",
                                   describe(slot: slot), waited, p.ioTimeout, outstanding))
                }
            }
            if tick.done || (shared?.shouldStop ?? false) {
                if stopAskedAt == nil { stopAskedAt = now }
                if outstanding > 0, now - stopAskedAt! > stopGrace, device.core.link.isUp || device.core.isReconnecting {
                    // The device sits on requests; it may not answer the stop either.
                    device.transport.limitReplyWait(seconds: 0.4)
                    abandon("stopped with \(outstanding) requests still at the device after \(String(format: "%.1f", Double(stopGrace) / hz)) s (the oldest: \(overdue(now: now, limit: 0).map { describe(slot: $0) } ?? "?"))")
                }
            }
            if failure != nil { issuing = false; verifyPass = false; continue }
            if issuing && (now >= end || tick.done || (p.limitBytes.map { bytesDone >= $0 } ?? false)) {
                issuing = false
                r.seconds = Double(now - measureStart) / hz
                if p.verify && !tick.done {
                    verifyPass = true
                    // Idle slots start the read-back.
                    let waiting = Array(UnsafeBufferPointer(start: idle, count: idleCount))
                    idleCount = 0
                    for slot in waiting {
                        if try !submitReadBack(queue: slot / p.iodepth, slot: slot) { idle[idleCount] = slot; idleCount += 1 }
                    }
                    for q in 0..<queueCount { queues[q].commit() }
                }
            }
            if !issuing && outstanding == 0 && (!verifyPass || verifyCursor >= p.blocks) { break }
            if tick.stats && measuring && printStats {
                let ios = r.reads + r.writes
                let s = tick.seconds
                print(String(format: "%@ %dk qd%d: %.0f IOPS, %.1f MiB/s, latency p50 %.1f µs p99 %.1f µs",
                             p.rw.rawValue, p.bs / 1024, p.iodepth, Double(ios - beforeIOs) / s, Double(bytesDone - beforeBytes) / s / 1_048_576,
                             Double(latency.valueAtPercentile(50)) / 1000, Double(latency.valueAtPercentile(99)) / 1000) + statsLabel)
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
        r.invalidStatus = invalidStatus
        r.firstError = firstError
        for q in 0..<queueCount { r.notifications += queues[q].notifications }
        r.alternate = alternateReport
    }
}
