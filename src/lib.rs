//! # dynsparse
//!
//! Train, compress and serve transformer language models with dynamic sparse
//! attention on any GPU. One [`Backend`] trait, three implementations: the
//! pure-Rust CPU reference ([`backend::cpu`]), WGSL compute shaders through
//! wgpu (feature `wgpu`, default) and CUDA through cudarc (feature `cuda`).
//!
//! Ops live in [`ops`]: each validates its tensors and calls the backend, so a
//! bad shape is an [`Error`] naming the shapes, never a panic.
//!
//! ```
//! use dynsparse::{backend::cpu::CpuBackend, ops, DType, Tensor};
//! let be = CpuBackend::new();
//! let a = Tensor::from_f32(&be, &[1.0, 2.0, 3.0, 4.0], &[2, 2], DType::F32)?;
//! let mut c = Tensor::empty(&be, &[2, 2], DType::F32)?;
//! ops::matmul(&be, &a, &a, &mut c, false, false, 1.0, 0.0)?;
//! assert_eq!(c.to_f32_vec(&be)?, vec![7.0, 10.0, 15.0, 22.0]);
//! # Ok::<(), dynsparse::Error>(())
//! ```

pub mod attention;
pub mod backend;
pub mod data;
pub mod dist;
pub mod dtype;
pub mod error;
pub mod model;
pub mod ops;
pub mod quant;
pub mod serve;
pub mod tensor;
pub mod train;
pub mod util;

pub use backend::{Backend, BackendKind};
pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::Tensor;
