//! `dynsparse compress`: quantizes the linear weights of a training
//! checkpoint (wq, wk, wv, wo, w1, w2 of every layer; see
//! [`Model::quantizable`] for why the embedding, the LM head and the indexer
//! stay dense) and writes a compressed checkpoint that `eval`, `generate`
//! and `serve` load. Prints bytes before/after, the validation loss of both
//! models and their decode speed, measured on the chosen backend.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::outln;
use clap::Args;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::data::Corpus;
use dynsparse::model::sample::Sampling;
use dynsparse::model::{AttentionMode, GenerateOptions, Model, StepAttention, Workspace};
use dynsparse::quant::awq::{self, Choice, Method};
use dynsparse::quant::calib::{CalibOptions, calibrate, linears};
use dynsparse::quant::checkpoint::{self as qck, QCheckpoint};
use dynsparse::quant::plan::{self, CostCache, Evaluator, Parts, PlanOptions, Target};
use dynsparse::quant::{QFormat, QMatrix};
use dynsparse::train::checkpoint;
use dynsparse::{Backend, Error, Result};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct CompressArgs {
    /// A checkpoint written by `dynsparse train` (not an already compressed one).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Where to write the compressed checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// int8, int4 (group --group, symmetric unless --asym), 2:4, 2:4-int8, a full name
    /// such as int4-g32-asym, or auto: the hardware-aware planner picks one format per weight.
    #[arg(long, default_value = "int8")]
    pub format: String,
    /// int4 group size along the input dimension: 32, 64 or 128 (default 128).
    #[arg(long)]
    pub group: Option<usize>,
    /// int4 with a zero point per group.
    #[arg(long)]
    pub asym: bool,
    /// rtn (round to nearest), awq (AWQ: activation-aware per-channel scales folded into the op
    /// before, plus a per-group clipping search for int4) or gptq (AWQ's scales, then GPTQ's
    /// error-compensating rounding: the most accurate, a few seconds more) for int8/int4;
    /// magnitude (the default for 2:4), wanda (|W|·‖X‖) or sparsegpt (SparseGPT: saliency-chosen
    /// mask with error compensation) for 2:4. Every method but rtn/magnitude calibrates on --calib.
    #[arg(long)]
    pub method: Option<String>,
    /// Largest relative validation-loss increase the planner may spend (--format auto; default
    /// 0.01 = 1%). The calibration text's windows are dealt round-robin to a sensitivity part and a
    /// verification part; the plan is accepted when the upper 95% prediction bound of its loss
    /// increase, from the verification part, is within it.
    #[arg(long, allow_negative_numbers = true)]
    pub budget: Option<f64>,
    /// What the planner minimises: speed or size (--format auto).
    #[arg(long, default_value = "speed")]
    pub target: String,
    /// Calibration text (default: the checkpoint's validation text); at least one sequence long.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Validation windows for the loss before and after.
    #[arg(long, default_value_t = 16)]
    pub windows: usize,
    /// Tokens decoded (greedy) to time decode before and after; 0 skips the timing.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
}

/// The format named by `--format`, `--group` and `--asym`.
pub fn parse_format(format: &str, group: Option<usize>, asym: bool) -> Result<QFormat> {
    let f = match format.trim().to_ascii_lowercase().as_str() {
        "int4" => {
            let g = group.unwrap_or(128);
            if !dynsparse::quant::INT4_GROUPS.contains(&g) {
                return Err(Error::Invalid(format!("--group {g}: expected 32, 64 or 128")));
            }
            return Ok(QFormat::Int4 { group: g, asym });
        }
        _ => QFormat::parse(format).map_err(|e| Error::Invalid(format!("--format {format}: {e}")))?,
    };
    if group.is_some() && !matches!(f, QFormat::Int4 { .. }) || asym && !matches!(f, QFormat::Int4 { asym: true, .. }) {
        return Err(Error::Invalid(format!("--group/--asym apply to int4 only, not to --format {format}")));
    }
    if let (QFormat::Int4 { group: g, .. }, Some(want)) = (f, group)
        && g != want
    {
        return Err(Error::Invalid(format!("--format {format} and --group {want} disagree")));
    }
    Ok(f)
}

