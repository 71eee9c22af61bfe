import VirtioCore
import VirtioTestSupport
import XCTest

/// What only the packed layout (VIRTIO 1.2 §2.8) has, against `PackedDeviceModel` in the same
/// heap memory: the ring layout and its sizes (any from 1 to 32768), the descriptors as the
/// driver writes them (AVAIL/USED bits, buffer IDs), the device model's own checks of the driver,
/// and `vhostBase`. What both layouts share (every layout, chains and random interleavings, a
/// device that breaks the ring, notification, in-order batches, reclaim and restart) is tested
/// once for both in the other files.
///
/// Buffer k's segment i lives at `address(k, segment: i)`, so the device can tell whose it is.
final class PackedVirtqueueTests: XCTestCase {
    // MARK: Layout

    func testLayoutAcceptsEverySizeFromOneTo32768() throws {
        // (size, driver event, device event, total bytes)
        let expected: [(Int, Int, Int, Int)] = [
            (1, 16, 64, 4096), (3, 48, 64, 4096), (5, 80, 128, 4096), (256, 4096, 4160, 8192),
            (255, 4080, 4096, 8192), (32768, 524_288, 524_352, 528_384),
        ]
        for (size, driverEvent, deviceEvent, total) in expected {
            let layout = try PackedRingLayout(size: size)
            XCTAssertEqual(layout.size, size)
            XCTAssertEqual(layout.descOffset, 0, "size \(size)")
            XCTAssertEqual(layout.driverEventOffset, driverEvent, "size \(size)")
            XCTAssertEqual(layout.deviceEventOffset, deviceEvent, "size \(size)")
            XCTAssertEqual(layout.totalBytes, total, "size \(size)")
        }
        for size in [1, 2, 3, 7, 100, 256, 1000, 32767, 32768] {
            let l = try PackedRingLayout(size: size)
            // §2.8.15: descriptor ring 16-aligned, 16·size bytes; each event area 4-aligned.
            XCTAssertEqual(l.descOffset % 16, 0)
            XCTAssertGreaterThanOrEqual(l.driverEventOffset, l.descOffset + 16 * size, "size \(size)")
            XCTAssertEqual(l.driverEventOffset % 4, 0, "size \(size)")
            // The device's area sits on its own cache line after the driver's.
            XCTAssertGreaterThanOrEqual(l.deviceEventOffset, l.driverEventOffset + 4, "size \(size)")
            XCTAssertEqual(l.deviceEventOffset % 64, 0, "size \(size)")
            XCTAssertNotEqual(l.deviceEventOffset / 64, l.driverEventOffset / 64, "size \(size)")
            XCTAssertGreaterThanOrEqual(l.totalBytes, l.deviceEventOffset + 4, "size \(size)")
            XCTAssertEqual(l.totalBytes % 4096, 0, "size \(size)")
        }
        XCTAssertEqual(MemoryLayout<PackedDesc>.size, 16)
        XCTAssertEqual(MemoryLayout<PackedDesc>.stride, 16)
        XCTAssertEqual(MemoryLayout<PackedDesc>.offset(of: \PackedDesc.len), 8)
        XCTAssertEqual(MemoryLayout<PackedDesc>.offset(of: \PackedDesc.id), 12)
        XCTAssertEqual(MemoryLayout<PackedDesc>.offset(of: \PackedDesc.flags), 14)
        XCTAssertEqual(PackedDesc.flagAvail, 0x80)
        XCTAssertEqual(PackedDesc.flagUsed, 0x8000)
    }

    func testLayoutRejectsZeroAndAbove32768() {
        for size in [0, -1, 32769, 65536, Int.max] {
            XCTAssertThrowsError(try PackedRingLayout(size: size), "size \(size)") { error in
                XCTAssertEqual(error as? VirtqueueError, .invalidSize(size))
            }
        }
    }

    /// Not a power of two, and the largest size: a round trip at the ring's last position.
    func testOddAndLargestSizesWork() throws {
        for size in [3, 5, 32768] {
            let f = try makeRing(PackedVirtqueue.self, size: size, inOrder: size != 5)
            var q = f.queue(inOrder: size != 5)
            fastForward(&q, f.device, by: size - 1)
            addSingle(&q, 1, len: 10, writable: true)
            addSingle(&q, 2, len: 20, writable: true)
            XCTAssertTrue(q.publish())
            let popped = f.device.popAvailable()
            XCTAssertEqual(popped.map(\.position), [UInt16(size - 1), 0], "size \(size)")
            XCTAssertEqual(popped.map(\.wrap), [true, false], "size \(size)")
            f.device.completeInOrder(count: 2) { $0.writableBytes / 2 }
            XCTAssertPairs(harvested(&q, max: 8), [(1, 5), (2, 10)])
            XCTAssertEqual(q.freeCount, size)
            XCTAssertEqual(f.device.violations, [])
        }
    }

