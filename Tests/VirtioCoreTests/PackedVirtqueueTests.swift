import VirtioCore
import VirtioTestSupport
import XCTest

/// The driver side of a packed virtqueue (VIRTIO 1.2 §2.8) against `PackedDeviceModel` in the
/// same heap memory: the layout, every ring size × completion mode × burst through many wraps
/// of the ring wrap counters, chains and random interleavings, a device that breaks §2.8,
/// notification decisions (event suppression, §2.8.14), `vhostBase` and `reclaimAll`.
///
/// Buffer k's segment i lives at `address(k, segment: i)`, so the device can tell whose it is.
final class PackedVirtqueueTests: XCTestCase {
    // MARK: Fixture

    struct Fixture {
        let memory: UnsafeMutableRawPointer
        let layout: PackedRingLayout
        let device: PackedDeviceModel
        /// The driver side over the same memory (zeroes it).
        func queue(inOrder: Bool, eventIndex: Bool = false) -> PackedVirtqueue {
            PackedVirtqueue(memory: memory, layout: layout, inOrder: inOrder, eventIndex: eventIndex)
        }
    }

    /// Ring memory of `size` and a device over it, freed when the test ends.
    func makeFixture(size: Int) throws -> Fixture {
        let (memory, layout) = try PackedDeviceModel.allocateRing(size: size)
        addTeardownBlock { PackedDeviceModel.freeRing(memory) }
        return Fixture(memory: memory, layout: layout, device: PackedDeviceModel(memory: memory, layout: layout))
    }

    /// The cookie a device-side buffer belongs to.
    static func owner(_ buffer: PackedDeviceModel.Buffer) -> Int { Int(buffer.segments[0].addr >> 16) }

    static let filler = UnsafeMutableRawPointer(bitPattern: 0xF111_0000)!

    /// `count` round trips of one read-only descriptor each (published, popped, completed in
    /// order with length 0, harvested), so both sides' positions and wrap counters move by
    /// `count`. The queue must be empty and healthy.
    func roundTrips(_ q: inout PackedVirtqueue, _ device: PackedDeviceModel, _ count: Int,
                    file: StaticString = #filePath, line: UInt = #line) {
        precondition(q.inFlight == 0 && device.pendingCount == 0)
        var left = count
        while left > 0 {
            let n = min(left, q.size)
            q.addBurst(count: n, deviceWritable: false) { _ in (addr: 0, len: 64, cookie: Self.filler) }
            _ = q.publish()
            device.popAvailable()
            device.completeInOrder(count: n) { _ in 0 }
            var wrong = 0
            let got = q.harvest(max: n) { c, len in if c != Self.filler || len != 0 { wrong += 1 } }
            guard got == n, wrong == 0 else {
                XCTFail("round trips: harvested \(got) of \(n), \(wrong) wrong, failure \(String(describing: q.failure))",
                        file: file, line: line)
                return
            }
            left -= n
        }
    }

    /// One `harvest(max:)`, as (cookie, length) pairs.
    static func harvest(_ q: inout PackedVirtqueue, max: Int) -> [(Int, UInt32)] {
        var out: [(Int, UInt32)] = []
        _ = q.harvest(max: max) { c, len in out.append((key(c), len)) }
        return out
    }

