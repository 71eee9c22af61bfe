/// Memory a device can reach by DMA: zeroed, 4 KiB aligned and contiguous in IOVA space (a ring,
/// a blk request slab, a control-queue buffer). The device core does not know where it comes from
/// (the DPDK module provides it): it only needs the pointer and the bus address.
public protocol DMARegion: AnyObject {
    var pointer: UnsafeMutableRawPointer { get }
    var size: Int { get }
    /// The bus address of `pointer` (the process virtual address in DPDK's VA mode).
    var iova: UInt64 { get }
}

/// Where a device's memory comes from, and the table that tells a vhost-user backend how to map
/// all of it (every pool and ring, so it is read after the last allocation).
public protocol DMAAllocator {
    func allocate(bytes: Int) throws -> any DMARegion
    func memoryTable() throws -> [MemoryRegion]
}

extension BufferAddressing {
    /// The address the device must be given for `region`, in this addressing mode.
    @inlinable
    public func address(of region: any DMARegion) -> UInt64 {
        self == .iova ? region.iova : UInt64(UInt(bitPattern: region.pointer))
    }
}
