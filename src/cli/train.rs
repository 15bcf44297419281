//! `dynsparse train`, `eval` and `generate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::outln;
use clap::Args;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::data::{BYTE_VOCAB, Corpus};
use dynsparse::dist::{Collective, InProcess};
use dynsparse::model::sample::Sampling;
use dynsparse::model::{AttentionMode, GenerateOptions, Model, ModelConfig, StepAttention, StopReason, Workspace};
use dynsparse::quant::checkpoint::QCheckpoint;
use dynsparse::train::memory::MemoryPlan;
use dynsparse::train::{DistConfig, EvalStats, LrSchedule, MemoryReport, TrainConfig, Trainer, checkpoint, plot};
use dynsparse::util::files::{DirLock, ensure_writable_dir};
use dynsparse::{Backend, DType, Error, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// Bytes of the embedded default corpus.
const DEFAULT_CORPUS_BYTES: usize = 1 << 20;

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// UTF-8 text file to train on (default: the embedded long-range retrieval corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Folder for the checkpoint, the CSV log and the loss plot.
    #[arg(long, default_value = "runs/default")]
    pub out: PathBuf,
    /// Continue the run saved in this checkpoint (its configs apply; flags that contradict them are errors).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq: Option<usize>,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long)]
    pub accum: Option<usize>,
    /// f32, f16 (with dynamic loss scaling) or bf16; master weights and moments stay f32.
    #[arg(long)]
    pub precision: Option<String>,
    /// Peak learning rate (after linear warm-up; cosine decay to a tenth of it), in (0, 10].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// dense, or sparse (dynamic sparse attention with indexers on the 3-phase schedule).
    #[arg(long)]
    pub attention: Option<String>,
    /// Key block size of sparse attention.
    #[arg(long)]
    pub block: Option<usize>,
    /// Key blocks each query keeps at the end of the schedule (its own block and the sink block
    /// included; 1 keeps the own block only).
    #[arg(long)]
    pub keep_blocks: Option<usize>,
    /// Fraction of steps of dense warm-up (sparse attention), in [0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_frac: Option<f64>,
    /// Fraction of steps of the keep-fraction ramp (sparse attention); warm-up + ramp ≤ 1.
    #[arg(long, allow_negative_numbers = true)]
    pub ramp_frac: Option<f64>,
    /// Sparse phases: train the indexers' KL on every K-th query row only (the rows rotating
    /// from one backward pass to the next; the gradient scaled to the sampled rows). 1 (the
    /// default) trains every row. K = 2 matched K = 1's validation loss over 5 seeds and saved
    /// 3-8% of a CPU sparse step (BENCHMARKS.md); the dense warm-up uses every row. At most --seq.
    #[arg(long, value_name = "K")]
    pub indexer_kl_every: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub d_model: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Model context (maximum sequence length).
    #[arg(long)]
    pub context: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Validate (and log) every this many steps.
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Validation windows per evaluation.
    #[arg(long, default_value_t = 32)]
    pub eval_windows: usize,
    /// Save a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub save_every: u64,
    /// Stop (with a checkpoint) on reaching this step, as if interrupted; `--resume` continues.
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Replace the run already in --out (its checkpoint, log and plot) instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
    /// Stop with an error when more than this many optimizer steps in a row are skipped for
    /// non-finite gradients (f16 loss scaling skips a few normally; a diverged run skips them all).
    #[arg(long, default_value_t = dynsparse::train::DEFAULT_MAX_SKIPPED)]
    pub max_skipped_steps: u64,
    /// Data-parallel ranks in this process (threads, one backend each); each rank trains on
    /// --batch sequences, so one optimizer step sees world × accum × batch sequences.
    #[arg(long, default_value_t = 1)]
    pub world: usize,
    /// ZeRO stage: 0 (every rank holds the optimizer state) or 1 (each holds a 1/world shard).
    #[arg(long, default_value_t = 0)]
    pub zero: u8,
    /// Largest gradient bucket of coalesced small tensors, MiB (the first one: --first-bucket-mb).
    #[arg(long, default_value_t = 25.0)]
    pub bucket_mb: f64,
    #[arg(long, default_value_t = 1.0)]
    pub first_bucket_mb: f64,
    /// Multiplies the size-class thresholds of the gradient buckets (16, 64, 256 MB).
    #[arg(long, default_value_t = 1.0)]
    pub size_class_scale: f64,
    /// Reduce each gradient bucket while the backward pass is still differentiating the earlier
    /// layers (on a communication thread); false: reduce every bucket after the backward pass.
    /// Same results either way. ZeRO-1 always reduce-scatters after the backward pass.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub overlap_grads: bool,
    /// Seconds a rank waits inside one collective before the run ends with an error.
    #[arg(long, default_value_t = 300.0)]
    pub collective_timeout: f64,
}

impl TrainArgs {
    fn dist(&self) -> DistConfig {
        DistConfig {
            zero: self.zero == 1,
            bucket_mb: self.bucket_mb,
            first_bucket_mb: self.first_bucket_mb,
            class_scale: self.size_class_scale,
            overlap: self.overlap_grads,
        }
    }
}

/// The command-line flag of each config field a flag sets.
fn flag_of(field: &str) -> String {
    match field {
        "n_layers" => "--layers".into(),
        "d_model" => "--d-model".into(),
        "n_heads" => "--heads".into(),
        "n_kv_heads" => "--kv-heads".into(),
        "context" | "block" | "steps" | "batch" | "seq" | "accum" | "precision" | "lr" => format!("--{field}"),
        "keep_blocks" | "warmup_frac" | "ramp_frac" => format!("--{}", field.replace('_', "-")),
        "kl_every" => "--indexer-kl-every".into(),
        other => format!("model {other}"),
    }
}

