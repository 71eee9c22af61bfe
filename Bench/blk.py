#!/usr/bin/env python3
"""virtio-blk benchmark: `vio blkbench` against qemu-storage-daemon (null-co), daemon on CPU 0,
driver on CPU 1. Jobs: 4 KiB randread at QD 1, 32 and 128, 4 KiB randwrite at QD 32, 128 KiB
sequential read at QD 8 (or those given with --jobs rw:bs:qd,...). Each job runs --rounds times (the
VM's speed is bimodal); every blkbench run gets a fresh qemu-storage-daemon (started, used once,
stopped, its socket removed). The table shows the median IOPS round with its MiB/s and latency
percentiles, and:

- driver instr/IO, runtime calls/IO: the driver's instructions per I/O from callgrind (everything
  under VirtioBlkQueue's submit/poll/commit, i.e. the blk driver and the shared queue core, on
  --no-huge memory as valgrind needs), and its calls into the Swift runtime and malloc/free.
- device CPU %: the busiest qemu-storage-daemon thread's CPU time (utime+stime from
  /proc/PID/task/*/stat) as a share of wall time, sampled from ramp + 0.5 s after blkbench was
  launched to 0.5 s before its runtime ends (an approximation of the measuring window; median over
  rounds). 100 % means the device is the bottleneck.
- I/Os per kick: (reads + writes) / notifications of the median run. reads + writes count only the
  measuring window while notifications (kicks sent to the device) count the whole run, ramp
  included, so this is an approximation that under-states the true ratio somewhat; "–" when the
  binary reports no notifications (older builds) or sent none.
- device instr/IO: instructions the device spends per I/O, from one run of qemu-storage-daemon under
  callgrind per job (on CPU 0; blkbench runs normally on CPU 1, --ramp-time 0s and no --runtime, so
  it does a fixed number of I/Os: --size 16384 x bs, at most 1g, i.e. 64m = 16384 I/Os for 4 KiB
  jobs and 1g = 8192 I/Os for 128 KiB; each such run takes a few seconds, blkbench itself about
  1 s). (total Ir - startup Ir) / (reads + writes), where startup Ir is a daemon under callgrind
  started and stopped (SIGTERM) with nothing connecting, measured once per bench invocation; what
  remains includes the vhost-user connection set-up and teardown, amortised over the I/Os (small:
  16m and 64m runs give the same figure within 1 %). Valgrind counts every iteration of a `rep
  stosb` as one instruction, and glibc's memset uses `rep stosb` from 2 KiB, so null-co's
  read-zeroes memset alone would count one instruction per byte (~4,100 of ~6,900 per 4 KiB read,
  ~131,000 per 128 KiB read); the callgrind daemons therefore run with GLIBC_TUNABLES raising
  glibc.cpu.x86_rep_stosb_threshold (and _movsb_) out of reach, so memset takes its AVX2 loop
  (~240 instructions per 4 KiB) and the figure reflects the work done rather than the byte count.
- device instr/IO, SPDK's ring use: the same callgrind measurement for requests laid out and
  published the way SPDK 24.05's initiator does it (this build with --device-reference, default
  "--no-indirect --queue-size 512 --no-poll-pacing": three descriptors per 4 KiB request in a ring
  of 512, no indirect tables, the used index polled all the time). The issue measured SPDK's own
  requests and ours with `--no-indirect --queue-size 512` at the same count (2.63 K), so this
  stands in for SPDK's requests in the same run and by the same method; "ratio" divides this
  build's device instr/IO by it. With --against the other build's device instr/IO is measured too.
- vs SPDK table: this build's median IOPS / SPDK 24.05's median from the issue's table (SPDK_2405
  below: measured on this VM type in an earlier run, not in this run; no figure for read 128k QD8).

With --against OTHER_VIO the other build runs alternately with this one each round (a fresh daemon
per run; odd rounds run the other build first), and a second table gives both medians, the ratio of
medians, the median of the per-round pair ratios (this round's IOPS / the other build's IOPS in the
same round, more robust on this noisy VM) and their geometric mean with a 95 % interval (mean of the
log ratios ± 2 standard errors): an interval that contains 1.00 means the run cannot tell the builds
apart. To compare one build's settings, use blkbench --alternate instead (both in one process). --extra / --against-extra pass extra blkbench arguments to this build's / the other build's
runs (use --extra=--no-indirect for a single option starting with "--").

Writes Bench/results/blk-latest.json and Bench/results/blk-latest.png (matplotlib, installed with
pip if missing; skipped with a message if that fails) and, unless --no-record, appends a dated
entry with the exact command to Bench/RESULTS.md.
"""
import argparse, json, math, os, re, shlex, shutil, signal, statistics, subprocess, sys, tempfile, time
from datetime import datetime, timezone

