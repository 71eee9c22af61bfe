// hostile-device: the test suite's own vhost-user device (the backend), for net and blk, split and
// packed. It listens on a UNIX socket, serves one front end (vio), maps the memory table at the
// front end's own addresses (so descriptor addresses are pointers here too) and runs real
// traffic with the ring models of VirtioTestSupport — net echoes every frame it is sent back to
// the same queue pair, blk is a RAM disk — until a fault given on the command line makes it
// misbehave, after `--after N` frames or requests:
//
//   hostile-device --socket PATH --type net|blk [--packed] [--queues N] [--after N]
//                  [--fault NAME[=VALUE]] ...
//
// Control-plane faults: queue-num=V (GET_QUEUE_NUM reply), no-reply=CODE (never answer that
// request), vring-base=garbage|short|none (the reply to GET_VRING_BASE), hangup-on=CODE (close the
// connection on receiving that request). blk config: capacity=V, seg-max=V, size-max=V,
// blk-size=V, num-queues=V (offers VIRTIO_BLK_F_MQ). Data-path faults (at the N-th frame or
// request, N = --after, counted from 0): stop (complete nothing from there on), lose (never
// complete that one), status=V|none (blk: that status byte, or none written and length 0),
// used-id=V, used-len=V, used-idx-jump (split: the used index moves by more than the ring),
// num-buffers=V (net: that num_buffers in the RX header), hangup (close the connection).
//
// It prints what it does on stdout (a test reads it on failure) and exits when the front end hangs up.

import CVioLinux
import VhostUser
import VirtioCore
import VirtioTestSupport
#if canImport(Glibc)
import Glibc
#endif

setvbuf(stdout, nil, _IOLBF, 0)

func die(_ message: String) -> Never {
    print("hostile-device: \(message)")
    exit(70)
}

// MARK: Arguments

var socketPath = ""
var deviceType = "net"
var packed = false
var queueUnits = 1
var after = 0
var faults: [String: String] = [:]
do {
    var args = CommandLine.arguments.dropFirst()
    func value(_ name: String) -> String {
        guard let v = args.popFirst() else { die("\(name) needs a value") }
        return v
    }
    while let a = args.popFirst() {
        switch a {
        case "--socket": socketPath = value(a)
        case "--type": deviceType = value(a)
        case "--packed": packed = true
        case "--queues": queueUnits = Int(value(a)) ?? 1
        case "--after": after = Int(value(a)) ?? 0
        case "--fault":
            let f = value(a).split(separator: "=", maxSplits: 1).map(String.init)
            faults[f[0]] = f.count > 1 ? f[1] : ""
        default: die("unknown argument \(a)")
        }
    }
    guard !socketPath.isEmpty, deviceType == "net" || deviceType == "blk" else { die("usage: --socket PATH --type net|blk") }
}
let isBlk = deviceType == "blk"
func faultU64(_ name: String) -> UInt64? { faults[name].flatMap { UInt64($0) } }

// MARK: What the device offers

let blkQueues = faultU64("num-queues").map { Int($0) } ?? queueUnits
var offeredFeatures: UInt64 = 1 << 32 | 1 << 30  // VERSION_1, PROTOCOL_FEATURES
if packed { offeredFeatures |= 1 << 34 }
if isBlk {
    offeredFeatures |= 1 << 2 | 1 << 6 | 1 << 9  // SEG_MAX, BLK_SIZE, FLUSH
    if !packed { offeredFeatures |= 1 << 28 }  // INDIRECT_DESC
    if faults["num-queues"] != nil || queueUnits > 1 { offeredFeatures |= 1 << 12 }  // MQ
    if faults["size-max"] != nil { offeredFeatures |= 1 << 1 }
} else {
    offeredFeatures |= 1 << 15  // MRG_RXBUF
    if queueUnits > 1 { offeredFeatures |= 1 << 22 }  // MQ
}
// MQ, REPLY_ACK; CONFIG for blk.
let offeredProtocol: UInt64 = 1 << 0 | 1 << 3 | (isBlk ? 1 << 9 : 0)
let queueNumReply = faultU64("queue-num") ?? UInt64(queueUnits)
let ringCount = isBlk ? max(1, blkQueues) : 2 * queueUnits

