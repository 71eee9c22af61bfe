import ArgumentParser
import DPDK
import Foundation
import VirtioBlk
import VirtioCore

/// The byte `vio blkio` writes at absolute device offset `offset` for pattern `seed`. Tests that
/// read the backing image compute the same function.
@inline(__always) func blkPattern(seed: UInt64, offset: UInt64) -> UInt8 {
    UInt8(truncatingIfNeeded: (offset &* 31) ^ (seed &* 131) ^ (offset >> 9))
}

struct BlkioResult: Codable {
    var command: String
    var status: String
    var error: String?
    var mismatches: Int?
    var id: String?
}

/// `vio blkio`: single requests, one after another, for tests and inspection (like qemu-io).
struct Blkio: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run single virtio-blk requests in order and report each result.",
        discussion: """
        Commands (sectors are 512 bytes; SEGMENTS splits the data into that many scattered buffers):
          write SECTOR SECTORS SEED [SEGMENTS]    write a pattern derived from SEED and the offset
          verify SECTOR SECTORS SEED [SEGMENTS]   read and compare with that pattern
          zero-check SECTOR SECTORS               read and check every byte is zero
          flush | discard SECTOR SECTORS | write-zeroes SECTOR SECTORS [unmap] | get-id
        """)

    @OptionGroup var blk: BlkOptions
    @Option(name: .customLong("cmd"), help: "A command (repeatable, run in order).")
    var commands: [String] = []
    @Option(help: "Write the results as JSON to this file.")
    var json: String?

    func validate() throws {
        if blk.dev == nil { throw ValidationError("give --dev vhost-user-blk:PATH") }
        if commands.isEmpty { throw ValidationError("give at least one --cmd") }
    }

    func run() throws { try reportingFailures { try execute() } }

    func execute() throws {
        installStopHandler()
        let setup = try BlkSetup(blk, queues: 1)
        try setup.open(Run(blkio: self))
        EAL.cleanup()
    }

    struct Run: VirtioBlkDeviceBody {
        let blkio: Blkio
        func run<Ring: Virtqueue & ~Copyable>(_ device: VirtioBlkDevice<Ring>) throws { try blkio.execute(device) }
    }

    func execute<Ring: Virtqueue & ~Copyable>(_ device: VirtioBlkDevice<Ring>) throws {
        var q = device.makeQueue(0)
        let arena = try DMAMemory(size: 8 << 20)
        let completions = UnsafeMutablePointer<BlkCompletion>.allocate(capacity: 8)
        defer { completions.deallocate() }
        var results: [BlkioResult] = []
        var tag: UInt64 = 0
        /// A device fault (a lost request, an invalid status byte, a broken ring): ends the run, status 2.
        var fault: String?
        for text in commands {
            let w = text.split(separator: " ").map(String.init)
            var r = BlkioResult(command: text, status: "ok")
            func num(_ i: Int) -> UInt64? { w.count > i ? UInt64(w[i]) : nil }
            do {
                tag += 1
                var check: (() -> Int)?
                switch w.first ?? "" {
                case "write", "verify", "zero-check":
                    guard let sector = num(1), let sectors = num(2), sectors > 0 else { throw VioFailure(description: "usage: \(w[0]) SECTOR SECTORS ...") }
                    let seed = w[0] == "zero-check" ? 0 : (num(3) ?? 0)
                    let segs = Int(num(w[0] == "zero-check" ? 3 : 4) ?? 1)
                    let bytes = Int(sectors) * blkSectorSize
                    let buffers = scatter(arena, bytes: bytes, segments: segs)
                    if w[0] == "write" {
                        var off = sector * 512
                        for b in buffers {
                            for i in 0..<b.length { b.address.storeBytes(of: blkPattern(seed: seed, offset: off + UInt64(i)), toByteOffset: i, as: UInt8.self) }
                            off += UInt64(b.length)
                        }
                        try buffers.withUnsafeBufferPointer { (p) throws(BlkRequestError) in try q.write(sector: sector, from: p, tag: tag) }
                    } else {
                        for b in buffers { b.address.initializeMemory(as: UInt8.self, repeating: 0xA5, count: b.length) }
                        try buffers.withUnsafeBufferPointer { (p) throws(BlkRequestError) in try q.read(sector: sector, into: p, tag: tag) }
                        let zero = w[0] == "zero-check"
                        check = {
                            var bad = 0
                            var off = sector * 512
                            for b in buffers {
                                for i in 0..<b.length {
                                    let want = zero ? 0 : blkPattern(seed: seed, offset: off + UInt64(i))
                                    if b.address.load(fromByteOffset: i, as: UInt8.self) != want { bad += 1 }
                                }
                                off += UInt64(b.length)
                            }
                            return bad
                        }
                    }
                case "flush": try q.flush(tag: tag)
                case "discard":
                    guard let s = num(1), let n = num(2) else { throw VioFailure(description: "usage: discard SECTOR SECTORS") }
                    try q.discard(sector: s, sectors: UInt32(n), tag: tag)
                case "write-zeroes":
                    guard let s = num(1), let n = num(2) else { throw VioFailure(description: "usage: write-zeroes SECTOR SECTORS [unmap]") }
                    try q.writeZeroes(sector: s, sectors: UInt32(n), unmap: w.count > 3 && w[3] == "unmap", tag: tag)
                case "get-id":
                    arena.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: 20)
                    try q.getID(into: BlkBuffer(arena.pointer, length: 20), tag: tag)
                default:
                    throw VioFailure(description: "unknown command: \(text)")
                }
                q.commit()
                guard let c = waitFor(&q, tag: tag, completions) else {
                    if stopRequested.load(ordering: .relaxed) { device.transport.limitReplyWait(seconds: 0.4) }
                    let why = q.stopReason.map { "the queue stopped: \($0)" }
                        ?? (stopRequested.load(ordering: .relaxed) ? "interrupted before it completed"
                                                                   : "no completion within \(blk.ioTimeout) (--io-timeout)")
                    r.status = "failed"; r.error = why
                    fault = "\(text): \(why)"
                    print("\(text): failed (\(why))")
                    results.append(r)
                    break
                }
                r.status = c.status.description
                if case .badStatus = c.status { fault = "\(text): the device returned \(c.status)" }
                if c.status == .ok {
                    if let check { r.mismatches = check() }
                    if w[0] == "get-id" {
                        let bytes = (0..<20).map { arena.pointer.load(fromByteOffset: $0, as: UInt8.self) }.prefix { $0 != 0 }
                        r.id = String(decoding: bytes, as: UTF8.self)
                    }
                }
            } catch let e as BlkRequestError {
                r.status = "rejected"; r.error = e.description
            } catch let f as VioFailure {
                r.status = "failed"; r.error = f.description
            }
            print("\(text): \(r.status)\(r.error.map { " (\($0))" } ?? "")\(r.mismatches.map { ", \($0) mismatched bytes" } ?? "")\(r.id.map { ", id \"\($0)\"" } ?? "")")
            results.append(r)
            if fault != nil { break }
            if q.isStopped { fault = "\(text): the queue stopped: \(q.stopReason ?? "")"; break }
        }
        device.stop()
        try writeJSON(results, to: json)
        if let fault { throw VioFailure(description: fault, exitCode: 2) }
        if let s = device.core.stopFailure { throw VioFailure(description: "stopping the device: \(s)", exitCode: 2) }
    }

    /// `segments` buffers of together `bytes`, spread over the arena with gaps between them.
    func scatter(_ arena: DMAMemory, bytes: Int, segments: Int) -> [BlkBuffer] {
        let n = max(1, min(segments, bytes))
        var out: [BlkBuffer] = []
        var offset = 0
        var left = bytes
        for k in 0..<n {
            // Uneven pieces: the first gets the remainder.
            let len = k == 0 ? bytes - (bytes / n) * (n - 1) : bytes / n
            out.append(BlkBuffer(arena.pointer + offset, length: len))
            offset += len + 4096 + 64 * k
            left -= len
        }
        precondition(left == 0 && offset <= arena.size, "scatter does not fit the arena")
        return out
    }

    /// The completion of `tag`, or nil when the queue stopped or `--io-timeout` (or a signal)
    /// ended the wait.
    func waitFor<Ring: Virtqueue & ~Copyable>(_ q: inout VirtioBlkQueue<Ring>, tag: UInt64, _ out: UnsafeMutablePointer<BlkCompletion>) -> BlkCompletion? {
        let timeout = UInt64(blk.ioTimeout.value * Double(TSC.hz))
        var deadline = TSC.now() + timeout
        while TSC.now() < deadline && !stopRequested.load(ordering: .relaxed) {
            let n = q.poll(into: out, max: 8)
            for i in 0..<n where out[i].tag == tag { return out[i] }
            if n == 0 { q.checkDevice(); if q.isStopped { return nil } }
            // With --reconnect the request waits for the device to come back (it is submitted
            // again then); --io-timeout counts from its return.
            if q.isSuspended { deadline = TSC.now() + timeout }
        }
        return nil
    }
}
