import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// A scratch directory for sockets and logs, removed at teardown.
final class TempDir {
    let url: URL
    init() throws {
        url = URL(fileURLWithPath: "/tmp").appendingPathComponent("vio-test-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    func path(_ name: String) -> String { url.appendingPathComponent(name).path }
    deinit { try? FileManager.default.removeItem(at: url) }
}

/// Paths of the tools under test.
enum Tools {
    /// The `vio` binary built next to this test bundle, or `$VIO_BINARY` when set (e.g. a
    /// sanitizer build of vio in its own scratch path: Scripts/sanitize.sh).
    static var vio: String {
        if let path = ProcessInfo.processInfo.environment["VIO_BINARY"], !path.isEmpty { return path }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        // The test binary lives inside …/debug/<package>PackageTests.xctest (a file on Linux).
        while !FileManager.default.fileExists(atPath: dir.appendingPathComponent("vio").path), dir.path != "/" {
            dir = dir.deletingLastPathComponent()
        }
        return dir.appendingPathComponent("vio").path
    }
    static let testpmd = "/usr/bin/dpdk-testpmd"
    /// NIO servers on the dataplane (Tests/NIOProbe), built next to `vio`.
    static var nioProbe: String { URL(fileURLWithPath: vio).deletingLastPathComponent().appendingPathComponent("nio-probe").path }
    /// The test suite's own misbehaving vhost-user device (Tests/HostileDevice), built next to `vio`.
    static var hostileDevice: String { URL(fileURLWithPath: vio).deletingLastPathComponent().appendingPathComponent("hostile-device").path }

    static var hugepagesAvailable: Bool {
        guard let info = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
              let mounts = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return false }
        let free = info.split(separator: "\n").first { $0.hasPrefix("HugePages_Free:") }
            .flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
        return free >= 160 && mounts.contains("hugetlbfs")
    }
}

nonisolated(unsafe) private var peerCounter = 0

/// A device process (pinned to CPU 0) that serves a vhost-user socket; waited for until the
/// socket exists, killed by PID at teardown.
final class SocketServerProcess {
    let socket: String
    let log: String
    let process = Process()
    private(set) var stopped = false
    /// A DPDK process's runtime directory (/var/run/dpdk/PREFIX), removed once it has exited.
    let runtimeDirectory: String?

    /// `readyLine`: a line the process logs once it listens. A process that serves a single
    /// connection may be done, and its socket gone, before the next look for the socket (a
    /// front end that reconnects at once and is refused): the line still says it started.
    init(socket: String, log: String, command: [String], name: String, readyLine: String? = nil) throws {
        self.socket = socket
        self.log = log
        runtimeDirectory = command.firstIndex(of: "--file-prefix").flatMap { $0 + 1 < command.count ? "/var/run/dpdk/\(command[$0 + 1])" : nil }
        FileManager.default.createFile(atPath: log, contents: nil)
        process.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
        process.arguments = ["-c", "0"] + command
        let h = FileHandle(forWritingAtPath: log)!
        process.standardOutput = h
        process.standardError = h
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: socket) {
            if let line = readyLine, tail(100_000).contains(line) { break }
            guard process.isRunning, Date() < deadline else {
                kill()
                throw TestFailure("\(name) did not create \(socket): \(tail())")
            }
            usleep(20_000)
        }
    }

