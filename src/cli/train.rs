//! `dynsparse train`, `eval` and `generate`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::data::{BYTE_VOCAB, Corpus};
use dynsparse::model::sample::{Sampling, next_token};
use dynsparse::model::{AttentionMode, Model, ModelConfig, StepAttention, Workspace};
use dynsparse::train::{EvalStats, LrSchedule, MemoryReport, TrainConfig, Trainer, checkpoint, plot};
use dynsparse::util::rng::Rng;
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
    /// Peak learning rate (after linear warm-up; cosine decay to a tenth of it).
    #[arg(long)]
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
    /// Fraction of steps of dense warm-up.
    #[arg(long)]
    pub warmup_frac: Option<f64>,
    /// Fraction of steps of the keep-fraction ramp.
    #[arg(long)]
    pub ramp_frac: Option<f64>,
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
    let AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim } = m.attention else { unreachable!() };
    m.attention = match a.attention.as_deref().unwrap_or("sparse") {
        "dense" => AttentionMode::Dense,
        "sparse" => AttentionMode::Sparse {
            block: a.block.unwrap_or(block),
            keep_blocks: a.keep_blocks.unwrap_or(keep_blocks),
            index_heads,
            index_dim,
        },
        other => return Err(Error::Invalid(format!("--attention `{other}`: expected dense or sparse"))),
    };
    m.validate()?;
    let steps = a.steps.unwrap_or(300);
    let lr = a.lr.unwrap_or(3e-3);
    let t = TrainConfig {
        steps,
        batch: a.batch.unwrap_or(4),
        seq: a.seq.unwrap_or(512),
        accum: a.accum.unwrap_or(1),
        precision: precision(a.precision.as_deref().unwrap_or("f32"))?,
        lr: LrSchedule { lr, min_lr: lr / 10.0, warmup_steps: (steps / 20).max(1), total_steps: steps },
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        grad_clip: 1.0,
        warmup_frac: a.warmup_frac.unwrap_or(0.1),
        ramp_frac: a.ramp_frac.unwrap_or(0.3),
        seed: a.seed.unwrap_or(1234),
    };
    t.validate(&m)?;
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
    let mode = if m.is_sparse() { "sparse" } else { "dense" };
    cmp("attention", a.attention.clone(), mode.to_string());
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
        Err(Error::Invalid(format!("the checkpoint does not match the flags: {}", bad.join(", "))))
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
    train: Corpus,
    val: Corpus,
}

fn fmt_bytes(b: usize) -> String {
    format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
}

