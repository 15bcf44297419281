//! Small helpers shared across the crate.

pub mod machine;
pub mod rng;