from plotting import pyplot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIO = os.path.join(ROOT, ".build/release/vio")
JOBS = [("randread", "4k", 1), ("randread", "4k", 32), ("randread", "4k", 128), ("randwrite", "4k", 32), ("read", "128k", 8)]
RAMP = 1  # seconds of --ramp-time for the measured runs

# SPDK 24.05's median IOPS against the same qemu-storage-daemon null-co export, from the table in
# the issue: measured on this VM type in an earlier run, NOT in this run, so a yardstick only.
# No figure for read 128k QD8.
SPDK_2405 = {("randread", "4k", 1): 229000, ("randread", "4k", 32): 1200000, ("randread", "4k", 128): 1200000,
             ("randwrite", "4k", 32): 1080000}
SPDK_LABEL = "SPDK 24.05 (issue table, other run)"

# The device callgrind runs do 16384 I/Os (--size 16384 x bs), at most 1 GiB of the device (8192
# I/Os of 128 KiB). Their daemon runs with memset/memcpy kept off `rep stosb`/`rep movsb`, which
# valgrind counts one instruction per iteration (see the docstring).
CALLGRIND_IOS, CALLGRIND_MAX_SIZE = 16384, 1 << 30
# SPDK 24.05's ring use (the issue): 3 direct descriptors per 4 KiB request, a ring of 512, no
# indirect tables, completions polled continually.
REFERENCE = "--no-indirect --queue-size 512 --no-poll-pacing"
CALLGRIND_ENV = {"GLIBC_TUNABLES": "glibc.cpu.x86_rep_stosb_threshold=0xffffffffffffffff:"
                                   "glibc.cpu.x86_rep_movsb_threshold=0xffffffffffffffff"}


def size_bytes(s):
    m = re.fullmatch(r"(\d+)([kmg]?)", s.strip().lower())
    if not m:
        sys.exit(f"blk bench: bad size {s!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2)]


class Daemon:
    """A fresh qemu-storage-daemon on CPU 0, optionally under callgrind. Use as a context manager:
    on exit it is stopped (SIGTERM, wait, SIGKILL if needed) and its socket removed."""

    def __init__(self, workdir, iothread, callgrind_out=None):
        self.sock = os.path.join(workdir, "blk.sock")
        self.callgrind_out = callgrind_out
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        export = f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={self.sock},writable=on,num-queues=1"
        cmd = ["taskset", "-c", "0"]
        env = None
        if callgrind_out:
            cmd += ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind_out}"]
            env = dict(os.environ, **CALLGRIND_ENV)
        cmd += ["qemu-storage-daemon"]
        if iothread:
            cmd += ["--object", "iothread,id=iot0"]
            export += ",iothread=iot0"
        cmd += ["--blockdev", f"driver=null-co,node-name=disk0,size={8 << 30},read-zeroes=on", "--export", export]
        self.log = os.path.join(workdir, "qsd.log")
        with open(self.log, "w") as log:
            # taskset and valgrind exec in place: the pid is the daemon's.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + (60 if callgrind_out else 15)
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit("blk bench: qemu-storage-daemon did not start:\n" + tail(self.log))
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        """SIGTERM, wait (60 s under callgrind, which writes its file at exit; 10 s otherwise),
        SIGKILL if still there. The daemon's handler only sets a flag its main loop checks between
        polls, so a SIGTERM that lands just before the loop blocks is not seen until the next event
        (under valgrind that window is wide and an idle daemon then never exits): resend it every
        2 s. Returns True if the daemon exited by itself (not killed)."""
        clean = True
        deadline = time.monotonic() + (60 if self.callgrind_out else 10)
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                clean = False
                self.proc.kill()
                self.proc.wait()
                break
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        return clean


