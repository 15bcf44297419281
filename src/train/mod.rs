//! The mixed-precision training step (HPGA): f32 master weights and AdamW
//! moments, working copies in f16/bf16 written by the optimizer kernel,
//! gradient accumulation into f32, one finite check per optimizer step with
//! dynamic loss scaling, clipping on unscaled gradients, LR warm-up + cosine,
//! and the progressive sparsity schedule driving attention and the indexer.

pub mod checkpoint;
pub mod dp;
pub mod lr;
pub mod memory;
pub mod plot;
pub mod scaler;

pub use dp::DistConfig;
pub use lr::LrSchedule;
pub use scaler::LossScaler;

use crate::attention::{Budget, Plan, RowSample, SparsitySchedule};
use crate::data::{Batcher, Corpus};
use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig, StepAttention, Workspace};
use crate::ops::{self, adamw::AdamWConfig};
use crate::{Backend, DType, Tensor};

/// Settings of a training run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch: usize,
    pub seq: usize,
    /// Micro-batches per optimizer step.
    pub accum: usize,
    pub precision: DType,
    pub lr: LrSchedule,
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
    /// Clip the global norm of the unscaled gradient to this (0: no clipping).
    pub grad_clip: f32,
    /// Dense warm-up and ramp fractions of the sparsity schedule.
    pub warmup_frac: f64,
    pub ramp_frac: f64,
    /// Sparse steps train the indexers' KL on every `kl_every`-th query row
    /// (the row phase advancing by one per backward pass), the gradient
    /// scaled to the sampled rows; 1 trains every row. See
    /// [`crate::attention::RowSample`].
    pub kl_every: usize,
    pub seed: u64,
}

impl TrainConfig {
    /// Checks every setting against `model`; errors name the field as `--FLAG`
    /// where a flag sets it, else `train.FIELD`.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        self.check(model, &|f: &str| match f {
            "steps" | "batch" | "seq" | "accum" | "precision" | "lr" => format!("--{f}"),
            "warmup_frac" | "ramp_frac" => format!("--{}", f.replace('_', "-")),
            "kl_every" => "--indexer-kl-every".into(),
            _ => format!("train.{f}"),
        })
    }

    /// [`TrainConfig::validate`] with the caller's names for the fields (a
    /// checkpoint names them by metadata key): each error is one line naming the
    /// field, its value and the accepted range.
    pub fn check(&self, model: &ModelConfig, name: &dyn Fn(&str) -> String) -> Result<()> {
        let bad =
            |f: &str, v: String, range: &str| Err(Error::Invalid(format!("{} {v}: accepted range {range}", name(f))));
        let int = |f: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) { Ok(()) } else { bad(f, v.to_string(), &format!("{lo}..={hi}")) }
        };
        int("steps", self.steps, 1, MAX_STEPS)?;
        int("batch", self.batch as u64, 1, MAX_BATCH as u64)?;
        int("accum", self.accum as u64, 1, MAX_BATCH as u64)?;
        if !(1..=model.context).contains(&self.seq) {
            return bad("seq", self.seq.to_string(), &format!("1..={} (the model's context)", model.context));
        }
        if !(1..=self.seq).contains(&self.kl_every) {
            return bad("kl_every", self.kl_every.to_string(), &format!("1..={} (the sequence length)", self.seq));
        }
        if self.kl_every > 1 && !model.is_sparse() {
            return Err(Error::Invalid(format!(
                "{} {}: applies to sparse attention only (the model is dense)",
                name("kl_every"),
                self.kl_every
            )));
        }
        if !self.precision.is_float() {
            return Err(Error::Invalid(format!("{} {}: expected f32, f16 or bf16", name("precision"), self.precision)));
        }
        let real = |f: &str, v: f64, ok: bool, range: &str| {
            if ok && v.is_finite() { Ok(()) } else { bad(f, crate::util::fmt_real(v), range) }
        };
        let real32 = |f: &str, v: f32, ok: bool, range: &str| {
            if ok && v.is_finite() { Ok(()) } else { bad(f, crate::util::fmt_real32(v), range) }
        };
        let lr = self.lr.lr;
        real32("lr", lr, lr > 0.0 && lr <= MAX_LR, &format!("0 < lr <= {MAX_LR}"))?;
        let min_lr = self.lr.min_lr;
        real32("min_lr", min_lr, (0.0..=lr).contains(&min_lr), "0 <= min_lr <= lr")?;
        int("warmup_steps", self.lr.warmup_steps, 0, self.steps)?;
        if self.lr.total_steps != self.steps {
            return bad("total_steps", self.lr.total_steps.to_string(), &format!("{} (= steps)", self.steps));
        }
        for (f, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            real32(f, v, (0.0..1.0).contains(&v), "0 <= beta < 1")?;
        }
        real32("weight_decay", self.weight_decay, (0.0..=1.0).contains(&self.weight_decay), "0..=1")?;
        real32("grad_clip", self.grad_clip, self.grad_clip >= 0.0, ">= 0 (0: no clipping)")?;
        real("warmup_frac", self.warmup_frac, (0.0..=1.0).contains(&self.warmup_frac), "0..=1")?;
        real("ramp_frac", self.ramp_frac, (0.0..=1.0).contains(&self.ramp_frac), "0..=1")?;
        if self.warmup_frac + self.ramp_frac > 1.0 {
            return Err(Error::Invalid(format!(
                "{} {} + {} {} = {}: the dense warm-up and the ramp together must be at most 1",
                name("warmup_frac"),
                self.warmup_frac,
                name("ramp_frac"),
                self.ramp_frac,
                self.warmup_frac + self.ramp_frac
            )));
        }
        Ok(())
    }
}

