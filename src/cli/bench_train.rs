//! `dynsparse bench train`: peak device bytes and tokens/s of the training
//! step per precision, side by side on one backend.

use std::path::PathBuf;
use std::time::Instant;

use crate::outln;
use clap::Args;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::model::{AttentionMode, Model, ModelConfig};
use dynsparse::train::memory::MemoryPlan;
use dynsparse::train::{LrSchedule, MemoryReport, TrainConfig, Trainer};
use dynsparse::util::machine::{host_description, update_markdown_section};
use dynsparse::{Backend, DType, Error, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::bench::parse_dtypes;

#[derive(Args, Debug)]
pub struct TrainBenchArgs {
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string(), "f16".to_string(), "bf16".to_string()])]
    pub precisions: Vec<String>,
    /// Timed optimizer steps per precision (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    /// dense or sparse.
    #[arg(long, default_value = "sparse")]
    pub attention: String,
    /// Sequence-length sweep at batch 1: for each length, one f32 step dense and
    /// one sparse, side by side (e.g. `--seqs 512,2048,8192,16384`). The model's
    /// context grows to the longest length. Replaces the per-precision table.
    #[arg(long, value_delimiter = ',')]
    pub seqs: Vec<usize>,
    /// `--seqs`: timed rounds per cell (each of `--steps` steps, more at short
    /// lengths); the table reports the median round and the spread.
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Sparse steps train the indexers' KL on every K-th query row (`train --indexer-kl-every`).
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub indexer_kl_every: usize,
    /// Write the table into this Markdown file (a section replaced on every run).
    #[arg(long)]
    pub write: Option<PathBuf>,
}

impl TrainBenchArgs {
    /// ` --indexer-kl-every K` for the recorded command, when not the default.
    fn kl_flag(&self) -> String {
        if self.indexer_kl_every == 1 {
            String::new()
        } else {
            format!(" --indexer-kl-every {}", self.indexer_kl_every)
        }
    }
}

struct Row {
    dt: DType,
    mem: MemoryReport,
    peak: usize,
    tok_s: f64,
    rounds: Vec<f64>,
}

struct Job<'a> {
    a: &'a TrainBenchArgs,
    cfg: ModelConfig,
    dts: Vec<DType>,
}

/// One warm-up step, then `n_rounds` rounds of `steps` timed optimizer steps
/// of a fresh model: tokens/s per round, and their median.
#[allow(clippy::too_many_arguments)]
fn time_steps<B: Backend>(
    be: &B,
    cfg: ModelConfig,
    dt: DType,
    batch: usize,
    seq: usize,
    steps: u64,
    n_rounds: u64,
    kl_every: usize,
) -> Result<Row> {
    let data = generate(3, 400_000.max(4 * batch * seq), SyntheticConfig::default());
    let tc = TrainConfig {
        steps: 1000,
        batch,
        seq,
        accum: 1,
        precision: dt,
        lr: LrSchedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 1, total_steps: 1000 },
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        grad_clip: 1.0,
        warmup_frac: 0.0,
        ramp_frac: 0.0,
        kl_every: if cfg.is_sparse() { kl_every } else { 1 },
        seed: 1,
    };
    let base = be.memory().allocated;
    be.reset_peak();
    let mut mem = MemoryReport::default();
    let mut tr = Trainer::new(be, Model::new(be, cfg, dt, 1)?, tc, &mut mem)?;
    tr.train_step(be, &data)?;
    be.synchronize()?;
    let mut rounds = Vec::with_capacity(n_rounds as usize);
    for _ in 0..n_rounds.max(1) {
        let t0 = Instant::now();
        for _ in 0..steps {
            tr.train_step(be, &data)?;
        }
        be.synchronize()?;
        rounds.push((steps as usize * batch * seq) as f64 / t0.elapsed().as_secs_f64());
    }
    let tok_s = median(&rounds);
    Ok(Row { dt, mem, peak: be.memory().peak - base, tok_s, rounds })
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 { s[m] } else { (s[m - 1] + s[m]) / 2.0 }
}

/// Timed steps per round of a `--seqs` cell: at least `steps`, and about
/// `steps·2048` tokens per round at shorter lengths (a 512-token step is too
/// short to time alone on a noisy machine).
fn sweep_steps(steps: u64, seq: usize) -> u64 {
    steps.max((steps * 2048).div_ceil(seq.max(1) as u64))
}

