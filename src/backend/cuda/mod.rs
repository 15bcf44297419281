//! PLACEHOLDER: replaced by the CUDA backend implementation.
