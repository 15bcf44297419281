//! Compression algorithms (issue 12 part C): AWQ's scale folding, Wanda,
//! the planner's knapsack and budget checks, calibration errors.

use dynsparse::DType;
use dynsparse::backend::cpu::CpuBackend;
use dynsparse::data::Corpus;
use dynsparse::model::{AttentionMode, Model, ModelConfig, StepAttention, Workspace, init_params};
use dynsparse::quant::awq::{
    AwqOptions, CLIP_GRID, Choice, Method, clip_search, compress, compress_with, fold_scales, gram, output_error,
    scales, search,
};
use dynsparse::quant::calib::{CalibOptions, Input, calibrate, linears};
use dynsparse::quant::gptq;
use dynsparse::quant::plan::{
    Evaluator, Paired, Parts, PlanOption, PlanOptions, Row, Split, Table, Target, Z_ONE_SIDED_95, check_budget,
    choose_and_verify, interleave, parse_budget, pick_even, shrink_target, solve,
};
use dynsparse::quant::prune::wanda;
use dynsparse::quant::{QFormat, QMatrix};
use dynsparse::util::rng::Rng;

fn tiny(attention: AttentionMode) -> ModelConfig {
    ModelConfig { n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, context: 16, attention, ..Default::default() }
}

/// Parameters with non-trivial LayerNorm gains and biases (the fold divides them).
fn params(cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed ^ 0xabc);
    let mut v = init_params(cfg, seed);
    for (p, x) in cfg.params().iter().zip(v.iter_mut()) {
        if p.name.contains("gamma") || p.name.contains("beta") || p.name.ends_with(".b1") {
            for (e, r) in x.iter_mut().zip(rng.normal_vec(p.shape[0])) {
                *e += 0.3 * r;
            }
        }
    }
    v
}

