import VirtioCore

/// Front-end requests (QEMU docs/interop/vhost-user.rst, "Front-end message types").
public enum VhostUserRequest: UInt32, Sendable, CustomStringConvertible {
    case getFeatures = 1, setFeatures = 2, setOwner = 3, resetOwner = 4, setMemTable = 5
    case setLogBase = 6, setLogFD = 7, setVringNum = 8, setVringAddr = 9, setVringBase = 10
    case getVringBase = 11, setVringKick = 12, setVringCall = 13, setVringErr = 14
    case getProtocolFeatures = 15, setProtocolFeatures = 16, getQueueNum = 17, setVringEnable = 18
    case sendRARP = 19, netSetMTU = 20, setBackendReqFD = 21, iotlbMessage = 22, setVringEndian = 23
    case getConfig = 24, setConfig = 25, getInflightFD = 31, setInflightFD = 32, setStatus = 39, getStatus = 40

    public var description: String {
        switch self {
        case .getFeatures: "GET_FEATURES"
        case .setFeatures: "SET_FEATURES"
        case .setOwner: "SET_OWNER"
        case .resetOwner: "RESET_OWNER"
        case .setMemTable: "SET_MEM_TABLE"
        case .setLogBase: "SET_LOG_BASE"
        case .setLogFD: "SET_LOG_FD"
        case .setVringNum: "SET_VRING_NUM"
        case .setVringAddr: "SET_VRING_ADDR"
        case .setVringBase: "SET_VRING_BASE"
        case .getVringBase: "GET_VRING_BASE"
        case .setVringKick: "SET_VRING_KICK"
        case .setVringCall: "SET_VRING_CALL"
        case .setVringErr: "SET_VRING_ERR"
        case .getProtocolFeatures: "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: "SET_PROTOCOL_FEATURES"
        case .getQueueNum: "GET_QUEUE_NUM"
        case .setVringEnable: "SET_VRING_ENABLE"
        case .sendRARP: "SEND_RARP"
        case .netSetMTU: "NET_SET_MTU"
        case .setBackendReqFD: "SET_BACKEND_REQ_FD"
        case .iotlbMessage: "IOTLB_MSG"
        case .setVringEndian: "SET_VRING_ENDIAN"
        case .getConfig: "GET_CONFIG"
        case .setConfig: "SET_CONFIG"
        case .getInflightFD: "GET_INFLIGHT_FD"
        case .setInflightFD: "SET_INFLIGHT_FD"
        case .setStatus: "SET_STATUS"
        case .getStatus: "GET_STATUS"
        }
    }

    /// Requests whose reply carries data (so REPLY_ACK's need-reply bit is not added to them).
    public var hasReply: Bool {
        switch self {
        case .getFeatures, .getProtocolFeatures, .getQueueNum, .getVringBase, .getConfig, .getInflightFD, .getStatus: true
        default: false
        }
    }
}

/// VHOST_USER_PROTOCOL_F_* bits.
public struct VhostUserProtocolFeatures: OptionSet, Sendable, Hashable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let mq = Self(rawValue: 1 << 0)
    public static let logShmfd = Self(rawValue: 1 << 1)
    public static let rarp = Self(rawValue: 1 << 2)
    public static let replyAck = Self(rawValue: 1 << 3)
    public static let mtu = Self(rawValue: 1 << 4)
    public static let backendReq = Self(rawValue: 1 << 5)
    public static let config = Self(rawValue: 1 << 9)
    /// The backend tracks in-flight descriptors in shared memory we keep (GET/SET_INFLIGHT_FD),
    /// so a restarted backend resumes them itself.
    public static let inflightShmfd = Self(rawValue: 1 << 12)
    public static let status = Self(rawValue: 1 << 16)
}

/// VHOST_USER_F_PROTOCOL_FEATURES: a virtio feature bit that only means "speaks protocol features".
public let vhostUserProtocolFeaturesBit = VirtioFeatures(bit: 30)

/// One vhost-user message: a 12-byte header (request, flags, payload size; little-endian u32s)
/// followed by the payload, with file descriptors passed alongside as SCM_RIGHTS.
public struct VhostUserMessage: Equatable, Sendable {
    public static let headerSize = 12
    /// Protocol version 1 in flags bits 0–1.
    public static let version: UInt32 = 0x1
    public static let replyFlag: UInt32 = 1 << 2
    public static let needReplyFlag: UInt32 = 1 << 3
    /// Bit 8 of a vring index in SET_VRING_KICK/CALL/ERR: no descriptor is attached.
    public static let noFDFlag: UInt64 = 1 << 8
    /// The most regions SET_MEM_TABLE carries (VHOST_MEMORY_BASELINE_NREGIONS).
    public static let maxRegions = 8

