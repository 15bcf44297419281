#!/usr/bin/env bash
# Functions of gpu-bundle/run.sh (copied into the bundle as lib.sh), kept
# apart so scripts/test-gpu-check.sh can check them without a GPU.
#
# The summary says `ok` only for a step whose command ran and exited 0 without
# printing a test harness "skipped:" line; a step that skipped its work (no
# device, no adapter) says SKIP, one that was not run at all says SKIP with why.
#
# Needs: $out (log folder) and $summary (summary file) set by the caller.

# glibc_check REQUIRED: one line and a failure when the host's glibc is older
# than the bundle's binaries need (GPU_CHECK_HOST_GLIBC overrides the host's,
# for the self-test).
glibc_check() {
  local need="$1" have
  [ -n "$need" ] || return 0
  have="${GPU_CHECK_HOST_GLIBC:-$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')}"
  [ -n "$have" ] || have="$(ldd --version 2>/dev/null | head -n1 | grep -o '[0-9][0-9.]*$')"
  if [ -z "$have" ]; then
    echo "gpu-check: could not tell this machine's glibc version; the bundle needs glibc >= $need (continuing)" >&2
    return 0
  fi
  if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
    echo "gpu-check: this bundle needs glibc >= $need (its binaries were built against it) but this machine has $have: run it on a newer distribution (Ubuntu 22.04+, Debian 12+) or rebuild on one as old as this" >&2
    return 1
  fi
}

record() {  # record NAME STATUS SECONDS LOG
  printf '%-40s %-10s %5ss  %s\n' "$1" "$2" "$3" "$4" >> "$summary"
}

# skip NAME WHY: a step that was not run.
skip() {
  echo "==== $1: SKIP ($2)"
  record "$1" SKIP 0 "$2"
}

# step NAME TIMEOUT_S CMD...: runs CMD with a timeout, its output in $out/NAME.log.
step() {
  local name="$1" limit="$2"; shift 2
  local log="$out/${name//[^A-Za-z0-9_.-]/_}.log" t0 rc status
  t0=$(date +%s)
  echo "==== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) if grep -q '^skipped:' "$log"; then status=SKIP; else status=ok; fi ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL($rc)" ;;
  esac
  tail -n 25 "$log"
  record "$name" "$status" "$(( $(date +%s) - t0 ))" "$log"
}

# tests_each PREFIX TIMEOUT_S BIN [ENV=VALUE...]: every test of a test binary
# in its own process, so a kernel fault (which poisons the CUDA context for
# the rest of its process) fails the one test that caused it. ONLY (a regex)
# restricts the tests, EXCEPT (a regex) leaves some out.
tests_each() {
  local prefix="$1" limit="$2" bin="$3"; shift 3
  local names t
  names="$("$bin" --list 2>/dev/null | sed -n 's/: test$//p' | grep -E "${ONLY:-.}" | grep -Ev "${EXCEPT:-^$}")"
  if [ -z "$names" ]; then
    skip "$prefix" "no tests listed by $(basename "$bin")"
    return
  fi
  for t in $names; do
    step "$prefix:$t" "$limit" env "$@" "$bin" --exact "$t" --test-threads 1
  done
}

# ratio KEYS VAL MODE CUDA_LOG WGPU_LOG: the wgpu/CUDA ratio of one column of
# two `bench` Markdown tables, rows matched by their key columns. KEYS: the
# key columns (1-based, comma-separated), VAL: the value column; MODE `time`
# (lower is better: ratio = cuda / wgpu) or `rate` (higher is better: ratio =
# wgpu / cuda). Prints `| key | cuda | wgpu | wgpu/cuda |` rows; a row of one
# log without its twin in the other is left out.
ratio() {
  local keys="$1" val="$2" mode="$3" cuda="$4" wgpu="$5"
  [ -s "$cuda" ] && [ -s "$wgpu" ] || return 0
  awk -F'|' -v keys="$keys" -v val="$val" -v mode="$mode" '
    function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
    function key(   n, i, k, ks) { n = split(keys, ks, ","); k = ""; for (i = 1; i <= n; i++) k = k (i > 1 ? " " : "") trim($(ks[i] + 1)); return k }
    /^\|/ {
      v = trim($(val + 1)); sub(/[^0-9.eE+-].*$/, "", v)
      if (v !~ /^[0-9.]+([eE][+-]?[0-9]+)?$/ || v + 0 <= 0) next
      if (FILENAME == ARGV[1]) { c[key()] = v } else if (key() in c) {
        r = (mode == "time") ? c[key()] / v : v / c[key()]
        printf "| %s | %s | %s | %.2f× |\n", key(), c[key()], v, r
      }
    }' "$cuda" "$wgpu"
}