fn logits(cfg: &ModelConfig, values: &[Vec<f32>], ids: &[u32]) -> Vec<f32> {
    let be = CpuBackend::new();
    let m = Model::from_values(&be, *cfg, DType::F32, values).unwrap();
    let mut ws = Workspace::new(&be, cfg, DType::F32, 1, ids.len()).unwrap();
    let attn = match cfg.attention {
        AttentionMode::Dense => StepAttention::Dense,
        AttentionMode::Sparse { keep_blocks, .. } => StepAttention::Sparse { keep_blocks },
    };
    m.forward(&be, &mut ws, ids, None, attn).unwrap();
    ws.logits_f32(&be).unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn awq_folding_leaves_the_model_function_unchanged() {
    let sparse = AttentionMode::Sparse { block: 4, keep_blocks: 2, index_heads: 2, index_dim: 8 };
    for attention in [AttentionMode::Dense, sparse] {
        let cfg = tiny(attention);
        let v = params(&cfg, 7);
        let ids: Vec<u32> = (0..16u32).map(|i| (i * 37 + 11) % 256).collect();
        let before = logits(&cfg, &v, &ids);
        let mut folded = v.clone();
        let mut rng = Rng::new(3);
        let mut s_of = |k: usize| -> Vec<f32> { rng.uniform_vec(k, 0.25, 4.0) };
        for l in 0..cfg.n_layers {
            fold_scales(&cfg, &mut folded, l, Input::Ln1, &s_of(cfg.d_model)).unwrap();
            fold_scales(&cfg, &mut folded, l, Input::Ln2, &s_of(cfg.d_model)).unwrap();
            // Grouped KV heads: the query heads of one KV head share their scales.
            let hd = cfg.head_dim();
            let per_kv = s_of(cfg.n_kv_heads * hd);
            let group = cfg.n_heads / cfg.n_kv_heads;
            let s: Vec<f32> = (0..cfg.n_heads * hd).map(|c| per_kv[(c / hd / group) * hd + c % hd]).collect();
            fold_scales(&cfg, &mut folded, l, Input::Att, &s).unwrap();
            // Scales that differ inside a KV group cannot be folded.
            let mut bad = s.clone();
            bad[0] *= 2.0;
            assert!(fold_scales(&cfg, &mut folded.clone(), l, Input::Att, &bad).is_err());
        }
        assert_ne!(folded, v, "the fold changed the parameters");
        let after = logits(&cfg, &folded, &ids);
        let e = max_rel(&before, &after);
        assert!(e <= 1e-5, "{attention:?}: folded model differs by {e}");
        assert!(fold_scales(&cfg, &mut folded, 0, Input::Act, &vec![1.0; cfg.hidden()]).is_err());
    }
}

#[test]
fn awq_search_never_loses_to_rtn_and_wins_with_outlier_channels() {
    let (k, n, rows) = (64, 24, 48);
    let mut rng = Rng::new(11);
    // Activations with a few loud channels (as LayerNorm outputs have).
    let loud = [3usize, 17, 40];
    let mut x = rng.normal_vec(rows * k);
    for r in 0..rows {
        for &c in &loud {
            x[r * k + c] *= 20.0;
        }
    }
    let mean_abs: Vec<f32> = (0..k).map(|c| (0..rows).map(|r| x[r * k + c].abs()).sum::<f32>() / rows as f32).collect();
    let w = rng.normal_vec(k * n);
    let f = QFormat::Int4 { group: 32, asym: false };
    let s = search(&x, k, &mean_abs, &[(&w, n, f)]).unwrap();
    let rtn = output_error(&x, k, &w, n, &vec![1.0; k], f).unwrap();
    assert_eq!(s.err_rtn, rtn, "alpha 0 is round to nearest");
    assert!(s.alpha > 0.0 && s.err < 0.9 * rtn, "alpha {} err {} rtn {rtn}", s.alpha, s.err);
    let sc = scales(&mean_abs, 0.5);
    let (lo, hi) = sc.iter().fold((f32::MAX, 0.0f32), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(((lo * hi).sqrt() - 1.0).abs() < 1e-5);
}

#[test]
fn compress_awq_keeps_stored_format_and_beats_rtn_on_calibration_model() {
    let cfg = tiny(AttentionMode::Dense);
    let v = params(&cfg, 5);
    let be = CpuBackend::new();
    let text = Corpus { tokens: (0..400u32).map(|i| ((i * 7919) % 97 + 32) as u8).collect(), ..Default::default() };
    let model = Model::from_values(&be, cfg, DType::F32, &v).unwrap();
    let cal = calibrate(&be, &model, &text, CalibOptions { batch: 2, seq: 16, windows: 8, sample_rows: 64 }).unwrap();
    assert_eq!(cal.tokens, 8 * 16);
    let lins = linears(&cfg);
    let f = QFormat::Int4 { group: 32, asym: false };
    let ch = vec![Some(Choice { format: f, method: Method::Awq }); lins.len()];
    let c = compress(&cfg, &v, &ch, Some(&cal)).unwrap();
    for l in &lins {
        let q = c.weights[l.param].as_ref().unwrap();
        assert_eq!((q.format, q.n, q.k), (f, l.n, l.k));
        q.validate().unwrap();
    }
    // wo, qkv, w1 per layer were searched; each at least as good as RTN on its sample.
    assert_eq!(c.awq.len(), 3 * cfg.n_layers);
    assert!(c.awq.iter().all(|(_, _, rtn, awq)| awq <= rtn));
    // wv, wo, w1, w2 per layer were clipped (not wq, wk); never worse than no clipping.
    assert_eq!(c.clip.len(), 4 * cfg.n_layers);
    assert!(c.clip.iter().all(|(n, _, _)| !n.ends_with(".wq") && !n.ends_with(".wk")));
    assert!(c.clip.iter().all(|(_, e0, e)| e <= e0));
    // Folding exactness: the searched scales folded into the f32 model, un-quantized, give the same logits.
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 37 + 11) % 256).collect();
    let no_clip = AwqOptions { clip: false, ..Default::default() };
    let folded = compress_with(&cfg, &v, &ch, Some(&cal), &no_clip).unwrap();
    assert!(folded.awq.iter().any(|a| a.1 > 0.0), "some search chose scales: {:?}", folded.awq);
    assert_ne!(folded.values, v);
    let e = max_rel(&logits(&cfg, &v, &ids), &logits(&cfg, &folded.values, &ids));
    assert!(e <= 1e-5, "the folded, un-quantized model differs by {e}");
    // α = 0 without clipping is round to nearest, bit for bit (values and codes).
    assert!(scales(&cal.input(0, Input::Ln1).mean_abs(), 0.0).iter().all(|&x| x == 1.0));
    let rtn_ch = vec![Some(Choice { format: f, method: Method::Rtn }); lins.len()];
    let rtn = compress(&cfg, &v, &rtn_ch, Some(&cal)).unwrap();
    let a0 = compress_with(&cfg, &v, &ch, Some(&cal), &AwqOptions { alphas: vec![0.0], clip: false }).unwrap();
    assert_eq!(a0.values, rtn.values);
    assert_eq!(a0.weights, rtn.weights);
    assert!(rtn.clip.is_empty() && rtn.awq.is_empty(), "rtn is plain: no scales, no clipping");
    // The default search with α = 0 in its grid: the grid point 0 reproduces RTN's error exactly.
    let a0_grid =
        compress_with(&cfg, &v, &ch, Some(&cal), &AwqOptions { alphas: vec![0.0, 0.5], clip: false }).unwrap();
    assert!(a0_grid.awq.iter().all(|(_, _, rtn, awq)| awq <= rtn));
    // Weights that read one input may take different AWQ formats (the planner mixes them): one shared
    // scale searched over their summed error, each stored in its own format.
    let mixed: Vec<Option<Choice>> = lins
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let format = if i % 2 == 0 { f } else { QFormat::Int8 };
            Some(Choice { format, method: Method::Awq })
        })
        .collect();
    let c = compress(&cfg, &v, &mixed, Some(&cal)).unwrap();
    for (l, ch) in lins.iter().zip(&mixed) {
        assert_eq!(c.weights[l.param].as_ref().unwrap().format, ch.unwrap().format, "{}", l.name);
    }
    // Wanda needs calibration; AWQ on 2:4 is refused.
    let wanda_ch = vec![Some(Choice { format: QFormat::Sparse24 { int8: false }, method: Method::Wanda }); lins.len()];
    assert!(compress(&cfg, &v, &wanda_ch, None).is_err());
    let bad = vec![Some(Choice { format: QFormat::Sparse24 { int8: false }, method: Method::Awq }); lins.len()];
    assert!(compress(&cfg, &v, &bad, Some(&cal)).is_err());
    // Calibration text shorter than one sequence: one clear error.
    let short = Corpus { tokens: vec![b'a'; 10], ..Default::default() };
    let e = calibrate(&be, &model, &short, CalibOptions { seq: 16, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("shorter than one sequence"), "{e}");
}

