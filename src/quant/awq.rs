//! Activation-aware weight quantization (AWQ, Lin et al. 2023) and the
//! model-level compression entry point.
//!
//! A linear `y = X·W` (dense `W: [k, n]`) equals `(X·diag(1/s))·(diag(s)·W)`
//! for any positive per-input-channel scales `s`. Quantizing `diag(s)·W`
//! instead of `W` gives channels with large activations (large `s`) finer
//! steps relative to their weights, at the cost of the others. AWQ searches
//! `s = mean|X|^α` over a grid of `α ∈ [0, 1]` (normalised so that
//! `√(max s · min s) = 1`), minimising the output error
//! `‖X·(Ŵ − W)‖²` with `Ŵ = diag(1/s)·deq(Q(diag(s)·W))` on the calibration
//! sample; `α = 0` is round-to-nearest, so the search never does worse than RTN
//! on that sample. The stored weight is `Q(diag(s)·W)` in the contract's
//! format, and `diag(1/s)` is folded into the op before the linear, in f32:
//! - wq, wk, wv read LayerNorm 1: `γ₁ ← γ₁/s`, `β₁ ← β₁/s` (one `s` for the
//!   three, searched on their summed error; a sparse model's indexer
//!   projections also read LayerNorm 1, so their rows are multiplied by `s`);
//! - wo reads the attention output, which is linear in V: wv's output column
//!   `c` is divided by `s_c` (with grouped KV heads, `s` is shared by the query
//!   heads of one KV head, from their averaged statistics);
//! - w1 reads LayerNorm 2: `γ₂ ← γ₂/s`, `β₂ ← β₂/s`;
//! - w2 reads `GELU(h)`, and `GELU(h/s) ≠ GELU(h)/s`: no exact fold exists
//!   without an extra per-channel multiply that the format does not carry, so
//!   w2 gets no scales whatever the method (α = 0), only the clipping below.
//!
//! **Objective on every calibration row.** The errors are quadratic forms in
//! the input's Gram matrix `H = XᵀX` (`‖X·D‖² = Σ_j d_jᵀ H d_j`), computed in
//! f64 once per input from all of the calibration sample's rows
//! ([`crate::quant::calib::CalibOptions::sample_rows`], 4096 by default: 32
//! windows × 128 tokens, i.e. every row), so the search costs `O(n·k²)` per
//! grid point whatever the number of rows.
//!
//! **Weight clipping** (AWQ's `auto_clip`), int4 only, after the scales are
//! folded: per output row and group, the scaled weight is clamped to
//! `±c·max|w_g|` before quantizing, `c` from [`CLIP_GRID`] (1.0 = no clip,
//! down to 0.5), choosing the `c` that minimises the group's output error
//! `‖X_g·diag(1/s_g)·(Q(clamp(w_g)) − w_g)‖²` (`d_gᵀ H_gg d_g`). As in the
//! paper's code, wq and wk are not clipped (their outputs go through the
//! attention scores, which the local error does not see); wv, wo, w1 and w2
//! are. Round to nearest (`Method::Rtn`) is plain: no scales, no clipping.

use crate::error::{Error, Result};
use crate::model::{AttentionMode, ModelConfig};
use crate::quant::calib::{Calibration, Input, Linear, linears};
use crate::quant::{QFormat, QMatrix, transpose};

/// Grid points of α in `[0, 1]` (α = i / ALPHA_STEPS).
pub const ALPHA_STEPS: usize = 10;

/// Clipping ratios tried per output row and group (1.0 = no clipping).
pub const CLIP_GRID: [f32; 11] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5];

/// What [`compress_with`] searches for `Method::Awq` weights.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqOptions {
    /// α grid of the scale search (`[0.0]`: no scales).
    pub alphas: Vec<f32>,
    /// Run the clipping search on int4 weights (not wq/wk).
    pub clip: bool,
}

