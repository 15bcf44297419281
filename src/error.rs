//! One error type for the whole crate: every failure a user can cause is a value.

use crate::DType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tensor shapes that do not fit the op ("matmul: a is 64×128, b is 64×32").
    #[error("{0}")]
    Shape(String),
    /// A dtype the op or the backend does not take.
    #[error("{op}: dtype {dtype} is not supported{why}")]
    DType { op: &'static str, dtype: DType, why: String },
    /// A tensor with no elements, where the op needs some.
    #[error("{0}: zero-sized tensor")]
    Empty(String),
    /// A bad argument value (not a shape or dtype problem).
    #[error("{0}")]
    Invalid(String),
    /// The backend asked for is not available on this machine.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A device-side failure (out of memory, lost device, kernel compile error).
    #[error("device error: {0}")]
    Device(String),
    /// A file that is not what it claims to be.
    #[error("{0}")]
    Format(String),
    /// Training produced NaN/inf (diverged); says at which step and what.
    #[error("{0}")]
    NonFinite(String),
    /// A collective operation failed: a peer rank left, timed out or disagreed.
    #[error("collective: {0}")]
    Collective(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// Formats a shape as `64×128` for error messages.
pub fn fmt_shape(shape: &[usize]) -> String {
    if shape.is_empty() {
        return "scalar".into();
    }
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("×")
}
