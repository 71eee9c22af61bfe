#if canImport(Glibc)
import Glibc
#endif

/// Open file descriptors and threads of this process, to check that an input leaves none
/// behind (LeakSanitizer sees only memory).
public struct ProcessResources: Equatable, CustomStringConvertible {
    public var descriptors: Int
    public var threads: Int

    public static func now() -> ProcessResources {
        ProcessResources(descriptors: entries("/proc/self/fd"), threads: entries("/proc/self/task"))
    }

    static func entries(_ path: String) -> Int {
        guard let d = opendir(path) else { return -1 }
        defer { closedir(d) }
        var n = 0
        while let e = readdir(d) {
            let first = withUnsafeBytes(of: e.pointee.d_name) { $0[0] }
            if first != UInt8(ascii: ".") { n += 1 }
        }
        return n
    }

    public var description: String { "\(descriptors) descriptors, \(threads) threads" }

    /// Whether the process is back to `before` now, or within a second: a joined thread can
    /// still be listed for a moment while the kernel finishes its exit, and an object released
    /// on another thread (see vhost-reply) lets go of its descriptors a little later. Also
    /// returns how many milliseconds it took (0: at once).
    public static func settled(at before: ProcessResources) -> (ok: Bool, after: ProcessResources, waitedMS: Int) {
        var now = Self.now()
        var tries = 0
        while now != before && tries < 1000 {
            usleep(1000)
            tries += 1
            now = Self.now()
        }
        return (now == before, now, tries)
    }
}
