//! Calibration: the model's forward pass over calibration text on the chosen
//! backend, collecting per linear weight the statistics of its inputs `X`
//! (`rows × k`): per input channel `Σ|X_p|` and `Σ X_p²` (Wanda's `‖X_p‖`,
//! AWQ's `mean|X_p|`) and a bounded, evenly strided sample of input rows
//! (AWQ's reconstruction error is measured on it).

use crate::data::{Corpus, eval_windows};
use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig, StepAttention, Workspace};
use crate::{Backend, DType};

/// Which activation feeds a linear weight (the order of
/// [`Workspace::linear_inputs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// LayerNorm 1's output (wq, wk, wv).
    Ln1,
    /// The attention output (wo).
    Att,
    /// LayerNorm 2's output (w1).
    Ln2,
    /// GELU's output (w2).
    Act,
}

/// One compressible linear weight of a model: dense `[k, n]` (`k` inputs,
/// `n` outputs) at `param` in `cfg.params()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linear {
    pub name: String,
    pub param: usize,
    pub layer: usize,
    pub input: Input,
    pub k: usize,
    pub n: usize,
}

/// The compressible linear weights of `cfg`, layer by layer: wq, wk, wv, wo,
/// w1, w2. The embedding (tied to the LM head) and the sparse-attention
/// indexers stay dense.
pub fn linears(cfg: &ModelConfig) -> Vec<Linear> {
    let mut out = Vec::new();
    for (i, p) in cfg.params().into_iter().enumerate() {
        let Some(rest) = p.name.strip_prefix("layers.") else { continue };
        let Some((l, w)) = rest.split_once('.') else { continue };
        let input = match w {
            "wq" | "wk" | "wv" => Input::Ln1,
            "wo" => Input::Att,
            "w1" => Input::Ln2,
            "w2" => Input::Act,
            _ => continue,
        };
        let layer = l.parse().expect("parameter names carry their layer");
        out.push(Linear { name: p.name, param: i, layer, input, k: p.shape[0], n: p.shape[1] });
    }
    out
}

/// Input statistics of one activation (shared by the linears it feeds).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InputStats {
    /// Channels (`k`).
    pub k: usize,
    /// Rows seen.
    pub rows: usize,
    /// `Σ_rows |X_p|` per channel.
    pub abs_sum: Vec<f64>,
    /// `Σ_rows X_p²` per channel.
    pub sq_sum: Vec<f64>,
    /// Sampled rows, row-major `[sample_rows, k]`.
    pub sample: Vec<f32>,
}

impl InputStats {
    fn new(k: usize) -> Self {
        InputStats { k, rows: 0, abs_sum: vec![0.0; k], sq_sum: vec![0.0; k], sample: Vec::new() }
    }

    /// `mean|X_p|` per channel.
    pub fn mean_abs(&self) -> Vec<f32> {
        self.abs_sum.iter().map(|&s| (s / self.rows.max(1) as f64) as f32).collect()
    }

    /// `‖X_p‖₂` per channel (over every row seen).
    pub fn norms(&self) -> Vec<f32> {
        self.sq_sum.iter().map(|&s| s.sqrt() as f32).collect()
    }

    /// Rows in the sample.
    pub fn sample_rows(&self) -> usize {
        self.sample.len() / self.k.max(1)
    }
}

/// Statistics of every layer's four linear inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// `[layer][Input as usize]`.
    pub inputs: Vec<[InputStats; 4]>,
    /// Tokens the forward passes ran over.
    pub tokens: usize,
}

impl Calibration {
    pub fn input(&self, layer: usize, input: Input) -> &InputStats {
        &self.inputs[layer][input as usize]
    }
}

/// How much calibration to run.
#[derive(Clone, Copy, Debug)]
pub struct CalibOptions {
    /// Sequences per forward pass and tokens per sequence.
    pub batch: usize,
    pub seq: usize,
    /// Windows of `seq + 1` tokens at most.
    pub windows: usize,
    /// Rows of each input kept for AWQ's search, at most (default 4096: every row of 32 windows of 128).
    pub sample_rows: usize,
}

impl Default for CalibOptions {
    fn default() -> Self {
        CalibOptions { batch: 4, seq: 128, windows: 32, sample_rows: 4096 }
    }
}

/// Runs `model` (dense attention: calibration sees every key) over windows
/// of `text` and collects the inputs of every linear.
pub fn calibrate<B: Backend>(be: &B, model: &Model<B>, text: &Corpus, opt: CalibOptions) -> Result<Calibration> {
    let cfg = &model.cfg;
    if opt.batch == 0 || opt.seq == 0 || opt.windows == 0 || opt.sample_rows == 0 {
        return Err(Error::Invalid("calibration: batch, seq, windows and sample rows must be positive".into()));
    }
    let seq = opt.seq.min(cfg.context);
    let wins = eval_windows(text, seq, opt.windows);
    if wins.is_empty() {
        return Err(Error::Invalid(format!(
            "calibration text has {} tokens, shorter than one sequence of {} (give a longer --calib file)",
            text.tokens.len(),
            seq + 1
        )));
    }
    let batch = opt.batch.min(wins.len());
    let mut ws = Workspace::new(be, cfg, model.dtype, batch, seq)?;
    let widths = [cfg.d_model, cfg.n_heads * cfg.head_dim(), cfg.d_model, cfg.hidden()];
    let mut inputs: Vec<[InputStats; 4]> = (0..cfg.n_layers).map(|_| widths.map(InputStats::new)).collect();
    let total_rows = (wins.len() / batch) * batch * seq;
    // Every `stride`-th row goes into the sample: evenly spread over the text.
    let stride = total_rows.div_ceil(opt.sample_rows).max(1);
    let mut row0 = 0usize;
    for chunk in wins.chunks_exact(batch) {
        let mut ids = Vec::with_capacity(batch * seq);
        for w in chunk {
            ids.extend(text.tokens[w.start..w.end - 1].iter().map(|&b| b as u32));
        }
        model.forward(be, &mut ws, &ids, None, StepAttention::Dense)?;
        for (l, st) in inputs.iter_mut().enumerate() {
            let acts = ws.linear_inputs(l).ok_or_else(|| Error::Invalid(format!("calibration: no layer {l}")))?;
            for (s, t) in st.iter_mut().zip(acts) {
                let x = t.to_f32_vec(be)?;
                let k = s.k;
                for (r, row) in x.chunks_exact(k).enumerate() {
                    for ((a, q), &v) in s.abs_sum.iter_mut().zip(s.sq_sum.iter_mut()).zip(row) {
                        *a += v.abs() as f64;
                        *q += (v as f64) * (v as f64);
                    }
                    if (row0 + r).is_multiple_of(stride) && s.sample.len() < opt.sample_rows * k {
                        s.sample.extend_from_slice(row);
                    }
                }
                s.rows += x.len() / k;
            }
        }
        row0 += batch * seq;
    }
    Ok(Calibration { inputs, tokens: row0 })
}

/// [`calibrate`] for f32 parameter values: builds the model on `be` in `dtype`.
pub fn calibrate_values<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    dtype: DType,
    values: &[Vec<f32>],
    text: &Corpus,
    opt: CalibOptions,
) -> Result<Calibration> {
    let model = Model::from_values(be, *cfg, dtype, values)?;
    calibrate(be, &model, text, opt)
}