# summary_exit: the table, then a failure if any step failed or timed out.
summary_exit() {
  echo
  printf '%-40s %-10s %6s  %s\n' step status time log
  cat "$summary"
  local skipped
  skipped=$(grep -c ' SKIP ' "$summary")
  [ "$skipped" -eq 0 ] || echo "$skipped step(s) did not run on the GPU (SKIP): their checks are NOT done"
  ! grep -q "FAIL\|TIMEOUT" "$summary"
}

# gpu_count: GPUs nvidia-smi lists (GPU_CHECK_NGPU overrides, for the self-test).
gpu_count() {
  if [ -n "${GPU_CHECK_NGPU:-}" ]; then echo "$GPU_CHECK_NGPU"; return; fi
  nvidia-smi -L 2>/dev/null | grep -c '^GPU '
}

# same_losses TOL A.csv B.csv: the loss column (2) of two train logs agrees
# step by step within relative TOL (and both have the same steps, at least one).
same_losses() {
  local tol="$1" a="$2" b="$3"
  [ -s "$a" ] && [ -s "$b" ] || { echo "same_losses: missing log $a or $b"; return 1; }
  awk -F, -v tol="$tol" '
    FNR == 1 { f++; next }
    f == 1 { la[$1] = $2; na++; next }
    { nb++; if (!($1 in la)) { printf "step %s only in %s\n", $1, FILENAME; bad = 1; next }
      d = la[$1] - $2; if (d < 0) d = -d; m = la[$1] < 0 ? -la[$1] : la[$1]
      if (d > tol * (m > 1e-30 ? m : 1e-30)) { printf "step %s: loss %s vs %s (tol %s)\n", $1, la[$1], $2, tol; bad = 1 } }
    END { if (na == 0 || na != nb) { printf "%d vs %d logged steps\n", na, nb; bad = 1 }
          if (!bad) printf "%d steps agree within %s\n", na, tol; exit bad }' "$a" "$b"
}

# nccl_world2 BIN: world-2 NCCL on two GPUs — 2 ranks × batch 2 vs 1 rank ×
# batch 4 (the same losses), and `bench allreduce --collective nccl` — or one
# SKIP line when the machine has fewer than 2 GPUs.
nccl_world2() {
  local bin="$1" n w="$out/nccl-world2" port="${GPU_CHECK_NCCL_PORT:-29533}"
  n="$(gpu_count)"
  if [ "${n:-0}" -lt 2 ]; then
    echo "SKIP: world-2 NCCL needs 2 GPUs, this machine has ${n:-0}"
    skip nccl-world2-train "world-2 NCCL needs 2 GPUs, this machine has ${n:-0}"
    skip nccl-world2-bench "world-2 NCCL needs 2 GPUs, this machine has ${n:-0}"
    return 0
  fi
  mkdir -p "$w"
  local common=(train --steps 4 --seq 64 --layers 2 --d-model 64 --eval-every 1000 --save-every 1000 --overwrite)
  # Two ranks in the background, each with its own LOCAL_RANK device; fails if either fails.
  local two='pids=""; for r in 0 1; do RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT "$@" & pids="$pids $!"; done; rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc'
  step nccl-world1-ref 180 "$bin" --backend cuda "${common[@]}" --batch 4 --out "$w/one"
  step nccl-world2-train 240 env PORT="$port" sh -c "$two" sh "$bin" --backend cuda "${common[@]}" --batch 2 --out "$w/two"
  local t0 log="$out/nccl-world2-same-losses.log"
  t0=$(date +%s)
  if same_losses 1e-4 "$w/one/log.csv" "$w/two/log.csv" > "$log" 2>&1; then
    record nccl-world2-same-losses ok "$(( $(date +%s) - t0 ))" "$log"
  else
    record nccl-world2-same-losses "FAIL(1)" "$(( $(date +%s) - t0 ))" "$log"
  fi
  cat "$log"
  step nccl-world2-bench 180 env PORT="$((port + 1))" sh -c "$two" sh "$bin" bench allreduce --collective nccl --sizes 4K,64K,1M,16M,64M --iters 20
}
