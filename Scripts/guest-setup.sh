#!/usr/bin/env bash
# Prepares what the virtio-pci guest tests need (Debian 12, as root), idempotently:
#   - qemu-system-x86 (TCG emulation: nested KVM does not run on our machines), busybox-static
#   - a Debian cloud kernel (linux-image-6.1.0-*-cloud-amd64-unsigned, unpacked, not installed):
#     vmlinuz and the modules the guest loads (uio, uio_pci_generic) in $VIO_GUEST_DIR
#     (default /var/cache/vio-guest). Prints that directory on the last line.
set -euo pipefail
dir=${VIO_GUEST_DIR:-/var/cache/vio-guest}
packages=(qemu-system-x86 busybox-static cpio)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "guest-setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q "${missing[@]}" >&2
fi
if [ ! -f "$dir/vmlinuz" ] || [ ! -f "$dir/modules/uio_pci_generic.ko" ]; then
  mkdir -p "$dir"
  pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -1)
  if [ -z "$pkg" ]; then
    apt-get update -q >&2
    pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -1)
  fi
  [ -n "$pkg" ] || { echo "guest-setup: no linux-image-6.1.0-*-cloud-amd64-unsigned package found" >&2; exit 1; }
  echo "guest-setup: unpacking $pkg" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download "$pkg" >&2 && dpkg -x ./*.deb x)
  cp "$tmp"/x/boot/vmlinuz-* "$dir/vmlinuz"
  mkdir -p "$dir/modules"
  for m in uio uio_pci_generic; do
    f=$(find "$tmp/x/lib/modules" -name "$m.ko*" | head -1)
    [ -n "$f" ] || { echo "guest-setup: module $m not in $pkg" >&2; exit 1; }
    case "$f" in
      *.xz) xz -dc "$f" > "$dir/modules/$m.ko" ;;
      *.zst) zstd -dc "$f" > "$dir/modules/$m.ko" ;;
      *) cp "$f" "$dir/modules/$m.ko" ;;
    esac
  done
  echo "$pkg" > "$dir/kernel-package"
  rm -rf "$tmp"
fi
echo "$dir"
