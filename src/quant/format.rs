//! Quantized weight formats: the bit layouts every backend reads, the exact
//! dequantization rule that defines them, and round-to-nearest quantizers.
//!
//! A quantized matrix is a linear layer's weight seen as **`[n, k]`**: one row
//! per output channel `j`, `k` inputs `p` along the row (the transpose of the
//! model's dense `[k, n]` weight), so groups, packed words and scales run
//! along the input dimension that a matmul sums over. Every part is an array
//! of 32-bit words (`u32` codes, `f32` scales) so WGSL, CUDA and the CPU read
//! them the same way; a row's words are contiguous and rows follow each other.
//!
//! | format | `q` words per row | element `p` lives in | `scale` | `zero` | `meta` |
//! |---|---|---|---|---|---|
//! | `int8` | `k/4` | byte `p%4` of word `p/4` (two's complement) | `[n]` | – | – |
//! | `int4/gG` | `k/8` | nibble `p%8` of word `p/8` (unsigned `u`) | `[n, k/G]` | asym: `[n, ⌈k/G/8⌉]` nibbles | – |
//! | `2:4` | `k/4` (one per group of 4) | the group's two kept values as f16: low half = lower position | – | – | `[n, ⌈k/32⌉]` |
//! | `2:4+int8` | `k/8` (two groups per word) | group `g`: bytes `2(g%2)` (lower position), `2(g%2)+1` (higher), i8 | `[n]` | – | `[n, ⌈k/32⌉]` |
//!
//! Byte `b` of a word is bits `8b..8b+8`; nibble `b` is bits `4b..4b+4`.
//! 2:4 metadata: group `g` (inputs `4g..4g+4`) has nibble `g%8` of word `g/8`
//! of its row: bits 0–1 the lower kept position, bits 2–3 the higher one
//! (lower < higher, positions within the group).
//!
//! **Dequantization** (the definition every kernel must reproduce exactly: one
//! f32 multiply of a scale by a small integer, which every IEEE f32 unit
//! rounds the same way):
//! - int8: `w[j][p] = scale[j] · q` with `q ∈ [-127, 127]`;
//! - int4 symmetric: `w = scale[j][g] · (u − 8)`; asymmetric: `w = scale[j][g] · (u − z[j][g])`,
//!   `u, z ∈ [0, 15]`, `g = p / G`;
//! - 2:4: the kept value (f16 → f32, exact) or `scale[j] · q` (int8) at its
//!   position, `0.0` at the two others.
//!
//! **Matmul** `y = x · Wᵀ` (`x: [m, k]`, `y: [m, n]` in the activation dtype):
//! the reference ([`QMatrix::matmul_ref`]) widens `x` to f32, dequantizes, and
//! sums `x[i][p] · w[j][p]` in f32 over `p` in increasing order, then rounds
//! `y` once to the activation dtype. Other kernels sum in their own order and
//! are compared within the conformance tolerance of `matmul`.

use crate::error::{Error, Result};

/// Group sizes int4 accepts along the input dimension.
pub const INT4_GROUPS: [usize; 3] = [32, 64, 128];

/// How a linear layer's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QFormat {
    /// int8 per output channel, symmetric, f32 scale.
    Int8,
    /// int4 per group of `group` inputs (32, 64 or 128), f32 scale per group;
    /// `asym`: with a 4-bit zero point per group.
    Int4 { group: usize, asym: bool },
    /// 2:4 structured sparsity along the input dimension: two kept values per
    /// group of four, as f16 (`int8: false`) or int8 with a per-channel scale.
    Sparse24 { int8: bool },
}

impl QFormat {
    /// The name used on the command line and in checkpoint metadata:
    /// `int8`, `int4-g128`, `int4-g32-asym`, `2:4`, `2:4-int8`.
    pub fn name(&self) -> String {
        match *self {
            QFormat::Int8 => "int8".into(),
            QFormat::Int4 { group, asym: false } => format!("int4-g{group}"),
            QFormat::Int4 { group, asym: true } => format!("int4-g{group}-asym"),
            QFormat::Sparse24 { int8: false } => "2:4".into(),
            QFormat::Sparse24 { int8: true } => "2:4-int8".into(),
        }
    }

