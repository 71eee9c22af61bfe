import CDPDK
import CVioLinux
#if canImport(Glibc)
import Glibc
#endif

/// Errors from the DPDK layer, each with the message a user should see.
public enum DPDKError: Error, CustomStringConvertible, Sendable {
    case ealInit(args: [String], errno: Int32, message: String)
    case alreadyInitialized
    case noHugepages(neededMB: Int, freeMB: Int)
    case mempool(name: String, count: Int, errno: Int32, message: String)
    case allocation(bytes: Int)
    case memoryWalk(String)
    case lcoreNotAllowed(cpu: Int, allowed: [Int])
    case launch(lcore: Int, errno: Int32)

    public var description: String {
        switch self {
        case let .ealInit(args, e, m):
            return "DPDK EAL initialisation failed (\(m), rte_errno \(e)) with arguments: \(args.joined(separator: " "))"
        case .alreadyInitialized: return "DPDK EAL is already initialised in this process"
        case let .noHugepages(need, free):
            return "hugepages requested but only \(free) MiB are free (need \(need) MiB): reserve more with Scripts/setup.sh, or use --memory nohuge"
        case let .mempool(name, count, e, m):
            return "cannot create mbuf pool \(name) of \(count) mbufs: \(m) (rte_errno \(e)); not enough DPDK memory? raise --memory-mb"
        case .allocation(let b): return "cannot allocate \(b) bytes of DPDK memory"
        case .memoryWalk(let m): return "cannot export DPDK memory to the device: \(m)"
        case let .lcoreNotAllowed(c, a): return "CPU \(c) is not in this process's affinity (\(a.map(String.init).joined(separator: ",")))"
        case let .launch(l, e): return "cannot launch work on worker lcore \(l) (error \(e))"
        }
    }
}

/// How DPDK gets its memory.
public enum MemoryMode: String, Sendable, CaseIterable {
    /// 2 MiB hugepages from hugetlbfs, one file per segment list (`--single-file-segments`).
    case hugepages
    /// `--no-huge`: 4 KiB pages in one memfd, which vhost-user can share. Works anywhere; slower.
    case nohuge
    /// Hugepages when enough are free and hugetlbfs is mounted, otherwise `nohuge`.
    case auto
}

/// An EAL preset: the arguments swift-virtio passes to `rte_eal_init` for each memory mode.
/// `Configs/eal/*.conf` hold the same presets as files (one argument per line, `{MB}`, `{PREFIX}`
/// and `{LCORES}` substituted); a test checks the two agree.
public struct EALPreset: Sendable, Equatable {
    public var arguments: [String]
    public init(arguments: [String]) { self.arguments = arguments }

    public static let hugepages = EALPreset(arguments: [
        "--lcores", "{LCORES}", "-m", "{MB}", "--single-file-segments", "--in-memory", "--file-prefix", "{PREFIX}",
        "--no-pci", "--no-shconf", "--no-telemetry", "--iova-mode", "va", "--log-level", "lib.eal:warning",
    ])
    public static let nohuge = EALPreset(arguments: [
        "--lcores", "{LCORES}", "-m", "{MB}", "--no-huge", "--file-prefix", "{PREFIX}",
        "--no-pci", "--no-shconf", "--no-telemetry", "--iova-mode", "va", "--log-level", "lib.eal:warning",
    ])
    /// For virtio-pci devices (`pci:` ports, in a guest without an IOMMU): hugepages and
    /// `--iova-mode pa`, so IOVAs are the physical addresses the device must be given;
    /// `--legacy-mem` maps all of `-m` at start, sorted by physical address, so multi-page
    /// IOVA-contiguous memzones (rings, block buffers) can be had.
    public static let pci = EALPreset(arguments: [
        "--lcores", "{LCORES}", "-m", "{MB}", "--legacy-mem", "--huge-unlink", "--file-prefix", "{PREFIX}",
        "--no-pci", "--no-shconf", "--no-telemetry", "--iova-mode", "pa", "--log-level", "lib.eal:warning",
    ])

    /// Parses a `Configs/eal/*.conf` file: one argument per line, `#` comments, blank lines skipped.
    public init(fileContents: String) {
        arguments = fileContents.split(separator: "\n").map { $0.trimmingCharacters(in: " \t") }
            .filter { !$0.isEmpty && !$0.hasPrefix("#") }.map(String.init)
    }

