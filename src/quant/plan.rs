//! The hardware-aware planner: one format per linear weight, chosen from
//! measured sensitivities and measured kernel costs.
//!
//! - **Text** ([`Parts`]): the evaluation text is cut into windows (chunks of
//!   `seq + 1` tokens) dealt round-robin to parts that never share a token:
//!   the *sensitivity* part `S` (calibration statistics and every `Δ_i(f)`),
//!   the *verification* part `V` (only whole plans are evaluated on it) and,
//!   for a caller that checks the plan, a *held-out* part `H`. Interleaving
//!   makes the parts samples of the same text (stratified over it: every part
//!   has a window in every stretch of three), so a bound computed on `V` is a
//!   statement about `H`. [`Split::Halves`] (held-out = the second half of
//!   the text) is kept as a *distribution-shift* check only: no bound on one
//!   text's windows covers other text.
//! - **Sensitivity** `Δ_i(f)`: the loss increase on `S` when only weight `i`
//!   is compressed to candidate `f` — quantized, dequantized into the f32
//!   model (exactly what every kernel computes) and evaluated on the backend.
//!   Measured once and kept in a sensitivity cache keyed by a fingerprint of
//!   the weights, the windows, the calibration and the device, so planning
//!   again under another budget or target costs no evaluation.
//! - **Cost** `c_i(f)`: for `--target speed`, the measured time of
//!   `ops::qmatmul` (of the dense `ops::matmul` for "keep") at weight `i`'s
//!   shape, summed over the serving batch sizes, on the target backend; cached
//!   per device name in a JSON file ([`CostCache`]). For `--target size`, its bytes.
//! - **Choice**: minimise `Σ c_i(f_i)` subject to `Σ max(Δ_i(f_i), 0) ≤ B_t`
//!   (losses assumed additive), a multiple-choice knapsack solved exactly by
//!   dynamic programming over `B_t` cut into [`BUDGET_UNITS`] units, each
//!   `Δ` rounded *up* to whole units so the predicted total never exceeds it.
//! - **Verification** (the generalisation rule): the plan is evaluated on the
//!   `W` windows of `V`, paired with the uncompressed model on the same
//!   windows: `d_w = L_w(plan) − L_w(base)`, mean `d̄`, standard error
//!   `s = sd(d)/√W`. The plan is accepted when the one-sided upper
//!   *prediction* bound for the mean over `w` unseen windows of the same text,
//!   `U = d̄ + z·s·√(1 + W/w)` ([`Paired::predict_upper`]; `z` =
//!   [`Z_ONE_SIDED_95`], `w` = [`PlanOptions::predict_windows`], `w = 0`: the
//!   expectation, `U = d̄ + z·s`), is within the budget `B`: the unseen
//!   sample's own noise (`sd²/w`) is what a bound on the expectation alone
//!   does not see — with it, the measured increase on `w` held-out windows
//!   exceeds `B` with probability ≈ 5% at most. The verification text is not
//!   the sensitivity text, so `d̄` is not biased by the choice having been
//!   fitted to it (the `Δ` of the entries a knapsack selects are optimistic:
//!   it picks the ones whose noise came out low).
//! - **Re-plan** ([`shrink_target`]): when `U > B` the knapsack is solved again
//!   under a smaller planning budget. The table's error — noise, the
//!   selection's optimism, non-additive interactions — shows as the ratio
//!   `r = d̄ / P` of the verified mean to the plan's predicted `P = Σ Δ`; the
//!   next planning budget is `min(0.9·B_t, (B − (U − d̄))/r)`, the largest
//!   predicted total that would verify within `B` at the observed ratio and
//!   margin (falling back to `B_t·min(0.9, 0.9·B/U)` where `r` says nothing);
//!   up to `max_rounds` times, then everything stays dense (which meets any
//!   budget).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::Corpus;
use crate::error::{Error, Result};
use crate::model::{AttentionMode, Model, ModelConfig, StepAttention, Workspace};
use crate::ops::{self, QWeight};
use crate::quant::awq::{Choice, Compressed, Method, compress};
use crate::quant::calib::{Calibration, linears};
use crate::quant::{QFormat, QMatrix};
use crate::util::rng::Rng;
use crate::{Backend, DType, Tensor};

/// Units the loss budget is cut into by the knapsack.
pub const BUDGET_UNITS: usize = 2000;

/// What the planner minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Predicted decode time (measured kernel costs).
    Speed,
    /// Weight bytes.
    Size,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target> {
        match s.trim().to_ascii_lowercase().as_str() {
            "speed" => Ok(Target::Speed),
            "size" => Ok(Target::Size),
            _ => Err(Error::Invalid(format!("unknown planner target `{s}`: expected speed or size"))),
        }
    }
}