/// The method by name for format `f`.
fn parse_method(m: Option<&str>, f: QFormat) -> Result<Method> {
    let sparse = matches!(f, QFormat::Sparse24 { .. });
    match (m.map(|s| s.trim().to_ascii_lowercase()).as_deref(), sparse) {
        (None, false) | (Some("rtn"), false) => Ok(Method::Rtn),
        (None, true) | (Some("magnitude"), true) => Ok(Method::Rtn),
        (Some("awq"), false) => Ok(Method::Awq),
        (Some("gptq"), false) => Ok(Method::Gptq),
        (Some("wanda"), true) => Ok(Method::Wanda),
        (Some("sparsegpt"), true) => Ok(Method::SparseGpt),
        (Some("magnitude"), false) => Err(Error::Invalid(format!("--method magnitude is for 2:4 formats, not {f}"))),
        (Some("rtn"), true) => Err(Error::Invalid(format!("--method rtn is for int8/int4; {f} prunes (magnitude)"))),
        (Some(m @ ("awq" | "gptq")), true) => {
            Err(Error::Invalid(format!("--method {m} is for int8/int4, not {f} (magnitude, wanda or sparsegpt prune)")))
        }
        (Some(m @ ("wanda" | "sparsegpt")), false) => {
            Err(Error::Invalid(format!("--method {m} is for 2:4 formats, not {f}")))
        }
        (Some(o), _) => Err(Error::Invalid(format!(
            "--method {o}: expected rtn, awq or gptq (int8/int4), magnitude, wanda or sparsegpt (2:4)"
        ))),
    }
}

/// The method's name as the summary and the metadata spell it.
fn method_name(c: Choice) -> &'static str {
    match (c.method, c.format) {
        (Method::Rtn, QFormat::Sparse24 { .. }) => "magnitude",
        (m, _) => m.name(),
    }
}

/// One format for every linear weight, or the planner.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Fixed(Choice),
    Auto { budget: f64, target: Target },
}

/// Compresses on the chosen backend: calibration (AWQ, Wanda, the planner)
/// runs the model's forward pass there, and the planner measures its
/// sensitivities and kernel costs there.
struct CompressJob {
    ck: QCheckpoint,
    mode: Mode,
    calib: Corpus,
    windows: usize,
    bar: ProgressBar,
}

impl BackendJob for CompressJob {
    type Output = QCheckpoint;
    fn run<B: Backend>(self, be: &B) -> Result<QCheckpoint> {
        let CompressJob { ck, mode, calib, windows, bar } = self;
        let (cfg, dtype, values) = (ck.model, ck.train.precision, &ck.params);
        let lins = linears(&cfg);
        let seq = ck.train.seq;
        let needs_calib = !matches!(mode, Mode::Fixed(Choice { method: Method::Rtn, .. }));
        let batch = ck.train.batch.min(4);
        // The planner deals the calibration text's windows round-robin to a
        // sensitivity part (calibration and the Δ table) and a verification
        // part (whole plans only): two samples of the same text (plan.rs, "Text").
        let (calib, parts) = match mode {
            Mode::Auto { .. } => {
                let short = || {
                    Error::Invalid(format!(
                        "--format auto: the calibration text has {} tokens; the planner needs at least {} \
                         ({} windows of {} tokens for each of its sensitivity and verification parts): pass a longer --calib",
                        calib.tokens.len(),
                        2 * batch * (seq + 1),
                        batch,
                        seq + 1
                    ))
                };
                let parts = Parts::without_held_out(&calib, seq).map_err(|_| short())?;
                if parts.ranges[0].len() < batch || parts.ranges[1].is_empty() {
                    return Err(short());
                }
                (parts.calibration(32), Some(parts))
            }
            Mode::Fixed(_) => (calib, None),
        };
        let cal = if needs_calib {
            bar.set_message("calibrating");
            let model = Model::from_values(be, cfg, dtype, values)?;
            let opt = CalibOptions { batch, seq, ..Default::default() };
            Some(calibrate(be, &model, &calib, opt)?)
        } else {
            None
        };
        let mut out = ck.clone();
        let comp = match mode {
            Mode::Fixed(c) => {
                bar.set_message(format!("{} ({})", c.format, method_name(c)));
                let comp = awq::compress(&cfg, values, &vec![Some(c); lins.len()], cal.as_ref())?;
                bar.set_position(lins.len() as u64);
                out.method = method_name(c).to_string();
                out.plan = format!("every linear weight (wq wk wv wo w1 w2): {} ({})", c.format, method_name(c));
                comp
            }
            Mode::Auto { budget, target } => {
                let parts = parts.expect("auto mode splits the calibration text");
                let mut ev =
                    Evaluator::new(be, &cfg, dtype, values, &parts.sensitivity, (batch, seq, windows))?.chunked();
                // Batch 1: one loss per window, the units of the paired standard error.
                let mut ver =
                    Evaluator::new(be, &cfg, dtype, values, &parts.verification, (1, seq, 2 * windows))?.chunked();
                let opt = PlanOptions {
                    budget,
                    target,
                    candidates: PlanOptions::default_candidates(true),
                    batches: vec![1, 8],
                    max_rounds: 4,
                    z: plan::Z_ONE_SIDED_95,
                    // Unseen text as long as the verification sample.
                    predict_windows: 2 * windows,
                };
                let mut cache = CostCache::load(CostCache::default_path().as_deref());
                let mut sens = CostCache::load(plan::sensitivity_cache_path().as_deref());
                bar.set_message("sensitivity and kernel cost");
                let table =
                    plan::measure_table(be, &mut ev, values, cal.as_ref(), &opt, &mut cache, &mut sens, |i, _| {
                        bar.set_position(i as u64)
                    })?;
                bar.set_message("verifying the plan");
                let (p, comp) = plan::choose_and_verify(be, &mut ver, values, cal.as_ref(), &table, &opt)?;
                bar.suspend(|| outln!("{}", p.table()));
                out.method = format!("auto (budget {:.3}%, target {target:?})", 100.0 * budget).to_lowercase();
                out.plan = p.metadata();
                comp
            }
        };
        for (i, (q, v)) in comp.weights.into_iter().zip(comp.values).enumerate() {
            match q {
                Some(q) => {
                    out.quant[i] = Some(q);
                    out.params[i] = Vec::new();
                }
                // AWQ folds its inverse scales into the LayerNorms and wv: those stay dense but change.
                None => out.params[i] = v,
            }
        }
        Ok(out)
    }
}

