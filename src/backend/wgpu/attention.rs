//! Dynamic sparse attention on wgpu: flash-style dense and sparse attention
//! (forward and backward), the indexer, block pooling, top-k selection and
//! the indexer's KL loss. Kernels in `shaders/attention.wgsl`,
//! `shaders/indexer.wgsl` and `shaders/select.wgsl`.

use super::WgpuBackend;
use crate::Tensor;
use crate::attention::ops::{AttentionSpec, IndexerLossSpec, IndexerSpec, SelectSpec};
use crate::error::{Error, Result};

type T = Tensor<WgpuBackend>;

fn todo(op: &str) -> Result<()> {
    Err(Error::Unavailable(format!("wgpu: {op} is not implemented yet")))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    _be: &WgpuBackend,
    _s: &AttentionSpec,
    _q: &T,
    _k: &T,
    _v: &T,
    _idx: Option<&T>,
    _o: &mut T,
    _lse: &mut T,
) -> Result<()> {
    todo("attention")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    _be: &WgpuBackend,
    _s: &AttentionSpec,
    _q: &T,
    _k: &T,
    _v: &T,
    _o: &T,
    _lse: &T,
    _d_o: &T,
    _idx: Option<&T>,
    _dq: &mut T,
    _dk: &mut T,
    _dv: &mut T,
) -> Result<()> {
    todo("attention_backward")
}

pub(super) fn indexer_scores(
    _be: &WgpuBackend,
    _s: &IndexerSpec,
    _qi: &T,
    _ki: &T,
    _w: &T,
    _scores: &mut T,
) -> Result<()> {
    todo("indexer_scores")
}

pub(super) fn indexer_block_scores(
    _be: &WgpuBackend,
    _s: &IndexerSpec,
    _qi: &T,
    _ki: &T,
    _w: &T,
    _pooled: &mut T,
) -> Result<()> {
    todo("indexer_block_scores")
}

pub(super) fn select_topk(_be: &WgpuBackend, _s: &SelectSpec, _scores: &T, _idx: &mut T) -> Result<()> {
    todo("select_topk")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn indexer_kl(
    _be: &WgpuBackend,
    _s: &IndexerLossSpec,
    _q: &T,
    _k: &T,
    _lse: &T,
    _scores: &T,
    _idx: Option<&T>,
    _loss: &mut T,
    _dscores: &mut T,
) -> Result<()> {
    todo("indexer_kl")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn indexer_backward(
    _be: &WgpuBackend,
    _s: &IndexerSpec,
    _qi: &T,
    _ki: &T,
    _w: &T,
    _dscores: &T,
    _dqi: &mut T,
    _dki: &mut T,
    _dw: &mut T,
) -> Result<()> {
    todo("indexer_backward")
}
