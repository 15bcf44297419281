#!/usr/bin/env bash
# Self-test of scripts/gpu-check-lib.sh (no GPU needed; CI runs it): a step
# that skipped says SKIP, never ok; a failing or hanging one says so; every
# test of a binary runs in its own process; the glibc check refuses an older
# host in one line.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu-check-lib.sh
. scripts/gpu-check-lib.sh
out="$(mktemp -d)"
summary="$out/summary.txt"
: > "$summary"
bad=0
expect() {  # expect NAME STATUS
  if ! grep -Eq "^$1 +$2 " "$summary"; then echo "FAILED: step $1 should be $2:"; cat "$summary"; bad=1; fi
}

step ran 5 sh -c 'echo test result: ok'
step skipped 5 sh -c 'echo "skipped: no cuda backend (no driver)"; echo "test result: ok"'
step failed 5 sh -c 'exit 3'
step hung 1 sleep 5
skip not-run "no hardware Vulkan adapter"
expect ran ok
expect skipped SKIP
expect failed 'FAIL\(3\)'
expect hung TIMEOUT
expect not-run SKIP

# A fake test binary: `--list` prints two tests; running one records its name.
fake="$out/fake-tests"
cat > "$fake" <<FAKE
#!/bin/sh
if [ "\$1" = --list ]; then printf 'a_works: test\nb_faults: test\n\n2 tests, 0 benchmarks\n'; exit 0; fi
echo "\$@ FOO=\$FOO" >> "$out/calls"
[ "\$2" = b_faults ] && exit 101
exit 0
FAKE
chmod +x "$fake"
tests_each fam 5 "$fake" FOO=bar
expect fam:a_works ok
expect fam:b_faults 'FAIL\(101\)'
if [ "$(wc -l < "$out/calls")" -ne 2 ] || ! grep -q -- "--exact a_works --test-threads 1 FOO=bar" "$out/calls"; then
  echo "FAILED: tests_each should run each test alone with the environment given:"; cat "$out/calls"; bad=1
fi
if summary_exit > /dev/null; then echo "FAILED: summary_exit must fail when a step failed"; bad=1; fi
: > "$summary"; step ran 5 true; skip x y
summary_exit | grep -q "1 step(s) did not run on the GPU" || { echo "FAILED: SKIP count not reported"; bad=1; }

if msg="$(GPU_CHECK_HOST_GLIBC=2.31 glibc_check 2.35 2>&1)"; then echo "FAILED: glibc 2.31 must be refused for 2.35"; bad=1; fi
[ "$(printf '%s\n' "$msg" | wc -l)" -eq 1 ] && [[ "$msg" == *"glibc >= 2.35"*"has 2.31"* ]] || { echo "FAILED: glibc message: $msg"; bad=1; }
GPU_CHECK_HOST_GLIBC=2.39 glibc_check 2.35 || { echo "FAILED: glibc 2.39 must pass for 2.35"; bad=1; }
GPU_CHECK_HOST_GLIBC=2.35 glibc_check 2.35 || { echo "FAILED: glibc 2.35 must pass for 2.35"; bad=1; }

# wgpu/CUDA ratios: rows matched by key, time columns inverted, rate columns not.
printf '| dtype | n | cuda ms | cuda GFLOP/s |\n|---|---:|---:|---:|\n| f32 | 1024 | 0.100 | 21000 |\n| bf16 | 1024 | 0.050 | 42000 |\n' > "$out/c.md"
printf '| dtype | n | wgpu ms | wgpu GFLOP/s |\n|---|---:|---:|---:|\n| f32 | 1024 | 0.400 | 5250 |\n| f16 | 1024 | 0.3 | 1 |\n' > "$out/w.md"
got="$(ratio 1,2 3 time "$out/c.md" "$out/w.md")"
[ "$got" = "| f32 1024 | 0.100 | 0.400 | 0.25× |" ] || { echo "FAILED: matmul ratio: $got"; bad=1; }
printf '| precision | a | b | c | d | e | f | g | tokens/s |\n| f32 | 1 | 2 | 3 | 4 | 5 | 6 | 1.0 | 1000 |\n' > "$out/ct.md"
printf '| precision | a | b | c | d | e | f | g | tokens/s |\n| f32 | 1 | 2 | 3 | 4 | 5 | 6 | 1.0 | 600 |\n' > "$out/wt.md"
got="$(ratio 1 9 rate "$out/ct.md" "$out/wt.md")"
[ "$got" = "| f32 | 1000 | 600 | 0.60× |" ] || { echo "FAILED: train ratio: $got"; bad=1; }
[ -z "$(ratio 1 9 rate "$out/ct.md" "$out/missing.md")" ] || { echo "FAILED: a missing log gives no rows"; bad=1; }

# World-2 NCCL: one SKIP line on a 1-GPU machine; on 2 GPUs two ranks run with
# RANK/LOCAL_RANK/WORLD_SIZE set and their losses are compared with world 1's.
: > "$summary"
got="$(GPU_CHECK_NGPU=1 nccl_world2 /nonexistent)"
[[ "$got" == *"SKIP: world-2 NCCL needs 2 GPUs, this machine has 1"* ]] || { echo "FAILED: nccl_world2 on 1 GPU: $got"; bad=1; }
expect nccl-world2-train SKIP
expect nccl-world2-bench SKIP
nb="$out/fake-dynsparse"
cat > "$nb" <<FAKE
#!/bin/sh
echo "rank=\${RANK:-none} local=\${LOCAL_RANK:-none} world=\${WORLD_SIZE:-none} \$*" >> "$out/nccl-calls"
o=""; prev=""
for a in "\$@"; do [ "\$prev" = --out ] && o="\$a"; prev="\$a"; done
if [ -n "\$o" ] && [ "\${RANK:-0}" = 0 ]; then
  mkdir -p "\$o"; printf 'step,loss\n1,5.0\n2,4.5\n' > "\$o/log.csv"
  [ -n "\${FAKE_DRIFT:-}" ] && [ -n "\${RANK:-}" ] && printf 'step,loss\n1,5.0\n2,4.6\n' > "\$o/log.csv"
fi
exit 0
FAKE
chmod +x "$nb"
: > "$summary"; : > "$out/nccl-calls"
GPU_CHECK_NGPU=2 nccl_world2 "$nb" > /dev/null
expect nccl-world1-ref ok
expect nccl-world2-train ok
expect nccl-world2-same-losses ok
expect nccl-world2-bench ok
grep -q "rank=1 local=1 world=2 --backend cuda train .*--batch 2" "$out/nccl-calls" || { echo "FAILED: rank 1 not started:"; cat "$out/nccl-calls"; bad=1; }
grep -q "rank=0 local=0 world=2 bench allreduce --collective nccl" "$out/nccl-calls" || { echo "FAILED: nccl bench not started"; bad=1; }
: > "$summary"
FAKE_DRIFT=1 GPU_CHECK_NGPU=2 nccl_world2 "$nb" > /dev/null
expect nccl-world2-same-losses 'FAIL\(1\)'
printf 'step,loss\n1,5\n' > "$out/a.csv"; printf 'step,loss\n1,5\n2,4\n' > "$out/b.csv"
same_losses 1e-6 "$out/a.csv" "$out/b.csv" > /dev/null && { echo "FAILED: same_losses must refuse logs of different lengths"; bad=1; }
same_losses 1e-6 "$out/a.csv" "$out/a.csv" > /dev/null || { echo "FAILED: same_losses of a log with itself"; bad=1; }

rm -rf "$out"
[ "$bad" -eq 0 ] && echo "gpu-check self-test: ok"
exit "$bad"
