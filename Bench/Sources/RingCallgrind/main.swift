import VirtioCore
import VirtioTestSupport

/// `RingCallgrind N [split|packed] [each|batched]`: N bursts of 32 single-descriptor buffers
/// through a 256-entry in-order queue and a stand-in device that completes each buffer with its
/// own used entry (`each`) or the whole burst with one (`batched`, as DPDK's vhost does for
/// in-order packed TX). For callgrind, counting only the driver's side:
///   valgrind --tool=callgrind --toggle-collect='*driverPost*' --toggle-collect='*driverHarvest*'
/// instructions per buffer = total / (32 N).
@inline(never)
func driverPost<Q: Virtqueue & ~Copyable>(_ q: inout Q) {
    q.addBurst(count: 32, deviceWritable: true) { i in (0x1000 * UInt64(i + 1), 2048, UnsafeMutableRawPointer(bitPattern: i + 1)) }
    _ = q.publish()
}

@inline(never)
func driverHarvest<Q: Virtqueue & ~Copyable>(_ q: inout Q, _ cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>,
                                              _ lengths: UnsafeMutablePointer<UInt32>) {
    let got = q.harvest(into: cookies, lengths: lengths, max: 32)
    precondition(got == 32)
}

let args = CommandLine.arguments
let n = args.count > 1 ? Int(args[1]) ?? 100_000 : 100_000
let packed = args.count > 2 && args[2] == "packed"
let batched = args.count > 3 && args[3] == "batched"
let cookies = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: 32)
let lengths = UnsafeMutablePointer<UInt32>.allocate(capacity: 32)
/// `n` bursts through `q`; `device` pops what was posted and completes it (each or batched).
func bursts<Q: Virtqueue & ~Copyable>(_ q: inout Q, _ n: Int, _ cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>,
                                      _ lengths: UnsafeMutablePointer<UInt32>, device: () -> Void) {
    for _ in 0..<n {
        driverPost(&q)
        device()
        driverHarvest(&q, cookies, lengths)
    }
    precondition(q.failure == nil && q.inFlight == 0)
}

if packed {
    let (memory, layout) = try PackedDeviceModel.allocateRing(size: 256)
    var queue = PackedVirtqueue(memory: memory, layout: layout, inOrder: true)
    let device = PackedDeviceModel(memory: memory, layout: layout)
    bursts(&queue, n, cookies, lengths) {
        _ = device.popAvailable()
        if batched { device.completeBatchAsOne(count: 32) } else { device.completeInOrder(count: 32) }
    }
    precondition(device.violations.isEmpty)
} else {
    let (memory, layout) = try SplitDeviceModel.allocateRing(size: 256)
    var queue = SplitVirtqueue(memory: memory, layout: layout, inOrder: true)
    let device = SplitDeviceModel(memory: memory, layout: layout, inOrder: true)
    bursts(&queue, n, cookies, lengths) {
        _ = device.popAvailable()
        if batched { device.completeBatchAsOne(count: 32) } else { device.completeInOrder(count: 32) }
    }
    precondition(device.violations.isEmpty)
}
print("\(n) bursts of 32 (\(packed ? "packed" : "split"), \(batched ? "one used entry per burst" : "one used entry per buffer"))")