def tail(path, n=15):
    try:
        return "".join(open(path, errors="replace").readlines()[-n:])
    except OSError:
        return ""


def thread_ticks(pid):
    """{tid: utime + stime in clock ticks} for every thread of pid."""
    ticks = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except FileNotFoundError:
        return ticks
    for tid in tids:
        try:
            stat = open(f"{base}/{tid}/stat").read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
        ticks[tid] = int(fields[14 - 3]) + int(fields[15 - 3])
    return ticks


def busiest_share(before, after, wall):
    """The busiest thread's CPU share of wall seconds, in percent."""
    hz = os.sysconf("SC_CLK_TCK")
    deltas = [t - before.get(tid, 0) for tid, t in after.items()]
    return 100.0 * max(deltas, default=0) / hz / wall if wall > 0 else None


def blkbench_args(binary, sock, rw, bs, qd, memory, out, extra):
    return (["taskset", "-c", "1", binary, "blkbench", "--dev", f"vhost-user-blk:{sock}", "--rw", rw, "--bs", bs,
             "--iodepth", str(qd), "--memory", memory, "--json", out] + extra)


def run(rw, bs, qd, seconds, workdir, memory, iothread, binary, extra):
    """One measured blkbench run against a fresh daemon; the report with device_cpu_pct added."""
    out = os.path.join(workdir, "r.json")
    if os.path.exists(out):
        os.unlink(out)
    log = os.path.join(workdir, "vio.log")
    with Daemon(workdir, iothread) as d:
        args = blkbench_args(binary, d.sock, rw, bs, qd, memory, out, ["--runtime", f"{seconds}s", "--ramp-time", f"{RAMP}s"] + extra)
        # Sample the daemon's threads over [ramp + 0.5 s, runtime - 0.5 s] after the launch: the
        # measuring window, give or take blkbench's start-up.
        window = seconds - 1 if seconds >= 2 else seconds / 2
        with open(log, "w") as lf:
            p = subprocess.Popen(args, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                time.sleep(RAMP + 0.5)
                t0, before = time.monotonic(), thread_ticks(d.proc.pid)
                time.sleep(window)
                t1, after = time.monotonic(), thread_ticks(d.proc.pid)
                rc = p.wait(timeout=seconds + 60)
            except BaseException:
                p.kill()
                p.wait()
                raise
    try:
        rep = json.load(open(out))
    except (OSError, ValueError):
        sys.exit(f"blk bench: {binary} blkbench {rw} {bs} QD{qd} failed (exit {rc}):\n" + tail(log))
    rep["device_cpu_pct"] = busiest_share(before, after, t1 - t0) if p.returncode == 0 else None
    return rep


def callgrind_ir(path):
    """Total Ir of a callgrind output file (its totals: or summary: line)."""
    events, total = ["Ir"], None
    for line in open(path, errors="replace"):
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("totals:", "summary:")):
            vals = [int(v) for v in line.split()[1:]]
            total = vals[events.index("Ir")] if "Ir" in events and len(vals) > events.index("Ir") else sum(vals)
            if line.startswith("totals:"):
                break
    return total


def startup_ir(workdir, iothread):
    """Ir of a daemon under callgrind that starts, exports its socket, and is stopped unused."""
    cg = os.path.join(workdir, "cg-startup.out")
    d = Daemon(workdir, iothread, callgrind_out=cg)
    time.sleep(0.5)  # let it reach its idle poll
    clean = d.stop()
    if not clean or not os.path.exists(cg):
        print(f"blk bench: the startup callgrind daemon {'was killed' if not clean else 'wrote no ' + cg}; "
              "no device instr/IO\n" + tail(d.log), file=sys.stderr)
        return None
    ir = callgrind_ir(cg)
    os.unlink(cg)
    return ir


