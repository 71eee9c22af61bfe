#!/usr/bin/env bash
# Runs swift-virtio's tests under AddressSanitizer (with LeakSanitizer) and ThreadSanitizer,
# prints what ran and what each sanitizer said, and exits non-zero on any sanitizer report, test
# failure or skipped test. Needs what Scripts/setup.sh installs (DPDK, lwIP, testpmd, curl, wrk,
# python3, iproute2) and root (the HTTP tests make network namespaces). On 2 cores: about 5
# minutes of work from clean scratch paths (the two builds are 1.5 and 1 minute of it; SwiftPM
# fetches the dependencies, or takes them from its cache), about 2.5 once they are warm, plus any
# wait for the lock.
#
#   (a) AddressSanitizer (.build-asan), two test processes:
#       1. VirtioCoreTests (device-model tests), VhostUserTests, VirtioBlkTests, VirtioNetTests,
#          DataplaneHTTPTests, with LeakSanitizer at the exit of the test process.
#       2. IntegrationTests.HTTPIntegrationTests, which run the ASan build of `vio httpd`
#          (NetStack: lwIP + the virtio-net driver, the HTTP server) as a child process: ASan in
#          vio and in the harness, LeakSanitizer at the exit of every vio (not of the harness:
#          see below). No test runs a NetStack in the test process itself; it needs a vhost-user
#          device and clients, which only the HTTP integration tests set up (TAP bridge, netns).
#   (b) ThreadSanitizer (.build-tsan): `vio httpd` built with -sanitize=thread, where lwIP's
#       tcpip thread (timers: retransmits, delayed ACKs, ARP, keep-alive, through the glue's
#       callbacks and linkoutput) and the dataplane lcore (NetStack.poll) share the stack under
#       lwIP's core lock. HTTPIntegrationTests run against it (VIO_BINARY, see Harness.swift);
#       the harness is the ASan test bundle of (a).
#
# Reports are kept under .build-sanitize/logs (log_path files: TOOL.EXECUTABLE.PID, one per
# sanitized process; and each step's output).
#
# Notes, checked on this machine (DPDK 22.11, Swift 6.3.1):
#   - DPDK under the sanitizers: EAL starts unchanged under both, with hugepages (the HTTP tests'
#     `--memory auto`) and with --no-huge (the in-process EAL of the unit tests). DPDK's default
#     base address (0x100000000) is only a hint: under ASan it falls in the shadow gap, the
#     kernel places the memory elsewhere and EAL accepts that. No --base-virtaddr is needed.
#   - LeakSanitizer in the XCTest process: swift-corelibs-xctest keeps every test case in a
#     retain cycle, which LSan would report as leaks of everything the tests hold; the test
#     bundle marks them as roots instead (Tests/DataplaneHTTPTests/LeakCheckRoots.swift, installed
#     by RouterTests, so DataplaneHTTPTests must be in run a.1). Configs/sanitizers/lsan.supp
#     holds the one leak that is XCTest's own.
#   - No LeakSanitizer in the harness of the HTTP tests (run a.2 and b): there it reports only
#     the toolchain's Foundation: every `Data` the tests hold is "leaked" (LSan does not see the
#     reference inside Foundation's Data), reading an empty file with String(contentsOfFile:) or
#     FileManager.contents(atPath:) leaks a 4 KiB buffer, Process.run leaks a weak-reference side
#     table. Each reproduces in a three-line program. The options file for the harness binary
#     only (ASAN_OPTIONS include_if_exists=…/%b) turns its leak check off; vio keeps its own.
#   - ThreadSanitizer and the `vio` module: Swift 6.3.1 crashes ("Invalid bitcast … Broken module
#     found") compiling, with -sanitize=thread, a mutating method of a ~Copyable struct that calls
#     a mutating method through a stored UnsafeMutablePointer's subscript (`queues[q].write(…)`).
#     Sources/vio/BlkJob.swift reads the pointer into a local first, which the compiler takes;
#     keep it that way, or this build fails.
#   - DPDK's and lwIP's own libraries are not instrumented (Debian's builds): TSan sees their
#     locks (pthread, intercepted) but not their memory accesses; ASan sees their malloc/free.
#
# Environment:
#   VIO_CPU_LOCK=/tmp/vio-cpu.lock   every build and test run holds it (flock), one heavy job at once
#   VIO_SANITIZE_ONLY=asan|tsan      run one half only
#   VIO_SANITIZE_UNIT_FILTER=REGEX   replaces run a.1's filter (keep DataplaneHTTPTests in it)
#   VIO_SANITIZE_ALLOW_SKIPS=1       skipped tests do not fail the run (e.g. no root)
#   VIO_SANITIZE_STEP_TIMEOUT=600    seconds any one build or test step may take (once it has the lock)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
lock=${VIO_CPU_LOCK:-/tmp/vio-cpu.lock}
only=${VIO_SANITIZE_ONLY:-all}
step_timeout=${VIO_SANITIZE_STEP_TIMEOUT:-600}
asan_scratch=$root/.build-asan
tsan_scratch=$root/.build-tsan
out=$root/.build-sanitize
logs=$out/logs
unit_filter=${VIO_SANITIZE_UNIT_FILTER:-'^(VirtioCoreTests|VhostUserTests|VirtioBlkTests|VirtioNetTests|DataplaneHTTPTests)\.'}
http_filter='^IntegrationTests\.HTTPIntegrationTests'
lsan_supp=$root/Configs/sanitizers/lsan.supp
tsan_supp=$root/Configs/sanitizers/tsan.supp
harness=swift-virtioPackageTests.xctest

