import Benchmark
import VirtioCore
import VirtioTestSupport

/// The ring core alone: post a burst of 32 single-descriptor buffers, publish, let a stand-in
/// in-order device use them all, harvest them back. Mallocs per burst must be 0.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(metrics: [.wallClock, .mallocCountTotal, .throughput],
                                           maxDuration: .seconds(2), maxIterations: 1_000_000)

    for (name, inOrder) in [("in order", true), ("out of order", false)] {
        Benchmark("split ring: enqueue + recycle 32-buffer burst (\(name))") { benchmark in
            let (memory, layout) = try SplitDeviceModel.allocateRing(size: 256)
            defer { SplitDeviceModel.freeRing(memory) }
            var queue = SplitVirtqueue(memory: memory, layout: layout, inOrder: inOrder)
            let device = SplitDeviceModel(memory: memory, layout: layout, inOrder: inOrder)
            RingBurst.measure(benchmark, &queue) { _ = device.echoAvailable() }
        }
        Benchmark("packed ring: enqueue + recycle 32-buffer burst (\(name))") { benchmark in
            let (memory, layout) = try PackedDeviceModel.allocateRing(size: 256)
            defer { PackedDeviceModel.freeRing(memory) }
            var queue = PackedVirtqueue(memory: memory, layout: layout, inOrder: inOrder)
            let device = PackedDeviceModel(memory: memory, layout: layout)
            RingBurst.measure(benchmark, &queue) { _ = device.echoAvailable() }
            precondition(device.violations.isEmpty)
        }
    }
}

/// One burst: 32 adds, one publish, the device uses them, one harvest.
enum RingBurst {
    static func measure<Q: Virtqueue & ~Copyable>(_ benchmark: Benchmark, _ q: inout Q, device: () -> Void) {
        let cookies = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: 32)
        let lengths = UnsafeMutablePointer<UInt32>.allocate(capacity: 32)
        defer { cookies.deallocate(); lengths.deallocate() }
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            run(&q, cookies, lengths, device: device)
        }
        benchmark.stopMeasurement()
        precondition(q.failure == nil && q.inFlight == 0)
    }

    @inline(never)
    static func run<Q: Virtqueue & ~Copyable>(_ q: inout Q, _ cookies: UnsafeMutablePointer<UnsafeMutableRawPointer?>,
                                             _ lengths: UnsafeMutablePointer<UInt32>, device: () -> Void) {
        q.addBurst(count: 32, deviceWritable: true) { i in (0x1000 * UInt64(i + 1), 2048, UnsafeMutableRawPointer(bitPattern: i + 1)) }
        _ = q.publish()
        device()
        _ = q.harvest(into: cookies, lengths: lengths, max: 32)
    }
}
