//! `dynsparse bench decode`: prefill and decode tokens/s through the KV cache,
//! dense vs dynamic sparse decode (indexer and selection included), batch 1
//! vs batch B, and the old whole-window path (one full forward pass per new
//! token) for reference, on one backend with random weights.

use std::time::Instant;

use clap::Args;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::model::{AttentionMode, InferState, KvCache, Model, ModelConfig, Row, StepAttention, Workspace};
use dynsparse::util::machine::{host_description, update_markdown_section};
use dynsparse::util::rng::Rng;
use dynsparse::{Backend, DType, Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

use super::bench::parse_dtypes;

#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// Context lengths (tokens already in the cache when decoding starts).
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 4096, 16384])]
    pub contexts: Vec<usize>,
    /// Decode batch sizes (sequences decoded together, each at the full context).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    pub batches: Vec<usize>,
    /// Transformer layers.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Model width (heads × head_dim); with the defaults the attention is `bench attention`'s.
    #[arg(long, default_value_t = 512)]
    pub d_model: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    /// MLP width = d_model × this.
    #[arg(long, default_value_t = 4)]
    pub mlp_ratio: usize,
    /// Key block of sparse decode.
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    /// Key blocks each new token keeps (its own and the sink included): 16×64 = 1024 keys.
    #[arg(long, default_value_t = 16)]
    pub keep_blocks: usize,
    #[arg(long, default_value_t = 4)]
    pub index_heads: usize,
    #[arg(long, default_value_t = 32)]
    pub index_dim: usize,
    /// Working dtype of weights, activations and the cache.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Decode steps timed per configuration.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Prefill is timed on min(context, this) prompt tokens (prefill is O(n²): long ones take minutes on a CPU).
    #[arg(long, default_value_t = 2048)]
    pub prefill_max: usize,
    /// Prefill chunk (rows per step).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Tokens per KV-cache page (0: one contiguous page per sequence). Compare
    /// `--kv-page 16` with the default to see what reading keys through page
    /// tables costs.
    #[arg(long, default_value_t = 0)]
    pub kv_page: usize,
    /// Context of the whole-window reference (0: skip it).
    #[arg(long, default_value_t = 1024)]
    pub window_ref: usize,
    /// Write the table into this Markdown file (a section replaced on every run), e.g. BENCHMARKS.md.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

#[derive(Clone, Debug)]
struct Row0 {
    mode: &'static str,
    context: usize,
    prefill_tokens: usize,
    prefill_tps: f64,
    /// (batch, decode tokens/s)
    decode: Vec<(usize, f64)>,
}

struct Job<'a> {
    a: &'a DecodeArgs,
    dt: DType,
    bar: &'a ProgressBar,
}

fn config(a: &DecodeArgs, context: usize, sparse: bool) -> ModelConfig {
    ModelConfig {
        n_layers: a.layers,
        n_heads: a.heads,
        n_kv_heads: a.kv_heads,
        d_model: a.d_model,
        vocab: 256,
        context,
        mlp_ratio: a.mlp_ratio,
        rope_theta: 10000.0,
        attention: if sparse {
            AttentionMode::Sparse {
                block: a.block,
                keep_blocks: a.keep_blocks,
                index_heads: a.index_heads,
                index_dim: a.index_dim,
            }
        } else {
            AttentionMode::Dense
        },
    }
}

