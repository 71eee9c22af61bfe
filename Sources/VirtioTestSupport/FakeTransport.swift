import Synchronization
import VirtioCore
#if canImport(Glibc)
import Glibc
#endif

/// The one fake transport every test target uses: an in-process "device" that records what the
/// driver negotiated, where each queue's rings are and every control-path call, and lets the test
/// play the device on those rings with `SplitDeviceModel` / `PackedDeviceModel`. It also fails on
/// command: a disconnect (as a vhost-user hang-up monitor would see it), a stop that reports
/// chosen ring bases, a notify hook that answers a control queue synchronously.
public final class FakeTransport: VirtioTransport {
    public private(set) var offered: VirtioFeatures
    public var config: [UInt8]
    public var queueLimit: QueueLimit?
    public var hasConfigSpace: Bool
    public var carriesControlQueue: Bool
    public var bufferAddressing: BufferAddressing { .processVirtual }
    public var deviceDescription: String { "in-process fake" }

    public private(set) var negotiated: VirtioFeatures = []
    public private(set) var negotiatedQueueCount = 0
    /// Every `setupQueue`, in order (a restart adds the queues again).
    public private(set) var setups: [(index: Int, addresses: QueueAddresses)] = []
    /// Addresses of every queue set up, in the order of the first setup.
    public var queueAddresses: [QueueAddresses] {
        var seen = Set<Int>(), out: [QueueAddresses] = []
        for s in setups where !seen.contains(s.index) { seen.insert(s.index); out.append(latest(s.index)!) }
        return out
    }
    public private(set) var notifications = 0
    public private(set) var notificationsByQueue: [Int: Int] = [:]
    public private(set) var stops = 0
    public private(set) var starts = 0
    /// `setQueueEnabled` calls, in order.
    public private(set) var enables: [(index: Int, enabled: Bool)] = []
    public private(set) var memoryTables = 0
    /// Called on every notification (the test can act as the device right there).
    public var onNotify: ((Int) -> Void)?
    /// What `stoppedBases` reports after a stop (vhost-user's GET_VRING_BASE); nil: a reset.
    public var basesAtStop: (() -> [UInt32])?
    public private(set) var stoppedBases: [UInt32]?
    public private(set) var connected = true
    private var reason: String?
    private var link: DeviceLink?

    public init(offered: VirtioFeatures, config: [UInt8] = [], queueLimit: QueueLimit? = nil,
                carriesControlQueue: Bool = false) {
        self.offered = offered
        self.config = config
        self.queueLimit = queueLimit
        hasConfigSpace = !config.isEmpty
        self.carriesControlQueue = carriesControlQueue
    }

    public var deviceFeatures: VirtioFeatures { offered }
    public func readConfig(offset: Int, count: Int) throws -> [UInt8] {
        guard offset >= 0, count >= 0, offset + count <= config.count else { throw TransportError("config read \(offset)+\(count) beyond \(config.count) bytes") }
        return Array(config[offset..<(offset + count)])
    }
    public func negotiate(_ features: VirtioFeatures, queueCount: Int) throws {
        negotiated = features
        negotiatedQueueCount = queueCount
    }
    public func setMemory(_ regions: [MemoryRegion]) throws { memoryTables += 1 }
    public func setupQueue(_ index: Int, addresses: QueueAddresses) throws { setups.append((index, addresses)) }
    public func start() throws { starts += 1 }
    public func stop() throws {
        stops += 1
        stoppedBases = basesAtStop?()
    }
    public func notify(queue index: Int) {
        notifications += 1
        notificationsByQueue[index, default: 0] += 1
        onNotify?(index)
    }
    public func setQueueEnabled(_ index: Int, _ enabled: Bool) throws { enables.append((index, enabled)) }
    public func attach(_ link: DeviceLink) { self.link = link }
    public var isConnected: Bool { connected }
    public var disconnectReason: String? { reason }

    // MARK: Reconnect

    /// Whether `reconnect` works (as vhost-user's); off by default (as virtio-pci).
    public var reconnectable = false
    /// What the device offers once it is back (nil: as before).
    public var offeredAfterReconnect: VirtioFeatures?
    private let back = Atomic<Bool>(false)
    private let reconnectCount = Atomic<Int>(0)
    public var reconnects: Int { reconnectCount.load(ordering: .acquiring) }
    public var canReconnect: Bool { reconnectable }
    /// Whether the "device" tracks in-flight requests itself (as a vhost-user backend with INFLIGHT_SHMFD).
    public var tracksInflight = false
    public func setUpInflightTracking(queueCount: Int, queueSize: Int) throws -> Bool { tracksInflight }
    /// Lets a pending `reconnect` (the device core's thread) find the device again.
    public func comeBack() { back.store(true, ordering: .releasing) }

    public func reconnect(deadline: UInt64, abort: () -> Bool) throws {
        let began = monotonicNow()
        while !back.load(ordering: .acquiring) {
            if abort() { throw ReconnectError.aborted }
            if monotonicNow() >= deadline { throw ReconnectError.timedOut(seconds: Double(monotonicNow() - began) / 1e9) }
            usleep(1000)
        }
        back.store(false, ordering: .relaxed)
        if let o = offeredAfterReconnect { offered = o }
        connected = true
        reason = nil
        reconnectCount.add(1, ordering: .releasing)
    }

    /// The addresses queue `index` was last set up with.
    public func latest(_ index: Int) -> QueueAddresses? { setups.last { $0.index == index }?.addresses }

    /// The device goes away. `notifyLink`: as a hang-up monitor reports it (the link goes down
    /// at once); false: the transport only answers `isConnected` false when asked, as virtio-pci
    /// does (a status register read).
    public func disconnect(_ why: String = "the fake device was unplugged", notifyLink: Bool = true) {
        connected = false
        reason = why
        if notifyLink { link?.markDown(why) }
    }

    /// A split-ring device model over queue `index`'s rings.
    public func splitModel(_ index: Int, inOrder: Bool = false) throws -> SplitDeviceModel {
        let a = latest(index)!
        let layout = try SplitRingLayout(size: a.size)
        return SplitDeviceModel(memory: UnsafeMutableRawPointer(bitPattern: UInt(a.desc))! - layout.descOffset, layout: layout, inOrder: inOrder)
    }

    /// A packed-ring device model over queue `index`'s ring.
    public func packedModel(_ index: Int) throws -> PackedDeviceModel {
        let a = latest(index)!
        let layout = try PackedRingLayout(size: a.size)
        return PackedDeviceModel(memory: UnsafeMutableRawPointer(bitPattern: UInt(a.desc))! - layout.descOffset, layout: layout)
    }
}

/// Device memory on the heap for tests of the device core without DPDK: page-aligned, zeroed,
/// bus address = virtual address.
public final class HeapDMAAllocator: DMAAllocator {
    final class Region: DMARegion {
        let pointer: UnsafeMutableRawPointer
        let size: Int
        var iova: UInt64 { UInt64(UInt(bitPattern: pointer)) }
        init(size: Int) {
            pointer = .allocate(byteCount: max(size, 1), alignment: 4096)
            pointer.initializeMemory(as: UInt8.self, repeating: 0, count: max(size, 1))
            self.size = size
        }
        deinit { pointer.deallocate() }
    }
    public init() {}
    public func allocate(bytes: Int) throws -> any DMARegion { Region(size: bytes) }
    public func memoryTable() throws -> [MemoryRegion] { [] }
}
