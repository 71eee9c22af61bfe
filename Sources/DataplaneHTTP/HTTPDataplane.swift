import DPDK
import Foundation
import Logging
import NetStack
import Synchronization
import NIOCore
import NIOHTTP1
import VhostUser
import VirtioCore
import VirtioNet

/// Everything needed to serve HTTP on a vhost-user virtio-net port.
public struct HTTPDataplaneConfig: Sendable {
    /// The vhost-user socket of the virtio-net device.
    public var vhostUserPath: String
    public var interface: IPv4Interface
    public var gateway: IPv4Address?
    public var listenPort: UInt16 = 8080
    public var memory: MemoryMode = .auto
    public var memoryMB = 256
    public var mbufs = 16384
    public var ringSize = 1024
    public var burst = 32
    public var server = HTTPServerOptions()
    /// Listen on `vhostUserPath` for the backend (vhost-user server mode) instead of connecting.
    public var vhostUserServer = false
    /// Ride through a backend restart (the TCP stack and its connections stay; TCP retransmits
    /// what the outage lost). nil: a lost backend ends `run`.
    public var reconnect: ReconnectPolicy?

    public init(vhostUserPath: String, interface: IPv4Interface) {
        self.vhostUserPath = vhostUserPath
        self.interface = interface
    }
}

/// The port type `run` opens: the split ring (the HTTP path is bound by the stack, not the ring).
public typealias HTTPDataplanePort = VirtioNetPort<SplitVirtqueue>

public enum HTTPDataplaneError: Error, CustomStringConvertible {
    case setup(String)
    case linkLost(String)
    public var description: String {
        switch self {
        case .setup(let s): return s
        case .linkLost(let s): return "link lost: \(s)"
        }
    }
}

/// Driver, stack and HTTP counters as `/stats` serves them.
public struct HTTPDataplaneStats: Codable, Sendable {
    public var driver: DriverStats
    public var stack: StackCounters
    public var http: HTTPCounters
    public var mbufsInUse: Int
    public var uptimeSeconds: Double

    public struct DriverStats: Codable, Sendable {
        public var mac: String
        public var features: String
        public var rxPackets: UInt64, rxBytes: UInt64, txPackets: UInt64, txBytes: UInt64
        public var txDrops: UInt64, rxErrors: UInt64, txErrors: UInt64, rxNoMbuf: UInt64
    }
}

/// Runs an HTTP server on a virtio-net port on the calling thread (the dataplane lcore):
/// initialises DPDK, opens the port, starts the stack and serves `router` until `shouldStop`
/// returns true (checked every 1024 loop turns) or the link is lost.
///
/// ```swift
/// let router = HTTPRouter()
/// router.get("/") { _ in .text("hello\n") }
/// try HTTPDataplane.run(HTTPDataplaneConfig(vhostUserPath: "/tmp/vhost.sock",
///                                           interface: IPv4Interface(cidr: "198.18.0.2/24")!),
///                       router: router)
/// ```
/// Set by SIGINT/SIGTERM when `run` handles signals.
private let signalStop = Atomic<Bool>(false)

public enum HTTPDataplane {
    /// SIGINT/SIGTERM stop `run` cleanly (the port is closed, so the device sees an orderly stop).
    static func installSignalHandlers() {
        for sig in [SIGINT, SIGTERM] {
            signal(sig) { _ in signalStop.store(true, ordering: .relaxed) }
        }
    }

