#!/usr/bin/env bash
# Fetches NVRTC (libnvrtc + builtins) and ptxas from NVIDIA's PyPI wheels into
# DIR, so CUDA kernels can be compiled and inspected on a machine with no GPU
# and no toolkit. Idempotent: does nothing when DIR already holds both.
#
#   scripts/fetch-cuda-tools.sh DIR
#   export DYNSPARSE_CUDA_TOOLS=DIR LD_LIBRARY_PATH=DIR/nvidia/cuda_nvrtc/lib
set -euo pipefail
dir="${1:?usage: scripts/fetch-cuda-tools.sh DIR}"
version="12.9.86"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
if ls "$dir"/nvidia/cuda_nvrtc/lib/libnvrtc.so* >/dev/null 2>&1 && [ -x "$dir/nvidia/cuda_nvcc/bin/ptxas" ]; then
  echo "cuda tools already in $dir"
  exit 0
fi
py="$(command -v python3 || command -v python)" || { echo "fetch-cuda-tools: python3 with pip is needed" >&2; exit 1; }
wheels="$dir/.wheels"
mkdir -p "$wheels"
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" \
  "nvidia-cuda-nvrtc-cu12==$version" "nvidia-cuda-nvcc-cu12==$version"
for w in "$wheels"/*.whl; do
  "$py" -m zipfile -e "$w" "$dir"
done
chmod +x "$dir"/nvidia/cuda_nvcc/bin/* 2>/dev/null || true
# The wheel ships libnvrtc.so.12 only; cudarc also looks for libnvrtc.so.
for lib in "$dir"/nvidia/cuda_nvrtc/lib/libnvrtc.so.*; do
  case "$lib" in *builtins*|*alt*) continue ;; esac
  [ -e "$dir/nvidia/cuda_nvrtc/lib/libnvrtc.so" ] || ln -s "$(basename "$lib")" "$dir/nvidia/cuda_nvrtc/lib/libnvrtc.so"
done
rm -rf "$wheels"
echo "cuda tools in $dir: $(ls "$dir"/nvidia/cuda_nvrtc/lib | tr '\n' ' ')"
