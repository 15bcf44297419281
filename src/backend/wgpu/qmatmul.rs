//! `y = x · Wᵀ` with a quantized weight on wgpu (`shaders/qmatmul.wgsl`).
//!
//! One kernel, `qmm`, for every `m`: a workgroup takes four output channels
//! and up to eight rows, splits k over its 64 invocations, accumulates with
//! explicit `fma` in a fixed order and adds the 64 partials in a fixed
//! order. A decode row (m = 1) runs the same kernel with one of its eight
//! row slots active, i.e. as a matrix-vector product: one pipeline, so a
//! row's arithmetic is the same instructions alone or in any batch on every
//! driver (a separate GEMV pipeline could fuse multiply-adds differently);
//! the conformance test `qmatmul` checks it bit for bit.
//!
//! The hardware variant ([`KernelVariant::Hardware`]) runs the same tile
//! on 256 invocations, `qmm_hw` (a workgroup-memory tree over the partials)
//! or `qmm_hw_sg` (subgroup sums, where the device has subgroups and
//! `DYNSPARSE_WGPU_SUBGROUPS` is not 0): again one pipeline for every m, so
//! the bit-for-bit batch invariance holds per variant.
//!
//! No optional feature is needed by `qmm` and `qmm_hw`: codes are read as `u32` words, f16 2:4
//! values with `unpack2x16float`. `dot4I8Packed` is not used: the rule
//! multiplies scale·q in f32 and then by a float x, which an integer dot
//! product cannot reproduce (it would quantize x and round differently).

use super::{Arg, KernelVariant, WgpuBackend};
use crate::error::Result;
use crate::ops::{QMatmulSpec, QWeight};
use crate::quant::QFormat;
use crate::{DType, Tensor};

type T = Tensor<WgpuBackend>;

/// `QMM_ROWS` of qmatmul.wgsl.
const QMM_ROWS: usize = 8;
/// Output channels per workgroup.
const CHANNELS: usize = 4;
/// Largest workgroup count per grid dimension WebGPU guarantees.
const MAX_GRID: usize = 65_535;

crate::wgsl_params! {
    /// `qmm*`: y [m, n] = x [m, k] · Wᵀ, the weight format's code, the int4
    /// group size and the first row of the launch.
    pub struct QmmParams { m: u32, n: u32, k: u32, format: u32, group: u32, row0: u32 }
}

/// The kernel of `be`'s variant (and subgroup choice).
fn kernel_name(be: &WgpuBackend) -> &'static str {
    match (be.kernel_variant(), be.subgroups()) {
        (KernelVariant::Software, _) => "qmm",
        (KernelVariant::Hardware, false) => "qmm_hw",
        (KernelVariant::Hardware, true) => "qmm_hw_sg",
    }
}

/// The shader's format code (`QmmParams::format`).
fn format_code(f: QFormat) -> u32 {
    match f {
        QFormat::Int8 => 0,
        QFormat::Int4 { asym: false, .. } => 1,
        QFormat::Int4 { asym: true, .. } => 2,
        QFormat::Sparse24 { int8: false } => 3,
        QFormat::Sparse24 { int8: true } => 4,
    }
}

/// The channel tiles folded into grid x and y.
fn channel_grid(n: usize) -> (u32, u32) {
    let tiles = n.div_ceil(CHANNELS);
    let gx = tiles.clamp(1, MAX_GRID);
    (gx as u32, tiles.div_ceil(gx) as u32)
}

pub(super) fn qmatmul(be: &WgpuBackend, s: &QMatmulSpec, x: &T, w: &QWeight<WgpuBackend>, y: &mut T) -> Result<()> {
    let group = match s.format {
        QFormat::Int4 { group, .. } => group,
        _ => 0,
    };
    // Absent parts bind a stand-in the kernel never reads for that format.
    let dummy;
    let scale = match &w.scale {
        Some(t) => t,
        None => {
            dummy = T::empty(be, &[1], DType::F32)?;
            &dummy
        }
    };
    let aux = w.zero.as_ref().or(w.meta.as_ref()).unwrap_or(&w.q);
    let (gx, gy) = channel_grid(s.n);
    // Row chunks of at most MAX_GRID workgroups along z.
    let chunk = MAX_GRID * QMM_ROWS;
    let mut row0 = 0;
    while row0 < s.m {
        let rows = (s.m - row0).min(chunk);
        let p = QmmParams {
            m: s.m as u32,
            n: s.n as u32,
            k: s.k as u32,
            format: format_code(s.format),
            group: group as u32,
            row0: row0 as u32,
        };
        let gz = rows.div_ceil(QMM_ROWS) as u32;
        let args = &mut [Arg::R(x), Arg::R(&w.q), Arg::R(scale), Arg::R(aux), Arg::W(&mut *y)];
        be.launch("qmatmul", kernel_name(be), args, &p, [gx, gy, gz])?;
        row0 += rows;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_tiles_fold_under_the_grid_limit() {
        assert_eq!(channel_grid(1), (1, 1));
        assert_eq!(channel_grid(37), (10, 1));
        // A 300k-row vocabulary projection: 75k tiles over two rows of the grid.
        let (gx, gy) = channel_grid(300_000);
        assert!(gx as usize <= MAX_GRID && gx as usize * gy as usize * CHANNELS >= 300_000, "{gx}×{gy}");
    }
}
