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
use crate::error::{Error, Result};
use crate::model::{AttentionMode, ModelConfig};
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

fn model_meta(c: &ModelConfig, m: &mut HashMap<String, String>) {
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

fn train_meta(t: &TrainConfig, m: &mut HashMap<String, String>) {
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

fn get<'a>(m: &'a HashMap<String, String>, k: &str, path: &Path) -> Result<&'a str> {
    m.get(k).map(String::as_str).ok_or_else(|| {
        Error::Format(format!(
            "{}: checkpoint metadata lacks `{k}` (not a dynsparse training checkpoint?)",
            path.display()
        ))
    })
}

fn num<T: std::str::FromStr>(m: &HashMap<String, String>, k: &str, path: &Path) -> Result<T> {
    get(m, k, path)?
        .parse()
        .map_err(|_| Error::Format(format!("{}: checkpoint metadata `{k}` is malformed", path.display())))
}

/// Loads and checks a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading checkpoint {}", path.display()), e))?;
    let what = |e: safetensors::SafeTensorError| {
        Error::Format(format!(
            "{}: not a readable safetensors checkpoint (truncated or foreign file): {e}",
            path.display()
        ))
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(what)?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(what)?;
    let meta = header.metadata().clone().unwrap_or_default();
    let format = get(&meta, "format", path)?;
    if format != FORMAT {
        return Err(Error::Format(format!(
            "{}: checkpoint format `{format}`, this build reads `{FORMAT}`",
            path.display()
        )));
    }
    let attention = match get(&meta, "model.attention", path)? {
        "dense" => AttentionMode::Dense,
        s => {
            let v: Vec<usize> = s
                .strip_prefix("sparse:")
                .map(|r| r.split(',').filter_map(|x| x.parse().ok()).collect())
                .unwrap_or_default();
            let [block, keep_blocks, index_heads, index_dim] = v[..] else {
                return Err(Error::Format(format!("{}: bad attention mode `{s}`", path.display())));
            };
            AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim }
        }
    };
    let model = ModelConfig {
        n_layers: num(&meta, "model.n_layers", path)?,
        n_heads: num(&meta, "model.n_heads", path)?,
        n_kv_heads: num(&meta, "model.n_kv_heads", path)?,
        d_model: num(&meta, "model.d_model", path)?,
        vocab: num(&meta, "model.vocab", path)?,
        context: num(&meta, "model.context", path)?,
        mlp_ratio: num(&meta, "model.mlp_ratio", path)?,
        rope_theta: num(&meta, "model.rope_theta", path)?,
        attention,
    };
    model.validate().map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
    let precision = DType::parse(get(&meta, "train.precision", path)?)
        .ok_or_else(|| Error::Format(format!("{}: bad precision", path.display())))?;
    let train = TrainConfig {
        steps: num(&meta, "train.steps", path)?,
        batch: num(&meta, "train.batch", path)?,
        seq: num(&meta, "train.seq", path)?,
        accum: num(&meta, "train.accum", path)?,
        precision,
        lr: LrSchedule {
            lr: num(&meta, "train.lr", path)?,
            min_lr: num(&meta, "train.min_lr", path)?,
            warmup_steps: num(&meta, "train.warmup_steps", path)?,
            total_steps: num(&meta, "train.steps", path)?,
        },
        beta1: num(&meta, "train.beta1", path)?,
        beta2: num(&meta, "train.beta2", path)?,
        weight_decay: num(&meta, "train.weight_decay", path)?,
        grad_clip: num(&meta, "train.grad_clip", path)?,
        warmup_frac: num(&meta, "train.warmup_frac", path)?,
        ramp_frac: num(&meta, "train.ramp_frac", path)?,
        seed: num(&meta, "train.seed", path)?,
    };
    let rng: Vec<u64> = get(&meta, "state.batcher_rng", path)?
        .split(',')
        .map(|x| u64::from_str_radix(x, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Format(format!("{}: bad RNG state", path.display())))?;
    let batcher_rng: [u64; 4] =
        rng.try_into().map_err(|_| Error::Format(format!("{}: bad RNG state", path.display())))?;
    let scaler = LossScaler {
        scale: f32::from_bits(num(&meta, "state.scale", path)?),
        good_steps: num(&meta, "state.good_steps", path)?,
        growth_interval: num(&meta, "state.growth_interval", path)?,
        enabled: num(&meta, "state.scaler_enabled", path)?,
    };
    let read = |name: String, shape: &[usize]| -> Result<Vec<f32>> {
        let t = tensors
            .tensor(&name)
            .map_err(|_| Error::Format(format!("{}: checkpoint lacks tensor `{name}`", path.display())))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape {
            return Err(Error::Format(format!(
                "{}: tensor `{name}` is {:?} {:?}, the config needs F32 {:?}",
                path.display(),
                t.dtype(),
                t.shape(),
                shape
            )));
        }
        Ok(bytemuck::pod_collect_to_vec(t.data()))
    };
    let (mut params, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for p in model.params() {
        params.push(read(format!("param.{}", p.name), &p.shape)?);
        m.push(read(format!("adam_m.{}", p.name), &p.shape)?);
        v.push(read(format!("adam_v.{}", p.name), &p.shape)?);
    }
    let extra = meta.iter().filter_map(|(k, v)| k.strip_prefix("extra.").map(|k| (k.to_string(), v.clone()))).collect();
    Ok(Checkpoint {
        model,
        train,
        state: TrainState { params, m, v, scaler, step: num(&meta, "state.step", path)?, batcher_rng },
        extra,
    })
}
