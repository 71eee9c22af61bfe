// nio-probe: NIO servers on the dataplane, for the channel tests (NIOChannelTests).
//
//   nio-probe --port vhost:SOCK --ip 198.18.0.2/24 [--memory-mb N]
//
// TCP 7000 speaks a line protocol: the first line picks what the connection does.
//   ECHO       echoes every byte, with autoRead off while the channel is not writable; on the
//              peer's FIN (allowRemoteHalfClosure) it finishes its writes and half-closes too
//   FLOOD n    writes n bytes (byte i is i % 251) as fast as writability allows, then closes
//   CLOSE      closes at once from the server side, then tries a write (which must fail)
//   HOLD       does nothing (the client resets it)
//   STATS      answers one JSON line of the counters below and closes
// TCP 7001: echo through NIOAsyncChannel (the async bootstrap; the handler runs off the loop).
// TCP 8080: NIOHTTP1's server pipeline; GET /hello answers "hello\n", anything else 404.
// Prints "probe: listening" once all three listen. SIGINT: orderly stop, exit 0.
import Foundation
import NetStack
import NIOCore
import NIODataplane
import NIOHTTP1

var args = CommandLine.arguments.dropFirst()
var portSpec = "", ip = "", memoryMB = 256
while let a = args.popFirst() {
    switch a {
    case "--port": portSpec = args.popFirst() ?? ""
    case "--ip": ip = args.popFirst() ?? ""
    case "--memory-mb": memoryMB = Int(args.popFirst() ?? "") ?? 256
    default: FileHandle.standardError.write("nio-probe: unknown argument \(a)\n".data(using: .utf8)!); exit(1)
    }
}
guard portSpec.hasPrefix("vhost:"), let iface = IPv4Interface(cidr: ip) else {
    FileHandle.standardError.write("usage: nio-probe --port vhost:SOCK --ip A.B.C.D/N\n".data(using: .utf8)!)
    exit(1)
}
setvbuf(stdout, nil, _IOLBF, 0)

/// Counters, touched on the loop thread only.
final class Stats: @unchecked Sendable {
    static let shared = Stats()
    var accepted = 0, active = 0, inactive = 0, registered = 0, unregistered = 0
    var errors: [String] = []
    var resets = 0
    var inputClosed = 0
    var writabilityFalse = 0, writabilityTrue = 0
    var maxPending = 0
    var writeAfterCloseFailed = 0
    var echoed = 0, flooded = 0
    var asyncEchoed = 0
    var httpRequests = 0
    var offLoop = 0
    var json: String {
        let d: [String: Any] = ["accepted": accepted, "active": active, "inactive": inactive, "registered": registered,
                                "unregistered": unregistered, "errors": errors, "resets": resets, "inputClosed": inputClosed,
                                "writabilityFalse": writabilityFalse, "writabilityTrue": writabilityTrue, "maxPending": maxPending,
                                "writeAfterCloseFailed": writeAfterCloseFailed, "echoed": echoed, "flooded": flooded,
                                "asyncEchoed": asyncEchoed, "httpRequests": httpRequests, "offLoop": offLoop]
        let data = try! JSONSerialization.data(withJSONObject: d, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }
}

final class LineProtocolHandler: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    enum Mode { case waiting, echo, flood(remaining: Int, next: Int), closed, hold }
    var mode = Mode.waiting
    var line = ByteBuffer()
    var lastWrite: EventLoopFuture<Void>?
    let stats = Stats.shared

    func check(_ context: ChannelHandlerContext) {
        if !context.eventLoop.inEventLoop { stats.offLoop += 1 }
        if let c = context.channel as? DataplaneChannel { stats.maxPending = max(stats.maxPending, c.pendingBytes) }
    }

