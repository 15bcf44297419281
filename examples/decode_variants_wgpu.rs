//! Times the wgpu decode kernels' variants side by side on one adapter
//! (`DYNSPARSE_WGPU_KERNELS` / `DYNSPARSE_WGPU_SUBGROUPS` are ignored: the
//! variant is switched between timings): decode attention over a paged KV
//! cache (`cached_attention`, dense, one query row per sequence) and the
//! quantized matmul (int8 and int4 weights) at decode batch sizes. The
//! variants: `sw` (`cached_attn`, `qmm`), `hw` (`cached_attn_hw`, `qmm_hw`,
//! workgroup-memory reductions) and, where the adapter has subgroups,
//! `hw+sg` (`cached_attn_hw_sg`, `qmm_hw_sg`). Rounds alternate between
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
use dynsparse::backend::wgpu::{AdapterPick, KernelVariant, WgpuBackend};
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
}

type T = Tensor<WgpuBackend>;

fn main() -> Result<()> {
    let a = Args::parse();
    let mut be = WgpuBackend::new(&AdapterPick::from_env().unwrap_or(AdapterPick::Any))?;
    let sg = be.set_subgroups(true).is_ok();
    let mut variants = vec![("sw", KernelVariant::Software, false), ("hw", KernelVariant::Hardware, false)];
    if sg {
        variants.push(("hw+sg", KernelVariant::Hardware, true));
    }
    let (h, kv, d) = (a.heads, a.kv_heads, a.head_dim);
    let mut rng = Rng::new(3);
    println!(
        "device: {} (wgpu); decode attention: ctx {}, heads {h}/{kv}, head_dim {d}, pages of {}; \
         qmatmul {}×{}; f32; {} calls per timing, {} rounds",
        be.device_name(),
        a.ctx,
        a.page,
        a.n,
        a.k,
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
        let kc = T::from_f32(&be, &rng.normal_vec(slots * kv * d), &[slots, kv, d], DType::F32)?;
        let vc = T::from_f32(&be, &rng.normal_vec(slots * kv * d), &[slots, kv, d], DType::F32)?;
        let q = T::from_f32(&be, &rng.normal_vec(b * h * d), &[b, h, d], DType::F32)?;
        let ids: Vec<u32> = (0..np as u32).rev().collect();
        let pages = T::from_u32(&be, &ids, &[np])?;
        let tab: Vec<u32> = (0..b).flat_map(|i| [(i * pages_per) as u32, a.ctx as u32]).collect();
        let rows = T::from_u32(&be, &tab, &[b, 2])?;
        let mut o = T::empty(&be, &[b, h, d], DType::F32)?;
        let x = T::from_f32(&be, &rng.normal_vec(b * a.k), &[b, a.k], DType::F32)?;
        let w: Vec<f32> = rng.normal_vec(a.n * a.k).into_iter().map(|v| v * 0.05).collect();
        let mut y = T::empty(&be, &[b, a.n], DType::F32)?;
        let mut weights = Vec::new();
        for f in [QFormat::Int8, QFormat::Int4 { group: 32, asym: false }] {
            weights.push((f.name(), QWeight::upload(&be, &QMatrix::quantize(&w, a.n, a.k, f)?)?));
        }
        let ops_n = 1 + weights.len();
        let mut times = vec![vec![Vec::new(); variants.len()]; ops_n];
        for round in 0..=a.rounds {
            for (vi, &(_, var, sg)) in variants.iter().enumerate() {
                be.set_kernel_variant(var);
                be.set_subgroups(sg)?;
                let be = &be;
                for (oi, t) in times.iter_mut().enumerate() {
                    let mut call = || -> Result<()> {
                        if oi == 0 {
                            let table = KvTable { rows: &rows, pages: &pages, page: a.page };
                            attention::cached_attention(be, &q, &kc, &vc, &table, CachedPattern::Dense, &mut o)
                        } else {
                            ops::qmatmul(be, &x, &weights[oi - 1].1, &mut y)
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
            let op =
                if oi == 0 { "cached_attention dense".to_string() } else { format!("qmatmul {}", weights[oi - 1].0) };
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
