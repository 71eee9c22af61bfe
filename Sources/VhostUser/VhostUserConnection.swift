import CVioLinux
import Logging
import Synchronization
import VirtioCore
#if canImport(Glibc)
import Glibc
#endif

/// Errors of the vhost-user front end, each with what the user should know.
public enum VhostUserError: Error, CustomStringConvertible, Equatable, Sendable {
    case socketMissing(path: String)
    case connectionRefused(path: String)
    case connectFailed(path: String, errno: Int32)
    case pathTooLong(path: String)
    case io(request: String, errno: Int32)
    case backendClosed(request: String)
    case timeout(request: String, seconds: Double)
    case badReply(request: String, detail: String)
    case requestFailed(request: String, code: UInt64)
    case incompatibleFeatures(missing: String)
    case tooManyRegions(Int)
    case notConnected
    case listenFailed(path: String, errno: Int32)

    public var description: String {
        switch self {
        case .socketMissing(let p): return "vhost-user socket \(p) does not exist (is the backend running?)"
        case .connectionRefused(let p): return "vhost-user backend at \(p) refused the connection (nothing is listening)"
        case let .connectFailed(p, e): return "cannot connect to vhost-user socket \(p): \(String(cString: strerror(e)))"
        case .pathTooLong(let p): return "vhost-user socket path is too long: \(p)"
        case let .io(r, e): return "vhost-user \(r): \(String(cString: strerror(e)))"
        case .backendClosed(let r): return "vhost-user backend closed the connection during \(r)"
        case let .timeout(r, s): return "vhost-user backend did not answer \(r) within \(s == s.rounded() ? String(Int(s)) : String(s)) s"
        case let .badReply(r, d): return "malformed vhost-user reply to \(r): \(d)"
        case let .requestFailed(r, c): return "vhost-user backend rejected \(r) (reply-ack code \(c))"
        case .incompatibleFeatures(let m): return "vhost-user backend lacks required features: \(m)"
        case .tooManyRegions(let n): return "DPDK memory has \(n) regions; vhost-user takes at most 8 (use --single-file-segments)"
        case .notConnected: return "vhost-user backend is not connected"
        case let .listenFailed(p, e): return "cannot listen on vhost-user socket \(p): \(String(cString: strerror(e)))"
        }
    }
}

/// The front end of a vhost-user connection (we are the driver; the backend is the device), over
/// a UNIX stream socket, in the order DESIGN.md gives. Blocking I/O with a receive timeout, on
/// the control path only. A monitor thread waits for the peer to hang up and clears
/// `isConnected`; the data path never makes a syscall for it.
public final class VhostUserConnection: VirtioTransport, @unchecked Sendable {
    public let path: String
    public private(set) var deviceFeatures: VirtioFeatures = []
    public private(set) var protocolFeatures: VhostUserProtocolFeatures = []
    /// GET_QUEUE_NUM's answer (queue pairs for a net backend, queues for blk).
    public private(set) var queueLimit: QueueLimit?
    public private(set) var negotiatedFeatures: VirtioFeatures = []
    let logger: Logger
    /// The connection's socket (-1 between a loss and the reconnect).
    private(set) var fd: Int32
    /// Filled during setup, before the device starts; `notify` (the one data-path call) only reads
    /// it, from the lcore that owns the queues, so it needs no dynamic exclusivity check.
    @exclusivity(unchecked) private var kickFDs: [Int32] = []
    private var callFDs: [Int32] = []
    /// What GET_VRING_BASE returned for each ring at the last stop.
    public private(set) var stoppedBases: [UInt32]?
    private var queueCount = 0
    /// Each ring's size, as the last SET_VRING_NUM gave it.
    private var ringSizes: [Int] = []
    private var started = false
    /// Whether the backend is still there, and why not: shared with the hang-up monitor, which
    /// holds only this (never the connection, so the connection is never released on its thread).
    private let state = ConnectionState()
    private let stopLock = Mutex<Void>(())
    private let wakeFD: Int32
    private var monitor: pthread_t?
    /// Protocol features we use when the backend offers them.
    public static let wantedProtocolFeatures: VhostUserProtocolFeatures = [.mq, .replyAck, .config, .status]
    /// What this connection asks for: the above, plus INFLIGHT_SHMFD when asked to track in-flight requests.
    let wanted: VhostUserProtocolFeatures
    /// The in-flight tracking area the backend gave us (GET_INFLIGHT_FD), kept across reconnects
    /// and given to every backend (SET_INFLIGHT_FD), so a restarted one resumes what was in flight.
    private var inflight: (fd: Int32, size: UInt64, offset: UInt64, queues: Int, queueSize: Int)?

