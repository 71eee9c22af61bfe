import DPDK
import VirtioNet

/// What `NetStack` needs from a port: bursts of mbufs in and out, its MAC address, pool and
/// counters. `VirtioNetPort` provides it; a generic `poll` is specialised per port type, so the
/// protocol costs nothing per packet.
public protocol PacketPort: ~Copyable {
    var mac: EthernetAddress { get }
    var pool: PacketPool { get }
    var counters: NetCounters { get }
    mutating func rxBurst(_ out: UnsafeMutablePointer<Mbuf>, max: Int) -> Int
    mutating func txBurst(_ pkts: UnsafeMutablePointer<Mbuf>, count: Int) -> Int
}

// When VirtioNetPort is generic over its ring (split/packed), this line becomes
// `extension VirtioNetPort: PacketPort where Ring: ~Copyable {}`.
extension VirtioNetPort: PacketPort {}
