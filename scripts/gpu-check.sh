#!/usr/bin/env bash
# GPU check in two halves, because the GPU machine has no Rust toolchain:
#
#   scripts/gpu-check.sh build   (here) builds the release `dynsparse` binary and
#       the test binaries (test profile: CI has built most of them already)
#       with --features cuda, strips and gzips them, pre-compiles every
#       CUDA kernel to CUBIN and PTX for sm_80/sm_90 (so the GPU machine needs
#       no NVRTC, and CUBIN loads on drivers older than this NVRTC), and writes
#       everything plus run.sh and lib.sh into the git-ignored gpu-bundle/.
#   gpu-bundle/run.sh            (there) checks the host's glibc first, then
#       nvidia-smi, `dynsparse --backend cuda info`, every CUDA conformance test
#       in its own process, NCCL (`bench allreduce --collective nccl` at world 1; at
#       world 2 a 2-rank vs 1-rank training equivalence and the bench, on >= 2 GPUs), the wgpu suite and CUDA-vs-wgpu on a *hardware*
#       Vulkan adapter (SKIP without one), `bench matmul|attention|train` on
#       CUDA and on the same card's Vulkan driver (wgpu/CUDA ratios per op in
#       wgpu-vs-cuda.md), the PyTorch baseline and the host CPU's half-precision vs f32 training
#       step (CPU backend, with the CPU's SIMD flags); logs in $GPU_CHECK_OUT (default ./gpu-check-out),
#       a summary table last (ok only for what ran on the GPU). About 8 minutes
#       on an H100; every step has a timeout. Step logic: scripts/gpu-check-lib.sh.
#
# Environment for `build`: DYNSPARSE_CARGO_FLAGS (default "--features cuda,nccl"),
# DYNSPARSE_CUDA_TOOLS (NVRTC for the PTX cache; default .cuda-tools, fetched if absent).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = build ] || { echo "usage: scripts/gpu-check.sh build   (then run gpu-bundle/run.sh on the GPU machine)" >&2; exit 2; }

flags="${DYNSPARSE_CARGO_FLAGS:---features cuda,nccl}"
bundle=gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib"

echo "== release binary"
# shellcheck disable=SC2086
cargo build --release $flags --bin dynsparse
# JSON field extraction with jq, or python3 where jq is missing.
json() {
  if command -v jq >/dev/null; then jq -r "$1"; else python3 -c "$2"; fi
}
target_dir="$(cargo metadata --format-version 1 --no-deps \
  | json .target_directory 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
cp "$target_dir/release/dynsparse" "$bundle/bin/"

echo "== test binaries"
# The test profile (dependencies optimised, our crate at opt-level 1), as CI's
# CUDA test step builds them: only the wgpu ones are new here.
# shellcheck disable=SC2086
cargo test $flags --no-run --message-format=json \
  --test conformance_cuda --test cuda_kernels_compile --test cuda_device --test conformance_cpu \
  $( [[ "$flags" == *no-default-features* ]] || echo --test conformance_wgpu --test wgpu_limits ) \
  | json 'select(.reason == "compiler-artifact" and .executable != null and (.target.kind | index("test"))) | "\(.target.name) \(.executable)"' \
    'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])' \
  | while read -r name exe; do cp "$exe" "$bundle/bin/$name"; done
