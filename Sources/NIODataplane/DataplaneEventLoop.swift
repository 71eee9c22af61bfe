#if canImport(Glibc)
import Glibc
#endif
import DPDK
import CVioLinux
import Dispatch
import NetStack
import NIOCore
import Synchronization

/// A SwiftNIO `EventLoop` whose thread is the dataplane's poll loop.
///
/// The thread that calls `run(_:)` becomes the loop: every turn it polls the port (through
/// `NetStack.poll(_:work:)`, which hands the loop's work the stack's core lock) and, once per
/// turn — not per packet — runs the tasks other code submitted and the scheduled tasks that are
/// due. `execute`, `submit` and `scheduleTask` are safe from any thread: tasks from other threads
/// go through a locked queue whose "anything there?" flag the loop reads with one relaxed atomic
/// load per turn, so an idle queue costs no lock. Scheduled tasks live in a heap on the loop
/// thread, keyed by TSC deadline, so a turn with no timer due reads the TSC once.
///
/// Channel code (`DataplaneChannel`) runs inside these tasks and inside NetStack's event
/// handlers, always on the loop thread with the stack's lock held.
public final class DataplaneEventLoop: EventLoop, @unchecked Sendable {
    /// Tasks submitted since the last drain, from any thread.
    private let queue = Mutex<[() -> Void]>([])
    /// Set when `queue` is not empty (a hint the loop reads without the lock).
    private let queued = Atomic<Bool>(false)
    /// The loop's thread while `run` runs (`pthread_t` as an integer; 0: not running).
    private let thread = Atomic<UInt>(0)
    private enum State: UInt8 { case idle = 0, running, stopping, stopped }
    private let state = Atomic<UInt8>(State.idle.rawValue)
    /// Callbacks waiting for the loop to stop (`shutdownGracefully`).
    private let shutdownWaiters = Mutex<[(DispatchQueue, @Sendable (Error?) -> Void)]>([])

    /// Serialises the threads that stand in for a stopped loop.
    private let afterStop = Mutex<Void>(())
    /// Loop-thread state.
    private var drained: [() -> Void] = []
    private var timers = TimerHeap()
    private var nextTimerID: UInt64 = 0
    /// Channels registered with the loop, closed when it shuts down.
    var channels: [ObjectIdentifier: any Channel] = [:]
    /// Closed channels whose last flushed writes still go out; each entry ends one at once.
    var lingering: [ObjectIdentifier: () -> Void] = [:]

