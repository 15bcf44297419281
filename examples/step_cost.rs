//! Cost of one serving step on the CPU backend as a function of its rows:
//! `R` decode rows (one per sequence, each at `--context` cached tokens),
//! optionally next to a prefill chunk of `--prefill` rows of one more
//! sequence. The `bench serve` model (8 × 512, sparse attention, f32).
//! Reports the minimum and the median wall time of `--reps` steps and the
//! process CPU time per step (both threads, from `getrusage`): on a shared
//! machine the wall times measure the load as much as the step, while the
//! CPU time is the step's own work (plus the pool's brief spinning).
//!
//! ```sh
//! cargo run --release --example step_cost -- --rows 1,8,16,24,32,48,64 --prefill 0
//! ```

use clap::Parser;
use dynsparse::backend::cpu::CpuBackend;
use dynsparse::model::{AttentionMode, InferState, KvCache, Model, ModelConfig, Row};
use dynsparse::{DType, Result};

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,24,32,48,64")]
    rows: Vec<usize>,
    /// Prefill rows (one more sequence's prompt chunk) added to every step.
    #[arg(long, default_value_t = 0)]
    prefill: usize,
    /// Tokens cached per decoding sequence.
    #[arg(long, default_value_t = 200)]
    context: usize,
    #[arg(long, default_value_t = 9)]
    reps: usize,
}

/// User + system CPU seconds of the process so far.
fn cpu_secs() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` through the valid pointer it is given.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0;
    if !ok {
        return f64::NAN;
    }
    // SAFETY: zero-initialised and (on success) filled by the call above.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let be = CpuBackend::new();
    let cfg = ModelConfig {
        n_layers: 8,
        n_heads: 8,
        n_kv_heads: 8,
        d_model: 512,
        vocab: 256,
        context: 1024,
        mlp_ratio: 4,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block: 64, keep_blocks: 4, index_heads: 4, index_dim: 32 },
    };
    let model = Model::new(&be, cfg, DType::F32, 3)?;
    // FLOP of one row: 2 per weight of the products (the embedding is a lookup, the tied head a product).
    let d = cfg.d_model;
    let per_layer = 4 * d * d + 2 * d * d * cfg.mlp_ratio + d * 4 * 32 + d * 32 + d * 4;
    let flop_row = 2.0 * (cfg.n_layers * per_layer + d * cfg.vocab) as f64;
    let max_rows = a.rows.iter().copied().max().unwrap_or(1) + 1;
    println!("rows | prefill | min ms | median ms | CPU ms/step | CPU ms/row | GFLOP per CPU-s");
    for &r in &a.rows {
        let mut cache = KvCache::paged(&be, &model, max_rows, 1024, 16, max_rows * 64)?;
        let mut st = InferState::default();
        for slot in 0..r {
            cache.assume_filled(slot, a.context)?;
        }
        let mut times = Vec::new();
        let mut cpu = 0.0;
        for rep in 0..a.reps + 2 {
            let mut rows: Vec<Row> = (0..r).map(|slot| Row { slot, token: 65 }).collect();
            // The prefill sequence restarts every step so the chunk stays at the same positions.
            cache.clear(r);
            rows.extend((0..a.prefill).map(|_| Row { slot: r, token: 66 }));
            let (t, c) = (std::time::Instant::now(), cpu_secs());
            model.step(&be, &mut cache, &mut st, &rows, model.inference_attention())?;
            if rep >= 2 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
                cpu += cpu_secs() - c;
            }
        }
        times.sort_by(f64::total_cmp);
        let (min, med) = (times[0], times[times.len() / 2]);
        let (n, cpu_ms) = ((r + a.prefill) as f64, cpu * 1e3 / a.reps as f64);
        println!(
            "{r} | {} | {min:.2} | {med:.2} | {cpu_ms:.2} | {:.3} | {:.1}",
            a.prefill,
            cpu_ms / n,
            flop_row * n / cpu_ms / 1e6
        );
    }
    Ok(())
}