impl Default for AwqOptions {
    fn default() -> Self {
        AwqOptions { alphas: (0..=ALPHA_STEPS).map(|i| i as f32 / ALPHA_STEPS as f32).collect(), clip: true }
    }
}

/// How a weight is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// Round to nearest (int8/int4) or magnitude (2:4).
    Rtn,
    /// Activation-aware scales (int8, int4).
    Awq,
    /// AWQ's scales, then GPTQ's error-compensating rounding instead of the
    /// clipping search (int8, int4; [`crate::quant::gptq`]).
    Gptq,
    /// 2:4 keeping the largest `|W|·‖X‖` (2:4 only).
    Wanda,
    /// SparseGPT's 2:4 pruning with error compensation (2:4 only; [`crate::quant::gptq::prune24`]).
    SparseGpt,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Awq => "awq",
            Method::Gptq => "gptq",
            Method::Wanda => "wanda",
            Method::SparseGpt => "sparsegpt",
        }
    }

    /// `rtn` (also spelled `magnitude`), `awq`, `gptq`, `wanda`, `sparsegpt`.
    pub fn parse(s: &str) -> Result<Method> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rtn" | "magnitude" => Ok(Method::Rtn),
            "awq" => Ok(Method::Awq),
            "gptq" => Ok(Method::Gptq),
            "wanda" => Ok(Method::Wanda),
            "sparsegpt" => Ok(Method::SparseGpt),
            _ => Err(Error::Invalid(format!(
                "unknown compression method `{s}`: expected rtn, awq, gptq, wanda or sparsegpt"
            ))),
        }
    }
}

/// One weight's format and method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Choice {
    pub format: QFormat,
    pub method: Method,
}

impl Choice {
    /// Checks that the method fits the format.
    pub fn check(&self) -> Result<()> {
        match (self.method, self.format) {
            (Method::Awq | Method::Gptq, QFormat::Sparse24 { .. }) => Err(Error::Invalid(format!(
                "{} quantizes int8/int4 weights; 2:4 takes rtn (magnitude) or wanda",
                self.method.name()
            ))),
            (Method::Wanda | Method::SparseGpt, QFormat::Int8 | QFormat::Int4 { .. }) => {
                Err(Error::Invalid(format!("{} prunes to 2:4, not {}", self.method.name(), self.format)))
            }
            _ => Ok(()),
        }
    }
}

/// AWQ scales `s_p = max(m_p, ε)^α / √(max · min)` for channel statistics `m`.
pub fn scales(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = mean_abs.iter().map(|&m| m.max(1e-6).powf(alpha)).collect();
    let (lo, hi) = s.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let norm = (lo * hi).sqrt();
    s.into_iter().map(|x| x / norm).collect()
}

/// The `[n, k]` quantized form of dense `w: [k, n]` with its input channels scaled by `s`.
fn quantize_scaled(w: &[f32], k: usize, n: usize, s: &[f32], format: QFormat) -> Result<QMatrix> {
    let mut t = transpose(w, k, n);
    for row in t.chunks_exact_mut(k) {
        for (x, &sp) in row.iter_mut().zip(s) {
            *x *= sp;
        }
    }
    QMatrix::quantize(&t, n, k, format)
}

/// `H = XᵀX` (`[k, k]`, f64) of the sample `x: [rows, k]`.
pub fn gram(x: &[f32], k: usize) -> Vec<f64> {
    use rayon::prelude::*;
    let rows = x.len() / k.max(1);
    // Channel-major copy: H[i][j] is the dot product of channels i and j.
    let mut xt = vec![0.0f64; k * rows];
    for (r, row) in x.chunks_exact(k).enumerate() {
        for (p, &v) in row.iter().enumerate() {
            xt[p * rows + r] = v as f64;
        }
    }
    let upper: Vec<Vec<f64>> = (0..k)
        .into_par_iter()
        .map(|i| {
            let a = &xt[i * rows..(i + 1) * rows];
            (i..k).map(|j| a.iter().zip(&xt[j * rows..(j + 1) * rows]).map(|(u, v)| u * v).sum()).collect()
        })
        .collect();
    let mut h = vec![0.0f64; k * k];
    for (i, u) in upper.iter().enumerate() {
        for (o, &v) in u.iter().enumerate() {
            h[i * k + i + o] = v;
            h[(i + o) * k + i] = v;
        }
    }
    h
}

