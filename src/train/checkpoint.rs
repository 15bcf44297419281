//! Training checkpoints in safetensors: f32 master weights (`param.NAME`),
//! AdamW moments (`adam_m.NAME`, `adam_v.NAME`), and in the header metadata
//! the model and training configs, the step, the loss-scaler state and the
//! data sampler's RNG state — everything a resumed run needs to continue
//! bit for bit. Files are written to a temporary file and renamed, so a
//! crash while saving leaves the previous checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::{LossScaler, LrSchedule, TrainConfig};
use crate::DType;
use crate::data::BYTE_VOCAB;
use crate::error::{Error, Result, fmt_shape};
use crate::model::{AttentionMode, ModelConfig};
use crate::util::files::{max_read_bytes, read_regular};
use crate::util::machine::write_atomic;

/// Bumped whenever the layout changes; older files are refused with a clear message.
pub const FORMAT: &str = "dynsparse-train-1";

/// The optimizer-side state of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    pub params: Vec<Vec<f32>>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub scaler: LossScaler,
    pub step: u64,
    pub batcher_rng: [u64; 4],
}

/// A loaded checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub state: TrainState,
    /// Free-form strings the caller stored (e.g. the data source).
    pub extra: BTreeMap<String, String>,
}

pub(crate) fn model_meta(c: &ModelConfig, m: &mut HashMap<String, String>) {
    let mut put = |k: &str, v: String| m.insert(format!("model.{k}"), v);
    put("n_layers", c.n_layers.to_string());
    put("n_heads", c.n_heads.to_string());
    put("n_kv_heads", c.n_kv_heads.to_string());
    put("d_model", c.d_model.to_string());
    put("vocab", c.vocab.to_string());
    put("context", c.context.to_string());
    put("mlp_ratio", c.mlp_ratio.to_string());
    put("rope_theta", c.rope_theta.to_string());
    put(
        "attention",
        match c.attention {
            AttentionMode::Dense => "dense".into(),
            AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim } => {
                format!("sparse:{block},{keep_blocks},{index_heads},{index_dim}")
            }
        },
    );
}

pub(crate) fn train_meta(t: &TrainConfig, m: &mut HashMap<String, String>) {
    let mut put = |k: &str, v: String| m.insert(format!("train.{k}"), v);
    put("steps", t.steps.to_string());
    put("batch", t.batch.to_string());
    put("seq", t.seq.to_string());
    put("accum", t.accum.to_string());
    put("precision", t.precision.name().into());
    put("lr", t.lr.lr.to_string());
    put("min_lr", t.lr.min_lr.to_string());
    put("warmup_steps", t.lr.warmup_steps.to_string());
    put("beta1", t.beta1.to_string());
    put("beta2", t.beta2.to_string());
    put("weight_decay", t.weight_decay.to_string());
    put("grad_clip", t.grad_clip.to_string());
    put("warmup_frac", t.warmup_frac.to_string());
    put("ramp_frac", t.ramp_frac.to_string());
    put("kl_every", t.kl_every.to_string());
    put("seed", t.seed.to_string());
}

