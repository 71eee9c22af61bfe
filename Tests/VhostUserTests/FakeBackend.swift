import CVioLinux
import Foundation
import Synchronization
import VhostUser
import VirtioCore
import XCTest
#if canImport(Glibc)
import Glibc
#endif

// A fake vhost-user BACKEND (the device side) for driving `VhostUserConnection` over a real
// UNIX stream socket: it listens on a socket in a fresh temporary directory, accepts one
// connection on its own thread, records every message (request, flags, payload, descriptors
// received by SCM_RIGHTS) and answers from a script, with knobs that make it misbehave.

/// Request codes as plain numbers, for comparing recorded sequences.
enum Code {
    static let getFeatures: UInt32 = 1, setFeatures: UInt32 = 2, setOwner: UInt32 = 3
    static let setMemTable: UInt32 = 5, setVringNum: UInt32 = 8, setVringAddr: UInt32 = 9
    static let setVringBase: UInt32 = 10, getVringBase: UInt32 = 11, setVringKick: UInt32 = 12
    static let setVringCall: UInt32 = 13, getProtocolFeatures: UInt32 = 15
    static let setProtocolFeatures: UInt32 = 16, getQueueNum: UInt32 = 17, setVringEnable: UInt32 = 18
    static let getConfig: UInt32 = 24, setStatus: UInt32 = 39, getStatus: UInt32 = 40
    static let getInflightFD: UInt32 = 31, setInflightFD: UInt32 = 32
}

/// Feature and flag bits spelled out as numbers (so the tests do not depend on the code under test).
enum Bits {
    static let version1: UInt64 = 1 << 32
    static let inOrder: UInt64 = 1 << 35
    static let protocolFeatures: UInt64 = 1 << 30
    // VHOST_USER_PROTOCOL_F_*
    static let mq: UInt64 = 1 << 0, logShmfd: UInt64 = 1 << 1, replyAck: UInt64 = 1 << 3
    static let backendReq: UInt64 = 1 << 5, config: UInt64 = 1 << 9, resetDevice: UInt64 = 1 << 13
    static let status: UInt64 = 1 << 16
    // Header flags.
    static let version: UInt32 = 0x1, reply: UInt32 = 0x4, needReply: UInt32 = 0x8
}

/// One message as the backend received it. `fds` are the backend's own copies (closed when the
/// backend shuts down).
struct ReceivedMessage {
    var request: UInt32
    var flags: UInt32
    var payload: [UInt8]
    var fds: [Int32]

    private var message: VhostUserMessage { VhostUserMessage(request: request, flags: flags, payload: payload) }
    func u32(at offset: Int) -> UInt32? { message.u32(at: offset) }
    func u64(at offset: Int) -> UInt64? { message.u64(at: offset) }
    func u16(at offset: Int) -> UInt16? {
        offset + 2 <= payload.count ? UInt16(payload[offset]) | UInt16(payload[offset + 1]) << 8 : nil
    }
    var needsReply: Bool { flags & Bits.needReply != 0 }
}

/// How the backend misbehaves.
enum Fault: Equatable {
    /// On receiving the n-th message (1-based) close the connection without answering it.
    case closeAfter(message: Int)
    /// Answer `request` with the request code `request + 1`.
    case wrongReplyCode(UInt32)
    /// Answer `request` with flags = version only (no reply bit 2).
    case missingReplyBit(UInt32)
    /// Answer `request` with a 4-byte payload (header size 4).
    case shortPayload(UInt32)
    /// Ack `request` (when NEED_REPLY is set) with this non-zero code.
    case nack(UInt32, code: UInt64)
    /// Never answer `request` (keep reading, so the front end's receive timeout fires).
    case noReply(UInt32)
}

struct BackendScript {
    var features: UInt64 = Bits.version1 | Bits.inOrder | Bits.protocolFeatures
    var protocolFeatures: UInt64 = Bits.mq | Bits.replyAck | Bits.config | Bits.status
    var queueNum: UInt64 = 2
    var config: [UInt8] = (0..<64).map { UInt8(0xA0 &+ $0) }
    /// GET_VRING_BASE answers: ring index → base (0 when absent).
    var vringBases: [UInt32: UInt32] = [:]
    /// When set, GET_VRING_BASE replies name this ring index instead of the requested one.
    var vringBaseReplyIndex: UInt32? = nil
    /// Whether to ack (u64 0) messages that carry NEED_REPLY.
    var sendAcks = true
    var faults: [Fault] = []
    /// After a `.closeAfter` close, keep grabbing the lowest free descriptor numbers (dup of
    /// /dev/null) for `grabMilliseconds`, to catch the front end closing a number twice.
    var grabDescriptorsAfterClose = false
    var grabMilliseconds = 20
    var grabLimit = 1000
    /// Pin the backend thread to this CPU (so it runs beside, not instead of, the front end).
    var pinToCPU: Int32? = nil
    /// GET_INFLIGHT_FD: the descriptor sent with the reply and the area's size.
    var inflightFD: Int32? = nil
    var inflightSize: UInt64 = 4096
}