/// Accepted ranges of the training settings (see [`TrainConfig::check`]).
pub const MAX_STEPS: u64 = 1_000_000_000;
pub const MAX_BATCH: usize = 1 << 20;
/// AdamW's step is about `lr` per weight: beyond this nothing trains.
pub const MAX_LR: f32 = 10.0;
/// Default of [`Trainer::max_skipped_in_a_row`]: sixteen halvings take the f16
/// loss scale from 2^16 to 1, so more skips in a row mean the run diverged.
pub const DEFAULT_MAX_SKIPPED: u64 = 16;

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub step: u64,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    /// Mean KL of the indexers to the main attention (0 for dense models).
    pub indexer_kl: f64,
    /// Global norm of the unscaled gradient (NaN when skipped).
    pub grad_norm: f64,
    pub lr: f32,
    pub loss_scale: f32,
    pub skipped: bool,
    pub plan: Option<Plan>,
    pub tokens: usize,
}

/// Everything a training run holds on the device.
pub struct Trainer<B: Backend> {
    pub model: Model<B>,
    pub cfg: TrainConfig,
    /// f32 master weights when the working dtype is not f32 (else the model's own).
    master: Option<Vec<Tensor<B>>>,
    /// f32 gradient accumulators, one per parameter.
    grads: Vec<Tensor<B>>,
    /// Working-dtype gradients of one micro-batch (when not f32).
    micro: Option<Vec<Tensor<B>>>,
    m: Vec<Tensor<B>>,
    v: Vec<Tensor<B>>,
    ws: Workspace<B>,
    flag: Tensor<B>,
    sumsq: Tensor<B>,
    /// The step's loss, indexer KL and Σ g², accumulated on the device and read
    /// back once per step.
    stats: DevStats<B>,
    /// The data-parallel group and its state (None: a single-process run).
    dp: Option<dp::Dp<B>>,
    /// The flat buffers the per-tensor states above are views of (None on a
    /// backend without views: then each tensor is its own buffer).
    flat: Option<Flat<B>>,
    pub scaler: LossScaler,
    pub schedule: Option<SparsitySchedule>,
    pub batcher: Batcher,
    /// Optimizer steps taken (skipped ones included).
    pub step: u64,
    /// Which parameters take weight decay.
    decay: Vec<bool>,
    /// Injects an inf into the first gradient at these steps (tests of the scaler).
    pub inject_inf_at: Vec<u64>,
    /// Stop with an error once more than this many optimizer steps in a row were
    /// skipped for non-finite gradients.
    pub max_skipped_in_a_row: u64,
    /// Skipped steps since the last applied one.
    pub skipped_in_a_row: u64,
}

/// First and second AdamW moments per parameter, on the host.
pub type Moments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Bytes of each part of the training state, from the backend's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    pub weights: usize,
    pub master_weights: usize,
    pub gradients: usize,
    pub optimizer: usize,
    pub activations: usize,
}

impl MemoryReport {
    pub fn model_state(&self) -> usize {
        self.weights + self.master_weights + self.gradients + self.optimizer
    }
}

/// A training step's statistics on the device: Σ of the micro-batches' mean
/// losses, Σ of their mean indexer KL, and Σ g² — views of one small buffer
/// (one readback for all three) when the backend has views, else three
/// one-element tensors.
struct DevStats<B: Backend> {
    buf: Option<Tensor<B>>,
    loss: Tensor<B>,
    kl: Tensor<B>,
    sq: Tensor<B>,
}

/// The no-op per-layer hook of a backward pass that reduces nothing.
fn noop<B: Backend>(_: &B, _: &mut [Tensor<B>], _: &[usize]) -> Result<()> {
    Ok(())
}

/// Elements between the statistics in [`DevStats`]' buffer (512 bytes: any
/// storage-buffer offset alignment).
const STATS_STRIDE: usize = 128;

impl<B: Backend> DevStats<B> {
    fn new(be: &B) -> Result<Self> {
        if be.supports_views() {
            let buf = Tensor::zeros(be, &[3 * STATS_STRIDE], DType::F32)?;
            let at = |k: usize| Tensor::view(be, &buf, k * STATS_STRIDE, &[1]);
            let (loss, kl, sq) = (at(0)?, at(1)?, at(2)?);
            return Ok(DevStats { buf: Some(buf), loss, kl, sq });
        }
        let one = || Tensor::zeros(be, &[1], DType::F32);
        Ok(DevStats { buf: None, loss: one()?, kl: one()?, sq: one()? })
    }

    fn reset(&mut self, be: &B) -> Result<()> {
        match self.buf.as_mut() {
            Some(b) => ops::fill(be, b, 0.0),
            None => [&mut self.loss, &mut self.kl, &mut self.sq].into_iter().try_for_each(|t| ops::fill(be, t, 0.0)),
        }
    }

