#!/usr/bin/env bash
# Fails if the release build's per-burst code calls into the Swift runtime for reference counting,
# allocation or exclusivity checks, or calls malloc. It starts at vio's `step` functions (the
# engine loop over an lcore's streams, one specialisation per ring layout) and follows every direct
# call into our own code (VirtioNetPort bursts, Split/PackedVirtqueue functions, closures),
# checking each function reached.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-.build/release/vio}
[ -x "$bin" ] || swift build -c release --product vio
asm=$(mktemp); trap 'rm -f "$asm"' EXIT
objdump -d --no-show-raw-insn "$bin" > "$asm"
python3 - "$asm" <<'PY'
import re, sys
funcs, cur = {}, None
for line in open(sys.argv[1]):
    m = re.match(r'^[0-9a-f]+ <([^>]+)>:$', line)
    if m: cur = m.group(1); funcs[cur] = set(); continue
    if cur is None: continue
    c = re.search(r'\b(?:call|jmp)\s+[0-9a-f]+ <([^>+]+)(?:\+0x[0-9a-f]+)?>', line)
    if c: funcs[cur].add(c.group(1))
roots = [f for f in funcs if f.startswith('$s3vio4step')]
if len(roots) < 2:
    sys.exit(f"check-hot-path: expected the stream step function for both layouts, found {roots}")
ours = re.compile(r'^\$s(3vio|9VirtioNet|10VirtioCore|4DPDK)')
bad = re.compile(r'swift_retain|swift_release|swift_allocObject|swift_beginAccess|swift_bridgeObject|^malloc|swift_slowAlloc')
seen, todo, failed = set(), list(roots), False
while todo:
    f = todo.pop()
    if f in seen or f not in funcs: continue
    seen.add(f)
    hits = sorted(c for c in funcs[f] if bad.search(c))
    print(("FAIL " if hits else "ok   ") + f + (" calls " + " ".join(hits) if hits else ""))
    failed |= bool(hits)
    todo += [c for c in funcs[f] if ours.match(c)]
print(f"check-hot-path: {len(seen)} functions reachable from {len(roots)} step functions" + (" — FAILED" if failed else ", none calls the runtime"))
sys.exit(1 if failed else 0)
PY
