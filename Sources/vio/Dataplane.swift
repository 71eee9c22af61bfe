import VirtioCore
import ArgumentParser
import CVioLinux
import DPDK
import Foundation
import Logging
import Synchronization
import VhostUser
import VirtioNet
import VirtioPCI

/// Set by SIGINT/SIGTERM; the poll loops read it once per iteration.
let stopRequested = Atomic<Bool>(false)

func installStopHandler() {
    // Stats lines go out as they are printed, also into a pipe or a file.
    setvbuf(stdout, nil, _IOLBF, 0)
    cvio_install_stop_handler { _ in stopRequested.store(true, ordering: .relaxed) }
}

/// A user-facing failure: printed as `vio: error: …`, exit status 1 (2 for a lost link).
struct VioFailure: Error, CustomStringConvertible {
    var description: String
    var exitCode: Int32 = 1
}

/// Runs a command body; a `VioFailure` becomes `vio: error: …` on stderr and its exit status.
func reportingFailures(_ body: () throws -> Void) throws {
    // However the command ends, DPDK's files go (EAL.cleanup is idempotent and a no-op before init).
    defer { EAL.cleanup() }
    do { try body() } catch let f as VioFailure {
        FileHandle.standardError.write(Data("vio: error: \(f.description)\n".utf8))
        throw ExitCode(f.exitCode)
    }
}

/// Logs to stderr, at debug level with --verbose.
func bootstrapLogging(verbose: Bool) -> Logger {
    LoggingSystem.bootstrap { label in
        var h = StreamLogHandler.standardError(label: label)
        h.logLevel = verbose ? .debug : .info
        return h
    }
    return Logger(label: "vio")
}

/// `--port vhost:PATH`, `--port vhost-server:PATH` (vio listens, the backend connects) or
/// `--port pci:DDDD:BB:DD.F` (a virtio-net PCI function bound to uio_pci_generic).
struct PortURI: ExpressibleByArgument, CustomStringConvertible {
    /// The socket path, or the PCI address for `pci:`.
    var path: String
    var isPCI = false
    var isServer = false
    init?(argument: String) {
        if argument.hasPrefix("pci:"), argument.count > 4 {
            path = String(argument.dropFirst(4)); isPCI = true; return
        }
        if argument.hasPrefix("vhost-server:"), argument.count > 13 {
            path = String(argument.dropFirst(13)); isServer = true; return
        }
        guard argument.hasPrefix("vhost:"), argument.count > 6 else { return nil }
        path = String(argument.dropFirst(6))
    }
    var description: String { isPCI ? "pci:\(path)" : isServer ? "vhost-server:\(path)" : "vhost:\(path)" }
    static var defaultValueDescription: String { "vhost:/path/to.sock|vhost-server:/path/to.sock|pci:0000:00:04.0" }
}

/// `--reconnect[=TIMEOUT]`: ride through a backend restart, waiting at most TIMEOUT for it
/// (bare `--reconnect`: no limit; vio turns it into `--reconnect=none` before parsing).
struct ReconnectOption: ExpressibleByArgument, CustomStringConvertible {
    var timeout: Double?
    init?(argument: String) {
        if argument == "none" || argument == "inf" { timeout = nil; return }
        guard let s = Seconds(argument: argument), s.value > 0, s.value <= 86400 else { return nil }
        timeout = s.value
    }
    var policy: ReconnectPolicy { ReconnectPolicy(timeout: timeout) }
    var description: String { timeout.map { Seconds($0).description } ?? "none" }

    /// A bare `--reconnect` (not followed by a duration) becomes `--reconnect=none`.
    static func rewrite(_ args: [String]) -> [String] {
        var out: [String] = []
        for (i, a) in args.enumerated() {
            if a == "--reconnect" {
                let next = i + 1 < args.count ? args[i + 1] : nil
                if next == nil || next!.hasPrefix("-") || ReconnectOption(argument: next!) == nil { out.append("--reconnect=none"); continue }
            }
            out.append(a)
        }
        return out
    }
}

