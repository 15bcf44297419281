//! `dynsparse bench qdecode`: decode tokens/s through the KV cache per weight
//! format (f32, bf16 dense weights; int8, int4, 2:4 quantized linear
//! weights) on one backend, random weights, batch 1 and B. The variants are
//! timed in interleaved rounds (round r times every variant once) so a
//! noisy, shared machine slows them alike; the median and the range over
//! rounds are reported with the ratio of medians to bf16 and f32.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::model::{AttentionMode, InferState, KvCache, Model, ModelConfig, Row, StepAttention, init_params};
use dynsparse::quant::{QFormat, QMatrix, transpose};
use dynsparse::util::machine::{host_description, update_markdown_section};
use dynsparse::{Backend, DType, Error, Result};

#[derive(Args, Debug)]
pub struct QDecodeArgs {
    /// Weight variants: f32, bf16, f16 (dense weights in that dtype), or a quantized format
    /// (int8, int4-g128, int4-g32-asym, 2:4, 2:4-int8: linear weights quantized, f32 activations).
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string(), "bf16".into(), "int8".into(), "int4-g128".into(), "int4-g32".into(), "2:4".into(), "2:4-int8".into()])]
    pub weights: Vec<String>,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    pub batches: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    #[arg(long, default_value_t = 768)]
    pub d_model: usize,
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
    #[arg(long, default_value_t = 4)]
    pub mlp_ratio: usize,
    /// Tokens in the cache when decoding starts (short: the weights, not attention, dominate).
    #[arg(long, default_value_t = 64)]
    pub context: usize,
    /// Decode steps per timing.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Interleaved rounds (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Write the table into this Markdown file (a section replaced on every run).
    #[arg(long)]
    pub write: Option<PathBuf>,
}

enum Variant {
    Dense(DType),
    Quant(QFormat),
}

fn parse_variant(s: &str) -> Result<Variant> {
    match DType::parse(s) {
        Some(d) if d.is_float() => Ok(Variant::Dense(d)),
        _ => QFormat::parse(s).map(Variant::Quant).map_err(|e| Error::Invalid(format!("--weights {s}: {e}"))),
    }
}

struct Job<'a> {
    a: &'a QDecodeArgs,
    cfg: ModelConfig,
}

impl BackendJob for Job<'_> {
    /// Per variant: weight bytes, and per batch the tokens/s of every round.
    type Output = Vec<(usize, Vec<Vec<f64>>)>;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        let (a, cfg) = (self.a, self.cfg);
        let values = init_params(&cfg, 11);
        let infos = cfg.params();
        let linear = Model::<B>::quantizable(&cfg);
        let mut models = Vec::new();
        for w in &a.weights {
            let m = match parse_variant(w)? {
                Variant::Dense(dt) => Model::from_values(be, cfg, dt, &values)?,
                Variant::Quant(f) => {
                    let mut quant = vec![None; values.len()];
                    for &i in &linear {
                        let [k, n] = infos[i].shape[..] else { unreachable!("linear weights are 2-D") };
                        quant[i] = Some(QMatrix::quantize(&transpose(&values[i], k, n), n, k, f)?);
                    }
                    Model::from_parts(be, cfg, DType::F32, &values, &quant)?
                }
            };
            models.push(m);
        }
        let max_b = *a.batches.iter().max().expect("validated");
        let mut out: Vec<(usize, Vec<Vec<f64>>)> =
            models.iter().map(|m| (m.weight_bytes(), vec![Vec::new(); a.batches.len()])).collect();
        let mut caches = models.iter().map(|m| KvCache::new(be, m, max_b, cfg.context)).collect::<Result<Vec<_>>>()?;
        let mut states: Vec<InferState<B>> = models.iter().map(|_| InferState::default()).collect();
        for round in 0..=a.rounds {
            for (bi, &b) in a.batches.iter().enumerate() {
                for (vi, m) in models.iter().enumerate() {
                    let cache = &mut caches[vi];
                    for s in 0..max_b {
                        cache.clear(s);
                    }
                    for s in 0..b {
                        cache.assume_filled(s, cfg.context - a.steps - 1)?;
                    }
                    let t0 = Instant::now();
                    for step in 0..a.steps {
                        let rows: Vec<Row> =
                            (0..b).map(|slot| Row { slot, token: ((step * 31 + slot * 7) % 256) as u32 }).collect();
                        m.step(be, cache, &mut states[vi], &rows, StepAttention::Dense)?;
                    }
                    let tps = (a.steps * b) as f64 / t0.elapsed().as_secs_f64();
                    // Round 0 warms up (buffers, caches, page faults) and is not kept.
                    if round > 0 {
                        out[vi].1[bi].push(tps);
                    }
                }
            }
        }
        Ok(out)
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

