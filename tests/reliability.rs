//! Issue 9: every input a user controls is validated before any work; no
//! panic, abort, hang or silent NaN; nothing a user saved is lost. One test per
//! class of the issue, against the binary (tiny models, a few steps).

mod cli_setup;
use cli_setup::{TINY, bin};

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use safetensors::tensor::{SafeTensors, TensorView};

fn tmp(name: &str) -> PathBuf {
    cli_setup::scratch("rel", name)
}

/// Waits for `child`, killing it after `secs` (a hang fails the test instead of stalling it).
fn wait_bounded(mut child: Child, secs: u64) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("hung: still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    wait_bounded(c.spawn().unwrap(), 120)
}

fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

fn train_args<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--backend", "cpu", "train", "--out", out.to_str().unwrap()];
    for pair in TINY.chunks(2) {
        if !extra.contains(&pair[0]) {
            a.extend(pair);
        }
    }
    a.extend(extra);
    for (flag, v) in [("--eval-windows", "4"), ("--eval-every", "1000")] {
        if !extra.contains(&flag) {
            a.extend([flag, v]);
        }
    }
    a
}

fn train(out: &Path, extra: &[&str]) -> Output {
    run(&train_args(out, extra))
}

#[track_caller]
fn ok(out: &Output) {
    assert!(out.status.success(), "expected success; stderr: {}", String::from_utf8_lossy(&out.stderr));
}

/// Fails unless the command exited non-zero with exactly one `error:` line, naming every needle,
/// and no Rust panic or Debug dump.
#[track_caller]
fn fails_with(out: Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert_eq!(out.status.code(), Some(1), "an error exits 1 (not a signal or panic): {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{}` should mention `{n}`", lines[0]);
    }
    assert!(!err.contains("panicked") && !err.contains("Config {"), "{err}");
}

/// A finished 2-step run of the tiny model; returns its checkpoint.
fn tiny_run(d: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = d.join(name);
    let mut a = vec!["--steps", "2"];
    a.extend(extra);
    ok(&train(&out, &a));
    out.join("checkpoint.safetensors")
}

/// A metadata key and its new value (None: removed).
type Edit<'a> = (&'a str, Option<&'a str>);

/// Writes a copy of checkpoint `ck` with metadata edited.
fn edit_meta(ck: &Path, to: &Path, edits: &[Edit]) {
    let bytes = std::fs::read(ck).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: HashMap<String, String> = header.metadata().clone().unwrap();
    for (k, v) in edits {
        match v {
            Some(v) => meta.insert(k.to_string(), v.to_string()),
            None => meta.remove(*k),
        };
    }
    let views: Vec<(String, TensorView)> = st.tensors();
    std::fs::write(to, safetensors::tensor::serialize(views, Some(meta)).unwrap()).unwrap();
}

