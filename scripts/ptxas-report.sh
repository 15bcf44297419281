#!/usr/bin/env bash
# Compiles every CUDA kernel family to PTX through the backend's own NVRTC
# path (the cuda_kernels_compile test with DYNSPARSE_PTX_OUT), then runs ptxas
# on it and prints registers, spills, stack and shared memory per kernel.
#
#   scripts/ptxas-report.sh [TOOLS_DIR] [ARCH]     (defaults: $DYNSPARSE_CUDA_TOOLS or .cuda-tools, sm_90)
#   DYNSPARSE_CARGO_FLAGS="--no-default-features --features cuda"  to change the cargo features
# Exits non-zero when a kernel spills more than DYNSPARSE_MAX_SPILL bytes (default 256).
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${1:-${DYNSPARSE_CUDA_TOOLS:-.cuda-tools}}"
arch="${2:-sm_90}"
tools="$(cd "$tools" && pwd)"
ptxas="$tools/nvidia/cuda_nvcc/bin/ptxas"
[ -x "$ptxas" ] || { echo "ptxas-report: no ptxas in $tools (run scripts/fetch-cuda-tools.sh $tools)" >&2; exit 1; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# shellcheck disable=SC2086
LD_LIBRARY_PATH="$tools/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  DYNSPARSE_REQUIRE_NVRTC=1 DYNSPARSE_PTX_OUT="$out/ptx" \
  cargo test -q ${DYNSPARSE_CARGO_FLAGS:---features cuda} --test cuda_kernels_compile >"$out/test.log" 2>&1 \
  || { cat "$out/test.log"; exit 1; }
num="${arch#sm_}"
printf '%-34s %5s %7s %7s %6s %7s\n' kernel regs spill_st spill_ld stack smem
printf '%-34s %5s %7s %7s %6s %7s\n' ---------------------------------- ----- ------- ------- ------ -------
worst=0
for ptx in "$out"/ptx/*.sm_"$num".ptx; do
  "$ptxas" -arch="$arch" -v "$ptx" -o /dev/null 2>&1 | awk -v fam="$(basename "$ptx" .sm_"$num".ptx)" '
    /Compiling entry function/ { if (k != "") print k, r, ss, sl, st, sm; k = $0; sub(/.*function .?/, "", k); sub(/.? for .*/, "", k); r = 0; ss = 0; sl = 0; st = 0; sm = 0 }
    /bytes stack frame/ { st = $1; ss = $5; sl = $9 }
    /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^registers/) r = $i; if ($(i+1) == "bytes" && $(i+2) == "smem") sm = $i } }
    END { if (k != "") print k, r, ss, sl, st, sm }'
done | sort > "$out/table"
while read -r k r ss sl st sm; do
  printf '%-34s %5s %7s %7s %6s %7s\n' "$k" "$r" "$ss" "$sl" "$st" "$sm"
  [ "$ss" -gt "$worst" ] && worst="$ss"
done < "$out/table"
echo
echo "$(wc -l < "$out/table") kernels for $arch; max registers $(awk '{print $2}' "$out/table" | sort -n | tail -1), largest spill $worst bytes"
if [ "$worst" -gt "${DYNSPARSE_MAX_SPILL:-256}" ]; then
  echo "ptxas-report: a kernel spills $worst bytes (> ${DYNSPARSE_MAX_SPILL:-256})" >&2
  exit 1
fi