    let cyclesPerSecond: UInt64
    /// File-region writes read into this before lwIP copies them (one loop, one thread).
    let fileScratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 64)
    private let nanosPerCycle: Double
    private let cyclesPerNano: Double

    private(set) var _taskExecutor: DataplaneTaskExecutor!

    /// Turns the loop has run; tasks and timers each counted once they ran.
    public private(set) var turns: UInt64 = 0
    public private(set) var tasksRun: UInt64 = 0
    public private(set) var timersFired: UInt64 = 0

    /// - Parameter cyclesPerSecond: the TSC rate; by default DPDK's (EAL must be up) or, without
    ///   EAL, measured against the monotonic clock once.
    public init(cyclesPerSecond: UInt64? = nil) {
        var hz = cyclesPerSecond ?? TSC.hz
        if hz == 0 { hz = Self.measureTSC() }
        self.cyclesPerSecond = hz
        nanosPerCycle = 1e9 / Double(hz)
        cyclesPerNano = Double(hz) / 1e9
        drained.reserveCapacity(64)
        _taskExecutor = DataplaneTaskExecutor(loop: self)
    }

    deinit {
        fileScratch.deallocate()
        if wakeFD >= 0 { Glibc.close(wakeFD) }
    }

    static func measureTSC() -> UInt64 {
        let t0 = NIODeadline.now().uptimeNanoseconds, c0 = TSC.now()
        var t1 = t0
        while t1 &- t0 < 20_000_000 { t1 = NIODeadline.now().uptimeNanoseconds }
        let c1 = TSC.now()
        return max(1, UInt64(Double(c1 &- c0) * 1e9 / Double(t1 &- t0)))
    }

    // MARK: EventLoop

    public var inEventLoop: Bool {
        let t = thread.load(ordering: .acquiring)
        return t != 0 && pthread_equal(pthread_t(t), pthread_self()) != 0
    }

    public var now: NIODeadline { .now() }

    /// True once `shutdownGracefully` was called or the loop stopped.
    public var isShuttingDown: Bool { state.load(ordering: .acquiring) >= State.stopping.rawValue }

    public func execute(_ task: @escaping @Sendable () -> Void) { enqueue(task) }

    public func _executeIsolatedUnsafeUnchecked(_ task: @escaping () -> Void) { enqueue(task) }

    /// Written when a task arrives for a sleeping loop.
    let wakeFD: Int32 = cvio_eventfd()
    /// True while the loop thread sleeps in `sleep(until:descriptor:)`.
    private let sleeping = Atomic<Bool>(false)
    /// Sleeps so far, and those a task, a descriptor or the time limit ended.
    public private(set) var sleeps: UInt64 = 0
    public private(set) var sleptCycles: UInt64 = 0

    /// TSC cycles until the next scheduled task (nil: none).
    public var cyclesUntilNextTimer: UInt64? {
        let due = timers.topDeadline
        guard due != .max else { return nil }
        let now = TSC.now()
        return due > now ? due - now : 0
    }

    /// On the loop thread, between turns: blocks until a task arrives from another thread,
    /// `descriptor` becomes readable (e.g. a queue's call eventfd) or `maxCycles` pass — unless
    /// work is already there. A signal ends it too (EINTR). Returns whether it slept.
    @discardableResult
    public func sleep(maxCycles: UInt64, descriptor: Int32?) -> Bool {
        var limit = maxCycles
        if let t = cyclesUntilNextTimer { limit = min(limit, t) }
        guard limit > 0 else { return false }
        // Announce the sleep, then look for tasks: an enqueuer stores its task, then looks for
        // a sleeper (both sequentially consistent), so one of the two always sees the other.
        sleeping.store(true, ordering: .sequentiallyConsistent)
        if queued.load(ordering: .sequentiallyConsistent) {
            sleeping.store(false, ordering: .relaxed)
            return false
        }
        let start = TSC.now()
        var fds = [pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: descriptor ?? -1, events: Int16(POLLIN), revents: 0)]
        let ms = Int32(min(Double(limit) * nanosPerCycle / 1e6, 1000).rounded(.up))
        _ = poll(&fds, nfds_t(descriptor == nil ? 1 : 2), max(1, ms))
        sleeping.store(false, ordering: .relaxed)
        var counter: UInt64 = 0
        if fds[0].revents != 0 { _ = read(wakeFD, &counter, 8) }
        if let d = descriptor, fds[1].revents != 0 { _ = read(d, &counter, 8) }
        sleeps &+= 1
        sleptCycles &+= TSC.now() &- start
        return true
    }

    private func enqueue(_ task: @escaping () -> Void) {
        if state.load(ordering: .acquiring) == State.stopped.rawValue {
            // The loop thread is gone: the caller's thread stands in for it while the task runs
            // (one at a time), so futures of the stopped loop still complete and a `wait()` on
            // one does not hang. Its channels are all closed by then.
            if inEventLoop { task(); return }
            afterStop.withLock { _ in
                thread.store(UInt(pthread_self()), ordering: .releasing)
                task()
                thread.store(0, ordering: .releasing)
            }
            return
        }
        queue.withLock { q in
            q.append(task)
            queued.store(true, ordering: .sequentiallyConsistent)
        }
        if sleeping.load(ordering: .sequentiallyConsistent) {
            var one: UInt64 = 1
            _ = write(wakeFD, &one, 8)
        }
    }

    @discardableResult
    public func scheduleTask<T>(deadline: NIODeadline, _ task: @escaping @Sendable () throws -> T) -> Scheduled<T> {
        _scheduleTaskIsolatedUnsafeUnchecked(deadline: deadline, task)
    }

    @discardableResult
    public func scheduleTask<T>(in amount: TimeAmount, _ task: @escaping @Sendable () throws -> T) -> Scheduled<T> {
        _scheduleTaskIsolatedUnsafeUnchecked(deadline: .now() + amount, task)
    }

    @discardableResult
    public func _scheduleTaskIsolatedUnsafeUnchecked<T>(in amount: TimeAmount, _ task: @escaping () throws -> T) -> Scheduled<T> {
        _scheduleTaskIsolatedUnsafeUnchecked(deadline: .now() + amount, task)
    }

    @discardableResult
    public func _scheduleTaskIsolatedUnsafeUnchecked<T>(deadline: NIODeadline, _ task: @escaping () throws -> T) -> Scheduled<T> {
        let promise: EventLoopPromise<T> = makePromise()
        let timer = ScheduledTimer(deadline: tscDeadline(deadline), deadlineNanos: deadline.uptimeNanoseconds,
                                   run: { do { promise.succeed(try task()) } catch { promise.fail(error) } },
                                   fail: { promise.fail($0) })
        if isShuttingDown {
            promise.fail(EventLoopError.shutdown)
        } else if inEventLoop {
            addTimer(timer)
        } else {
            enqueue { [self] in addTimer(timer) }
        }
        return Scheduled(promise: promise, cancellationTask: { [self] in
            if inEventLoop { cancel(timer) } else { enqueue { [self] in cancel(timer) } }
        })
    }

    public func shutdownGracefully(queue callbackQueue: DispatchQueue, _ callback: @escaping @Sendable (Error?) -> Void) {
        let current = State(rawValue: state.load(ordering: .acquiring))!
        if current == .stopped {
            callbackQueue.async { callback(nil) }
            return
        }
        shutdownWaiters.withLock { $0.append((callbackQueue, callback)) }
        if state.compareExchange(expected: State.idle.rawValue, desired: State.stopped.rawValue, ordering: .acquiringAndReleasing).exchanged {
            // Never ran: there is no loop thread to stop. What was queued runs here, with this
            // thread standing in for the loop (scheduled tasks then fail).
            afterStop.withLock { _ in
                thread.store(UInt(pthread_self()), ordering: .releasing)
                for task in takeQueue() { task() }   // adds the scheduled tasks to the heap
                while let t = timers.top {
                    timers.remove(t)
                    t.fail(EventLoopError.shutdown)
                }
                thread.store(0, ordering: .releasing)
            }
            notifyStopped()
            return
        }
        _ = state.compareExchange(expected: State.running.rawValue, desired: State.stopping.rawValue, ordering: .acquiringAndReleasing)
        if State(rawValue: state.load(ordering: .acquiring))! == .stopped { notifyStopped() }
    }

    public func next() -> EventLoop { self }
    public func any() -> EventLoop { self }
    public func makeIterator() -> EventLoopIterator { EventLoopIterator([self]) }

    // MARK: timers

    private func tscDeadline(_ deadline: NIODeadline) -> UInt64 {
        let nowNanos = NIODeadline.now().uptimeNanoseconds, nowCycles = TSC.now()
        let d = deadline.uptimeNanoseconds
        guard d > nowNanos else { return nowCycles }
        let delta = Double(d - nowNanos) * cyclesPerNano
        return delta >= Double(UInt64.max - nowCycles) ? UInt64.max : nowCycles &+ UInt64(delta)
    }

    private func addTimer(_ t: ScheduledTimer) {
        nextTimerID &+= 1
        t.sequence = nextTimerID
        timers.insert(t)
    }

    private func cancel(_ t: ScheduledTimer) {
        guard t.index >= 0 else { return }   // fired or cancelled already
        timers.remove(t)
        t.fail(EventLoopError.cancelled)
    }

    /// Scheduled tasks not yet run.
    public var scheduledCount: Int { timers.count }

    // MARK: the loop

    /// True when this turn has tasks or a due timer (read by NetStack's poll without its lock).
    @inline(__always)
    public var hasWork: Bool {
        if queued.load(ordering: .relaxed) { return true }
        let due = timers.topDeadline   // a plain integer: no reference counting per turn
        return due != .max && TSC.now() >= due
    }

    /// Runs the tasks queued so far (not those they queue: those wait for the next turn, so the
    /// port is polled between them) and the timers that are due. On the loop thread, inside a
    /// poll turn.
    public func runWork() {
        if queued.load(ordering: .acquiring) {
            // Swap the queue's storage with the empty drained array: no copy, no allocation.
            queue.withLock { q in
                swap(&q, &drained)
                queued.store(false, ordering: .relaxed)
            }
            for task in drained { task() }
            tasksRun &+= UInt64(drained.count)
            drained.removeAll(keepingCapacity: true)
        }
        guard timers.top != nil else { return }
        let now = TSC.now()
        while let top = timers.top, top.deadline <= now {
            // The TSC deadline is converted with a measured rate: never run a task before its
            // deadline on the monotonic clock (it is then due on a later turn).
            if NIODeadline.now().uptimeNanoseconds < top.deadlineNanos { break }
            timers.remove(top)
            timersFired &+= 1
            top.run()
        }
    }

    /// Runs the loop on the calling thread until `shutdownGracefully`: `turn` is called over and
    /// over and must run the loop's work once per call — `stack.poll(&port, work: loop)` does,
    /// or `loop.runWork()` for a loop without a port. After the stop request the loop closes its
    /// channels, keeps turning until their closes have run, fails the scheduled tasks with
    /// `EventLoopError.shutdown` and calls the shutdown callbacks.
    public func run(_ turn: (DataplaneEventLoop) -> Void) {
        guard state.compareExchange(expected: State.idle.rawValue, desired: State.running.rawValue, ordering: .acquiringAndReleasing).exchanged else {
            precondition(state.load(ordering: .acquiring) == State.stopped.rawValue, "DataplaneEventLoop.run called twice")
            return   // shut down before it ran
        }
        thread.store(UInt(pthread_self()), ordering: .releasing)
        while state.load(ordering: .relaxed) == State.running.rawValue {
            turn(self)
            turns &+= 1
        }
        // Stopping: close what is open, let the closes and what they queue run.
        let open = Array(channels.values)
        for c in open { execute { c.close(promise: nil) } }
        var quiet = 0
        while quiet < 4 {
            let before = tasksRun
            turn(self)
            turns &+= 1
            quiet = (tasksRun == before && !queued.load(ordering: .acquiring)) ? quiet + 1 : 0
        }
        // Closed connections still sending their last bytes get those quiet turns, then end.
        for end in Array(lingering.values) { execute { end() } }
        turn(self)
        while let t = timers.top {
            timers.remove(t)
            t.fail(EventLoopError.shutdown)
        }
        // What arrived during the last turn runs here; later tasks run on their caller's thread.
        afterStop.withLock { _ in
            state.store(State.stopped.rawValue, ordering: .releasing)
            for task in takeQueue() { task() }
            thread.store(0, ordering: .releasing)
        }
        notifyStopped()
    }

    private func takeQueue() -> [() -> Void] {
        queue.withLock { q in
            queued.store(false, ordering: .relaxed)
            defer { q.removeAll(keepingCapacity: true) }
            return q
        }
    }

    private func notifyStopped() {
        let waiters = shutdownWaiters.withLock { w in defer { w.removeAll() }; return w }
        for (q, cb) in waiters { q.async { cb(nil) } }
    }
}

