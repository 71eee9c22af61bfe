import VirtioCore

/// virtio-net feature bits (VIRTIO 1.2 §5.1.3).
extension VirtioFeatures {
    /// VIRTIO_NET_F_CSUM, bit 0.
    public static let netCsum = VirtioFeatures(bit: 0)
    /// VIRTIO_NET_F_GUEST_CSUM, bit 1.
    public static let netGuestCsum = VirtioFeatures(bit: 1)
    /// VIRTIO_NET_F_MTU, bit 3: `mtu` in config space is valid.
    public static let netMTU = VirtioFeatures(bit: 3)
    /// VIRTIO_NET_F_MAC, bit 5: `mac` in config space is valid.
    public static let netMAC = VirtioFeatures(bit: 5)
    /// VIRTIO_NET_F_MRG_RXBUF, bit 15: a received frame may span several buffers (`num_buffers`).
    public static let netMergeableRxBuffers = VirtioFeatures(bit: 15)
    /// VIRTIO_NET_F_STATUS, bit 16: `status` in config space is valid.
    public static let netStatus = VirtioFeatures(bit: 16)
    /// VIRTIO_NET_F_CTRL_VQ, bit 17.
    public static let netControlQueue = VirtioFeatures(bit: 17)
    /// VIRTIO_NET_F_CTRL_RX, bit 18: RX mode commands (promiscuous, all-multicast) on the control queue.
    public static let netControlRx = VirtioFeatures(bit: 18)
    /// VIRTIO_NET_F_MQ, bit 22: several RX/TX queue pairs, steered with VQ_PAIRS_SET (§5.1.6.5.5).
    public static let netMultiQueue = VirtioFeatures(bit: 22)
    /// VIRTIO_NET_F_CTRL_MAC_ADDR, bit 23: MAC_ADDR_SET on the control queue.
    public static let netControlMACAddress = VirtioFeatures(bit: 23)

    static func registerNetNames() {
        let net: [Int: String] = [0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC",
                                  7: "GUEST_TSO4", 8: "GUEST_TSO6", 10: "GUEST_UFO", 11: "HOST_TSO4",
                                  12: "HOST_TSO6", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS",
                                  17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN", 21: "GUEST_ANNOUNCE",
                                  22: "MQ", 23: "CTRL_MAC_ADDR"]
        for (k, v) in net { VirtioFeatures.names[k] = v }
    }
}

/// The virtio-net header every buffer starts with (§5.1.6, `struct virtio_net_hdr` with
/// `num_buffers`: 12 bytes whenever VERSION_1 is negotiated).
public enum VirtioNetHeader {
    public static let size = 12
    /// Offset of `num_buffers` (le16): how many buffers a merged receive frame spans.
    public static let numBuffersOffset = 10
}

/// `struct virtio_net_config` (§5.1.4): where each field is, and what a driver may accept.
public enum VirtioNetConfig {
    public static let macOffset = 0
    public static let statusOffset = 6
    public static let maxQueuePairsOffset = 8
    public static let mtuOffset = 10
    /// VIRTIO_NET_S_LINK_UP in `status`.
    public static let linkUp: UInt16 = 1
    /// The spec's bounds for `max_virtqueue_pairs` (VIRTQ_PAIRS_MIN ... VIRTQ_PAIRS_MAX).
    public static let queuePairRange = 1...0x8000
}

/// Control queue commands (§5.1.6.5): class and command numbers.
public enum VirtioNetControl {
    public static let classRx: UInt8 = 0, rxPromisc: UInt8 = 0, rxAllMulti: UInt8 = 1
    public static let classMAC: UInt8 = 1, macAddrSet: UInt8 = 1
    public static let classMQ: UInt8 = 4, mqVQPairsSet: UInt8 = 0
    /// VIRTIO_NET_OK / VIRTIO_NET_ERR in the ack byte.
    public static let ok: UInt8 = 0, err: UInt8 = 1
}

/// An Ethernet MAC address.
public struct EthernetAddress: Equatable, Sendable, CustomStringConvertible {
    public var bytes: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)
    public init(_ b: [UInt8]) {
        precondition(b.count == 6)
        bytes = (b[0], b[1], b[2], b[3], b[4], b[5])
    }
    public var array: [UInt8] { [bytes.0, bytes.1, bytes.2, bytes.3, bytes.4, bytes.5] }
    public static func == (a: Self, b: Self) -> Bool { a.array == b.array }
    public var description: String { array.map { String($0, radix: 16).leftPad(2) }.joined(separator: ":") }
    /// A locally administered unicast address (02:…) for a device that does not provide one.
    public static func local(seed: UInt32) -> EthernetAddress {
        EthernetAddress([0x02, 0x76, UInt8(seed >> 24 & 0xff), UInt8(seed >> 16 & 0xff), UInt8(seed >> 8 & 0xff), UInt8(seed & 0xff)])
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