def device_instructions(rw, bs, qd, workdir, memory, iothread, binary, extra, base_ir):
    """Device (qemu-storage-daemon) instructions per I/O: daemon under callgrind, blkbench normally
    for a fixed number of I/Os (--size, no --runtime, --ramp-time 0s)."""
    if base_ir is None:
        return None, None
    cg = os.path.join(workdir, "cg-device.out")
    out = os.path.join(workdir, "d.json")
    log = os.path.join(workdir, "vio-device.log")
    for f in (cg, out):
        if os.path.exists(f):
            os.unlink(f)
    n = min(CALLGRIND_IOS * size_bytes(bs), CALLGRIND_MAX_SIZE)
    size = f"{n >> 20}m" if n % (1 << 20) == 0 else f"{n >> 10}k"
    t = time.monotonic()
    d = Daemon(workdir, iothread, callgrind_out=cg)
    try:
        with open(log, "w") as lf:
            r = subprocess.run(blkbench_args(binary, d.sock, rw, bs, qd, memory, out, ["--size", size, "--ramp-time", "0s"] + extra),
                               stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300)
    finally:
        clean = d.stop()
    try:
        rep = json.load(open(out))
        ios = rep["reads"] + rep["writes"]
    except (OSError, ValueError, KeyError):
        print(f"blk bench: device callgrind run failed (exit {r.returncode}):\n" + tail(log), file=sys.stderr)
        return None, None
    if r.returncode != 0 or not ios or not clean or not os.path.exists(cg):
        print("blk bench: device callgrind run incomplete; no device instr/IO", file=sys.stderr)
        return None, None
    ir = callgrind_ir(cg)
    os.unlink(cg)
    print(f"  device callgrind: {rw} {bs} QD{qd}, --size {size}, {ios} I/Os, {ir:,} Ir (startup {base_ir:,}), "
          f"{time.monotonic() - t:.0f} s", flush=True)
    return (ir - base_ir) / ios, ios


def instructions(rw, bs, qd, workdir, iothread, binary, extra):
    """Driver instructions and runtime calls per I/O, from callgrind's call graph."""
    nodebug = os.path.join(workdir, "vio.nodebug")
    if not os.path.exists(nodebug):
        subprocess.run(["cp", binary, nodebug], check=True)
        subprocess.run(["strip", "--strip-debug", nodebug], check=True)
    out = os.path.join(workdir, "cg.json")
    cg = os.path.join(workdir, "cg.out")
    for f in (cg, out):
        if os.path.exists(f):
            os.unlink(f)
    with Daemon(workdir, iothread) as d:
        r = subprocess.run(["taskset", "-c", "1", "valgrind", "--tool=callgrind", f"--callgrind-out-file={cg}",
                            nodebug, "blkbench", "--dev", f"vhost-user-blk:{d.sock}", "--rw", rw, "--bs", bs, "--iodepth", str(qd),
                            "--runtime", "5s", "--memory", "nohuge", "--memory-mb", "128", "--json", out] + extra,
                           capture_output=True, text=True, timeout=900)
    try:
        rep = json.load(open(out))
        ios = rep["reads"] + rep["writes"]
    except Exception:
        return None, None
    if r.returncode != 0 or not ios:
        return None, None
    ins, rt = driver_cost(cg)
    os.unlink(cg)
    return ins / ios, rt / ios


# The driver's entry points: VirtioBlkQueue<Ring>'s submit, poll and commit, specialised for the
# ring layout (they do not call each other); also the names of the non-generic queue before it.
ROOT_FN = re.compile(r"^\$s9VirtioBlk0aB5QueueV(AARi_zrlE)?(6submit\w*RequestErrorOYKF|4poll4into\w*SitF|6commityyF)"
                     r"(0A4Core1\d(Split|Packed)VirtqueueV_Tg5)?$")
RUNTIME = re.compile(r"swift_retain|swift_release|swift_allocObject|swift_slowAlloc|swift_beginAccess|swift_bridgeObject|^malloc$|^free$")


