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

pub(super) fn qmatmul(be: &CudaBackend, s: &QMatmulSpec, x: &T, w: &QWeight<CudaBackend>, y: &mut T) -> Result<()> {
    let (group, asym) = match s.format {
        QFormat::Int4 { group, asym } => (group, asym),
        _ => (0, false),
    };
    let (kind, rows_per_block) = if s.m < QMM_MIN_ROWS { ("qmv", 1) } else { ("qmm", QMM_ROWS) };
    let name = format!("{kind}_{}_{}", format_name(s.format), sfx(x.dtype()));
    // Absent parts are null pointers: the kernel of a format never reads them.
    let ptr = |t: Option<&T>| Arg::P(t.map_or(0, |t| t.buf.ptr));
    let aux = w.zero.as_ref().or(w.meta.as_ref());
    for (row0, rows) in row_chunks(s.m, rows_per_block) {
        let cfg = LaunchConfig {
            grid_dim: (s.n.div_ceil(CHANNELS) as u32, rows.div_ceil(rows_per_block) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::P(x.buf.ptr),
            Arg::P(w.q.buf.ptr),
            ptr(w.scale.as_ref()),
            ptr(aux),
            Arg::P(y.buf.ptr),
            Arg::U(s.m as u32),
            Arg::U(s.n as u32),
            Arg::U(s.k as u32),
            Arg::U(group as u32),
            Arg::U(asym as u32),
            Arg::U(row0 as u32),
        ];
        be.launch(FAMILY, &name, cfg, &args)?;
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
}
