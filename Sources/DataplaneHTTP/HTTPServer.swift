#if canImport(Glibc)
import Glibc
#endif
import DPDK
import NetStack
import NIOCore
import NIODataplane
import NIOHTTP1

/// Limits and timeouts of the HTTP layer.
public struct HTTPServerOptions: Sendable {
    /// Largest request body (Content-Length or the sum of chunks); more gets 413.
    public var maxBodyBytes = 1 << 20
    /// Largest request line plus headers; more gets 431.
    public var maxHeaderBytes = 16 * 1024
    /// A request started but not finished within this many milliseconds gets 408 and a close.
    public var requestTimeoutMilliseconds = 10_000
    /// A keep-alive connection with nothing to do for this long is closed; so is one whose peer
    /// does not read its response for this long.
    public var idleTimeoutMilliseconds = 60_000
    /// Stop reading a connection while this many response bytes wait (pipelining backpressure).
    public var maxPendingOutputBytes = 256 * 1024
    /// `Server` header value (nil: none).
    public var serverName: String? = "swift-virtio"
    public init() {}
}

/// Access counters of an `HTTPServer`.
public struct HTTPCounters: Codable, Sendable, Equatable {
    public var connectionsAccepted: UInt64 = 0
    public var connectionsOpen: UInt64 = 0
    public var requests: UInt64 = 0
    /// Requests after the first on one connection (keep-alive reuse).
    public var keepAliveRequests: UInt64 = 0
    public var status2xx: UInt64 = 0, status3xx: UInt64 = 0, status4xx: UInt64 = 0, status5xx: UInt64 = 0
    public var badRequests: UInt64 = 0          // 400 from the decoder
    public var headersTooLarge: UInt64 = 0      // 431
    public var bodiesTooLarge: UInt64 = 0       // 413
    public var requestTimeouts: UInt64 = 0      // 408
    public var idleClosed: UInt64 = 0
    public var peerResets: UInt64 = 0
    public var closedMidRequest: UInt64 = 0
    public var requestBodyBytes: UInt64 = 0
    public var responseBytes: UInt64 = 0
    public init() {}
}

/// HTTP/1.1 on dataplane channels (`NIODataplane`): each accepted connection's pipeline is
/// NIOHTTP1's `HTTPRequestDecoder` and `HTTPResponseEncoder` and an `HTTPConnectionHandler` with
/// keep-alive, pipelining (responses in request order; reading pauses while the channel is not
/// writable, i.e. over `maxPendingOutputBytes` of unsent response), chunked request bodies,
/// 400/413/431/408, file bodies as `FileRegion`s, a router, and counters. Runs on the loop.
public final class HTTPServer {
    public let router: HTTPRouter
    public let options: HTTPServerOptions
    public let loop: DataplaneEventLoop
    public internal(set) var counters = HTTPCounters()
    var connections: [ObjectIdentifier: HTTPConnectionHandler] = [:]
    var nowMs: UInt64 = 0
    let msPerCycle: Double
    var ticker: RepeatedTask?

    public init(loop: DataplaneEventLoop, router: HTTPRouter, options: HTTPServerOptions = HTTPServerOptions()) {
        self.loop = loop
        self.router = router
        self.options = options
        msPerCycle = 1000.0 / Double(TSC.hz)
        updateClock()
    }

    /// Listens on `port` with `bootstrap`; the future gives the server channel.
    public func bind(_ bootstrap: DataplaneServerBootstrap, port: Int) -> EventLoopFuture<Channel> {
        let high = max(4096, options.maxPendingOutputBytes)
        return bootstrap
            .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .childChannelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: high / 2, high: high))
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture { try setUp(channel) }
            }
            .bind(port: port)
            .map { [self] channel in
                // Timeouts: one check every 100 ms for all connections, not a timer per request.
                ticker = loop.scheduleRepeatedTask(initialDelay: .milliseconds(100), delay: .milliseconds(100)) { [weak self] _ in
                    self?.tick()
                }
                channel.closeFuture.whenComplete { [weak self] _ in self?.ticker?.cancel() }
                return channel
            }
    }

    func setUp(_ channel: Channel) throws {
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderListSize = options.maxHeaderBytes
        limits.maxHeaderFieldSize = options.maxHeaderBytes
        let h = HTTPConnectionHandler(server: self, channel: channel)
        let ops = channel.pipeline.syncOperations
        try ops.addHandler(RequestBytesObserver(connection: h))
        try ops.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, informationalResponseStrategy: .drop,
                                                                   limitConfiguration: limits)))
        try ops.addHandler(HTTPResponseEncoder())
        try ops.addHandler(h)
        connections[ObjectIdentifier(h)] = h
        counters.connectionsAccepted += 1
        counters.connectionsOpen += 1
    }

    func updateClock() { nowMs = UInt64(Double(TSC.now()) * msPerCycle) }

    func closed(_ h: HTTPConnectionHandler) {
        if connections.removeValue(forKey: ObjectIdentifier(h)) != nil { counters.connectionsOpen -= 1 }
    }

    /// Timeouts: requests that stall, idle keep-alive connections, peers that stop reading.
    func tick() {
        updateClock()
        var expired: [HTTPConnectionHandler] = []
        for h in connections.values {
            h.noteProgress()
            if h.isExpired(now: nowMs) { expired.append(h) }
        }
        for h in expired { h.timeout() }
    }

    func count(status: HTTPResponseStatus) {
        switch status.code {
        case 200..<300: counters.status2xx += 1
        case 300..<400: counters.status3xx += 1
        case 400..<500: counters.status4xx += 1
        default: counters.status5xx += 1
        }
    }
}