rm -rf "$logs"
mkdir -p "$logs"/asan-unit "$logs"/asan-http "$logs"/tsan "$logs"/tsan-harness "$out/options"
# Sanitizer options for one binary (include_if_exists=$out/options/%b): the HTTP tests' harness.
echo "detect_leaks=0" >"$out/options/$harness"
started=$(date +%s)
summary=()
failed=0
waited=0

note() { summary+=("$*"); }
fail() { summary+=("FAIL: $*"); failed=1; }

# One heavy job at a time on this machine: every build and test run holds the lock. `ran` is
# how long the step ran once it had the lock, `waited` how long it waited for it.
heavy() {
  local t0 stamp rc; t0=$(date +%s); stamp=$(mktemp)
  flock "$lock" bash -c 'date +%s >"$0"; exec timeout -k 10 "$1" "${@:2}"' "$stamp" "$step_timeout" "$@"
  rc=$?
  local got; got=$(cat "$stamp" 2>/dev/null); got=${got:-$t0}; rm -f "$stamp"
  waited=$((got - t0)); ran=$(( $(date +%s) - got ))
  return $rc
}
timing() { if [ "$waited" -gt 5 ]; then echo "${ran}s, after ${waited}s waiting for $lock"; else echo "${ran}s"; fi; }

# build NAME LOG ARGS…: a swift build; on failure its last lines.
build() {
  local name=$1 log=$2; shift 2
  echo "== $name: swift build $*"
  if heavy swift build "$@" >"$log" 2>&1; then
    note "$name: built in $(timing)"
    return 0
  fi
  grep -v "Cannot export local symbol" "$log" | grep -E "error:|Compiling|Linking" | tail -20
  fail "$name: build failed after $(timing) (log: $log)"
  return 1
}

# tests NAME LOG REPORTS ARGS…: swift test (already built); counts from XCTest's last summary
# line; REPORTS is the step's log_path directory.
tests() {
  local name=$1 log=$2 rdir=$3; shift 3
  echo "== $name: swift test $*"
  heavy swift test "$@" >"$log" 2>&1
  local rc=$?
  local line; line=$(grep -E "Executed [0-9]+ tests?" "$log" | tail -1 | sed 's/^[[:space:]]*//')
  local skipped; skipped=$(grep -cE "^Test Case '.*' skipped" "$log")
  local failures; failures=$(grep -E "^Test Case '.*' failed" "$log" | sed -E "s/^Test Case '([^']*)'.*/\1/")
  note "$name: ${line:-no XCTest summary (the test process died?)} [exit $rc, $(timing)]"
  local suites; suites=$(grep -E "^Test Suite '.*' (passed|failed)" "$log" | sed -E "s/^Test Suite '([^']*)'.*/\1/" \
    | grep -vE "^(Selected tests|All tests|.*\.xctest)$" | sort -u | tr '\n' ' ')
  note "    suites: ${suites:-none}"
  if [ -n "$failures" ]; then
    fail "$name: failed tests: $(echo "$failures" | tr '\n' ' ')"
    grep -E "error: " "$log" | head -20 | cut -c1-400
  fi
  if [ "$skipped" -gt 0 ]; then
    local names; names=$(grep -E "^Test Case '.*' skipped" "$log" | sed -E "s/^Test Case '([^']*)'.*/\1/" | tr '\n' ' ')
    if [ "${VIO_SANITIZE_ALLOW_SKIPS:-0}" = 1 ]; then note "$name: $skipped skipped: $names"
    else fail "$name: $skipped skipped (nothing checked there; VIO_SANITIZE_ALLOW_SKIPS=1 to accept): $names"; fi
  fi
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then fail "$name: hit the ${step_timeout}s time limit"
  elif [ -z "$line" ]; then fail "$name: the test process did not finish, exit $rc (log: $log)"
  elif [ "$rc" -ne 0 ] && [ -z "$failures" ]; then
    # A sanitizer at exit (its report is listed below) or a crash after the last test.
    note "$name: exit status $rc without a failed test (a sanitizer report at exit?)"
    [ -z "$(ls "$rdir")" ] && fail "$name: exit status $rc and no sanitizer report"
  fi
  return 0
}

