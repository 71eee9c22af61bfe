import DPDK
import Foundation
import VirtioCore
import VirtioNet
import VirtioTestSupport
import XCTest

/// `VirtioNetDevice` / `VirtioNetPort` in this process, on both ring layouts, against the shared
/// `FakeTransport` with the test playing the device on the rings through the device models:
/// MRG_RXBUF reassembly, malformed receive buffers, TX descriptor chains and headers, restart,
/// VQ_PAIRS_SET on a frontend-carried control queue (vhost-user) and on a real control queue
/// (virtio-pci), and the config values a device may get wrong.
final class NetPortTests: XCTestCase {
    override func setUpWithError() throws {
        do { try InProcessEAL.require() } catch { throw XCTSkip("DPDK EAL could not start here: \(error)") }
    }

    /// The device side of one queue, either layout.
    struct Model {
        var pop: () -> [(id: UInt16, segments: [SplitDeviceModel.Segment])]
        var complete: ([UInt16], [UInt32]) -> Void
        var violations: () -> [String]

        init<Ring: Virtqueue & ~Copyable>(_: Ring.Type, _ t: FakeTransport, queue: Int, inOrder: Bool) throws {
            if Ring.layout == .packed {
                let m = try t.packedModel(queue)
                pop = { m.popAvailable().map { ($0.id, $0.segments) } }
                complete = { m.complete(ids: $0, lengths: $1) }
                violations = { m.violations }
            } else {
                let m = try t.splitModel(queue, inOrder: inOrder)
                pop = { m.popAvailable().map { ($0.headId, $0.segments) } }
                complete = { m.complete(ids: $0, lengths: $1) }
                violations = { m.violations }
            }
        }
    }

    static let ringSize = 64

    func open<Ring: Virtqueue & ~Copyable>(_: Ring.Type, extra: VirtioFeatures = [], pairs: Int = 1, limit: QueueLimit? = nil,
                                           pool: PacketPool) throws -> (FakeTransport, VirtioNetDevice<Ring>) {
        let t = FakeTransport(offered: VirtioFeatures([.version1, .netMergeableRxBuffers, .inOrder]).union(Ring.layoutFeatures).union(extra),
                              queueLimit: limit)
        var o = VirtioNetOptions()
        o.ringSize = Self.ringSize
        o.queuePairs = pairs
        return (t, try VirtioNetDevice<Ring>(transport: t, pool: pool, options: o))
    }

