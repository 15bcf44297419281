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
use dynsparse::model::sample::Sampling;
use dynsparse::model::{AttentionMode, GenerateOptions, Model, StepAttention, Workspace};
use dynsparse::quant::checkpoint::{self as qck, QCheckpoint};
use dynsparse::quant::{QFormat, QMatrix, transpose};
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
    /// int8, int4 (group --group, symmetric unless --asym), 2:4, 2:4-int8, or a full name
    /// such as int4-g32-asym.
    #[arg(long, default_value = "int8")]
    pub format: String,
    /// int4 group size along the input dimension: 32, 64 or 128 (default 128).
    #[arg(long)]
    pub group: Option<usize>,
    /// int4 with a zero point per group.
    #[arg(long)]
    pub asym: bool,
    /// rtn (round to nearest) for int8/int4; magnitude (the default for 2:4) for 2:4.
    #[arg(long)]
    pub method: Option<String>,
    /// Largest relative validation-loss increase the planner may spend (e.g. 0.01; --format auto).
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
        "auto" => {
            return Err(Error::Invalid(
                "--format auto: the planner is not available in this build; pick int8, int4, 2:4 or 2:4-int8".into(),
            ));
        }
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
fn parse_method(m: Option<&str>, f: QFormat) -> Result<&'static str> {
    let sparse = matches!(f, QFormat::Sparse24 { .. });
    match (m.map(|s| s.trim().to_ascii_lowercase()).as_deref(), sparse) {
        (None, false) | (Some("rtn"), false) => Ok("rtn"),
        (None, true) | (Some("magnitude"), true) => Ok("magnitude"),
        (Some("magnitude"), false) => Err(Error::Invalid(format!("--method magnitude is for 2:4 formats, not {f}"))),
        (Some("rtn"), true) => Err(Error::Invalid(format!("--method rtn is for int8/int4; {f} prunes (magnitude)"))),
        (Some(o @ ("awq" | "wanda")), _) => {
            Err(Error::Invalid(format!("--method {o}: not available in this build (rtn or magnitude)")))
        }
        (Some(o), _) => Err(Error::Invalid(format!("--method {o}: expected rtn (int8/int4) or magnitude (2:4)"))),
    }
}

/// Quantizes every linear weight of `ck` to `f` (the caller checked the shapes).
fn compress(ck: &QCheckpoint, f: QFormat, method: &str, bar: &ProgressBar) -> Result<QCheckpoint> {
    let infos = ck.model.params();
    let mut out = ck.clone();
    for i in Model::<dynsparse::backend::cpu::CpuBackend>::quantizable(&ck.model) {
        let p = &infos[i];
        bar.set_message(p.name.clone());
        let [k, n] = p.shape[..] else { unreachable!("linear weights are 2-D") };
        // The dense weight is [k, n] (x·W); the quantized one is its transpose [n, k].
        out.quant[i] = Some(QMatrix::quantize(&transpose(&ck.params[i], k, n), n, k, f)?);
        out.params[i] = Vec::new();
        bar.inc(1);
    }
    out.method = method.to_string();
    out.plan = format!("every linear weight (wq wk wv wo w1 w2): {f}");
    Ok(out)
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
    let f = parse_format(&a.format, a.group, a.asym)?;
    let method = parse_method(a.method.as_deref(), f)?;
    if let Some(b) = a.budget
        && !(b.is_finite() && b > 0.0)
    {
        return Err(Error::Invalid(format!("--budget {b}: must be a positive loss fraction (e.g. 0.01 for 1%)")));
    }
    if !matches!(a.target.as_str(), "speed" | "size") {
        return Err(Error::Invalid(format!("--target {}: expected speed or size", a.target)));
    }
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
    for &i in &linear {
        let [k, n] = infos[i].shape[..] else { unreachable!("linear weights are 2-D") };
        f.check_shape(n, k)
            .map_err(|e| Error::Invalid(format!("--format {f} cannot take `{}`: {e}", infos[i].name)))?;
    }
    let data = super::train::data_of(&ck, None)?;
    let sel = select(choice)?;
    let bar = ProgressBar::new(linear.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:25} {pos}/{len} tensors {msg}").expect("static template"));
    let t0 = Instant::now();
    let out = compress(&ck, f, method, &bar)?;
    bar.finish_and_clear();
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
    outln!("compressed {} linear weights to {f} ({method}) in {quant_secs:.1} s -> {}", linear.len(), a.out.display());
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
