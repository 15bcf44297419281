//! The data-parallel part of a training step: host-staged gradient buckets
//! all-reduced in reverse layer order, or under ZeRO-1 a reduce-scatter of
//! the flat gradient, an AdamW update of the rank's shard and an all-gather
//! of the weights.
//!
//! Gradients are staged through one flat host buffer laid out by
//! [`FlatLayout`]; buckets and shards are ranges of it. Without ZeRO the
//! buckets are reduced while the backward pass runs ([`Dp::overlapped`], the
//! default; `--overlap-grads false` reduces after it); ZeRO-1's reduce-scatter
//! of the whole flat gradient runs after the backward pass. Under ZeRO-1 the device
//! holds 12/N bytes of optimizer state per parameter (f32 master, m, v of the
//! shard) beside the working weights and gradients: the reduced gradient
//! shard stays on the host until its AdamW launch.

use std::ops::Range;

use super::MemoryReport;
use crate::dist::{Bucket, Collective, FlatLayout, ReduceOp, buckets};
use crate::error::{Error, Result};
use crate::model::{LayerHook, Model};
use crate::ops::{self, adamw::AdamWConfig};
use crate::{Backend, DType, Tensor};

/// Settings of the data-parallel step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistConfig {
    /// ZeRO stage 1: shard the optimizer state (f32 master weights and moments) across ranks.
    pub zero: bool,
    /// Largest bucket of coalesced small gradients, MiB (PyTorch DDP: 25).
    pub bucket_mb: f64,
    /// Largest first bucket, MiB (PyTorch DDP: 1).
    pub first_bucket_mb: f64,
    /// Multiplies the seed's size-class thresholds (16, 64, 256 MB): small models have no
    /// 16 MB tensors, so e.g. 1/1024 makes the classes 16, 64, 256 KB.
    pub class_scale: f64,
    /// Reduce each gradient bucket while the backward pass differentiates the earlier layers
    /// (plain data parallel; ZeRO-1 reduce-scatters after the backward pass).
    pub overlap: bool,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig { zero: false, bucket_mb: 25.0, first_bucket_mb: 1.0, class_scale: 1.0, overlap: true }
    }
}

impl DistConfig {
    pub fn validate(&self) -> Result<()> {
        for (f, v) in [("--bucket-mb", self.bucket_mb), ("--first-bucket-mb", self.first_bucket_mb)] {
            if !(v.is_finite() && v > 0.0 && v <= 65536.0) {
                return Err(Error::Invalid(format!("{f} {v}: accepted range 0 < MiB <= 65536")));
            }
        }
        if !(self.class_scale.is_finite() && self.class_scale > 0.0) {
            return Err(Error::Invalid(format!("--size-class-scale {}: expected > 0", self.class_scale)));
        }
        Ok(())
    }
}

/// A rank's piece of one parameter under ZeRO-1: flat range and its f32 optimizer state.
pub(super) struct Segment<B: Backend> {
    pub param: usize,
    pub range: Range<usize>,
    pub master: Tensor<B>,
    pub m: Tensor<B>,
    pub v: Tensor<B>,
}

pub(super) struct ZeroShard<B: Backend> {
    pub range: Range<usize>,
    pub segs: Vec<Segment<B>>,
    /// This rank's shard of the reduced gradient, on the host (where the
    /// reduce-scatter leaves it): each segment is uploaded into a scratch
    /// tensor for its AdamW launch and freed, so the device holds no
    /// per-shard gradient between steps.
    grad: Vec<f32>,
}

pub(super) struct Dp<B: Backend> {
    pub comm: Box<dyn Collective>,
    pub layout: FlatLayout,
    pub buckets: Vec<Bucket>,
    /// Host staging of the flat f32 gradient (padding stays zero).
    host: Vec<f32>,
    pub zero: Option<ZeroShard<B>>,
    /// Buckets are reduced during the backward pass ([`Dp::overlapped`]).
    pub overlap: bool,
}

/// The gradients a step reduces: one tensor per parameter, or the trainer's
/// flat gradient with each parameter's range in it (staged with one download
/// and one upload).
pub(crate) enum Grads<'a, B: Backend> {
    Each(&'a mut [Tensor<B>]),
    Flat(&'a mut Tensor<B>, &'a [Range<usize>]),
}