    func expanded(memoryMB: Int, prefix: String, lcores: String) -> [String] {
        arguments.map {
            $0.replacing("{MB}", with: String(memoryMB)).replacing("{PREFIX}", with: prefix)
                .replacing("{LCORES}", with: lcores)
        }
    }
}

extension StringProtocol {
    fileprivate func trimmingCharacters(in set: String) -> Substring {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s.removeFirst() }
        while let l = s.last, set.contains(l) { s.removeLast() }
        return s
    }
}

/// What `EAL.initialize` chose.
public struct EALReport: Sendable {
    public var mode: MemoryMode
    public var memoryMB: Int
    public var lcoreCPUs: [Int]
    public var arguments: [String]
    public var tscHz: UInt64
    public var summary: String {
        let cpus = lcoreCPUs.map(String.init).joined(separator: ",")
        return mode == .hugepages
            ? "memory: \(memoryMB) MiB of hugepages (\(arguments.contains("--legacy-mem") ? "legacy memory, IOVAs are physical addresses" : "single-file segments")), poll loop on CPU \(cpus)"
            : "memory: \(memoryMB) MiB of --no-huge memfd memory (no hugepages used; slower), poll loop on CPU \(cpus)"
    }
}

/// The DPDK Environment Abstraction Layer, initialised once per process.
public enum EAL {
    nonisolated(unsafe) private static var report: EALReport?

    /// The report of the initialisation done in this process, if any.
    public static var current: EALReport? { report }

    /// Free hugepage memory and whether hugetlbfs is mounted.
    public static func hugepageStatus() -> (freeMB: Int, mounted: Bool) {
        var freePages = 0, pageKB = 0
        if let meminfo = readFile("/proc/meminfo") {
            for line in meminfo.split(separator: "\n") {
                let parts = line.split(separator: " ", omittingEmptySubsequences: true)
                guard parts.count >= 2 else { continue }
                if parts[0] == "HugePages_Free:" { freePages = Int(parts[1]) ?? 0 }
                if parts[0] == "Hugepagesize:" { pageKB = Int(parts[1]) ?? 0 }
            }
        }
        let mounted = readFile("/proc/mounts")?.split(separator: "\n").contains { $0.split(separator: " ").dropFirst(2).first == "hugetlbfs" } ?? false
        return (freePages * pageKB / 1024, mounted)
    }

    /// The CPUs this process may run on (honours `taskset`).
    public static func affinityCPUs() -> [Int] {
        var cpus = [Int32](repeating: 0, count: 1024)
        let n = cvio_affinity_cpus(&cpus, Int32(cpus.count))
        return n > 0 ? cpus[0..<Int(n)].map(Int.init) : [0]
    }