/// Range checks of the flags that are not part of a config.
fn check_run_flags(a: &TrainArgs) -> Result<()> {
    let pos = |flag: &str, v: u64| {
        if v == 0 { Err(Error::Invalid(format!("{flag} 0: accepted range 1 or more"))) } else { Ok(()) }
    };
    pos("--eval-every", a.eval_every)?;
    pos("--save-every", a.save_every)?;
    pos("--eval-windows", a.eval_windows as u64)?;
    if let Some(s) = a.stop_at {
        pos("--stop-at", s)?;
    }
    if !(1..=256).contains(&a.world) {
        return Err(Error::Invalid(format!("--world {}: accepted range 1..=256", a.world)));
    }
    if a.zero > 1 {
        return Err(Error::Invalid(format!("--zero {}: accepted values 0 or 1", a.zero)));
    }
    if !(a.collective_timeout.is_finite() && a.collective_timeout > 0.0 && a.collective_timeout <= 86400.0) {
        return Err(Error::Invalid(format!(
            "--collective-timeout {}: accepted range 0 < s <= 86400",
            a.collective_timeout
        )));
    }
    a.dist().validate()
}

fn precision(s: &str) -> Result<DType> {
    DType::parse(s)
        .filter(|d| d.is_float())
        .ok_or_else(|| Error::Invalid(format!("--precision `{s}`: expected f32, f16 or bf16")))
}

/// The configs of a fresh run: defaults, then flags.
fn fresh_configs(a: &TrainArgs) -> Result<(ModelConfig, TrainConfig)> {
    let mut m = ModelConfig::default();
    m.n_layers = a.layers.unwrap_or(m.n_layers);
    m.d_model = a.d_model.unwrap_or(m.d_model);
    m.n_heads = a.heads.unwrap_or(m.n_heads);
    m.n_kv_heads = a.kv_heads.unwrap_or(m.n_kv_heads);
    m.context = a.context.unwrap_or(m.context);
    m.vocab = BYTE_VOCAB;
    let AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim } = m.attention else {
        return Err(Error::Invalid("the default model config must be sparse".into()));
    };
    m.attention = match a.attention.as_deref().unwrap_or("sparse") {
        "dense" => {
            let sparse_only = [
                ("--block", a.block.is_some()),
                ("--keep-blocks", a.keep_blocks.is_some()),
                ("--warmup-frac", a.warmup_frac.is_some()),
                ("--ramp-frac", a.ramp_frac.is_some()),
                ("--indexer-kl-every", a.indexer_kl_every.is_some()),
            ];
            if let Some((flag, _)) = sparse_only.iter().find(|(_, given)| *given) {
                return Err(Error::Invalid(format!("{flag} applies to --attention sparse only (given: dense)")));
            }
            AttentionMode::Dense
        }
        "sparse" => AttentionMode::Sparse {
            block: a.block.unwrap_or(block),
            keep_blocks: a.keep_blocks.unwrap_or(keep_blocks),
            index_heads,
            index_dim,
        },
        other => return Err(Error::Invalid(format!("--attention `{other}`: expected dense or sparse"))),
    };
    m.check(&flag_of)?;
    let steps = a.steps.unwrap_or(300);
    let lr = a.lr.unwrap_or(3e-3);
    let t = TrainConfig {
        steps,
        batch: a.batch.unwrap_or(4),
        seq: a.seq.unwrap_or(512),
        accum: a.accum.unwrap_or(1),
        precision: precision(a.precision.as_deref().unwrap_or("f32"))?,
        lr: LrSchedule { lr, min_lr: lr / 10.0, warmup_steps: (steps / 20).max(1).min(steps), total_steps: steps },
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        grad_clip: 1.0,
        warmup_frac: a.warmup_frac.unwrap_or(0.1),
        ramp_frac: a.ramp_frac.unwrap_or(0.3),
        kl_every: a.indexer_kl_every.unwrap_or(1),
        seed: a.seed.unwrap_or(1234),
    };
    t.check(&m, &flag_of)?;
    if let Some(s) = a.stop_at
        && s >= steps
    {
        return Err(Error::Invalid(format!("--stop-at {s}: accepted range 1..={} (below --steps {steps})", steps - 1)));
    }
    Ok((m, t))
}

