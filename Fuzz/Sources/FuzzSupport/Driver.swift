import CFuzzShim
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Runs libFuzzer on `body` with the process's arguments (what libFuzzer's own `main` does) and
/// exits with its status. `body` is the target's `LLVMFuzzerTestOneInput`. The library's logs
/// (a warning per hostile input) are dropped unless `VIO_FUZZ_LOG` is set.
public func runLibFuzzer(_ body: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32) -> Never {
    // The Swift runtime's crash reporter (swift-backtrace) does not get along with ASan and
    // libFuzzer's handlers: it can hang, holding whatever the fuzzer inherited (flock). Off,
    // libFuzzer and ASan print the stack themselves. The runtime reads the variable at start-up,
    // hence the re-exec.
    if getenv("SWIFT_BACKTRACE") == nil {
        setenv("SWIFT_BACKTRACE", "enable=no", 1)
        execv("/proc/self/exe", CommandLine.unsafeArgv)
        fatalError("re-exec with SWIFT_BACKTRACE=enable=no failed: errno \(errno)")
    }
    if getenv("VIO_FUZZ_LOG") == nil { LoggingSystem.bootstrap { _ in SwiftLogNoOpLogHandler() } }
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    let rc = LLVMFuzzerRunDriver(&argc, &argv, body)
    exit(rc)
}

/// A pointer to read from when libFuzzer hands over an empty input without one.
public let emptyInput: UnsafePointer<UInt8> = {
    let p = UnsafeMutablePointer<UInt8>.allocate(capacity: 1)
    p.initialize(to: 0)
    return UnsafePointer(p)
}()

/// `VIO_FUZZ_VERBOSE=1`: targets say what each input did (for checking seeds and crashers).
public let fuzzVerbose = getenv("VIO_FUZZ_VERBOSE") != nil

public func verbose(_ message: @autoclosure () -> String) {
    if fuzzVerbose { print(message()) }
}

/// `VIO_FUZZ_STRICT=1`: also check what known, not yet fixed library issues would trip
/// (Fuzz/README.md lists them), so a fix can be confirmed.
public let strict = getenv("VIO_FUZZ_STRICT") != nil
