import CVioLwIP
import Synchronization
import DPDK
import VirtioNet

/// How the stack's one interface is configured.
public struct NetStackConfig: Sendable {
    /// Address and prefix, e.g. 198.18.0.2/24.
    public var interface: IPv4Interface
    public var gateway: IPv4Address?
    /// 576...9000. Every frame is one mbuf, so the port's pool must hold mtu + 14 bytes after
    /// its headroom. Over 1500, a connection whose peer's SYN offers a larger MSS sends segments
    /// of up to mtu - 40 bytes (liblwip itself stops at 1460).
    public var mtu = 1500
    /// Frames received per poll.
    public var burst = 32
    /// Outgoing frames that can wait for the TX ring (produced by lwIP between two flushes).
    public var txStagingCapacity = 4096
    /// TCP keep-alive idle time for accepted connections, in milliseconds (0: off).
    public var keepAliveIdleMilliseconds: UInt32 = 60_000
    /// How often `onTick` runs, in milliseconds.
    public var tickMilliseconds = 100

    public init(interface: IPv4Interface, gateway: IPv4Address? = nil) {
        self.interface = interface
        self.gateway = gateway
    }
}

public enum NetStackError: Error, CustomStringConvertible {
    /// lwIP keeps global state: one stack per process.
    case alreadyStarted
    case invalidMTU(Int)
    case poolTooSmallForMTU(mtu: Int, dataRoom: Int)
    case listenFailed(port: UInt16, lwipError: Int32)

    public var description: String {
        switch self {
        case .alreadyStarted: return "a NetStack already runs in this process (lwIP has one global stack)"
        case .invalidMTU(let m): return "MTU \(m) must be 576...9000"
        case let .poolTooSmallForMTU(m, room):
            return "MTU \(m) needs mbufs with \(m + 14 + 128) bytes of data room (a frame per mbuf after 128 of headroom); the pool's are \(room)"
        case let .listenFailed(port, e): return "cannot listen on TCP port \(port): \(lwipErrorName(e))"
        }
    }
}

/// lwIP's `err_t` values by name (lwip/err.h).
public func lwipErrorName(_ e: Int32) -> String {
    let names = [0: "ERR_OK", -1: "ERR_MEM (out of memory)", -2: "ERR_BUF", -3: "ERR_TIMEOUT", -4: "ERR_RTE (no route)",
                 -5: "ERR_INPROGRESS", -6: "ERR_VAL (illegal value)", -7: "ERR_WOULDBLOCK", -8: "ERR_USE (address in use)",
                 -9: "ERR_ALREADY", -10: "ERR_ISCONN", -11: "ERR_CONN (not connected)", -12: "ERR_IF",
                 -13: "ERR_ABRT (aborted)", -14: "ERR_RST (reset)", -15: "ERR_CLSD (closed)", -16: "ERR_ARG"]
    return names[Int(e)] ?? "lwIP error \(e)"
}

/// Counters of the TCP/IP glue (frames in and out of lwIP, connections, bytes).
public struct StackCounters: Codable, Sendable, Equatable {
    public var rxFrames: UInt64, rxBytes: UInt64, rxDropped: UInt64, rxNoPbuf: UInt64
    public var txFrames: UInt64, txBytes: UInt64, txNoBuffer: UInt64, txTooBig: UInt64
    /// Frames lwIP produced that the TX ring did not take before the staging area filled.
    public var txStagingDrops: UInt64
    public var accepted: UInt64, acceptFailed: UInt64, activeConnections: UInt64, closed: UInt64
    public var aborted: UInt64, resetByPeer: UInt64, connectionErrors: UInt64
    public var bytesRead: UInt64, bytesWritten: UInt64, writeWouldBlock: UInt64
    /// Of `txFrames`, those lwIP's own tcpip thread produced (timers: retransmits, window
    /// probes, delayed ACKs, keep-alive), which the next poll sends.
    public var txTimerFrames: UInt64
    /// lwIP's allocations served from this executable's free lists, fresh from malloc, or too
    /// large for a list (fastpath.c), and which of fastpath.c's replacements lwIP has called
    /// (bit 0 the checksum, bit 1 the allocator; 3 when both are bound in place of liblwip's).
    public var allocFromList: UInt64, allocFromMalloc: UInt64, allocLarge: UInt64
    public var fastpathActive: Int
    /// Connections that send segments over 1460 bytes (MTU over 1500, and the peer's SYN offered
    /// it), and the largest MSS among them.
    public var largeMSSConnections: UInt64, largestMSS: UInt64