/// `dᵀ H d` over the channels `lo..lo + d.len()` of `h: [k, k]`.
fn quad(h: &[f64], k: usize, lo: usize, d: &[f64]) -> f64 {
    d.iter()
        .enumerate()
        .map(|(a, &da)| {
            let hr = &h[(lo + a) * k + lo..(lo + a) * k + lo + d.len()];
            da * hr.iter().zip(d).map(|(x, y)| x * y).sum::<f64>()
        })
        .sum()
}

/// `Σ_j d_jᵀ H d_j` for the rows of `d: [n, k]` (summed in row order: deterministic).
fn rows_error(h: &[f64], k: usize, d: &[f32]) -> f64 {
    use rayon::prelude::*;
    let per: Vec<f64> =
        d.par_chunks_exact(k).map(|r| quad(h, k, 0, &r.iter().map(|&v| v as f64).collect::<Vec<_>>())).collect();
    per.iter().sum()
}

/// `Σ_i Σ_j (Σ_p X[i][p] · (ŵ[j][p]/s_p − w[j][p]))²`: the output error of the
/// scaled quantization on the sample `x: [rows, k]` (`w` dense `[k, n]`).
pub fn output_error(x: &[f32], k: usize, w: &[f32], n: usize, s: &[f32], format: QFormat) -> Result<f64> {
    output_error_gram(&gram(x, k), k, w, n, s, format)
}

/// [`output_error`] from the sample's Gram matrix `h = XᵀX`.
pub fn output_error_gram(h: &[f64], k: usize, w: &[f32], n: usize, s: &[f32], format: QFormat) -> Result<f64> {
    let q = quantize_scaled(w, k, n, s, format)?;
    let mut d = q.dequantize();
    let wt = transpose(w, k, n);
    for (dr, wr) in d.chunks_exact_mut(k).zip(wt.chunks_exact(k)) {
        for ((dv, &wv), &sp) in dr.iter_mut().zip(wr).zip(s) {
            *dv = *dv / sp - wv;
        }
    }
    Ok(rows_error(h, k, &d))
}

/// What the clipping search did to one weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Clip {
    /// Chosen ratio per output row and group, `[n, k / group]`.
    pub ratios: Vec<f32>,
    /// Summed per-group output error without clipping and with the chosen ratios.
    pub err_noclip: f64,
    pub err: f64,
}