def driver_cost(path):
    """(instructions inclusive of everything the entry points call, calls into the Swift runtime
    and malloc/free made by any function reachable from them: an upper bound) from a callgrind
    output file. Callgrind's --toggle-collect honours only one pattern, so the whole run is
    collected and the call graph is read here instead."""
    names, fn, callee, pending = {}, None, None, False
    self_cost, calls = {}, {}  # fn -> Ir; fn -> {callee: [count, inclusive Ir]}

    def name(line, key):
        m = re.match(key + r"=\((\d+)\)(?: (.*))?$", line)
        if not m:
            return line[len(key) + 1:]
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), "?")

    for raw in open(path):
        line = raw.rstrip("\n")
        if line.startswith("fn="):
            fn = name(line, "fn"); pending = False
        elif line.startswith("cfn="):
            callee = name(line, "cfn")
        elif line.startswith("calls="):
            c = calls.setdefault(fn, {}).setdefault(callee, [0, 0])
            c[0] += int(line.split("=")[1].split()[0])
            pending = True
        elif line and (line[0].isdigit() or line[0] in "+-*") and fn is not None:
            parts = line.split()
            ir = int(parts[1]) if len(parts) > 1 else 0
            if pending:
                calls[fn][callee][1] += ir; pending = False
            else:
                self_cost[fn] = self_cost.get(fn, 0) + ir
    roots = [f for f in set(self_cost) | set(calls) if ROOT_FN.match(f)]
    ins = sum(self_cost.get(f, 0) + sum(c[1] for c in calls.get(f, {}).values()) for f in roots)
    seen, todo, rt = set(), list(roots), 0
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for g, (n, _) in calls.get(f, {}).items():
            if RUNTIME.search(g):
                rt += n
            else:
                todo.append(g)
    return ins, rt


def parse_jobs(spec):
    jobs = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not parts[2].isdigit() or parts[0] not in ("read", "write", "randread", "randwrite", "randrw"):
            sys.exit(f"blk bench: bad job {item!r} (want rw:bs:qd, e.g. randread:4k:32)")
        size_bytes(parts[1])
        jobs.append((parts[0], parts[1], int(parts[2])))
    return jobs


def geo_interval(ratios):
    """Geometric mean of the pair ratios and its 95 % interval (mean of the logs ± 2 standard
    errors), as [mean, low, high]; None without two usable pairs."""
    logs = [math.log(r) for r in ratios if r]
    if len(logs) < 2:
        return None
    m, se = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    return [math.exp(m), math.exp(m - 2 * se), math.exp(m + 2 * se)]


