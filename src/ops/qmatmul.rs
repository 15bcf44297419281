//! Matrix product with a quantized weight: `y = x · Wᵀ`, W dequantized in
//! the inner loop (formats and the exact dequantization rule:
//! [`crate::quant::format`]).

use super::{CHECKED, Checked, check_dtype, check_float, check_nonempty, check_same_dtype, check_u32};
use crate::backend::Backend;
use crate::error::{Error, Result, fmt_shape};
use crate::quant::{QFormat, QMatrix};
use crate::{DType, Tensor};

/// A quantized `[n, k]` weight on a device: the parts of a [`QMatrix`] as
/// tensors (`q`, `zero`, `meta`: U32; `scale`: F32; absent parts are `None`).
pub struct QWeight<B: Backend> {
    pub format: QFormat,
    pub n: usize,
    pub k: usize,
    pub q: Tensor<B>,
    pub scale: Option<Tensor<B>>,
    pub zero: Option<Tensor<B>>,
    pub meta: Option<Tensor<B>>,
}

impl<B: Backend> std::fmt::Debug for QWeight<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight({}, {}×{})", self.format, self.n, self.k)
    }
}

impl<B: Backend> QWeight<B> {
    /// Uploads a host matrix (validated first).
    pub fn upload(be: &B, m: &QMatrix) -> Result<Self> {
        m.validate()?;
        let (f, n, k) = (m.format, m.n, m.k);
        let u32s = |v: &[u32], w: usize| -> Result<Option<Tensor<B>>> {
            if w == 0 { Ok(None) } else { Tensor::from_u32(be, v, &[n, w]).map(Some) }
        };
        let scale = match f.scales_per_row(k) {
            0 => None,
            w => Some(Tensor::from_f32(be, &m.scale, &[n, w], DType::F32)?),
        };
        Ok(QWeight {
            format: f,
            n,
            k,
            q: Tensor::from_u32(be, &m.q, &[n, f.q_words(k)])?,
            scale,
            zero: u32s(&m.zero, f.zero_words(k))?,
            meta: u32s(&m.meta, f.meta_words(k))?,
        })
    }

    /// Reads the parts back into a host matrix.
    pub fn download(&self, be: &B) -> Result<QMatrix> {
        let u32s = |t: &Option<Tensor<B>>| -> Result<Vec<u32>> {
            match t {
                Some(t) => Ok(bytemuck::pod_collect_to_vec(&t.to_bytes(be)?)),
                None => Ok(Vec::new()),
            }
        };
        let m = QMatrix {
            format: self.format,
            n: self.n,
            k: self.k,
            q: bytemuck::pod_collect_to_vec(&self.q.to_bytes(be)?),
            scale: match &self.scale {
                Some(t) => t.to_f32_vec(be)?,
                None => Vec::new(),
            },
            zero: u32s(&self.zero)?,
            meta: u32s(&self.meta)?,
        };
        m.validate()?;
        Ok(m)
    }

    /// Device bytes of all parts.
    pub fn bytes(&self) -> usize {
        self.format.bytes(self.n, self.k)
    }
}

/// `y[i][j] = Σ_p x[i][p] · w[j][p]` for `x: [m, k]` (F32, F16 or BF16) and
/// a quantized `W: [n, k]`; `y: [m, n]` has x's dtype; f32 accumulation.
/// Every row of y comes out of the same arithmetic whatever `m` is (a
/// quantized layer in the inference step stays batch invariant).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QMatmulSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub format: QFormat,
    pub checked: Checked,
}

impl QMatmulSpec {
    /// Multiply-adds of one call, counted as 2·m·n·k (zeros of 2:4 included).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// `y = x · Wᵀ` with a quantized weight (see [`QMatmulSpec`]).
pub fn qmatmul<B: Backend>(be: &B, x: &Tensor<B>, w: &QWeight<B>, y: &mut Tensor<B>) -> Result<()> {
    const OP: &str = "qmatmul";
    check_float(be, OP, "x", x)?;
    check_same_dtype(OP, &[("x", x), ("y", &*y)])?;
    check_nonempty(OP, "x", x)?;
    w.format.check_shape(w.n, w.k)?;
    let f = w.format;
    check_dtype(OP, "w.q", &w.q, DType::U32)?;
    let part = |name: &str, t: &Option<Tensor<B>>, words: usize, dtype: DType| -> Result<()> {
        match (t, words) {
            (None, 0) => Ok(()),
            (Some(t), w_) if w_ > 0 => {
                check_dtype(OP, name, t, dtype)?;
                if t.numel() != w.n * w_ {
                    return Err(Error::Shape(format!(
                        "{OP}: `{name}` is {} but a {f} weight {}×{} needs {} entries",
                        fmt_shape(t.shape()),
                        w.n,
                        w.k,
                        w.n * w_
                    )));
                }
                Ok(())
            }
            _ => Err(Error::Invalid(format!(
                "{OP}: a {f} weight {} a `{name}` part",
                if words > 0 { "needs" } else { "has no" }
            ))),
        }
    };
    if w.q.numel() != w.n * f.q_words(w.k) {
        return Err(Error::Shape(format!(
            "{OP}: `w.q` is {} but a {f} weight {}×{} needs {} words",
            fmt_shape(w.q.shape()),
            w.n,
            w.k,
            w.n * f.q_words(w.k)
        )));
    }
    part("w.scale", &w.scale, f.scales_per_row(w.k), DType::F32)?;
    part("w.zero", &w.zero, f.zero_words(w.k), DType::U32)?;
    part("w.meta", &w.meta, f.meta_words(w.k), DType::U32)?;
    let (xs, ys) = (x.shape(), y.shape());
    let (m, k) = match *xs {
        [m, k] => (m, k),
        _ => return Err(Error::Shape(format!("{OP}: `x` must be 2-D [m, k], got {}", fmt_shape(xs)))),
    };
    if k != w.k || ys != [m, w.n] {
        return Err(Error::Shape(format!(
            "{OP}: x is {}, w is {}×{} ([n, k]), y is {}: need x [m, {}] and y [m, {}]",
            fmt_shape(xs),
            w.n,
            w.k,
            fmt_shape(ys),
            w.k,
            w.n
        )));
    }
    for (what, v) in [("m·k", m * k), ("m·n", m * w.n), ("n·k", w.n * w.k)] {
        check_u32(OP, what, v)?;
    }
    let s = QMatmulSpec { m, n: w.n, k, format: f, checked: CHECKED };
    be.qmatmul(&s, x, w, y)
}
