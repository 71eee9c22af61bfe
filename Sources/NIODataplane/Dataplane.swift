#if canImport(Glibc)
import Glibc
#endif
import DPDK
import Logging
import NetStack
import NIOCore
import Synchronization
import VhostUser
import VirtioCore
import VirtioNet

/// A TCP/IP dataplane on one vhost-user virtio-net port: what `Dataplane.run` opens.
public struct DataplaneConfig: Sendable {
    /// The vhost-user socket of the virtio-net device.
    public var vhostUserPath: String
    public var interface: IPv4Interface
    public var gateway: IPv4Address?
    public var memory: MemoryMode = .auto
    public var memoryMB = 256
    public var mbufs = 16384
    public var ringSize = 1024
    public var burst = 32
    /// Listen on `vhostUserPath` for the backend (vhost-user server mode) instead of connecting.
    public var vhostUserServer = false
    /// Ride through a backend restart (the stack and its connections stay; TCP retransmits what
    /// the outage lost). nil: a lost backend ends `run`.
    public var reconnect: ReconnectPolicy?
    /// Name of the DPDK mempool.
    public var poolName = "dataplane_pool"

    public init(vhostUserPath: String, interface: IPv4Interface) {
        self.vhostUserPath = vhostUserPath
        self.interface = interface
    }
}

public enum DataplaneError: Error, CustomStringConvertible {
    case setup(String)
    case linkLost(String)
    public var description: String {
        switch self {
        case .setup(let s): return s
        case .linkLost(let s): return "link lost: \(s)"
        }
    }
}

/// What a running dataplane hands to the application's setup.
public struct DataplaneContext: @unchecked Sendable {
    public let loop: DataplaneEventLoop
    public let stack: NetStack
    public let pool: PacketPool
    public let mac: EthernetAddress
    public let features: String
    /// A bootstrap for TCP servers on this dataplane.
    public func serverBootstrap() -> DataplaneServerBootstrap { DataplaneServerBootstrap(loop: loop, stack: stack) }
}

/// Set by SIGINT/SIGTERM when `run` handles signals.
private let signalStop = Atomic<Bool>(false)

public enum Dataplane {
    /// SIGINT/SIGTERM stop `run` cleanly (the port is closed, so the device sees an orderly stop).
    public static func installSignalHandlers() {
        for sig in [SIGINT, SIGTERM] {
            signal(sig) { _ in signalStop.store(true, ordering: .relaxed) }
        }
    }

    /// True once SIGINT or SIGTERM arrived (with `installSignalHandlers`).
    public static var signalled: Bool { signalStop.load(ordering: .relaxed) }

    /// Opens the port, starts the TCP/IP stack and runs the event loop on the calling thread
    /// (the dataplane lcore) until the loop is shut down, `shouldStop` returns true, a signal
    /// arrives (with `handleSignals`) or the link is lost. `setup` runs first, before the loop
    /// turns: bind servers there (their futures complete once the loop runs; do not `wait()` on
    /// them in `setup`). On the way out every channel is closed and the port is stopped.
    ///
    /// ```swift
    /// try Dataplane.run(DataplaneConfig(vhostUserPath: "/tmp/vhost.sock",
    ///                                   interface: IPv4Interface(cidr: "198.18.0.2/24")!)) { dp in
    ///     _ = dp.serverBootstrap()
    ///         .childChannelInitializer { ch in ch.pipeline.addHandler(EchoHandler()) }
    ///         .bind(port: 7)
    /// }
    /// ```
    public static func run(_ config: DataplaneConfig, logger: Logger = Logger(label: "dataplane"), handleSignals: Bool = true,
                           shouldStop: @escaping () -> Bool = { false },
                           setup: (DataplaneContext) throws -> Void) throws {
        if handleSignals { installSignalHandlers() }
        do {
            let eal = try EAL.initialize(mode: config.memory, memoryMB: config.memoryMB)
            logger.info("\(eal.summary)")
        } catch {
            throw DataplaneError.setup("\(error)")
        }
        let pool: PacketPool
        do { pool = try PacketPool(name: config.poolName, count: config.mbufs) } catch {
            throw DataplaneError.setup("\(error)")
        }
        var opts = VirtioNetOptions()
        opts.ringSize = config.ringSize
        opts.reconnect = config.reconnect
        var port: VirtioNetPort<SplitVirtqueue>
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
            throw DataplaneError.setup("port vhost:\(config.vhostUserPath): \(error)")
        }
        var stackConfig = NetStackConfig(interface: config.interface, gateway: config.gateway)
        stackConfig.burst = config.burst
        let stack: NetStack
        do { stack = try NetStack(port: port, config: stackConfig) } catch {
            _ = port.close()
            throw DataplaneError.setup("\(error)")
        }
        let loop = DataplaneEventLoop()
        let context = DataplaneContext(loop: loop, stack: stack, pool: pool, mac: port.mac, features: port.features.description)
        do { try setup(context) } catch {
            _ = port.close()
            throw error
        }
        var linkError: String?
        var linkWasDown = false
        var turns = 0
        loop.run { loop in
            stack.poll(&port, work: loop)
            turns &+= 1
            guard turns & 1023 == 0, linkError == nil else { return }
            // With a reconnect policy a lost backend only pauses the port (its rings hand their
            // mbufs back); lwIP keeps its connections and retransmits once the link is back.
            switch port.maintainLink() {
            case .failed(let why, _): linkError = why
            case .down(let why) where !linkWasDown: linkWasDown = true; logger.warning("dataplane: link down (\(why)); reconnecting")
            case .reconnected: linkWasDown = false; logger.info("dataplane: link up again (device reconnected)")
            default: break
            }
            if linkError != nil || shouldStop() || signalStop.load(ordering: .relaxed) {
                if !loop.isShuttingDown { loop.shutdownGracefully { _ in } }
            }
        }
        _ = port.close()
        if let e = linkError { throw DataplaneError.linkLost(e) }
    }
}
