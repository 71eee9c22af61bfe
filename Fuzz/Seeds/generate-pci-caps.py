#!/usr/bin/env python3
"""Writes Seeds/pci-caps/*: inputs for the pci-caps target that reach an opened transport, which
a fuzzer finds slowly on its own (a capability chain pointing into a BAR that holds a plausible
common config). Byte layout as PCICaps.swift reads it. Run from Fuzz/: python3 Seeds/generate-pci-caps.py"""
import os
import struct


def config_space(device_id, msix=False):
    c = bytearray(256)
    struct.pack_into("<HH", c, 0, 0x1AF4, device_id)
    struct.pack_into("<H", c, 6, 0x10)          # status: capability list
    c[0x34] = 0x40
    caps = [  # (next, type, bar, offset, length, extra)
        (0x50, 1, 4, 0x0000, 0x38, b""),          # common
        (0x60, 3, 4, 0x1000, 4, b""),             # ISR
        (0x70, 4, 4, 0x2000, 0x100, b""),         # device config
        (0x88 if msix else 0, 2, 4, 0x3000, 0x1000, struct.pack("<I", 4)),  # notify, multiplier 4
    ]
    at = 0x40
    for nxt, kind, bar, off, length, extra in caps:
        struct.pack_into("<BBBBBBxxII", c, at, 0x09, nxt, 16 + len(extra), kind, bar, 0, off, length)
        c[at + 16:at + 16 + len(extra)] = extra
        at = nxt
    if msix:
        struct.pack_into("<BBH", c, 0x88, 0x11, 0, 0x8000)  # MSI-X, enabled
    return bytes(c)


def common_config(features=1, queues=2, size=256):
    c = bytearray(64)
    struct.pack_into("<I", c, 4, features)      # device_feature (same word for both selects)
    struct.pack_into("<H", c, 18, queues)       # num_queues
    struct.pack_into("<H", c, 24, size)         # queue_size
    return bytes(c)


def legacy_registers(features=0x8000, size=256):
    r = bytearray(32)
    struct.pack_into("<I", r, 0, features)      # device features (MRG_RXBUF)
    struct.pack_into("<H", r, 12, size)         # queue size
    return bytes(r)


def bars(spec):
    """spec: {bar: (kind byte, contents)}; the others absent."""
    out = bytearray()
    for i in range(6):
        if i not in spec:
            out.append(0)
            continue
        kind, contents = spec[i]
        out.append(kind)
        out.append(len(contents) // 4)
        out += contents
    return bytes(out)


STEPS = bytes([3, 0, 0, 8, 0, 4, 0, 16, 2]) + bytes(48)  # config reads, queue sizes, features, queues

seeds = {
    # Through sysfs: modern net (BAR 4 memory, 16 KiB), then legacy (BAR 0 I/O, 32 bytes).
    "sysfs-modern": bytes([0x01, 0x00]) + config_space(0x1041) + bytes([0, 0])
        + bars({4: (0x0A, common_config())}) + STEPS,
    "sysfs-transitional-legacy": bytes([0x09, 0x00]) + config_space(0x1000, msix=True) + bytes([2, 0])
        + bars({0: (0x01, legacy_registers()), 4: (0x0A, common_config())}) + STEPS,
    # Fuzzed registers: modern (common 56, notify 0x100, multiplier 4, device 16), then legacy.
    "registers-modern": bytes([0x02, 0x00]) + bytes(256) + bytes([64]) + common_config()
        + bytes([0, 0, 1, 0, 0]) + STEPS,
    "registers-legacy": bytes([0x42, 0x00]) + bytes(256) + bytes([32]) + legacy_registers()
        + bytes([0, 0, 0]) + STEPS,
}

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pci-caps")
os.makedirs(here, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(data)
