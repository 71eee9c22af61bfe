import NetStack
import NIOCore
import Synchronization

/// A SwiftNIO server `Channel` listening on a NetStack TCP port. Each accepted connection becomes
/// a `DataplaneChannel`, set up by the bootstrap's child initializer and then activated.
public final class DataplaneServerChannel: DataplaneLoopChannel, @unchecked Sendable {
    public let loop: DataplaneEventLoop
    public var eventLoop: EventLoop { loop }
    public let stack: NetStack
    public let allocator = ByteBufferAllocator()
    public var parent: Channel? { nil }
    public private(set) var localAddress: SocketAddress?
    public var remoteAddress: SocketAddress? { nil }
    private var _pipeline: ChannelPipeline!
    public var pipeline: ChannelPipeline { _pipeline }
    let closePromise: EventLoopPromise<Void>
    public var closeFuture: EventLoopFuture<Void> { closePromise.futureResult }
    public var _channelCore: ChannelCore { self }
    private let activeFlag = Atomic<Bool>(false)
    public var isActive: Bool { activeFlag.load(ordering: .acquiring) }
    public var isWritable: Bool { false }

    var backlog = 128
    var listener: TCPListener?
    private var closed = false
    private(set) var registered = false
    /// The bootstrap's per-connection setup.
    var acceptChild: ((DataplaneChannel) -> Void)?
    /// Connections accepted.
    public private(set) var accepted: UInt64 = 0

    init(loop: DataplaneEventLoop, stack: NetStack) {
        self.loop = loop
        self.stack = stack
        closePromise = loop.makePromise()
        _pipeline = ChannelPipeline(channel: self)
    }

    func register() {
        registered = true
        loop.channels[ObjectIdentifier(self)] = self
        pipeline.fireChannelRegistered()
    }

    private func accept(_ conn: TCPConnection) {
        let child = DataplaneChannel(connection: conn, parent: self)
        accepted &+= 1
        if let acceptChild, !closed { acceptChild(child) } else { child.close(promise: nil) }
    }

    public func localAddress0() throws -> SocketAddress {
        guard let a = localAddress else { throw ChannelError.inappropriateOperationForState }
        return a
    }
    public func remoteAddress0() throws -> SocketAddress { throw ChannelError.operationUnsupported }
    public func register0(promise: EventLoopPromise<Void>?) { promise?.succeed(()) }
    public func registerAlreadyConfigured0(promise: EventLoopPromise<Void>?) { promise?.succeed(()) }

    public func bind0(to address: SocketAddress, promise: EventLoopPromise<Void>?) {
        guard !closed else { promise?.fail(ChannelError.ioOnClosedChannel); return }
        guard listener == nil else { promise?.fail(ChannelError.inappropriateOperationForState); return }
        guard let port = address.port, (1...65535).contains(port) else {
            promise?.fail(ChannelError.operationUnsupported)
            return
        }
        do {
            listener = try stack.listen(port: UInt16(port), backlog: backlog) { [unowned self] conn in self.accept(conn) }
            localAddress = try? SocketAddress(ipAddress: stack.config.interface.address.description, port: port)
            activeFlag.store(true, ordering: .releasing)
            promise?.succeed(())
            pipeline.fireChannelActive()
        } catch {
            promise?.fail(error)
        }
    }

    public func connect0(to: SocketAddress, promise: EventLoopPromise<Void>?) { promise?.fail(ChannelError.operationUnsupported) }
    public func write0(_ data: NIOAny, promise: EventLoopPromise<Void>?) { promise?.fail(ChannelError.operationUnsupported) }
    public func flush0() {}
    /// Accepting is not paced by reads: lwIP's backlog queues connections.
    public func read0() {}

    public func close0(error: Error, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard mode == .all else { promise?.fail(ChannelError.operationUnsupported); return }
        guard !closed else { promise?.fail(ChannelError.alreadyClosed); return }
        closed = true
        if let l = listener { stack.close(l) }
        listener = nil
        let wasActive = isActive
        activeFlag.store(false, ordering: .releasing)
        finishClose(wasActive: wasActive, promise: promise)
    }

