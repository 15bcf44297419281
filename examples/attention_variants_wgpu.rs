//! Times the wgpu attention kernels' software and hardware variants side by
//! side on one adapter (`DYNSPARSE_WGPU_KERNELS` is ignored: the variant is
//! switched between timings): the forward, and the backward alone (dq, dk,
//! dv from a saved forward), dense and block-sparse, batch 1, causal, a
//! seq × seq × seq matmul, and the indexer's training ops (token scores, the
//! KL loss against dense attention, the backward; `--index-heads` heads of
//! `--index-dim`). `--ops` picks a subset (comma-separated names as in the
//! table). Three columns: the software variant, the hardware
//! variant without optional features, and the hardware variant with every
//! feature the device has (subgroups, f16 arithmetic for `--dtype f16`).
//! Rounds alternate between the variants, so the machine's noise hits them
//! alike; the table shows each variant's median over the rounds, its spread
//! (min–max) and the ratios of the medians to sw.
//!
//! ```sh
//! XDG_RUNTIME_DIR=/tmp cargo run --example attention_variants_wgpu -- --seq 256 --head-dim 64
//! ```

use std::time::Instant;

use clap::Parser;
use dynsparse::attention::{self, Pattern};
use dynsparse::backend::wgpu::{AdapterPick, KernelFeatures, KernelVariant, WgpuBackend};
use dynsparse::util::rng::Rng;
use dynsparse::{Backend, DType, Result, Tensor};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 2)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Keys per block of the sparse pattern.
    #[arg(long, default_value_t = 16)]
    block: usize,
    /// Blocks each query keeps (its own, the sink and the first others).
    #[arg(long, default_value_t = 4)]
    keep: usize,
    /// Calls per timing.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Timings per variant (interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Dtype of q, k, v, dO, the matmul operands and the indexer's inputs: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Index heads H_I of the indexer ops.
    #[arg(long, default_value_t = 4)]
    index_heads: usize,
    /// Index head dim d_I of the indexer ops.
    #[arg(long, default_value_t = 32)]
    index_dim: usize,
    /// Ops to time, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    ops: Vec<String>,
}

type T = Tensor<WgpuBackend>;

