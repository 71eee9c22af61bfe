// swift-tools-version:6.2
import Foundation
import PackageDescription

// SwiftPM names a path dependency after its folder (the clone's name): find it.
let library = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().lastPathComponent

// Hummingbird 2 on the swift-virtio dataplane: a separate package, so that Hummingbird and its
// dependencies stay out of the library graph of everyone who only wants the driver or NIO.
let package = Package(
    name: "HummingbirdDataplane",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "HummingbirdDataplane", targets: ["HummingbirdDataplane"]),
    ],
    dependencies: [
        .package(path: "../.."),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        .target(name: "HummingbirdDataplane", dependencies: [
            .product(name: "NIODataplane", package: library),
            .product(name: "NetStack", package: library),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "HummingbirdCore", package: "hummingbird"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
    ],
    swiftLanguageModes: [.v5]
)
