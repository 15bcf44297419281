//! Small helpers shared across the crate.

pub mod files;
pub mod machine;
pub mod rng;

/// A user's number as they would type it: `0.003`, `1e30`, `NaN`, `inf`.
pub fn fmt_real(v: f64) -> String {
    if v.is_finite() && v != 0.0 && !(1e-4..1e6).contains(&v.abs()) { format!("{v:e}") } else { v.to_string() }
}