    /// Adds buffer `k` as one descriptor at `address(k)`.
    static func addSingle(_ q: inout PackedVirtqueue, _ k: Int, len: UInt32, writable: Bool) {
        q.addBurst(count: 1, deviceWritable: writable) { _ in (addr: address(k), len: len, cookie: cookie(k)) }
    }

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
            let f = try makeFixture(size: size)
            var q = f.queue(inOrder: size != 5)
            roundTrips(&q, f.device, size - 1)
            Self.addSingle(&q, 1, len: 10, writable: true)
            Self.addSingle(&q, 2, len: 20, writable: true)
            XCTAssertTrue(q.publish())
            let popped = f.device.popAvailable()
            XCTAssertEqual(popped.map(\.position), [UInt16(size - 1), 0], "size \(size)")
            XCTAssertEqual(popped.map(\.wrap), [true, false], "size \(size)")
            f.device.completeInOrder(count: 2) { $0.writableBytes / 2 }
            XCTAssertPairs(Self.harvest(&q, max: 8), [(1, 5), (2, 10)])
            XCTAssertEqual(q.freeCount, size)
            XCTAssertEqual(f.device.violations, [])
        }
    }

    /// What the driver writes into the ring (§2.8.1, §2.8.6, §2.8.21.1): AVAIL = its wrap
    /// counter, USED = the inverse, NEXT on every descriptor but a chain's last, WRITE on
    /// device-writable ones, the buffer ID in the last descriptor.
    func testDescriptorsAsTheDriverWritesThem() throws {
        let f = try makeFixture(size: 4)
        var q = f.queue(inOrder: true)
        XCTAssertTrue(q.addChain(count: 3, cookie: cookie(1)) { i in
            VirtqSegment(addr: address(1, segment: i), len: UInt32(10 + i), deviceWritable: i > 0)
        })
        Self.addSingle(&q, 2, len: 50, writable: false)
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
        XCTAssertPairs(Self.harvest(&q, max: 4), [(1, 23), (2, 0)])
        // Second lap: wrap counter 0, so AVAIL clear and USED set.
        Self.addSingle(&q, 3, len: 8, writable: true)
        XCTAssertEqual(f.device.descriptor(at: 0).flags, PackedDesc.flagUsed | write)
        XCTAssertEqual(f.device.popAvailable().map { "\($0.id)@\($0.position):\($0.wrap)" }, ["2@0:false"])
        XCTAssertEqual(f.device.violations, [])
    }

    /// The model checks the driver too: what a broken driver writes ends up in `violations`.
    func testDeviceModelRecordsDriverViolations() throws {
        let f = try makeFixture(size: 4)
        let d = f.device
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

    // MARK: Chains and random interleavings

    /// Seeded random steps over chains of 1–3 descriptors (`addChain`) mixed with single
    /// buffers (`addBurst`), device pops, completions (out of order: random subsets in random
    /// order; in order: runs, one used descriptor each or one per batch) and harvests of random
    /// size. Harvest must hand back exactly what the device completed, in used order;
    /// `freeCount` must equal the ring minus the descriptors in flight.
    func testRandomInterleavingsWithChains() throws {
        for inOrder in [false, true] {
            for size in [1, 2, 3, 4, 5, 8, 16] {
                for seed in 1...3 { try runInterleaving(size: size, inOrder: inOrder, seed: UInt64(seed)) }
            }
        }
    }

    func runInterleaving(size: Int, inOrder: Bool, seed: UInt64, steps: Int = 2500) throws {
        let what = "\(inOrder ? "in order" : "out of order") size \(size) seed \(seed)"
        let f = try makeFixture(size: size)
        let device = f.device
        var q = f.queue(inOrder: inOrder)
        var rng = SplitMix64(seed: seed &* 7919 &+ UInt64(size) &* 31 &+ (inOrder ? 1 : 0))
        struct Posted { var writable: UInt32; var descriptors: Int }
        var posted: [Int: Posted] = [:]
        var nextCookie = 1
        var descriptorsInFlight = 0
        var expected: [(cookie: Int, len: UInt32)] = []
        var harvestedCount = 0
        var chains = 0, batches = 0

        func check(_ ok: Bool, _ message: @autoclosure () -> String, line: UInt = #line) -> Bool {
            if !ok { XCTFail("\(what): \(message())", line: line) }
            return ok
        }
        func takeHarvest(_ q: inout PackedVirtqueue, max: Int) -> Bool {
            let got = Self.harvest(&q, max: max)
            guard check(got.count == Swift.min(max, expected.count),
                        "harvest(max: \(max)) gave \(got.count), \(expected.count) completed, failure \(String(describing: q.failure))")
            else { return false }
            for (i, (k, len)) in got.enumerated() {
                guard check(k == expected[i].cookie && len == expected[i].len,
                            "harvested \(k):\(len), expected \(expected[i])") else { return false }
                descriptorsInFlight -= posted.removeValue(forKey: k)!.descriptors
            }
            expected.removeFirst(got.count)
            harvestedCount += got.count
            return true
        }

        for _ in 0..<steps {
            switch rng.int(0...9) {
            case 0, 1:   // a chain
                let count = rng.int(1...3)
                let readable = rng.int(0...count)
                let lengths = (0..<count).map { _ in UInt32(rng.int(1...4096)) }
                let k = nextCookie
                let free = q.freeCount, inFlight = q.inFlight
                let ok = q.addChain(count: count, cookie: cookie(k)) { i in
                    VirtqSegment(addr: address(k, segment: i), len: lengths[i], deviceWritable: i >= readable)
                }
                guard check(ok == (count <= free), "addChain(\(count)) = \(ok) with \(free) free") else { return }
                if ok {
                    let writable = (readable..<count).reduce(UInt32(0)) { $0 + lengths[$1] }
                    posted[k] = Posted(writable: writable, descriptors: count)
                    descriptorsInFlight += count
                    nextCookie += 1
                    if count > 1 { chains += 1 }
                } else {
                    guard check(q.freeCount == free && q.inFlight == inFlight, "failed addChain changed the queue")
                    else { return }
                }
            case 2:      // singles
                guard q.freeCount > 0 else { continue }
                let n = rng.int(1...Swift.min(4, q.freeCount))
                let writable = rng.chance(70)
                let first = nextCookie
                q.addBurst(count: n, deviceWritable: writable) { i in
                    (addr: address(first + i), len: UInt32(100 + first + i), cookie: cookie(first + i))
                }
                for k in first..<first + n {
                    posted[k] = Posted(writable: writable ? UInt32(100 + k) : 0, descriptors: 1)
                }
                descriptorsInFlight += n
                nextCookie += n
            case 3:
                _ = q.publish()
            case 4, 5:
                for b in device.popAvailable() {
                    let k = Self.owner(b)
                    guard check(posted[k] != nil, "device read unknown buffer \(b)") else { return }
                    let p = posted[k]!
                    guard check(b.descriptorCount == p.descriptors && b.writableBytes == p.writable,
                                "device read \(b) for cookie \(k), posted \(p)"),
                          check(b.segments.enumerated().allSatisfy { $1.addr == address(k, segment: $0) },
                                "segments of \(k): \(b.segments)")
                    else { return }
                }
            case 6, 7:   // device completes
                let held = device.pendingCount
                guard held > 0 else { continue }
                let count = rng.int(1...held)
                if inOrder {
                    let owners = device.pending.prefix(count).map(Self.owner)
                    let lastLength = UInt32(rng.int(0...Int(posted[owners.last!]!.writable)))
                    if count > 1 && rng.chance(50) {
                        expected += owners.dropLast().map { ($0, posted[$0]!.writable) }
                        expected.append((owners.last!, lastLength))
                        device.completeBatchAsOne(count: count, lastLength: lastLength)
                        batches += 1
                    } else {
                        let lengths = owners.map { UInt32(rng.int(0...Int(posted[$0]!.writable))) }
                        expected += zip(owners, lengths).map { ($0, $1) }
                        var i = 0
                        device.completeInOrder(count: count) { _ in defer { i += 1 }; return lengths[i] }
                    }
                } else {
                    var chosen = Array(device.pending)
                    chosen.shuffle(using: &rng)
                    chosen.removeLast(held - count)
                    let lengths = chosen.map { UInt32(rng.int(0...Int($0.writableBytes))) }
                    expected += zip(chosen, lengths).map { (Self.owner($0), $1) }
                    device.complete(ids: chosen.map(\.id), lengths: lengths)
                }
            default:     // harvest
                guard takeHarvest(&q, max: rng.int(1...4)) else { return }
            }
            guard check(q.failure == nil, "failure \(String(describing: q.failure))"),
                  check(q.inFlight == posted.count, "inFlight \(q.inFlight), \(posted.count) posted"),
                  check(q.freeCount == size - descriptorsInFlight,
                        "freeCount \(q.freeCount), \(descriptorsInFlight) descriptors in flight"),
                  check(device.violations.isEmpty, "violations \(device.violations)")
            else { return }
        }
        // Drain.
        _ = q.publish()
        device.popAvailable()
        let owners = device.pending.map(Self.owner)
        expected += owners.map { ($0, posted[$0]!.writable) }
        device.completeInOrder(count: device.pendingCount)
        guard takeHarvest(&q, max: Int.max) else { return }
        XCTAssertEqual(q.inFlight, 0, what)
        XCTAssertEqual(q.freeCount, size, what)
        XCTAssertTrue(posted.isEmpty, what)
        XCTAssertEqual(harvestedCount, nextCookie - 1, what)
        XCTAssertEqual(device.violations, [], what)
        if size >= 2 { XCTAssertGreaterThan(chains, 0, what) }
        if inOrder && size >= 2 { XCTAssertGreaterThan(batches, 0, what) }
    }

    // MARK: vhostBase

    /// SET_VRING_BASE for a packed ring: next avail position in bits 0–14, driver wrap counter in
    /// bit 15, after any number of adds (harvested or still in flight, singles or chains).
    func testVhostBaseAfterAdds() throws {
        for inOrder in [false, true] {
            let size = 5
            let f = try makeFixture(size: size)
            var q = f.queue(inOrder: inOrder)
            func base(_ n: Int) -> UInt32 { UInt32(n % size) | ((n / size) % 2 == 0 ? 1 << 15 : 0) }
            XCTAssertEqual(q.vhostBase, 1 << 15)
            for n in 1...23 {
                roundTrips(&q, f.device, 1)
                XCTAssertEqual(q.vhostBase, base(n), "after \(n) adds")
            }
            // Still in flight: the base moves on add, not on completion.
            for k in 1...3 { Self.addSingle(&q, k, len: 1, writable: false) }
            XCTAssertEqual(q.vhostBase, base(26))      // 1 | wrap 0
            XCTAssertTrue(q.addChain(count: 2, cookie: cookie(4)) { i in VirtqSegment(addr: address(4, segment: i), len: 1, deviceWritable: false) })
            XCTAssertEqual(q.vhostBase, base(28))
            XCTAssertEqual(q.vhostBase, 3)
            f.device.popAvailable()
            f.device.completeInOrder(count: 4)
            XCTAssertEqual(Self.harvest(&q, max: 8).map(\.0), [1, 2, 3, 4])
            XCTAssertEqual(q.vhostBase, base(28))
            XCTAssertEqual(f.device.violations, [])
        }
    }
}
