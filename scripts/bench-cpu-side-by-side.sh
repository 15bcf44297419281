#!/bin/bash
# CPU training step, binaries side by side: for each round, each config, each
# binary in turn, one `dynsparse --backend cpu bench train` process, printing
# the bench's tokens/s per precision (median of its timed steps), the process's
# user+sys CPU seconds (start-up included) and the load average at its start.
# Run it on a quiet machine: only rows measured side by side compare.
#
#   BINS="/path/old/dynsparse target/release/dynsparse" scripts/bench-cpu-side-by-side.sh [ROUNDS] [STEPS]
#   env: CFGS (default "dense:4:512"; ATTENTION:BATCH:SEQ, space-separated),
#        PREC (default f32; e.g. f32,bf16,f16)
set -u
ROUNDS=${1:-3}
STEPS=${2:-10}
CFGS=${CFGS:-dense:4:512}
PREC=${PREC:-f32}
[ -n "${BINS:-}" ] || { echo "set BINS to the binaries to compare" >&2; exit 2; }
for bin in $BINS; do [ -x "$bin" ] || { echo "not executable: $bin" >&2; exit 2; }; done
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
echo "# $(date -u '+%F %T UTC'), $(nproc) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), rounds=$ROUNDS steps=$STEPS"
for r in $(seq "$ROUNDS"); do
  for cfg in $CFGS; do
    IFS=: read -r att b s <<< "$cfg"
    for bin in $BINS; do
      load=$(cut -d' ' -f1 /proc/loadavg)
      out=$(/usr/bin/time -o "$tmp" -f "%U %S" "$bin" --backend cpu bench train --attention "$att" --batch "$b" \
            --seq "$s" --steps "$STEPS" --precisions "$PREC" 2>/dev/null)
      tok=$(echo "$out" | awk -F'|' '{g=$2; gsub(/ /,"",g)} g=="f32"||g=="bf16"||g=="f16" {t=$10; gsub(/ /,"",t); printf "%s=%s ", g, t}')
      echo "$r $att ${b}x${s} $bin load=$load ${tok}cpu=$(awk '{printf "%.2f", $1+$2}' "$tmp")"
    done
  done
done
