import CDPDK
import VirtioCore
#if canImport(Glibc)
import Glibc
#endif

/// Ring and request memory from DPDK: a memzone that is IOVA-contiguous
/// (`RTE_MEMZONE_IOVA_CONTIG`), 4 KiB aligned and zeroed, freed when the object goes. Contiguity
/// matters for a PCI device, which sees bus addresses (IOVAs): in a guest without an IOMMU those are
/// physical, and a ring or buffer that spans two hugepages must not need two translations.
public final class DMAMemory: DMARegion, @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let size: Int
    /// The IOVA of `pointer` (`rte_memzone.iova`): the process virtual address in DPDK's VA mode,
    /// the physical address in PA mode.
    public let iova: UInt64
    let zone: UnsafePointer<rte_memzone>
    nonisolated(unsafe) static var counter = 0

    public init(size: Int, alignment: Int = 4096) throws {
        Self.counter += 1
        let name = "vio_dma_\(getpid())_\(Self.counter)"
        guard let z = rte_memzone_reserve_aligned(name, size, SOCKET_ID_ANY, UInt32(RTE_MEMZONE_IOVA_CONTIG),
                                                  UInt32(alignment)),
              let p = z.pointee.addr else { throw DPDKError.allocation(bytes: size) }
        memset(p, 0, size)
        zone = z
        pointer = p
        iova = z.pointee.iova
        self.size = size
    }
    deinit { if !EAL.isCleanedUp { rte_memzone_free(zone) } }
}

/// Translation of DPDK memory to IOVAs (bus addresses), for transports whose device does not see
/// process virtual addresses (virtio-pci).
public enum IOVA {
    /// The IOVA of `pointer` (`rte_mem_virt2iova`), or nil if it is not DPDK memory.
    public static func of(_ pointer: UnsafeRawPointer) -> UInt64? {
        let v = rte_mem_virt2iova(pointer)
        return v == UInt64.max ? nil : v
    }

    /// The IOVA of `count` bytes at `pointer`, or nil if they are not DPDK memory or are not
    /// contiguous in IOVA space (checked page by page at DPDK's segment size).
    public static func of(_ pointer: UnsafeRawPointer, count: Int) -> UInt64? {
        guard let start = of(pointer) else { return nil }
        guard count > 1 else { return start }
        guard let ms = rte_mem_virt2memseg(pointer, nil) else { return nil }
        let page = Int(ms.pointee.hugepage_sz == 0 ? 4096 : ms.pointee.hugepage_sz)
        let base = Int(bitPattern: pointer)
        var offset = (base / page + 1) * page - base
        while offset < count {
            guard of(pointer + offset) == start &+ UInt64(offset) else { return nil }
            offset += page
        }
        guard of(pointer + (count - 1)) == start &+ UInt64(count - 1) else { return nil }
        return start
    }
}

public enum DPDKMemory {
    /// Every DPDK memory segment, merged per backing file into (address, size, fd, offset)
    /// regions, as a vhost-user backend needs them to map our memory. Segments of one file are
    /// laid out linearly (address − offset is constant), so one region per file covers them.
    /// Call after every pool and ring that the device will touch has been allocated.
    public static func regions() throws -> [MemoryRegion] {
        final class Collector {
            var regions: [MemoryRegion] = []
            var error: String?
        }
        let c = Collector()
        let visit: vio_memseg_visitor = { infoPtr, ctx in
            let c = Unmanaged<Collector>.fromOpaque(ctx!).takeUnretainedValue()
            let info = infoPtr!.pointee
            guard info.fd >= 0 else {
                c.error = "segment at 0x\(String(info.addr, radix: 16)) has no file descriptor (anonymous memory)"
                return -1
            }
            if let i = c.regions.firstIndex(where: { $0.fd == info.fd }) {
                var r = c.regions[i]
                guard r.address &- r.fileOffset == info.addr &- info.offset else {
                    c.error = "segments of fd \(info.fd) are not linear in their file"
                    return -1
                }
                let end = max(r.address + r.size, info.addr + info.len)
                if info.addr < r.address { r.fileOffset = info.offset; r.address = info.addr }
                r.size = end - r.address
                c.regions[i] = r
            } else {
                c.regions.append(MemoryRegion(address: info.addr, size: info.len, fd: info.fd, fileOffset: info.offset))
            }
            return 0
        }
        let rc = vio_memseg_walk(visit, Unmanaged.passUnretained(c).toOpaque())
        if let e = c.error { throw DPDKError.memoryWalk(e) }
        if rc < 0 { throw DPDKError.memoryWalk("rte_memseg_walk failed") }
        return c.regions
    }
}

/// DPDK as the device core's memory: IOVA-contiguous memzones, and the memory table from the
/// memseg walk (every pool and ring allocated so far).
public struct DPDKDMAAllocator: DMAAllocator {
    public init() {}
    public func allocate(bytes: Int) throws -> any DMARegion { try DMAMemory(size: bytes) }
    public func memoryTable() throws -> [MemoryRegion] { try DPDKMemory.regions() }
}
