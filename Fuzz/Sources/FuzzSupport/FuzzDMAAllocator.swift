import VirtioCore
#if canImport(Glibc)
import Glibc
#endif

/// Device memory on the heap (like VirtioTestSupport's HeapDMAAllocator: page-aligned, zeroed,
/// bus address = virtual address), zeroed with one memset: a debug build's generic
/// `initializeMemory(repeating:)` costs more than a whole fuzz input for a big indirect table.
/// Heap memory, so ASan sees any access outside a region.
public struct FuzzDMAAllocator: DMAAllocator {
    final class Region: DMARegion {
        let pointer: UnsafeMutableRawPointer
        let size: Int
        var iova: UInt64 { UInt64(UInt(bitPattern: pointer)) }
        init(size: Int) throws {
            var raw: UnsafeMutableRawPointer?
            guard size >= 0, posix_memalign(&raw, 4096, max(size, 1)) == 0, let p = raw else {
                throw TransportError("fuzz DMA allocation of \(size) bytes failed")
            }
            memset(p, 0, max(size, 1))
            pointer = p
            self.size = size
        }
        deinit { free(pointer) }
    }
    public init() {}
    public func allocate(bytes: Int) throws -> any DMARegion { try Region(size: bytes) }
    public func memoryTable() throws -> [MemoryRegion] { [] }
}
