import VirtioCore
import VirtioTestSupport
import XCTest

/// `addChain` on both layouts: a chain longer than the ring, or than the free descriptors, is
/// refused and adds nothing.
final class ChainTests: XCTestCase {
    func addChainRefusedWithoutRoom<Q: TestedQueue & ~Copyable>(_: Q.Type) throws {
        for inOrder in [false, true] {
            let ring = try makeRing(Q.self, size: 4, inOrder: inOrder)
            var q = ring.queue(inOrder: inOrder)
            XCTAssertFalse(q.addChain(count: 5, cookie: cookie(9)) { _ in VirtqSegment(addr: 0, len: 1, deviceWritable: false) })
            XCTAssertTrue(q.addChain(count: 3, cookie: cookie(1)) { i in
                VirtqSegment(addr: address(1, segment: i), len: 1, deviceWritable: false)
            })
            XCTAssertFalse(q.addChain(count: 2, cookie: cookie(9)) { _ in VirtqSegment(addr: 0, len: 1, deviceWritable: false) })
            XCTAssertEqual(q.freeCount, 1)
            XCTAssertEqual(q.inFlight, 1)
            XCTAssertTrue(q.publish())
            XCTAssertEqual(ring.device.popBuffers().map(owner), [1])
            XCTAssertFalse(q.publish(), "a refused chain added nothing")
            XCTAssertEqual(ring.device.violations, [])
        }
    }

    func testAddChainRefusedWithoutRoomSplit() throws { try addChainRefusedWithoutRoom(SplitVirtqueue.self) }
    func testAddChainRefusedWithoutRoomPacked() throws { try addChainRefusedWithoutRoom(PackedVirtqueue.self) }

    /// Out of order, `recycleInTableOrder`: completed chains join the end of the free list, so
    /// descriptors go round the whole table (0, 3, 6, … for chains of 3) however the device
    /// completes them; the default puts them at the front (a freed chain is the next one used).
    func testRecycleInTableOrderSplit() throws {
        let (memory, _) = try SplitDeviceModel.allocateRing(size: 16)
        defer { SplitDeviceModel.freeRing(memory) }
        for tableOrder in [true, false] {
            var q = try SplitVirtqueue(memory: memory, size: 16, inOrder: false, eventIndex: false)
            q.recycleInTableOrder = tableOrder
            let device = SplitDeviceModel(addresses: q.addresses, inOrder: false)
            var heads: [UInt16] = []
            var next = 1
            func add(_ q: inout SplitVirtqueue) {
                XCTAssertTrue(q.addChain(count: 3, cookie: cookie(next)) { i in
                    VirtqSegment(addr: address(next, segment: i), len: 16, deviceWritable: i == 2)
                })
                next += 1
            }
            for _ in 0..<4 { add(&q) }
            _ = q.publish()
            // Rounds: the device completes the two oldest chains; two more go in.
            for _ in 0..<12 {
                let chains = device.popAvailable()
                heads += chains.map(\.headId)
                XCTAssertTrue(chains.allSatisfy { $0.descriptors.count == 3 })
                let pending = device.pending
                device.complete(ids: [pending[0].headId, pending[1].headId])
                XCTAssertEqual(harvested(&q, max: 8).count, 2)
                add(&q); add(&q)
                _ = q.publish()
            }
            XCTAssertEqual(device.violations, [])
            if tableOrder {
                // Chains of three, in table order, 16 descriptors around: every head steps on by 3.
                XCTAssertEqual(heads, (0..<heads.count).map { UInt16((3 * $0) % 16) }, "the free list wraps round the table")
                XCTAssertEqual(Set(heads).count, 16, "every descriptor heads a chain at some point")
            } else {
                // Front of the list: after the first four, only the chains just freed come back.
                XCTAssertLessThan(Set(heads).count, 8, "LIFO reuse keeps to a few chains: \(heads)")
            }
        }
    }
}
