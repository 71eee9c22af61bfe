import DPDK
#if canImport(Glibc)
import Glibc
#endif

/// DPDK's EAL once per test process (every test target shares the one xctest process), with
/// --no-huge memory: rings, slabs and mbuf pools of in-process device tests are DPDK memory.
/// Cleaned up at exit, so its runtime directory goes with the process.
public enum InProcessEAL {
    static let ready: Result<Void, Error> = Result {
        _ = try EAL.initialize(mode: .nohuge, memoryMB: 128, filePrefix: "vio-unit-\(getpid())")
        atexit { EAL.cleanup() }
    }

    /// Throws (for XCTSkip) when the EAL cannot start here.
    public static func require() throws {
        if case .failure(let e) = ready { throw e }
    }

    nonisolated(unsafe) static var pools: [Int: PacketPool] = [:]
    /// The process's mbuf pool of `count` mbufs (DPDK pools live as long as the process, so tests
    /// share them; each test leaves every mbuf back in the pool, and checks it).
    public static func pool(count: Int = 2048) throws -> PacketPool {
        if let p = pools[count] { return p }
        let p = try PacketPool(name: "unit_pool_\(count)", count: count, cacheSize: 0)
        pools[count] = p
        return p
    }
}
