// swift-tools-version:6.0
import PackageDescription

// The library graph: CDPDK → DPDK (memory) · VirtioCore (queues and the device core) ·
// VhostUser, VirtioPCI (transports) · VirtioNet, VirtioBlk (devices, on the device core; they
// import no transport) → NetStack → DataplaneHTTP → vio (CLI, which picks the transports). Only CDPDK sees DPDK headers; only CVioLinux sees the
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
        .library(name: "NetStack", targets: ["NetStack"]),
        .library(name: "NIODataplane", targets: ["NIODataplane"]),
        .library(name: "DataplaneHTTP", targets: ["DataplaneHTTP"]),
        .executable(name: "vio", targets: ["vio"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
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
            "VirtioCore", "DPDK", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "VirtioBlk", dependencies: [
            "VirtioCore", "DPDK", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "VirtioTestSupport", dependencies: ["VirtioCore", "DPDK"]),
        // TCP/IP on a virtio-net port: lwIP (Debian's liblwip) behind a small C glue, then a
        // Swift listener/connection API, then HTTP/1.1 with NIOHTTP1's codecs.
        .systemLibrary(name: "CLwIP", pkgConfig: "lwip", providers: [.apt(["liblwip-dev"])]),
        .target(name: "CVioLwIP", dependencies: ["CLwIP"]),
        .target(name: "NetStack", dependencies: ["CVioLwIP", "VirtioNet", "DPDK"]),
        // SwiftNIO on the dataplane: an EventLoop that is the poll loop, Channels on NetStack's
        // TCP connections, a server bootstrap.
        .target(name: "NIODataplane", dependencies: [
            "NetStack", "DPDK", "VirtioNet", "VirtioCore", "VhostUser", "CVioLinux",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "DataplaneHTTP", dependencies: [
            "NetStack", "NIODataplane", "VirtioNet", "VirtioCore", "VhostUser", "DPDK",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "vio", dependencies: [
            "VirtioNet", "VirtioBlk", "VirtioCore", "DPDK", "VhostUser", "VirtioPCI", "CVioLinux", "NetStack", "DataplaneHTTP", "NIODataplane",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Histogram", package: "hdrhistogram-swift"),
        ]),
        .testTarget(name: "VirtioCoreTests", dependencies: ["VirtioCore", "VirtioTestSupport"]),
        .testTarget(name: "VhostUserTests", dependencies: ["VhostUser", "VirtioCore", "CVioLinux"]),
        .testTarget(name: "DPDKTests", dependencies: ["DPDK"]),
        .testTarget(name: "VirtioNetTests", dependencies: ["VirtioNet", "VirtioCore", "DPDK", "VirtioTestSupport"]),
        .testTarget(name: "VirtioBlkTests", dependencies: ["VirtioBlk", "VirtioCore", "DPDK", "VirtioTestSupport"]),
        .testTarget(name: "VirtioPCITests", dependencies: ["VirtioPCI", "VirtioCore", "VirtioTestSupport"]),
        // The test suite's own vhost-user device, which misbehaves on command (Tests/HostileDevice).
        .executableTarget(name: "hostile-device", dependencies: ["VhostUser", "VirtioCore", "VirtioTestSupport", "CVioLinux"],
                          path: "Tests/HostileDevice"),
        // A NIO server on the dataplane for the channel tests (Tests/NIOProbe).
        .executableTarget(name: "nio-probe", dependencies: [
            "NIODataplane", "NetStack",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ], path: "Tests/NIOProbe"),
        .testTarget(name: "IntegrationTests", dependencies: ["vio", "hostile-device", "nio-probe"]),
        .testTarget(name: "NIODataplaneTests", dependencies: [
            "NIODataplane", .product(name: "NIOCore", package: "swift-nio"),
        ]),
        .testTarget(name: "DataplaneHTTPTests", dependencies: [
            "DataplaneHTTP", "NetStack",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
    ],
    swiftLanguageModes: [.v5]
)
