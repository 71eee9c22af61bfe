import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// SwiftNIO channels on the dataplane (`NIODataplane`), through a real kernel client: the
/// `nio-probe` servers (Tests/NIOProbe) run on lwIP over the virtio-net driver, behind the same
/// testpmd TAP bridge as the HTTP tests; Python clients in the namespace drive them. What each
/// test checks is NIO's channel contract: bytes in order, backpressure (writability changes,
/// bounded buffering, autoRead off closing the TCP window), half-close, close from either side,
/// resets as errors, and that channel events all ran on the loop.
final class NIOChannelTests: XCTestCase {
    static let serverIP = "198.18.0.2"

    var dir: TempDir!
    var ns: NetNamespace?
    var bridge: TapBridge?
    var probe: Vio?
    var client = ""

    override func tearDown() {
        if let p = probe, p.process.isRunning { p.signal(SIGKILL); p.process.waitUntilExit() }
        bridge?.server.kill()
        ns?.remove()
        probe = nil; bridge = nil; ns = nil
        dir = nil
        super.tearDown()
    }

    func start() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else { throw XCTSkip("python3 is not installed") }
        dir = try TempDir()
        let ns = try NetNamespace(dir: dir)
        self.ns = ns
        let bridge = try TapBridge(namespace: ns, dir: dir, hostAddress: "198.18.0.1/24")
        self.bridge = bridge
        client = dir.path("client.py")
        try Data(Self.clientScript.utf8).write(to: URL(fileURLWithPath: client))
        let p = try Vio(["--port", "vhost:\(bridge.socket)", "--ip", "\(Self.serverIP)/24"], dir: dir, name: "probe", json: false,
                        binary: Tools.nioProbe)
        probe = p
        guard p.waitForOutput("probe: listening", timeout: 60) else {
            throw TestFailure("nio-probe did not start: \(p.wait(timeout: 5))\nbridge: \(bridge.tail())")
        }
    }

    /// Runs the client script in the namespace; its last stdout line is a JSON object.
    func run(_ args: String..., timeout: Double = 90) throws -> [String: Any] {
        let r = try ns!.run(["/usr/bin/python3", client, Self.serverIP] + args, timeout: timeout)
        guard r.status == 0, let line = r.text.split(separator: "\n").last,
              let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            throw TestFailure("client \(args) failed: status \(r.status) \(r.text) \(r.stderr)\nprobe: \(probe!.stdoutSoFar.suffix(800)) \(probe!.stderrSoFar.suffix(800))")
        }
        return json
    }

    func stats() throws -> [String: Any] { try run("stats") }

    func int(_ j: [String: Any], _ k: String) -> Int { (j[k] as? NSNumber)?.intValue ?? -1 }

    func stopProbe(file: StaticString = #filePath, line: UInt = #line) {
        guard let p = probe else { return }
        p.signal(SIGINT)
        let r = p.wait(timeout: 30)
        XCTAssertEqual(r.status, 0, "\(r)", file: file, line: line)
        XCTAssertTrue(r.stdout.contains("probe: stopped"), "\(r)", file: file, line: line)
    }

    // MARK: tests

    /// 8 MiB through ECHO while the client does not read for a second: the server's writes pile
    /// up to the high watermark, the channel turns unwritable, autoRead goes off and TCP's window
    /// stops the sender; then everything flows. The client half-closes; the server sees
    /// `inputClosed`, finishes its writes and half-closes too, and the client gets every byte
    /// back, in order, then EOF.
    func testEchoWithBackpressureAndHalfCloseFromBothSides() throws {
        try start()
        let r = try run("echo", "\(8 << 20)", "1.0")
        XCTAssertEqual(r["ok"] as? Bool, true, "\(r)")
        XCTAssertEqual(int(r, "received"), 8 << 20)
        let s = try stats()
        XCTAssertEqual(int(s, "echoed"), 8 << 20, "\(s)")
        XCTAssertGreaterThanOrEqual(int(s, "writabilityFalse"), 1, "the channel never became unwritable: \(s)")
        XCTAssertGreaterThanOrEqual(int(s, "writabilityTrue"), 1, "\(s)")
        XCTAssertEqual(int(s, "inputClosed"), 1, "\(s)")
        // Buffered output stays near the high watermark (128 KiB), plus one read's worth.
        XCTAssertLessThanOrEqual(int(s, "maxPending"), 128 * 1024 + 64 * 1024 + 4 * 64 * 1024, "\(s)")
        XCTAssertEqual(s["errors"] as? [String], [], "\(s)")
        XCTAssertEqual(int(s, "offLoop"), 0, "\(s)")
        // The echo connection is gone (inactive, unregistered); the STATS one is the only one active.
        XCTAssertEqual(int(s, "active"), 1, "\(s)")
        XCTAssertEqual(int(s, "registered"), int(s, "unregistered") + 1, "\(s)")
        stopProbe()
    }

    /// The server writes 20 MB as writability allows and closes; the client starts reading only
    /// after a second. Every byte arrives, in order, before the FIN. CLOSE: the server closes at
    /// once (the client reads EOF) and a write after the close fails with ioOnClosedChannel.
    func testServerWritesWithWritabilityAndClosesFirst() throws {
        try start()
        let n = 20_000_000
        let r = try run("flood", "\(n)", "1.0")
        XCTAssertEqual(r["ok"] as? Bool, true, "\(r)")
        XCTAssertEqual(int(r, "received"), n)
        let c = try run("close")
        XCTAssertEqual(c["eof"] as? Bool, true, "\(c)")
        let s = try stats()
        XCTAssertEqual(int(s, "flooded"), n, "\(s)")
        XCTAssertGreaterThanOrEqual(int(s, "writabilityFalse"), 1, "\(s)")
        XCTAssertEqual(int(s, "writeAfterCloseFailed"), 1, "\(s)")
        XCTAssertLessThanOrEqual(int(s, "maxPending"), 128 * 1024 + 16 * 1024, "writes went past the watermark: \(s)")
        XCTAssertEqual(s["errors"] as? [String], [], "\(s)")
        stopProbe()
    }

    /// A client that closes normally: the server sees inputClosed and closes. A client that
    /// resets (SO_LINGER 0): the server's pipeline gets IOError(ECONNRESET) in errorCaught and
    /// the channel goes inactive.
    func testPeerCloseAndPeerReset() throws {
        try start()
        let r = try run("hold", "close")
        XCTAssertEqual(r["eof"] as? Bool, true, "the server did not close after the client's FIN: \(r)")
        _ = try run("hold", "reset")
        var s: [String: Any] = [:]
        let deadline = Date().addingTimeInterval(10)
        repeat {
            s = try stats()
            if int(s, "resets") >= 1 { break }
            usleep(100_000)
        } while Date() < deadline
        XCTAssertEqual(int(s, "resets"), 1, "\(s)")
        let errors = (s["errors"] as? [String]) ?? []
        XCTAssertTrue(errors.contains { $0.contains("reset") || $0.contains("ECONNRESET") || $0.contains("104") }, "\(errors)")
        XCTAssertEqual(int(s, "active"), 1, "\(s)")
        XCTAssertGreaterThanOrEqual(int(s, "inputClosed"), 1, "\(s)")
        stopProbe()
    }

    /// NIOHTTP1's server pipeline on a dataplane channel answers curl (keep-alive: two requests
    /// on one connection), and NIOAsyncChannel echo — driven from Swift concurrency threads,
    /// off the loop — returns 1 MiB intact.
    func testHTTPPipelineAndAsyncChannel() throws {
        try start()
        let url = "http://\(Self.serverIP):8080"
        let c = try ns!.run(["/usr/bin/curl", "-sS", "--max-time", "20", "-w", "%{http_code} %{num_connects}\\n", url + "/hello", url + "/nope"], timeout: 30)
        XCTAssertEqual(c.status, 0, c.stderr)
        XCTAssertEqual(c.text, "hello\n200 1\nnot found\n404 0\n", "two requests on one kept-alive connection")
        let r = try run("async", "\(1 << 20)")
        XCTAssertEqual(r["ok"] as? Bool, true, "\(r)")
        let s = try stats()
        XCTAssertEqual(int(s, "httpRequests"), 2, "\(s)")
        XCTAssertEqual(int(s, "asyncEchoed"), 1 << 20, "\(s)")
        XCTAssertEqual(int(s, "offLoop"), 0, "\(s)")
        stopProbe()
    }

    static let clientScript = #"""
