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