/// Parses a loss budget relative to the uncompressed validation loss:
/// `1%` or `0.01`. It must be finite, positive and at most 100%.
pub fn parse_budget(s: &str) -> Result<f64> {
    let t = s.trim();
    let (num, pct) = match t.strip_suffix('%') {
        Some(n) => (n.trim(), true),
        None => (t, false),
    };
    let bad = |why: &str| Error::Invalid(format!("--budget {s}: {why} (e.g. 1% or 0.01 of the validation loss)"));
    let v: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let v = if pct { v / 100.0 } else { v };
    check_budget(v).map_err(|_| bad("expected a loss increase above 0 and at most 100%"))?;
    Ok(v)
}

/// Checks a relative budget (fraction of the loss).
pub fn check_budget(v: f64) -> Result<()> {
    if !v.is_finite() || v <= 0.0 || v > 1.0 {
        return Err(Error::Invalid(format!("loss budget {v}: expected a fraction in (0, 1]")));
    }
    Ok(())
}

/// One option for one weight: `choice` None keeps it dense.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanOption {
    pub choice: Option<Choice>,
    /// Validation-loss increase (nats) when only this weight takes this option.
    pub delta: f64,
    /// Measured kernel time (µs, summed over the serving batch sizes).
    pub us: f64,
    pub bytes: usize,
}

/// One weight's options.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    /// Output channels and inputs (`[n, k]`, the formats' view).
    pub n: usize,
    pub k: usize,
    pub options: Vec<PlanOption>,
}

/// Chooses one option per row minimising `Σ cost` subject to
/// `Σ max(Δ, 0) ≤ budget` (nats, > 0). Every row must have an option with
/// `Δ ≤ 0` or the problem may be infeasible (then an error).
pub fn solve(rows: &[Row], budget: f64, target: Target) -> Result<Vec<usize>> {
    if !budget.is_finite() || budget <= 0.0 {
        return Err(Error::Invalid(format!("planner: loss budget {budget} nats must be positive")));
    }
    let u = BUDGET_UNITS;
    let units = |d: f64| -> Option<usize> {
        if d.is_nan() {
            return None;
        }
        let x = (d.max(0.0) / budget * u as f64).ceil();
        (x <= u as f64).then_some(x as usize)
    };
    let cost = |o: &PlanOption| match target {
        Target::Speed => o.us,
        Target::Size => o.bytes as f64,
    };
    // best[w]: the least cost of the rows so far using at most w units.
    let mut best = vec![0.0f64; u + 1];
    let mut pick: Vec<Vec<u16>> = Vec::with_capacity(rows.len());
    for r in rows {
        let mut next = vec![f64::INFINITY; u + 1];
        let mut choice = vec![u16::MAX; u + 1];
        for (oi, o) in r.options.iter().enumerate() {
            let Some(w) = units(o.delta) else { continue };
            let c = cost(o);
            for cap in w..=u {
                let v = best[cap - w] + c;
                if v < next[cap] {
                    next[cap] = v;
                    choice[cap] = oi as u16;
                }
            }
        }
        best = next;
        pick.push(choice);
    }
    if !best[u].is_finite() {
        return Err(Error::Invalid("planner: no choice of formats meets the loss budget".into()));
    }
    // Walk back from the full budget.
    let mut out = vec![0usize; rows.len()];
    let mut cap = u;
    for (i, r) in rows.iter().enumerate().rev() {
        let oi = pick[i][cap] as usize;
        out[i] = oi;
        cap -= units(r.options[oi].delta).expect("picked options fit");
    }
    Ok(out)
}

/// Measured kernel times per device, in a small JSON file:
/// `{"<device>|<dtype>|<format>|<n>x<k>|m<batch>": µs}`. Default location:
/// `$DYNSPARSE_CACHE_DIR/qmatmul-costs.json`, else
/// `~/.cache/dynsparse/qmatmul-costs.json`.
#[derive(Clone, Debug, Default)]
pub struct CostCache {
    pub path: Option<PathBuf>,
    pub entries: BTreeMap<String, f64>,
    /// Read the costs of this device instead of the backend's own (planning
    /// for a device other than the one evaluating): they must be cached.
    pub device: Option<String>,
}

impl CostCache {
    /// The default cache file.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("DYNSPARSE_CACHE_DIR").filter(|d| !d.is_empty()) {
            return Some(PathBuf::from(d).join("qmatmul-costs.json"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dynsparse/qmatmul-costs.json"))
    }

    /// Reads the cache at `path` (missing or unreadable: empty — it is only a cache).
    pub fn load(path: Option<&Path>) -> Self {
        let entries = path
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<BTreeMap<String, f64>>(&b).ok())
            .unwrap_or_default();
        CostCache { path: path.map(Path::to_path_buf), entries, device: None }
    }