def fmt_interval(g):
    return "–" if not g else f"{g[0]:.2f} ({g[1]:.2f}–{g[2]:.2f})"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--iothread", action="store_true", help="run the export in a polling iothread")
    ap.add_argument("--no-callgrind", action="store_true", help="skip the driver and device callgrind runs")
    ap.add_argument("--no-record", action="store_true", help="do not append to Bench/RESULTS.md")
    ap.add_argument("--vio", metavar="PATH", default=VIO, help="the vio binary to measure (default: .build/release/vio, "
                    "built if missing)")
    ap.add_argument("--jobs", metavar="LIST", help="only these jobs, rw:bs:qd comma-separated (e.g. "
                    "randread:4k:32,randwrite:4k:32); default: all")
    ap.add_argument("--extra", metavar="ARGS", default="", help="extra blkbench arguments for every run of this build "
                    "(e.g. --extra \"--queue-size 512 --no-indirect\"; a single option: --extra=--no-indirect)")
    ap.add_argument("--against", metavar="VIO", help="another vio binary (e.g. an older commit's release build), run "
                    "alternately with this build each round; adds its median IOPS and the ratios")
    ap.add_argument("--against-extra", metavar="ARGS", default="", help="extra blkbench arguments for the --against binary")
    ap.add_argument("--device-reference", metavar="ARGS", default=REFERENCE,
                    help="blkbench arguments that make this build lay out and publish requests as SPDK does, for the "
                    f"reference device instr/IO (default: {REFERENCE!r}; empty: not measured)")
    args = ap.parse_args()
    vio = os.path.abspath(args.vio)
    if not os.path.exists(vio):
        if args.vio != VIO:
            sys.exit(f"blk bench: {args.vio} does not exist")
        subprocess.run(["swift", "build", "-c", "release", "--product", "vio"], cwd=ROOT, check=True)
    if args.against and not os.path.exists(args.against):
        sys.exit(f"blk bench: {args.against} does not exist")
    jobs = parse_jobs(args.jobs) if args.jobs else JOBS
    extra, against_extra = shlex.split(args.extra), shlex.split(args.against_extra)
    reference = shlex.split(args.device_reference)
    info = open("/proc/meminfo").read()
    free = int(re.search(r"HugePages_Free:\s+(\d+)", info).group(1))
    memory = "hugepages" if free >= 256 and " hugetlbfs " in open("/proc/mounts").read() else "nohuge"
    workdir = tempfile.mkdtemp(prefix="vio-blkbench.")
    rows, base_ir = [], None
    try:
        for rw, bs, qd in jobs:
            reps, other, pairs = [], [], []
            for k in range(args.rounds):
                # With --against, odd rounds run the other build first (ABBA): neither build always
                # gets the VM right after the other's run.
                if args.against and k % 2 == 1:
                    other.append(run(rw, bs, qd, args.seconds, workdir, memory, args.iothread, args.against, against_extra))
                reps.append(run(rw, bs, qd, args.seconds, workdir, memory, args.iothread, vio, extra))
                if args.against and k % 2 == 0:
                    other.append(run(rw, bs, qd, args.seconds, workdir, memory, args.iothread, args.against, against_extra))
                if args.against:
                    o = other[-1]
                    pairs.append(reps[-1]["iops"] / o["iops"] if o["iops"] else None)
            device_cpu = med(r["device_cpu_pct"] for r in reps)
            rounds_iops = [r["iops"] for r in reps]
            against_rounds = [o["iops"] for o in other]   # in round order, before sorting
            reps.sort(key=lambda r: r["iops"])
            other.sort(key=lambda r: r["iops"])
            m = reps[len(reps) // 2]
            ios = m["reads"] + m["writes"]
            kicks = m.get("notifications")
            against_dev, ref_dev = None, None
            if args.no_callgrind:
                ins, rt, dev_ins, dev_ios = None, None, None, None
            else:
                ins, rt = instructions(rw, bs, qd, workdir, args.iothread, vio, extra)
                if base_ir is None:
                    base_ir = startup_ir(workdir, args.iothread)
                dev_ins, dev_ios = device_instructions(rw, bs, qd, workdir, memory, args.iothread, vio, extra, base_ir)
                if args.against:
                    against_dev, _ = device_instructions(rw, bs, qd, workdir, memory, args.iothread, args.against,
                                                         against_extra, base_ir)
                if reference:
                    ref_dev, _ = device_instructions(rw, bs, qd, workdir, memory, args.iothread, vio, reference, base_ir)
            lat = m.get("latency") or {}
            spdk = SPDK_2405.get((rw, bs.lower(), qd))
            om = other[len(other) // 2] if other else None
            row = dict(rw=rw, bs=bs, iodepth=qd, iops=m["iops"], best_iops=reps[-1]["iops"], mib=m["mibPerSecond"],
                       p50_us=lat.get("p50Ns", 0) / 1000, p99_us=lat.get("p99Ns", 0) / 1000, p999_us=lat.get("p999Ns", 0) / 1000,
                       max_us=lat.get("maxNs", 0) / 1000, errors=m["errors"], instructions=ins, runtime_calls=rt, memory=memory,
                       features=m["features"], rounds_iops=rounds_iops,
                       device_cpu_pct=device_cpu, device_cpu_pct_rounds=[r["device_cpu_pct"] for r in reps],
                       notifications=kicks, ios_per_kick=ios / kicks if kicks else None,
                       device_instructions=dev_ins, device_callgrind_ios=dev_ios, device_startup_ir=base_ir,
                       against_device_instructions=against_dev, reference_device_instructions=ref_dev,
                       device_vs_reference=dev_ins / ref_dev if dev_ins and ref_dev else None,
                       spdk_iops=spdk, vs_spdk=m["iops"] / spdk if spdk else None,
                       against=om["iops"] if om else None,
                       against_rounds_iops=against_rounds if other else None,
                       against_device_cpu_pct=med(o["device_cpu_pct"] for o in other) if other else None,
                       against_ios_per_kick=((om["reads"] + om["writes"]) / om["notifications"]) if om and om.get("notifications") else None,
                       pair_ratios=pairs if args.against else None, median_pair_ratio=med(pairs) if args.against else None,
                       geo_pair_ratio=geo_interval(pairs) if args.against else None)
            rows.append(row)
            print(fmt(row), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "Sources"], cwd=ROOT).returncode != 0
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    cmd = "Bench/blk.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    os.makedirs(os.path.join(ROOT, "Bench/results"), exist_ok=True)
    doc = dict(date=date, commit=rev + ("+local changes" if dirty else ""), command=cmd.strip(), iothread=args.iothread,
               vio=vio, against=args.against, extra=args.extra, against_extra=args.against_extra, device_startup_ir=base_ir,
               device_reference=args.device_reference,
               spdk_reference=dict(label=SPDK_LABEL, note="median IOPS from the issue's table, measured on this VM type in an "
                                   "earlier run, not in this run", iops={f"{r} {b} QD{q}": v for (r, b, q), v in SPDK_2405.items()}),
               results=rows)
    json.dump(doc, open(os.path.join(ROOT, "Bench/results/blk-latest.json"), "w"), indent=2)
    table = header() + "\n".join(fmt(r) for r in rows)
    if args.against:
        table += ("\n\nAlternating with `--against` each round (median IOPS; pair ratio = this round's IOPS / the other build's "
                  "in the same round, rounds in ABBA order; geometric mean of the pair ratios with its 95 % interval, "
                  "mean ± 2 standard errors of the log ratios):\n\n"
                  "| job | this build | against | ratio of medians | median pair ratio | geometric mean (95 % interval) |\n"
                  "|---|---|---|---|---|---|\n"
                  + "\n".join(f"| {r['rw']} {r['bs']} QD{r['iodepth']} | {r['iops']:,.0f} | {r['against']:,.0f} | "
                              f"{r['iops'] / r['against']:.2f} | {f2(r['median_pair_ratio'])} | {fmt_interval(r['geo_pair_ratio'])} |"
                              for r in rows if r["against"]))
    if any(r.get("reference_device_instructions") or r.get("against_device_instructions") for r in rows):
        table += ("\n\nDevice (qemu-storage-daemon) instructions per I/O, callgrind, the same method for each: this build; "
                  f"this build laid out as SPDK does (`{args.device_reference}`)"
                  + ("; the --against build" if args.against else "") + ":\n\n| job | this build | SPDK's ring use | ratio |"
                  + (" against |" if args.against else "") + "\n|---|---|---|---|" + ("---|" if args.against else "") + "\n"
                  + "\n".join(f"| {r['rw']} {r['bs']} QD{r['iodepth']} | {num(r['device_instructions'])} | "
                              f"{num(r['reference_device_instructions'])} | {f2(r['device_vs_reference'])} |"
                              + (f" {num(r['against_device_instructions'])} |" if args.against else "") for r in rows))
    print(table)
    plot(rows, os.path.join(ROOT, "Bench/results/blk-latest.png"), doc, args.against)
    if not args.no_record:
        with open(os.path.join(ROOT, "Bench/RESULTS.md"), "a") as f:
            f.write(f"\n### {date} — virtio-blk, qemu-storage-daemon 7.2 null-co{' (iothread)' if args.iothread else ''} — "
                    f"{os.cpu_count()} vCPU — commit {rev}{'+local changes' if dirty else ''}"
                    + (f" — binary: `{args.vio}`" if args.vio != VIO else "") + " — "
                    f"extra: `{args.extra or '(none)'}`"
                    + (f" — against-extra: `{args.against_extra or '(none)'}`" if args.against else "")
                    + f"\n\n`{cmd.strip()}`\n\n"
                    f"Negotiated: {rows[0]['features'] if rows else '?'}; memory: {memory}. "
                    f"\"vs SPDK table\" divides by SPDK 24.05's medians from the issue's table (an earlier run on this "
                    f"VM type, not this run).\n\n{table}\n")


def num(x):
    return "–" if x is None else f"{x:,.0f}"


def f2(x):
    return "–" if x is None else f"{x:.2f}"


def header():
    return ("| job | IOPS (median) | IOPS (best) | MiB/s | p50 µs | p99 µs | p99.9 µs | max µs | errors | driver instr/IO | runtime calls/IO "
            "| device CPU % | I/Os per kick | device instr/IO | vs SPDK table |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def fmt(r):
    ins = "–" if r["instructions"] is None else f"{r['instructions']:.0f}"
    rt = "–" if r.get("runtime_calls") is None else f"{r['runtime_calls']:.4f}"
    cpu = "–" if r.get("device_cpu_pct") is None else f"{r['device_cpu_pct']:.0f}"
    kick = "–" if r.get("ios_per_kick") is None else f"{r['ios_per_kick']:.1f}"
    dev = "–" if r.get("device_instructions") is None else f"{r['device_instructions']:,.0f}"
    return (f"| {r['rw']} {r['bs']} QD{r['iodepth']} | {r['iops']:,.0f} | {r['best_iops']:,.0f} | {r['mib']:.1f} | {r['p50_us']:.1f} | "
            f"{r['p99_us']:.1f} | {r['p999_us']:.1f} | {r['max_us']:.0f} | {r['errors']} | {ins} | {rt} | {cpu} | {kick} | {dev} | "
            f"{f2(r.get('vs_spdk'))} |")


def plot(rows, path, doc, against):
    if not rows:
        return
    plt = pyplot("blk bench")
    if plt is None:
        return
    labels = [f"{r['rw']} {r['bs']}\nQD{r['iodepth']}" for r in rows]
    has_dev = any(r.get("device_instructions") is not None for r in rows)
    has_spdk = any(r.get("spdk_iops") for r in rows)
    groups = [("this build (median)", [r["iops"] for r in rows])]
    if against:
        groups.append((f"--against {os.path.basename(against)} (median)", [r["against"] for r in rows]))
    if has_spdk:
        groups.append((SPDK_LABEL, [r.get("spdk_iops") for r in rows]))
    n, w = len(groups), 0.8 / len(groups)
    x = list(range(len(rows)))
    fig, axes = plt.subplots(2 if has_dev else 1, 1, figsize=(max(8, 1.8 * len(rows)), 8 if has_dev else 5), squeeze=False)
    ax = axes[0][0]
    for k, (label, vals) in enumerate(groups):
        xs = [i + (k - (n - 1) / 2) * w for i in x]
        pts = [(xi, v) for xi, v in zip(xs, vals) if v]
        ax.bar([p[0] for p in pts], [p[1] / 1e3 for p in pts], w, label=label,
               hatch="//" if label == SPDK_LABEL else None, alpha=0.6 if label == SPDK_LABEL else 1.0)
    if against:
        for i, r in enumerate(rows):
            ratio = r.get("median_pair_ratio")
            if ratio is None or not r.get("against"):
                continue
            top = max(r["iops"], r["against"]) / 1e3
            ax.text(i - w / 2 if n == 3 else i, top, f"{ratio:.2f}×", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("K IOPS")
    note = "\nratio above each pair: median over rounds of this build's IOPS / the other's in the same round" if against else ""
    ax.set_title(f"vio blkbench vs qemu-storage-daemon null-co — {doc['date']} — {doc['commit']}{note}", fontsize=9)
    top = max(v for _, vals in groups for v in vals if v) / 1e3
    ax.set_ylim(0, top * 1.3)
    ax.legend(fontsize=8, loc="upper left", ncol=len(groups))
    if has_dev:
        ax2 = axes[1][0]
        series = [("this build", "device_instructions", "tab:gray"),
                  ("SPDK's ring use (this build, " + (doc.get("device_reference") or "") + ")", "reference_device_instructions", "tab:olive")]
        if against:
            series.append((f"--against {os.path.basename(against)}", "against_device_instructions", "tab:orange"))
        series = [s for s in series if any(r.get(s[1]) is not None for r in rows)]
        w2 = 0.8 / len(series)
        for k, (label, key, color) in enumerate(series):
            pts = [(i + (k - (len(series) - 1) / 2) * w2, r[key]) for i, r in enumerate(rows) if r.get(key) is not None]
            ax2.bar([p[0] for p in pts], [p[1] for p in pts], w2, color=color, label=label)
            for xi, v in pts:
                ax2.text(xi, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
        ax2.set_xticks(x)
        ax2.set_xticklabels(labels, fontsize=8)
        ax2.set_ylabel("device instructions / I/O")
        ax2.legend(fontsize=8, loc="upper left")
        ax2.set_title("qemu-storage-daemon instructions per I/O (callgrind, the same method for each driver)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"blk bench: plot written to {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