    /// Parses [`QFormat::name`]'s spellings.
    pub fn parse(s: &str) -> Result<QFormat> {
        let bad = || {
            Error::Invalid(format!(
                "unknown weight format `{s}`: expected int8, int4-g32|64|128 (optionally -asym), 2:4 or 2:4-int8"
            ))
        };
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "int8" => return Ok(QFormat::Int8),
            "2:4" => return Ok(QFormat::Sparse24 { int8: false }),
            "2:4-int8" => return Ok(QFormat::Sparse24 { int8: true }),
            _ => {}
        }
        let rest = t.strip_prefix("int4-g").ok_or_else(bad)?;
        let (g, asym) = match rest.strip_suffix("-asym") {
            Some(g) => (g, true),
            None => (rest, false),
        };
        let group: usize = g.parse().map_err(|_| bad())?;
        if !INT4_GROUPS.contains(&group) {
            return Err(Error::Invalid(format!("int4 group size {group}: expected 32, 64 or 128")));
        }
        Ok(QFormat::Int4 { group, asym })
    }

    /// Checks that a `[n, k]` weight can take this format.
    pub fn check_shape(&self, n: usize, k: usize) -> Result<()> {
        if n == 0 || k == 0 {
            return Err(Error::Shape(format!("{}: empty weight {n}×{k}", self.name())));
        }
        let unit = match *self {
            QFormat::Int8 | QFormat::Sparse24 { int8: false } => 4,
            QFormat::Int4 { group, .. } => group,
            QFormat::Sparse24 { int8: true } => 8,
        };
        if !k.is_multiple_of(unit) {
            return Err(Error::Shape(format!(
                "{}: the input dimension {k} is not a multiple of {unit} (weight {n}×{k})",
                self.name()
            )));
        }
        Ok(())
    }

    /// Words of `q` per row.
    pub fn q_words(&self, k: usize) -> usize {
        match *self {
            QFormat::Int8 | QFormat::Sparse24 { int8: false } => k / 4,
            QFormat::Int4 { .. } | QFormat::Sparse24 { int8: true } => k / 8,
        }
    }

    /// Entries of `scale` per row (0: none).
    pub fn scales_per_row(&self, k: usize) -> usize {
        match *self {
            QFormat::Int8 | QFormat::Sparse24 { int8: true } => 1,
            QFormat::Int4 { group, .. } => k / group,
            QFormat::Sparse24 { int8: false } => 0,
        }
    }

    /// Words of `zero` per row (0: none).
    pub fn zero_words(&self, k: usize) -> usize {
        match *self {
            QFormat::Int4 { group, asym: true } => (k / group).div_ceil(8),
            _ => 0,
        }
    }

    /// Words of `meta` per row (0: none).
    pub fn meta_words(&self, k: usize) -> usize {
        match *self {
            QFormat::Sparse24 { .. } => k.div_ceil(32),
            _ => 0,
        }
    }

    /// Bytes of an `[n, k]` weight in this format (codes, scales, zeros, metadata).
    pub fn bytes(&self, n: usize, k: usize) -> usize {
        4 * n * (self.q_words(k) + self.scales_per_row(k) + self.zero_words(k) + self.meta_words(k))
    }
}

impl std::fmt::Display for QFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// A quantized `[n, k]` weight on the host (see the module docs for layouts).
#[derive(Clone, Debug, PartialEq)]
pub struct QMatrix {
    pub format: QFormat,
    /// Output channels (rows).
    pub n: usize,
    /// Inputs per row (the dimension a matmul sums over).
    pub k: usize,
    /// Packed codes, `n × format.q_words(k)`.
    pub q: Vec<u32>,
    /// Scales, `n × format.scales_per_row(k)`.
    pub scale: Vec<f32>,
    /// int4 zero points (nibbles), `n × format.zero_words(k)`.
    pub zero: Vec<u32>,
    /// 2:4 positions (nibbles), `n × format.meta_words(k)`.
    pub meta: Vec<u32>,
}

fn nibble(words: &[u32], i: usize) -> u32 {
    (words[i / 8] >> (4 * (i % 8))) & 0xF
}

fn set_nibble(words: &mut [u32], i: usize, v: u32) {
    words[i / 8] |= (v & 0xF) << (4 * (i % 8));
}

fn byte_i8(words: &[u32], i: usize) -> i32 {
    ((words[i / 4] >> (8 * (i % 4))) & 0xFF) as u8 as i8 as i32
}