    /// Writes the cache back (best effort: a read-only home only costs re-measuring).
    pub fn save(&self) {
        let Some(p) = &self.path else { return };
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Ok(s) = serde_json::to_string_pretty(&self.entries) {
            let tmp = p.with_extension("json.tmp");
            if std::fs::write(&tmp, s).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }

    /// µs of one `[m, k] × [n, k]ᵀ` product in `format` (None: dense matmul
    /// with a `[k, n]` weight in `dtype`) on `be`: measured once per device and kept.
    pub fn cost<B: Backend>(
        &mut self,
        be: &B,
        dtype: DType,
        format: Option<QFormat>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<f64> {
        let f = format.map_or_else(|| "dense".to_string(), |f| f.name());
        let own = be.device_name();
        let device = self.device.as_deref().unwrap_or(&own);
        let key = format!("{device}|{}|{f}|{n}x{k}|m{m}", dtype.name());
        if let Some(&v) = self.entries.get(&key) {
            return Ok(v);
        }
        if device != own {
            return Err(Error::Invalid(format!("no cached kernel cost `{key}`: measure it on {device} first")));
        }
        let v = measure(be, dtype, format, n, k, m)?;
        self.entries.insert(key, v);
        Ok(v)
    }
}

/// One timed kernel call writing its output.
type Kernel<'a, B> = Box<dyn Fn(&mut Tensor<B>) -> Result<()> + 'a>;

/// Median µs of the kernel over 5 timed runs of enough calls to last ≥ 2 ms.
fn measure<B: Backend>(be: &B, dtype: DType, format: Option<QFormat>, n: usize, k: usize, m: usize) -> Result<f64> {
    let mut rng = Rng::new(0x5eed);
    let x = Tensor::from_f32(be, &rng.normal_vec(m * k), &[m, k], dtype)?;
    let mut y = Tensor::empty(be, &[m, n], dtype)?;
    let w: Vec<f32> = rng.normal_vec(n * k).into_iter().map(|v| v * 0.02).collect();
    let run: Kernel<'_, B> = match format {
        None => {
            let wd = Tensor::from_f32(be, &w, &[k, n], dtype)?;
            Box::new(move |y| ops::matmul(be, &x, &wd, y, false, false, 1.0, 0.0))
        }
        Some(f) => {
            let q = QWeight::upload(be, &QMatrix::quantize(&w, n, k, f)?)?;
            Box::new(move |y| ops::qmatmul(be, &x, &q, y))
        }
    };
    run(&mut y)?;
    be.synchronize()?;
    let t0 = Instant::now();
    run(&mut y)?;
    be.synchronize()?;
    let once = t0.elapsed().as_secs_f64().max(1e-7);
    let calls = ((2e-3 / once).ceil() as usize).clamp(1, 1000);
    let mut times = Vec::with_capacity(5);
    for _ in 0..5 {
        let t0 = Instant::now();
        for _ in 0..calls {
            run(&mut y)?;
        }
        be.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e6 / calls as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// The attention an evaluation runs with: the model's own.
pub fn eval_attention(cfg: &ModelConfig) -> StepAttention {
    match cfg.attention {
        AttentionMode::Dense => StepAttention::Dense,
        AttentionMode::Sparse { keep_blocks, .. } => StepAttention::Sparse { keep_blocks },
    }
}

/// A model on a backend and evaluation text: swaps parameter values in and
/// out to evaluate variants without rebuilding it.
pub struct Evaluator<'a, B: Backend> {
    pub model: Model<B>,
    ws: Workspace<B>,
    text: &'a Corpus,
    windows: usize,
    base: Vec<Vec<f32>>,
    layout: Layout,
}

/// Where an [`Evaluator`] reads its windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// The first windows in a row ([`crate::data::eval_windows`]).
    First,
    /// Spread evenly over the text (overlapping windows of `seq + 1` at a fixed stride).
    Spread,
    /// The text is whole chunks of `seq + 1` tokens ([`Parts`]): each window is
    /// one chunk, chunks picked evenly ([`pick_even`]).
    Chunks,
}

impl<'a, B: Backend> Evaluator<'a, B> {
    /// `windows` windows of `seq` tokens of `text`, `batch` at a time (`shape = (batch, seq, windows)`).
    pub fn new(
        be: &B,
        cfg: &ModelConfig,
        dtype: DType,
        values: &[Vec<f32>],
        text: &'a Corpus,
        (batch, seq, windows): (usize, usize, usize),
    ) -> Result<Self> {
        let seq = seq.min(cfg.context);
        if text.tokens.len() < batch * seq + 1 {
            return Err(Error::Invalid(format!(
                "evaluation text has {} tokens, fewer than {batch} sequences of {seq}",
                text.tokens.len()
            )));
        }
        let model = Model::from_values(be, *cfg, dtype, values)?;
        let ws = Workspace::new(be, cfg, dtype, batch, seq)?;
        Ok(Evaluator { model, ws, text, windows, base: values.to_vec(), layout: Layout::First })
    }