    /// Connects and runs the first part of the handshake: SET_OWNER, GET_FEATURES, protocol
    /// features, GET_QUEUE_NUM.
    /// How long a reply may take by default (vio's `--reply-timeout`).
    public static let defaultReplyTimeout: Double = 5
    /// How long each reply may take before the request is reported unanswered.
    public private(set) var replyTimeout: Double

    /// `inflightTracking`: also negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD when offered (blk),
    /// see `setUpInflightTracking`.
    public init(path: String, logger: Logger = Logger(label: "vhost-user"), replyTimeoutSeconds: Double = VhostUserConnection.defaultReplyTimeout,
                inflightTracking: Bool = false) throws {
        self.path = path
        wanted = Self.wantedProtocolFeatures.union(inflightTracking ? .inflightShmfd : [])
        self.logger = logger
        replyTimeout = try Self.checkedReplyTimeout(replyTimeoutSeconds)
        role = .client
        fd = try Self.connectSocket(path)
        wakeFD = cvio_eventfd()
        setReceiveTimeout(replyTimeoutSeconds)
        // On a throw from here on, every stored property is set, so deinit runs and closes the
        // socket and the eventfd (closing them here too would close them twice).
        try handshake()
        startMonitor()
    }

    /// Server mode (DPDK virtio_user's `server=1`): creates the socket at `path` (a stale socket
    /// file there is removed), listens, and waits for the backend to connect as a client (DPDK
    /// vhost `client=1`) — at most `acceptTimeout` seconds (nil: until `abort` says so, asked every
    /// 100 ms). While a backend is connected, a second one is refused (accepted and closed at once);
    /// after it hangs up, `reconnect` waits for the next one. The socket file is removed at deinit.
    public init(listeningAt path: String, logger: Logger = Logger(label: "vhost-user"),
                replyTimeoutSeconds: Double = VhostUserConnection.defaultReplyTimeout,
                acceptTimeout: Double? = nil, abort: () -> Bool = { false }, inflightTracking: Bool = false) throws {
        self.path = path
        wanted = Self.wantedProtocolFeatures.union(inflightTracking ? .inflightShmfd : [])
        self.logger = logger
        replyTimeout = try Self.checkedReplyTimeout(replyTimeoutSeconds)
        let l = try Self.listenSocket(path)
        role = .server(listenFD: l)
        fd = -1
        wakeFD = cvio_eventfd()
        logger.info("vhost-user \(path): listening for a backend (server mode)")
        let deadline = acceptTimeout.map { monotonicNow() &+ UInt64($0 * 1e9) } ?? .max
        fd = try acceptBackend(deadline: deadline, abort: abort, waited: acceptTimeout)
        setReceiveTimeout(replyTimeoutSeconds)
        settle(abort: abort)
        try handshake()
        startMonitor()
    }

    deinit {
        stopMonitor()
        if fd >= 0 { close(fd) }
        close(wakeFD)
        for f in kickFDs + callFDs where f >= 0 { close(f) }
        if let i = inflight { close(i.fd) }
        if case .server(let l) = role { close(l); unlink(path) }
    }

    private static func checkedReplyTimeout(_ seconds: Double) throws -> Double {
        guard seconds > 0, seconds <= 3600 else {
            throw VhostUserError.badReply(request: "setup", detail: "reply timeout \(seconds) s must be in (0, 3600]")
        }
        return seconds
    }

    /// Client (we connect to the backend's socket) or server (the backend connects to ours).
    enum Role { case client, server(listenFD: Int32) }
    let role: Role
    public var isServer: Bool { if case .server = role { true } else { false } }

    private func setReceiveTimeout(_ seconds: Double) {
        let whole = seconds.rounded(.down)
        var tv = timeval(tv_sec: Int(whole), tv_usec: Int((seconds - whole) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    private static func address(_ path: String) throws -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw VhostUserError.pathTooLong(path: path) }
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in
            for (i, b) in bytes.enumerated() { dst[i] = b }
        }
        return addr
    }

