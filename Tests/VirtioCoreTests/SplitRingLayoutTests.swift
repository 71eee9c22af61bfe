import VirtioCore
import VirtioTestSupport
import XCTest

/// §2.7: descriptor table (16-byte entries), available ring (flags, idx, ring[size], used_event),
/// used ring (flags, idx, 8-byte ring[size], avail_event) on its own 4 KiB page.
final class SplitRingLayoutTests: XCTestCase {
    func testKnownLayouts() throws {
        // size: (availOffset, usedOffset, totalBytes), worked out by hand.
        let expected: [Int: (Int, Int, Int)] = [
            1: (16, 4096, 8192),
            2: (32, 4096, 8192),
            4: (64, 4096, 8192),
            8: (128, 4096, 8192),
            256: (4096, 8192, 12288),
            1024: (16384, 20480, 32768),
            32768: (524_288, 593_920, 860_160),
        ]
        for (size, (avail, used, total)) in expected {
            let l = try SplitRingLayout(size: size)
            XCTAssertEqual(l.size, size)
            XCTAssertEqual(l.descOffset, 0, "size \(size)")
            XCTAssertEqual(l.availOffset, avail, "size \(size)")
            XCTAssertEqual(l.usedOffset, used, "size \(size)")
            XCTAssertEqual(l.totalBytes, total, "size \(size)")
        }
    }

    func testEveryPowerOfTwoIsPackedAndAligned() throws {
        for shift in 0...15 {
            let size = 1 << shift
            let l = try SplitRingLayout(size: size)
            let availEnd = l.availOffset + 6 + 2 * size
            let usedEnd = l.usedOffset + 6 + 8 * size
            XCTAssertEqual(l.availOffset, l.descOffset + 16 * size, "avail follows the table, size \(size)")
            XCTAssertEqual(l.availOffset % 2, 0)
            XCTAssertEqual(l.usedOffset % SplitRingLayout.alignment, 0, "used ring on its own page, size \(size)")
            XCTAssertGreaterThanOrEqual(l.usedOffset, availEnd)
            XCTAssertLessThan(l.usedOffset - availEnd, SplitRingLayout.alignment, "no wasted page, size \(size)")
            XCTAssertEqual(l.totalBytes % SplitRingLayout.alignment, 0)
            XCTAssertGreaterThanOrEqual(l.totalBytes, usedEnd)
            XCTAssertLessThan(l.totalBytes - usedEnd, SplitRingLayout.alignment)
        }
    }

    func testInvalidSizesThrow() {
        for size in [0, 3, 6, 100, 32767, 32769, 65536, -1, -4096] {
            XCTAssertThrowsError(try SplitRingLayout(size: size), "size \(size)") { error in
                XCTAssertEqual(error as? VirtqueueError, .invalidSize(size))
            }
        }
    }

    func testAllocateRingIsAlignedAndZeroed() throws {
        for size in [1, 256] {
            let (memory, layout) = try SplitDeviceModel.allocateRing(size: size)
            defer { SplitDeviceModel.freeRing(memory) }
            XCTAssertEqual(Int(bitPattern: memory) % SplitRingLayout.alignment, 0)
            let bytes = UnsafeRawBufferPointer(start: memory, count: layout.totalBytes)
            XCTAssertTrue(bytes.allSatisfy { $0 == 0 })
        }
        XCTAssertThrowsError(try SplitDeviceModel.allocateRing(size: 3))
    }
}
