import ArgumentParser
import DataplaneHTTP
import DPDK
import Foundation
import Logging
import NetStack
import NIODataplane

extension IPv4Interface: ExpressibleByArgument {
    public init?(argument: String) { self.init(cidr: argument) }
}

extension IPv4Address: ExpressibleByArgument {
    public init?(argument: String) { self.init(argument) }
}

/// `vio httpd`: an HTTP server whose TCP/IP runs on a virtio-net port (lwIP on the dataplane).
struct Httpd: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve HTTP over TCP/IP (lwIP) on a virtio-net port: /hello, a static directory, /stats.",
        discussion: """
            A config file (e.g. Configs/httpd/default.toml) sets defaults with the same names as the flags
            (port, ip, gateway, listen, root, memory, memory_mb, mbufs, ring_size, body_limit, max_header_bytes,
            request_timeout, idle_timeout); flags override it.
            """)

    @Option(help: "Config file (key = value lines, as in Configs/httpd/).")
    var config: String?
    @Option(help: ArgumentHelp("Ride through a restart of the vhost-user backend: TCP connections stay, TCP retransmits what the outage lost; --reconnect alone waits without limit, --reconnect=30s at most 30 s.", valueName: "timeout"))
    var reconnect: ReconnectOption?
    @Option(help: "The virtio-net device: vhost:PATH, or vhost-server:PATH (vio listens, the backend connects).")
    var port: PortURI?
    @Option(help: "Interface address and prefix, e.g. 198.18.0.2/24.")
    var ip: IPv4Interface?
    @Option(help: "Default gateway.")
    var gateway: IPv4Address?
    @Option(help: "TCP port to listen on.")
    var listen: UInt16?
    @Option(help: "Directory served at / (GET and HEAD).")
    var root: String?
    @Option(help: "Memory: auto (hugepages if free, else --no-huge), hugepages or nohuge.")
    var memory: MemoryMode?
    @Option(help: "MiB of DPDK memory.")
    var memoryMb: Int?
    @Option(help: "Mbufs in the pool.")
    var mbufs: Int?
    @Option(help: "Descriptors per ring (power of two, 64...4096).")
    var ringSize: Int?
    @Option(help: "Interface MTU, 576...9000 (over 1500: 9 KiB mbufs, and TCP segments up to MTU - 40 bytes to peers that offer that MSS).")
    var mtu: Int?
    @Option(help: "Largest request body in bytes (more: 413).")
    var bodyLimit: Int?
    @Option(help: "Largest request head in bytes (more: 431).")
    var maxHeaderBytes: Int?
    @Option(help: "Seconds a started request may take (then 408).")
    var requestTimeout: Double?
    @Option(help: "Seconds an idle keep-alive connection is kept.")
    var idleTimeout: Double?
    @Option(help: "When idle: adaptive (after 200 µs of empty polls, sleep on the RX queue's notification, the loop's wake-up and the next timer) or poll (busy-poll always).")
    var idle: IdleMode = .adaptive
    @Flag(help: "Log negotiation details.")
    var verbose = false

    /// The flags with the config file's values under them.
    struct Settings {
        var port: String?
        var ip: IPv4Interface?
        var gateway: IPv4Address?
        var listen: UInt16 = 8080
        var root: String?
        var memory: MemoryMode = .auto
        var memoryMb = 256
        var mbufs = 16384
        var ringSize = 1024
        var mtu = 1500
        var bodyLimit = 1 << 20
        var maxHeaderBytes = 16 * 1024
        var requestTimeout = 10.0
        var idleTimeout = 60.0
    }

    func settings() throws -> Settings {
        var s = Settings()
        if let path = config {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw ValidationError("cannot read config file \(path)")
            }
            for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
                let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false)[0].trimmingCharacters(in: .whitespaces)
                if line.isEmpty || line.hasPrefix("[") { continue }
                let kv = line.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
                guard kv.count == 2 else { throw ValidationError("\(path):\(n + 1): expected key = value") }
                let key = kv[0].replacingOccurrences(of: "-", with: "_")
                var value = kv[1]
                if value.count >= 2, value.hasPrefix("\""), value.hasSuffix("\"") { value = String(value.dropFirst().dropLast()) }
                func bad() -> ValidationError { ValidationError("\(path):\(n + 1): bad value for \(key): \(value)") }
                switch key {
                case "port": guard PortURI(argument: value) != nil else { throw bad() }; s.port = value
                case "ip": guard let v = IPv4Interface(cidr: value) else { throw bad() }; s.ip = v
                case "gateway": guard let v = IPv4Address(value) else { throw bad() }; s.gateway = v
                case "listen": guard let v = UInt16(value) else { throw bad() }; s.listen = v
                case "root": s.root = value
                case "memory": guard let v = MemoryMode(rawValue: value) else { throw bad() }; s.memory = v
                case "memory_mb": guard let v = Int(value) else { throw bad() }; s.memoryMb = v
                case "mbufs": guard let v = Int(value) else { throw bad() }; s.mbufs = v
                case "ring_size": guard let v = Int(value) else { throw bad() }; s.ringSize = v
                case "mtu": guard let v = Int(value) else { throw bad() }; s.mtu = v
                case "body_limit": guard let v = Int(value) else { throw bad() }; s.bodyLimit = v
                case "max_header_bytes": guard let v = Int(value) else { throw bad() }; s.maxHeaderBytes = v
                case "request_timeout": guard let v = Double(value) else { throw bad() }; s.requestTimeout = v
                case "idle_timeout": guard let v = Double(value) else { throw bad() }; s.idleTimeout = v
                default: throw ValidationError("\(path):\(n + 1): unknown key \(key)")
                }
            }
        }
        if let v = port { s.port = v.description }
        if let v = ip { s.ip = v }
        if let v = gateway { s.gateway = v }
        if let v = listen { s.listen = v }
        if let v = root { s.root = v }
        if let v = memory { s.memory = v }
        if let v = memoryMb { s.memoryMb = v }
        if let v = mbufs { s.mbufs = v }
        if let v = ringSize { s.ringSize = v }
        if let v = mtu { s.mtu = v }
        if let v = bodyLimit { s.bodyLimit = v }
        if let v = maxHeaderBytes { s.maxHeaderBytes = v }
        if let v = requestTimeout { s.requestTimeout = v }
        if let v = idleTimeout { s.idleTimeout = v }
        guard let p = s.port else { throw ValidationError("give --port vhost:PATH (or port in --config)") }
        if PortURI(argument: p)?.isPCI == true { throw ValidationError("vio httpd runs on vhost:PATH ports only (not pci:)") }
        guard s.ip != nil else { throw ValidationError("give --ip A.B.C.D/N (or ip in --config)") }
        guard s.listen > 0 else { throw ValidationError("--listen must be 1...65535") }
        guard s.ringSize >= 64, s.ringSize <= 4096, s.ringSize & (s.ringSize - 1) == 0 else {
            throw ValidationError("--ring-size must be a power of two from 64 to 4096")
        }
        guard (576...9000).contains(s.mtu) else { throw ValidationError("--mtu \(s.mtu) must be 576...9000") }
        guard s.mbufs >= s.ringSize * 2 + 4096 else { throw ValidationError("--mbufs \(s.mbufs) is too few for --ring-size \(s.ringSize)") }
        guard s.bodyLimit >= 0, s.maxHeaderBytes >= 256 else { throw ValidationError("--body-limit must be >= 0 and --max-header-bytes >= 256") }
        guard s.requestTimeout > 0, s.idleTimeout > 0 else { throw ValidationError("timeouts must be positive") }
        if let r = s.root {
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: r, isDirectory: &isDir), isDir.boolValue else {
                throw ValidationError("--root \(r) is not a directory")
            }
        }
        return s
    }

    func validate() throws { _ = try settings() }

    func run() throws { try reportingFailures { try serve() } }

    func serve() throws {
        let s = try settings()
        installStopHandler()
        let logger = bootstrapLogging(verbose: verbose)
        let uri = PortURI(argument: s.port!)!
        var c = HTTPDataplaneConfig(vhostUserPath: uri.path, interface: s.ip!)
        c.dataplane.vhostUserServer = uri.isServer
        c.dataplane.reconnect = reconnect?.policy
        c.dataplane.idle = idle
        c.dataplane.gateway = s.gateway
        c.dataplane.memory = s.memory
        c.dataplane.memoryMB = s.memoryMb
        c.dataplane.mbufs = s.mbufs
        c.dataplane.ringSize = s.ringSize
        c.dataplane.mtu = s.mtu
        c.listenPort = s.listen
        c.server.maxBodyBytes = s.bodyLimit
        c.server.maxHeaderBytes = s.maxHeaderBytes
        c.server.requestTimeoutMilliseconds = Int(s.requestTimeout * 1000)
        c.server.idleTimeoutMilliseconds = Int(s.idleTimeout * 1000)

        let router = HTTPRouter()
        router.get("/hello") { _ in .text("hello from swift-virtio\n") }
        router.post("/echo") { req in
            HTTPResponse(status: .ok, headers: ["Content-Type": "application/octet-stream"], body: .bytes(req.body))
        }
        if let r = s.root {
            router.staticFiles(at: "/", root: r)
        } else {
            router.get("/") { _ in .text("hello from swift-virtio\n") }
        }
        do {
            try HTTPDataplane.run(c, router: router, logger: logger, handleSignals: false, onReady: {
                print("httpd: listening on \(s.ip!.address):\(s.listen)")
            }, shouldStop: { stopRequested.load(ordering: .relaxed) })
        } catch let e as HTTPDataplaneError {
            if case .linkLost = e { throw VioFailure(description: e.description, exitCode: 2) }
            throw VioFailure(description: e.description)
        }
        print("httpd: stopped")
    }
}

extension IdleMode: ExpressibleByArgument {}