    /// Reads its windows spread evenly over the whole text (window `i` of `W`
    /// starts at `i·⌊(len − seq − 1)/W⌋`) rather than the first `W` in a row:
    /// consecutive windows cover a few chapters, a sample of one passage.
    pub fn spread(mut self) -> Self {
        self.layout = Layout::Spread;
        self
    }

    /// Reads a text made of whole windows ([`Parts`]: chunks of `seq + 1`
    /// tokens laid end to end): window `i` of `W` is chunk `⌊i·n/W⌋` of the
    /// `n`, so no window crosses the seam between two chunks.
    pub fn chunked(mut self) -> Self {
        self.layout = Layout::Chunks;
        self
    }

    fn window_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let (batch, seq) = (self.ws.batch, self.ws.seq);
        let want = self.windows.max(batch);
        match self.layout {
            Layout::First => return crate::data::eval_windows(self.text, seq, want),
            Layout::Chunks => {
                let n = self.text.tokens.len() / (seq + 1);
                return pick_even(n, want).into_iter().map(|c| c * (seq + 1)..(c + 1) * (seq + 1)).collect();
            }
            Layout::Spread => {}
        }
        let room = self.text.tokens.len().saturating_sub(seq + 1);
        let n = want.min(room / seq.max(1) + 1);
        let stride = room / n.max(1);
        (0..n).map(|i| i * stride..i * stride + seq + 1).collect()
    }

    /// Mean validation loss with `values` (only tensors that differ from the
    /// base are uploaded; the base is restored after).
    pub fn loss(&mut self, be: &B, values: &[Vec<f32>]) -> Result<f64> {
        Ok(mean(&self.window_losses(be, values)?))
    }

    /// The mean loss of each forward batch of windows with `values` (one
    /// entry per window when the evaluator's batch is 1): the units a paired
    /// comparison of two weight sets averages over.
    pub fn window_losses(&mut self, be: &B, values: &[Vec<f32>]) -> Result<Vec<f64>> {
        let changed: Vec<usize> = (0..values.len()).filter(|&i| values[i] != self.base[i]).collect();
        let dtype = self.model.dtype;
        for &i in &changed {
            let shape = self.model.params[i].shape().to_vec();
            self.model.params[i] = Tensor::from_f32(be, &values[i], &shape, dtype)?;
        }
        let r = self.run_windows(be);
        for &i in &changed {
            let shape = self.model.params[i].shape().to_vec();
            self.model.params[i] = Tensor::from_f32(be, &self.base[i], &shape, dtype)?;
        }
        r
    }

    /// The windows of [`crate::train::evaluate`], one loss per batch.
    fn run_windows(&mut self, be: &B) -> Result<Vec<f64>> {
        let (batch, seq) = (self.ws.batch, self.ws.seq);
        let attn = eval_attention(&self.model.cfg);
        let wins = self.window_ranges();
        let mut out = Vec::with_capacity(wins.len() / batch);
        for chunk in wins.chunks_exact(batch) {
            let mut ids = Vec::with_capacity(batch * seq);
            let mut tg = Vec::with_capacity(batch * seq);
            for w in chunk {
                ids.extend(self.text.tokens[w.start..w.end - 1].iter().map(|&b| b as u32));
                tg.extend(self.text.tokens[w.start + 1..w.end].iter().map(|&b| b as u32));
            }
            out.push(self.model.forward(be, &mut self.ws, &ids, Some(&tg), attn)?.loss);
        }
        if out.is_empty() {
            return Err(Error::Invalid(format!("evaluation text too short for {batch} windows of {seq} tokens")));
        }
        Ok(out)
    }

    /// A fingerprint of what this evaluator measures: device, dtype, base
    /// weights and the token windows it reads.
    pub fn fingerprint(&self, be: &B) -> u64 {
        let mut h = Fnv::new();
        h.bytes(be.device_name().as_bytes());
        h.bytes(self.model.dtype.name().as_bytes());
        for v in &self.base {
            h.u64(v.len() as u64);
            for x in v {
                h.u64(x.to_bits() as u64);
            }
        }
        h.u64(self.ws.batch as u64);
        for w in self.window_ranges() {
            h.bytes(&self.text.tokens[w]);
        }
        h.0
    }
}

/// `min(want, n)` indices of `0..n` spread evenly: `⌊i·n/W⌋` for `i < W`
/// (increasing, distinct; the first is 0).
pub fn pick_even(n: usize, want: usize) -> Vec<usize> {
    let w = want.min(n);
    (0..w).map(|i| i * n / w).collect()
}

/// How the evaluation text is cut into the planner's parts ([`Parts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Sensitivity, verification and held-out chunks interleaved round-robin
    /// over the whole text: three samples of the same text (the default).
    Interleaved,
    /// Sensitivity and verification interleaved over the first half, held-out
    /// = the second half: a *distribution-shift* check (the held-out text is
    /// other passages than the ones the plan was fitted and verified on).
    Halves,
}

