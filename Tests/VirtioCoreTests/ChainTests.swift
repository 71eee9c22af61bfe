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
}
