import CDPDK
import VirtioCore

/// Ring memory from DPDK (`rte_zmalloc`, 4 KiB aligned), freed when the object goes.
public final class DMAMemory: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let size: Int
    public init(size: Int, alignment: Int = 4096) throws {
        guard let p = rte_zmalloc("vio", size, UInt32(alignment)) else { throw DPDKError.allocation(bytes: size) }
        pointer = p
        self.size = size
    }
    deinit { if !EAL.isCleanedUp { rte_free(pointer) } }
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
