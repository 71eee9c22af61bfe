// swift-tools-version:6.0
import PackageDescription

// The library graph: CDPDK → DPDK (memory) · VirtioCore (queues) · VhostUser (transport)
// → VirtioNet (device) → vio (CLI). Only CDPDK sees DPDK headers; only CVioLinux sees the
// Linux cmsg/affinity macros. No unsafeFlags anywhere, so `import VirtioNet` works from
// another package once Scripts/setup.sh has installed Configs/pkgconfig/vio-dpdk.pc.
let package = Package(
    name: "swift-virtio",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "VirtioCore", targets: ["VirtioCore"]),
        .library(name: "VirtioNet", targets: ["VirtioNet"]),
        .library(name: "VirtioBlk", targets: ["VirtioBlk"]),
        .library(name: "VhostUser", targets: ["VhostUser"]),
        .library(name: "VirtioPCI", targets: ["VirtioPCI"]),
        .library(name: "DPDK", targets: ["DPDK"]),
        .library(name: "VirtioTestSupport", targets: ["VirtioTestSupport"]),
        .executable(name: "vio", targets: ["vio"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
    ],
    targets: [
        .systemLibrary(name: "CDPDK", pkgConfig: "vio-dpdk",
                       providers: [.apt(["libdpdk-dev", "libnuma-dev"])]),
        .target(name: "CVioLinux"),
        .target(name: "DPDK", dependencies: ["CDPDK", "CVioLinux", "VirtioCore"]),
        .target(name: "VirtioCore"),
        .target(name: "VhostUser", dependencies: [
            "VirtioCore", "CVioLinux", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "VirtioPCI", dependencies: [
            "VirtioCore", "DPDK", "CVioLinux", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "VirtioNet", dependencies: [
            "VirtioCore", "VhostUser", "DPDK", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "VirtioBlk", dependencies: [
            "VirtioCore", "VhostUser", "DPDK", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "VirtioTestSupport", dependencies: ["VirtioCore"]),
        .executableTarget(name: "vio", dependencies: [
            "VirtioNet", "VirtioBlk", "VirtioCore", "DPDK", "VhostUser", "VirtioPCI", "CVioLinux",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Histogram", package: "hdrhistogram-swift"),
        ]),
        .testTarget(name: "VirtioCoreTests", dependencies: ["VirtioCore", "VirtioTestSupport"]),
        .testTarget(name: "VhostUserTests", dependencies: ["VhostUser", "VirtioCore", "CVioLinux"]),
        .testTarget(name: "DPDKTests", dependencies: ["DPDK"]),
        .testTarget(name: "VirtioPCITests", dependencies: ["VirtioPCI", "VirtioCore"]),
        .testTarget(name: "IntegrationTests", dependencies: ["vio"]),
    ],
    swiftLanguageModes: [.v5]
)
