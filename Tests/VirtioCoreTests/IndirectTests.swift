import VirtioCore
import VirtioTestSupport
import XCTest

/// VIRTIO_F_INDIRECT_DESC (§2.7.5.3): a chain of several segments takes one ring descriptor that
/// points at a per-head table; the device sees the same segments. Split only: the packed queue
/// does not implement indirect descriptors and says so.
final class IndirectTests: XCTestCase {
    func tables(size: Int, entries: Int) -> IndirectTables {
        let base = UnsafeMutablePointer<VirtqDesc>.allocate(capacity: size * entries)
        addTeardownBlock { base.deallocate() }
        return IndirectTables(base: base, baseAddress: UInt64(UInt(bitPattern: base)), entriesPerTable: entries)
    }

    func roundTrip(inOrder: Bool) throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 8, inOrder: inOrder)
        ring.device.indirectNegotiated = true
        var q = ring.queue(inOrder: inOrder)
        q.useIndirect(tables(size: 8, entries: 6))
        XCTAssertEqual(q.descriptorsNeeded(forSegments: 5), 1)
        XCTAssertEqual(q.descriptorsNeeded(forSegments: 7), 7, "longer than a table: a plain chain")
        XCTAssertEqual(q.descriptorsNeeded(forSegments: 1), 1)
        // Eight requests of header (readable 16) · data (writable 4096 ×3) · status (writable 1)
        // fill the ring; each takes one descriptor. Repeat past the index wrap.
        var next = 1
        for round in 0..<9000 {
            let ids = (0..<8).map { _ in defer { next += 1 }; return next }
            for k in ids {
                XCTAssertTrue(q.addChain(count: 5, cookie: cookie(k)) { i in
                    switch i {
                    case 0: VirtqSegment(addr: address(k, segment: 0), len: 16, deviceWritable: false)
                    case 4: VirtqSegment(addr: address(k, segment: 4), len: 1, deviceWritable: true)
                    default: VirtqSegment(addr: address(k, segment: i), len: 4096, deviceWritable: true)
                    }
                })
            }
            XCTAssertEqual(q.freeCount, 0)
            _ = q.publish()
            let chains = ring.device.popAvailable()
            XCTAssertEqual(chains.count, 8)
            for (c, k) in zip(chains, ids) {
                XCTAssertEqual(c.segments.count, 5)
                XCTAssertEqual(owner(c), k)
                XCTAssertEqual(c.segments.map(\.len), [16, 4096, 4096, 4096, 1])
                XCTAssertEqual(c.segments.map(\.writable), [false, true, true, true, true])
                XCTAssertEqual(c.writableBytes, 3 * 4096 + 1)
            }
            if inOrder { ring.device.completeInOrder(count: 8) } else {
                ring.device.complete(ids: chains.map(\.headId).reversed(), lengths: nil)
            }
            let got = harvested(&q, max: 8)
            XCTAssertEqual(Set(got.map(\.0)), Set(ids), "round \(round)")
            XCTAssertTrue(got.allSatisfy { $0.1 == 3 * 4096 + 1 })
            XCTAssertNil(q.failure)
            XCTAssertEqual(ring.device.violations, [])
        }
    }

    func testIndirectInOrder() throws { try roundTrip(inOrder: true) }
    func testIndirectOutOfOrder() throws { try roundTrip(inOrder: false) }

    /// The writable total of an indirect chain bounds the used length like any chain's.
    func testIndirectLengthTooLargeStopsQueue() throws {
        let ring = try makeRing(SplitVirtqueue.self, size: 4, inOrder: false)
        ring.device.indirectNegotiated = true
        var q = ring.queue(inOrder: false)
        q.useIndirect(tables(size: 4, entries: 4))
        XCTAssertTrue(q.addChain(count: 3, cookie: cookie(1)) { i in
            VirtqSegment(addr: address(1, segment: i), len: i == 0 ? 16 : 100, deviceWritable: i > 0)
        })
        _ = q.publish()
        let chains = ring.device.popAvailable()
        ring.device.complete(ids: [chains[0].headId], lengths: [201])
        XCTAssertEqual(harvested(&q, max: 4).count, 0)
        XCTAssertEqual(q.failure, .usedLengthTooLarge(id: UInt32(chains[0].headId), length: 201, posted: 200))
        XCTAssertEqual(q.reclaimAll { XCTAssertEqual(key($0), 1) }, 1)
    }

    /// Packed: `useIndirect` refuses (so the driver must not negotiate the feature) and every
    /// segment keeps its own ring descriptor.
    func testPackedRefusesIndirectTables() throws {
        let ring = try makeRing(PackedVirtqueue.self, size: 8, inOrder: false)
        var q = ring.queue(inOrder: false)
        XCTAssertFalse(q.useIndirect(tables(size: 8, entries: 6)))
        XCTAssertEqual(q.descriptorsNeeded(forSegments: 5), 5)
        XCTAssertTrue(q.addChain(count: 5, cookie: cookie(1)) { i in
            VirtqSegment(addr: address(1, segment: i), len: 16, deviceWritable: i > 0)
        })
        XCTAssertEqual(q.freeCount, 3)
        XCTAssertEqual(ring.device.popBuffers().map(\.descriptorCount), [5])
        XCTAssertEqual(ring.device.violations, [])
    }
}
