import CFuzzShim
import FuzzSupport
import VhostUser
import VirtioCore
#if canImport(Glibc)
import Glibc
#endif

// vhost-reply: VhostUserConnection against a backend whose every word is the fuzz input.
//
// Input: byte 0 = what the front end does after the handshake (see `exercise`), the rest = all
// the bytes the backend sends, written at once when the front end connects. The backend then
// only reads; it closes its sending side (EOF) as soon as the front end asks for something the
// input has no more bytes for, so a short input ends at once instead of in a reply timeout (and
// the front end's hang-up monitor sees the hang-up only where the input runs out). Thrown errors are fine;
// a trap, a hang (libFuzzer -timeout) or a leak (memory: LeakSanitizer; descriptors and
// threads: counted around every input) is a bug.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    var input = FuzzInput(data, size)
    let control = input.u8()
    let stream = input.rest()
    _ = (Backend.listenFD, Backend.regionFD)
    let before = ProcessResources.now()
    let backend = Backend.start(sending: stream)
    do {
        let c = try VhostUserConnection(path: Backend.path, replyTimeoutSeconds: 1)
        try exercise(c, control)
        verbose("vhost-reply: control 0x\(String(control, radix: 16)): every step done, stopped at \(c.stoppedBases ?? [])")
    } catch {
        // Any error is fine: the backend said something wrong or went away.
        verbose("vhost-reply: control 0x\(String(control, radix: 16)): \(error)")
    }
    // The connection is gone (its socket closed), so the backend reads EOF and ends.
    backend.join()
    let late = ProcessResources.now()
    let (settled, after, waited) = ProcessResources.settled(at: before)
    invariant(settled, "the input leaked: \(before) before, \(after) after (waited \(waited) ms)")
    // The connection closes its descriptors in its deinit, on the thread that let go of it
    // (the hang-up monitor holds only the shared state, never the connection): all are back
    // at once, not a moment later on another thread.
    if late != before { verbose("vhost-reply: resources came back \(waited) ms late: \(before) before, \(late) at once") }
    invariant(late.descriptors == before.descriptors,
              "the connection was released late, on another thread: \(before) before, \(late) right after the input")
    return 0
}

/// What a driver does with a connected backend, as far as `control` says, stopping at the
/// first error (as the devices do).
func exercise(_ c: VhostUserConnection, _ control: UInt8) throws {
    let queues = 1 + Int(control & 3)
    if control & 0x04 != 0 {
        // A net device's config space (MAC, status, pairs, MTU) or a blk one (60 bytes).
        let count = control & 0x80 != 0 ? 60 : 12
        if let bytes = try? c.readConfig(offset: 0, count: count) {
            invariant(bytes.count == count, "readConfig(\(count)) returned \(bytes.count) bytes")
        }
    }
    // A subset of what the device offers (negotiate's contract), sometimes everything.
    let features = control & 0x08 != 0 ? c.deviceFeatures
        : c.deviceFeatures.intersection([.version1, .inOrder, .ringPacked, .eventIndex, .indirectDescriptors])
    try c.negotiate(features, queueCount: queues, queuesPerUnit: control & 0x10 != 0 ? 2 : 1)
    invariant(c.negotiatedFeatures == features, "negotiated \(c.negotiatedFeatures), asked for \(features)")
    try c.setMemory([MemoryRegion(address: 0x7f00_0000_0000, size: 1 << 21, fd: Backend.regionFD, fileOffset: 0)])
    for round in 0..<(control & 0x40 != 0 ? 2 : 1) {
        for i in 0..<queues {
            let base: UInt64 = 0x7f00_0000_0000 + UInt64(i) << 16
            try c.setupQueue(i, addresses: QueueAddresses(size: 256, desc: base, avail: base + 4096, used: base + 8192,
                                                          base: round == 0 ? 0 : c.stoppedBases?[i] ?? 0))
        }
        try c.start()
        if control & 0x20 != 0 {
            c.notify(queue: queues - 1)
            try c.setQueueEnabled(queues - 1, false)
        }
        try c.stop()
        if let bases = c.stoppedBases {
            invariant(bases.count == queues, "stop reported \(bases.count) ring bases for \(queues) rings")
        }
    }
    _ = c.isConnected
    _ = c.disconnectReason
}

/// The fake backend: one listening socket for the process; one thread per input that accepts
/// the front end, sends the input's bytes, then reads what the front end sends.
final class Backend {
    static let directory = ScratchDirectory.make("vio-fuzz-vhu")
    static let path = directory + "/b.sock"
    static let listenFD: Int32 = {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { fatalError("socket: errno \(errno)") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        precondition(bytes.count < MemoryLayout.size(ofValue: addr.sun_path), "socket path too long: \(path)")
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in for (i, b) in bytes.enumerated() { dst[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, listen(s, 4) == 0 else { fatalError("bind/listen \(path): errno \(errno)") }
        return s
    }()
    /// A descriptor to pass as the memory region's file (the backend closes what it receives).
    static let regionFD: Int32 = open("/dev/null", O_RDONLY | O_CLOEXEC)

    let stream: [UInt8]
    var thread = pthread_t()

    private init(stream: [UInt8]) { self.stream = stream }

    static func start(sending stream: [UInt8]) -> Backend {
        _ = listenFD
        let b = Backend(stream: stream)
        let box = Unmanaged.passRetained(b)
        let rc = pthread_create(&b.thread, nil, { arg in
            let b = Unmanaged<Backend>.fromOpaque(arg!).takeRetainedValue()
            b.serve()
            return nil
        }, box.toOpaque())
        guard rc == 0 else { fatalError("pthread_create: \(rc)") }
        return b
    }

    func join() { pthread_join(thread, nil) }

    private func serve() {
        // The front end has connected by the time it waits for its first reply; give it time.
        var pfd = pollfd(fd: Self.listenFD, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 5000) == 1 else { return }
        let s = accept(Self.listenFD, nil, nil)
        guard s >= 0 else { return }
        defer { close(s) }
        // A front end that keeps the socket open after its object is gone would hang here;
        // libFuzzer's -timeout reports that. The receive timeout only keeps the harness alive.
        var tv = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var sent = 0
        while sent < stream.count {
            let n = stream.withUnsafeBytes { fuzz_send(s, $0.baseAddress! + sent, stream.count - sent) }
            if n <= 0 { return }
            sent += n
        }
        // Read messages; the first one that wants an answer gets EOF instead.
        var shut = false
        var header = [UInt8](repeating: 0, count: 12)
        while true {
            guard readExactly(s, &header, 12) else { return }
            let request = le32(header, 0), flags = le32(header, 4), size = Int(le32(header, 8))
            if size > 0 {
                var payload = [UInt8](repeating: 0, count: min(size, 1 << 16))
                guard readExactly(s, &payload, payload.count) else { return }
            }
            let wantsReply = flags & 0x8 != 0 || [1, 11, 15, 17, 24, 40].contains(request)
            if wantsReply && !shut {
                shutdown(s, Int32(SHUT_WR))
                shut = true
            }
        }
    }

    private func readExactly(_ s: Int32, _ buf: inout [UInt8], _ count: Int) -> Bool {
        var got = 0
        while got < count {
            let n = buf.withUnsafeMutableBytes { fuzz_recv_closing_fds(s, $0.baseAddress! + got, count - got) }
            if n <= 0 { return false }
            got += n
        }
        return true
    }

    private func le32(_ b: [UInt8], _ o: Int) -> UInt32 {
        UInt32(b[o]) | UInt32(b[o + 1]) << 8 | UInt32(b[o + 2]) << 16 | UInt32(b[o + 3]) << 24
    }
}
