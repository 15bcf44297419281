//! Property test of the checkpoint loader and the resume path: ≥ 10 000
//! mutated checkpoints (header bytes, the header-length prefix, JSON text,
//! metadata values, tensor offsets/dtypes/shapes, tensor values,
//! truncations, extensions) must each give `Ok` or an error value — never a
//! panic, an allocation abort (which would kill this process) or a hang (the
//! whole run is bounded in time). Loaded checkpoints go on through the memory
//! preflight, `Trainer::new`, `restore` and (for a sample) one training step.

use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use dynsparse::backend::cpu::CpuBackend;
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::model::{AttentionMode, Model, ModelConfig};
use dynsparse::train::memory::MemoryPlan;
use dynsparse::train::{LrSchedule, MemoryReport, TrainConfig, Trainer, checkpoint};
use dynsparse::util::rng::Rng;
use dynsparse::{DType, Error};
use safetensors::tensor::{SafeTensors, TensorView};

const MUTATIONS: usize = 10_000;

fn tiny() -> (ModelConfig, TrainConfig) {
    let m = ModelConfig {
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        d_model: 8,
        vocab: 256,
        context: 32,
        mlp_ratio: 1,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block: 8, keep_blocks: 2, index_heads: 1, index_dim: 4 },
    };
    let t = TrainConfig {
        steps: 4,
        batch: 1,
        seq: 16,
        accum: 1,
        precision: DType::F16,
        lr: LrSchedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 1, total_steps: 4 },
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        grad_clip: 1.0,
        warmup_frac: 0.25,
        ramp_frac: 0.25,
        kl_every: 1,
        seed: 7,
    };
    (m, t)
}

fn good_checkpoint(be: &CpuBackend) -> Vec<u8> {
    let (m, t) = tiny();
    let model = Model::new(be, m, t.precision, 1).unwrap();
    let mut tr = Trainer::new(be, model, t, &mut MemoryReport::default()).unwrap();
    let data = generate(5, 4000, SyntheticConfig::default());
    tr.train_step(be, &data).unwrap();
    let (mm, vv) = tr.moments(be).unwrap();
    let st = checkpoint::TrainState {
        params: tr.master_values(be).unwrap(),
        m: mm,
        v: vv,
        scaler: tr.scaler,
        step: tr.step,
        batcher_rng: tr.batcher.rng.state(),
    };
    let dir = std::env::temp_dir().join(format!("dynsparse-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("c.safetensors");
    let mut extra = BTreeMap::new();
    extra.insert("data".to_string(), "synthetic".to_string());
    checkpoint::save(&p, &m, &t, &st, &extra).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    bytes
}

/// Values a hostile or damaged metadata field might hold.
const HOSTILE: [&str; 24] = [
    "",
    "0",
    "-1",
    "1",
    "2",
    "3",
    "7",
    "16",
    "255",
    "1000000000",
    "1000000000000",
    "18446744073709551615",
    "99999999999999999999999",
    "1e12",
    "NaN",
    "inf",
    "-inf",
    "0.5",
    "true",
    "false",
    "dense",
    "sparse:0,0,0,0",
    "sparse:1,1,1,1",
    "sparse:8,100000000,1,4",
];

fn header_len(b: &[u8]) -> usize {
    u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
}

/// Replaces the header with `text` (fixing the length prefix).
fn with_header(b: &[u8], text: &str) -> Vec<u8> {
    let n = header_len(b);
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&b[8 + n..]);
    out
}

/// Re-serialises the tensors with mutated metadata.
fn with_metadata(b: &[u8], meta: HashMap<String, String>) -> Vec<u8> {
    let st = SafeTensors::deserialize(b).unwrap();
    let views: Vec<(String, TensorView)> = st.tensors();
    safetensors::tensor::serialize(views, Some(meta)).unwrap()
}

fn mutate(good: &[u8], rng: &mut Rng, meta: &HashMap<String, String>) -> (&'static str, Vec<u8>) {
    let n = header_len(good);
    let header = std::str::from_utf8(&good[8..8 + n]).unwrap();
    let pick = |rng: &mut Rng, n: usize| rng.below(n as u64) as usize;
    match rng.below(9) {
        0 => {
            let mut b = good.to_vec();
            for _ in 0..1 + pick(rng, 4) {
                let i = pick(rng, 8 + n);
                b[i] ^= 1 << pick(rng, 8);
            }
            ("header bit flips", b)
        }
        1 => {
            let mut b = good.to_vec();
            let v = [0u64, 1, 7, n as u64 - 1, n as u64 + 1, good.len() as u64, u64::MAX, 1 << 40, rng.next_u64()];
            b[..8].copy_from_slice(&v[pick(rng, v.len())].to_le_bytes());
            ("header length", b)
        }
        2 => {
            let mut m = meta.clone();
            let keys: Vec<&String> = meta.keys().collect();
            for _ in 0..1 + pick(rng, 3) {
                let k = keys[pick(rng, keys.len())].clone();
                match rng.below(5) {
                    0 => {
                        m.remove(&k);
                    }
                    _ => {
                        m.insert(k, HOSTILE[pick(rng, HOSTILE.len())].to_string());
                    }
                }
            }
            ("metadata values", with_metadata(good, m))
        }
        3 => {
            // Numbers inside the JSON text (offsets, shapes, metadata) replaced.
            let digits: Vec<usize> =
                header.char_indices().filter(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).collect();
            let at = digits[pick(rng, digits.len())];
            let end = header[at..].find(|c: char| !c.is_ascii_digit()).map_or(header.len(), |e| at + e);
            let v = ["0", "1", "4294967296", "18446744073709551615", "99999999999999999999", "3", "17"];
            let text = format!("{}{}{}", &header[..at], v[pick(rng, v.len())], &header[end..]);
            ("tensor offsets and shapes", with_header(good, &text))
        }
        4 => {
            let from = ["\"F32\"", "\"data_offsets\"", "\"shape\"", "\"__metadata__\"", "{", "[", ",", "\""];
            let to = ["\"F16\"", "\"I64\"", "\"BOOL\"", "\"x\"", "", "[[", "}", "\\u0000"];
            let f = from[pick(rng, from.len())];
            let text = match header.match_indices(f).nth(pick(rng, 8)) {
                Some((i, _)) => format!("{}{}{}", &header[..i], to[pick(rng, to.len())], &header[i + f.len()..]),
                None => header.replacen(f, to[pick(rng, to.len())], 1),
            };
            ("JSON text", with_header(good, &text))
        }
        5 => {
            let cut = pick(rng, good.len());
            ("truncation", good[..cut].to_vec())
        }
        6 => {
            let mut b = good.to_vec();
            for _ in 0..1 + pick(rng, 64) {
                b.push(rng.next_u64() as u8);
            }
            ("extension", b)
        }
        7 => {
            // A non-finite or negative value inside the tensor data.
            let mut b = good.to_vec();
            let data = 8 + n;
            let i = data + 4 * pick(rng, (good.len() - data) / 4);
            let v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, f32::MAX];
            b[i..i + 4].copy_from_slice(&v[pick(rng, v.len())].to_le_bytes());
            ("tensor values", b)
        }
        _ => {
            let mut b = good.to_vec();
            for _ in 0..1 + pick(rng, 16) {
                let i = pick(rng, b.len());
                b[i] = rng.next_u64() as u8;
            }
            ("random bytes", b)
        }
    }
}