fn set_byte(words: &mut [u32], i: usize, v: i32) {
    words[i / 4] |= ((v as i8 as u8) as u32) << (8 * (i % 4));
}

/// Scale and zero point of one int4 group (symmetric: `max|w| / 7` and the implied zero 8;
/// asymmetric: the range `[min(w, 0), max(w, 0)]` over 15 steps and `round(−min / scale)`).
pub(crate) fn int4_group_params(g: &[f32], asym: bool) -> (f32, i32) {
    if asym {
        let lo = g.iter().fold(0.0f32, |a, &x| a.min(x));
        let hi = g.iter().fold(0.0f32, |a, &x| a.max(x));
        let s = (hi - lo) / 15.0;
        (s, if s > 0.0 { round_clamp(-lo / s, 0, 15) } else { 0 })
    } else {
        (g.iter().fold(0.0f32, |a, &x| a.max(x.abs())) / 7.0, 8)
    }
}

/// Round half away from zero, clamped to `[lo, hi]`.
pub(crate) fn round_clamp(x: f32, lo: i32, hi: i32) -> i32 {
    (x.round() as i32).clamp(lo, hi)
}

impl QMatrix {
    /// Checks that every part has the length its format asks for.
    pub fn validate(&self) -> Result<()> {
        self.format.check_shape(self.n, self.k)?;
        let f = self.format;
        let want = [
            ("q", self.q.len(), self.n * f.q_words(self.k)),
            ("scale", self.scale.len(), self.n * f.scales_per_row(self.k)),
            ("zero", self.zero.len(), self.n * f.zero_words(self.k)),
            ("meta", self.meta.len(), self.n * f.meta_words(self.k)),
        ];
        for (name, got, want) in want {
            if got != want {
                return Err(Error::Format(format!(
                    "{} weight {}×{}: `{name}` has {got} entries, expected {want}",
                    f.name(),
                    self.n,
                    self.k
                )));
            }
        }
        if let QFormat::Sparse24 { .. } = f {
            for j in 0..self.n {
                for g in 0..self.k / 4 {
                    let m = nibble(&self.meta[j * f.meta_words(self.k)..], g);
                    if (m & 3) >= (m >> 2) {
                        return Err(Error::Format(format!(
                            "2:4 weight: row {j} group {g} has positions {} and {} (must be increasing)",
                            m & 3,
                            m >> 2
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of all parts.
    pub fn bytes(&self) -> usize {
        4 * (self.q.len() + self.scale.len() + self.zero.len() + self.meta.len())
    }

    /// Round-to-nearest quantization of a row-major `[n, k]` f32 weight.
    ///
    /// - int8: `scale = max|w_j| / 127`, `q = round(w / scale)`;
    /// - int4 symmetric: per group `scale = max|w| / 7`, `u = clamp(round(w / scale), −8, 7) + 8`;
    /// - int4 asymmetric: per group the range `[min(w, 0), max(w, 0)]`:
    ///   `scale = (max − min) / 15`, `z = round(−min / scale)`, `u = clamp(round(w / scale) + z, 0, 15)`;
    /// - 2:4: per group of four the two entries with the largest `|w|` (ties: the lower position)
    ///   — magnitude pruning; [`QMatrix::sparse24`] takes other importance scores.
    ///
    /// An all-zero row or group gets scale 0 (it dequantizes to zeros).
    pub fn quantize(w: &[f32], n: usize, k: usize, format: QFormat) -> Result<QMatrix> {
        if let QFormat::Sparse24 { .. } = format {
            let imp: Vec<f32> = w.iter().map(|x| x.abs()).collect();
            return Self::sparse24(w, &imp, n, k, format);
        }
        format.check_shape(n, k)?;
        check_len(w, n, k)?;
        let f = format;
        let mut m = QMatrix::empty(f, n, k);
        let (qw, sw, zw) = (f.q_words(k), f.scales_per_row(k), f.zero_words(k));
        for j in 0..n {
            let row = &w[j * k..(j + 1) * k];
            let q = &mut m.q[j * qw..(j + 1) * qw];
            match f {
                QFormat::Int8 => {
                    let amax = row.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
                    let s = amax / 127.0;
                    m.scale[j] = s;
                    for (p, &x) in row.iter().enumerate() {
                        let v = if s > 0.0 { round_clamp(x / s, -127, 127) } else { 0 };
                        set_byte(q, p, v);
                    }
                }
                QFormat::Int4 { group, asym } => {
                    for (g, chunk) in row.chunks(group).enumerate() {
                        let (s, z) = int4_group_params(chunk, asym);
                        m.scale[j * sw + g] = s;
                        if asym {
                            set_nibble(&mut m.zero[j * zw..(j + 1) * zw], g, z as u32);
                        }
                        for (pp, &x) in chunk.iter().enumerate() {
                            let u = if s > 0.0 {
                                if asym { round_clamp(x / s + z as f32, 0, 15) } else { round_clamp(x / s, -8, 7) + 8 }
                            } else {
                                z
                            };
                            set_nibble(q, g * group + pp, u as u32);
                        }
                    }
                }
                QFormat::Sparse24 { .. } => unreachable!("handled above"),
            }
        }
        Ok(m)
    }

    /// An int8 or int4 matrix from integer codes chosen elsewhere (GPTQ's
    /// error-compensating rounding, [`crate::quant::gptq`]): `codes[j·k + p]`
    /// is the stored code — int8: the signed value in `[−127, 127]`; int4: the
    /// unsigned nibble `u` in `[0, 15]` (symmetric: `w = s·(u − 8)`; asymmetric:
    /// `w = s·(u − z)`); `scale` has [`QFormat::scales_per_row`] entries per row
    /// and `zero` (asymmetric int4 only, else empty) one zero point per group.
    pub fn from_codes(
        format: QFormat,
        n: usize,
        k: usize,
        codes: &[i32],
        scale: &[f32],
        zero: &[u8],
    ) -> Result<QMatrix> {
        format.check_shape(n, k)?;
        let (lo, hi) = match format {
            QFormat::Int8 => (-127, 127),
            QFormat::Int4 { .. } => (0, 15),
            QFormat::Sparse24 { .. } => {
                return Err(Error::Invalid("from_codes: 2:4 weights are built by QMatrix::sparse24".into()));
            }
        };
        let asym = matches!(format, QFormat::Int4 { asym: true, .. });
        let sw = format.scales_per_row(k);
        if codes.len() != n * k || scale.len() != n * sw || zero.len() != if asym { n * sw } else { 0 } {
            return Err(Error::Shape(format!(
                "from_codes: {} codes, {} scales, {} zero points for a {format} [{n}, {k}] weight",
                codes.len(),
                scale.len(),
                zero.len()
            )));
        }
        if let Some(c) = codes.iter().find(|&&c| c < lo || c > hi) {
            return Err(Error::Invalid(format!("from_codes: code {c} outside [{lo}, {hi}] for {format}")));
        }
        if let Some(z) = zero.iter().find(|&&z| z > 15) {
            return Err(Error::Invalid(format!("from_codes: zero point {z} outside [0, 15]")));
        }
        let mut m = QMatrix::empty(format, n, k);
        m.scale.copy_from_slice(scale);
        let (qw, zw) = (format.q_words(k), format.zero_words(k));
        for j in 0..n {
            let q = &mut m.q[j * qw..(j + 1) * qw];
            for (p, &c) in codes[j * k..(j + 1) * k].iter().enumerate() {
                match format {
                    QFormat::Int8 => set_byte(q, p, c),
                    _ => set_nibble(q, p, c as u32),
                }
            }
            if asym {
                for (g, &z) in zero[j * sw..(j + 1) * sw].iter().enumerate() {
                    set_nibble(&mut m.zero[j * zw..(j + 1) * zw], g, z as u32);
                }
            }
        }
        Ok(m)
    }

    /// 2:4 pruning of a row-major `[n, k]` f32 weight keeping, per group of
    /// four inputs, the two entries with the largest `importance` (same
    /// layout as `w`; ties: the lower position). Magnitude pruning passes
    /// `|w|`, Wanda `|w[j][p]| · ‖X_p‖`. Kept values are stored as f16, or as
    /// int8 with `scale = max|kept_j| / 127` for `Sparse24 { int8: true }`.
    pub fn sparse24(w: &[f32], importance: &[f32], n: usize, k: usize, format: QFormat) -> Result<QMatrix> {
        let QFormat::Sparse24 { int8 } = format else {
            return Err(Error::Invalid(format!("sparse24: format {format} is not 2:4")));
        };
        format.check_shape(n, k)?;
        check_len(w, n, k)?;
        check_len(importance, n, k)?;
        let mut m = QMatrix::empty(format, n, k);
        let (qw, mw) = (format.q_words(k), format.meta_words(k));
        for j in 0..n {
            let row = &w[j * k..(j + 1) * k];
            let imp = &importance[j * k..(j + 1) * k];
            // Positions kept per group, lower first.
            let keep: Vec<(usize, usize)> = (0..k / 4)
                .map(|g| {
                    let mut idx = [0usize, 1, 2, 3];
                    // Stable sort by descending importance: ties keep the lower position.
                    idx.sort_by(|&a, &b| imp[4 * g + b].total_cmp(&imp[4 * g + a]));
                    (idx[0].min(idx[1]), idx[0].max(idx[1]))
                })
                .collect();
            let meta = &mut m.meta[j * mw..(j + 1) * mw];
            for (g, &(a, b)) in keep.iter().enumerate() {
                set_nibble(meta, g, (a | (b << 2)) as u32);
            }
            let q = &mut m.q[j * qw..(j + 1) * qw];
            if int8 {
                let amax = keep
                    .iter()
                    .enumerate()
                    .fold(0.0f32, |acc, (g, &(a, b))| acc.max(row[4 * g + a].abs()).max(row[4 * g + b].abs()));
                let s = amax / 127.0;
                m.scale[j] = s;
                for (g, &(a, b)) in keep.iter().enumerate() {
                    for (slot, pos) in [(0, a), (1, b)] {
                        let v = if s > 0.0 { round_clamp(row[4 * g + pos] / s, -127, 127) } else { 0 };
                        set_byte(q, 2 * g + slot, v);
                    }
                }
            } else {
                for (g, &(a, b)) in keep.iter().enumerate() {
                    let lo = half::f16::from_f32(row[4 * g + a]).to_bits() as u32;
                    let hi = half::f16::from_f32(row[4 * g + b]).to_bits() as u32;
                    q[g] = lo | (hi << 16);
                }
            }
        }
        Ok(m)
    }

    fn empty(format: QFormat, n: usize, k: usize) -> QMatrix {
        QMatrix {
            format,
            n,
            k,
            q: vec![0; n * format.q_words(k)],
            scale: vec![0.0; n * format.scales_per_row(k)],
            zero: vec![0; n * format.zero_words(k)],
            meta: vec![0; n * format.meta_words(k)],
        }
    }

    /// The weight `w[j][p]` in f32, exactly as every kernel must see it.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        self.view().dequantize_row(j, out)
    }

    /// Borrowed parts.
    pub fn view(&self) -> QView<'_> {
        QView {
            format: self.format,
            n: self.n,
            k: self.k,
            q: &self.q,
            scale: &self.scale,
            zero: &self.zero,
            meta: &self.meta,
        }
    }

    /// The whole `[n, k]` weight in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.n * self.k];
        for (j, row) in w.chunks_mut(self.k).enumerate() {
            self.dequantize_row(j, row);
        }
        w
    }

    /// The reference product `y[i][j] = Σ_p x[i][p] · w[j][p]` (`x: [m, k]`
    /// f32), summed in f32 over `p` in increasing order.
    pub fn matmul_ref(&self, x: &[f32], m: usize) -> Vec<f32> {
        let k = self.k;
        let w = self.dequantize();
        let mut y = vec![0.0f32; m * self.n];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            for j in 0..self.n {
                let wr = &w[j * k..(j + 1) * k];
                let mut acc = 0.0f32;
                for p in 0..k {
                    acc += xr[p] * wr[p];
                }
                y[i * self.n + j] = acc;
            }
        }
        y
    }
}

/// A quantized `[n, k]` weight's parts, borrowed (host memory of a
/// [`QMatrix`] or of a CPU backend's buffers); lengths as [`QMatrix::validate`] checks.
#[derive(Clone, Copy, Debug)]
pub struct QView<'a> {
    pub format: QFormat,
    pub n: usize,
    pub k: usize,
    pub q: &'a [u32],
    pub scale: &'a [f32],
    pub zero: &'a [u32],
    pub meta: &'a [u32],
}

impl QView<'_> {
    /// The weight `w[j][p]` in f32, exactly as every kernel must see it.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (f, k) = (self.format, self.k);
        let q = &self.q[j * f.q_words(k)..(j + 1) * f.q_words(k)];
        match f {
            QFormat::Int8 => {
                let s = self.scale[j];
                for (p, o) in out.iter_mut().enumerate().take(k) {
                    *o = s * byte_i8(q, p) as f32;
                }
            }
            QFormat::Int4 { group, asym } => {
                let sw = f.scales_per_row(k);
                let zw = f.zero_words(k);
                for (p, o) in out.iter_mut().enumerate().take(k) {
                    let g = p / group;
                    let z = if asym { nibble(&self.zero[j * zw..(j + 1) * zw], g) as i32 } else { 8 };
                    *o = self.scale[j * sw + g] * (nibble(q, p) as i32 - z) as f32;
                }
            }
            QFormat::Sparse24 { int8 } => {
                let mw = f.meta_words(k);
                let meta = &self.meta[j * mw..(j + 1) * mw];
                out[..k].fill(0.0);
                for g in 0..k / 4 {
                    let m = nibble(meta, g) as usize;
                    let (a, b) = (m & 3, m >> 2);
                    let (va, vb) = if int8 {
                        let s = self.scale[j];
                        (s * byte_i8(q, 2 * g) as f32, s * byte_i8(q, 2 * g + 1) as f32)
                    } else {
                        let h = |bits: u32| half::f16::from_bits(bits as u16).to_f32();
                        (h(q[g] & 0xFFFF), h(q[g] >> 16))
                    };
                    out[4 * g + a] = va;
                    out[4 * g + b] = vb;
                }
            }
        }
    }
}

fn check_len(w: &[f32], n: usize, k: usize) -> Result<()> {
    if w.len() != n * k {
        return Err(Error::Shape(format!("quantize: {} values for a {n}×{k} weight", w.len())));
    }
    Ok(())
}

/// Transposes a row-major `[r, c]` matrix (the model's `[k, n]` weight to the
/// `[n, k]` rows the formats use, and back).
pub fn transpose(w: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; w.len()];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = w[i * c + j];
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    fn all_formats() -> Vec<QFormat> {
        let mut v = vec![QFormat::Int8, QFormat::Sparse24 { int8: false }, QFormat::Sparse24 { int8: true }];
        for g in INT4_GROUPS {
            v.push(QFormat::Int4 { group: g, asym: false });
            v.push(QFormat::Int4 { group: g, asym: true });
        }
        v
    }

