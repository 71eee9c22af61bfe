import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// `vio` against the suite's own hostile vhost-user device (Tests/HostileDevice), which runs real
/// traffic and then misbehaves on command. Every fault must end the run within a bound, with the
/// documented exit status (1: the device cannot be used as configured; 2: the device failed
/// while running) and a message naming the value or the request; no signal, no hang, and every
/// mbuf and blk slot back.
final class HostileDeviceTests: XCTestCase {
    let noHuge = ["--memory", "nohuge", "--memory-mb", "128"]

    /// Runs `vio` with `args` against a hostile device of `type` and returns the run and the
    /// seconds it took.
    func run(_ type: String, _ args: [String], faults: [String], after: Int = 0, packed: Bool = false,
             timeout: Double = 30) throws -> (VioRun, Double, HostileDevice, TempDir) {
        let dir = try TempDir()
        let dev = try HostileDevice(type, dir: dir, packed: packed, after: after, faults: faults)
        let target = type == "blk" ? ["--dev", "vhost-user-blk:\(dev.socket)"] : ["--port", "vhost:\(dev.socket)"]
        let started = Date()
        let r = try Vio.run(args + target + noHuge, dir: dir, timeout: timeout)
        let took = Date().timeIntervalSince(started)
        XCTAssertFalse(r.timedOut, "vio hung: \(r)\ndevice: \(dev.tail())")
        XCTAssertLessThan(r.status, 64 + 1, "no signal ended vio: \(r)")
        return (r, took, dev, dir)
    }

    func blkbench(_ extra: [String], faults: [String], after: Int = 0, packed: Bool = false) throws -> (VioRun, Double, HostileDevice, TempDir) {
        try run("blk", ["blkbench", "--rw", "randread", "--bs", "4k"] + extra, faults: faults, after: after, packed: packed)
    }

    // MARK: The device works (so that each fault below is the only thing wrong)

    func testBlkVerifyRunIsCleanOnBothLayouts() throws {
        for packed in [false, true] {
            let (r, _, dev, _) = try blkbench(["--rw", "randwrite", "--iodepth", "16", "--runtime", "1s", "--verify"], faults: [], packed: packed)
            XCTAssertEqual(r.status, 0, "\(r)\n\(dev.tail())")
            XCTAssertGreaterThan(r.int("verified") ?? 0, 1000, "\(r)")
            XCTAssertEqual(r.int("verifyErrors"), 0, "\(r)")
            XCTAssertEqual(r.json?["ring"] as? String, packed ? "packed" : "split")
        }
    }

    func testNetEchoIsCleanOnBothLayouts() throws {
        for packed in [false, true] {
            let (r, _, dev, _) = try run("net", ["pktgen", "--count", "5000", "--size", "mixed", "--verify", "--window", "auto"], faults: [], packed: packed)
            XCTAssertEqual(r.status, 0, "\(r)\n\(dev.tail())")
            XCTAssertEqual(r.int("received"), 5000, "\(r)")
            XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
        }
    }

    // MARK: Hangs: a device that stops completing or loses a request

    /// The device completes 1000 requests and then nothing: blkbench fails the run after
    /// --io-timeout, naming the oldest request, and every slot comes back.
    func testBlkDeviceStopsCompleting() throws {
        let (r, took, dev, _) = try blkbench(["--iodepth", "16", "--runtime", "30s", "--io-timeout", "1s"], faults: ["stop"], after: 1000)
        XCTAssertEqual(r.status, 2, "\(r)\n\(dev.tail())")
        XCTAssertTrue(r.stderr.contains("did not complete the read of 8 sectors at sector"), r.stderr)
        XCTAssertTrue(r.stderr.contains("--io-timeout 1 s"), r.stderr)
        XCTAssertLessThan(took, 8, "ended within the timeout and a stop")
        XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(r)")
        XCTAssertEqual(r.int("failedInFlight"), 16, "every request in flight came back failed: \(r)")
    }

    /// One request is never completed while the others are: the same, for that request.
    func testBlkDeviceLosesOneRequest() throws {
        let (r, took, dev, _) = try blkbench(["--iodepth", "8", "--runtime", "30s", "--io-timeout", "1s"], faults: ["lose"], after: 500)
        XCTAssertEqual(r.status, 2, "\(r)\n\(dev.tail())")
        XCTAssertTrue(r.stderr.contains("did not complete the read"), r.stderr)
        XCTAssertLessThan(took, 8)
        XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(r)")
        XCTAssertGreaterThanOrEqual(r.int("failedInFlight") ?? 0, 1, "\(r)")
    }

