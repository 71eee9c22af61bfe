#!/bin/sh
# Binds a PCI function to a driver through sysfs (what dpdk-devbind.py does; POSIX sh, so it
# also runs under busybox in the test guest):
#   Scripts/pci-bind.sh 0000:00:04.0 uio_pci_generic   # unbind the current driver, bind this one
#   Scripts/pci-bind.sh 0000:00:04.0 none              # unbind only
# The driver's module must be loaded (modprobe uio_pci_generic). Exit 1 with a message on failure.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 DDDD:BB:DD.F DRIVER|none" >&2; exit 64; }
bdf=$1; drv=$2
dev=/sys/bus/pci/devices/$bdf
[ -d "$dev" ] || { echo "pci-bind: no PCI device $bdf" >&2; exit 1; }
if [ -e "$dev/driver" ]; then
  cur=$(basename "$(readlink "$dev/driver")")
  [ "$cur" = "$drv" ] && { echo "pci-bind: $bdf already bound to $drv"; exit 0; }
  echo "$bdf" > "$dev/driver/unbind"
fi
[ "$drv" = none ] && { echo "pci-bind: $bdf unbound"; exit 0; }
[ -d "/sys/bus/pci/drivers/$drv" ] || { echo "pci-bind: driver $drv is not loaded" >&2; exit 1; }
# driver_override makes the next probe pick this driver for this function only.
echo "$drv" > "$dev/driver_override"
echo "$bdf" > /sys/bus/pci/drivers_probe 2>/dev/null || echo "$bdf" > "/sys/bus/pci/drivers/$drv/bind"
echo "" > "$dev/driver_override" 2>/dev/null || true
[ -e "$dev/driver" ] && [ "$(basename "$(readlink "$dev/driver")")" = "$drv" ] || { echo "pci-bind: binding $bdf to $drv failed" >&2; exit 1; }
echo "pci-bind: $bdf bound to $drv"
