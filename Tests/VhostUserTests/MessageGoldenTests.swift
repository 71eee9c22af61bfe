import VhostUser
import VirtioCore
import XCTest

/// Golden bytes for vhost-user messages. Every expected array is written out by hand from the
/// layout in QEMU docs/interop/vhost-user.rst ("Message Specification"): a 12-byte header of
/// little-endian u32s (request, flags, payload size; flags 0x1 = version 1) and then the payload.
final class MessageGoldenTests: XCTestCase {

    // MARK: Header-only requests ("request payload: N/A")

    func testSetOwnerHasHeaderOnly() {
        let m = VhostUserMessage(.setOwner)
        XCTAssertEqual(m.encoded, [
            0x03, 0x00, 0x00, 0x00,  // request 3 = SET_OWNER
            0x01, 0x00, 0x00, 0x00,  // flags: version 1
            0x00, 0x00, 0x00, 0x00,  // size 0
        ])
        XCTAssertEqual(m.fds, [])
    }

    func testGetFeaturesHasHeaderOnly() {
        XCTAssertEqual(VhostUserMessage(.getFeatures).encoded, [
            0x01, 0x00, 0x00, 0x00,  // request 1 = GET_FEATURES
            0x01, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00,
        ])
    }

    // MARK: u64 payloads

    func testSetFeaturesU64() {
        // VERSION_1 (32) | IN_ORDER (35) | PROTOCOL_FEATURES (30) | bit 0 = 0x0000_0009_4000_0001
        let m = VhostUserMessage.u64(.setFeatures, 0x0000_0009_4000_0001)
        XCTAssertEqual(m.encoded, [
            0x02, 0x00, 0x00, 0x00,  // request 2 = SET_FEATURES
            0x01, 0x00, 0x00, 0x00,
            0x08, 0x00, 0x00, 0x00,  // size 8
            0x01, 0x00, 0x00, 0x40, 0x09, 0x00, 0x00, 0x00,
        ])
        XCTAssertEqual(m.fds, [])
    }

    func testSetVringKickU64CarriesDescriptor() {
        let m = VhostUserMessage.u64(.setVringKick, 1, fds: [7])
        XCTAssertEqual(m.encoded, [
            0x0C, 0x00, 0x00, 0x00,  // request 12 = SET_VRING_KICK
            0x01, 0x00, 0x00, 0x00,
            0x08, 0x00, 0x00, 0x00,
            0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // ring 1, bit 8 (no fd) clear
        ])
        XCTAssertEqual(m.fds, [7])
    }