/// The EAL preset for a set of devices: virtio-pci needs hugepages with IOVAs as physical
/// addresses (`EALPreset.pci`); an explicit --eal-config wins.
func ealPreset(file: String?, pci: Bool) throws -> (EALPreset?, MemoryMode?) {
    if let path = file {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw VioFailure(description: "cannot read EAL preset \(path)")
        }
        return (EALPreset(fileContents: text), nil)
    }
    return pci ? (.pci, .hugepages) : (nil, nil)
}

extension MemoryMode: ExpressibleByArgument {}
extension RingLayoutChoice: ExpressibleByArgument {}

/// Options every dataplane command shares.
struct DataplaneOptions: ParsableArguments {
    @Option(name: .customLong("port"), help: "A virtio-net device: vhost:PATH (a vhost-user socket) or pci:DDDD:BB:DD.F (a virtio-net PCI function bound to uio_pci_generic). Repeatable.")
    var ports: [PortURI] = []
    @Option(help: "Descriptors per ring (power of two, 64...4096).")
    var ringSize = 256
    @Option(help: "Queue pairs per port (VIRTIO_NET_F_MQ; at most what the device offers).")
    var queues = 1
    @Option(help: "CPUs to poll on, one lcore each (e.g. 1 or 0,1); queue pairs are spread over them. Default: one lcore on the process affinity.")
    var lcores: CPUList?
    @Flag(help: "Also print stats lines per queue pair.")
    var perQueue = false
    @Option(help: "How long a vhost-user backend may take to answer a control message (e.g. 5s).")
    var replyTimeout = Seconds(VhostUserConnection.defaultReplyTimeout)
    @Option(help: ArgumentHelp("Ride through a restart of a vhost-user backend (or a virtio-pci DEVICE_NEEDS_RESET: reset and initialise again): link down, buffers reclaimed, reconnect with the same features; --reconnect alone waits without limit, --reconnect=30s at most 30 s.", valueName: "timeout"))
    var reconnect: ReconnectOption?
    @Flag(help: "Promiscuous RX mode (VIRTIO_NET_CTRL_RX_PROMISC on the control queue).")
    var promisc = false
    @Flag(help: "All-multicast RX mode (VIRTIO_NET_CTRL_RX_ALLMULTI).")
    var allmulti = false
    @Option(help: "The port's MAC address (aa:bb:cc:dd:ee:ff), given to the device with MAC_ADDR_SET when it has a control queue.")
    var mac: MACArgument?
    @Option(help: "Virtqueue layout: auto (packed when every port's device offers it), split or packed.")
    var ring: RingLayoutChoice = .auto
    @Option(help: "Packets per burst.")
    var burst = 32
    @Option(help: "Memory: auto (hugepages if free, else --no-huge), hugepages or nohuge.")
    var memory: MemoryMode = .auto
    @Option(help: "MiB of DPDK memory.")
    var memoryMb = 256
    @Option(help: "EAL preset file (e.g. Configs/eal/hugepages.conf) instead of the built-in one for --memory.")
    var ealConfig: String?
    @Option(help: "Mbufs in the pool.")
    var mbufs = 16384
    @Flag(help: "Do not negotiate VIRTIO_F_IN_ORDER (use the out-of-order ring path).")
    var noInOrder = false
    @Flag(help: "Do not negotiate VIRTIO_NET_F_MRG_RXBUF.")
    var noMrgRxbuf = false
    @Option(help: "Write final totals as JSON to this file.")
    var json: String?
    @Option(help: "Seconds between stats lines (0: none).")
    var statsPeriod = 1.0
    @Flag(help: "Log negotiation details.")
    var verbose = false