/// Refuses flags that contradict the checkpoint being resumed.
fn check_resume_flags(a: &TrainArgs, ck: &checkpoint::Checkpoint) -> Result<()> {
    let (m, t) = (&ck.model, &ck.train);
    let mut bad = Vec::new();
    let mut cmp = |name: &str, given: Option<String>, have: String| {
        if let Some(g) = given
            && g != have
        {
            bad.push(format!("--{name} {g} (checkpoint: {have})"));
        }
    };
    cmp("steps", a.steps.map(|x| x.to_string()), t.steps.to_string());
    cmp("batch", a.batch.map(|x| x.to_string()), t.batch.to_string());
    cmp("seq", a.seq.map(|x| x.to_string()), t.seq.to_string());
    cmp("accum", a.accum.map(|x| x.to_string()), t.accum.to_string());
    cmp("precision", a.precision.clone(), t.precision.name().to_string());
    cmp("layers", a.layers.map(|x| x.to_string()), m.n_layers.to_string());
    cmp("d-model", a.d_model.map(|x| x.to_string()), m.d_model.to_string());
    cmp("heads", a.heads.map(|x| x.to_string()), m.n_heads.to_string());
    cmp("kv-heads", a.kv_heads.map(|x| x.to_string()), m.n_kv_heads.to_string());
    cmp("context", a.context.map(|x| x.to_string()), m.context.to_string());
    cmp("seed", a.seed.map(|x| x.to_string()), t.seed.to_string());
    cmp("indexer-kl-every", a.indexer_kl_every.map(|x| x.to_string()), t.kl_every.to_string());
    let mode = if m.is_sparse() { "sparse" } else { "dense" };
    cmp("attention", a.attention.clone(), mode.to_string());
    // Floats compare as numbers: `--lr 0.003` matches a stored 3e-3.
    let mut cmpf = |name: &str, given: Option<f64>, have: f64, shown: String| {
        if let Some(g) = given
            && g != have
        {
            bad.push(format!("--{name} {} (checkpoint: {shown})", dynsparse::util::fmt_real(g)));
        }
    };
    cmpf("lr", a.lr.map(f64::from), t.lr.lr as f64, t.lr.lr.to_string());
    cmpf("warmup-frac", a.warmup_frac, t.warmup_frac, t.warmup_frac.to_string());
    cmpf("ramp-frac", a.ramp_frac, t.ramp_frac, t.ramp_frac.to_string());
    let (block, keep) = match m.attention {
        AttentionMode::Sparse { block, keep_blocks, .. } => (Some(block), Some(keep_blocks)),
        AttentionMode::Dense => (None, None),
    };
    let opt = |x: Option<usize>| x.map(|x| x.to_string()).unwrap_or_else(|| "none: dense".into());
    let mut cmp2 = |name: &str, given: Option<usize>, have: Option<usize>| {
        if let Some(g) = given
            && Some(g) != have
        {
            bad.push(format!("--{name} {g} (checkpoint: {})", opt(have)));
        }
    };
    cmp2("block", a.block, block);
    cmp2("keep-blocks", a.keep_blocks, keep);
    if a.data.as_ref().map(|p| p.display().to_string()) != ck.extra.get("data").filter(|d| *d != "synthetic").cloned()
        && (a.data.is_some() || ck.extra.get("data").is_some_and(|d| d != "synthetic"))
    {
        bad.push(format!(
            "--data {} (checkpoint: {})",
            a.data.as_ref().map(|p| p.display().to_string()).unwrap_or("<default>".into()),
            ck.extra.get("data").map(String::as_str).unwrap_or("synthetic")
        ));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "a resumed run keeps the checkpoint's settings; these flags contradict it: {}",
            bad.join(", ")
        )))
    }
}

fn load_corpus(data: Option<&Path>) -> Result<Corpus> {
    match data {
        Some(p) => Corpus::from_file(p),
        None => Ok(generate(42, DEFAULT_CORPUS_BYTES, SyntheticConfig::default())),
    }
}

struct TrainJob {
    args: TrainArgs,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    resume: Option<checkpoint::Checkpoint>,
    /// Log rows (steps 0..resume step) carried over from the resumed run.
    old_log: Vec<String>,
    train: Corpus,
    val: Corpus,
    /// Rank 0's handle when the run is data-parallel.
    comm: Option<Box<dyn Collective>>,
}

/// A rank other than 0 of an in-process data-parallel run: trains in step with
/// rank 0 and takes part in its checkpoint gathers; rank 0 logs, evaluates and saves.
struct RankJob {
    comm: Box<dyn Collective>,
    dist: DistConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    resume: Option<checkpoint::TrainState>,
    train: std::sync::Arc<Corpus>,
    stop: u64,
    save_every: u64,
    max_skipped: u64,
}

impl BackendJob for RankJob {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let model = Model::new(be, self.model_cfg, self.train_cfg.precision, self.train_cfg.seed)?;
        let mut tr =
            Trainer::new_distributed(be, model, self.train_cfg, self.dist, self.comm, &mut MemoryReport::default())?;
        tr.max_skipped_in_a_row = self.max_skipped;
        if let Some(st) = &self.resume {
            tr.restore(be, st)?;
        }
        while tr.step < self.stop {
            tr.train_step(be, &self.train)?;
            if self.dist.zero && (tr.step % self.save_every == 0 || tr.step == self.stop) {
                tr.state(be)?;
            }
        }
        Ok(())
    }
}

fn fmt_bytes(b: usize) -> String {
    format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
}

/// The log's columns; a row's first field is its 0-based step.
const LOG_HEADER: &str = "step,loss,val_loss,grad_norm,lr,loss_scale,kept_fraction,skipped,ms,tokens_per_s,indexer_kl";

/// Rows of an existing log for steps `0..step`, in order. A log written by a run
/// killed between logging and saving has rows past the checkpoint: they are
/// dropped and recomputed (bit for bit) by the resumed run. Missing or damaged
/// rows are reported in one warning: the checkpoint, not the log, is the state.
fn log_rows_before(log: &Path, step: u64) -> Vec<String> {
    let text = match std::fs::metadata(log) {
        Ok(md) if md.is_file() => std::fs::read_to_string(log).unwrap_or_default(),
        _ => String::new(),
    };
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        match line.split(',').next().and_then(|x| x.parse::<u64>().ok()) {
            Some(s) if s == rows.len() as u64 && s < step => rows.push(line.to_string()),
            _ => break,
        }
    }
    if (rows.len() as u64) < step {
        log::warn!(
            "{}: has rows for steps 0..{} only, the checkpoint is at step {step}; the resumed log starts with that gap filled by nothing",
            log.display(),
            rows.len()
        );
    }
    rows
}

/// Points (step, value) of one curve of the loss plot.
type Curve = Vec<(u64, f64)>;

/// The (step, loss) and (step, val_loss) curves of the plot, from log rows.
fn plot_points(rows: &[String]) -> (Curve, Curve) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for r in rows {
        let f: Vec<&str> = r.split(',').collect();
        if let (Some(Ok(s)), Some(Ok(l))) = (f.first().map(|x| x.parse::<u64>()), f.get(1).map(|x| x.parse::<f64>())) {
            train.push((s, l));
            if let Some(Ok(v)) = f.get(2).map(|x| x.parse::<f64>()) {
                val.push((s, v));
            }
        }
    }
    (train, val)
}