#[test]
fn clip_search_never_increases_the_sampled_group_error() {
    let (k, n, rows) = (64, 12, 96);
    let mut rng = Rng::new(21);
    let x = rng.normal_vec(rows * k);
    let h = gram(&x, k);
    let s = rng.uniform_vec(k, 0.5, 2.0);
    for f in [QFormat::Int4 { group: 32, asym: false }, QFormat::Int4 { group: 32, asym: true }] {
        // Heavy-tailed weights (a few outliers per row): clipping pays on some groups.
        let mut t = rng.normal_vec(n * k);
        for j in 0..n {
            t[j * k + (j * 7) % k] *= 8.0;
        }
        let orig = t.clone();
        let c = clip_search(&h, k, &mut t, n, &s, f).unwrap();
        assert_eq!(c.ratios.len(), n * k / 32);
        assert!(c.ratios.iter().all(|r| CLIP_GRID.contains(r)));
        assert!(c.err <= c.err_noclip, "{f}: {} > {}", c.err, c.err_noclip);
        assert!(c.ratios.iter().any(|&r| r < 1.0) && c.err < c.err_noclip, "{f}: no group clipped");
        // The per-group objective, recomputed directly on the sample rows: never above no clipping,
        // and a ratio of 1.0 leaves the group bit for bit.
        let err_of = |w: &[f32], j: usize, g: usize| -> f64 {
            let deq = QMatrix::quantize(w, 1, 32, f).unwrap().dequantize();
            let d: Vec<f64> = (0..32).map(|p| ((deq[p] - orig[j * k + g * 32 + p]) / s[g * 32 + p]) as f64).collect();
            (0..rows).map(|r| (0..32).map(|p| x[r * k + g * 32 + p] as f64 * d[p]).sum::<f64>().powi(2)).sum()
        };
        for j in 0..n {
            for g in 0..k / 32 {
                let (a, b) = (j * k + g * 32, j * k + g * 32 + 32);
                let (e0, e1) = (err_of(&orig[a..b], j, g), err_of(&t[a..b], j, g));
                assert!(e1 <= e0 * (1.0 + 1e-9), "{f} row {j} group {g}: {e1} > {e0}");
                if c.ratios[j * (k / 32) + g] == 1.0 {
                    assert_eq!(t[a..b], orig[a..b]);
                }
            }
        }
    }
    assert!(clip_search(&h, k, &mut vec![0.0; n * k], n, &s, QFormat::Int8).is_err());
}

#[test]
fn wanda_with_uniform_norms_is_magnitude_pruning() {
    let (n, k) = (8, 64);
    let w = Rng::new(2).normal_vec(n * k);
    for int8 in [false, true] {
        let f = QFormat::Sparse24 { int8 };
        let mag = QMatrix::quantize(&w, n, k, f).unwrap();
        assert_eq!(wanda(&w, n, k, &vec![3.5; k], f).unwrap(), mag);
        // A loud channel changes which entries survive.
        let mut norms = vec![1.0; k];
        norms[1] = 1e3;
        assert_ne!(wanda(&w, n, k, &norms, f).unwrap(), mag);
    }
}

fn opt(delta: f64, us: f64, bytes: usize) -> PlanOption {
    PlanOption { choice: Some(Choice { format: QFormat::Int8, method: Method::Rtn }), delta, us, bytes }
}

fn keep(us: f64) -> PlanOption {
    PlanOption { choice: None, delta: 0.0, us, bytes: 1000 }
}

/// Least cost over every assignment with `Σ max(Δ,0) ≤ budget`.
fn brute(rows: &[Row], budget: f64) -> f64 {
    let mut best = f64::INFINITY;
    let total: usize = rows.iter().map(|r| r.options.len()).product();
    for mut code in 0..total {
        let (mut d, mut c) = (0.0, 0.0);
        for r in rows {
            let o = &r.options[code % r.options.len()];
            code /= r.options.len();
            d += o.delta.max(0.0);
            c += o.us;
        }
        if d <= budget {
            best = best.min(c);
        }
    }
    best
}

