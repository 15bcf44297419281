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

#[test]
fn views_allocate_nothing_and_an_op_on_two_views_of_one_buffer_fails_clearly() {
    use dynsparse::{Backend, DType, Tensor, ops};
    let be = CpuBackend::new();
    let flat = Tensor::<CpuBackend>::zeros(&be, &[256], DType::F32).unwrap();
    let before = be.memory();
    let x = Tensor::view(&be, &flat, 0, &[128]).unwrap();
    let mut y = Tensor::view(&be, &flat, 128, &[128]).unwrap();
    assert_eq!((be.memory().allocated, be.memory().allocations), (before.allocated, before.allocations));
    assert!(Tensor::view(&be, &flat, 200, &[57]).is_err(), "a view past the end is an error");
    // Reading one view and writing another of the same buffer: a clear panic, not a deadlock.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ops::axpby(&be, 1.0, &x, 1.0, &mut y)));
    let err = r.expect_err("aliasing views must not run");
    let msg = err.downcast_ref::<String>().cloned().or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()));
    assert!(msg.unwrap_or_default().contains("views of one flat buffer"), "the panic names the cause");
    drop(flat);
    // The views keep the allocation alive after the base is dropped.
    assert_eq!(y.to_f32_vec(&be).unwrap(), vec![0.0; 128]);
}