    func validate(portCount: ClosedRange<Int>) throws {
        guard portCount.contains(ports.count) else {
            throw ValidationError("give \(portCount.lowerBound == portCount.upperBound ? "\(portCount.lowerBound)" : "\(portCount.lowerBound) or \(portCount.upperBound)") --port vhost:PATH")
        }
        guard replyTimeout.value > 0, replyTimeout.value <= 3600 else { throw ValidationError("--reply-timeout must be more than 0 and at most 3600 s") }
        for p in ports where p.isPCI && PCIAddress(p.path) == nil {
            throw ValidationError("--port \(p): not a PCI address (expected pci:DDDD:BB:DD.F, e.g. pci:0000:00:04.0)")
        }
        if ports.contains(where: \.isPCI) && memory == .nohuge {
            throw ValidationError("pci: ports need hugepages (IOVAs are physical addresses); --memory nohuge cannot be used")
        }
        guard (1...512).contains(burst) else { throw ValidationError("--burst must be 1...512") }
        guard ringSize >= 64, ringSize <= 4096, ringSize & (ringSize - 1) == 0 else {
            throw ValidationError("--ring-size must be a power of two from 64 to 4096")
        }
        guard (1...256).contains(queues) else { throw ValidationError("--queues must be 1...256") }
        if let l = lcores {
            guard l.cpus.count <= queues else {
                throw ValidationError("--lcores gives \(l.cpus.count) lcores for \(queues) queue pair(s): each lcore needs at least one")
            }
        }
        guard mbufs >= ringSize * 2 * ports.count * queues + burst * 4 * (lcores?.cpus.count ?? 1) else {
            throw ValidationError("--mbufs \(mbufs) is too few for \(ports.count) port(s) with --ring-size \(ringSize)")
        }
    }
}

/// EAL, the pool and the ports' common setup.
struct Dataplane {
    let eal: EALReport
    let pool: PacketPool
    let logger: Logger

    init(_ o: DataplaneOptions, dataRoom: Int = 2048 + 128) throws {
        logger = bootstrapLogging(verbose: o.verbose)
        for (i, p) in o.ports.enumerated() where p.isPCI {
            do { _ = try VirtioPCITransport.probe(address: p.path, expecting: .net) } catch {
                throw VioFailure(description: "port \(i) (\(p)): \(error)")
            }
        }
        let (preset, forced) = try ealPreset(file: o.ealConfig, pci: o.ports.contains(where: \.isPCI))
        do {
            eal = try EAL.initialize(mode: forced ?? o.memory, memoryMB: o.memoryMb, preset: preset, lcoreCPUs: o.lcores?.cpus)
            pool = try PacketPool(name: "vio_pool", count: o.mbufs, dataRoom: dataRoom)
        } catch let e as DPDKError {
            throw VioFailure(description: e.description)
        }
        logger.info("\(eal.summary)")
    }

    /// Connects to every port's device (nothing negotiated yet).
    func connect(_ o: DataplaneOptions) throws -> [any VirtioTransport] {
        try o.ports.enumerated().map { id, uri in
            do {
                if uri.isPCI { return try VirtioPCITransport(address: uri.path, expecting: .net, logger: logger) }
                if uri.isServer {
                    // The first backend may take as long as a reconnect may.
                    return try VhostUserConnection(listeningAt: uri.path, logger: logger, replyTimeoutSeconds: o.replyTimeout.value,
                                                   acceptTimeout: o.reconnect?.timeout, abort: { stopRequested.load(ordering: .relaxed) })
                }
                return try VhostUserConnection(path: uri.path, logger: logger, replyTimeoutSeconds: o.replyTimeout.value)
            } catch ReconnectError.aborted {
                throw VioFailure(description: "port \(id) (\(uri)): stopped while waiting for a backend to connect")
            } catch ReconnectError.timedOut(let s) {
                throw VioFailure(description: "port \(id) (\(uri)): no backend connected within \(Seconds(s))", exitCode: 2)
            } catch {
                throw VioFailure(description: "port \(id) (\(uri)): \(error)")
            }
        }
    }

    /// Opens every port's device with one ring layout and `--queues` pairs and runs `body` with
    /// them, specialised for the layout.
    func open<Body: VirtioNetDeviceBody>(_ o: DataplaneOptions, _ body: Body) throws -> Body.Output {
        let transports = try connect(o)
        var opts = VirtioNetOptions()
        opts.ringSize = o.ringSize
        opts.queuePairs = o.queues
        opts.ring = o.ring
        opts.allowInOrder = !o.noInOrder
        opts.allowMergeableRxBuffers = !o.noMrgRxbuf
        opts.mac = o.mac?.address
        if o.promisc { opts.promiscuous = true }
        if o.allmulti { opts.allMulticast = true }
        opts.reconnect = o.reconnect?.policy
        do {
            return try openVirtioNetDevices(transports, pool: pool, options: opts, logger: logger, body)
        } catch let e as VirtioNetOpenError {
            throw VioFailure(description: "port \(e.device) (\(o.ports[e.device])): \(e.error)")
        }
    }
}