#[test]
fn planner_respects_its_budget_and_finds_the_cheapest_plan() {
    let mut rng = Rng::new(9);
    for case in 0..40 {
        let rows: Vec<Row> = (0..4)
            .map(|i| Row {
                name: format!("w{i}"),
                n: 8,
                k: 8,
                options: std::iter::once(keep(10.0 + rng.uniform() * 5.0))
                    .chain((0..3).map(|_| opt(rng.uniform() * 0.04 - 0.005, rng.uniform() * 10.0, 100)))
                    .collect(),
            })
            .collect();
        let budget = 0.01 + 0.05 * rng.uniform();
        let pick = solve(&rows, budget, Target::Speed).unwrap();
        let used: f64 = rows.iter().zip(&pick).map(|(r, &o)| r.options[o].delta.max(0.0)).sum();
        let cost: f64 = rows.iter().zip(&pick).map(|(r, &o)| r.options[o].us).sum();
        assert!(used <= budget + 1e-12, "case {case}: {used} > {budget}");
        // Exact up to the budget's discretisation: never worse than the optimum under a 1% smaller budget.
        assert!(cost <= brute(&rows, budget * 0.99) + 1e-9, "case {case}: {cost} vs {}", brute(&rows, budget * 0.99));
        assert!(cost >= brute(&rows, budget) - 1e-9);
    }
    // A format that costs no loss and is cheaper is always taken; by size, the smaller one.
    let rows =
        vec![Row { name: "w".into(), n: 8, k: 8, options: vec![keep(10.0), opt(-0.001, 4.0, 10), opt(0.5, 1.0, 5)] }];
    assert_eq!(solve(&rows, 1e-6, Target::Speed).unwrap(), vec![1]);
    assert_eq!(solve(&rows, 1.0, Target::Speed).unwrap(), vec![2]);
    assert_eq!(solve(&rows, 1.0, Target::Size).unwrap(), vec![2]);
    assert_eq!(solve(&rows, 0.1, Target::Size).unwrap(), vec![1]);
}

#[test]
fn bad_budgets_are_errors() {
    for b in ["0", "0%", "-1%", "-0.01", "abc", "NaN", "inf", "150%", "2", ""] {
        let e = parse_budget(b).unwrap_err().to_string();
        assert!(e.contains("--budget"), "{b}: {e}");
    }
    assert_eq!(parse_budget("1%").unwrap(), 0.01);
    assert_eq!(parse_budget(" 0.005 ").unwrap(), 0.005);
    assert!(check_budget(0.0).is_err() && check_budget(f64::NAN).is_err());
    let rows = vec![Row { name: "w".into(), n: 8, k: 8, options: vec![keep(1.0)] }];
    assert!(solve(&rows, 0.0, Target::Speed).is_err());
    assert!(solve(&rows, -1.0, Target::Size).is_err());
    assert!(Method::parse("obc").is_err() && Target::parse("latency").is_err());
}

