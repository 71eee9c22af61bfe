import VirtioCore

/// virtio-blk feature bits (VIRTIO 1.2 §5.2.3).
extension VirtioFeatures {
    /// VIRTIO_BLK_F_SIZE_MAX, bit 1: `size_max` bounds one segment (0 means no limit here).
    public static let blkSizeMax = VirtioFeatures(bit: 1)
    /// VIRTIO_BLK_F_SEG_MAX, bit 2: `seg_max` bounds the data segments of a request.
    public static let blkSegMax = VirtioFeatures(bit: 2)
    /// VIRTIO_BLK_F_GEOMETRY, bit 4.
    public static let blkGeometry = VirtioFeatures(bit: 4)
    /// VIRTIO_BLK_F_RO, bit 5: the device is read-only.
    public static let blkReadOnly = VirtioFeatures(bit: 5)
    /// VIRTIO_BLK_F_BLK_SIZE, bit 6: `blk_size` is the optimal block size.
    public static let blkBlockSize = VirtioFeatures(bit: 6)
    /// VIRTIO_BLK_F_FLUSH, bit 9: VIRTIO_BLK_T_FLUSH is supported.
    public static let blkFlush = VirtioFeatures(bit: 9)
    /// VIRTIO_BLK_F_TOPOLOGY, bit 10.
    public static let blkTopology = VirtioFeatures(bit: 10)
    /// VIRTIO_BLK_F_CONFIG_WCE, bit 11.
    public static let blkConfigWCE = VirtioFeatures(bit: 11)
    /// VIRTIO_BLK_F_MQ, bit 12: `num_queues` is valid.
    public static let blkMultiQueue = VirtioFeatures(bit: 12)
    /// VIRTIO_BLK_F_DISCARD, bit 13.
    public static let blkDiscard = VirtioFeatures(bit: 13)
    /// VIRTIO_BLK_F_WRITE_ZEROES, bit 14.
    public static let blkWriteZeroes = VirtioFeatures(bit: 14)

    static func registerBlkNames() {
        let blk: [Int: String] = [1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO", 6: "BLK_SIZE", 9: "FLUSH",
                                  10: "TOPOLOGY", 11: "CONFIG_WCE", 12: "MQ", 13: "DISCARD", 14: "WRITE_ZEROES",
                                  15: "LIFETIME", 16: "SECURE_ERASE"]
        for (k, v) in blk { VirtioFeatures.names[k] = v }
    }
}

/// Request types (§5.2.6, `struct virtio_blk_req.type`).
public enum BlkOperation: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case read = 0          // VIRTIO_BLK_T_IN
    case write = 1         // VIRTIO_BLK_T_OUT
    case flush = 4         // VIRTIO_BLK_T_FLUSH
    case getID = 8         // VIRTIO_BLK_T_GET_ID
    case discard = 11      // VIRTIO_BLK_T_DISCARD
    case writeZeroes = 13  // VIRTIO_BLK_T_WRITE_ZEROES
    public var description: String {
        switch self {
        case .read: "read"; case .write: "write"; case .flush: "flush"; case .getID: "get-id"
        case .discard: "discard"; case .writeZeroes: "write-zeroes"
        }
    }
}

/// How a request ended.
public enum BlkStatus: Equatable, Sendable, CustomStringConvertible {
    /// VIRTIO_BLK_S_OK.
    case ok
    /// VIRTIO_BLK_S_IOERR.
    case ioError
    /// VIRTIO_BLK_S_UNSUPP.
    case unsupported
    /// The device wrote a status byte the spec does not define.
    case badStatus(UInt8)
    /// The device went away (or broke its ring) with the request in flight.
    case deviceGone

    @inlinable init(byte: UInt8) {
        switch byte { case 0: self = .ok; case 1: self = .ioError; case 2: self = .unsupported; default: self = .badStatus(byte) }
    }
    public var description: String {
        switch self {
        case .ok: "ok"; case .ioError: "I/O error"; case .unsupported: "unsupported"
        case .badStatus(let b): b == 0xff ? "no status (the device did not write the status byte)" : "invalid status byte \(b)"; case .deviceGone: "device gone"
        }
    }
}