/// `--mac 02:00:00:00:00:42`.
struct MACArgument: ExpressibleByArgument {
    var address: EthernetAddress
    init?(argument: String) {
        let parts = argument.split(separator: ":").compactMap { UInt8($0, radix: 16) }
        guard parts.count == 6, argument.split(separator: ":").count == 6 else { return nil }
        address = EthernetAddress(parts)
    }
}

/// `--lcores 0,1`: CPUs, one lcore each.
struct CPUList: ExpressibleByArgument {
    var cpus: [Int]
    init?(argument: String) {
        let parts = argument.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !parts.isEmpty, parts.allSatisfy({ $0 != nil && $0! >= 0 && $0! < 1024 }) else { return nil }
        cpus = parts.map { $0! }
        guard Set(cpus).count == cpus.count else { return nil }
    }
}

/// Final per-port totals, as printed and as written by --json.
struct PortReport: Codable {
    var port: Int
    var queue: Int
    /// The lcore that polled it (fwd).
    var lcore: Int?
    var path: String
    var features: String
    var ring: String
    var rxPackets: UInt64, rxBytes: UInt64, txPackets: UInt64, txBytes: UInt64
    var txDrops: UInt64, rxErrors: UInt64, txErrors: UInt64, rxNoMbuf: UInt64
    var linkError: String?
    /// With --reconnect: TX frames offered while the link was down, and those in flight at a loss.
    var txLinkDown: UInt64?, txLostAtOutages: UInt64?
    /// With --reconnect: every loss of the device (the port's, repeated on each of its queues).
    var outages: [DeviceOutage]?

    init<Ring: Virtqueue & ~Copyable>(_ p: borrowing VirtioNetPort<Ring>, path: String, extraDrops: UInt64 = 0) {
        port = Int(p.portID); queue = p.queuePair; self.path = path; features = p.features.description; ring = Ring.layoutName
        let c = p.counters
        rxPackets = c.rxPackets; rxBytes = c.rxBytes; txPackets = c.txPackets; txBytes = c.txBytes
        txDrops = c.txDrops + extraDrops; rxErrors = c.rxErrors; txErrors = c.txErrors; rxNoMbuf = c.rxNoMbuf
        linkError = p.linkError
        if p.device.core.reconnectPolicy != nil {
            txLinkDown = c.txLinkDown; txLostAtOutages = p.txLostAtOutages
            outages = p.device.core.outages
        }
    }
}

func writeJSON<T: Encodable>(_ value: T, to path: String?) throws {
    guard let path else { return }
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    do { try enc.encode(value).write(to: URL(fileURLWithPath: path)) } catch {
        throw VioFailure(description: "cannot write \(path): \(error.localizedDescription)")
    }
}

/// Rates between two snapshots of a port's counters.
struct RateLine {
    static func format(port: Int, now: NetCounters, before: NetCounters, seconds: Double) -> String {
        func mpps(_ a: UInt64, _ b: UInt64) -> String { String(format: "%7.3f", Double(a &- b) / seconds / 1e6) }
        func gbps(_ a: UInt64, _ b: UInt64) -> String { String(format: "%6.2f", Double(a &- b) * 8 / seconds / 1e9) }
        return "port \(port): rx \(mpps(now.rxPackets, before.rxPackets)) Mpps \(gbps(now.rxBytes, before.rxBytes)) Gbit/s | "
            + "tx \(mpps(now.txPackets, before.txPackets)) Mpps \(gbps(now.txBytes, before.txBytes)) Gbit/s | "
            + "drops \(now.txDrops) errors \(now.rxErrors + now.txErrors)"
    }
}
