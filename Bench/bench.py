#!/usr/bin/env python3
"""Side-by-side benchmark: DPDK's C virtio_user PMD (the yardstick) against swift-virtio's `vio`.

A `dpdk-testpmd --vdev net_vhost0` peer runs on CPU 0. On CPU 1, in turn, run
  (a) dpdk-testpmd --vdev net_virtio_user0,path=SOCK,in_order=0|1,packed_vq=0|1   (C)
  (b) vio fwd                                                        (Swift)
in short alternating runs (this VM's speed is bimodal over seconds). Per run we keep the per-second
rates (skipping the first two seconds) and the busy TSC cycles per packet that each reports
(testpmd --record-core-cycles / vio --record-cycles). Each side's median and best over all rounds go
in the table. Then, unless --no-callgrind, instructions per packet from callgrind on the same
scenarios (--no-huge memory: DPDK cannot map hugepage areas under valgrind): C = all instructions of
testpmd's forwarding lcore thread / packets; Swift = instructions in vio's per-iteration `step`
function / packets.

Writes Bench/results/latest.json, Bench/results/latest.png (if matplotlib is importable) and
appends a dated entry with the exact command to Bench/RESULTS.md.
"""
import argparse, atexit, json, os, re, shlex, signal, statistics, subprocess, sys, tempfile, time
from datetime import datetime, timezone

from plotting import pyplot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIO = os.path.join(ROOT, ".build/release/vio")
TESTPMD = "/usr/bin/dpdk-testpmd"

# scenario: (peer forward mode, driver mode for C testpmd, vio fwd mode, which rate to read)
SCENARIOS = {
    "txonly": ("rxonly", "txonly", "txonly", "tx"),
    "rxonly": ("txonly", "rxonly", "rxonly", "rx"),
    "echo": ("macswap", "io", "io", "rx"),
}



def remove_runtime_dirs():
    """DPDK leaves /var/run/dpdk/PREFIX behind when a process is stopped; ours go at exit."""
    import shutil
    for prefix in (f"vio-bench-peer-{os.getpid()}", f"vio-bench-c-{os.getpid()}"):
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)


atexit.register(remove_runtime_dirs)

def hugepages_free_mb():
    try:
        info = open("/proc/meminfo").read()
        free = int(re.search(r"HugePages_Free:\s+(\d+)", info).group(1))
        size = int(re.search(r"Hugepagesize:\s+(\d+)", info).group(1))
        mounted = " hugetlbfs " in open("/proc/mounts").read()
        return free * size // 1024 if mounted else 0
    except Exception:
        return 0


