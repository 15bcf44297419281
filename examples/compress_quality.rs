//! Compression quality on a trained checkpoint (issue 12, item 2): size and
//! Δ validation loss of every format and method applied to every linear
//! weight, and the hardware-aware planner at the given budgets.
//!
//! The checkpoint's validation text (the last 10% of its `--data` file) is
//! cut in two halves: the first calibrates (AWQ, Wanda) and is the planner's
//! sensitivity and verification text; the second is **held out**, seen by
//! nothing, and every figure is reported on it too.
//!
//! ```sh
//! cargo run --example compress_quality -- --checkpoint runs/kjv/checkpoint.safetensors
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::data::Corpus;
use dynsparse::quant::awq::{Choice, Method, compress};
use dynsparse::quant::calib::{CalibOptions, calibrate, linears};
use dynsparse::quant::plan::{
    CostCache, Evaluator, PlanOptions, Target, choose_and_verify, measure_table, parse_budget,
};
use dynsparse::quant::{QFormat, QMatrix};
use dynsparse::train::checkpoint::{self, Checkpoint};
use dynsparse::{Backend, Error, Result};

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value_t = BackendChoice::Cpu)]
    backend: BackendChoice,
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text file (default: the checkpoint's training data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Evaluation windows of the checkpoint's sequence length per half.
    #[arg(long, default_value_t = 24)]
    windows: usize,
    /// Planner budgets (fractions or percentages of the loss).
    #[arg(long, value_delimiter = ',', default_value = "0.5%,2%")]
    budgets: Vec<String>,
    #[arg(long, default_value = "speed")]
    target: String,
    /// Skip the per-format table (planner only).
    #[arg(long)]
    planner_only: bool,
}

struct Job {
    args: Args,
    ck: Checkpoint,
    calib_text: Corpus,
    held_out: Corpus,
}

fn pct(d: f64, base: f64) -> String {
    format!("{:+.2}%", 100.0 * d / base)
}

impl BackendJob for Job {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let Job { args, ck, calib_text, held_out } = self;
        let (cfg, dtype, values) = (ck.model, ck.train.precision, &ck.state.params);
        let seq = ck.train.seq.min(128);
        let t0 = Instant::now();
        let model = dynsparse::model::Model::from_values(be, cfg, dtype, values)?;
        let cal = calibrate(be, &model, &calib_text, CalibOptions { batch: 4, seq, windows: 32, sample_rows: 256 })?;
        drop(model);
        eprintln!("calibration: {} tokens in {:.1} s", cal.tokens, t0.elapsed().as_secs_f64());
        let mut ev_a = Evaluator::new(be, &cfg, dtype, values, &calib_text, (4, seq, args.windows))?;
        let mut ev_b = Evaluator::new(be, &cfg, dtype, values, &held_out, (4, seq, args.windows))?;
        let (base_a, base_b) = (ev_a.loss(be, values)?, ev_b.loss(be, values)?);
        let lins = linears(&cfg);
        let dense_bytes: usize = lins.iter().map(|l| 4 * l.n * l.k).sum();
        println!(
            "device: {}; model: {} parameters, {} linear weights ({} bytes as f32)",
            be.device_name(),
            cfg.n_params(),
            lins.len(),
            dense_bytes
        );
        println!(
            "base loss: calibration half {base_a:.4}, held-out half {base_b:.4} ({} windows of {seq} each)\n",
            args.windows
        );
        if !args.planner_only {
            println!("| format | method | linear bytes | vs f32 | Δloss calib | Δloss held-out |");
            println!("|---|---|---|---|---|---|");
            let i4 = |g| QFormat::Int4 { group: g, asym: false };
            let runs = [
                (QFormat::Int8, Method::Rtn),
                (QFormat::Int8, Method::Awq),
                (i4(128), Method::Rtn),
                (i4(128), Method::Awq),
                (i4(64), Method::Rtn),
                (i4(64), Method::Awq),
                (i4(32), Method::Rtn),
                (i4(32), Method::Awq),
                (QFormat::Sparse24 { int8: false }, Method::Rtn),
                (QFormat::Sparse24 { int8: false }, Method::Wanda),
                (QFormat::Sparse24 { int8: true }, Method::Rtn),
                (QFormat::Sparse24 { int8: true }, Method::Wanda),
            ];
            for (f, m) in runs {
                let t = Instant::now();
                let ch = vec![Some(Choice { format: f, method: m }); lins.len()];
                let comp = compress(&cfg, values, &ch, Some(&cal))?;
                let deq = comp.dequantized();
                let (da, db) = (ev_a.loss(be, &deq)? - base_a, ev_b.loss(be, &deq)? - base_b);
                let bytes: usize = comp.weights.iter().flatten().map(QMatrix::bytes).sum();
                let mname = match (m, f) {
                    (Method::Rtn, QFormat::Sparse24 { .. }) => "magnitude",
                    _ => m.name(),
                };
                println!(
                    "| {f} | {mname} | {bytes} | {:.3}× | {} | {} |",
                    bytes as f64 / dense_bytes as f64,
                    pct(da, base_a),
                    pct(db, base_b)
                );
                eprintln!("  {f} {mname}: {:.1} s", t.elapsed().as_secs_f64());
            }
            println!();
        }
        let target = Target::parse(&args.target)?;
        let mut cache = CostCache::load(CostCache::default_path().as_deref());
        let mut opt = PlanOptions {
            budget: 0.01,
            target,
            candidates: PlanOptions::default_candidates(true),
            batches: vec![1, 8],
            max_rounds: 3,
        };
        let t = Instant::now();
        let table = measure_table(be, &mut ev_a, values, Some(&cal), &opt, &mut cache, |i, n| {
            eprint!("\rsensitivity and cost: {i}/{n}");
        })?;
        eprintln!(" ({:.1} s)", t.elapsed().as_secs_f64());
        for b in &args.budgets {
            opt.budget = parse_budget(b)?;
            let (plan, comp) = choose_and_verify(be, &mut ev_a, values, Some(&cal), &table, &opt)?;
            let held = ev_b.loss(be, &comp.dequantized())? - base_b;
            let (qb, fb) = comp.weight_bytes();
            let kept: usize = lins.iter().filter(|l| comp.weights[l.param].is_none()).map(|l| 4 * l.n * l.k).sum();
            println!("planner, budget {b} of the loss, target {}:", args.target);
            print!("{}", plan.table());
            println!(
                "held-out Δloss {:+.5} ({}); linear bytes {} ({:.3}× f32; {} of {} compressed)\n",
                held,
                pct(held, base_b),
                qb + kept,
                (qb + kept) as f64 / dense_bytes as f64,
                fb,
                dense_bytes
            );
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ck = checkpoint::load(&args.checkpoint)?;
    let data: PathBuf = match (&args.data, ck.extra.get("data")) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) if p != "synthetic" => Path::new(p).to_path_buf(),
        _ => return Err(Error::Invalid("the checkpoint names no data file: pass --data".into())),
    };
    let val = Corpus::from_file(&data)?.split(0.1).1;
    let (calib_text, held_out) = val.split(0.5);
    let sel = select(args.backend)?;
    run_on(&sel.backend, Job { args, ck, calib_text, held_out })
}
