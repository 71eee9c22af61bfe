import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// The virtio-net driver against a real device: DPDK's vhost-user backend in `dpdk-testpmd`,
/// started and stopped by each test. The driver runs as the `vio` binary (one EAL per process),
/// so each test can pick its memory mode.
/// These run the split ring (`--ring split`); PackedNetIntegrationTests runs the packed one.
final class NetIntegrationTests: XCTestCase {
    let noHuge = ["--memory", "nohuge", "--memory-mb", "128", "--ring", "split"]

    /// 100 000 frames of 60…1514 bytes, each numbered and checksummed, come back from a macswap
    /// peer complete, in order, intact and with swapped MACs; every mbuf is back in the pool.
    func testEchoOfMixedSizesThroughMacswapPeer() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        let r = try Vio.run(["pktgen", "--port", "vhost:\(peer.socket)", "--count", "100000", "--size", "mixed",
                             "--verify", "--window", "auto", "--expect-macswap"] + noHuge, dir: dir, timeout: 120)
        assertCleanEcho(r, count: 100_000, ring: "split")
        let stats = try peer.stop()
        XCTAssertEqual(stats.rx, 100_000, peer.tail())
        XCTAssertEqual(stats.tx, 100_000, peer.tail())
    }

    // MARK: Index wrap: > 65 536 buffers through a 256-entry ring, in and out of order, both memories

    func wrap(inOrder: Bool, hugepages: Bool) throws {
        if hugepages && !Tools.hugepagesAvailable { throw XCTSkip("no free hugepages (Scripts/setup.sh reserves them)") }
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        var args = ["pktgen", "--port", "vhost:\(peer.socket)", "--count", "70000", "--size", "64", "--ring-size", "256",
                    "--window", "auto", "--expect-macswap"]
        args += hugepages ? ["--memory", "hugepages", "--memory-mb", "256", "--ring", "split"] : noHuge
        if !inOrder { args.append("--no-in-order") }
        let r = try Vio.run(args, dir: dir, timeout: 120)
        assertCleanEcho(r, count: 70_000, ring: "split")
        let features = r.port(0)?["features"] as? String ?? ""
        XCTAssertEqual(features.contains("IN_ORDER"), inOrder, features)
        XCTAssertFalse(features.contains("RING_PACKED"), features)
        XCTAssertEqual(r.port(0)?["ring"] as? String, "split")
        XCTAssertEqual(r.json?["memory"] as? String, hugepages ? "hugepages" : "nohuge")
        _ = try peer.stop()
    }

    func testIndexWrapInOrderHugepages() throws { try wrap(inOrder: true, hugepages: true) }
    func testIndexWrapOutOfOrderHugepages() throws { try wrap(inOrder: false, hugepages: true) }
    func testIndexWrapInOrderNoHuge() throws { try wrap(inOrder: true, hugepages: false) }
    func testIndexWrapOutOfOrderNoHuge() throws { try wrap(inOrder: false, hugepages: false) }

    /// A 9000-byte frame goes out as a chained mbuf and comes back through MRG_RXBUF as a chain
    /// of several mbufs with every byte intact.
    func testJumboFramesThroughMergeableRxBuffers() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        let r = try Vio.run(["pktgen", "--port", "vhost:\(peer.socket)", "--count", "500", "--size", "9000",
                             "--verify", "--window", "auto", "--expect-macswap"] + noHuge, dir: dir)
        assertCleanEcho(r, count: 500, ring: "split")
        XCTAssertGreaterThanOrEqual(r.int("maxSegments") ?? 0, 5, "\(r)")
        XCTAssertTrue((r.port(0)?["features"] as? String ?? "").contains("MRG_RXBUF"))
        _ = try peer.stop()
    }

    /// `vio fwd --mode io` between two peers: what peer A sends reaches peer B, and peer B's own
    /// counters confirm it (up to one ring still queued when vio stops).
    func testTwoPortIOForwarding() throws {
        try assertTwoPortIO(ring: "split", seconds: 3, memory: ["--memory", "nohuge", "--memory-mb", "128"], atLeast: 100_000, exactSink: false)
    }

    /// txonly against an rxonly peer: the peer counts what we say we sent.
    func testTxOnlyCountsMatchPeer() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "rxonly", dir: dir)
        let r = try Vio.run(["fwd", "--mode", "txonly", "--port", "vhost:\(peer.socket)", "--duration", "2", "--size", "128"]
                            + noHuge, dir: dir)
        XCTAssertEqual(r.status, 0, "\(r)")
        let tx = (r.port(0)?["txPackets"] as? NSNumber)?.uint64Value ?? 0
        XCTAssertGreaterThan(tx, 100_000)
        XCTAssertEqual((r.port(0)?["txBytes"] as? NSNumber)?.uint64Value, tx * 128)
        XCTAssertTrue(r.stdout.contains("Mpps"), "periodic stats lines: \(r.stdout.prefix(500))")
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0)
        let stats = try peer.stop()
        XCTAssertLessThanOrEqual(stats.rx, tx)
        XCTAssertGreaterThanOrEqual(stats.rx + 256, tx, peer.tail())
    }

    // MARK: Faults

    /// The peer is killed mid-traffic: vio reports the lost link, exits with status 2, does not
    /// hang, and every mbuf is back in the pool.
    func testPeerKilledMidTraffic() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        let vio = try Vio(["fwd", "--mode", "txonly", "--port", "vhost:\(peer.socket)"] + noHuge, dir: dir)
        XCTAssertTrue(vio.waitForOutput("Mpps"), "vio never reported traffic")
        peer.kill()
        let killed = Date()
        let r = vio.wait(timeout: 10)
        XCTAssertFalse(r.timedOut, "vio hung after the backend died: \(r)")
        XCTAssertLessThan(Date().timeIntervalSince(killed), 5)
        XCTAssertEqual(r.status, 2, "\(r)")
        XCTAssertTrue(r.stderr.contains("hung up"), r.stderr)
        XCTAssertNotNil(r.json?["error"] as? String)
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
        XCTAssertGreaterThan((r.port(0)?["rxPackets"] as? NSNumber)?.intValue ?? 0, 0, "echoed traffic was received before the kill")
    }

    /// SIGINT stops the loop cleanly with final totals and JSON.
    func testSigintPrintsTotalsAndExitsCleanly() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        let vio = try Vio(["fwd", "--mode", "txonly", "--port", "vhost:\(peer.socket)"] + noHuge, dir: dir)
        XCTAssertTrue(vio.waitForOutput("Mpps"), "vio never reported traffic")
        vio.signal(SIGINT)
        let r = vio.wait(timeout: 10)
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertTrue(r.stdout.contains("port 0 totals"), r.stdout)
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0)
        XCTAssertNil(r.json?["error"] as? String)
        _ = try peer.stop()
    }

    // MARK: pktgen (counts only; timings live in Bench/)

    /// A rate-limited run of N frames against a macswap peer: pktgen's counts agree with the
    /// peer's own. N sent and received by the peer; what pktgen received is what the peer sent
    /// back (the peer drops what finds our RX ring full, seen as peer RX > peer TX, which happens
    /// when this VM stalls the driver's vCPU; the counts must still add up); a latency sample for
    /// every frame back.
    func testPktgenRateLimitedCountsAgreeWithPeer() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        // A 1024-entry RX ring holds 5 ms of the echo, so a stall of this VM's vCPU rarely fills it.
        let r = try Vio.run(["pktgen", "--port", "vhost:\(peer.socket)", "--count", "50000", "--rate", "200kpps",
                             "--size", "imix", "--flows", "8", "--expect-macswap", "--ring-size", "1024"] + noHuge, dir: dir)
        let stats = try peer.stop()
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.int("sent"), 50_000, "\(r)")
        XCTAssertEqual(UInt64(r.int("sent") ?? -1), stats.rx, "pktgen's sent = the peer's received: \(peer.tail())")
        XCTAssertEqual(UInt64(r.int("received") ?? -1), stats.tx, "pktgen's received = the peer's sent: \(r) \(peer.tail())")
        XCTAssertEqual((r.int("received") ?? 0) + (r.int("lost") ?? 0), 50_000)
        // What is lost, the peer dropped (its RX minus its TX, above), not us: we never ran out of
        // mbufs for the RX ring. A stalled vCPU can still make the peer drop a few bursts; more than
        // 1 % would be a real fault.
        XCTAssertEqual(((r.json?["port"] as? [String: Any])?["rxNoMbuf"] as? NSNumber)?.intValue, 0, "\(r)")
        XCTAssertLessThanOrEqual(r.int("lost") ?? 999, 500, "at most a few bursts dropped by the peer: \(r)")
        for key in ["reordered", "duplicates", "corrupt", "macMismatch", "foreign", "mbufsInUseAfterStop"] {
            XCTAssertEqual(r.int(key), 0, "\(key): \(r)")
        }
        let latency = r.json?["latency"] as? [String: Any]
        XCTAssertEqual((latency?["samples"] as? NSNumber)?.intValue, r.int("received"), "\(r)")
        XCTAssertGreaterThan((latency?["p99Ns"] as? NSNumber)?.intValue ?? 0, 0)
        // 50 000 frames at 200 kpps take about 0.25 s; a rate limiter that does nothing takes far less.
        let txMpps = (r.json?["txMpps"] as? NSNumber)?.doubleValue ?? 0
        XCTAssertLessThan(txMpps, 0.3, "the rate limit was not applied: \(r)")
    }

    /// `--rx-only` counts what a txonly peer sends.
    func testPktgenRxOnlyCountsPeerTraffic() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "txonly", dir: dir)
        let r = try Vio.run(["pktgen", "--port", "vhost:\(peer.socket)", "--rx-only", "--duration", "2"] + noHuge, dir: dir)
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.int("sent"), 0)
        XCTAssertGreaterThan(r.int("received") ?? 0, 10_000, "\(r)")
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0)
        let stats = try peer.stop()
        XCTAssertGreaterThanOrEqual(stats.tx, UInt64(r.int("received") ?? 0))
    }

    /// testpmd's `start tx_first`: both sides forward, traffic injected once keeps circulating.
    func testTxFirstLoopback() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "io", dir: dir)
        let r = try Vio.run(["fwd", "--mode", "io", "--tx-first", "4", "--port", "vhost:\(peer.socket)", "--duration", "2"]
                            + noHuge, dir: dir)
        XCTAssertEqual(r.status, 0, "\(r)")
        let rx = (r.port(0)?["rxPackets"] as? NSNumber)?.intValue ?? 0
        XCTAssertGreaterThan(rx, 100_000, "the injected bursts kept circulating: \(r)")
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0)
        _ = try peer.stop()
    }
}