impl Split {
    pub fn parse(s: &str) -> Result<Split> {
        match s.trim().to_ascii_lowercase().as_str() {
            "interleaved" | "stratified" => Ok(Split::Interleaved),
            "halves" => Ok(Split::Halves),
            _ => Err(Error::Invalid(format!("--split {s}: expected interleaved or halves"))),
        }
    }
}

/// Chunks of `chunk` tokens of a text of `len` tokens (the tail shorter than
/// a chunk is dropped), dealt round-robin to `parts` parts: chunk `c` =
/// `c·chunk..(c+1)·chunk` goes to part `c mod parts`. Every part spans the
/// whole text and no two share a token.
pub fn interleave(len: usize, chunk: usize, parts: usize) -> Vec<Vec<Range<usize>>> {
    let mut out = vec![Vec::new(); parts.max(1)];
    if chunk == 0 {
        return out;
    }
    let n = out.len();
    for c in 0..len / chunk {
        out[c % n].push(c * chunk..(c + 1) * chunk);
    }
    out
}

/// The planner's three disjoint texts cut from one evaluation text, as
/// chunks of one window (`seq + 1` tokens) each: the *sensitivity* part
/// (calibration and every `Δ_i(f)`), the *verification* part (whole plans
/// only) and the *held-out* part (seen by neither: the caller's check).
/// Each part's text is its chunks laid end to end; read it with
/// [`Evaluator::chunked`] so that windows never cross a seam.
#[derive(Clone, Debug)]
pub struct Parts {
    pub sensitivity: Corpus,
    pub verification: Corpus,
    pub held_out: Corpus,
    /// The chunks of each part (sensitivity, verification, held-out) as token ranges of the text.
    pub ranges: [Vec<Range<usize>>; 3],
    /// Tokens per chunk (`seq + 1`).
    pub chunk: usize,
}

impl Parts {
    /// Cuts `text` per `split` into chunks of `seq + 1` tokens. With
    /// [`Split::Halves`] the held-out part is the second half of the text.
    pub fn new(text: &Corpus, seq: usize, split: Split) -> Result<Parts> {
        Self::cut(text, seq, Some(split))
    }

    /// Sensitivity and verification parts only, interleaved over the whole
    /// text (the `compress` command: its held-out text is the user's).
    pub fn without_held_out(text: &Corpus, seq: usize) -> Result<Parts> {
        Self::cut(text, seq, None)
    }

    fn cut(text: &Corpus, seq: usize, split: Option<Split>) -> Result<Parts> {
        let chunk = seq + 1;
        let ranges: [Vec<Range<usize>>; 3] = match split {
            None => {
                let mut p = interleave(text.tokens.len(), chunk, 2).into_iter();
                [p.next().unwrap_or_default(), p.next().unwrap_or_default(), Vec::new()]
            }
            Some(Split::Interleaved) => {
                let mut p = interleave(text.tokens.len(), chunk, 3).into_iter();
                [p.next().unwrap_or_default(), p.next().unwrap_or_default(), p.next().unwrap_or_default()]
            }
            Some(Split::Halves) => {
                let half = text.tokens.len() / 2 / chunk * chunk;
                let mut p = interleave(half, chunk, 2).into_iter();
                let held = interleave(text.tokens.len() - half, chunk, 1).remove(0);
                let held = held.into_iter().map(|r| r.start + half..r.end + half).collect();
                [p.next().unwrap_or_default(), p.next().unwrap_or_default(), held]
            }
        };
        let wanted = if split.is_some() { 3 } else { 2 };
        if let Some(i) = ranges[..wanted].iter().position(|r| r.is_empty()) {
            let what = ["sensitivity", "verification", "held-out"][i];
            return Err(Error::Invalid(format!(
                "evaluation text has {} tokens: too short to give the planner's {what} part one window of {chunk}",
                text.tokens.len()
            )));
        }
        let gather = |rs: &[Range<usize>]| Corpus {
            tokens: rs.iter().flat_map(|r| text.tokens[r.clone()].iter().copied()).collect(),
            ..Default::default()
        };
        Ok(Parts {
            sensitivity: gather(&ranges[0]),
            verification: gather(&ranges[1]),
            held_out: gather(&ranges[2]),
            ranges,
            chunk,
        })
    }

    /// `n` chunks of the sensitivity part picked evenly, end to end: the
    /// calibration text (AWQ, GPTQ, Wanda, SparseGPT), a sample of the whole sensitivity part.
    pub fn calibration(&self, n: usize) -> Corpus {
        let toks = &self.sensitivity.tokens;
        let tokens = pick_even(toks.len() / self.chunk, n)
            .into_iter()
            .flat_map(|c| toks[c * self.chunk..(c + 1) * self.chunk].iter().copied())
            .collect();
        Corpus { tokens, ..Default::default() }
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// FNV-1a, 64 bits: a stable fingerprint for cache keys (not a security hash).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ x as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn u64(&mut self, x: u64) {
        self.bytes(&x.to_le_bytes());
    }
}