/// Loss and decode speed of a model.
struct Measure {
    loss: f64,
    decode_tps: f64,
}

struct MeasureJob {
    before: QCheckpoint,
    after: QCheckpoint,
    data: dynsparse::data::Corpus,
    windows: usize,
    decode_tokens: usize,
}

impl BackendJob for MeasureJob {
    type Output = (Measure, Measure);
    fn run<B: Backend>(self, be: &B) -> Result<(Measure, Measure)> {
        let attn = match self.before.model.attention {
            AttentionMode::Sparse { keep_blocks, .. } => StepAttention::Sparse { keep_blocks },
            AttentionMode::Dense => StepAttention::Dense,
        };
        let measure = |ck: &QCheckpoint| -> Result<Measure> {
            let model = ck.to_model(be)?;
            let mut ws = Workspace::new(be, &ck.model, ck.train.precision, ck.train.batch, ck.train.seq)?;
            let ev = dynsparse::train::evaluate(be, &model, &mut ws, &self.data, self.windows, attn)?;
            drop(ws);
            let decode_tps = if self.decode_tokens == 0 {
                f64::NAN
            } else {
                let opts = GenerateOptions {
                    sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 },
                    max_tokens: self.decode_tokens.min(ck.model.context - 2),
                    seed: 0,
                    stop: Vec::new(),
                    chunk: 64,
                };
                model.generate(be, b"The ", &opts, |_| Ok(true))?.decode_tps()
            };
            Ok(Measure { loss: ev.loss, decode_tps })
        };
        Ok((measure(&self.before)?, measure(&self.after)?))
    }
}

fn fmt_mib(b: usize) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Calibration text must hold one training sequence plus its next-token target.
fn check_calib(path: &Path, seq: usize) -> Result<()> {
    let n = std::fs::metadata(path).map_err(|e| Error::io(format!("reading --calib {}", path.display()), e))?.len();
    if n < seq as u64 + 1 {
        return Err(Error::Invalid(format!(
            "--calib {}: {n} bytes of text, shorter than one sequence ({} tokens + 1 target)",
            path.display(),
            seq
        )));
    }
    Ok(())
}

