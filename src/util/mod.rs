//! Small helpers shared across the crate.

pub mod files;
pub mod machine;
pub mod rng;

/// A user's number as they would type it: `0.003`, `1e30`, `NaN`, `inf`.
pub fn fmt_real(v: f64) -> String {
    if v.is_finite() && v != 0.0 && !(1e-4..1e6).contains(&v.abs()) { format!("{v:e}") } else { v.to_string() }
}

/// [`fmt_real`] for an `f32` (shown with `f32` digits: `1e30`, not `1.0000000150474662e30`).
pub fn fmt_real32(v: f32) -> String {
    if v.is_finite() && v != 0.0 && !(1e-4..1e6).contains(&v.abs()) { format!("{v:e}") } else { v.to_string() }
}