/// Writes a copy of `ck` whose first weight is NaN.
fn nan_weights(ck: &Path, to: &Path) {
    let bytes = std::fs::read(ck).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec(), v.shape().to_vec())).collect();
    let t = tensors.iter_mut().find(|t| t.0 == "param.tok_emb").unwrap();
    t.1[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, b, s)| (n.clone(), TensorView::new(safetensors::tensor::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(to, safetensors::tensor::serialize(views, header.metadata().clone()).unwrap()).unwrap();
}

#[test]
fn zero_values_clap_accepts_are_range_errors_not_panics() {
    let d = tmp("zero");
    let o = d.join("o");
    fails_with(train(&o, &["--eval-every", "0"]), &["--eval-every 0", "accepted range"]);
    fails_with(train(&o, &["--save-every", "0"]), &["--save-every 0"]);
    fails_with(train(&o, &["--eval-windows", "0"]), &["--eval-windows 0"]);
    fails_with(train(&o, &["--stop-at", "0"]), &["--stop-at 0"]);
    fails_with(train(&o, &["--steps", "0"]), &["--steps 0", "1..="]);
    let ck = tiny_run(&d, "run", &[]);
    fails_with(run(&["eval", "--checkpoint", ck.to_str().unwrap(), "--windows", "0"]), &["--windows 0"]);
}

#[test]
fn sizes_beyond_memory_are_refused_with_the_numbers_before_allocating() {
    let d = tmp("mem");
    let o = d.join("o");
    fails_with(train(&o, &["--context", "1000000000"]), &["memory preflight", "RoPE tables", "MemAvailable"]);
    fails_with(
        train(&o, &["--d-model", "65536", "--heads", "256", "--kv-heads", "256"]),
        &["memory preflight", "weights", "AdamW moments"],
    );
    fails_with(train(&o, &["--d-model", "1000000", "--heads", "4000", "--kv-heads", "4000"]), &["--d-model 1000000"]);
    fails_with(run(&["--backend", "cpu", "bench", "matmul", "--sizes", "200000"]), &["--sizes 200000"]);
    fails_with(
        run_env(
            &["--backend", "cpu", "bench", "matmul", "--sizes", "16384"],
            &[("DYNSPARSE_MEM_AVAILABLE", "1000000")],
        ),
        &["memory preflight", "n = 16384"],
    );
    // A plain run under a budget too small for it names the parts.
    fails_with(
        run_env(&train_args(&o, &["--steps", "1"]), &[("DYNSPARSE_MEM_AVAILABLE", "1000000")]),
        &["memory preflight", "activations", "indexer scores", "976.6 KiB"],
    );
    // Checkpoint metadata is untrusted: huge values are refused, not allocated.
    let ck = tiny_run(&d, "run", &[]);
    let cases: [(&str, &[Edit], &[&str]); 4] = [
        ("context", &[("model.context", Some("1000000000000"))], &["memory preflight", "RoPE tables"]),
        ("layers", &[("model.n_layers", Some("1000000000"))], &["model.n_layers 1000000000", "accepted range"]),
        ("batch", &[("train.batch", Some("100000000"))], &["train.batch 100000000", "accepted range"]),
        ("width", &[("model.d_model", Some("65536")), ("model.n_heads", Some("256"))], &["parameters", "the file has"]),
    ];
    for (k, edits, needles) in cases {
        let bad = d.join(format!("{k}.safetensors"));
        edit_meta(&ck, &bad, edits);
        let b = bad.to_str().unwrap();
        fails_with(run(&["--backend", "cpu", "eval", "--checkpoint", b]), needles);
        fails_with(run(&["--backend", "cpu", "generate", "--checkpoint", b]), needles);
        // A resume of a checkpoint whose step is < steps: the same refusal.
        let bad2 = d.join(format!("{k}-resume.safetensors"));
        edit_meta(&bad, &bad2, &[("state.step", Some("1"))]);
        let r = d.join("r");
        fails_with(
            run(&["--backend", "cpu", "train", "--out", r.to_str().unwrap(), "--resume", bad2.to_str().unwrap()]),
            needles,
        );
    }
}

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_without_hanging() {
    let d = tmp("fifo");
    let fifo = d.join("pipe");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let f = fifo.to_str().unwrap();
    fails_with(train(&d.join("o"), &["--data", f, "--steps", "1"]), &["FIFO", "regular file"]);
    fails_with(run(&["eval", "--checkpoint", f]), &["FIFO"]);
    fails_with(run(&["generate", "--checkpoint", f]), &["FIFO"]);
    fails_with(run(&["eval", "--checkpoint", "/dev/zero"]), &["device"]);
    fails_with(train(&d.join("o"), &["--data", "/dev/urandom", "--steps", "1"]), &["device"]);
    fails_with(run(&["eval", "--checkpoint", d.to_str().unwrap()]), &["directory"]);
    // A FIFO named in a checkpoint's metadata (the data it was trained on).
    let ck = tiny_run(&d, "run", &[]);
    let bad = d.join("fifo-data.safetensors");
    edit_meta(&ck, &bad, &[("extra.data", Some(f))]);
    fails_with(run(&["--backend", "cpu", "eval", "--checkpoint", bad.to_str().unwrap()]), &["FIFO"]);
}

#[test]
fn generate_stops_at_once_when_the_reader_goes() {
    let d = tmp("pipe");
    let ck = tiny_run(&d, "run", &[]);
    let mut child = bin()
        .args(["--backend", "cpu", "generate", "--checkpoint", ck.to_str().unwrap(), "--max-tokens", "100000000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 20];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    drop(child.stdout.take()); // `| head -c 20`
    let t0 = Instant::now();
    let out = wait_bounded(child, 30);
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?} to notice", t0.elapsed());
    assert_eq!(out.status.code(), Some(0), "a closed reader ends generation quietly with status 0");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn nonsense_that_used_to_be_accepted_is_refused() {
    let d = tmp("nonsense");
    let o = d.join("o");
    fails_with(train(&o, &["--lr", "1e30"]), &["--lr 1e30", "0 < lr <= 10"]);
    fails_with(train(&o, &["--warmup-frac", "5", "--attention", "dense"]), &["--warmup-frac", "sparse only"]);
    fails_with(train(&o, &["--warmup-frac", "5"]), &["--warmup-frac 5", "0..=1"]);
    fails_with(train(&o, &["--warmup-frac", "0.8", "--ramp-frac", "0.5"]), &["--warmup-frac 0.8 + --ramp-frac 0.5"]);
    // An adapter asked for by name that does not exist is an error, not a silent CPU run.
    let mut auto = train_args(&o, &["--steps", "1"]);
    auto.drain(..2);
    fails_with(run_env(&auto, &[("DYNSPARSE_WGPU_ADAPTER", "99")]), &["DYNSPARSE_WGPU_ADAPTER", "99"]);
    // f16 that skips step after step stops with the step and the cause.
    fails_with(
        train(&d.join("f16"), &["--precision", "f16", "--lr", "10", "--steps", "40", "--max-skipped-steps", "5"]),
        &["training stopped at step", "6 steps in a row", "non-finite", "f16"],
    );
    // Flags that contradict the resumed checkpoint are refused, not dropped.
    let part = d.join("part");
    ok(&train(&part, &["--steps", "4", "--stop-at", "2"]));
    let ck = part.join("checkpoint.safetensors");
    let c = ck.to_str().unwrap();
    fails_with(
        run(&[
            "--backend",
            "cpu",
            "train",
            "--out",
            part.to_str().unwrap(),
            "--resume",
            c,
            "--lr",
            "0.5",
            "--keep-blocks",
            "1",
        ]),
        &["--lr 0.5 (checkpoint: 0.003)", "--keep-blocks 1 (checkpoint: 4)"],
    );
    // Non-finite or inconsistent checkpoints: eval and generate refuse them at load.
    let nan = d.join("nan.safetensors");
    nan_weights(&ck, &nan);
    for cmd in ["eval", "generate"] {
        fails_with(run(&["--backend", "cpu", cmd, "--checkpoint", nan.to_str().unwrap()]), &["param.tok_emb", "NaN"]);
    }
    // Resuming a run that went NaN names the tensor, not a plotting error.
    let r = d.join("resume-nan");
    fails_with(
        run(&["--backend", "cpu", "train", "--out", r.to_str().unwrap(), "--resume", nan.to_str().unwrap()]),
        &["param.tok_emb", "NaN", "diverged"],
    );
    let cases: [(&str, &str, &[&str]); 3] = [
        ("model.rope_theta", "NaN", &["model.rope_theta NaN"]),
        ("model.vocab", "16", &["model.vocab 16", "256"]),
        ("train.lr", "NaN", &["checkpoint field train.lr NaN"]),
    ];
    for (k, v, needles) in cases {
        let bad = d.join(format!("{k}.safetensors"));
        edit_meta(&ck, &bad, &[(k, Some(v))]);
        fails_with(run(&["--backend", "cpu", "eval", "--checkpoint", bad.to_str().unwrap()]), needles);
        let r = d.join("resume-bad");
        fails_with(
            run(&["--backend", "cpu", "train", "--out", r.to_str().unwrap(), "--resume", bad.to_str().unwrap()]),
            needles,
        );
    }
}

#[test]
fn messages_name_the_flag_or_field_and_the_range() {
    let d = tmp("msg");
    let o = d.join("o");
    fails_with(train(&o, &["--lr", "inf"]), &["--lr inf: accepted range 0 < lr <= 10"]);
    fails_with(train(&o, &["--ramp-frac", "-0.1"]), &["--ramp-frac -0.1: accepted range 0..=1"]);
    fails_with(train(&o, &["--block", "0"]), &["--block 0: accepted range 1..="]);
    fails_with(train(&o, &["--layers", "0"]), &["--layers 0: accepted range 1..=1024"]);
    fails_with(train(&o, &["--heads", "3"]), &["--d-model 32 must be a multiple of --heads 3"]);
    fails_with(run(&["generate", "--checkpoint", "x", "--temperature", "-1"]), &["--temperature -1"]);
    // Resuming a finished run says so (not a plotting error).
    let ck = tiny_run(&d, "done", &[]);
    fails_with(
        run(&[
            "--backend",
            "cpu",
            "train",
            "--out",
            d.join("done").to_str().unwrap(),
            "--resume",
            ck.to_str().unwrap(),
        ]),
        &["finished (step 2 of 2)"],
    );
}

fn log_steps(dir: &Path) -> Vec<String> {
    let log = std::fs::read_to_string(dir.join("log.csv")).unwrap();
    log.lines().skip(1).map(|l| l.split(',').take(2).collect::<Vec<_>>().join(",")).collect()
}

#[test]
fn the_log_agrees_with_the_checkpoint_on_resume() {
    let d = tmp("log");
    let (a, b) = (d.join("a"), d.join("b"));
    ok(&train(&a, &["--steps", "6"]));
    let straight = log_steps(&a);
    assert_eq!(straight.len(), 6);
    // Killed after the log was written but before the checkpoint: the log runs ahead.
    ok(&train(&b, &["--steps", "6", "--stop-at", "3"]));
    let ck = b.join("checkpoint.safetensors");
    let mut log = std::fs::read_to_string(b.join("log.csv")).unwrap();
    log.push_str("3,9.99999,,0,0,1,1,0,1,1,0\n4,9.99999,,0,0,1,1,0,1,1,0\n");
    std::fs::write(b.join("log.csv"), &log).unwrap();
    ok(&train(&b, &["--resume", ck.to_str().unwrap()]));
    assert_eq!(log_steps(&b), straight, "rows past the checkpoint are recomputed, bit for bit");
    // A log that lost rows: the resumed run says so in one warning and still continues.
    ok(&train(&b, &["--steps", "6", "--stop-at", "3", "--overwrite"]));
    let log = std::fs::read_to_string(b.join("log.csv")).unwrap();
    let cut: String = log.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(b.join("log.csv"), cut).unwrap();
    let out = run_env(
        &["--backend", "cpu", "train", "--out", b.to_str().unwrap(), "--resume", ck.to_str().unwrap()],
        &[("RUST_LOG", "warn")],
    );
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rows for steps 0..1 only") && err.contains("step 3"), "{err}");
    let steps: Vec<String> = log_steps(&b).iter().map(|r| r.split(',').next().unwrap().to_string()).collect();
    assert_eq!(steps, ["0", "3", "4", "5"]);
}

#[test]
fn run_folders_are_locked_checked_and_never_overwritten_silently() {
    let d = tmp("runs");
    let out = d.join("run");
    // A second run into a folder that a live run holds is refused at once.
    let mut a = train_args(&out, &["--steps", "100000", "--save-every", "1"]);
    a.push("--overwrite");
    let mut first = bin().args(&a).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !out.join("checkpoint.safetensors").exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    fails_with(train(&out, &["--steps", "2", "--overwrite"]), &["in use by another dynsparse process", ".lock"]);
    first.kill().unwrap();
    first.wait().unwrap();
    // A fresh run into a folder holding a run is refused; --overwrite replaces it.
    let before = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    fails_with(train(&out, &["--steps", "2"]), &["already holds a run", "--resume", "--overwrite"]);
    assert_eq!(std::fs::read(out.join("checkpoint.safetensors")).unwrap(), before, "untouched");
    ok(&train(&out, &["--steps", "2", "--overwrite"]));
    assert_eq!(log_steps(&out).len(), 2);
    // An --out that cannot be written is found before any compute is spent.
    let file = d.join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = train(&file.join("sub"), &["--steps", "2"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("model:"), "refused before building the model");
    fails_with(out, &["--out", "sub"]);
    fails_with(train(&file, &["--steps", "2"]), &["--out", "not a folder"]);
}

#[test]
fn a_run_killed_at_any_moment_resumes_with_a_gapless_log() {
    let d = tmp("killlog");
    let mut interrupted = 0;
    for (i, delay_ms) in [0u64, 15, 60].into_iter().enumerate() {
        let out = d.join(format!("run{i}"));
        let a = train_args(&out, &["--steps", "400", "--save-every", "1"]);
        let mut child = bin().args(&a).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let ck = out.join("checkpoint.safetensors");
        let t0 = Instant::now();
        while !ck.exists() && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL, possibly between writing the log and the checkpoint
        child.wait().unwrap();
        let resumed =
            run(&["--backend", "cpu", "train", "--out", out.to_str().unwrap(), "--resume", ck.to_str().unwrap()]);
        if String::from_utf8_lossy(&resumed.stderr).contains("finished") {
            continue; // it completed before the kill
        }
        ok(&resumed);
        interrupted += 1;
        let steps: Vec<u64> = log_steps(&out).iter().map(|r| r.split(',').next().unwrap().parse().unwrap()).collect();
        assert_eq!(steps, (0..400).collect::<Vec<_>>(), "run {i}: every step logged once, in order");
    }
    assert!(interrupted > 0, "no run was interrupted: the test tested nothing");
}

#[test]
fn old_sparse_checkpoints_load_with_one_warning_about_the_selection() {
    let d = tmp("dsa");
    let ck = tiny_run(&d, "run", &[]);
    let old = d.join("old.safetensors");
    edit_meta(&ck, &old, &[("dsa_selection", None)]);
    let warn = [("RUST_LOG", "warn")];
    let new = run_env(&["--backend", "cpu", "eval", "--checkpoint", ck.to_str().unwrap(), "--windows", "2"], &warn);
    ok(&new);
    assert!(!String::from_utf8_lossy(&new.stderr).contains("selection"), "{}", String::from_utf8_lossy(&new.stderr));
    let out = run_env(&["--backend", "cpu", "eval", "--checkpoint", old.to_str().unwrap(), "--windows", "2"], &warn);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("query-block selection")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("future") && lines[0].contains("per-query") && lines[0].contains("retraining"), "{err}");
    let bad = d.join("bad.safetensors");
    edit_meta(&ck, &bad, &[("dsa_selection", Some("per-block"))]);
    fails_with(
        run(&["--backend", "cpu", "eval", "--checkpoint", bad.to_str().unwrap()]),
        &["dsa_selection", "per-block"],
    );
}

#[test]
fn checkpoints_keep_the_indexer_kl_row_sample_and_older_ones_train_every_row() {
    let d = tmp("klrows");
    let ck = tiny_run(&d, "run", &["--indexer-kl-every", "2"]);
    let resume = |c: &Path, extra: &[&str]| {
        let mut a = vec!["--resume", c.to_str().unwrap(), "--steps", "2"];
        a.extend(extra);
        train(&d.join("resumed"), &a)
    };
    fails_with(resume(&ck, &["--indexer-kl-every", "3"]), &["--indexer-kl-every 3 (checkpoint: 2)"]);
    // A checkpoint from before the setting: every row (1).
    let old = d.join("old.safetensors");
    edit_meta(&ck, &old, &[("train.kl_every", None)]);
    fails_with(resume(&old, &["--indexer-kl-every", "2"]), &["--indexer-kl-every 2 (checkpoint: 1)"]);
    for (v, needle) in [("0", "1..="), ("x", "malformed")] {
        let bad = d.join(format!("bad{v}.safetensors"));
        edit_meta(&ck, &bad, &[("train.kl_every", Some(v))]);
        fails_with(
            run(&["--backend", "cpu", "eval", "--checkpoint", bad.to_str().unwrap()]),
            &["train.kl_every", needle],
        );
    }
}

#[test]
fn generate_streams_through_the_kv_cache_with_stops_seeds_and_the_context_end() {
    let d = tmp("generate");
    let ck = tiny_run(&d, "run", &[]);
    let ck = ck.to_str().unwrap();
    let generate = |extra: &[&str]| {
        let mut a = vec!["--backend", "cpu", "generate", "--checkpoint", ck, "--prompt", "key ab: "];
        a.extend(extra);
        let out = run(&a);
        ok(&out);
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (a, err) = generate(&["--max-tokens", "40", "--seed", "7"]);
    let (b, _) = generate(&["--max-tokens", "40", "--seed", "7"]);
    assert_eq!(a, b, "same seed, same text");
    assert!(a.starts_with("key ab: ") && a.len() > "key ab: ".len(), "{a:?}");
    assert!(err.contains("prefill 8 tokens") && err.contains("decode 40 tokens"), "{err}");
    // A stop string ends the output before it (it never appears after the prompt).
    let (full, _) = generate(&["--max-tokens", "60", "--greedy"]);
    let gen_part = &full["key ab: ".len()..full.len() - 1];
    if let Some(c) = gen_part.chars().nth(5) {
        let stop = c.to_string();
        let (cut, err) = generate(&["--max-tokens", "60", "--greedy", "--stop", &stop]);
        let cut_part = &cut["key ab: ".len()..cut.len() - 1];
        assert!(!cut_part.contains(&stop) && gen_part.starts_with(cut_part), "{cut_part:?} vs {gen_part:?}");
        assert!(err.contains("stop string"), "{err}");
    }
    // Asking for more than the context stops at the context, saying so.
    let (_, err) = generate(&["--max-tokens", "100000"]);
    assert!(err.contains("context is full"), "{err}");
}