let diskSectors: UInt64 = 64 * 2048  // 64 MiB of RAM disk
let disk = isBlk ? calloc(Int(diskSectors) * 512, 1)! : UnsafeMutableRawPointer(bitPattern: 1)!

func blkConfig() -> [UInt8] {
    var c = [UInt8](repeating: 0, count: 60)
    func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
        withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { c[at + i] = b } }
    }
    put(faultU64("capacity") ?? diskSectors, 0)
    put(UInt32(truncatingIfNeeded: faultU64("size-max") ?? 0), 8)
    put(UInt32(truncatingIfNeeded: faultU64("seg-max") ?? 126), 12)
    put(UInt32(truncatingIfNeeded: faultU64("blk-size") ?? 512), 20)
    put(UInt16(truncatingIfNeeded: blkQueues), 34)
    return c
}

// MARK: Memory table

struct Mapping { var address: UInt64; var size: UInt64 }
var mappings: [Mapping] = []
let mapFixedNoReplace: Int32 = 0x100000

func setMemoryTable(_ payload: [UInt8], fds: [Int32]) {
    for m in mappings { munmap(UnsafeMutableRawPointer(bitPattern: UInt(m.address)), Int(m.size)) }
    mappings = []
    let msg = VhostUserMessage(request: 0, payload: payload)
    let n = Int(msg.u32(at: 0) ?? 0)
    guard n == fds.count else { die("SET_MEM_TABLE names \(n) regions with \(fds.count) descriptors") }
    for i in 0..<n {
        let base = 8 + 32 * i
        guard let size = msg.u64(at: base + 8), let user = msg.u64(at: base + 16), let offset = msg.u64(at: base + 24) else {
            die("SET_MEM_TABLE is short")
        }
        // At the front end's own address: every address it writes into a descriptor is a pointer here.
        let p = mmap(UnsafeMutableRawPointer(bitPattern: UInt(user)), Int(size), PROT_READ | PROT_WRITE,
                     MAP_SHARED | mapFixedNoReplace, fds[i], off_t(offset))
        guard p != MAP_FAILED, UInt64(UInt(bitPattern: p)) == user else {
            die("cannot map region \(i) at 0x\(String(user, radix: 16)) (\(size) bytes): errno \(errno)")
        }
        close(fds[i])
        mappings.append(Mapping(address: user, size: size))
    }
    print("memory table: \(n) regions")
}

// MARK: Rings

final class Ring {
    var size = 256
    var base: UInt32 = 0
    var addresses: QueueAddresses?
    var enabled = false
    var kicked = false
    var model: (any VirtqueueDeviceModel)?
    /// Buffers popped and not completed, oldest first (mirrors the model's pending list).
    var pending: [DeviceBuffer] = []
    var running: Bool { model != nil }
}
var rings = (0..<ringCount).map { _ in Ring() }
var negotiated: UInt64 = 0
var protocolNegotiated: UInt64 = 0
var stopped = false  // a `stop` fault has fired
var counter = 0      // frames (net) or requests (blk) handled

func startIfReady(_ i: Int) {
    let r = rings[i]
    guard !r.running, r.kicked, r.enabled || protocolNegotiated == 0, var a = r.addresses else { return }
    a.size = r.size
    a.base = r.base
    let inOrder = negotiated & (1 << 35) != 0
    let m: any VirtqueueDeviceModel
    if negotiated & (1 << 34) != 0 {
        m = PackedDeviceModel(addresses: a, inOrder: inOrder)
    } else {
        let s = SplitDeviceModel(addresses: a, inOrder: inOrder)
        s.indirectNegotiated = negotiated & (1 << 28) != 0
        m = s
    }
    m.setNoNotify(true)  // poll mode: no kicks wanted
    r.model = m
    r.pending = []
    print("ring \(i) started: size \(a.size), base \(a.base)")
}