enum BackendError: Error { case sys(String, Int32) }

/// A fresh directory under /tmp (short, so socket paths fit in sun_path).
final class TempDirectory {
    let path: String
    init() throws {
        var template = Array("/tmp/vhu-test-XXXXXX".utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            throw BackendError.sys("mkdtemp", errno)
        }
        path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }
    func file(_ name: String) -> String { path + "/" + name }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// Calls `body` with `path` as a sockaddr_un.
func withUnixAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    precondition(bytes.count < MemoryLayout.size(ofValue: addr.sun_path), "socket path too long")
    withUnsafeMutableBytes(of: &addr.sun_path) { dst in
        for (i, b) in bytes.enumerated() { dst[i] = b }
    }
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
}

/// A UNIX socket bound at `path` but never listening (connect gets ECONNREFUSED).
func bindWithoutListening(_ path: String) throws -> Int32 {
    let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard s >= 0 else { throw BackendError.sys("socket", errno) }
    guard withUnixAddress(path, { bind(s, $0, $1) }) == 0 else {
        let e = errno; close(s); throw BackendError.sys("bind", e)
    }
    return s
}

final class FakeBackend: @unchecked Sendable {
    let directory: TempDirectory
    let socketPath: String
    let script: BackendScript
    private let listenFD: Int32
    private let stopRequested = Atomic<Bool>(false)
    private let hangUpRequested = Atomic<Bool>(false)
    private let state = Mutex<State>(State())
    private let finished = DispatchSemaphore(value: 0)
    private var isShutDown = false

    private struct State {
        var messages: [ReceivedMessage] = []
        var accepted = false
        var peerClosed = false
        var grabbed: [Int32] = []
        var status: UInt64 = 0
    }

    init(script: BackendScript = BackendScript()) throws {
        self.script = script
        directory = try TempDirectory()
        socketPath = directory.file("backend.sock")
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { directory.remove(); throw BackendError.sys("socket", errno) }
        guard withUnixAddress(socketPath, { bind(s, $0, $1) }) == 0, listen(s, 1) == 0 else {
            let e = errno; close(s); directory.remove(); throw BackendError.sys("bind/listen", e)
        }
        listenFD = s
        let thread = Thread { [self] in
            self.run()
            self.finished.signal()
        }
        thread.name = "FakeBackend"
        thread.start()
    }

    deinit { shutdown() }

    // MARK: What the test reads

    var messages: [ReceivedMessage] { state.withLock { $0.messages } }
    var requests: [UInt32] { messages.map(\.request) }
    var peerClosed: Bool { state.withLock { $0.peerClosed } }
    /// Descriptor numbers grabbed after a `.closeAfter` close, in the order dup returned them.
    var grabbedDescriptors: [Int32] { state.withLock { $0.grabbed } }

    /// Waits until at least `count` messages have arrived (or `seconds` pass); returns them.
    @discardableResult
    func waitForMessages(_ count: Int, seconds: Double = 2) -> [ReceivedMessage] {
        let deadline = Date().addingTimeInterval(seconds)
        while messages.count < count, Date() < deadline { usleep(2_000) }
        return messages
    }

    /// Waits until the backend thread has ended (connection closed by either side).
    @discardableResult
    func waitUntilFinished(seconds: Double = 3) -> Bool {
        if finished.wait(timeout: .now() + seconds) == .success { finished.signal(); return true }
        return false
    }

    /// The backend closes its end of the connection (from its own thread).
    func hangUp() { hangUpRequested.store(true, ordering: .relaxed) }

    /// Stops the thread, closes every descriptor the backend holds, removes the directory.
    func shutdown() {
        if isShutDown { return }
        isShutDown = true
        stopRequested.store(true, ordering: .relaxed)
        if finished.wait(timeout: .now() + 5) == .timedOut {
            XCTFail("fake backend thread did not stop")
            return  // leave its descriptors alone: the thread may still use them
        }
        close(listenFD)
        let (fds, grabbed) = state.withLock { s in (s.messages.flatMap(\.fds), s.grabbed) }
        for f in fds { close(f) }
        // Grabbed numbers: close each once, and only if it is still open.
        for f in Set(grabbed) where fcntl(f, F_GETFD) >= 0 { close(f) }
        directory.remove()
    }

    // MARK: The backend thread

