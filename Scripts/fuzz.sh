#!/usr/bin/env bash
# libFuzzer targets for every parser of device-written bytes (the separate package in Fuzz/).
#
#   Scripts/fuzz.sh list               the targets, one per line
#   Scripts/fuzz.sh TARGET SECONDS     build, replay Fuzz/Regressions/TARGET/*, fuzz for SECONDS
#   Scripts/fuzz.sh all SECONDS        the same for every target, SECONDS each
#
# Exit status: 0 when nothing was found; 1 when a regression input still fails or fuzzing found a
# crash, leak, timeout or out-of-memory (the input is kept, the command to reproduce it printed).
#
# Build (the incantation that works with Swift 6.3's SwiftPM):
#   swift build --package-path Fuzz -c debug -Xswiftc -sanitize=fuzzer,address
# -sanitize=fuzzer,address instruments every Swift module (the library's too) for coverage and
# ASan and links libFuzzer. Not -parse-as-library: SwiftPM renames each executable's entry point
# to `<module>_main` and aliases `main` to it at link time, which keeps libFuzzer's own `main`
# out; so each target's main.swift calls libFuzzer's driver (LLVMFuzzerRunDriver) itself, with the
# target's @_cdecl("LLVMFuzzerTestOneInput") function. The binaries are ordinary libFuzzer
# binaries: Fuzz/.build/debug/TARGET [libFuzzer flags] [corpus dirs or input files].
#
# Environment:
#   VIO_CPU_LOCK      lock shared with other heavy jobs (default /tmp/vio-cpu.lock): the build and
#                     each run hold it (flock -o, so nothing the fuzzer spawns inherits it)
#   VIO_FUZZ_CORPUS   corpus root (default Fuzz/Corpus, gitignored; corpora grow across runs)
#   VIO_FUZZ_STRICT=1 also trip the known, not yet fixed library issues (Fuzz/README.md); the
#                     regression replay always sets it
#   VIO_FUZZ_VERBOSE=1 targets say what each input did (errors thrown, steps reached)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ=$ROOT/Fuzz
LOCK=${VIO_CPU_LOCK:-/tmp/vio-cpu.lock}
CORPUS_ROOT=${VIO_FUZZ_CORPUS:-$FUZZ/Corpus}
BIN=$FUZZ/.build/debug

TARGETS=(split-used packed-used vhost-reply pci-caps net-rx blk-config-status)

# Per-target libFuzzer options: the longest input, and a dictionary where one helps.
options() {
    case "$1" in
        split-used|packed-used) echo "-max_len=1024" ;;
        vhost-reply) echo "-max_len=4096 -dict=$FUZZ/Dictionaries/vhost-reply.dict" ;;
        *) echo "-max_len=2048" ;;
    esac
}

usage() {
    echo "usage: $0 list | $0 TARGET SECONDS | $0 all SECONDS" >&2
    echo "targets: ${TARGETS[*]}" >&2
    exit 2
}

