import CVioLinux
#if canImport(Glibc)
import Glibc
#endif

/// Little-endian device registers reached at byte offsets: a mapped memory BAR, an I/O-port BAR,
/// or (in tests) a fake device.
public protocol RegisterSpace: AnyObject {
    var length: Int { get }
    func read8(_ offset: Int) -> UInt8
    func read16(_ offset: Int) -> UInt16
    func read32(_ offset: Int) -> UInt32
    func write8(_ offset: Int, _ value: UInt8)
    func write16(_ offset: Int, _ value: UInt16)
    func write32(_ offset: Int, _ value: UInt32)
}

extension RegisterSpace {
    /// A 64-bit field as two 32-bit accesses, low half first (§4.1.3.1 allows it for common config).
    public func write64(_ offset: Int, _ value: UInt64) {
        write32(offset, UInt32(truncatingIfNeeded: value))
        write32(offset + 4, UInt32(truncatingIfNeeded: value >> 32))
    }
    public func read64(_ offset: Int) -> UInt64 { UInt64(read32(offset)) | UInt64(read32(offset + 4)) << 32 }
}

/// A memory BAR mapped from sysfs (`/sys/bus/pci/devices/ADDR/resourceN`). Accesses are volatile
/// loads and stores of the register's width; x86 keeps them in program order for uncached memory.
public final class MappedBAR: RegisterSpace, @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    let mappedLength: Int

    public init(path: String, length: Int) throws(VirtioPCIError) {
        let fd = open(path, O_RDWR | O_SYNC | O_CLOEXEC)
        guard fd >= 0 else { throw .sysfs(path: path, errno: errno) }
        defer { close(fd) }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        mappedLength = (length + page - 1) / page * page
        let p = mmap(nil, mappedLength, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { throw .sysfs(path: path, errno: errno) }
        base = p
        self.length = length
    }
    deinit { munmap(base, mappedLength) }

    public func read8(_ o: Int) -> UInt8 { cvio_mmio_read8(base + o) }
    public func read16(_ o: Int) -> UInt16 { UInt16(littleEndian: cvio_mmio_read16(base + o)) }
    public func read32(_ o: Int) -> UInt32 { UInt32(littleEndian: cvio_mmio_read32(base + o)) }
    public func write8(_ o: Int, _ v: UInt8) { cvio_mmio_write8(base + o, v) }
    public func write16(_ o: Int, _ v: UInt16) { cvio_mmio_write16(base + o, v.littleEndian) }
    public func write32(_ o: Int, _ v: UInt32) { cvio_mmio_write32(base + o, v.littleEndian) }
}

/// An I/O-port BAR (legacy virtio-pci) through its sysfs resource file: each access is one
/// `pread`/`pwrite` of the register's width, which the kernel turns into an in/out instruction.
/// A syscall per access: fine for the control path and for the (rare, poll-mode) queue notify.
public final class PortIOBAR: RegisterSpace, @unchecked Sendable {
    let fd: Int32
    public let length: Int
    public let path: String

    public init(path: String, length: Int) throws(VirtioPCIError) {
        fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .sysfs(path: path, errno: errno) }
        self.length = length
        self.path = path
    }
    deinit { close(fd) }

    func read<T: FixedWidthInteger>(_ o: Int, as: T.Type) -> T {
        var v: T = 0
        let n = withUnsafeMutableBytes(of: &v) { pread(fd, $0.baseAddress, $0.count, off_t(o)) }
        // A failed read looks like an absent device (all ones), which the callers treat as gone.
        return n == MemoryLayout<T>.size ? T(littleEndian: v) : ~0
    }
    func write<T: FixedWidthInteger>(_ o: Int, _ value: T) {
        var v = value.littleEndian
        _ = withUnsafeBytes(of: &v) { pwrite(fd, $0.baseAddress, $0.count, off_t(o)) }
    }
    public func read8(_ o: Int) -> UInt8 { read(o, as: UInt8.self) }
    public func read16(_ o: Int) -> UInt16 { read(o, as: UInt16.self) }
    public func read32(_ o: Int) -> UInt32 { read(o, as: UInt32.self) }
    public func write8(_ o: Int, _ v: UInt8) { write(o, v) }
    public func write16(_ o: Int, _ v: UInt16) { write(o, v) }
    public func write32(_ o: Int, _ v: UInt32) { write(o, v) }
}

/// A window of `length` bytes at `offset` into another register space (one capability's structure).
public final class RegisterWindow: RegisterSpace {
    let space: RegisterSpace
    let offset: Int
    public let length: Int
    public init(_ space: RegisterSpace, offset: Int, length: Int) {
        self.space = space; self.offset = offset; self.length = length
    }
    public func read8(_ o: Int) -> UInt8 { space.read8(offset + o) }
    public func read16(_ o: Int) -> UInt16 { space.read16(offset + o) }
    public func read32(_ o: Int) -> UInt32 { space.read32(offset + o) }
    public func write8(_ o: Int, _ v: UInt8) { space.write8(offset + o, v) }
    public func write16(_ o: Int, _ v: UInt16) { space.write16(offset + o, v) }
    public func write32(_ o: Int, _ v: UInt32) { space.write32(offset + o, v) }
}