    /// Initialises the EAL. `.auto` picks hugepages when `memoryMB` of them are free, else
    /// `--no-huge`. The main lcore runs on the first CPU of the process affinity.
    @discardableResult
    public static func initialize(mode: MemoryMode = .auto, memoryMB: Int = 512, preset: EALPreset? = nil,
                                  filePrefix: String? = nil, lcoreCPUs: [Int]? = nil, extraArguments: [String] = []) throws -> EALReport {
        guard report == nil else { throw DPDKError.alreadyInitialized }
        let huge = hugepageStatus()
        var chosen = mode
        if mode == .auto { chosen = huge.mounted && huge.freeMB >= memoryMB ? .hugepages : .nohuge }
        if chosen == .hugepages && (!huge.mounted || huge.freeMB < memoryMB) {
            throw DPDKError.noHugepages(neededMB: memoryMB, freeMB: huge.mounted ? huge.freeMB : 0)
        }
        var cpus = affinityCPUs()
        var lcores = cpus.count == 1 ? "0@\(cpus[0])" : "0@(\(cpus.map(String.init).joined(separator: ",")))"
        if let wanted = lcoreCPUs {
            // One lcore per CPU given, lcore k on the k-th: the main lcore first, then workers.
            for c in wanted where !cpus.contains(c) { throw DPDKError.lcoreNotAllowed(cpu: c, allowed: cpus) }
            cpus = wanted
            lcores = wanted.enumerated().map { "\($0.offset)@\($0.element)" }.joined(separator: ",")
        }
        let prefix = filePrefix ?? "vio-\(getpid())"
        let p = preset ?? (chosen == .hugepages ? .hugepages : .nohuge)
        let args = ["vio"] + p.expanded(memoryMB: memoryMB, prefix: prefix, lcores: lcores) + extraArguments
        var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) }
        // rte_eal_init keeps pointers into argv; the strings are intentionally never freed. They
        // are kept in a static (a copy of the list: rte_eal_init rewrites argv entries), so they
        // stay reachable and LeakSanitizer does not report them.
        ealArgv = argv
        let rc = argv.withUnsafeMutableBufferPointer { rte_eal_init(Int32(args.count), $0.baseAddress) }
        if rc < 0 {
            let e = vio_rte_errno()
            throw DPDKError.ealInit(args: args, errno: e, message: String(cString: vio_rte_strerror(e)))
        }
        let r = EALReport(mode: chosen, memoryMB: memoryMB, lcoreCPUs: cpus, arguments: args, tscHz: rte_get_tsc_hz())
        report = r
        // /var/run/dpdk/<prefix> (config, mp_socket…): ours alone, since the prefix is unique.
        if let dir = rte_eal_get_runtime_dir().map({ String(cString: $0) }), dir.hasSuffix("/" + prefix) { runtimeDirectory = dir }
        return r
    }

    nonisolated(unsafe) static var runtimeDirectory: String?
    /// The strdup'ed argument strings `rte_eal_init` was given (it keeps pointers into them).
    nonisolated(unsafe) private static var ealArgv: [UnsafeMutablePointer<CChar>?] = []

    /// The worker lcores (all but the main one), in order.
    public static var workerLcores: [UInt32] {
        var out: [UInt32] = []
        var l = rte_get_next_lcore(UInt32.max, 1, 0)
        while l < UInt32(RTE_MAX_LCORE) { out.append(l); l = rte_get_next_lcore(l, 1, 0) }
        return out
    }

    /// Runs `body` on worker lcore `lcore` (`rte_eal_remote_launch`); `waitForWorkers` joins it.
    public static func launch(onWorker lcore: UInt32, _ body: @escaping () -> Void) throws {
        let ctx = Unmanaged.passRetained(LaunchedWork(body)).toOpaque()
        let rc = rte_eal_remote_launch({ arg in
            Unmanaged<LaunchedWork>.fromOpaque(arg!).takeRetainedValue().body()
            return 0
        }, ctx, lcore)
        if rc != 0 { Unmanaged<LaunchedWork>.fromOpaque(ctx).release(); throw DPDKError.launch(lcore: Int(lcore), errno: -rc) }
    }

    /// Waits until every worker lcore has finished what `launch` gave it.
    public static func waitForWorkers() { rte_eal_mp_wait_lcore() }


    nonisolated(unsafe) public private(set) static var isCleanedUp = false

    /// Releases EAL resources (hugepage files). Call once at exit; DPDK memory must not be
    /// freed afterwards (DMAMemory objects still alive then just let go of their pointer).
    public static func cleanup() {
        if report != nil && !isCleanedUp {
            isCleanedUp = true
            _ = rte_eal_cleanup()
            // DPDK leaves its runtime directory behind; one per run would pile up in /var/run.
            if let dir = runtimeDirectory { removeFlatDirectory(dir) }
        }
    }
}

private final class LaunchedWork {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

/// Removes the files in `path` (no subdirectories expected) and then the directory.
func removeFlatDirectory(_ path: String) {
    guard let d = opendir(path) else { return }
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { unlink(path + "/" + name) }
    }
    closedir(d)
    rmdir(path)
}

func readFile(_ path: String) -> String? {
    guard let f = fopen(path, "r") else { return nil }
    defer { fclose(f) }
    var out = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n <= 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}

/// The time stamp counter and its rate.
public enum TSC {
    @inlinable @inline(__always) public static func now() -> UInt64 { cvio_rdtsc() }
    public static var hz: UInt64 { EAL.current?.tscHz ?? rte_get_tsc_hz() }
}
