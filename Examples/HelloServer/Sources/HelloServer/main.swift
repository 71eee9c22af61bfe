// HelloServer vhost:/tmp/vhost.sock 198.18.0.2/24 — serves GET / and /stats on TCP port 8080,
// with TCP/IP (lwIP) running on a poll-mode virtio-net port.
import DataplaneHTTP
import Foundation
import NetStack

let args = CommandLine.arguments
guard args.count == 3, args[1].hasPrefix("vhost:"), let ip = IPv4Interface(cidr: args[2]) else {
    print("usage: HelloServer vhost:SOCKET A.B.C.D/N")
    exit(64)
}
let router = HTTPRouter()
router.get("/") { req in .text("hello from an embedded swift-virtio dataplane, \(req.head.method) \(req.head.uri)\n") }
do {
    try HTTPDataplane.run(HTTPDataplaneConfig(vhostUserPath: String(args[1].dropFirst(6)), interface: ip), router: router)
} catch {
    print("HelloServer: \(error)")
    exit(1)
}
