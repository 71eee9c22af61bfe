#if canImport(Glibc)
import Glibc
#endif
import DPDK
import NetStack
import NIOCore
import NIOEmbedded
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

/// HTTP/1.1 on `NetStack` connections: NIOHTTP1's `HTTPRequestDecoder` and `HTTPResponseEncoder`
/// in an `EmbeddedChannel` per connection (the dataplane drives it: bytes in, parts out),
/// keep-alive, pipelining (responses in request order; reading pauses while responses wait),
/// chunked request bodies, 400/413/431/408, a router, and counters. Runs inside `NetStack.poll`.
public final class HTTPServer {
    public let router: HTTPRouter
    public let options: HTTPServerOptions
    public let stack: NetStack
    public internal(set) var counters = HTTPCounters()
    var connections: [ObjectIdentifier: HTTPConnection] = [:]
    var listener: TCPListener?
    /// Read scratch and file-read scratch, one per server (the dataplane is one thread).
    let scratch: UnsafeMutableRawBufferPointer
    let allocator = ByteBufferAllocator()
    var nowMs: UInt64 = 0
    let msPerCycle: Double

    public init(stack: NetStack, router: HTTPRouter, options: HTTPServerOptions = HTTPServerOptions()) {
        self.stack = stack
        self.router = router
        self.options = options
        scratch = .allocate(byteCount: 64 * 1024, alignment: 64)
        msPerCycle = 1000.0 / Double(TSC.hz)
        updateClock()
        let previous = stack.onTick
        stack.onTick = { [unowned self] in
            previous?()
            self.tick()
        }
    }

    deinit { scratch.deallocate() }

    /// Starts accepting on `port`.
    public func listen(port: UInt16, backlog: Int = 128) throws {
        listener = try stack.listen(port: port, backlog: backlog) { [unowned self] conn in self.accept(conn) }
    }

    func updateClock() { nowMs = UInt64(Double(TSC.now()) * msPerCycle) }

    func accept(_ conn: TCPConnection) {
        let h = HTTPConnection(conn, server: self)
        connections[ObjectIdentifier(h)] = h
        counters.connectionsAccepted += 1
        counters.connectionsOpen += 1
        conn.onEvent = { [unowned h] _, events in h.handle(events) }
    }

    func closed(_ h: HTTPConnection) {
        if connections.removeValue(forKey: ObjectIdentifier(h)) != nil { counters.connectionsOpen -= 1 }
    }

    /// Timeouts: requests that stall, idle keep-alive connections, peers that stop reading.
    func tick() {
        updateClock()
        var expired: [HTTPConnection] = []
        for h in connections.values where h.isExpired(now: nowMs) { expired.append(h) }
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

/// One connection's HTTP state.
final class HTTPConnection {
    let conn: TCPConnection
    unowned let server: HTTPServer
    let channel: EmbeddedChannel
    enum Out {
        case bytes(ByteBuffer)
        case file(FileBody, offset: Int)
    }
    var out: [Out] = []
    var outIndex = 0
    var pendingBytes = 0
    var head: HTTPRequestHead?
    var body: ByteBuffer
    /// Bytes fed to the decoder since the last complete request (a request in progress).
    var partial = 0
    var requestsServed = 0
    /// After the queued output: close (error responses, `Connection: close`, HTTP/1.0).
    var closeAfterOutput = false
    /// No more requests are read (an error response is on its way, or the peer is gone).
    var stopReading = false
    var lastActivity: UInt64
    var lastProgress: UInt64
    var finished = false

    init(_ conn: TCPConnection, server: HTTPServer) {
        self.conn = conn
        self.server = server
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderListSize = server.options.maxHeaderBytes
        limits.maxHeaderFieldSize = server.options.maxHeaderBytes
        channel = EmbeddedChannel(handlers: [
            ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, informationalResponseStrategy: .drop,
                                                    limitConfiguration: limits)),
            HTTPResponseEncoder(),
        ])
        body = server.allocator.buffer(capacity: 0)
        lastActivity = server.nowMs
        lastProgress = server.nowMs
    }

    // MARK: events