    private var stopping: Bool { stopRequested.load(ordering: .relaxed) }

    private func run() {
        if let cpu = script.pinToCPU { _ = cvio_pin_thread(cpu) }
        var conn: Int32 = -1
        // Accept, waking up regularly to notice shutdown().
        while !stopping {
            var p = pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 20) > 0 {
                conn = accept(listenFD, nil, nil)
                if conn >= 0 { break }
            }
        }
        guard conn >= 0 else { return }
        state.withLock { $0.accepted = true }
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))

        var count = 0
        loop: while true {
            if stopping || hangUpRequested.load(ordering: .relaxed) { break }
            var p = pollfd(fd: conn, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, 20)
            if ready == 0 { continue }
            if ready < 0 { if errno == EINTR { continue }; break }
            guard let m = receive(conn) else {
                state.withLock { $0.peerClosed = true }
                break
            }
            count += 1
            state.withLock { $0.messages.append(m) }
            for f in script.faults {
                if case .closeAfter(let n) = f, n == count {
                    close(conn); conn = -1
                    if script.grabDescriptorsAfterClose { grabDescriptors() }
                    break loop
                }
            }
            respond(to: m, on: conn)
        }
        if conn >= 0 { close(conn) }
    }

    /// Reads exactly `count` bytes, collecting any descriptors. nil on EOF or error.
    private func readExactly(_ conn: Int32, _ count: Int, fds: inout [Int32]) -> [UInt8]? {
        var buf = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            var received = [Int32](repeating: -1, count: 8)
            var n: Int32 = 0
            let r = buf.withUnsafeMutableBytes { b in
                cvio_recv_with_fds(conn, b.baseAddress! + got, count - got, &received, 8, &n)
            }
            fds += received.prefix(Int(n))
            if r <= 0 { return nil }
            got += r
        }
        return buf
    }

    private func receive(_ conn: Int32) -> ReceivedMessage? {
        var fds: [Int32] = []
        guard let header = readExactly(conn, VhostUserMessage.headerSize, fds: &fds),
              let h = VhostUserMessage.decodeHeader(header) else {
            for f in fds { close(f) }
            return nil
        }
        var payload: [UInt8] = []
        if h.size > 0 {
            guard let p = readExactly(conn, Int(h.size), fds: &fds) else {
                for f in fds { close(f) }
                return nil
            }
            payload = p
        }
        return ReceivedMessage(request: h.request, flags: h.flags, payload: payload, fds: fds)
    }

    private func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
        withUnsafeBytes(of: v.littleEndian) { Array($0) }
    }

    private func respond(to m: ReceivedMessage, on conn: Int32) {
        var payload: [UInt8]
        switch m.request {
        case Code.getFeatures: payload = le(script.features)
        case Code.getProtocolFeatures: payload = le(script.protocolFeatures)
        case Code.getQueueNum: payload = le(script.queueNum)
        case Code.getStatus: payload = le(state.withLock { $0.status })
        case Code.getConfig:
            let offset = Int(m.u32(at: 0) ?? 0), size = Int(m.u32(at: 4) ?? 0)
            payload = le(UInt32(offset)) + le(UInt32(size)) + le(m.u32(at: 8) ?? 0)
            payload += (offset..<(offset + size)).map { $0 < script.config.count ? script.config[$0] : 0 }
        case Code.getInflightFD:
            payload = le(script.inflightSize) + le(UInt64(0)) + le(m.u16(at: 16) ?? 0) + le(m.u16(at: 18) ?? 0) + le(UInt32(0))
            let fds = script.inflightFD.map { [$0] } ?? []
            let bytes = le(m.request) + le(Bits.version | Bits.reply) + le(UInt32(payload.count)) + payload
            _ = bytes.withUnsafeBytes { b in fds.withUnsafeBufferPointer { cvio_send_with_fds(conn, b.baseAddress, b.count, $0.baseAddress, Int32(fds.count)) } }
            return
        case Code.getVringBase:
            let index = m.u32(at: 0) ?? 0
            payload = le(script.vringBaseReplyIndex ?? index) + le(script.vringBases[index] ?? 0)
        default:
            if m.request == Code.setStatus { state.withLock { $0.status = m.u64(at: 0) ?? 0 } }
            guard m.needsReply, script.sendAcks else { return }
            var code: UInt64 = 0
            for case let .nack(r, c) in script.faults where r == m.request { code = c }
            payload = le(code)
        }
        var request = m.request
        var flags = Bits.version | Bits.reply
        for f in script.faults {
            switch f {
            case .noReply(let r) where r == m.request: return
            case .wrongReplyCode(let r) where r == m.request: request = r + 1
            case .missingReplyBit(let r) where r == m.request: flags = Bits.version
            case .shortPayload(let r) where r == m.request: payload = Array(payload.prefix(4))
            default: break
            }
        }
        let bytes = le(request) + le(flags) + le(UInt32(payload.count)) + payload
        _ = bytes.withUnsafeBytes { cvio_send_with_fds(conn, $0.baseAddress, $0.count, nil, 0) }
    }

    /// Catches descriptor numbers that someone else frees, and notices when one of them is
    /// freed again while we hold it (a double close elsewhere in the process). dup() always
    /// returns the lowest free number: first hold a few to fill the holes below the frontier,
    /// then probe the frontier (dup and give back) and keep any number below it, which can only
    /// be one that was just closed. A number kept twice was closed under us.
    private func grabDescriptors() {
        let devnull = open("/dev/null", O_RDONLY | O_CLOEXEC)
        guard devnull >= 0 else { return }
        var grabbed: [Int32] = []
        grabbed.reserveCapacity(script.grabLimit)
        for _ in 0..<64 { let d = dup(devnull); if d >= 0 { grabbed.append(d) } }
        var probe = dup(devnull)
        if probe >= 0 { close(probe) }
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(script.grabMilliseconds) * 1_000_000
        while grabbed.count < script.grabLimit, DispatchTime.now().uptimeNanoseconds < deadline {
            let d = dup(devnull)
            if d < 0 { break }
            if d < probe { grabbed.append(d); continue }  // freed by someone else just now: keep it
            close(d)
            probe = d  // the frontier (it moves up if another thread took the old one)
        }
        close(devnull)
        state.withLock { $0.grabbed = grabbed }
    }
}

