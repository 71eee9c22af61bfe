/// The virtio vendor capabilities of a PCI function (VIRTIO 1.2 §4.1.4, `struct virtio_pci_cap`).
public struct VirtioPCICapability: Sendable, Equatable {
    /// `cfg_type` (§4.1.4): where each configuration structure lives.
    public enum Kind: UInt8, Sendable {
        /// VIRTIO_PCI_CAP_COMMON_CFG
        case common = 1
        /// VIRTIO_PCI_CAP_NOTIFY_CFG
        case notify = 2
        /// VIRTIO_PCI_CAP_ISR_CFG
        case isr = 3
        /// VIRTIO_PCI_CAP_DEVICE_CFG
        case device = 4
        /// VIRTIO_PCI_CAP_PCI_CFG
        case pciConfigAccess = 5
        /// VIRTIO_PCI_CAP_SHARED_MEMORY_CFG
        case sharedMemory = 8
    }
    public var kind: Kind
    public var bar: Int
    public var offset: UInt32
    public var length: UInt32
    /// Only for `.notify`: `notify_off_multiplier` (§4.1.4.4).
    public var notifyOffsetMultiplier: UInt32
    public init(kind: Kind, bar: Int, offset: UInt32, length: UInt32, notifyOffsetMultiplier: UInt32 = 0) {
        self.kind = kind; self.bar = bar; self.offset = offset; self.length = length
        self.notifyOffsetMultiplier = notifyOffsetMultiplier
    }
}

/// What a capability list in config space says about a virtio function. Every pointer in the
/// list is checked (it is device-provided): a loop, a pointer outside config space or a
/// truncated capability is an error, not a crash.
public struct VirtioPCICapabilities: Sendable, Equatable {
    public var common: VirtioPCICapability?
    public var notify: VirtioPCICapability?
    public var isr: VirtioPCICapability?
    public var device: VirtioPCICapability?
    /// True if an MSI-X capability (id 0x11) is present and enabled: the legacy device config
    /// then starts at offset 24 instead of 20 (§4.1.4.8).
    public var msixEnabled = false

    /// Has the three structures a modern driver needs (common, notify, ISR — device config is optional).
    public var isModern: Bool { common != nil && notify != nil && isr != nil }

    public init() {}

    /// Parses config space (at least the 64-byte header; usually 256 bytes from sysfs).
    public init(configSpace c: [UInt8]) throws(VirtioPCIError) {
        func u8(_ o: Int) -> UInt8 { c[o] }
        func u16(_ o: Int) -> UInt16 { UInt16(c[o]) | UInt16(c[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 { UInt32(u16(o)) | UInt32(u16(o + 2)) << 16 }
        guard c.count >= 64 else { throw .badCapabilityList("config space is \(c.count) bytes, shorter than the 64-byte header") }
        self.init()
        // PCI status bit 4: the function has a capability list (PCI_STATUS_CAP_LIST).
        guard u16(6) & 0x10 != 0 else { return }
        var pointer = Int(u8(0x34) & 0xfc)
        var seen = Set<Int>()
        while pointer != 0 {
            guard pointer >= 0x40, pointer + 2 <= c.count else {
                throw .badCapabilityList("capability pointer 0x\(String(pointer, radix: 16)) is outside config space")
            }
            guard seen.insert(pointer).inserted else {
                throw .badCapabilityList("capability list loops at 0x\(String(pointer, radix: 16))")
            }
            let id = u8(pointer)
            let next = Int(u8(pointer + 1) & 0xfc)
            if id == 0x11, pointer + 4 <= c.count {
                // MSI-X message control, bit 15: MSI-X enable.
                msixEnabled = u16(pointer + 2) & 0x8000 != 0
            }
            if id == 0x09 {  // PCI_CAP_ID_VNDR
                guard pointer + 16 <= c.count else { throw .badCapabilityList("virtio capability at 0x\(String(pointer, radix: 16)) is truncated") }
                let capLength = Int(u8(pointer + 2))
                let bar = Int(u8(pointer + 4))
                if let kind = VirtioPCICapability.Kind(rawValue: u8(pointer + 3)), capLength >= 16, bar <= 5 {
                    var cap = VirtioPCICapability(kind: kind, bar: bar, offset: u32(pointer + 8), length: u32(pointer + 12))
                    if kind == .notify {
                        guard capLength >= 20, pointer + 20 <= c.count else {
                            throw .badCapabilityList("notify capability at 0x\(String(pointer, radix: 16)) lacks notify_off_multiplier")
                        }
                        cap.notifyOffsetMultiplier = u32(pointer + 16)
                    }
                    // §4.1.4: "the driver SHOULD use the first instance of each type it can".
                    switch kind {
                    case .common: if common == nil { common = cap }
                    case .notify: if notify == nil { notify = cap }
                    case .isr: if isr == nil { isr = cap }
                    case .device: if device == nil { device = cap }
                    default: break
                    }
                }
            }
            pointer = next
        }
    }
}