/// An `EventLoopGroup` of dataplane loops, one per port (lwIP is one stack per process, so today
/// that is one loop).
public final class DataplaneEventLoopGroup: EventLoopGroup, @unchecked Sendable {
    public let loops: [DataplaneEventLoop]
    private let index = Atomic<Int>(0)

    public init(loops: [DataplaneEventLoop]) {
        precondition(!loops.isEmpty, "a DataplaneEventLoopGroup needs at least one loop")
        self.loops = loops
    }

    public func next() -> EventLoop { loops[index.wrappingAdd(1, ordering: .relaxed).oldValue % loops.count] }
    public func any() -> EventLoop {
        loops.first(where: { $0.inEventLoop }) ?? loops[0]
    }
    public func makeIterator() -> EventLoopIterator { EventLoopIterator(loops) }

    public func shutdownGracefully(queue: DispatchQueue, _ callback: @escaping @Sendable (Error?) -> Void) {
        let remaining = Atomic<Int>(loops.count)
        for l in loops {
            l.shutdownGracefully(queue: queue) { _ in
                if remaining.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 { callback(nil) }
            }
        }
    }
}

// MARK: scheduled tasks

final class ScheduledTimer {
    let deadline: UInt64
    /// The deadline as NIO gave it (CLOCK_MONOTONIC nanoseconds).
    let deadlineNanos: UInt64
    var sequence: UInt64 = 0
    /// Position in the heap; -1 when not in it.
    var index = -1
    let run: () -> Void
    let fail: (Error) -> Void
    init(deadline: UInt64, deadlineNanos: UInt64, run: @escaping () -> Void, fail: @escaping (Error) -> Void) {
        self.deadline = deadline
        self.deadlineNanos = deadlineNanos
        self.run = run
        self.fail = fail
    }
    /// Earlier deadline first; equal deadlines in the order they were scheduled. Ordered by NIO's
    /// deadline, not the TSC one: each conversion reads both clocks anew, so two equal deadlines
    /// can convert to TSC values in either order.
    @inline(__always) func before(_ o: ScheduledTimer) -> Bool {
        deadlineNanos != o.deadlineNanos ? deadlineNanos < o.deadlineNanos : sequence < o.sequence
    }
}

