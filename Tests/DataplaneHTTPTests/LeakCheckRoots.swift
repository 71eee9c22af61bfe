import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// For LeakSanitizer runs of the test bundle (Scripts/sanitize.sh; a no-op otherwise).
///
/// swift-corelibs-xctest keeps every test it ran in a retain cycle (`XCTest.testRun` holds the
/// `XCTestRun`, whose `test` holds the test back), so at exit LeakSanitizer would report each
/// test case, and everything its properties and teardown blocks hold, as leaked: thousands of
/// "indirect leaks" that are XCTest's, hiding any that are ours. When a suite finishes, this
/// marks the suite and every test in it with `__lsan_ignore_object`: LeakSanitizer then treats
/// them as roots, and what it still reports at exit is memory nothing reachable holds.
/// The test bundle is one process for every test target, so one observer covers all of them.
final class LeakCheckRoots: XCTestObservation {
    /// Adds the observer once (from a test class's `setUp()`); later calls do nothing.
    static let install: Void = {
        if let ignore = LeakCheckRoots.ignoreObject { XCTestObservationCenter.shared.addTestObserver(LeakCheckRoots(ignore)) }
    }()

    typealias IgnoreObject = @convention(c) (UnsafeRawPointer?) -> Void
    /// `__lsan_ignore_object` when the process runs under LeakSanitizer (found at run time, so
    /// builds without a sanitizer still link).
    static let ignoreObject: IgnoreObject? = dlsym(nil, "__lsan_ignore_object").map { unsafeBitCast($0, to: IgnoreObject.self) }

    let ignore: IgnoreObject
    init(_ ignore: @escaping IgnoreObject) { self.ignore = ignore }

    func testSuiteDidFinish(_ testSuite: XCTestSuite) { mark(testSuite) }

    func mark(_ test: XCTest) {
        ignore(Unmanaged.passUnretained(test).toOpaque())
        if let suite = test as? XCTestSuite { suite.tests.forEach(mark) }
    }
}