impl BackendJob for TrainJob {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let TrainJob { args, model_cfg, train_cfg, resume, train, val } = self;
        std::fs::create_dir_all(&args.out).map_err(|e| Error::io(format!("creating {}", args.out.display()), e))?;
        let ckpt_path = args.out.join("checkpoint.safetensors");
        let log_path = args.out.join("log.csv");
        let plot_path = args.out.join("loss.svg");
        be.reset_peak();
        let model = Model::new(be, model_cfg, train_cfg.precision, train_cfg.seed)?;
        let mut mem = MemoryReport::default();
        let mut tr = Trainer::new(be, model, train_cfg, &mut mem)?;
        let mut log_rows: Vec<String> = Vec::new();
        let (mut train_pts, mut val_pts) = (Vec::new(), Vec::new());
        if let Some(ck) = &resume {
            tr.restore(be, &ck.state)?;
            if let Ok(old) = std::fs::read_to_string(&log_path) {
                for line in old.lines().skip(1) {
                    let f: Vec<&str> = line.split(',').collect();
                    if let (Some(Ok(s)), Some(Ok(l))) =
                        (f.first().map(|x| x.parse::<u64>()), f.get(1).map(|x| x.parse::<f64>()))
                    {
                        if s >= tr.step {
                            break;
                        }
                        train_pts.push((s, l));
                        if let Some(Ok(v)) = f.get(2).map(|x| x.parse::<f64>()) {
                            val_pts.push((s, v));
                        }
                        log_rows.push(line.to_string());
                    }
                }
            }
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
                AttentionMode::Sparse { block, keep_blocks, .. } =>
                    format!("sparse attention ({keep_blocks} blocks of {block})"),
            },
            train_cfg.steps,
            train_cfg.accum,
            train_cfg.batch,
            train_cfg.seq,
            train_cfg.precision
        );
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
        let save = |tr: &Trainer<B>| -> Result<()> {
            let (m, v) = tr.moments(be)?;
            let st = checkpoint::TrainState {
                params: tr.master_values(be)?,
                m,
                v,
                scaler: tr.scaler,
                step: tr.step,
                batcher_rng: tr.batcher.rng.state(),
            };
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
        let mut last_eval: Option<EvalStats> = None;
        let stop = args.stop_at.unwrap_or(train_cfg.steps).min(train_cfg.steps);
        while tr.step < stop {
            let t0 = Instant::now();
            let st = tr.train_step(be, &train)?;
            let dt = t0.elapsed().as_secs_f64();
            let mut val_loss = String::new();
            if (st.step + 1) % args.eval_every == 0 || st.step + 1 == train_cfg.steps {
                let (attn, _) = tr.plan();
                let ev = dynsparse::train::evaluate(be, &tr.model, &mut eval_ws, &val, args.eval_windows, attn)?;
                val_pts.push((st.step, ev.loss));
                val_loss = format!("{:.4}", ev.loss);
                last_eval = Some(ev);
            }
            let keep = st.plan.map(|p| if p.dense { 1.0 } else { p.keep_fraction }).unwrap_or(1.0);
            train_pts.push((st.step, st.loss));
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
                save(&tr)?;
                write_log(&log_path, &log_rows)?;
            }
        }
        bar.finish();
        write_log(&log_path, &log_rows)?;
        if tr.step < train_cfg.steps {
            println!(
                "stopped at step {} of {}; continue with --resume {}",
                tr.step,
                train_cfg.steps,
                ckpt_path.display()
            );
            return Ok(());
        }
        plot::loss_curve(&plot_path, &train_pts, &val_pts, "dynsparse training loss")?;
        let ev = match last_eval {
            Some(e) => e,
            None => dynsparse::train::evaluate(be, &tr.model, &mut eval_ws, &val, args.eval_windows, final_attn(&tr))?,
        };
        println!(
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
        println!("peak device memory: {}", fmt_bytes(be.memory().peak));
        println!("checkpoint: {}", ckpt_path.display());
        println!("log:        {}", log_path.display());
        println!("plot:       {}", plot_path.display());
        println!("next:       dynsparse generate --checkpoint {} --prompt \"key abc: \"", ckpt_path.display());
        Ok(())
    }
}

fn write_log(path: &Path, rows: &[String]) -> Result<()> {
    let mut s =
        String::from("step,loss,val_loss,grad_norm,lr,loss_scale,kept_fraction,skipped,ms,tokens_per_s,indexer_kl\n");
    for r in rows {
        s.push_str(r);
        s.push('\n');
    }
    dynsparse::util::machine::write_atomic(path, s.as_bytes())
}