impl BackendJob for Job<'_> {
    type Output = (Vec<Row0>, Option<(f64, f64)>, usize);
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        let a = self.a;
        let max_ctx = *a.contexts.iter().max().expect("validated non-empty");
        let max_batch = *a.batches.iter().max().expect("validated non-empty");
        let mut rows = Vec::new();
        let mut params = 0;
        let mut rng = Rng::new(1);
        for sparse in [false, true] {
            let cfg = config(a, max_ctx + a.steps, sparse);
            params = cfg.n_params();
            let model = Model::new(be, cfg, self.dt, 3)?;
            let mut st = InferState::default();
            for &ctx in &a.contexts {
                let mode = if sparse { "sparse" } else { "dense" };
                self.bar.set_message(format!("{mode} context {ctx}"));
                let mut cache = match a.kv_page {
                    0 => KvCache::new(be, &model, max_batch, ctx + a.steps)?,
                    page => {
                        let pages = max_batch * (ctx + a.steps).div_ceil(page);
                        KvCache::paged(be, &model, max_batch, ctx + a.steps, page, pages)?
                    }
                };
                // Prefill one prompt.
                let n = ctx.min(a.prefill_max);
                let prompt: Vec<u32> = (0..n).map(|_| rng.below(256) as u32).collect();
                let t0 = Instant::now();
                model.prefill(be, &mut cache, &mut st, 0, &prompt, a.chunk)?;
                be.synchronize()?;
                let prefill_tps = n as f64 / t0.elapsed().as_secs_f64();
                let mut decode = Vec::new();
                for &b in &a.batches {
                    for slot in 0..b {
                        cache.assume_filled(slot, ctx)?;
                    }
                    let attn = model.inference_attention();
                    let mut step = |cache: &mut KvCache<B>| -> Result<()> {
                        let rs: Vec<Row> = (0..b).map(|slot| Row { slot, token: rng.below(256) as u32 }).collect();
                        model.step(be, cache, &mut st, &rs, attn).map(|_| ())
                    };
                    step(&mut cache)?; // warm-up (pipelines, buffers)
                    let t0 = Instant::now();
                    for _ in 0..a.steps.saturating_sub(1) {
                        step(&mut cache)?;
                    }
                    be.synchronize()?;
                    let secs = t0.elapsed().as_secs_f64();
                    decode.push((b, (b * a.steps.saturating_sub(1).max(1)) as f64 / secs));
                    for slot in 0..b {
                        cache.clear(slot);
                    }
                }
                rows.push(Row0 { mode, context: ctx, prefill_tokens: n, prefill_tps, decode });
                self.bar.inc(1);
            }
        }
        // The whole-window path: one forward pass over the window per token.
        let window = if a.window_ref > 0 {
            self.bar.set_message(format!("whole-window reference at {}", a.window_ref));
            let cfg = config(a, a.window_ref, false);
            let model = Model::new(be, cfg, self.dt, 3)?;
            let mut ws = Workspace::new(be, &cfg, self.dt, 1, a.window_ref)?;
            let ids: Vec<u32> = (0..a.window_ref).map(|_| rng.below(256) as u32).collect();
            model.forward(be, &mut ws, &ids, None, StepAttention::Dense)?;
            let reps = 2;
            let t0 = Instant::now();
            for _ in 0..reps {
                model.forward(be, &mut ws, &ids, None, StepAttention::Dense)?;
                ws.logits_f32(be)?;
            }
            let whole = reps as f64 / t0.elapsed().as_secs_f64();
            let cached = rows
                .iter()
                .find(|r| r.mode == "dense" && r.context == a.window_ref)
                .and_then(|r| r.decode.iter().find(|d| d.0 == 1))
                .map(|d| d.1)
                .unwrap_or(f64::NAN);
            Some((whole, cached))
        } else {
            None
        };
        Ok((rows, window, params))
    }
}