#[test]
fn paired_bound_and_budget_shrink_follow_their_formulas() {
    // d = [0.1, 0.3, 0.1, 0.3]: mean 0.2, sample sd √(4·0.01/3), se = sd/2.
    let p = Paired::new(&[1.0, 2.0, 1.0, 2.0], &[1.1, 2.3, 1.1, 2.3]).unwrap();
    let se = (4.0 * 0.01f64 / 3.0).sqrt() / 2.0;
    assert!((p.mean - 0.2).abs() < 1e-12 && (p.se - se).abs() < 1e-12 && p.n == 4, "{p:?}");
    assert!((p.upper(Z_ONE_SIDED_95) - (0.2 + 1.645 * se)).abs() < 1e-12);
    // One window: no spread to estimate.
    assert_eq!(Paired::new(&[1.0], &[1.5]).unwrap().se, 0.0);
    assert!(Paired::new(&[1.0, 2.0], &[1.0]).is_err() && Paired::new(&[], &[]).is_err());
    // Prediction bound for the mean of w new windows: d̄ + z·se·√(1 + W/w); w = 0: the confidence bound.
    assert!((p.predict_upper(2.0, 4) - (0.2 + 2.0 * se * 2f64.sqrt())).abs() < 1e-12);
    assert!((p.predict_upper(2.0, 12) - (0.2 + 2.0 * se * (4.0f64 / 3.0).sqrt())).abs() < 1e-12);
    assert_eq!(p.predict_upper(2.0, 0), p.upper(2.0));
    assert!(p.predict_upper(2.0, 1_000_000) > p.upper(2.0));
    // Ratio rule: predicted 0.004, verified mean 0.008 (ratio 2), margin 0.002, budget 0.01:
    // the next plan should predict ≤ (0.01 − 0.002)/2 = 0.004, below 0.9 × target 0.01.
    assert!((shrink_target(0.01, 0.01, 0.004, 0.008, 0.010 + 1e-3) - (0.01 - 0.003) / 2.0).abs() < 1e-12);
    assert!((shrink_target(0.01, 0.01, 0.004, 0.008, 0.010) - 0.004).abs() < 1e-12);
    // The table over-predicted (ratio 0.5): still at least a 10% cut.
    assert!((shrink_target(0.01, 0.01, 0.02, 0.01, 0.0105) - 0.009).abs() < 1e-12);
    // No ratio (nothing predicted, or the verified mean ≤ 0: the margin alone broke it): the overshoot rule.
    assert!((shrink_target(1.0, 0.01, 0.0, 0.01, 0.02) - 0.45).abs() < 1e-12);
    assert!((shrink_target(2.0, 0.01, 0.5, -0.001, 0.0101) - 2.0 * 0.9 / 1.01).abs() < 1e-12);
    // The margin alone fills the budget: the overshoot rule.
    assert!((shrink_target(1.0, 0.01, 0.005, 0.005, 0.02) - 0.45).abs() < 1e-12);
    // Never grows, and non-finite inputs halve it.
    assert!((shrink_target(1.0, 0.01, 0.001, 0.001, 0.0011) - 0.0099).abs() < 1e-12);
    assert!((shrink_target(0.001, 0.01, 0.001, 0.001, 0.0011) - 0.0009).abs() < 1e-12);
    assert_eq!(shrink_target(1.0, 0.01, 0.5, 0.5, f64::NAN), 0.5);
    for (p, m, u) in [(1e-3, 2e-3, 3e-3), (5e-3, 1e-3, 1.2e-2), (0.0, 0.0, 0.02), (1e-2, 1e-2, 1e-2 + 1e-9)] {
        let t = shrink_target(0.02, 0.01, p, m, u);
        assert!(t > 0.0 && t <= 0.9 * 0.02 + 1e-15, "{p} {m} {u}: {t}");
    }
}

/// The three parts are disjoint, each spans the whole text (interleaved),
/// hold exactly the text's tokens at their ranges, and an evaluator reading
/// a part in chunks reads whole chunks; `--split halves` keeps the second
/// half held out.
#[test]
fn interleaved_parts_are_disjoint_and_span_the_text() {
    assert_eq!(pick_even(10, 4), vec![0, 2, 5, 7]);
    assert_eq!(pick_even(3, 8), vec![0, 1, 2]);
    assert_eq!(interleave(10, 3, 2), vec![vec![0..3, 6..9], vec![3..6]]);
    let text = Corpus { tokens: (0..5000u32).map(|i| (i * 7 % 251) as u8).collect(), ..Default::default() };
    let seq = 16;
    let p = Parts::new(&text, seq, Split::Interleaved).unwrap();
    let mut owner = vec![None; text.tokens.len()];
    for (k, rs) in p.ranges.iter().enumerate() {
        assert!(rs.len() >= 5000 / 17 / 3, "part {k}: {} chunks", rs.len());
        // Spans the text: a chunk in the first and in the last 5%.
        assert!(rs[0].start < 250 && rs.last().unwrap().end > 4750, "part {k}: {:?}", (&rs[0], rs.last()));
        for r in rs {
            assert_eq!(r.len(), seq + 1);
            for t in r.clone() {
                assert_eq!(owner[t], None, "token {t} in parts {:?} and {k}", owner[t]);
                owner[t] = Some(k);
            }
        }
        let part = [&p.sensitivity, &p.verification, &p.held_out][k];
        let want: Vec<u8> = rs.iter().flat_map(|r| text.tokens[r.clone()].to_vec()).collect();
        assert_eq!(part.tokens, want, "part {k}");
    }
    // The calibration text is made of sensitivity chunks only.
    let cal = p.calibration(5);
    assert_eq!(cal.tokens.len(), 5 * (seq + 1));
    for c in cal.tokens.chunks(seq + 1) {
        assert!(p.ranges[0].iter().any(|r| &text.tokens[r.clone()] == c));
    }
    // Halves: sensitivity and verification in the first half, held-out the second.
    let h = Parts::new(&text, seq, Split::Halves).unwrap();
    let half = text.tokens.len() / 2;
    assert!(h.ranges[0].iter().chain(&h.ranges[1]).all(|r| r.end <= half));
    assert!(h.ranges[2].iter().all(|r| r.start >= half - seq) && h.ranges[2].len() >= 2500 / 17 - 1);
    assert!(Split::parse("halves").unwrap() == Split::Halves && Split::parse("random").is_err());
    // Too short for three windows: an error naming the part.
    let short = Corpus { tokens: vec![65; 40], ..Default::default() };
    assert!(Parts::new(&short, seq, Split::Interleaved).unwrap_err().to_string().contains("held-out"));
    // A chunked evaluator's windows are whole chunks: its losses equal those of each chunk alone.
    let be = CpuBackend::new();
    let cfg = tiny(AttentionMode::Dense);
    let v = params(&cfg, 5);
    let mut all = Evaluator::new(&be, &cfg, DType::F32, &v, &p.verification, (1, seq, 3)).unwrap().chunked();
    let got = all.window_losses(&be, &v).unwrap();
    let n = p.ranges[1].len();
    for (i, c) in pick_even(n, 3).into_iter().enumerate() {
        // One trailing byte: the first-windows layout wants a token past the window.
        let mut tokens = text.tokens[p.ranges[1][c].clone()].to_vec();
        tokens.push(0);
        let one = Corpus { tokens, ..Default::default() };
        let mut ev = Evaluator::new(&be, &cfg, DType::F32, &v, &one, (1, seq, 1)).unwrap();
        assert_eq!(ev.window_losses(&be, &v).unwrap(), vec![got[i]], "window {i} = chunk {c}");
    }
}

