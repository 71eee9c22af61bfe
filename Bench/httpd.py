#!/usr/bin/env python3
"""HTTP through the dataplane against the same handlers on the kernel, in one run.

Two network namespaces of the bench's own:
  client (C): wrk (CPU 0 with the bridge, so that CPU 1 is the server's alone: --client-cpu);
              198.18.0.1/24 on a TAP device that dpdk-testpmd (CPU 0, io mode) bridges to a
              vhost-user socket (--bridge af_packet, the default over MTU 1500: on one end of a
              veth pair whose other end is testpmd's AF_PACKET socket); and one end of a veth
              pair, 198.19.0.1/24.
  server (S): the other veth end, 198.19.0.2/24.
--mtu sets every interface's MTU and the dataplane servers' (--mtu): over 1500, lwIP sends
segments up to MTU - 40 bytes where liblwip alone stops at 1460.
(a) dataplane: `vio httpd` (release, CPU 1) on the vhost-user socket as 198.18.0.2: lwIP on the
    virtio-net driver, HTTP by DataplaneHTTP.
(b) kernel: `vio-nio-httpd` (Bench package, release, CPU 1, one event loop) in S on 198.19.0.2:
    the same HTTPRouter handlers behind a plain SwiftNIO server, over the kernel's TCP and the veth.
(c) the Hummingbird example (Examples/HummingbirdOnDataplane, release, CPU 1) on the dataplane,
(d) the same binary with --kernel: Hummingbird on NIOPosix in S (routes /hello, /64k, /json/bench).
Server CPU cycles per request: on the dataplane, the busy TSC cycles of the server lcore (turns
with work: NetStack.busyCycles, from /stats or /dataplane); on the kernel, the server process's
user+system time plus the softirq time of its CPU (/proc), at the TSC rate.
For each target and each path: `wrk -t2 -c50 -d{seconds}s --latency`,
`--rounds` times alternating; the median round (by requests/s) is reported with its latency
percentiles. Writes Bench/results/httpd-latest.json and prints a Markdown table for RESULTS.md.
"""
import argparse, json, math, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIO = os.environ.get("VIO_BIN") or os.path.join(ROOT, ".build/release/vio")
NIO = os.path.join(ROOT, "Bench/.build/release/vio-nio-httpd")
HB = os.path.join(ROOT, "Examples/HummingbirdOnDataplane/.build/release/HummingbirdOnDataplane")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tsc_hz():
    # The dataplane reports it; without one, the nominal rate from /proc/cpuinfo.
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) * 1e6
    return 1e9


def kernel_seconds(pid, cpu=1):
    """utime+stime of the process and softirq of its CPU, in seconds."""
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    proc = (int(f[11]) + int(f[12])) / CLK_TCK
    for line in open("/proc/stat"):
        if line.startswith("cpu%d " % cpu):
            softirq = int(line.split()[7]) / CLK_TCK
    return proc + softirq