    /// Adds `GET /stats` (JSON: driver, stack and HTTP counters) to `router` and serves.
    /// `onReady` runs once the server listens (e.g. to print a line a supervisor waits for).
    /// With `handleSignals`, SIGINT and SIGTERM stop it (pass false if the caller handles them and
    /// answers through `shouldStop`).
    public static func run(_ config: HTTPDataplaneConfig, router: HTTPRouter, logger: Logger = Logger(label: "httpd"),
                           statsPath: String? = "/stats", handleSignals: Bool = true, onReady: (() -> Void)? = nil,
                           shouldStop: @escaping () -> Bool = { false }) throws {
        if handleSignals { installSignalHandlers() }
        do {
            let eal = try EAL.initialize(mode: config.memory, memoryMB: config.memoryMB)
            logger.info("\(eal.summary)")
        } catch {
            throw HTTPDataplaneError.setup("\(error)")
        }
        let pool: PacketPool
        do { pool = try PacketPool(name: "httpd_pool", count: config.mbufs) } catch {
            throw HTTPDataplaneError.setup("\(error)")
        }
        var opts = VirtioNetOptions()
        opts.ringSize = config.ringSize
        opts.reconnect = config.reconnect
        var port: HTTPDataplanePort
        let device: VirtioNetDevice<SplitVirtqueue>
        do {
            let stop = shouldStop
            let transport = config.vhostUserServer
                ? try VhostUserConnection(listeningAt: config.vhostUserPath, logger: logger, acceptTimeout: config.reconnect?.timeout,
                                          abort: { stop() || signalStop.load(ordering: .relaxed) })
                : try VhostUserConnection(path: config.vhostUserPath, logger: logger)
            device = try VirtioNetDevice(transport: transport, pool: pool, options: opts, logger: logger)
            port = try device.makePort(0)  // the port keeps its device
        } catch {
            throw HTTPDataplaneError.setup("port vhost:\(config.vhostUserPath): \(error)")
        }
        var stackConfig = NetStackConfig(interface: config.interface, gateway: config.gateway)
        stackConfig.burst = config.burst
        let stack: NetStack
        do { stack = try NetStack(port: port, config: stackConfig) } catch {
            throw HTTPDataplaneError.setup("\(error)")
        }
        let server = HTTPServer(stack: stack, router: router, options: config.server)
        let started = Date()
        let mac = port.mac.description
        let features = port.features.description
        if let statsPath {
            router.get(statsPath) { [unowned server, unowned stack] _ in
                let d = stack.driverCounters
                let stats = HTTPDataplaneStats(
                    driver: .init(mac: mac, features: features, rxPackets: d.rxPackets, rxBytes: d.rxBytes,
                                  txPackets: d.txPackets, txBytes: d.txBytes, txDrops: d.txDrops, rxErrors: d.rxErrors,
                                  txErrors: d.txErrors, rxNoMbuf: d.rxNoMbuf),
                    stack: stack.counters, http: server.counters, mbufsInUse: pool.inUseCount,
                    uptimeSeconds: Date().timeIntervalSince(started))
                let enc = JSONEncoder()
                enc.outputFormatting = [.prettyPrinted, .sortedKeys]
                guard let data = try? enc.encode(stats) else { return .text("cannot encode stats\n", status: .internalServerError) }
                var b = ByteBufferAllocator().buffer(capacity: data.count + 1)
                b.writeBytes(data)
                b.writeString("\n")
                return HTTPResponse(status: .ok, headers: ["Content-Type": "application/json"], body: .bytes(b))
            }
        }
        do { try server.listen(port: config.listenPort) } catch {
            throw HTTPDataplaneError.setup("\(error)")
        }
        logger.info("httpd: \(config.interface) mac \(mac), listening on TCP port \(config.listenPort)")
        onReady?()
        var linkError: String?
        var linkWasDown = false
        var turns = 0
        while true {
            stack.poll(&port)
            turns &+= 1
            guard turns & 1023 == 0 else { continue }
            // With a reconnect policy a lost backend only pauses the port (its rings hand their
            // mbufs back); lwIP keeps its connections and retransmits once the link is back.
            switch port.maintainLink() {
            case .failed(let why, _): linkError = why
            case .down(let why) where !linkWasDown: linkWasDown = true; logger.warning("httpd: link down (\(why)); reconnecting")
            case .reconnected: linkWasDown = false; logger.info("httpd: link up again (device reconnected)")
            default: break
            }
            if linkError != nil { break }
            if shouldStop() || signalStop.load(ordering: .relaxed) { break }
        }
        _ = port.close()
        if let e = linkError { throw HTTPDataplaneError.linkLost(e) }
    }
}