/// AWQ's clipping search on the scaled weight `t: [n, k]` (rows = outputs,
/// the scales `s` already applied: `t[j][p] = s_p·W[p][j]`) for an int4
/// format: per row and group, clamps the group to `±c·max|t_g|` with the
/// `c` of [`CLIP_GRID`] that minimises `d_gᵀ H_gg d_g`, `d = (Q(clamp(t_g)) −
/// t_g) / s_g`, `h = XᵀX` of the unscaled input. `t` is clamped in place, so
/// that `QMatrix::quantize(t)` stores the clipped codes. Ratio 1.0 leaves the
/// group bit for bit as it was; ties keep the larger ratio.
pub fn clip_search(h: &[f64], k: usize, t: &mut [f32], n: usize, s: &[f32], format: QFormat) -> Result<Clip> {
    use rayon::prelude::*;
    let QFormat::Int4 { group, asym } = format else {
        return Err(Error::Invalid(format!("awq: the clipping search is for int4, not {format}")));
    };
    format.check_shape(n, k)?;
    if t.len() != n * k || s.len() != k || h.len() != k * k {
        return Err(Error::Shape(format!(
            "awq clip: weight {} / scales {} / gram {} for [{n}, {k}]",
            t.len(),
            s.len(),
            h.len()
        )));
    }
    let gf = QFormat::Int4 { group, asym };
    let per_row: Vec<Result<(Vec<f32>, f64, f64)>> = t
        .par_chunks_exact_mut(k)
        .map(|row| {
            let mut ratios = Vec::with_capacity(k / group);
            let (mut e0, mut e1) = (0.0, 0.0);
            for (g, chunk) in row.chunks_exact_mut(group).enumerate() {
                let lo = g * group;
                let amax = chunk.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
                let mut best: Option<(f32, f64, Vec<f32>)> = None;
                for &c in &CLIP_GRID {
                    let bound = c * amax;
                    let clamped: Vec<f32> =
                        if c == 1.0 { chunk.to_vec() } else { chunk.iter().map(|&x| x.clamp(-bound, bound)).collect() };
                    let deq = QMatrix::quantize(&clamped, 1, group, gf)?.dequantize();
                    let d: Vec<f64> = deq
                        .iter()
                        .zip(chunk.iter())
                        .zip(&s[lo..lo + group])
                        .map(|((&q, &w), &sp)| ((q - w) / sp) as f64)
                        .collect();
                    let e = quad(h, k, lo, &d);
                    if c == 1.0 {
                        e0 += e;
                    }
                    if best.as_ref().is_none_or(|b| e < b.1) {
                        best = Some((c, e, clamped));
                    }
                }
                let (c, e, clamped) = best.expect("the grid is not empty");
                e1 += e;
                ratios.push(c);
                chunk.copy_from_slice(&clamped);
            }
            Ok((ratios, e0, e1))
        })
        .collect();
    let mut out = Clip { ratios: Vec::with_capacity(n * k / group), err_noclip: 0.0, err: 0.0 };
    for r in per_row {
        let (ratios, e0, e1) = r?;
        out.ratios.extend(ratios);
        out.err_noclip += e0;
        out.err += e1;
    }
    Ok(out)
}

/// What the search found for one group of linears sharing an input.
#[derive(Clone, Debug, PartialEq)]
pub struct Search {
    pub alpha: f32,
    pub scales: Vec<f32>,
    /// Output error at α = 0 (round to nearest) and at the chosen α.
    pub err_rtn: f64,
    pub err: f64,
}

/// Grid search of α for weights `ws` (dense `[k, n_i]`, each quantized to its
/// own format: the planner may give the weights of one input different ones)
/// that read the same input with sample `x: [rows, k]` and statistics
/// `mean_abs`; the error minimised is the sum of their output errors.
pub fn search(x: &[f32], k: usize, mean_abs: &[f32], ws: &[(&[f32], usize, QFormat)]) -> Result<Search> {
    if mean_abs.len() != k || !x.len().is_multiple_of(k) || x.is_empty() {
        return Err(Error::Shape(format!(
            "awq: a sample of {} values and {} channel statistics for k = {k}",
            x.len(),
            mean_abs.len()
        )));
    }
    search_gram(&gram(x, k), k, mean_abs, ws, &AwqOptions::default().alphas)
}

/// [`search`] from the sample's Gram matrix over the grid `alphas`
/// (`alphas[0]` should be 0: `err_rtn` is the error at the first point).
pub fn search_gram(
    h: &[f64],
    k: usize,
    mean_abs: &[f32],
    ws: &[(&[f32], usize, QFormat)],
    alphas: &[f32],
) -> Result<Search> {
    if mean_abs.len() != k || h.len() != k * k || alphas.is_empty() {
        return Err(Error::Shape(format!(
            "awq: a Gram matrix of {} values, {} channel statistics and {} grid points for k = {k}",
            h.len(),
            mean_abs.len(),
            alphas.len()
        )));
    }
    let mut best: Option<Search> = None;
    let mut err_rtn = f64::NAN;
    for (i, &alpha) in alphas.iter().enumerate() {
        let s = scales(mean_abs, alpha);
        let mut err = 0.0;
        for &(w, n, format) in ws {
            err += output_error_gram(h, k, w, n, &s, format)?;
        }
        if i == 0 {
            err_rtn = err;
        }
        if best.as_ref().is_none_or(|b| err < b.err) {
            best = Some(Search { alpha, scales: s, err_rtn, err });
        }
    }
    let mut b = best.expect("the grid is not empty");
    b.err_rtn = err_rtn;
    Ok(b)
}

