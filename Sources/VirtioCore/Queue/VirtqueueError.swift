/// Why a virtqueue stopped. Every case but `invalidSize` is something the *device* did wrong; the
/// queue stops at the first one and keeps the buffers it still owns so they can be reclaimed.
public enum VirtqueueError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidSize(Int)
    /// The device moved the used index by more than the buffers it had (or moved it backwards).
    case usedIndexJump(usedIdx: UInt16, lastSeen: UInt16, inFlight: UInt16)
    /// A used element names a descriptor outside the table.
    case usedIDOutOfRange(id: UInt32, size: Int)
    /// A used element names a descriptor that is not the head of a buffer in flight.
    case usedIDNotInFlight(id: UInt32)
    /// In-order: a used element names a buffer that is not the next in order or a later one within
    /// the completed range.
    case usedIDOutOfOrder(id: UInt32, expected: UInt16)
    /// The device claims to have written more bytes than the buffer's device-writable part.
    case usedLengthTooLarge(id: UInt32, length: UInt32, posted: UInt32)
    /// Packed ring: a descriptor marked used with the wrap counter of another lap.
    case usedWrapMismatch(position: UInt16, expectedWrap: Bool)

    public var description: String {
        switch self {
        case .invalidSize(let s): return "queue size \(s) is not a power of two in 1...32768"
        case let .usedIndexJump(u, l, f):
            return "device moved used index to \(u) from \(l) with only \(f) buffers in flight"
        case let .usedIDOutOfRange(id, size): return "device returned descriptor id \(id) outside a queue of \(size)"
        case .usedIDNotInFlight(let id): return "device returned descriptor id \(id), which is not in flight"
        case let .usedIDOutOfOrder(id, e):
            return "in-order device returned id \(id) where the next buffer starts at \(e)"
        case let .usedLengthTooLarge(id, len, posted):
            return "device wrote \(len) bytes into buffer \(id) of \(posted) writable bytes"
        case let .usedWrapMismatch(pos, wrap):
            return "device marked descriptor \(pos) used with wrap counter \(wrap ? 0 : 1) where \(wrap ? 1 : 0) was due"
        }
    }
}