    /// What the driver writes into the ring (§2.8.1, §2.8.6, §2.8.21.1): AVAIL = its wrap
    /// counter, USED = the inverse, NEXT on every descriptor but a chain's last, WRITE on
    /// device-writable ones, the buffer ID in the last descriptor.
    func testDescriptorsAsTheDriverWritesThem() throws {
        let f = try makeRing(PackedVirtqueue.self, size: 4, inOrder: true)
        var q = f.queue(inOrder: true)
        XCTAssertTrue(q.addChain(count: 3, cookie: cookie(1)) { i in
            VirtqSegment(addr: address(1, segment: i), len: UInt32(10 + i), deviceWritable: i > 0)
        })
        addSingle(&q, 2, len: 50, writable: false)
        let avail = PackedDesc.flagAvail, next = VirtqDesc.flagNext, write = VirtqDesc.flagWrite
        XCTAssertEqual((0..<UInt16(4)).map { f.device.descriptor(at: $0).flags },
                       [avail | next, avail | next | write, avail | write, avail])
        XCTAssertEqual(f.device.descriptor(at: 2).id, 0)
        XCTAssertEqual(f.device.descriptor(at: 3).id, 1)
        XCTAssertEqual(f.device.descriptor(at: 1).addr, address(1, segment: 1))
        XCTAssertEqual(f.device.descriptor(at: 1).len, 11)
        XCTAssertEqual(f.device.driverEventFlags, PackedEventFlags.disable, "poll mode: no used buffer notifications")
        _ = q.publish()
        let popped = f.device.popAvailable()
        XCTAssertEqual(popped.map(\.id), [0, 1])
        XCTAssertEqual(popped.map(\.descriptorCount), [3, 1])
        XCTAssertEqual(popped[0].writableBytes, 23)
        f.device.completeInOrder(count: 2)
        XCTAssertPairs(harvested(&q, max: 4), [(1, 23), (2, 0)])
        // Second lap: wrap counter 0, so AVAIL clear and USED set.
        addSingle(&q, 3, len: 8, writable: true)
        XCTAssertEqual(f.device.descriptor(at: 0).flags, PackedDesc.flagUsed | write)
        XCTAssertEqual(f.device.popAvailable().map { "\($0.id)@\($0.position):\($0.wrap)" }, ["2@0:false"])
        XCTAssertEqual(f.device.violations, [])
    }

    /// The model checks the driver too: what a broken driver writes ends up in `violations`.
    func testDeviceModelRecordsDriverViolations() throws {
        let d = try makeRing(PackedVirtqueue.self, size: 4, inOrder: false).device
        let avail = PackedDesc.flagAvail, next = VirtqDesc.flagNext, write = VirtqDesc.flagWrite
        // A readable descriptor after a writable one (head written last).
        d.writeUsed(at: 1, id: 0, len: 8, flags: avail)
        d.writeUsed(at: 0, id: 0, len: 8, flags: avail | next | write)
        XCTAssertEqual(d.popAvailable().map(\.descriptorCount), [2])
        // The same buffer ID again while the first is in flight.
        d.writeUsed(at: 2, id: 0, len: 8, flags: avail)
        XCTAssertEqual(d.popAvailable().map(\.id), [0])
        // A chain running into a descriptor that is not available (position 0 of the next lap).
        d.writeUsed(at: 3, id: 1, len: 8, flags: avail | next)
        XCTAssertEqual(d.popAvailable().count, 0)
        XCTAssertEqual(d.violations.count, 3, "\(d.violations)")
        XCTAssert(d.violations[0].contains("readable descriptor 1 after a writable one"), d.violations[0])
        XCTAssert(d.violations[1].contains("buffer ID 0 made available again while in flight"), d.violations[1])
        XCTAssert(d.violations[2].contains("descriptor 0 is not available"), d.violations[2])
        XCTAssertEqual(d.pendingCount, 2)
    }

    // MARK: vhostBase

    /// SET_VRING_BASE for a packed ring: next avail position in bits 0–14, driver wrap counter in
    /// bit 15, after any number of adds (harvested or still in flight, singles or chains).
    func testVhostBaseAfterAdds() throws {
        for inOrder in [false, true] {
            let size = 5
            let f = try makeRing(PackedVirtqueue.self, size: size, inOrder: inOrder)
            var q = f.queue(inOrder: inOrder)
            func base(_ n: Int) -> UInt32 { UInt32(n % size) | ((n / size) % 2 == 0 ? 1 << 15 : 0) }
            XCTAssertEqual(q.vhostBase, 1 << 15)
            for n in 1...23 {
                fastForward(&q, f.device, by: 1)
                XCTAssertEqual(q.vhostBase, base(n), "after \(n) adds")
            }
            // Still in flight: the base moves on add, not on completion.
            for k in 1...3 { addSingle(&q, k, len: 1, writable: false) }
            XCTAssertEqual(q.vhostBase, base(26))      // 1 | wrap 0
            XCTAssertTrue(q.addChain(count: 2, cookie: cookie(4)) { i in VirtqSegment(addr: address(4, segment: i), len: 1, deviceWritable: false) })
            XCTAssertEqual(q.vhostBase, base(28))
            XCTAssertEqual(q.vhostBase, 3)
            f.device.popAvailable()
            f.device.completeInOrder(count: 4)
            XCTAssertEqual(harvested(&q, max: 8).map(\.0), [1, 2, 3, 4])
            XCTAssertEqual(q.vhostBase, base(28))
            XCTAssertEqual(f.device.violations, [])
        }
    }
}