    init(_ s: vlw_stats, stagingDrops: UInt64) {
        rxFrames = s.rx_frames; rxBytes = s.rx_bytes; rxDropped = s.rx_dropped; rxNoPbuf = s.rx_no_pbuf
        txFrames = s.tx_frames; txBytes = s.tx_bytes; txNoBuffer = s.tx_no_buffer; txTooBig = s.tx_too_big
        txStagingDrops = stagingDrops
        accepted = s.accepted; acceptFailed = s.accept_failed; activeConnections = s.active; closed = s.closed
        aborted = s.aborted; resetByPeer = s.reset_by_peer; connectionErrors = s.errors
        bytesRead = s.bytes_read; bytesWritten = s.bytes_written; writeWouldBlock = s.write_would_block
        txTimerFrames = s.tx_timer_frames
        largeMSSConnections = s.large_mss_connections; largestMSS = s.largest_mss
        let f = vlw_fastpath_get_stats()
        allocFromList = f.from_list; allocFromMalloc = f.from_malloc; allocLarge = f.large
        fastpathActive = Int(vlw_fastpath_active())
    }
}

/// A TCP/IP stack (lwIP) on one virtio-net port, driven by the dataplane thread's poll loop.
///
/// `poll(_:)` receives a burst from the port, copies each frame into an lwIP pbuf and feeds it to
/// `ethernet_input` under lwIP's core lock, hands the connection events lwIP's callbacks recorded
/// to their handlers (still under the lock), and sends the frames lwIP produced (copied into mbufs
/// by the glue's linkoutput) in one TX burst. lwIP's own tcpip thread runs only timers
/// (retransmits, delayed ACKs, keep-alive, ARP); frames it produces wait in the same staging
/// area for the next poll. Every `TCPListener`/`TCPConnection` call belongs on the dataplane
/// thread, inside a handler that `poll` runs (or `listen`, which takes the lock itself).
public final class NetStack {
    public let config: NetStackConfig
    public let mac: EthernetAddress
    let pool: PacketPool
    let burst: Int
    let rxBufs: UnsafeMutablePointer<Mbuf>
    /// Frames lwIP produced, waiting for `txBurst`. Touched only with the core lock held.
    let txStage: UnsafeMutablePointer<Mbuf>
    var txCount = 0
    var stagingDrops: UInt64 = 0
    /// A frame spread over several mbufs is gathered here first.
    let gather: UnsafeMutableRawPointer
    static let gatherSize = 16384
    var listeners: [TCPListener] = []
    /// True while `poll` holds the core lock and runs handlers.
    public private(set) var inPoll = false
    /// The port's counters as of the last poll.
    public private(set) var driverCounters = NetCounters()
    /// TSC cycles of the turns that had work (frames, connection events, the loop's tasks and
    /// timers, ticks): what serving costs the dataplane lcore, as opposed to empty polls.
    public var busyCycles: UInt64 { busy.load(ordering: .relaxed) }
    let busy = Atomic<UInt64>(0)
    /// The turns `busyCycles` counts.
    public var busyTurns: UInt64 { busyTurnCount.load(ordering: .relaxed) }
    let busyTurnCount = Atomic<UInt64>(0)
    /// Turns that had work (an idle loop compares it across turns).
    public private(set) var turnsWithWork: UInt64 = 0
    /// Frames lwIP's timer thread staged or connection events wait: poll again before sleeping.
    public var hasPendingWork: Bool { vlw_work_pending() != 0 }