    func testNeedReplyFlagIsEncoded() {
        let m = VhostUserMessage(request: 39, flags: 0x1 | 0x8, payload: [0x0F, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(m.encoded, [
            0x27, 0x00, 0x00, 0x00,  // request 39 = SET_STATUS
            0x09, 0x00, 0x00, 0x00,  // version 1 | NEED_REPLY (bit 3)
            0x08, 0x00, 0x00, 0x00,
            0x0F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ])
    }

    // MARK: Vring state (index u32, num u32)

    func testSetVringNum() {
        XCTAssertEqual(VhostUserMessage.vringState(.setVringNum, index: 1, num: 256).encoded, [
            0x08, 0x00, 0x00, 0x00,  // request 8 = SET_VRING_NUM
            0x01, 0x00, 0x00, 0x00,
            0x08, 0x00, 0x00, 0x00,
            0x01, 0x00, 0x00, 0x00,  // index 1
            0x00, 0x01, 0x00, 0x00,  // num 256
        ])
    }

    func testSetVringBase() {
        XCTAssertEqual(VhostUserMessage.vringState(.setVringBase, index: 0, num: 0x1234).encoded, [
            0x0A, 0x00, 0x00, 0x00,  // request 10 = SET_VRING_BASE
            0x01, 0x00, 0x00, 0x00,
            0x08, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00,
            0x34, 0x12, 0x00, 0x00,
        ])
    }

    func testSetVringEnable() {
        XCTAssertEqual(VhostUserMessage.vringState(.setVringEnable, index: 3, num: 1).encoded, [
            0x12, 0x00, 0x00, 0x00,  // request 18 = SET_VRING_ENABLE
            0x01, 0x00, 0x00, 0x00,
            0x08, 0x00, 0x00, 0x00,
            0x03, 0x00, 0x00, 0x00,
            0x01, 0x00, 0x00, 0x00,
        ])
    }

    // MARK: Vring address (index, flags, desc, used, avail, log)

    func testSetVringAddrOrderIsDescUsedAvailLog() {
        let a = QueueAddresses(size: 256, desc: 0x1122_3344_5566_7788,
                               avail: 0x0000_7F00_0000_1000, used: 0x0000_7F00_0000_2000)
        let m = VhostUserMessage.vringAddress(index: 1, a)
        XCTAssertEqual(m.encoded, [
            0x09, 0x00, 0x00, 0x00,  // request 9 = SET_VRING_ADDR
            0x01, 0x00, 0x00, 0x00,
            0x28, 0x00, 0x00, 0x00,  // size 40
            0x01, 0x00, 0x00, 0x00,  // index 1
            0x00, 0x00, 0x00, 0x00,  // flags 0 (no logging)
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,  // descriptor table
            0x00, 0x20, 0x00, 0x00, 0x00, 0x7F, 0x00, 0x00,  // used ring
            0x00, 0x10, 0x00, 0x00, 0x00, 0x7F, 0x00, 0x00,  // available ring
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // log address
        ])
        XCTAssertEqual(m.fds, [])
    }

    // MARK: Memory table

    func testSetMemTableTwoRegions() {
        let regions = [
            MemoryRegion(address: 0x0000_7F12_3400_0000, size: 0x20_0000, fd: 41, fileOffset: 0),
            MemoryRegion(address: 0x0000_7F56_7800_0000, size: 0x10_0000, fd: 42, fileOffset: 0x1000),
        ]
        let m = VhostUserMessage.memoryTable(regions)
        XCTAssertEqual(m.encoded, [
            0x05, 0x00, 0x00, 0x00,  // request 5 = SET_MEM_TABLE
            0x01, 0x00, 0x00, 0x00,
            0x48, 0x00, 0x00, 0x00,  // size 8 + 32 * 2 = 72
            0x02, 0x00, 0x00, 0x00,  // nregions
            0x00, 0x00, 0x00, 0x00,  // padding
            // region 0: guest address, size, user address, mmap offset
            0x00, 0x00, 0x00, 0x34, 0x12, 0x7F, 0x00, 0x00,
            0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x34, 0x12, 0x7F, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            // region 1
            0x00, 0x00, 0x00, 0x78, 0x56, 0x7F, 0x00, 0x00,
            0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x78, 0x56, 0x7F, 0x00, 0x00,
            0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ])
        XCTAssertEqual(m.fds, [41, 42], "descriptors travel in region order")
    }

    func testSetMemTableOneRegionSize() {
        let m = VhostUserMessage.memoryTable([MemoryRegion(address: 0x1000, size: 0x2000, fd: 9, fileOffset: 0)])
        XCTAssertEqual(m.payload.count, 8 + 32)
        XCTAssertEqual(Array(m.encoded[8..<12]), [0x28, 0x00, 0x00, 0x00])
        XCTAssertEqual(m.fds, [9])
    }

    // MARK: Config space

    func testGetConfig() {
        let m = VhostUserMessage.config(offset: 4, size: 6)
        XCTAssertEqual(m.encoded, [
            0x18, 0x00, 0x00, 0x00,  // request 24 = GET_CONFIG
            0x01, 0x00, 0x00, 0x00,
            0x12, 0x00, 0x00, 0x00,  // size 12 + 6 = 18
            0x04, 0x00, 0x00, 0x00,  // offset
            0x06, 0x00, 0x00, 0x00,  // size
            0x00, 0x00, 0x00, 0x00,  // flags
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // room for the config bytes
        ])
    }

    // MARK: Decoding

    func testDecodeHeader() {
        let h = VhostUserMessage.decodeHeader([0x0B, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00])
        XCTAssertEqual(h?.request, 11)
        XCTAssertEqual(h?.flags, 5)
        XCTAssertEqual(h?.size, 8)
    }

    func testDecodeHeaderReadsOnlyTheFirstTwelveBytes() {
        let h = VhostUserMessage.decodeHeader([0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x02, 0x03, 0x04,
                                               0x00, 0x10, 0x00, 0x00, 0xAA, 0xBB])
        XCTAssertEqual(h?.request, 0xFFFF_FFFF)
        XCTAssertEqual(h?.flags, 0x0403_0201)
        XCTAssertEqual(h?.size, 0x1000)
    }

    func testDecodeHeaderShortIsNil() {
        XCTAssertNil(VhostUserMessage.decodeHeader([]))
        XCTAssertNil(VhostUserMessage.decodeHeader([UInt8](repeating: 0, count: 11)))
    }

    func testDecodeHeaderOfEncodedMessage() {
        let m = VhostUserMessage.vringAddress(index: 0, QueueAddresses(size: 8, desc: 1, avail: 2, used: 3))
        let h = VhostUserMessage.decodeHeader(m.encoded)
        XCTAssertEqual(h?.request, 9)
        XCTAssertEqual(h?.flags, 1)
        XCTAssertEqual(h?.size, 40)
    }

    func testU32AndU64Reads() {
        let m = VhostUserMessage(request: 0, payload: [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09])
        XCTAssertEqual(m.u32(at: 0), 0x0403_0201)
        XCTAssertEqual(m.u32(at: 5), 0x0908_0706)
        XCTAssertEqual(m.u64(at: 0), 0x0807_0605_0403_0201)
        XCTAssertEqual(m.u64(at: 1), 0x0908_0706_0504_0302)
    }

    func testU32AndU64BoundsAreNil() {
        let m = VhostUserMessage(request: 0, payload: [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09])
        XCTAssertNil(m.u32(at: 6), "needs bytes 6...9, payload ends at 8")
        XCTAssertNil(m.u32(at: 9))
        XCTAssertNil(m.u32(at: -1))
        XCTAssertNil(m.u64(at: 2))
        XCTAssertNil(m.u64(at: 9))
        XCTAssertNil(m.u64(at: -1))
        let empty = VhostUserMessage(request: 0)
        XCTAssertNil(empty.u32(at: 0))
        XCTAssertNil(empty.u64(at: 0))
        let four = VhostUserMessage(request: 0, payload: [1, 0, 0, 0])
        XCTAssertEqual(four.u32(at: 0), 1)
        XCTAssertNil(four.u64(at: 0), "a 4-byte payload is too short for a u64")
    }

    /// `u32(at:)`/`u64(at:)` return nil for any offset past the payload, even near Int.max
    /// (the bounds check must not overflow).
    func testU32AtHugeOffsetIsNilNotATrap() throws {
        let m = VhostUserMessage(request: 0, payload: [1, 2, 3, 4])
        XCTAssertNil(m.u32(at: Int.max))
        XCTAssertNil(m.u64(at: Int.max - 3))
    }
}
