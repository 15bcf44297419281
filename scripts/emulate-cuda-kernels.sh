#!/usr/bin/env bash
# Runs the CUDA kernels of kernels/*.cu on the CPU (tests/cuda_emu: an
# emulation of blocks, warps and shared memory with OS threads) against naive
# f64 references: attention forward/backward for every pattern with GQA
# (per-query block rows, tiled kernels with blocks of any size), the tokens
# CSR, indexer scores/per-query pooling/backward, indexer KL, top-k selection
# (ties, NaN, -0, per-query block mode), LayerNorm, softmax, cross-entropy,
# embedding, reductions, rope, the fallback GEMM (row invariance included:
# matmul_rows runs on it) and bf16 rounding; the
# causality of the block-mode chain (pooling -> selection -> attention, KL):
# outputs for queries <= c bit-identical when every input after c changes,
# with a control showing that query-block pooling is caught; and the KV-cache
# inference kernels (rope_rows, cache_write, cached indexer/select,
# flash-decoding and prefill-run attention), each reading the cache through
# a contiguous and a scattered page table (pages of 8 rows and smaller): the
# same bits either way; the quantized matmul kernels (every format, group
# size and activation dtype, rows alone bit-identical to the batch). Needs
# g++ (C++20). Takes about a minute and a half on 2 cores, mostly g++ (the
# CUDA threads are cooperative fibers, see emu.h); names as arguments run
# only those drivers (`scripts/emulate-cuda-kernels.sh qmatmul`). No GPU, no
# CUDA toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
only=" $* "
run() {  # run NAME FAMILIES
  if [ "$only" != "  " ] && [[ "$only" != *" $1 "* ]]; then return; fi
  python3 tests/cuda_emu/prepare.py "$2" "tests/cuda_emu/$1.cpp" "$tmp/$1.cpp"
  g++ -std=c++20 -O1 -w -pthread "$tmp/$1.cpp" -o "$tmp/$1"
  echo "== $1"
  "$tmp/$1"
}
run ops indexer,layernorm,softmax,cross_entropy,embedding,reduce,elementwise,rope,matmul
run attention attention
run select select
run causal indexer,select,attention
run cached cached
run qmatmul qmatmul