/// Writes a checkpoint atomically (temporary file + rename).
pub fn save(
    path: &Path,
    model: &ModelConfig,
    train: &TrainConfig,
    st: &TrainState,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    let infos = model.params();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert(DSA_SELECTION_KEY.to_string(), DSA_SELECTION.to_string());
    model_meta(model, &mut meta);
    train_meta(train, &mut meta);
    meta.insert("state.step".into(), st.step.to_string());
    meta.insert("state.scale".into(), st.scaler.scale.to_bits().to_string());
    meta.insert("state.good_steps".into(), st.scaler.good_steps.to_string());
    meta.insert("state.growth_interval".into(), st.scaler.growth_interval.to_string());
    meta.insert("state.scaler_enabled".into(), st.scaler.enabled.to_string());
    meta.insert(
        "state.batcher_rng".into(),
        st.batcher_rng.iter().map(|x| format!("{x:016x}")).collect::<Vec<_>>().join(","),
    );
    for (k, v) in extra {
        meta.insert(format!("extra.{k}"), v.clone());
    }
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = infos
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [("param", &st.params[i]), ("adam_m", &st.m[i]), ("adam_v", &st.v[i])].map(|(pre, v)| {
                (format!("{pre}.{}", p.name), bytemuck::cast_slice::<f32, u8>(v).to_vec(), p.shape.clone())
            })
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, s)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Format(format!("checkpoint: tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::Format(format!("checkpoint: serialising: {e}")))?;
    write_atomic(path, &data)
}

/// Reads a metadata field (`fail` words the error).
fn meta_get<'a>(meta: &'a HashMap<String, String>, k: &str, fail: &dyn Fn(String) -> Error) -> Result<&'a str> {
    meta.get(k)
        .map(String::as_str)
        .ok_or_else(|| fail(format!("checkpoint metadata lacks `{k}` (not a dynsparse training checkpoint?)")))
}

fn meta_num<T: std::str::FromStr>(v: &str, k: &str, fail: &dyn Fn(String) -> Error) -> Result<T> {
    v.trim().parse().map_err(|_| fail(format!("checkpoint metadata `{k}` = `{v}` is malformed")))
}

/// The model config written by [`model_meta`], range-checked.
pub(crate) fn model_from_meta(meta: &HashMap<String, String>, fail: &dyn Fn(String) -> Error) -> Result<ModelConfig> {
    let get = |k: &str| meta_get(meta, k, fail);
    let n = |k: &str| -> Result<usize> { meta_num(get(k)?, k, fail) };
    let attention = match get("model.attention")? {
        "dense" => AttentionMode::Dense,
        s => {
            let v: Vec<usize> = s
                .strip_prefix("sparse:")
                .map(|r| r.split(',').map(|x| x.parse().unwrap_or(0)).collect())
                .unwrap_or_default();
            let [block, keep_blocks, index_heads, index_dim] = v[..] else {
                return Err(fail(format!("bad attention mode `{s}` (expected dense or sparse:BLOCK,KEEP,HEADS,DIM)")));
            };
            AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim }
        }
    };
    let model = ModelConfig {
        n_layers: n("model.n_layers")?,
        n_heads: n("model.n_heads")?,
        n_kv_heads: n("model.n_kv_heads")?,
        d_model: n("model.d_model")?,
        vocab: n("model.vocab")?,
        context: n("model.context")?,
        mlp_ratio: n("model.mlp_ratio")?,
        rope_theta: meta_num(get("model.rope_theta")?, "model.rope_theta", fail)?,
        attention,
    };
    let field = |f: &str| format!("checkpoint field model.{f}");
    model.check(&field).map_err(|e| fail(e.to_string()))?;
    if model.vocab != BYTE_VOCAB {
        return Err(fail(format!(
            "checkpoint field model.vocab {}: this build's tokenizer has {BYTE_VOCAB} byte tokens",
            model.vocab
        )));
    }
    Ok(model)
}