    /// `[loss, kl, Σ g²]`: one readback (three without views).
    fn read(&self, be: &B) -> Result<[f64; 3]> {
        Ok(match &self.buf {
            Some(b) => {
                let v = b.to_f32_vec(be)?;
                [0, 1, 2].map(|k| v[k * STATS_STRIDE] as f64)
            }
            None => {
                let one = |t: &Tensor<B>| -> Result<f64> { Ok(t.to_f32_vec(be)?[0] as f64) };
                [one(&self.loss)?, one(&self.kl)?, one(&self.sq)?]
            }
        })
    }
}

/// Elements per alignment unit of the trainer's flat buffers: 256 bytes of a
/// 2-byte dtype (wgpu's usual `min_storage_buffer_offset_alignment`), 512 of f32.
pub const FLAT_ALIGN: usize = 128;

/// Parameters (working dtype), f32 masters, gradients and AdamW moments as
/// one buffer each, laid out by one [`FlatLayout`](crate::dist::FlatLayout):
/// tensors with weight decay first, then those without, so each decay group
/// is one contiguous slice (padding between tensors stays zero in every
/// buffer, which AdamW leaves zero). The trainer's per-tensor states are views.
struct Flat<B: Backend> {
    /// Element range of each parameter (model order) in the flat buffers.
    ranges: Vec<std::ops::Range<usize>>,
    params: Tensor<B>,
    master: Option<Tensor<B>>,
    grads: Tensor<B>,
    micro: Option<Tensor<B>>,
    m: Option<Tensor<B>>,
    v: Option<Tensor<B>>,
    /// One AdamW launch each: views of a decay group's slice.
    groups: Vec<Group<B>>,
}

/// Views of one weight-decay group's slice of every flat buffer.
struct Group<B: Backend> {
    decay: bool,
    /// f32 weights AdamW updates (the masters in half precision).
    p: Tensor<B>,
    g: Tensor<B>,
    m: Tensor<B>,
    v: Tensor<B>,
    /// The working copy AdamW writes (half precision only).
    copy: Option<Tensor<B>>,
}

impl<B: Backend> Flat<B> {
    /// Splits a downloaded flat buffer into one vector per parameter.
    fn split(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        self.ranges.iter().map(|r| flat[r.clone()].to_vec()).collect()
    }
}

/// Views of `flat` at `ranges`, shaped like `like`.
fn views<B: Backend>(
    be: &B,
    flat: &Tensor<B>,
    ranges: &[std::ops::Range<usize>],
    like: &[Tensor<B>],
) -> Result<Vec<Tensor<B>>> {
    ranges.iter().zip(like).map(|(r, t)| Tensor::view(be, flat, r.start, t.shape())).collect()
}

fn zeros_like<B: Backend>(be: &B, ts: &[Tensor<B>], dtype: DType) -> Result<Vec<Tensor<B>>> {
    ts.iter().map(|t| Tensor::zeros(be, t.shape(), dtype)).collect()
}

impl<B: Backend> Trainer<B> {
    /// Builds the training state for `model`; `memory` receives the bytes of each part.
    pub fn new(be: &B, model: Model<B>, cfg: TrainConfig, memory: &mut MemoryReport) -> Result<Self> {
        Self::build(be, model, cfg, None, memory, true)
    }

    /// [`Trainer::new`] with every parameter, gradient and moment in its own
    /// buffer (what backends without views get): the reference the flat
    /// buffers are tested against.
    pub fn new_per_tensor(be: &B, model: Model<B>, cfg: TrainConfig, memory: &mut MemoryReport) -> Result<Self> {
        Self::build(be, model, cfg, None, memory, false)
    }

    /// A rank of a data-parallel run: each rank draws the global batch of
    /// `cfg.batch · world` sequences from the same sampler and trains on its
    /// slice; gradients are summed across ranks (in buckets, or reduce-scattered
    /// under ZeRO-1), so `world` ranks of batch `b` take the steps one rank of
    /// batch `world · b` takes. Every rank must build its model from the same seed.
    pub fn new_distributed(
        be: &B,
        model: Model<B>,
        cfg: TrainConfig,
        dist: DistConfig,
        comm: Box<dyn crate::dist::Collective>,
        memory: &mut MemoryReport,
    ) -> Result<Self> {
        Self::build(be, model, cfg, Some((dist, comm)), memory, true)
    }

    fn build(
        be: &B,
        model: Model<B>,
        cfg: TrainConfig,
        dist: Option<(DistConfig, Box<dyn crate::dist::Collective>)>,
        memory: &mut MemoryReport,
        flat: bool,
    ) -> Result<Self> {
        cfg.validate(&model.cfg)?;
        let zero = dist.as_ref().is_some_and(|d| d.0.zero);
        if model.dtype != cfg.precision {
            return Err(Error::Invalid(format!("model is {} but --precision is {}", model.dtype, cfg.precision)));
        }
        // Parts are measured as growth of the backend's live bytes, so they are exact only
        // when nothing else allocates on this backend meanwhile (saturating if it frees).
        let live = |be: &B| be.memory().allocated;
        // Views hold whole 32-bit words (wgpu kernels write words): an odd-sized
        // half-precision tensor keeps the per-tensor layout.
        let words = cfg.precision.size() == 4 || model.params.iter().all(|p| p.numel() % 2 == 0);
        if flat && words && be.supports_views() && !model.is_quantized() {
            return Self::build_flat(be, model, cfg, dist, memory);
        }
        memory.weights = model.params.iter().map(|p| p.size_bytes()).sum();
        let mut at = live(be);
        let master = if cfg.precision == DType::F32 || zero {
            None
        } else {
            let vals = model.values(be)?;
            Some(
                model
                    .params
                    .iter()
                    .zip(&vals)
                    .map(|(p, v)| Tensor::from_f32(be, v, p.shape(), DType::F32))
                    .collect::<Result<Vec<_>>>()?,
            )
        };
        memory.master_weights = live(be).saturating_sub(at);
        at = live(be);
        let grads = zeros_like(be, &model.params, DType::F32)?;
        let micro =
            if cfg.precision == DType::F32 { None } else { Some(zeros_like(be, &model.params, cfg.precision)?) };
        memory.gradients = live(be).saturating_sub(at);
        at = live(be);
        // Under ZeRO-1 the master weights and moments are the rank's shard, built below.
        let (m, v) = if zero {
            (Vec::new(), Vec::new())
        } else {
            (zeros_like(be, &model.params, DType::F32)?, zeros_like(be, &model.params, DType::F32)?)
        };
        memory.optimizer = live(be).saturating_sub(at);
        Self::finish(be, model, cfg, dist, memory, (master, grads, micro, m, v), None)
    }

