import DataplaneHTTP
import NetStack
import NIOCore
import NIOHTTP1
import XCTest

/// The parts of the HTTP layer that need no port: address parsing, routing, static files.
final class RouterTests: XCTestCase {
    /// Under LeakSanitizer, XCTest's own retain cycles are not reported (LeakCheckRoots.swift).
    override class func setUp() {
        super.setUp()
        LeakCheckRoots.install
    }

    func request(_ method: HTTPMethod, _ uri: String) -> HTTPRequest {
        HTTPRequest(head: HTTPRequestHead(version: .http1_1, method: method, uri: uri), body: ByteBuffer())
    }

    func body(_ r: HTTPResponse) -> String {
        if case .bytes(let b) = r.body { return String(buffer: b) }
        return ""
    }

    func testAddressesAndPrefixes() {
        XCTAssertEqual(IPv4Interface(cidr: "198.18.0.2/24")?.netmask.description, "255.255.255.0")
        XCTAssertEqual(IPv4Interface(cidr: "10.1.2.3/17")?.netmask.description, "255.255.128.0")
        XCTAssertEqual(IPv4Address("198.18.0.2")?.networkOrder, UInt32(bigEndian: 0xC612_0002))
        XCTAssertEqual(IPv4Address(networkOrder: UInt32(bigEndian: 0xC612_0002)).description, "198.18.0.2")
        for bad in ["198.18.0", "198.18.0.256", "a.b.c.d", "1..2.3", "1.2.3.4.5", "", "+1.2.3.4"] {
            XCTAssertNil(IPv4Address(bad), bad)
        }
        for bad in ["198.18.0.2", "198.18.0.2/0", "198.18.0.2/33", "198.18.0.2/x", "/24"] {
            XCTAssertNil(IPv4Interface(cidr: bad), bad)
        }
    }

    func testRoutesMethodsAndQueries() {
        let r = HTTPRouter()
        r.get("/hello") { req in .text("hi \(req.query ?? "-")") }
        r.post("/echo") { req in HTTPResponse(body: .bytes(req.body)) }
        r.onPrefix("/api/") { req in .text("api \(req.path)") }
        XCTAssertEqual(body(r.handle(request(.GET, "/hello"))), "hi -")
        XCTAssertEqual(body(r.handle(request(.GET, "/hello?x=1"))), "hi x=1")
        XCTAssertEqual(r.handle(request(.HEAD, "/hello")).status, .ok)
        XCTAssertEqual(r.handle(request(.DELETE, "/hello")).status, .methodNotAllowed)
        XCTAssertEqual(r.handle(request(.GET, "/echo")).status, .methodNotAllowed)
        XCTAssertEqual(body(r.handle(request(.PUT, "/api/v1/x"))), "api /api/v1/x")
        XCTAssertEqual(r.handle(request(.GET, "/nope")).status, .notFound)
    }

    func testStaticFilesStayInsideTheRoot() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("vio-router-\(getpid())")
        try FileManager.default.createDirectory(at: root.appendingPathComponent("sub"), withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: root) }
        try Data("index".utf8).write(to: root.appendingPathComponent("index.html"))
        try Data("a b".utf8).write(to: root.appendingPathComponent("sub/a b.txt"))
        let r = HTTPRouter()
        r.staticFiles(at: "/", root: root.path)
        let index = r.handle(request(.GET, "/"))
        XCTAssertEqual(index.status, .ok)
        XCTAssertEqual(index.bodyLength, 5)
        XCTAssertEqual(index.headers.first(name: "content-type"), "text/html; charset=utf-8")
        let spaced = r.handle(request(.GET, "/sub/a%20b.txt"))
        XCTAssertEqual(spaced.status, .ok)
        XCTAssertEqual(spaced.bodyLength, 3)
        let head = r.handle(request(.HEAD, "/sub/a%20b.txt"))
        XCTAssertEqual(head.headers.first(name: "content-length"), "3")
        XCTAssertEqual(r.handle(request(.GET, "/../etc/passwd")).status, .forbidden)
        XCTAssertEqual(r.handle(request(.GET, "/sub/%2e%2e/%2e%2e/etc/passwd")).status, .forbidden)
        XCTAssertEqual(r.handle(request(.GET, "/bad%zz")).status, .badRequest)
        XCTAssertEqual(r.handle(request(.GET, "/x%00y")).status, .badRequest)
        XCTAssertEqual(r.handle(request(.GET, "/sub")).status, .notFound)   // a directory is not a file
        XCTAssertEqual(r.handle(request(.POST, "/index.html")).status, .methodNotAllowed)
    }
}
