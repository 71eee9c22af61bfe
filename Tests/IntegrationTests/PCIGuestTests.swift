import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// virtio-pci in a real guest: QEMU (TCG: nested KVM does not run here) boots a Debian cloud
/// kernel with a busybox initramfs holding this build's `vio`. The guest has a virtio-net-pci
/// function whose host side is a `dpdk-testpmd net_vhost` macswap peer (QEMU `-netdev
/// vhost-user` on shared memfd memory) and a virtio-blk-pci function backed by a raw image. In the
/// guest, `vio` drives both through uio_pci_generic; the guest's results come back over the serial
/// console (`VIO-CHECK name PASS|FAIL …`, JSON reports between markers) and are asserted here,
/// together with the peer's own counters and the bytes of the image file.
final class PCIGuestTests: XCTestCase {
    static let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// Runs Scripts/guest-setup.sh (installs qemu/busybox, unpacks the kernel once) and returns
    /// the guest directory. Skips only when QEMU cannot emulate (no TCG); anything else fails.
    func guestDirectory() throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [Self.repoRoot.appendingPathComponent("Scripts/guest-setup.sh").path]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out; p.standardError = err
        try p.run()
        let o = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let e = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard p.terminationStatus == 0, let dir = o.split(separator: "\n").last.map(String.init) else {
            throw TestFailure("Scripts/guest-setup.sh failed (\(p.terminationStatus)): \(e.suffix(1500))")
        }
        let probe = Process()
        probe.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-system-x86_64")
        probe.arguments = ["-accel", "help"]
        let po = Pipe()
        probe.standardOutput = po; probe.standardError = FileHandle.nullDevice
        try probe.run()
        let accels = String(decoding: po.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        probe.waitUntilExit()
        if !accels.contains("tcg") { throw XCTSkip("this QEMU has no TCG accelerator; the guest tests need emulation (no nested KVM)") }
        return dir
    }

    /// What came back from a guest run.
    struct GuestRun {
        var serial: String
        var checks: [(name: String, passed: Bool, detail: String)] = []
        var json: [String: Any] = [:]
        var exitStatus: Int?