/// One-sided 95% normal quantile: the default `z` of the verification bound.
pub const Z_ONE_SIDED_95: f64 = 1.645;

/// A paired comparison over windows: `d_w = new_w − base_w`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Paired {
    /// Mean difference `d̄` (nats).
    pub mean: f64,
    /// Standard error of the mean, `sd(d)/√W` (sample sd, `W − 1` degrees of
    /// freedom; 0 for one window — a single window gives no spread).
    pub se: f64,
    /// Windows `W`.
    pub n: usize,
}

impl Paired {
    /// Errors on a length mismatch or no windows.
    pub fn new(base: &[f64], new: &[f64]) -> Result<Paired> {
        if base.len() != new.len() || base.is_empty() {
            return Err(Error::Invalid(format!(
                "paired comparison: {} base windows vs {} new windows",
                base.len(),
                new.len()
            )));
        }
        let d: Vec<f64> = base.iter().zip(new).map(|(b, n)| n - b).collect();
        let n = d.len();
        let m = mean(&d);
        let se = if n > 1 {
            let var = d.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        } else {
            0.0
        };
        Ok(Paired { mean: m, se, n })
    }

    /// The one-sided upper confidence bound `d̄ + z·s` of the expected increase.
    pub fn upper(&self, z: f64) -> f64 {
        self.mean + z * self.se
    }

    /// The one-sided upper *prediction* bound of the mean increase over `w`
    /// new windows of the same text: `d̄ + z·s·√(1 + W/w)` (the new mean has
    /// variance `sd²/w` besides the `sd²/W` of `d̄`). `w = 0` means an
    /// unbounded text: [`Paired::upper`].
    pub fn predict_upper(&self, z: f64, w: usize) -> f64 {
        if w == 0 {
            return self.upper(z);
        }
        self.mean + z * self.se * (1.0 + self.n as f64 / w as f64).sqrt()
    }
}

/// The planning budget of the next round after a plan whose verification
/// bound `upper` exceeded the budget `budget`; the plan was solved under the
/// planning budget `target`, its sensitivities predicted `predicted` (`Σ Δ`)
/// and the verification measured the mean `mean`.
///
/// The table's own error (noise of each `Δ_i`, the winner's curse of picking
/// the entries that measured low, non-additive interactions) shows as the
/// ratio `r = mean/predicted`; the noise margin is `m = upper − mean`. The
/// next plan should verify at `r·P' + m ≤ budget`, so the planning budget
/// becomes `min(0.9·target, (budget − m)/r)`. Where the ratio says nothing
/// (`predicted` or `mean` ≤ 0) or the margin alone fills the budget it
/// falls back to `target · min(0.9, 0.9·budget/upper)`. Never grows:
/// every failed round cuts at least 10%.
pub fn shrink_target(target: f64, budget: f64, predicted: f64, mean: f64, upper: f64) -> f64 {
    let cut = 0.9 * target;
    if !(upper.is_finite() && mean.is_finite() && predicted.is_finite()) {
        return 0.5 * target;
    }
    let margin = upper - mean;
    if predicted > 0.0 && mean > 0.0 && budget > margin {
        let ratio = mean / predicted;
        return cut.min((budget - margin) / ratio);
    }
    let r = if upper > 0.0 { 0.9 * budget / upper } else { 0.5 };
    target * r.min(0.9)
}

/// How to plan.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Loss budget as a fraction of the uncompressed loss.
    pub budget: f64,
    pub target: Target,
    /// Candidate formats (with their methods) besides keeping the weight dense.
    pub candidates: Vec<Choice>,
    /// Serving batch sizes the costs are measured at.
    pub batches: Vec<usize>,
    /// Verification rounds before falling back to all-dense.
    pub max_rounds: usize,
    /// `z` of the verification's upper bound ([`Z_ONE_SIDED_95`]).
    pub z: f64,
    /// Windows of the unseen text the plan must keep its budget on: the
    /// bound is [`Paired::predict_upper`] for that many windows (0: the
    /// expectation over an unbounded text, [`Paired::upper`]).
    pub predict_windows: usize,
}

impl PlanOptions {
    /// int8 (RTN), int4 g128 and g32 (AWQ's scales + GPTQ's rounding with calibration, else
    /// RTN), 2:4 (SparseGPT with calibration, else magnitude): the most accurate method of each
    /// format (BENCHMARKS.md, "Compression quality").
    pub fn default_candidates(calibrated: bool) -> Vec<Choice> {
        let (int4, sparse) = if calibrated { (Method::Gptq, Method::SparseGpt) } else { (Method::Rtn, Method::Rtn) };
        vec![
            Choice { format: QFormat::Int8, method: Method::Rtn },
            Choice { format: QFormat::Int4 { group: 128, asym: false }, method: int4 },
            Choice { format: QFormat::Int4 { group: 32, asym: false }, method: int4 },
            Choice { format: QFormat::Sparse24 { int8: false }, method: sparse },
        ]
    }
}

