import Dispatch
import Foundation
import NIOCore
import NIODataplane
import Synchronization
import XCTest

/// `DataplaneEventLoop` without a port: the turn only runs the loop's work, on a thread of the
/// test's own, as the dataplane lcore would.
final class EventLoopTests: XCTestCase {
    var loop: DataplaneEventLoop!
    var thread: Thread!
    let finished = DispatchSemaphore(value: 0)

    override func setUp() {
        super.setUp()
        loop = DataplaneEventLoop()
        let l = loop!, done = finished
        thread = Thread {
            l.run { $0.runWork() }
            done.signal()
        }
        thread.start()
    }

    override func tearDown() {
        if let loop, !loop.isShuttingDown { try? loop.syncShutdownGracefully() }
        XCTAssertEqual(finished.wait(timeout: .now() + 10), .success, "run did not return after shutdown")
        loop = nil
        super.tearDown()
    }

    func testTasksFromManyThreadsRunOnTheLoopInOrderPerThread() throws {
        XCTAssertFalse(loop.inEventLoop)
        let producers = 4, perProducer = 2000
        final class Log: @unchecked Sendable { var seen: [[Int]] = Array(repeating: [], count: 4); var offLoop = 0 }
        let log = Log()
        let l = loop!
        DispatchQueue.concurrentPerform(iterations: producers) { p in
            for i in 0..<perProducer {
                l.execute {
                    if !l.inEventLoop { log.offLoop += 1 }
                    log.seen[p].append(i)
                }
            }
        }
        // A task submitted last runs after all of them (one FIFO queue).
        let count = try loop.submit { log.seen.map(\.count).reduce(0, +) }.wait()
        XCTAssertEqual(count, producers * perProducer)
        XCTAssertEqual(log.offLoop, 0)
        for p in 0..<producers { XCTAssertEqual(log.seen[p], Array(0..<perProducer), "producer \(p)'s tasks out of order") }
        XCTAssertTrue(try loop.submit { l.inEventLoop }.wait())
        XCTAssertFalse(loop.inEventLoop)
        // Errors thrown by a submitted task fail its future.
        struct Boom: Error {}
        XCTAssertThrowsError(try loop.submit { throw Boom() }.wait()) { XCTAssertTrue($0 is Boom) }
    }

    func testTasksQueuedByTasksRunOnALaterTurn() throws {
        let l = loop!
        let turns = try loop.flatSubmit { () -> EventLoopFuture<(UInt64, UInt64)> in
            let first = l.turns
            let p = l.makePromise(of: (UInt64, UInt64).self)
            l.execute { p.succeed((first, l.turns)) }
            return p.futureResult
        }.wait()
        XCTAssertGreaterThan(turns.1, turns.0, "a task queued by a task ran in the same turn (the port would starve)")
    }

    func testScheduledTasksFireInDeadlineOrderNotEarly() throws {
        let l = loop!
        // Absolute deadlines from one base, so a slow test thread cannot reorder them.
        let base = NIODeadline.now() + .milliseconds(20)
        final class Order: @unchecked Sendable { var fired: [(Int, NIODeadline)] = [] }
        let order = Order()
        var futures: [EventLoopFuture<Void>] = []
        let offsets = [0: 40, 1: 10, 2: 30, 3: 10, 4: 5]
        for i in [0, 1, 2, 3] {
            futures.append(loop.scheduleTask(deadline: base + .milliseconds(Int64(offsets[i]!))) {
                XCTAssertTrue(l.inEventLoop)
                order.fired.append((i, NIODeadline.now()))
            }.futureResult)
        }
        // From the loop itself too.
        futures.append(try loop.submit {
            l.scheduleTask(deadline: base + .milliseconds(5)) { order.fired.append((4, NIODeadline.now())) }
        }.wait().futureResult)
        try EventLoopFuture.andAllSucceed(futures, on: loop).wait()
        XCTAssertEqual(order.fired.map(\.0), [4, 1, 3, 2, 0], "equal deadlines keep their order; earlier first")
        for (i, at) in order.fired {
            XCTAssertGreaterThanOrEqual(at.uptimeNanoseconds, (base + .milliseconds(Int64(offsets[i]!))).uptimeNanoseconds,
                                        "task \(i) fired before its deadline")
        }
        XCTAssertEqual(try loop.submit { l.scheduledCount }.wait(), 0)
        // A deadline in the past runs on the next turn.
        XCTAssertEqual(try loop.scheduleTask(deadline: .now() - .seconds(1)) { 7 }.futureResult.wait(), 7)
    }