fn time(be: &WgpuBackend, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    be.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    be.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dt = DType::parse(&a.dtype)
        .filter(|d| d.is_float())
        .ok_or_else(|| dynsparse::Error::Invalid(format!("--dtype {}: expected f32, f16 or bf16", a.dtype)))?;
    let mut be = WgpuBackend::new(&AdapterPick::from_env().unwrap_or(AdapterPick::Any))?;
    let dev = be.kernel_features();
    let (seq, d) = (a.seq, a.head_dim);
    let qs = [1, seq, a.heads, d];
    let ks = [1, seq, a.kv_heads, d];
    let mut rng = Rng::new(11);
    let mut up = |shape: &[usize]| -> Result<T> {
        let n = shape.iter().product();
        Tensor::from_f32(&be, &rng.normal_vec(n), shape, dt)
    };
    let (q, k, v, d_o) = (up(&qs)?, up(&ks)?, up(&ks)?, up(&qs)?);
    let (ma, mb) = (up(&[seq, seq])?, up(&[seq, seq])?);
    let mut mc = Tensor::empty(&be, &[seq, seq], dt)?;
    // Per query: its own block, the sink, then the blocks just before its own.
    let nb = seq.div_ceil(a.block);
    let n = a.keep.min(nb);
    let mut blk = Vec::with_capacity(seq * n);
    for t in 0..seq {
        let own = t / a.block;
        let mut row = vec![own as u32];
        if own > 0 {
            row.push(0);
        }
        row.extend((1..own).rev().take(n.saturating_sub(row.len())).map(|b| b as u32));
        row.resize(n, u32::MAX);
        row.sort_unstable();
        blk.extend(row);
    }
    let idx = Tensor::from_u32(&be, &blk, &[1, seq, n])?;
    let (mut o, mut lse) = (Tensor::empty(&be, &qs, dt)?, Tensor::empty(&be, &[1, a.heads, seq], DType::F32)?);
    let (mut dq, mut dk, mut dv) =
        (Tensor::empty(&be, &qs, dt)?, Tensor::empty(&be, &ks, dt)?, Tensor::empty(&be, &ks, dt)?);
    let (hi, di) = (a.index_heads, a.index_dim);
    let (qi, ki, wi) = (up(&[1, seq, hi, di])?, up(&[1, seq, di])?, up(&[1, seq, hi])?);
    let mut sc = Tensor::empty(&be, &[1, seq, seq], DType::F32)?;
    let (mut loss, mut ds) =
        (Tensor::empty(&be, &[1, seq], DType::F32)?, Tensor::empty(&be, &[1, seq, seq], DType::F32)?);
    let (mut dqi, mut dki, mut dwi) = (
        Tensor::empty(&be, &[1, seq, hi, di], dt)?,
        Tensor::empty(&be, &[1, seq, di], dt)?,
        Tensor::empty(&be, &[1, seq, hi], dt)?,
    );
    let all =
        ["dense fwd", "dense bwd", "sparse fwd", "sparse bwd", "matmul", "indexer scores", "indexer kl", "indexer bwd"];
    if let Some(bad) = a.ops.iter().find(|o| !all.contains(&o.as_str())) {
        return Err(dynsparse::Error::Invalid(format!("--ops {bad}: expected some of {}", all.join(", "))));
    }
    let ops: Vec<&str> = all.into_iter().filter(|o| a.ops.is_empty() || a.ops.iter().any(|x| x == o)).collect();
    let variants = [
        (KernelVariant::Software, KernelFeatures::NONE),
        (KernelVariant::Hardware, KernelFeatures::NONE),
        (KernelVariant::Hardware, dev),
    ];
    let mut times = vec![vec![Vec::new(); ops.len()]; variants.len()];
    for _ in 0..a.rounds {
        for (vi, &(var, feats)) in variants.iter().enumerate() {
            be.set_kernel_variant(var);
            be.set_kernel_features(feats)?;
            let be = &be;
            for (oi, op) in ops.iter().enumerate() {
                if op.starts_with("indexer") {
                    let ms = match *op {
                        "indexer scores" => time(be, a.reps, || attention::indexer_scores(be, &qi, &ki, &wi, &mut sc))?,
                        "indexer kl" => {
                            attention::attention(be, &q, &k, &v, Pattern::Dense, &mut o, &mut lse)?;
                            attention::indexer_scores(be, &qi, &ki, &wi, &mut sc)?;
                            time(be, a.reps, || {
                                attention::indexer_kl(be, &q, &k, &lse, &sc, Pattern::Dense, &mut loss, &mut ds)
                            })?
                        }
                        _ => {
                            // dscores from the KL loss (untimed), as in training.
                            attention::attention(be, &q, &k, &v, Pattern::Dense, &mut o, &mut lse)?;
                            attention::indexer_scores(be, &qi, &ki, &wi, &mut sc)?;
                            attention::indexer_kl(be, &q, &k, &lse, &sc, Pattern::Dense, &mut loss, &mut ds)?;
                            time(be, a.reps, || {
                                attention::indexer_backward(be, &qi, &ki, &wi, &ds, &mut dqi, &mut dki, &mut dwi)
                            })?
                        }
                    };
                    times[vi][oi].push(ms);
                    continue;
                }
                if *op == "matmul" {
                    let ms =
                        time(be, a.reps, || dynsparse::ops::matmul(be, &ma, &mb, &mut mc, false, false, 1.0, 0.0))?;
                    times[vi][oi].push(ms);
                    continue;
                }
                let pat = || {
                    if op.starts_with("dense") { Pattern::Dense } else { Pattern::Blocks { idx: &idx, block: a.block } }
                };
                attention::attention(be, &q, &k, &v, pat(), &mut o, &mut lse)?;
                let ms = if op.ends_with("fwd") {
                    time(be, a.reps, || attention::attention(be, &q, &k, &v, pat(), &mut o, &mut lse))?
                } else {
                    time(be, a.reps, || {
                        attention::attention_backward(be, &q, &k, &v, &o, &lse, &d_o, pat(), &mut dq, &mut dk, &mut dv)
                    })?
                };
                times[vi][oi].push(ms);
            }
        }
    }
    println!(
        "device: {} (wgpu, {dev}); seq {seq}, heads {}/{}, head_dim {d}, {dt}; sparse: {n} blocks of {} per query; \
         matmul {seq}×{seq}×{seq}; indexer H_I {hi}, d_I {di}; {} calls per timing, {} rounds",
        be.device_name(),
        a.heads,
        a.kv_heads,
        a.block,
        a.reps,
        a.rounds
    );
    println!();
    println!(
        "| op | sw ms (median) | sw spread | hw ms (median) | hw spread | hw+features ms (median) | hw+features spread | hw / sw | hw+features / sw |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let stats = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        (s[s.len() / 2], s[0], s[s.len() - 1])
    };
    for (oi, op) in ops.iter().enumerate() {
        let (sm, s0, s1) = stats(&times[0][oi]);
        let (hm, h0, h1) = stats(&times[1][oi]);
        let (fm, f0, f1) = stats(&times[2][oi]);
        println!(
            "| {op} | {sm:.1} | {s0:.1}–{s1:.1} | {hm:.1} | {h0:.1}–{h1:.1} | {fm:.1} | {f0:.1}–{f1:.1} | {:.2}× | {:.2}× |",
            hm / sm,
            fm / sm
        );
    }
    Ok(())
}