    public func triggerUserOutboundEvent0(_ event: Any, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }
    public func channelRead0(_ data: NIOAny) {}
    public func errorCaught0(error: Error) {}

    public func setOption<Option: ChannelOption>(_ option: Option, value: Option.Value) -> EventLoopFuture<Void> {
        loop.submit { try self.setOption0(option, value: value) }
    }
    public func getOption<Option: ChannelOption>(_ option: Option) -> EventLoopFuture<Option.Value> {
        loop.submit { try self.getOption0(option) }
    }

    func setOption0<Option: ChannelOption>(_ option: Option, value: Option.Value) throws {
        switch option {
        case is ChannelOptions.Types.BacklogOption: backlog = Int(value as! Int32)
        case is ChannelOptions.Types.SocketOption:
            let opt = option as! ChannelOptions.Types.SocketOption
            guard DataplaneChannel.acceptedSocketOptions.contains(where: { $0 == opt }) else { throw ChannelError.operationUnsupported }
        case is ChannelOptions.Types.AutoReadOption, is ChannelOptions.Types.MaxMessagesPerReadOption:
            break   // accepting is not paced by reads
        default: throw ChannelError.operationUnsupported
        }
    }

    func getOption0<Option: ChannelOption>(_ option: Option) throws -> Option.Value {
        switch option {
        case is ChannelOptions.Types.BacklogOption: return Int32(backlog) as! Option.Value
        case is ChannelOptions.Types.AutoReadOption: return true as! Option.Value
        default: throw ChannelError.operationUnsupported
        }
    }

    public var syncOptions: NIOSynchronousChannelOptions? { SyncOptions(channel: self) }
    struct SyncOptions: NIOSynchronousChannelOptions {
        let channel: DataplaneServerChannel
        func setOption<Option: ChannelOption>(_ option: Option, value: Option.Value) throws { try channel.setOption0(option, value: value) }
        func getOption<Option: ChannelOption>(_ option: Option) throws -> Option.Value { try channel.getOption0(option) }
    }
}

/// Sets up TCP servers on the dataplane, as NIOPosix's `ServerBootstrap` does on the kernel:
///
/// ```swift
/// let server = try DataplaneServerBootstrap(loop: loop, stack: stack)
///     .childChannelInitializer { channel in
///         channel.eventLoop.makeCompletedFuture {
///             try channel.pipeline.syncOperations.configureHTTPServerPipeline()
///             try channel.pipeline.syncOperations.addHandler(MyHandler())
///         }
///     }
///     .bind(port: 8080).wait()
/// ```
public final class DataplaneServerBootstrap: @unchecked Sendable {
    let loop: DataplaneEventLoop
    let stack: NetStack
    private var serverInit: (@Sendable (Channel) -> EventLoopFuture<Void>)?
    private var childInit: (@Sendable (Channel) -> EventLoopFuture<Void>)?
    private var serverOptions: [(DataplaneServerChannel) throws -> Void] = []
    private var childOptions: [(DataplaneChannel) throws -> Void] = []

    public init(loop: DataplaneEventLoop, stack: NetStack) {
        self.loop = loop
        self.stack = stack
    }

    /// The group's loop for the stack (one loop per port).
    public convenience init(group: DataplaneEventLoopGroup, stack: NetStack) {
        self.init(loop: group.loops[0], stack: stack)
    }

    public func serverChannelInitializer(_ initializer: @escaping @Sendable (Channel) -> EventLoopFuture<Void>) -> Self {
        serverInit = initializer
        return self
    }

    public func childChannelInitializer(_ initializer: @escaping @Sendable (Channel) -> EventLoopFuture<Void>) -> Self {
        childInit = initializer
        return self
    }

    public func serverChannelOption<Option: ChannelOption>(_ option: Option, value: Option.Value) -> Self {
        serverOptions.append { try $0.setOption0(option, value: value) }
        return self
    }

    public func childChannelOption<Option: ChannelOption>(_ option: Option, value: Option.Value) -> Self {
        childOptions.append { try $0.setOption0(option, value: value) }
        return self
    }

    /// Listens on `port` of the stack's address; the future gives the server channel.
    public func bind(port: Int) -> EventLoopFuture<Channel> {
        let childInit = self.childInit
        return bind(port: port, serverInit: serverInit) { child in
            childInit?(child) ?? child.eventLoop.makeSucceededVoidFuture()
        } deliver: { _, _ in }
    }

