#if canImport(Glibc)
import Glibc
#endif

/// The virtio device types this project drives (§5), as PCI ids tell them.
public enum VirtioDeviceType: Int, Sendable, CustomStringConvertible {
    case net = 1
    case block = 2
    public var description: String { self == .net ? "network" : "block" }
    static func name(_ id: Int) -> String { VirtioDeviceType(rawValue: id)?.description ?? "type-\(id)" }
}

/// One PCI function as Linux sysfs shows it (`/sys/bus/pci/devices/ADDR`): ids, bound driver,
/// BAR resources and config space.
public struct SysfsPCIFunction: Sendable {
    public let address: PCIAddress
    public let path: String
    public let vendor: UInt16
    public let deviceID: UInt16
    public let subsystemDeviceID: UInt16
    /// The bound driver's name, or nil.
    public let driver: String?

    public struct Resource: Sendable, Equatable {
        public var start: UInt64, end: UInt64, flags: UInt64
        public var size: Int { end >= start && (start != 0 || end != 0) ? Int(end - start + 1) : 0 }
        /// IORESOURCE_IO (0x100): an I/O-port BAR.
        public var isIO: Bool { flags & 0x100 != 0 }
        /// IORESOURCE_MEM (0x200): a memory BAR.
        public var isMemory: Bool { flags & 0x200 != 0 }
    }

    public init(address: PCIAddress, root: String = "/sys/bus/pci/devices") throws(VirtioPCIError) {
        self.address = address
        let path = "\(root)/\(address)"
        self.path = path
        var st = stat()
        guard stat(path, &st) == 0 else { throw .noSuchDevice(address) }
        func id(_ name: String) throws(VirtioPCIError) -> UInt16 {
            let p = "\(path)/\(name)"
            guard let t = readText(p) else { throw .sysfs(path: p, errno: errno) }
            let s = t.trimmingWhitespace()
            guard let v = UInt16(s.hasPrefix("0x") ? String(s.dropFirst(2)) : s, radix: 16) else { throw .sysfs(path: p, errno: EINVAL) }
            return v
        }
        vendor = try id("vendor")
        deviceID = try id("device")
        subsystemDeviceID = (try? id("subsystem_device")) ?? 0
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("\(path)/driver", &buf, buf.count - 1)
        if n > 0 {
            let target = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            driver = String(target.split(separator: "/").last ?? Substring(target))
        } else {
            driver = nil
        }
    }

    /// Virtio vendor 0x1af4, devices 0x1000–0x107f (§4.1.2).
    public var isVirtio: Bool { vendor == 0x1af4 && (0x1000...0x107f).contains(deviceID) }
    /// 0x1000–0x103f: transitional (legacy-capable) ids, the type in the subsystem device id.
    public var isTransitional: Bool { isVirtio && deviceID < 0x1040 }
    /// The virtio device type: 0x1040 + type for modern ids, subsystem device id for transitional ones.
    public var virtioType: Int { isTransitional ? Int(subsystemDeviceID) : Int(deviceID) - 0x1040 }

    /// BARs 0–5 from the `resource` file (start, end, flags per line).
    public func resources() throws(VirtioPCIError) -> [Resource] {
        let p = "\(path)/resource"
        guard let text = readText(p) else { throw .sysfs(path: p, errno: errno) }
        return text.split(separator: "\n").prefix(6).map { line in
            let f = line.split(separator: " ").map { UInt64($0.hasPrefix("0x") ? $0.dropFirst(2) : $0, radix: 16) ?? 0 }
            return Resource(start: f.count > 0 ? f[0] : 0, end: f.count > 1 ? f[1] : 0, flags: f.count > 2 ? f[2] : 0)
        }
    }

    /// Config space (256 bytes, or 4096 for PCIe, as root).
    public func configSpace() throws(VirtioPCIError) -> [UInt8] {
        let p = "\(path)/config"
        let fd = open(p, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .sysfs(path: p, errno: errno) }
        defer { close(fd) }
        var out = [UInt8](repeating: 0, count: 4096)
        let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n >= 64 else { throw .sysfs(path: p, errno: n < 0 ? errno : EIO) }
        return Array(out[0..<n])
    }

    /// Sets bits in the PCI command register (offset 4): memory space 0x2, I/O space 0x1,
    /// bus master 0x4 (uio_pci_generic enables the device but not bus mastering; the device
    /// cannot reach our rings without it), INTx disable 0x400.
    public func enableCommandBits(_ bits: UInt16) throws(VirtioPCIError) {
        let p = "\(path)/config"
        let fd = open(p, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .sysfs(path: p, errno: errno) }
        defer { close(fd) }
        var cmd: UInt16 = 0
        guard pread(fd, &cmd, 2, 4) == 2 else { throw .sysfs(path: p, errno: errno) }
        var want = UInt16(littleEndian: cmd) | bits
        want = want.littleEndian
        guard pwrite(fd, &want, 2, 4) == 2 else { throw .sysfs(path: p, errno: errno) }
    }

    public func resourcePath(_ bar: Int) -> String { "\(path)/resource\(bar)" }
}

func readText(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { return nil }
        if n == 0 { break }
        out += buf[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}

extension String {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s.removeFirst() }
        while let c = s.last, c.isWhitespace { s.removeLast() }
        return String(s)
    }
}