/// The training config written by [`train_meta`], range-checked against `model`.
pub(crate) fn train_from_meta(
    meta: &HashMap<String, String>,
    model: &ModelConfig,
    fail: &dyn Fn(String) -> Error,
) -> Result<TrainConfig> {
    let get = |k: &str| meta_get(meta, k, fail);
    let n = |k: &str| -> Result<usize> { meta_num(get(k)?, k, fail) };
    let n64 = |k: &str| -> Result<u64> { meta_num(get(k)?, k, fail) };
    let f32v = |k: &str| -> Result<f32> { meta_num(get(k)?, k, fail) };
    let precision_name = get("train.precision")?;
    let precision = DType::parse(precision_name).filter(|d| d.is_float()).ok_or_else(|| {
        fail(format!("checkpoint field train.precision `{precision_name}`: expected f32, f16 or bf16"))
    })?;
    let steps = n64("train.steps")?;
    let train = TrainConfig {
        steps,
        batch: n("train.batch")?,
        seq: n("train.seq")?,
        accum: n("train.accum")?,
        precision,
        lr: LrSchedule {
            lr: f32v("train.lr")?,
            min_lr: f32v("train.min_lr")?,
            warmup_steps: n64("train.warmup_steps")?,
            total_steps: steps,
        },
        beta1: f32v("train.beta1")?,
        beta2: f32v("train.beta2")?,
        weight_decay: f32v("train.weight_decay")?,
        grad_clip: f32v("train.grad_clip")?,
        warmup_frac: meta_num(get("train.warmup_frac")?, "train.warmup_frac", fail)?,
        ramp_frac: meta_num(get("train.ramp_frac")?, "train.ramp_frac", fail)?,
        // Checkpoints before the field trained the KL on every row.
        kl_every: match meta.get("train.kl_every") {
            Some(v) => meta_num(v, "train.kl_every", fail)?,
            None => 1,
        },
        seed: n64("train.seed")?,
    };
    train.check(model, &|f: &str| format!("checkpoint field train.{f}")).map_err(|e| fail(e.to_string()))?;
    Ok(train)
}

/// Metadata key naming the sparse-attention selection the weights were trained with.
pub const DSA_SELECTION_KEY: &str = "dsa_selection";
/// Per-query causal block selection: each query row picks its own key blocks among those at
/// or before it. Checkpoints without the key were trained with the older query-block
/// selection (blocks pooled over a whole query block), which let a row see key blocks
/// after it (future tokens).
pub const DSA_SELECTION: &str = "per-query";

/// Reads, checks and returns the checkpoint at `path`: only a regular file, at
/// most [`max_read_bytes`] long, whose metadata and tensors pass [`parse`].
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = read_regular(path, "checkpoint", max_read_bytes())?;
    parse(&bytes, &path.display().to_string())
}