/// Sees the raw bytes before the decoder, so a request that has started but produced no part
/// yet (a stalled request line) counts as in progress.
final class RequestBytesObserver: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    unowned let connection: HTTPConnectionHandler
    init(connection: HTTPConnectionHandler) { self.connection = connection }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        connection.sawBytes(unwrapInboundIn(data).readableBytes)
        context.fireChannelRead(data)
    }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // Before the decoder, which reports a request cut short by the FIN as a parse error.
        if case ChannelEvent.inputClosed = event { connection.inputEnded = true }
        context.fireUserInboundEventTriggered(event)
    }
}

/// One connection's HTTP state (the last handler of its pipeline).
final class HTTPConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    unowned let server: HTTPServer
    let channel: Channel
    var context: ChannelHandlerContext?
    var head: HTTPRequestHead?
    var body = ByteBuffer()
    /// Bytes seen since the last complete request (a request in progress).
    var partial = 0
    var requestsServed = 0
    /// No more requests are read (an error response is on its way, or the peer is gone).
    var stopReading = false
    /// A read the pipeline asked for while the output was over its limit.
    var heldRead = false
    /// The peer's FIN arrived (seen before the decoder).
    var inputEnded = false
    var lastActivity: UInt64
    var lastProgress: UInt64
    var lastWritten: UInt64 = 0
    var counted: UInt64 = 0
    var finished = false

    init(server: HTTPServer, channel: Channel) {
        self.server = server
        self.channel = channel
        lastActivity = server.nowMs
        lastProgress = server.nowMs
    }

    var dataplane: DataplaneChannel? { channel as? DataplaneChannel }
    /// Response bytes not yet taken by the stack.
    var pendingBytes: Int { dataplane?.pendingBytes ?? 0 }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    /// The context holds this handler: let go of it when the pipeline does, or every connection
    /// would stay in memory (handler ↔ context ↔ pipeline ↔ channel).
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func sawBytes(_ n: Int) {
        partial += n
        lastActivity = server.nowMs
    }

    /// Counts response bytes the stack took and notes progress (a response that moves is not idle).
    func noteProgress() {
        guard let d = dataplane else { return }
        let w = d.bytesWritten
        if w != lastWritten {
            lastWritten = w
            lastProgress = server.nowMs
            lastActivity = server.nowMs
        }
        server.counters.responseBytes += w - counted
        counted = w
    }

    // MARK: inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !stopReading, !finished else { return }
        switch unwrapInboundIn(data) {
        case .head(let h):
            if let len = h.headers.first(name: "content-length").flatMap(Int.init), len > server.options.maxBodyBytes {
                server.counters.bodiesTooLarge += 1
                respondError(.payloadTooLarge, context: context)
                return
            }
            head = h
            body.clear()
            if h.headers.first(name: "expect")?.lowercased() == "100-continue" {
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: .continue))), promise: nil)
            }
        case .body(var b):
            guard head != nil else { return }
            if body.readableBytes + b.readableBytes > server.options.maxBodyBytes {
                server.counters.bodiesTooLarge += 1
                respondError(.payloadTooLarge, context: context)
                return
            }
            server.counters.requestBodyBytes += UInt64(b.readableBytes)
            body.writeBuffer(&b)
        case .end:
            guard let h = head else { return }
            head = nil
            partial = 0
            let req = HTTPRequest(head: h, body: body)
            body = context.channel.allocator.buffer(capacity: 0)
            server.counters.requests += 1
            if requestsServed > 0 { server.counters.keepAliveRequests += 1 }
            requestsServed += 1
            respond(server.router.handle(req), to: h, keepAlive: h.isKeepAlive, context: context)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
        context.fireChannelReadComplete()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let e = error as? HTTPParserError {
            guard !stopReading, !finished else { return }
            if inputEnded {
                // A request cut short by the client's FIN is dropped, not answered.
                if partial > 0 || head != nil { server.counters.closedMidRequest += 1 }
                partial = 0
                head = nil
                stopReading = true
                finish(context: context)
                return
            }
            if case .headerOverflow = e {
                server.counters.headersTooLarge += 1
                respondError(.requestHeaderFieldsTooLarge, context: context)
            } else {
                server.counters.badRequests += 1
                respondError(.badRequest, context: context)
            }
            context.flush()
            return
        }
        // The connection failed (reset): drop it; a request cut short counts.
        if let io = error as? IOError, io.errnoCode == ECONNRESET { server.counters.peerResets += 1 }
        if partial > 0 || head != nil { server.counters.closedMidRequest += 1 }
        partial = 0
        head = nil
        finish(context: context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event, !finished {
            // The client half-closed: answer what it asked for, then close (the channel sends the
            // queued responses before its FIN). A request cut short is dropped.
            if partial > 0 || head != nil { server.counters.closedMidRequest += 1 }
            stopReading = true
            context.flush()
            finish(context: context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        finishState()
        context.fireChannelInactive()
    }

    // MARK: outbound

    /// Pipelining backpressure: no new reads while the responses already made are over the limit.
    func read(context: ChannelHandlerContext) {
        if stopReading || finished { return }
        if !context.channel.isWritable { heldRead = true; return }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, heldRead {
            heldRead = false
            if !stopReading { context.read() }
        }
        context.fireChannelWritabilityChanged()
    }

    func respondError(_ status: HTTPResponseStatus, context: ChannelHandlerContext) {
        stopReading = true
        head = nil
        var r = HTTPResponse.text("\(status.code) \(status.reasonPhrase)\n", status: status)
        r.headers.replaceOrAdd(name: "Connection", value: "close")
        respond(r, to: nil, keepAlive: false, context: context)
    }

    func respond(_ response: HTTPResponse, to request: HTTPRequestHead?, keepAlive: Bool, context: ChannelHandlerContext) {
        var headers = response.headers
        let isHead = request?.method == .HEAD
        if response.status.mayHaveResponseBody, !headers.contains(name: "content-length") {
            headers.replaceOrAdd(name: "Content-Length", value: String(response.bodyLength))
        }
        if let s = server.options.serverName { headers.replaceOrAdd(name: "Server", value: s) }
        if !keepAlive {
            headers.replaceOrAdd(name: "Connection", value: "close")
            stopReading = true
        } else if request?.version == .http1_0 {
            headers.replaceOrAdd(name: "Connection", value: "keep-alive")
        }
        let version = request?.version ?? .http1_1
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: response.status, headers: headers))), promise: nil)
        server.count(status: response.status)
        if !isHead && response.status.mayHaveResponseBody {
            switch response.body {
            case .bytes(let b):
                if b.readableBytes > 0 { context.write(wrapOutboundOut(.body(.byteBuffer(b))), promise: nil) }
            case .file(let f):
                if f.size > 0 {
                    // The FileBody owns the descriptor; the handle borrows it until the write ends.
                    let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: f.fd)
                    let region = FileRegion(fileHandle: handle, readerIndex: 0, endIndex: f.size)
                    let p = context.eventLoop.makePromise(of: Void.self)
                    p.futureResult.whenComplete { _ in _ = try? handle.takeDescriptorOwnership(); withExtendedLifetime(f) {} }
                    context.write(wrapOutboundOut(.body(.fileRegion(region))), promise: p)
                }
            case .empty: break
            }
        }
        if keepAlive {
            context.write(wrapOutboundOut(.end(nil)), promise: nil)
        } else {
            // Close once it is written (the channel sends it all before its FIN).
            context.write(wrapOutboundOut(.end(nil))).whenComplete { [weak self] _ in
                guard let self, let ctx = self.context else { return }
                self.finish(context: ctx)
            }
        }
    }

    // MARK: timeouts and the end

    func isExpired(now: UInt64) -> Bool {
        guard !finished else { return false }
        let o = server.options
        if pendingBytes > 0 { return now &- lastProgress > UInt64(o.idleTimeoutMilliseconds) }
        if partial > 0 || head != nil { return now &- lastActivity > UInt64(o.requestTimeoutMilliseconds) }
        return now &- lastActivity > UInt64(o.idleTimeoutMilliseconds)
    }

    func timeout() {
        guard let context, !finished else { return }
        if pendingBytes == 0 && (partial > 0 || head != nil) && !stopReading {
            // A request that stalled: 408, then close once it is out.
            server.counters.requestTimeouts += 1
            partial = 0
            respondError(.requestTimeout, context: context)
            context.flush()
            return
        }
        server.counters.idleClosed += 1
        if pendingBytes > 0 {
            // The peer stopped reading its response: reset rather than linger.
            context.triggerUserOutboundEvent(DataplaneChannelEvent.reset, promise: nil)
        }
        finish(context: context)
    }

    func finish(context: ChannelHandlerContext) {
        guard !finished else { return }
        noteProgress()
        finishState()
        context.close(promise: nil)
    }

    func finishState() {
        guard !finished else { return }
        finished = true
        noteProgress()
        server.closed(self)
    }
}
