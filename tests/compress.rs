//! `dynsparse compress` as a user runs it: a compressed checkpoint that
//! eval and generate load, its summary, and each bad input as one clear line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dynsparse"));
    c.env("RUST_LOG", "error").env("XDG_RUNTIME_DIR", "/tmp");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dynsparse-compress-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Fails unless the command exited non-zero with one `error:` line naming `needle`.
#[track_caller]
fn fails_with(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].contains(needle), "`{}` should mention `{needle}`", lines[0]);
}

#[track_caller]
fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 1-layer, d_model 32 checkpoint after two steps.
fn train_tiny(d: &Path) -> PathBuf {
    let out = d.join("run");
    ok(run(&[
        "--backend",
        "cpu",
        "train",
        "--out",
        out.to_str().unwrap(),
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
    let mut args = vec![
        "--backend",
        "cpu",
        "compress",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--windows",
        "2",
        "--decode-tokens",
        "4",
    ];
    args.extend(extra);
    run(&args)
}

/// The `loss X` eval prints.
fn eval_loss(ck: &Path) -> f64 {
    let out = ok(run(&["--backend", "cpu", "eval", "--checkpoint", ck.to_str().unwrap(), "--windows", "2"]));
    out.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("no loss in {out}"))
}

#[test]
fn compressed_checkpoints_load_and_bad_input_is_one_line() {
    let d = tmp("all");
    let ck = train_tiny(&d);
    let q8 = d.join("int8.safetensors");
    let summary = ok(compress(&ck, &q8, &[]));
    assert!(
        summary.contains("validation loss") && summary.contains("decode") && summary.contains("weights"),
        "{summary}"
    );
    // The loss compress reports after is the one eval measures on the file.
    let after: f64 = summary
        .lines()
        .find_map(|l| l.strip_prefix("validation loss: "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    let (dense, int8) = (eval_loss(&ck), eval_loss(&q8));
    assert!((after - int8).abs() < 1e-3, "compress said {after}, eval says {int8}");
    // int8 moves the loss of a barely trained model by far less than 1%, but it moves it.
    assert!((int8 - dense).abs() / dense < 0.01, "dense {dense}, int8 {int8}");
    let q4 = d.join("int4.safetensors");
    ok(compress(&ck, &q4, &["--format", "int4", "--group", "32", "--asym"]));
    assert!(std::fs::metadata(&q4).unwrap().len() < std::fs::metadata(&q8).unwrap().len());
    let text = ok(run(&[
        "--backend",
        "cpu",
        "generate",
        "--checkpoint",
        q4.to_str().unwrap(),
        "--prompt",
        "ab",
        "--max-tokens",
        "5",
        "--greedy",
        "--stats",
        "false",
    ]));
    assert!(text.starts_with("ab") && text.len() > 2, "{text:?}");

    let o = d.join("o.safetensors");
    fails_with(compress(&q8, &o, &[]), "already compressed");
    fails_with(compress(&ck, &o, &["--format", "int4", "--group", "64"]), "not a multiple of 64");
    fails_with(compress(&ck, &o, &["--format", "int3"]), "unknown weight format");
    fails_with(compress(&ck, &o, &["--budget", "0"]), "--budget 0");
    fails_with(compress(&ck, &o, &["--budget", "-0.5"]), "--budget -0.5");
    let short = d.join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    fails_with(compress(&ck, &o, &["--calib", short.to_str().unwrap()]), "shorter than one sequence");
    assert!(!o.exists(), "a failed compress wrote its output");
    std::fs::remove_dir_all(&d).unwrap();
}
