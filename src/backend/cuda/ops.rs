//! The `Backend` impl of the CUDA backend: one function per op, each picking
//! its kernel (by family and dtype suffix) and launch shape.
//!
//! | op | kernel (kernels/…) |
//! | --- | --- |
//! | matmul | cuBLAS `GemmStridedBatchedEx` (fallback `gemm_tiled_*`, matmul.cu); `row_invariant` products (`matmul_rows`) always `gemm_tiled_*` |
//! | fill, add, axpby, scale, bias_add, sum_rows | elementwise.cu |
//! | cast | cast.cu |
//! | gelu, gelu_backward, bias_gelu | gelu.cu |
//! | layernorm (+ backward) | layernorm.cu |
//! | softmax (+ backward) | softmax.cu |
//! | rope (forward and inverse) | rope.cu |
//! | embedding (+ backward) | embedding.cu |
//! | cross_entropy (+ backward) | cross_entropy.cu |
//! | sum_squares, all_finite | reduce.cu |
//! | adamw | adamw.cu |
//! | attention (+ backward): tiled (32×32 shared-memory tiles) for dense and block patterns with d ≤ 128, one warp per query / key row otherwise; indexer_kl | attention.cu |
//! | indexer_scores, indexer_block_scores, indexer_backward | indexer.cu |
//! | select_topk | select.cu |
//! | qmatmul: `qmv_*` (m < 4), `qmm_*` (8 rows per block), one summation order | qmatmul.cu (glue in qmatmul.rs) |
//! | rope_rows, cache_write, cached_attention (flash-decoding + prefill runs), cached_indexer_block_scores, cached_select | cached.cu (glue in cached.rs) |
//!
//! Block-sparse attention selects per query and causally (issue 8):
//! `indexer_block_scores` pools each query's own scores,
//! `pooled[b, t, kb] = max_{s in kb, s ≤ t} I(t, s)` (`[batch, seq, nkb]`, one
//! 16×16 thread block per key block and 16-query tile); `select_topk` gives
//! every query its own row of key blocks (`idx [batch, seq, n]`: own block,
//! sink, best others, from row `t` alone); attention, its backward and
//! `indexer_kl` read query `t`'s own row. The tiled attention kernels share
//! loads, never decisions: a 32-query tile builds the union of its queries'
//! key tiles (a bitmask in shared memory), visits it in ascending order, and
//! masks every (query, key) pair by the query's own row; a query with no key
//! in a key tile skips that tile, so its arithmetic (which tiles, in which
//! order) depends on its own selection only and the outputs at positions ≤ t
//! are bit-identical whatever comes after t. The backward's dk/dv of key `s`
//! sum over the queries `t ≥ s` whose own row lists the block of `s`.

use cudarc::driver::{DeviceRepr, LaunchConfig};

use super::cached;
use super::{Arg, CudaBackend, CudaBuffer, dev_err, sfx};
use crate::attention::cached::{CachedAttentionSpec, CachedIndexerSpec, CachedSelectSpec};
use crate::attention::ops::{AttentionSpec, IndexerLossSpec, IndexerSpec, PatternSpec, SelectSpec};
use crate::backend::{Backend, BackendKind, MemoryStats};
use crate::error::{Error, Result};
use crate::ops::*;
use crate::{DType, Tensor};

type T = Tensor<CudaBackend>;

/// The `Attn` struct of attention.cu, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnArgs {
    batch: u32,
    seq: u32,
    heads: u32,
    kv_heads: u32,
    d: u32,
    scale: f32,
    mode: u32,
    kk: u32,
    block: u32,
}

// SAFETY: `AttnArgs` is `repr(C)`, plain old data, and laid out exactly like
// `struct Attn` in kernels/attention.cu (nine 4-byte fields).
unsafe impl DeviceRepr for AttnArgs {}

fn p(t: &T) -> Arg {
    Arg::P(t.buf.ptr)
}
fn u(v: usize) -> Arg {
    Arg::U(v as u32)
}

const THREADS: u32 = 256;

