#!/usr/bin/env python3
"""virtio-blk benchmark: `vio blkbench` against qemu-storage-daemon (null-co), daemon on CPU 0,
driver on CPU 1. Jobs: 4 KiB randread at QD 1, 32 and 128, 4 KiB randwrite at QD 32, 128 KiB
sequential read at QD 8. Each job runs --rounds times (the VM's speed is bimodal); the table shows
the median IOPS round with its MiB/s and latency percentiles, plus the driver's instructions per
I/O from callgrind (everything under VirtioBlkQueue's submit/poll/commit, i.e. the blk driver and
the shared queue core, on --no-huge memory as valgrind needs). Appends to Bench/RESULTS.md.
"""
import argparse, json, os, re, shlex, signal, statistics, subprocess, sys, tempfile, time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIO = os.path.join(ROOT, ".build/release/vio")
JOBS = [("randread", "4k", 1), ("randread", "4k", 32), ("randread", "4k", 128), ("randwrite", "4k", 32), ("read", "128k", 8)]


def daemon(workdir, iothread):
    sock = os.path.join(workdir, "blk.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    export = f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on,num-queues=1"
    cmd = ["taskset", "-c", "0", "qemu-storage-daemon"]
    if iothread:
        cmd += ["--object", "iothread,id=iot0"]
        export += ",iothread=iot0"
    cmd += ["--blockdev", f"driver=null-co,node-name=disk0,size={8 << 30},read-zeroes=on", "--export", export]
    log = open(os.path.join(workdir, "qsd.log"), "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    for _ in range(150):
        if os.path.exists(sock):
            return p, sock
        time.sleep(0.1)
    p.kill()
    sys.exit("blk bench: qemu-storage-daemon did not start")


def run(sock, rw, bs, qd, seconds, workdir, memory, binary=None):
    out = os.path.join(workdir, "r.json")
    args = ["taskset", "-c", "1", binary or VIO, "blkbench", "--dev", f"vhost-user-blk:{sock}", "--rw", rw, "--bs", bs, "--iodepth", str(qd),
            "--runtime", f"{seconds}s", "--ramp-time", "1s", "--memory", memory, "--json", out]
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 60)
    return json.load(open(out))


def instructions(sock, rw, bs, qd, workdir):
    """Driver instructions and runtime calls per I/O, from callgrind's call graph."""
    binary = os.path.join(workdir, "vio.nodebug")
    if not os.path.exists(binary):
        subprocess.run(["cp", VIO, binary], check=True)
        subprocess.run(["strip", "--strip-debug", binary], check=True)
    out = os.path.join(workdir, "cg.json")
    cg = os.path.join(workdir, "cg.out")
    r = subprocess.run(["taskset", "-c", "1", "valgrind", "--tool=callgrind", f"--callgrind-out-file={cg}",
                        binary, "blkbench", "--dev", f"vhost-user-blk:{sock}", "--rw", rw, "--bs", bs, "--iodepth", str(qd),
                        "--runtime", "5s", "--memory", "nohuge", "--memory-mb", "128", "--json", out],
                       capture_output=True, text=True, timeout=900)
    try:
        rep = json.load(open(out))
        ios = rep["reads"] + rep["writes"]
    except Exception:
        return None, None
    if r.returncode != 0 or not ios:
        return None, None
    ins, rt = driver_cost(cg)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--iothread", action="store_true", help="run the export in a polling iothread")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--against", metavar="VIO", help="another vio binary (e.g. an older commit's release build), run "
                    "alternately with this build each round; adds its median IOPS and the ratio")
    args = ap.parse_args()
    if not os.path.exists(VIO):
        subprocess.run(["swift", "build", "-c", "release", "--product", "vio"], cwd=ROOT, check=True)
    info = open("/proc/meminfo").read()
    free = int(re.search(r"HugePages_Free:\s+(\d+)", info).group(1))
    memory = "hugepages" if free >= 256 and " hugetlbfs " in open("/proc/mounts").read() else "nohuge"
    workdir = tempfile.mkdtemp(prefix="vio-blkbench.")
    proc, sock = daemon(workdir, args.iothread)
    rows = []
    try:
        for rw, bs, qd in JOBS:
            reps, other = [], []
            for _ in range(args.rounds):
                reps.append(run(sock, rw, bs, qd, args.seconds, workdir, memory))
                if args.against:
                    other.append(run(sock, rw, bs, qd, args.seconds, workdir, memory, binary=args.against)["iops"])
            reps.sort(key=lambda r: r["iops"])
            other.sort()
            med = reps[len(reps) // 2]
            ins, rt = (None, None) if args.no_callgrind else instructions(sock, rw, bs, qd, workdir)
            lat = med.get("latency") or {}
            row = dict(rw=rw, bs=bs, iodepth=qd, iops=med["iops"], best_iops=reps[-1]["iops"], mib=med["mibPerSecond"],
                       p50_us=lat.get("p50Ns", 0) / 1000, p99_us=lat.get("p99Ns", 0) / 1000, p999_us=lat.get("p999Ns", 0) / 1000,
                       max_us=lat.get("maxNs", 0) / 1000, errors=med["errors"], instructions=ins, runtime_calls=rt, memory=memory,
                       features=med["features"], against=other[len(other) // 2] if other else None)
            rows.append(row)
            print(fmt(row), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "Sources"], cwd=ROOT).returncode != 0
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    cmd = "Bench/blk.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    os.makedirs(os.path.join(ROOT, "Bench/results"), exist_ok=True)
    json.dump(dict(date=date, commit=rev + ("+local changes" if dirty else ""), command=cmd.strip(), iothread=args.iothread, results=rows),
              open(os.path.join(ROOT, "Bench/results/blk-latest.json"), "w"), indent=2)
    table = header() + "\n".join(fmt(r) for r in rows)
    if args.against:
        table += ("\n\nAlternating with `--against` each round (median IOPS):\n\n| job | this build | against | ratio |\n|---|---|---|---|\n"
                  + "\n".join(f"| {r['rw']} {r['bs']} QD{r['iodepth']} | {r['iops']:,.0f} | {r['against']:,.0f} | {r['iops'] / r['against']:.2f} |"
                               for r in rows if r["against"]))
    print(table)
    if not args.no_record:
        with open(os.path.join(ROOT, "Bench/RESULTS.md"), "a") as f:
            f.write(f"\n### {date} — virtio-blk, qemu-storage-daemon 7.2 null-co{' (iothread)' if args.iothread else ''} — "
                    f"{os.cpu_count()} vCPU — commit {rev}{'+local changes' if dirty else ''}\n\n`{cmd.strip()}`\n\n"
                    f"Negotiated: {rows[0]['features'] if rows else '?'}; memory: {memory}.\n\n{table}\n")
    subprocess.run(["rm", "-rf", workdir])


def header():
    return ("| job | IOPS (median) | IOPS (best) | MiB/s | p50 µs | p99 µs | p99.9 µs | max µs | errors | driver instr/IO | runtime calls/IO |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")


def fmt(r):
    ins = "–" if r["instructions"] is None else f"{r['instructions']:.0f}"
    rt = "–" if r.get("runtime_calls") is None else f"{r['runtime_calls']:.4f}"
    return (f"| {r['rw']} {r['bs']} QD{r['iodepth']} | {r['iops']:,.0f} | {r['best_iops']:,.0f} | {r['mib']:.1f} | {r['p50_us']:.1f} | "
            f"{r['p99_us']:.1f} | {r['p999_us']:.1f} | {r['max_us']:.0f} | {r['errors']} | {ins} | {rt} |")


if __name__ == "__main__":
    main()
