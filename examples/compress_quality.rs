//! Compression quality on a trained checkpoint (issue 12, item 2): size and
//! Δ validation loss of every format and method applied to every linear
//! weight, and the hardware-aware planner at the given budgets.
//!
//! The checkpoint's validation text (the last 10% of its `--data` file) is
//! cut into windows dealt to three disjoint parts (`quant::plan::Parts`):
//! the *sensitivity* part calibrates (AWQ, Wanda) and gives the planner's
//! `Δ` table, the *verification* part only verifies plans (`quant::plan`,
//! "Verification"), the *held-out* part is seen by nothing, and every figure
//! is reported on it too. `--split interleaved` (default) deals the windows
//! round-robin over the whole text: three samples of the same text.
//! `--split halves` keeps the second half as the held-out part: a
//! distribution-shift check (other books than the plan was fitted on).
//!
//! `--cost-backend wgpu` plans for another device: its kernel costs are
//! measured there (cached), while the losses are evaluated on `--backend`.
//!
//! ```sh
//! cargo run --example compress_quality -- --checkpoint runs/kjv/checkpoint.safetensors
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::data::Corpus;
use dynsparse::quant::awq::{AwqOptions, Choice, Method, compress_with};
use dynsparse::quant::calib::{CalibOptions, calibrate, linears};
use dynsparse::quant::plan::{
    CostCache, Evaluator, Paired, Parts, PlanOptions, Split, Target, Z_ONE_SIDED_95, choose_and_verify, measure_table,
    parse_budget, sensitivity_cache_path,
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
    /// Windows (of the checkpoint's sequence length, at most 128) of the
    /// sensitivity text (per-format table: of each half).
    #[arg(long, default_value_t = 16)]
    windows: usize,
    /// Windows of the planner's verification text.
    #[arg(long, default_value_t = 32)]
    verify_windows: usize,
    /// Windows of the held-out text.
    #[arg(long, default_value_t = 32)]
    held_windows: usize,
    /// Measure kernel costs on this backend instead of --backend.
    #[arg(long, value_enum)]
    cost_backend: Option<BackendChoice>,
    /// interleaved (sensitivity, verification and held-out windows dealt round-robin over the
    /// whole text) or halves (held-out = the second half: a distribution-shift check).
    #[arg(long, default_value = "interleaved")]
    split: String,
    /// The per-format table only (no planner).
    #[arg(long)]
    table_only: bool,
    /// Add int4-g128 asymmetric (GPTQ) and 2:4-int8 (SparseGPT) to the planner's candidates.
    #[arg(long)]
    more_candidates: bool,
    /// Planner budgets (fractions or percentages of the loss).
    #[arg(long, value_delimiter = ',', default_value = "0.5%,2%")]
    budgets: Vec<String>,
    #[arg(long, default_value = "speed")]
    target: String,
    /// Skip the per-format table (planner only).
    #[arg(long)]
    planner_only: bool,
    /// AWQ without its clipping search (the α scale search alone): an ablation of the table.
    #[arg(long)]
    no_clip: bool,
    /// The table's int4 rows only.
    #[arg(long)]
    int4_only: bool,
    /// The table's 2:4 rows only.
    #[arg(long)]
    sparse_only: bool,
    /// The table's rows of these methods only (rtn, awq, gptq, wanda, sparsegpt; rtn also names magnitude).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// The table's int4 rows of these group sizes only.
    #[arg(long, value_delimiter = ',')]
    groups: Option<Vec<usize>>,
}

struct Job {
    args: Args,
    ck: Checkpoint,
    parts: Parts,
    /// The device whose cached kernel costs to plan with (None: the backend's own).
    cost_device: Option<String>,
}

fn candidates(more: bool) -> Vec<Choice> {
    let mut c = PlanOptions::default_candidates(true);
    if more {
        c.push(Choice { format: QFormat::Int4 { group: 128, asym: true }, method: Method::Gptq });
        c.push(Choice { format: QFormat::Sparse24 { int8: true }, method: Method::SparseGpt });
    }
    c
}

/// Measures (into the cost cache) every candidate's kernel cost at every
/// linear shape on one backend; returns its device name.
struct CostJob {
    ck: Checkpoint,
    more: bool,
}

