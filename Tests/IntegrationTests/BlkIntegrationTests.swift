import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// A `qemu-storage-daemon` vhost-user-blk export, started and stopped by the test, on CPU 0.
final class StorageDaemon {
    enum Backend { case null(megabytes: Int), file(String) }
    let server: SocketServerProcess
    var socket: String { server.socket }

    init(_ backend: Backend, dir: TempDir, name: String = "blk", writable: Bool = true, queues: Int = 1) throws {
        let qsd = "/usr/bin/qemu-storage-daemon"
        guard FileManager.default.isExecutableFile(atPath: qsd) else { throw XCTSkip("qemu-storage-daemon is not installed (run Scripts/setup.sh)") }
        let socket = dir.path("\(name).sock")
        let blockdev: String
        switch backend {
        case .null(let mb): blockdev = "driver=null-co,node-name=disk0,size=\(mb << 20),read-zeroes=on"
        case .file(let path): blockdev = "driver=file,node-name=disk0,filename=\(path),discard=unmap"
        }
        server = try SocketServerProcess(
            socket: socket, log: dir.path("\(name).log"),
            command: [qsd, "--blockdev", blockdev, "--export",
                      "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=\(socket),writable=\(writable ? "on" : "off"),num-queues=\(queues)"],
            name: "qemu-storage-daemon")
    }

    func kill() { server.kill() }
}

/// The virtio-blk driver against qemu-storage-daemon (split ring, out of order: the daemon does
/// not offer IN_ORDER), through `vio blkio` and `vio blkbench`.
final class BlkIntegrationTests: XCTestCase {
    let noHuge = ["--memory", "nohuge", "--memory-mb", "128"]

    func image(_ dir: TempDir, megabytes: Int = 64) throws -> String {
        let path = dir.path("disk.img")
        FileManager.default.createFile(atPath: path, contents: nil)
        let h = FileHandle(forWritingAtPath: path)!
        try h.truncate(atOffset: UInt64(megabytes) << 20)
        try h.close()
        return path
    }

    /// The byte `vio blkio` writes at `offset` for `seed` (the same function as in the tool).
    func pattern(seed: UInt64, offset: UInt64) -> UInt8 {
        UInt8(truncatingIfNeeded: (offset &* 31) ^ (seed &* 131) ^ (offset >> 9))
    }

    func runBlkio(_ dev: StorageDaemon, _ commands: [String], dir: TempDir, extra: [String] = []) throws -> (VioRun, [[String: Any]]) {
        let path = dir.path("blkio-\(UUID().uuidString.prefix(6)).json")
        let r = try Vio.run(["blkio", "--dev", "vhost-user-blk:\(dev.socket)", "--json", path] + commands.flatMap { ["--cmd", $0] }
                            + noHuge + extra, dir: dir, timeout: 60, json: false)
        let results = (FileManager.default.contents(atPath: path).flatMap { try? JSONSerialization.jsonObject(with: $0) } as? [[String: Any]]) ?? []
        return (r, results)
    }

