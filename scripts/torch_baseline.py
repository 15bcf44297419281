#!/usr/bin/env python3
"""PyTorch dense baselines for `dynsparse bench`, timed with CUDA events:
torch.matmul (n×n, f32 without TF32, f16, bf16) and causal
scaled_dot_product_attention (forward, forward+backward) at the same sizes
as `bench attention` (batch 1, 8 heads, head_dim 64 by default)."""
import argparse

import torch
import torch.nn.functional as F


def timed(fn, min_time=0.2):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps, total = 1, 0.0
    while True:
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        total = start.elapsed_time(end) / 1e3
        if total >= min_time:
            return total / reps
        reps *= 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096,8192")
    ap.add_argument("--seqs", default="1024,4096,16384")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dts = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    print("| torch.matmul | n | ms | TFLOP/s |")
    print("| --- | --- | --- | --- |")
    for name, dt in dts.items():
        for n in [int(s) for s in a.sizes.split(",")]:
            x, y = torch.randn(n, n, device="cuda", dtype=dt), torch.randn(n, n, device="cuda", dtype=dt)
            t = timed(lambda: torch.matmul(x, y))
            print(f"| {name} | {n} | {t * 1e3:.3f} | {2 * n ** 3 / t / 1e12:.1f} |")
    dt = dts[a.dtype]
    print(f"| torch SDPA causal {a.dtype} | seq | fwd ms | fwd+bwd ms |")
    print("| --- | --- | --- | --- |")
    for seq in [int(s) for s in a.seqs.split(",")]:
        q = torch.randn(1, a.heads, seq, a.head_dim, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(1, a.kv_heads, seq, a.head_dim, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(1, a.kv_heads, seq, a.head_dim, device="cuda", dtype=dt, requires_grad=True)
        gqa = a.kv_heads != a.heads
        kw = {"is_causal": True, **({"enable_gqa": True} if gqa else {})}
        fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v, **kw))
        do = torch.randn(1, a.heads, seq, a.head_dim, device="cuda", dtype=dt)

        def fb():
            o = F.scaled_dot_product_attention(q, k, v, **kw)
            o.backward(do)

        print(f"| SDPA | {seq} | {fwd * 1e3:.3f} | {timed(fb) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
