import CFuzzShim
#if canImport(Glibc)
import Glibc
#endif

/// A fresh directory for one fuzzer process (sockets, fake sysfs trees), under `$VIO_FUZZ_TMP`
/// (set by Scripts/fuzz.sh to its run directory) or /tmp, removed when the process exits normally.
/// Keep `prefix` short: UNIX socket paths must fit in 108 bytes.
public enum ScratchDirectory {
    nonisolated(unsafe) static var made: [String] = []

    public static func make(_ prefix: String) -> String {
        let root = getenv("VIO_FUZZ_TMP").map { String(cString: $0) } ?? "/tmp"
        var template = Array("\(root)/\(prefix)-XXXXXX".utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            fatalError("mkdtemp under \(root) failed: errno \(errno)")
        }
        let path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        if made.isEmpty { atexit { for p in ScratchDirectory.made { removeTree(p) } } }
        made.append(path)
        return path
    }
}

/// `rm -rf path` (no symlinks followed).
public func removeTree(_ path: String) {
    _ = fuzz_remove_tree(path)
}

/// Writes `bytes` to `path` (created or truncated). Traps on failure: the harness's own files.
public func writeFile(_ path: String, _ bytes: [UInt8]) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { fatalError("open \(path): errno \(errno)") }
    defer { close(fd) }
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, bytes.count - done) }
        guard n > 0 else { fatalError("write \(path): errno \(errno)") }
        done += n
    }
}

public func writeFile(_ path: String, _ text: String) { writeFile(path, Array(text.utf8)) }
