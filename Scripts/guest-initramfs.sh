#!/usr/bin/env bash
# Builds the initramfs of the virtio-pci test guest:
#   Scripts/guest-initramfs.sh OUT.cpio.gz VIO_BINARY GUEST_SCRIPT [GUEST_DIR]
# It holds busybox, the vio binary with every shared library ldd lists (and the loader), the DPDK
# plugins EAL loads (only mempool_ring, bus_vdev and bus_pci: EAL loads every file in its plugin
# folder and stops on one whose libraries are missing), uio/uio_pci_generic from GUEST_DIR
# (Scripts/guest-setup.sh), Scripts/pci-bind.sh, and an /init that mounts proc/sys/dev/hugetlbfs,
# loads the modules, runs GUEST_SCRIPT with sh, prints "VIO-GUEST-EXIT <status>" on the console
# and powers off.
set -euo pipefail
out=$1; vio=$2; script=$3
here=$(cd "$(dirname "$0")" && pwd)
gdir=${4:-${VIO_GUEST_DIR:-/var/cache/vio-guest}}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,var/run,run,lib/modules,etc,mnt,dev/hugepages}
cp /bin/busybox "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
cp "$vio" "$root/bin/vio"
plugdir=$(ls -d /usr/lib/x86_64-linux-gnu/dpdk/pmds-* | head -1)
plugins=()
for p in mempool_ring bus_vdev bus_pci; do plugins+=("$plugdir/librte_$p.so"); done
copy_libs() {
  ldd "$1" | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
copy_libs "$vio"
mkdir -p "$root$plugdir"
for p in "${plugins[@]}"; do
  cp -L "$p" "$root$plugdir/$(basename "$p")"
  copy_libs "$p"
done
mkdir -p "$root/lib64"; cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
cp "$gdir"/modules/*.ko "$root/lib/modules/"
cp "$here/pci-bind.sh" "$root/bin/pci-bind"
cp "$script" "$root/test.sh"
cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/hugepages /var/run /tmp
mount -t hugetlbfs nodev /dev/hugepages
mount -t tmpfs tmp /tmp
echo "VIO-GUEST-BOOTED $(uname -r) hugepages=$(cat /proc/sys/vm/nr_hugepages)"
insmod /lib/modules/uio.ko && insmod /lib/modules/uio_pci_generic.ko || echo "VIO-GUEST-FAIL cannot load uio_pci_generic"
sh /test.sh
echo "VIO-GUEST-EXIT $?"
sync
poweroff -f
INIT
chmod +x "$root/init" "$root/test.sh" "$root/bin/pci-bind"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