/// A grid-stride launch over `n` items.
fn flat(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per row, `warps` warps per block.
fn per_warp(rows: usize, warps: u32) -> LaunchConfig {
    let blocks = rows.div_ceil(warps as usize).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32 * warps, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `threads` per row.
fn per_block(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Column reductions: a (32, 8) block per 32 columns.
fn columns(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(32) as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
}

/// Dims per lane of the warp-per-row kernels (template instantiations 1, 2, 4, 8).
fn dpl(d: usize) -> usize {
    match d.div_ceil(32) {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

fn attn_args(s: &AttentionSpec) -> AttnArgs {
    let (mode, kk, block) = match s.pattern {
        PatternSpec::Dense => (0, 0, 1),
        PatternSpec::Tokens { k } => (1, k, 1),
        PatternSpec::Blocks { block, n } => (2, n, block),
    };
    AttnArgs {
        batch: s.batch as u32,
        seq: s.seq as u32,
        heads: s.n_heads as u32,
        kv_heads: s.n_kv_heads as u32,
        d: s.head_dim as u32,
        scale: s.scale,
        mode,
        kk: kk as u32,
        block: block as u32,
    }
}

/// Bytes of dynamic shared memory of a tiled attention kernel (`TiledSmem`
/// in attention.cu): `rows` tiles of 32×(32·dpl+1) floats, `p_tiles` tiles of
/// 4×8×32 floats, then u32 words: 32 per-query key masks and the bitmask of
/// the key tiles a query tile visits (one bit per 32 keys of `seq`).
fn tiled_smem(rows: usize, p_tiles: usize, dpl: usize, seq: usize) -> usize {
    let words = 32 + seq.div_ceil(32).div_ceil(32).max(1);
    (rows * 32 * (32 * dpl + 1) + p_tiles * 4 * 8 * 32 + words) * 4
}

/// One 128-thread block per (32-row tile, head, batch entry).
fn tile_grid(s: &AttentionSpec, heads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.seq.div_ceil(32) as u32, heads as u32, s.batch as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

fn check_index_dim(op: &str, s: &IndexerSpec) -> Result<()> {
    if s.dim > 256 {
        return Err(Error::Shape(format!("{op}: the CUDA backend takes index head dims up to 256, got {}", s.dim)));
    }
    Ok(())
}

impl CudaBackend {
    /// Whether the tiled attention kernels apply: dense or blocks (any block
    /// size: a query tile visits the union of its queries' key tiles with a
    /// per-query key mask), d <= 128, and the device grants the shared memory
    /// (d > 64, or very long sequences, need more than 48 KiB).
    fn tiled(&self, s: &AttentionSpec) -> bool {
        let pattern = !matches!(s.pattern, PatternSpec::Tokens { .. });
        pattern
            && s.head_dim <= 128
            && s.n_heads <= 65535
            && s.batch <= 65535
            && self.smem_optin >= tiled_smem(4, 2, dpl(s.head_dim), s.seq)
    }

    fn scratch(&self, dtype: DType, len: usize) -> Result<CudaBuffer> {
        self.raw_alloc(len * dtype.size())
    }

    fn gemm_cublas(&self, s: &MatmulSpec, a: &T, b: &T, c: &mut T) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t as Ct, cublasGemmAlgo_t, cublasOperation_t as Op, cudaDataType};
        let blas = self.blas.as_ref().expect("checked by the caller").lock().unwrap_or_else(|e| e.into_inner());
        self.ctx.bind_to_thread().map_err(|e| dev_err("binding the CUDA context", e))?;
        let dt = match a.dtype() {
            DType::F16 => cudaDataType::CUDA_R_16F,
            DType::BF16 => cudaDataType::CUDA_R_16BF,
            _ => cudaDataType::CUDA_R_32F,
        };
        let compute = if a.dtype() == DType::F32 && self.allow_tf32() {
            Ct::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            Ct::CUBLAS_COMPUTE_32F
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLAS
        // gets B first, with the storage as it is.
        let (m, n, k) = (s.m as i32, s.n as i32, s.k as i32);
        let (opb, ldb) = if s.trans_b { (Op::CUBLAS_OP_T, k) } else { (Op::CUBLAS_OP_N, n) };
        let (opa, lda) = if s.trans_a { (Op::CUBLAS_OP_T, m) } else { (Op::CUBLAS_OP_N, k) };
        let (sa, sb, sc) = s.strides();
        let (alpha, beta) = (s.alpha, s.beta);
        // SAFETY: the pointers are live allocations of this context holding
        // batch·m·k (A), (1|batch)·k·n (B) and batch·m·n (C) elements of `dt`,
        // as the validated spec guarantees; alpha/beta are host f32 values as
        // CUBLAS_COMPUTE_32F expects in the default host pointer mode; the
        // handle is bound to this backend's stream.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                opb,
                opa,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                b.buf.ptr as *const std::ffi::c_void,
                dt,
                ldb,
                sb as i64,
                a.buf.ptr as *const std::ffi::c_void,
                dt,
                lda,
                sa as i64,
                (&beta as *const f32).cast(),
                c.buf.ptr as *mut std::ffi::c_void,
                dt,
                n,
                sc as i64,
                s.batch as i32,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| dev_err("cuBLAS GemmStridedBatchedEx", format!("{e:?}")))
    }

    fn gemm_fallback(&self, s: &MatmulSpec, a: &T, b: &T, c: &mut T) -> Result<()> {
        let (sa, sb, sc) = s.strides();
        let cfg = LaunchConfig {
            grid_dim: super::fallback_gemm_grid(s.m, s.n, s.batch)?,
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("gemm_tiled_{}", sfx(a.dtype()));
        let args = [
            p(a),
            p(b),
            p(c),
            u(s.m),
            u(s.n),
            u(s.k),
            u(s.trans_a as usize),
            u(s.trans_b as usize),
            Arg::F(s.alpha),
            Arg::F(s.beta),
            u(sa),
            u(sb),
            u(sc),
        ];
        self.launch("matmul", &name, cfg, &args)
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;

    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn device_name(&self) -> String {
        self.info.name.clone()
    }
    fn supports(&self, _dtype: DType) -> bool {
        true
    }
    fn memory(&self) -> MemoryStats {
        self.mem.stats()
    }
    fn reset_peak(&self) {
        self.mem.reset_peak()
    }
    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| dev_err("synchronize", e))
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuffer> {
        self.raw_alloc(len * dtype.size())
    }

    fn supports_views(&self) -> bool {
        true
    }

    fn view(&self, base: &CudaBuffer, dtype: DType, offset: usize, len: usize) -> Result<CudaBuffer> {
        let size = dtype.size();
        if offset.checked_add(len).is_none_or(|e| e * size > base.bytes) {
            return Err(Error::Shape(format!(
                "view: elements {offset}..{offset}+{len} of a buffer of {} bytes",
                base.bytes
            )));
        }
        // Kernels load whole elements (and f16/bf16 pairs, f32x4 in some): keep 16-byte alignment.
        let start = base.offset + offset * size;
        if !start.is_multiple_of(16) {
            return Err(Error::Invalid(format!("cuda: a view at byte {start} is not 16-byte aligned")));
        }
        Ok(CudaBuffer {
            slice: base.slice.clone(),
            ptr: base.ptr + (offset * size) as u64,
            offset: start,
            bytes: len * size,
            mem: None,
        })
    }

    fn upload(&self, dtype: DType, bytes: &[u8]) -> Result<CudaBuffer> {
        let mut buf = self.alloc(dtype, bytes.len() / dtype.size())?;
        self.write(&mut buf, dtype, bytes)?;
        Ok(buf)
    }

    fn write(&self, buf: &mut CudaBuffer, dtype: DType, bytes: &[u8]) -> Result<()> {
        if bytes.len() != buf.bytes {
            return Err(Error::Shape(format!(
                "write: {} bytes into a {dtype} buffer of {} bytes",
                bytes.len(),
                buf.bytes
            )));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.stage.upload(&self.stream, bytes, &buf.slice, buf.offset).map_err(|e| dev_err("upload", e))
    }

    fn download(&self, buf: &CudaBuffer, dtype: DType, len: usize) -> Result<Vec<u8>> {
        self.mem.download();
        let n = len * dtype.size();
        if n > buf.bytes {
            return Err(Error::Shape(format!("download: {n} bytes from a buffer of {}", buf.bytes)));
        }
        let mut out = vec![0u8; n];
        if n > 0 {
            self.stage.download(&self.stream, &buf.slice, buf.offset, &mut out).map_err(|e| dev_err("download", e))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    /// `row_invariant` products (`matmul_rows`, an inference step's tokens)
    /// go to `gemm_tiled`, never to cuBLAS: cuBLAS picks its algorithm by
    /// shape (tile sizes, split-K with its partial-sum order), so the same
    /// row can sum in another order when `m` changes, and a sequence's
    /// logits would depend on what it was batched with. `gemm_tiled`
    /// computes `C[i, j]` in one thread as `Σ_p A[i, p]·B[p, j]` with `p`
    /// ascending from 0 to `k` (16-wide shared tiles, zero padding past `k`,
    /// the same fused multiply-adds in every thread), then
    /// `α·acc (+ β·C[i, j])`: nothing in it depends on `m` or on the other
    /// rows, so row `i` of C is the same bits whether A has 1 row or 1000.
    ///
    /// Cost (reasoned, not measured: no GPU here): for decode steps (`m` ≤ 16:
    /// one row of 16×16 tiles) each block streams its 16 columns of B once,
    /// so B is read once as by cuBLAS's GEMV-like kernels, but with one
    /// scalar load per thread and two barriers per 16-deep step only a few
    /// KiB per SM are in flight, far from what HBM needs to run at speed,
    /// and 15 of 16 thread rows compute padding at `m` = 1: expect it several
    /// times (up to ~10×) slower than cuBLAS on these bandwidth-bound
    /// shapes. For prefill chunks (`m` in the hundreds) it runs on CUDA-core
    /// FMAs with two shared-memory loads per FMA and no tensor cores, one to
    /// two orders of magnitude below cuBLAS for f16/bf16. A row-invariant
    /// tensor-core kernel (fixed tile and k order, no split-K) is the fix.
    fn matmul(&self, s: &MatmulSpec, a: &T, b: &T, c: &mut T) -> Result<()> {
        if self.blas.is_some() && !s.row_invariant {
            self.gemm_cublas(s, a, b, c)
        } else {
            self.gemm_fallback(s, a, b, c)
        }
    }
    fn fill(&self, s: &FillSpec, x: &mut T) -> Result<()> {
        let name = format!("fill_{}", sfx(x.dtype()));
        self.launch("elementwise", &name, flat(s.n), &[p(x), u(s.n), Arg::F(s.value)])
    }
    fn add(&self, s: &ElementwiseSpec, a: &T, b: &T, out: &mut T) -> Result<()> {
        let name = format!("add_{}", sfx(a.dtype()));
        self.launch("elementwise", &name, flat(s.n), &[p(a), p(b), p(out), u(s.n)])
    }
    fn axpby(&self, s: &AxpbySpec, x: &T, y: &mut T) -> Result<()> {
        let name = format!("axpby_{}_{}", sfx(x.dtype()), sfx(y.dtype()));
        self.launch("elementwise", &name, flat(s.n), &[p(x), p(y), u(s.n), Arg::F(s.alpha), Arg::F(s.beta)])
    }
    fn scale(&self, s: &ScaleSpec, x: &mut T) -> Result<()> {
        let name = format!("scale_{}", sfx(x.dtype()));
        self.launch("elementwise", &name, flat(s.n), &[p(x), u(s.n), Arg::F(s.s)])
    }
    fn bias_add(&self, s: &BiasSpec, x: &mut T, bias: &T) -> Result<()> {
        let name = format!("bias_add_{}", sfx(x.dtype()));
        let numel = s.rows * s.n;
        self.launch("elementwise", &name, flat(numel), &[p(x), p(bias), u(numel), u(s.n)])
    }
    fn sum_rows(&self, s: &SumRowsSpec, x: &T, out: &mut T) -> Result<()> {
        let name = format!("sum_rows_{}", sfx(x.dtype()));
        self.launch("elementwise", &name, columns(s.n), &[p(x), p(out), u(s.rows), u(s.n), Arg::F(s.beta)])
    }
    fn cast(&self, s: &ElementwiseSpec, x: &T, y: &mut T) -> Result<()> {
        let name = format!("cast_{}_{}", sfx(x.dtype()), sfx(y.dtype()));
        self.launch("cast", &name, flat(s.n), &[p(x), p(y), u(s.n)])
    }
    fn gelu(&self, s: &ElementwiseSpec, x: &T, y: &mut T) -> Result<()> {
        let name = format!("gelu_{}", sfx(x.dtype()));
        self.launch("gelu", &name, flat(s.n), &[p(x), p(y), u(s.n)])
    }
    fn gelu_backward(&self, s: &ElementwiseSpec, x: &T, dy: &T, dx: &mut T) -> Result<()> {
        let name = format!("gelu_backward_{}", sfx(x.dtype()));
        self.launch("gelu", &name, flat(s.n), &[p(x), p(dy), p(dx), u(s.n)])
    }
    fn bias_gelu(&self, s: &BiasSpec, x: &T, bias: &T, y: &mut T) -> Result<()> {
        let name = format!("bias_gelu_{}", sfx(x.dtype()));
        let numel = s.rows * s.n;
        self.launch("gelu", &name, flat(numel), &[p(x), p(bias), p(y), u(numel), u(s.n)])
    }
    fn layernorm(
        &self,
        s: &LayerNormSpec,
        x: &T,
        gamma: &T,
        beta: &T,
        y: &mut T,
        mean: &mut T,
        rstd: &mut T,
    ) -> Result<()> {
        let name = format!("layernorm_fwd_{}", sfx(x.dtype()));
        let args = [p(x), p(gamma), p(beta), p(y), p(mean), p(rstd), u(s.rows), u(s.n), Arg::F(s.eps)];
        self.launch("layernorm", &name, per_warp(s.rows, 8), &args)
    }
    fn layernorm_backward(
        &self,
        s: &LayerNormSpec,
        dy: &T,
        x: &T,
        gamma: &T,
        mean: &T,
        rstd: &T,
        dx: &mut T,
        dgamma: &mut T,
        dbeta: &mut T,
    ) -> Result<()> {
        let dt = sfx(x.dtype());
        let args = [p(dy), p(x), p(gamma), p(mean), p(rstd), p(dx), u(s.rows), u(s.n)];
        self.launch("layernorm", &format!("layernorm_bwd_dx_{dt}"), per_warp(s.rows, 8), &args)?;
        let args = [p(dy), p(x), p(mean), p(rstd), p(dgamma), p(dbeta), u(s.rows), u(s.n)];
        self.launch("layernorm", &format!("layernorm_bwd_params_{dt}"), columns(s.n), &args)
    }
    fn softmax(&self, s: &SoftmaxSpec, x: &T, y: &mut T) -> Result<()> {
        let name = format!("softmax_fwd_{}", sfx(x.dtype()));
        let args = [p(x), p(y), u(s.rows), u(s.n), u(s.t.max(1)), u(s.causal as usize)];
        self.launch("softmax", &name, per_warp(s.rows, 8), &args)
    }
    fn softmax_backward(&self, s: &SoftmaxSpec, y: &T, dy: &T, dx: &mut T) -> Result<()> {
        let name = format!("softmax_bwd_{}", sfx(y.dtype()));
        let args = [p(y), p(dy), p(dx), u(s.rows), u(s.n), u(s.t.max(1)), u(s.causal as usize)];
        self.launch("softmax", &name, per_warp(s.rows, 8), &args)
    }
    fn rope(&self, s: &RopeSpec, x: &T, cos: &T, sin: &T, y: &mut T) -> Result<()> {
        let name = format!("rope_{}", sfx(x.dtype()));
        let half = s.head_dim / 2;
        let pairs = s.batch * s.seq * s.heads * half;
        let sign = if s.inverse { -1.0 } else { 1.0 };
        let args = [p(x), p(cos), p(sin), p(y), u(pairs), u(s.seq), u(s.heads), u(half), u(s.pos_offset), Arg::F(sign)];
        self.launch("rope", &name, flat(pairs), &args)
    }
    fn embedding(&self, s: &EmbeddingSpec, ids: &T, table: &T, out: &mut T) -> Result<()> {
        let name = format!("embedding_fwd_{}", sfx(table.dtype()));
        let args = [p(ids), p(table), p(out), u(s.n), u(s.vocab), u(s.dim)];
        self.launch("embedding", &name, flat(s.n * s.dim), &args)
    }
    fn embedding_backward(&self, s: &EmbeddingSpec, ids: &T, dout: &T, dtable: &mut T) -> Result<()> {
        let name = format!("embedding_bwd_{}", sfx(dtable.dtype()));
        let threads = (s.dim.div_ceil(32) * 32).clamp(32, 256) as u32;
        let args = [p(ids), p(dout), p(dtable), u(s.n), u(s.vocab), u(s.dim)];
        self.launch("embedding", &name, per_block(s.n, threads), &args)
    }
    fn cross_entropy(&self, s: &CrossEntropySpec, logits: &T, targets: &T, losses: &mut T) -> Result<()> {
        let name = format!("ce_fwd_{}", sfx(logits.dtype()));
        let args = [p(logits), p(targets), p(losses), u(s.vocab), Arg::U(s.ignore_index)];
        self.launch("cross_entropy", &name, per_block(s.rows, THREADS), &args)
    }
    fn cross_entropy_backward(&self, s: &CrossEntropySpec, logits: &T, targets: &T, dlogits: &mut T) -> Result<()> {
        let name = format!("ce_bwd_{}", sfx(logits.dtype()));
        let args = [p(logits), p(targets), p(dlogits), u(s.vocab), Arg::U(s.ignore_index), Arg::F(s.grad_scale)];
        self.launch("cross_entropy", &name, per_block(s.rows, THREADS), &args)
    }
    fn sum_squares(&self, s: &ReduceSpec, x: &T, out: &mut T) -> Result<()> {
        let blocks = s.n.div_ceil(THREADS as usize).clamp(1, 1024);
        let partials = self.scratch(DType::F32, 2 * blocks)?;
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let name = format!("sum_squares_partial_{}", sfx(x.dtype()));
        self.launch("reduce", &name, cfg, &[p(x), u(s.n), Arg::P(partials.ptr)])?;
        self.launch("reduce", "sum_squares_final", per_block(1, THREADS), &[Arg::P(partials.ptr), u(blocks), p(out)])
    }
    fn all_finite(&self, s: &ReduceSpec, x: &T, out: &mut T) -> Result<()> {
        self.launch("reduce", "set_u32", per_block(1, 32), &[p(out), Arg::U(1)])?;
        let blocks = s.n.div_ceil(THREADS as usize).clamp(1, 4096) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        self.launch("reduce", &format!("all_finite_{}", sfx(x.dtype())), cfg, &[p(x), u(s.n), p(out)])
    }
    fn adamw(
        &self,
        s: &AdamWSpec,
        params: &mut T,
        grads: &T,
        m: &mut T,
        v: &mut T,
        copy: Option<&mut T>,
    ) -> Result<()> {
        let (name, cp, has) = match copy {
            Some(c) => (format!("adamw_{}", sfx(c.dtype())), p(c), 1),
            None => ("adamw_f32".to_string(), Arg::P(0), 0),
        };
        let args = [
            p(params),
            p(grads),
            p(m),
            p(v),
            cp,
            Arg::U(has),
            u(s.n),
            Arg::F(s.lr),
            Arg::F(s.beta1),
            Arg::F(s.beta2),
            Arg::F(s.eps),
            Arg::F(s.weight_decay),
            Arg::F(s.bc1),
            Arg::F(s.bc2),
            Arg::F(s.grad_scale),
        ];
        self.launch("adamw", &name, flat(s.n), &args)
    }

    fn attention(&self, s: &AttentionSpec, q: &T, k: &T, v: &T, idx: Option<&T>, o: &mut T, lse: &mut T) -> Result<()> {
        let ip = idx.map(p).unwrap_or(Arg::P(0));
        let args = [Arg::Attn(attn_args(s)), p(q), p(k), p(v), ip, p(o), p(lse)];
        if self.tiled(s) {
            let n = dpl(s.head_dim);
            let name = format!("attn_fwd_tiled_{}_d{n}", sfx(q.dtype()));
            return self.launch("attention", &name, tile_grid(s, s.n_heads, tiled_smem(3, 1, n, s.seq)), &args);
        }
        let name = format!("attn_fwd_{}_d{}", sfx(q.dtype()), dpl(s.head_dim));
        let rows = s.batch * s.n_heads * s.seq;
        self.launch("attention", &name, per_warp(rows, 4), &args)
    }
    fn attention_backward(
        &self,
        s: &AttentionSpec,
        q: &T,
        k: &T,
        v: &T,
        o: &T,
        lse: &T,
        d_o: &T,
        idx: Option<&T>,
        dq: &mut T,
        dk: &mut T,
        dv: &mut T,
    ) -> Result<()> {
        let (dt, n) = (sfx(q.dtype()), dpl(s.head_dim));
        let a = Arg::Attn(attn_args(s));
        let ip = idx.map(p).unwrap_or(Arg::P(0));
        let qrows = s.batch * s.n_heads * s.seq;
        let d = self.scratch(DType::F32, qrows)?;
        let dp = Arg::P(d.ptr);
        self.launch("attention", &format!("attn_bwd_pre_{dt}_d{n}"), per_warp(qrows, 4), &[a, p(o), p(d_o), dp])?;
        let args = [a, p(q), p(k), p(v), p(lse), dp, p(d_o), ip, p(dq)];
        if self.tiled(s) {
            let cfg = tile_grid(s, s.n_heads, tiled_smem(4, 1, n, s.seq));
            self.launch("attention", &format!("attn_bwd_dq_tiled_{dt}_d{n}"), cfg, &args)?;
            let args = [a, p(q), p(k), p(v), p(lse), dp, p(d_o), ip, p(dk), p(dv)];
            let cfg = tile_grid(s, s.n_kv_heads, tiled_smem(4, 2, n, s.seq));
            return self.launch("attention", &format!("attn_bwd_dkdv_tiled_{dt}_d{n}"), cfg, &args);
        }
        self.launch("attention", &format!("attn_bwd_dq_{dt}_d{n}"), per_warp(qrows, 4), &args)?;
        // Tokens: the inverse index (per key, its queries ascending).
        let keys = s.batch * s.seq;
        let mut csr = None;
        if let (PatternSpec::Tokens { k: kk }, Some(idx)) = (s.pattern, idx) {
            let entries = keys * kk;
            let count = self.scratch(DType::U32, keys)?;
            let off = self.scratch(DType::U32, keys + 1)?;
            let cursor = self.scratch(DType::U32, keys)?;
            let list = self.scratch(DType::U32, entries)?;
            let sorted = self.scratch(DType::U32, entries)?;
            self.launch("attention", "csr_zero", flat(keys), &[Arg::P(count.ptr), u(keys)])?;
            let cargs = [p(idx), Arg::P(count.ptr), u(s.batch), u(s.seq), u(kk)];
            self.launch("attention", "csr_count", flat(entries), &cargs)?;
            let sargs = [Arg::P(count.ptr), Arg::P(off.ptr), Arg::P(cursor.ptr), u(keys)];
            self.launch("attention", "csr_scan", per_block(1, 1024), &sargs)?;
            let fargs = [p(idx), Arg::P(cursor.ptr), Arg::P(list.ptr), u(s.batch), u(s.seq), u(kk)];
            self.launch("attention", "csr_fill", flat(entries), &fargs)?;
            let oargs = [Arg::P(off.ptr), Arg::P(list.ptr), Arg::P(sorted.ptr), u(keys)];
            self.launch("attention", "csr_sort", per_warp(keys, 4), &oargs)?;
            csr = Some((off, sorted, count, cursor, list));
        }
        let (offp, listp) = csr.as_ref().map(|c| (Arg::P(c.0.ptr), Arg::P(c.1.ptr))).unwrap_or((Arg::P(0), Arg::P(0)));
        let krows = s.batch * s.n_kv_heads * s.seq;
        let args = [a, p(q), p(k), p(v), p(lse), dp, p(d_o), ip, offp, listp, p(dk), p(dv)];
        self.launch("attention", &format!("attn_bwd_dkdv_{dt}_d{n}"), per_warp(krows, 4), &args)
        // Scratch buffers drop here: their frees are ordered after the kernels on the stream.
    }
    fn indexer_scores(&self, s: &IndexerSpec, qi: &T, ki: &T, w: &T, scores: &mut T) -> Result<()> {
        check_index_dim("indexer_scores", s)?;
        // One 16×16 block per (16 keys, 16 of the tile's queries, batch entry).
        let cfg = LaunchConfig {
            grid_dim: (s.seq.div_ceil(16) as u32, s.rows.div_ceil(16) as u32, s.batch as u32),
            block_dim: (16, 16, 1),
            shared_mem_bytes: (16 * (s.dim + 1) * 4) as u32,
        };
        let name = format!("indexer_scores_{}", sfx(qi.dtype()));
        let args = [p(qi), p(ki), p(w), p(scores), u(s.seq), u(s.heads), u(s.dim), u(s.q0), u(s.rows)];
        self.launch("indexer", &name, cfg, &args)
    }
    fn indexer_block_scores(&self, s: &IndexerSpec, qi: &T, ki: &T, w: &T, pooled: &mut T) -> Result<()> {
        check_index_dim("indexer_block_scores", s)?;
        if s.seq.div_ceil(16) > 65535 || s.batch > 65535 {
            return Err(Error::Shape(format!(
                "indexer_block_scores: the CUDA backend takes seq up to {} and batch up to 65535, got seq {} batch {}",
                65535 * 16,
                s.seq,
                s.batch
            )));
        }
        // One 16×16 block per (key block, 16-query tile, batch entry): pooled
        // is per query, [batch, seq, nkb].
        let cfg = LaunchConfig {
            grid_dim: (s.n_blocks() as u32, s.seq.div_ceil(16) as u32, s.batch as u32),
            block_dim: (16, 16, 1),
            shared_mem_bytes: (16 * (s.dim + 1) * 4) as u32,
        };
        let name = format!("indexer_block_scores_{}", sfx(qi.dtype()));
        let args = [p(qi), p(ki), p(w), p(pooled), u(s.seq), u(s.heads), u(s.dim), u(s.block)];
        self.launch("indexer", &name, cfg, &args)
    }
    fn select_topk(&self, s: &SelectSpec, scores: &T, idx: &mut T) -> Result<()> {
        // block 0: tokens; block > 0: row t chooses among the key blocks 0..=t/block.
        let args = [p(scores), p(idx), u(s.rows), u(s.cols), u(s.k), u(s.block)];
        self.launch("select", "select_topk", per_block(s.batch * s.rows, THREADS), &args)
    }
    fn indexer_kl(
        &self,
        ls: &IndexerLossSpec,
        q: &T,
        k: &T,
        lse: &T,
        scores: &T,
        idx: Option<&T>,
        loss: &mut T,
        dscores: &mut T,
    ) -> Result<()> {
        let s = &ls.attn;
        let name = format!("indexer_kl_{}_d{}", sfx(q.dtype()), dpl(s.head_dim));
        let ip = idx.map(p).unwrap_or(Arg::P(0));
        let args = [
            Arg::Attn(attn_args(s)),
            p(q),
            p(k),
            p(lse),
            p(scores),
            ip,
            p(loss),
            p(dscores),
            u(ls.q0),
            u(ls.rows),
            u(ls.sample.every),
            u(ls.sample.phase),
        ];
        self.launch("attention", &name, per_warp(s.batch * ls.rows, 4), &args)
    }
    fn indexer_backward(
        &self,
        s: &IndexerSpec,
        qi: &T,
        ki: &T,
        w: &T,
        dscores: &T,
        dqi: &mut T,
        dki: &mut T,
        dw: &mut T,
    ) -> Result<()> {
        check_index_dim("indexer_backward", s)?;
        let (dt, n) = (sfx(qi.dtype()), dpl(s.dim));
        let dims = [u(s.batch), u(s.seq), u(s.heads), u(s.dim), u(s.q0), u(s.rows)];
        let [b, sq, h, d, q0, nq] = dims;
        let args = [p(qi), p(ki), p(w), p(dscores), p(dqi), p(dw), b, sq, h, d, q0, nq];
        // dq_i, dw: a warp per (batch, tile query, head); dk_i: a warp per (batch, key).
        self.launch("indexer", &format!("indexer_bwd_q_{dt}_d{n}"), per_warp(s.batch * s.rows * s.heads, 4), &args)?;
        let args = [p(qi), p(ki), p(w), p(dscores), p(dki), b, sq, h, d, q0, nq];
        self.launch("indexer", &format!("indexer_bwd_k_{dt}_d{n}"), per_warp(s.batch * s.seq, 4), &args)
    }
    fn rope_rows(&self, s: &RopeSpec, x: &T, cos: &T, sin: &T, rows: &T, y: &mut T) -> Result<()> {
        cached::rope_rows(self, s, x, cos, sin, rows, y)
    }
    fn cache_write(&self, s: &CacheWriteSpec, src: &T, rows: &T, pages: &T, cache: &mut T) -> Result<()> {
        cached::cache_write(self, s, src, rows, pages, cache)
    }
    fn cached_attention(
        &self,
        s: &CachedAttentionSpec,
        q: &T,
        k: &T,
        v: &T,
        rows: &T,
        pages: &T,
        idx: Option<&T>,
        o: &mut T,
    ) -> Result<()> {
        cached::cached_attention(self, s, q, k, v, rows, pages, idx, o)
    }
    fn cached_indexer_block_scores(
        &self,
        s: &CachedIndexerSpec,
        qi: &T,
        w: &T,
        ki: &T,
        rows: &T,
        pages: &T,
        pooled: &mut T,
    ) -> Result<()> {
        cached::cached_indexer_block_scores(self, s, qi, w, ki, rows, pages, pooled)
    }
    fn cached_select(&self, s: &CachedSelectSpec, scores: &T, rows: &T, idx: &mut T) -> Result<()> {
        cached::cached_select(self, s, scores, rows, idx)
    }
    fn qmatmul(&self, s: &QMatmulSpec, x: &T, w: &QWeight<Self>, y: &mut T) -> Result<()> {
        super::qmatmul::qmatmul(self, s, x, w, y)
    }
}
