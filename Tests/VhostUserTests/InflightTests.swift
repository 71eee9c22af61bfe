import CVioLinux
import VhostUser
import VirtioCore
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (vhost-user.rst, "Inflight I/O tracking"): asked for only
/// when the connection tracks in-flight requests; GET_INFLIGHT_FD with the queue count and size
/// (QEMU's 24-byte payload), the backend's area handed back at once with SET_INFLIGHT_FD, and
/// again after every later SET_FEATURES (what a reconnected backend gets).
final class InflightTests: XCTestCase {
    let inflightBit: UInt64 = 1 << 12

    func testInflightAreaIsFetchedHandedBackAndResent() throws {
        let area = cvio_memfd("vhu-inflight")
        XCTAssertGreaterThanOrEqual(area, 0)
        defer { close(area) }
        XCTAssertEqual(ftruncate(area, 4096), 0)
        var script = BackendScript()
        script.protocolFeatures |= inflightBit
        script.inflightFD = area
        let backend = try FakeBackend(script: script)
        defer { backend.shutdown() }

        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2, inflightTracking: true)
        XCTAssertTrue(conn.protocolFeatures.contains(.inflightShmfd))
        try conn.negotiate([.version1], queueCount: 2)
        XCTAssertTrue(try conn.setUpInflightTracking(queueCount: 2, queueSize: 128))
        // As after a reconnect: the next negotiation resends the same area after SET_FEATURES.
        try conn.negotiate([.version1], queueCount: 2)
        let m = backend.waitForMessages(18)
        let get = m.filter { $0.request == Code.getInflightFD }
        let set = m.filter { $0.request == Code.setInflightFD }
        XCTAssertEqual(get.count, 1, "the area is asked for once")
        XCTAssertEqual(get.first?.payload.count, 24)
        XCTAssertEqual(get.first?.u16(at: 16), 2, "num_queues")
        XCTAssertEqual(get.first?.u16(at: 18), 128, "queue_size")
        XCTAssertEqual(set.count, 2, "handed back at once and again after the next SET_FEATURES")
        for s in set {
            XCTAssertEqual(s.u64(at: 0), 4096, "mmap_size as the backend said")
            XCTAssertEqual(s.fds.count, 1)
            XCTAssertEqual(s.fds.first.flatMap(fileIdentity), fileIdentity(area), "the backend's own area, kept by the front end")
        }
        let order = m.map(\.request)
        let lastSetFeatures = order.lastIndex(of: Code.setFeatures)!
        XCTAssertEqual(order[lastSetFeatures + 1], Code.setInflightFD, "right after SET_FEATURES")
    }

    /// Without being asked (net), the bit is not negotiated even when offered.
    func testNotNegotiatedUnlessAsked() throws {
        var script = BackendScript()
        script.protocolFeatures |= inflightBit
        let backend = try FakeBackend(script: script)
        defer { backend.shutdown() }
        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        XCTAssertFalse(conn.protocolFeatures.contains(.inflightShmfd))
        XCTAssertFalse(try conn.setUpInflightTracking(queueCount: 1, queueSize: 128))
    }
}
