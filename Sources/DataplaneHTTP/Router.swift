#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import NIOHTTP1

/// A complete request: head and body (chunked bodies arrive de-chunked by NIOHTTP1's decoder).
public struct HTTPRequest {
    public var head: HTTPRequestHead
    public var body: ByteBuffer
    /// The path without the query string.
    public var path: Substring
    /// After `?`, if there was one.
    public var query: Substring?

    public init(head: HTTPRequestHead, body: ByteBuffer) {
        self.head = head
        self.body = body
        if let q = head.uri.firstIndex(of: "?") {
            path = head.uri[..<q]
            query = head.uri[head.uri.index(after: q)...]
        } else {
            path = head.uri[...]
            query = nil
        }
    }
}

/// A file to send as a response body: the connection reads it in pieces as the socket takes
/// them, and closes it when done.
public final class FileBody {
    public let fd: Int32
    public let size: Int
    init(fd: Int32, size: Int) { self.fd = fd; self.size = size }
    deinit { Glibc.close(fd) }

    /// Opens a regular file for reading.
    public static func open(path: String) -> FileBody? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { Glibc.close(fd); return nil }
        return FileBody(fd: fd, size: Int(st.st_size))
    }
}

/// What a handler returns.
public struct HTTPResponse {
    public enum Body {
        case bytes(ByteBuffer)
        case file(FileBody)
        case empty
    }
    public var status: HTTPResponseStatus
    public var headers: HTTPHeaders
    public var body: Body

    public init(status: HTTPResponseStatus = .ok, headers: HTTPHeaders = [:], body: Body = .empty) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// A text/plain (or other type) response from a string.
    public static func text(_ s: String, status: HTTPResponseStatus = .ok, contentType: String = "text/plain; charset=utf-8") -> HTTPResponse {
        var b = ByteBufferAllocator().buffer(capacity: s.utf8.count)
        b.writeString(s)
        return HTTPResponse(status: status, headers: ["Content-Type": contentType], body: .bytes(b))
    }

    public var bodyLength: Int {
        switch body {
        case .bytes(let b): return b.readableBytes
        case .file(let f): return f.size
        case .empty: return 0
        }
    }
}

public typealias HTTPHandler = (HTTPRequest) -> HTTPResponse

/// Routes by method and path: exact paths first, then the longest matching prefix.
public final class HTTPRouter {
    struct Route {
        var method: HTTPMethod?
        var handler: HTTPHandler
    }
    var exact: [String: [Route]] = [:]
    var prefixes: [(prefix: String, route: Route)] = []

    public init() {}

    /// `handler` for `path` exactly (any method when `method` is nil).
    public func on(_ path: String, method: HTTPMethod? = nil, _ handler: @escaping HTTPHandler) {
        exact[path, default: []].append(Route(method: method, handler: handler))
    }

    public func get(_ path: String, _ handler: @escaping HTTPHandler) { on(path, method: .GET, handler) }
    public func post(_ path: String, _ handler: @escaping HTTPHandler) { on(path, method: .POST, handler) }

    /// `handler` for every path under `prefix`.
    public func onPrefix(_ prefix: String, method: HTTPMethod? = nil, _ handler: @escaping HTTPHandler) {
        prefixes.append((prefix, Route(method: method, handler: handler)))
        prefixes.sort { $0.prefix.count > $1.prefix.count }
    }

    /// Serves the files under `root` at `prefix` (GET and HEAD; "/" maps to index.html).
    public func staticFiles(at prefix: String = "/", root: String) {
        let p = prefix.hasSuffix("/") ? prefix : prefix + "/"
        let handler: HTTPHandler = { req in StaticFiles.serve(req, prefix: p, root: root) }
        onPrefix(p, method: .GET, handler)
        onPrefix(p, method: .HEAD, handler)
    }

    /// The response of the matching handler (404 or 405 when none matches).
    public func handle(_ req: HTTPRequest) -> HTTPResponse {
        let path = String(req.path)
        if let routes = exact[path] {
            if let r = routes.first(where: { $0.method == nil || $0.method == req.head.method || ($0.method == .GET && req.head.method == .HEAD) }) {
                return r.handler(req)
            }
            return .text("method not allowed\n", status: .methodNotAllowed)
        }
        var prefixMatched = false
        for (prefix, r) in prefixes where path.hasPrefix(prefix) {
            prefixMatched = true
            if r.method == nil || r.method == req.head.method { return r.handler(req) }
        }
        return prefixMatched ? .text("method not allowed\n", status: .methodNotAllowed) : .text("not found\n", status: .notFound)
    }
}

enum StaticFiles {
    static let types: [String: String] = [
        "html": "text/html; charset=utf-8", "htm": "text/html; charset=utf-8", "txt": "text/plain; charset=utf-8",
        "css": "text/css", "js": "text/javascript", "json": "application/json", "png": "image/png",
        "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif", "svg": "image/svg+xml",
        "ico": "image/x-icon", "wasm": "application/wasm", "pdf": "application/pdf",
    ]

    /// Percent-decodes a path; nil for malformed escapes or a NUL.
    static func decode(_ s: Substring) -> String? {
        var out = [UInt8]()
        var it = Array(s.utf8)[...]
        while let c = it.popFirst() {
            if c == UInt8(ascii: "%") {
                guard it.count >= 2, let v = UInt8(String(decoding: it.prefix(2), as: UTF8.self), radix: 16) else { return nil }
                it = it.dropFirst(2)
                out.append(v)
            } else {
                out.append(c)
            }
        }
        guard !out.contains(0) else { return nil }
        return String(decoding: out, as: UTF8.self)
    }

    static func serve(_ req: HTTPRequest, prefix: String, root: String) -> HTTPResponse {
        guard let decoded = decode(req.path.dropFirst(prefix.count)) else { return .text("bad path\n", status: .badRequest) }
        let parts = decoded.split(separator: "/", omittingEmptySubsequences: true)
        // Nothing may climb out of the root.
        guard !parts.contains(where: { $0 == ".." || $0 == "." }) else { return .text("forbidden\n", status: .forbidden) }
        var path = root + "/" + parts.joined(separator: "/")
        if decoded.isEmpty || decoded.hasSuffix("/") { path += (parts.isEmpty ? "" : "/") + "index.html" }
        guard let file = FileBody.open(path: path) else { return .text("not found\n", status: .notFound) }
        let ext = path.split(separator: ".").last.map { $0.lowercased() } ?? ""
        var r = HTTPResponse(status: .ok, headers: ["Content-Type": types[ext] ?? "application/octet-stream"], body: .file(file))
        if req.head.method == .HEAD { r.headers.replaceOrAdd(name: "Content-Length", value: String(file.size)); r.body = .empty }
        return r
    }
}
