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

// Either ring layout (split or packed).
extension VirtioNetPort: PacketPort where Ring: ~Copyable {}