    /// [`Trainer::build`] on flat buffers whose views are the model's
    /// parameters and the trainer's per-tensor states.
    fn build_flat(
        be: &B,
        mut model: Model<B>,
        cfg: TrainConfig,
        dist: Option<(DistConfig, Box<dyn crate::dist::Collective>)>,
        memory: &mut MemoryReport,
    ) -> Result<Self> {
        let zero = dist.as_ref().is_some_and(|d| d.0.zero);
        let live = |be: &B| be.memory().allocated;
        let infos = model.cfg.params();
        let n = model.params.len();
        if infos.len() != n {
            return Err(Error::Invalid("trainer: the model's parameter table does not match its tensors".into()));
        }
        let order: Vec<usize> = (0..n).filter(|&i| infos[i].decay).chain((0..n).filter(|&i| !infos[i].decay)).collect();
        let layout = crate::dist::FlatLayout::new(
            order.iter().map(|&i| (infos[i].name.as_str(), model.params[i].shape())),
            FLAT_ALIGN,
            1,
        );
        let mut ranges = vec![0..0; n];
        for (k, &i) in order.iter().enumerate() {
            ranges[i] = layout.entries[k].range();
        }
        let vals = model.values(be)?;
        let mut host = vec![0.0f32; layout.len];
        for (r, v) in ranges.iter().zip(&vals) {
            host[r.clone()].copy_from_slice(v);
        }
        let len = [layout.len];
        // The working weights move into the flat buffer (the per-tensor ones are freed).
        let params = Tensor::from_f32(be, &host, &len, cfg.precision)?;
        let pviews = views(be, &params, &ranges, &model.params)?;
        model.params = pviews;
        memory.weights = params.size_bytes();
        let mut at = live(be);
        let master = if cfg.precision == DType::F32 || zero {
            None
        } else {
            Some(Tensor::from_f32(be, &host, &len, DType::F32)?)
        };
        memory.master_weights = live(be).saturating_sub(at);
        at = live(be);
        let grads = Tensor::zeros(be, &len, DType::F32)?;
        let micro = if cfg.precision == DType::F32 { None } else { Some(Tensor::zeros(be, &len, cfg.precision)?) };
        memory.gradients = live(be).saturating_sub(at);
        at = live(be);
        let (m, v) = if zero {
            (None, None)
        } else {
            (Some(Tensor::zeros(be, &len, DType::F32)?), Some(Tensor::zeros(be, &len, DType::F32)?))
        };
        memory.optimizer = live(be).saturating_sub(at);
        // Decay group: from 0 to the first tensor without decay; the rest is the other group.
        let split = order.iter().position(|&i| !infos[i].decay).map_or(layout.len, |k| layout.entries[k].offset);
        let mut groups = Vec::new();
        if let (Some(m), Some(v)) = (&m, &v) {
            for (r, decay) in [(0..split, true), (split..layout.len, false)] {
                if r.is_empty() {
                    continue;
                }
                let sh = [r.len()];
                let view = |t: &Tensor<B>| Tensor::view(be, t, r.start, &sh);
                groups.push(Group {
                    decay,
                    p: view(master.as_ref().unwrap_or(&params))?,
                    g: view(&grads)?,
                    m: view(m)?,
                    v: view(v)?,
                    copy: if master.is_some() { Some(view(&params)?) } else { None },
                });
            }
        }
        let like = &model.params;
        let state = (
            master.as_ref().map(|t| views(be, t, &ranges, like)).transpose()?,
            views(be, &grads, &ranges, like)?,
            micro.as_ref().map(|t| views(be, t, &ranges, like)).transpose()?,
            m.as_ref().map_or(Ok(Vec::new()), |t| views(be, t, &ranges, like))?,
            v.as_ref().map_or(Ok(Vec::new()), |t| views(be, t, &ranges, like))?,
        );
        let flat = Flat { ranges, params, master, grads, micro, m, v, groups };
        Self::finish(be, model, cfg, dist, memory, state, Some(flat))
    }

