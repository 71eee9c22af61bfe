// vio-nio-httpd HOST PORT ROOT [THREADS] — the same routes as `vio httpd` (DataplaneHTTP's
// HTTPRouter: /hello, static files under ROOT) served by a plain SwiftNIO server on the kernel's
// TCP/IP stack. Bench/httpd.py runs it next to the dataplane server.
import DataplaneHTTP
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix


let args = CommandLine.arguments
guard args.count >= 4, let port = Int(args[2]) else {
    print("usage: vio-nio-httpd HOST PORT ROOT [THREADS]")
    exit(64)
}
nonisolated(unsafe) let router = HTTPRouter()
router.get("/hello") { _ in .text("hello from swift-virtio\n") }
router.staticFiles(at: "/", root: args[3])

final class Handler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    var head: HTTPRequestHead?
    var body = ByteBuffer()

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h; body.clear()
        case .body(var b): body.writeBuffer(&b)
        case .end:
            guard let h = head else { return }
            head = nil
            let r = router.handle(HTTPRequest(head: h, body: body))
            var headers = r.headers
            var payload: ByteBuffer?
            switch r.body {
            case .bytes(let b): payload = b
            case .file(let f):
                // Read the file per request, as the dataplane server does (pread into its buffer).
                var b = context.channel.allocator.buffer(capacity: f.size)
                b.writeWithUnsafeMutableBytes(minimumWritableBytes: f.size) { p in max(0, pread(f.fd, p.baseAddress, f.size, 0)) }
                payload = b
            case .empty: break
            }
            headers.replaceOrAdd(name: "Content-Length", value: String(payload?.readableBytes ?? r.bodyLength))
            headers.replaceOrAdd(name: "Server", value: "swift-virtio")
            if !h.isKeepAlive { headers.replaceOrAdd(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: r.status, headers: headers))), promise: nil)
            if let p = payload, h.method != .HEAD { context.write(wrapOutboundOut(.body(.byteBuffer(p))), promise: nil) }
            let keep = h.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in if !keep { context.close(promise: nil) } }
        }
    }
}

let threads = args.count > 4 ? Int(args[4]) ?? 1 : 1
let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
let channel = try ServerBootstrap(group: group)
    .serverChannelOption(ChannelOptions.backlog, value: 256)
    .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
    .childChannelInitializer { ch in
        ch.pipeline.configureHTTPServerPipeline().flatMap { ch.pipeline.addHandler(Handler()) }
    }
    .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
    .bind(host: args[1], port: port).wait()
FileHandle.standardOutput.write(Data("vio-nio-httpd: listening on \(args[1]):\(port)\n".utf8))
try channel.closeFuture.wait()