/// The contiguous runs of a flat buffer that `tensors` (parameter indices,
/// at `ranges` in it) occupy, each with its members: tensors are merged into
/// one run when only alignment padding separates them (no other tensor can
/// start in a gap shorter than the trainer's alignment unit).
fn flat_runs(tensors: &[usize], ranges: &[Range<usize>]) -> Vec<(Range<usize>, Vec<usize>)> {
    let mut ts: Vec<usize> = tensors.to_vec();
    ts.sort_unstable_by_key(|&i| ranges[i].start);
    let mut runs: Vec<(Range<usize>, Vec<usize>)> = Vec::new();
    for i in ts {
        let r = ranges[i].clone();
        match runs.last_mut() {
            Some((run, members)) if r.start >= run.end && r.start - run.end < super::FLAT_ALIGN => {
                run.end = r.end;
                members.push(i);
            }
            _ => runs.push((r, vec![i])),
        }
    }
    runs
}

/// Elements per alignment unit of the flat layout (256 bytes of f32).
const ALIGN: usize = 64;

impl<B: Backend> Dp<B> {
    pub fn new(
        be: &B,
        model: &Model<B>,
        cfg: DistConfig,
        comm: Box<dyn Collective>,
        memory: &mut MemoryReport,
    ) -> Result<Self> {
        cfg.validate()?;
        let world = comm.world();
        let infos = model.cfg.params();
        let layout = FlatLayout::new(infos.iter().map(|p| (p.name.as_str(), p.shape.as_slice())), ALIGN, world);
        const MIB: f64 = (1 << 20) as f64;
        let buckets =
            buckets(&layout, cfg.class_scale, (cfg.bucket_mb * MIB) as usize, (cfg.first_bucket_mb * MIB) as usize);
        let zero = if cfg.zero {
            let s = layout.shard_len(world);
            let range = comm.rank() * s..(comm.rank() + 1) * s;
            let vals = model.values(be)?;
            let before = be.memory().allocated;
            let mut segs = Vec::new();
            for (i, r) in layout.segments(range.clone()) {
                let off = layout.entries[i].offset;
                let w = &vals[i][r.start - off..r.end - off];
                segs.push(Segment {
                    param: i,
                    range: r.clone(),
                    master: Tensor::from_f32(be, w, &[w.len()], DType::F32)?,
                    m: Tensor::zeros(be, &[w.len()], DType::F32)?,
                    v: Tensor::zeros(be, &[w.len()], DType::F32)?,
                });
            }
            // master 4 + m 4 + v 4 bytes per shard element: 12/N per parameter
            // beside the working weights and gradients.
            let bytes = be.memory().allocated.saturating_sub(before);
            memory.master_weights += bytes / 3;
            memory.optimizer += bytes - bytes / 3;
            Some(ZeroShard { grad: vec![0.0; range.len()], range, segs })
        } else {
            None
        };
        Ok(Dp { comm, host: vec![0.0; layout.len], layout, buckets, zero, overlap: cfg.overlap && !cfg.zero })
    }

    fn stage(&mut self, be: &B, grads: &Grads<'_, B>) -> Result<()> {
        match grads {
            Grads::Each(gs) => {
                for (e, g) in self.layout.entries.iter().zip(gs.iter()) {
                    let v = g.to_f32_vec(be)?;
                    self.host[e.range()].copy_from_slice(&v);
                }
            }
            Grads::Flat(flat, ranges) => {
                let v = flat.to_f32_vec(be)?;
                for (e, r) in self.layout.entries.iter().zip(ranges.iter()) {
                    self.host[e.range()].copy_from_slice(&v[r.clone()]);
                }
            }
        }
        Ok(())
    }