pub fn run(choice: BackendChoice, a: CompressArgs) -> Result<()> {
    if let Some(b) = a.budget
        && plan::check_budget(b).is_err()
    {
        return Err(Error::Invalid(format!("--budget {b}: must be a loss fraction in (0, 1] (e.g. 0.01 for 1%)")));
    }
    let target = Target::parse(&a.target)
        .map_err(|_| Error::Invalid(format!("--target {}: expected speed or size", a.target)))?;
    let auto = a.format.trim().eq_ignore_ascii_case("auto");
    let mode = if auto {
        if a.group.is_some() || a.asym || a.method.is_some() {
            return Err(Error::Invalid(
                "--format auto picks formats and methods itself: drop --group, --asym and --method".into(),
            ));
        }
        Mode::Auto { budget: a.budget.unwrap_or(0.01), target }
    } else {
        if a.budget.is_some() {
            return Err(Error::Invalid("--budget applies to --format auto (the planner) only".into()));
        }
        let f = parse_format(&a.format, a.group, a.asym)?;
        Mode::Fixed(Choice { format: f, method: parse_method(a.method.as_deref(), f)? })
    };
    if a.windows == 0 {
        return Err(Error::Invalid("--windows 0: accepted range 1 or more".into()));
    }
    if qck::is_compressed_file(&a.checkpoint) {
        return Err(Error::Invalid(format!(
            "{} is already compressed; compress the training checkpoint it came from",
            a.checkpoint.display()
        )));
    }
    let ck = QCheckpoint::from_training(checkpoint::load(&a.checkpoint)?);
    if let Some(c) = &a.calib {
        check_calib(c, ck.train.seq)?;
    }
    let infos = ck.model.params();
    let linear = Model::<dynsparse::backend::cpu::CpuBackend>::quantizable(&ck.model);
    if let Mode::Fixed(Choice { format: f, .. }) = mode {
        for &i in &linear {
            let [k, n] = infos[i].shape[..] else { unreachable!("linear weights are 2-D") };
            f.check_shape(n, k)
                .map_err(|e| Error::Invalid(format!("--format {f} cannot take `{}`: {e}", infos[i].name)))?;
        }
    }
    let data = super::train::data_of(&ck, None)?;
    let calib = match &a.calib {
        Some(p) => Corpus::from_file(p)?,
        None => data.clone(),
    };
    let sel = select(choice)?;
    let bar = ProgressBar::new(linear.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:25} {pos}/{len} tensors {msg}").expect("static template"));
    let t0 = Instant::now();
    let job = CompressJob { ck: ck.clone(), mode, calib, windows: a.windows, bar: bar.clone() };
    let out = run_on(&sel.backend, job)?;
    bar.finish_and_clear();
    // "int4-g128 (gptq)", or the planner's "auto (budget …, target …)".
    let what = match mode {
        Mode::Fixed(c) => format!("{} ({})", c.format.name(), method_name(c)),
        Mode::Auto { .. } => out.method.clone(),
    };
    let quant_secs = t0.elapsed().as_secs_f64();
    qck::save(&a.out, &out)?;
    let file = |p: &Path| std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0);
    let (wb, wa) = (ck.weight_bytes(), out.weight_bytes());
    let lin = |c: &QCheckpoint| -> usize {
        let dt = c.train.precision.size();
        linear
            .iter()
            .map(|&i| c.quant[i].as_ref().map_or(infos[i].shape.iter().product::<usize>() * dt, QMatrix::bytes))
            .sum()
    };
    outln!("compressed {} linear weights to {what} in {quant_secs:.1} s -> {}", linear.len(), a.out.display());
    outln!(
        "weights: {} -> {} ({:.2}x smaller; linear layers {} -> {}, {:.2}x); file {} -> {}",
        fmt_mib(wb),
        fmt_mib(wa),
        wb as f64 / wa as f64,
        fmt_mib(lin(&ck)),
        fmt_mib(lin(&out)),
        lin(&ck) as f64 / lin(&out) as f64,
        fmt_mib(file(&a.checkpoint)),
        fmt_mib(file(&a.out))
    );
    let job = MeasureJob { before: ck, after: out, data, windows: a.windows, decode_tokens: a.decode_tokens };
    let (b, q) = run_on(&sel.backend, job)?;
    outln!(
        "validation loss: {:.4} -> {:.4} ({:+.3}%)",
        b.loss,
        q.loss,
        100.0 * (q.loss - b.loss) / b.loss.abs().max(1e-12)
    );
    if a.decode_tokens > 0 {
        outln!(
            "decode: {:.1} -> {:.1} tokens/s ({:.2}x) on {}",
            b.decode_tps,
            q.decode_tps,
            q.decode_tps / b.decode_tps,
            sel.backend.device_name()
        );
    }
    Ok(())
}
