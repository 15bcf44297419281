//! Times the wgpu decode kernels' variants side by side on one adapter
//! (`DYNSPARSE_WGPU_KERNELS` / `DYNSPARSE_WGPU_SUBGROUPS` are ignored: the
//! variant is switched between timings): decode attention over a paged KV
//! cache (`cached_attention`, dense, one query row per sequence), the
//! quantized matmul (int8 and int4 weights) and the decode step's block
//! selection (`cached_indexer_block_scores` and `cached_select`) at decode
//! batch sizes. The variants: `sw` (`cached_attn`, `qmm`, `cached_pool`,
//! `cached_select`), `hw` (`cached_attn_hw`, `qmm_hw`, `cached_pool_hw`,
//! `cached_select_hw`, workgroup-memory reductions), where the adapter has
//! subgroups `hw+sg` (`cached_attn_hw_sg`, `qmm_hw_sg`, the others' subgroup
//! paths), and with `--dtype f16` where it has SHADER_F16 `hw+sg+f16` (f16
//! products in decode attention and the quantized matmul; the selection has
//! no f16 path). Rounds alternate between
//! the variants, so the machine's noise hits them alike; the table shows
//! each variant's median over the rounds, its spread (min–max) and the
//! ratio to the `sw` median.
//!
//! ```sh
//! XDG_RUNTIME_DIR=/tmp cargo run --release --example decode_variants_wgpu -- --ctx 256 --batch 1,8
//! ```

use std::time::Instant;

use clap::Parser;
use dynsparse::attention::{self, CachedPattern, KvTable};
use dynsparse::backend::wgpu::{AdapterPick, KernelFeatures, KernelVariant, WgpuBackend};
use dynsparse::ops::{self, QWeight};
use dynsparse::quant::{QFormat, QMatrix};
use dynsparse::util::rng::Rng;
use dynsparse::{Backend, DType, Result, Tensor};

