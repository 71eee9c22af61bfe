import CVioLinux
import Foundation
import Synchronization
import VhostUser
import VirtioCore
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// What vhost-user.rst requires of a front end beyond message order, checked on the wire.
final class SpecConformanceTests: XCTestCase {

    /// SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES and GET_QUEUE_NUM have "request payload:
    /// N/A" (vhost-user.rst, "Front-end message types"), so their header size must be 0. QEMU,
    /// DPDK's virtio_user and SPDK send them with size 0; rust-vmm's `vhost` backend crate
    /// (virtiofsd, vhost-device-*) rejects any other size for these four requests.
    func testRequestsWithoutPayloadAreSentWithSizeZero() throws {
        let backend = try FakeBackend()
        defer { backend.shutdown() }
        _ = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        let m = backend.messages
        XCTAssertEqual(Array(m.prefix(5).map(\.request)),
                       [Code.setOwner, Code.getFeatures, Code.getProtocolFeatures, Code.setProtocolFeatures, Code.getQueueNum])
        for msg in m where [Code.setOwner, Code.getFeatures, Code.getProtocolFeatures, Code.getQueueNum].contains(msg.request) {
            XCTAssertEqual(msg.payload.count, 0, "request \(msg.request) has no payload in the spec, got \(msg.payload.count) bytes")
        }
    }

    /// vhost-user.rst, "Multiple queue support": the front end should stop when the number of
    /// requested queues is bigger than GET_QUEUE_NUM's answer. With MQ negotiated and a backend
    /// that supports 1 queue, `negotiate(_, queueCount: 2)` must refuse before configuring ring 1.
    func testNegotiatingMoreQueuesThanTheBackendSupportsFails() throws {
        var script = BackendScript()
        script.queueNum = 1
        let backend = try FakeBackend(script: script)
        defer { backend.shutdown() }
        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        XCTAssertEqual(conn.queueLimit, .deviceUnits(1))
        XCTAssertThrowsError(try conn.negotiate([.version1], queueCount: 2),
                             "queueCount 2 > GET_QUEUE_NUM 1 must be refused")
        let calls = backend.messages.filter { $0.request == Code.setVringCall }.compactMap { $0.u64(at: 0) }
        XCTAssertFalse(calls.contains { $0 >= 1 }, "SET_VRING_CALL went to rings \(calls); ring 1 is beyond the backend's 1 queue")
    }

    /// When the handshake fails, `init` closes its socket and eventfd in its `catch`, then
    /// rethrows; because every stored property is already set, Swift then runs `deinit`, which
    /// closes both numbers again. In between, another thread may have been handed one of those
    /// numbers, and loses it. The backend closes mid-handshake and then catches every number
    /// that gets freed (see `grabDescriptors`); a number caught twice was closed under it.
    /// The backend and the connecting thread run on different CPUs so that the backend can
    /// run inside the few microseconds between the two closes.
    func testFailedHandshakeClosesNoDescriptorTwice() throws {
        var cpus = [Int32](repeating: -1, count: 64)
        let n = Int(cvio_affinity_cpus(&cpus, 64))
        let (frontCPU, backCPU): (Int32?, Int32?) = n >= 2 ? (cpus[0], cpus[1]) : (nil, nil)
        var strays: [Int32] = []
        for _ in 0..<10 {
            var script = BackendScript()
            script.faults = [.closeAfter(message: 2)]
            script.grabDescriptorsAfterClose = true
            script.grabMilliseconds = 20
            script.pinToCPU = backCPU
            let backend = try FakeBackend(script: script)
            let path = backend.socketPath
            let result = Mutex<Error?>(nil)
            let done = DispatchSemaphore(value: 0)
            let front = Thread {
                if let frontCPU { _ = cvio_pin_thread(frontCPU) }
                do { _ = try VhostUserConnection(path: path, replyTimeoutSeconds: 2) } catch { result.withLock { $0 = error } }
                done.signal()
            }
            front.start()
            XCTAssertEqual(done.wait(timeout: .now() + 5), .success)
            XCTAssertEqual(result.withLock { $0 } as? VhostUserError, .backendClosed(request: "GET_FEATURES"))
            XCTAssertTrue(backend.waitUntilFinished())
            var seen = Set<Int32>()
            for f in backend.grabbedDescriptors where !seen.insert(f).inserted { strays.append(f) }
            backend.shutdown()
            if !strays.isEmpty { break }
        }
        XCTAssertEqual(strays, [], "descriptor number(s) \(strays) were closed by the failed connection while the backend thread owned them")
    }
}