/// The measured table: base loss and one [`Row`] per linear weight.
#[derive(Clone, Debug)]
pub struct Table {
    pub base_loss: f64,
    pub rows: Vec<Row>,
}

/// Where measured sensitivities are kept: `plan-sensitivity.json` next to
/// the kernel-cost cache (a [`CostCache`] file of the same shape, keyed
/// `"<fingerprint>|<tensor>|<format>|<method>": Δ`).
pub fn sensitivity_cache_path() -> Option<PathBuf> {
    CostCache::default_path().map(|p| p.with_file_name("plan-sensitivity.json"))
}

/// A fingerprint of calibration statistics (they decide AWQ's scales, GPTQ's rounding and the 2:4 masks).
fn calib_fingerprint(calib: Option<&Calibration>) -> u64 {
    let mut h = Fnv::new();
    let Some(c) = calib else { return h.0 };
    h.u64(c.tokens as u64);
    for layer in &c.inputs {
        for st in layer {
            h.u64(st.rows as u64);
            for x in st.abs_sum.iter().chain(&st.sq_sum) {
                h.u64(x.to_bits());
            }
            for x in &st.sample {
                h.u64(x.to_bits() as u64);
            }
        }
    }
    h.0
}

/// Measures every weight's sensitivity to every candidate (on `eval`'s text:
/// the sensitivity part) and the candidates' costs (on `be`, through
/// `cache`). Sensitivities already in `sens` under the same fingerprint are
/// reused, new ones are added. `progress(i, total)` is called after each weight.
#[allow(clippy::too_many_arguments)]
pub fn measure_table<B: Backend>(
    be: &B,
    eval: &mut Evaluator<'_, B>,
    values: &[Vec<f32>],
    calib: Option<&Calibration>,
    opt: &PlanOptions,
    cache: &mut CostCache,
    sens: &mut CostCache,
    mut progress: impl FnMut(usize, usize),
) -> Result<Table> {
    let cfg = eval.model.cfg;
    let dtype = eval.model.dtype;
    let lins = linears(&cfg);
    let fp = format!("{:016x}{:016x}", eval.fingerprint(be), calib_fingerprint(calib));
    let base_key = format!("{fp}|base");
    let base_loss = match sens.entries.get(&base_key) {
        Some(&v) => v,
        None => {
            let v = eval.loss(be, values)?;
            sens.entries.insert(base_key, v);
            v
        }
    };
    let mut rows = Vec::with_capacity(lins.len());
    for (i, l) in lins.iter().enumerate() {
        let time = |cache: &mut CostCache, f: Option<QFormat>| -> Result<f64> {
            opt.batches.iter().map(|&m| cache.cost(be, dtype, f, l.n, l.k, m)).sum()
        };
        let mut options =
            vec![PlanOption { choice: None, delta: 0.0, us: time(cache, None)?, bytes: l.n * l.k * dtype.size() }];
        for c in &opt.candidates {
            if c.format.check_shape(l.n, l.k).is_err() {
                continue;
            }
            let key = format!("{fp}|{}|{}|{}", l.name, c.format.name(), c.method.name());
            let delta = match sens.entries.get(&key) {
                Some(&d) => d,
                None => {
                    let mut ch = vec![None; lins.len()];
                    ch[i] = Some(*c);
                    let comp = compress(&cfg, values, &ch, calib)?;
                    let d = eval.loss(be, &comp.dequantized())? - base_loss;
                    sens.entries.insert(key, d);
                    d
                }
            };
            options.push(PlanOption {
                choice: Some(*c),
                delta,
                us: time(cache, Some(c.format))?,
                bytes: c.format.bytes(l.n, l.k),
            });
        }
        rows.push(Row { name: l.name.clone(), n: l.n, k: l.k, options });
        progress(i + 1, lins.len());
        if (i + 1) % 6 == 0 {
            sens.save();
        }
    }
    cache.save();
    sens.save();
    Ok(Table { base_loss, rows })
}

/// A verified plan.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Per linear weight (the order of [`linears`]): its row and chosen option.
    pub rows: Vec<(Row, usize)>,
    /// Uncompressed loss on the sensitivity text (the budget's reference).
    pub base_loss: f64,
    /// Budget in nats (fraction × base loss).
    pub budget: f64,
    /// The budget the accepted plan was solved under (≤ `budget`).
    pub planned_budget: f64,
    /// `Σ Δ` of the chosen options (sensitivity text).
    pub predicted: f64,
    /// The whole plan's paired increase on the verification text.
    pub verified: Paired,
    /// Its upper bound ([`Paired::predict_upper`]).
    pub upper: f64,
    /// Verification rounds run.
    pub rounds: usize,
}