    /// Distinct patterns written at many offsets, one buffer and scattered over several, read
    /// back through the driver and, independently, from the image file; flush; write-zeroes and
    /// discard read back as zeroes.
    func dataLandsAtTheRightPlace(extra: [String]) throws {
        let dir = try TempDir()
        let img = try image(dir)
        let dev = try StorageDaemon(.file(img), dir: dir)
        let writes: [(sector: UInt64, sectors: UInt64, seed: UInt64, segments: Int)] = [
            (0, 8, 1, 1), (2048, 16, 2, 4), (10_000, 1, 3, 1), (131_064, 8, 4, 3), (50_000, 256, 5, 7), (77_777, 33, 6, 5),
        ]
        var commands = writes.map { "write \($0.sector) \($0.sectors) \($0.seed) \($0.segments)" }
        commands.append("flush")
        // Read back with a different split than the write used.
        commands += writes.map { "verify \($0.sector) \($0.sectors) \($0.seed) \($0.segments % 3 + 1)" }
        commands += ["write-zeroes 50000 64", "zero-check 50000 64", "verify 50064 192 5 2", "discard 0 8", "zero-check 0 8", "flush", "get-id"]
        let (r, results) = try runBlkio(dev, commands, dir: dir, extra: extra)
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(results.count, commands.count, "\(r)")
        for res in results {
            XCTAssertEqual(res["status"] as? String, "ok", "\(res)")
            if let m = res["mismatches"] as? Int { XCTAssertEqual(m, 0, "\(res)") }
        }
        dev.kill()
        // The image, read by the test: every byte where it belongs.
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: img)))
        XCTAssertEqual(bytes.count, 64 << 20)
        func check(_ sector: UInt64, _ sectors: UInt64, seed: UInt64?, file: StaticString = #filePath, line: UInt = #line) {
            var bad = 0
            for off in (sector * 512)..<((sector + sectors) * 512) {
                let want = seed.map { pattern(seed: $0, offset: off) } ?? 0
                if bytes[Int(off)] != want { bad += 1 }
            }
            XCTAssertEqual(bad, 0, "sectors \(sector)+\(sectors) in the image", file: file, line: line)
        }
        check(0, 8, seed: nil)                 // discarded
        check(2048, 16, seed: 2)
        check(10_000, 1, seed: 3)
        check(131_064, 8, seed: 4)             // the last 8 sectors of the device
        check(50_000, 64, seed: nil)           // write-zeroes
        check(50_064, 192, seed: 5)
        check(77_777, 33, seed: 6)
        check(2064, 64, seed: nil)             // never written
        let id = results.last?["id"] as? String
        XCTAssertNotNil(id, "get-id returned a string")
    }

    func testDataLandsAtTheRightPlaceWithIndirectDescriptors() throws { try dataLandsAtTheRightPlace(extra: []) }
    func testDataLandsAtTheRightPlaceWithDescriptorChains() throws { try dataLandsAtTheRightPlace(extra: ["--no-indirect"]) }

    /// `vio blkbench --verify` over random writes and reads: every block read back matches.
    func testBlkbenchVerifyFindsNoMismatch() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.file(try image(dir, megabytes: 32)), dir: dir)
        for rw in ["randwrite", "randrw"] {
            let r = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--rw", rw, "--bs", "4k", "--iodepth", "16",
                                 "--size", "16m", "--runtime", "2s", "--verify"] + noHuge, dir: dir, timeout: 60)
            XCTAssertEqual(r.status, 0, "\(r)")
            XCTAssertEqual(r.int("verifyErrors"), 0, "\(r)")
            XCTAssertGreaterThan(r.int("verified") ?? 0, 1000, "\(r)")
            XCTAssertGreaterThan(r.int("writes") ?? 0, 1000, "\(r)")
            XCTAssertEqual(r.int("errors"), 0)
            XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0)
        }
    }

    /// `--alternate`: the layout of requests switches every 5 ms while they are in flight (direct
    /// chains and indirect tables; descriptors reused oldest or newest first) and every block read
    /// back still matches; both phases ran and their I/Os add up to no more than the run's.
    func testBlkbenchAlternateKeepsDataAndCountsBothPhases() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.file(try image(dir, megabytes: 32)), dir: dir)
        for setting in ["direct-chain-limit=1", "table-order=off"] {
            let r = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--rw", "randrw", "--bs", "4k", "--iodepth", "32",
                                 "--size", "16m", "--runtime", "2s", "--verify", "--alternate", setting, "--alternate-period", "5ms"] + noHuge,
                                dir: dir, timeout: 60)
            XCTAssertEqual(r.status, 0, "\(r)")
            XCTAssertEqual(r.int("verifyErrors"), 0, "\(r)")
            XCTAssertGreaterThan(r.int("verified") ?? 0, 1000, "\(r)")
            XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0)
            let alt = r.json?["alternate"] as? [String: Any] ?? [:]
            XCTAssertEqual(alt["setting"] as? String, setting, "\(r)")
            let a = (alt["aIOs"] as? NSNumber)?.intValue ?? 0, b = (alt["bIOs"] as? NSNumber)?.intValue ?? 0
            XCTAssertGreaterThan((alt["phases"] as? NSNumber)?.intValue ?? 0, 100, "\(r)")
            XCTAssertGreaterThan(a, 1000, "\(r)"); XCTAssertGreaterThan(b, 1000, "\(r)")
            XCTAssertLessThanOrEqual(a + b, (r.int("reads") ?? 0) + (r.int("writes") ?? 0), "\(r)")
        }
        let bad = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--alternate", "queue-size=64"] + noHuge, dir: dir, timeout: 60, json: false)
        XCTAssertEqual(bad.status, 64, "\(bad)")
        XCTAssertTrue(bad.stderr.contains("queue-size=64"), "\(bad)")
    }

    /// Without --queue-size, blkbench sizes a vhost-user ring to hold --iodepth requests as direct
    /// chains (4 x iodepth, from 256 up to 1024); --queue-size decides when given.
    func testBlkbenchSizesTheRingToTheDepth() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.null(megabytes: 64), dir: dir)
        for (args, size) in [(["--iodepth", "1"], 256), (["--iodepth", "128"], 512), (["--iodepth", "1000"], 1024),
                             (["--iodepth", "128", "--queue-size", "128"], 128)] {
            let r = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--rw", "randread", "--size", "8m", "--runtime", "0.3s"]
                                + args + noHuge, dir: dir, timeout: 60)
            XCTAssertEqual(r.status, 0, "\(r)")
            XCTAssertEqual(r.int("queueSize"), size, "\(args): \(r)")
            XCTAssertGreaterThan(r.int("reads") ?? 0, 100, "\(r)")
        }
    }

    /// A job file drives blkbench; sizes-based run ends by itself.
    func testBlkbenchJobFileAndSizeLimit() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.null(megabytes: 1024), dir: dir)
        let job = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Configs/blk/seqread-128k-qd8.toml").path
        let r = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--job", job, "--runtime", "1s", "--ramp-time", "0s"]
                            + noHuge, dir: dir, timeout: 60)
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.json?["bs"] as? Int, 131072)
        XCTAssertEqual(r.json?["iodepth"] as? Int, 8)
        XCTAssertGreaterThan(r.int("reads") ?? 0, 100)
        let sized = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--rw", "read", "--bs", "64k", "--iodepth", "4",
                                 "--size", "8m"] + noHuge, dir: dir, timeout: 60)
        XCTAssertEqual(sized.status, 0, "\(sized)")
        XCTAssertEqual(sized.int("reads"), 128, "8 MiB in 64 KiB reads: \(sized)")
    }

    func testOutOfRangeIsRejectedAndNothingIsWritten() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.file(try image(dir)), dir: dir)
        let (r, results) = try runBlkio(dev, ["write 131072 8 1", "write 131070 8 1", "verify 131064 8 0", "zero-check 131064 8"], dir: dir)
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(results.count, 4)
        XCTAssertEqual(results[0]["status"] as? String, "rejected")
        XCTAssertTrue((results[0]["error"] as? String ?? "").contains("past the capacity"), "\(results[0])")
        XCTAssertEqual(results[1]["status"] as? String, "rejected")
        XCTAssertEqual(results[3]["status"] as? String, "ok")
        XCTAssertEqual(results[3]["mismatches"] as? Int, 0, "nothing landed at the end of the device")
    }

    func testReadOnlyExportRejectsWrites() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.file(try image(dir)), dir: dir, writable: false)
        let (r, results) = try runBlkio(dev, ["write 0 8 1", "zero-check 0 8", "write-zeroes 0 8"], dir: dir)
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(results[0]["status"] as? String, "rejected")
        XCTAssertTrue((results[0]["error"] as? String ?? "").contains("read-only"), "\(results[0])")
        XCTAssertEqual(results[1]["status"] as? String, "ok")
        XCTAssertEqual(results[2]["status"] as? String, "rejected")
        XCTAssertTrue(r.stderr.contains("RO"), "RO negotiated and logged: \(r.stderr)")
    }

    /// The daemon is killed with 32 requests in flight: every one comes back failed, the tool
    /// exits with status 2 and a clear message, nothing hangs, no slot is left out.
    func testBackendKilledWithRequestsInFlight() throws { try backendKilled(queues: 1, lcores: nil) }

    /// The daemon dies under two lcores' queues: the queue that notices stops the device, the
    /// other lcore's queue fails its requests too (one link), and the run ends with status 2,
    /// promptly.
    func testBackendKilledUnderTwoLcores() throws { try backendKilled(queues: 2, lcores: "0,1") }

    func backendKilled(queues: Int, lcores: String?) throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.null(megabytes: 1024), dir: dir, queues: queues)
        let depth = 32 / queues
        let spread = lcores.map { ["--queues", "\(queues)", "--lcores", $0] } ?? []
        let vio = try Vio(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--rw", "randread", "--bs", "4k", "--iodepth", "\(depth)",
                           "--runtime", "60s"] + spread + noHuge, dir: dir, cpus: lcores ?? "1")
        XCTAssertTrue(vio.waitForOutput("IOPS"), "blkbench never reported progress")
        dev.kill()
        let killed = Date()
        let r = vio.wait(timeout: 15)
        XCTAssertFalse(r.timedOut, "blkbench hung after the daemon died: \(r)")
        XCTAssertLessThan(Date().timeIntervalSince(killed), 5)
        XCTAssertEqual(r.status, 2, "\(r)")
        XCTAssertTrue(r.stderr.contains("hung up") || r.stderr.contains("disconnect"), r.stderr)
        XCTAssertGreaterThan(r.int("failedInFlight") ?? 0, queues > 1 ? depth : 0, "every queue's requests failed: \(r)")
        XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(r)")
    }

    func testMissingDeviceSocket() throws {
        let dir = try TempDir()
        let r = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dir.path("none.sock"))"] + noHuge, dir: dir, json: false)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("does not exist"), r.stderr)
    }

    /// Two queues, each with its own ring and requests, polled from one lcore; all I/O verified.
    func testTwoQueues() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.file(try image(dir, megabytes: 32)), dir: dir, queues: 2)
        let r = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--rw", "randrw", "--queues", "2", "--iodepth", "8",
                             "--size", "16m", "--runtime", "2s", "--verify"] + noHuge, dir: dir, timeout: 60)
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.json?["queues"] as? Int, 2, "\(r)")
        XCTAssertTrue((r.json?["features"] as? String ?? "").contains("MQ"))
        XCTAssertEqual(r.int("verifyErrors"), 0)
        XCTAssertGreaterThan(r.int("verified") ?? 0, 100)
    }

    /// `--queues 2 --lcores 0,1`: one lcore per queue, each on its own half of the region; every
    /// read of a written block verified, every written block read back.
    func testTwoQueuesOnTwoLcores() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.file(try image(dir, megabytes: 32)), dir: dir, queues: 2)
        let r = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--rw", "randrw", "--queues", "2", "--lcores", "0,1",
                             "--iodepth", "8", "--size", "16m", "--runtime", "2s", "--verify"] + noHuge, dir: dir, timeout: 60, cpus: "0,1")
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.json?["queues"] as? Int, 2, "\(r)")
        XCTAssertEqual(r.json?["lcores"] as? Int, 2, "\(r)")
        XCTAssertEqual(r.int("verifyErrors"), 0)
        XCTAssertGreaterThan(r.int("verified") ?? 0, 100)
        XCTAssertGreaterThan(r.int("reads") ?? 0, 100)
        XCTAssertGreaterThan(r.int("writes") ?? 0, 100)
        XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(r)")
    }

    /// EVENT_IDX and indirect descriptors are negotiated with qemu-storage-daemon, IN_ORDER is
    /// not offered (so the out-of-order ring path carries blk).
    func testNegotiatedFeatures() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.null(megabytes: 64), dir: dir)
        let r = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--runtime", "0.2s"] + noHuge, dir: dir, timeout: 60)
        XCTAssertEqual(r.status, 0, "\(r)")
        let f = r.json?["features"] as? String ?? ""
        for name in ["VERSION_1", "EVENT_IDX", "INDIRECT_DESC", "SEG_MAX", "FLUSH", "DISCARD", "WRITE_ZEROES"] {
            XCTAssertTrue(f.contains(name), "\(name) in \(f)")
        }
        XCTAssertFalse(f.contains("IN_ORDER"), f)
        // The daemon does not offer RING_PACKED, so `--ring auto` (the default) takes split.
        XCTAssertFalse(f.contains("RING_PACKED"), f)
        XCTAssertEqual(r.json?["ring"] as? String, "split", "\(r)")
    }

    /// A packed ring forced on a device that does not offer one is refused before any I/O.
    func testForcedPackedRingNotOffered() throws {
        let dir = try TempDir()
        let dev = try StorageDaemon(.null(megabytes: 64), dir: dir)
        let r = try Vio.run(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--runtime", "0.2s", "--ring", "packed"] + noHuge,
                            dir: dir, timeout: 60, json: false)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("does not offer packed virtqueues"), r.stderr)
        let bad = try Vio.run(["blkio", "--dev", "vhost-user-blk:\(dev.socket)", "--cmd", "flush", "--ring", "ring"] + noHuge,
                              dir: dir, timeout: 60, json: false)
        XCTAssertEqual(bad.status, 64, "\(bad)")
    }
}
