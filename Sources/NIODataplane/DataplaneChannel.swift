#if canImport(Glibc)
import Glibc
#endif
import NetStack
import NIOCore
import Synchronization

extension DataplaneEventLoop: NetStackTurnWork {}

/// Outbound events a `DataplaneChannel` understands (`triggerUserOutboundEvent`).
public enum DataplaneChannelEvent: Sendable {
    /// Reset the connection (RST) and close the channel, dropping unsent writes — what closing
    /// a socket with SO_LINGER 0 does. A plain `close()` sends what was flushed, then FIN.
    case reset
}

/// A SwiftNIO `Channel` on one NetStack TCP connection (accepted by a `DataplaneServerChannel`).
///
/// Everything runs on the dataplane loop inside `NetStack.poll` (the stack's handlers and the
/// loop's tasks), so the channel takes no lock of its own. Reads: when NetStack reports bytes
/// and a read is pending (`autoRead` or `read()`), they are copied once from lwIP's buffers into
/// a `ByteBuffer` and fired as `channelRead`, at most `maxMessagesPerRead` buffers per cycle;
/// what is not read stays in lwIP and closes the TCP window (backpressure to the peer). Writes:
/// `flush` hands flushed buffers (and file regions, through `pread`) to lwIP's send buffer as far
/// as it has room, completes each write's promise once lwIP has taken all of it, and continues
/// on NetStack's writable event; `isWritable` follows the write-buffer watermarks over the bytes
/// not yet taken, with `channelWritabilityChanged` on each change. `close(mode: .output)` sends
/// FIN (half-close), `close(mode: .input)` discards what arrives; a reset arrives as
/// `IOError(ECONNRESET)` through `errorCaught` and closes the channel.
public final class DataplaneChannel: DataplaneLoopChannel, @unchecked Sendable {
    public let loop: DataplaneEventLoop
    public var eventLoop: EventLoop { loop }
    public let allocator = ByteBufferAllocator()
    public let parent: Channel?
    public let localAddress: SocketAddress?
    public let remoteAddress: SocketAddress?
    let conn: TCPConnection
    private var _pipeline: ChannelPipeline!
    public var pipeline: ChannelPipeline { _pipeline }
    let closePromise: EventLoopPromise<Void>
    public var closeFuture: EventLoopFuture<Void> { closePromise.futureResult }
    public var _channelCore: ChannelCore { self }

    private let activeFlag = Atomic<Bool>(false)
    private let writableFlag = Atomic<Bool>(true)
    public var isActive: Bool { activeFlag.load(ordering: .acquiring) }
    public var isWritable: Bool { writableFlag.load(ordering: .acquiring) }

