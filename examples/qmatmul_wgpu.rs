//! Times the quantized matmul kernels against the dense ones on one wgpu
//! adapter, side by side in one run: `y = x · W` for a `[k, n]` weight stored
//! dense (f32, bf16) or in each quantized format, at decode batch sizes.
//! Rounds alternate between the variants, so the machine's noise hits them
//! alike; the table shows each variant's median over the rounds and its
//! spread (min–max), and the ratio to the dense f32 and bf16 medians.
//!
//! ```sh
//! XDG_RUNTIME_DIR=/tmp cargo run --example qmatmul_wgpu -- --n 1024 --k 1024 --rows 1,8
//! ```

use std::time::Instant;

use clap::Parser;
use dynsparse::backend::wgpu::{AdapterPick, WgpuBackend};
use dynsparse::ops::{self, QWeight};
use dynsparse::quant::{QFormat, QMatrix, transpose};
use dynsparse::util::rng::Rng;
use dynsparse::{Backend, DType, Result, Tensor};

#[derive(Parser)]
struct Args {
    /// Output channels.
    #[arg(long, default_value_t = 1024)]
    n: usize,
    /// Inputs (the summed dimension).
    #[arg(long, default_value_t = 1024)]
    k: usize,
    /// Batch sizes (rows of x), comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    rows: Vec<usize>,
    /// Calls per timing.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Timings per variant (interleaved).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

enum Weight {
    Dense(Tensor<WgpuBackend>),
    Quant(Box<QWeight<WgpuBackend>>),
}

fn main() -> Result<()> {
    let a = Args::parse();
    let be = WgpuBackend::new(&AdapterPick::from_env().unwrap_or(AdapterPick::Any))?;
    let (n, k) = (a.n, a.k);
    let mut rng = Rng::new(7);
    let w_kn: Vec<f32> = rng.normal_vec(k * n).into_iter().map(|v| v * 0.05).collect();
    let w_nk = transpose(&w_kn, k, n);
    let mut variants: Vec<(String, DType, Weight, usize)> = vec![
        ("dense f32".into(), DType::F32, Weight::Dense(Tensor::from_f32(&be, &w_kn, &[k, n], DType::F32)?), 4 * k * n),
        (
            "dense bf16".into(),
            DType::BF16,
            Weight::Dense(Tensor::from_f32(&be, &w_kn, &[k, n], DType::BF16)?),
            2 * k * n,
        ),
    ];
    for f in [
        QFormat::Int8,
        QFormat::Int4 { group: 128, asym: false },
        QFormat::Int4 { group: 32, asym: true },
        QFormat::Sparse24 { int8: false },
        QFormat::Sparse24 { int8: true },
    ] {
        let qm = QMatrix::quantize(&w_nk, n, k, f)?;
        variants.push((f.name(), DType::F32, Weight::Quant(Box::new(QWeight::upload(&be, &qm)?)), qm.bytes()));
    }
    println!("device: {} (wgpu); weight {k}×{n}; {} calls per timing, {} rounds", be.device_name(), a.reps, a.rounds);
    println!();
    println!("| rows | weight | x dtype | MiB | ms/call (median) | spread | vs dense f32 | vs dense bf16 |");
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    for &m in &a.rows {
        let x = rng.normal_vec(m * k);
        let mut times = vec![Vec::new(); variants.len()];
        for round in 0..=a.rounds {
            for (vi, (_, dt, w, _)) in variants.iter().enumerate() {
                let xt = Tensor::from_f32(&be, &x, &[m, k], *dt)?;
                let mut y = Tensor::empty(&be, &[m, n], *dt)?;
                let mut call = || match w {
                    Weight::Dense(wt) => ops::matmul_rows(&be, &xt, wt, &mut y, false, 1.0, 0.0),
                    Weight::Quant(q) => ops::qmatmul(&be, &xt, q, &mut y),
                };
                call()?;
                be.synchronize()?;
                let t0 = Instant::now();
                for _ in 0..a.reps {
                    call()?;
                }
                be.synchronize()?;
                // Round 0 warms up (pipelines, pools) and is not counted.
                if round > 0 {
                    times[vi].push(t0.elapsed().as_secs_f64() * 1e3 / a.reps as f64);
                }
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let meds: Vec<f64> = times.iter_mut().map(med).collect();
        for (vi, (name, dt, _, bytes)) in variants.iter().enumerate() {
            let t = &times[vi];
            println!(
                "| {m} | {name} | {dt} | {:.2} | {:.3} | {:.3}–{:.3} | {:.2}× | {:.2}× |",
                *bytes as f64 / (1 << 20) as f64,
                meds[vi],
                t[0],
                t[t.len() - 1],
                meds[0] / meds[vi],
                meds[1] / meds[vi]
            );
        }
    }
    Ok(())
}