        init(serial: String) {
            self.serial = serial
            var jsonName: String?
            var jsonText = ""
            // The console ends lines with "\r\n", one Character in Swift: split on any newline.
            for raw in serial.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline) {
                let line = String(raw)
                if let name = jsonName {
                    if line == "VIO-JSON-END \(name)" {
                        json[name] = try? JSONSerialization.jsonObject(with: Data(jsonText.utf8))
                        jsonName = nil; jsonText = ""
                    } else { jsonText += line + "\n" }
                } else if line.hasPrefix("VIO-JSON-BEGIN ") {
                    jsonName = String(line.dropFirst(15))
                } else if line.hasPrefix("VIO-CHECK ") {
                    let parts = line.dropFirst(10).split(separator: " ", maxSplits: 2).map(String.init)
                    if parts.count >= 2 { checks.append((parts[0], parts[1] == "PASS", parts.count > 2 ? parts[2] : "")) }
                } else if let r = line.range(of: "VIO-GUEST-EXIT ") {
                    exitStatus = Int(line[r.upperBound...].prefix { $0.isNumber })
                }
            }
        }
        func report(_ name: String) -> [String: Any]? { json[name] as? [String: Any] }
        var tail: String { String(serial.suffix(3000)) }
    }

    /// Builds the initramfs with `script` as the guest's /test.sh and boots QEMU; returns what the
    /// console said. `devices` are -device/-drive/-netdev arguments.
    func boot(script: String, qemuArguments: [String], dir: TempDir, guestDir: String, timeout: Double = 420) throws -> GuestRun {
        let scriptPath = dir.path("test.sh"), initrd = dir.path("initrd.cpio.gz"), serial = dir.path("serial.log")
        try script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        let mk = Process()
        mk.executableURL = URL(fileURLWithPath: "/bin/bash")
        mk.arguments = [Self.repoRoot.appendingPathComponent("Scripts/guest-initramfs.sh").path, initrd, Tools.vio, scriptPath, guestDir]
        let mkErr = Pipe()
        mk.standardError = mkErr
        try mk.run()
        let mkMessage = String(decoding: mkErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        mk.waitUntilExit()
        guard mk.terminationStatus == 0 else { throw TestFailure("guest-initramfs.sh failed: \(mkMessage)") }

        let q = Process()
        q.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
        q.arguments = ["-c", "1", "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1G",
                       "-object", "memory-backend-memfd,id=mem,size=1G,share=on", "-numa", "node,memdev=mem",
                       "-nographic", "-monitor", "none", "-no-reboot", "-serial", "file:\(serial)",
                       "-kernel", "\(guestDir)/vmlinuz", "-initrd", initrd,
                       "-append", "console=ttyS0 hugepages=320 quiet panic=-1"] + qemuArguments
        let qlog = dir.path("qemu.log")
        FileManager.default.createFile(atPath: qlog, contents: nil)
        q.standardOutput = FileHandle(forWritingAtPath: qlog)
        q.standardError = FileHandle(forWritingAtPath: qlog)
        q.standardInput = FileHandle.nullDevice
        try q.run()
        let deadline = Date().addingTimeInterval(timeout)
        while q.isRunning && Date() < deadline { usleep(200_000) }
        let timedOut = q.isRunning
        if timedOut { Glibc.kill(q.processIdentifier, SIGKILL) }
        q.waitUntilExit()
        let text = (try? String(contentsOfFile: serial, encoding: .utf8)) ?? ""
        let run = GuestRun(serial: text)
        if timedOut { throw TestFailure("the guest did not power off within \(Int(timeout)) s; console:\n\(run.tail)") }
        guard run.exitStatus != nil else {
            let ql = (try? String(contentsOfFile: qlog, encoding: .utf8)) ?? ""
            throw TestFailure("the guest stopped without finishing its script (QEMU status \(q.terminationStatus)): \(ql.suffix(800))\nconsole:\n\(run.tail)")
        }
        return run
    }

    /// The guest script's helpers: every check prints one VIO-CHECK line.
    static let prelude = """
    set +e
    check() { n=$1; shift; if "$@"; then echo "VIO-CHECK $n PASS"; else echo "VIO-CHECK $n FAIL command: $*"; fi; }
    # expect_error NAME STATUS TEXT COMMAND...: the command fails with STATUS and says TEXT.
    expect_error() {
      n=$1; want=$2; text=$3; shift 3
      out=$("$@" 2>&1); rc=$?
      echo "$out" | tail -2
      if [ $rc -eq $want ] && echo "$out" | grep -qF "$text"; then echo "VIO-CHECK $n PASS"
      else echo "VIO-CHECK $n FAIL status $rc, wanted $want and '$text': $(echo "$out" | tail -1)"; fi
    }
    # run_json NAME COMMAND...: runs a vio command with --json, prints the report between markers.
    run_json() {
      n=$1; shift
      "$@" --json /tmp/$n.json > /tmp/$n.out 2>&1; rc=$?
      tail -4 /tmp/$n.out
      if [ $rc -eq 0 ]; then echo "VIO-CHECK $n PASS"; else echo "VIO-CHECK $n FAIL exit status $rc: $(tail -3 /tmp/$n.out | tr '\\n' ' ')"; fi
      echo "VIO-JSON-BEGIN $n"; cat /tmp/$n.json 2>/dev/null; echo; echo "VIO-JSON-END $n"
    }

    """

    static let imageSectors: UInt64 = 131_072  // 64 MiB
    /// Pattern writes through `vio blkio` (sector, sectors, seed, segments), checked in the image file.
    static let patternWrites: [(sector: UInt64, sectors: UInt64, seed: UInt64, segments: Int)] = [(40_000, 64, 7, 3), (100_001, 17, 9, 1)]
    /// Written with `--ring split` on the modern function (which runs packed by default).
    static let splitWrite: (sector: UInt64, sectors: UInt64, seed: UInt64, segments: Int) = (70_000, 40, 11, 5)
    static let packets = 20_000
    /// 9000-byte frames: mbuf chains out (descriptor chains, one IOVA per segment), MRG_RXBUF back.
    static let jumboPackets = 300
    /// Frames through the multi-queue function (modern boot).
    static let mqPackets = 9000

    func pattern(seed: UInt64, offset: UInt64) -> UInt8 {
        UInt8(truncatingIfNeeded: (offset &* 31) ^ (seed &* 131) ^ (offset >> 9))
    }

    /// The net and blk checks on one guest boot; `kind` is "modern" or "legacy" for the devices.
    func netAndBlk(legacy: Bool) throws {
        let guestDir = try guestDirectory()
        let dir = try TempDir()
        let peer = try Peer(mode: "macswap", dir: dir)
        // Modern boot: a second, multi-queue net function (mq=on) on a 4-queue vhost-user peer.
        let mqPeer = legacy ? nil : try Peer(mode: "macswap", dir: dir, name: "mqpeer", queues: 4)
        let image = dir.path("disk.img")
        let transitionalImage = dir.path("disk2.img")
        for p in [image, transitionalImage] {
            FileManager.default.createFile(atPath: p, contents: nil)
            let h = FileHandle(forWritingAtPath: p)!
            try h.truncate(atOffset: Self.imageSectors * 512)
            try h.close()
        }
        let kind = legacy ? "legacy" : "modern"
        let flags = legacy ? "disable-legacy=off,disable-modern=on" : "disable-legacy=on"
        var qemu = ["-chardev", "socket,id=c0,path=\(peer.socket)", "-netdev", "vhost-user,id=n0,chardev=c0",
                    // The modern function also offers packed rings (VIRTIO_F_RING_PACKED; the testpmd
                    // backend supports them), which `--ring auto` then takes; legacy cannot.
                    "-device", "virtio-net-pci,netdev=n0,\(flags)\(legacy ? "" : ",packed=on"),addr=0x4",
                    "-drive", "file=\(image),format=raw,if=none,id=d0,cache=writethrough",
                    // The modern blk function offers packed rings too (QEMU's own virtio-blk device).
                    "-device", "virtio-blk-pci,drive=d0,\(flags)\(legacy ? "" : ",packed=on"),addr=0x5"]
        if let mq = mqPeer {
            // 4 queue pairs and a real control queue (index 8) that QEMU processes: VQ_PAIRS_SET
            // there becomes SET_VRING_ENABLE towards the backend; RX mode and MAC_ADDR_SET too.
            qemu += ["-chardev", "socket,id=c1,path=\(mq.socket)", "-netdev", "vhost-user,id=n1,chardev=c1,queues=4",
                     "-device", "virtio-net-pci,netdev=n1,mq=on,vectors=10,disable-legacy=on,addr=0x7"]
        }
        var script = Self.prelude
        script += """
        # Clear errors before binding: an unbound function, a missing address, a non-virtio function
        # (QEMU's VGA at 00:02.0), a virtio function of the wrong type.
        expect_error unbound 1 "0000:00:04.0 is bound to no driver" vio fwd --port pci:0000:00:04.0 --mode rxonly --duration 1
        expect_error nonexistent 1 "no PCI device 0000:00:1f.0" vio fwd --port pci:0000:00:1f.0 --mode rxonly --duration 1
        expect_error not-virtio 1 "0000:00:02.0 is not a virtio device (vendor 0x1234" vio fwd --port pci:0000:00:02.0 --mode rxonly --duration 1
        expect_error wrong-type 1 "0000:00:04.0 is a virtio network device, not block" vio blkbench --dev pci:0000:00:04.0 --runtime 1s
        check bind-net pci-bind 0000:00:04.0 uio_pci_generic
        check bind-blk pci-bind 0000:00:05.0 uio_pci_generic
        run_json pktgen vio pktgen --port pci:0000:00:04.0 --count \(Self.packets) --size 64 --verify --window auto --expect-macswap --memory-mb 192 --mbufs 4096 --restart-every 7001
        check net-says-\(kind) grep -q "virtio-pci 0000:00:04.0 (\(kind))" /tmp/pktgen.out
        run_json pktgen-split vio pktgen --port pci:0000:00:04.0 --ring split --count 3000 --size 64 --verify --window auto --expect-macswap --memory-mb 192 --mbufs 4096
        run_json jumbo vio pktgen --port pci:0000:00:04.0 --count \(Self.jumboPackets) --size 9000 --verify --window auto --expect-macswap --memory-mb 192 --mbufs 4096
        run_json fwd vio fwd --port pci:0000:00:04.0 --mode txonly --duration 2 --memory-mb 192 --mbufs 4096
        run_json blkbench vio blkbench --dev pci:0000:00:05.0 --rw randrw --bs 4k --iodepth 8 --size 16m --runtime 3s --verify
        check blk-says-\(kind) grep -q "virtio-pci 0000:00:05.0 (\(kind))" /tmp/blkbench.out

        """
        let writes = Self.patternWrites
        let cmds = writes.map { "--cmd \"write \($0.sector) \($0.sectors) \($0.seed) \($0.segments)\"" }
            + writes.map { "--cmd \"verify \($0.sector) \($0.sectors) \($0.seed) \($0.segments % 3 + 1)\"" } + ["--cmd flush"]
        script += "run_json blkio vio blkio --dev pci:0000:00:05.0 \(cmds.joined(separator: " "))\n"
        script += "check blkio-ring grep -q \"1 \(legacy ? "split" : "packed") queue(s)\" /tmp/blkio.out\n"
        if !legacy {
            // Multi-queue over PCI: flows over 4 pairs, then VQ_PAIRS_SET down to 1 and back.
            script += "check bind-mq pci-bind 0000:00:07.0 uio_pci_generic\n"
            script += "run_json mq vio pktgen --port pci:0000:00:07.0 --queues 4 --flows 8 --count \(Self.mqPackets) --size 64 --verify --window auto --expect-macswap --pairs-schedule \(Self.mqPackets / 3):1,\(2 * Self.mqPackets / 3):4 --promisc --allmulti --mac 02:00:00:00:00:42 --memory-mb 192 --mbufs 4096\n"
            script += "check mq-control-queue grep -q \"4 of 4 queue pair(s), control queue, promiscuous on, all-multicast on\" /tmp/mq.out\n"
            // The split ring on the same (packed-capable) function, with indirect descriptors.
            let w = Self.splitWrite
            script += "run_json blkio-split vio blkio --dev pci:0000:00:05.0 --ring split --cmd \"write \(w.sector) \(w.sectors) \(w.seed) \(w.segments)\" --cmd \"verify \(w.sector) \(w.sectors) \(w.seed) 1\"\n"
            script += "check blkio-split-ring grep -q \"1 split queue(s)\" /tmp/blkio-split.out\n"
        }
        if !legacy {
            // DEVICE_NEEDS_RESET (§2.1.2): QEMU sets it (virtio_error "wrong value for queue_enable")
            // when queue_enable is written with 0. Done from outside vio, through /dev/mem, while vio
            // runs: the common config is at offset 0 of BAR 4 in QEMU's layout, queue_enable at 28.
            script += """
            needs_reset() {
              n=$1; bdf=$2; shift 2
              bar=$(sed -n 5p /sys/bus/pci/devices/$bdf/resource | cut -d' ' -f1)
              "$@" > /tmp/$n.out 2>&1 &
              pid=$!
              i=0; while ! grep -q "virtio-pci $bdf (modern)" /tmp/$n.out && [ $i -lt 240 ]; do sleep 0.5; i=$((i+1)); done
              sleep 2
              devmem $((bar + 28)) 16 0
              wait $pid; rc=$?
              tail -2 /tmp/$n.out
              if [ $rc -eq 2 ] && grep -q "the device set DEVICE_NEEDS_RESET" /tmp/$n.out; then echo "VIO-CHECK $n PASS"
              else echo "VIO-CHECK $n FAIL status $rc: $(tail -1 /tmp/$n.out)"; fi
            }
            needs_reset blk-needs-reset 0000:00:05.0 vio blkbench --dev pci:0000:00:05.0 --rw randread --bs 4k --iodepth 8 --size 16m --runtime 120s
            needs_reset net-needs-reset 0000:00:04.0 vio fwd --port pci:0000:00:04.0 --mode rxonly --duration 120 --memory-mb 192 --mbufs 4096
            # With --reconnect the same fault is repaired: reset, initialised again, the run goes on
            # to its end (exit 0) with one recovered outage; blkbench --verify finds every block.
            reset_recovers() {
              n=$1; bdf=$2; want=$3; shift 3
              bar=$(sed -n 5p /sys/bus/pci/devices/$bdf/resource | cut -d' ' -f1)
              "$@" > /tmp/$n.out 2>&1 &
              pid=$!
              i=0; while ! grep -q "virtio-pci $bdf (modern)" /tmp/$n.out && [ $i -lt 240 ]; do sleep 0.5; i=$((i+1)); done
              sleep 2
              devmem $((bar + 28)) 16 0
              wait $pid; rc=$?
              tail -3 /tmp/$n.out
              if [ $rc -eq 0 ] && grep -q "reset and initialised again" /tmp/$n.out && grep -q "$want" /tmp/$n.out \
                 && grep -q '"recovered" : true' /tmp/$n.json; then echo "VIO-CHECK $n PASS"
              else echo "VIO-CHECK $n FAIL status $rc: $(tail -1 /tmp/$n.out)"; fi
            }
            reset_recovers blk-reset-recovers 0000:00:05.0 "outages 1 " vio blkbench --dev pci:0000:00:05.0 --rw randwrite --bs 4k --iodepth 8 --size 16m --runtime 20s --verify --reconnect=30s --json /tmp/blk-reset-recovers.json
            # (rxonly: the peer's counters are checked against what the runs above sent.)
            reset_recovers net-reset-recovers 0000:00:04.0 "port 0 outages 1 " vio fwd --port pci:0000:00:04.0 --mode rxonly --duration 20 --reconnect=30s --memory-mb 192 --mbufs 4096 --json /tmp/net-reset-recovers.json

            """
        }
        if legacy {
            // A transitional function (legacy and modern interfaces both on): the driver picks modern.
            qemu += ["-drive", "file=\(transitionalImage),format=raw,if=none,id=d1", "-device", "virtio-blk-pci,drive=d1,addr=0x6"]
            script += """
            check bind-transitional pci-bind 0000:00:06.0 uio_pci_generic
            run_json transitional vio blkio --dev pci:0000:00:06.0 --cmd "write 8 8 3" --cmd "verify 8 8 3 2"
            check transitional-picks-modern grep -q "virtio-pci 0000:00:06.0 (modern)" /tmp/transitional.out

            """
        }
        let run = try boot(script: script, qemuArguments: qemu, dir: dir, guestDir: guestDir)
        let stats = try peer.stop()
        _ = try mqPeer?.stop()
        // The guest's console, from boot on, into the test log (JSON reports left out).
        if let r = run.serial.range(of: "VIO-GUEST-BOOTED") {
            var inJSON = false
            for line in run.serial[r.lowerBound...].split(whereSeparator: \.isNewline) {
                if line.hasPrefix("VIO-JSON-BEGIN") { inJSON = true } else if line.hasPrefix("VIO-JSON-END") { inJSON = false; continue }
                if !inJSON { print("guest(\(kind)): \(line)") }
            }
        }
        print("peer: RX \(stats.rx) TX \(stats.tx)")
        var mqStats: [Peer.Stats]?
        if let p = mqPeer {
            do { mqStats = try p.streamStats(queues: 4) } catch { XCTFail("\(error)") }
        }

        XCTAssertEqual(run.exitStatus, 0, run.tail)
        XCTAssertTrue(run.serial.contains("VIO-GUEST-BOOTED"), run.tail)
        var expected = ["unbound", "nonexistent", "not-virtio", "wrong-type", "bind-net", "bind-blk", "pktgen", "net-says-\(kind)", "pktgen-split", "jumbo", "fwd",
                        "blkbench", "blk-says-\(kind)", "blkio", "blkio-ring"]
        if !legacy { expected += ["bind-mq", "mq", "mq-control-queue", "blkio-split", "blkio-split-ring"] }
        expected += legacy ? ["bind-transitional", "transitional", "transitional-picks-modern"] : ["blk-needs-reset", "net-needs-reset", "blk-reset-recovers", "net-reset-recovers"]
        XCTAssertEqual(run.checks.map(\.name), expected, run.tail)
        for c in run.checks where !c.passed { XCTFail("guest check \(c.name) failed: \(c.detail)\n\(run.tail)") }

        // Net: every frame out and back, intact; the host-side peer's counters agree.
        let pg = run.report("pktgen")
        func n(_ r: [String: Any]?, _ k: String) -> Int? { (r?[k] as? NSNumber)?.intValue }
        XCTAssertEqual(n(pg, "sent"), Self.packets, "\(pg ?? [:])")
        XCTAssertEqual(n(pg, "received"), Self.packets, "\(pg ?? [:])")
        for key in ["lost", "corrupt", "macMismatch", "duplicates", "mbufsInUseAfterStop"] { XCTAssertEqual(n(pg, key), 0, "\(key): \(pg ?? [:])") }
        // Modern: packed rings over PCI (IOVAs, event areas), with a stop/restart (device reset) every
        // 7001 frames; legacy: split. Then the split ring on the same device.
        XCTAssertEqual((pg?["port"] as? [String: Any])?["ring"] as? String, legacy ? "split" : "packed", "\(pg ?? [:])")
        XCTAssertEqual(n(pg, "restarts"), (Self.packets - 1) / 7001, "\(pg ?? [:])")
        let ps = run.report("pktgen-split")
        XCTAssertEqual((ps?["port"] as? [String: Any])?["ring"] as? String, "split", "\(ps ?? [:])")
        XCTAssertEqual(n(ps, "received"), 3000, "\(ps ?? [:])")
        for key in ["lost", "corrupt", "macMismatch", "mbufsInUseAfterStop"] { XCTAssertEqual(n(ps, key), 0, "split \(key): \(ps ?? [:])") }
        let jumbo = run.report("jumbo")
        XCTAssertEqual(n(jumbo, "sent"), Self.jumboPackets, "\(jumbo ?? [:])")
        XCTAssertEqual(n(jumbo, "received"), Self.jumboPackets, "\(jumbo ?? [:])")
        XCTAssertGreaterThan(n(jumbo, "maxSegments") ?? 0, 1, "frames larger than one mbuf travel as chains: \(jumbo ?? [:])")
        for key in ["lost", "corrupt", "macMismatch", "mbufsInUseAfterStop"] { XCTAssertEqual(n(jumbo, key), 0, "jumbo \(key): \(jumbo ?? [:])") }
        let netSent = Self.packets + 3000 + Self.jumboPackets

        if let streams = mqStats {
            // Multi-queue: every frame back once, every pair used before and after the change and
            // only pair 0 while VQ_PAIRS_SET said 1; the peer's per-queue counters agree.
            let mq = run.report("mq")
            XCTAssertEqual(n(mq, "received"), Self.mqPackets, "\(mq ?? [:])")
            for key in ["lost", "corrupt", "macMismatch", "duplicates", "foreign", "mbufsInUseAfterStop"] { XCTAssertEqual(n(mq, key), 0, "mq \(key): \(mq ?? [:])") }
            let queues = mq?["queues"] as? [[String: Any]] ?? []
            XCTAssertEqual(queues.count, 4, "\(mq ?? [:])")
            for (q, s) in streams.enumerated() where q < queues.count {
                XCTAssertEqual(s.rx, UInt64(n(queues[q], "txPackets") ?? -1), "peer RX on queue \(q) = guest TX on queue \(q)")
                XCTAssertEqual(s.tx, UInt64(n(queues[q], "rxPackets") ?? -1), "peer TX on queue \(q) = guest RX on queue \(q)")
            }
            let phases = mq?["pairsPhases"] as? [[String: Any]] ?? []
            XCTAssertEqual(phases.map { $0["pairs"] as? Int }, [4, 1, 4], "\(mq ?? [:])")
            if phases.count == 3 {
                func pq(_ p: Int) -> [[String: Any]] { phases[p]["queues"] as? [[String: Any]] ?? [] }
                for k in 0..<4 {
                    XCTAssertGreaterThan(n(pq(0)[k], "rx") ?? 0, 0, "phase 1: queue \(k) used")
                    XCTAssertGreaterThan(n(pq(2)[k], "rx") ?? 0, 0, "phase 3: queue \(k) used")
                    if k > 0 { XCTAssertEqual(n(pq(1)[k], "rx"), 0, "phase 2: queue \(k) disabled") }
                }
            }
        }

        // Then `vio fwd --mode txonly`: generated frames out, the peer's echoes counted back in.
        let fwd = (run.report("fwd")?["ports"] as? [[String: Any]])?.first
        let fwdTX = n(fwd, "txPackets") ?? 0, fwdRX = n(fwd, "rxPackets") ?? 0
        XCTAssertGreaterThan(fwdTX, 1000, "\(run.report("fwd") ?? [:])")
        XCTAssertGreaterThan(fwdRX, 1000, "\(run.report("fwd") ?? [:])")
        XCTAssertEqual(n(run.report("fwd"), "mbufsInUseAfterStop"), 0)
        // fwd counts a frame when it is queued; up to a ring (256) may still be queued when it stops and resets the device.
        XCTAssertLessThanOrEqual(stats.rx, UInt64(netSent + fwdTX), "the peer received no more than the guest sent: \(peer.tail())")
        XCTAssertGreaterThanOrEqual(stats.rx + 256, UInt64(netSent + fwdTX), "the peer received what the guest sent, but for one ring: \(peer.tail())")
        // Frames still in flight when fwd stopped may have been echoed but not received.
        XCTAssertGreaterThanOrEqual(stats.tx, UInt64(netSent + fwdRX), "the peer sent back at least what the guest received")
        XCTAssertLessThanOrEqual(stats.tx, UInt64(netSent + fwdTX), "the peer cannot echo more than it got")

        // Blk: blkbench verified every read; blkio's commands all succeeded.
        let bb = run.report("blkbench")
        XCTAssertEqual(n(bb, "verifyErrors"), 0, "\(bb ?? [:])")
        XCTAssertEqual(n(bb, "errors"), 0, "\(bb ?? [:])")
        XCTAssertGreaterThan(n(bb, "verified") ?? 0, 100, "\(bb ?? [:])")
        XCTAssertGreaterThan(n(bb, "writes") ?? 0, 100, "\(bb ?? [:])")
        // Modern: packed rings (auto), requests as descriptor chains; legacy: split.
        XCTAssertEqual(bb?["ring"] as? String, legacy ? "split" : "packed", "\(bb ?? [:])")
        XCTAssertEqual(n(bb, "slotsOutstandingAtExit"), 0, "\(bb ?? [:])")
        let results = run.json["blkio"] as? [[String: Any]] ?? []
        XCTAssertEqual(results.count, writes.count * 2 + 1, run.tail)
        for r in results { XCTAssertEqual(r["status"] as? String, "ok", "\(r)") }
        for r in results where r["mismatches"] != nil { XCTAssertEqual(r["mismatches"] as? Int, 0, "\(r)") }
        var imageWrites = writes
        if !legacy {
            let split = run.json["blkio-split"] as? [[String: Any]] ?? []
            XCTAssertEqual(split.map { $0["status"] as? String }, ["ok", "ok"], run.tail)
            XCTAssertEqual(split.last?["mismatches"] as? Int, 0, "\(split)")
            imageWrites.append(Self.splitWrite)
        }

        // The image file: the guest's patterns at exactly their offsets, zeros right around them.
        let data = try Data(contentsOf: URL(fileURLWithPath: image))
        XCTAssertEqual(UInt64(data.count), Self.imageSectors * 512)
        for w in imageWrites {
            let start = Int(w.sector * 512), end = Int((w.sector + w.sectors) * 512)
            var bad = 0
            for off in start..<end where data[off] != pattern(seed: w.seed, offset: UInt64(off)) { bad += 1 }
            XCTAssertEqual(bad, 0, "bytes of the pattern with seed \(w.seed) at sector \(w.sector) that differ in the image")
            XCTAssertTrue(data[(start - 512)..<start].allSatisfy { $0 == 0 }, "the sector before \(w.sector) is untouched")
            XCTAssertTrue(data[end..<(end + 512)].allSatisfy { $0 == 0 }, "the sector after the write at \(w.sector) is untouched")
        }
        if legacy {
            let d2 = try Data(contentsOf: URL(fileURLWithPath: transitionalImage))
            var bad = 0
            for off in (8 * 512)..<(16 * 512) where d2[off] != pattern(seed: 3, offset: UInt64(off)) { bad += 1 }
            XCTAssertEqual(bad, 0, "the transitional device's pattern in its image")
        }
    }

    /// Modern (VIRTIO 1.x, `disable-legacy=on`, ids 0x1041/0x1042) net and blk functions.
    func testModernNetAndBlkInGuest() throws { try netAndBlk(legacy: false) }

    /// Legacy interfaces (transitional ids 0x1000/0x1001 with `disable-modern=on`: I/O BAR 0),
    /// and a transitional function with both interfaces, on which the driver picks modern.
    func testLegacyNetAndBlkInGuest() throws { try netAndBlk(legacy: true) }
}