/// Parses checkpoint bytes (`name` labels the messages). Metadata is untrusted
/// input: every field is parsed, range-checked and cross-checked (shapes
/// against the file size before any table is built from them), and every tensor
/// must be finite, so a damaged or hostile file is one clear error, never a
/// panic, an allocation abort or a silent NaN run.
pub fn parse(bytes: &[u8], name: &str) -> Result<Checkpoint> {
    let fail = |m: String| Error::Format(format!("{name}: {m}"));
    let what = |e: safetensors::SafeTensorError| {
        fail(format!("not a readable safetensors checkpoint (truncated or foreign file): {e}"))
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(what)?;
    let tensors = SafeTensors::deserialize(bytes).map_err(what)?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| -> Result<&str> {
        meta.get(k)
            .map(String::as_str)
            .ok_or_else(|| fail(format!("checkpoint metadata lacks `{k}` (not a dynsparse training checkpoint?)")))
    };
    fn num<T: std::str::FromStr>(v: &str, k: &str, fail: &dyn Fn(String) -> Error) -> Result<T> {
        v.trim().parse().map_err(|_| fail(format!("checkpoint metadata `{k}` = `{v}` is malformed")))
    }
    let n64 = |k: &str| -> Result<u64> { num(get(k)?, k, &fail) };
    let format = get("format")?;
    if format != FORMAT {
        return Err(fail(format!("checkpoint format `{format}`, this build reads `{FORMAT}`")));
    }
    let model = model_from_meta(&meta, &fail)?;
    // The tensors must fit in the file: 3 f32 tensors (weights, m, v) per parameter. Checked
    // before the parameter table is built, so metadata cannot make that table huge.
    let need = 12 * model.n_params_u128();
    if need > bytes.len() as u128 {
        return Err(fail(format!(
            "the metadata describes {} parameters ({need} bytes of tensors) but the file has {} bytes",
            model.n_params_u128(),
            bytes.len()
        )));
    }
    let train = train_from_meta(&meta, &model, &fail)?;
    let steps = train.steps;
    let precision = train.precision;
    let step = n64("state.step")?;
    if step > steps {
        return Err(fail(format!("checkpoint field state.step {step}: accepted range 0..={steps} (train.steps)")));
    }
    let rng: Vec<u64> = get("state.batcher_rng")?
        .split(',')
        .map(|x| u64::from_str_radix(x, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| fail("bad RNG state".into()))?;
    let batcher_rng: [u64; 4] = rng.try_into().map_err(|_| fail("bad RNG state".into()))?;
    if batcher_rng == [0; 4] {
        return Err(fail("bad RNG state (all zero)".into()));
    }
    let scaler = LossScaler {
        scale: f32::from_bits(num(get("state.scale")?, "state.scale", &fail)?),
        good_steps: num(get("state.good_steps")?, "state.good_steps", &fail)?,
        growth_interval: num(get("state.growth_interval")?, "state.growth_interval", &fail)?,
        enabled: num(get("state.scaler_enabled")?, "state.scaler_enabled", &fail)?,
    };
    if !(scaler.scale.is_finite() && scaler.scale > 0.0) {
        return Err(fail(format!("checkpoint field state.scale {}: must be finite and positive", scaler.scale)));
    }
    if scaler.growth_interval == 0 || scaler.good_steps >= scaler.growth_interval {
        return Err(fail(format!(
            "checkpoint fields state.good_steps {} and state.growth_interval {}: need 0 <= good_steps < growth_interval",
            scaler.good_steps, scaler.growth_interval
        )));
    }
    if scaler.enabled != (precision == DType::F16) {
        return Err(fail(format!(
            "checkpoint field state.scaler_enabled {} contradicts train.precision {precision} (loss scaling is for f16 only)",
            scaler.enabled
        )));
    }
    match meta.get(DSA_SELECTION_KEY).map(String::as_str) {
        Some(DSA_SELECTION) => {}
        Some(other) => {
            return Err(fail(format!(
                "checkpoint field {DSA_SELECTION_KEY} `{other}`: this build knows `{DSA_SELECTION}`"
            )));
        }
        None if model.is_sparse() => log::warn!(
            "{name}: trained with the old query-block selection (which let a query see key blocks after it, i.e. future \
             tokens); it is now evaluated with the per-query causal selection, so its numbers differ: retraining is advised"
        ),
        None => {}
    }
    let read = |tname: String, shape: &[usize], nonneg: bool| -> Result<Vec<f32>> {
        let t = tensors.tensor(&tname).map_err(|_| fail(format!("checkpoint lacks tensor `{tname}`")))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape {
            return Err(fail(format!(
                "tensor `{tname}` is {:?} {}, the config needs F32 {}",
                t.dtype(),
                fmt_shape(t.shape()),
                fmt_shape(shape)
            )));
        }
        let v: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
        if let Some(i) = v.iter().position(|x| !x.is_finite() || (nonneg && *x < 0.0)) {
            return Err(fail(format!(
                "tensor `{tname}` holds {} at element {i}{}; refusing to use it",
                v[i],
                if v[i].is_finite() { " (a second moment must be >= 0)" } else { " (the run it came from diverged)" }
            )));
        }
        Ok(v)
    };
    let (mut params, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for p in model.params() {
        params.push(read(format!("param.{}", p.name), &p.shape, false)?);
        m.push(read(format!("adam_m.{}", p.name), &p.shape, false)?);
        v.push(read(format!("adam_v.{}", p.name), &p.shape, true)?);
    }
    let extra = meta.iter().filter_map(|(k, v)| k.strip_prefix("extra.").map(|k| (k.to_string(), v.clone()))).collect();
    Ok(Checkpoint { model, train, state: TrainState { params, m, v, scaler, step, batcher_rng }, extra })
}