impl BackendJob for TrainJob {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let TrainJob { args, model_cfg, train_cfg, resume, old_log, train, val, comm } = self;
        let ckpt_path = args.out.join("checkpoint.safetensors");
        let log_path = args.out.join("log.csv");
        let plot_path = args.out.join("loss.svg");
        be.reset_peak();
        let model = Model::new(be, model_cfg, train_cfg.precision, train_cfg.seed)?;
        let mut mem = MemoryReport::default();
        let mut tr = match comm {
            None => Trainer::new(be, model, train_cfg, &mut mem)?,
            Some(c) => Trainer::new_distributed(be, model, train_cfg, args.dist(), c, &mut mem)?,
        };
        tr.max_skipped_in_a_row = args.max_skipped_steps;
        let mut log_rows = old_log;
        if let Some(ck) = &resume {
            tr.restore(be, &ck.state)?;
            eprintln!(
                "resuming {} at step {}",
                args.resume.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                tr.step
            );
        }
        eprintln!(
            "model: {} parameters, {} layers, d_model {}, {}; training {} steps of {}×{}×{} tokens in {}",
            model_cfg.n_params(),
            model_cfg.n_layers,
            model_cfg.d_model,
            match model_cfg.attention {
                AttentionMode::Dense => "dense attention".to_string(),
                AttentionMode::Sparse { block, keep_blocks, .. } if train_cfg.kl_every > 1 => format!(
                    "sparse attention ({keep_blocks} blocks of {block}; indexer KL on 1 of every {} query rows)",
                    train_cfg.kl_every
                ),
                AttentionMode::Sparse { block, keep_blocks, .. } =>
                    format!("sparse attention ({keep_blocks} blocks of {block})"),
            },
            train_cfg.steps,
            train_cfg.accum,
            train_cfg.batch,
            train_cfg.seq,
            train_cfg.precision
        );
        let (_, world) = tr.rank_world();
        if world > 1 {
            eprintln!(
                "data parallel: {world} {} ranks, ZeRO-{}, buckets ≤ {} MiB (first {} MiB); memory below is per rank",
                if args.world > 1 { "in-process" } else { "MPI" },
                args.zero,
                args.bucket_mb,
                args.first_bucket_mb
            );
        }
        eprintln!(
            "memory: weights {}, f32 masters {}, gradients {}, optimizer {}, activations {}",
            fmt_bytes(mem.weights),
            fmt_bytes(mem.master_weights),
            fmt_bytes(mem.gradients),
            fmt_bytes(mem.optimizer),
            fmt_bytes(mem.activations)
        );
        let unigram = train.unigram_entropy();
        let bar = ProgressBar::new(train_cfg.steps).with_style(
            ProgressStyle::with_template("{bar:25} {pos}/{len} [{elapsed}<{eta}] {msg}").expect("static template"),
        );
        bar.set_position(tr.step);
        let mut extra = BTreeMap::new();
        extra.insert(
            "data".to_string(),
            args.data.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "synthetic".into()),
        );
        let mut saved_step = resume.as_ref().map(|ck| ck.state.step);
        // The log is written before the checkpoint: a kill between the two leaves log rows past
        // the checkpoint's step, which the resumed run drops and recomputes, never a gap.
        let save = |tr: &Trainer<B>, rows: &[String]| -> Result<()> {
            write_log(&log_path, rows)?;
            let st = tr.state(be)?;
            checkpoint::save(&ckpt_path, &model_cfg, &train_cfg, &st, &extra)
        };
        let mut eval_ws = Workspace::new(be, &model_cfg, train_cfg.precision, train_cfg.batch, train_cfg.seq)?;
        let final_attn = |tr: &Trainer<B>| match tr.schedule {
            Some(s) => {
                let p = s.plan(train_cfg.steps.saturating_sub(1), train_cfg.seq);
                StepAttention::Sparse { keep_blocks: p.keep }
            }
            None => StepAttention::Dense,
        };
        // A non-finite stop keeps what is on disk: the last checkpoint is the last good state.
        let diverged = |e: Error, saved: Option<u64>| match e {
            Error::NonFinite(m) => Error::NonFinite(match saved {
                Some(s) => format!("{m}; {} (step {s}) is the last good state", ckpt_path.display()),
                None => format!("{m}; no checkpoint was saved"),
            }),
            e => e,
        };
        let mut last_eval: Option<EvalStats> = None;
        let stop = args.stop_at.unwrap_or(train_cfg.steps).min(train_cfg.steps);
        while tr.step < stop {
            let t0 = Instant::now();
            let st = match tr.train_step(be, &train) {
                Ok(st) => st,
                Err(e) => {
                    bar.abandon();
                    write_log(&log_path, &log_rows)?;
                    return Err(diverged(e, saved_step));
                }
            };
            let dt = t0.elapsed().as_secs_f64();
            let mut val_loss = String::new();
            if (st.step + 1) % args.eval_every == 0 || st.step + 1 == train_cfg.steps {
                let (attn, _) = tr.plan();
                let ev = dynsparse::train::evaluate(be, &tr.model, &mut eval_ws, &val, args.eval_windows, attn)?;
                if !ev.loss.is_finite() {
                    bar.abandon();
                    write_log(&log_path, &log_rows)?;
                    let m = format!(
                        "training stopped at step {}: the validation loss is {} in {} (lower --lr, now {})",
                        st.step, ev.loss, train_cfg.precision, train_cfg.lr.lr
                    );
                    return Err(diverged(Error::NonFinite(m), saved_step));
                }
                val_loss = format!("{:.4}", ev.loss);
                last_eval = Some(ev);
            }
            let keep = st.plan.map(|p| if p.dense { 1.0 } else { p.keep_fraction }).unwrap_or(1.0);
            log_rows.push(format!(
                "{},{:.5},{},{:.4},{:.3e},{},{:.3},{},{:.1},{:.0},{:.4}",
                st.step,
                st.loss,
                val_loss,
                st.grad_norm,
                st.lr,
                st.loss_scale,
                keep,
                st.skipped as u8,
                dt * 1e3,
                st.tokens as f64 / dt,
                st.indexer_kl
            ));
            bar.set_position(tr.step);
            bar.set_message(format!(
                "loss {:.3} | {:.0} tok/s | lr {:.1e} | scale {} | kept {:.0}%{}",
                st.loss,
                st.tokens as f64 / dt,
                st.lr,
                st.loss_scale,
                keep * 100.0,
                if st.skipped { " | skipped (inf/nan)" } else { "" }
            ));
            if tr.step % args.save_every == 0 || tr.step == stop {
                save(&tr, &log_rows)?;
                saved_step = Some(tr.step);
            }
        }
        bar.finish();
        if tr.step < train_cfg.steps {
            outln!(
                "stopped at step {} of {}; continue with --resume {}",
                tr.step,
                train_cfg.steps,
                ckpt_path.display()
            );
            return Ok(());
        }
        let (train_pts, val_pts) = plot_points(&log_rows);
        plot::loss_curve(&plot_path, &train_pts, &val_pts, "dynsparse training loss")?;
        let ev = match last_eval {
            Some(e) => e,
            None => dynsparse::train::evaluate(be, &tr.model, &mut eval_ws, &val, args.eval_windows, final_attn(&tr))?,
        };
        outln!(
            "validation loss {:.4} (perplexity {:.2}; unigram baseline {:.4}){}",
            ev.loss,
            ev.perplexity,
            unigram,
            if ev.retrieval_accuracy.is_nan() {
                String::new()
            } else {
                format!("; retrieval accuracy {:.1}% over {} answer bytes", 100.0 * ev.retrieval_accuracy, ev.answers)
            }
        );
        outln!("peak device memory: {}", fmt_bytes(be.memory().peak));
        outln!("checkpoint: {}", ckpt_path.display());
        outln!("log:        {}", log_path.display());
        outln!("plot:       {}", plot_path.display());
        let prompt = if args.data.is_some() { prompt_from(&val.tokens) } else { "key abc: ".to_string() };
        outln!("next:       dynsparse generate --checkpoint {} --prompt \"{prompt}\"", ckpt_path.display());
        Ok(())
    }
}

