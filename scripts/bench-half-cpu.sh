#!/bin/bash
# Side-by-side before/after, alternating, one precision per process; reports
# the bench's tokens/s and the process CPU seconds (user+sys), which the
# machine's load (other engineers' builds) disturbs far less than wall time.
B=${BEFORE:-/tmp/b15/dynsparse-before}; A=${AFTER:-target/release/dynsparse}
TIMEFORMAT='%U %S'
run() { local label=$1; shift; local bin=$1; shift
  local out t
  { t=$( { time "$bin" --backend cpu bench train "$@" > "${TMPDIR:-/tmp}/bench-half-out.txt" 2>&1; } 2>&1 ); }
  tok=$(grep -E '^\| (f32|f16|bf16) ' "${TMPDIR:-/tmp}/bench-half-out.txt" | awk -F'|' '{gsub(/ /,"",$10); print $10}')
  echo "$label | $* | tok/s $tok | cpu $(echo $t | awk '{print $1+$2}') | load $(cut -d' ' -f1 /proc/loadavg)"
}
for cfg in "--attention dense --batch 4 --seq 512 --steps 3" "--attention sparse --batch 1 --seq 2048 --steps 2" "--attention sparse --batch 4 --seq 512 --steps 3" "--attention dense --batch 1 --seq 2048 --steps 2"; do
  for p in f32 bf16 f16; do
    run before $B $cfg --precisions $p; run after $A $cfg --precisions $p
  done
done
for p in f32 bf16 f16; do
  DYNSPARSE_CPU_SIMD=portable run before-portable $B --attention dense --batch 4 --seq 512 --steps 3 --precisions $p
  DYNSPARSE_CPU_SIMD=portable run after-portable $A --attention dense --batch 4 --seq 512 --steps 3 --precisions $p
done