// MARK: Messages

let listenFD: Int32 = {
    let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let tmp = socketPath + ".tmp"
    unlink(tmp)
    withUnsafeMutableBytes(of: &addr.sun_path) { dst in for (i, b) in tmp.utf8.enumerated() { dst[i] = b } }
    let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
    guard rc == 0, listen(s, 1) == 0 else { die("cannot listen on \(tmp): errno \(errno)") }
    // Listening before the path appears, so a front end that sees the path can connect.
    guard rename(tmp, socketPath) == 0 else { die("rename to \(socketPath): errno \(errno)") }
    return s
}()
print("listening on \(socketPath): \(deviceType), \(packed ? "packed" : "split"), faults \(faults), after \(after)")
let conn = accept(listenFD, nil, nil)
guard conn >= 0 else { die("accept: errno \(errno)") }
close(listenFD)
unlink(socketPath)

func readExactly(_ count: Int, fds: inout [Int32]) -> [UInt8]? {
    var buf = [UInt8](repeating: 0, count: count)
    var got = 0
    while got < count {
        var f = [Int32](repeating: -1, count: 8)
        var nf: Int32 = 0
        let n = buf.withUnsafeMutableBytes { cvio_recv_with_fds(conn, $0.baseAddress! + got, count - got, &f, 8, &nf) }
        if n <= 0 { return nil }
        fds += f.prefix(Int(nf))
        got += n
    }
    return buf
}

