import CDPDK
import VirtioCore

/// A DPDK packet buffer (`struct rte_mbuf *`). A plain value: copying it copies the pointer, so
/// there is no reference counting on the data path. Field access inlines to single loads/stores.
@frozen public struct Mbuf: Equatable, @unchecked Sendable {
    public let raw: OpaquePointer
    @inlinable public init(_ raw: OpaquePointer) { self.raw = raw }
    @inlinable public init?(cookie: UnsafeMutableRawPointer?) {
        guard let c = cookie else { return nil }
        raw = OpaquePointer(c)
    }
    @inlinable public var cookie: UnsafeMutableRawPointer { UnsafeMutableRawPointer(raw) }

    /// Start of the buffer (`buf_addr`): the address the device sees in vhost-user mode.
    @inlinable public var bufferAddress: UnsafeMutableRawPointer { vio_mbuf_buf_addr(raw) }
    /// The bus address of the buffer start (`buf_iova`): what a PCI device sees.
    @inlinable public var bufferIOVA: UInt64 { vio_mbuf_buf_iova(raw) }
    @inlinable public var bufferLength: UInt16 { vio_mbuf_buf_len(raw) }
    /// The buffer start as the device sees it: the 8-byte field at `field` (one of
    /// `Mbuf.addressField(for:)`), so a port that chose its address mode once reads one load.
    @inlinable public func deviceBufferAddress(field: Int) -> UInt64 {
        UnsafeRawPointer(raw).load(fromByteOffset: field, as: UInt64.self)
    }
    /// The offset of `buf_addr` (process virtual addresses) or `buf_iova` (bus addresses) in
    /// `struct rte_mbuf` (DPDK's virtio PMD keeps the same choice in `mbuf_addr_offset`).
    public static func addressField(for addressing: BufferAddressing) -> Int {
        addressing == .iova ? Int(vio_mbuf_buf_iova_field_offset()) : Int(vio_mbuf_buf_addr_field_offset())
    }
    @inlinable public var dataOffset: UInt16 {
        get { vio_mbuf_data_off(raw) }
        nonmutating set { vio_mbuf_set_data_off(raw, newValue) }
    }
    /// Bytes in this segment.
    @inlinable public var dataLength: UInt16 {
        get { vio_mbuf_data_len(raw) }
        nonmutating set { vio_mbuf_set_data_len(raw, newValue) }
    }
    /// Bytes in the whole packet (first segment only).
    @inlinable public var packetLength: UInt32 {
        get { vio_mbuf_pkt_len(raw) }
        nonmutating set { vio_mbuf_set_pkt_len(raw, newValue) }
    }
    @inlinable public var segmentCount: UInt16 {
        get { vio_mbuf_nb_segs(raw) }
        nonmutating set { vio_mbuf_set_nb_segs(raw, newValue) }
    }
    @inlinable public var next: Mbuf? {
        get { vio_mbuf_next(raw).map(Mbuf.init) }
        nonmutating set { vio_mbuf_set_next(raw, newValue?.raw) }
    }
    /// Records the input port (`port` field).
    @inlinable public func setPort(_ port: UInt16) { vio_mbuf_set_port(raw, port) }
    /// Pointer to the first data byte of this segment.
    @inlinable public var data: UnsafeMutableRawPointer { vio_mbuf_buf_addr(raw) + Int(vio_mbuf_data_off(raw)) }
    /// The bytes of this segment.
    @inlinable public var bytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: data, count: Int(dataLength))
    }
    /// Headroom reserved in front of the data in every mbuf of our pools.
    @inlinable public static var headroom: UInt16 { vio_pktmbuf_headroom() }

    /// Copies the packet (all segments) out, for tests and tools (not the data path).
    public func copyPacket() -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(Int(packetLength))
        var seg: Mbuf? = self
        while let s = seg { out.append(contentsOf: s.bytes); seg = s.next }
        return out
    }

    /// Returns the whole chain to its pool.
    @inlinable public func free() { rte_pktmbuf_free(raw) }
}

/// A DPDK mbuf pool (`rte_pktmbuf_pool_create`). Lives for the whole process.
public final class PacketPool: @unchecked Sendable {
    public let raw: OpaquePointer
    public let name: String
    public let capacity: Int
    public let dataRoom: Int

    /// `dataRoom` includes the headroom (DPDK's RTE_MBUF_DEFAULT_BUF_SIZE is 2048 + 128).
    public init(name: String, count: Int, cacheSize: Int = 256, dataRoom: Int = 2048 + 128) throws {
        guard let p = rte_pktmbuf_pool_create(name, UInt32(count), UInt32(min(cacheSize, 512)), 0,
                                              UInt16(dataRoom), rte_socket_id_by_idx(0)) else {
            let e = vio_rte_errno()
            throw DPDKError.mempool(name: name, count: count, errno: e, message: String(cString: vio_rte_strerror(e)))
        }
        raw = p
        self.name = name
        capacity = count
        self.dataRoom = dataRoom
    }

    /// Mbufs in the pool (including the per-lcore caches): equals `capacity` when none are out.
    public var availableCount: Int { Int(rte_mempool_avail_count(raw)) }
    public var inUseCount: Int { Int(rte_mempool_in_use_count(raw)) }

    /// Fills `out[0..<count]` with fresh mbufs, all or nothing (`rte_pktmbuf_alloc_bulk`).
    @inlinable
    public func allocate(_ out: UnsafeMutablePointer<Mbuf>, count: Int) -> Bool {
        out.withMemoryRebound(to: OpaquePointer?.self, capacity: count) {
            rte_pktmbuf_alloc_bulk(raw, $0, UInt32(count)) == 0
        }
    }

    @inlinable public func allocate() -> Mbuf? { rte_pktmbuf_alloc(raw).map(Mbuf.init) }
}

/// Frees `count` mbufs (whole chains) in one call (`rte_pktmbuf_free_bulk`).
@inlinable
public func freeBulk(_ mbufs: UnsafeMutablePointer<Mbuf>, count: Int) {
    guard count > 0 else { return }
    mbufs.withMemoryRebound(to: OpaquePointer?.self, capacity: count) {
        rte_pktmbuf_free_bulk($0, UInt32(count))
    }
}
