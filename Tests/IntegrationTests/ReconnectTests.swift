import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// `--reconnect` and server mode against real backends that the tests kill (`kill -9`) and start
/// again: dpdk-testpmd's net_vhost (client and server mode), qemu-storage-daemon on a file, and
/// the suite's hostile device for a backend that comes back with fewer features.
final class ReconnectTests: XCTestCase {
    let noHuge = ["--memory", "nohuge", "--memory-mb", "128"]

    func outages(_ r: VioRun, port: Bool = false) -> [[String: Any]] {
        let source = port ? r.port(0) : r.json
        return source?["outages"] as? [[String: Any]] ?? []
    }

    /// Client mode: testpmd (macswap) is killed during pktgen and a new one is started on the
    /// same socket path. pktgen keeps running, reports one outage, and every frame sent while the
    /// link was up comes back: what was lost is exactly what was in flight at the loss.
    func testNetClientModeRidesThroughAPeerKill() throws {
        let dir = try TempDir()
        let socket = dir.path("net.sock")
        let first = try Peer(mode: "macswap", dir: dir, name: "first", socket: socket)
        let vio = try Vio(["pktgen", "--port", "vhost:\(socket)", "--duration", "9", "--window", "auto", "--expect-macswap",
                           "--reconnect=30s"] + noHuge, dir: dir)
        XCTAssertTrue(vio.waitForOutput("port 0: rx", timeout: 30), "no traffic: \(vio.stdoutSoFar)")
        Thread.sleep(forTimeInterval: 1)
        first.kill()
        XCTAssertTrue(vio.waitForOutput("link down", timeout: 10), "the loss was not reported: \(vio.stdoutSoFar)")
        // The killed backend leaves its socket file; testpmd will not bind over it.
        unlink(socket)
        let second = try Peer(mode: "macswap", dir: dir, name: "second", socket: socket)
        defer { second.kill() }
        let r = vio.wait(timeout: 60)
        XCTAssertEqual(r.status, 0, "\(r)\nsecond peer: \(second.tail())")
        let o = outages(r)
        XCTAssertEqual(o.count, 1, "\(r)")
        XCTAssertEqual(o.first?["recovered"] as? Bool, true, "\(r)")
        XCTAssertEqual(r.int("lostWhileUp"), 0, "every frame sent while the link was up came back: \(r)")
        XCTAssertEqual(r.int("lost"), r.int("lostInOutages"), "\(r)")
        XCTAssertGreaterThan(r.int("received") ?? 0, 10_000, "\(r)")
        XCTAssertEqual(r.int("corrupt"), 0, "\(r)")
        XCTAssertEqual(r.int("macMismatch"), 0, "frames after the reconnect went through the new peer: \(r)")
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
        // Traffic after the reconnect: the second peer forwarded frames.
        let stats = try second.stop()
        XCTAssertGreaterThan(stats.rx, 1000, "\(second.tail())")
        XCTAssertTrue(r.stdout.contains("outages 1"), "\(r)")
    }

    /// fwd (txonly, one port) through a peer kill and restart: it keeps running, reports one
    /// recovered outage and what was offered while the link was down, forwards again after it,
    /// and every mbuf is back at the end.
    func testFwdKeepsRunningThroughAPeerKill() throws {
        let dir = try TempDir()
        let socket = dir.path("fwd.sock")
        let first = try Peer(mode: "macswap", dir: dir, name: "first", socket: socket)
        let vio = try Vio(["fwd", "--port", "vhost:\(socket)", "--mode", "txonly", "--duration", "8", "--reconnect=30s"] + noHuge, dir: dir)
        XCTAssertTrue(vio.waitForOutput("port 0: rx", timeout: 30), "\(vio.stdoutSoFar)")
        Thread.sleep(forTimeInterval: 1)
        first.kill()
        XCTAssertTrue(vio.waitForOutput("link down", timeout: 10), "\(vio.stdoutSoFar)")
        unlink(socket)
        let second = try Peer(mode: "macswap", dir: dir, name: "second", socket: socket)
        defer { second.kill() }
        let r = vio.wait(timeout: 60)
        XCTAssertEqual(r.status, 0, "\(r)")
        let o = outages(r, port: true)
        XCTAssertEqual(o.count, 1, "\(r)")
        XCTAssertEqual(o.first?["recovered"] as? Bool, true, "\(r)")
        XCTAssertGreaterThan(r.port(0)?["txLinkDown"] as? Int ?? 0, 0, "frames offered while the link was down are counted: \(r)")
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
        let stats = try second.stop()
        XCTAssertGreaterThan(stats.rx, 10_000, "fwd sent through the new peer: \(second.tail())")
        XCTAssertTrue(r.stdout.contains("port 0 outages 1"), "\(r)")
    }