/// The accepted plan's verification bound is within the budget, measured on
/// the verification text (not the sensitivity text), and the verified figure
/// is the paired mean over the verification windows. Sensitivities claim 0
/// for every candidate, so the knapsack compresses everything under any
/// planning budget: only the verification can stop it.
#[test]
fn verification_on_its_own_text_decides_and_falls_back_to_dense() {
    let be = CpuBackend::new();
    let cfg = tiny(AttentionMode::Dense);
    let v = params(&cfg, 11);
    let text =
        |mul: u32| Corpus { tokens: (0..600u32).map(|i| ((i * mul) % 89 + 32) as u8).collect(), ..Default::default() };
    let (sens_text, ver_text) = (text(7919), text(104729));
    let mut sens_ev = Evaluator::new(&be, &cfg, DType::F32, &v, &sens_text, (2, 16, 4)).unwrap();
    let mut ver = Evaluator::new(&be, &cfg, DType::F32, &v, &ver_text, (1, 16, 6)).unwrap();
    let lins = linears(&cfg);
    let size = QFormat::Int4 { group: 32, asym: false };
    let rows: Vec<Row> = lins
        .iter()
        .map(|l| Row {
            name: l.name.clone(),
            n: l.n,
            k: l.k,
            options: vec![
                PlanOption { choice: None, delta: 0.0, us: 1.0, bytes: 4 * l.n * l.k },
                PlanOption {
                    choice: Some(Choice { format: size, method: Method::Rtn }),
                    delta: 0.0,
                    us: 0.5,
                    bytes: size.bytes(l.n, l.k),
                },
            ],
        })
        .collect();
    let base_loss = sens_ev.loss(&be, &v).unwrap();
    let table = Table { base_loss, rows };
    let base_windows = ver.window_losses(&be, &v).unwrap();
    assert_eq!(base_windows.len(), 6);
    let everything =
        compress(&cfg, &v, &vec![Some(Choice { format: size, method: Method::Rtn }); lins.len()], None).unwrap();
    let all = Paired::new(&base_windows, &ver.window_losses(&be, &everything.dequantized()).unwrap()).unwrap();
    for budget in [1e-7, 0.5] {
        let opt = PlanOptions {
            budget,
            target: Target::Size,
            candidates: vec![],
            batches: vec![1],
            max_rounds: 2,
            z: Z_ONE_SIDED_95,
            predict_windows: 0,
        };
        let (plan, _) = choose_and_verify(&be, &mut ver, &v, None, &table, &opt).unwrap();
        assert!(plan.upper <= plan.budget, "budget {budget}: bound {} over {}", plan.upper, plan.budget);
        let compressed = plan.choices().iter().filter(|c| c.is_some()).count();
        if all.upper(Z_ONE_SIDED_95) <= budget * base_loss {
            // The whole plan passes: accepted at once, measured on the verification windows.
            assert_eq!((plan.rounds, compressed), (1, lins.len()));
            assert!((plan.verified.mean - all.mean).abs() < 1e-12 && plan.verified.n == 6);
        } else {
            // It cannot pass; shrinking changes nothing (every Δ claims 0): dense after max_rounds.
            assert_eq!((plan.rounds, compressed), (3, 0));
            assert_eq!(plan.verified.mean, 0.0);
        }
    }
    // The tiny budget binds here (int4 on 32-wide weights moves the loss by more than 1e-7 nats of ~5.5).
    assert!(all.upper(Z_ONE_SIDED_95) > 1e-7 * base_loss, "{all:?}");
}