    /// A sleeping dataplane thread is woken through `fd` (an eventfd) when lwIP's own thread
    /// makes work for it (a frame from a timer, a connection event).
    public func setWakeDescriptor(_ fd: Int32) { vlw_set_wake_fd(fd) }
    /// Announces a sleep: false when work already waits (poll instead). `endSleep()` after.
    public func prepareToSleep() -> Bool { vlw_prepare_sleep() != 0 }
    public func endSleep() { vlw_end_sleep() }
    /// TSC cycles until the next `onTick`.
    public var cyclesUntilTick: UInt64 { let now = TSC.now(); return nextTick > now ? nextTick - now : 0 }
    /// Runs every `config.tickMilliseconds` inside `poll` (timeouts of the layers above).
    public var onTick: (() -> Void)?
    let tickCycles: UInt64
    var nextTick: UInt64

    /// Starts lwIP (once per process) with the port's MAC address and `config`'s address.
    public init<Port: PacketPort & ~Copyable>(port: borrowing Port, config: NetStackConfig) throws {
        guard (576...9000).contains(config.mtu) else { throw NetStackError.invalidMTU(config.mtu) }
        guard port.pool.dataRoom >= config.mtu + 14 + 128 else {
            throw NetStackError.poolTooSmallForMTU(mtu: config.mtu, dataRoom: port.pool.dataRoom)
        }
        self.config = config
        mac = port.mac
        pool = port.pool
        burst = max(1, min(config.burst, 512))
        rxBufs = .allocate(capacity: burst)
        txStage = .allocate(capacity: config.txStagingCapacity)
        spare = .allocate(capacity: Self.spareBatch)
        gather = .allocate(byteCount: Self.gatherSize, alignment: 64)
        tickCycles = max(1, TSC.hz / 1000 * UInt64(max(1, config.tickMilliseconds)))
        nextTick = TSC.now() &+ tickCycles
        let mac = port.mac.array
        let alloc: vlw_tx_alloc_fn = { ctx, len in
            Unmanaged<NetStack>.fromOpaque(ctx!).takeUnretainedValue().stageFrame(len)
        }
        let rc = mac.withUnsafeBufferPointer {
            vlw_start($0.baseAddress, config.interface.address.networkOrder, config.interface.netmask.networkOrder,
                      config.gateway?.networkOrder ?? 0, UInt16(config.mtu), alloc,
                      Unmanaged.passUnretained(self).toOpaque())
        }
        // The stack lives for the process (lwIP cannot be stopped): keep `self` alive with it.
        guard rc == 0 else { throw NetStackError.alreadyStarted }
        _ = Unmanaged.passRetained(self)
    }

    /// Fresh mbufs for `stageFrame`, taken from the pool `spareBatch` at a time: one bulk
    /// allocation resets their headers together (the header of an mbuf that has been round a
    /// 1024-deep ring is out of cache) instead of one miss per frame. Core lock held.
    let spare: UnsafeMutablePointer<Mbuf>
    var spareCount = 0
    static let spareBatch = 32

    @inline(__always) func takeMbuf() -> Mbuf? {
        if spareCount == 0 {
            guard pool.allocate(spare, count: Self.spareBatch) else { return pool.allocate() }
            spareCount = Self.spareBatch
        }
        spareCount &-= 1
        return spare[spareCount]
    }

    /// linkoutput's buffer: a fresh mbuf appended to the staging area (core lock held; on the
    /// dataplane thread or lwIP's timer thread).
    func stageFrame(_ len: UInt16) -> UnsafeMutableRawPointer? {
        guard !detached, txCount < config.txStagingCapacity, let m = takeMbuf() else { stagingDrops &+= 1; return nil }
        m.dataLength = len
        m.packetLength = UInt32(len)
        txStage[txCount] = m
        txCount &+= 1
        return m.data
    }

