import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// The packed virtqueue layout (VIRTIO_F_RING_PACKED) against DPDK's vhost-user backend, which
/// offers it: the split ring's echo, wrap, jumbo and fault tests, and stop/restart of a port on
/// both layouts (SET_VRING_BASE carrying the packed wrap counter).
final class PackedNetIntegrationTests: XCTestCase {
    let noHuge = ["--memory", "nohuge", "--memory-mb", "128"]

    /// 100 000 numbered, checksummed frames of 60…1514 bytes through a macswap peer on a packed
    /// ring: all back, in order, intact; the peer's counters agree; every mbuf back in the pool.
    func testPackedEchoOfMixedSizes() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        let r = try Vio.run(["pktgen", "--port", "vhost:\(peer.socket)", "--ring", "packed", "--count", "100000", "--size", "mixed",
                             "--verify", "--window", "auto", "--expect-macswap"] + noHuge, dir: dir, timeout: 120)
        assertCleanEcho(r, count: 100_000, ring: "packed")
        XCTAssertTrue((r.port(0)?["features"] as? String ?? "").contains("IN_ORDER"))
        let stats = try peer.stop()
        XCTAssertEqual(stats.rx, 100_000, peer.tail())
        XCTAssertEqual(stats.tx, 100_000, peer.tail())
    }

    /// `--ring auto` takes packed when the device offers it (DPDK's vhost does).
    func testAutoPicksPackedWhenOffered() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        let r = try Vio.run(["pktgen", "--port", "vhost:\(peer.socket)", "--count", "1000", "--window", "auto",
                             "--expect-macswap"] + noHuge, dir: dir)
        assertCleanEcho(r, count: 1000, ring: "packed")
        _ = try peer.stop()
    }

    // MARK: Wrap counters: > 2 × 65 536 frames through a 64-entry ring (over 2 000 laps each way)

    func wrap(inOrder: Bool, hugepages: Bool) throws {
        if hugepages && !Tools.hugepagesAvailable { throw XCTSkip("no free hugepages (Scripts/setup.sh reserves them)") }
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        var args = ["pktgen", "--port", "vhost:\(peer.socket)", "--ring", "packed", "--count", "140000", "--size", "64",
                    "--ring-size", "64", "--window", "auto", "--expect-macswap", "--verify"]
        args += hugepages ? ["--memory", "hugepages", "--memory-mb", "256"] : noHuge
        if !inOrder { args.append("--no-in-order") }
        let r = try Vio.run(args, dir: dir, timeout: 180)
        assertCleanEcho(r, count: 140_000, ring: "packed")
        let features = r.port(0)?["features"] as? String ?? ""
        XCTAssertEqual(features.contains("IN_ORDER"), inOrder, features)
        let stats = try peer.stop()
        XCTAssertEqual(stats.tx, 140_000, peer.tail())
    }

    func testPackedWrapInOrderNoHuge() throws { try wrap(inOrder: true, hugepages: false) }
    func testPackedWrapOutOfOrderNoHuge() throws { try wrap(inOrder: false, hugepages: false) }
    func testPackedWrapInOrderHugepages() throws { try wrap(inOrder: true, hugepages: true) }

    /// 9000-byte frames: out as descriptor chains, back through MRG_RXBUF as 5-segment chains.
    func testPackedJumboFrames() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        let r = try Vio.run(["pktgen", "--port", "vhost:\(peer.socket)", "--ring", "packed", "--count", "500", "--size", "9000",
                             "--verify", "--window", "auto", "--expect-macswap"] + noHuge, dir: dir)
        assertCleanEcho(r, count: 500, ring: "packed")
        XCTAssertGreaterThanOrEqual(r.int("maxSegments") ?? 0, 5, "\(r)")
        _ = try peer.stop()
    }

    /// Two-port io forwarding on packed rings: what the source peer sends reaches the sink, all of it.
    func testPackedTwoPortIOForwarding() throws {
        try assertTwoPortIO(ring: "packed", seconds: 2, memory: noHuge, atLeast: 10_000, exactSink: true)
    }

    /// The peer dies mid-traffic on a packed ring: exit 2 within seconds, no mbuf lost.
    func testPackedPeerKilledMidTraffic() throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        let vio = try Vio(["fwd", "--mode", "txonly", "--ring", "packed", "--port", "vhost:\(peer.socket)"] + noHuge, dir: dir)
        XCTAssertTrue(vio.waitForOutput("Mpps"), "vio never reported traffic")
        peer.kill()
        let killed = Date()
        let r = vio.wait(timeout: 10)
        XCTAssertFalse(r.timedOut, "vio hung after the backend died: \(r)")
        XCTAssertLessThan(Date().timeIntervalSince(killed), 5)
        XCTAssertEqual(r.status, 2, "\(r)")
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
    }

    // MARK: Stop and restart (both layouts)

    /// Every 7 001 frames pktgen stops the port (GET_VRING_BASE) and starts it again from the
    /// position the device reported, which lands mid-lap with either wrap counter. The driver
    /// checks the device's TX position against its own completions at each stop; every frame
    /// still comes back once, in order, intact.
    func restart(ring: String, inOrder: Bool) throws {
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        var args = ["pktgen", "--port", "vhost:\(peer.socket)", "--ring", ring, "--count", "30000", "--size", "mixed",
                    "--ring-size", "64", "--restart-every", "7001", "--window", "auto", "--expect-macswap", "--verify"] + noHuge
        if !inOrder { args.append("--no-in-order") }
        let r = try Vio.run(args, dir: dir, timeout: 180)
        assertCleanEcho(r, count: 30_000, ring: ring)
        XCTAssertEqual(r.int("restarts"), 4, "\(r)")
        let stats = try peer.stop()
        XCTAssertEqual(stats.tx, 30_000, peer.tail())
    }

    func testRestartPackedInOrder() throws { try restart(ring: "packed", inOrder: true) }
    func testRestartPackedOutOfOrder() throws { try restart(ring: "packed", inOrder: false) }
    func testRestartSplitInOrder() throws { try restart(ring: "split", inOrder: true) }
    func testRestartSplitOutOfOrder() throws { try restart(ring: "split", inOrder: false) }

}