/// Output error `Σ_j dᵀ H d` of a quantized `[n, k]` weight against `t` (rows = outputs).
fn gram_error(h: &[f64], k: usize, q: &QMatrix, t: &[f32]) -> f64 {
    q.dequantize()
        .chunks_exact(k)
        .zip(t.chunks_exact(k))
        .map(|(qr, tr)| {
            let d: Vec<f64> = qr.iter().zip(tr).map(|(a, b)| (a - b) as f64).collect();
            (0..k).map(|a| d[a] * (0..k).map(|b| h[a * k + b] * d[b]).sum::<f64>()).sum::<f64>()
        })
        .sum()
}

#[test]
fn gptq_lowers_the_output_error_below_round_to_nearest_in_every_format() {
    let (k, n, rows) = (128, 12, 256);
    let mut rng = Rng::new(21);
    // Correlated inputs (a shared component per row, loud channels): GPTQ's error feedback needs
    // correlations to work with.
    let base = rng.normal_vec(rows);
    let mut x = rng.normal_vec(rows * k);
    for r in 0..rows {
        for c in 0..k {
            x[r * k + c] += 1.5 * base[r] * if c % 3 == 0 { 1.0 } else { -0.5 };
            if c % 37 == 5 {
                x[r * k + c] *= 8.0;
            }
        }
    }
    let h = gram(&x, k);
    let u = gptq::inverse_factor(&h, k).unwrap();
    let t = rng.normal_vec(n * k);
    let formats = [
        QFormat::Int8,
        QFormat::Int4 { group: 32, asym: false },
        QFormat::Int4 { group: 64, asym: true },
        QFormat::Int4 { group: 128, asym: false },
    ];
    for f in formats {
        let g = gptq::quantize(&u, &t, n, k, f).unwrap();
        g.validate().unwrap();
        assert_eq!((g.format, g.n, g.k), (f, n, k));
        let r = QMatrix::quantize(&t, n, k, f).unwrap();
        let (eg, er) = (gram_error(&h, k, &g, &t), gram_error(&h, k, &r, &t));
        assert!(eg < 0.8 * er, "{f}: gptq {eg:.4e} vs rtn {er:.4e}");
        // GPTQ moves weights, not the grid: every code is one the format stores, and the
        // stored weight stays within a few steps of the original.
        assert_ne!(g, r, "{f}: gptq changed some codes");
    }
}

#[test]
fn gptq_with_uncorrelated_inputs_is_round_to_nearest_bit_for_bit() {
    // A diagonal Gram matrix leaves nothing to compensate: U is diagonal, every update is 0.
    let (k, n) = (64, 9);
    let mut rng = Rng::new(4);
    let h: Vec<f64> = (0..k * k).map(|i| if i / k == i % k { 1.0 + (i % 7) as f64 } else { 0.0 }).collect();
    let u = gptq::inverse_factor(&h, k).unwrap();
    let t = rng.normal_vec(n * k);
    for f in [QFormat::Int8, QFormat::Int4 { group: 32, asym: true }, QFormat::Int4 { group: 64, asym: false }] {
        assert_eq!(gptq::quantize(&u, &t, n, k, f).unwrap(), QMatrix::quantize(&t, n, k, f).unwrap(), "{f}");
    }
    // 2:4 is not GPTQ's; shapes are checked.
    assert!(gptq::quantize(&u, &t, n, k, QFormat::Sparse24 { int8: false }).is_err());
    assert!(gptq::quantize(&u, &t[1..], n, k, QFormat::Int8).is_err());
    assert!(gptq::quantize(&u, &t, n, k, QFormat::Int4 { group: 128, asym: false }).is_err(), "group > k");
}

#[test]
fn from_codes_stores_what_it_is_given_and_refuses_codes_outside_the_format() {
    let (n, k) = (2, 32);
    let f = QFormat::Int4 { group: 32, asym: true };
    let codes: Vec<i32> = (0..n * k).map(|i| (i % 16) as i32).collect();
    let q = QMatrix::from_codes(f, n, k, &codes, &[0.5, 0.25], &[3, 12]).unwrap();
    q.validate().unwrap();
    let d = q.dequantize();
    for (i, &c) in codes.iter().enumerate() {
        let (s, z) = if i < k { (0.5, 3) } else { (0.25, 12) };
        assert_eq!(d[i], s * (c - z) as f32);
    }
    assert!(QMatrix::from_codes(f, n, k, &[16; 64], &[0.5, 0.25], &[3, 12]).is_err());
    assert!(QMatrix::from_codes(f, n, k, &codes, &[0.5, 0.25], &[3]).is_err());
    assert!(QMatrix::from_codes(QFormat::Int8, n, k, &[-128; 64], &[1.0, 1.0], &[]).is_err());
    let i8c: Vec<i32> = (0..n * k).map(|i| i as i32 - 60).collect();
    let q8 = QMatrix::from_codes(QFormat::Int8, n, k, &i8c, &[0.1, 0.2], &[]).unwrap();
    assert_eq!(q8.dequantize()[0], 0.1 * -60.0);
}

