#!/usr/bin/env python3
"""Writes Seeds/vhost-reply/*: complete, well-formed backend streams for the vhost-reply target
(byte 0 = the target's control byte, then every reply a cooperative backend would send to
VhostUserConnection for that control byte), so the fuzzer starts from a full handshake and
mutates from there. Run from Fuzz/: python3 Seeds/generate-vhost-reply.py"""
import os
import struct

VERSION_1 = 1 << 32
PROTOCOL_FEATURES = 1 << 30
IN_ORDER = 1 << 35
RING_PACKED = 1 << 34
MQ, REPLY_ACK, CONFIG, STATUS = 1 << 0, 1 << 3, 1 << 9, 1 << 16


def reply(request, payload=b""):
    return struct.pack("<III", request, 0x5, len(payload)) + payload


def stream(control, features, protocol, queue_num=4):
    out = bytearray([control])
    chosen = protocol & (MQ | REPLY_ACK | CONFIG | STATUS) if features & PROTOCOL_FEATURES else 0

    def send(request):  # a message that gets an ack when REPLY_ACK was negotiated
        if chosen & REPLY_ACK:
            out.extend(reply(request, struct.pack("<Q", 0)))

    def status():
        if chosen & STATUS:
            send(39)

    out += reply(1, struct.pack("<Q", features))
    if features & PROTOCOL_FEATURES:
        out += reply(15, struct.pack("<Q", protocol))
        if chosen & MQ:
            out += reply(17, struct.pack("<Q", queue_num))
    status()
    queues = 1 + (control & 3)
    if control & 0x04 and chosen & CONFIG:
        count = 60 if control & 0x80 else 12
        out += reply(24, struct.pack("<III", 0, count, 0) + bytes(range(count)))
    for _ in range(queues):
        send(13)            # SET_VRING_CALL
    send(2)                 # SET_FEATURES
    status()
    send(5)                 # SET_MEM_TABLE
    for rnd in range(2 if control & 0x40 else 1):
        for _ in range(queues):
            if rnd > 0:
                send(13)
            for request in (8, 10, 9, 12):  # NUM, BASE, ADDR, KICK
                send(request)
        if chosen:
            for _ in range(queues):
                send(18)    # SET_VRING_ENABLE 1
        status()
        if control & 0x20 and chosen:
            send(18)
        if chosen:
            for _ in range(queues):
                send(18)    # SET_VRING_ENABLE 0
        for i in range(queues):
            out += reply(11, struct.pack("<II", i, 0))  # GET_VRING_BASE
    return bytes(out)


SEEDS = {
    "plain-split": (0x00, VERSION_1, 0),
    "protocol-no-ack": (0x01, VERSION_1 | PROTOCOL_FEATURES, MQ | STATUS),
    "all-protocol": (0x07, VERSION_1 | PROTOCOL_FEATURES | IN_ORDER, MQ | REPLY_ACK | CONFIG | STATUS),
    "blk-config": (0x84, VERSION_1 | PROTOCOL_FEATURES, REPLY_ACK | CONFIG),
    "restart": (0x4b, VERSION_1 | PROTOCOL_FEATURES | IN_ORDER | RING_PACKED, MQ | REPLY_ACK | STATUS),
    "enable-notify": (0x3e, VERSION_1 | PROTOCOL_FEATURES, MQ | REPLY_ACK | CONFIG | STATUS),
    "everything": (0xff, (1 << 64) - 1, (1 << 64) - 1),
}

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vhost-reply")
os.makedirs(here, exist_ok=True)
for name, (control, features, protocol) in SEEDS.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(stream(control, features, protocol))