/// Multiplies input channel `p` of dense `w: [k, n]` by `s_p` (row `p`).
fn scale_rows(w: &mut [f32], n: usize, s: &[f32]) {
    for (row, &sp) in w.chunks_exact_mut(n).zip(s) {
        row.iter_mut().for_each(|x| *x *= sp);
    }
}

/// Folds per-channel scales `s` of layer `layer`'s input `input` into f32
/// parameter `values`: the linears reading that input get `diag(s)·W`, the op
/// before them `· 1/s` (see the module docs), so the model computes the same
/// function (up to f32 rounding). `Input::Act` has no exact fold: an error.
pub fn fold_scales(cfg: &ModelConfig, values: &mut [Vec<f32>], layer: usize, input: Input, s: &[f32]) -> Result<()> {
    let names: Vec<String> = cfg.params().into_iter().map(|p| p.name).collect();
    let at = |n: &str| {
        let full = format!("layers.{layer}.{n}");
        names.iter().position(|x| *x == full).ok_or_else(|| Error::Invalid(format!("awq: no parameter {full}")))
    };
    let div = |v: &mut [f32], s: &[f32]| v.iter_mut().zip(s).for_each(|(x, &sp)| *x /= sp);
    match input {
        Input::Ln1 | Input::Ln2 => {
            if s.len() != cfg.d_model {
                return Err(Error::Shape(format!("awq: {} scales for d_model {}", s.len(), cfg.d_model)));
            }
            let (g, b, ws): (_, _, Vec<&str>) = if input == Input::Ln1 {
                let mut ws = vec!["wq", "wk", "wv"];
                if let AttentionMode::Sparse { .. } = cfg.attention {
                    ws.extend(["idx.wq", "idx.wk", "idx.ww"]);
                }
                ("ln1.gamma", "ln1.beta", ws)
            } else {
                ("ln2.gamma", "ln2.beta", vec!["w1"])
            };
            div(&mut values[at(g)?], s);
            div(&mut values[at(b)?], s);
            for w in ws {
                let i = at(w)?;
                let n = values[i].len() / cfg.d_model;
                scale_rows(&mut values[i], n, s);
            }
        }
        Input::Att => {
            let (h, kv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim());
            if s.len() != h * hd {
                return Err(Error::Shape(format!("awq: {} scales for an attention output of {}", s.len(), h * hd)));
            }
            let group = h / kv;
            for q in 0..h {
                if s[q * hd..(q + 1) * hd] != s[(q / group) * group * hd..((q / group) * group + 1) * hd] {
                    return Err(Error::Invalid("awq: wo scales differ between query heads of one KV head".into()));
                }
            }
            // Column (kvh, d) of V feeds column (q, d) of the attention output for
            // every query head q of that KV head.
            let sv: Vec<f32> = (0..kv * hd).map(|c| s[(c / hd) * group * hd + c % hd]).collect();
            let wv = at("wv")?;
            for row in values[wv].chunks_exact_mut(kv * hd) {
                div(row, &sv);
            }
            let wo = at("wo")?;
            scale_rows(&mut values[wo], cfg.d_model, s);
        }
        Input::Act => {
            return Err(Error::Invalid("awq: GELU is not homogeneous; w2's input scales cannot be folded".into()));
        }
    }
    Ok(())
}

