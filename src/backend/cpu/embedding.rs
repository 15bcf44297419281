//! Embedding lookup and its scatter-add gradient on the host.

use rayon::prelude::*;

use super::{CpuBackend, rd};
use crate::Tensor;
use crate::ops::EmbeddingSpec;

type T = Tensor<CpuBackend>;

pub(super) fn forward(s: &EmbeddingSpec, ids: &T, table: &T, out: &mut T) {
    let (ids, table) = (ids.buf.u32s(), rd(table));
    out.buf.produce(|o| {
        o.par_chunks_mut(s.dim).zip(&ids[..]).for_each(|(o, &id)| {
            let id = id as usize;
            if id < s.vocab {
                o.copy_from_slice(&table[id * s.dim..(id + 1) * s.dim]);
            } else {
                o.fill(0.0);
            }
        })
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