func send(_ request: UInt32, _ payload: [UInt8]) {
    let m = VhostUserMessage(request: request, flags: VhostUserMessage.version | VhostUserMessage.replyFlag, payload: payload)
    let bytes = m.encoded
    _ = bytes.withUnsafeBytes { Glibc.send(conn, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
}

func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

func hangUp(_ why: String) -> Never {
    print("hanging up: \(why); \(counter) \(isBlk ? "requests" : "frames") handled")
    shutdown(conn, Int32(SHUT_RDWR))
    close(conn)
    exit(0)
}

/// One message from the front end; false when it hung up.
func handleMessage() -> Bool {
    var fds: [Int32] = []
    guard let header = readExactly(12, fds: &fds), let h = VhostUserMessage.decodeHeader(header) else { return false }
    guard h.size <= 4096, let payload = h.size > 0 ? readExactly(Int(h.size), fds: &fds) : [] else { return false }
    let msg = VhostUserMessage(request: h.request, flags: h.flags, payload: payload)
    let name = VhostUserRequest(rawValue: h.request)?.description ?? "request \(h.request)"
    if let code = faults["hangup-on"], UInt32(code) == h.request { hangUp("got \(name)") }
    if let code = faults["no-reply"], UInt32(code) == h.request {
        print("not answering \(name)")
        for f in fds { close(f) }
        return true
    }
    let index = Int(msg.u32(at: 0) ?? 0)
    func ring() -> Ring? { index < rings.count ? rings[index] : nil }
    var replied = false
    switch h.request {
    case 1: send(1, le(offeredFeatures)); replied = true
    case 2: negotiated = msg.u64(at: 0) ?? 0
    case 15: send(15, le(offeredProtocol)); replied = true
    case 16: protocolNegotiated = msg.u64(at: 0) ?? 0
    case 17: send(17, le(queueNumReply)); replied = true
    case 5: setMemoryTable(payload, fds: fds); fds = []
    case 8: ring()?.size = Int(msg.u32(at: 4) ?? 0)
    case 10: ring()?.base = msg.u32(at: 4) ?? 0
    case 9:
        if let r = ring(), let desc = msg.u64(at: 8), let used = msg.u64(at: 16), let avail = msg.u64(at: 24) {
            r.addresses = QueueAddresses(size: r.size, desc: desc, avail: avail, used: used)
        }
    case 12:
        let i = Int((msg.u64(at: 0) ?? 0) & 0xff)
        if i < rings.count { rings[i].kicked = true; startIfReady(i) }
    case 13, 14: break
    case 18:
        if let r = ring() { r.enabled = (msg.u32(at: 4) ?? 0) != 0; if r.enabled { startIfReady(index) } }
    case 11:
        let r = ring()
        let base = r?.model?.stoppedBase ?? r?.base ?? 0
        r?.model = nil; r?.kicked = false; r?.base = base
        switch faults["vring-base"] {
        case "none": print("not answering GET_VRING_BASE \(index)")
        case "garbage": send(11, le(UInt32(index + 7)) + le(UInt32(0xdead_beef))); replied = true
        case "short": send(11, le(UInt32(index))); replied = true
        default: send(11, le(UInt32(index)) + le(base)); replied = true
        }
        print("ring \(index) stopped at \(base)")
        if faults["vring-base"] == "none" { replied = true }
    case 24:
        let off = Int(msg.u32(at: 0) ?? 0), size = Int(msg.u32(at: 4) ?? 0)
        let cfg = isBlk ? blkConfig() : []
        let bytes = (0..<size).map { off + $0 < cfg.count ? cfg[off + $0] : 0 }
        send(24, le(UInt32(off)) + le(UInt32(size)) + le(UInt32(0)) + bytes); replied = true
    case 40: send(40, le(UInt64(0))); replied = true
    default: break
    }
    for f in fds { close(f) }
    if !replied && h.flags & VhostUserMessage.needReplyFlag != 0 { send(h.request, le(UInt64(0))) }
    return true
}

// MARK: Data path

/// Faults that fire at the `after`-th frame or request; true when this one was handled by a fault.
func dataFault(_ r: Ring, _ b: DeviceBuffer) -> Bool {
    guard counter == after else { return false }
    if let v = faultU64("used-id") {
        print("fault: used entry with id \(v)")
        r.model!.injectUsed(id: UInt32(truncatingIfNeeded: v), len: 0)
        return true
    }
    if faults["used-idx-jump"] != nil, let s = r.model as? SplitDeviceModel {
        print("fault: used index jumps by \(s.size + 5)")
        s.setUsedIdx(UInt16(truncatingIfNeeded: Int(s.usedBase) + s.size + 5))
        return true
    }
    if faults["hangup"] != nil { hangUp("fault") }
    return false
}

/// Copies `bytes` into the writable segments of `b`; the count written.
func write(_ bytes: UnsafeRawBufferPointer, into b: DeviceBuffer) -> Int {
    var done = 0
    for s in b.segments where s.writable && done < bytes.count {
        let n = min(Int(s.len), bytes.count - done)
        UnsafeMutableRawPointer(bitPattern: UInt(s.addr))!.copyMemory(from: bytes.baseAddress! + done, byteCount: n)
        done += n
    }
    return done
}

func stepNet(pair p: Int) {
    let rx = rings[2 * p], tx = rings[2 * p + 1]
    guard let rxm = rx.model, let txm = tx.model else { return }
    tx.pending += txm.popBuffers()
    if tx.pending.isEmpty { return }
    rx.pending += rxm.popBuffers()
    var frame = [UInt8]()
    while let t = tx.pending.first, !stopped {
        if faults["stop"] != nil && counter >= after { print("fault: stop after \(counter) frames"); stopped = true; break }
        guard let r = rx.pending.first else { break }
        frame.removeAll(keepingCapacity: true)
        for s in t.segments where !s.writable {
            frame += UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(s.addr)), count: Int(s.len))
        }
        tx.pending.removeFirst()
        txm.completeInOrder(count: 1, lengths: [0])
        if frame.count < 12 { counter += 1; continue }
        // The RX header: no offloads, one buffer (or the fault's count).
        for i in 0..<10 { frame[i] = 0 }
        let nb = UInt16(truncatingIfNeeded: counter == after ? faultU64("num-buffers") ?? 1 : 1)
        frame[10] = UInt8(nb & 0xff); frame[11] = UInt8(nb >> 8)
        if dataFault(rx, r) { rx.pending.removeFirst(); counter += 1; continue }
        rx.pending.removeFirst()
        var len = UInt32(frame.withUnsafeBytes { write($0, into: r) })
        if counter == after, let v = faultU64("used-len") { print("fault: RX used length \(v)"); len = UInt32(truncatingIfNeeded: v) }
        rxm.completeInOrder(count: 1, lengths: [len])
        counter += 1
    }
}