impl BackendJob for Job<'_> {
    type Output = Vec<Row>;
    fn run<B: Backend>(self, be: &B) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        for dt in self.dts {
            if !be.supports(dt) {
                eprintln!("{dt}: not supported by {}, skipped", be.device_name());
                continue;
            }
            rows.push(time_steps(
                be,
                self.cfg,
                dt,
                self.a.batch,
                self.a.seq,
                self.a.steps,
                1,
                self.a.indexer_kl_every,
            )?);
        }
        Ok(rows)
    }
}

/// One `--seqs` cell: the length, timed steps per round, and the dense and sparse rows.
struct Cell {
    seq: usize,
    steps: u64,
    dense: Row,
    sparse: Row,
}

/// `--seqs`: per length, dense then sparse at batch 1, f32.
struct SweepJob<'a> {
    a: &'a TrainBenchArgs,
    dense: ModelConfig,
    sparse: ModelConfig,
}

impl BackendJob for SweepJob<'_> {
    type Output = Vec<Cell>;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        let bar = ProgressBar::new(2 * self.a.seqs.len() as u64).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]").expect("static template"),
        );
        let mut out = Vec::new();
        for &seq in &self.a.seqs {
            let steps = sweep_steps(self.a.steps, seq);
            bar.set_message(format!("seq {seq} dense"));
            let dense = time_steps(be, self.dense, DType::F32, 1, seq, steps, self.a.rounds, 1)?;
            bar.inc(1);
            bar.set_message(format!("seq {seq} sparse"));
            let sparse =
                time_steps(be, self.sparse, DType::F32, 1, seq, steps, self.a.rounds, self.a.indexer_kl_every)?;
            bar.inc(1);
            log::info!("seq {seq}: dense {:?} tokens/s, sparse {:?} tokens/s (rounds)", dense.rounds, sparse.rounds);
            out.push(Cell { seq, steps, dense, sparse });
        }
        bar.finish_and_clear();
        Ok(out)
    }
}

/// `median (min–max)` of a cell's rounds.
fn spread(r: &Row) -> String {
    let (lo, hi) = r.rounds.iter().fold((f64::INFINITY, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
    format!("{:.0} ({lo:.0}–{hi:.0})", r.tok_s)
}

fn run_sweep(choice: BackendChoice, a: &TrainBenchArgs, mut cfg: ModelConfig) -> Result<()> {
    if a.rounds == 0 {
        return Err(Error::Invalid("--rounds 0: accepted range 1 or more".into()));
    }
    if a.seqs.contains(&0) {
        return Err(Error::Invalid("--seqs: every length must be 1 or more".into()));
    }
    cfg.context = cfg.context.max(*a.seqs.iter().max().unwrap_or(&1));
    let dense = ModelConfig { attention: AttentionMode::Dense, ..cfg };
    let sparse = ModelConfig { attention: ModelConfig::default().attention, ..cfg };
    let sel = select(choice)?;
    for c in [&dense, &sparse] {
        let plan = MemoryPlan::train(c, DType::F32, 1, cfg.context, sel.backend.max_binding_bytes());
        super::preflight(&plan, &sel.backend, "an f32 training step", "lower the longest of --seqs")?;
    }
    let rows = run_on(&sel.backend, SweepJob { a, dense, sparse })?;
    let kind = sel.backend.kind();
    let list = a.seqs.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let mut md = format!(
        "Machine: {} — device: {} ({kind}).\n\nCommand: `dynsparse --backend {kind} bench train --layers {} --d-model {} --seqs {list} --steps {} --rounds {}{}`\n\n\
         f32, batch 1, per cell one warm-up step then {} timed rounds of the steps shown (at least {}, about {}·2048 tokens per round at shorter lengths); \
         tokens/s as the median round (min–max); sparse = block {}, the default kept blocks, from step 0 (no dense warm-up); \
         sparse / dense is the ratio of the medians.\n\n\
         | seq | steps/round | dense tokens/s | sparse tokens/s | sparse / dense |\n|---:|---:|---:|---:|---:|\n",
        host_description(),
        sel.backend.device_name(),
        a.layers,
        a.d_model,
        a.steps,
        a.rounds,
        a.kl_flag(),
        a.rounds,
        a.steps,
        a.steps,
        match sparse.attention {
            AttentionMode::Sparse { block, .. } => block,
            _ => 0,
        },
    );
    for c in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.2}× |\n",
            c.seq,
            c.steps,
            spread(&c.dense),
            spread(&c.sparse),
            c.sparse.tok_s / c.dense.tok_s
        ));
    }
    outln!("{md}");
    if let Some(p) = &a.write {
        update_markdown_section(p, &format!("bench train seqs {kind}"), &md)?;
        outln!("written to {}", p.display());
    }
    Ok(())
}