    /// Server mode: vio listens; testpmd (client=1) connects, is killed and started again ten
    /// times in a row. Every restart is one recovered outage; no mbuf and no file descriptor is
    /// leaked (vio's /proc/PID/fd is counted with the first backend and with the last); a second
    /// backend connecting while one is connected is refused and the first keeps working.
    func testNetServerModeTenPeerRestartsLeakNothing() throws {
        let dir = try TempDir()
        let socket = dir.path("server.sock")
        let vio = try Vio(["pktgen", "--port", "vhost-server:\(socket)", "--duration", "600", "--window", "auto", "--expect-macswap",
                           "--reconnect=60s", "--stats-period", "0.5"] + noHuge, dir: dir)
        defer { if vio.process.isRunning { vio.signal(SIGKILL) } }
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: socket) {
            guard Date() < deadline, vio.process.isRunning else { XCTFail("vio did not create \(socket): \(vio.wait(timeout: 5))"); return }
            usleep(20_000)
        }
        var fdsWithFirstBackend = 0
        for round in 1...10 {
            let peer = try Peer(mode: "macswap", dir: dir, name: "client\(round)", socket: socket, client: true)
            XCTAssertTrue(vio.waitForCount("a backend connected", round, timeout: 30), "round \(round): no connection: \(vio.stderrSoFar.suffix(2000))\n\(peer.tail())")
            // Traffic flows through this backend before it is killed.
            let before = vio.stdoutSoFar.components(separatedBy: "link up").count
            XCTAssertTrue(vio.waitForCount("link up", before + 2, timeout: 20), "round \(round): \(vio.stdoutSoFar.suffix(1500))")
            if round == 1 { fdsWithFirstBackend = vio.openDescriptors }
            if round == 5 {
                // A second backend while one is connected: refused, the first one carries on.
                let intruder = try Peer(mode: "macswap", dir: dir, name: "intruder", socket: socket, client: true)
                let refused = vio.waitForCount("refused a second backend connection", 1, timeout: 20)
                intruder.kill()
                XCTAssertTrue(refused, "\(vio.stderrSoFar.suffix(2000))")
                let now = vio.stdoutSoFar.components(separatedBy: "link up").count
                XCTAssertTrue(vio.waitForCount("link up", now + 1, timeout: 10), "the connected backend kept working")
            }
            if round == 10 {
                // The last backend stays; descriptors are as many as with the first.
                XCTAssertEqual(vio.openDescriptors, fdsWithFirstBackend, "file descriptors leaked over 10 reconnects")
                vio.signal(SIGINT)
                let r = vio.wait(timeout: 30)
                peer.kill()
                XCTAssertEqual(r.status, 0, "\(r)")
                let o = outages(r)
                XCTAssertEqual(o.count, 9, "\(r)")
                XCTAssertTrue(o.allSatisfy { $0["recovered"] as? Bool == true }, "\(r)")
                XCTAssertEqual(r.int("lostWhileUp"), 0, "\(r)")
                XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
                XCTAssertEqual(r.int("macMismatch"), 0, "\(r)")
                XCTAssertFalse(FileManager.default.fileExists(atPath: socket), "vio removes its socket at exit")
            } else {
                peer.kill()
                XCTAssertTrue(vio.waitForCount("frames lost so far in outages", round, timeout: 10), "round \(round): \(vio.stdoutSoFar.suffix(1500))")
            }
        }
    }

    /// blk: `blkbench --verify --reconnect` randwrite on a file-backed export while
    /// qemu-storage-daemon is killed and started again on the same image. No mismatch; the
    /// requests in flight are submitted again; and every write blkbench counted is in the image
    /// file: each block's sectors carry the block and the generation last written (read here
    /// from the file, against blkbench's manifest).
    func testBlkVerifyRandwriteThroughADaemonKill() throws {
        let dir = try TempDir()
        let img = dir.path("disk.img")
        FileManager.default.createFile(atPath: img, contents: nil)
        let h = FileHandle(forWritingAtPath: img)!
        try h.truncate(atOffset: 64 << 20)
        try h.close()
        let first = try StorageDaemon(.file(img), dir: dir, name: "blk")
        let manifest = dir.path("manifest.txt")
        let vio = try Vio(["blkbench", "--dev", "vhost-user-blk:\(first.socket)", "--rw", "randwrite", "--bs", "4k", "--iodepth", "16",
                           "--size", "32m", "--runtime", "7s", "--verify", "--reconnect=30s", "--verify-manifest", manifest] + noHuge, dir: dir)
        XCTAssertTrue(vio.waitForOutput("IOPS", timeout: 30), "\(vio.stdoutSoFar)")
        Thread.sleep(forTimeInterval: 1)
        first.kill()
        Thread.sleep(forTimeInterval: 0.5)
        let second = try StorageDaemon(.file(img), dir: dir, name: "blk")
        defer { second.kill() }
        let r = vio.wait(timeout: 90)
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.int("verifyErrors"), 0, "\(r)")
        XCTAssertGreaterThan(r.int("verified") ?? 0, 1000, "\(r)")
        XCTAssertEqual(r.int("failedInFlight"), 0, "\(r)")
        XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(r)")
        // qemu-storage-daemon 7.2 does not offer INFLIGHT_SHMFD (protocol features 0x8f2b), so vio
        // submits what was in flight again itself; a backend that tracks it would resume it.
        if r.json?["inflightTracking"] as? Bool == true {
            XCTAssertEqual(r.int("resubmitted"), 0, "\(r)")
        } else {
            XCTAssertGreaterThan(r.int("resubmitted") ?? 0, 0, "requests in flight at the kill went out again: \(r)")
        }
        let o = outages(r)
        XCTAssertEqual(o.count, 1, "\(r)")
        XCTAssertEqual(o.first?["recovered"] as? Bool, true, "\(r)")
        second.kill()
        // The image itself, read from the file: every block in the manifest holds its last write.
        let lines = try String(contentsOfFile: manifest, encoding: .utf8).split(separator: "\n").filter { !$0.hasPrefix("#") }
        XCTAssertGreaterThan(lines.count, 1000)
        let file = try Data(contentsOf: URL(fileURLWithPath: img))
        var wrong = 0
        for line in lines {
            let f = line.split(separator: " ")
            let sector = Int(f[0])!, gen = UInt64(f[1])!
            let block = UInt64(sector / 8)
            for s in 0..<8 {
                let at = (sector + s) * 512
                let (b, g) = file.withUnsafeBytes { ($0.loadUnaligned(fromByteOffset: at, as: UInt64.self), $0.loadUnaligned(fromByteOffset: at + 8, as: UInt64.self)) }
                if b != block || g != gen { wrong += 1 }
            }
        }
        XCTAssertEqual(wrong, 0, "sectors of completed writes missing from the image")
    }

    /// A backend that comes back without a feature negotiated before (here the packed ring): the
    /// run ends with exit status 1, naming the feature.
    func testBackendBackWithFewerFeaturesEndsTheRun() throws {
        let dir = try TempDir()
        let first = try HostileDevice("net", dir: dir, packed: true, name: "dev")
        let vio = try Vio(["pktgen", "--port", "vhost:\(first.socket)", "--duration", "30", "--window", "auto", "--reconnect=20s"] + noHuge, dir: dir)
        XCTAssertTrue(vio.waitForOutput("port 0: rx", timeout: 30), "\(vio.stdoutSoFar)")
        first.kill()
        unlink(first.socket)
        let second = try HostileDevice("net", dir: dir, packed: false, name: "dev")
        defer { second.kill() }
        let started = Date()
        let r = vio.wait(timeout: 30)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("came back without features negotiated before") && r.stderr.contains("RING_PACKED"), "\(r)")
        XCTAssertLessThan(Date().timeIntervalSince(started), 15, "\(r)")
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
    }

    /// A backend that does not come back within --reconnect: exit status 2 with the time waited;
    /// net returns every mbuf, blk fails what was in flight with the device (`.deviceGone`) and
    /// leaves no slot behind.
    func testReconnectTimeoutEndsTheRunWithTheTimeWaited() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir, name: "gone")
        var vio = try Vio(["pktgen", "--port", "vhost:\(peer.socket)", "--duration", "60", "--window", "auto", "--reconnect=2s"] + noHuge, dir: dir, name: "net")
        XCTAssertTrue(vio.waitForOutput("port 0: rx", timeout: 30))
        peer.kill()
        var started = Date()
        var r = vio.wait(timeout: 30)
        XCTAssertEqual(r.status, 2, "\(r)")
        XCTAssertTrue(r.stderr.contains("did not come back within 2.0 s (waited 2."), "\(r)")
        XCTAssertLessThan(Date().timeIntervalSince(started), 8, "\(r)")
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
        XCTAssertEqual(outages(r).first?["recovered"] as? Bool, false, "\(r)")

        let img = dir.path("t.img")
        FileManager.default.createFile(atPath: img, contents: nil)
        let h = FileHandle(forWritingAtPath: img)!
        try h.truncate(atOffset: 16 << 20)
        try h.close()
        let daemon = try StorageDaemon(.file(img), dir: dir, name: "gone-blk")
        vio = try Vio(["blkbench", "--dev", "vhost-user-blk:\(daemon.socket)", "--rw", "randwrite", "--iodepth", "8", "--runtime", "60s",
                       "--reconnect=1s"] + noHuge, dir: dir, name: "blk")
        XCTAssertTrue(vio.waitForOutput("IOPS", timeout: 30))
        daemon.kill()
        started = Date()
        r = vio.wait(timeout: 30)
        XCTAssertEqual(r.status, 2, "\(r)")
        XCTAssertTrue(r.stderr.contains("did not come back within 1.0 s"), "\(r)")
        XCTAssertLessThan(Date().timeIntervalSince(started), 8, "\(r)")
        XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(r)")
        XCTAssertGreaterThan(r.int("failedInFlight") ?? 0, 0, "\(r)")
    }
}
