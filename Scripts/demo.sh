#!/usr/bin/env bash
# End to end on one machine: set up, build vio (release), start a DPDK vhost-user device
# (dpdk-testpmd net_vhost in macswap mode, pinned to CPU 0) and run `vio fwd --mode txonly` on CPU 1
# against it, printing live rates; the echoed traffic is received and counted too.
#   DURATION=seconds (default 10), SIZE=frame bytes (default 64), MODE=fwd mode (default txonly)
set -euo pipefail
cd "$(dirname "$0")/.."
bash Scripts/setup.sh
swift build -c release --product vio
dir=$(mktemp -d /tmp/vio-demo.XXXXXX)
peer_pid=
cleanup() {
  if [ -n "$peer_pid" ] && kill -0 "$peer_pid" 2>/dev/null; then
    kill -INT "$peer_pid"; for _ in $(seq 50); do kill -0 "$peer_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$peer_pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
taskset -c 0 dpdk-testpmd --lcores 0@0,1@0 --no-pci --no-huge -m 256 --file-prefix "vio-demo-$$" --no-telemetry \
  --vdev "net_vhost0,iface=$dir/peer.sock" -- --forward-mode=macswap --stats-period 5 --auto-start \
  --total-num-mbufs 16384 >"$dir/peer.log" 2>&1 &
peer_pid=$!
for _ in $(seq 100); do [ -S "$dir/peer.sock" ] && break; sleep 0.1; done
[ -S "$dir/peer.sock" ] || { echo "demo: the testpmd peer did not start:"; tail -20 "$dir/peer.log"; exit 1; }
echo "demo: peer dpdk-testpmd (macswap) on CPU 0; vio fwd --mode ${MODE:-txonly} on CPU 1 for ${DURATION:-10} s"
taskset -c 1 .build/release/vio fwd --port "vhost:$dir/peer.sock" --mode "${MODE:-txonly}" \
  --duration "${DURATION:-10}" --size "${SIZE:-64}"
kill -INT "$peer_pid"; wait "$peer_pid" || true; peer_pid=
echo "demo: the peer's own counters:"
sed -n '/Forward statistics for port 0/,/-----------$/p' "$dir/peer.log" | head -4