impl BackendJob for CostJob {
    type Output = String;
    fn run<B: Backend>(self, be: &B) -> Result<String> {
        let mut cache = CostCache::load(CostCache::default_path().as_deref());
        let dtype = self.ck.train.precision;
        let t = Instant::now();
        for l in linears(&self.ck.model) {
            for m in [1, 8] {
                cache.cost(be, dtype, None, l.n, l.k, m)?;
                for c in candidates(self.more) {
                    cache.cost(be, dtype, Some(c.format), l.n, l.k, m)?;
                }
            }
        }
        cache.save();
        eprintln!("kernel costs on {}: {:.1} s", be.device_name(), t.elapsed().as_secs_f64());
        Ok(be.device_name())
    }
}

/// Whether the budget changed the plan: its cost exceeds the unconstrained
/// optimum (every weight in its cheapest option, whatever its Δ).
fn binds(plan: &dynsparse::quant::plan::Plan, target: Target) -> bool {
    let cost = |o: &dynsparse::quant::plan::PlanOption| match target {
        Target::Speed => o.us,
        Target::Size => o.bytes as f64,
    };
    let chosen: f64 = plan.rows.iter().map(|(r, o)| cost(&r.options[*o])).sum();
    let free: f64 = plan.rows.iter().map(|(r, _)| r.options.iter().map(cost).fold(f64::INFINITY, f64::min)).sum();
    chosen > free * (1.0 + 1e-9)
}

fn pct(d: f64, base: f64) -> String {
    format!("{:+.2}%", 100.0 * d / base)
}

