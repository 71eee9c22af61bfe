#!/usr/bin/env bash
# Fails if the release build's per-burst functions call into the Swift runtime for reference
# counting, allocation or exclusivity checks, or call malloc. The functions checked are the ones
# the forwarding loop runs per burst: vio's `step` functions (which inline the fwd work) and the
# VirtioNetPort / SplitVirtqueue burst functions they call.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-.build/release/vio}
[ -x "$bin" ] || swift build -c release --product vio
asm=$(mktemp); trap 'rm -f "$asm"' EXIT
objdump -d --no-show-raw-insn "$bin" > "$asm"
patterns='^\$s3vio4step|^\$s9VirtioNet0aB4PortV(6refill|7rxBurst|7txBurst|9reclaimTX)|^\$s10VirtioCore14SplitVirtqueueV(7publish|7harvest)'
symbols=$(grep -oE '^[0-9a-f]+ <[^>]+>:$' "$asm" | sed 's/^[0-9a-f]* <//; s/>:$//' | grep -E "$patterns" || true)
[ -n "$symbols" ] || { echo "check-hot-path: no hot-path symbols found in $bin"; exit 1; }
bad=0
for sym in $symbols; do
  calls=$(awk -v f="<$sym>:" '$2==f {p=1; next} p && /^$/ {exit} p' "$asm" | grep -oE '(call|jmp) +[0-9a-f]+ <[^>]+>' | sed 's/.*<//; s/>//' | sort -u || true)
  hits=$(printf '%s\n' "$calls" | grep -E 'swift_retain|swift_release|swift_allocObject|swift_beginAccess|swift_bridgeObject|^malloc|swift_slowAlloc' || true)
  if [ -n "$hits" ]; then echo "FAIL $sym calls: $(echo $hits)"; bad=1; else echo "ok   $sym"; fi
done
exit $bad
