#!/usr/bin/env bash
# Side-by-side throughput of DPDK's C virtio_user PMD (the yardstick) and swift-virtio's `vio`
# against the same DPDK vhost-user peer (dpdk-testpmd net_vhost, CPU 0); each driver on CPU 1.
# Alternates C and Swift in short runs (this VM's speed is bimodal over seconds) and reports each
# side's median and best of the per-second rates.
#   ROUNDS (default 3) SECONDS per run (default 5) MEMORY hugepages|nohuge (default: hugepages if free)
#   SCENARIOS (default "txonly echo") SIZE (default 64) INORDER 1|0 (default 1)
# Prints a table and appends it, with this command line, to Bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}; SECS=${SECONDS_PER_RUN:-5}; SIZE=${SIZE:-64}; INORDER=${INORDER:-1}
SCENARIOS=${SCENARIOS:-"txonly echo"}
VIO=${VIO:-.build/release/vio}
[ -x "$VIO" ] || swift build -c release --product vio
free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
MEMORY=${MEMORY:-$([ "${free:-0}" -ge 256 ] && grep -q hugetlbfs /proc/mounts && echo hugepages || echo nohuge)}
dir=$(mktemp -d /tmp/vio-bench.XXXXXX)
peer_pid=
stop_peer() {
  if [ -n "$peer_pid" ] && kill -0 "$peer_pid" 2>/dev/null; then
    kill -INT "$peer_pid"; for _ in $(seq 50); do kill -0 "$peer_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$peer_pid" 2>/dev/null || true; wait "$peer_pid" 2>/dev/null || true
  fi
  peer_pid=
}
trap 'stop_peer; [ -n "${KEEP:-}" ] || rm -rf "$dir"' EXIT
start_peer() { # mode
  rm -f "$dir/peer.sock"
  taskset -c 0 dpdk-testpmd --lcores 0@0,1@0 --no-pci --no-huge -m 512 --file-prefix "vio-bench-peer-$$" --no-telemetry \
    --vdev "net_vhost0,iface=$dir/peer.sock" -- --forward-mode="$1" --stats-period 10 --auto-start \
    --total-num-mbufs 32768 --txpkts "$SIZE" >"$dir/peer.log" 2>&1 &
  peer_pid=$!
  for _ in $(seq 100); do [ -S "$dir/peer.sock" ] && return 0; sleep 0.1; done
  echo "peer did not start"; tail "$dir/peer.log"; exit 1
}
c_mem=(--no-huge -m 256); v_mem=(--memory nohuge)
[ "$MEMORY" = hugepages ] && { c_mem=(-m 256 --in-memory --single-file-segments); v_mem=(--memory hugepages); }
inorder_c="in_order=$INORDER"; inorder_v=(); [ "$INORDER" = 1 ] || inorder_v=(--no-in-order)

run_c() { # fwd-mode column(tx|rx) -> per-second Mpps lines
  local extra=(); [ "$1" = io ] && extra=(--tx-first)
  timeout -s INT $((SECS + 2)) taskset -c 1 dpdk-testpmd --lcores 0@1,1@1 --no-pci "${c_mem[@]}" --file-prefix "vio-bench-c-$$" \
    --no-telemetry --vdev "net_virtio_user0,path=$dir/peer.sock,$inorder_c,queue_size=256" -- --forward-mode="$1" \
    --stats-period 1 --auto-start --txd 256 --rxd 256 --total-num-mbufs 16384 --txpkts "$SIZE" "${extra[@]}" >"$dir/c.log" 2>&1 || true
  local key=Tx-pps; [ "$2" = rx ] && key=Rx-pps
  grep "$key" "$dir/c.log" | awk '{print $2/1e6}' | tail -n +3 | head -n $((SECS - 1))
}
run_v() { # fwd-mode column
  local extra=(); [ "$1" = io ] && extra=(--tx-first 1)
  taskset -c 1 "$VIO" fwd --port "vhost:$dir/peer.sock" --mode "$1" --duration "$((SECS + 1))" --size "$SIZE" --ring-size 256 \
    "${v_mem[@]}" "${inorder_v[@]}" "${extra[@]}" >"$dir/v.log" 2>&1 || true
  if [ "$2" = rx ]; then grep '^port 0: rx' "$dir/v.log" | awk '{print $4}'; else grep '^port 0: rx' "$dir/v.log" | awk -F'tx' '{print $2}' | awk '{print $1}'; fi | tail -n +3 | head -n $((SECS - 1))
}
stats() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "0 0"; exit} m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; print m, a[NR]}'; }

table="| scenario | memory | in_order | size | C median Mpps | C best | Swift median Mpps | Swift best | Swift/C (median) |\n|---|---|---|---|---|---|---|---|---|\n"
for sc in $SCENARIOS; do
  case $sc in
    txonly) peer=rxonly; mode=txonly; col=tx ;;
    rxonly) peer=txonly; mode=rxonly; col=rx ;;
    echo)   peer=macswap; mode=io; col=rx ;;
    *) echo "unknown scenario $sc"; exit 2 ;;
  esac
  start_peer "$peer"
  : >"$dir/c.all"; : >"$dir/v.all"
  for r in $(seq "$ROUNDS"); do
    run_c "$mode" "$col" >>"$dir/c.all"
    run_v "$mode" "$col" >>"$dir/v.all"
  done
  stop_peer
  read -r cm cb < <(stats <"$dir/c.all"); read -r vm vb < <(stats <"$dir/v.all")
  ratio=$(awk -v a="$vm" -v b="$cm" 'BEGIN {printf "%.2f", (b>0)?a/b:0}')
  row="| $sc | $MEMORY | $INORDER | $SIZE | $cm | $cb | $vm | $vb | $ratio |"
  echo "$row"
  table+="$row\n"
done
{
  rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown); git diff --quiet HEAD -- Sources 2>/dev/null || rev="$rev+local changes"
  echo; echo "### $(date -u +%Y-%m-%dT%H:%MZ) — $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) — commit $rev"
  echo; echo "\`ROUNDS=$ROUNDS SECONDS_PER_RUN=$SECS MEMORY=$MEMORY SIZE=$SIZE INORDER=$INORDER SCENARIOS=\"$SCENARIOS\" Bench/compare.sh\`"
  echo; printf "%b" "$table"
} >>Bench/RESULTS.md
