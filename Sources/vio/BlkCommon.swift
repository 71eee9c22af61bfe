import ArgumentParser
import DPDK
import Foundation
import Logging
import VhostUser
import VirtioBlk
import VirtioCore
import VirtioPCI

/// `--dev vhost-user-blk:PATH` or `--dev pci:DDDD:BB:DD.F` (a virtio-blk PCI function bound to uio_pci_generic).
struct BlkDeviceURI: ExpressibleByArgument, CustomStringConvertible {
    var path: String
    var isPCI = false
    init?(argument: String) {
        if argument.hasPrefix("pci:"), PCIAddress(String(argument.dropFirst(4))) != nil {
            path = String(argument.dropFirst(4)); isPCI = true; return
        }
        guard argument.hasPrefix("vhost-user-blk:"), argument.count > 15 else { return nil }
        path = String(argument.dropFirst(15))
    }
    var description: String { isPCI ? "pci:\(path)" : "vhost-user-blk:\(path)" }
    static var defaultValueDescription: String { "vhost-user-blk:/path/to.sock|pci:0000:00:05.0" }
}

/// Options every block command shares.
struct BlkOptions: ParsableArguments {
    @Option(help: "A virtio-blk device: vhost-user-blk:PATH (a vhost-user socket).")
    var dev: BlkDeviceURI?
    @Option(help: "Descriptors per queue (power of two, 4...4096). Default: 256; blkbench on a vhost-user-blk device: 4 x --iodepth if that is more, at most 1024 (every 4 KiB request a direct chain).")
    var queueSize: Int?
    @Option(help: "Memory: auto (hugepages if free, else --no-huge), hugepages or nohuge.")
    var memory: MemoryMode = .auto
    @Option(help: "MiB of DPDK memory.")
    var memoryMb = 256
    @Option(help: "Ring layout: auto (packed when the device offers it), split or packed.")
    var ring: RingLayoutChoice = .auto
    @Flag(help: "Do not negotiate VIRTIO_F_INDIRECT_DESC (split rings; packed rings never use it).")
    var noIndirect = false
    @Flag(help: "Do not negotiate VIRTIO_F_IN_ORDER.")
    var noInOrder = false
    @Option(help: "With indirect descriptors: requests of at most this many descriptors (header, data, status) go straight into the ring while a quarter of it stays free; 1 puts every request in a table.")
    var directChainLimit = 4
    @Flag(help: "Poll the used ring on every call, also while many requests are in flight (default: space polls so each finds a batch).")
    var noPollPacing = false
    @Option(help: "CPUs to poll on, one lcore each (e.g. 0,1); queues are spread over them (blkbench). Default: one lcore on the process affinity.")
    var lcores: CPUList?
    @Option(help: "A request the device has not completed after this long fails the run (e.g. 5s, 500ms).")
    var ioTimeout = Seconds(5)
    @Option(help: "How long a vhost-user backend may take to answer a control message (e.g. 5s).")
    var replyTimeout = Seconds(VhostUserConnection.defaultReplyTimeout)
    @Option(help: ArgumentHelp("Ride through a restart of the vhost-user backend (or a virtio-pci DEVICE_NEEDS_RESET): requests in flight are kept and submitted again after the reconnect; --reconnect alone waits without limit, --reconnect=30s at most 30 s.", valueName: "timeout"))
    var reconnect: ReconnectOption?
    @Flag(help: "With --reconnect: do not let the backend track in-flight requests (INFLIGHT_SHMFD); vio submits them again itself.")
    var noInflight = false
    @Flag(help: "Log negotiation details.")
    var verbose = false

    func validate() throws {
        guard ioTimeout.value > 0, ioTimeout.value <= 3600 else { throw ValidationError("--io-timeout must be more than 0 and at most 3600 s") }
        guard replyTimeout.value > 0, replyTimeout.value <= 3600 else { throw ValidationError("--reply-timeout must be more than 0 and at most 3600 s") }
    }
}

/// EAL and the connection to the device; `open` negotiates and runs a body on the device.
struct BlkSetup {
    let eal: EALReport
    let transport: any VirtioTransport
    let options: VirtioBlkOptions
    let uri: BlkDeviceURI
    let logger: Logger

    /// The queue size when --queue-size is not given: 256, or on a vhost-user device enough for
    /// `iodepth` requests of 3 descriptors each with a quarter of the ring free (4 x iodepth, a
    /// power of two, at most libvhost-user's 1024), as fio's io_uring engine sizes its ring to
    /// the depth. A virtio-pci device decides its own maximum (QEMU: 256).
    static func defaultQueueSize(iodepth: Int, pci: Bool) -> Int {
        if pci { return 256 }
        var size = 256
        while size < 4 * iodepth && size < 1024 { size *= 2 }
        return size
    }