pub fn run(choice: BackendChoice, a: QDecodeArgs) -> Result<()> {
    if a.weights.is_empty() || a.batches.is_empty() || a.batches.contains(&0) || a.rounds == 0 || a.steps == 0 {
        return Err(Error::Invalid(
            "bench qdecode: --weights, --batches (≥ 1), --rounds and --steps must be non-empty/positive".into(),
        ));
    }
    for w in &a.weights {
        parse_variant(w)?;
    }
    if a.context < a.steps + 2 {
        return Err(Error::Invalid(format!("--context {} must exceed --steps {} + 1", a.context, a.steps)));
    }
    let cfg = ModelConfig {
        n_layers: a.layers,
        n_heads: a.heads,
        n_kv_heads: a.heads,
        d_model: a.d_model,
        vocab: 256,
        context: a.context,
        mlp_ratio: a.mlp_ratio,
        rope_theta: 10000.0,
        attention: AttentionMode::Dense,
    };
    cfg.validate()?;
    let sel = select(choice)?;
    let dev = sel.backend.device_name();
    let res = run_on(&sel.backend, Job { a: &a, cfg })?;
    let idx = |name: &str| a.weights.iter().position(|w| w == name);
    let (bf16, f32i) = (idx("bf16"), idx("f32"));
    let mut md = format!(
        "Decode tokens/s by weight format on {dev} ({}): {} parameters ({} layers, d_model {}, MLP ×{}), random weights, \
         dense attention over {} cached tokens, {} steps per timing, median of {} interleaved rounds (range in brackets). \
         Quantized variants quantize wq wk wv wo w1 w2 (RTN / magnitude) and run f32 activations; the embedding / LM head stays f32.\n\n",
        host_description(),
        cfg.n_params(),
        cfg.n_layers,
        cfg.d_model,
        cfg.mlp_ratio,
        a.context - a.steps - 1,
        a.steps,
        a.rounds
    );
    md.push_str("| weights | weight MiB |");
    for b in &a.batches {
        md.push_str(&format!(" batch {b} tok/s | ×bf16 | ×f32 |"));
    }
    md.push_str("\n|---|---:|");
    for _ in &a.batches {
        md.push_str("---:|---:|---:|");
    }
    md.push('\n');
    for (vi, (bytes, per_b)) in res.iter().enumerate() {
        md.push_str(&format!("| {} | {:.1} |", a.weights[vi], *bytes as f64 / (1024.0 * 1024.0)));
        for (bi, v) in per_b.iter().enumerate() {
            let med = median(v);
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            let ratio =
                |base: Option<usize>| base.map_or("–".to_string(), |b| format!("{:.2}", med / median(&res[b].1[bi])));
            md.push_str(&format!(" {med:.1} [{lo:.1}–{hi:.1}] | {} | {} |", ratio(bf16), ratio(f32i)));
        }
        md.push('\n');
    }
    println!("{md}");
    if let Some(path) = &a.write {
        update_markdown_section(path, &format!("bench qdecode {}", sel.backend.kind()), &md)?;
        println!("written to {}", path.display());
    }
    Ok(())
}