/// A compressed model: f32 values with the AWQ scales folded in (the
/// compressed weights' entries hold `diag(s)·W`, which their `QMatrix`
/// quantizes), and one `QMatrix` per parameter that is compressed.
#[derive(Clone, Debug)]
pub struct Compressed {
    pub values: Vec<Vec<f32>>,
    pub weights: Vec<Option<QMatrix>>,
    /// Per AWQ group: (its first weight's name, α, RTN error, AWQ error) on the sample.
    pub awq: Vec<(String, f32, f64, f64)>,
    /// Per clipped weight: (name, summed group error without clipping, with the chosen ratios).
    pub clip: Vec<(String, f64, f64)>,
    /// Per GPTQ (SparseGPT) weight: (name, output error of round to nearest (magnitude pruning),
    /// of GPTQ's rounding (SparseGPT's pruning)) on the calibration rows, after the scales (the
    /// smaller is stored).
    pub gptq: Vec<(String, f64, f64)>,
}

impl Compressed {
    /// The f32 values the compressed model computes with: each compressed
    /// weight replaced by its dequantization (the reference semantics).
    pub fn dequantized(&self) -> Vec<Vec<f32>> {
        let mut v = self.values.clone();
        for (i, q) in self.weights.iter().enumerate() {
            if let Some(q) = q {
                v[i] = transpose(&q.dequantize(), q.n, q.k);
            }
        }
        v
    }

    /// Bytes of the compressed weights, and of the same weights as f32.
    pub fn weight_bytes(&self) -> (usize, usize) {
        self.weights.iter().flatten().fold((0, 0), |(a, b), q| (a + q.bytes(), b + 4 * q.n * q.k))
    }
}

/// Compresses `values` (one f32 vector per `cfg.params()` entry): `choices`
/// has one entry per [`linears`]`(cfg)` (`None`: stays dense). AWQ and Wanda
/// need `calib`. AWQ runs per input group in the order wo (folded into wv),
/// then wq/wk/wv (one `s` searched on the members that chose AWQ and applied
/// to all three), then w1; w2 takes no scales (module docs); then the int4
/// AWQ weights but wq/wk get the clipping search. [`AwqOptions::default`].
pub fn compress(
    cfg: &ModelConfig,
    values: &[Vec<f32>],
    choices: &[Option<Choice>],
    calib: Option<&Calibration>,
) -> Result<Compressed> {
    compress_with(cfg, values, choices, calib, &AwqOptions::default())
}

