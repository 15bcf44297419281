//! `dynsparse compress` as a user runs it: a compressed checkpoint that
//! eval and generate load, its summary, `--method awq|gptq|wanda|sparsegpt` and `--format auto`
//! (the planner), and each bad input as one clear line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod cli_setup;

fn bin() -> Command {
    let mut c = cli_setup::bin();
    // The planner's kernel-cost cache stays out of the user's ~/.cache.
    c.env("DYNSPARSE_CACHE_DIR", std::env::temp_dir().join(format!("dynsparse-compress-cache-{}", std::process::id())));
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn tmp(name: &str) -> PathBuf {
    cli_setup::scratch("compress", name)
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

/// A model with quantized linear weights computes what the dense model with
/// the dequantized weights computes (within f32 rounding), in the forward
/// pass and in prefill + decode; it refuses to train.
#[test]
fn quantized_model_matches_its_dequantized_dense_twin() {
    use dynsparse::backend::cpu::CpuBackend;
    use dynsparse::model::{
        AttentionMode, InferState, KvCache, Model, ModelConfig, StepAttention, Workspace, init_params,
    };
    use dynsparse::quant::{QFormat, QMatrix, transpose};
    let be = CpuBackend::new();
    let cfg = ModelConfig {
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        d_model: 64,
        vocab: 256,
        context: 32,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: AttentionMode::Dense,
    };
    let dense = init_params(&cfg, 3);
    let infos = cfg.params();
    for f in [QFormat::Int8, QFormat::Int4 { group: 32, asym: true }, QFormat::Sparse24 { int8: false }] {
        let (mut deq, mut quant) = (dense.clone(), vec![None; dense.len()]);
        for i in Model::<CpuBackend>::quantizable(&cfg) {
            let [k, n] = infos[i].shape[..] else { unreachable!() };
            let q = QMatrix::quantize(&transpose(&dense[i], k, n), n, k, f).unwrap();
            deq[i] = transpose(&q.dequantize(), n, k);
            quant[i] = Some(q);
        }
        let qm = Model::from_parts(&be, cfg, dynsparse::DType::F32, &dense, &quant).unwrap();
        let dm = Model::from_values(&be, cfg, dynsparse::DType::F32, &deq).unwrap();
        assert!(qm.weight_bytes() < dm.weight_bytes(), "{f}");
        let ids: Vec<u32> = (0..16u32).map(|t| (t * 37 + 11) % 256).collect();
        let run = |m: &Model<CpuBackend>| {
            let mut ws = Workspace::new(&be, &cfg, dynsparse::DType::F32, 1, 16).unwrap();
            m.forward(&be, &mut ws, &ids, Some(&ids), StepAttention::Dense).unwrap();
            let full = ws.logits_f32(&be).unwrap();
            let mut cache = KvCache::new(&be, m, 1, 32).unwrap();
            let mut st = InferState::default();
            let mut steps = m.prefill(&be, &mut cache, &mut st, 0, &ids[..10], 4).unwrap();
            for &t in &ids[10..] {
                steps.extend(m.prefill(&be, &mut cache, &mut st, 0, &[t], 1).unwrap());
            }
            (full, steps)
        };
        let ((qf, qs), (df, ds)) = (run(&qm), run(&dm));
        let close = |a: &[f32], b: &[f32], what: &str| {
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-3, "{f} {what}: worst |Δlogit| {worst}");
        };
        close(&qf, &df, "forward");
        close(&qs, &ds, "prefill+decode");
        close(&qs, &qf, "step vs forward");
        let mut ws = Workspace::new(&be, &cfg, dynsparse::DType::F32, 1, 16).unwrap();
        qm.forward(&be, &mut ws, &ids, Some(&ids), StepAttention::Dense).unwrap();
        let mut grads: Vec<_> =
            qm.params.iter().map(|p| dynsparse::Tensor::zeros(&be, p.shape(), p.dtype()).unwrap()).collect();
        let e = qm.backward(&be, &mut ws, &mut grads, 1.0, false).unwrap_err().to_string();
        assert!(e.contains("inference-only"), "{e}");
    }
}

#[test]
fn awq_wanda_and_the_planner_write_loadable_checkpoints() {
    let d = tmp("planner");
    let ck = train_tiny(&d);
    let o = d.join("q.safetensors");
    for (fmt, method) in [("int4-g32", "awq"), ("int4-g32", "gptq"), ("2:4", "wanda"), ("2:4-int8", "sparsegpt")] {
        let s = ok(compress(&ck, &o, &["--format", fmt, "--method", method]));
        assert!(s.contains(&format!("({method})")), "{s}");
        ok(run(&["--backend", "cpu", "eval", "--checkpoint", o.to_str().unwrap(), "--windows", "2"]));
    }
    let s = ok(compress(&ck, &o, &["--format", "auto", "--budget", "0.05", "--target", "size"]));
    assert!(s.contains("verified") && s.contains("layers.0.w2"), "{s}");
    ok(run(&["--backend", "cpu", "eval", "--checkpoint", o.to_str().unwrap(), "--windows", "2"]));
    fails_with(compress(&ck, &o, &["--format", "2:4", "--method", "awq"]), "--method awq");
    fails_with(compress(&ck, &o, &["--format", "2:4-int8", "--method", "gptq"]), "--method gptq");
    fails_with(compress(&ck, &o, &["--format", "int8", "--method", "wanda"]), "--method wanda");
    fails_with(compress(&ck, &o, &["--format", "int4", "--method", "sparsegpt"]), "--method sparsegpt");
    fails_with(compress(&ck, &o, &["--format", "auto", "--group", "32"]), "--format auto");
    fails_with(compress(&ck, &o, &["--format", "auto", "--budget", "2"]), "--budget 2");
    fails_with(compress(&ck, &o, &["--format", "auto", "--target", "latency"]), "--target latency");
    // Long enough to read (64 bytes) but short of one window (33 tokens) for each of the planner's two parts.
    let short = d.join("short.txt");
    let text = "In the beginning God created the heaven and the earth. And the e";
    assert_eq!(text.len(), 64);
    std::fs::write(&short, text).unwrap();
    fails_with(compress(&ck, &o, &["--format", "auto", "--calib", short.to_str().unwrap()]), "--format auto");
    std::fs::remove_dir_all(&d).unwrap();
}