import hashlib, json, os, socket, struct, sys, threading, time
host, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]

def connect(port):
    s = socket.create_connection((host, port), timeout=60)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    return s

def read_all(s):
    h, n = hashlib.sha256(), 0
    while True:
        b = s.recv(1 << 20)
        if not b: return h.hexdigest(), n
        h.update(b); n += len(b)

def echo(port, n, delay, command):
    data = os.urandom(n)
    s = connect(port)
    if command: s.sendall(command)
    def send():
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send); t.start()
    time.sleep(delay)
    digest, got = read_all(s)
    t.join(); s.close()
    ok = digest == hashlib.sha256(data).hexdigest()
    print(json.dumps({"ok": ok, "received": got}))

if cmd == "echo":
    echo(7000, int(args[0]), float(args[1]), b"ECHO\n")
elif cmd == "async":
    echo(7001, int(args[0]), 0.0, b"")
elif cmd == "flood":
    n = int(args[0]); s = connect(7000); s.sendall(b"FLOOD %d\n" % n)
    time.sleep(float(args[1]))
    pat = bytes(range(251)) * ((1 << 20) // 251 + 2)
    got, ok = 0, True
    while True:
        b = s.recv(1 << 20)
        if not b: break
        if b != pat[got % 251:got % 251 + len(b)]: ok = False
        got += len(b)
    print(json.dumps({"ok": ok and got == n, "received": got}))
elif cmd == "close":
    s = connect(7000); s.sendall(b"CLOSE\n")
    print(json.dumps({"eof": s.recv(10) == b""}))
elif cmd == "hold":
    s = connect(7000); s.sendall(b"HOLD\n"); time.sleep(0.2)
    if args[0] == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close(); print(json.dumps({"reset": True}))
    else:
        s.shutdown(socket.SHUT_WR)
        print(json.dumps({"eof": s.recv(10) == b""}))
elif cmd == "stats":
    s = connect(7000); s.sendall(b"STATS\n")
    buf = b""
    while True:
        b = s.recv(65536)
        if not b: break
        buf += b
    print(buf.decode().strip())
"""#
}
