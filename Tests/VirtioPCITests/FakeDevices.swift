import VirtioCore
import VirtioPCI

/// A modern virtio-pci function in one fake memory BAR: common config at 0 (§4.1.4.3 semantics:
/// feature select windows, status, per-queue registers behind queue_select), ISR at 0x100,
/// device config at 0x200, notify structure at 0x1000 (multiplier 4). Records every notify.
final class FakeModernBAR: RegisterSpace {
    let length = 0x2000
    var offeredFeatures: UInt64
    var driverFeatures: UInt64 = 0
    var deviceFeatureSelect: UInt32 = 0
    var driverFeatureSelect: UInt32 = 0
    var status: UInt8 = 0
    var statusHistory: [UInt8] = []
    var generation: UInt8 = 0
    /// Reads of config_generation that find it changed again (Int.max: it never settles).
    var generationChangesLeft = 0
    var queueSelect: UInt16 = 0
    var numQueues: UInt16
    var maxSize: UInt16
    /// Whether the device keeps FEATURES_OK when the driver sets it (false: rejects the features).
    var acceptFeatures = true
    /// Reads of device_status after a reset that still show the old value (a slow reset).
    var resetLag = 0
    struct Queue { var size: UInt16 = 0; var desc: UInt64 = 0; var driver: UInt64 = 0; var device: UInt64 = 0
                   var msix: UInt16 = 0; var enable: UInt16 = 0; var notifyOff: UInt16 = 0 }
    var queues: [Queue]
    var deviceConfig: [UInt8] = Array(0..<16)
    var notifies: [(offset: Int, value: UInt16)] = []
    var otherWrites: [Int] = []

    init(features: UInt64, numQueues: Int = 2, maxSize: Int = 256) {
        offeredFeatures = features
        self.numQueues = UInt16(numQueues)
        self.maxSize = UInt16(maxSize)
        // Queue q notifies at q × 3 × 4: spaced unevenly, so a wrong multiplier shows.
        queues = (0..<numQueues).map { q in var x = Queue(); x.size = UInt16(maxSize); x.notifyOff = UInt16(q * 3); return x }
    }

    var q: Queue { get { queues[Int(queueSelect)] } set { queues[Int(queueSelect)] = newValue } }

    func read8(_ o: Int) -> UInt8 {
        switch o {
        case 20:
            if resetLag > 0 { resetLag -= 1; return 0x0f }
            return status
        case 21:
            if generationChangesLeft > 0 { generationChangesLeft -= 1; generation &+= 1 }
            return generation
        case 0x100: return 1
        case 0x200..<0x210: return deviceConfig[o - 0x200]
        default: return 0
        }
    }
    func read16(_ o: Int) -> UInt16 {
        if (0x200..<0x210).contains(o) { return UInt16(read8(o)) | UInt16(read8(o + 1)) << 8 }
        switch o {
        case 18: return numQueues
        case 22: return queueSelect
        case 24: return Int(queueSelect) < queues.count ? q.size : 0
        case 26: return q.msix
        case 28: return q.enable
        case 30: return q.notifyOff
        default: return 0
        }
    }
    func read32(_ o: Int) -> UInt32 {
        if (0x200..<0x210).contains(o) { return UInt32(read16(o)) | UInt32(read16(o + 2)) << 16 }
        switch o {
        case 0: return deviceFeatureSelect
        case 4: return deviceFeatureSelect == 0 ? UInt32(truncatingIfNeeded: offeredFeatures) : deviceFeatureSelect == 1 ? UInt32(offeredFeatures >> 32) : 0
        default: return 0
        }
    }
    func write8(_ o: Int, _ v: UInt8) {
        guard o == 20 else { otherWrites.append(o); return }
        statusHistory.append(v)
        if v == 0 { status = 0; driverFeatures = 0; for i in queues.indices { queues[i].enable = 0 }; return }
        status = v
        if v & 8 != 0 && (!acceptFeatures || driverFeatures & ~offeredFeatures != 0) { status &= ~8 }
    }
    func write16(_ o: Int, _ v: UInt16) {
        if o >= 0x1000 { notifies.append((o - 0x1000, v)); return }
        switch o {
        case 22: queueSelect = v
        case 24: q.size = v
        case 26: q.msix = v
        case 28: q.enable = v
        default: otherWrites.append(o)
        }
    }
    func write32(_ o: Int, _ v: UInt32) {
        func setLow(_ x: inout UInt64) { x = x & 0xffff_ffff_0000_0000 | UInt64(v) }
        func setHigh(_ x: inout UInt64) { x = x & 0xffff_ffff | UInt64(v) << 32 }
        switch o {
        case 0: deviceFeatureSelect = v
        case 8: driverFeatureSelect = v
        case 12: if driverFeatureSelect == 0 { setLow(&driverFeatures) } else if driverFeatureSelect == 1 { setHigh(&driverFeatures) }
        case 32: setLow(&queues[Int(queueSelect)].desc)
        case 36: setHigh(&queues[Int(queueSelect)].desc)
        case 40: setLow(&queues[Int(queueSelect)].driver)
        case 44: setHigh(&queues[Int(queueSelect)].driver)
        case 48: setLow(&queues[Int(queueSelect)].device)
        case 52: setHigh(&queues[Int(queueSelect)].device)
        default: otherWrites.append(o)
        }
    }

    func interface(notifyLength: Int = 0x100, notifyMultiplier: UInt32 = 4) throws -> ModernInterface {
        try ModernInterface(common: RegisterWindow(self, offset: 0, length: 56), notify: RegisterWindow(self, offset: 0x1000, length: notifyLength),
                            notifyMultiplier: notifyMultiplier, isr: RegisterWindow(self, offset: 0x100, length: 1),
                            device: RegisterWindow(self, offset: 0x200, length: 16))
    }
}

/// A legacy virtio-pci I/O BAR (§4.1.4.8) with a fixed queue size.
final class FakeLegacyIO: RegisterSpace {
    let length = 32
    var offered: UInt32
    var driverFeatures: UInt32 = 0
    var status: UInt8 = 0
    var statusHistory: [UInt8] = []
    var queueSelect: UInt16 = 0
    var pfn: [UInt32] = [0, 0]
    let fixedSize: UInt16 = 256
    var notifies: [UInt16] = []
    var config: [UInt8] = [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 0, 0, 0, 0]

    init(features: UInt32) { offered = features }

    func read8(_ o: Int) -> UInt8 {
        switch o {
        case 18: return status
        case 20..<32: return config[o - 20]
        default: return 0
        }
    }
    func read16(_ o: Int) -> UInt16 { o == 12 ? (queueSelect < 2 ? fixedSize : 0) : o == 14 ? queueSelect : 0 }
    func read32(_ o: Int) -> UInt32 { o == 0 ? offered : o == 8 ? pfn[Int(queueSelect)] : 0 }
    func write8(_ o: Int, _ v: UInt8) { if o == 18 { status = v; statusHistory.append(v); if v == 0 { pfn = [0, 0] } } }
    func write16(_ o: Int, _ v: UInt16) { if o == 14 { queueSelect = v } else if o == 16 { notifies.append(v) } }
    func write32(_ o: Int, _ v: UInt32) { if o == 4 { driverFeatures = v } else if o == 8 { pfn[Int(queueSelect)] = v } }
}

/// VA → "IOVA" for tests: a fixed offset, as if all memory were one contiguous segment.
let testIOVAOffset: UInt64 = 0x1_0000_0000
let testTranslate: (UInt64, Int) -> UInt64? = { va, _ in va + testIOVAOffset }