    /// Listens on `port`; each connection is set up by `childChannelInitializer` (typically
    /// wrapping it in an `NIOAsyncChannel`) and its result is delivered through the returned
    /// server `NIOAsyncChannel`'s inbound stream, as with NIOPosix's async `bind`.
    public func bind<Output: Sendable>(
        port: Int,
        childChannelInitializer: @escaping @Sendable (Channel) -> EventLoopFuture<Output>
    ) async throws -> NIOAsyncChannel<Output, Never> {
        let userServerInit = self.serverInit
        // The server channel is wrapped before it listens, so no connection is delivered to nobody.
        let box = AsyncServerBox<Output>()
        _ = try await bind(port: port, serverInit: { channel in
            let ready = userServerInit?(channel) ?? channel.eventLoop.makeSucceededVoidFuture()
            return ready.flatMapThrowing {
                box.channel = try NIOAsyncChannel<Output, Never>(wrappingChannelSynchronously: channel)
            }
        }, childInit: childChannelInitializer) { server, output in
            // A read cycle per connection: NIOAsyncChannel hands reads on at readComplete.
            server.pipeline.syncOperations.fireChannelRead(NIOAny(output))
            server.pipeline.syncOperations.fireChannelReadComplete()
        }.get()
        return box.channel!
    }

    private func bind<Output>(
        port: Int,
        serverInit: (@Sendable (Channel) -> EventLoopFuture<Void>)?,
        childInit: @escaping @Sendable (Channel) -> EventLoopFuture<Output>,
        deliver: @escaping (DataplaneServerChannel, Output) -> Void
    ) -> EventLoopFuture<Channel> {
        let loop = self.loop, stack = self.stack
        let serverOptions = self.serverOptions, childOptions = self.childOptions
        let address: SocketAddress
        do { address = try SocketAddress(ipAddress: stack.config.interface.address.description, port: port) } catch {
            return loop.makeFailedFuture(error)
        }
        return loop.flatSubmit {
            let server = DataplaneServerChannel(loop: loop, stack: stack)
            do { for o in serverOptions { try o(server) } } catch { return loop.makeFailedFuture(error) }
            server.acceptChild = { [unowned server] child in
                do { for o in childOptions { try o(child) } } catch {
                    child.close(promise: nil)
                    return
                }
                childInit(child).whenComplete { result in
                    switch result {
                    case .success(let output):
                        child.activate()
                        if server.isActive { deliver(server, output) }
                    case .failure:
                        child.close(promise: nil)
                    }
                }
            }
            server.register()
            let ready = serverInit?(server) ?? loop.makeSucceededVoidFuture()
            return ready.flatMap {
                let p = loop.makePromise(of: Void.self)
                server.bind0(to: address, promise: p)
                return p.futureResult.map { server as Channel }
            }.flatMapErrorThrowing { error in
                server.close(promise: nil)
                throw error
            }
        }
    }
}

private final class AsyncServerBox<Output: Sendable>: @unchecked Sendable {
    var channel: NIOAsyncChannel<Output, Never>?
}

/// What the dataplane's channels (connections and listeners) share at the end of a close.
protocol DataplaneLoopChannel: Channel, ChannelCore {
    var loop: DataplaneEventLoop { get }
    var registered: Bool { get }
    var closePromise: EventLoopPromise<Void> { get }
}

extension DataplaneLoopChannel {
    /// The end of a full close, in NIOPosix's order: the channel leaves the loop's table, the
    /// close's promise succeeds, channelInactive fires (if it was active), and on a later turn of
    /// the loop channelUnregistered fires, the handlers go and `closeFuture` completes.
    func finishClose(wasActive: Bool, promise: EventLoopPromise<Void>?) {
        loop.channels.removeValue(forKey: ObjectIdentifier(self))
        promise?.succeed(())
        if wasActive { pipeline.fireChannelInactive() }
        loop.execute { [self] in
            if registered { pipeline.fireChannelUnregistered() }
            removeHandlers(pipeline: pipeline)
            closePromise.succeed(())
        }
    }
}
