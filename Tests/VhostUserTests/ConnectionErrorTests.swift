import CVioLinux
import Foundation
import VhostUser
import VirtioCore
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// Every way the connection can fail, each mapped to its typed error, and hang-up detection.
final class ConnectionErrorTests: XCTestCase {

    /// Runs the connection's init against a backend with `faults` and returns the error it throws.
    private func initError(_ faults: [Fault], script: BackendScript = BackendScript(), timeout: Double = 2,
                           file: StaticString = #filePath, line: UInt = #line) throws -> (VhostUserError?, FakeBackend) {
        var s = script
        s.faults = faults
        let backend = try FakeBackend(script: s)
        do {
            _ = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: timeout)
            XCTFail("connection succeeded", file: file, line: line)
            return (nil, backend)
        } catch let e as VhostUserError {
            return (e, backend)
        } catch {
            XCTFail("not a VhostUserError: \(error)", file: file, line: line)
            return (nil, backend)
        }
    }

    private func assertBadReply(_ error: VhostUserError?, request: String,
                                file: StaticString = #filePath, line: UInt = #line) {
        guard case .badReply(let r, _) = error else {
            return XCTFail("expected .badReply(\(request), …), got \(String(describing: error))", file: file, line: line)
        }
        XCTAssertEqual(r, request, file: file, line: line)
    }

    // MARK: Connecting

    func testSocketMissing() throws {
        let dir = try TempDirectory()
        defer { dir.remove() }
        let path = dir.file("nobody.sock")
        XCTAssertThrowsError(try VhostUserConnection(path: path, replyTimeoutSeconds: 1)) { error in
            XCTAssertEqual(error as? VhostUserError, .socketMissing(path: path))
        }
    }

    func testBoundButNotListeningIsConnectionRefused() throws {
        let dir = try TempDirectory()
        defer { dir.remove() }
        let path = dir.file("deaf.sock")
        let s = try bindWithoutListening(path)
        defer { close(s) }
        XCTAssertThrowsError(try VhostUserConnection(path: path, replyTimeoutSeconds: 1)) { error in
            XCTAssertEqual(error as? VhostUserError, .connectionRefused(path: path))
        }
    }

    // MARK: Bad backends during the handshake

    func testBackendClosesMidHandshake() throws {
        // Message 2 is GET_FEATURES: the backend reads it, then closes without answering.
        let (error, backend) = try initError([.closeAfter(message: 2)])
        defer { backend.shutdown() }
        XCTAssertEqual(error, .backendClosed(request: "GET_FEATURES"))
        XCTAssertEqual(backend.requests, [Code.setOwner, Code.getFeatures])
    }

    func testWrongReplyCode() throws {
        let (error, backend) = try initError([.wrongReplyCode(Code.getFeatures)])
        defer { backend.shutdown() }
        assertBadReply(error, request: "GET_FEATURES")
    }

    func testReplyWithoutReplyBit() throws {
        let (error, backend) = try initError([.missingReplyBit(Code.getFeatures)])
        defer { backend.shutdown() }
        assertBadReply(error, request: "GET_FEATURES")
    }

    func testShortReplyPayload() throws {
        let (error, backend) = try initError([.shortPayload(Code.getFeatures)])
        defer { backend.shutdown() }
        assertBadReply(error, request: "GET_FEATURES")
    }

    func testShortProtocolFeaturesReply() throws {
        let (error, backend) = try initError([.shortPayload(Code.getProtocolFeatures)])
        defer { backend.shutdown() }
        assertBadReply(error, request: "GET_PROTOCOL_FEATURES")
    }

    func testShortAck() throws {
        let (error, backend) = try initError([.shortPayload(Code.setStatus)])
        defer { backend.shutdown() }
        assertBadReply(error, request: "SET_STATUS")
    }

    func testNonZeroAckDuringInit() throws {
        // The first acked message is SET_STATUS (ACKNOWLEDGE|DRIVER).
        let (error, backend) = try initError([.nack(Code.setStatus, code: 1)])
        defer { backend.shutdown() }
        XCTAssertEqual(error, .requestFailed(request: "SET_STATUS", code: 1))
    }

    func testNonZeroAckForMemTable() throws {
        let backend = try FakeBackend(script: BackendScript(faults: [.nack(Code.setMemTable, code: 5)]))
        defer { backend.shutdown() }
        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        try conn.negotiate([.version1], queueCount: 1)
        let r = try MemfdRegion(name: "vhu-nack", fileSize: 0x1000)
        XCTAssertThrowsError(try conn.setMemory([r.region])) { error in
            XCTAssertEqual(error as? VhostUserError, .requestFailed(request: "SET_MEM_TABLE", code: 5))
        }
    }

    func testNoReplyTimesOut() throws {
        let start = Date()
        let (error, backend) = try initError([.noReply(Code.getFeatures)], timeout: 1)
        defer { backend.shutdown() }
        XCTAssertEqual(error, .timeout(request: "GET_FEATURES", seconds: 1))
        let elapsed = Date().timeIntervalSince(start)
        XCTAssertGreaterThanOrEqual(elapsed, 0.9)
        XCTAssertLessThan(elapsed, 5)
    }

    func testMissingAckTimesOut() throws {
        // REPLY_ACK negotiated but the backend never acks: the first acked message times out.
        var script = BackendScript()
        script.sendAcks = false
        let (error, backend) = try initError([], script: script, timeout: 1)
        defer { backend.shutdown() }
        XCTAssertEqual(error, .timeout(request: "SET_STATUS", seconds: 1))
    }

    func testGetVringBaseReplyForWrongRing() throws {
        var script = BackendScript()
        script.vringBaseReplyIndex = 7
        let backend = try FakeBackend(script: script)
        defer { backend.shutdown() }
        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        try conn.negotiate([.version1], queueCount: 1)
        let r = try MemfdRegion(name: "vhu-gvb", fileSize: 0x10_0000)
        try conn.setMemory([r.region])
        try conn.setupQueue(0, addresses: QueueAddresses(size: 64, desc: r.address, avail: r.address + 0x400,
                                                         used: r.address + 0x800))
        try conn.start()
        XCTAssertThrowsError(try conn.stop()) { error in
            assertBadReply(error as? VhostUserError, request: "GET_VRING_BASE")
        }
    }

    func testEmptyGetConfigReplyIsBadReply() throws {
        // vhost-user.rst: a zero-length GET_CONFIG reply payload signals an error.
        let backend = try FakeBackend(script: BackendScript(faults: [.shortPayload(Code.getConfig)]))
        defer { backend.shutdown() }
        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        XCTAssertThrowsError(try conn.readConfig(offset: 0, count: 6)) { error in
            assertBadReply(error as? VhostUserError, request: "GET_CONFIG")
        }
    }

    func testMoreThanEightRegions() throws {
        let backend = try FakeBackend()
        defer { backend.shutdown() }
        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        let before = backend.messages.count
        let regions = (0..<9).map { MemoryRegion(address: UInt64($0) << 21, size: 1 << 21, fd: -1, fileOffset: 0) }
        XCTAssertThrowsError(try conn.setMemory(regions)) { error in
            XCTAssertEqual(error as? VhostUserError, .tooManyRegions(9))
        }
        // Nothing was sent: the connection is still usable.
        XCTAssertEqual(backend.messages.count, before)
        XCTAssertEqual(try conn.readConfig(offset: 0, count: 2), [0xA0, 0xA1])
        XCTAssertEqual(backend.requests.suffix(1), [Code.getConfig])
    }

    // MARK: Hang-up

    func testHangUpIsDetected() throws {
        let backend = try FakeBackend()
        defer { backend.shutdown() }
        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        try conn.negotiate([.version1, .inOrder], queueCount: 1)
        let r = try MemfdRegion(name: "vhu-hup", fileSize: 0x10_0000)
        try conn.setMemory([r.region])
        try conn.setupQueue(0, addresses: QueueAddresses(size: 64, desc: r.address, avail: r.address + 0x400,
                                                         used: r.address + 0x800))
        try conn.start()
        XCTAssertTrue(conn.isConnected)
        XCTAssertNil(conn.disconnectReason)

        backend.hangUp()
        XCTAssertTrue(eventually(within: 2) { !conn.isConnected }, "isConnected still true 2 s after the hang-up")
        XCTAssertNotNil(conn.disconnectReason)
        // With the backend gone, stop() has nothing to stop and does not throw …
        XCTAssertNoThrow(try conn.stop())
        // … and the next message fails as "backend closed".
        XCTAssertThrowsError(try conn.setMemory([r.region])) { error in
            XCTAssertEqual(error as? VhostUserError, .backendClosed(request: "SET_MEM_TABLE"))
        }
    }

    func testHangUpRightAfterHandshake() throws {
        let backend = try FakeBackend()
        defer { backend.shutdown() }
        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        backend.hangUp()
        XCTAssertTrue(eventually(within: 2) { !conn.isConnected })
        XCTAssertNotNil(conn.disconnectReason)
    }
}

extension BackendScript {
    init(faults: [Fault]) {
        self.init()
        self.faults = faults
    }
}
