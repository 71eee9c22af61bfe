#if canImport(Glibc)
import Glibc
#endif

/// Errors of the virtio-pci transport, each with what the user should know or do.
public enum VirtioPCIError: Error, CustomStringConvertible, Equatable, Sendable {
    case badAddress(String)
    case noSuchDevice(PCIAddress)
    case notVirtio(PCIAddress, vendor: UInt16, device: UInt16)
    case wrongDeviceType(PCIAddress, expected: String, found: String)
    case notBound(PCIAddress)
    case boundToKernelDriver(PCIAddress, driver: String)
    case vfioNotSupported(PCIAddress)
    case sysfs(path: String, errno: Int32)
    case badCapabilityList(String)
    case noUsableInterface(PCIAddress, String)
    case barOutOfRange(String)
    case resetTimeout
    case featuresRejected(UInt64)
    case missingVersion1
    case tooManyQueues(requested: Int, device: Int)
    case queueUnavailable(Int)
    case queueTooLarge(queue: Int, requested: Int, max: Int)
    case legacyQueueSize(queue: Int, requested: Int, device: Int)
    case legacyLayout(String)
    case notDMAMemory(String)
    case ringBaseNotZero(queue: Int, base: UInt32)
    case deviceNeedsReset(status: UInt8)
    case configGenerationUnstable(offset: Int, count: Int, attempts: Int)

    public var description: String {
        switch self {
        case let .configGenerationUnstable(o, n, a):
            return "the device's config_generation changed during each of \(a) reads of config bytes \(o)..<\(o + n) (§4.1.4.3.1): its config space never settles"
        case let .ringBaseNotZero(q, base):
            return "queue \(q): virtio-pci starts every ring at position 0 after a reset, not 0x\(String(base, radix: 16))"
        case .badAddress(let a): return "\(a) is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:00:04.0)"
        case .noSuchDevice(let a): return "no PCI device \(a) (nothing at /sys/bus/pci/devices/\(a))"
        case let .notVirtio(a, v, d):
            return "PCI device \(a) is not a virtio device (vendor 0x\(hex(v)) device 0x\(hex(d)); virtio is vendor 0x1af4, device 0x1000-0x107f)"
        case let .wrongDeviceType(a, e, f): return "PCI device \(a) is a virtio \(f) device, not \(e)"
        case .notBound(let a):
            return "PCI device \(a) is bound to no driver: bind it to uio_pci_generic first (Scripts/pci-bind.sh \(a) uio_pci_generic)"
        case let .boundToKernelDriver(a, d):
            return "PCI device \(a) is bound to the kernel driver \(d): unbind it and bind uio_pci_generic (Scripts/pci-bind.sh \(a) uio_pci_generic)"
        case .vfioNotSupported(let a):
            return "PCI device \(a) is bound to vfio-pci, which this build does not drive yet (no-IOMMU VFIO); bind uio_pci_generic instead"
        case let .sysfs(p, e): return "\(p): \(String(cString: strerror(e)))"
        case .badCapabilityList(let m): return "malformed PCI capability list: \(m)"
        case let .noUsableInterface(a, m): return "virtio-pci device \(a) offers neither a modern nor a legacy interface: \(m)"
        case .barOutOfRange(let m): return "virtio-pci structure outside its BAR: \(m)"
        case .resetTimeout: return "the device did not finish its reset (device_status stayed non-zero)"
        case .featuresRejected(let f): return "the device did not accept features 0x\(String(f, radix: 16)) (FEATURES_OK not set after writing them)"
        case .missingVersion1: return "the modern virtio-pci device does not offer VIRTIO_F_VERSION_1"
        case let .tooManyQueues(r, d): return "\(r) queues requested, the device has \(d)"
        case .queueUnavailable(let q): return "queue \(q) is not available on the device (queue_size 0)"
        case let .queueTooLarge(q, r, m): return "queue \(q): ring size \(r) is larger than the device's maximum \(m)"
        case let .legacyQueueSize(q, r, d): return "queue \(q): a legacy device's ring size is fixed at \(d) (asked for \(r)); use --ring-size \(d)"
        case .legacyLayout(let m): return "ring layout unusable on a legacy device: \(m)"
        case .notDMAMemory(let m): return "not IOVA-contiguous DPDK memory: \(m) (the PCI transport needs hugepages and --iova-mode pa)"
        case .deviceNeedsReset(let s): return "the device set DEVICE_NEEDS_RESET (device_status 0x\(String(s, radix: 16)))"
        }
    }
}

func hex<T: BinaryInteger>(_ v: T, _ digits: Int = 4) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, digits - s.count)) + s
}