    // Options.
    var autoRead = true
    var allowRemoteHalfClosure = false
    var waterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 32 * 1024, high: 64 * 1024)
    var maxMessagesPerRead: UInt = 4
    /// Largest buffer one read cycle allocates.
    var readChunk = 64 * 1024

    // State (loop thread only).
    private(set) var registered = false
    private var closed = false
    private var inputClosed = false
    private var inputEOFSeen = false
    /// close(mode: .output) was asked for: no new writes; FIN once the flushed ones are out.
    private var outputClosed = false
    private var outputShut = false
    private var outputClosePromise: EventLoopPromise<Void>?
    /// Closed for NIO while lwIP still takes the flushed writes (a kernel socket keeps sending
    /// its buffer after close(); the writes waiting here are that buffer). FIN when they are out.
    private var lingering = false
    private var readPending = false
    private var readScheduled = false

    private struct PendingWrite {
        var data: IOData
        let promise: EventLoopPromise<Void>?
    }
    private var pending = CircularBuffer<PendingWrite>(initialCapacity: 16)
    /// How many writes at the front of `pending` were flushed.
    private var flushedCount = 0
    /// Bytes written and not yet taken by lwIP (what the watermarks compare against).
    public private(set) var pendingBytes = 0

    /// Counters of this channel.
    public private(set) var bytesRead: UInt64 = 0
    public private(set) var bytesWritten: UInt64 = 0

    init(connection: TCPConnection, parent: DataplaneServerChannel) {
        conn = connection
        loop = parent.loop
        self.parent = parent
        localAddress = try? SocketAddress(ipAddress: parent.stack.config.interface.address.description, port: Int(connection.localPort))
        remoteAddress = try? SocketAddress(ipAddress: connection.remoteAddress.description, port: Int(connection.remotePort))
        closePromise = parent.loop.makePromise()
        _pipeline = ChannelPipeline(channel: self)
        conn.onEvent = { [unowned self] _, events in self.handle(events) }
    }

    // MARK: NetStack events

    func handle(_ events: TCPEvents) {
        if lingering {
            if events.contains(.failed) || conn.isFailed || conn.isClosed {
                failAllWrites(IOError(errnoCode: ECONNRESET, reason: "the connection failed while its last writes were sent"))
                endLinger()
            } else {
                _ = discardInput()
                writeFlushed()
            }
            return
        }
        guard !closed else { return }
        if events.contains(.failed) || conn.isFailed {
            let code = conn.errorCode
            if code == -15 {   // ERR_CLSD: both sides closed in order
                close0(error: ChannelError.eof, mode: .all, promise: nil)
                return
            }
            // What arrived before the reset is delivered first (when a read is pending), so the
            // pipeline knows what the peer had sent when it went.
            if registered, readPending, !inputClosed, conn.readableBytes > 0 {
                readIfPossible()
                if closed { return }
            }
            let err = IOError(errnoCode: code == -14 ? ECONNRESET : ECONNABORTED,
                              reason: "TCP connection to \(conn.remoteAddress):\(conn.remotePort): \(conn.failure ?? lwipErrorName(code))")
            pipeline.fireErrorCaught(err)
            close0(error: err, mode: .all, promise: nil)
            return
        }
        if events.contains(.writable), flushedCount > 0 { writeFlushed() }
        if registered { readIfPossible() }
    }

    /// Called by the server once the child initializer finished: registered, active, first read.
    func activate() {
        guard !closed else { return }
        loop.channels[ObjectIdentifier(self)] = self
        registered = true
        pipeline.fireChannelRegistered()
        activeFlag.store(true, ordering: .releasing)
        pipeline.fireChannelActive()
        if autoRead { pipeline.read() }
        readIfPossible()
    }

    private func readIfPossible() {
        guard !closed else { return }
        if inputClosed {
            // close(mode: .input): what still arrives is read and dropped.
            _ = discardInput()
            return
        }
        if readPending, conn.readableBytes > 0 {
            readPending = false
            var messages: UInt = 0
            while messages < maxMessagesPerRead, !closed, !inputClosed {
                let available = conn.readableBytes
                if available == 0 { break }
                let n = min(available, readChunk)
                var buffer = allocator.buffer(capacity: n)
                let got = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { conn.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
                if got == 0 { break }
                bytesRead &+= UInt64(got)
                messages += 1
                pipeline.fireChannelRead(buffer)
            }
            if messages > 0, !closed { pipeline.fireChannelReadComplete() }
            if !closed, autoRead { pipeline.read() }
            // More buffered than one cycle takes: the next cycle runs next turn (the port is
            // polled in between).
            if !closed, readPending, conn.readableBytes > 0 { scheduleRead() }
        }
        if !closed, !inputEOFSeen, conn.readableBytes == 0, conn.isPeerClosed { peerClosed() }
    }

    private func discardInput() -> Int {
        var total = 0
        withUnsafeTemporaryAllocation(byteCount: 4096, alignment: 16) { scratch in
            while conn.readableBytes > 0 {
                let n = conn.read(into: scratch)
                if n == 0 { break }
                total += n
            }
        }
        return total
    }

    private func scheduleRead() {
        guard !readScheduled else { return }
        readScheduled = true
        loop.execute { [self] in
            readScheduled = false
            readIfPossible()
        }
    }

    /// The peer's FIN, after every byte before it was read.
    private func peerClosed() {
        inputEOFSeen = true
        if allowRemoteHalfClosure {
            inputClosed = true
            pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            if outputShut, !closed { close0(error: ChannelError.eof, mode: .all, promise: nil) }
        } else {
            close0(error: ChannelError.eof, mode: .all, promise: nil)
        }
    }

    // MARK: writes

    private func writeFlushed() {
        var wrote = false
        while flushedCount > 0, !conn.isClosed, !outputShut {
            let room = conn.writableBytes
            if room == 0 { break }   // NetStack's writable event continues
            var item = pending.first!
            let n: Int
            let done: Bool
            switch item.data {
            case .byteBuffer(var b):
                n = b.withUnsafeReadableBytes { conn.write(UnsafeRawBufferPointer(rebasing: $0.prefix(room))) }
                if n > 0 { b.moveReaderIndex(forwardBy: n) }
                done = b.readableBytes == 0
                item.data = .byteBuffer(b)
            case .fileRegion(var r):
                let want = min(r.readableBytes, room, loop.fileScratch.count)
                var got = 0
                if want > 0 {
                    got = (try? r.fileHandle.withUnsafeFileDescriptor { fd in
                        pread(fd, loop.fileScratch.baseAddress, want, off_t(r.readerIndex))
                    }) ?? -1
                    if got <= 0 {
                        // The file shrank or failed: the promised length cannot be kept.
                        let e = IOError(errnoCode: got == 0 ? EIO : errno, reason: "pread of a FileRegion")
                        failAllWrites(e)
                        conn.abort()
                        close0(error: e, mode: .all, promise: nil)
                        return
                    }
                }
                n = got > 0 ? conn.write(UnsafeRawBufferPointer(rebasing: loop.fileScratch[0..<got])) : 0
                if n > 0 { r.moveReaderIndex(forwardBy: n) }
                done = r.readableBytes == 0
                item.data = .fileRegion(r)
            }
            if n < 0 {
                let e = IOError(errnoCode: EPIPE, reason: "write to a TCP connection that is gone")
                failAllWrites(e)
                close0(error: e, mode: .all, promise: nil)
                return
            }
            pendingBytes -= n
            bytesWritten &+= UInt64(n)
            if n > 0 { wrote = true }
            if done {
                _ = pending.removeFirst()
                flushedCount -= 1
                item.promise?.succeed(())   // may write or close re-entrantly: the loop re-checks
                continue
            }
            pending[pending.startIndex] = item
            if n == 0 { break }
        }
        if wrote, !conn.isClosed { conn.flush() }
        if pending.isEmpty {
            if outputClosed, !outputShut { shutOutput() }
            if lingering { endLinger(); return }
        }
        if !closed { updateWritability() }
    }

    /// Our FIN, after the last flushed write (close(mode: .output)).
    private func shutOutput() {
        outputShut = true
        let promise = outputClosePromise
        outputClosePromise = nil
        if let e = conn.shutdownOutput() {
            promise?.fail(IOError(errnoCode: ENOTCONN, reason: "shutdown of the TCP connection: \(e)"))
        } else {
            promise?.succeed(())
        }
        guard !closed else { return }
        pipeline.fireUserInboundEventTriggered(ChannelEvent.outputClosed)
        if inputClosed, !closed { close0(error: ChannelError.eof, mode: .all, promise: nil) }
    }

    private func endLinger() {
        lingering = false
        conn.close()
        loop.lingering.removeValue(forKey: ObjectIdentifier(self))
    }

    private func finishFront(_ item: PendingWrite, written: Int) {
        _ = pending.removeFirst()
        flushedCount -= 1
        pendingBytes -= written
        bytesWritten &+= UInt64(written)
        item.promise?.succeed(())
    }

    private func updateWritability() {
        let writable = isWritable
        if writable, pendingBytes > waterMark.high {
            writableFlag.store(false, ordering: .releasing)
            pipeline.fireChannelWritabilityChanged()
        } else if !writable, pendingBytes < waterMark.low {
            writableFlag.store(true, ordering: .releasing)
            pipeline.fireChannelWritabilityChanged()
        }
    }

    private func failAllWrites(_ error: Error) {
        let writes = pending
        pending.removeAll()
        flushedCount = 0
        pendingBytes = 0
        for w in writes { w.promise?.fail(error) }
    }

    // MARK: ChannelCore

    public func localAddress0() throws -> SocketAddress {
        guard let a = localAddress else { throw ChannelError.operationUnsupported }
        return a
    }

    public func remoteAddress0() throws -> SocketAddress {
        guard let a = remoteAddress else { throw ChannelError.operationUnsupported }
        return a
    }

    public func register0(promise: EventLoopPromise<Void>?) { promise?.succeed(()) }
    public func registerAlreadyConfigured0(promise: EventLoopPromise<Void>?) { promise?.succeed(()) }
    public func bind0(to: SocketAddress, promise: EventLoopPromise<Void>?) { promise?.fail(ChannelError.operationUnsupported) }
    public func connect0(to: SocketAddress, promise: EventLoopPromise<Void>?) { promise?.fail(ChannelError.operationUnsupported) }

    public func write0(_ data: NIOAny, promise: EventLoopPromise<Void>?) {
        if closed { promise?.fail(ChannelError.ioOnClosedChannel); return }
        if outputClosed { promise?.fail(ChannelError.outputClosed); return }
        let io = unwrapData(data, as: IOData.self)
        let size = io.readableBytes
        pending.append(PendingWrite(data: io, promise: promise))
        pendingBytes += size
        updateWritability()
    }

    public func flush0() {
        guard !closed else { return }
        flushedCount = pending.count
        writeFlushed()
        // Empty writes (0 bytes) complete at once.
        while flushedCount > 0, let f = pending.first, f.data.readableBytes == 0 { finishFront(f, written: 0) }
    }

    public func read0() {
        guard !closed else { return }
        readPending = true
        if registered, conn.readableBytes > 0 || conn.isPeerClosed { scheduleRead() }
    }

    public func close0(error: Error, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if closed { promise?.fail(ChannelError.alreadyClosed); return }
        switch mode {
        case .output:
            if outputClosed { promise?.fail(ChannelError.outputClosed); return }
            // As NIOPosix: the writes already made go out first (flushed now), then FIN.
            outputClosed = true
            outputClosePromise = promise
            flushedCount = pending.count
            writeFlushed()
        case .input:
            if inputClosed { promise?.fail(ChannelError.inputClosed); return }
            inputClosed = true
            _ = discardInput()
            promise?.succeed(())
            pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            if outputShut, !closed { close0(error: ChannelError.eof, mode: .all, promise: nil) }
        case .all:
            closed = true
            let wasActive = isActive
            activeFlag.store(false, ordering: .releasing)
            // Writes never flushed fail; flushed ones still go out (as from a kernel socket's
            // buffer) unless the connection failed, then FIN.
            while pending.count > flushedCount {
                let w = pending.removeLast()
                pendingBytes -= w.data.readableBytes
                w.promise?.fail(ChannelError.ioOnClosedChannel)
            }
            if outputShut || conn.isClosed || conn.isFailed || error is IOError { failAllWrites(error is IOError ? error : ChannelError.ioOnClosedChannel) }
            outputClosePromise?.fail(ChannelError.ioOnClosedChannel)
            outputClosePromise = nil
            if pending.isEmpty {
                conn.close()   // FIN after what lwIP holds; a connection already gone is only released
            } else {
                lingering = true
                loop.lingering[ObjectIdentifier(self)] = { [self] in
                    failAllWrites(ChannelError.ioOnClosedChannel)
                    endLinger()
                }
            }
            finishClose(wasActive: wasActive, promise: promise)
        }
    }

    public func triggerUserOutboundEvent0(_ event: Any, promise: EventLoopPromise<Void>?) {
        guard case .reset? = event as? DataplaneChannelEvent else {
            promise?.fail(ChannelError.operationUnsupported)
            return
        }
        // RST: what is queued is dropped, and the channel closes.
        failAllWrites(ChannelError.ioOnClosedChannel)
        conn.abort()
        if lingering { endLinger() }
        promise?.succeed(())
        if !closed { close0(error: ChannelError.ioOnClosedChannel, mode: .all, promise: nil) }
    }

    public func channelRead0(_ data: NIOAny) {}   // reached the tail unhandled: dropped
    public func errorCaught0(error: Error) {}

    // MARK: options

    public func setOption<Option: ChannelOption>(_ option: Option, value: Option.Value) -> EventLoopFuture<Void> {
        if loop.inEventLoop { return loop.makeCompletedFuture { try setOption0(option, value: value) } }
        return loop.submit { try self.setOption0(option, value: value) }
    }

    public func getOption<Option: ChannelOption>(_ option: Option) -> EventLoopFuture<Option.Value> {
        if loop.inEventLoop { return loop.makeCompletedFuture { try getOption0(option) } }
        return loop.submit { try self.getOption0(option) }
    }

    func setOption0<Option: ChannelOption>(_ option: Option, value: Option.Value) throws {
        loop.preconditionInEventLoop()
        switch option {
        case is ChannelOptions.Types.AutoReadOption:
            let on = value as! Bool
            let was = autoRead
            autoRead = on
            if on, !was, registered { read0() }
        case is ChannelOptions.Types.AllowRemoteHalfClosureOption:
            allowRemoteHalfClosure = value as! Bool
        case is ChannelOptions.Types.WriteBufferWaterMarkOption:
            waterMark = value as! ChannelOptions.Types.WriteBufferWaterMark
            if registered { updateWritability() }
        case is ChannelOptions.Types.MaxMessagesPerReadOption:
            maxMessagesPerRead = max(1, value as! UInt)
        case is ChannelOptions.Types.SocketOption:
            // TCP_NODELAY is how the stack runs already; SO_REUSEADDR means nothing to lwIP here.
            let opt = option as! ChannelOptions.Types.SocketOption
            guard DataplaneChannel.acceptedSocketOptions.contains(where: { $0 == opt }) else { throw ChannelError.operationUnsupported }
        case is ChannelOptions.Types.RecvAllocatorOption:
            break   // reads are sized by what lwIP holds (up to `readChunk`)
        default:
            throw ChannelError.operationUnsupported
        }
    }

    func getOption0<Option: ChannelOption>(_ option: Option) throws -> Option.Value {
        loop.preconditionInEventLoop()
        switch option {
        case is ChannelOptions.Types.AutoReadOption: return autoRead as! Option.Value
        case is ChannelOptions.Types.AllowRemoteHalfClosureOption: return allowRemoteHalfClosure as! Option.Value
        case is ChannelOptions.Types.WriteBufferWaterMarkOption: return waterMark as! Option.Value
        case is ChannelOptions.Types.MaxMessagesPerReadOption: return maxMessagesPerRead as! Option.Value
        case is ChannelOptions.Types.SocketOption:
            let opt = option as! ChannelOptions.Types.SocketOption
            guard DataplaneChannel.acceptedSocketOptions.contains(where: { $0 == opt }) else { throw ChannelError.operationUnsupported }
            return SocketOptionValue(1) as! Option.Value
        default: throw ChannelError.operationUnsupported
        }
    }

    static let acceptedSocketOptions: [ChannelOptions.Types.SocketOption] = [
        ChannelOptions.Types.SocketOption(level: .tcp, name: .tcp_nodelay),
        ChannelOptions.Types.SocketOption(level: .socket, name: .so_reuseaddr),
    ]

    public var syncOptions: NIOSynchronousChannelOptions? { SyncOptions(channel: self) }

    struct SyncOptions: NIOSynchronousChannelOptions {
        let channel: DataplaneChannel
        func setOption<Option: ChannelOption>(_ option: Option, value: Option.Value) throws { try channel.setOption0(option, value: value) }
        func getOption<Option: ChannelOption>(_ option: Option) throws -> Option.Value { try channel.getOption0(option) }
    }
}
