//! The CPU backend against itself through the conformance harness: pins the
//! harness (seeds, poisoning, comparisons) and the error behaviour. The CPU
//! backend's own correctness is tested against f64 loops in
//! `tests/cpu_reference.rs` and its unit tests.

mod common;

use dynsparse::backend::cpu::CpuBackend;
use std::sync::OnceLock;

fn pair() -> Option<(&'static CpuBackend, &'static CpuBackend)> {
    static R: OnceLock<CpuBackend> = OnceLock::new();
    static B: OnceLock<CpuBackend> = OnceLock::new();
    Some((R.get_or_init(CpuBackend::new), B.get_or_init(CpuBackend::new)))
}

conformance_tests!(pair);

#[test]
fn harness_catches_an_unwritten_element() {
    let r =
        std::panic::catch_unwind(|| common::assert_close("x", &[1.0, f32::NAN], &[1.0, 2.0], dynsparse::DType::F32));
    assert!(r.is_err());
    let r = std::panic::catch_unwind(|| common::assert_close("x", &[1.0, 2.001], &[1.0, 2.0], dynsparse::DType::F32));
    assert!(r.is_err(), "a 4e-4 relative error must fail the f32 tolerance");
    common::assert_close("x", &[1.0, 2.001], &[1.0, 2.0], dynsparse::DType::F16);
}