    func handle(_ events: TCPEvents) {
        guard !finished else { return }
        if events.contains(.failed) || conn.isFailed {
            server.counters.peerResets += 1
            if partial > 0 || head != nil || conn.readableBytes > 0 { server.counters.closedMidRequest += 1 }
            finish()
            return
        }
        var progress = true
        while progress && !finished {
            progress = false
            if pendingBytes > 0, writeOutput() { progress = true }
            if finished { return }
            if pendingBytes == 0 && closeAfterOutput { finish(); return }
            if !stopReading, pendingBytes < server.options.maxPendingOutputBytes, conn.readableBytes > 0 {
                readAndDecode()
                progress = true
            }
        }
        if finished { return }
        if conn.isPeerClosed && conn.readableBytes == 0 && !closeAfterOutput {
            // The client half-closed: answer what it asked for, then close. A request cut short
            // is dropped.
            if partial > 0 || head != nil { server.counters.closedMidRequest += 1 }
            stopReading = true
            closeAfterOutput = true
            if pendingBytes == 0 { finish() }
        }
    }

    func isExpired(now: UInt64) -> Bool {
        let o = server.options
        if pendingBytes > 0 { return now &- lastProgress > UInt64(o.idleTimeoutMilliseconds) }
        if partial > 0 || head != nil { return now &- lastActivity > UInt64(o.requestTimeoutMilliseconds) }
        return now &- lastActivity > UInt64(o.idleTimeoutMilliseconds)
    }

    func timeout() {
        if pendingBytes == 0 && (partial > 0 || head != nil) && !stopReading {
            // A request that stalled: 408, then close once it is out.
            server.counters.requestTimeouts += 1
            respondError(.requestTimeout)
            lastProgress = server.nowMs
            _ = writeOutput()
            if finished { return }
            conn.flush()
            if pendingBytes == 0 { finish() }
            return
        }
        server.counters.idleClosed += 1
        if pendingBytes > 0 { conn.abort(); finishState() } else { finish() }
    }

    func finish() {
        guard !finished else { return }
        conn.close()
        finishState()
    }

    func finishState() {
        finished = true
        out.removeAll()
        pendingBytes = 0
        _ = try? channel.finish(acceptAlreadyClosed: true)
        server.closed(self)
    }

    // MARK: input

    func readAndDecode() {
        let n = conn.read(into: server.scratch)
        guard n > 0 else { return }
        lastActivity = server.nowMs
        var buf = server.allocator.buffer(capacity: n)
        buf.writeBytes(UnsafeRawBufferPointer(rebasing: server.scratch[0..<n]))
        partial += n
        do {
            try channel.writeInbound(buf)
            while let part = try channel.readInbound(as: HTTPServerRequestPart.self) {
                process(part)
                if stopReading { break }
            }
        } catch let e as HTTPParserError {
            decoderFailed(e)
        } catch {
            decoderFailed(nil)
        }
    }

    func decoderFailed(_ e: HTTPParserError?) {
        guard !stopReading else { return }
        if case .headerOverflow? = e {
            server.counters.headersTooLarge += 1
            respondError(.requestHeaderFieldsTooLarge)
        } else {
            server.counters.badRequests += 1
            respondError(.badRequest)
        }
    }

    func process(_ part: HTTPServerRequestPart) {
        guard !stopReading else { return }
        switch part {
        case .head(let h):
            if let len = h.headers.first(name: "content-length").flatMap(Int.init), len > server.options.maxBodyBytes {
                server.counters.bodiesTooLarge += 1
                respondError(.payloadTooLarge)
                return
            }
            head = h
            body.clear()
            if h.headers.first(name: "expect")?.lowercased() == "100-continue" {
                queue(bytes: "HTTP/1.1 100 Continue\r\n\r\n")
            }
        case .body(var b):
            guard head != nil else { return }
            if body.readableBytes + b.readableBytes > server.options.maxBodyBytes {
                server.counters.bodiesTooLarge += 1
                respondError(.payloadTooLarge)
                return
            }
            server.counters.requestBodyBytes += UInt64(b.readableBytes)
            body.writeBuffer(&b)
        case .end:
            guard let h = head else { return }
            head = nil
            partial = 0
            let req = HTTPRequest(head: h, body: body)
            body = server.allocator.buffer(capacity: 0)
            server.counters.requests += 1
            if requestsServed > 0 { server.counters.keepAliveRequests += 1 }
            requestsServed += 1
            let response = server.router.handle(req)
            respond(response, to: h, keepAlive: h.isKeepAlive)
        }
    }

