import VirtioCore

/// The register-level operations the transport needs, implemented once for modern virtio-pci
/// (§4.1.4, capability structures in memory BARs) and once for legacy (§4.1.4.8, an I/O BAR).
/// Addresses given here are already bus addresses (IOVAs).
public protocol VirtioPCIInterface: AnyObject {
    var isLegacy: Bool { get }
    var status: UInt8 { get }
    func setStatus(_ s: UInt8)
    func deviceFeatures() -> UInt64
    func setDriverFeatures(_ f: UInt64)
    /// Queues the device has (nil for legacy, which does not say).
    var queueCount: Int? { get }
    /// The device's queue size for `index` (0: no such queue).
    func maxQueueSize(_ index: Int) -> Int
    func setupQueue(_ index: Int, size: Int, desc: UInt64, avail: UInt64, used: UInt64) throws(VirtioPCIError)
    func enableQueue(_ index: Int)
    func notify(_ index: Int)
    /// Device config bytes; a modern device's config_generation must settle (§4.1.4.3.1).
    func readConfig(offset: Int, count: Int) throws(VirtioPCIError) -> [UInt8]
    var configLength: Int { get }
}

extension VirtioPCIInterface {
    /// Writes 0 to device_status and waits until the device reads back 0 (§4.1.4.3.2: "the driver
    /// MUST wait for a read of device_status to return 0 before reinitializing the device").
    public func reset(pollLimit: Int = 100_000) throws(VirtioPCIError) {
        setStatus(0)
        var polls = 0
        while status != 0 {
            polls += 1
            if polls >= pollLimit { throw .resetTimeout }
        }
    }
}

/// Modern virtio-pci: `struct virtio_pci_common_cfg` (§4.1.4.3), notify, ISR and device config.
public final class ModernInterface: VirtioPCIInterface {
    /// Byte offsets in `struct virtio_pci_common_cfg`.
    enum Common {
        static let deviceFeatureSelect = 0, deviceFeature = 4, driverFeatureSelect = 8, driverFeature = 12
        static let msixConfig = 16, numQueues = 18, deviceStatus = 20, configGeneration = 21
        static let queueSelect = 22, queueSize = 24, queueMSIXVector = 26, queueEnable = 28, queueNotifyOff = 30
        static let queueDesc = 32, queueDriver = 40, queueDevice = 48
        static let length = 56
    }
    /// VIRTIO_MSI_NO_VECTOR: no interrupt for this queue (poll mode).
    static let noVector: UInt16 = 0xffff

    let common: RegisterSpace
    let notifySpace: RegisterSpace
    let notifyMultiplier: UInt32
    let device: RegisterSpace?
    let isr: RegisterSpace
    /// Offset in `notifySpace` of each queue's notify register, set by `setupQueue`.
    private var notifyOffsets: [Int: Int] = [:]
    private var notifyFast: [Int] = []

    /// `common`, `notify`, `isr`, `device`: the windows the capabilities name.
    public init(common: RegisterSpace, notify: RegisterSpace, notifyMultiplier: UInt32, isr: RegisterSpace,
                device: RegisterSpace?) throws(VirtioPCIError) {
        guard common.length >= Common.length else {
            throw .barOutOfRange("common config is \(common.length) bytes, needs \(Common.length)")
        }
        self.common = common; notifySpace = notify; self.notifyMultiplier = notifyMultiplier
        self.isr = isr; self.device = device
    }

    public var isLegacy: Bool { false }
    public var status: UInt8 { common.read8(Common.deviceStatus) }
    public func setStatus(_ s: UInt8) { common.write8(Common.deviceStatus, s) }

    public func deviceFeatures() -> UInt64 {
        common.write32(Common.deviceFeatureSelect, 0)
        let lo = common.read32(Common.deviceFeature)
        common.write32(Common.deviceFeatureSelect, 1)
        let hi = common.read32(Common.deviceFeature)
        return UInt64(lo) | UInt64(hi) << 32
    }

    public func setDriverFeatures(_ f: UInt64) {
        common.write32(Common.driverFeatureSelect, 0)
        common.write32(Common.driverFeature, UInt32(truncatingIfNeeded: f))
        common.write32(Common.driverFeatureSelect, 1)
        common.write32(Common.driverFeature, UInt32(truncatingIfNeeded: f >> 32))
    }

    public var queueCount: Int? { Int(common.read16(Common.numQueues)) }

    public func maxQueueSize(_ index: Int) -> Int {
        common.write16(Common.queueSelect, UInt16(index))
        return Int(common.read16(Common.queueSize))
    }

    public func setupQueue(_ index: Int, size: Int, desc: UInt64, avail: UInt64, used: UInt64) throws(VirtioPCIError) {
        common.write16(Common.queueSelect, UInt16(index))
        let max = Int(common.read16(Common.queueSize))
        guard max > 0 else { throw .queueUnavailable(index) }
        guard size <= max else { throw .queueTooLarge(queue: index, requested: size, max: max) }
        // §4.1.4.3.2: the driver MAY write a smaller (power-of-two) size.
        common.write16(Common.queueSize, UInt16(size))
        common.write64(Common.queueDesc, desc)
        common.write64(Common.queueDriver, avail)
        common.write64(Common.queueDevice, used)
        // Poll mode: no interrupt vector for the queue.
        common.write16(Common.queueMSIXVector, Self.noVector)
        // §4.1.4.4: the queue's notify address is cap.offset + queue_notify_off × notify_off_multiplier.
        let off = Int(common.read16(Common.queueNotifyOff)) * Int(notifyMultiplier)
        guard off + 2 <= notifySpace.length else {
            throw .barOutOfRange("queue \(index)'s notify register at \(off) is outside the \(notifySpace.length)-byte notify structure")
        }
        notifyOffsets[index] = off
        if notifyFast.count <= index { notifyFast += Array(repeating: -1, count: index + 1 - notifyFast.count) }
        notifyFast[index] = off
    }