strip --strip-debug "$bundle"/bin/* 2>/dev/null || strip "$bundle"/bin/*
ls "$bundle/bin"

echo "== kernel cache (CUBIN + PTX for sm_80, sm_90) so the GPU machine needs no NVRTC"
tools="${DYNSPARSE_CUDA_TOOLS:-.cuda-tools}"
[ -e "$tools/nvidia/cuda_nvrtc/lib/libnvrtc.so" ] || scripts/fetch-cuda-tools.sh "$tools" || true
if [ -e "$tools/nvidia/cuda_nvrtc/lib/libnvrtc.so" ]; then
  tools="$(cd "$tools" && pwd)"
  # A kernel cache filled earlier (CI's) seeds the bundle's: entries are keyed
  # by source, options and NVRTC version, and the compile test re-checks them.
  if [ -n "${DYNSPARSE_PTX_CACHE:-}" ] && [ -d "$DYNSPARSE_PTX_CACHE" ]; then
    mkdir -p "$bundle/ptx-cache"
    cp "$DYNSPARSE_PTX_CACHE"/*.cubin "$DYNSPARSE_PTX_CACHE"/*.ptx "$bundle/ptx-cache/" 2>/dev/null || true
  fi
  LD_LIBRARY_PATH="$tools/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    DYNSPARSE_REQUIRE_NVRTC=1 DYNSPARSE_PTX_CACHE="$PWD/$bundle/ptx-cache" \
    "$bundle/bin/cuda_kernels_compile" -q >/dev/null
  # PTX is kept for the newest architecture only: the JIT path of newer
  # devices and the parameter sizes of every image (the same for all).
  rm -f "$bundle"/ptx-cache/*-sm80-*.ptx
  echo "$(ls "$bundle/ptx-cache"/*.cubin | wc -l) CUBIN and $(ls "$bundle/ptx-cache"/*.ptx | wc -l) PTX files"
else
  echo "warning: no NVRTC here; the GPU machine will compile the kernels with its own NVRTC"
fi

# Only needed here, to fill the cache.
rm -f "$bundle/bin/cuda_kernels_compile"

# The Vulkan loader, for the wgpu conformance tests on the GPU machine.
for l in /usr/lib/x86_64-linux-gnu/libvulkan.so.1; do [ -e "$l" ] && cp -L "$l" "$bundle/lib/"; done
cp scripts/torch_baseline.py "$bundle/"
cp scripts/gpu-check-lib.sh "$bundle/lib.sh"

# The newest glibc symbol version the binaries use: run.sh refuses an older host in one line.
glibc_need="$(objdump -T "$bundle"/bin/* 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)"
echo "${glibc_need}" > "$bundle/glibc-required"
echo "binaries need glibc >= ${glibc_need:-unknown (objdump missing)}"
# Shipped compressed (the device machine takes 64 MiB of carried files); run.sh unpacks them.
gzip -9 "$bundle"/bin/*

cat > "$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine; builds nothing. Logs in $GPU_CHECK_OUT (default ./gpu-check-out).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=/dev/null
. "$here/lib.sh"
glibc_check "$(cat "$here/glibc-required" 2>/dev/null)" || exit 1
out="${GPU_CHECK_OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
bin="$out/bin"
mkdir -p "$bin"
for f in "$here"/bin/*.gz; do gzip -dc "$f" > "$bin/$(basename "$f" .gz)" && chmod +x "$bin/$(basename "$f" .gz)"; done
summary="$out/summary.txt"
: > "$summary"

# A writable copy of the shipped kernel cache (CUBIN and PTX).
mkdir -p "$out/ptx-cache"
cp -n "$here"/ptx-cache/* "$out/ptx-cache/" 2>/dev/null || true
export DYNSPARSE_PTX_CACHE="$out/ptx-cache"

# cudarc looks for libnvrtc.so / libcublas.so / libcublasLt.so (or .so.12): find
# them in the toolkit, the system or PyTorch's wheels and link them under those names.
libs="$out/cuda-libs"
mkdir -p "$libs"
dirs="/usr/local/cuda/lib64 $(ls -d /usr/local/cuda-*/lib64 /usr/local/cuda-*/targets/x86_64-linux/lib 2>/dev/null | tr '\n' ' ') /usr/lib/x86_64-linux-gnu /usr/lib64"
if command -v python3 >/dev/null; then
  dirs="$dirs $(python3 - 2>/dev/null <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
found = []
for r in roots:
    found += glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "cu*", "lib")) + glob.glob(os.path.join(r, "torch", "lib"))
