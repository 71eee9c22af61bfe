// swift-tools-version:6.0
import Foundation
import PackageDescription

// SwiftPM names a path dependency after its folder (the clone's name): find it.
let library = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().lastPathComponent

// A separate package that embeds the swift-virtio dataplane HTTP server (proof that the
// libraries work from another package: no unsafe flags, only Scripts/setup.sh's pkg-config files).
let package = Package(
    name: "HelloServer",
    dependencies: [
        .package(path: "../.."),
    ],
    targets: [
        .executableTarget(name: "HelloServer", dependencies: [
            .product(name: "DataplaneHTTP", package: library),
            .product(name: "NetStack", package: library),
        ]),
    ],
    swiftLanguageModes: [.v5]
)
