import Synchronization

/// One link state for every queue of a device. Whoever learns first that the device cannot be
/// used any more — a queue whose ring the device broke, the transport's hang-up monitor, a stop —
/// marks it down with the reason; every queue sees it at its next poll with one relaxed atomic load
/// (no syscall, no lock on the data path). It goes up again only when the device core starts
/// the device.
public final class DeviceLink: @unchecked Sendable {
    @usableFromInline let down = Atomic<Bool>(true)
    private let why = Mutex<String?>("not started")
    @usableFromInline let upCount = Atomic<UInt64>(0)

    public init() {}

    /// True while the device runs. One relaxed load: cheap enough for every poll.
    @inlinable public var isUp: Bool { !down.load(ordering: .relaxed) }

    /// Why the link is down (the first reason given since it last came up), or nil while up.
    public var reason: String? { isUp ? nil : why.withLock { $0 } }

    /// Marks the link down; the first reason wins. Safe from any thread.
    public func markDown(_ reason: String) {
        why.withLock { if $0 == nil { $0 = reason } }
        down.store(true, ordering: .releasing)
    }

    /// How many times the link came up: a queue owner that remembers it sees a reconnect
    /// (the rings restarted from their reset position) even if it never saw the link down.
    @inlinable public var epoch: UInt64 { upCount.load(ordering: .acquiring) }

    /// Called by the device core once the device is (again) running.
    func markUp() {
        why.withLock { $0 = nil }
        upCount.add(1, ordering: .releasing)
        down.store(false, ordering: .releasing)
    }
}
