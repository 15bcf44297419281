//! The smallest training loop through the library API: what a program
//! embedding dynsparse writes. Runs on any backend:
//!
//! ```sh
//! cargo run --release --example train_minimal -- --backend auto --steps 100
//! cargo run --release --features cuda --example train_minimal -- --backend cuda
//! ```

use clap::Parser;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::model::{AttentionMode, Model, ModelConfig, StepAttention};
use dynsparse::train::{LrSchedule, MemoryReport, TrainConfig, Trainer};
use dynsparse::{Backend, DType, Result};

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    #[arg(long, default_value_t = 60)]
    steps: u64,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    precision: String,
}

struct Job {
    steps: u64,
    precision: DType,
}

impl BackendJob for Job {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        // 1. Data: the embedded long-range retrieval corpus, split train/validation.
        let (train, val) = generate(7, 300_000, SyntheticConfig::default()).split(0.1);
        // 2. A small DSA model in the working precision.
        let cfg = ModelConfig {
            n_layers: 2,
            d_model: 64,
            n_heads: 4,
            n_kv_heads: 2,
            attention: AttentionMode::Sparse { block: 32, keep_blocks: 4, index_heads: 4, index_dim: 16 },
            ..ModelConfig::default()
        };
        let model = Model::new(be, cfg, self.precision, 0)?;
        // 3. The mixed-precision trainer: f32 masters, AdamW, loss scaling, sparsity schedule.
        let tc = TrainConfig {
            steps: self.steps,
            batch: 4,
            seq: 256,
            accum: 1,
            precision: self.precision,
            lr: LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup_steps: 5, total_steps: self.steps },
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
            grad_clip: 1.0,
            warmup_frac: 0.1,
            ramp_frac: 0.3,
            kl_every: 1,
            seed: 1,
        };
        let mut mem = MemoryReport::default();
        let mut trainer = Trainer::new(be, model, tc, &mut mem)?;
        println!(
            "{} on {}: model state {} bytes, activations {} bytes",
            cfg.n_params(),
            be.device_name(),
            mem.model_state(),
            mem.activations
        );
        // 4. The loop.
        for _ in 0..self.steps {
            let s = trainer.train_step(be, &train)?;
            if s.step % 10 == 0 {
                println!(
                    "step {:4}  loss {:.3}  kept {:.0}%",
                    s.step,
                    s.loss,
                    100.0 * s.plan.map(|p| p.keep_fraction).unwrap_or(1.0)
                );
            }
        }
        let ev = trainer.evaluate(be, &val, 16, StepAttention::Sparse { keep_blocks: 4 })?;
        println!("validation loss {:.3} (perplexity {:.2})", ev.loss, ev.perplexity);
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("dynsparse=info,warn")).init();
    let a = Args::parse();
    let run = || -> Result<()> {
        let precision = DType::parse(&a.precision).filter(|d| d.is_float()).ok_or_else(|| {
            dynsparse::Error::Invalid(format!("--precision `{}`: expected f32, f16 or bf16", a.precision))
        })?;
        let sel = select(a.backend)?;
        run_on(&sel.backend, Job { steps: a.steps, precision })
    };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