print(" ".join(found))
PY
)"
fi
extra=""
for name in nvrtc cublas cublasLt nccl; do
  pick=""
  for ver in 12 13 ""; do
    for d in $dirs; do
      for f in "$d"/lib"$name".so."$ver"*; do
        case "$f" in *builtins*|*alt*|*'*'*) continue ;; esac
        [ -e "$f" ] && { pick="$f"; break 3; }
      done
    done
  done
  if [ -n "$pick" ]; then
    ln -sf "$pick" "$libs/lib$name.so"
    extra="$extra:$(dirname "$pick")"
    echo "using $pick for lib$name.so" >> "$out/libs.txt"
  else
    echo "lib$name not found" >> "$out/libs.txt"
  fi
done
export LD_LIBRARY_PATH="$libs$extra:$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

step nvidia-smi 20 nvidia-smi
step cuda-info 90 "$bin/dynsparse" --backend cuda info
# Each test (one op family) in its own process: a kernel fault poisons the
# CUDA context, and would otherwise fail every later test of the binary.
EXCEPT='^cuda_vs_wgpu::' tests_each cuda 120 "$bin/conformance_cuda" DYNSPARSE_REQUIRE_CUDA=1
[ -x "$bin/cuda_device" ] && tests_each cuda-device 120 "$bin/cuda_device" DYNSPARSE_REQUIRE_CUDA=1
# NCCL (libnccl from PyTorch's nvidia-nccl wheel, linked as libnccl.so above): world 1 runs on
# any GPU (device-buffer collectives, results checked); world 2 needs two GPUs, else one SKIP line.
step nccl-bench-world1 120 "$bin/dynsparse" bench allreduce --collective nccl --sizes 4K,1M,64M --iters 20
nccl_world2 "$bin/dynsparse"

# wgpu on the GPU's own Vulkan driver only: a software adapter (lavapipe) must
# not stand in for it, and without a hardware adapter the steps are SKIP, not ok.
if DYNSPARSE_WGPU_ADAPTER=hardware "$bin/dynsparse" --backend wgpu info > "$out/wgpu-probe.log" 2>&1; then
  hw=(DYNSPARSE_WGPU_ADAPTER=hardware DYNSPARSE_REQUIRE_WGPU=1)
  ran_wgpu=1
  [ -x "$bin/conformance_wgpu" ] && step conformance-wgpu 180 env "${hw[@]}" "$bin/conformance_wgpu" --test-threads 4
  [ -x "$bin/wgpu_limits" ] && step wgpu-limits 60 env "${hw[@]}" "$bin/wgpu_limits"
  ONLY='^cuda_vs_wgpu::' tests_each cuda-vs-wgpu 120 "$bin/conformance_cuda" DYNSPARSE_REQUIRE_CUDA=1 "${hw[@]}"
else
  why="no hardware Vulkan adapter: $(tail -n1 "$out/wgpu-probe.log" | cut -c1-160)"
  skip conformance-wgpu "$why"
  skip cuda-vs-wgpu "$why"
