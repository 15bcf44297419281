//! Embedding lookup and its scatter-add gradient on the host.

use super::{CpuBackend, chunked, rd};
use crate::Tensor;
use crate::ops::EmbeddingSpec;

type T = Tensor<CpuBackend>;

pub(super) fn forward(s: &EmbeddingSpec, ids: &T, table: &T, out: &mut T) {
    let (ids, table) = (ids.buf.u32s(), rd(table));
    if s.dim == 0 {
        return;
    }
    // Tasks of whole rows; f16/bf16 rounded per task (see [`chunked`]).
    chunked(&mut out.buf, [], (8192 / s.dim).max(1) * s.dim, false, |first, [], o| {
        for (o, &id) in o.chunks_mut(s.dim).zip(&ids[first / s.dim..]) {
            let id = id as usize;
            if id < s.vocab {
                o.copy_from_slice(&table[id * s.dim..(id + 1) * s.dim]);
            } else {
                o.fill(0.0);
            }
        }
    });
}

/// Sums in increasing token order, per column, exactly as the GPU kernels do.
pub(super) fn backward(s: &EmbeddingSpec, ids: &T, dout: &T, dtable: &mut T) {
    let (ids, dout) = (ids.buf.u32s(), rd(dout));
    dtable.buf.update(|t| {
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id < s.vocab {
                let row = &mut t[id * s.dim..(id + 1) * s.dim];
                row.iter_mut().zip(&dout[i * s.dim..(i + 1) * s.dim]).for_each(|(t, d)| *t += d);
            }
        }
    });
}