pub fn train(choice: BackendChoice, args: TrainArgs) -> Result<()> {
    let (model_cfg, train_cfg, resume) = match &args.resume {
        Some(p) => {
            let ck = checkpoint::load(p)?;
            check_resume_flags(&args, &ck)?;
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
    let sel = select(choice)?;
    eprintln!("backend: {} — {} ({})", sel.backend.kind(), sel.backend.device_name(), sel.reason);
    run_on(&sel.backend, TrainJob { args, model_cfg, train_cfg, resume, train, val })
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
    ck: checkpoint::Checkpoint,
    data: Corpus,
    attn: StepAttention,
    windows: usize,
}

impl BackendJob for EvalJob {
    type Output = EvalStats;
    fn run<B: Backend>(self, be: &B) -> Result<EvalStats> {
        let model = Model::from_values(be, self.ck.model, self.ck.train.precision, &self.ck.state.params)?;
        let mut ws =
            Workspace::new(be, &self.ck.model, self.ck.train.precision, self.ck.train.batch, self.ck.train.seq)?;
        dynsparse::train::evaluate(be, &model, &mut ws, &self.data, self.windows, self.attn)
    }
}

fn data_of(ck: &checkpoint::Checkpoint, data: Option<&Path>) -> Result<Corpus> {
    match (data, ck.extra.get("data").map(String::as_str)) {
        (Some(p), _) => Ok(Corpus::from_file(p)?.split(0.0).0),
        (None, Some(p)) if p != "synthetic" => Ok(Corpus::from_file(Path::new(p))?.split(0.1).1),
        _ => Ok(load_corpus(None)?.split(0.1).1),
    }
}

pub fn eval(choice: BackendChoice, a: EvalArgs) -> Result<()> {
    let ck = checkpoint::load(&a.checkpoint)?;
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
    let ev = run_on(&sel.backend, EvalJob { ck, data, attn, windows: a.windows })?;
    println!("loss {:.4}  perplexity {:.2}", ev.loss, ev.perplexity);
    if !ev.retrieval_accuracy.is_nan() {
        println!("retrieval accuracy {:.1}% over {} answer bytes", 100.0 * ev.retrieval_accuracy, ev.answers);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "key ")]
    pub prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the k most likely bytes (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long)]
    pub greedy: bool,
}

struct GenJob {
    ck: checkpoint::Checkpoint,
    a: GenerateArgs,
}

impl BackendJob for GenJob {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let (cfg, a) = (self.ck.model, self.a);
        let model = Model::from_values(be, cfg, self.ck.train.precision, &self.ck.state.params)?;
        let mut toks: Vec<u32> = a.prompt.bytes().map(u32::from).collect();
        if toks.is_empty() {
            return Err(Error::Invalid("--prompt must not be empty".into()));
        }
        if toks.len() >= cfg.context {
            return Err(Error::Invalid(format!(
                "the prompt has {} bytes; the model's context is {} tokens",
                toks.len(),
                cfg.context
            )));
        }
        let window = (toks.len() + a.max_tokens).min(cfg.context);
        let mut ws = Workspace::new(be, &cfg, self.ck.train.precision, 1, window)?;
        let attn = match cfg.attention {
            AttentionMode::Dense => StepAttention::Dense,
            AttentionMode::Sparse { keep_blocks, .. } => StepAttention::Sparse { keep_blocks },
        };
        let s = Sampling { temperature: if a.greedy { 0.0 } else { a.temperature }, top_k: a.top_k, top_p: a.top_p };
        let mut rng = Rng::new(a.seed);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(a.prompt.as_bytes());
        let mut pending: Vec<u8> = Vec::new();
        for _ in 0..a.max_tokens {
            // Causal attention: padding after the last real token does not change its logits.
            let start = toks.len().saturating_sub(window);
            let mut ids: Vec<u32> = toks[start..].to_vec();
            let last = ids.len() - 1;
            ids.resize(window, 0);
            model.forward(be, &mut ws, &ids, None, attn)?;
            let logits = ws.logits_f32(be)?;
            let v = cfg.vocab;
            let t = next_token(&logits[last * v..(last + 1) * v], &s, &mut rng);
            toks.push(t);
            pending.push(t as u8);
            // Print whole UTF-8 characters as they complete.
            if let Ok(text) = std::str::from_utf8(&pending) {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
                pending.clear();
            } else if pending.len() >= 4 {
                let _ = out.write_all(String::from_utf8_lossy(&pending).as_bytes());
                pending.clear();
            }
        }
        let _ = writeln!(out);
        Ok(())
    }
}

pub fn generate_text(choice: BackendChoice, a: GenerateArgs) -> Result<()> {
    let ck = checkpoint::load(&a.checkpoint)?;
    if !(a.temperature >= 0.0 && a.temperature.is_finite() && a.top_p > 0.0 && a.top_p <= 1.0) {
        return Err(Error::Invalid("--temperature must be ≥ 0 and --top-p in (0, 1]".into()));
    }
    let sel = select(choice)?;
    run_on(&sel.backend, GenJob { ck, a })
}
