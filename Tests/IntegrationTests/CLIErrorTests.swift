import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// Wrong input gets a clear message and a non-zero exit, never a crash or a hang.
final class CLIErrorTests: XCTestCase {
    let noHuge = ["--memory", "nohuge", "--memory-mb", "128"]

    func testMissingSocket() throws {
        let dir = try TempDir()
        let r = try Vio.run(["fwd", "--port", "vhost:\(dir.path("nothing.sock"))", "--duration", "1"] + noHuge, dir: dir, json: false)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("does not exist"), r.stderr)
    }

    func testRefusedConnection() throws {
        let dir = try TempDir()
        let path = dir.path("dead.sock")
        let fd = try boundSocket(path)   // bound, never listening
        defer { close(fd) }
        let r = try Vio.run(["fwd", "--port", "vhost:\(path)", "--duration", "1"] + noHuge, dir: dir, json: false)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("refused"), r.stderr)
    }

    func testBadArguments() throws {
        let dir = try TempDir()
        for (args, needle) in [
            (["fwd", "--port", "vhost:/x.sock", "--ring-size", "100"], "--ring-size"),
            (["fwd", "--port", "/x.sock"], "--port"),
            (["fwd"], "--port vhost:PATH"),
            (["fwd", "--port", "vhost:/x.sock", "--mode", "bounce"], "--mode"),
            (["pktgen", "--port", "vhost:/x.sock"], "--count or --duration"),
            (["httpd", "--port", "vhost:/x.sock", "--ip", "198.18.0.2/24", "--mtu", "9001"], "--mtu 9001 must be 576...9000"),
            (["httpd", "--port", "vhost:/x.sock", "--ip", "198.18.0.2/24", "--mtu", "575"], "--mtu 575 must be 576...9000"),
        ] {
            let r = try Vio.run(args, dir: dir, json: false)
            XCTAssertEqual(r.status, 64, "\(args): \(r)")
            XCTAssertTrue(r.stderr.contains(needle), "\(args): \(r.stderr)")
        }
    }

    func testNotEnoughHugepages() throws {
        let dir = try TempDir()
        let r = try Vio.run(["fwd", "--port", "vhost:/x.sock", "--memory", "hugepages", "--memory-mb", "1000000"], dir: dir, json: false)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("hugepages requested"), r.stderr)
    }

    func testPoolLargerThanMemory() throws {
        let dir = try TempDir()
        let r = try Vio.run(["fwd", "--port", "vhost:/x.sock", "--mbufs", "400000", "--memory", "nohuge", "--memory-mb", "64"],
                            dir: dir, json: false)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("cannot create mbuf pool"), r.stderr)
    }

    /// A backend that does not offer VIRTIO_F_VERSION_1 is refused with the missing feature named.
    func testBackendWithIncompatibleFeatures() throws {
        let dir = try TempDir()
        let path = dir.path("legacy.sock")
        let fd = try fakeBackend(path, features: 1 << 15)  // MRG_RXBUF only, no VERSION_1
        defer { close(fd) }
        let r = try Vio.run(["fwd", "--port", "vhost:\(path)", "--duration", "1"] + noHuge, dir: dir, json: false)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("lacks required features: VERSION_1"), r.stderr)
    }

    /// `--ring packed` against a backend that offers only split rings is refused, naming the layout.
    func testForcedPackedLayoutNotOffered() throws {
        let dir = try TempDir()
        let path = dir.path("split-only.sock")
        let fd = try fakeBackend(path, features: 1 << 32 | 1 << 35)  // VERSION_1, IN_ORDER
        defer { close(fd) }
        let r = try Vio.run(["pktgen", "--port", "vhost:\(path)", "--ring", "packed", "--count", "10"] + noHuge, dir: dir, json: false)
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("does not offer packed virtqueues"), r.stderr)
    }

    /// A listening socket whose one connection answers GET_FEATURES with `features` and ignores
    /// everything else. Close the returned fd when done.
    func fakeBackend(_ path: String, features: UInt64) throws -> Int32 {
        let fd = try boundSocket(path)
        XCTAssertEqual(listen(fd, 1), 0)
        let backend = Thread {
            let c = accept(fd, nil, nil)
            guard c >= 0 else { return }
            defer { close(c) }
            var header = [UInt8](repeating: 0, count: 12)
            while recv(c, &header, 12, Int32(MSG_WAITALL)) == 12 {
                let request = UInt32(header[0]) | UInt32(header[1]) << 8
                let size = Int(header[8]) | Int(header[9]) << 8
                var payload = [UInt8](repeating: 0, count: size)
                if size > 0 { _ = recv(c, &payload, size, Int32(MSG_WAITALL)) }
                if request == 1 {  // GET_FEATURES
                    var reply: [UInt8] = [1, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0]
                    reply += (0..<8).map { UInt8(truncatingIfNeeded: features >> (8 * UInt64($0))) }
                    _ = send(c, reply, reply.count, 0)
                }
            }
        }
        backend.start()
        return fd
    }

    func boundSocket(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in for (i, b) in path.utf8.enumerated() { dst[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw TestFailure("bind \(path): errno \(errno)") }
        return fd
    }
}
