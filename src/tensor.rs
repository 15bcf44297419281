//! A device buffer with a shape and a runtime dtype.

use crate::backend::Backend;
use crate::error::{Error, Result, fmt_shape};
use crate::{DType, dtype};

/// A dense, row-major tensor living on backend `B`.
///
/// The buffer is owned: dropping the tensor returns its memory to the backend
/// (and updates the backend's allocation counters).
pub struct Tensor<B: Backend> {
    pub(crate) buf: B::Buffer,
    dtype: DType,
    shape: Vec<usize>,
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>({}, {})", std::any::type_name::<B>(), self.dtype, fmt_shape(&self.shape))
    }
}

impl<B: Backend> Tensor<B> {
    fn checked_numel(shape: &[usize]) -> Result<usize> {
        shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::Shape(format!("shape {} overflows usize", fmt_shape(shape))))
    }

    /// A tensor whose contents are unspecified (backends may reuse freed memory).
    pub fn empty(backend: &B, shape: &[usize], dtype: DType) -> Result<Self> {
        let n = Self::checked_numel(shape)?;
        let buf = backend.alloc(dtype, n)?;
        Ok(Tensor { buf, dtype, shape: shape.to_vec() })
    }

    /// A tensor filled with zeros.
    pub fn zeros(backend: &B, shape: &[usize], dtype: DType) -> Result<Self> {
        let n = Self::checked_numel(shape)?;
        let buf = backend.upload(dtype, &vec![0u8; n * dtype.size()])?;
        Ok(Tensor { buf, dtype, shape: shape.to_vec() })
    }

    /// Uploads f32 values, converting them to `dtype` on the host
    /// (round to nearest even for f16/bf16, truncation for index dtypes).
    pub fn from_f32(backend: &B, values: &[f32], shape: &[usize], dtype: DType) -> Result<Self> {
        let n = Self::checked_numel(shape)?;
        if n != values.len() {
            return Err(Error::Shape(format!(
                "from_f32: {} values do not fill shape {}",
                values.len(),
                fmt_shape(shape)
            )));
        }
        Self::from_bytes(backend, &dtype::f32_to_bytes(values, dtype), shape, dtype)
    }

    /// Uploads `u32` values (token ids, indices) as a `U32` tensor.
    pub fn from_u32(backend: &B, values: &[u32], shape: &[usize]) -> Result<Self> {
        Self::from_bytes(backend, bytemuck::cast_slice(values), shape, DType::U32)
    }

    /// Uploads raw little-endian bytes of `dtype`.
    pub fn from_bytes(backend: &B, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Self> {
        let n = Self::checked_numel(shape)?;
        if n * dtype.size() != bytes.len() {
            return Err(Error::Shape(format!(
                "from_bytes: {} bytes do not fill a {} tensor of shape {}",
                bytes.len(),
                dtype,
                fmt_shape(shape)
            )));
        }
        let buf = backend.upload(dtype, bytes)?;
        Ok(Tensor { buf, dtype, shape: shape.to_vec() })
    }

    /// A tensor of `shape` that aliases elements `offset..offset + numel` of
    /// `base`'s buffer (same dtype): ops read and write `base`'s memory through
    /// it; it allocates nothing and keeps `base`'s allocation alive. An op must
    /// not take two views of one buffer as an input and an output at once.
    pub fn view(backend: &B, base: &Tensor<B>, offset: usize, shape: &[usize]) -> Result<Self> {
        let n = Self::checked_numel(shape)?;
        if offset.checked_add(n).is_none_or(|end| end > base.numel()) {
            return Err(Error::Shape(format!("view: elements {offset}..{offset}+{n} of a {} tensor", base.describe())));
        }
        let buf = backend.view(&base.buf, base.dtype, offset, n)?;
        Ok(Tensor { buf, dtype: base.dtype, shape: shape.to_vec() })
    }

    /// Downloads the raw little-endian bytes.
    pub fn to_bytes(&self, backend: &B) -> Result<Vec<u8>> {
        backend.download(&self.buf, self.dtype, self.numel())
    }

    /// Downloads and converts to f32.
    pub fn to_f32_vec(&self, backend: &B) -> Result<Vec<f32>> {
        Ok(dtype::bytes_to_f32(&self.to_bytes(backend)?, self.dtype))
    }

    /// Downloads a `U32` tensor.
    pub fn to_u32_vec(&self, backend: &B) -> Result<Vec<u32>> {
        if self.dtype != DType::U32 {
            return Err(Error::DType { op: "to_u32_vec", dtype: self.dtype, why: " (expected u32)".into() });
        }
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes(backend)?))
    }

    /// Overwrites the contents with f32 values converted to this tensor's dtype.
    pub fn write_f32(&mut self, backend: &B, values: &[f32]) -> Result<()> {
        if values.len() != self.numel() {
            return Err(Error::Shape(format!(
                "write_f32: {} values for a tensor of shape {}",
                values.len(),
                fmt_shape(&self.shape)
            )));
        }
        backend.write(&mut self.buf, self.dtype, &dtype::f32_to_bytes(values, self.dtype))
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        self.set_shape(shape)?;
        Ok(self)
    }

    /// Reinterprets the data in place with a new shape of the same number of elements.
    pub fn set_shape(&mut self, shape: &[usize]) -> Result<()> {
        if Self::checked_numel(shape)? != self.numel() {
            return Err(Error::Shape(format!(
                "reshape: cannot view {} as {}",
                fmt_shape(&self.shape),
                fmt_shape(shape)
            )));
        }
        self.shape = shape.to_vec();
        Ok(())
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Size of the last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// The backend's buffer (for backend implementations).
    pub fn buffer(&self) -> &B::Buffer {
        &self.buf
    }
    /// The backend's buffer, mutably (for backend implementations).
    pub fn buffer_mut(&mut self) -> &mut B::Buffer {
        &mut self.buf
    }
    /// `"f16 64×128"`, for messages.
    pub fn describe(&self) -> String {
        format!("{} {}", self.dtype, fmt_shape(&self.shape))
    }
}
