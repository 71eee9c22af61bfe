import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// The Hummingbird 2 example (Examples/HummingbirdOnDataplane) served on the dataplane, through
/// the TAP bridge, to kernel clients (curl, Python) in the test's namespace: routes with path
/// parameters, JSON, middleware headers, a request body, a streamed 10 MiB response, keep-alive
/// and concurrent connections, and an orderly stop.
final class HummingbirdTests: XCTestCase {
    static let serverIP = "198.18.0.2"
    static let url = "http://198.18.0.2:8080"

    var dir: TempDir!
    var ns: NetNamespace?
    var bridge: TapBridge?
    var server: Vio?

    static var example: String {
        if let p = ProcessInfo.processInfo.environment["VIO_HUMMINGBIRD_EXAMPLE"], !p.isEmpty { return p }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent("Examples/HummingbirdOnDataplane/.build/debug/HummingbirdOnDataplane").path
    }

    override func tearDown() {
        if let s = server, s.process.isRunning { s.signal(SIGKILL); s.process.waitUntilExit() }
        bridge?.server.kill()
        ns?.remove()
        server = nil; bridge = nil; ns = nil
        dir = nil
        super.tearDown()
    }

    func start() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.example) else {
            if ProcessInfo.processInfo.environment["VIO_REQUIRE_EXAMPLES"] == "1" {
                throw TestFailure("\(Self.example) is missing (swift build --package-path Examples/HummingbirdOnDataplane)")
            }
            throw XCTSkip("the Hummingbird example is not built (swift build --package-path Examples/HummingbirdOnDataplane)")
        }
        dir = try TempDir()
        let ns = try NetNamespace(dir: dir)
        self.ns = ns
        let bridge = try TapBridge(namespace: ns, dir: dir, hostAddress: "198.18.0.1/24")
        self.bridge = bridge
        let s = try Vio(["--port", "vhost:\(bridge.socket)", "--ip", "\(Self.serverIP)/24"], dir: dir, name: "hummingbird", json: false,
                        binary: Self.example)
        server = s
        guard s.waitForOutput("hummingbird: listening", timeout: 60) else {
            throw TestFailure("the Hummingbird example did not start: \(s.wait(timeout: 5))\nbridge: \(bridge.tail())")
        }
    }

    func curl(_ args: [String], timeout: Double = 60) throws -> CommandResult {
        try ns!.run(["/usr/bin/curl", "-sS", "--max-time", "\(Int(timeout))"] + args, timeout: timeout + 10)
    }

    func testRoutesJSONMiddlewareBodiesStreamingAndConcurrency() throws {
        try start()
        // Two routes on one kept-alive connection, then a 404.
        let hello = try curl(["-w", "%{http_code} %{num_connects}\\n", Self.url + "/hello", Self.url + "/hello/virtio", Self.url + "/nope"])
        XCTAssertEqual(hello.status, 0, hello.stderr)
        XCTAssertEqual(hello.text, "hello\n200 1\nhello, virtio\n200 0\n404 0\n", hello.stderr)
        // JSON, with the middleware's header and the Date/Server headers.
        let json = try curl(["-D", "-", Self.url + "/json/lcore"])
        XCTAssertEqual(json.status, 0, json.stderr)
        let parts = json.text.components(separatedBy: "\r\n\r\n")
        let headers = parts[0].lowercased()
        XCTAssertTrue(headers.contains("x-transport: dataplane"), headers)
        XCTAssertTrue(headers.contains("server: swift-virtio"), headers)
        XCTAssertTrue(headers.contains("date: "), headers)
        XCTAssertTrue(headers.contains("content-type: application/json"), headers)
        let body = try JSONSerialization.jsonObject(with: Data(parts.dropFirst().joined(separator: "\r\n\r\n").utf8)) as? [String: String]
        XCTAssertEqual(body, ["greeting": "hello", "name": "lcore", "transport": "dataplane"])
        // A 200 KiB request body comes back intact; one over the 1 MiB limit gets 413.
        let payload = dir.path("payload.bin")
        try Data((0..<(200 << 10)).map { _ in UInt8.random(in: 0...255) }).write(to: URL(fileURLWithPath: payload))
        let echo = try curl(["--data-binary", "@" + payload, "-o", dir.path("echo.bin"), "-w", "%{http_code}", Self.url + "/echo"])
        XCTAssertEqual(echo.text, "200", echo.stderr)
        XCTAssertEqual(FileManager.default.contents(atPath: dir.path("echo.bin")), FileManager.default.contents(atPath: payload))
        let big = dir.path("big.bin")
        try Data(count: 2 << 20).write(to: URL(fileURLWithPath: big))
        let tooBig = try curl(["--data-binary", "@" + big, "-o", "/dev/null", "-w", "%{http_code}", Self.url + "/echo"])
        XCTAssertEqual(tooBig.text, "413", tooBig.stderr)
        // 10 MiB streamed in 64 KiB chunks: the right bytes, in order.
        let script = """
        import hashlib, http.client, json, sys, threading
        host = sys.argv[1]
        c = http.client.HTTPConnection(host, 8080, timeout=60)
        c.request("GET", "/stream/160"); r = c.getresponse(); data = r.read()
        pat = bytes(range(251)) * (len(data) // 251 + 1)
        stream_ok = r.status == 200 and len(data) == 160 * 65536 and data == pat[:len(data)]
        results = []
        def worker():
            k = http.client.HTTPConnection(host, 8080, timeout=60)
            ok = 0
            for i in range(25):
                k.request("GET", "/hello/%d" % i); rr = k.getresponse()
                if rr.status == 200 and rr.read() == b"hello, %d\\n" % i: ok += 1
            results.append(ok)
        ts = [threading.Thread(target=worker) for _ in range(40)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(json.dumps({"stream": stream_ok, "streamBytes": len(data), "requests": sum(results)}))
        """
        let py = dir.path("client.py")
        try Data(script.utf8).write(to: URL(fileURLWithPath: py))
        let r = try ns!.run(["/usr/bin/python3", py, Self.serverIP], timeout: 120)
        XCTAssertEqual(r.status, 0, r.stderr)
        let result = try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any]
        XCTAssertEqual(result?["stream"] as? Bool, true, "\(r.text)")
        XCTAssertEqual((result?["requests"] as? NSNumber)?.intValue, 40 * 25, "\(r.text)")
        // SIGINT: the loop closes the channels, the port stops, exit 0.
        server!.signal(SIGINT)
        let end = server!.wait(timeout: 30)
        XCTAssertEqual(end.status, 0, "\(end)")
        XCTAssertTrue(end.stdout.contains("hummingbird: stopped"), "\(end)")
    }
}
