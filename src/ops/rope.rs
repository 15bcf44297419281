//! Rotary position embedding, half-split ("rotate_half") convention.
//!
//! `x` is `[batch?, seq, heads, head_dim]`. For token `s` at position
//! `p = pos_offset + s` and `i < head_dim/2`, with `c = cos[p, i]`,
//! `sn = sin[p, i]` from a [`RopeTable`] (`angle = p·theta^(-2i/head_dim)`):
//! `y[i] = x[i]·c - x[i+h/2]·sn`, `y[i+h/2] = x[i]·sn + x[i+h/2]·c`.
//! The backward pass is the inverse rotation (`sn → -sn`).
//!
//! The angles are tabulated on the host in f64, so every backend rotates by
//! exactly the same f32 cos/sin (GPU `sin` of large arguments is imprecise).

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeSpec {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub pos_offset: usize,
    /// Rotate by `-angle` (the backward pass).
    pub inverse: bool,
    pub checked: Checked,
}

/// `cos` and `sin` tables, each `[max_pos, head_dim/2]` F32.
pub struct RopeTable<B: Backend> {
    pub cos: Tensor<B>,
    pub sin: Tensor<B>,
    pub max_pos: usize,
    pub head_dim: usize,
}

impl<B: Backend> RopeTable<B> {
    pub fn new(be: &B, max_pos: usize, head_dim: usize, theta: f64) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) || max_pos == 0 {
            return Err(Error::Invalid(format!(
                "rope table: head_dim = {head_dim} must be even and positive, max_pos = {max_pos} positive"
            )));
        }
        let (c, s) = Self::host_tables(max_pos, head_dim, theta);
        let half = head_dim / 2;
        Ok(RopeTable {
            cos: Tensor::from_f32(be, &c, &[max_pos, half], DType::F32)?,
            sin: Tensor::from_f32(be, &s, &[max_pos, half], DType::F32)?,
            max_pos,
            head_dim,
        })
    }

    /// The tables as host vectors (row-major `[max_pos, head_dim/2]`).
    pub fn host_tables(max_pos: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
        let half = head_dim / 2;
        let mut c = Vec::with_capacity(max_pos * half);
        let mut s = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let freq = theta.powf(-2.0 * i as f64 / head_dim as f64);
                let a = p as f64 * freq;
                c.push(a.cos() as f32);
                s.push(a.sin() as f32);
            }
        }
        (c, s)
    }
}

fn spec<B: Backend>(
    be: &B,
    op: &'static str,
    x: &Tensor<B>,
    table: &RopeTable<B>,
    pos_offset: usize,
    inverse: bool,
) -> Result<RopeSpec> {
    check_float(be, op, "x", x)?;
    check_nonempty(op, "x", x)?;
    let (batch, seq, heads, head_dim) = match *x.shape() {
        [b, s, h, d] => (b, s, h, d),
        [s, h, d] => (1, s, h, d),
        _ => {
            return Err(Error::Shape(format!(
                "{op}: x must be [batch, seq, heads, head_dim] or [seq, heads, head_dim], got {}",
                fmt_shape(x.shape())
            )));
        }
    };
    if head_dim != table.head_dim {
        return Err(Error::Shape(format!(
            "{op}: x has head_dim {head_dim} but the table was built for {}",
            table.head_dim
        )));
    }
    check_dtype(op, "cos", &table.cos, DType::F32)?;
    check_dtype(op, "sin", &table.sin, DType::F32)?;
    if op != "rope_rows" && pos_offset + seq > table.max_pos {
        return Err(Error::Shape(format!(
            "{op}: positions {pos_offset}..{} exceed the table's {} positions",
            pos_offset + seq,
            table.max_pos
        )));
    }
    check_u32(op, "numel", x.numel())?;
    Ok(RopeSpec { batch, seq, heads, head_dim, pos_offset, inverse, checked: CHECKED })
}

/// `y = rope(x)` at positions `pos_offset..pos_offset+seq`.
pub fn rope<B: Backend>(
    be: &B,
    x: &Tensor<B>,
    table: &RopeTable<B>,
    pos_offset: usize,
    y: &mut Tensor<B>,
) -> Result<()> {
    check_same_dtype("rope", &[("x", x), ("y", &*y)])?;
    check_same_shape("rope", &[("x", x), ("y", &*y)])?;
    let s = spec(be, "rope", x, table, pos_offset, false)?;
    be.rope(&s, x, &table.cos, &table.sin, y)
}

/// `dx = rope⁻¹(dy)`: the gradient of [`rope`] (a rotation, so its transpose is its inverse).
pub fn rope_backward<B: Backend>(
    be: &B,
    dy: &Tensor<B>,
    table: &RopeTable<B>,
    pos_offset: usize,
    dx: &mut Tensor<B>,
) -> Result<()> {
    check_same_dtype("rope_backward", &[("dy", dy), ("dx", &*dx)])?;
    check_same_shape("rope_backward", &[("dy", dy), ("dx", &*dx)])?;
    let s = spec(be, "rope_backward", dy, table, pos_offset, true)?;
    be.rope(&s, dy, &table.cos, &table.sin, dx)
}

/// `y = rope(x)` for query rows of a KV-cache step: `x`, `y` are
/// `[R, heads, head_dim]` and row `r` is rotated to its own position
/// `len - 1` from the row table `rows` (U32 `[R, 2]` = `(base, len)`, see
/// [`crate::attention::cached`]). Positions past the table are an error of
/// the caller (the engine checks them); kernels clamp them to the table.
pub fn rope_rows<B: Backend>(
    be: &B,
    x: &Tensor<B>,
    table: &RopeTable<B>,
    rows: &Tensor<B>,
    y: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "rope_rows";
    check_same_dtype(OP, &[("x", x), ("y", &*y)])?;
    check_same_shape(OP, &[("x", x), ("y", &*y)])?;
    if x.shape().len() != 3 {
        return Err(Error::Shape(format!("{OP}: x must be [rows, heads, head_dim], got {}", fmt_shape(x.shape()))));
    }
    let s = spec(be, OP, x, table, 0, false)?;
    check_dtype(OP, "rows", rows, DType::U32)?;
    if rows.shape() != [s.seq, 2] {
        return Err(Error::Shape(format!(
            "{OP}: the row table must be [{}, 2], got {}",
            s.seq,
            fmt_shape(rows.shape())
        )));
    }
    be.rope_rows(&RopeSpec { pos_offset: 0, ..s }, x, &table.cos, &table.sin, rows, y)
}
