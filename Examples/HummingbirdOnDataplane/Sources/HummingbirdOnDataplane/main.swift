// HummingbirdOnDataplane --port vhost:SOCK --ip 198.18.0.2/24 [--listen 8080] [--mtu 9000]   (the dataplane)
// HummingbirdOnDataplane --kernel 0.0.0.0 [--listen 8080]                        (NIOPosix, for comparison)
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdDataplane
import NIODataplane
import NetStack

struct Greeting: ResponseCodable { var greeting: String; var name: String; var transport: String }

/// Middleware: every response says which transport served it.
struct TransportHeader<Context: RequestContext>: RouterMiddleware {
    let transport: String
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var response = try await next(request, context)
        response.headers[HTTPField.Name("X-Transport")!] = transport
        return response
    }
}

func makeRouter(transport: String) -> Router<BasicRequestContext> {
    let router = Router()
    router.add(middleware: TransportHeader(transport: transport))
    router.get("/hello") { _, _ in "hello\n" }
    router.get("/hello/{name}") { _, context in "hello, \(try context.parameters.require("name"))\n" }
    router.get("/json/{name}") { _, context in
        Greeting(greeting: "hello", name: try context.parameters.require("name"), transport: transport)
    }
    router.post("/echo") { request, _ in
        Response(status: .ok, body: .init(byteBuffer: try await request.body.collect(upTo: 1 << 20)))
    }
    // A streamed body: N chunks of 64 KiB (byte i of the stream is i % 251), written as they are made.
    router.get("/stream/{chunks}") { _, context in
        let chunks = try context.parameters.require("chunks", as: Int.self)
        return Response(status: .ok, headers: [.contentType: "application/octet-stream"], body: .init { writer in
            var offset = 0
            for _ in 0..<chunks {
                var b = ByteBuffer()
                b.writeBytes((0..<65536).map { UInt8((offset + $0) % 251) })
                offset += 65536
                try await writer.write(b)
            }
            try await writer.finish(nil)
        })
    }
    // What the dataplane lcore spent on work (TSC cycles), for cycles-per-request measurements.
    router.get("/dataplane") { _, _ -> String in
        guard let dp = Dataplane.current else { return "{}\n" }
        return "{\"busyCycles\": \(dp.stack.busyCycles), \"tscHz\": \(dp.tscHz)}\n"
    }
    let file = ByteBuffer(bytes: (0..<65536).map { UInt8($0 % 251) })
    router.get("/64k") { _, _ in Response(status: .ok, body: .init(byteBuffer: file)) }
    return router
}

var args = CommandLine.arguments.dropFirst()
var port = "", ip = "", kernel: String?, listen = 8080, mtu = 1500
while let a = args.popFirst() {
    switch a {
    case "--port": port = args.popFirst() ?? ""
    case "--ip": ip = args.popFirst() ?? ""
    case "--kernel": kernel = args.popFirst()
    case "--listen": listen = Int(args.popFirst() ?? "") ?? 8080
    case "--mtu": mtu = Int(args.popFirst() ?? "") ?? 1500
    default: print("unknown argument \(a)"); exit(1)
    }
}
setvbuf(stdout, nil, _IOLBF, 0)
let tcpPort = listen
if let host = kernel {
    let app = Application(router: makeRouter(transport: "kernel"), configuration: .init(address: .hostname(host, port: tcpPort)),
                          onServerRunning: { _ in print("hummingbird: listening on \(host):\(tcpPort) (kernel)") })
    try await app.runService()
} else {
    guard port.hasPrefix("vhost:"), let iface = IPv4Interface(cidr: ip) else {
        print("usage: HummingbirdOnDataplane --port vhost:SOCK --ip A.B.C.D/N [--listen P] [--mtu M] | --kernel HOST [--listen P]")
        exit(1)
    }
    let responder = makeRouter(transport: "dataplane").buildResponder()
    var dataplane = DataplaneConfig(vhostUserPath: String(port.dropFirst(6)), interface: iface)
    dataplane.mtu = mtu
    try HummingbirdDataplane.run(responder, dataplane: dataplane,
                                 port: tcpPort, serverName: "swift-virtio") {
        print("hummingbird: listening on \(iface.address):\(tcpPort) (dataplane)")
    }
    print("hummingbird: stopped")
}
