//! Small helpers shared across the crate.

pub mod files;
pub mod machine;
pub mod rng;