    #[allow(clippy::type_complexity)]
    fn finish(
        be: &B,
        model: Model<B>,
        cfg: TrainConfig,
        dist: Option<(DistConfig, Box<dyn crate::dist::Collective>)>,
        memory: &mut MemoryReport,
        (master, grads, micro, m, v): (
            Option<Vec<Tensor<B>>>,
            Vec<Tensor<B>>,
            Option<Vec<Tensor<B>>>,
            Vec<Tensor<B>>,
            Vec<Tensor<B>>,
        ),
        flat: Option<Flat<B>>,
    ) -> Result<Self> {
        let live = |be: &B| be.memory().allocated;
        let dp = match dist {
            None => None,
            Some((d, comm)) => Some(dp::Dp::new(be, &model, d, comm, memory)?),
        };
        let at = live(be);
        let ws = Workspace::new(be, &model.cfg, cfg.precision, cfg.batch, cfg.seq)?;
        memory.activations = live(be).saturating_sub(at);
        let schedule = match model.cfg.attention {
            crate::model::AttentionMode::Dense => None,
            crate::model::AttentionMode::Sparse { block, keep_blocks, .. } => Some(
                SparsitySchedule {
                    total_steps: cfg.steps,
                    warmup: cfg.warmup_frac,
                    ramp: cfg.ramp_frac,
                    ramp_start_keep: 0.9,
                    budget: Budget::Blocks { block, n: keep_blocks },
                }
                .validated()?,
            ),
        };
        let decay = model.cfg.params().iter().map(|p| p.decay).collect();
        Ok(Trainer {
            master,
            grads,
            micro,
            m,
            v,
            ws,
            flag: Tensor::zeros(be, &[1], DType::U32)?,
            sumsq: Tensor::zeros(be, &[1], DType::F32)?,
            stats: DevStats::new(be)?,
            dp,
            flat,
            scaler: LossScaler::new(cfg.precision == DType::F16),
            schedule,
            batcher: Batcher::new(cfg.seed),
            step: 0,
            decay,
            inject_inf_at: Vec::new(),
            max_skipped_in_a_row: DEFAULT_MAX_SKIPPED,
            skipped_in_a_row: 0,
            model,
            cfg,
        })
    }

    /// The attention this step runs.
    pub fn plan(&self) -> (StepAttention, Option<Plan>) {
        match &self.schedule {
            None => (StepAttention::Dense, None),
            Some(s) => {
                let p = s.plan(self.step, self.cfg.seq);
                let a = if p.dense { StepAttention::Dense } else { StepAttention::Sparse { keep_blocks: p.keep } };
                (a, Some(p))
            }
        }
    }

