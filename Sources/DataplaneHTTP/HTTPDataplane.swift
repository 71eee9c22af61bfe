import DPDK
import Foundation
import Logging
import NetStack
import NIODataplane
import Synchronization
import NIOCore
import NIOHTTP1
import VhostUser
import VirtioCore
import VirtioNet

/// Everything needed to serve HTTP on a vhost-user virtio-net port.
public struct HTTPDataplaneConfig: Sendable {
    /// The dataplane under the server: the device, memory, rings, reconnect and idle mode.
    public var dataplane: DataplaneConfig
    public var listenPort: UInt16 = 8080
    public var server = HTTPServerOptions()

    public init(vhostUserPath: String, interface: IPv4Interface) {
        dataplane = DataplaneConfig(vhostUserPath: vhostUserPath, interface: interface)
        dataplane.poolName = "httpd_pool"
    }
}

/// The errors of `HTTPDataplane.run` are those of `Dataplane.run` (setup, lost link).
public typealias HTTPDataplaneError = DataplaneError

/// Driver, stack and HTTP counters as `/stats` serves them.
public struct HTTPDataplaneStats: Codable, Sendable {
    public var driver: DriverStats
    public var stack: StackCounters
    public var http: HTTPCounters
    public var mbufsInUse: Int
    public var uptimeSeconds: Double
    /// Cycles of the dataplane lcore's turns that had work, and the TSC rate.
    public var busyCycles: UInt64
    public var busyTurns: UInt64
    public var tscHz: UInt64
    /// The idle mode, how often an adaptive loop slept and for how long in all.
    public var idle: String
    public var idleSleeps: UInt64
    public var idleSleptSeconds: Double

    public struct DriverStats: Codable, Sendable {
        public var mac: String
        public var features: String
        public var rxPackets: UInt64, rxBytes: UInt64, txPackets: UInt64, txBytes: UInt64
        public var txDrops: UInt64, rxErrors: UInt64, txErrors: UInt64, rxNoMbuf: UInt64
    }
}

/// Runs an HTTP server on a virtio-net port on the calling thread (the dataplane lcore):
/// `Dataplane.run` opens the port, starts the stack and runs the event loop; `HTTPServer` serves
/// `router` on dataplane channels until `shouldStop` returns true (checked every 1024 loop
/// turns), a signal arrives (with `handleSignals`) or the link is lost.
///
/// ```swift
/// let router = HTTPRouter()
/// router.get("/") { _ in .text("hello\n") }
/// try HTTPDataplane.run(HTTPDataplaneConfig(vhostUserPath: "/tmp/vhost.sock",
///                                           interface: IPv4Interface(cidr: "198.18.0.2/24")!),
///                       router: router)
/// ```
public enum HTTPDataplane {
    /// Adds `GET /stats` (JSON: driver, stack and HTTP counters) to `router` and serves.
    /// `onReady` runs once the server listens (e.g. to print a line a supervisor waits for).
    /// With `handleSignals`, SIGINT and SIGTERM stop it (pass false if the caller handles them and
    /// answers through `shouldStop`).
    public static func run(_ config: HTTPDataplaneConfig, router: HTTPRouter, logger: Logger = Logger(label: "httpd"),
                           statsPath: String? = "/stats", handleSignals: Bool = true, onReady: (() -> Void)? = nil,
                           shouldStop: @escaping () -> Bool = { false }) throws {
        let started = Date()
        var bindError: Error?
        try Dataplane.run(config.dataplane, logger: logger, handleSignals: handleSignals, shouldStop: { shouldStop() || bindError != nil }) { dp in
            let server = HTTPServer(loop: dp.loop, router: router, options: config.server)
            let stack = dp.stack, pool = dp.pool, mac = dp.mac.description, features = dp.features
            if let statsPath {
                router.get(statsPath) { [unowned server, unowned stack] _ in
                    server.tick()   // response byte counts up to now
                    let d = stack.driverCounters
                    let stats = HTTPDataplaneStats(
                        driver: .init(mac: mac, features: features, rxPackets: d.rxPackets, rxBytes: d.rxBytes,
                                      txPackets: d.txPackets, txBytes: d.txBytes, txDrops: d.txDrops, rxErrors: d.rxErrors,
                                      txErrors: d.txErrors, rxNoMbuf: d.rxNoMbuf),
                        stack: stack.counters, http: server.counters, mbufsInUse: pool.inUseCount,
                        uptimeSeconds: Date().timeIntervalSince(started), busyCycles: stack.busyCycles, busyTurns: stack.busyTurns, tscHz: TSC.hz,
                        idle: config.dataplane.idle.rawValue, idleSleeps: dp.loop.sleeps,
                        idleSleptSeconds: Double(dp.loop.sleptCycles) / Double(TSC.hz))
                    let enc = JSONEncoder()
                    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
                    guard let data = try? enc.encode(stats) else { return .text("cannot encode stats\n", status: .internalServerError) }
                    var b = ByteBufferAllocator().buffer(capacity: data.count + 1)
                    b.writeBytes(data)
                    b.writeString("\n")
                    return HTTPResponse(status: .ok, headers: ["Content-Type": "application/json"], body: .bytes(b))
                }
            }
            server.bind(dp.serverBootstrap(), port: Int(config.listenPort)).whenComplete { result in
                switch result {
                case .success:
                    logger.info("httpd: \(config.dataplane.interface) mac \(mac), listening on TCP port \(config.listenPort)")
                    onReady?()
                case .failure(let e):
                    bindError = e
                }
            }
        }
        if let e = bindError { throw HTTPDataplaneError.setup("\(e)") }
    }
}
