import VirtioCore
import VirtioTestSupport

/// `RingCallgrind N`: N bursts of the ring benchmark, for
/// `valgrind --tool=callgrind --toggle-collect='*oneBurst*'` (instructions per burst = total / N).
@inline(never)
func oneBurst(_ q: inout SplitVirtqueue, _ device: SplitDeviceModel, _ cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>,
              _ lengths: UnsafeMutablePointer<UInt32>) {
    q.addBurst(count: 32, deviceWritable: true) { i in (0x1000 * UInt64(i + 1), 2048, UnsafeMutableRawPointer(bitPattern: i + 1)) }
    _ = q.publish()
    _ = device.echoAvailable()
    _ = q.harvest(into: cookies, lengths: lengths, max: 32)
}

let n = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 100_000 : 100_000
let (memory, layout) = try SplitDeviceModel.allocateRing(size: 256)
var queue = SplitVirtqueue(memory: memory, layout: layout, inOrder: true)
let device = SplitDeviceModel(memory: memory, layout: layout, inOrder: true)
let cookies = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: 32)
let lengths = UnsafeMutablePointer<UInt32>.allocate(capacity: 32)
for _ in 0..<n { oneBurst(&queue, device, cookies, lengths) }
precondition(queue.failure == nil && queue.inFlight == 0)
print("\(n) bursts of 32")