    func ptr(_ a: UInt64) -> UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: UInt(a))! }

    // MARK: Receive

    /// A 4000-byte frame over three receive buffers (num_buffers 3 in the first one's header)
    /// comes back as one chained mbuf with every byte in place; the ring is refilled.
    func mergeable<Ring: Virtqueue & ~Copyable>(_ r: Ring.Type) throws {
        let pool = try InProcessEAL.pool()
        let (t, d) = try open(r, pool: pool)
        var port = try d.makePort(0)
        let rx = try Model(r, t, queue: 0, inOrder: true)
        let posted = rx.pop()
        XCTAssertEqual(posted.count, Self.ringSize, "the RX ring is filled at start")
        XCTAssertTrue(posted.allSatisfy { $0.segments.count == 1 && $0.segments[0].writable })
        let frame = (0..<4000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let room = Int(posted[0].segments[0].len)
        XCTAssertGreaterThan(room, 12 + 1000)
        // Buffer 0: header + the first bytes; buffers 1, 2: payload from their first byte.
        var lengths: [UInt32] = [], offset = 0
        for k in 0..<3 {
            let seg = posted[k].segments[0]
            let p = ptr(seg.addr)
            let header = k == 0 ? 12 : 0
            if k == 0 {
                for i in 0..<12 { p.storeBytes(of: UInt8(0), toByteOffset: i, as: UInt8.self) }
                p.storeBytes(of: UInt16(3).littleEndian, toByteOffset: 10, as: UInt16.self)
            }
            let n = k < 2 ? min(1500, room - header) : frame.count - offset
            frame.withUnsafeBytes { (p + header).copyMemory(from: $0.baseAddress! + offset, byteCount: n) }
            offset += n
            lengths.append(UInt32(header + n))
        }
        XCTAssertEqual(offset, frame.count)
        rx.complete(posted.prefix(3).map(\.id), lengths)
        let out = UnsafeMutablePointer<Mbuf>.allocate(capacity: 32)
        defer { out.deallocate() }
        XCTAssertEqual(port.rxBurst(out, max: 32), 1)
        XCTAssertEqual(out[0].segmentCount, 3)
        XCTAssertEqual(out[0].packetLength, 4000)
        XCTAssertEqual(out[0].copyPacket(), frame)
        XCTAssertEqual(port.counters.rxPackets, 1)
        XCTAssertEqual(port.counters.rxBytes, 4000)
        XCTAssertEqual(port.counters.rxErrors, 0)
        out[0].free()
        XCTAssertEqual(rx.pop().count, 3, "the three buffers were replaced")
        XCTAssertEqual(pool.inUseCount, Self.ringSize, "only the ring's buffers are out")
        XCTAssertEqual(rx.violations(), [])
        let reclaimed = port.close()
        XCTAssertEqual(reclaimed, Self.ringSize)
        XCTAssertEqual(pool.inUseCount, 0)
    }

    func testMergeableFrameReassembledSplit() throws { try mergeable(SplitVirtqueue.self) }
    func testMergeableFrameReassembledPacked() throws { try mergeable(PackedVirtqueue.self) }

    /// Buffers shorter than the header, num_buffers 0 and num_buffers beyond the ring are
    /// counted in rxErrors and their mbufs go back to the pool; nothing reaches the caller.
    func malformed<Ring: Virtqueue & ~Copyable>(_ r: Ring.Type) throws {
        let pool = try InProcessEAL.pool()
        let (t, d) = try open(r, pool: pool)
        var port = try d.makePort(0)
        let rx = try Model(r, t, queue: 0, inOrder: true)
        let posted = rx.pop()
        let h1 = ptr(posted[1].segments[0].addr), h2 = ptr(posted[2].segments[0].addr)
        h1.storeBytes(of: UInt16(0), toByteOffset: 10, as: UInt16.self)
        h2.storeBytes(of: UInt16(Self.ringSize + 1).littleEndian, toByteOffset: 10, as: UInt16.self)
        rx.complete(posted.prefix(3).map(\.id), [11, 60, 60])
        let out = UnsafeMutablePointer<Mbuf>.allocate(capacity: 32)
        defer { out.deallocate() }
        XCTAssertEqual(port.rxBurst(out, max: 32), 0)
        XCTAssertEqual(port.counters.rxErrors, 3)
        XCTAssertEqual(port.counters.rxPackets, 0)
        XCTAssertEqual(pool.inUseCount, Self.ringSize, "the three bad buffers were freed and replaced")
        XCTAssertTrue(port.isLinkUp, "bad frames are the device's data, not a broken ring")
        _ = port.close()
        XCTAssertEqual(pool.inUseCount, 0)
    }

    func testMalformedReceiveBuffersSplit() throws { try malformed(SplitVirtqueue.self) }
    func testMalformedReceiveBuffersPacked() throws { try malformed(PackedVirtqueue.self) }

    // MARK: Transmit

    /// One-segment packets are one descriptor each (the header in the headroom, zeroed); a
    /// two-segment mbuf chain is a two-descriptor chain. Completed mbufs are freed by the next burst.
    func transmit<Ring: Virtqueue & ~Copyable>(_ r: Ring.Type) throws {
        let pool = try InProcessEAL.pool()
        let (t, d) = try open(r, pool: pool)
        var port = try d.makePort(0)
        let tx = try Model(r, t, queue: 1, inOrder: true)
        let pkts = UnsafeMutablePointer<Mbuf>.allocate(capacity: 8)
        defer { pkts.deallocate() }
        for i in 0..<4 {
            let m = pool.allocate()!
            m.data.initializeMemory(as: UInt8.self, repeating: UInt8(i + 1), count: 100)
            m.dataLength = 100; m.packetLength = 100
            (m.data - 12).initializeMemory(as: UInt8.self, repeating: 0xee, count: 12)
            pkts[i] = m
        }
        XCTAssertEqual(port.txBurst(pkts, count: 4), 4)
        var used = tx.pop()
        XCTAssertEqual(used.count, 4)
        for (i, b) in used.enumerated() {
            XCTAssertEqual(b.segments.count, 1)
            XCTAssertEqual(b.segments[0].len, 112, "header + data")
            XCTAssertFalse(b.segments[0].writable)
            let p = ptr(b.segments[0].addr)
            XCTAssertEqual((0..<12).map { p.load(fromByteOffset: $0, as: UInt8.self) }, [UInt8](repeating: 0, count: 12))
            XCTAssertEqual(p.load(fromByteOffset: 12, as: UInt8.self), UInt8(i + 1))
        }
        // A chain: 60 bytes + 40 bytes.
        let head = pool.allocate()!, tail = pool.allocate()!
        head.data.initializeMemory(as: UInt8.self, repeating: 0xa1, count: 60); head.dataLength = 60
        tail.data.initializeMemory(as: UInt8.self, repeating: 0xb2, count: 40); tail.dataLength = 40
        head.next = tail; head.segmentCount = 2; head.packetLength = 100
        pkts[0] = head
        XCTAssertEqual(port.txBurst(pkts, count: 1), 1)
        let chain = tx.pop()
        XCTAssertEqual(chain.count, 1)
        XCTAssertEqual(chain.first?.segments.map(\.len), [72, 40])
        XCTAssertEqual(chain.first.map { ptr($0.segments[1].addr).load(as: UInt8.self) }, 0xb2)
        used += chain
        XCTAssertEqual(port.counters.txPackets, 5)
        XCTAssertEqual(port.counters.txBytes, 500)
        XCTAssertEqual(pool.inUseCount, Self.ringSize + 6)
        tx.complete(used.map(\.id), used.map { _ in 0 })
        XCTAssertEqual(port.txBurst(pkts, count: 0), 0)
        XCTAssertEqual(pool.inUseCount, Self.ringSize, "completed transmissions were freed")
        XCTAssertEqual(tx.violations(), [])
        _ = port.close()
        XCTAssertEqual(pool.inUseCount, 0)
    }

    func testTransmitDescriptorsAndChainsSplit() throws { try transmit(SplitVirtqueue.self) }
    func testTransmitDescriptorsAndChainsPacked() throws { try transmit(PackedVirtqueue.self) }

    /// A port made after DRIVER_OK keeps what the device wrote into the rings at start: DPDK's
    /// vhost turns notifications off then (split: VRING_USED_F_NO_NOTIFY; packed: the device
    /// event area's DISABLE). Laying a fresh ring over the memory at that point wiped it, and
    /// every burst then kicked the device (a write() per burst; echo ran at half speed).
    func suppression<Ring: Virtqueue & ~Copyable>(_ r: Ring.Type) throws {
        let pool = try InProcessEAL.pool()
        let (t, d) = try open(r, pool: pool)
        for q in 0..<2 {
            if Ring.layout == .packed { try t.packedModel(q).setDeviceEvent(flags: 1) } else { try t.splitModel(q).setNoNotify(true) }
        }
        var port = try d.makePort(0)
        let pkts = UnsafeMutablePointer<Mbuf>.allocate(capacity: 4)
        defer { pkts.deallocate() }
        XCTAssertTrue(pool.allocate(pkts, count: 4))
        for i in 0..<4 { pkts[i].dataLength = 60; pkts[i].packetLength = 60 }
        XCTAssertEqual(port.txBurst(pkts, count: 4), 4)
        XCTAssertEqual(t.notifications, 0, "the device asked for no notifications: \(t.notificationsByQueue)")
        _ = port.close()
        XCTAssertEqual(pool.inUseCount, 0)
    }

    func testNotificationSuppressionSurvivesMakingThePortSplit() throws { try suppression(SplitVirtqueue.self) }
    func testNotificationSuppressionSurvivesMakingThePortPacked() throws { try suppression(PackedVirtqueue.self) }

    // MARK: Restart

    /// Stop and start on the same connection: every mbuf the rings held is reclaimed, the rings
    /// continue where the device said they stopped, and the RX ring is full again.
    func restart<Ring: Virtqueue & ~Copyable>(_ r: Ring.Type) throws {
        let pool = try InProcessEAL.pool()
        let (t, d) = try open(r, pool: pool)
        var port = try d.makePort(0)
        let rxBase = t.latest(0)!.base, txBase = t.latest(1)!.base
        t.basesAtStop = { [rxBase, txBase] }
        let reclaimed = try port.restart()
        XCTAssertEqual(reclaimed, Self.ringSize, "the posted RX buffers")
        XCTAssertEqual(t.latest(0)?.base, rxBase)
        XCTAssertEqual(t.starts, 2)
        XCTAssertEqual(pool.inUseCount, Self.ringSize, "RX refilled")
        let rx = try Model(r, t, queue: 0, inOrder: true)
        XCTAssertEqual(rx.pop().count, Self.ringSize)
        XCTAssertTrue(port.isLinkUp)
        _ = port.close()
        XCTAssertEqual(pool.inUseCount, 0)
    }

    func testRestartReclaimsAndRefillsSplit() throws { try restart(SplitVirtqueue.self) }
    func testRestartReclaimsAndRefillsPacked() throws { try restart(PackedVirtqueue.self) }

    // MARK: Link

    /// A broken ring of one pair takes the device's link down for every pair.
    func testBrokenRingTakesEveryPairDown() throws {
        let pool = try InProcessEAL.pool(count: 4096)
        let (t, d) = try open(SplitVirtqueue.self, extra: [.netMultiQueue], pairs: 2, limit: .deviceUnits(2), pool: pool)
        var p0 = try d.makePort(0), p1 = try d.makePort(1)
        let rx1 = try t.splitModel(2, inOrder: true)
        _ = rx1.popAvailable()
        rx1.injectUsed(id: 9999, len: 20)
        let out = UnsafeMutablePointer<Mbuf>.allocate(capacity: 32)
        defer { out.deallocate() }
        XCTAssertEqual(p1.rxBurst(out, max: 32), 0)
        XCTAssertFalse(p1.isLinkUp)
        XCTAssertFalse(p0.isLinkUp, "pair 0 sees pair 1's failure through the device's link")
        XCTAssertTrue(p0.linkError?.contains("port 0 pair 1: RX queue stopped") == true, p0.linkError ?? "nil")
        _ = p0.close(); _ = p1.close()
        XCTAssertEqual(pool.inUseCount, 0, "every mbuf of both pairs is back")
    }

    // MARK: Queue pairs and the control queue

    /// vhost-user: the backend never sees a control queue; VQ_PAIRS_SET becomes
    /// SET_VRING_ENABLE on the pairs' rings (enabled below n, disabled above).
    func testQueuePairsSetWithoutAControlQueue() throws {
        let pool = try InProcessEAL.pool(count: 8192)
        let (t, d) = try open(SplitVirtqueue.self, extra: [.netMultiQueue, .netControlQueue], pairs: 4, limit: .deviceUnits(8), pool: pool)
        XCTAssertEqual(d.maxQueuePairs, 8)
        XCTAssertEqual(d.activeQueuePairs, 4)
        XCTAssertEqual(t.negotiatedQueueCount, 8, "4 pairs, no control queue at the backend")
        XCTAssertFalse(t.negotiated.contains(.netControlQueue), "the frontend carries the control queue")
        XCTAssertTrue(t.negotiated.contains(.netMultiQueue))
        try d.setQueuePairs(1)
        XCTAssertEqual(t.enables.map { "\($0.index):\($0.enabled)" }, ["0:true", "1:true", "2:false", "3:false", "4:false", "5:false", "6:false", "7:false"])
        XCTAssertEqual(d.activeQueuePairs, 1)
        XCTAssertThrowsError(try d.setQueuePairs(5)) { e in
            XCTAssertEqual("\(e)", "5 queue pair(s) requested, at most 4: 4 pair(s) were set up")
        }
        XCTAssertThrowsError(try VirtioNetDevice<SplitVirtqueue>(transport: FakeTransport(offered: [.version1, .netMultiQueue], queueLimit: .deviceUnits(2)),
                                                                  pool: pool, options: { var o = VirtioNetOptions(); o.queuePairs = 3; o.ringSize = 64; return o }())) { e in
            XCTAssertEqual("\(e)", "3 queue pair(s) requested, at most 2: the device offers 2")
        }
    }

    /// A virtio-pci style device: config space (MAC, max_virtqueue_pairs), a control queue after
    /// the largest pair count (index 2·max), answered by the test as the device: VQ_PAIRS_SET at
    /// start, RX modes, MAC_ADDR_SET, and an ERR answer that becomes a clear error.
    func testControlQueueCommands() throws {
        let pool = try InProcessEAL.pool(count: 8192)
        var config = [UInt8](repeating: 0, count: 12)
        config[0..<6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        config[8] = 4  // max_virtqueue_pairs
        let offered: VirtioFeatures = [.version1, .netMergeableRxBuffers, .netMAC, .netMultiQueue, .netControlQueue, .netControlRx, .netControlMACAddress]
        let t = FakeTransport(offered: offered, config: config, queueLimit: .virtqueues(9), carriesControlQueue: true)
        var commands: [[UInt8]] = []
        var answer: UInt8 = 0
        var model: SplitDeviceModel?
        defer { t.onNotify = nil }   // the handler captures `t`: break the cycle (LeakSanitizer)
        t.onNotify = { q in
            guard q == 8 else { return }
            if model == nil { model = try? t.splitModel(8) }
            for c in model!.popAvailable() {
                let segs = c.segments
                var bytes = [UInt8]()
                for s in segs.dropLast() { bytes += (0..<Int(s.len)).map { UnsafeRawPointer(bitPattern: UInt(s.addr))!.load(fromByteOffset: $0, as: UInt8.self) } }
                commands.append(bytes)
                XCTAssertEqual(segs.last?.len, 1); XCTAssertEqual(segs.last?.writable, true)
                UnsafeMutableRawPointer(bitPattern: UInt(segs.last!.addr))!.storeBytes(of: answer, as: UInt8.self)
                model!.complete(ids: [c.headId], lengths: [1])
            }
        }
        var o = VirtioNetOptions()
        o.ringSize = 64
        o.queuePairs = 2
        let d = try VirtioNetDevice<SplitVirtqueue>(transport: t, pool: pool, options: o)
        XCTAssertEqual(d.mac.array, [0x52, 0x54, 0, 0x12, 0x34, 0x56])
        XCTAssertEqual(t.negotiatedQueueCount, 9, "the control queue is queue 8 (2 × max_virtqueue_pairs)")
        XCTAssertEqual(Set(t.setups.map(\.index)), [0, 1, 2, 3, 8])
        XCTAssertEqual(commands, [[4, 0, 2, 0]], "VQ_PAIRS_SET 2 at start (a PCI device starts on one pair)")
        XCTAssertEqual(d.activeQueuePairs, 2)
        try d.setPromiscuous(true)
        try d.setAllMulticast(false)
        try d.setMAC(EthernetAddress([2, 0, 0, 0, 0, 0x42]))
        try d.setQueuePairs(1)
        XCTAssertEqual(commands.dropFirst().map { $0 }, [[0, 0, 1], [0, 1, 0], [1, 1, 2, 0, 0, 0, 0, 0x42], [4, 0, 1, 0]])
        XCTAssertEqual(d.mac.array, [2, 0, 0, 0, 0, 0x42])
        XCTAssertTrue(t.enables.isEmpty, "the device applies VQ_PAIRS_SET itself")
        answer = 1
        XCTAssertThrowsError(try d.setPromiscuous(false)) { e in
            XCTAssertEqual("\(e)", "control command class 0 command 0: the device answered VIRTIO_NET_ERR")
        }
        XCTAssertTrue(d.promiscuous, "a refused command changes nothing")
        answer = 0x7f
        XCTAssertThrowsError(try d.setAllMulticast(true)) { e in
            XCTAssertEqual("\(e)", "control command class 0 command 1: invalid ack byte 0x7f")
        }
        d.stop()
    }

    /// Config values a device may get wrong are refused with the value named.
    func testBadQueueConfigIsRefused() throws {
        let pool = try InProcessEAL.pool(count: 4096)
        let offered: VirtioFeatures = [.version1, .netMultiQueue, .netControlQueue]
        // MQ (and so max_virtqueue_pairs) is negotiated only for more than one pair.
        let twoPairs = { var o = VirtioNetOptions(); o.ringSize = 64; o.queuePairs = 2; return o }()
        func attempt(maxPairs: UInt16, numQueues: Int) -> String {
            var config = [UInt8](repeating: 0, count: 12)
            config[8] = UInt8(maxPairs & 0xff); config[9] = UInt8(maxPairs >> 8)
            let t = FakeTransport(offered: offered, config: config, queueLimit: .virtqueues(numQueues), carriesControlQueue: true)
            do { _ = try VirtioNetDevice<SplitVirtqueue>(transport: t, pool: pool, options: twoPairs); return "opened" } catch { return "\(error)" }
        }
        XCTAssertEqual(attempt(maxPairs: 0, numQueues: 3), "virtio-net device config: max_virtqueue_pairs is 0 (must be 1...32768)")
        XCTAssertEqual(attempt(maxPairs: 0x8001, numQueues: 0xffff), "virtio-net device config: max_virtqueue_pairs is 32769 (must be 1...32768)")
        XCTAssertEqual(attempt(maxPairs: 1, numQueues: 3), "2 queue pair(s) requested, at most 1: the device offers 1")
        XCTAssertEqual(attempt(maxPairs: 4, numQueues: 5), "virtio-net device config: num_queues 5 cannot hold 4 queue pair(s) and the control queue")
        let vu = FakeTransport(offered: [.version1, .netMultiQueue], queueLimit: .deviceUnits(0x9000))
        XCTAssertThrowsError(try VirtioNetDevice<SplitVirtqueue>(transport: vu, pool: pool, options: twoPairs)) { e in
            XCTAssertEqual("\(e)", "virtio-net device config: the backend supports 36864 queue pairs (must be 1...32768)")
        }
    }
}