class Peer:
    def __init__(self, mode, size, memory, workdir, queues=1):
        self.sock = os.path.join(workdir, "peer.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        mem = ["-m", "512", "--in-memory", "--single-file-segments"] if memory == "hugepages" else ["--no-huge", "-m", "512"]
        cmd = ["taskset", "-c", "0", TESTPMD, "--lcores", "0@0,1@0", "--no-pci", *mem,
               "--file-prefix", f"vio-bench-peer-{os.getpid()}", "--no-telemetry",
               "--vdev", f"net_vhost0,iface={self.sock}" + (f",queues={queues}" if queues > 1 else ""), "--", f"--forward-mode={mode}",
               "--stats-period", "10", "--auto-start", "--total-num-mbufs", "32768", "--txpkts", str(size)]
        if queues > 1:
            cmd += [f"--rxq={queues}", f"--txq={queues}", "--nb-cores=1"]
        self.log = open(os.path.join(workdir, "peer.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                sys.exit(f"bench: the testpmd peer did not start; see {self.log.name}")
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def c_memory(memory):
    return ["-m", "256", "--in-memory", "--single-file-segments"] if memory == "hugepages" else ["--no-huge", "-m", "256"]


def c_command(s, sock, extra_pmd=""):
    cmode = SCENARIOS[s["scenario"]][1]
    args = [TESTPMD, "--lcores", "0@1,1@1", "--no-pci", *c_memory(s["memory"]),
            "--file-prefix", f"vio-bench-c-{os.getpid()}", "--no-telemetry",
            "--vdev", f"net_virtio_user0,path={sock},in_order={s['in_order']},packed_vq={int(s['ring'] == 'packed')},queue_size=256"
            + (f",queues={s['queues']}" if s["queues"] > 1 else "") + extra_pmd, "--",
            f"--forward-mode={cmode}", "--stats-period", "1", "--auto-start", "--txd", "256", "--rxd", "256",
            "--total-num-mbufs", "16384", "--txpkts", str(s["size"])]
    if s["queues"] > 1:
        # Every queue pair on the one forwarding lcore, as vio runs them.
        args += [f"--rxq={s['queues']}", f"--txq={s['queues']}", "--nb-cores=1"]
    if cmode == "io":
        args.append("--tx-first")
    return args


def vio_command(s, sock, seconds=None, count=None, memory=None, binary=None):
    vmode = SCENARIOS[s["scenario"]][2]
    memory = memory or s["memory"]
    args = [binary or VIO, "fwd", "--port", f"vhost:{sock}", "--mode", vmode, "--ring-size", "256", "--ring", s["ring"],
            "--memory", memory, "--size", str(min(s["size"], 2048))]
    if s["queues"] > 1:
        args += ["--queues", str(s["queues"])]
    if memory == "nohuge":
        args += ["--memory-mb", "128", "--mbufs", "8192"]
    if seconds:
        args += ["--duration", str(seconds)]
    if count:
        args += ["--count", str(count), "--stats-period", "0"]
    if not s["in_order"]:
        args.append("--no-in-order")
    if vmode == "io":
        args += ["--tx-first", "1"]
    return args


def run_c(s, sock, seconds, workdir):
    log = os.path.join(workdir, "c.log")
    with open(log, "w") as f:
        p = subprocess.Popen(["taskset", "-c", "1", *c_command(s, sock), "--record-core-cycles"],
                             stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        time.sleep(seconds + 2)
        p.send_signal(signal.SIGINT)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill(); p.wait()
    text = open(log).read()
    key = "Tx-pps" if SCENARIOS[s["scenario"]][3] == "tx" else "Rx-pps"
    rates = [int(m) / 1e6 for m in re.findall(key + r":\s+(\d+)", text)]
    cyc = re.findall(r"CPU cycles/packet=([\d.]+)", text)
    return rates[2:2 + seconds - 1], (float(cyc[-1]) if cyc else None)


def run_vio(s, sock, seconds, workdir, binary=None):
    log = os.path.join(workdir, "v.log")
    with open(log, "w") as f:
        subprocess.run(["taskset", "-c", "1", *vio_command(s, sock, seconds=seconds + 1, binary=binary), "--record-cycles"],
                       stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=seconds + 60)
    text = open(log).read()
    col = SCENARIOS[s["scenario"]][3]
    rates = []
    for line in text.splitlines():
        m = re.match(r"port 0: rx\s+([\d.]+) Mpps.*\| tx\s+([\d.]+) Mpps", line)
        if m:
            rates.append(float(m.group(2 if col == "tx" else 1)))
    cyc = re.findall(r"CPU cycles/packet: ([\d.]+) busy", text)
    return rates[2:2 + seconds - 1], (float(cyc[-1]) if cyc else None)


def callgrind_c(s, sock, workdir, seconds):
    out = os.path.join(workdir, "cg.c")
    for f in os.listdir(workdir):
        if f.startswith("cg.c"):
            os.unlink(os.path.join(workdir, f))
    cs = dict(s, memory="nohuge")
    log = os.path.join(workdir, "cgc.log")
    with open(log, "w") as f:
        p = subprocess.Popen(["taskset", "-c", "1", "valgrind", "--tool=callgrind", "--separate-threads=yes",
                              f"--callgrind-out-file={out}", *c_command(cs, sock)],
                             stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        time.sleep(seconds)
        p.send_signal(signal.SIGINT)
        try:
            p.wait(120)
        except subprocess.TimeoutExpired:
            p.kill(); p.wait()
    text = open(log).read()
    key = "TX-total" if SCENARIOS[s["scenario"]][3] == "tx" else "RX-total"
    totals = re.findall(key + r":\s+(\d+)", text)
    packets = int(totals[-1]) if totals else 0
    # The forwarding lcore is the thread with the most instructions.
    best = 0
    for f in os.listdir(workdir):
        if f.startswith("cg.c-"):
            m = re.search(r"^summary:\s+(\d+)", open(os.path.join(workdir, f)).read(), re.M)
            if m:
                best = max(best, int(m.group(1)))
    return (best / packets if packets else None), packets


def callgrind_vio(s, sock, workdir, count):
    binary = os.path.join(workdir, "vio.nodebug")  # valgrind 3.19 cannot read Swift's DWARF 5
    if not os.path.exists(binary):
        subprocess.run(["cp", VIO, binary], check=True)
        subprocess.run(["strip", "--strip-debug", binary], check=True)
    out = os.path.join(workdir, "cg.swift")
    cmd = vio_command(s, sock, count=count, memory="nohuge")
    cmd[0] = binary
    jsonpath = os.path.join(workdir, "cg.json")
    r = subprocess.run(["taskset", "-c", "1", "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        "--toggle-collect=*3vio4step*", *cmd, "--json", jsonpath],
                       capture_output=True, text=True, timeout=900)
    m = re.search(r"Collected : (\d+)", r.stderr)
    try:
        rep = json.load(open(jsonpath))
        p = rep["ports"][0]
        packets = p["txPackets"] if SCENARIOS[s["scenario"]][3] == "tx" else p["rxPackets"]
    except Exception:
        return None, 0
    return (int(m.group(1)) / packets if m and packets else None), packets


def med(xs):
    return statistics.median(xs) if xs else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="measured seconds per run")
    ap.add_argument("--matrix", default="default", choices=["default", "quick", "full", "packed", "mq"])
    ap.add_argument("--against", metavar="VIO", help="another vio build (e.g. the previous commit's release vio), run "
                    "alternately with this one on every 1-queue row: its median and this build's ratio to it")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--callgrind-seconds", type=int, default=20)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--only", action="append", default=[], metavar="SCENARIO:SIZE:IN_ORDER:MEMORY[:RING[:QUEUES]]",
                    help="run just these rows, e.g. txonly:1518:1:hugepages or rxonly:64:1:hugepages:packed:4 (repeatable)")
    args = ap.parse_args()

    if not os.path.exists(VIO):
        subprocess.run(["swift", "build", "-c", "release", "--product", "vio"], cwd=ROOT, check=True)
    huge = "hugepages" if hugepages_free_mb() >= 1024 else "nohuge"
    scenarios = ("txonly", "rxonly", "echo")
    if args.matrix == "quick":
        matrix = [(sc, 64, 1, huge, ring) for ring in ("split", "packed") for sc in scenarios]
    elif args.matrix == "packed":
        # Both layouts, in order and not, 64 bytes: which layout wins here.
        matrix = [(sc, 64, io, huge, ring) for io in (1, 0) for ring in ("split", "packed") for sc in scenarios]
    elif args.matrix == "mq":
        # 1, 2 and 4 queue pairs on one lcore each side, both layouts, 64 B in order.
        matrix = [(sc, 64, 1, huge, ring, q) for ring in ("packed", "split") for q in (1, 2, 4) for sc in scenarios]
    elif args.matrix == "full":
        matrix = [(sc, sz, io, mem, ring) for ring in ("split", "packed") for sc in scenarios for sz in (64, 1518)
                  for io in (1, 0) for mem in dict.fromkeys((huge, "nohuge"))]
    else:
        matrix = [(sc, 64, 1, huge, "split") for sc in scenarios]
        matrix += [(sc, 64, 1, huge, "packed") for sc in scenarios]
        matrix += [(sc, 64, 1, huge, "packed", q) for q in (2, 4) for sc in scenarios]
        matrix += [(sc, 1518, 1, huge, "split") for sc in scenarios]
        matrix += [(sc, 64, 0, huge, ring) for ring in ("split", "packed") for sc in scenarios]
        if huge == "hugepages":
            matrix += [(sc, 64, 1, "nohuge", "split") for sc in ("txonly", "rxonly")]
    if args.only:
        matrix = []
        for spec in args.only:
            parts = spec.split(":")
            if len(parts) == 4:
                parts.append("split")
            if len(parts) == 5:
                parts.append("1")
            if len(parts) != 6 or parts[0] not in SCENARIOS or parts[3] not in ("hugepages", "nohuge") \
                    or parts[4] not in ("split", "packed") or not parts[5].isdigit():
                sys.exit(f"bench: bad --only {spec}")
            sc, sz, io, mem, ring, q = parts
            matrix.append((sc, int(sz), int(io), mem, ring, int(q)))
    workdir = tempfile.mkdtemp(prefix="vio-bench.")
    results = []
    for entry in matrix:
        sc, size, in_order, memory, ring = entry[:5]
        queues = entry[5] if len(entry) > 5 else 1
        s = dict(scenario=sc, size=size, in_order=in_order, memory=memory, ring=ring, queues=queues)
        peer = Peer(SCENARIOS[sc][0], size, memory, workdir, queues=queues)
        c_rates, v_rates, c_cyc, v_cyc, a_rates = [], [], [], [], []
        against = args.against if queues == 1 else None
        try:
            def fresh():
                # echo is a closed loop of the injected bursts: what the peer still holds from the
                # last driver would join the next one's loop, so each echo run gets a fresh peer.
                nonlocal peer
                if sc == "echo":
                    peer.stop()
                    peer = Peer(SCENARIOS[sc][0], size, memory, workdir, queues=queues)
            for _ in range(args.rounds):
                fresh()
                r, cy = run_c(s, peer.sock, args.seconds, workdir)
                c_rates += r
                if cy: c_cyc.append(cy)
                fresh()
                r, cy = run_vio(s, peer.sock, args.seconds, workdir)
                v_rates += r
                if cy: v_cyc.append(cy)
                if against:
                    fresh()
                    r, _ = run_vio(s, peer.sock, args.seconds, workdir, binary=against)
                    a_rates += r
            ci = vi = None
            if not args.no_callgrind and size == 64 and memory == huge and in_order == 1 and queues == 1:
                ci, _ = callgrind_c(s, peer.sock, workdir, args.callgrind_seconds)
                vi, _ = callgrind_vio(s, peer.sock, workdir, 1_000_000)
        finally:
            peer.stop()
        row = dict(s, c_mpps=med(c_rates), c_best=max(c_rates, default=0), swift_mpps=med(v_rates),
                   swift_best=max(v_rates, default=0), c_samples=len(c_rates), swift_samples=len(v_rates),
                   ratio=(med(v_rates) / med(c_rates)) if med(c_rates) else 0,
                   c_cycles=med(c_cyc) if c_cyc else None, swift_cycles=med(v_cyc) if v_cyc else None,
                   c_instructions=ci, swift_instructions=vi,
                   against_mpps=med(a_rates) if a_rates else None,
                   vs_against=(med(v_rates) / med(a_rates)) if a_rates and med(a_rates) else None)
        results.append(row)
        print(fmt_row(row), flush=True)

    machine = f"{os.cpu_count()} vCPU {cpu_model()}"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "Sources"], cwd=ROOT).returncode != 0
    command = "Bench/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    doc = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), machine=machine,
               commit=rev + ("+local changes" if dirty else ""), command=command.strip(), results=results)
    os.makedirs(os.path.join(ROOT, "Bench/results"), exist_ok=True)
    json.dump(doc, open(os.path.join(ROOT, "Bench/results/latest.json"), "w"), indent=2)
    plot(results, os.path.join(ROOT, "Bench/results/latest.png"), doc)
    table = header() + "\n".join(fmt_row(r) for r in results)
    print(table)
    if not args.no_record:
        with open(os.path.join(ROOT, "Bench/RESULTS.md"), "a") as f:
            f.write(f"\n### {doc['date']} — {machine} — commit {doc['commit']}\n\n`{doc['command']}`\n\n{table}\n")
    subprocess.run(["rm", "-rf", workdir])


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def header():
    return ("| scenario | ring | queues | size | in_order | memory | C Mpps (median) | C best | Swift Mpps (median) | Swift best | Swift/C | "
            "C cycles/pkt | Swift cycles/pkt | C instr/pkt | Swift instr/pkt | previous build Mpps | vs previous |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def fmt_row(r):
    f = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"
    return (f"| {r['scenario']} | {r.get('ring', 'split')} | {r.get('queues', 1)} | {r['size']} | {r['in_order']} | {r['memory']} | {f(r['c_mpps'])} | {f(r['c_best'])} | "
            f"{f(r['swift_mpps'])} | {f(r['swift_best'])} | **{f(r['ratio'])}** | {f(r['c_cycles'], 0)} | "
            f"{f(r['swift_cycles'], 0)} | {f(r['c_instructions'], 0)} | {f(r['swift_instructions'], 0)} | "
            f"{f(r.get('against_mpps'))} | {f(r.get('vs_against'))} |")


def plot(results, path, doc):
    plt = pyplot("bench")
    if plt is None:
        return
    labels = [f"{r['scenario']} {r.get('ring', 'split')} q{r.get('queues', 1)}\n{r['size']}B io={r['in_order']}\n{r['memory']}" for r in results]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(results)), 5))
    ax.bar([i - 0.2 for i in x], [r["c_mpps"] for r in results], 0.4, label="C virtio_user (median)")
    ax.bar([i + 0.2 for i in x], [r["swift_mpps"] for r in results], 0.4, label="swift-virtio (median)")
    for i, r in enumerate(results):
        ax.text(i + 0.2, r["swift_mpps"], f"{r['ratio']:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("Mpps")
    ax.set_title(f"swift-virtio vs DPDK C virtio_user — {doc['date']} — {doc['commit']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