    /// One optimizer step over `accum` micro-batches drawn from `data`.
    pub fn train_step(&mut self, be: &B, data: &Corpus) -> Result<StepStats> {
        let (attn, plan) = self.plan();
        let train_indexer = self.schedule.is_some();
        let scale = self.scaler.scale;
        let (rank, world) = self.dp.as_ref().map_or((0, 1), |d| (d.comm.rank(), d.comm.world()));
        match self.flat.as_mut() {
            Some(f) => ops::fill(be, &mut f.grads, 0.0)?,
            None => {
                for g in self.grads.iter_mut() {
                    ops::fill(be, g, 0.0)?;
                }
            }
        }
        self.stats.reset(be)?;
        let rows = self.cfg.batch * self.cfg.seq;
        let inject = self.inject_inf_at.contains(&self.step);
        let overlap = self.dp.as_ref().is_some_and(|d| d.overlap);
        for m in 0..self.cfg.accum {
            // The indexer KL's query rows of this backward pass: the phase advances by one per pass
            // (a function of the step, so a resumed run trains the rows the straight one does).
            let every = self.cfg.kl_every.max(1);
            let pass = (self.step % every as u64) as usize * (self.cfg.accum % every) + m;
            self.ws.set_indexer_kl_rows(RowSample::new(every, pass))?;
            // Every rank draws the global batch and keeps its slice: the data order does not
            // depend on the world size.
            let (ids, tg) = self.batcher.sample(data, self.cfg.batch * world, self.cfg.seq)?;
            let (ids, tg) = (&ids[rank * rows..(rank + 1) * rows], &tg[rank * rows..(rank + 1) * rows]);
            self.model.forward_with(be, &mut self.ws, ids, Some(tg), attn, Some(&mut self.stats.loss))?;
            if let Some(dp) = self.dp.as_mut().filter(|_| overlap && m + 1 == self.cfg.accum) {
                // The last micro-batch's backward reduces each bucket as soon as its
                // gradients are final (accumulated, and the test's injected inf in place).
                let (model, ws, grads, micro) = (&self.model, &mut self.ws, &mut self.grads, self.micro.as_mut());
                let kl_acc = Some(&mut self.stats.kl);
                let flat = self.flat.as_ref().map(|f| (&f.grads, &f.ranges[..]));
                let poison = |be: &B, g: &mut [Tensor<B>], fin: &[usize]| -> Result<()> {
                    if inject && fin.contains(&0) {
                        ops::fill(be, &mut g[0], f32::INFINITY)?;
                    }
                    Ok(())
                };
                dp.overlapped(flat, |hook| match micro {
                    None => model.backward_with(be, ws, grads, scale, train_indexer, kl_acc, &mut |be, g, fin| {
                        poison(be, g, fin)?;
                        hook(be, g, fin)
                    }),
                    Some(micro) => {
                        for g in micro.iter_mut() {
                            ops::fill(be, g, 0.0)?;
                        }
                        model.backward_with(be, ws, micro, scale, train_indexer, kl_acc, &mut |be, g, fin| {
                            for &i in fin {
                                ops::axpby(be, 1.0, &g[i], 1.0, &mut grads[i])?;
                            }
                            poison(be, grads, fin)?;
                            hook(be, grads, fin)
                        })
                    }
                })?;
                continue;
            }
            match self.micro.as_mut() {
                None => {
                    let kl_acc = Some(&mut self.stats.kl);
                    self.model.backward_with(
                        be,
                        &mut self.ws,
                        &mut self.grads,
                        scale,
                        train_indexer,
                        kl_acc,
                        &mut noop,
                    )?;
                }
                Some(micro) => match self.flat.as_mut() {
                    Some(Flat { micro: Some(fm), grads: fg, .. }) => {
                        ops::fill(be, fm, 0.0)?;
                        let kl_acc = Some(&mut self.stats.kl);
                        self.model.backward_with(be, &mut self.ws, micro, scale, train_indexer, kl_acc, &mut noop)?;
                        ops::axpby(be, 1.0, fm, 1.0, fg)?;
                    }
                    _ => {
                        for g in micro.iter_mut() {
                            ops::fill(be, g, 0.0)?;
                        }
                        let kl_acc = Some(&mut self.stats.kl);
                        self.model.backward_with(be, &mut self.ws, micro, scale, train_indexer, kl_acc, &mut noop)?;
                        for (acc, g) in self.grads.iter_mut().zip(micro.iter()) {
                            ops::axpby(be, 1.0, g, 1.0, acc)?;
                        }
                    }
                },
            }
        }
        if inject && !overlap {
            ops::fill(be, &mut self.grads[0], f32::INFINITY)?;
        }
        // Gradients are summed over ranks and micro-batches, each a mean over its tokens
        // times the loss scale: the mean gradient is sum / (scale · accum · world).
        let n = (self.cfg.accum * world) as f64;
        let (loss, kl, sq, finite) = match self.dp.as_mut() {
            // One readback: loss, KL and Σ g² together.
            None => {
                let ([loss, kl, sq], finite) = self.grad_sumsq(be)?;
                (loss, kl, sq, finite)
            }
            Some(dp) => {
                let [loss, kl, _] = self.stats.read(be)?;
                let mut st = [loss as f32, kl as f32, 0.0, 0.0];
                let mut grads = match self.flat.as_mut() {
                    Some(f) => dp::Grads::Flat(&mut f.grads, &f.ranges),
                    None => dp::Grads::Each(&mut self.grads),
                };
                let (sq, finite) = if dp.zero.is_some() {
                    dp.reduce_scatter_grads(be, &mut grads)?
                } else if overlap {
                    dp.unstage(be, &mut grads)?;
                    (0.0, true)
                } else {
                    dp.all_reduce_grads(be, &mut grads)?;
                    (0.0, true)
                };
                st[2] = if finite { 0.0 } else { 1.0 };
                st[3] = sq as f32;
                // One small collective: loss, KL, non-finite flag, shard Σg². The flag is
                // reduced so every rank skips the same steps.
                dp.comm.all_reduce(&mut st, crate::dist::ReduceOp::Sum)?;
                let (loss, kl) = (st[0] as f64, st[1] as f64);
                if dp.zero.is_some() {
                    (loss, kl, st[3] as f64, st[2] == 0.0)
                } else {
                    let ([_, _, sq], finite) = self.grad_sumsq(be)?;
                    (loss, kl, sq, finite)
                }
            }
        };
        let lr = self.cfg.lr.at(self.step);
        // Non-finite policy. f32/bf16 have no loss scale to lower, so a NaN/inf loss means the
        // weights or activations overflowed: stop before the step is applied. f16 skips
        // (halving the scale) until more than `max_skipped_in_a_row` in a row.
        let mean_loss = loss / n;
        if !mean_loss.is_finite() && self.cfg.precision != DType::F16 {
            return Err(Error::NonFinite(format!(
                "training stopped at step {}: the loss is {mean_loss} in {} (the weights or activations overflowed; lower --lr, now {})",
                self.step, self.cfg.precision, self.cfg.lr.lr
            )));
        }
        let skipped = self.scaler.update(!finite);
        self.skipped_in_a_row = if skipped { self.skipped_in_a_row + 1 } else { 0 };
        if self.skipped_in_a_row > self.max_skipped_in_a_row {
            return Err(Error::NonFinite(format!(
                "training stopped at step {}: {} steps in a row had non-finite gradients in {} (loss scale now {}, limit --max-skipped-steps {}); the run diverged: lower --lr (now {}){}",
                self.step,
                self.skipped_in_a_row,
                self.cfg.precision,
                self.scaler.scale,
                self.max_skipped_in_a_row,
                self.cfg.lr.lr,
                if self.cfg.precision == DType::F16 { " or train in bf16" } else { "" }
            )));
        }
        let mut stats = StepStats {
            step: self.step,
            loss: mean_loss,
            indexer_kl: kl / n,
            grad_norm: f64::NAN,
            lr,
            loss_scale: scale,
            skipped,
            plan,
            tokens: self.cfg.accum * self.cfg.batch * self.cfg.seq * world,
        };
        self.step += 1;
        if skipped {
            return Ok(stats);
        }
        // Global norm of the unscaled mean gradient; clipping folds into AdamW's grad_scale.
        let unscale = 1.0 / (scale as f64 * n);
        let norm = sq.sqrt() * unscale;
        stats.grad_norm = norm;
        let clip = if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip as f64 {
            self.cfg.grad_clip as f64 / norm
        } else {
            1.0
        };
        let grad_scale = (unscale * clip) as f32;
        let t = self.step; // 1-based step of AdamW
        let adam = |decay: bool| AdamWConfig {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: 1e-8,
            weight_decay: if decay { self.cfg.weight_decay } else { 0.0 },
        };
        if let Some(dp) = self.dp.as_mut().filter(|d| d.zero.is_some()) {
            return dp.zero_update(be, &mut self.model, &|i| adam(self.decay[i]), t, grad_scale).map(|_| stats);
        }
        if let Some(f) = self.flat.as_mut() {
            // One launch per weight-decay group over its slice of the flat buffers.
            for g in f.groups.iter_mut() {
                ops::adamw(be, &adam(g.decay), t, grad_scale, &mut g.p, &g.g, &mut g.m, &mut g.v, g.copy.as_mut())?;
            }
            return Ok(stats);
        }
        for i in 0..self.grads.len() {
            let cfg = adam(self.decay[i]);
            match self.master.as_mut() {
                None => ops::adamw(
                    be,
                    &cfg,
                    t,
                    grad_scale,
                    &mut self.model.params[i],
                    &self.grads[i],
                    &mut self.m[i],
                    &mut self.v[i],
                    None,
                )?,
                Some(master) => ops::adamw(
                    be,
                    &cfg,
                    t,
                    grad_scale,
                    &mut master[i],
                    &self.grads[i],
                    &mut self.m[i],
                    &mut self.v[i],
                    Some(&mut self.model.params[i]),
                )?,
            }
        }
        Ok(stats)
    }

