//! `dynsparse compress --method awq|wanda` and `--format auto` (the planner)
//! end to end on a tiny checkpoint; their bad input as one clear line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynsparse"))
        .env("RUST_LOG", "error")
        .env("XDG_RUNTIME_DIR", "/tmp")
        .env("DYNSPARSE_CACHE_DIR", std::env::temp_dir().join(format!("dynsparse-qcli-cache-{}", std::process::id())))
        .args(args)
        .output()
        .unwrap()
}

#[track_caller]
fn ok(out: Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn fails_with(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].contains(needle), "`{}` should mention `{needle}`", lines[0]);
}

/// A 1-layer, d_model 32 sparse-attention checkpoint (grouped KV heads) after two steps.
fn train_tiny(d: &Path) -> PathBuf {
    let out = d.join("run");
    let o = out.to_str().unwrap();
    ok(run(&[
        "--backend",
        "cpu",
        "train",
        "--out",
        o,
        "--layers",
        "1",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--seq",
        "32",
        "--batch",
        "1",
        "--context",
        "64",
        "--steps",
        "2",
        "--eval-windows",
        "1",
        "--eval-every",
        "1000",
    ]));
    out.join("checkpoint.safetensors")
}

fn compress(ck: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--backend", "cpu", "compress", "--checkpoint", ck.to_str().unwrap()];
    args.extend(["--out", out.to_str().unwrap(), "--windows", "2", "--decode-tokens", "0"]);
    args.extend(extra);
    run(&args)
}

#[test]
fn awq_wanda_and_the_planner_write_loadable_checkpoints() {
    let d = std::env::temp_dir().join(format!("dynsparse-qcli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let ck = train_tiny(&d);
    let o = d.join("q.safetensors");
    for (fmt, method) in [("int4-g32", "awq"), ("2:4", "wanda")] {
        let s = ok(compress(&ck, &o, &["--format", fmt, "--method", method]));
        assert!(s.contains(&format!("({method})")), "{s}");
        ok(run(&["--backend", "cpu", "eval", "--checkpoint", o.to_str().unwrap(), "--windows", "2"]));
    }
    let s = ok(compress(&ck, &o, &["--format", "auto", "--budget", "0.05", "--target", "size"]));
    assert!(s.contains("verified") && s.contains("layers.0.w2"), "{s}");
    ok(run(&["--backend", "cpu", "eval", "--checkpoint", o.to_str().unwrap(), "--windows", "2"]));
    fails_with(compress(&ck, &o, &["--format", "2:4", "--method", "awq"]), "--method awq");
    fails_with(compress(&ck, &o, &["--format", "int8", "--method", "wanda"]), "--method wanda");
    fails_with(compress(&ck, &o, &["--format", "auto", "--group", "32"]), "--format auto");
    fails_with(compress(&ck, &o, &["--format", "auto", "--budget", "2"]), "--budget 2");
    fails_with(compress(&ck, &o, &["--format", "auto", "--target", "latency"]), "--target latency");
    std::fs::remove_dir_all(&d).unwrap();
}
