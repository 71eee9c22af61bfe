import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How a device rides through the loss of its backend (vhost-user: the backend hung up or was
/// killed; it comes back on the same socket). Off by default: a lost device ends the run.
public struct ReconnectPolicy: Sendable, Equatable {
    /// How long after the loss the device may take to come back; nil: no limit (until stopped).
    public var timeout: Double?
    public init(timeout: Double? = nil) { self.timeout = timeout }
}

/// One loss of the device and its return: when (seconds since the device started), how long the
/// link was down, why. `recovered` false: the device never came back (the run ends with it).
public struct DeviceOutage: Sendable, Codable, Equatable {
    public var startSeconds: Double
    public var seconds: Double
    public var reason: String
    public var recovered: Bool
}

/// Why a device with a reconnect policy gave up; `exitCode` is what an app ends with (1: the
/// device that came back cannot be used as before; 2: it did not come back in time).
public struct ReconnectFailure: Error, CustomStringConvertible, Sendable, Equatable {
    public var description: String
    public var exitCode: Int32
    public init(_ description: String, exitCode: Int32) { self.description = description; self.exitCode = exitCode }
}

/// Errors a transport's `reconnect` ends with when it gives up.
public enum ReconnectError: Error, CustomStringConvertible, Sendable {
    case timedOut(seconds: Double)
    case aborted
    public var description: String {
        switch self {
        case .timedOut(let s): return "the device did not come back within \(tenths(s)) s"
        case .aborted: return "reconnect aborted (the device was stopped)"
        }
    }
}

/// A duration for a message, to a tenth of a second.
func tenths(_ s: Double) -> String {
    let t = Int((s * 10).rounded())
    return "\(t / 10).\(t % 10)"
}

/// CLOCK_MONOTONIC in nanoseconds (control path only).
public func monotonicNow() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func sleepNanoseconds(_ ns: UInt64) {
    var ts = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
    var left = timespec()
    while nanosleep(&ts, &left) != 0 && errno == EINTR { ts = left }
}

/// The thread that brings a lost device back (one per device with a reconnect policy). The queue
/// owners see the link go down at their next link check, hand back what their rings held and
/// reset them (`VirtioDevice.ringsReset`); meanwhile this thread waits for the backend (the
/// transport's `reconnect`: connect again with backoff, or accept its next connection), checks that
/// it offers every feature negotiated before, waits for every ring to be reset, and then does the
/// second half of the handshake again — features, the memory table, every ring from its reset
/// position, DRIVER_OK — and takes the link up (a new epoch). It holds no reference to the device.
final class ReconnectAgent: @unchecked Sendable {
    let transport: any VirtioTransport
    let link: DeviceLink
    let policy: ReconnectPolicy
    let features: VirtioFeatures
    let queueCount: Int, queuesPerUnit: Int
    let indices: [Int]
    let addresses: [QueueAddresses]
    let memoryTable: () throws -> [MemoryRegion]
    let run: DeviceRunState
    /// Run before the rings are handed over on every reconnect (net over PCI: reset the control
    /// queue, which the device type owns), and once the link is up again (net: the pairs not in
    /// use disabled, RX modes and MAC given again).
    let beforeSetup: Mutex<(() throws -> Void)?> = Mutex(nil)
    let afterStart: Mutex<(() throws -> Void)?> = Mutex(nil)
    /// Slots whose owner reset its ring for the current outage; the slots that must be.
    let reset = Mutex<Set<Int>>([])
    /// Rings handed back as they were (the device resumes them), by slot: their addresses and base.
    let kept = Mutex<[Int: QueueAddresses]>([:])
    let mustReset: Mutex<Set<Int>>
    let quit = Atomic<Bool>(false)
    /// Set once the lost device touches none of our memory any more (a vhost-user backend that is
    /// gone; a PCI device after its reset): only then may owners take their buffers back.
    let quiesced = Atomic<Bool>(false)
    let failure = Mutex<ReconnectFailure?>(nil)
    let outages = Mutex<[DeviceOutage]>([])
    /// The outage under way: when it began (seconds since start) and why.
    let current = Mutex<(Double, String)?>(nil)
    let started = monotonicNow()
    var thread: pthread_t?

    init(transport: any VirtioTransport, link: DeviceLink, policy: ReconnectPolicy, features: VirtioFeatures, queueCount: Int,
         queuesPerUnit: Int, indices: [Int], addresses: [QueueAddresses], mustReset: Set<Int>,
         memoryTable: @escaping () throws -> [MemoryRegion], run: DeviceRunState) {
        self.transport = transport; self.link = link; self.policy = policy; self.features = features
        self.queueCount = queueCount; self.queuesPerUnit = queuesPerUnit; self.indices = indices; self.addresses = addresses
        self.mustReset = Mutex(mustReset); self.memoryTable = memoryTable; self.run = run
    }

    func start() {
        let box = Unmanaged.passRetained(self)
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { arg in
            let agent = Unmanaged<ReconnectAgent>.fromOpaque(arg!).takeRetainedValue()
            agent.loop()
            return nil
        }, box.toOpaque())
        if rc == 0 { thread = tid } else { box.release() }
    }

    /// Ends the thread (the device is being stopped); returns once it has.
    func shutdown() {
        quit.store(true, ordering: .releasing)
        if let t = thread { pthread_join(t, nil); thread = nil }
    }

    private var seconds: Double { Double(monotonicNow() &- started) / 1e9 }

    /// Every outage, the one under way included (not recovered, so far).
    var allOutages: [DeviceOutage] {
        var o = outages.withLock { $0 }
        if let (start, why) = current.withLock({ $0 }) { o.append(DeviceOutage(startSeconds: start, seconds: seconds - start, reason: why, recovered: false)) }
        return o
    }

    private func giveUp(_ f: ReconnectFailure, outageStart: Double, reason: String) {
        failure.withLock { if $0 == nil { $0 = f } }
        current.withLock { $0 = nil }
        outages.withLock { $0.append(DeviceOutage(startSeconds: outageStart, seconds: seconds - outageStart, reason: reason, recovered: false)) }
        link.markDown(f.description)
    }

    /// The device is being stopped during an outage: it is recorded as not recovered.
    private func abandoned(outageStart: Double, reason: String) {
        current.withLock { $0 = nil }
        outages.withLock { $0.append(DeviceOutage(startSeconds: outageStart, seconds: seconds - outageStart, reason: reason, recovered: false)) }
    }

    private func loop() {
        while !quit.load(ordering: .acquiring) {
            if link.isUp || run.stopped.load(ordering: .acquiring) { sleepNanoseconds(2_000_000); continue }
            let reason = link.reason ?? "device lost"
            let began = monotonicNow()
            let outageStart = seconds
            current.withLock { $0 = (outageStart, reason) }
            // Only a lost transport is repaired; a ring the device broke is a failure of its own.
            guard transport.canReconnect, !transport.isConnected else {
                giveUp(ReconnectFailure(reason, exitCode: 2), outageStart: outageStart, reason: reason)
                return
            }
            // Make sure the device has let go of our memory before the owners take it back: a
            // stop is a no-op for a backend that is gone and a reset for a PCI function.
            run.running.withLock { r in
                r = false
                try? transport.stop()
            }
            quiesced.store(true, ordering: .releasing)
            let deadline = policy.timeout.map { began &+ UInt64($0 * 1e9) } ?? .max
            let abort = { self.quit.load(ordering: .relaxed) }
            while true {
                if abort() { abandoned(outageStart: outageStart, reason: reason); return }
                do {
                    try transport.reconnect(deadline: deadline, abort: abort)
                } catch ReconnectError.aborted {
                    abandoned(outageStart: outageStart, reason: reason)
                    return
                } catch ReconnectError.timedOut {
                    let waited = Double(monotonicNow() &- began) / 1e9
                    giveUp(ReconnectFailure("the device did not come back within \(tenths(policy.timeout ?? waited)) s (waited \(tenths(waited)) s; lost: \(reason))", exitCode: 2),
                           outageStart: outageStart, reason: reason)
                    return
                } catch {
                    // A backend that went away again during the handshake: wait for the next one.
                    sleepNanoseconds(20_000_000)
                    continue
                }
                let missing = features.subtracting(transport.deviceFeatures)
                guard missing.isEmpty else {
                    giveUp(ReconnectFailure("\(transport.deviceDescription) came back without features negotiated before: \(missing)", exitCode: 1),
                           outageStart: outageStart, reason: reason)
                    return
                }
                // Every ring must be back at its reset position before the device sees it.
                while !abort() {
                    let done = reset.withLock { r in mustReset.withLock { $0.isSubset(of: r) } }
                    if done { break }
                    if monotonicNow() >= deadline {
                        giveUp(ReconnectFailure("the queues were not reset within the reconnect timeout (a queue owner stopped polling its link)", exitCode: 2),
                               outageStart: outageStart, reason: reason)
                        return
                    }
                    sleepNanoseconds(1_000_000)
                }
                if abort() { abandoned(outageStart: outageStart, reason: reason); return }
                do {
                    try transport.negotiate(features, queueCount: queueCount, queuesPerUnit: queuesPerUnit)
                    try transport.setMemory(try memoryTable())
                    try beforeSetup.withLock { $0 }?()
                    let kept = self.kept.withLock { $0 }
                    for (slot, index) in indices.enumerated() { try transport.setupQueue(index, addresses: kept[slot] ?? addresses[slot]) }
                    try transport.start()
                } catch {
                    if transport.isConnected {
                        // A backend that refuses the handshake it accepted before will not change its mind.
                        giveUp(ReconnectFailure("\(transport.deviceDescription): the handshake after reconnecting failed: \(error)", exitCode: 1),
                               outageStart: outageStart, reason: reason)
                        return
                    }
                    sleepNanoseconds(20_000_000)
                    continue
                }
                break
            }
            reset.withLock { $0.removeAll() }
            kept.withLock { $0.removeAll() }
            quiesced.store(false, ordering: .releasing)
            run.running.withLock { $0 = true }
            current.withLock { $0 = nil }
            outages.withLock { $0.append(DeviceOutage(startSeconds: outageStart, seconds: seconds - outageStart, reason: reason, recovered: true)) }
            link.markUp()
            do { try afterStart.withLock { $0 }?() } catch {
                // The device runs but not as configured before (e.g. it refused VQ_PAIRS_SET).
                giveUp(ReconnectFailure("\(transport.deviceDescription): restoring the device's settings after reconnecting failed: \(error)", exitCode: 1),
                       outageStart: outageStart, reason: reason)
                return
            }
        }
    }
}

/// Whether the device runs, shared by the device and its reconnect agent.
final class DeviceRunState: @unchecked Sendable {
    /// Held while a stop talks to the transport, so a second stopper returns only once the
    /// device has let go of our memory.
    let running = Mutex<Bool>(false)
    /// Set by `stop`: a deliberate stop, never repaired.
    let stopped = Atomic<Bool>(false)
}