/// [`compress`] with the AWQ search's grid and clipping switch: with
/// `alphas = [0.0]` and `clip = false`, `Method::Awq` is round to nearest bit
/// for bit.
pub fn compress_with(
    cfg: &ModelConfig,
    values: &[Vec<f32>],
    choices: &[Option<Choice>],
    calib: Option<&Calibration>,
    opt: &AwqOptions,
) -> Result<Compressed> {
    let lins = linears(cfg);
    if choices.len() != lins.len() {
        return Err(Error::Invalid(format!("compress: {} choices for {} linear weights", choices.len(), lins.len())));
    }
    if values.len() != cfg.params().len() {
        return Err(Error::Invalid(format!(
            "compress: {} tensors for {} parameters",
            values.len(),
            cfg.params().len()
        )));
    }
    for c in choices.iter().flatten() {
        c.check()?;
    }
    let need_calib = choices.iter().flatten().any(|c| c.method != Method::Rtn);
    let calib = match calib {
        Some(c) if c.inputs.len() == cfg.n_layers => Some(c),
        Some(c) => {
            return Err(Error::Invalid(format!(
                "compress: calibration of {} layers for a model of {}",
                c.inputs.len(),
                cfg.n_layers
            )));
        }
        None if need_calib => {
            return Err(Error::Invalid(
                "compress: every method but rtn (magnitude) needs calibration statistics".into(),
            ));
        }
        None => None,
    };
    let mut values = values.to_vec();
    let mut awq = Vec::new();
    let mut clip = Vec::new();
    // Gram matrices of the inputs (layer, input), computed once each.
    let mut grams: std::collections::HashMap<(usize, usize), Vec<f64>> = Default::default();
    let mut gram_of = |cal: &Calibration, layer: usize, input: Input| -> Result<Vec<f64>> {
        let st = cal.input(layer, input);
        if st.sample.is_empty() || !st.sample.len().is_multiple_of(st.k) {
            return Err(Error::Invalid(format!("awq: no calibration sample for layer {layer}'s {input:?} input")));
        }
        Ok(grams.entry((layer, input as usize)).or_insert_with(|| gram(&st.sample, st.k)).clone())
    };
    // The scales folded per (layer, input), for the clipping search.
    let mut folded: std::collections::HashMap<(usize, usize), Vec<f32>> = Default::default();
    // AWQ first: folding changes wv (from wo's scales), so every fold happens before any quantization.
    if let Some(cal) = calib.filter(|_| opt.alphas.iter().any(|&a| a != 0.0)) {
        for layer in 0..cfg.n_layers {
            for input in [Input::Att, Input::Ln1, Input::Ln2] {
                let members: Vec<(usize, &Linear)> =
                    lins.iter().enumerate().filter(|(_, l)| l.layer == layer && l.input == input).collect();
                let awq_members: Vec<&(usize, &Linear)> = members
                    .iter()
                    .filter(|(i, _)| choices[*i].is_some_and(|c| matches!(c.method, Method::Awq | Method::Gptq)))
                    .collect();
                if awq_members.is_empty() {
                    continue;
                }
                let mut m = cal.input(layer, input).mean_abs();
                if input == Input::Att {
                    tie_kv_groups(cfg, &mut m);
                }
                let ws: Vec<(&[f32], usize, QFormat)> = awq_members
                    .iter()
                    .map(|(i, l)| (&values[l.param][..], l.n, choices[*i].expect("filtered").format))
                    .collect();
                let k = members[0].1.k;
                let h = gram_of(cal, layer, input)?;
                let found = search_gram(&h, k, &m, &ws, &opt.alphas)?;
                fold_scales(cfg, &mut values, layer, input, &found.scales)?;
                awq.push((members[0].1.name.clone(), found.alpha, found.err_rtn, found.err));
                folded.insert((layer, input as usize), found.scales);
            }
        }
    }
    // Then the clipping search on the folded (scaled) int4 AWQ weights.
    if let Some(cal) = calib.filter(|_| opt.clip) {
        for (l, c) in lins.iter().zip(choices) {
            let Some(c) = c else { continue };
            let skip = l.name.ends_with(".wq") || l.name.ends_with(".wk");
            if c.method != Method::Awq || !matches!(c.format, QFormat::Int4 { .. }) || skip {
                continue;
            }
            let h = gram_of(cal, l.layer, l.input)?;
            let ones = vec![1.0; l.k];
            let s = folded.get(&(l.layer, l.input as usize)).unwrap_or(&ones);
            let mut t = transpose(&values[l.param], l.k, l.n);
            let found = clip_search(&h, l.k, &mut t, l.n, s, c.format)?;
            values[l.param] = transpose(&t, l.n, l.k);
            clip.push((l.name.clone(), found.err_noclip, found.err));
        }
    }
    let mut weights = vec![None; values.len()];
    let mut gptq = Vec::new();
    // GPTQ's factor per (layer, input), of the Gram matrix of the scaled input.
    let mut factors: std::collections::HashMap<(usize, usize), (Vec<f64>, Vec<f64>)> = Default::default();
    for (l, c) in lins.iter().zip(choices) {
        let Some(c) = c else { continue };
        let wt = transpose(&values[l.param], l.k, l.n);
        let q = match (c.method, c.format) {
            (Method::Wanda, f) => {
                let norms = calib.expect("checked above").input(l.layer, l.input).norms();
                crate::quant::prune::wanda(&wt, l.n, l.k, &norms, f)?
            }
            (Method::Gptq | Method::SparseGpt, f) => {
                let key = (l.layer, l.input as usize);
                if let std::collections::hash_map::Entry::Vacant(e) = factors.entry(key) {
                    let h = gram_of(calib.expect("checked above"), l.layer, l.input)?;
                    let ones = vec![1.0; l.k];
                    let s = folded.get(&key).unwrap_or(&ones);
                    let k = l.k;
                    // The scaled weight diag(s)·W reads X·diag(1/s): its Gram matrix.
                    let hs: Vec<f64> = (0..k * k).map(|i| h[i] / (s[i / k] as f64 * s[i % k] as f64)).collect();
                    let u = crate::quant::gptq::inverse_factor(&hs, k)?;
                    e.insert((hs, u));
                }
                let (hs, u) = &factors[&key];
                let g = if c.method == Method::Gptq {
                    crate::quant::gptq::quantize(u, &wt, l.n, l.k, f)?
                } else {
                    crate::quant::gptq::prune24(u, &wt, l.n, l.k, f)?
                };
                let r = QMatrix::quantize(&wt, l.n, l.k, f)?;
                let err = |q: &QMatrix| {
                    let mut d = q.dequantize();
                    d.iter_mut().zip(&wt).for_each(|(x, &w)| *x -= w);
                    rows_error(hs, l.k, &d)
                };
                let (e_rtn, e_gptq) = (err(&r), err(&g));
                gptq.push((l.name.clone(), e_rtn, e_gptq));
                if e_gptq <= e_rtn { g } else { r }
            }
            (_, f) => QMatrix::quantize(&wt, l.n, l.k, f)?,
        };
        weights[l.param] = Some(q);
    }
    Ok(Compressed { values, weights, awq, clip, gptq })
}