    /// Runs `backward` (given a per-layer hook to pass to
    /// [`Model::backward_with`]) while the gradient buckets are summed over
    /// ranks: a bucket is staged on the host as soon as all its tensors are
    /// final and handed to a communication thread, which all-reduces it while
    /// the earlier layers are still being differentiated (PyTorch DDP's
    /// overlap, for host-staged collectives). Buckets are reduced in the order
    /// they become ready, the same on every rank (the backward's order); the
    /// sums are the ones [`Dp::all_reduce_grads`] computes, bit for bit. The
    /// reduced gradients are in the host staging buffer afterwards:
    /// [`Dp::unstage`] writes them back.
    ///
    /// `flat`: the trainer's flat gradient and each parameter's range in it,
    /// when the per-tensor gradients are views of it: a bucket is then read
    /// back as the few contiguous runs of the flat buffer its tensors occupy
    /// (at most one per weight-decay group) instead of tensor by tensor.
    pub fn overlapped<R>(
        &mut self,
        flat: Option<(&Tensor<B>, &[Range<usize>])>,
        backward: impl FnOnce(&mut LayerHook<'_, B>) -> Result<R>,
    ) -> Result<R> {
        use std::sync::mpsc;
        let (layout, buckets, host) = (&self.layout, &self.buckets, &mut self.host);
        let comm: &mut dyn Collective = &mut *self.comm;
        let mut bucket_of = vec![usize::MAX; layout.entries.len()];
        for (b, bk) in buckets.iter().enumerate() {
            for &t in &bk.tensors {
                bucket_of[t] = b;
            }
        }
        let mut left: Vec<usize> = buckets.iter().map(|b| b.tensors.len()).collect();
        std::thread::scope(|scope| {
            let (to_comm, jobs) = mpsc::channel::<(usize, Vec<f32>)>();
            let worker = scope.spawn(move || -> Result<Vec<(usize, Vec<f32>)>> {
                let mut out = Vec::new();
                for (b, mut data) in jobs {
                    comm.all_reduce(&mut data, ReduceOp::Sum)?;
                    out.push((b, data));
                }
                Ok(out)
            });
            let mut sent = 0usize;
            let res = {
                let mut hook = |be: &B, grads: &mut [Tensor<B>], finished: &[usize]| -> Result<()> {
                    for &t in finished {
                        let b =
                            bucket_of.get(t).copied().filter(|&b| b < left.len() && left[b] > 0).ok_or_else(|| {
                                Error::Invalid(format!("backward hook: parameter {t} is unknown or was reported twice"))
                            })?;
                        left[b] -= 1;
                        if left[b] > 0 {
                            continue;
                        }
                        let r = buckets[b].range.clone();
                        let mut data = vec![0.0f32; r.len()];
                        let tensors = &buckets[b].tensors;
                        match flat {
                            Some((fg, ranges)) => {
                                for (run, members) in flat_runs(tensors, ranges) {
                                    let v = Tensor::view(be, fg, run.start, &[run.len()])?.to_f32_vec(be)?;
                                    for i in members {
                                        let (e, src) = (&layout.entries[i], &ranges[i]);
                                        data[e.offset - r.start..e.offset - r.start + e.len()]
                                            .copy_from_slice(&v[src.start - run.start..src.end - run.start]);
                                    }
                                }
                            }
                            None => {
                                for &i in tensors {
                                    let e = &layout.entries[i];
                                    data[e.offset - r.start..e.offset - r.start + e.len()]
                                        .copy_from_slice(&grads[i].to_f32_vec(be)?);
                                }
                            }
                        }
                        // A closed channel means the worker stopped on a collective error: it is
                        // returned below, after the backward.
                        let _ = to_comm.send((b, data));
                        sent += 1;
                    }
                    Ok(())
                };
                backward(&mut hook)
            };
            drop(to_comm);
            let reduced =
                worker.join().map_err(|_| Error::Invalid("the gradient communication thread panicked".into()))?;
            let res = res?;
            let reduced = reduced?;
            if sent != buckets.len() || reduced.len() != buckets.len() {
                return Err(Error::Invalid(format!(
                    "overlapped reduction: {} of {} gradient buckets were reduced (the backward pass did not report every parameter)",
                    reduced.len(),
                    buckets.len()
                )));
            }
            for (b, data) in reduced {
                host[buckets[b].range.clone()].copy_from_slice(&data);
            }
            Ok(res)
        })
    }

    /// Writes the reduced gradients of the host staging buffer back into
    /// `grads` (one upload of the flat gradient, or one per tensor).
    pub fn unstage(&self, be: &B, grads: &mut Grads<'_, B>) -> Result<()> {
        match grads {
            Grads::Each(gs) => {
                for (e, g) in self.layout.entries.iter().zip(gs.iter_mut()) {
                    g.write_f32(be, &self.host[e.range()])?;
                }
            }
            Grads::Flat(flat, ranges) => {
                // The flat gradient's padding is zero and stays zero.
                let mut v = vec![0.0f32; flat.numel()];
                for (e, r) in self.layout.entries.iter().zip(ranges.iter()) {
                    v[r.clone()].copy_from_slice(&self.host[e.range()]);
                }
                flat.write_f32(be, &v)?;
            }
        }
        Ok(())
    }

    /// Sums the gradients over ranks, bucket by bucket in reverse layer order.
    pub fn all_reduce_grads(&mut self, be: &B, grads: &mut Grads<'_, B>) -> Result<()> {
        self.stage(be, grads)?;
        for b in &self.buckets {
            self.comm.all_reduce(&mut self.host[b.range.clone()], ReduceOp::Sum)?;
        }
        self.unstage(be, grads)
    }

    /// ZeRO-1: reduce-scatters the flat gradient, uploads this rank's shard,
    /// returns the shard's `(Σ g², all finite)` (summed over ranks by the caller).
    pub fn reduce_scatter_grads(&mut self, be: &B, grads: &mut Grads<'_, B>) -> Result<(f64, bool)> {
        self.stage(be, grads)?;
        let Some(z) = self.zero.as_mut() else {
            return Err(Error::Invalid("reduce_scatter_grads without ZeRO".into()));
        };
        self.comm.reduce_scatter(&self.host, &mut z.grad)?;
        let (mut sq, mut finite) = (0.0f64, true);
        for s in &z.segs {
            let g = &z.grad[s.range.start - z.range.start..s.range.end - z.range.start];
            finite &= g.iter().all(|x| x.is_finite());
            sq += g.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
        }
        Ok((sq, finite))
    }

    /// ZeRO-1: AdamW on this rank's shard, then all-gather the f32 weights into every
    /// rank's working copy.
    pub fn zero_update(
        &mut self,
        be: &B,
        model: &mut Model<B>,
        adam: &dyn Fn(usize) -> AdamWConfig,
        t: u64,
        grad_scale: f32,
    ) -> Result<()> {
        let Some(z) = self.zero.as_mut() else { return Err(Error::Invalid("zero_update without ZeRO".into())) };
        for s in z.segs.iter_mut() {
            let g = &z.grad[s.range.start - z.range.start..s.range.end - z.range.start];
            let g = Tensor::from_f32(be, g, &[g.len()], DType::F32)?;
            ops::adamw(be, &adam(s.param), t, grad_scale, &mut s.master, &g, &mut s.m, &mut s.v, None)?;
        }
        let full = self.gather(be, |s| &s.master)?;
        for (e, p) in self.layout.entries.iter().zip(model.params.iter_mut()) {
            p.write_f32(be, &full[e.range()])?;
        }
        Ok(())
    }

    /// All-gathers one per-segment state (master, m or v) into the flat layout.
    pub fn gather(&self, be: &B, pick: impl Fn(&Segment<B>) -> &Tensor<B>) -> Result<Vec<f32>> {
        let z = self.zero.as_ref().ok_or_else(|| Error::Invalid("gather without ZeRO".into()))?;
        let mut shard = vec![0.0f32; z.range.len()];
        for s in &z.segs {
            let v = pick(s).to_f32_vec(be)?;
            shard[s.range.start - z.range.start..s.range.end - z.range.start].copy_from_slice(&v);
        }
        let mut full = vec![0.0f32; self.layout.len];
        self.comm.all_gather(&shard, &mut full)?;
        Ok(full)
    }

    /// Splits a flat buffer into one vector per parameter.
    pub fn split(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        self.layout.entries.iter().map(|e| flat[e.range()].to_vec()).collect()
    }

    /// ZeRO-1: loads this rank's shard of full per-parameter state (a checkpoint
    /// written at any world size).
    pub fn restore_shard(&mut self, be: &B, params: &[Vec<f32>], m: &[Vec<f32>], v: &[Vec<f32>]) -> Result<()> {
        let Some(z) = self.zero.as_mut() else { return Ok(()) };
        for s in z.segs.iter_mut() {
            let e = &self.layout.entries[s.param];
            let r = s.range.start - e.offset..s.range.end - e.offset;
            for (src, dst) in [(params, &mut s.master), (m, &mut s.m), (v, &mut s.v)] {
                let t = src.get(s.param).and_then(|x| x.get(r.clone())).ok_or_else(|| {
                    Error::Format(format!("checkpoint: tensor {} is shorter than the model's", e.name))
                })?;
                dst.write_f32(be, t)?;
            }
        }
        Ok(())
    }
}
