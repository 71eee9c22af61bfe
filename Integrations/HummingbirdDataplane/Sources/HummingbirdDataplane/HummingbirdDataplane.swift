#if canImport(Glibc)
import Glibc
#endif
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIODataplane
import NetStack
import Synchronization

/// Serves a Hummingbird 2 responder (a `Router`'s `buildResponder()`, or any `HTTPResponder`)
/// over HTTP/1.1 on the dataplane's TCP/IP stack.
///
/// Hummingbird's `Application` and `Server` choose their bootstrap internally (NIOPosix's
/// `ServerBootstrap`, or NIOTransportServices'), and `HTTPServerBuilder.buildChildChannel` is
/// package-scoped, so neither can be handed a dataplane bootstrap. The nearest public hook is
/// HummingbirdCore's `HTTP1Channel` (a `ServerChildChannel`): this binds a
/// `DataplaneServerBootstrap`, gives each accepted `DataplaneChannel` to `HTTP1Channel.setup`
/// and runs `HTTP1Channel.handle` for it, as Hummingbird's `Server` does, with a responder
/// closure that does what `Application.run` does around the router (request context, 500 for
/// unhandled errors, `Date` and `Server` headers).
public enum HummingbirdDataplane {
    /// Serves until the dataplane's loop shuts down (its channels close). `onReady` runs once
    /// the port listens.
    public static func serve<Responder: HTTPResponder>(
        _ responder: Responder,
        on dataplane: DataplaneContext,
        port: Int = 8080,
        configuration: HTTP1Channel.Configuration = .init(),
        serverName: String? = nil,
        logger: Logger = Logger(label: "hummingbird.dataplane"),
        onReady: (@Sendable () -> Void)? = nil
    ) async throws where Responder.Context: RequestContext, Responder.Context.Source == ApplicationRequestContextSource {
        let dates = HTTPDateCache()
        let http1 = HTTP1Channel(responder: { request, writer, channel in
            let context = Responder.Context(source: ApplicationRequestContextSource(channel: channel, logger: logger))
            var response: Response
            do {
                response = try await responder.respond(to: request, context: context)
            } catch {
                // The router answers HTTPResponseErrors itself; anything else is a 500.
                logger.debug("unhandled error: \(error)")
                response = Response(status: .internalServerError)
            }
            response.headers[.date] = dates.current
            if let serverName { response.headers[.server] = serverName }
            try await writer.write(response: response.head, body: response.body)
        }, configuration: configuration)
        let server = try await dataplane.serverBootstrap().bind(port: port) { channel in
            http1.setup(channel: channel, logger: logger)
        }
        onReady?()
        // The connections' async code runs on the loop thread (between polls), as NIO code on an
        // event loop does: no hop to the cooperative pool and back for each read and write.
        let executor = dataplane.loop.taskExecutor
        try await withTaskExecutorPreference(executor) {
            try await withThrowingDiscardingTaskGroup { group in
                try await server.executeThenClose { connections in
                    for try await connection in connections {
                        group.addTask(executorPreference: executor) { await http1.handle(value: connection, logger: logger) }
                    }
                }
            }
        }
    }

    /// Opens the dataplane (`Dataplane.run`: the port and its event loop, on the calling thread)
    /// and serves `responder` on it until SIGINT/SIGTERM or a lost link.
    public static func run<Responder: HTTPResponder>(
        _ responder: Responder,
        dataplane config: DataplaneConfig,
        port: Int = 8080,
        configuration: HTTP1Channel.Configuration = .init(),
        serverName: String? = nil,
        logger: Logger = Logger(label: "hummingbird.dataplane"),
        onReady: (@Sendable () -> Void)? = nil
    ) throws where Responder.Context: RequestContext, Responder.Context.Source == ApplicationRequestContextSource {
        let failure = Mutex<(any Error)?>(nil)
        try Dataplane.run(config, logger: logger) { dp in
            Task(executorPreference: dp.loop.taskExecutor) {
                do {
                    try await serve(responder, on: dp, port: port, configuration: configuration, serverName: serverName,
                                    logger: logger, onReady: onReady)
                } catch {
                    failure.withLock { $0 = error }
                    logger.error("hummingbird on the dataplane: \(error)")
                    dp.loop.shutdownGracefully { _ in }
                }
            }
        }
        if let e = failure.withLock({ $0 }) { throw e }
    }
}

/// The `Date` header (RFC 9110 IMF-fixdate), formatted once per second.
final class HTTPDateCache: Sendable {
    private let cached = Mutex<(second: time_t, text: String)>((0, ""))

    var current: String {
        let now = time(nil)
        return cached.withLock { c in
            if c.second != now { c = (now, Self.format(now)) }
            return c.text
        }
    }

    static func format(_ t: time_t) -> String {
        var tm = tm()
        var t = t
        gmtime_r(&t, &tm)
        var buf = [CChar](repeating: 0, count: 64)
        let n = strftime(&buf, buf.count, "%a, %d %b %Y %H:%M:%S GMT", &tm)
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