    /// Listens on a TCP port; `onAccept` runs inside `poll` for each new connection (set the
    /// connection's `onEvent` there).
    public func listen(port: UInt16, backlog: Int = 128, onAccept: @escaping (TCPConnection) -> Void) throws -> TCPListener {
        if !inPoll { vlw_lock() }
        defer { if !inPoll { vlw_unlock() } }
        var err: Int32 = 0
        guard let raw = vlw_listen(port, Int32(backlog), config.keepAliveIdleMilliseconds, &err) else {
            throw NetStackError.listenFailed(port: port, lwipError: err)
        }
        let l = TCPListener(raw: raw, port: port, onAccept: onAccept)
        vlw_listener_set_user(raw, Unmanaged.passUnretained(l).toOpaque())
        listeners.append(l)
        return l
    }

    /// The port is going away: from now on frames lwIP produces (its timer thread keeps running
    /// for the life of the process) are dropped instead of taking mbufs from the port's pool.
    /// The frames still staged and the spare mbufs go back to the pool.
    public func detach() {
        if !inPoll { vlw_lock() }
        detached = true
        freeBulk(txStage, count: txCount)
        txCount = 0
        vlw_set_tx_pending(0)
        freeBulk(spare, count: spareCount)
        spareCount = 0
        if !inPoll { vlw_unlock() }
    }
    var detached = false

    /// Stops accepting on `listener` (connections already accepted go on).
    public func close(_ listener: TCPListener) {
        guard let raw = listener.raw else { return }
        if !inPoll { vlw_lock() }
        vlw_listener_close(raw)
        if !inPoll { vlw_unlock() }
        listener.raw = nil
        listeners.removeAll { $0 === listener }
    }

    /// Counters of the glue; read on the dataplane thread.
    public var counters: StackCounters {
        if !inPoll { vlw_lock() }
        defer { if !inPoll { vlw_unlock() } }
        return StackCounters(vlw_get_stats(), stagingDrops: stagingDrops)
    }

    /// One turn of the loop: receive, run the stack and the handlers, send. Returns the frames
    /// received. Takes the core lock only when there is something to do.
    @discardableResult
    public func poll<Port: PacketPort & ~Copyable>(_ port: inout Port) -> Int {
        poll(&port, work: NoTurnWork())
    }

    /// One turn that also runs `work` (an event loop's tasks and timers) inside the lock, after
    /// the connection events and before the frames go out, when `work.hasWork` says there is some.
    @discardableResult
    public func poll<Port: PacketPort & ~Copyable, Work: NetStackTurnWork>(_ port: inout Port, work: Work) -> Int {
        let now = TSC.now()
        let n = port.rxBurst(rxBufs, max: burst)
        let tick = now >= nextTick
        let hasWork = work.hasWork
        guard n > 0 || tick || hasWork || vlw_work_pending() != 0 else { return 0 }
        turnsWithWork &+= 1
        vlw_lock()
        inPoll = true
        for i in 0..<n {
            let m = rxBufs[i]
            if m.segmentCount == 1 {
                _ = vlw_input(m.data, m.dataLength)
            } else if m.packetLength <= UInt32(Self.gatherSize) {
                var off = 0
                var seg: Mbuf? = m
                while let s = seg { (gather + off).copyMemory(from: s.data, byteCount: Int(s.dataLength)); off += Int(s.dataLength); seg = s.next }
                _ = vlw_input(gather, UInt16(off))
            }
        }
        driverCounters = port.counters
        var events = dispatch()
        if hasWork {
            work.runWork()
            events &+= dispatch()   // what the work's writes and closes made lwIP report
        }
        if tick {
            nextTick = now &+ tickCycles
            onTick?()
        }
        let sent = flushTX(&port)
        inPoll = false
        vlw_unlock()
        freeBulk(rxBufs, count: n)
        // Busy: the turn moved something. A turn that only found the TX ring still full is a
        // wait for the device, not work, and is not counted.
        if n > 0 || sent > 0 || events > 0 || hasWork || tick {
            busy.store(busy.load(ordering: .relaxed) &+ (TSC.now() &- now), ordering: .relaxed)
            busyTurnCount.store(busyTurnCount.load(ordering: .relaxed) &+ 1, ordering: .relaxed)
        }
        return n
    }

