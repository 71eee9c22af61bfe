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

/// What the dataplane lcore does when there is nothing to do.
public enum IdleMode: String, Sendable, CaseIterable {
    /// Busy-poll always (lowest latency; the lcore is 100 % busy).
    case poll
    /// After `idleSpinMicroseconds` of empty polls, ask the device for an RX notification, look
    /// once more, and sleep on the RX call eventfd, the loop's wake-up eventfd and the next timer;
    /// on wake, back to polling with notifications suppressed.
    case adaptive
}

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
    /// The interface's MTU, 576...9000. Over 1500 the pool's mbufs are sized to hold a whole
    /// frame (9 KiB of data each at 9000: mind `memoryMB` against `mbufs`), and TCP sends
    /// segments up to mtu - 40 bytes to peers whose SYN offers that MSS. A device that gives its
    /// MTU (VIRTIO_NET_F_MTU) must allow it.
    public var mtu = 1500
    /// Listen on `vhostUserPath` for the backend (vhost-user server mode) instead of connecting.
    public var vhostUserServer = false
    /// Ride through a backend restart (the stack and its connections stay; TCP retransmits what
    /// the outage lost). nil: a lost backend ends `run`.
    public var reconnect: ReconnectPolicy?
    /// Name of the DPDK mempool.
    public var poolName = "dataplane_pool"
    /// Busy-poll, or sleep when idle (the default: a server that waits for requests should not
    /// burn a core).
    public var idle = IdleMode.adaptive
    /// How long polls must stay empty before an adaptive loop sleeps.
    public var idleSpinMicroseconds = 200
    /// The longest sleep (lwIP's timer thread wakes a sleeping loop when it sends; the stack's
    /// 100 ms tick and the loop's timers bound a sleep too).
    public var maxSleepMicroseconds = 100_000

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
    /// The TSC rate (`NetStack.busyCycles` is in these cycles).
    public var tscHz: UInt64 { TSC.hz }
    /// A bootstrap for TCP servers on this dataplane.
    public func serverBootstrap() -> DataplaneServerBootstrap { DataplaneServerBootstrap(loop: loop, stack: stack) }
}

/// The running dataplane (one per process: lwIP is one stack).
private let currentContext = Mutex<DataplaneContext?>(nil)

/// Set by SIGINT/SIGTERM when `run` handles signals.
private let signalStop = Atomic<Bool>(false)

public enum Dataplane {
    /// SIGINT/SIGTERM stop `run` cleanly (the port is closed, so the device sees an orderly stop).
    public static func installSignalHandlers() {
        for sig in [SIGINT, SIGTERM] {
            signal(sig) { _ in signalStop.store(true, ordering: .relaxed) }
        }
    }

    /// The dataplane `run` is running, for code that did not get its context (e.g. a route that
    /// reports `stack.busyCycles`). Use the stack and channels on the loop only.
    public static var current: DataplaneContext? { currentContext.withLock { $0 } }

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
        // However `run` ends, DPDK's runtime files go (idempotent).
        defer { EAL.cleanup() }
        let pool: PacketPool
        guard (576...9000).contains(config.mtu) else { throw DataplaneError.setup("\(NetStackError.invalidMTU(config.mtu))") }
        // A frame per mbuf: headroom (128, with the virtio-net header in it), then the frame.
        let dataRoom = config.mtu <= 1500 ? 2048 + 128 : 128 + (config.mtu + 14 + 1023) / 1024 * 1024
        do { pool = try PacketPool(name: config.poolName, count: config.mbufs, dataRoom: dataRoom) } catch {
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
        if let deviceMTU = device.mtu, deviceMTU < config.mtu {
            _ = port.close()
            throw DataplaneError.setup("MTU \(config.mtu) is more than the device allows (VIRTIO_NET_F_MTU: \(deviceMTU))")
        }
        var stackConfig = NetStackConfig(interface: config.interface, gateway: config.gateway)
        stackConfig.burst = config.burst
        stackConfig.mtu = config.mtu
        let stack: NetStack
        do { stack = try NetStack(port: port, config: stackConfig) } catch {
            _ = port.close()
            throw DataplaneError.setup("\(error)")
        }
        let loop = DataplaneEventLoop()
        let context = DataplaneContext(loop: loop, stack: stack, pool: pool, mac: port.mac, features: port.features.description)
        currentContext.withLock { $0 = context }
        defer { currentContext.withLock { $0 = nil } }
        do { try setup(context) } catch {
            _ = port.close()
            throw error
        }
        var linkError: String?
        var linkWasDown = false
        var turns = 0
        // Adaptive idle: sleep on the RX queue's call eventfd after a spell of empty turns.
        let callFD = port.rxNotificationDescriptor
        var idle = config.idle
        if idle == .adaptive && callFD == nil {
            logger.warning("dataplane: the transport cannot wait for RX notifications; --idle poll")
            idle = .poll
        }
        let spinCycles = TSC.hz / 1_000_000 * UInt64(max(1, config.idleSpinMicroseconds))
        let maxSleepCycles = TSC.hz / 1_000_000 * UInt64(max(100, config.maxSleepMicroseconds))
        if idle == .adaptive { stack.setWakeDescriptor(loop.wakeFD) }
        var lastWork = stack.turnsWithWork
        var idleSince = TSC.now()
        loop.run { loop in
            stack.poll(&port, work: loop)
            turns &+= 1
            var woke = false
            if idle == .adaptive {
                if stack.turnsWithWork != lastWork {
                    lastWork = stack.turnsWithWork
                    idleSince = TSC.now()
                } else if TSC.now() &- idleSince > spinCycles {
                    if stack.prepareToSleep() && !loop.hasWork && port.enableRxNotifications() {
                        woke = loop.sleep(maxCycles: min(maxSleepCycles, stack.cyclesUntilTick), descriptor: callFD)
                    }
                    stack.endSleep()
                    port.disableRxNotifications()
                    // Still idle: the next empty turn sleeps again at once (a wake that brings
                    // work resets this); spinning after every timed-out sleep would cost ~4 %.
                    idleSince = TSC.now() &- spinCycles &- 1
                }
            }
            guard turns & 1023 == 0 || woke, linkError == nil else { return }
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
        stack.detach()
        _ = port.close()
        // Every mbuf should be home now: the rings', the staged frames', the stack's spares.
        logger.info("dataplane: port closed; \(pool.inUseCount) mbufs outside pool \(pool.name)")
        if let e = linkError { throw DataplaneError.linkLost(e) }
    }
}