    public var request: UInt32
    public var flags: UInt32
    public var payload: [UInt8]
    public var fds: [Int32]

    public init(request: UInt32, flags: UInt32 = VhostUserMessage.version, payload: [UInt8] = [], fds: [Int32] = []) {
        self.request = request; self.flags = flags; self.payload = payload; self.fds = fds
    }
    public init(_ request: VhostUserRequest, payload: [UInt8] = [], fds: [Int32] = []) {
        self.init(request: request.rawValue, payload: payload, fds: fds)
    }

    public var encoded: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(Self.headerSize + payload.count)
        out.appendLE(request); out.appendLE(flags); out.appendLE(UInt32(payload.count))
        out += payload
        return out
    }

    // MARK: Payload builders
    public static func u64(_ r: VhostUserRequest, _ value: UInt64, fds: [Int32] = []) -> Self {
        var p = [UInt8](); p.appendLE(value)
        return Self(r, payload: p, fds: fds)
    }
    public static func vringState(_ r: VhostUserRequest, index: Int, num: UInt32) -> Self {
        var p = [UInt8](); p.appendLE(UInt32(index)); p.appendLE(num)
        return Self(r, payload: p)
    }
    /// SET_VRING_ADDR: index, flags, then desc, used, avail and log addresses (in that order).
    public static func vringAddress(index: Int, _ a: QueueAddresses) -> Self {
        var p = [UInt8]()
        p.appendLE(UInt32(index)); p.appendLE(UInt32(0))
        p.appendLE(a.desc); p.appendLE(a.used); p.appendLE(a.avail); p.appendLE(UInt64(0))
        return Self(.setVringAddr, payload: p)
    }
    /// SET_MEM_TABLE: region count, padding, then per region guest address (we use the process
    /// virtual address), size, user address and mmap offset; the fds travel in the same order.
    public static func memoryTable(_ regions: [MemoryRegion]) -> Self {
        var p = [UInt8]()
        p.appendLE(UInt32(regions.count)); p.appendLE(UInt32(0))
        for r in regions { p.appendLE(r.address); p.appendLE(r.size); p.appendLE(r.address); p.appendLE(r.fileOffset) }
        return Self(.setMemTable, payload: p, fds: regions.map(\.fd))
    }
    /// GET/SET_INFLIGHT_FD: mmap size, mmap offset, queue count, queue size (and 4 bytes of
    /// padding: QEMU's struct, 24 bytes).
    public static func inflight(_ r: VhostUserRequest, size: UInt64, offset: UInt64, queues: Int, queueSize: Int, fds: [Int32] = []) -> Self {
        var p = [UInt8]()
        p.appendLE(size); p.appendLE(offset); p.appendLE(UInt16(queues)); p.appendLE(UInt16(queueSize)); p.appendLE(UInt32(0))
        return Self(r, payload: p, fds: fds)
    }
    /// GET_CONFIG: offset, size, flags, then `size` bytes (zero in the request).
    public static func config(offset: Int, size: Int) -> Self {
        var p = [UInt8]()
        p.appendLE(UInt32(offset)); p.appendLE(UInt32(size)); p.appendLE(UInt32(0))
        p += [UInt8](repeating: 0, count: size)
        return Self(.getConfig, payload: p)
    }

    /// Little-endian u32/u64 read from the payload; nil when it is too short.
    public func u32(at offset: Int) -> UInt32? {
        guard offset >= 0, offset <= payload.count - 4 else { return nil }
        return (0..<4).reduce(UInt32(0)) { $0 | UInt32(payload[offset + $1]) << (8 * UInt32($1)) }
    }
    public func u64(at offset: Int) -> UInt64? {
        guard offset >= 0, offset <= payload.count - 8 else { return nil }
        return (0..<8).reduce(UInt64(0)) { $0 | UInt64(payload[offset + $1]) << (8 * UInt64($1)) }
    }

    /// Parses a 12-byte header: (request, flags, payload size).
    public static func decodeHeader(_ b: [UInt8]) -> (request: UInt32, flags: UInt32, size: UInt32)? {
        guard b.count >= headerSize else { return nil }
        let m = VhostUserMessage(request: 0, flags: 0, payload: Array(b[0..<headerSize]))
        return (m.u32(at: 0)!, m.u32(at: 4)!, m.u32(at: 8)!)
    }
}

extension Array where Element == UInt8 {
    mutating func appendLE<T: FixedWidthInteger>(_ v: T) {
        var x = v.littleEndian
        Swift.withUnsafeBytes(of: &x) { append(contentsOf: $0) }
    }
}