# reports DIR KIND: every sanitizer report in DIR's log_path files, summarised.
reports() {
  local dir=$1 kind=$2 n=0 f
  for f in "$dir"/*; do
    [ -f "$f" ] || continue
    grep -qE "ERROR: (AddressSanitizer|LeakSanitizer)|WARNING: ThreadSanitizer|ERROR: ThreadSanitizer" "$f" || continue
    n=$((n + 1))
    fail "$kind report in $(basename "$f"):"
    while read -r l; do summary+=("        $l"); done < <(grep -E "^SUMMARY: " "$f" | sort | uniq -c | head -20)
    echo "---- $f"; head -c 12000 "$f"; echo
  done
  # Which suppressions matched (print_suppressions), so a suppression never hides silently.
  local used; used=$(cat "$dir"/* 2>/dev/null | grep -A50 "Suppressions used:" | grep -E "^ +[0-9]+ +[0-9]+ +" | awk '{$1=$1};1' | sort | uniq -c)
  [ -n "$used" ] && note "$kind: suppressions used (processes: count bytes pattern): $(echo "$used" | awk '{$1=$1};1' | tr '\n' ';')"
  [ "$n" -eq 0 ] && note "$kind: no reports ($(ls "$dir" | wc -l) process log file(s))"
  return 0
}

asan_built=0
# ---------------------------------------------------------------- (a) AddressSanitizer
if [ "$only" = all ] || [ "$only" = asan ]; then
  if build "ASan build" "$logs/asan-build.log" --build-tests --sanitize=address --scratch-path "$asan_scratch"; then
    asan_built=1
    # log_path: every sanitized process writes its report to its own file. LSan runs at the
    # exit of each process.
    ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:log_path=$logs/asan-unit/asan:log_exe_name=1:print_suppressions=1" \
    LSAN_OPTIONS="suppressions=$lsan_supp:print_suppressions=1" \
      tests "ASan unit tests" "$logs/asan-unit.log" "$logs/asan-unit" --skip-build --sanitize=address --scratch-path "$asan_scratch" \
        --disable-swift-testing --filter "$unit_filter"
    reports "$logs/asan-unit" "ASan/LSan (unit tests)"

    ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:log_path=$logs/asan-http/asan:log_exe_name=1:print_suppressions=1:include_if_exists=$out/options/%b" \
    LSAN_OPTIONS="suppressions=$lsan_supp:print_suppressions=1" \
      tests "ASan vio httpd (HTTPIntegrationTests)" "$logs/asan-http.log" "$logs/asan-http" --skip-build --sanitize=address \
        --scratch-path "$asan_scratch" --disable-swift-testing --filter "$http_filter"
    reports "$logs/asan-http" "ASan/LSan (vio httpd and harness)"
  fi
fi

# ---------------------------------------------------------------- (b) ThreadSanitizer
if [ "$only" = all ] || [ "$only" = tsan ]; then
  if build "TSan build (vio)" "$logs/tsan-build.log" --product vio --sanitize=thread --scratch-path "$tsan_scratch"; then
    vio_bin=$tsan_scratch/debug/vio
    if ! "$vio_bin" --help >/dev/null 2>&1 || ! grep -q " T __tsan_init$" < <(nm "$vio_bin" 2>/dev/null); then
      fail "TSan build: $vio_bin is not a working ThreadSanitizer binary"
    else
      # The harness is the ASan test bundle of (a); built here when (a) did not run.
      if [ "$asan_built" = 1 ] || build "ASan build (harness)" "$logs/asan-build.log" --build-tests --sanitize=address --scratch-path "$asan_scratch"; then
        VIO_BINARY="$vio_bin" \
        TSAN_OPTIONS="halt_on_error=0:history_size=4:second_deadlock_stack=1:log_path=$logs/tsan/tsan:log_exe_name=1:suppressions=$tsan_supp:print_suppressions=1" \
        ASAN_OPTIONS="detect_leaks=0:log_path=$logs/tsan-harness/asan:log_exe_name=1" \
          tests "TSan vio httpd (HTTPIntegrationTests)" "$logs/tsan-http.log" "$logs/tsan" --skip-build --sanitize=address \
            --scratch-path "$asan_scratch" --disable-swift-testing --filter "$http_filter"
        reports "$logs/tsan" "TSan (vio httpd)"
        reports "$logs/tsan-harness" "ASan (harness of the TSan run)"
      fi
    fi
  fi
fi

echo
echo "================ sanitize.sh summary ($(( $(date +%s) - started ))s total, including any wait for $lock)"
for l in "${summary[@]}"; do echo "  $l"; done
echo "  logs: $logs"
if [ "$failed" -ne 0 ]; then echo "sanitize.sh: FAILED"; exit 1; fi
echo "sanitize.sh: OK"