    /// `(Σ g², every element finite)` over all gradients with one readback: the
    /// per-tensor sums of squares are added on the device. Squares are never
    /// negative, so an inf or NaN element makes the sum non-finite; a
    /// non-finite sum can also be f32 overflow of finite gradients, so only
    /// then the exact per-tensor check runs (one readback per tensor, on
    /// overflow steps only) and the skip decision stays exact.
    fn grad_sumsq(&mut self, be: &B) -> Result<([f64; 3], bool)> {
        // Σ g² per tensor (a view of the flat gradient, or its own buffer), summed in
        // tensor order on the device: the same bits either way (one launch over the flat
        // buffer would sum in another order and move the clipped weights by rounding).
        for (i, g) in self.grads.iter().enumerate() {
            if i == 0 {
                ops::sum_squares(be, g, &mut self.stats.sq)?;
            } else {
                ops::sum_squares(be, g, &mut self.sumsq)?;
                ops::axpby(be, 1.0, &self.sumsq, 1.0, &mut self.stats.sq)?;
            }
        }
        // The step's one readback: loss, KL and Σ g² (views of one buffer).
        let [loss, kl, sq] = self.stats.read(be)?;
        let with = |sq: f64| [loss, kl, sq];
        if sq.is_finite() {
            return Ok((with(sq), true));
        }
        if let Some(f) = &self.flat {
            // The rare checks run once over the flat gradient (its padding is zero).
            ops::all_finite(be, &f.grads, &mut self.flag)?;
            if self.flag.to_u32_vec(be)?[0] != 1 {
                return Ok((with(sq), false));
            }
            let host = f.grads.to_f32_vec(be)?;
            let sq =
                f.ranges.iter().map(|r| host[r.clone()].iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum();
            return Ok((with(sq), true));
        }
        for g in &self.grads {
            ops::all_finite(be, g, &mut self.flag)?;
            if self.flag.to_u32_vec(be)?[0] != 1 {
                return Ok((with(sq), false));
            }
        }
        // Every element finite but Σ g² overflowed f32: sum in f64 per tensor instead.
        let mut sq = 0.0f64;
        for g in &self.grads {
            sq += g.to_f32_vec(be)?.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        }
        Ok((with(sq), true))
    }

    /// Mean loss and retrieval accuracy on validation windows (dense or the
    /// model's final sparse budget, as `attn` says).
    pub fn evaluate(&mut self, be: &B, data: &Corpus, windows: usize, attn: StepAttention) -> Result<EvalStats> {
        evaluate(be, &self.model, &mut self.ws, data, windows, attn)
    }

    /// The f32 master weights (the model's own when training in f32). Under
    /// ZeRO-1 this gathers the shards: every rank must call it.
    pub fn master_values(&self, be: &B) -> Result<Vec<Vec<f32>>> {
        if let Some(dp) = self.dp.as_ref().filter(|d| d.zero.is_some()) {
            return Ok(dp.split(&dp.gather(be, |s| &s.master)?));
        }
        if let Some(f) = &self.flat {
            // One download of the flat f32 buffer (the working weights in f32).
            return Ok(f.split(&f.master.as_ref().unwrap_or(&f.params).to_f32_vec(be)?));
        }
        match &self.master {
            Some(m) => m.iter().map(|t| t.to_f32_vec(be)).collect(),
            None => self.model.values(be),
        }
    }

    /// AdamW moments `(m, v)` as host vectors (gathered under ZeRO-1: every rank must call it).
    pub fn moments(&self, be: &B) -> Result<Moments> {
        if let Some(dp) = self.dp.as_ref().filter(|d| d.zero.is_some()) {
            return Ok((dp.split(&dp.gather(be, |s| &s.m)?), dp.split(&dp.gather(be, |s| &s.v)?)));
        }
        if let Some(f @ Flat { m: Some(m), v: Some(v), .. }) = &self.flat {
            return Ok((f.split(&m.to_f32_vec(be)?), f.split(&v.to_f32_vec(be)?)));
        }
        let f = |ts: &[Tensor<B>]| ts.iter().map(|t| t.to_f32_vec(be)).collect::<Result<Vec<_>>>();
        Ok((f(&self.m)?, f(&self.v)?))
    }

    /// Everything a checkpoint holds of this run (a collective under ZeRO-1:
    /// every rank calls it, rank 0 writes the file; the file is the same as a
    /// single-process run's, so it resumes at any world size).
    pub fn state(&self, be: &B) -> Result<checkpoint::TrainState> {
        let (m, v) = self.moments(be)?;
        Ok(checkpoint::TrainState {
            params: self.master_values(be)?,
            m,
            v,
            scaler: self.scaler,
            step: self.step,
            batcher_rng: self.batcher.rng.state(),
        })
    }

    /// This rank and the world size (0 and 1 for a single-process run).
    pub fn rank_world(&self) -> (usize, usize) {
        self.dp.as_ref().map_or((0, 1), |d| (d.comm.rank(), d.comm.world()))
    }

    /// Restores master weights (and working copies), moments, scaler, step and data position.
    pub fn restore(&mut self, be: &B, st: &checkpoint::TrainState) -> Result<()> {
        let n = self.model.params.len();
        if st.params.len() != n || st.m.len() != n || st.v.len() != n {
            return Err(Error::Format("checkpoint: tensor count does not match the model".into()));
        }
        for i in 0..n {
            let want = self.model.params[i].numel();
            if [&st.params[i], &st.m[i], &st.v[i]].iter().any(|x| x.len() != want) {
                return Err(Error::Format(format!("checkpoint: tensor {i} does not have the model's {want} elements")));
            }
        }
        if let Some(dp) = self.dp.as_mut().filter(|d| d.zero.is_some()) {
            dp.restore_shard(be, &st.params, &st.m, &st.v)?;
            for (p, w) in self.model.params.iter_mut().zip(&st.params) {
                p.write_f32(be, w)?;
            }
        } else {
            for i in 0..n {
                match self.master.as_mut() {
                    Some(master) => {
                        master[i].write_f32(be, &st.params[i])?;
                        ops::cast(be, &master[i], &mut self.model.params[i])?;
                    }
                    None => self.model.params[i].write_f32(be, &st.params[i])?,
                }
                self.m[i].write_f32(be, &st.m[i])?;
                self.v[i].write_f32(be, &st.v[i])?;
            }
        }
        self.scaler = st.scaler;
        self.step = st.step;
        self.batcher = Batcher { rng: crate::util::rng::Rng::from_state(st.batcher_rng) };
        Ok(())
    }
}

/// Validation measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalStats {
    pub loss: f64,
    pub perplexity: f64,
    /// Fraction of answer bytes (synthetic task) predicted exactly by argmax; NaN without answers.
    pub retrieval_accuracy: f64,
    pub answers: usize,
}