pub fn run(choice: BackendChoice, a: DecodeArgs) -> Result<()> {
    let dt = parse_dtypes(std::slice::from_ref(&a.dtype))?[0];
    let bad = |m: String| Err(Error::Invalid(m));
    if a.contexts.is_empty() || a.contexts.contains(&0) {
        return bad("--contexts needs positive lengths, e.g. --contexts 1024,4096".into());
    }
    if a.batches.is_empty() || a.batches.contains(&0) {
        return bad("--batches needs positive sizes, e.g. --batches 1,8".into());
    }
    if a.heads == 0 || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) || !a.d_model.is_multiple_of(a.heads) {
        return bad(format!(
            "--heads {} must be a multiple of --kv-heads {} and divide --d-model {}",
            a.heads, a.kv_heads, a.d_model
        ));
    }
    if a.steps < 2 || a.block == 0 || a.keep_blocks == 0 || a.chunk == 0 || a.layers == 0 || a.mlp_ratio == 0 {
        return bad("--steps must be ≥ 2 and --block, --keep-blocks, --chunk, --layers, --mlp-ratio positive".into());
    }
    if a.window_ref > 0 && !a.contexts.contains(&a.window_ref) {
        return bad(format!(
            "--window-ref {} must be one of --contexts (its cached decode is the comparison)",
            a.window_ref
        ));
    }
    let sel = select(choice)?;
    log::info!("bench decode on {} ({}): {}", sel.backend.kind(), sel.backend.device_name(), sel.reason);
    let bar = ProgressBar::new(2 * a.contexts.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]").expect("static template"));
    let (rows, window, params) = run_on(&sel.backend, Job { a: &a, dt, bar: &bar })?;
    bar.finish_and_clear();

    let kind = sel.backend.kind();
    let list = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let mut md = format!(
        "Machine: {} — device: {} ({kind}).\n\n\
         Command: `dynsparse --backend {kind} bench decode --contexts {} --batches {} --layers {} --d-model {} --heads {} --kv-heads {} --mlp-ratio {} --block {} --keep-blocks {} --index-heads {} --index-dim {} --dtype {dt} --steps {} --prefill-max {} --chunk {} --kv-page {}`\n\n\
         Model: {:.1}M parameters (the sparse model adds its indexers), random weights. Decode = one new token per sequence per step, \
         every sequence at the full context (the cache holds `context` tokens); sparse decode includes the indexer over every cached key, \
         the block pooling and the top-{} selection. Prefill: one prompt of min(context, {}) tokens in chunks of {}. Tokens/s.\n\n",
        host_description(),
        sel.backend.device_name(),
        list(&a.contexts),
        list(&a.batches),
        a.layers,
        a.d_model,
        a.heads,
        a.kv_heads,
        a.mlp_ratio,
        a.block,
        a.keep_blocks,
        a.index_heads,
        a.index_dim,
        a.steps,
        a.prefill_max,
        a.chunk,
        a.kv_page,
        params as f64 / 1e6,
        a.keep_blocks,
        a.prefill_max,
        a.chunk,
    );
    md.push_str("| context | mode | prefill tokens | prefill tok/s |");
    for b in &a.batches {
        md.push_str(&format!(" decode tok/s b={b} |"));
    }
    md.push_str(" sparse / dense decode (first batch) |\n|---:|---|---:|---:|");
    for _ in &a.batches {
        md.push_str("---:|");
    }
    md.push_str("---:|\n");
    for r in &rows {
        md.push_str(&format!("| {} | {} | {} | {:.0} |", r.context, r.mode, r.prefill_tokens, r.prefill_tps));
        for (_, tps) in &r.decode {
            md.push_str(&format!(" {tps:.1} |"));
        }
        let dense = rows.iter().find(|d| d.mode == "dense" && d.context == r.context);
        let ratio = match (r.mode, dense) {
            ("sparse", Some(d)) => format!("{:.2}×", r.decode[0].1 / d.decode[0].1),
            _ => "–".into(),
        };
        md.push_str(&format!(" {ratio} |\n"));
    }
    if let Some((whole, cached)) = window {
        md.push_str(&format!(
            "\nWhole-window path at context {} (one full forward pass of the window per new token, as `generate` did before the KV cache): \
             {whole:.2} tokens/s; KV-cache decode at batch 1: {cached:.1} tokens/s — {:.0}× faster.\n",
            a.window_ref,
            cached / whole
        ));
    }
    let (b0, bl) = (a.batches[0], *a.batches.last().expect("non-empty"));
    if b0 != bl {
        for r in rows.iter().filter(|r| r.mode == "dense") {
            let (x, y) = (r.decode[0].1, r.decode.last().expect("non-empty").1);
            md.push_str(&format!(
                "\nDense decode at context {}: batch {bl} runs {:.2}× the tokens/s of batch {b0}.",
                r.context,
                y / x
            ));
        }
        md.push('\n');
    }
    println!("{md}");
    if let Some(path) = &a.write {
        let section = match a.kv_page {
            0 => format!("bench decode {kind}"),
            p => format!("bench decode {kind} kv-page {p}"),
        };
        update_markdown_section(path, &section, &md)?;
        println!("written to {}", path.display());
    }
    Ok(())
}