/// A prompt for the closing `next:` hint from the user's own text: the first
/// words (≤ 24 bytes, whole words, valid UTF-8) of the validation text's first
/// full line, escaped for a shell's double quotes. The synthetic corpus's
/// retrieval prompt would mean nothing to a model trained on other text.
fn prompt_from(text: &[u8]) -> String {
    let start = text.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
    let line = text[start..].split(|&b| b == b'\n').find(|l| !l.iter().all(u8::is_ascii_whitespace)).unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut out = String::new();
    for word in line.split_whitespace() {
        let next = if out.is_empty() { word.to_string() } else { format!("{out} {word}") };
        if next.len() > 24 && !out.is_empty() {
            break;
        }
        out = next.chars().filter(|c| !c.is_control()).take(24).collect();
    }
    let out = if out.is_empty() { "The".to_string() } else { format!("{out} ") };
    out.chars().fold(String::new(), |mut s, c| {
        if matches!(c, '"' | '\\' | '$' | '`') {
            s.push('\\');
        }
        s.push(c);
        s
    })
}

fn write_log(path: &Path, rows: &[String]) -> Result<()> {
    let mut s = format!("{LOG_HEADER}\n");
    for r in rows {
        s.push_str(r);
        s.push('\n');
    }
    dynsparse::util::machine::write_atomic(path, s.as_bytes())
}

/// Files of a run in its folder.
const RUN_FILES: [&str; 3] = ["checkpoint.safetensors", "log.csv", "loss.svg"];