    func testCancelledTasksNeverRunAndLeaveTheHeap() throws {
        let l = loop!
        let ran = Atomic<Int>(0)
        var scheduled: [Scheduled<Void>] = []
        // Deadlines far enough out that no timer is due while the test runs, however slow the
        // machine: what is checked is that cancelled ones leave the heap and fail as cancelled.
        for i in 0..<100 {
            scheduled.append(loop.scheduleTask(in: .seconds(30) + .milliseconds(Int64(i))) { ran.add(1, ordering: .relaxed) })
        }
        // Among the cancelled ones in the heap, not at its top: removals by index must leave it.
        let kept = loop.scheduleTask(in: .seconds(30) + .milliseconds(50)) { 1 }
        for s in scheduled { s.cancel() }
        for s in scheduled {
            XCTAssertThrowsError(try s.futureResult.wait()) { XCTAssertEqual($0 as? EventLoopError, .cancelled) }
        }
        XCTAssertEqual(try loop.submit { l.scheduledCount }.wait(), 1, "cancelled timers must leave the heap at once")
        kept.cancel()
        XCTAssertThrowsError(try kept.futureResult.wait()) { XCTAssertEqual($0 as? EventLoopError, .cancelled) }
        XCTAssertEqual(try loop.submit { l.scheduledCount }.wait(), 0)
        XCTAssertEqual(ran.load(ordering: .relaxed), 0)
        // A timer that is not cancelled fires; cancelling it afterwards, or on the loop, is harmless.
        let done = loop.scheduleTask(in: .milliseconds(1)) { 2 }
        XCTAssertEqual(try done.futureResult.wait(), 2)
        done.cancel()
        try loop.submit {
            let s = l.scheduleTask(in: .seconds(5)) { XCTFail("cancelled task ran") }
            s.cancel()
        }.wait()
        XCTAssertEqual(try loop.submit { l.scheduledCount }.wait(), 0)
    }

    func testShutdownFailsScheduledTasksRunsQueuedOnesAndCallsBack() throws {
        let l = loop!
        let far = loop.scheduleTask(in: .seconds(60)) { XCTFail("a 60 s task ran at shutdown") }
        let queued = Atomic<Bool>(false)
        let called = DispatchSemaphore(value: 0)
        try loop.submit {
            l.execute { queued.store(true, ordering: .relaxed) }
            l.shutdownGracefully(queue: .global()) { err in
                XCTAssertNil(err)
                called.signal()
            }
        }.wait()
        XCTAssertEqual(called.wait(timeout: .now() + 10), .success, "the shutdown callback was not called")
        XCTAssertThrowsError(try far.futureResult.wait()) { XCTAssertEqual($0 as? EventLoopError, .shutdown) }
        XCTAssertTrue(queued.load(ordering: .relaxed), "a task queued before the shutdown did not run")
        XCTAssertTrue(loop.isShuttingDown)
        XCTAssertEqual(finished.wait(timeout: .now() + 10), .success)
        finished.signal()   // for tearDown
        XCTAssertFalse(loop.inEventLoop)
        // After the stop: a new scheduled task fails at once; a second shutdown still calls back.
        XCTAssertThrowsError(try loop.scheduleTask(in: .milliseconds(1)) { 1 }.futureResult.wait()) {
            XCTAssertEqual($0 as? EventLoopError, .shutdown)
        }
        try loop.syncShutdownGracefully()
    }

    func testGroupHandsOutItsLoopsInTurn() throws {
        let a = DataplaneEventLoop(cyclesPerSecond: 1_000_000_000), b = DataplaneEventLoop(cyclesPerSecond: 1_000_000_000)
        let g = DataplaneEventLoopGroup(loops: [a, b])
        XCTAssertTrue(g.next() === a)
        XCTAssertTrue(g.next() === b)
        XCTAssertTrue(g.next() === a)
        XCTAssertEqual(Array(g.makeIterator()).count, 2)
        // Loops that never ran stop at once.
        try g.syncShutdownGracefully()
        XCTAssertTrue(a.isShuttingDown && b.isShuttingDown)
    }
}
