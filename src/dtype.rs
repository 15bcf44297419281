//! Runtime element types of device buffers.

use half::{bf16, f16};

/// The element type of a [`crate::Tensor`]. Floats are `F32`, `F16`, `BF16`;
/// indices (token ids, selected keys) are `U32`/`I32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    I32,
}

impl DType {
    pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::I32 => "i32",
        }
    }

    /// Parses `f32`, `f16`, `bf16`, `u32`, `i32` (case-insensitive).
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Some(DType::F32),
            "f16" | "fp16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "u32" => Some(DType::U32),
            "i32" => Some(DType::I32),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Converts f32 values to the little-endian bytes of `dtype` (round to nearest even).
/// Index dtypes take the f32 value as an integer (truncation toward zero).
pub fn f32_to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => {
            let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::BF16 => {
            let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::U32 => {
            let v: Vec<u32> = values.iter().map(|&x| x as u32).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::I32 => {
            let v: Vec<i32> = values.iter().map(|&x| x as i32).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
    }
}

/// Converts little-endian bytes of `dtype` to f32 values.
pub fn bytes_to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    let n = bytes.len() / dtype.size();
    let bytes = &bytes[..n * dtype.size()];
    match dtype {
        DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(bytes),
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(bytes).into_iter().map(f16::to_f32).collect(),
        DType::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(bytes).into_iter().map(bf16::to_f32).collect(),
        DType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(bytes).into_iter().map(|x| x as f32).collect(),
        DType::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(bytes).into_iter().map(|x| x as f32).collect(),
    }
}

/// Rounds an f32 to the nearest value representable in `dtype` (identity for F32).
pub fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_every_float_dtype() {
        let v = [1.0f32, -2.5, 0.0, 65504.0, 1e-3];
        for dt in DType::FLOATS {
            let back = bytes_to_f32(&f32_to_bytes(&v, dt), dt);
            for (a, b) in v.iter().zip(&back) {
                assert_eq!(round_to(*a, dt), *b, "{dt}");
            }
        }
    }

    #[test]
    fn parse_accepts_common_spellings() {
        assert_eq!(DType::parse("BF16"), Some(DType::BF16));
        assert_eq!(DType::parse("fp16"), Some(DType::F16));
        assert_eq!(DType::parse("f64"), None);
    }
}
