// swift-tools-version:6.1
import Foundation
import PackageDescription

// Benchmarks live in their own package so their dependencies never enter the library graph.
// The library package is `..`; SwiftPM names a path dependency after its folder.
let library = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent

let package = Package(
    name: "swift-virtio-bench",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.0", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "RingBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "VirtioCore", package: library),
                .product(name: "VirtioTestSupport", package: library),
            ],
            path: "Benchmarks/RingBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]),
        // The same burst, N times, for callgrind (ordo-one's instruction counter needs perf).
        .executableTarget(
            name: "RingCallgrind",
            dependencies: [
                .product(name: "VirtioCore", package: library),
                .product(name: "VirtioTestSupport", package: library),
            ],
            path: "Sources/RingCallgrind"),
    ]
)