impl Plan {
    /// The chosen choices, one per linear weight.
    pub fn choices(&self) -> Vec<Option<Choice>> {
        self.rows.iter().map(|(r, o)| r.options[*o].choice).collect()
    }

    /// The plan as a text table: tensor, shape, format, Δloss, µs, bytes.
    pub fn table(&self) -> String {
        let mut s =
            format!("{:<18} {:>11} {:<20} {:>10} {:>10} {:>10}\n", "tensor", "shape", "format", "Δloss", "µs", "bytes");
        let (mut us, mut bytes) = (0.0, 0usize);
        for (r, o) in &self.rows {
            let op = &r.options[*o];
            let f = op.choice.map_or("keep".to_string(), |c| format!("{} ({})", c.format, c.method.name()));
            s += &format!(
                "{:<18} {:>11} {:<20} {:>+10.5} {:>10.1} {:>10}\n",
                r.name,
                format!("{}x{}", r.n, r.k),
                f,
                op.delta,
                op.us,
                op.bytes
            );
            us += op.us;
            bytes += op.bytes;
        }
        s += &format!(
            "total: {us:.1} µs, {bytes} bytes; Δloss predicted {:+.5} (planned under {:.5}), verified {:+.5} ± {:.5} \
             ({:+.3}%, {} windows), bound {:+.5}, budget {:.5} nats ({} round{})\n",
            self.predicted,
            self.planned_budget,
            self.verified.mean,
            self.verified.se,
            100.0 * self.verified.mean / self.base_loss,
            self.verified.n,
            self.upper,
            self.budget,
            self.rounds,
            if self.rounds == 1 { "" } else { "s" }
        );
        s
    }

    /// JSON for the checkpoint metadata: `[{"tensor", "format", "method", "delta", "us", "bytes"}]`
    /// plus the budget and the verified increase.
    pub fn metadata(&self) -> String {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|(r, o)| {
                let op = &r.options[*o];
                serde_json::json!({
                    "tensor": r.name,
                    "shape": [r.n, r.k],
                    "format": op.choice.map_or("keep".to_string(), |c| c.format.name()),
                    "method": op.choice.map_or("-", |c| c.method.name()),
                    "delta": op.delta,
                    "us": op.us,
                    "bytes": op.bytes,
                })
            })
            .collect();
        serde_json::json!({
            "base_loss": self.base_loss,
            "budget": self.budget,
            "planned_budget": self.planned_budget,
            "predicted": self.predicted,
            "verified": self.verified.mean,
            "verified_se": self.verified.se,
            "verified_windows": self.verified.n,
            "upper": self.upper,
            "tensors": rows,
        })
        .to_string()
    }
}

/// Solves `table` under `opt.budget` (fraction of the base loss),
/// compresses, and verifies on `verify`'s text (not the sensitivity text),
/// re-solving under a shrunk planning budget while the verification bound
/// exceeds the budget (module docs). Returns the plan and its compression.
pub fn choose_and_verify<B: Backend>(
    be: &B,
    verify: &mut Evaluator<'_, B>,
    values: &[Vec<f32>],
    calib: Option<&Calibration>,
    table: &Table,
    opt: &PlanOptions,
) -> Result<(Plan, Compressed)> {
    check_budget(opt.budget)?;
    let cfg = verify.model.cfg;
    let budget = opt.budget * table.base_loss;
    let base_windows = verify.window_losses(be, values)?;
    let mut target_budget = budget;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let last = rounds > opt.max_rounds.max(1);
        let pick = if last {
            vec![0; table.rows.len()] // option 0 is "keep"
        } else {
            solve(&table.rows, target_budget, opt.target)?
        };
        let choices: Vec<Option<Choice>> = table.rows.iter().zip(&pick).map(|(r, &o)| r.options[o].choice).collect();
        let comp = compress(&cfg, values, &choices, calib)?;
        let verified = Paired::new(&base_windows, &verify.window_losses(be, &comp.dequantized())?)?;
        let upper = verified.predict_upper(opt.z, opt.predict_windows);
        let predicted: f64 = table.rows.iter().zip(&pick).map(|(r, &o)| r.options[o].delta.max(0.0)).sum();
        if upper <= budget || last {
            let rows = table.rows.iter().cloned().zip(pick).collect();
            let planned_budget = if last { 0.0 } else { target_budget };
            let plan =
                Plan { rows, base_loss: table.base_loss, budget, planned_budget, predicted, verified, upper, rounds };
            return Ok((plan, comp));
        }
        target_budget = shrink_target(target_budget, budget, predicted, verified.mean, upper);
    }
}