/// Evaluates `model` on consecutive windows of `data` with the workspace's (batch, seq).
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Model<B>,
    ws: &mut Workspace<B>,
    data: &Corpus,
    windows: usize,
    attn: StepAttention,
) -> Result<EvalStats> {
    let (batch, seq) = (ws.batch, ws.seq);
    let wins = crate::data::eval_windows(data, seq, windows.max(batch));
    if wins.len() < batch {
        return Err(Error::Invalid(format!("validation data too short for {batch} windows of {seq} tokens")));
    }
    let (mut loss, mut count, mut hits, mut answers) = (0.0, 0usize, 0usize, 0usize);
    for chunk in wins.chunks_exact(batch) {
        let mut ids = Vec::with_capacity(batch * seq);
        let mut tg = Vec::with_capacity(batch * seq);
        for w in chunk {
            ids.extend(data.tokens[w.start..w.end - 1].iter().map(|&b| b as u32));
            tg.extend(data.tokens[w.start + 1..w.end].iter().map(|&b| b as u32));
        }
        let st = model.forward(be, ws, &ids, Some(&tg), attn)?;
        loss += st.loss * st.valid as f64;
        count += st.valid;
        if !data.answers.is_empty() {
            let logits = ws.logits_f32(be)?;
            let v = model.cfg.vocab;
            for (bi, w) in chunk.iter().enumerate() {
                for (span, fact) in &data.answers {
                    // Only answers whose fact is inside the window count: they are retrievable.
                    if *fact < w.start || span.end > w.end {
                        continue;
                    }
                    for pos in span.clone() {
                        let row = bi * seq + (pos - 1 - w.start);
                        let r = &logits[row * v..(row + 1) * v];
                        let best = r.iter().enumerate().fold(0, |b, (i, &x)| if x > r[b] { i } else { b });
                        hits += (best == data.tokens[pos] as usize) as usize;
                        answers += 1;
                    }
                }
            }
        }
    }
    let loss = loss / count.max(1) as f64;
    Ok(EvalStats {
        loss,
        perplexity: loss.exp(),
        retrieval_accuracy: if answers == 0 { f64::NAN } else { hits as f64 / answers as f64 },
        answers,
    })
}