/// Device configuration (§5.2.4, `struct virtio_blk_config`), the fields we use.
public struct BlkConfig: Sendable, Equatable {
    /// The part of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding: the
    /// size every device provides. qemu-storage-daemon 7.2 refuses a larger GET_CONFIG.
    public static let size = 60
    /// Capacity in 512-byte sectors (always 512, whatever `blockSize` says).
    public var capacity: UInt64
    public var sizeMax: UInt32
    public var segMax: UInt32
    public var blockSize: UInt32
    public var numQueues: UInt16
    public var maxDiscardSectors: UInt32
    public var maxDiscardSegments: UInt32
    public var discardSectorAlignment: UInt32
    public var maxWriteZeroesSectors: UInt32
    public var maxWriteZeroesSegments: UInt32

    public init(bytes b: [UInt8]) {
        func u16(_ o: Int) -> UInt16 { b.count >= o + 2 ? UInt16(b[o]) | UInt16(b[o + 1]) << 8 : 0 }
        func u32(_ o: Int) -> UInt32 { b.count >= o + 4 ? (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * UInt32($1)) } : 0 }
        func u64(_ o: Int) -> UInt64 { b.count >= o + 8 ? (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * UInt64($1)) } : 0 }
        capacity = u64(0); sizeMax = u32(8); segMax = u32(12); blockSize = u32(20); numQueues = u16(34)
        maxDiscardSectors = u32(36); maxDiscardSegments = u32(40); discardSectorAlignment = u32(44)
        maxWriteZeroesSectors = u32(48); maxWriteZeroesSegments = u32(52)
    }
}

/// Header of every request (§5.2.6): type, reserved, sector — 16 bytes, device-readable.
@usableFromInline enum BlkRequestHeader {
    @usableFromInline static let size = 16
}

/// Sector size of the protocol: offsets and counts are always in 512-byte units.
public let blkSectorSize = 512

/// A data buffer of a request, in memory the device can reach (DPDK memory).
@frozen public struct BlkBuffer: @unchecked Sendable {
    public var address: UnsafeMutableRawPointer
    public var length: Int
    @inlinable public init(_ address: UnsafeMutableRawPointer, length: Int) { self.address = address; self.length = length }
}

/// One finished request.
@frozen public struct BlkCompletion: Sendable {
    public var tag: UInt64
    public var operation: BlkOperation
    public var status: BlkStatus
    /// Data bytes transferred (0 unless `status == .ok`).
    public var bytes: UInt32
    public init(tag: UInt64, operation: BlkOperation, status: BlkStatus, bytes: UInt32) {
        self.tag = tag; self.operation = operation; self.status = status; self.bytes = bytes
    }
}

/// Why a request was not submitted; nothing was queued and the buffers are still the caller's.
public enum BlkRequestError: Error, Equatable, Sendable, CustomStringConvertible {
    /// No free request slot or descriptors: poll for completions, then retry.
    case queueFull
    case outOfRange(sector: UInt64, sectors: UInt64, capacity: UInt64)
    case readOnly
    case unsupported(BlkOperation)
    case tooManySegments(Int, max: Int)
    case segmentTooLarge(Int, max: Int)
    case misaligned(String)
    /// More sectors than the device's max_discard_sectors / max_write_zeroes_sectors.
    case rangeTooLarge(BlkOperation, sectors: UInt32, max: UInt32)
    /// The device went away or broke the ring; the queue takes no more requests.
    case queueStopped(String)
    /// A data buffer the device cannot be given: for virtio-pci it must be IOVA-contiguous DPDK memory.
    case notDMAMemory(String)

    public var description: String {
        switch self {
        case .queueFull: "queue full"
        case let .outOfRange(s, n, c): "\(n) sectors from sector \(s) are past the capacity of \(c) sectors"
        case .readOnly: "the device is read-only"
        case .unsupported(let op): "the device does not support \(op)"
        case let .tooManySegments(n, m): "\(n) data segments exceed the device's seg_max of \(m)"
        case let .segmentTooLarge(n, m): "a segment of \(n) bytes exceeds the device's size_max of \(m)"
        case .misaligned(let m): m
        case let .rangeTooLarge(op, n, m): "\(op) of \(n) sectors exceeds the device's limit of \(m)"
        case .queueStopped(let m): "queue stopped: \(m)"
        case .notDMAMemory(let m): "buffer is not IOVA-contiguous DPDK memory: \(m)"
        }
    }
}