// MARK: Descriptors and memory for the tests

/// (device, inode) of the file behind `fd`: the same for every copy of a descriptor.
func fileIdentity(_ fd: Int32) -> [UInt64]? {
    var st = stat()
    guard fstat(fd, &st) == 0 else { return nil }
    return [UInt64(st.st_dev), UInt64(st.st_ino)]
}

/// What /proc says `fd` is, e.g. "anon_inode:[eventfd]" or "/memfd:vhu-r0 (deleted)".
func descriptorTarget(_ fd: Int32) -> String {
    var buf = [CChar](repeating: 0, count: 256)
    let n = readlink("/proc/self/fd/\(fd)", &buf, buf.count - 1)
    guard n > 0 else { return "" }
    return buf.withUnsafeBufferPointer { b in
        String(decoding: b.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Reads an eventfd counter without blocking (the front end's eventfds are non-blocking);
/// nil when it is zero.
func readEventCounter(_ fd: Int32) -> UInt64? {
    var value: UInt64 = 0
    return read(fd, &value, 8) == 8 ? value : nil
}

/// Shared memory for a region: a memfd of `fileSize` bytes mapped from `fileOffset`.
final class MemfdRegion {
    let fd: Int32
    let base: UnsafeMutableRawPointer
    let size: Int
    let fileOffset: Int

    init(name: String, fileSize: Int, fileOffset: Int = 0) throws {
        let f = cvio_memfd(name)
        guard f >= 0 else { throw BackendError.sys("memfd", errno) }
        guard ftruncate(f, off_t(fileSize)) == 0 else { let e = errno; close(f); throw BackendError.sys("ftruncate", e) }
        let mapped = mmap(nil, fileSize - fileOffset, PROT_READ | PROT_WRITE, MAP_SHARED, f, off_t(fileOffset))
        guard let mapped, mapped != MAP_FAILED else { let e = errno; close(f); throw BackendError.sys("mmap", e) }
        fd = f; base = mapped; size = fileSize - fileOffset; self.fileOffset = fileOffset
    }
    deinit { munmap(base, size); close(fd) }

    var address: UInt64 { UInt64(UInt(bitPattern: base)) }
    var region: MemoryRegion { MemoryRegion(address: address, size: UInt64(size), fd: fd, fileOffset: UInt64(fileOffset)) }
}

/// Maps `length` bytes of `fd` at `offset` (as a backend would) and returns them.
func bytesThroughMapping(fd: Int32, offset: UInt64, length: Int) -> [UInt8]? {
    let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
    let aligned = offset & ~(page - 1), skip = Int(offset - aligned)
    guard let p = mmap(nil, length + skip, PROT_READ, MAP_SHARED, fd, off_t(aligned)), p != MAP_FAILED else { return nil }
    defer { munmap(p, length + skip) }
    return Array(UnsafeRawBufferPointer(start: p + skip, count: length))
}

/// Polls `condition` every 5 ms until it holds or `seconds` pass.
func eventually(within seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while !condition() {
        if Date() >= deadline { return false }
        usleep(5_000)
    }
    return true
}