/// The folder of a checkpoint path (`.` for a bare file name).
fn ck_dir(ck: &Path) -> &Path {
    ck.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Whether `a` and `b` name the same folder.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Prepares `--out` before any compute is spent: writable, locked against a
/// second process, and not holding another run unless `--overwrite` (a resumed
/// run may write into its own folder).
fn prepare_out(a: &TrainArgs) -> Result<DirLock> {
    ensure_writable_dir(&a.out, "--out")?;
    let lock = DirLock::acquire(&a.out)?;
    let own = a.resume.as_deref().map(ck_dir).is_some_and(|d| same_dir(d, &a.out));
    let present: Vec<&str> = RUN_FILES.iter().copied().filter(|f| a.out.join(f).exists()).collect();
    if !own && !present.is_empty() {
        if !a.overwrite {
            let ck = a.out.join(RUN_FILES[0]);
            return Err(Error::Invalid(format!(
                "--out {} already holds a run ({}); continue it with --resume {}, choose another --out, or pass --overwrite to replace it",
                a.out.display(),
                present.join(", "),
                ck.display()
            )));
        }
        for f in present {
            let p = a.out.join(f);
            std::fs::remove_file(&p).map_err(|e| Error::io(format!("--overwrite: removing {}", p.display()), e))?;
        }
    }
    Ok(lock)
}

/// This process's MPI rank when started by `mpirun` with more than one process.
#[cfg(feature = "mpi")]
fn mpi_rank(args: &TrainArgs, timeout: std::time::Duration) -> Result<Option<Box<dyn Collective>>> {
    use dynsparse::dist::mpi::{Mpi, under_mpirun};
    if !under_mpirun() {
        return Ok(None);
    }
    let comm = Mpi::init(timeout)?;
    if comm.world() == 1 {
        return Ok(None);
    }
    if args.world != 1 {
        return Err(Error::Invalid(format!(
            "--world {} under mpirun: the MPI processes are the ranks (leave --world at 1)",
            args.world
        )));
    }
    Ok(Some(Box::new(comm)))
}

#[cfg(not(feature = "mpi"))]
fn mpi_rank(_: &TrainArgs, _: std::time::Duration) -> Result<Option<Box<dyn Collective>>> {
    match std::env::var("OMPI_COMM_WORLD_SIZE").or_else(|_| std::env::var("PMI_SIZE")) {
        Ok(n) if n.trim() != "1" => Err(Error::Unavailable(format!(
            "started by mpirun with {n} processes, but this build has no MPI support (build with --features mpi)"
        ))),
        _ => Ok(None),
    }
}

/// Refuses a `train` that `dynsparse launch` (or torchrun) started as one of several host
/// ranks (torchrun variables, not mpirun): host ranks reduce through MPI, not through
/// launch's variables. (CUDA ranks took NCCL in [`launch_rank`] before this.)
fn host_rank_without_collective(any: &dynsparse::backend::AnyBackend) -> Result<()> {
    let Some(env) = dynsparse::dist::LaunchEnv::from_vars(|k| std::env::var(k).ok())? else { return Ok(()) };
    if env.world == 1 {
        return Ok(());
    }
    let kind = any.kind();
    Err(Error::Invalid(format!(
        "rank {} of {} (WORLD_SIZE is set): {kind} ranks take their collective from MPI, not from launch's variables: use `dynsparse launch` from a build with --features mpi (it runs train under mpirun), `mpirun -np {} dynsparse train …`, or `train --world {}` in one process",
        env.rank, env.world, env.world, env.world
    )))
}

/// A CUDA rank of a torchrun-style job (RANK, WORLD_SIZE > 1, LOCAL_RANK, MASTER_ADDR,
/// MASTER_PORT set, e.g. by `dynsparse launch` or torchrun): NCCL on device LOCAL_RANK, which
/// replaces the selected backend. Other backends are left to the launcher's own collective.
fn launch_rank(
    args: &TrainArgs,
    sel: &mut dynsparse::backend::Selection,
    timeout: std::time::Duration,
) -> Result<Option<Box<dyn Collective>>> {
    let Some(env) = dynsparse::dist::LaunchEnv::from_vars(|k| std::env::var(k).ok())? else {
        return Ok(None);
    };
    if env.world == 1 || sel.backend.kind() != dynsparse::BackendKind::Cuda {
        return Ok(None);
    }
    if args.world != 1 {
        return Err(Error::Invalid(format!(
            "--world {} with WORLD_SIZE={}: the launched processes are the ranks (leave --world at 1)",
            args.world, env.world
        )));
    }
    nccl_rank(&env, sel, timeout).map(Some)
}

#[cfg(feature = "nccl")]
fn nccl_rank(
    env: &dynsparse::dist::LaunchEnv,
    sel: &mut dynsparse::backend::Selection,
    timeout: std::time::Duration,
) -> Result<Box<dyn Collective>> {
    use dynsparse::backend::cuda::CudaBackend;
    use dynsparse::dist::nccl::Nccl;
    use dynsparse::dist::nccl_prep::Bootstrap;
    let be = CudaBackend::new(env.local_rank)?;
    let boot = Bootstrap::from_env(env, |k| std::env::var(k).ok());
    let comm = Nccl::from_launch(&be, env, &boot, timeout)?;
    sel.backend = dynsparse::backend::AnyBackend::Cuda(be);
    sel.reason = format!("NCCL rank {} of {} on CUDA device LOCAL_RANK={}", env.rank, env.world, env.local_rank);
    Ok(Box::new(comm))
}

#[cfg(not(feature = "nccl"))]
fn nccl_rank(
    env: &dynsparse::dist::LaunchEnv,
    _: &mut dynsparse::backend::Selection,
    _: std::time::Duration,
) -> Result<Box<dyn Collective>> {
    Err(Error::Unavailable(format!(
        "WORLD_SIZE={} with the CUDA backend needs NCCL, but this build has none (build with --features cuda,nccl)",
        env.world
    )))
}

pub fn train(choice: BackendChoice, args: TrainArgs) -> Result<()> {
    check_run_flags(&args)?;
    let (model_cfg, train_cfg, resume) = match &args.resume {
        Some(p) => {
            let ck = checkpoint::load(p)?;
            check_resume_flags(&args, &ck)?;
            let (step, steps) = (ck.state.step, ck.train.steps);
            if step >= steps {
                return Err(Error::Invalid(format!(
                    "{}: the run is finished (step {step} of {steps}); nothing to resume (start a new run in another --out)",
                    p.display()
                )));
            }
            if let Some(s) = args.stop_at
                && (s <= step || s >= steps)
            {
                return Err(Error::Invalid(format!(
                    "--stop-at {s}: accepted range {}..={} (the checkpoint is at step {step} of {steps})",
                    step + 1,
                    steps - 1
                )));
            }
            (ck.model, ck.train, Some(ck))
        }
        None => {
            let (m, t) = fresh_configs(&args)?;
            (m, t, None)
        }
    };
    let corpus = load_corpus(args.data.as_deref())?;
    let (train, val) = corpus.split(0.1);
    if train.tokens.len() <= train_cfg.seq || val.tokens.len() <= train_cfg.seq * 2 {
        return Err(Error::Invalid(format!(
            "the data ({} bytes) is too short for --seq {}: need a few windows for training and validation",
            corpus.tokens.len(),
            train_cfg.seq
        )));
    }
    let mut sel = select(choice)?;
    let plan = MemoryPlan::train(
        &model_cfg,
        train_cfg.precision,
        train_cfg.batch,
        train_cfg.seq,
        sel.backend.max_binding_bytes(),
    );
    super::preflight(&plan, &sel.backend, "training", "lower --batch, --seq, --context, --d-model or --layers")?;
    let timeout = std::time::Duration::from_secs_f64(args.collective_timeout);
    // Under mpirun each process is a rank; rank 0 owns --out, the others only train.
    // A CUDA rank under RANK/WORLD_SIZE: NCCL on device LOCAL_RANK (replaces the selected backend).
    let comm = match mpi_rank(&args, timeout)? {
        Some(c) => Some(c),
        None => launch_rank(&args, &mut sel, timeout)?,
    };
    if let Some(comm) = comm {
        if comm.rank() != 0 {
            let stop = args.stop_at.unwrap_or(train_cfg.steps).min(train_cfg.steps);
            let job = RankJob {
                comm,
                dist: args.dist(),
                model_cfg,
                train_cfg,
                resume: resume.map(|c| c.state),
                train: std::sync::Arc::new(train),
                stop,
                save_every: args.save_every,
                max_skipped: args.max_skipped_steps,
            };
            return run_on(&sel.backend, job);
        }
        let _lock = prepare_out(&args)?;
        let old_log = match (&resume, &args.resume) {
            (Some(ck), Some(p)) => log_rows_before(&ck_dir(p).join("log.csv"), ck.state.step),
            _ => Vec::new(),
        };
        eprintln!(
            "backend: {} — {} ({}); rank 0 of {}",
            sel.backend.kind(),
            sel.backend.device_name(),
            sel.reason,
            comm.world()
        );
        let job = TrainJob { args, model_cfg, train_cfg, resume, old_log, train, val, comm: Some(comm) };
        return run_on(&sel.backend, job);
    }
    host_rank_without_collective(&sel.backend)?;
    // Last of the checks and before any compute: the folder (an --overwrite deletes nothing
    // until every other check has passed).
    let _lock = prepare_out(&args)?;
    let old_log = match (&resume, &args.resume) {
        (Some(ck), Some(p)) => log_rows_before(&ck_dir(p).join("log.csv"), ck.state.step),
        _ => Vec::new(),
    };
    eprintln!("backend: {} — {} ({})", sel.backend.kind(), sel.backend.device_name(), sel.reason);
    if args.world == 1 {
        return run_on(&sel.backend, TrainJob { args, model_cfg, train_cfg, resume, old_log, train, val, comm: None });
    }
    // In-process data parallel: ranks 1.. run in threads on backends of their own; a rank that
    // fails drops its handle, which ends every peer's next collective with an error naming it.
    let mut comms = InProcess::group(args.world, timeout)?.into_iter();
    let comm0 = comms.next().ok_or_else(|| Error::Invalid("empty group".into()))?;
    let shared = std::sync::Arc::new(train.clone());
    let stop = args.stop_at.unwrap_or(train_cfg.steps).min(train_cfg.steps);
    let peers: Vec<_> = comms
        .map(|comm| {
            let job = RankJob {
                comm: Box::new(comm),
                dist: args.dist(),
                model_cfg,
                train_cfg,
                resume: resume.as_ref().map(|c| c.state.clone()),
                train: shared.clone(),
                stop,
                save_every: args.save_every,
                max_skipped: args.max_skipped_steps,
            };
            std::thread::spawn(move || run_on(&select(choice)?.backend, job))
        })
        .collect();
    let job = TrainJob { args, model_cfg, train_cfg, resume, old_log, train, val, comm: Some(Box::new(comm0)) };
    let first = run_on(&sel.backend, job);
    let mut rest = Vec::new();
    for (r, h) in peers.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => rest.push(format!("rank {}: {e}", r + 1)),
            Err(_) => rest.push(format!("rank {}: panicked", r + 1)),
        }
    }
    match (first, rest.is_empty()) {
        (Ok(()), true) => Ok(()),
        (Ok(()), false) => Err(Error::Collective(rest.join("; "))),
        (Err(e), true) => Err(e),
        // Every rank stops at the same non-finite step: rank 0's message says it all.
        (Err(e @ Error::NonFinite(_)), false) => Err(e),
        // Otherwise a peer's own error is the cause of rank 0's (which says the peer left).
        (Err(e), false) => Err(Error::Collective(format!("{}; rank 0: {e}", rest.join("; ")))),
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint written by `dynsparse train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text to evaluate on (default: the validation part of the data the checkpoint was trained on).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// dense, or sparse with the checkpoint's final budget (sparse models only).
    #[arg(long)]
    pub attention: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub windows: usize,
}

struct EvalJob {
    ck: QCheckpoint,
    data: Corpus,
    attn: StepAttention,
    windows: usize,
}

impl BackendJob for EvalJob {
    type Output = EvalStats;
    fn run<B: Backend>(self, be: &B) -> Result<EvalStats> {
        let model = self.ck.to_model(be)?;
        let mut ws =
            Workspace::new(be, &self.ck.model, self.ck.train.precision, self.ck.train.batch, self.ck.train.seq)?;
        dynsparse::train::evaluate(be, &model, &mut ws, &self.data, self.windows, self.attn)
    }
}

pub(super) fn data_of(ck: &QCheckpoint, data: Option<&Path>) -> Result<Corpus> {
    match (data, ck.extra.get("data").map(String::as_str)) {
        (Some(p), _) => Ok(Corpus::from_file(p)?.split(0.0).0),
        (None, Some(p)) if p != "synthetic" => Ok(Corpus::from_file(Path::new(p))?.split(0.1).1),
        _ => Ok(load_corpus(None)?.split(0.1).1),
    }
}

/// Loads a training or compressed checkpoint for eval/generate (every metadata
/// field range-checked, every tensor finite, every quantized part consistent) and
/// returns it with its file size for the memory preflight.
fn load_for_inference(path: &Path) -> Result<(QCheckpoint, u64)> {
    let ck = dynsparse::quant::checkpoint::load_for_inference(path)?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok((ck, size))
}

pub fn eval(choice: BackendChoice, a: EvalArgs) -> Result<()> {
    if a.windows == 0 {
        return Err(Error::Invalid("--windows 0: accepted range 1 or more".into()));
    }
    let (ck, size) = load_for_inference(&a.checkpoint)?;
    let attn = match (a.attention.as_deref(), ck.model.attention) {
        (Some("dense"), _) | (None, AttentionMode::Dense) => StepAttention::Dense,
        (Some("sparse") | None, AttentionMode::Sparse { keep_blocks, .. }) => StepAttention::Sparse { keep_blocks },
        (Some("sparse"), AttentionMode::Dense) => {
            return Err(Error::Invalid("--attention sparse needs a model trained with sparse attention".into()));
        }
        (Some(o), _) => return Err(Error::Invalid(format!("--attention `{o}`: expected dense or sparse"))),
    };
    let data = data_of(&ck, a.data.as_deref())?;
    let sel = select(choice)?;
    let max_binding = sel.backend.max_binding_bytes();
    let plan = MemoryPlan::inference(&ck.model, ck.train.precision, ck.train.batch, ck.train.seq, size, max_binding);
    super::preflight(&plan, &sel.backend, "evaluating this checkpoint", "its batch, seq or context is too large")?;
    let precision = ck.train.precision;
    let ev = run_on(&sel.backend, EvalJob { ck, data, attn, windows: a.windows })?;
    if !ev.loss.is_finite() {
        return Err(Error::NonFinite(format!(
            "{}: the loss is {} (the weights are finite but overflow in {}); the checkpoint is unusable",
            a.checkpoint.display(),
            ev.loss,
            precision
        )));
    }
    outln!("loss {:.4}  perplexity {:.2}", ev.loss, ev.perplexity);
    if !ev.retrieval_accuracy.is_nan() {
        outln!("retrieval accuracy {:.1}% over {} answer bytes", 100.0 * ev.retrieval_accuracy, ev.answers);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "key ")]
    pub prompt: String,
    /// Bytes (tokens) to generate at most; generation also ends at the model's context.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely bytes (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Seed of the sampler (the same seed, prompt and settings give the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long)]
    pub greedy: bool,
    /// Stop before this string (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Prompt tokens per prefill step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Print prefill and decode tokens/s to stderr at the end.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub stats: bool,
}

struct GenJob {
    ck: QCheckpoint,
    a: GenerateArgs,
}

/// Writes to stdout; `Ok(false)` when the reader has gone (EPIPE): generation stops.
fn write_out(out: &mut impl std::io::Write, bytes: &[u8]) -> Result<bool> {
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Error::io("writing the generated text to stdout", e)),
    }
}

impl BackendJob for GenJob {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let a = self.a;
        let model = self.ck.to_model(be)?;
        let opts = GenerateOptions {
            sampling: Sampling {
                temperature: if a.greedy { 0.0 } else { a.temperature },
                top_k: a.top_k,
                top_p: a.top_p,
            },
            max_tokens: a.max_tokens,
            seed: a.seed,
            stop: a.stop.clone(),
            chunk: a.prefill_chunk,
        };
        let mut out = std::io::stdout().lock();
        if !write_out(&mut out, a.prompt.as_bytes())? {
            return Ok(());
        }
        let st = model.generate(be, a.prompt.as_bytes(), &opts, |bytes| write_out(&mut out, bytes))?;
        if st.stop == StopReason::Closed {
            return Ok(());
        }
        write_out(&mut out, b"\n")?;
        if a.stats {
            let why = match st.stop {
                StopReason::MaxTokens => "--max-tokens reached",
                StopReason::StopString => "stop string",
                StopReason::Context => "the model's context is full",
                StopReason::Closed => "output closed",
            };
            eprintln!(
                "prefill {} tokens at {:.0} tokens/s; decode {} tokens at {:.1} tokens/s ({why}; {} on {})",
                st.prompt_tokens,
                st.prefill_tps(),
                st.generated,
                st.decode_tps(),
                self.ck.train.precision,
                be.device_name()
            );
        }
        Ok(())
    }
}

pub fn generate_text(choice: BackendChoice, a: GenerateArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0 && a.temperature <= 100.0) {
        return Err(Error::Invalid(format!("--temperature {}: accepted range 0..=100 (0: greedy)", a.temperature)));
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        return Err(Error::Invalid(format!("--top-p {}: accepted range 0 < top_p <= 1", a.top_p)));
    }
    if a.prompt.is_empty() {
        return Err(Error::Invalid("--prompt must not be empty".into()));
    }
    if a.prefill_chunk == 0 || a.prefill_chunk > 65536 {
        return Err(Error::Invalid(format!("--prefill-chunk {}: accepted range 1..=65536", a.prefill_chunk)));
    }
    if let Some(s) = a.stop.iter().find(|s| s.is_empty() || s.len() > 1024) {
        return Err(Error::Invalid(format!("--stop {s:?}: a stop string must have 1 to 1024 bytes")));
    }
    let (ck, size) = load_for_inference(&a.checkpoint)?;
    let cfg = ck.model;
    if a.prompt.len() >= cfg.context {
        return Err(Error::Invalid(format!(
            "the prompt has {} bytes; the model's context is {} tokens",
            a.prompt.len(),
            cfg.context
        )));
    }
    let sel = select(choice)?;
    let rows = a.prefill_chunk.min(a.prompt.len());
    let plan = MemoryPlan::kv_inference(&cfg, ck.train.precision, 1, cfg.context, rows, size);
    super::preflight(&plan, &sel.backend, "generating from this checkpoint", "its context is too large")?;
    run_on(&sel.backend, GenJob { ck, a })
}

#[cfg(test)]
mod tests {
    use super::prompt_from;

    #[test]
    fn the_next_hint_prompts_with_the_users_own_words() {
        let kjv = b"ter end of a verse\nActs 1:1 The former treatise have I made, O Theophilus\n";
        assert_eq!(prompt_from(kjv), "Acts 1:1 The former ");
        // Shell-special characters are escaped for the hint's double quotes; blank lines are skipped.
        assert_eq!(prompt_from(b"x\n\n  \nsay \"$HOME\" `now`\n"), "say \\\"\\$HOME\\\" \\`now\\` ");
        // One overlong word is cut at 24 characters (on a char boundary); no text at all still gives a prompt.
        assert_eq!(prompt_from("\nééééééééééééééééééééééééééé\n".as_bytes()).chars().count(), 25);
        assert_eq!(prompt_from(b""), "The");
    }
}
