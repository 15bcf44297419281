//! Hardware-aware model compression (HAMC): quantized weight formats and
//! their host-side quantizers. The device-side weight is
//! [`crate::ops::QWeight`]; its product is [`crate::ops::qmatmul`].

pub mod awq;
pub mod calib;
pub mod checkpoint;
pub mod format;
pub mod gptq;
pub mod plan;
pub mod prune;

pub use format::{INT4_GROUPS, QFormat, QMatrix, QView, transpose};