TESTPMD = "/usr/bin/dpdk-testpmd"


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def parse_wrk(text):
    out = {"errors": None}
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", text)
    if m:
        mult = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}.get(m.group(2), 1)
        out["bytes_per_s"] = float(m.group(1)) * mult
    for p in ("50", "75", "90", "99"):
        m = re.search(r"\s%s%%\s+([\d.]+)(us|ms|s)\b" % p, text)
        if m:
            v = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
            out["p" + p + "_ms"] = v
    m = re.search(r"Socket errors: (.*)", text)
    out["errors"] = m.group(1).strip() if m else "none"
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--only", action="append", default=[],
                    help="run only the servers whose name contains this text (repeatable)")
    ap.add_argument("--path", action="append", default=[], help="run only this path of each server (repeatable)")
    ap.add_argument("--no-idle", action="store_true", help="skip the idle measurements")
    ap.add_argument("--mtu", type=int, default=1500,
                    help="MTU of the TAP, the veth pair and the dataplane servers (testpmd's ports get --max-pkt-len to match)")
    ap.add_argument("--bridge", choices=["tap", "af_packet"],
                    help="what testpmd bridges the vhost-user port to: a TAP (the default up to MTU 1500; DPDK's TAP PMD "
                         "drops frames over 1522 bytes) or an AF_PACKET socket on a veth pair (the default over 1500)")
    ap.add_argument("--client-cpu", default="0",
                    help="CPU list for wrk (taskset; default 0, with the bridge: CPU 1 is the server's alone); 'any' lets it float")
    ap.add_argument("--against", metavar="VIO",
                    help="also run `vio httpd` from this other build, right after ours in each round, and print the pair ratios")
    ap.add_argument("--perf", metavar="DIR", help="record `perf record -g` of each dataplane server's wrk runs into DIR")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("httpd.py: needs root (network namespaces)")
    if not a.no_build:
        subprocess.run(["swift", "build", "-c", "release", "--product", "vio"], cwd=ROOT, check=True)
        subprocess.run(["swift", "build", "-c", "release", "--product", "vio-nio-httpd"], cwd=os.path.join(ROOT, "Bench"), check=True)
        subprocess.run(["swift", "build", "-c", "release"], cwd=os.path.join(ROOT, "Examples/HummingbirdOnDataplane"), check=True)

    bridge = a.bridge or ("tap" if a.mtu <= 1500 else "af_packet")
    if bridge == "tap" and a.mtu > 1500:
        sys.exit("httpd.py: DPDK's TAP PMD drops frames over 1522 bytes: use --bridge af_packet for --mtu %d" % a.mtu)
    client_cpu = [] if a.client_cpu == "any" else ["taskset", "-c", a.client_cpu]
    mtu_args = ["--mtu", str(a.mtu)] if a.mtu != 1500 else []
    tag = str(os.getpid())
    nsc, nss = "viobc" + tag, "viobs" + tag
    tmp = tempfile.mkdtemp(prefix="vio-httpd-bench-")
    sock = os.path.join(tmp, "vhost.sock")
    www = os.path.join(tmp, "www")
    os.makedirs(www)
    with open(os.path.join(www, "64k.bin"), "wb") as f:
        f.write(os.urandom(64 * 1024))
    procs = []

    def cleanup():
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for ns in (nsc, nss):
            sh("ip", "netns", "delete", ns, check=False)
        # testpmd leaves its DPDK runtime directory behind.
        shutil.rmtree("/var/run/dpdk/viobench" + tag, ignore_errors=True)

    try:
        sh("ip", "netns", "add", nsc)
        sh("ip", "netns", "add", nss)
        sh("ip", "link", "add", "vbc" + tag[-6:], "netns", nsc, "type", "veth", "peer", "name", "vbs" + tag[-6:], "netns", nss)
        for ns, dev, addr in ((nsc, "vbc" + tag[-6:], "198.19.0.1/24"), (nss, "vbs" + tag[-6:], "198.19.0.2/24")):
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "mtu", str(a.mtu), "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        tap = "viobt" + tag[-6:]   # the client's interface: the TAP, or the client's end of the veth pair
        if bridge == "tap":
            far = ["--vdev", "net_tap0,iface=" + tap]
            mbuf = ["--total-num-mbufs", "16384"]
        else:
            # testpmd's AF_PACKET socket on one end of a veth pair; the client's address on the other. The client
            # end computes its checksums (no offload: AF_PACKET would hand testpmd frames whose checksum is partial).
            pside = "viobp" + tag[-6:]
            sh("ip", "netns", "exec", nsc, "ip", "link", "add", pside, "type", "veth", "peer", "name", tap)
            sh("ip", "netns", "exec", nsc, "ip", "link", "set", pside, "mtu", str(a.mtu), "up")
            sh("ip", "netns", "exec", nsc, "ethtool", "-K", tap, "tx", "off")
            far = ["--vdev", "net_af_packet0,iface=%s,framesz=10240,blocksz=20480,framecnt=512" % pside]
            mbuf = ["--mbuf-size", "10368", "--total-num-mbufs", "8192"]
        pmd = subprocess.Popen(
            ["taskset", "-c", "0", "ip", "netns", "exec", nsc, TESTPMD, "--lcores", "0@0,1@0", "--no-pci", "--no-huge", "-m", "512",
             "--file-prefix", "viobench" + tag, "--no-telemetry"] + far +
            ["--vdev", "net_vhost0,iface=" + sock, "--", "--forward-mode=io", "--stats-period", "5", "--auto-start"] + mbuf,
            stdout=open(os.path.join(tmp, "pmd.log"), "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(pmd)
        for _ in range(200):
            if os.path.exists(sock) and sh("ip", "netns", "exec", nsc, "ip", "link", "show", tap, check=False).returncode == 0:
                break
            time.sleep(0.1)
        sh("ip", "netns", "exec", nsc, "ip", "addr", "add", "198.18.0.1/24", "dev", tap)
        sh("ip", "netns", "exec", nsc, "ip", "link", "set", tap, "mtu", str(a.mtu), "up")

        # name: (command, base URL, ready line, paths, cycles source: "/stats", "/dataplane" or "proc")
        targets = {
            "dataplane (vio httpd, lwIP on virtio-net)": (
                ["taskset", "-c", "1", VIO, "httpd", "--port", "vhost:" + sock, "--ip", "198.18.0.2/24", "--listen", "8080",
                 "--root", www, "--memory-mb", "256"] + mtu_args, "http://198.18.0.2:8080", "httpd: listening", ["/hello", "/64k.bin"], "/stats"),
            "dataplane, other build (--against)": (
                ["taskset", "-c", "1", a.against or VIO, "httpd", "--port", "vhost:" + sock, "--ip", "198.18.0.2/24", "--listen", "8080",
                 "--root", www, "--memory-mb", "256"] + mtu_args, "http://198.18.0.2:8080", "httpd: listening", ["/hello", "/64k.bin"], "/stats"),
            "dataplane, --idle poll (busy-polling)": (
                ["taskset", "-c", "1", VIO, "httpd", "--port", "vhost:" + sock, "--ip", "198.18.0.2/24", "--listen", "8080",
                 "--root", www, "--memory-mb", "256", "--idle", "poll"] + mtu_args, "http://198.18.0.2:8080", "httpd: listening", ["/hello", "/64k.bin"],
                "/stats"),
            "kernel (SwiftNIO on a veth)": (
                ["taskset", "-c", "1", "ip", "netns", "exec", nss, NIO, "198.19.0.2", "8080", www, "1"],
                "http://198.19.0.2:8080", "vio-nio-httpd: listening", ["/hello", "/64k.bin"], "proc"),
            "Hummingbird on the dataplane": (
                ["taskset", "-c", "1", HB, "--port", "vhost:" + sock, "--ip", "198.18.0.2/24", "--listen", "8080"] + mtu_args,
                "http://198.18.0.2:8080", "hummingbird: listening", ["/hello", "/64k", "/json/bench"], "/dataplane"),
            "Hummingbird on NIOPosix (kernel, veth)": (
                ["taskset", "-c", "1", "ip", "netns", "exec", nss, HB, "--kernel", "198.19.0.2", "--listen", "8080"],
                "http://198.19.0.2:8080", "hummingbird: listening", ["/hello", "/64k", "/json/bench"], "proc"),
        }
        if not a.against:
            del targets["dataplane, other build (--against)"]
        if a.only:
            targets = {k: v for k, v in targets.items() if any(o in k for o in a.only) or "(--against)" in k}
        if a.path:
            targets = {k: v[:3] + ([x for x in v[3] if x in a.path],) + v[4:] for k, v in targets.items()}
            targets = {k: v for k, v in targets.items() if v[3]}
        if not targets:
            sys.exit("httpd.py: --only/--path select nothing")
        hz = tsc_hz()
        runs = {t: {p: [] for p in targets[t][3]} for t in targets}
        for r in range(a.rounds):
            for name, (cmd, base, ready, paths, source) in targets.items():
                log = os.path.join(tmp, "server.log")
                p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                procs.append(p)
                for _ in range(300):
                    if ready in open(log).read() or p.poll() is not None:
                        break
                    time.sleep(0.1)
                if ready not in open(log).read():
                    sys.exit("server did not start: " + open(log).read()[-2000:])
                sh("ip", "netns", "exec", nsc, "curl", "-sS", "-o", "/dev/null", base + "/hello")  # ARP, warm-up
                def cycles():
                    if source == "proc":
                        return kernel_seconds(p.pid) * hz
                    j = json.loads(sh("ip", "netns", "exec", nsc, "curl", "-sS", base + source).stdout)
                    return float(j["busyCycles"])
                for path in paths:
                    c0 = cycles()
                    prof = None
                    if a.perf and source != "proc":
                        os.makedirs(a.perf, exist_ok=True)
                        out = os.path.join(a.perf, "%s-%s-r%d.data" % (re.sub(r"\W+", "_", name)[:40], path.strip("/").replace(".", "_"), r))
                        prof = subprocess.Popen(["perf", "record", "-q", "-F", "1999", "-g", "-p", str(p.pid), "-o", out, "--", "sleep",
                                                 str(max(1, a.seconds - 2))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    w = sh(*client_cpu, "ip", "netns", "exec", nsc, "wrk", "-t2", "-c%d" % a.connections, "-d%ds" % a.seconds, "--latency", base + path,
                           timeout=a.seconds + 60)
                    c1 = cycles()
                    if prof:
                        prof.wait()
                    res = parse_wrk(w.stdout)
                    res["cycles_per_request"] = (c1 - c0) / res["requests"] if res["requests"] else 0
                    if res["rps"] == 0:
                        res["wrk_output"] = w.stdout + w.stderr
                    res["round"] = r
                    runs[name][path].append(res)
                    print("%-45s %-11s round %d: %9.0f req/s  p50 %.2f ms  p99 %.2f ms  %7.0f cycles/req  errors: %s" % (
                        name, path, r, res["rps"], res.get("p50_ms", 0), res.get("p99_ms", 0), res["cycles_per_request"], res["errors"]),
                        flush=True)
                if name.startswith("dataplane"):
                    stats = sh("ip", "netns", "exec", nsc, "curl", "-sS", base + "/stats").stdout
                    with open(os.path.join(ROOT, "Bench/results/httpd-stats-latest.json"), "w") as f:
                        f.write(stats)
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:   # SIGINT is ignored when the bench runs in the background
                    p.terminate()
                    p.wait(10)
        # Idle: CPU of a server nobody talks to, and the first request after a quiet second.
        idle = {}
        for mode in (() if a.no_idle else ("adaptive", "poll")):
            log = os.path.join(tmp, "idle.log")
            p = subprocess.Popen(["taskset", "-c", "1", VIO, "httpd", "--port", "vhost:" + sock, "--ip", "198.18.0.2/24",
                                  "--listen", "8080", "--root", www, "--memory-mb", "256", "--idle", mode],
                                 stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            procs.append(p)
            for _ in range(300):
                if "httpd: listening" in open(log).read():
                    break
                time.sleep(0.1)
            sh("ip", "netns", "exec", nsc, "curl", "-sS", "-o", "/dev/null", "http://198.18.0.2:8080/hello")
            time.sleep(1)
            f0 = open("/proc/%d/stat" % p.pid).read().rsplit(")", 1)[1].split()
            time.sleep(5)
            f1 = open("/proc/%d/stat" % p.pid).read().rsplit(")", 1)[1].split()
            cpu = ((int(f1[11]) + int(f1[12])) - (int(f0[11]) + int(f0[12]))) / CLK_TCK / 5
            time.sleep(1)
            pg = sh("ip", "netns", "exec", nsc, "ping", "-c", "1", "-W", "2", "198.18.0.2", check=False).stdout
            m = re.search(r"time=([\d.]+) ms", pg)
            first_ping = float(m.group(1)) if m else None
            time.sleep(1)
            c = sh("ip", "netns", "exec", nsc, "curl", "-sS", "-o", "/dev/null", "-w", "%{time_total}", "http://198.18.0.2:8080/hello").stdout
            first_curl = float(c) * 1000
            busy = sh("ip", "netns", "exec", nsc, "ping", "-c", "20", "-i", "0.01", "198.18.0.2", check=False).stdout
            m = re.search(r"= [\d.]+/([\d.]+)/", busy)
            idle[mode] = {"cpu_share": cpu, "first_ping_ms": first_ping, "first_curl_ms": first_curl,
                          "ping_avg_ms_back_to_back": float(m.group(1)) if m else None}
            print("idle %-8s: CPU %.2f %% of a core; after 1 s idle: ping %s ms, curl %.2f ms; back-to-back pings avg %s ms" % (
                mode, cpu * 100, first_ping, first_curl, idle[mode]["ping_avg_ms_back_to_back"]), flush=True)
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(10)
        summary = {}
        print()
        print("| server | path | req/s (median round of %d) | p50 | p75 | p90 | p99 | server cycles/request | socket errors |" % a.rounds)
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for name in targets:
            for path in targets[name][3]:
                rs = sorted(runs[name][path], key=lambda x: x["rps"])
                med = rs[(len(rs) - 1) // 2]   # the lower middle round when the count is even
                summary.setdefault(name, {})[path] = {"median": med, "all_rps": [x["rps"] for x in runs[name][path]],
                                                      "all_cycles_per_request": [x["cycles_per_request"] for x in runs[name][path]]}
                print("| %s | %s | %.0f | %.2f ms | %.2f ms | %.2f ms | %.2f ms | %.0f | %s |" % (
                    name, path, med["rps"], med.get("p50_ms", 0), med.get("p75_ms", 0), med.get("p90_ms", 0),
                    med.get("p99_ms", 0), med["cycles_per_request"], med["errors"]))
        ours, other = "dataplane (vio httpd, lwIP on virtio-net)", "dataplane, other build (--against)"
        if ours in runs and other in runs:
            print()
            print("this build / %s, by round (server cycles/request, req/s):" % a.against)
            for path in targets[ours][3]:
                pairs = [(x, y) for x, y in zip(runs[ours][path], runs[other][path]) if x["requests"] and y["requests"]]
                cyc = [x["cycles_per_request"] / y["cycles_per_request"] for x, y in pairs if y["cycles_per_request"]]
                rps = [x["rps"] / y["rps"] for x, y in pairs if y["rps"]]
                g = lambda v: math.exp(sum(math.log(t) for t in v) / len(v)) if v else float("nan")
                summary.setdefault("against", {})[path] = {"cycles_ratio_by_round": cyc, "rps_ratio_by_round": rps,
                                                           "cycles_ratio_geomean": g(cyc), "rps_ratio_geomean": g(rps)}
                print("  %-10s cycles/request %s (geometric mean %.3f); req/s %s (%.3f)" % (
                    path, " ".join("%.3f" % t for t in cyc), g(cyc), " ".join("%.3f" % t for t in rps), g(rps)))
        os.makedirs(os.path.join(ROOT, "Bench/results"), exist_ok=True)
        with open(os.path.join(ROOT, "Bench/results/httpd-latest.json"), "w") as f:
            json.dump({"seconds": a.seconds, "rounds": a.rounds, "connections": a.connections, "tsc_hz": hz, "mtu": a.mtu,
                       "bridge": bridge, "client_cpu": a.client_cpu, "results": summary, "idle": idle}, f, indent=2)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
