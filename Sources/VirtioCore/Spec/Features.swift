/// Feature bits shared by every virtio device type (VIRTIO 1.2 §6 "Reserved Feature Bits").
/// Device-specific bits (0–23) are declared by the device modules as extensions.
public struct VirtioFeatures: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(bit: Int) { self.rawValue = 1 << UInt64(bit) }

    /// VIRTIO_F_INDIRECT_DESC, bit 28, §2.7.5.3.
    public static let indirectDescriptors = VirtioFeatures(bit: 28)
    /// VIRTIO_F_EVENT_IDX, bit 29, §2.7.7.
    public static let eventIndex = VirtioFeatures(bit: 29)
    /// VIRTIO_F_VERSION_1, bit 32: the device is a VIRTIO 1.x device (little-endian, modern).
    public static let version1 = VirtioFeatures(bit: 32)
    /// VIRTIO_F_ACCESS_PLATFORM, bit 33.
    public static let accessPlatform = VirtioFeatures(bit: 33)
    /// VIRTIO_F_RING_PACKED, bit 34, §2.8.
    public static let ringPacked = VirtioFeatures(bit: 34)
    /// VIRTIO_F_IN_ORDER, bit 35: buffers are used in the order they were made available (§2.7.9).
    public static let inOrder = VirtioFeatures(bit: 35)
    /// VIRTIO_F_ORDER_PLATFORM, bit 36.
    public static let orderPlatform = VirtioFeatures(bit: 36)
    /// VIRTIO_F_NOTIFICATION_DATA, bit 38.
    public static let notificationData = VirtioFeatures(bit: 38)

    /// Names for the bits the core knows; device modules add theirs through `names`.
    public nonisolated(unsafe) static var names: [Int: String] = [
        28: "INDIRECT_DESC", 29: "EVENT_IDX", 30: "PROTOCOL_FEATURES", 32: "VERSION_1",
        33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM",
        38: "NOTIFICATION_DATA",
    ]

    public var description: String {
        var parts: [String] = []
        for bit in 0..<64 where rawValue & (1 << UInt64(bit)) != 0 {
            parts.append(Self.names[bit] ?? "bit\(bit)")
        }
        return parts.isEmpty ? "none" : parts.joined(separator: " ")
    }
}

/// Device status field (VIRTIO 1.2 §2.1).
public struct DeviceStatus: OptionSet, Hashable, Sendable {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let acknowledge = DeviceStatus(rawValue: 1)
    public static let driver = DeviceStatus(rawValue: 2)
    public static let driverOK = DeviceStatus(rawValue: 4)
    public static let featuresOK = DeviceStatus(rawValue: 8)
    public static let deviceNeedsReset = DeviceStatus(rawValue: 64)
    public static let failed = DeviceStatus(rawValue: 128)
}
