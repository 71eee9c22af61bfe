// swift-tools-version:6.0
import Foundation
import PackageDescription

// libFuzzer targets for every parser of device-written bytes. A separate package (like Bench/)
// so fuzzing flags and harness code never enter the library graph. The library package is `..`;
// SwiftPM names a path dependency after its folder.
//
// Build (Scripts/fuzz.sh does it):
//   swift build -c debug -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library
// Every target is an executable whose entry point is `LLVMFuzzerTestOneInput` (@_cdecl);
// libFuzzer supplies `main`, which is why the modules are parsed as libraries.
let library = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent

func fuzzTarget(_ name: String, _ deps: [Target.Dependency]) -> Target {
    .executableTarget(name: name, dependencies: ["FuzzSupport"] + deps, path: "Sources/\(name)")
}

let package = Package(
    name: "swift-virtio-fuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: ".."),
        // The library's own logging package (same requirement), to silence it while fuzzing.
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        .target(name: "CFuzzShim"),
        .target(name: "FuzzSupport", dependencies: [
            "CFuzzShim",
            .product(name: "VirtioCore", package: library),
            .product(name: "VirtioTestSupport", package: library),
            .product(name: "Logging", package: "swift-log"),
        ]),
        fuzzTarget("split-used", [
            .product(name: "VirtioCore", package: library),
            .product(name: "VirtioTestSupport", package: library),
        ]),
        fuzzTarget("packed-used", [
            .product(name: "VirtioCore", package: library),
            .product(name: "VirtioTestSupport", package: library),
        ]),
        fuzzTarget("vhost-reply", [
            "CFuzzShim",
            .product(name: "VhostUser", package: library),
            .product(name: "VirtioCore", package: library),
        ]),
        fuzzTarget("pci-caps", [
            .product(name: "VirtioPCI", package: library),
            .product(name: "VirtioCore", package: library),
            .product(name: "VirtioTestSupport", package: library),
        ]),
        fuzzTarget("net-rx", [
            .product(name: "VirtioNet", package: library),
            .product(name: "VirtioCore", package: library),
            .product(name: "DPDK", package: library),
            .product(name: "VirtioTestSupport", package: library),
        ]),
        fuzzTarget("blk-config-status", [
            .product(name: "VirtioBlk", package: library),
            .product(name: "VirtioCore", package: library),
            .product(name: "VirtioTestSupport", package: library),
        ]),
    ],
    swiftLanguageModes: [.v5]
)