    fn weights(n: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n * k).map(|_| r.normal() as f32 * 0.05).collect()
    }

    #[test]
    fn names_round_trip_and_bad_names_are_errors() {
        for f in all_formats() {
            assert_eq!(QFormat::parse(&f.name()).unwrap(), f);
        }
        for bad in ["int3", "int4-g48", "int4-g", "int4-g32-sym", "3:4", ""] {
            assert!(QFormat::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shapes_the_format_cannot_take_are_errors() {
        assert!(QFormat::Int4 { group: 128, asym: false }.check_shape(8, 192).is_err());
        assert!(QFormat::Int8.check_shape(8, 6).is_err());
        assert!(QFormat::Sparse24 { int8: true }.check_shape(8, 12).is_err());
        assert!(QFormat::Int4 { group: 64, asym: true }.check_shape(8, 192).is_ok());
    }

    /// Every element's error is at most half a quantization step; requantizing
    /// the dequantized weight gives the same codes (and scales to 1 ulp).
    #[test]
    fn rtn_error_is_half_a_step_and_round_trips() {
        let (n, k) = (5, 256);
        let w = weights(n, k, 1);
        for f in all_formats() {
            let m = QMatrix::quantize(&w, n, k, f).unwrap();
            m.validate().unwrap();
            assert_eq!(m.bytes(), f.bytes(n, k));
            let d = m.dequantize();
            let again = QMatrix::quantize(&d, n, k, f).unwrap();
            assert_eq!((&again.q, &again.zero, &again.meta), (&m.q, &m.zero, &m.meta), "{f}: codes moved");
            for (a, b) in again.scale.iter().zip(&m.scale) {
                assert!((a - b).abs() <= b.abs() * 2e-7, "{f}: scale {a} vs {b}");
            }
            if let QFormat::Sparse24 { .. } = f {
                for g in 0..n * k / 4 {
                    assert!(d[4 * g..4 * g + 4].iter().filter(|&&x| x == 0.0).count() >= 2, "{f}: group {g}");
                }
                continue;
            }
            for j in 0..n {
                for p in 0..k {
                    let s = match f {
                        QFormat::Int8 => m.scale[j],
                        QFormat::Int4 { group, .. } => m.scale[j * (k / group) + p / group],
                        _ => unreachable!(),
                    };
                    let e = (d[j * k + p] - w[j * k + p]).abs();
                    assert!(e <= 0.5 * s * (1.0 + 1e-5) + 1e-12, "{f}: row {j} col {p}: error {e} step {s}");
                }
            }
        }
    }

    #[test]
    fn int4_codes_sit_where_the_layout_says() {
        // One row, group 32: w[p] = scale·(p%16 − 8) for p < 32 with scale 1 (max |w| = 8 → scale 8/7).
        let k = 32;
        let w: Vec<f32> = (0..k).map(|p| (p % 8) as f32 - 3.0).collect();
        let f = QFormat::Int4 { group: 32, asym: true };
        let m = QMatrix::quantize(&w, 1, k, f).unwrap();
        // Range [-3, 4] → scale 7/15, z = round(3 / (7/15)) = 6.
        assert_eq!(m.scale, vec![7.0 / 15.0]);
        assert_eq!(m.zero, vec![6]);
        for p in 0..k {
            let u = (m.q[p / 8] >> (4 * (p % 8))) & 0xF;
            assert_eq!(u as i32, (((p % 8) as f32 - 3.0) / (7.0 / 15.0)).round() as i32 + 6, "p = {p}");
        }
    }

    #[test]
    fn sparse24_keeps_the_two_most_important_and_orders_positions() {
        let w = [0.1, -0.4, 0.3, 0.2, 1.0, 1.0, 1.0, 1.0];
        let m = QMatrix::quantize(&w, 1, 8, QFormat::Sparse24 { int8: false }).unwrap();
        assert_eq!(m.meta, vec![(1 | (2 << 2)) | ((1 << 2) << 4)]);
        let d = m.dequantize();
        assert_eq!(d[..4], [0.0, half::f16::from_f32(-0.4).to_f32(), half::f16::from_f32(0.3).to_f32(), 0.0]);
        // Wanda-style importance can overrule magnitude.
        let imp = [10.0, 0.0, 0.0, 9.0, 0.0, 0.0, 1.0, 1.0];
        let m = QMatrix::sparse24(&w, &imp, 1, 8, QFormat::Sparse24 { int8: true }).unwrap();
        let d = m.dequantize();
        assert_eq!((d[1], d[2], d[4], d[5]), (0.0, 0.0, 0.0, 0.0));
        assert!((d[0] - 0.1).abs() < 0.01 && (d[3] - 0.2).abs() < 0.01 && d[6] == 1.0 && d[7] == 1.0);
    }

    #[test]
    fn reference_matmul_is_x_times_dequantized_transpose() {
        let (m_, n, k) = (3, 4, 128);
        let w = weights(n, k, 2);
        let x = weights(m_, k, 3);
        for f in all_formats() {
            let q = QMatrix::quantize(&w, n, k, f).unwrap();
            let y = q.matmul_ref(&x, m_);
            let d = q.dequantize();
            for i in 0..m_ {
                for j in 0..n {
                    let want: f64 = (0..k).map(|p| x[i * k + p] as f64 * d[j * k + p] as f64).sum();
                    assert!((y[i * n + j] as f64 - want).abs() < 1e-5, "{f}");
                }
            }
        }
    }

    #[test]
    fn validate_rejects_wrong_lengths_and_bad_positions() {
        let w = weights(2, 32, 4);
        let mut m = QMatrix::quantize(&w, 2, 32, QFormat::Sparse24 { int8: false }).unwrap();
        m.meta[0] = (m.meta[0] & !0xF) | (2 | (1 << 2));
        assert!(m.validate().is_err());
        let mut m = QMatrix::quantize(&w, 2, 32, QFormat::Int8).unwrap();
        m.scale.pop();
        assert!(m.validate().is_err());
    }
}
