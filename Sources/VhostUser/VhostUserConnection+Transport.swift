import VirtioCore

// The VirtioTransport requirements added with virtio-pci (issue 7), kept out of
// VhostUserConnection.swift. Buffer addressing stays the protocol's default, process virtual.
extension VhostUserConnection {
    public var hasConfigSpace: Bool { protocolFeatures.contains(.config) }
    public var deviceDescription: String { "vhost-user \(path)" }
}