fi
step bench-matmul 90 "$bin/dynsparse" --backend cuda bench matmul --sizes 1024,4096,8192 --min-time 0.3 --no-cpu-baseline
step bench-attention 150 "$bin/dynsparse" --backend cuda bench attention --seqs 1024,4096,16384 --dtype bf16 --min-time 0.2
step bench-decode 240 "$bin/dynsparse" --backend cuda bench decode --contexts 1024,4096,16384 --batches 1,8 --dtype bf16 --prefill-max 16384
step bench-train 150 "$bin/dynsparse" --backend cuda bench train
if [ "${ran_wgpu:-0}" = 1 ]; then
  # The same benches on the GPU's Vulkan driver (hardware kernel variants, as
  # chosen for a non-CPU adapter), then the wgpu/CUDA ratio per op.
  step bench-matmul-wgpu 150 env "${hw[@]}" "$bin/dynsparse" --backend wgpu bench matmul --sizes 1024,4096,8192 --min-time 0.3 --no-cpu-baseline
  step bench-attention-wgpu 240 env "${hw[@]}" "$bin/dynsparse" --backend wgpu bench attention --seqs 1024,4096,16384 --dtype bf16 --min-time 0.2
  step bench-train-wgpu 150 env "${hw[@]}" "$bin/dynsparse" --backend wgpu bench train
  step bench-decode-wgpu 240 env "${hw[@]}" "$bin/dynsparse" --backend wgpu bench decode --contexts 1024,4096,16384 --batches 1,8 --prefill-max 4096
  {
    echo "## wgpu (Vulkan) / CUDA on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
    echo "Throughput ratios (>1: wgpu faster). Goals: matmul f32 >= 0.3, attention forward >= 0.3."
    echo; echo "| matmul dtype n | cuda ms | wgpu ms | wgpu/cuda |"; echo "|---|---:|---:|---:|"
    ratio 1,2 3 time "$out/bench-matmul.log" "$out/bench-matmul-wgpu.log"
    echo; echo "| attention seq (dense fwd) | cuda ms | wgpu ms | wgpu/cuda |"; echo "|---|---:|---:|---:|"
    ratio 1 2 time "$out/bench-attention.log" "$out/bench-attention-wgpu.log"
    echo; echo "| attention seq (sparse attn fwd) | cuda ms | wgpu ms | wgpu/cuda |"; echo "|---|---:|---:|---:|"
    ratio 1 3 time "$out/bench-attention.log" "$out/bench-attention-wgpu.log"
    echo; echo "| train precision | cuda tokens/s | wgpu tokens/s | wgpu/cuda |"; echo "|---|---:|---:|---:|"
    ratio 1 9 rate "$out/bench-train.log" "$out/bench-train-wgpu.log"
  } > "$out/wgpu-vs-cuda.md"
  cat "$out/wgpu-vs-cuda.md"
else
  for s in bench-matmul-wgpu bench-attention-wgpu bench-train-wgpu bench-decode-wgpu; do skip "$s" "no hardware Vulkan adapter"; done
fi
if command -v python3 >/dev/null && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  step torch-baseline 120 python3 "$here/torch_baseline.py" --sizes 1024,4096,8192 --seqs 1024,4096,16384 --dtype bf16
else
  skip torch-baseline "no python3 with CUDA torch"
fi

# The host's CPU (issue 15): the CPU backend's half precision against f32 on
# this host's SIMD (the dev machine lacks AVX-512; bf16 >= f32 is asked for on
# CPUs with it), the CPU conformance suite on the variants it picks, then the
# training step at 2 threads (comparable with BENCHMARKS.md) and all threads.
step cpu-flags 10 sh -c "lscpu | grep -E 'Model name|^CPU\(s\)'; grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|fma|f16c|avx512f|avx512bw|avx512_bf16|avx512_fp16|amx_bf16' | tr '\n' ' '; echo"
[ -x "$bin/conformance_cpu" ] && step conformance-cpu 120 "$bin/conformance_cpu"
for shape in "4 512" "1 2048"; do
  set -- $shape
  step "cpu-train-${1}x${2}-2thr" 120 env RAYON_NUM_THREADS=2 "$bin/dynsparse" --backend cpu bench train \
    --attention dense --batch "$1" --seq "$2" --steps 6 --precisions f32,bf16,f16
  step "cpu-train-${1}x${2}-allthr" 120 "$bin/dynsparse" --backend cpu bench train \
    --attention dense --batch "$1" --seq "$2" --steps 6 --precisions f32,bf16,f16
done

echo
echo "==== summary (logs in $out)"
grep -h "GFLOP\|TFLOP\|^|" "$out/bench-matmul.log" "$out/bench-attention.log" "$out/bench-decode.log" "$out/torch-baseline.log" 2>/dev/null | tail -n 50
[ -s "$out/wgpu-vs-cuda.md" ] && cat "$out/wgpu-vs-cuda.md"
summary_exit
RUN
chmod +x "$bundle/run.sh"
size=$(du -sm "$bundle" | cut -f1)
echo "== bundle: ${size} MiB in $bundle/ (run $bundle/run.sh on the GPU machine)"
if [ "$size" -gt 60 ]; then echo "gpu-check: bundle is ${size} MiB, over the 60 MiB budget" >&2; exit 1; fi