let idString = Array("hostile-device".utf8)

func stepBlk(queue q: Int) {
    let r = rings[q]
    guard let m = r.model else { return }
    r.pending += m.popBuffers()
    while !r.pending.isEmpty, !stopped {
        if faults["stop"] != nil && counter >= after { print("fault: stop after \(counter) requests"); stopped = true; break }
        let b = r.pending.removeFirst()
        defer { counter += 1 }
        if dataFault(r, b) { continue }
        if faults["lose"] != nil && counter == after { print("fault: request \(counter) (buffer \(b.id)) lost"); continue }
        guard let head = b.segments.first, !head.writable, head.len >= 16, let last = b.segments.last, last.writable, last.len >= 1 else {
            print("malformed request \(b)"); m.complete(ids: [b.id], lengths: [0]); continue
        }
        let hp = UnsafeRawPointer(bitPattern: UInt(head.addr))!
        let type = hp.loadUnaligned(as: UInt32.self), sector = hp.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        let data = b.segments.dropFirst().dropLast()
        var status: UInt8 = 0
        var written: UInt32 = 0
        var offset = sector &* 512
        let total = data.reduce(UInt64(0)) { $0 + UInt64($1.len) }
        switch type {
        case 0, 1:
            guard sector < diskSectors, total <= (diskSectors - sector) * 512 else { status = 1; break }
            for s in data {
                let p = UnsafeMutableRawPointer(bitPattern: UInt(s.addr))!
                if type == 0 { p.copyMemory(from: disk + Int(offset), byteCount: Int(s.len)); written += s.len }
                else { (disk + Int(offset)).copyMemory(from: p, byteCount: Int(s.len)) }
                offset += UInt64(s.len)
            }
        case 4: break
        case 8:
            if let s = data.first { idString.withUnsafeBytes { _ = write($0, into: DeviceBuffer(id: 0, segments: [s], descriptors: [0])) }; written = s.len }
        default: status = 2
        }
        var len = written + 1
        if counter == after, let v = faults["status"] {
            if v == "none" { print("fault: request \(counter) completed without a status"); m.complete(ids: [b.id], lengths: [0]); continue }
            status = UInt8(truncatingIfNeeded: UInt64(v) ?? 0)
            print("fault: request \(counter) status \(status)")
        }
        if counter == after, let v = faultU64("used-len") { print("fault: used length \(v)"); len = UInt32(truncatingIfNeeded: v) }
        UnsafeMutableRawPointer(bitPattern: UInt(last.addr))!.storeBytes(of: status, toByteOffset: Int(last.len) - 1, as: UInt8.self)
        m.complete(ids: [b.id], lengths: [len])
    }
}

// MARK: Main loop

var pfd = pollfd(fd: conn, events: Int16(POLLIN), revents: 0)
while true {
    let running = rings.contains { $0.running } && !stopped
    pfd.revents = 0
    if poll(&pfd, 1, running ? 0 : 100) > 0 {
        if pfd.revents & Int16(POLLIN) != 0 {
            if !handleMessage() { hangUp("the front end closed the connection") }
        } else if pfd.revents & Int16(POLLHUP | POLLERR) != 0 {
            hangUp("the front end hung up")
        }
    }
    if running {
        if isBlk { for q in 0..<rings.count { stepBlk(queue: q) } }
        else { for p in 0..<queueUnits { stepNet(pair: p) } }
    }
}
