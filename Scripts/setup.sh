#!/usr/bin/env bash
# Installs what swift-virtio needs on Debian 12 (run as root), idempotently:
#   - DPDK 22.11 (libdpdk-dev; dpdk-dev ships dpdk-testpmd, the vhost-user net peer), libnuma-dev, pkg-config
#   - qemu-system-common (qemu-storage-daemon, the vhost-user-blk peer)
#   - liblwip-dev (the TCP/IP stack of vio httpd), and for its tests and bench: wrk, curl, iproute2
#     (ip netns), ethtool (the MTU 9000 bridge turns off a veth's checksum offload), iputils-ping, python3
#   - Configs/pkgconfig/vio-dpdk.pc into /usr/local/lib/pkgconfig (SwiftPM cannot read Debian's libdpdk.pc)
#   - Scripts/guest-setup.sh: QEMU, busybox and a Debian cloud kernel for the virtio-pci guest tests
#   - 2 MiB hugepages (VIO_HUGEPAGES, default 1024) and a hugetlbfs mount at /dev/hugepages;
#     when that is not possible, says so: everything then runs on DPDK's --no-huge memfd memory.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(libdpdk-dev dpdk-dev libnuma-dev pkg-config qemu-system-common liblwip-dev wrk curl iproute2 ethtool iputils-ping python3)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
fi
mkdir -p /usr/local/lib/pkgconfig
install -m 0644 Configs/pkgconfig/vio-dpdk.pc /usr/local/lib/pkgconfig/vio-dpdk.pc
pkg-config --exists vio-dpdk || { echo "setup: pkg-config cannot find vio-dpdk" >&2; exit 1; }
echo "setup: guest kernel and QEMU for the virtio-pci tests in $(bash Scripts/guest-setup.sh)"

want=${VIO_HUGEPAGES:-1024}
huge=ok
if [ "$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)" -lt "$want" ]; then
  echo "$want" > /proc/sys/vm/nr_hugepages 2>/dev/null || huge=no
fi
if ! grep -q '^[^ ]* /dev/hugepages hugetlbfs' /proc/mounts; then
  mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages 2>/dev/null || huge=no
fi
free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
if [ "$huge" = ok ] && [ "${free:-0}" -gt 0 ]; then
  echo "setup: hugepages: ${free} free 2 MiB pages, hugetlbfs on /dev/hugepages"
else
  echo "setup: hugepages unavailable here; vio falls back to --no-huge memfd memory (slower), hugepage tests skip"
fi