    /// Sends the staged frames; what the ring does not take waits for the next poll.
    @discardableResult
    func flushTX<Port: PacketPort & ~Copyable>(_ port: inout Port) -> Int {
        guard txCount > 0 else { vlw_set_tx_pending(0); return 0 }
        let sent = port.txBurst(txStage, count: txCount)
        if sent > 0, sent < txCount {
            (txStage).update(from: txStage + sent, count: txCount - sent)
        }
        txCount -= sent
        vlw_set_tx_pending(txCount > 0 ? 1 : 0)
        return sent
    }

    /// Hands each connection with events to its handler.
    @discardableResult
    func dispatch() -> Int {
        var ev: UInt32 = 0
        var count = 0
        while let c = vlw_next_ready(&ev) {
            count &+= 1
            let events = TCPEvents(rawValue: ev)
            if let u = vlw_conn_user(c) {
                Unmanaged<TCPConnection>.fromOpaque(u).takeUnretainedValue().deliver(events)
                continue
            }
            // A new connection the application has not seen.
            guard let lu = vlw_conn_listener_user(c) else { vlw_conn_abort(c); continue }
            let listener = Unmanaged<TCPListener>.fromOpaque(lu).takeUnretainedValue()
            let conn = TCPConnection(raw: c, stack: self)
            conn.localPort = listener.port
            vlw_conn_set_user(c, Unmanaged.passRetained(conn).toOpaque())
            listener.onAccept(conn)
            if !conn.isClosed { conn.deliver(events) }
        }
        return count
    }

    /// Polls until `keepGoing` returns false (checked every 1024 turns).
    public func run<Port: PacketPort & ~Copyable>(_ port: inout Port, while keepGoing: () -> Bool) {
        var turns = 0
        while true {
            poll(&port)
            turns &+= 1
            if turns & 1023 == 0, !keepGoing() { return }
        }
    }
}

/// Work that runs inside a `NetStack.poll` turn with the core lock held (so it may use
/// connections), e.g. an event loop's tasks and timers.
public protocol NetStackTurnWork {
    /// Whether this turn has work; read without the lock, once per turn.
    var hasWork: Bool { get }
    func runWork()
}

struct NoTurnWork: NetStackTurnWork {
    @inline(__always) var hasWork: Bool { false }
    func runWork() {}
}

/// A listening TCP socket.
public final class TCPListener {
    var raw: OpaquePointer?
    public let port: UInt16
    let onAccept: (TCPConnection) -> Void
    init(raw: OpaquePointer, port: UInt16, onAccept: @escaping (TCPConnection) -> Void) {
        self.raw = raw
        self.port = port
        self.onAccept = onAccept
    }
}

/// What happened to a connection since its handler last ran.
public struct TCPEvents: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let accepted = TCPEvents(rawValue: UInt32(VLW_EV_NEW))
    public static let readable = TCPEvents(rawValue: UInt32(VLW_EV_READABLE))
    public static let writable = TCPEvents(rawValue: UInt32(VLW_EV_WRITABLE))
    public static let peerClosed = TCPEvents(rawValue: UInt32(VLW_EV_PEER_CLOSED))
    public static let failed = TCPEvents(rawValue: UInt32(VLW_EV_ERROR))
}

/// An accepted TCP connection. Reads and writes never block: `read` returns what has arrived,
/// `write` takes what the send buffer has room for (backpressure) and the handler runs again
/// with `.writable` when acknowledgements make room. The stack keeps the connection alive
/// until `close()` or `abort()`; a connection that failed is closed after its handler ran.
public final class TCPConnection {
    var raw: OpaquePointer?
    unowned let stack: NetStack
    public let remoteAddress: IPv4Address
    public let remotePort: UInt16
    /// The listening port it was accepted on.
    public internal(set) var localPort: UInt16 = 0
    /// Runs inside `poll` with the events since the last call.
    public var onEvent: ((TCPConnection, TCPEvents) -> Void)?
    var wrote = false