pub fn run(choice: BackendChoice, a: TrainBenchArgs) -> Result<()> {
    let dts = parse_dtypes(&a.precisions)?;
    let mut cfg = ModelConfig { n_layers: a.layers, d_model: a.d_model, ..ModelConfig::default() };
    let flag = |f: &str| match f {
        "n_layers" => "--layers".to_string(),
        "d_model" => "--d-model".to_string(),
        o => format!("model {o}"),
    };
    cfg.attention = match a.attention.as_str() {
        "dense" => AttentionMode::Dense,
        "sparse" => cfg.attention,
        o => return Err(Error::Invalid(format!("--attention `{o}`: expected dense or sparse"))),
    };
    cfg.check(&flag)?;
    if a.steps == 0 {
        return Err(Error::Invalid("--steps 0: accepted range 1 or more".into()));
    }
    if a.indexer_kl_every == 0 {
        return Err(Error::Invalid(
            "--indexer-kl-every 0: accepted range 1 or more (at most the sequence length)".into(),
        ));
    }
    if a.indexer_kl_every > 1 && a.seqs.is_empty() && !cfg.is_sparse() {
        return Err(Error::Invalid("--indexer-kl-every applies to --attention sparse only (given: dense)".into()));
    }
    if !a.seqs.is_empty() {
        return run_sweep(choice, &a, cfg);
    }
    // A --seq beyond the default context grows the model's context (RoPE table).
    cfg.context = cfg.context.max(a.seq);
    if !(1..=cfg.context).contains(&a.seq) || a.batch == 0 {
        return Err(Error::Invalid(format!(
            "--seq {} and --batch {}: accepted ranges 1..={} and 1..",
            a.seq, a.batch, cfg.context
        )));
    }
    let sel = select(choice)?;
    for &dt in &dts {
        let plan = MemoryPlan::train(&cfg, dt, a.batch, a.seq, sel.backend.max_binding_bytes());
        super::preflight(
            &plan,
            &sel.backend,
            &format!("a {dt} training step"),
            "lower --batch, --seq, --d-model or --layers",
        )?;
    }
    let rows = run_on(&sel.backend, Job { a: &a, cfg, dts })?;
    let kind = sel.backend.kind();
    let mib = |b: usize| format!("{:.1}", b as f64 / (1u64 << 20) as f64);
    let f32_peak = rows.iter().find(|r| r.dt == DType::F32).map(|r| r.peak);
    let mut md = format!(
        "Machine: {} — device: {} ({kind}).\n\nCommand: `dynsparse --backend {kind} bench train --layers {} --d-model {} --batch {} --seq {} --attention {} --steps {}{}`\n\n\
         Model: {} parameters. Peak = the backend's peak live bytes over one training step (weights, f32 masters, gradients, AdamW moments, activations).\n\n\
         | precision | weights | f32 masters | gradients | AdamW moments | activations | peak MiB | peak / f32 | tokens/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        host_description(),
        sel.backend.device_name(),
        a.layers,
        a.d_model,
        a.batch,
        a.seq,
        a.attention,
        a.steps,
        a.kl_flag(),
        cfg.n_params()
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            r.dt,
            mib(r.mem.weights),
            mib(r.mem.master_weights),
            mib(r.mem.gradients),
            mib(r.mem.optimizer),
            mib(r.mem.activations),
            mib(r.peak),
            f32_peak.map(|f| format!("{:.2}×", r.peak as f64 / f as f64)).unwrap_or("–".into()),
            r.tok_s
        ));
    }
    outln!("{md}");
    if let Some(p) = &a.write {
        update_markdown_section(p, &format!("bench train {kind}"), &md)?;
        outln!("written to {}", p.display());
    }
    Ok(())
}