#[test]
fn compress_gptq_uses_awq_scales_and_beats_awq_on_the_calibration_rows() {
    let cfg = tiny(AttentionMode::Dense);
    let v = params(&cfg, 5);
    let be = CpuBackend::new();
    let text = Corpus { tokens: (0..400u32).map(|i| ((i * 7919) % 97 + 32) as u8).collect(), ..Default::default() };
    let model = Model::from_values(&be, cfg, DType::F32, &v).unwrap();
    let cal = calibrate(&be, &model, &text, CalibOptions { batch: 2, seq: 16, windows: 8, sample_rows: 128 }).unwrap();
    let lins = linears(&cfg);
    let f = QFormat::Int4 { group: 32, asym: false };
    let g =
        compress(&cfg, &v, &vec![Some(Choice { format: f, method: Method::Gptq }); lins.len()], Some(&cal)).unwrap();
    let a = compress(&cfg, &v, &vec![Some(Choice { format: f, method: Method::Awq }); lins.len()], Some(&cal)).unwrap();
    // The same α search and folds as AWQ (on the round-to-nearest error), no clipping search.
    assert_eq!(g.awq, a.awq);
    assert!(g.clip.is_empty());
    assert_eq!(g.gptq.len(), lins.len());
    assert!(g.gptq.iter().all(|(_, rtn, e)| e.is_finite() && *rtn > 0.0));
    let (rtn, gp) = g.gptq.iter().fold((0.0, 0.0), |(x, y), c| (x + c.1, y + c.2.min(c.1)));
    assert!(gp < 0.9 * rtn, "gptq {gp:.4e} vs rtn {rtn:.4e} after the scales");
    for l in &lins {
        let q = g.weights[l.param].as_ref().unwrap();
        assert_eq!((q.format, q.n, q.k), (f, l.n, l.k));
        q.validate().unwrap();
    }
    // The model still computes: logits close to the f32 model's.
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 37 + 11) % 256).collect();
    let e = max_rel(&logits(&cfg, &v, &ids), &logits(&cfg, &g.dequantized(), &ids));
    assert!(e < 0.2, "gptq int4 logits differ by {e}");
    // GPTQ is for int8/int4 and needs calibration.
    let bad = vec![Some(Choice { format: QFormat::Sparse24 { int8: false }, method: Method::Gptq }); lins.len()];
    assert!(compress(&cfg, &v, &bad, Some(&cal)).is_err());
    let ch = vec![Some(Choice { format: f, method: Method::Gptq }); lins.len()];
    assert!(compress(&cfg, &v, &ch, None).is_err());
    assert_eq!(Method::parse("GPTQ").unwrap(), Method::Gptq);
}

#[test]
fn sparsegpt_prunes_two_of_four_with_less_output_error_than_magnitude() {
    let (k, n, rows) = (64, 10, 256);
    let mut rng = Rng::new(33);
    let base = rng.normal_vec(rows);
    let mut x = rng.normal_vec(rows * k);
    for r in 0..rows {
        for c in 0..k {
            x[r * k + c] += 1.2 * base[r] * if c % 2 == 0 { 1.0 } else { -0.7 };
            if c % 11 == 3 {
                x[r * k + c] *= 6.0;
            }
        }
    }
    let h = gram(&x, k);
    let u = gptq::inverse_factor(&h, k).unwrap();
    let t = rng.normal_vec(n * k);
    for f in [QFormat::Sparse24 { int8: false }, QFormat::Sparse24 { int8: true }] {
        let s = gptq::prune24(&u, &t, n, k, f).unwrap();
        s.validate().unwrap();
        // Exactly two of every four stored weights are nonzero or kept.
        let d = s.dequantize();
        for g in d.chunks_exact(4) {
            assert!(g.iter().filter(|v| **v != 0.0).count() <= 2, "{f}: {g:?}");
        }
        let m = QMatrix::quantize(&t, n, k, f).unwrap();
        let (es, em) = (gram_error(&h, k, &s, &t), gram_error(&h, k, &m, &t));
        assert!(es < 0.7 * em, "{f}: sparsegpt {es:.4e} vs magnitude {em:.4e}");
    }
    // Inputs uncorrelated and equally loud: saliency is magnitude, nothing to compensate.
    let hi: Vec<f64> = (0..k * k).map(|i| if i / k == i % k { 3.0 } else { 0.0 }).collect();
    let ui = gptq::inverse_factor(&hi, k).unwrap();
    let f = QFormat::Sparse24 { int8: false };
    assert_eq!(gptq::prune24(&ui, &t, n, k, f).unwrap(), QMatrix::quantize(&t, n, k, f).unwrap());
    assert!(gptq::prune24(&ui, &t, n, k, QFormat::Int8).is_err());
    assert_eq!(Method::parse("SparseGPT").unwrap(), Method::SparseGpt);
    assert!(Choice { format: QFormat::Int8, method: Method::SparseGpt }.check().is_err());
}
