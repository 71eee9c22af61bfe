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
            var cookies = [UnsafeMutableRawPointer?](repeating: nil, count: 32)
            var lengths = [UInt32](repeating: 0, count: 32)
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                RingBurst.run(&queue, device, &cookies, &lengths)
            }
            benchmark.stopMeasurement()
            precondition(queue.failure == nil && queue.inFlight == 0)
        }
        Benchmark("packed ring: enqueue + recycle 32-buffer burst (\(name))") { benchmark in
            let (memory, layout) = try PackedDeviceModel.allocateRing(size: 256)
            defer { PackedDeviceModel.freeRing(memory) }
            var queue = PackedVirtqueue(memory: memory, layout: layout, inOrder: inOrder)
            let device = PackedDeviceModel(memory: memory, layout: layout)
            var cookies = [UnsafeMutableRawPointer?](repeating: nil, count: 32)
            var lengths = [UInt32](repeating: 0, count: 32)
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                RingBurst.run(&queue, device, &cookies, &lengths)
            }
            benchmark.stopMeasurement()
            precondition(queue.failure == nil && queue.inFlight == 0 && device.violations.isEmpty)
        }
    }
}

/// One burst: 32 adds, one publish, the device uses them, one harvest.
enum RingBurst {
    @inline(never)
    static func run(_ q: inout PackedVirtqueue, _ device: PackedDeviceModel,
                    _ cookies: inout [UnsafeMutableRawPointer?], _ lengths: inout [UInt32]) {
        q.addBurst(count: 32, deviceWritable: true) { i in (0x1000 * UInt64(i + 1), 2048, UnsafeMutableRawPointer(bitPattern: i + 1)) }
        _ = q.publish()
        _ = device.echoAvailable()
        cookies.withUnsafeMutableBufferPointer { c in
            lengths.withUnsafeMutableBufferPointer { l in
                _ = q.harvest(into: c.baseAddress!, lengths: l.baseAddress!, max: 32)
            }
        }
    }

    @inline(never)
    static func run(_ q: inout SplitVirtqueue, _ device: SplitDeviceModel,
                    _ cookies: inout [UnsafeMutableRawPointer?], _ lengths: inout [UInt32]) {
        q.addBurst(count: 32, deviceWritable: true) { i in (0x1000 * UInt64(i + 1), 2048, UnsafeMutableRawPointer(bitPattern: i + 1)) }
        _ = q.publish()
        _ = device.echoAvailable()
        cookies.withUnsafeMutableBufferPointer { c in
            lengths.withUnsafeMutableBufferPointer { l in
                _ = q.harvest(into: c.baseAddress!, lengths: l.baseAddress!, max: 32)
            }
        }
    }
}