/// Averages attention-output statistics over the query heads of each KV head
/// (they must share one scale: see [`fold_scales`]).
fn tie_kv_groups(cfg: &ModelConfig, m: &mut [f32]) {
    let (h, kv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim());
    let group = h / kv;
    if group <= 1 {
        return;
    }
    for g in 0..kv {
        for d in 0..hd {
            let mean = (0..group).map(|q| m[(g * group + q) * hd + d]).sum::<f32>() / group as f32;
            for q in 0..group {
                m[(g * group + q) * hd + d] = mean;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Gram form of the output error equals the error summed over the sample rows directly.
    #[test]
    fn gram_error_equals_the_row_by_row_error() {
        let (k, n, rows) = (32, 5, 40);
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 97) as f32 - 48.0) / 17.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 104729 % 89) as f32 - 44.0) / 31.0).collect();
        let s: Vec<f32> = (0..k).map(|p| 0.5 + (p % 5) as f32 * 0.3).collect();
        let f = QFormat::Int4 { group: 32, asym: false };
        let d = {
            let mut d = quantize_scaled(&w, k, n, &s, f).unwrap().dequantize();
            let wt = transpose(&w, k, n);
            for ((dv, &wv), p) in d.iter_mut().zip(&wt).zip(0..) {
                *dv = *dv / s[p % k] - wv;
            }
            d
        };
        let direct: f64 = x
            .chunks_exact(k)
            .map(|xr| {
                d.chunks_exact(k)
                    .map(|dr| xr.iter().zip(dr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>().powi(2))
                    .sum::<f64>()
            })
            .sum();
        let via = output_error(&x, k, &w, n, &s, f).unwrap();
        assert!(direct > 0.0 && ((via - direct) / direct).abs() < 1e-9, "{via} vs {direct}");
        let h = gram(&x, k);
        for i in 0..k {
            for j in 0..k {
                assert_eq!(h[i * k + j], h[j * k + i]);
            }
        }
    }
}
