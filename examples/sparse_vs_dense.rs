//! Trains a dense and a dynamic-sparse model briefly on the long-range
//! retrieval corpus, compares validation loss and retrieval accuracy, and
//! draws which key blocks the indexer kept for one sequence
//! (`sparse_vs_dense.svg`: rows are queries — each selects its own blocks —,
//! columns key blocks; blue = kept, grey = causal but dropped; the red cell
//! is the block holding the fact that the marked query must retrieve).
//!
//! ```sh
//! cargo run --release --example sparse_vs_dense -- --steps 150
//! cargo run --release --example sparse_vs_dense -- --backend wgpu
//! ```

use std::path::PathBuf;

use clap::Parser;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::data::Corpus;
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::model::{AttentionMode, Model, ModelConfig, StepAttention, Workspace};
use dynsparse::train::{EvalStats, LrSchedule, MemoryReport, TrainConfig, Trainer};
use dynsparse::{Backend, DType, Error, Result};
use plotters::prelude::*;

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    #[arg(long, default_value_t = 150)]
    steps: u64,
    #[arg(long, default_value = "sparse_vs_dense.svg")]
    svg: PathBuf,
}

const SEQ: usize = 512;
const BLOCK: usize = 32;
const KEEP: usize = 4;

fn config(sparse: bool) -> ModelConfig {
    ModelConfig {
        attention: if sparse {
            AttentionMode::Sparse { block: BLOCK, keep_blocks: KEEP, index_heads: 4, index_dim: 32 }
        } else {
            AttentionMode::Dense
        },
        ..ModelConfig::default()
    }
}

struct Job {
    steps: u64,
    svg: PathBuf,
}

fn train<B: Backend>(
    be: &B,
    sparse: bool,
    steps: u64,
    train: &Corpus,
    val: &Corpus,
) -> Result<(Trainer<B>, EvalStats)> {
    let cfg = config(sparse);
    let tc = TrainConfig {
        steps,
        batch: 4,
        seq: SEQ,
        accum: 1,
        precision: DType::F32,
        lr: LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup_steps: steps / 20 + 1, total_steps: steps },
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        grad_clip: 1.0,
        warmup_frac: 0.1,
        ramp_frac: 0.3,
        kl_every: 1,
        seed: 5,
    };
    let mut tr = Trainer::new(be, Model::new(be, cfg, DType::F32, 5)?, tc, &mut MemoryReport::default())?;
    for _ in 0..steps {
        let s = tr.train_step(be, train)?;
        if s.step % 25 == 0 {
            println!("  {} step {:4} loss {:.3}", if sparse { "sparse" } else { "dense " }, s.step, s.loss);
        }
    }
    let attn = if sparse { StepAttention::Sparse { keep_blocks: KEEP } } else { StepAttention::Dense };
    let ev = tr.evaluate(be, val, 32, attn)?;
    Ok((tr, ev))
}

impl BackendJob for Job {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let (train_c, val) = generate(11, 1 << 20, SyntheticConfig::default()).split(0.1);
        let (_, dense) = train(be, false, self.steps, &train_c, &val)?;
        let (sparse_tr, sparse) = train(be, true, self.steps, &train_c, &val)?;
        println!("\n| model | val loss | retrieval accuracy |\n|---|---:|---:|");
        for (name, e) in [("dense", dense), (&format!("sparse ({KEEP}×{BLOCK} of {SEQ} keys)"), sparse)] {
            println!("| {name} | {:.4} | {:.1}% |", e.loss, 100.0 * e.retrieval_accuracy);
        }
        // One validation window that holds a fact and its query.
        let (span, fact) = val
            .answers
            .iter()
            .find(|(s, f)| s.end < val.tokens.len() && s.end - f < SEQ - 1)
            .cloned()
            .ok_or_else(|| Error::Invalid("no answer in the validation data".into()))?;
        let start = fact.saturating_sub(8).min(val.tokens.len() - SEQ - 1);
        let ids: Vec<u32> = val.tokens[start..start + SEQ].iter().map(|&b| b as u32).collect();
        let cfg = config(true);
        let mut ws = Workspace::new(be, &cfg, DType::F32, 1, SEQ)?;
        sparse_tr.model.forward(be, &mut ws, &ids, None, StepAttention::Sparse { keep_blocks: KEEP })?;
        let layer = cfg.n_layers - 1;
        let sel = ws.selection(layer).ok_or_else(|| Error::Invalid("no selection recorded".into()))?.to_u32_vec(be)?;
        let nb = SEQ.div_ceil(BLOCK);
        let (qt, fb) = (span.start - 1 - start, (fact - start) / BLOCK);
        let kept_fact = sel[qt * KEEP..(qt + 1) * KEEP].contains(&(fb as u32));
        println!(
            "\nlayer {layer}: the query at position {qt} {} the block {fb} holding its fact",
            if kept_fact { "kept" } else { "dropped" }
        );
        let root = SVGBackend::new(&self.svg, (640, 680)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| Error::Format(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("kept key blocks, layer {layer} (query {qt} → fact block {fb})"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0..nb, 0..SEQ)
            .map_err(|e| Error::Format(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("key block")
            .y_desc("query (top = first)")
            .y_label_formatter(&|y| format!("{}", SEQ.saturating_sub(*y + 1)))
            .disable_mesh()
            .draw()
            .map_err(|e| Error::Format(e.to_string()))?;
        let cells = (0..SEQ).flat_map(|q| (0..=q / BLOCK).map(move |k| (q, k))).map(|(q, k)| {
            let kept = sel[q * KEEP..(q + 1) * KEEP].contains(&(k as u32));
            let color = if q == qt && k == fb {
                RED.mix(0.9)
            } else if kept {
                BLUE.mix(0.8)
            } else {
                BLACK.mix(0.12)
            };
            // Row q is drawn at height SEQ - 1 - q so the first query is on top.
            Rectangle::new([(k, SEQ - 1 - q), (k + 1, SEQ - q)], color.filled())
        });
        chart.draw_series(cells).map_err(|e| Error::Format(e.to_string()))?;
        root.present().map_err(|e| Error::Format(e.to_string()))?;
        println!("heat map: {}", self.svg.display());
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("dynsparse=info,warn")).init();
    let a = Args::parse();
    let sel = match select(a.backend) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run_on(&sel.backend, Job { steps: a.steps, svg: a.svg }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