    func tail(_ n: Int = 2000) -> String {
        String(((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").suffix(n))
    }

    /// SIGINT, then SIGKILL if it does not exit within `timeout`.
    func interrupt(timeout: Double = 15) {
        guard !stopped else { return }
        stopped = true
        Glibc.kill(process.processIdentifier, SIGINT)
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(50_000) }
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        removeRuntimeDirectory()
    }

    private func removeRuntimeDirectory() {
        if let d = runtimeDirectory { try? FileManager.default.removeItem(atPath: d) }
    }

    /// Kills it at once (the "device disappears" case).
    func kill() {
        guard !stopped else { return }
        stopped = true
        Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        removeRuntimeDirectory()
    }

    deinit { kill() }
}

/// The suite's own vhost-user device (Tests/HostileDevice): real traffic (net echoes each frame
/// back, blk is a RAM disk) until a fault from `faults` fires after `after` frames or requests.
final class HostileDevice {
    let server: SocketServerProcess
    var socket: String { server.socket }

    init(_ type: String, dir: TempDir, packed: Bool = false, queues: Int = 1, after: Int = 0, faults: [String] = [], name: String = "hostile") throws {
        let socket = dir.path("\(name).sock")
        server = try SocketServerProcess(
            socket: socket, log: dir.path("\(name).log"),
            command: [Tools.hostileDevice, "--socket", socket, "--type", type, "--queues", "\(queues)", "--after", "\(after)"]
                + (packed ? ["--packed"] : []) + faults.flatMap { ["--fault", $0] },
            name: "hostile-device", readyLine: "listening on \(socket):")
    }

    func tail(_ n: Int = 3000) -> String { server.tail(n) }
    /// Waits until the device's log contains `text`.
    func waitForLog(_ text: String, timeout: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while !tail(100_000).contains(text) {
            guard Date() < deadline else { return false }
            usleep(50_000)
        }
        return true
    }
    func kill() { server.kill() }
}

/// A `dpdk-testpmd` vhost-user device (net_vhost), started and stopped by the test.
final class Peer {
    let server: SocketServerProcess
    var socket: String { server.socket }

    /// `queues`: the net_vhost port's queue pairs (`queues=N`), forwarded by one core as
    /// testpmd's streams (RX queue q → TX queue q).
    /// `socket`: a path of its own (default NAME.sock in `dir`); `client`: testpmd connects to
    /// that socket (net_vhost `client=1`, vio in server mode has created it) and reconnects by itself.
    init(mode: String, dir: TempDir, name: String = "peer", queues: Int = 1, extra: [String] = [], socket: String? = nil,
         client: Bool = false) throws {
        guard FileManager.default.isExecutableFile(atPath: Tools.testpmd) else {
            throw XCTSkip("dpdk-testpmd is not installed (run Scripts/setup.sh)")
        }
        peerCounter += 1
        let socket = socket ?? dir.path("\(name).sock")
        server = try SocketServerProcess(
            socket: socket, log: dir.path("\(name).log"),
            command: [Tools.testpmd, "--lcores", "0@0,1@0", "--no-pci", "--no-huge", "-m", "256",
                      "--file-prefix", "viotest-\(getpid())-\(peerCounter)", "--no-telemetry",
                      "--vdev", "net_vhost0,iface=\(socket)" + (queues > 1 ? ",queues=\(queues)" : "") + (client ? ",client=1" : ""), "--",
                      "--forward-mode=\(mode)", "--stats-period", "1", "--auto-start",
                      "--total-num-mbufs", "16384"] + (queues > 1 ? ["--rxq=\(queues)", "--txq=\(queues)", "--nb-cores=1"] : []) + extra,
            name: "testpmd peer")
    }

    func tail(_ n: Int = 2000) -> String { server.tail(n) }

    /// The peer's own final counters (testpmd's "Forward statistics for port 0" at SIGINT).
    struct Stats { var rx: UInt64; var tx: UInt64 }

    func stop() throws -> Stats {
        guard !server.stopped else { throw TestFailure("peer already stopped") }
        server.interrupt()
        return try counters(after: "Forward statistics for port 0", what: "the peer's final statistics")
    }

    /// The per-stream counters testpmd prints at the stop with several queues ("Forward Stats for
    /// RX Port= 0/Queue= q -> TX Port= 0/Queue= q"), after `stop()`: what the peer received on
    /// queue q and sent on queue q.
    func streamStats(queues: Int) throws -> [Stats] {
        try (0..<queues).map { q in
            try counters(after: "Forward Stats for RX Port= 0/Queue= \(q) ", what: "the stream statistics of queue \(q)")
        }
    }

    /// RX-packets and TX-packets of the last section of the peer's log that starts with `heading`.
    private func counters(after heading: String, what: String) throws -> Stats {
        let text = (try? String(contentsOfFile: server.log, encoding: .utf8)) ?? ""
        guard let r = text.range(of: heading, options: .backwards) else {
            throw TestFailure("no \(what) in the peer's log: \(tail())")
        }
        let section = text[r.upperBound...].prefix(400)
        func number(after key: String) -> UInt64? {
            guard let k = section.range(of: key) else { return nil }
            return UInt64(section[k.upperBound...].drop { $0 == " " }.prefix { $0.isNumber })
        }
        guard let rx = number(after: "RX-packets:"), let tx = number(after: "TX-packets:") else {
            throw TestFailure("cannot parse \(what): \(section)")
        }
        return Stats(rx: rx, tx: tx)
    }

    func kill() { server.kill() }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// A finished `vio` run.
struct VioRun {
    var status: Int32
    var stdout: String
    var stderr: String
    var json: [String: Any]?
    var timedOut: Bool

    func int(_ key: String) -> Int? { (json?[key] as? NSNumber)?.intValue }
    /// Per-queue reports (`queues`, with more than one queue pair).
    var queues: [[String: Any]] { json?["queues"] as? [[String: Any]] ?? [] }
    func port(_ i: Int) -> [String: Any]? {
        if let ports = json?["ports"] as? [[String: Any]] { return ports.count > i ? ports[i] : nil }
        return i == 0 ? json?["port"] as? [String: Any] : nil
    }
}

/// A `vio` process pinned to CPU 1.
final class Vio {
    let process = Process()
    let out: String, err: String, jsonPath: String?
    let started = Date()

    /// `cpus`: the CPUs `vio` may run on (taskset); CPU 1 unless a test spreads lcores.
    init(_ args: [String], dir: TempDir, name: String = "vio", json: Bool = true, cpus: String = "1", binary: String = Tools.vio) throws {
        out = dir.path("\(name).out"); err = dir.path("\(name).err")
        jsonPath = json ? dir.path("\(name).json") : nil
        FileManager.default.createFile(atPath: out, contents: nil)
        FileManager.default.createFile(atPath: err, contents: nil)
        process.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
        process.arguments = ["-c", cpus, binary] + args + (jsonPath.map { ["--json", $0] } ?? [])
        process.standardOutput = FileHandle(forWritingAtPath: out)
        process.standardError = FileHandle(forWritingAtPath: err)
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    var stdoutSoFar: String { (try? String(contentsOfFile: out, encoding: .utf8)) ?? "" }
    var stderrSoFar: String { (try? String(contentsOfFile: err, encoding: .utf8)) ?? "" }

    /// Waits until stdout and stderr together contain `text` at least `count` times.
    func waitForCount(_ text: String, _ count: Int, timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while (stdoutSoFar + stderrSoFar).components(separatedBy: text).count - 1 < count {
            guard Date() < deadline, process.isRunning else { return false }
            usleep(50_000)
        }
        return true
    }

    /// Open file descriptors of the running process (/proc/PID/fd).
    var openDescriptors: Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(process.processIdentifier)/fd").count) ?? -1 }

    /// Waits until stdout contains `text` (e.g. the first stats line); false after `timeout`.
    func waitForOutput(_ text: String, timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while !stdoutSoFar.contains(text) {
            guard Date() < deadline, process.isRunning else { return stdoutSoFar.contains(text) }
            usleep(100_000)
        }
        return true
    }

    func signal(_ s: Int32) { Glibc.kill(process.processIdentifier, s) }

    /// Waits up to `timeout` seconds; a run still going then is killed and marked timed out.
    func wait(timeout: Double) -> VioRun {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        var timedOut = false
        if process.isRunning { timedOut = true; signal(SIGKILL) }
        process.waitUntilExit()
        var json: [String: Any]?
        if let p = jsonPath, let d = FileManager.default.contents(atPath: p), !d.isEmpty {
            json = (try? JSONSerialization.jsonObject(with: d)) as? [String: Any]
        }
        return VioRun(status: process.terminationStatus,
                      stdout: (try? String(contentsOfFile: out, encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOfFile: err, encoding: .utf8)) ?? "",
                      json: json, timedOut: timedOut)
    }

    static func run(_ args: [String], dir: TempDir, timeout: Double = 60, json: Bool = true, cpus: String = "1") throws -> VioRun {
        try Vio(args, dir: dir, json: json, cpus: cpus).wait(timeout: timeout)
    }
}

extension VioRun: CustomStringConvertible {
    var description: String { "status \(status)\(timedOut ? " (timed out)" : "")\nstdout: \(stdout.suffix(1500))\nstderr: \(stderr.suffix(1500))" }
}

// MARK: Network namespaces (HTTP tests)

/// The output of a finished command.
struct CommandResult {
    var status: Int32
    var stdout: Data
    var stderr: String
    var timedOut: Bool
    var text: String { String(decoding: stdout, as: UTF8.self) }
}

/// Runs a command to completion (stdout and stderr into files, so large outputs cannot block
/// it); killed after `timeout` seconds.
func runCommand(_ args: [String], timeout: Double = 60, dir: TempDir) throws -> CommandResult {
    let p = Process()
    let tag = UUID().uuidString.prefix(8)
    let out = dir.path("cmd-\(tag).out"), err = dir.path("cmd-\(tag).err")
    FileManager.default.createFile(atPath: out, contents: nil)
    FileManager.default.createFile(atPath: err, contents: nil)
    defer { try? FileManager.default.removeItem(atPath: out); try? FileManager.default.removeItem(atPath: err) }
    p.executableURL = URL(fileURLWithPath: args[0])
    p.arguments = Array(args.dropFirst())
    p.standardOutput = FileHandle(forWritingAtPath: out)
    p.standardError = FileHandle(forWritingAtPath: err)
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let deadline = Date().addingTimeInterval(timeout)
    while p.isRunning && Date() < deadline { usleep(10_000) }
    var timedOut = false
    if p.isRunning { timedOut = true; kill(p.processIdentifier, SIGKILL) }
    p.waitUntilExit()
    return CommandResult(status: p.terminationStatus, stdout: FileManager.default.contents(atPath: out) ?? Data(),
                         stderr: (try? String(contentsOfFile: err, encoding: .utf8)) ?? "", timedOut: timedOut)
}

nonisolated(unsafe) private var namespaceCounter = 0

/// A network namespace of the test's own (`ip netns add`), deleted by `remove()` or at deinit.
final class NetNamespace {
    let name: String
    let dir: TempDir
    private var removed = false

    init(dir: TempDir) throws {
        guard getuid() == 0 else { throw XCTSkip("network namespaces need root") }
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") || FileManager.default.isExecutableFile(atPath: "/sbin/ip") else {
            throw XCTSkip("iproute2 is not installed (run Scripts/setup.sh)")
        }
        namespaceCounter += 1
        name = "viot\(getpid())n\(namespaceCounter)"
        self.dir = dir
        let r = try runCommand([Self.ip, "netns", "add", name], timeout: 10, dir: dir)
        guard r.status == 0 else { throw TestFailure("ip netns add \(name): \(r.stderr)") }
    }

    static var ip: String { FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") ? "/usr/sbin/ip" : "/sbin/ip" }

    /// The command line that runs `args` inside the namespace.
    func wrap(_ args: [String]) -> [String] { [Self.ip, "netns", "exec", name] + args }

    /// Runs `args` inside the namespace.
    func run(_ args: [String], timeout: Double = 60) throws -> CommandResult {
        try runCommand(wrap(args), timeout: timeout, dir: dir)
    }

    /// Runs a Python 3 program inside the namespace.
    func python(_ program: String, _ args: [String] = [], timeout: Double = 60) throws -> CommandResult {
        try run(["/usr/bin/python3", "-c", program] + args, timeout: timeout)
    }

    /// Deletes the namespace (its TAP device goes with the process that owns it).
    func remove() {
        guard !removed else { return }
        removed = true
        _ = try? runCommand([Self.ip, "netns", "delete", name], timeout: 10, dir: dir)
    }

    deinit { remove() }
}

nonisolated(unsafe) private var tapCounter = 0

/// `dpdk-testpmd` inside a namespace bridging a kernel TAP device (port 0) to a vhost-user
/// socket (port 1) in `io` mode: whatever the kernel sends out of the TAP reaches the virtio-net
/// driver and back. The TAP gets `hostAddress` in the namespace.
final class TapBridge {
    let server: SocketServerProcess
    let tap: String
    var socket: String { server.socket }

    /// `socket` and `tap` name a bridge that replaces an earlier one (a restart: same socket,
    /// same TAP name); `mac` fixes the TAP's address, so the server's ARP entry stays right.
    ///
    /// `jumboMTU`: DPDK's TAP PMD drops frames over 1522 bytes, so for a larger MTU the kernel
    /// side is one end of a veth pair (named `tap`, with that MTU and its checksum offload off:
    /// AF_PACKET would hand testpmd frames whose checksum is left for the hardware) and testpmd
    /// bridges an AF_PACKET socket on the other end.
    init(namespace ns: NetNamespace, dir: TempDir, hostAddress: String, socket: String? = nil, tap: String? = nil, mac: String? = nil,
         jumboMTU: Int? = nil) throws {
        guard FileManager.default.isExecutableFile(atPath: Tools.testpmd) else {
            throw XCTSkip("dpdk-testpmd is not installed (run Scripts/setup.sh)")
        }
        tapCounter += 1
        self.tap = tap ?? "viotap\(tapCounter)"
        let tap = self.tap
        let socket = socket ?? dir.path("bridge\(tapCounter).sock")
        var far = ["--vdev", "net_tap0,iface=\(tap)"]
        var mbufs = ["--total-num-mbufs", "16384"]
        if let mtu = jumboMTU {
            guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/ethtool") else {
                throw XCTSkip("ethtool is not installed (run Scripts/setup.sh)")
            }
            let pside = "viopkt\(tapCounter)"
            for args in [["link", "add", pside, "type", "veth", "peer", "name", tap], ["link", "set", pside, "mtu", "\(mtu)", "up"],
                         ["link", "set", tap, "mtu", "\(mtu)"]] {
                let r = try ns.run([NetNamespace.ip] + args, timeout: 10)
                guard r.status == 0 else { throw TestFailure("ip \(args.joined(separator: " ")): \(r.stderr)") }
            }
            let r = try ns.run(["/usr/sbin/ethtool", "-K", tap, "tx", "off"], timeout: 10)
            guard r.status == 0 else { throw TestFailure("ethtool -K \(tap) tx off: \(r.stderr)") }
            far = ["--vdev", "net_af_packet0,iface=\(pside),framesz=10240,blocksz=20480,framecnt=512"]
            mbufs = ["--mbuf-size", "10368", "--total-num-mbufs", "8192"]
        }
        server = try SocketServerProcess(
            socket: socket, log: dir.path("bridge\(tapCounter).log"),
            command: ns.wrap([Tools.testpmd, "--lcores", "0@0,1@0", "--no-pci", "--no-huge", "-m", "512",
                              "--file-prefix", "viohttp-\(getpid())-\(tapCounter)", "--no-telemetry"] + far +
                             ["--vdev", "net_vhost0,iface=\(socket)", "--",
                              "--forward-mode=io", "--stats-period", "1", "--auto-start"] + mbufs),
            name: jumboMTU == nil ? "testpmd TAP bridge" : "testpmd AF_PACKET bridge")
        // The TAP appears when testpmd probes it; give it the kernel side's address.
        let deadline = Date().addingTimeInterval(20)
        while true {
            let r = try ns.run([NetNamespace.ip, "link", "show", tap], timeout: 10)
            if r.status == 0 { break }
            guard Date() < deadline else { server.kill(); throw TestFailure("TAP \(tap) did not appear: \(server.tail())") }
            usleep(100_000)
        }
        for args in (mac.map { [["link", "set", tap, "address", $0]] } ?? []) + [["addr", "add", hostAddress, "dev", tap], ["link", "set", tap, "up"], ["link", "set", "lo", "up"]] {
            let r = try ns.run([NetNamespace.ip] + args, timeout: 10)
            guard r.status == 0 else { server.kill(); throw TestFailure("ip \(args.joined(separator: " ")): \(r.stderr)") }
        }
    }

    func tail(_ n: Int = 2000) -> String { server.tail(n) }
    func stop() { server.interrupt() }
}

/// Checks shared by the split and packed net tests (each class passes its `--ring`).
extension XCTestCase {
    /// Every frame sent came back once, in order, intact, with swapped MACs, on the `ring`
    /// layout; every mbuf is back in the pool.
    func assertCleanEcho(_ r: VioRun, count: Int, ring: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(r.status, 0, "\(r)", file: file, line: line)
        XCTAssertEqual(r.int("sent"), count, "\(r)", file: file, line: line)
        XCTAssertEqual(r.int("received"), count, "\(r)", file: file, line: line)
        for key in ["lost", "reordered", "duplicates", "corrupt", "macMismatch", "foreign", "mbufsInUseAfterStop"] {
            XCTAssertEqual(r.int(key), 0, "\(key): \(r)", file: file, line: line)
        }
        XCTAssertEqual(r.port(0)?["ring"] as? String, ring, "\(r)", file: file, line: line)
        let features = r.port(0)?["features"] as? String ?? ""
        XCTAssertEqual(features.contains("RING_PACKED"), ring == "packed", features, file: file, line: line)
    }

    /// `vio fwd --mode io` between a txonly and an rxonly peer on the `ring` layout: every packet
    /// received on port 0 is sent or counted as dropped on port 1, and the sink's own counters
    /// confirm what was sent (`exactSink`: all of it; otherwise all but at most one ring still
    /// queued when vio stopped).
    func assertTwoPortIO(ring: String, seconds: Int, memory: [String], atLeast minimum: UInt64, exactSink: Bool,
                         file: StaticString = #filePath, line: UInt = #line) throws {
        let dir = try TempDir()
        let source = try Peer(mode: "txonly", dir: dir, name: "source")
        let sink = try Peer(mode: "rxonly", dir: dir, name: "sink")
        let r = try Vio.run(["fwd", "--mode", "io", "--ring", ring, "--port", "vhost:\(source.socket)",
                             "--port", "vhost:\(sink.socket)", "--duration", "\(seconds)"] + memory, dir: dir, timeout: 60)
        XCTAssertEqual(r.status, 0, "\(r)", file: file, line: line)
        let rx0 = (r.port(0)?["rxPackets"] as? NSNumber)?.uint64Value ?? 0
        let tx1 = (r.port(1)?["txPackets"] as? NSNumber)?.uint64Value ?? 0
        let drops1 = (r.port(1)?["txDrops"] as? NSNumber)?.uint64Value ?? 0
        XCTAssertGreaterThan(rx0, minimum, "\(r)", file: file, line: line)
        XCTAssertEqual(rx0, tx1 + drops1, "every packet received on port 0 is sent or counted as dropped on port 1", file: file, line: line)
        XCTAssertEqual(r.port(1)?["ring"] as? String, ring, file: file, line: line)
        XCTAssertEqual(r.int("mbufsInUseAfterStop"), 0, "\(r)", file: file, line: line)
        let sinkStats = try sink.stop()
        _ = try source.stop()
        if exactSink {
            XCTAssertEqual(sinkStats.rx, tx1, sink.tail(), file: file, line: line)
        } else {
            XCTAssertLessThanOrEqual(sinkStats.rx, tx1, file: file, line: line)
            XCTAssertGreaterThanOrEqual(sinkStats.rx + 256, tx1, sink.tail(), file: file, line: line)
        }
    }
}
