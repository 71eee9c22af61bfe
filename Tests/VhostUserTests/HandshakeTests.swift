import CVioLinux
import VhostUser
import VirtioCore
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// `VhostUserConnection` against the fake backend: message order (DESIGN.md, "vhost-user
/// frontend, in order"), flags, payloads and descriptor passing.
final class HandshakeTests: XCTestCase {
    /// Two queues in region 0: ring i's descriptor table, avail and used ring 16 KiB apart.
    private func queueAddresses(_ r: MemfdRegion, ring i: Int) -> QueueAddresses {
        let base = r.address + UInt64(i) * 0x4000
        return QueueAddresses(size: 256, desc: base, avail: base + 0x1000, used: base + 0x2000)
    }

    func testFullHandshakeOrderFlagsPayloadsAndDescriptors() throws {
        var script = BackendScript()
        // Offer more protocol features than we use: we must ask for the intersection only.
        script.protocolFeatures = Bits.mq | Bits.logShmfd | Bits.replyAck | Bits.backendReq
            | Bits.config | Bits.resetDevice | Bits.status
        script.queueNum = 2
        script.vringBases = [0: 17, 1: 42]
        let backend = try FakeBackend(script: script)
        defer { backend.shutdown() }

        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        XCTAssertEqual(conn.deviceFeatures, [.version1, .inOrder], "bit 30 is a transport bit, not a device feature")
        XCTAssertEqual(conn.protocolFeatures, [.mq, .replyAck, .config, .status])
        XCTAssertEqual(conn.queueLimit, .deviceUnits(2))
        XCTAssertTrue(conn.isConnected)
        XCTAssertNil(conn.disconnectReason)

        XCTAssertEqual(try conn.readConfig(offset: 2, count: 6), Array(script.config[2..<8]))

        try conn.negotiate([.version1, .inOrder], queueCount: 2)
        XCTAssertEqual(conn.negotiatedFeatures, [.version1, .inOrder])

        let r0 = try MemfdRegion(name: "vhu-r0", fileSize: 0x20_0000)
        let r1 = try MemfdRegion(name: "vhu-r1", fileSize: 0x11_0000, fileOffset: 0x1000)
        let pattern0: [UInt8] = (0..<64).map { UInt8($0) }, pattern1: [UInt8] = (0..<64).map { UInt8(0xFF - $0) }
        r0.base.copyMemory(from: pattern0, byteCount: pattern0.count)
        r1.base.copyMemory(from: pattern1, byteCount: pattern1.count)
        try conn.setMemory([r0.region, r1.region])

        let q0 = queueAddresses(r0, ring: 0), q1 = queueAddresses(r0, ring: 1)
        try conn.setupQueue(0, addresses: q0)
        try conn.setupQueue(1, addresses: q1)
        try conn.start()
        conn.notify(queue: 0)
        try conn.stop()

        let m = backend.messages
        // The exact order.
        let expected: [UInt32] = [
            Code.setOwner, Code.getFeatures, Code.getProtocolFeatures, Code.setProtocolFeatures,
            Code.getQueueNum, Code.setStatus,                                   // init
            Code.getConfig,                                                     // readConfig
            Code.setVringCall, Code.setVringCall, Code.setFeatures, Code.setStatus,  // negotiate
            Code.setMemTable,                                                   // setMemory
            Code.setVringNum, Code.setVringBase, Code.setVringAddr, Code.setVringKick,  // ring 0
            Code.setVringNum, Code.setVringBase, Code.setVringAddr, Code.setVringKick,  // ring 1
            Code.setVringEnable, Code.setVringEnable, Code.setStatus,           // start
            Code.setVringEnable, Code.setVringEnable, Code.getVringBase, Code.getVringBase,  // stop
        ]
        XCTAssertEqual(m.map(\.request), expected)
        guard m.count == expected.count else { return }

        // Flags: version 1 always; NEED_REPLY on every message without its own reply once
        // REPLY_ACK is negotiated (after SET_PROTOCOL_FEATURES), never before, never on requests
        // that have a reply.
        let withReply: Set<UInt32> = [Code.getFeatures, Code.getProtocolFeatures, Code.getQueueNum,
                                      Code.getConfig, Code.getVringBase]
        for (i, msg) in m.enumerated() {
            XCTAssertEqual(msg.flags & 0x3, 1, "message \(i) (\(msg.request)) version")
            XCTAssertEqual(msg.flags & Bits.reply, 0, "message \(i) (\(msg.request)) must not carry the reply bit")
            let wantNeedReply = i > 3 && !withReply.contains(msg.request)
            XCTAssertEqual(msg.needsReply, wantNeedReply, "NEED_REPLY on message \(i) (request \(msg.request))")
            XCTAssertEqual(msg.flags & ~(Bits.version | Bits.needReply), 0, "message \(i): no other flag bits")
        }

        // Payloads.
        XCTAssertEqual(m[3].payload.count, 8)
        XCTAssertEqual(m[3].u64(at: 0), Bits.mq | Bits.replyAck | Bits.config | Bits.status,
                       "SET_PROTOCOL_FEATURES = offered ∩ {MQ, REPLY_ACK, CONFIG, STATUS} = 0x10209")
        XCTAssertEqual(m[5].payload.count, 8)
        XCTAssertEqual(m[5].u64(at: 0), 0x3, "SET_STATUS ACKNOWLEDGE|DRIVER")
        // GET_CONFIG: offset, size, flags, then size zero bytes.
        XCTAssertEqual(m[6].payload, [2, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        // SET_VRING_CALL per ring, one eventfd each, two different eventfds.
        for (k, i) in [7, 8].enumerated() {
            XCTAssertEqual(m[i].payload.count, 8)
            XCTAssertEqual(m[i].u64(at: 0), UInt64(k), "SET_VRING_CALL ring index, no-fd bit 8 clear")
            XCTAssertEqual(m[i].fds.count, 1, "SET_VRING_CALL \(k) carries exactly one descriptor")
            if let f = m[i].fds.first { XCTAssertEqual(descriptorTarget(f), "anon_inode:[eventfd]") }
        }
        if m[7].fds.count == 1, m[8].fds.count == 1 {
            var one: UInt64 = 1
            XCTAssertEqual(write(m[7].fds[0], &one, 8), 8)
            XCTAssertNil(readEventCounter(m[8].fds[0]), "ring 1's call eventfd is not ring 0's")
            XCTAssertEqual(readEventCounter(m[7].fds[0]), 1)
        }
        XCTAssertEqual(m[9].payload.count, 8)
        XCTAssertEqual(m[9].u64(at: 0), Bits.version1 | Bits.inOrder | Bits.protocolFeatures,
                       "SET_FEATURES acks bit 30 with protocol features in use")
        XCTAssertEqual(m[10].u64(at: 0), 0xB, "SET_STATUS ACKNOWLEDGE|DRIVER|FEATURES_OK")

        // SET_MEM_TABLE: 2 regions, guest address == user address, descriptors in region order.
        let mt = m[11]
        XCTAssertEqual(mt.payload.count, 8 + 32 * 2)
        XCTAssertEqual(mt.u32(at: 0), 2)
        XCTAssertEqual(mt.u32(at: 4), 0)
        for (i, r) in [r0, r1].enumerated() {
            let o = 8 + 32 * i
            XCTAssertEqual(mt.u64(at: o), r.address, "region \(i) guest address")
            XCTAssertEqual(mt.u64(at: o + 8), UInt64(r.size), "region \(i) size")
            XCTAssertEqual(mt.u64(at: o + 16), r.address, "region \(i) user address")
            XCTAssertEqual(mt.u64(at: o + 24), UInt64(r.fileOffset), "region \(i) mmap offset")
        }
        XCTAssertEqual(mt.fds.count, 2)
        if mt.fds.count == 2 {
            XCTAssertEqual(fileIdentity(mt.fds[0]), fileIdentity(r0.fd), "fd 0 is region 0's memfd")
            XCTAssertEqual(fileIdentity(mt.fds[1]), fileIdentity(r1.fd), "fd 1 is region 1's memfd")
            XCTAssertNotEqual(fileIdentity(mt.fds[0]), fileIdentity(mt.fds[1]))
            // What the backend maps at each region's mmap offset is what the driver wrote.
            XCTAssertEqual(bytesThroughMapping(fd: mt.fds[0], offset: mt.u64(at: 8 + 24)!, length: 64), pattern0)
            XCTAssertEqual(bytesThroughMapping(fd: mt.fds[1], offset: mt.u64(at: 40 + 24)!, length: 64), pattern1)
        }

        // Per ring: NUM, BASE 0, ADDR, KICK last.
        for (ring, start, q) in [(0, 12, q0), (1, 16, q1)] {
            let i = UInt32(ring)
            XCTAssertEqual(m[start].payload.count, 8)
            XCTAssertEqual(m[start].u32(at: 0), i); XCTAssertEqual(m[start].u32(at: 4), 256, "SET_VRING_NUM")
            XCTAssertEqual(m[start + 1].u32(at: 0), i); XCTAssertEqual(m[start + 1].u32(at: 4), 0, "SET_VRING_BASE")
            let a = m[start + 2]
            XCTAssertEqual(a.payload.count, 40)
            XCTAssertEqual(a.u32(at: 0), i)
            XCTAssertEqual(a.u32(at: 4), 0, "vring flags")
            XCTAssertEqual(a.u64(at: 8), q.desc)
            XCTAssertEqual(a.u64(at: 16), q.used)
            XCTAssertEqual(a.u64(at: 24), q.avail)
            XCTAssertEqual(a.u64(at: 32), 0, "log address")
            let k = m[start + 3]
            XCTAssertEqual(k.payload.count, 8)
            XCTAssertEqual(k.u64(at: 0), UInt64(ring), "SET_VRING_KICK ring index, no-fd bit clear")
            XCTAssertEqual(k.fds.count, 1)
            if let f = k.fds.first { XCTAssertEqual(descriptorTarget(f), "anon_inode:[eventfd]") }
        }
        // notify(queue: 0) kicked ring 0's eventfd and not ring 1's.
        if m[15].fds.count == 1, m[19].fds.count == 1 {
            XCTAssertEqual(readEventCounter(m[15].fds[0]), 1)
            XCTAssertNil(readEventCounter(m[19].fds[0]))
        }

        // start: ENABLE 1 per ring, then DRIVER_OK.
        XCTAssertEqual([m[20].u32(at: 0), m[20].u32(at: 4)], [0, 1])
        XCTAssertEqual([m[21].u32(at: 0), m[21].u32(at: 4)], [1, 1])
        XCTAssertEqual(m[22].u64(at: 0), 0xF, "SET_STATUS ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK")
        // stop: ENABLE 0 per ring, then GET_VRING_BASE per ring.
        XCTAssertEqual([m[23].u32(at: 0), m[23].u32(at: 4)], [0, 0])
        XCTAssertEqual([m[24].u32(at: 0), m[24].u32(at: 4)], [1, 0])
        XCTAssertEqual(m[25].payload, [0, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(m[26].payload, [1, 0, 0, 0, 0, 0, 0, 0])

        // Descriptors travel only with CALL, KICK and MEM_TABLE.
        for (i, msg) in m.enumerated()
        where ![Code.setVringCall, Code.setVringKick, Code.setMemTable].contains(msg.request) {
            XCTAssertEqual(msg.fds, [], "message \(i) (request \(msg.request)) carries no descriptor")
        }
        XCTAssertTrue(conn.isConnected)
    }

    func testBackendWithoutProtocolFeatures() throws {
        var script = BackendScript()
        script.features = Bits.version1 | Bits.inOrder  // no bit 30
        let backend = try FakeBackend(script: script)
        defer { backend.shutdown() }

        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        XCTAssertEqual(conn.deviceFeatures, [.version1, .inOrder])
        XCTAssertEqual(conn.protocolFeatures, [])
        XCTAssertNil(conn.queueLimit)
        XCTAssertThrowsError(try conn.readConfig(offset: 0, count: 6)) { error in
            guard case .incompatibleFeatures = error as? VhostUserError else {
                return XCTFail("expected .incompatibleFeatures, got \(error)")
            }
        }
        try conn.negotiate([.version1], queueCount: 2)
        let r0 = try MemfdRegion(name: "vhu-np", fileSize: 0x10_0000)
        try conn.setMemory([r0.region])
        try conn.setupQueue(0, addresses: queueAddresses(r0, ring: 0))
        try conn.setupQueue(1, addresses: queueAddresses(r0, ring: 1))
        try conn.start()
        try conn.stop()

        let m = backend.messages
        XCTAssertEqual(m.map(\.request), [
            Code.setOwner, Code.getFeatures,
            Code.setVringCall, Code.setVringCall, Code.setFeatures,
            Code.setMemTable,
            Code.setVringNum, Code.setVringBase, Code.setVringAddr, Code.setVringKick,
            Code.setVringNum, Code.setVringBase, Code.setVringAddr, Code.setVringKick,
            Code.getVringBase, Code.getVringBase,
        ], "no GET_PROTOCOL_FEATURES, no SET_VRING_ENABLE, no SET_STATUS")
        for (i, msg) in m.enumerated() {
            XCTAssertEqual(msg.flags, Bits.version, "message \(i) (\(msg.request)): version only, no NEED_REPLY")
        }
        if let f = m.first(where: { $0.request == Code.setFeatures }) {
            XCTAssertEqual(f.u64(at: 0), Bits.version1, "bit 30 not offered, so not acked")
        }
        if let t = m.first(where: { $0.request == Code.setMemTable }) {
            XCTAssertEqual(t.fds.count, 1)
            if t.fds.count == 1 { XCTAssertEqual(fileIdentity(t.fds[0]), fileIdentity(r0.fd)) }
        }
    }

    /// Protocol features without REPLY_ACK: rings still need SET_VRING_ENABLE and STATUS is
    /// still used, but nothing asks for an ack.
    func testProtocolFeaturesWithoutReplyAck() throws {
        var script = BackendScript()
        script.protocolFeatures = Bits.mq | Bits.status
        script.queueNum = 4
        let backend = try FakeBackend(script: script)
        defer { backend.shutdown() }

        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        XCTAssertEqual(conn.protocolFeatures, [.mq, .status])
        XCTAssertEqual(conn.queueLimit, .deviceUnits(4))
        try conn.negotiate([.version1, .inOrder], queueCount: 1)
        let r0 = try MemfdRegion(name: "vhu-nra", fileSize: 0x10_0000)
        try conn.setMemory([r0.region])
        try conn.setupQueue(0, addresses: queueAddresses(r0, ring: 0))
        try conn.start()
        try conn.stop()

        let m = backend.messages
        XCTAssertEqual(m.map(\.request), [
            Code.setOwner, Code.getFeatures, Code.getProtocolFeatures, Code.setProtocolFeatures,
            Code.getQueueNum, Code.setStatus,
            Code.setVringCall, Code.setFeatures, Code.setStatus,
            Code.setMemTable,
            Code.setVringNum, Code.setVringBase, Code.setVringAddr, Code.setVringKick,
            Code.setVringEnable, Code.setStatus,
            Code.setVringEnable, Code.getVringBase,
        ])
        for (i, msg) in m.enumerated() {
            XCTAssertFalse(msg.needsReply, "message \(i) (\(msg.request)): REPLY_ACK not negotiated")
        }
        XCTAssertEqual(m.first { $0.request == Code.setProtocolFeatures }?.u64(at: 0), Bits.mq | Bits.status)
        XCTAssertEqual(m.first { $0.request == Code.setFeatures }?.u64(at: 0),
                       Bits.version1 | Bits.inOrder | Bits.protocolFeatures)
    }

    /// Bit 30 offered, but none of the protocol features we use: whatever the front end does,
    /// it must be consistent — rings start disabled (and need SET_VRING_ENABLE) exactly when
    /// SET_FEATURES acks bit 30 (vhost-user.rst, "Ring states").
    func testProtocolBitWithNoUsefulProtocolFeaturesIsConsistent() throws {
        var script = BackendScript()
        script.protocolFeatures = Bits.logShmfd
        let backend = try FakeBackend(script: script)
        defer { backend.shutdown() }

        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        XCTAssertEqual(conn.protocolFeatures, [])
        XCTAssertNil(conn.queueLimit)
        try conn.negotiate([.version1], queueCount: 1)
        let r0 = try MemfdRegion(name: "vhu-lsh", fileSize: 0x10_0000)
        try conn.setMemory([r0.region])
        try conn.setupQueue(0, addresses: queueAddresses(r0, ring: 0))
        try conn.start()
        try conn.stop()

        let m = backend.messages
        XCTAssertEqual(Array(m.prefix(4).map(\.request)),
                       [Code.setOwner, Code.getFeatures, Code.getProtocolFeatures, Code.setProtocolFeatures])
        XCTAssertEqual(m[3].u64(at: 0), 0)
        XCTAssertFalse(m.contains { $0.request == Code.getQueueNum }, "MQ not offered")
        XCTAssertFalse(m.contains { $0.request == Code.setStatus }, "STATUS not offered")
        let acksBit30 = (m.first { $0.request == Code.setFeatures }?.u64(at: 0) ?? 0) & Bits.protocolFeatures != 0
        let enables = m.contains { $0.request == Code.setVringEnable }
        XCTAssertEqual(acksBit30, enables, "SET_VRING_ENABLE is sent iff bit 30 is acked")
    }

    /// The most regions SET_MEM_TABLE carries is 8; all 8 descriptors arrive in order.
    func testEightRegionsAreAccepted() throws {
        let backend = try FakeBackend()
        defer { backend.shutdown() }
        let conn = try VhostUserConnection(path: backend.socketPath, replyTimeoutSeconds: 2)
        let files = try (0..<8).map { try MemfdRegion(name: "vhu-8-\($0)", fileSize: 0x1000) }
        try conn.setMemory(files.map(\.region))
        let t = try XCTUnwrap(backend.messages.last)
        XCTAssertEqual(t.request, Code.setMemTable)
        XCTAssertEqual(t.u32(at: 0), 8)
        XCTAssertEqual(t.payload.count, 8 + 32 * 8)
        XCTAssertEqual(t.fds.map(fileIdentity), files.map { fileIdentity($0.fd) })
    }
}