    private static func connectSocket(_ path: String) throws -> Int32 {
        var addr = try address(path)
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw VhostUserError.connectFailed(path: path, errno: errno) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 {
            let e = errno
            close(s)
            switch e {
            case ENOENT: throw VhostUserError.socketMissing(path: path)
            case ECONNREFUSED: throw VhostUserError.connectionRefused(path: path)
            default: throw VhostUserError.connectFailed(path: path, errno: e)
            }
        }
        return s
    }

    private static func listenSocket(_ path: String) throws -> Int32 {
        var addr = try address(path)
        // A socket file left by an earlier run is ours to replace; any other file is not.
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else { throw VhostUserError.listenFailed(path: path, errno: EEXIST) }
            unlink(path)
        }
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw VhostUserError.listenFailed(path: path, errno: errno) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, listen(s, 4) == 0 else { let e = errno; close(s); throw VhostUserError.listenFailed(path: path, errno: e) }
        return s
    }

    /// Waits for a backend to connect to our socket (server mode).
    private func acceptBackend(deadline: UInt64, abort: () -> Bool, waited: Double?) throws -> Int32 {
        guard case .server(let l) = role else { preconditionFailure("accept in client mode") }
        let began = monotonicNow()
        while true {
            if abort() { throw ReconnectError.aborted }
            let now = monotonicNow()
            if now >= deadline { throw ReconnectError.timedOut(seconds: waited ?? Double(now &- began) / 1e9) }
            var p = pollfd(fd: l, events: Int16(POLLIN), revents: 0)
            let ms = Int32(min(100, (deadline - now) / 1_000_000 + 1))
            let n = poll(&p, 1, ms)
            if n < 0 && errno != EINTR { throw VhostUserError.listenFailed(path: path, errno: errno) }
            guard n > 0 else { continue }
            let c = cvio_accept_cloexec(l)
            if c >= 0 {
                logger.info("vhost-user \(path): a backend connected")
                return c
            }
            if errno != EINTR && errno != EAGAIN && errno != ECONNABORTED { throw VhostUserError.listenFailed(path: path, errno: errno) }
        }
    }

    public var canReconnect: Bool { true }

    /// How long a backend that has just (re)appeared is left alone before the handshake.
    /// DPDK 22.11's net_vhost connects (client=1) or starts listening from inside its probe,
    /// before its ethdev port is configured; a handshake finished in the next few hundred
    /// milliseconds leaves its TX queue stuck for good (it forwards what we send and never
    /// sends back). Measured here: no wait fails every time, 0.3 s works; 0.5 s leaves a margin.
    public static let settleSeconds = 0.5

    private func settle(abort: () -> Bool) {
        var left = UInt64(Self.settleSeconds * 1e9)
        while left > 0 && !abort() {
            let slice = min(left, 50_000_000)
            var ts = timespec(tv_sec: 0, tv_nsec: Int(slice))
            nanosleep(&ts, nil)
            left -= slice
        }
    }

    /// After the backend hung up (or failed): drops the old connection, connects again (client:
    /// retrying while the socket is missing or refuses, backoff 10 ms doubling to 1 s; server:
    /// accepting the backend's next connection) and runs SET_OWNER, GET_FEATURES, the protocol
    /// features and GET_QUEUE_NUM again. The kick and call eventfds stay the same (the data path
    /// never sees a change); `negotiate` sends them to the new backend.
    public func reconnect(deadline: UInt64, abort: () -> Bool) throws {
        stopMonitor()
        if fd >= 0 { close(fd); fd = -1 }
        state.lost("reconnecting")
        started = false
        stoppedBases = nil
        protocolFeatures = []
        deviceFeatures = []
        queueLimit = nil
        let began = monotonicNow()
        var backoff: UInt64 = 10_000_000
        while true {
            if abort() { throw ReconnectError.aborted }
            let now = monotonicNow()
            if now >= deadline { throw ReconnectError.timedOut(seconds: Double(now &- began) / 1e9) }
            switch role {
            case .server:
                fd = try acceptBackend(deadline: deadline, abort: abort, waited: nil)
            case .client:
                do { fd = try Self.connectSocket(path) } catch VhostUserError.socketMissing, VhostUserError.connectionRefused {
                    // Not back yet: wait, in slices short enough to notice an abort.
                    var left = min(backoff, deadline &- now)
                    while left > 0 && !abort() {
                        let slice = min(left, 50_000_000)
                        var ts = timespec(tv_sec: 0, tv_nsec: Int(slice))
                        nanosleep(&ts, nil)
                        left -= slice
                    }
                    backoff = min(backoff * 2, 1_000_000_000)
                    continue
                }
            }
            setReceiveTimeout(replyTimeout)
            settle(abort: abort)
            state.revive()
            do { try handshake() } catch {
                logger.warning("vhost-user \(path): the handshake with the reconnected backend failed: \(error)")
                close(fd); fd = -1
                state.lost("handshake failed: \(error)")
                throw error
            }
            startMonitor()
            logger.info("vhost-user \(path): reconnected; device features \(deviceFeatures)")
            return
        }
    }

    public var isConnected: Bool { state.alive.load(ordering: .relaxed) }

    public func limitReplyWait(seconds: Double) {
        guard seconds > 0, seconds < replyTimeout else { return }
        replyTimeout = seconds
        setReceiveTimeout(seconds)
    }
    public var disconnectReason: String? { state.reason.withLock { $0 } }

    private func lost(_ reason: String) { state.lost(reason) }

    public func attach(_ link: DeviceLink) {
        state.deviceLink.withLock { $0 = link }
        if !isConnected { link.markDown(disconnectReason ?? "vhost-user backend \(path) is gone") }
    }

    /// SET_VRING_ENABLE for one ring (vhost-user.rst "Ring states"); how VQ_PAIRS_SET reaches a
    /// net backend, which never sees the control queue.
    public func setQueueEnabled(_ index: Int, _ enabled: Bool) throws {
        guard !protocolFeatures.isEmpty else {
            throw VhostUserError.incompatibleFeatures(missing: "VHOST_USER_F_PROTOCOL_FEATURES (needed to enable single rings)")
        }
        guard index >= 0, index < queueCount else { throw VhostUserError.badReply(request: "SET_VRING_ENABLE", detail: "no ring \(index)") }
        try send(.vringState(.setVringEnable, index: index, num: enabled ? 1 : 0))
    }

    private func handshake() throws {
        try send(VhostUserMessage(.setOwner), ack: false)
        let offered = try request(VhostUserMessage(.getFeatures)).u64(at: 0)
        guard let offered else { throw VhostUserError.badReply(request: "GET_FEATURES", detail: "payload shorter than 8 bytes") }
        let all = VirtioFeatures(rawValue: offered)
        if all.contains(vhostUserProtocolFeaturesBit) {
            guard let p = try request(VhostUserMessage(.getProtocolFeatures)).u64(at: 0) else {
                throw VhostUserError.badReply(request: "GET_PROTOCOL_FEATURES", detail: "payload shorter than 8 bytes")
            }
            let chosen = VhostUserProtocolFeatures(rawValue: p).intersection(wanted)
            logger.debug("vhost-user \(path): the backend offers protocol features 0x\(String(p, radix: 16))")
            try send(.u64(.setProtocolFeatures, chosen.rawValue), ack: false)
            protocolFeatures = chosen
            if chosen.contains(.mq) {
                guard let q = try request(VhostUserMessage(.getQueueNum)).u64(at: 0) else {
                    throw VhostUserError.badReply(request: "GET_QUEUE_NUM", detail: "payload shorter than 8 bytes")
                }
                // A virtio device has at most 65 535 virtqueues (16-bit queue_select); anything
                // else is a broken backend, refused before it is used as a count.
                guard q >= 1, q <= 0xffff else {
                    throw VhostUserError.badReply(request: "GET_QUEUE_NUM", detail: "\(q) queues (must be 1...65535)")
                }
                queueLimit = .deviceUnits(Int(q))
            }
        }
        deviceFeatures = all.subtracting(vhostUserProtocolFeaturesBit)
        try setStatus([.acknowledge, .driver])
        logger.debug("vhost-user \(path): device features \(deviceFeatures), protocol features 0x\(String(protocolFeatures.rawValue, radix: 16))")
    }

    private func setStatus(_ s: DeviceStatus) throws {
        guard protocolFeatures.contains(.status) else { return }
        try send(.u64(.setStatus, UInt64(s.rawValue)))
    }

    // MARK: VirtioTransport

    public func readConfig(offset: Int, count: Int) throws -> [UInt8] {
        guard protocolFeatures.contains(.config) else {
            throw VhostUserError.incompatibleFeatures(missing: "VHOST_USER_PROTOCOL_F_CONFIG (needed to read device config space)")
        }
        let reply = try request(.config(offset: offset, size: count))
        guard let size = reply.u32(at: 4), Int(size) == count, reply.payload.count >= 12 + count else {
            throw VhostUserError.badReply(request: "GET_CONFIG", detail: "asked for \(count) bytes, got a payload of \(reply.payload.count) bytes")
        }
        return Array(reply.payload[12..<(12 + count)])
    }

    public func negotiate(_ features: VirtioFeatures, queueCount: Int) throws {
        try negotiate(features, queueCount: queueCount, queuesPerUnit: 1)
    }

    /// vhost-user.rst, "Multiple queue support": more queues than GET_QUEUE_NUM allows are
    /// refused before any ring is configured. A net backend counts queue pairs (`queuesPerUnit` 2,
    /// as QEMU and DPDK read it), a blk backend queues.
    public func negotiate(_ features: VirtioFeatures, queueCount: Int, queuesPerUnit: Int) throws {
        precondition(deviceFeatures.isSuperset(of: features), "negotiating features the device does not offer")
        if let max = queueLimit?.value, (queueCount + queuesPerUnit - 1) / queuesPerUnit > max {
            let unit = queuesPerUnit == 2 ? "queue pairs" : "queues"
            throw VhostUserError.incompatibleFeatures(missing: "\((queueCount + queuesPerUnit - 1) / queuesPerUnit) \(unit) (the backend supports \(max))")
        }
        self.queueCount = queueCount
        // Call descriptors first (as DPDK's virtio_user does): the device may signal on them, we
        // never read them in poll mode.
        // A reconnect keeps the eventfds it made the first time (the data path reads `kickFDs`).
        precondition(kickFDs.isEmpty || kickFDs.count == queueCount, "a reconnect negotiates the same queues")
        for i in 0..<queueCount {
            if i == kickFDs.count {
                let call = cvio_eventfd()
                let kick = cvio_eventfd()
                guard call >= 0, kick >= 0 else { throw VhostUserError.io(request: "eventfd", errno: errno) }
                callFDs.append(call); kickFDs.append(kick)
            }
            try send(.u64(.setVringCall, UInt64(i), fds: [callFDs[i]]))
        }
        var wire = features
        if !protocolFeatures.isEmpty || deviceFeaturesHadProtocolBit { wire.insert(vhostUserProtocolFeaturesBit) }
        try send(.u64(.setFeatures, wire.rawValue))
        negotiatedFeatures = features
        if let i = inflight {
            // A reconnect: the new backend gets the area the old one tracked its requests in.
            guard protocolFeatures.contains(.inflightShmfd) else {
                throw VhostUserError.incompatibleFeatures(missing: "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (the requests in flight were left to the backend to resume)")
            }
            try send(.inflight(.setInflightFD, size: i.size, offset: i.offset, queues: i.queues, queueSize: i.queueSize, fds: [i.fd]))
        }
        try setStatus([.acknowledge, .driver, .featuresOK])
    }

    private var deviceFeaturesHadProtocolBit: Bool { !protocolFeatures.isEmpty }

    /// With INFLIGHT_SHMFD negotiated: asks the backend for its in-flight tracking area
    /// (GET_INFLIGHT_FD) and hands it back (SET_INFLIGHT_FD), as QEMU's vhost-user-blk does; a
    /// backend restarted later gets the same area and resumes what was in flight itself. Call
    /// after `negotiate`, before `setMemory`. False when the backend does not offer it.
    public func setUpInflightTracking(queueCount: Int, queueSize: Int) throws -> Bool {
        guard protocolFeatures.contains(.inflightShmfd), inflight == nil else { return inflight != nil }
        let name = "GET_INFLIGHT_FD"
        try write(.inflight(.getInflightFD, size: 0, offset: 0, queues: queueCount, queueSize: queueSize), name: name)
        var fds: [Int32] = []
        let reply: VhostUserMessage
        do { reply = try read(expecting: VhostUserRequest.getInflightFD.rawValue, name: name, keeping: &fds) } catch {
            for f in fds { close(f) }
            throw error
        }
        guard let size = reply.u64(at: 0), let offset = reply.u64(at: 8), reply.payload.count >= 20 else {
            for f in fds { close(f) }
            throw VhostUserError.badReply(request: name, detail: "payload of \(reply.payload.count) bytes (needs 24)")
        }
        guard fds.count == 1, size > 0, size <= 1 << 30, offset <= 1 << 30 else {
            for f in fds { close(f) }
            throw VhostUserError.badReply(request: name, detail: "\(fds.count) descriptors, mmap size \(size), offset \(offset)")
        }
        inflight = (fds[0], size, offset, queueCount, queueSize)
        try send(.inflight(.setInflightFD, size: size, offset: offset, queues: queueCount, queueSize: queueSize, fds: [fds[0]]))
        logger.debug("vhost-user \(path): in-flight tracking area of \(size) bytes")
        return true
    }

    public func setMemory(_ regions: [MemoryRegion]) throws {
        guard regions.count <= VhostUserMessage.maxRegions else { throw VhostUserError.tooManyRegions(regions.count) }
        try send(.memoryTable(regions))
    }

    public func setupQueue(_ index: Int, addresses: QueueAddresses) throws {
        // GET_VRING_BASE made the backend drop the ring's call descriptor; a restart sends it again.
        if stoppedBases != nil { try send(.u64(.setVringCall, UInt64(index), fds: [callFDs[index]])) }
        while ringSizes.count <= index { ringSizes.append(0) }
        ringSizes[index] = addresses.size
        try send(.vringState(.setVringNum, index: index, num: UInt32(addresses.size)))
        try send(.vringState(.setVringBase, index: index, num: addresses.base))
        try send(.vringAddress(index: index, addresses))
        // KICK last: backends take it as "this ring is ready".
        try send(.u64(.setVringKick, UInt64(index), fds: [kickFDs[index]]))
    }

    public func start() throws {
        if !protocolFeatures.isEmpty {
            // With protocol features, rings start disabled (vhost-user.rst, "Ring states").
            for i in 0..<queueCount { try send(.vringState(.setVringEnable, index: i, num: 1)) }
        }
        try setStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        started = true

    }

    /// Safe to call from several threads (a failing blk queue on any lcore stops the device):
    /// the first caller does the work, the others return when it is done.
    public func stop() throws {
        try stopLock.withLock { _ throws in try stopLocked() }
    }

    private func stopLocked() throws {
        guard started else { return }
        started = false
        guard isConnected else { return }
        if !protocolFeatures.isEmpty {
            for i in 0..<queueCount { try send(.vringState(.setVringEnable, index: i, num: 0)) }
        }
        // GET_VRING_BASE stops each ring; after the last reply the backend touches none of our memory.
        var bases: [UInt32] = []
        do {
            for i in 0..<queueCount {
                let r = try request(.vringState(.getVringBase, index: i, num: 0))
                guard let ring = r.u32(at: 0), let base = r.u32(at: 4) else {
                    throw VhostUserError.badReply(request: "GET_VRING_BASE", detail: "payload of \(r.payload.count) bytes for ring \(i) (needs 8)")
                }
                guard ring == UInt32(i) else {
                    throw VhostUserError.badReply(request: "GET_VRING_BASE", detail: "reply names ring \(ring), asked for ring \(i)")
                }
                try checkStoppedBase(base, ring: i)
                bases.append(base)
            }
        } catch {
            // Unanswered or garbage: the rings may still be in use by the backend, and the
            // stream is out of step (a late reply would answer the next request), so the
            // connection is done. The caller gets the error; the log says it too.
            logger.warning("vhost-user \(path): the backend did not confirm that it stopped: \(error); it may still use the rings' memory")
            lost("the final stop failed: \(error)")
            throw error
        }
        stoppedBases = bases
    }

    /// A ring base from GET_VRING_BASE: split, a 16-bit avail index; packed, a position inside
    /// the ring with the wrap counter in bit 15 (vhost-user.rst, "Ring states").
    private func checkStoppedBase(_ base: UInt32, ring: Int) throws {
        if negotiatedFeatures.contains(.ringPacked) {
            let size = ring < ringSizes.count ? ringSizes[ring] : 0
            guard base >> 16 == 0, Int(base & 0x7fff) < size else {
                throw VhostUserError.badReply(request: "GET_VRING_BASE", detail: "packed ring \(ring) base 0x\(String(base, radix: 16)) is not a position in a ring of \(size) with the wrap counter in bit 15")
            }
        } else {
            guard base <= 0xffff else {
                throw VhostUserError.badReply(request: "GET_VRING_BASE", detail: "split ring \(ring) base \(base) is not a 16-bit avail index")
            }
        }
    }

    @inline(never)
    /// The ring's call eventfd (SET_VRING_CALL): the backend writes it when the driver asked
    /// for a used-buffer notification.
    public func notificationDescriptor(queue index: Int) -> Int32? {
        index < callFDs.count && callFDs[index] >= 0 ? callFDs[index] : nil
    }

    public func notify(queue index: Int) {
        var one: UInt64 = 1
        _ = Glibc.write(kickFDs[index], &one, 8)
    }

    // MARK: Messages

    /// Sends a message; with REPLY_ACK negotiated and `ack`, asks for and checks the ack.
    public func send(_ message: VhostUserMessage, ack: Bool = true) throws {
        var m = message
        let r = VhostUserRequest(rawValue: m.request)
        let name = r?.description ?? "request \(m.request)"
        let wantAck = ack && protocolFeatures.contains(.replyAck) && !(r?.hasReply ?? false)
        if wantAck { m.flags |= VhostUserMessage.needReplyFlag }
        try write(m, name: name)
        if wantAck {
            let reply = try read(expecting: m.request, name: name)
            guard let code = reply.u64(at: 0) else { throw VhostUserError.badReply(request: name, detail: "ack shorter than 8 bytes") }
            if code != 0 { throw VhostUserError.requestFailed(request: name, code: code) }
        }
    }

    /// Sends a request that has a reply and returns the reply.
    public func request(_ message: VhostUserMessage) throws -> VhostUserMessage {
        let name = VhostUserRequest(rawValue: message.request)?.description ?? "request \(message.request)"
        try write(message, name: name)
        return try read(expecting: message.request, name: name)
    }

    private func write(_ m: VhostUserMessage, name: String) throws {
        let bytes = m.encoded
        let n = bytes.withUnsafeBytes { b in
            m.fds.withUnsafeBufferPointer { cvio_send_with_fds(fd, b.baseAddress, b.count, $0.baseAddress, Int32(m.fds.count)) }
        }
        if n < 0 {
            let e = errno
            if e == EPIPE || e == ECONNRESET { lost("backend closed the connection"); throw VhostUserError.backendClosed(request: name) }
            throw VhostUserError.io(request: name, errno: e)
        }
        guard n == bytes.count else { throw VhostUserError.io(request: name, errno: EIO) }
    }

    private func readExactly(_ count: Int, name: String) throws -> [UInt8] {
        var none: [Int32]? = nil
        return try readExactly(count, name: name, keeping: &none)
    }

    /// Reads `count` bytes; descriptors that come with them are kept in `keep` (if given) or closed.
    private func readExactly(_ count: Int, name: String, keeping keep: inout [Int32]?) throws -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            var fds = [Int32](repeating: -1, count: 8)
            var nfds: Int32 = 0
            let n = buf.withUnsafeMutableBytes { b in
                cvio_recv_with_fds(fd, b.baseAddress! + got, count - got, &fds, 8, &nfds)
            }
            for i in 0..<Int(nfds) {
                if keep != nil && keep!.count < 8 { keep!.append(fds[i]) } else { close(fds[i]) }  // only GET_INFLIGHT_FD sends one
            }
            if n == 0 { lost("backend closed the connection"); throw VhostUserError.backendClosed(request: name) }
            if n < 0 {
                let e = errno
                if e == EAGAIN || e == EWOULDBLOCK { throw VhostUserError.timeout(request: name, seconds: replyTimeout) }
                if e == ECONNRESET { lost("backend reset the connection"); throw VhostUserError.backendClosed(request: name) }
                throw VhostUserError.io(request: name, errno: e)
            }
            got += n
        }
        return buf
    }

    private func read(expecting request: UInt32, name: String) throws -> VhostUserMessage {
        var none: [Int32] = []
        defer { for f in none { close(f) } }
        return try read(expecting: request, name: name, keeping: &none)
    }

    private func read(expecting request: UInt32, name: String, keeping fds: inout [Int32]) throws -> VhostUserMessage {
        var keep: [Int32]? = []
        defer { fds = keep ?? [] }
        let header = try readExactly(VhostUserMessage.headerSize, name: name, keeping: &keep)
        let h = VhostUserMessage.decodeHeader(header)!
        guard h.request == request else {
            throw VhostUserError.badReply(request: name, detail: "reply is for request \(h.request)")
        }
        guard h.flags & 0x3 == VhostUserMessage.version, h.flags & VhostUserMessage.replyFlag != 0 else {
            throw VhostUserError.badReply(request: name, detail: "flags 0x\(String(h.flags, radix: 16)) lack version 1 and the reply bit")
        }
        guard h.size <= 4096 else { throw VhostUserError.badReply(request: name, detail: "payload size \(h.size) is too large") }
        let payload = h.size > 0 ? try readExactly(Int(h.size), name: name, keeping: &keep) : []
        return VhostUserMessage(request: h.request, flags: h.flags, payload: payload)
    }

    // MARK: Hang-up monitor

    private func startMonitor() {
        var listenFD: Int32 = -1
        if case .server(let l) = role { listenFD = l }
        let box = Unmanaged.passRetained(MonitorBox(state: state, fd: fd, wake: wakeFD, listen: listenFD, path: path, logger: logger))
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { arg in
            let box = Unmanaged<MonitorBox>.fromOpaque(arg!).takeRetainedValue()
            box.run()
            return nil
        }, box.toOpaque())
        if rc == 0 { monitor = tid } else { box.release() }
    }

    private func stopMonitor() {
        guard let t = monitor else { return }
        var one: UInt64 = 1
        _ = Glibc.write(wakeFD, &one, 8)
        pthread_join(t, nil)
        monitor = nil
        // Empty the eventfd again, or the next monitor would stop at once.
        var v: UInt64 = 0
        _ = Glibc.read(wakeFD, &v, 8)
    }

    /// Backends refused while one was connected (server mode).
    public var refusedConnections: Int { state.refused.load(ordering: .relaxed) }



    private final class MonitorBox {
        let state: ConnectionState
        let fd: Int32, wake: Int32, listen: Int32, path: String
        let logger: Logger
        init(state: ConnectionState, fd: Int32, wake: Int32, listen: Int32, path: String, logger: Logger) {
            self.state = state; self.fd = fd; self.wake = wake; self.listen = listen; self.path = path; self.logger = logger
        }
        func run() {
            var fds = [pollfd(fd: fd, events: Int16(pollRDHUP), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: listen, events: Int16(POLLIN), revents: 0)]
            while true {
                fds[0].revents = 0; fds[1].revents = 0; fds[2].revents = 0
                let n = poll(&fds, listen >= 0 ? 3 : 2, -1)
                if n < 0 { if errno == EINTR { continue }; return }
                if fds[1].revents != 0 { return }
                if listen >= 0 && fds[2].revents & Int16(POLLIN) != 0 {
                    // Server mode: one backend at a time. A second is accepted and closed at once.
                    let c = cvio_accept_cloexec(listen)
                    if c >= 0 {
                        close(c)
                        state.refused.add(1, ordering: .relaxed)
                        logger.warning("vhost-user \(path): refused a second backend connection (one is connected)")
                    }
                }
                if fds[0].revents & Int16(POLLHUP | pollRDHUP | POLLERR) != 0 {
                    state.lost("vhost-user backend \(path) hung up")
                    return
                }
            }
        }
    }
}

/// The connection's liveness, shared by the connection and its hang-up monitor thread.
final class ConnectionState: @unchecked Sendable {
    let alive = Atomic<Bool>(true)
    let refused = Atomic<Int>(0)
    /// A new connection after a loss: alive again, no reason.
    func revive() {
        reason.withLock { $0 = nil }
        alive.store(true, ordering: .relaxed)
    }
    let reason = Mutex<String?>(nil)
    let deviceLink = Mutex<DeviceLink?>(nil)
    func lost(_ why: String) {
        reason.withLock { if $0 == nil { $0 = why } }
        alive.store(false, ordering: .relaxed)
        deviceLink.withLock { $0 }?.markDown(reason.withLock { $0 } ?? why)
    }
}
let pollRDHUP: Int32 = 0x2000  // POLLRDHUP from <poll.h> (hidden behind _GNU_SOURCE)