    init(_ o: BlkOptions, queues: Int, iodepth: Int = 1) throws {
        logger = bootstrapLogging(verbose: o.verbose)
        guard let dev = o.dev else { throw VioFailure(description: "give --dev vhost-user-blk:PATH") }
        if dev.isPCI {
            do { _ = try VirtioPCITransport.probe(address: dev.path, expecting: .block) } catch {
                throw VioFailure(description: "\(dev): \(error)")
            }
        }
        let (preset, forced) = try ealPreset(file: nil, pci: dev.isPCI)
        do { eal = try EAL.initialize(mode: forced ?? o.memory, memoryMB: o.memoryMb, preset: preset, lcoreCPUs: o.lcores?.cpus) } catch let e as DPDKError {
            throw VioFailure(description: e.description)
        }
        logger.info("\(eal.summary)")
        var opts = VirtioBlkOptions()
        opts.queues = queues
        opts.queueSize = o.queueSize ?? Self.defaultQueueSize(iodepth: iodepth, pci: dev.isPCI)
        opts.allowIndirect = !o.noIndirect
        opts.allowInOrder = !o.noInOrder
        opts.directChainLimit = o.directChainLimit
        opts.pollPacing = !o.noPollPacing
        opts.ring = o.ring
        opts.reconnect = o.reconnect?.policy
        opts.allowInflightTracking = !o.noInflight
        options = opts
        uri = dev
        do {
            transport = dev.isPCI ? try VirtioPCITransport(address: dev.path, expecting: .block, logger: logger)
                                  : try VhostUserConnection(path: dev.path, logger: logger, replyTimeoutSeconds: o.replyTimeout.value,
                                                            inflightTracking: o.reconnect != nil && !o.noInflight)
        } catch {
            throw VioFailure(description: "\(dev): \(error)")
        }
    }

    /// Opens the device with the layout `--ring` resolves to and runs `body`, specialised for it.
    func open<Body: VirtioBlkDeviceBody>(_ body: Body) throws -> Body.Output {
        do { return try openVirtioBlkDevice(transport: transport, options: options, logger: logger, OpenFailure(body: body)) } catch let f as WrappedBodyFailure {
            throw f.error
        } catch {
            throw VioFailure(description: "\(uri): \(error)")
        }
    }

    /// Errors from the body itself pass through unchanged (only opening errors name the device).
    private struct WrappedBodyFailure: Error { var error: any Error }
    private struct OpenFailure<B: VirtioBlkDeviceBody>: VirtioBlkDeviceBody {
        let body: B
        func run<Ring: Virtqueue & ~Copyable>(_ device: VirtioBlkDevice<Ring>) throws -> B.Output {
            do { return try body.run(device) } catch { throw WrappedBodyFailure(error: error) }
        }
    }
}

/// Size with an optional k/m/g suffix (powers of 1024): 4k, 128k, 1m, 64m.
struct ByteSize: ExpressibleByArgument, CustomStringConvertible {
    var bytes: Int
    init(bytes: Int) { self.bytes = bytes }
    init?(argument: String) {
        let a = argument.lowercased()
        let scale: Int
        var digits = Substring(a)
        switch a.last {
        case "k": scale = 1 << 10; digits = a.dropLast()
        case "m": scale = 1 << 20; digits = a.dropLast()
        case "g": scale = 1 << 30; digits = a.dropLast()
        default: scale = 1
        }
        guard let v = Int(digits), v > 0 else { return nil }
        let (b, overflow) = v.multipliedReportingOverflow(by: scale)
        guard !overflow else { return nil }
        bytes = b
    }
    var description: String { "\(bytes)" }
}

/// Seconds with an optional s/ms suffix: 10s, 500ms, 2.
struct Seconds: ExpressibleByArgument, CustomStringConvertible {
    var value: Double
    var description: String { "\(value == value.rounded() ? String(Int(value)) : String(value))s" }
    init(_ v: Double) { value = v }
    init?(argument: String) {
        let a = argument.lowercased()
        if a.hasSuffix("ms"), let v = Double(a.dropLast(2)) { value = v / 1000; return }
        if a.hasSuffix("s"), let v = Double(a.dropLast()) { value = v; return }
        guard let v = Double(a) else { return nil }
        value = v
    }
}