#[derive(Parser)]
struct Args {
    /// Keys per sequence (its context length).
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Query heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Cache rows per page.
    #[arg(long, default_value_t = 16)]
    page: usize,
    /// Output channels and inputs of the quantized weight.
    #[arg(long, default_value_t = 256)]
    n: usize,
    #[arg(long, default_value_t = 256)]
    k: usize,
    /// Batch sizes (decode rows), comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Calls per timing.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Timings per variant (interleaved; one more warms up).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Index heads and dim of the block selection's indexer.
    #[arg(long, default_value_t = 4)]
    index_heads: usize,
    #[arg(long, default_value_t = 32)]
    index_dim: usize,
    /// Keys per block and blocks kept of the block selection.
    #[arg(long, default_value_t = 16)]
    block: usize,
    #[arg(long, default_value_t = 4)]
    keep: usize,
    /// Activations and caches: f32 or f16 (f16 adds the `hw+sg+f16` variant).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

type T = Tensor<WgpuBackend>;

fn main() -> Result<()> {
    let a = Args::parse();
    let mut be = WgpuBackend::new(&AdapterPick::from_env().unwrap_or(AdapterPick::Any))?;
    let dt = DType::parse(&a.dtype)
        .filter(|d| matches!(d, DType::F32 | DType::F16))
        .ok_or_else(|| dynsparse::Error::Invalid(format!("--dtype {}: expected f32 or f16", a.dtype)))?;
    let dev = be.kernel_features();
    let none = KernelFeatures::NONE;
    let sgf = KernelFeatures { subgroups: true, f16: false };
    let mut variants = vec![("sw", KernelVariant::Software, none), ("hw", KernelVariant::Hardware, none)];
    if dev.contains(sgf) {
        variants.push(("hw+sg", KernelVariant::Hardware, sgf));
    }
    if dt == DType::F16 && dev.f16 {
        variants.push(("hw+sg+f16", KernelVariant::Hardware, dev));
    }
    let (h, kv, d) = (a.heads, a.kv_heads, a.head_dim);
    let mut rng = Rng::new(3);
    println!(
        "device: {} (wgpu); decode attention: ctx {}, heads {h}/{kv}, head_dim {d}, pages of {}; \
         qmatmul {}×{}; block selection: {} index heads of dim {}, blocks of {}, keep {}; {dt}; \
         {} calls per timing, {} rounds",
        be.device_name(),
        a.ctx,
        a.page,
        a.n,
        a.k,
        a.index_heads,
        a.index_dim,
        a.block,
        a.keep,
        a.reps,
        a.rounds
    );
    println!();
    print!("| op | batch |");
    for (name, ..) in &variants {
        print!(" {name} ms (median) | {name} spread |");
    }
    for (name, ..) in &variants[1..] {
        print!(" {name} / sw |");
    }
    println!();
    println!("|---|---:|{}{}", "---:|---:|".repeat(variants.len()), "---:|".repeat(variants.len() - 1));
    for &b in &a.batch {
        // b sequences of ctx keys each, pages of their cache in reverse order.
        let pages_per = a.ctx.div_ceil(a.page);
        let np = b * pages_per;
        let slots = np * a.page;
        let kc = T::from_f32(&be, &rng.normal_vec(slots * kv * d), &[slots, kv, d], dt)?;
        let vc = T::from_f32(&be, &rng.normal_vec(slots * kv * d), &[slots, kv, d], dt)?;
        let q = T::from_f32(&be, &rng.normal_vec(b * h * d), &[b, h, d], dt)?;
        let ids: Vec<u32> = (0..np as u32).rev().collect();
        let pages = T::from_u32(&be, &ids, &[np])?;
        let tab: Vec<u32> = (0..b).flat_map(|i| [(i * pages_per) as u32, a.ctx as u32]).collect();
        let rows = T::from_u32(&be, &tab, &[b, 2])?;
        let mut o = T::empty(&be, &[b, h, d], dt)?;
        let x = T::from_f32(&be, &rng.normal_vec(b * a.k), &[b, a.k], dt)?;
        let w: Vec<f32> = rng.normal_vec(a.n * a.k).into_iter().map(|v| v * 0.05).collect();
        let mut y = T::empty(&be, &[b, a.n], dt)?;
        let (hi, di) = (a.index_heads, a.index_dim);
        let cols = a.ctx.div_ceil(a.block);
        let qi = T::from_f32(&be, &rng.normal_vec(b * hi * di), &[b, hi, di], dt)?;
        let wi = T::from_f32(&be, &rng.normal_vec(b * hi), &[b, hi], dt)?;
        let ki = T::from_f32(&be, &rng.normal_vec(slots * di), &[slots, di], dt)?;
        let mut pooled = T::empty(&be, &[b, cols], DType::F32)?;
        let mut sel = T::from_u32(&be, &vec![0; b * a.keep], &[b, a.keep])?;
        let mut weights = Vec::new();
        for f in [QFormat::Int8, QFormat::Int4 { group: 32, asym: false }] {
            weights.push((f.name(), QWeight::upload(&be, &QMatrix::quantize(&w, a.n, a.k, f)?)?));
        }
        let nq = weights.len();
        let ops_n = 3 + nq;
        let mut times = vec![vec![Vec::new(); variants.len()]; ops_n];
        for round in 0..=a.rounds {
            for (vi, &(_, var, f)) in variants.iter().enumerate() {
                be.set_kernel_variant(var);
                be.set_kernel_features(f)?;
                let be = &be;
                for (oi, t) in times.iter_mut().enumerate() {
                    let mut call = || -> Result<()> {
                        let table = KvTable { rows: &rows, pages: &pages, page: a.page };
                        if oi == 0 {
                            attention::cached_attention(be, &q, &kc, &vc, &table, CachedPattern::Dense, &mut o)
                        } else if oi <= nq {
                            ops::qmatmul(be, &x, &weights[oi - 1].1, &mut y)
                        } else if oi == nq + 1 {
                            attention::cached_indexer_block_scores(be, &qi, &wi, &ki, &table, a.block, &mut pooled)
                        } else {
                            attention::cached_select(be, &pooled, &rows, a.keep, a.block, &mut sel)
                        }
                    };
                    call()?;
                    be.synchronize()?;
                    let t0 = Instant::now();
                    for _ in 0..a.reps {
                        call()?;
                    }
                    be.synchronize()?;
                    if round > 0 {
                        t[vi].push(t0.elapsed().as_secs_f64() * 1e3 / a.reps as f64);
                    }
                }
            }
        }
        let stats = |v: &[f64]| {
            let mut s = v.to_vec();
            s.sort_by(f64::total_cmp);
            (s[s.len() / 2], s[0], s[s.len() - 1])
        };
        for (oi, t) in times.iter().enumerate() {
            let op = match oi {
                0 => "cached_attention dense".to_string(),
                i if i <= nq => format!("qmatmul {}", weights[i - 1].0),
                i if i == nq + 1 => "cached_indexer_block_scores".to_string(),
                _ => "cached_select".to_string(),
            };
            print!("| {op} | {b} |");
            for tv in t {
                let (m, lo, hi) = stats(tv);
                print!(" {m:.3} | {lo:.3}–{hi:.3} |");
            }
            let sw = stats(&t[0]).0;
            for tv in &t[1..] {
                print!(" {:.2}× |", stats(tv).0 / sw);
            }
            println!();
        }
    }
    Ok(())
}