    // MARK: output

    func respondError(_ status: HTTPResponseStatus) {
        stopReading = true
        head = nil
        var r = HTTPResponse.text("\(status.code) \(status.reasonPhrase)\n", status: status)
        r.headers.replaceOrAdd(name: "Connection", value: "close")
        respond(r, to: nil, keepAlive: false)
    }

    func respond(_ response: HTTPResponse, to request: HTTPRequestHead?, keepAlive: Bool) {
        var headers = response.headers
        let isHead = request?.method == .HEAD
        if response.status.mayHaveResponseBody, !headers.contains(name: "content-length") {
            headers.replaceOrAdd(name: "Content-Length", value: String(response.bodyLength))
        }
        if let s = server.options.serverName { headers.replaceOrAdd(name: "Server", value: s) }
        if !keepAlive {
            headers.replaceOrAdd(name: "Connection", value: "close")
            closeAfterOutput = true
            stopReading = true
        } else if request?.version == .http1_0 {
            headers.replaceOrAdd(name: "Connection", value: "keep-alive")
        }
        let version = request?.version ?? .http1_1
        let responseHead = HTTPResponseHead(version: version, status: response.status, headers: headers)
        do {
            try channel.writeOutbound(HTTPServerResponsePart.head(responseHead))
            try channel.writeOutbound(HTTPServerResponsePart.end(nil))
            while let data = try channel.readOutbound(as: IOData.self) {
                if case .byteBuffer(let b) = data, b.readableBytes > 0 { queue(b) }
            }
        } catch {
            // The encoder does not fail for a well-formed head; if it did, end the connection.
            closeAfterOutput = true
            stopReading = true
            return
        }
        server.count(status: response.status)
        if !isHead && response.status.mayHaveResponseBody {
            switch response.body {
            case .bytes(let b): if b.readableBytes > 0 { queue(b) }
            case .file(let f): if f.size > 0 { out.append(.file(f, offset: 0)); pendingBytes += f.size }
            case .empty: break
            }
        }
    }

    func queue(_ b: ByteBuffer) {
        out.append(.bytes(b))
        pendingBytes += b.readableBytes
    }

    func queue(bytes s: String) {
        var b = server.allocator.buffer(capacity: s.utf8.count)
        b.writeString(s)
        queue(b)
    }

    /// Writes what the send buffer takes; true if anything was written.
    func writeOutput() -> Bool {
        var wrote = false
        // Every return counts: a response that moved is not idle, even if the buffer filled mid-item.
        defer { if wrote { lastProgress = server.nowMs; lastActivity = server.nowMs } }
        while outIndex < out.count {
            var room = conn.writableBytes
            if room == 0 { break }
            switch out[outIndex] {
            case .bytes(var b):
                let n = b.withUnsafeReadableBytes { conn.write($0) }
                if n < 0 { finish(); return wrote }
                if n == 0 { return wrote }
                wrote = true
                b.moveReaderIndex(forwardBy: n)
                pendingBytes -= n
                server.counters.responseBytes += UInt64(n)
                if b.readableBytes == 0 { outIndex += 1 } else { out[outIndex] = .bytes(b); return wrote }
            case .file(let f, var offset):
                room = min(room, server.scratch.count, f.size - offset)
                let got = pread(f.fd, server.scratch.baseAddress, room, off_t(offset))
                if got <= 0 {
                    // The file shrank or failed under us: the promised length cannot be kept.
                    conn.abort(); finishState(); return wrote
                }
                let n = conn.write(UnsafeRawBufferPointer(rebasing: server.scratch[0..<got]))
                if n < 0 { finish(); return wrote }
                if n > 0 {
                    wrote = true
                    offset += n
                    pendingBytes -= n
                    server.counters.responseBytes += UInt64(n)
                }
                if offset >= f.size { outIndex += 1 } else { out[outIndex] = .file(f, offset: offset); if n < got { return wrote } }
            }
        }
        if outIndex == out.count { out.removeAll(keepingCapacity: true); outIndex = 0 }
        return wrote
    }
}