    /// SIGINT while the device sits on every request: the run ends within a second (status 2,
    /// since requests were stuck), even with a long --io-timeout.
    func testSignalEndsRunWithStuckRequestsPromptly() throws {
        for sig in [SIGINT, SIGTERM] {
            let dir = try TempDir()
            let dev = try HostileDevice("blk", dir: dir, after: 2000, faults: ["stop"])
            let vio = try Vio(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--iodepth", "16", "--runtime", "60s",
                               "--io-timeout", "60s"] + noHuge, dir: dir)
            XCTAssertTrue(dev.waitForLog("fault: stop"), dev.tail())
            usleep(200_000)
            let sent = Date()
            vio.signal(sig)
            let r = vio.wait(timeout: 10)
            XCTAssertFalse(r.timedOut, "\(r)")
            XCTAssertLessThan(Date().timeIntervalSince(sent), 1.5, "signal \(sig) ended the run promptly")
            XCTAssertEqual(r.status, 2, "\(r)")
            XCTAssertTrue(r.stderr.contains("still at the device"), r.stderr)
            XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(r)")
        }
    }

    /// The device sits on every request and does not answer the stop either: one signal still
    /// ends the run within a second (the final stop waits 0.4 s, not the reply timeout).
    func testSignalEndsRunWhenTheStopIsNotAnsweredEither() throws {
        let dir = try TempDir()
        let dev = try HostileDevice("blk", dir: dir, after: 1000, faults: ["stop", "vring-base=none"])
        let vio = try Vio(["blkbench", "--dev", "vhost-user-blk:\(dev.socket)", "--iodepth", "16", "--runtime", "60s",
                           "--io-timeout", "60s", "--reply-timeout", "30s"] + noHuge, dir: dir)
        XCTAssertTrue(dev.waitForLog("fault: stop"), dev.tail())
        let sent = Date()
        vio.signal(SIGINT)
        let r = vio.wait(timeout: 40)
        XCTAssertFalse(r.timedOut, "\(r)")
        XCTAssertLessThan(Date().timeIntervalSince(sent), 1.5, "\(r)")
        XCTAssertEqual(r.status, 2, "\(r)")
        XCTAssertTrue(r.stderr.contains("still at the device"), r.stderr)
        XCTAssertTrue(r.stderr.contains("did not answer GET_VRING_BASE within 0.4 s"), r.stderr)
        XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(r)")
    }

    /// blkio: a command the device never completes fails after --io-timeout with status 2, and
    /// names the command (it used to wait 10 s per command and exit 0).
    func testBlkioCommandNeverCompleted() throws {
        let (r, took, dev, _) = try run("blk", ["blkio", "--io-timeout", "1s", "--cmd", "write 0 8 1", "--cmd", "verify 0 8 1", "--cmd", "flush"],
                                        faults: ["stop"], after: 1)
        XCTAssertEqual(r.status, 2, "\(r)\n\(dev.tail())")
        XCTAssertTrue(r.stdout.contains("write 0 8 1: ok"), r.stdout)
        XCTAssertTrue(r.stderr.contains("verify 0 8 1: no completion within 1s"), r.stderr)
        XCTAssertFalse(r.stdout.contains("flush:"), "nothing runs after the fault: \(r.stdout)")
        XCTAssertLessThan(took, 6)
    }

    /// blkio waiting on a command the device sits on: SIGINT ends it at once, status 2.
    func testSignalEndsBlkioWait() throws {
        let dir = try TempDir()
        let dev = try HostileDevice("blk", dir: dir, after: 0, faults: ["stop"])
        let vio = try Vio(["blkio", "--dev", "vhost-user-blk:\(dev.socket)", "--io-timeout", "60s", "--cmd", "flush"] + noHuge, dir: dir, json: false)
        XCTAssertTrue(dev.waitForLog("fault: stop"), dev.tail())
        let sent = Date()
        vio.signal(SIGINT)
        let r = vio.wait(timeout: 10)
        XCTAssertFalse(r.timedOut, "\(r)")
        XCTAssertLessThan(Date().timeIntervalSince(sent), 1.5)
        XCTAssertEqual(r.status, 2, "\(r)")
        XCTAssertTrue(r.stderr.contains("flush: interrupted before it completed"), r.stderr)
    }

    // MARK: Status bytes

    func testBlkbenchInvalidStatusByte() throws {
        let (r, _, dev, _) = try blkbench(["--iodepth", "8", "--runtime", "1s"], faults: ["status=7"], after: 100)
        XCTAssertEqual(r.status, 2, "\(r)\n\(dev.tail())")
        XCTAssertTrue(r.stderr.contains("invalid status byte 7"), r.stderr)
        XCTAssertTrue(r.stderr.contains("at sector"), "names the request: \(r.stderr)")
        XCTAssertEqual(r.int("invalidStatus"), 1, "\(r)")
        XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(r)")
    }

    func testBlkioUnwrittenStatusByte() throws {
        let (r, _, dev, _) = try run("blk", ["blkio", "--cmd", "flush"], faults: ["status=none"], after: 0)
        XCTAssertEqual(r.status, 2, "\(r)\n\(dev.tail())")
        XCTAssertTrue(r.stderr.contains("flush: the device returned no status (the device did not write the status byte)"), r.stderr)
    }

    // MARK: Config space and control-plane values

    func checkRefused(_ type: String, faults: [String], message: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let args = type == "blk" ? ["blkbench", "--runtime", "1s"] : ["pktgen", "--count", "100"]
        let (r, took, dev, _) = try run(type, args, faults: faults)
        XCTAssertEqual(r.status, 1, "\(r)\n\(dev.tail())", file: file, line: line)
        XCTAssertTrue(r.stderr.contains(message), r.stderr, file: file, line: line)
        XCTAssertLessThan(took, 10, file: file, line: line)
    }

    func testBlkMultiQueueWithZeroQueues() throws {
        try checkRefused("blk", faults: ["num-queues=0"], message: "VIRTIO_BLK_F_MQ with num_queues 0")
    }

    func testBlkCapacityNear2To64() throws {
        try checkRefused("blk", faults: ["capacity=18446744073709551615"], message: "capacity 18446744073709551615 sectors is more than 2^63 bytes")
    }

    func testBlkInvalidBlockSize() throws {
        try checkRefused("blk", faults: ["blk-size=3"], message: "blk_size 3 is not a power of two")
    }

    func testQueueNumNear2To64() throws {
        try checkRefused("blk", faults: ["queue-num=18446744073709551615"], message: "GET_QUEUE_NUM: 18446744073709551615 queues (must be 1...65535)")
        try checkRefused("net", faults: ["queue-num=0"], message: "GET_QUEUE_NUM: 0 queues")
    }

    /// A seg_max near 2^32 no longer sizes a 16 TiB allocation: it is capped, with a warning
    /// naming it, and the run works.
    func testBlkHugeSegMaxIsCapped() throws {
        let (r, _, dev, _) = try blkbench(["--bs", "128k", "--iodepth", "4", "--runtime", "1s"], faults: ["seg-max=4294967295"])
        XCTAssertEqual(r.status, 0, "\(r)\n\(dev.tail())")
        XCTAssertTrue(r.stderr.contains("seg_max 4294967295 is more than this driver uses; using 256"), r.stderr)
        XCTAssertGreaterThan(r.int("reads") ?? 0, 0, "\(r)")
    }

    /// A backend that stops answering mid-handshake is reported after --reply-timeout (default
    /// 5 s), naming the request, for blk and net.
    func testHandshakeRequestUnanswered() throws {
        let (r, took, _, _) = try run("blk", ["blkbench", "--runtime", "1s", "--reply-timeout", "1s"], faults: ["no-reply=24"])
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("did not answer GET_CONFIG within 1 s"), r.stderr)
        XCTAssertLessThan(took, 4)
        // The default: 5 s.
        let (d, dtook, _, _) = try run("net", ["pktgen", "--count", "100"], faults: ["no-reply=17"])
        XCTAssertEqual(d.status, 1, "\(d)")
        XCTAssertTrue(d.stderr.contains("did not answer GET_QUEUE_NUM within 5 s"), d.stderr)
        XCTAssertGreaterThan(dtook, 4.5)
        XCTAssertLessThan(dtook, 9)
    }

    /// The final stop's GET_VRING_BASE unanswered, naming another ring, or short: a warning that
    /// the backend may still use our memory, and status 2 — after a run that itself went well.
    func testFinalStopNotConfirmed() throws {
        for (fault, message) in [("vring-base=none", "did not answer GET_VRING_BASE within 1 s"),
                                 ("vring-base=garbage", "reply names ring 7, asked for ring 0"),
                                 ("vring-base=short", "payload of 4 bytes for ring 0 (needs 8)")] {
            let (r, took, dev, _) = try blkbench(["--runtime", "1s", "--reply-timeout", "1s"], faults: [fault])
            XCTAssertEqual(r.status, 2, "\(fault): \(r)\n\(dev.tail())")
            XCTAssertTrue(r.stderr.contains("warning") && r.stderr.contains("did not confirm that it stopped"), r.stderr)
            XCTAssertTrue(r.stderr.contains("stopping the device: ") && r.stderr.contains(message), "\(fault): \(r.stderr)")
            XCTAssertGreaterThan(r.int("reads") ?? 0, 0, "\(r)")
            XCTAssertLessThan(took, 8)
        }
    }

    /// The same for net: pktgen and fwd warn and end with status 2.
    func testNetFinalStopNotConfirmed() throws {
        for args in [["pktgen", "--count", "1000"], ["fwd", "--mode", "macswap", "--duration", "1"]] {
            let (r, _, dev, _) = try run("net", args + ["--reply-timeout", "1s"], faults: ["vring-base=garbage"])
            XCTAssertEqual(r.status, 2, "\(args[0]): \(r)\n\(dev.tail())")
            XCTAssertTrue(r.stderr.contains("did not confirm that it stopped"), r.stderr)
            XCTAssertTrue(r.stderr.contains("stopping the device: malformed vhost-user reply to GET_VRING_BASE"), r.stderr)
            XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
        }
    }

    // MARK: Ring faults through a real connection (the queue core's checks, end to end)

    func checkBrokenRing(_ type: String, fault: String, packed: Bool, message: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let args = type == "blk" ? ["blkbench", "--rw", "randread", "--iodepth", "8", "--runtime", "5s"] : ["pktgen", "--count", "5000"]
        let (r, took, dev, _) = try run(type, args, faults: [fault], after: 100, packed: packed)
        let what = "\(type) \(packed ? "packed" : "split") \(fault)"
        XCTAssertEqual(r.status, 2, "\(what): \(r)\n\(dev.tail())", file: file, line: line)
        XCTAssertTrue(r.stderr.contains(message), "\(what): \(r.stderr)", file: file, line: line)
        XCTAssertLessThan(took, 5, what, file: file, line: line)
        if type == "blk" {
            XCTAssertEqual(r.int("slotsOutstandingAtExit"), 0, "\(what): \(r)", file: file, line: line)
        } else {
            XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(what): \(r)", file: file, line: line)
        }
    }

    func testBlkRingFaults() throws {
        for packed in [false, true] {
            try checkBrokenRing("blk", fault: "used-id=999", packed: packed, message: "descriptor id 999 outside a queue of 256")
            try checkBrokenRing("blk", fault: "used-len=100000", packed: packed, message: "device wrote 100000 bytes into buffer")
        }
        try checkBrokenRing("blk", fault: "used-idx-jump", packed: false, message: "device moved used index to")
    }

    func testNetRingFaults() throws {
        for packed in [false, true] {
            try checkBrokenRing("net", fault: "used-id=9999", packed: packed, message: "RX queue stopped: device returned descriptor id 9999")
            try checkBrokenRing("net", fault: "used-len=100000", packed: packed, message: "device wrote 100000 bytes into buffer")
        }
        try checkBrokenRing("net", fault: "used-idx-jump", packed: false, message: "device moved used index to")
        try checkBrokenRing("net", fault: "hangup", packed: false, message: "hung up")
    }

    /// An RX header with num_buffers 0, or more buffers than the ring has: that frame is dropped
    /// and counted as an RX error; the port goes on.
    func testNetBadNumBuffersIsDroppedAndCounted() throws {
        for n in ["0", "300"] {
            let (r, _, dev, _) = try run("net", ["pktgen", "--count", "2000"], faults: ["num-buffers=\(n)"], after: 100)
            XCTAssertEqual(r.status, 0, "num_buffers \(n): \(r)\n\(dev.tail())")
            XCTAssertEqual(r.int("received"), 1999, "\(r)")
            XCTAssertEqual((r.port(0)?["rxErrors"] as? NSNumber)?.intValue, 1, "\(String(describing: r.port(0)))")
            XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)")
        }
    }
}