/// A binary min-heap of timers that knows each timer's position, so a cancel removes it at once
/// (NIO code cancels idle timeouts all the time; leaving them in place would grow the heap).
struct TimerHeap {
    private var items: [ScheduledTimer] = []
    var count: Int { items.count }
    var top: ScheduledTimer? { items.first }
    /// The earliest deadline (UInt64.max: none), kept beside the heap so that the loop's
    /// per-turn check reads an integer.
    private(set) var topDeadline = UInt64.max

    mutating func insert(_ t: ScheduledTimer) {
        t.index = items.count
        items.append(t)
        up(t.index)
        topDeadline = items[0].deadline
    }

    mutating func remove(_ t: ScheduledTimer) {
        let i = t.index
        guard i >= 0, i < items.count, items[i] === t else { return }
        let last = items.count - 1
        if i != last {
            items.swapAt(i, last)
            items[i].index = i
        }
        items.removeLast()
        t.index = -1
        if i < items.count { down(i); up(i) }
        topDeadline = items.first?.deadline ?? .max
    }

    private mutating func up(_ start: Int) {
        var i = start
        while i > 0 {
            let p = (i - 1) / 2
            guard items[i].before(items[p]) else { break }
            items.swapAt(i, p)
            items[i].index = i
            items[p].index = p
            i = p
        }
    }

    private mutating func down(_ start: Int) {
        var i = start
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < items.count, items[l].before(items[m]) { m = l }
            if r < items.count, items[r].before(items[m]) { m = r }
            guard m != i else { return }
            items.swapAt(i, m)
            items[i].index = i
            items[m].index = m
            i = m
        }
    }
}

/// Runs Swift concurrency jobs on the dataplane loop (`withTaskExecutorPreference`,
/// `group.addTask(executorPreference:)`): async code that drives dataplane channels then runs on
/// the loop thread, between polls, instead of hopping to the cooperative pool and back for every
/// read and write. Like any code on the loop, it must not block.
public final class DataplaneTaskExecutor: TaskExecutor, @unchecked Sendable {
    public unowned let loop: DataplaneEventLoop
    init(loop: DataplaneEventLoop) { self.loop = loop }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { [self] in job.runSynchronously(on: asUnownedTaskExecutor()) }
    }
}

extension DataplaneEventLoop {
    /// The loop as a Swift concurrency task executor.
    public var taskExecutor: DataplaneTaskExecutor { _taskExecutor }
}
