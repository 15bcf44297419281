//! Inference ops over a KV cache on CUDA (semantics in
//! `crate::attention::cached`, `crate::ops::cache`, `crate::ops::rope::rope_rows`).
//!
//! Not written yet for this backend: every op returns an error saying so.

use super::CudaBackend;
use crate::Tensor;
use crate::attention::cached::{CachedAttentionSpec, CachedIndexerSpec, CachedSelectSpec};
use crate::error::{Error, Result};
use crate::ops::{CacheWriteSpec, RopeSpec};

type T = Tensor<CudaBackend>;

fn missing(op: &str) -> Result<()> {
    Err(Error::Unavailable(format!("{op} is not implemented on the CUDA backend yet (use --backend cpu)")))
}

pub(super) fn rope_rows(
    _be: &CudaBackend,
    _s: &RopeSpec,
    _x: &T,
    _c: &T,
    _sn: &T,
    _rows: &T,
    _y: &mut T,
) -> Result<()> {
    missing("rope_rows")
}

pub(super) fn cache_write(_be: &CudaBackend, _s: &CacheWriteSpec, _src: &T, _rows: &T, _cache: &mut T) -> Result<()> {
    missing("cache_write")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn cached_attention(
    _be: &CudaBackend,
    _s: &CachedAttentionSpec,
    _q: &T,
    _k: &T,
    _v: &T,
    _rows: &T,
    _idx: Option<&T>,
    _o: &mut T,
) -> Result<()> {
    missing("cached_attention")
}

pub(super) fn cached_indexer_block_scores(
    _be: &CudaBackend,
    _s: &CachedIndexerSpec,
    _qi: &T,
    _w: &T,
    _ki: &T,
    _rows: &T,
    _pooled: &mut T,
) -> Result<()> {
    missing("cached_indexer_block_scores")
}

pub(super) fn cached_select(
    _be: &CudaBackend,
    _s: &CachedSelectSpec,
    _scores: &T,
    _rows: &T,
    _idx: &mut T,
) -> Result<()> {
    missing("cached_select")
}
