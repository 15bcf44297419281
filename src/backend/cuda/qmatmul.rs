//! `y = x · Wᵀ` with a quantized weight on CUDA (`kernels/qmatmul.cu`).
//!
//! `qmv_<format>_<dtype>` (one row per block) runs for `m < QMM_MIN_ROWS`,
//! `qmm_<format>_<dtype>` (8 rows per block) otherwise. Both sum every output
//! in one order (k split over the block's 128 threads in units of four
//! inputs, explicit `fmaf`, a fixed reduction tree), so the product is batch
//! invariant: a row has the same bits alone or in any batch, whichever
//! kernel ran (the CUDA emulation checks it, `scripts/emulate-cuda-kernels.sh`).
//!
//! Weights are dequantized in registers by the exact rule and multiplied
//! with FFMA in f32. No `dp4a`/`mma` (int8) or `mma.sp` (2:4): those need x
//! as integers or f16/bf16 inputs to the tensor cores, and the product would
//! no longer be the defined `Σ x·(scale·q)` in f32.

use cudarc::driver::LaunchConfig;

use super::{Arg, CudaBackend, sfx};
use crate::Tensor;
use crate::error::Result;
use crate::ops::{QMatmulSpec, QWeight};
use crate::quant::QFormat;

type T = Tensor<CudaBackend>;

const FAMILY: &str = "qmatmul";
/// `QM_THREADS`, `QM_CH`, `QMM_ROWS` of qmatmul.cu.
const THREADS: u32 = 128;
const CHANNELS: usize = 4;
const QMM_ROWS: usize = 8;
/// Rows from which `qmm` runs instead of `qmv`.
const QMM_MIN_ROWS: usize = 4;
/// Largest grid y.
const GRID_Y: usize = 65_535;

/// The entry-point infix of a format (`int4` covers both int4 variants: `asym` is an argument).
fn format_name(f: QFormat) -> &'static str {
    match f {
        QFormat::Int8 => "int8",
        QFormat::Int4 { .. } => "int4",
        QFormat::Sparse24 { int8: false } => "s24",
        QFormat::Sparse24 { int8: true } => "s24i8",
    }
}

/// Launches of `(row0, rows)`: at most `GRID_Y` row tiles each.
fn row_chunks(m: usize, rows_per_block: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = GRID_Y * rows_per_block;
    (0..m).step_by(chunk).map(move |r0| (r0, (m - r0).min(chunk)))
}

/// The kernel's arguments in the order of its C signature: `x, q, scale, aux, y`
/// (device addresses, 0 for an absent part), then `m, n, k, group, asym, row0`.
fn args(ptrs: [u64; 5], dims: [usize; 6]) -> [Arg; 11] {
    let [x, q, scale, aux, y] = ptrs.map(Arg::P);
    let [m, n, k, group, asym, row0] = dims.map(|v| Arg::U(v as u32));
    [x, q, scale, aux, y, m, n, k, group, asym, row0]
}

/// The entry point for `m` rows: `qmv_*` or `qmm_*`, and its rows per block.
fn entry(f: QFormat, m: usize, dtype: crate::DType) -> (String, usize) {
    let (kind, rows) = if m < QMM_MIN_ROWS { ("qmv", 1) } else { ("qmm", QMM_ROWS) };
    (format!("{kind}_{}_{}", format_name(f), sfx(dtype)), rows)
}

pub(super) fn qmatmul(be: &CudaBackend, s: &QMatmulSpec, x: &T, w: &QWeight<CudaBackend>, y: &mut T) -> Result<()> {
    let (group, asym) = match s.format {
        QFormat::Int4 { group, asym } => (group, asym),
        _ => (0, false),
    };
    let (name, rows_per_block) = entry(s.format, s.m, x.dtype());
    // Absent parts are null pointers: the kernel of a format never reads them.
    let addr = |t: Option<&T>| t.map_or(0, |t| t.buf.ptr);
    let ptrs = [x.buf.ptr, w.q.buf.ptr, addr(w.scale.as_ref()), addr(w.zero.as_ref().or(w.meta.as_ref())), y.buf.ptr];
    for (row0, rows) in row_chunks(s.m, rows_per_block) {
        let cfg = LaunchConfig {
            grid_dim: (s.n.div_ceil(CHANNELS) as u32, rows.div_ceil(rows_per_block) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        be.launch(FAMILY, &name, cfg, &args(ptrs, [s.m, s.n, s.k, group, asym as usize, row0]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_into_launches_under_the_grid_limit() {
        assert_eq!(row_chunks(3, 1).collect::<Vec<_>>(), vec![(0, 3)]);
        assert_eq!(row_chunks(33, 8).collect::<Vec<_>>(), vec![(0, 33)]);
        let big = GRID_Y * 8 + 5;
        assert_eq!(row_chunks(big, 8).collect::<Vec<_>>(), vec![(0, GRID_Y * 8), (GRID_Y * 8, 5)]);
        assert_eq!(row_chunks(0, 8).count(), 0);
    }

    /// Every entry point's PTX parameters are the sizes `args` passes (what
    /// `CudaBackend::launch` checks at run time), for both kernels of every
    /// format and dtype. Needs NVRTC (skipped without it).
    #[test]
    fn arguments_match_every_entry_points_ptx_signature() {
        use crate::backend::cuda::kernels;
        if let Err(why) = kernels::nvrtc_status() {
            println!("skipped: NVRTC not found ({why})");
            return;
        }
        let ptx = kernels::ptx_for(FAMILY, (9, 0)).unwrap();
        let given: Vec<usize> = args([0; 5], [0; 6]).iter().map(Arg::size).collect();
        let formats = [
            QFormat::Int8,
            QFormat::Int4 { group: 32, asym: true },
            QFormat::Sparse24 { int8: false },
            QFormat::Sparse24 { int8: true },
        ];
        let mut seen = 0;
        for f in formats {
            for dt in crate::DType::FLOATS {
                for m in [1, QMM_MIN_ROWS] {
                    let (name, _) = entry(f, m, dt);
                    assert_eq!(kernels::entry_param_sizes(&ptx, &name), Some(given.clone()), "{name}");
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 24);
    }
}