    init(raw: OpaquePointer, stack: NetStack) {
        self.raw = raw
        self.stack = stack
        remoteAddress = IPv4Address(networkOrder: vlw_conn_remote_ip(raw))
        remotePort = vlw_conn_remote_port(raw)
    }

    func deliver(_ events: TCPEvents) {
        onEvent?(self, events)
        guard let raw else { return }
        if wrote { wrote = false; vlw_conn_flush(raw) }
        if vlw_conn_state(raw) & UInt32(VLW_EV_ERROR) != 0 { close() }
    }

    @inline(__always) func checkThread() {
        precondition(stack.inPoll, "TCPConnection is used outside NetStack.poll (the dataplane thread's handlers)")
    }

    public var isClosed: Bool { raw == nil }
    /// Bytes received and not read yet.
    public var readableBytes: Int { raw.map { vlw_conn_readable($0) } ?? 0 }
    /// Bytes `write` would take now. When it is 0, the handler runs again with `.writable` once
    /// acknowledgements make room.
    public var writableBytes: Int { raw.map { vlw_conn_writable($0) } ?? 0 }
    /// The peer sent FIN: after the buffered bytes, nothing more will arrive.
    public var isPeerClosed: Bool { raw.map { vlw_conn_state($0) & UInt32(VLW_EV_PEER_CLOSED) != 0 } ?? true }
    /// Reset by the peer or aborted by the stack (the reason is `failure`).
    public var isFailed: Bool { raw.map { vlw_conn_state($0) & UInt32(VLW_EV_ERROR) != 0 } ?? false }
    public var failure: String? {
        guard let raw, vlw_conn_state(raw) & UInt32(VLW_EV_ERROR) != 0 else { return nil }
        return lwipErrorName(vlw_conn_error(raw))
    }

    /// Copies up to `buffer.count` received bytes; returns how many (0: nothing buffered).
    public func read(into buffer: UnsafeMutableRawBufferPointer) -> Int {
        checkThread()
        guard let raw, let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        return vlw_conn_read(raw, base, buffer.count)
    }

    /// Queues bytes to send; returns how many were taken (fewer than offered when the send buffer
    /// is full; -1 when the connection is gone). Data goes out when the handler returns.
    public func write(_ bytes: UnsafeRawBufferPointer) -> Int {
        checkThread()
        guard let raw else { return -1 }
        guard let base = bytes.baseAddress, bytes.count > 0 else { return 0 }
        let n = vlw_conn_write(raw, base, bytes.count)
        if n > 0 { wrote = true }
        return n
    }

    /// Sends queued bytes now rather than when the handler returns.
    public func flush() {
        checkThread()
        if let raw { wrote = false; vlw_conn_flush(raw) }
    }

    /// Half-close: FIN after the queued bytes; receiving goes on. Returns nil, or the lwIP
    /// error's name when the connection could not be shut down (it is gone).
    @discardableResult
    public func shutdownOutput() -> String? {
        checkThread()
        guard let r = raw else { return lwipErrorName(-11) }
        if wrote { wrote = false; vlw_conn_flush(r) }
        let e = vlw_conn_shutdown_write(r)
        return e == 0 ? nil : lwipErrorName(e)
    }

    /// The lwIP error that ended the connection (0: none; -15 ERR_CLSD is an orderly end).
    public var errorCode: Int32 { raw.map { vlw_conn_error($0) } ?? 0 }

    /// Closes gracefully (FIN after the queued bytes). The handler is dropped.
    public func close() {
        checkThread()
        guard let r = raw else { return }
        if wrote { vlw_conn_flush(r) }
        raw = nil
        onEvent = nil
        vlw_conn_close(r)
        Unmanaged.passUnretained(self).release()   // the stack's reference
    }

    /// Resets the connection (RST).
    public func abort() {
        checkThread()
        guard let r = raw else { return }
        raw = nil
        onEvent = nil
        vlw_conn_abort(r)
        Unmanaged.passUnretained(self).release()
    }
}