[ $# -ge 1 ] || usage
if [ "$1" = list ]; then printf '%s\n' "${TARGETS[@]}"; exit 0; fi
[ $# -eq 2 ] || usage
[[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ] || usage
SECONDS_EACH=$2
if [ "$1" = all ]; then
    SELECTED=("${TARGETS[@]}")
else
    [[ " ${TARGETS[*]} " == *" $1 "* ]] || { echo "unknown target: $1" >&2; usage; }
    SELECTED=("$1")
fi

# The Swift runtime's crash reporter hangs under ASan + libFuzzer (the targets also turn it off
# themselves); libFuzzer and ASan print the stack.
export SWIFT_BACKTRACE=enable=no
RUN=$(mktemp -d /tmp/vio-fuzz.XXXXXX)
export VIO_FUZZ_TMP=$RUN
trap 'rm -rf "$RUN"' EXIT
START=$(date +%s)

echo "== build (swift build --package-path Fuzz -c debug -Xswiftc -sanitize=fuzzer,address)"
TIMEFORMAT='%R %U %S'
# `locked STAMP cmd...`: runs cmd holding the lock; STAMP gets the time the lock was taken, so
# waiting for other jobs does not count as this script's time.
locked() {
    local stamp=$1
    shift
    flock -o "$LOCK" bash -c 'date +%s.%N > "$0"; exec "$@"' "$stamp" "$@"
}
# Seconds from the time in STAMP until now.
since() { awk -v s="$(cat "$1")" -v e="$(date +%s.%N)" 'BEGIN { printf "%.0f", e - s }'; }
{ time locked "$RUN/build.started" swift build --package-path "$FUZZ" -c debug -Xswiftc -sanitize=fuzzer,address \
    > "$RUN/build.log" 2>&1 ; } 2> "$RUN/build.time" || {
    grep -v "Cannot export local symbol" "$RUN/build.log" | tail -40
    echo "build failed" >&2
    exit 1
}
BUSY=$(since "$RUN/build.started")
read -r _ BUILD_USER BUILD_SYS < "$RUN/build.time"
echo "   built in ${BUSY}s (CPU $(awk "BEGIN { printf \"%.0f\", $BUILD_USER + $BUILD_SYS }")s)"

FAILED=()
SUMMARY=()

# Prints what a failing run said: the trap message or sanitizer error and the top frames.
explain() {
    grep -E "Fatal error|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|SUMMARY:|Test unit written" "$1" | head -6 | sed 's/^/     /'
    grep -E "^ +#[0-9]+ 0x[0-9a-f]+ in " "$1" \
        | grep -vE "__sanitizer|fuzzer::|libswiftCore|_assertionFailure|FuzzSupport9invariant|libc\.so|_start|runLibFuzzer|_main |<compiler-generated>" \
        | head -8 | sed -E 's/^ +#[0-9]+ 0x[0-9a-f]+ in /       at /'
}

for t in "${SELECTED[@]}"; do
    bin=$BIN/$t
    out=$RUN/$t
    mkdir -p "$out" "$CORPUS_ROOT/$t"
    status=ok
    # 1. Past crashers first: each must pass (with the known-issue checks on).
    regressions=0
    regfail=0
    if [ -d "$FUZZ/Regressions/$t" ]; then
        for f in "$FUZZ/Regressions/$t"/*; do
            [ -f "$f" ] || continue
            regressions=$((regressions + 1))
            if ! VIO_FUZZ_STRICT=1 locked "$out/replay.started" timeout -k 5 120 "$bin" -rss_limit_mb=2048 -timeout=30 "$f" > "$out/replay.log" 2>&1; then
                regfail=$((regfail + 1))
                echo "!! $t: regression input still fails: ${f#$ROOT/}"
                explain "$out/replay.log"
                echo "     reproduce: VIO_FUZZ_STRICT=1 Fuzz/.build/debug/$t ${f#$ROOT/}"
            fi
            BUSY=$((BUSY + $(since "$out/replay.started")))
        done
    fi
    [ "$regfail" -eq 0 ] || status=regression
    # 2. Fuzz: the persistent corpus (new inputs go there) plus the checked-in seeds.
    echo "== $t: $regressions regression input(s) replayed, $regfail failing; fuzzing ${SECONDS_EACH}s"
    seeds=()
    [ -d "$FUZZ/Seeds/$t" ] && seeds=("$FUZZ/Seeds/$t")
    # shellcheck disable=SC2046
    { time locked "$out/fuzz.started" timeout -k 10 $((SECONDS_EACH + 120)) "$bin" \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -len_control=10 -print_final_stats=1 \
        $(options "$t") -artifact_prefix="$out/" "$CORPUS_ROOT/$t" "${seeds[@]}" > "$out/fuzz.log" 2>&1 ; } 2> "$out/time" \
        && rc=0 || rc=$?
    wall=$(since "$out/fuzz.started")
    BUSY=$((BUSY + wall))
    read -r _ user sys < "$out/time"
    cpu=$(awk "BEGIN { printf \"%.1f\", $user + $sys }")
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/fuzz.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out/fuzz.log" | tail -1)
    artifacts=$(find "$out" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | sort)
    if [ "$rc" -ne 0 ] || [ -n "$artifacts" ]; then
        status=FOUND
        echo "!! $t: fuzzing stopped with status $rc"
        explain "$out/fuzz.log"
        keep=$FUZZ/Crashes/$t
        mkdir -p "$keep"
        for a in $artifacts; do
            cp "$a" "$keep/"
            echo "     input kept: Fuzz/Crashes/$t/$(basename "$a")"
            echo "     reproduce:  Fuzz/.build/debug/$t Fuzz/Crashes/$t/$(basename "$a")"
            echo "     (a library crasher goes to Fuzz/Regressions/$t/crash-<short-name> once understood)"
        done
        cp "$out/fuzz.log" "$keep/last-run.log"
    fi
    [ "$status" = ok ] || FAILED+=("$t")
    SUMMARY+=("$(printf '%-18s %-10s %10s %8s %8s %7s' "$t" "$status" "${execs:-?}" "${rate:-?}" "$cpu" "$wall")")
done

echo
echo "== summary (${SECONDS_EACH}s per target; CPU-s = user + system seconds of the fuzzer; wall-s = its run, lock held)"
printf '%-18s %-10s %10s %8s %8s %7s\n' target result execs exec/s CPU-s wall-s
printf '%s\n' "${SUMMARY[@]}"
echo "total ${BUSY}s holding $LOCK (build included); $(( $(date +%s) - START ))s wall, waiting for the lock included"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed: ${FAILED[*]}"
    exit 1
fi