    func channelRegistered(context: ChannelHandlerContext) { stats.registered += 1; context.fireChannelRegistered() }
    func channelUnregistered(context: ChannelHandlerContext) { stats.unregistered += 1; context.fireChannelUnregistered() }
    func channelActive(context: ChannelHandlerContext) { stats.accepted += 1; stats.active += 1; context.fireChannelActive() }
    func channelInactive(context: ChannelHandlerContext) { stats.active -= 1; stats.inactive += 1; context.fireChannelInactive() }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        check(context)
        var buf = unwrapInboundIn(data)
        switch mode {
        case .waiting:
            line.writeBuffer(&buf)
            guard let nl = line.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else { return }
            let text = String(decoding: line.readableBytesView[line.readerIndex..<nl], as: UTF8.self)
            line.moveReaderIndex(to: nl + 1)
            var rest = line
            line = ByteBuffer()
            start(text, context: context)
            if case .echo = mode, rest.readableBytes > 0 { echo(&rest, context: context) }
        case .echo: echo(&buf, context: context)
        default: break   // FLOOD/HOLD ignore input
        }
    }

    func start(_ command: String, context: ChannelHandlerContext) {
        let words = command.split(separator: " ")
        switch words.first {
        case "ECHO": mode = .echo
        case "FLOOD":
            mode = .flood(remaining: Int(words.dropFirst().first ?? "") ?? 0, next: 0)
            flood(context: context)
        case "CLOSE":
            mode = .closed
            let ch = context.channel
            context.close(promise: nil)
            ch.writeAndFlush(ByteBuffer(string: "late")).whenFailure { error in
                if case ChannelError.ioOnClosedChannel = error { Stats.shared.writeAfterCloseFailed += 1 }
            }
        case "HOLD": mode = .hold
        case "STATS":
            mode = .closed
            let s = stats.json + "\n"
            context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: s))).whenComplete { _ in context.close(promise: nil) }
        default:
            context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "unknown command\n"))).whenComplete { _ in context.close(promise: nil) }
        }
    }

    func echo(_ buf: inout ByteBuffer, context: ChannelHandlerContext) {
        stats.echoed += buf.readableBytes
        let f = context.write(wrapOutboundOut(buf))
        lastWrite = f
        if !context.channel.isWritable {
            // Backpressure: stop reading until the writes drain (TCP then closes the peer's window).
            _ = context.channel.setOption(ChannelOptions.autoRead, value: false)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
        context.fireChannelReadComplete()
    }

    func flood(context: ChannelHandlerContext) {
        guard case .flood(var remaining, var next) = mode else { return }
        while remaining > 0, context.channel.isWritable {
            let n = min(remaining, 16384)
            var b = context.channel.allocator.buffer(capacity: n)
            b.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { p in
                for i in 0..<n { p[i] = UInt8((next + i) % 251) }
                return n
            }
            next = (next + n) % 251
            remaining -= n
            stats.flooded += n
            lastWrite = context.write(wrapOutboundOut(b))
            check(context)
        }
        context.flush()
        mode = .flood(remaining: remaining, next: next)
        if remaining == 0 {
            mode = .closed
            (lastWrite ?? context.eventLoop.makeSucceededVoidFuture()).whenComplete { _ in context.close(promise: nil) }
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        check(context)
        if context.channel.isWritable {
            stats.writabilityTrue += 1
            if case .echo = mode { _ = context.channel.setOption(ChannelOptions.autoRead, value: true) }
            if case .flood = mode { flood(context: context) }
        } else {
            stats.writabilityFalse += 1
        }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            stats.inputClosed += 1
            if case .echo = mode {
                // Half-close: everything echoed goes out, then our FIN.
                context.flush()
                (lastWrite ?? context.eventLoop.makeSucceededVoidFuture()).whenComplete { _ in
                    context.close(mode: .output, promise: nil)
                }
            } else if case .hold = mode {
                context.close(promise: nil)
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        stats.errors.append("\(error)")
        if let e = error as? IOError, e.errnoCode == ECONNRESET { stats.resets += 1 }
        context.close(promise: nil)
    }
}

final class HelloHTTPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    var head: HTTPRequestHead?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            Stats.shared.httpRequests += 1
            let ok = h.method == .GET && h.uri == "/hello"
            let body = ok ? "hello\n" : "not found\n"
            var headers = HTTPHeaders([("Content-Length", "\(body.utf8.count)"), ("Content-Type", "text/plain")])
            if !h.isKeepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: ok ? .ok : .notFound, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            let keep = h.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in if !keep { context.close(promise: nil) } }
        }
    }
}

var config = DataplaneConfig(vhostUserPath: String(portSpec.dropFirst(6)), interface: iface)
config.memoryMB = memoryMB
config.mbufs = 8192
config.poolName = "probe_pool"
do {
    try Dataplane.run(config) { dp in
        let lines = dp.serverBootstrap()
            .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .childChannelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: 32 * 1024, high: 128 * 1024))
            .childChannelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(LineProtocolHandler()) } }
            .bind(port: 7000)
        let http = dp.serverBootstrap()
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.configureHTTPServerPipeline()
                    try ch.pipeline.syncOperations.addHandler(HelloHTTPHandler())
                }
            }
            .bind(port: 8080)
        // The client half-closes after sending: without remote half-closure its FIN would close
        // the channel before the echo finished (as with NIOPosix).
        let bootstrap = dp.serverBootstrap().childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
        let loop = dp.loop
        Task {
            do {
                let server = try await bootstrap.bind(port: 7001) { ch in
                    ch.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: ch) }
                }
                _ = try await lines.get()
                _ = try await http.get()
                print("probe: listening on \(iface.address) ports 7000 7001 8080")
                try await withThrowingDiscardingTaskGroup { group in
                    try await server.executeThenClose { inbound in
                        for try await conn in inbound {
                            group.addTask {
                                try? await conn.executeThenClose { input, output in
                                    for try await buf in input {
                                        let n = buf.readableBytes
                                        try await output.write(buf)
                                        loop.execute { Stats.shared.asyncEchoed += n }
                                    }
                                }
                            }
                        }
                    }
                }
            } catch {
                print("probe: async server: \(error)")
            }
        }
    }
    print("probe: stopped")
} catch {
    FileHandle.standardError.write("nio-probe: \(error)\n".data(using: .utf8)!)
    exit(2)
}