#[test]
fn ten_thousand_mutated_checkpoints_give_values_never_panics_aborts_or_hangs() {
    let be = CpuBackend::new();
    let good = good_checkpoint(&be);
    let (_, meta) = SafeTensors::read_metadata(&good).unwrap();
    let meta = meta.metadata().clone().unwrap();
    checkpoint::parse(&good, "good").expect("the unmutated checkpoint loads");
    let data = generate(6, 4000, SyntheticConfig::default());
    let mut rng = Rng::new(2026);
    let t0 = Instant::now();
    let (mut loaded, mut refused, mut stepped) = (0usize, 0usize, 0usize);
    let mut kinds: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for i in 0..MUTATIONS {
        let (kind, bytes) = mutate(&good, &mut rng, &meta);
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<bool, Error> {
            let ck = checkpoint::parse(&bytes, "mutant")?;
            // The resume path: memory preflight against a 1 GiB budget, then the trainer.
            MemoryPlan::train(&ck.model, ck.train.precision, ck.train.batch, ck.train.seq, u64::MAX).check(
                "resuming",
                Some(1 << 30),
                None,
                "",
            )?;
            let model = Model::new(&be, ck.model, ck.train.precision, ck.train.seed)?;
            let mut tr = Trainer::new(&be, model, ck.train, &mut MemoryReport::default())?;
            tr.restore(&be, &ck.state)?;
            let step = i % 10 == 0 && tr.step < ck.train.steps;
            if step {
                tr.train_step(&be, &data)?;
            }
            Ok(step)
        }));
        let e = kinds.entry(kind).or_default();
        match outcome {
            Ok(Ok(s)) => {
                loaded += 1;
                stepped += s as usize;
                e.0 += 1;
            }
            Ok(Err(err)) => {
                let m = err.to_string();
                assert!(!m.is_empty() && !m.contains('\n'), "mutation {i} ({kind}): error is not one line: {m:?}");
                refused += 1;
                e.1 += 1;
            }
            Err(_) => panic!("mutation {i} ({kind}) panicked"),
        }
    }
    let dt = t0.elapsed();
    eprintln!(
        "{MUTATIONS} mutants in {dt:.1?}: {loaded} loaded ({stepped} trained a step), {refused} refused; {kinds:?}"
    );
    assert_eq!(loaded + refused, MUTATIONS);
    assert!(refused > MUTATIONS / 2, "most mutations must be caught: {kinds:?}");
    assert!(kinds.values().all(|(_, r)| *r > 0), "every kind of damage is caught somewhere: {kinds:?}");
    assert!(dt < Duration::from_secs(60), "took {dt:?}");
}