    public func enableQueue(_ index: Int) {
        common.write16(Common.queueSelect, UInt16(index))
        common.write16(Common.queueEnable, 1)
    }

    /// §4.1.5.2: the driver writes the queue index (16 bits) to the queue's notify address
    /// (without VIRTIO_F_NOTIFICATION_DATA, which we never negotiate).
    public func notify(_ index: Int) {
        notifySpace.write16(notifyFast[index], UInt16(truncatingIfNeeded: index))
    }

    public var configLength: Int { device?.length ?? 0 }

    /// How many times a config read is retried while config_generation changes under it.
    public static let configReadAttempts = 100

    /// Device config with the generation check of §4.1.4.3.1 (re-read while it changes); a
    /// generation that never holds still for one read is an error, not a torn value.
    public func readConfig(offset: Int, count: Int) throws(VirtioPCIError) -> [UInt8] {
        guard let device else { return [] }
        var before = common.read8(Common.configGeneration)
        for _ in 0..<Self.configReadAttempts {
            let out = readWindow(device, offset: offset, count: count)
            let after = common.read8(Common.configGeneration)
            if after == before { return out }
            before = after
        }
        throw .configGenerationUnstable(offset: offset, count: count, attempts: Self.configReadAttempts)
    }
}

/// Reads `count` bytes with the widest aligned accesses (devices expect natural widths).
func readWindow(_ s: RegisterSpace, offset: Int, count: Int) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(count)
    var o = offset
    let end = offset + count
    while o < end {
        if o % 4 == 0, end - o >= 4 {
            let v = s.read32(o); for k in 0..<4 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(k)))) }; o += 4
        } else if o % 2 == 0, end - o >= 2 {
            let v = s.read16(o); out.append(UInt8(truncatingIfNeeded: v)); out.append(UInt8(truncatingIfNeeded: v >> 8)); o += 2
        } else {
            out.append(s.read8(o)); o += 1
        }
    }
    return out
}

/// Legacy virtio-pci (§4.1.4.8): one I/O BAR with fixed registers, 32 feature bits, a fixed
/// queue size and the ring given as one page frame number (rings laid out with 4096 alignment).
public final class LegacyInterface: VirtioPCIInterface {
    enum Reg {
        static let deviceFeatures = 0, driverFeatures = 4, queueAddress = 8, queueSize = 12, queueSelect = 14
        static let queueNotify = 16, deviceStatus = 18, isr = 19
        /// Device config without MSI-X; with MSI-X enabled two vector registers come first.
        static let configNoMSIX = 20, configMSIX = 24
    }
    let io: RegisterSpace
    let configOffset: Int

    /// The I/O BAR must hold the registers (20 bytes; 24 with MSI-X) before any is touched.
    public init(io: RegisterSpace, msixEnabled: Bool) throws(VirtioPCIError) {
        let offset = msixEnabled ? Reg.configMSIX : Reg.configNoMSIX
        guard io.length >= offset else {
            throw .barOutOfRange("the legacy I/O BAR is \(io.length) bytes; its registers need \(offset)")
        }
        self.io = io
        configOffset = offset
    }

    public var isLegacy: Bool { true }
    public var status: UInt8 { io.read8(Reg.deviceStatus) }
    public func setStatus(_ s: UInt8) { io.write8(Reg.deviceStatus, s) }
    public func deviceFeatures() -> UInt64 { UInt64(io.read32(Reg.deviceFeatures)) }
    public func setDriverFeatures(_ f: UInt64) { io.write32(Reg.driverFeatures, UInt32(truncatingIfNeeded: f)) }
    public var queueCount: Int? { nil }

    public func maxQueueSize(_ index: Int) -> Int {
        io.write16(Reg.queueSelect, UInt16(index))
        return Int(io.read16(Reg.queueSize))
    }

    public func setupQueue(_ index: Int, size: Int, desc: UInt64, avail: UInt64, used: UInt64) throws(VirtioPCIError) {
        io.write16(Reg.queueSelect, UInt16(index))
        let fixed = Int(io.read16(Reg.queueSize))
        guard fixed > 0 else { throw .queueUnavailable(index) }
        guard size == fixed else { throw .legacyQueueSize(queue: index, requested: size, device: fixed) }
        // §2.7.2 legacy layout: avail right after the descriptor table, used at the next 4096 boundary.
        guard desc % 4096 == 0 else { throw .legacyLayout("descriptor table at 0x\(String(desc, radix: 16)) is not 4096-aligned") }
        guard avail == desc + UInt64(16 * size) else { throw .legacyLayout("avail ring does not follow the descriptor table") }
        let usedWant = (avail + UInt64(6 + 2 * size) + 4095) & ~4095
        guard used == usedWant else { throw .legacyLayout("used ring is not at the next 4096 boundary after the avail ring") }
        guard desc >> 12 <= UInt64(UInt32.max) else { throw .legacyLayout("ring above 16 TiB cannot be given as a 32-bit page number") }
        io.write32(Reg.queueAddress, UInt32(desc >> 12))
    }

    /// A legacy queue is live once its address is non-zero.
    public func enableQueue(_ index: Int) {}

    public func notify(_ index: Int) { io.write16(Reg.queueNotify, UInt16(truncatingIfNeeded: index)) }

    public var configLength: Int { max(0, io.length - configOffset) }

    public func readConfig(offset: Int, count: Int) throws(VirtioPCIError) -> [UInt8] {
        (0..<count).map { io.read8(configOffset + offset + $0) }
    }
}
