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
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
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
        // The vio httpd handlers (DataplaneHTTP's router) behind a plain SwiftNIO server on the
        // kernel's TCP/IP, for Bench/httpd.py.
        .executableTarget(
            name: "vio-nio-httpd",
            dependencies: [
                .product(name: "DataplaneHTTP", package: library),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            path: "Sources/vio-nio-httpd",
            // Top-level closures would be main-actor isolated in Swift 6 mode (the handlers run on NIO's loop).
            swiftSettings: [.swiftLanguageMode(.v5)]),
    ]
)