impl BackendJob for Job {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let Job { args, ck, parts, cost_device } = self;
        let (cfg, dtype, values) = (ck.model, ck.train.precision, &ck.state.params);
        let seq = ck.train.seq.min(128);
        let t0 = Instant::now();
        let model = dynsparse::model::Model::from_values(be, cfg, dtype, values)?;
        let cal_text = parts.calibration(32);
        let cal = calibrate(be, &model, &cal_text, CalibOptions { batch: 4, seq, windows: 32, sample_rows: 4096 })?;
        drop(model);
        eprintln!("calibration: {} tokens in {:.1} s", cal.tokens, t0.elapsed().as_secs_f64());
        let mut ev_a = Evaluator::new(be, &cfg, dtype, values, &parts.sensitivity, (4, seq, args.windows))?.chunked();
        let mut ev_v =
            Evaluator::new(be, &cfg, dtype, values, &parts.verification, (1, seq, args.verify_windows))?.chunked();
        let mut ev_b = Evaluator::new(be, &cfg, dtype, values, &parts.held_out, (1, seq, args.held_windows))?.chunked();
        let span = |r: &[std::ops::Range<usize>]| {
            format!(
                "{} windows at tokens {}..{}",
                r.len(),
                r.first().map_or(0, |x| x.start),
                r.last().map_or(0, |x| x.end)
            )
        };
        println!(
            "split {}: sensitivity {}, verification {}, held-out {}",
            args.split,
            span(&parts.ranges[0]),
            span(&parts.ranges[1]),
            span(&parts.ranges[2])
        );
        let (base_a, base_b) = (ev_a.loss(be, values)?, ev_b.loss(be, values)?);
        let base_v = ev_v.loss(be, values)?;
        println!("verification text base loss {base_v:.4}");
        let base_b_windows = ev_b.window_losses(be, values)?;
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
            "base loss: sensitivity text {base_a:.4} ({} windows of {seq}), held-out {base_b:.4} ({} windows); \
             verification {} windows",
            args.windows, args.held_windows, args.verify_windows
        );
        println!("kernel costs of: {}\n", cost_device.clone().unwrap_or_else(|| be.device_name()));
        if !args.planner_only {
            println!(
                "| format | method | linear bytes | vs f32 | Δloss sensitivity text | Δloss held-out (± se) | \
                 paired vs rtn/magnitude, held-out (± se) |"
            );
            println!("|---|---|---|---|---|---|---|");
            // Held-out window losses of each format's RTN/magnitude run: the AWQ/Wanda rows
            // report their paired difference window by window.
            let mut first: std::collections::HashMap<String, Vec<f64>> = Default::default();
            let i4 = |g| QFormat::Int4 { group: g, asym: false };
            let runs = [
                (QFormat::Int8, Method::Rtn),
                (QFormat::Int8, Method::Awq),
                (QFormat::Int8, Method::Gptq),
                (i4(128), Method::Rtn),
                (i4(128), Method::Awq),
                (i4(128), Method::Gptq),
                (i4(64), Method::Rtn),
                (i4(64), Method::Awq),
                (i4(64), Method::Gptq),
                (i4(32), Method::Rtn),
                (i4(32), Method::Awq),
                (i4(32), Method::Gptq),
                (QFormat::Sparse24 { int8: false }, Method::Rtn),
                (QFormat::Sparse24 { int8: false }, Method::Wanda),
                (QFormat::Sparse24 { int8: false }, Method::SparseGpt),
                (QFormat::Sparse24 { int8: true }, Method::Rtn),
                (QFormat::Sparse24 { int8: true }, Method::Wanda),
                (QFormat::Sparse24 { int8: true }, Method::SparseGpt),
            ];
            let awq_opt = AwqOptions { clip: !args.no_clip, ..Default::default() };
            // AWQ's held-out window losses per format, for GPTQ's paired difference to AWQ.
            let mut awq_wins: std::collections::HashMap<String, Vec<f64>> = Default::default();
            for (f, m) in runs {
                if args.int4_only && !matches!(f, QFormat::Int4 { .. })
                    || args.sparse_only && !matches!(f, QFormat::Sparse24 { .. })
                {
                    continue;
                }
                if args.methods.as_ref().is_some_and(|ms| !ms.iter().any(|x| x == m.name())) {
                    continue;
                }
                if let (Some(gs), QFormat::Int4 { group, .. }) = (&args.groups, f)
                    && !gs.contains(&group)
                {
                    continue;
                }
                let t = Instant::now();
                let ch = vec![Some(Choice { format: f, method: m }); lins.len()];
                let comp = compress_with(&cfg, values, &ch, Some(&cal), &awq_opt)?;
                let deq = comp.dequantized();
                let da = ev_a.loss(be, &deq)? - base_a;
                let wins = ev_b.window_losses(be, &deq)?;
                let held = Paired::new(&base_b_windows, &wins)?;
                let vs = match first.get(&f.to_string()) {
                    Some(r) => {
                        let p = Paired::new(r, &wins)?;
                        format!("{} (±{:.3}%; {:+.1} se)", pct(p.mean, base_b), 100.0 * p.se / base_b, p.mean / p.se)
                    }
                    None => {
                        first.insert(f.to_string(), wins.clone());
                        "–".to_string()
                    }
                };
                if !comp.gptq.is_empty() {
                    let (e0, e1) = comp.gptq.iter().fold((0.0, 0.0), |(a, b), c| (a + c.1, b + c.2));
                    let kept = comp.gptq.iter().filter(|c| c.2 > c.1).count();
                    eprintln!(
                        "  gptq: {} weights, output error after the scales: rtn {e0:.4e} → gptq {e1:.4e} \
                         ({kept} kept rtn)",
                        comp.gptq.len()
                    );
                }
                match m {
                    Method::Awq => {
                        awq_wins.insert(f.to_string(), wins.clone());
                    }
                    Method::Gptq => {
                        if let Some(a) = awq_wins.get(&f.to_string()) {
                            let p = Paired::new(a, &wins)?;
                            println!(
                                "<!-- {f}: gptq − awq, held-out, paired: {} (±{:.3}%; {:+.1} se) -->",
                                pct(p.mean, base_b),
                                100.0 * p.se / base_b,
                                p.mean / p.se
                            );
                        }
                    }
                    _ => {}
                }
                if !comp.clip.is_empty() {
                    let (e0, e1) = comp.clip.iter().fold((0.0, 0.0), |(a, b), c| (a + c.1, b + c.2));
                    eprintln!("  clipping: {} weights, group error {:.4e} → {:.4e}", comp.clip.len(), e0, e1);
                }
                let alphas: Vec<String> = comp.awq.iter().map(|a| format!("{:.1}", a.1)).collect();
                if !alphas.is_empty() {
                    eprintln!("  alphas (wo, qkv, w1 per layer): {}", alphas.join(" "));
                }
                let bytes: usize = comp.weights.iter().flatten().map(QMatrix::bytes).sum();
                let mname = match (m, f) {
                    (Method::Rtn, QFormat::Sparse24 { .. }) => "magnitude",
                    _ => m.name(),
                };
                println!(
                    "| {f} | {mname} | {bytes} | {:.3}× | {} | {} (±{:.3}%) | {vs} |",
                    bytes as f64 / dense_bytes as f64,
                    pct(da, base_a),
                    pct(held.mean, base_b),
                    100.0 * held.se / base_b
                );
                eprintln!("  {f} {mname}: {:.1} s", t.elapsed().as_secs_f64());
            }
            println!();
        }
        if args.table_only {
            return Ok(());
        }
        let target = Target::parse(&args.target)?;
        let mut cache = CostCache::load(CostCache::default_path().as_deref());
        cache.device = cost_device;
        let mut sens = CostCache::load(sensitivity_cache_path().as_deref());
        let mut opt = PlanOptions {
            budget: 0.01,
            target,
            candidates: candidates(args.more_candidates),
            batches: vec![1, 8],
            max_rounds: 4,
            z: Z_ONE_SIDED_95,
            predict_windows: args.held_windows,
        };
        let t = Instant::now();
        let table = measure_table(be, &mut ev_a, values, Some(&cal), &opt, &mut cache, &mut sens, |i, n| {
            eprint!("\rsensitivity and cost: {i}/{n}");
        })?;
        eprintln!(" ({:.1} s)", t.elapsed().as_secs_f64());
        let negative = table.rows.iter().flat_map(|r| &r.options[1..]).filter(|o| o.delta < 0.0).count();
        let all: usize = table.rows.iter().map(|r| r.options.len() - 1).sum();
        println!("sensitivities: {negative} of {all} measured Δ < 0 (counted as 0)\n");
        for b in &args.budgets {
            opt.budget = parse_budget(b)?;
            let t = Instant::now();
            let (plan, comp) = choose_and_verify(be, &mut ev_v, values, Some(&cal), &table, &opt)?;
            let held = Paired::new(&base_b_windows, &ev_b.window_losses(be, &comp.dequantized())?)?;
            let (qb, fb) = comp.weight_bytes();
            let kept: usize = lins.iter().filter(|l| comp.weights[l.param].is_none()).map(|l| 4 * l.n * l.k).sum();
            println!("planner, budget {b} of the loss, target {}:", args.target);
            print!("{}", plan.table());
            let mut formats = std::collections::BTreeMap::<String, usize>::new();
            for c in plan.choices() {
                let f = c.map_or("keep".to_string(), |c| format!("{} ({})", c.format, c.method.name()));
                *formats.entry(f).or_default() += 1;
            }
            println!("formats: {formats:?}");
            println!(
                "verified {} ({} windows), bound {} of the sensitivity base; budget binds: {}",
                pct(plan.verified.mean, base_v),
                plan.verified.n,
                pct(plan.upper, base_a),
                if binds(&plan, target) { "yes" } else { "no" }
            );
            println!(
                "held-out Δloss {:+.5} ± {:.5} ({} of base {base_b:.4}; budget {}); linear bytes {} ({:.3}× f32; {} of {} compressed); {:.1} s\n",
                held.mean,
                held.se,
                pct(held.mean, base_b),
                b,
                qb + kept,
                (qb + kept) as f64 / dense_bytes as f64,
                fb,
                dense_bytes,
                t.elapsed().as_secs_f64()
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
    let parts = Parts::new(&val, ck.train.seq.min(128), Split::parse(&args.split)?)?;
    let cost_device = match args.cost_backend {
        Some(cb) => {
            let sel = select(cb)?;
            Some(run_on(&sel.backend, CostJob { ck: ck.clone(), more: args.more_candidates })?)
        }
        None => None,
    };
    let sel = select(args.backend)?;
    run_on(&sel.backend, Job { args, ck, parts, cost_device })
}
