//! The `Backend` trait: device buffers with a runtime dtype, and one method per op.
//!
//! The op methods here are *unchecked*: they receive a spec built by the
//! matching function in [`crate::ops`], which validated every shape and dtype,
//! so an implementation may trust the sizes in the spec. Semantics of each op
//! are documented on its spec type; the CPU backend is the executable reference.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod memory;
mod select;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use memory::{MemoryCounter, MemoryStats};
pub use select::{AnyBackend, BackendChoice, BackendJob, Selection, run_on, select};

use crate::DType;
use crate::Tensor;
use crate::attention::cached::{CachedAttentionSpec, CachedIndexerSpec, CachedSelectSpec};
use crate::attention::ops::{AttentionSpec, IndexerLossSpec, IndexerSpec, IndexerTrainSpec, SelectSpec};
use crate::error::Result;
use crate::ops::*;

/// Which implementation a backend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cpu,
    Wgpu,
    Cuda,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

type T<B> = Tensor<B>;

/// A compute device. Model and job code is generic over `B: Backend`.
///
/// Ops are issued in program order; a backend may run them asynchronously,
/// and [`Backend::download`] / [`Backend::synchronize`] wait for them.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A device allocation. Dropping it frees (or pools) the memory and
    /// updates the allocation counters.
    type Buffer: Send + Sync;

    fn kind(&self) -> BackendKind;
    /// Human-readable device name ("llvmpipe (LLVM 15.0.6, 256 bits)", "NVIDIA H100 80GB HBM3").
    fn device_name(&self) -> String;
    /// Whether tensors of `dtype` can be used with this backend's ops.
    fn supports(&self, dtype: DType) -> bool;
    /// Bytes held by live buffers now, and the peak since the last [`Backend::reset_peak`].
    fn memory(&self) -> MemoryStats;
    fn reset_peak(&self);
    /// Waits until every issued op has finished.
    fn synchronize(&self) -> Result<()>;
    /// The most bytes one kernel argument may hold: a wgpu adapter's largest
    /// storage binding; `u64::MAX` where only memory bounds a buffer. The
    /// model splits its largest activations (LM-head logits, the indexer's
    /// training scores) into pieces under it.
    fn max_binding_bytes(&self) -> u64 {
        u64::MAX
    }

    /// A buffer of `len` elements with unspecified contents.
    fn alloc(&self, dtype: DType, len: usize) -> Result<Self::Buffer>;
    /// A buffer holding `bytes` (little-endian elements of `dtype`).
    fn upload(&self, dtype: DType, bytes: &[u8]) -> Result<Self::Buffer>;
    /// Overwrites a whole buffer with `bytes` (same length as the buffer).
    fn write(&self, buf: &mut Self::Buffer, dtype: DType, bytes: &[u8]) -> Result<()>;
    /// A buffer that aliases elements `offset..offset + len` of `base` (same
    /// dtype): ops read and write `base`'s memory through it, and it allocates
    /// nothing (the memory counters do not count it). The view keeps the
    /// allocation alive. An op must not read one
    /// view and write another view of the same allocation (backends reject or
    /// panic on it; see each backend). Backends without views return
    /// [`crate::Error::Unavailable`], and callers fall back to separate buffers.
    fn view(&self, base: &Self::Buffer, dtype: DType, offset: usize, len: usize) -> Result<Self::Buffer> {
        let _ = (base, dtype, offset, len);
        Err(crate::Error::Unavailable(format!("{} backend: tensor views", self.kind())))
    }
    /// Whether [`Backend::view`] is implemented (offsets a multiple of [`crate::dist::FlatLayout`]'s alignment).
    fn supports_views(&self) -> bool {
        false
    }
    /// Reads `len` elements back to the host.
    fn download(&self, buf: &Self::Buffer, dtype: DType, len: usize) -> Result<Vec<u8>>;

    // ---- ops: semantics on each spec type in `crate::ops` ----
    fn matmul(&self, s: &MatmulSpec, a: &T<Self>, b: &T<Self>, c: &mut T<Self>) -> Result<()>;
    fn fill(&self, s: &FillSpec, x: &mut T<Self>) -> Result<()>;
    fn add(&self, s: &ElementwiseSpec, a: &T<Self>, b: &T<Self>, out: &mut T<Self>) -> Result<()>;
    fn axpby(&self, s: &AxpbySpec, x: &T<Self>, y: &mut T<Self>) -> Result<()>;
    fn scale(&self, s: &ScaleSpec, x: &mut T<Self>) -> Result<()>;
    fn bias_add(&self, s: &BiasSpec, x: &mut T<Self>, bias: &T<Self>) -> Result<()>;
    fn sum_rows(&self, s: &SumRowsSpec, x: &T<Self>, out: &mut T<Self>) -> Result<()>;
    fn cast(&self, s: &ElementwiseSpec, x: &T<Self>, y: &mut T<Self>) -> Result<()>;
    fn gelu(&self, s: &ElementwiseSpec, x: &T<Self>, y: &mut T<Self>) -> Result<()>;
    fn gelu_backward(&self, s: &ElementwiseSpec, x: &T<Self>, dy: &T<Self>, dx: &mut T<Self>) -> Result<()>;
    fn bias_gelu(&self, s: &BiasSpec, x: &T<Self>, bias: &T<Self>, y: &mut T<Self>) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn layernorm(
        &self,
        s: &LayerNormSpec,
        x: &T<Self>,
        gamma: &T<Self>,
        beta: &T<Self>,
        y: &mut T<Self>,
        mean: &mut T<Self>,
        rstd: &mut T<Self>,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        s: &LayerNormSpec,
        dy: &T<Self>,
        x: &T<Self>,
        gamma: &T<Self>,
        mean: &T<Self>,
        rstd: &T<Self>,
        dx: &mut T<Self>,
        dgamma: &mut T<Self>,
        dbeta: &mut T<Self>,
    ) -> Result<()>;
    fn softmax(&self, s: &SoftmaxSpec, x: &T<Self>, y: &mut T<Self>) -> Result<()>;
    fn softmax_backward(&self, s: &SoftmaxSpec, y: &T<Self>, dy: &T<Self>, dx: &mut T<Self>) -> Result<()>;
    /// Forward and backward (`s.inverse`) rotary embedding.
    fn rope(&self, s: &RopeSpec, x: &T<Self>, cos: &T<Self>, sin: &T<Self>, y: &mut T<Self>) -> Result<()>;
    fn embedding(&self, s: &EmbeddingSpec, ids: &T<Self>, table: &T<Self>, out: &mut T<Self>) -> Result<()>;
    fn embedding_backward(&self, s: &EmbeddingSpec, ids: &T<Self>, dout: &T<Self>, dtable: &mut T<Self>) -> Result<()>;
    fn cross_entropy(
        &self,
        s: &CrossEntropySpec,
        logits: &T<Self>,
        targets: &T<Self>,
        losses: &mut T<Self>,
    ) -> Result<()>;
    fn cross_entropy_backward(
        &self,
        s: &CrossEntropySpec,
        logits: &T<Self>,
        targets: &T<Self>,
        dlogits: &mut T<Self>,
    ) -> Result<()>;
    fn sum_squares(&self, s: &ReduceSpec, x: &T<Self>, out: &mut T<Self>) -> Result<()>;
    fn all_finite(&self, s: &ReduceSpec, x: &T<Self>, out: &mut T<Self>) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        s: &AdamWSpec,
        params: &mut T<Self>,
        grads: &T<Self>,
        m: &mut T<Self>,
        v: &mut T<Self>,
        copy: Option<&mut T<Self>>,
    ) -> Result<()>;

    // ---- attention: semantics in `crate::attention::ops` ----
    /// Flash-style causal attention over a pattern (`idx` is `None` for dense).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        s: &AttentionSpec,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        idx: Option<&T<Self>>,
        o: &mut T<Self>,
        lse: &mut T<Self>,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        s: &AttentionSpec,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        o: &T<Self>,
        lse: &T<Self>,
        d_o: &T<Self>,
        idx: Option<&T<Self>>,
        dq: &mut T<Self>,
        dk: &mut T<Self>,
        dv: &mut T<Self>,
    ) -> Result<()>;
    fn indexer_scores(
        &self,
        s: &IndexerSpec,
        qi: &T<Self>,
        ki: &T<Self>,
        w: &T<Self>,
        scores: &mut T<Self>,
    ) -> Result<()>;
    fn indexer_block_scores(
        &self,
        s: &IndexerSpec,
        qi: &T<Self>,
        ki: &T<Self>,
        w: &T<Self>,
        pooled: &mut T<Self>,
    ) -> Result<()>;
    fn select_topk(&self, s: &SelectSpec, scores: &T<Self>, idx: &mut T<Self>) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn indexer_kl(
        &self,
        s: &IndexerLossSpec,
        q: &T<Self>,
        k: &T<Self>,
        lse: &T<Self>,
        scores: &T<Self>,
        idx: Option<&T<Self>>,
        loss: &mut T<Self>,
        dscores: &mut T<Self>,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn indexer_backward(
        &self,
        s: &IndexerSpec,
        qi: &T<Self>,
        ki: &T<Self>,
        w: &T<Self>,
        dscores: &T<Self>,
        dqi: &mut T<Self>,
        dki: &mut T<Self>,
        dw: &mut T<Self>,
    ) -> Result<()>;
    /// The fused kept-set indexer training of
    /// [`crate::attention::indexer_train_kept`] (`idx`: the block pattern).
    /// Optional: the default (no fused kernel) returns `Ok(false)` and the
    /// model runs the unfused chain of indexer ops instead.
    #[allow(clippy::too_many_arguments)]
    fn indexer_train_kept(
        &self,
        _s: &IndexerTrainSpec,
        _qi: &T<Self>,
        _ki: &T<Self>,
        _w: &T<Self>,
        _q: &T<Self>,
        _k: &T<Self>,
        _lse: &T<Self>,
        _idx: &T<Self>,
        _loss: &mut T<Self>,
        _dqi: &mut T<Self>,
        _dki: &mut T<Self>,
        _dw: &mut T<Self>,
    ) -> Result<bool> {
        Ok(false)
    }

    // ---- inference over a KV cache: semantics in `crate::attention::cached`,
    // `crate::ops::cache` and `crate::ops::rope::rope_rows` ----
    /// RoPE of query rows at their own positions (`len - 1` of the row table).
    fn rope_rows(
        &self,
        s: &RopeSpec,
        x: &T<Self>,
        cos: &T<Self>,
        sin: &T<Self>,
        rows: &T<Self>,
        y: &mut T<Self>,
    ) -> Result<()>;
    /// `cache[row(len - 1)] = src[r]` per row, `row` through the page table.
    fn cache_write(
        &self,
        s: &CacheWriteSpec,
        src: &T<Self>,
        rows: &T<Self>,
        pages: &T<Self>,
        cache: &mut T<Self>,
    ) -> Result<()>;
    /// Attention of query rows over their cached keys (`idx` is `None` for dense).
    #[allow(clippy::too_many_arguments)]
    fn cached_attention(
        &self,
        s: &CachedAttentionSpec,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        rows: &T<Self>,
        pages: &T<Self>,
        idx: Option<&T<Self>>,
        o: &mut T<Self>,
    ) -> Result<()>;
    /// Per-row pooled indexer scores over the cached indexer keys.
    #[allow(clippy::too_many_arguments)]
    fn cached_indexer_block_scores(
        &self,
        s: &CachedIndexerSpec,
        qi: &T<Self>,
        w: &T<Self>,
        ki: &T<Self>,
        rows: &T<Self>,
        pages: &T<Self>,
        pooled: &mut T<Self>,
    ) -> Result<()>;
    /// Per-row top-n key blocks (own block, sink, best others).
    fn cached_select(&self, s: &CachedSelectSpec, scores: &T<Self>, rows: &T<Self>, idx: &mut T<Self>) -> Result<()>;

    /// `y = x · Wᵀ` with a quantized weight (`ops::qmatmul`).
    fn qmatmul(&self, s: &QMatmulSpec, x: &T<Self>, w: &QWeight<Self>, y: &mut T<Self>) -> Result<()>;
}
