// swift-tools-version:6.2
import PackageDescription

// A Hummingbird 2 application served on the swift-virtio dataplane (lwIP TCP/IP on the
// poll-mode virtio-net driver) instead of the kernel. The same app runs on NIOPosix with
// `--kernel` (for side-by-side measurements).
let package = Package(
    name: "HummingbirdOnDataplane",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: "../../Integrations/HummingbirdDataplane"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.0"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.0.0"),
    ],
    targets: [
        .executableTarget(name: "HummingbirdOnDataplane", dependencies: [
            .product(name: "HummingbirdDataplane", package: "HummingbirdDataplane"),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "HTTPTypes", package: "swift-http-types"),
        ]),
    ],
    swiftLanguageModes: [.v5]
)
