//! Compressed checkpoints: a model whose linear weights are quantized, in
//! safetensors, for inference (`eval`, `generate`, `serve`).
//!
//! Tensors: `param.NAME` (F32, the config's shape) for every dense
//! parameter; for a quantized weight `NAME` (dense `[k, n]`, quantized
//! `[n, k]`) its parts `qweight.NAME.q` (U32 `[n, q_words]`) and, where the
//! format has them, `qweight.NAME.scale` (F32 `[n, scales_per_row]`),
//! `qweight.NAME.zero` and `qweight.NAME.meta` (U32) — the layouts of
//! [`crate::quant::format`]. Metadata: `format` = [`FORMAT`], the model and
//! training configs of the source checkpoint (`model.*`, `train.*`: the
//! working dtype and the evaluation batch), `quant.NAME` = each quantized
//! weight's format, `quant.method` and `quant.plan` (how the formats were
//! chosen) and the source's `extra.*` (e.g. `extra.data`, the text whose
//! validation split evaluates the model). Written through a temporary file
//! and a rename, like training checkpoints.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::{QFormat, QMatrix};
use crate::error::{Error, Result, fmt_shape};
use crate::model::{Model, ModelConfig};
use crate::train::TrainConfig;
use crate::train::checkpoint::{
    self as tck, DSA_SELECTION, DSA_SELECTION_KEY, model_from_meta, model_meta, train_from_meta, train_meta,
};
use crate::util::files::{max_read_bytes, read_regular};
use crate::util::machine::write_atomic;

/// Bumped whenever the layout changes; other values are refused.
pub const FORMAT: &str = "dynsparse-compressed-1";

/// A model for inference, some of whose linear weights may be quantized.
#[derive(Clone, Debug, PartialEq)]
pub struct QCheckpoint {
    pub model: ModelConfig,
    /// The source's training config: `precision` is the working dtype of the
    /// dense weights and activations; `batch`, `seq` size evaluation.
    pub train: TrainConfig,
    /// f32 values in [`ModelConfig::params`] order; empty where `quant` has the weight.
    pub params: Vec<Vec<f32>>,
    /// One entry per parameter: the quantized weight, if any.
    pub quant: Vec<Option<QMatrix>>,
    /// How the weights were compressed (`rtn`, `magnitude`, …; empty: not compressed).
    pub method: String,
    /// The per-tensor plan as text (free form; empty when none).
    pub plan: String,
    /// The source checkpoint's free-form strings (e.g. `data`).
    pub extra: BTreeMap<String, String>,
}

impl QCheckpoint {
    /// A training checkpoint's weights, none quantized.
    pub fn from_training(ck: tck::Checkpoint) -> Self {
        let n = ck.state.params.len();
        QCheckpoint {
            model: ck.model,
            train: ck.train,
            params: ck.state.params,
            quant: vec![None; n],
            method: String::new(),
            plan: String::new(),
            extra: ck.extra,
        }
    }

    /// Whether any weight is quantized.
    pub fn is_compressed(&self) -> bool {
        self.quant.iter().any(Option::is_some)
    }

    /// Bytes of the weights as a model holds them: dense parameters in the
    /// working dtype, quantized ones as their parts.
    pub fn weight_bytes(&self) -> usize {
        let dt = self.train.precision.size();
        self.model
            .params()
            .iter()
            .zip(&self.quant)
            .map(|(p, q)| q.as_ref().map_or(p.shape.iter().product::<usize>() * dt, QMatrix::bytes))
            .sum()
    }

    /// Builds the model on `be`.
    pub fn to_model<B: crate::Backend>(&self, be: &B) -> Result<Model<B>> {
        Model::from_parts(be, self.model, self.train.precision, &self.params, &self.quant)
    }
}

/// Writes a compressed checkpoint atomically (temporary file + rename).
pub fn save(path: &Path, ck: &QCheckpoint) -> Result<()> {
    let infos = ck.model.params();
    if ck.params.len() != infos.len() || ck.quant.len() != infos.len() {
        return Err(Error::Invalid(format!(
            "compressed checkpoint: {} values and {} quantized slots for {} parameters",
            ck.params.len(),
            ck.quant.len(),
            infos.len()
        )));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert(DSA_SELECTION_KEY.to_string(), DSA_SELECTION.to_string());
    model_meta(&ck.model, &mut meta);
    train_meta(&ck.train, &mut meta);
    meta.insert("quant.method".into(), ck.method.clone());
    meta.insert("quant.plan".into(), ck.plan.clone());
    for (k, v) in &ck.extra {
        meta.insert(format!("extra.{k}"), v.clone());
    }
    let mut bytes: Vec<(String, Dtype, Vec<u8>, Vec<usize>)> = Vec::new();
    for ((p, v), q) in infos.iter().zip(&ck.params).zip(&ck.quant) {
        match q {
            None => bytes.push((
                format!("param.{}", p.name),
                Dtype::F32,
                bytemuck::cast_slice::<f32, u8>(v).to_vec(),
                p.shape.clone(),
            )),
            Some(q) => {
                q.validate()?;
                meta.insert(format!("quant.{}", p.name), q.format.name());
                let f = q.format;
                let parts: [(&str, Dtype, &[u8], usize); 4] = [
                    ("q", Dtype::U32, bytemuck::cast_slice(&q.q), f.q_words(q.k)),
                    ("scale", Dtype::F32, bytemuck::cast_slice(&q.scale), f.scales_per_row(q.k)),
                    ("zero", Dtype::U32, bytemuck::cast_slice(&q.zero), f.zero_words(q.k)),
                    ("meta", Dtype::U32, bytemuck::cast_slice(&q.meta), f.meta_words(q.k)),
                ];
                for (part, dt, b, w) in parts {
                    if w > 0 {
                        bytes.push((format!("qweight.{}.{part}", p.name), dt, b.to_vec(), vec![q.n, w]));
                    }
                }
            }
        }
    }
    let views = bytes
        .iter()
        .map(|(n, dt, b, s)| {
            TensorView::new(*dt, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Format(format!("compressed checkpoint: tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::Format(format!("compressed checkpoint: serialising: {e}")))?;
    write_atomic(path, &data)
}

/// The `format` metadata of a safetensors file (`None`: unreadable or absent).
fn format_of(bytes: &[u8]) -> Option<String> {
    let (_, header) = SafeTensors::read_metadata(bytes).ok()?;
    header.metadata().as_ref()?.get("format").cloned()
}

/// Reads either kind of checkpoint for inference: a compressed one, or a
/// training checkpoint (no weight quantized). Every field and tensor is
/// checked ([`parse`], [`crate::train::checkpoint::parse`]).
pub fn load_for_inference(path: &Path) -> Result<QCheckpoint> {
    let bytes = read_regular(path, "checkpoint", max_read_bytes())?;
    let name = path.display().to_string();
    if format_of(&bytes).as_deref() == Some(FORMAT) {
        parse(&bytes, &name)
    } else {
        tck::parse(&bytes, &name).map(QCheckpoint::from_training)
    }
}

/// Whether the file at `path` is a compressed checkpoint (unreadable: false).
pub fn is_compressed_file(path: &Path) -> bool {
    read_regular(path, "checkpoint", max_read_bytes()).is_ok_and(|b| format_of(&b).as_deref() == Some(FORMAT))
}

/// Parses compressed-checkpoint bytes (`name` labels the messages). Like
/// training checkpoints, metadata is untrusted: configs are range-checked,
/// the parameter table is bounded by the file size before it is built,
/// every part has the length its format asks for ([`QMatrix::validate`]),
/// dense values and scales are finite — one clear error, never a panic.
pub fn parse(bytes: &[u8], name: &str) -> Result<QCheckpoint> {
    let fail = |m: String| Error::Format(format!("{name}: {m}"));
    let what = |e: safetensors::SafeTensorError| {
        fail(format!("not a readable safetensors checkpoint (truncated or foreign file): {e}"))
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(what)?;
    let tensors = SafeTensors::deserialize(bytes).map_err(what)?;
    let meta = header.metadata().clone().unwrap_or_default();
    match meta.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        Some(f) => return Err(fail(format!("checkpoint format `{f}`, expected `{FORMAT}`"))),
        None => return Err(fail("checkpoint metadata lacks `format`".into())),
    }
    let model = model_from_meta(&meta, &fail)?;
    // Every weight takes at least half a byte (int4 codes; 2:4 keeps 2 f16 per 4): a
    // bound on the parameter table from the file size before the table is built.
    if model.n_params_u128() / 2 > bytes.len() as u128 {
        return Err(fail(format!(
            "the metadata describes {} parameters but the file has only {} bytes",
            model.n_params_u128(),
            bytes.len()
        )));
    }
    let train = train_from_meta(&meta, &model, &fail)?;
    match meta.get(DSA_SELECTION_KEY).map(String::as_str) {
        Some(DSA_SELECTION) => {}
        other => {
            return Err(fail(format!(
                "checkpoint field {DSA_SELECTION_KEY} `{}`: this build knows `{DSA_SELECTION}`",
                other.unwrap_or("")
            )));
        }
    }
    let read = |tname: &str, dt: Dtype, shape: &[usize]| -> Result<&[u8]> {
        let t = tensors.tensor(tname).map_err(|_| fail(format!("checkpoint lacks tensor `{tname}`")))?;
        if t.dtype() != dt || t.shape() != shape {
            return Err(fail(format!(
                "tensor `{tname}` is {:?} {}, expected {dt:?} {}",
                t.dtype(),
                fmt_shape(t.shape()),
                fmt_shape(shape)
            )));
        }
        Ok(t.data())
    };
    let finite = |tname: &str, v: &[f32]| -> Result<()> {
        match v.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(fail(format!("tensor `{tname}` holds {} at element {i}; refusing to use it", v[i]))),
            None => Ok(()),
        }
    };
    let linear = Model::<crate::backend::cpu::CpuBackend>::quantizable(&model);
    let (mut params, mut quant) = (Vec::new(), Vec::new());
    for (i, p) in model.params().into_iter().enumerate() {
        let Some(fname) = meta.get(&format!("quant.{}", p.name)) else {
            let tname = format!("param.{}", p.name);
            let v: Vec<f32> = bytemuck::pod_collect_to_vec(read(&tname, Dtype::F32, &p.shape)?);
            finite(&tname, &v)?;
            params.push(v);
            quant.push(None);
            continue;
        };
        let format = QFormat::parse(fname).map_err(|e| fail(format!("quant.{}: {e}", p.name)))?;
        if !linear.contains(&i) {
            return Err(fail(format!("`{}` is quantized, but only the linear weights may be", p.name)));
        }
        let [k, n] = p.shape[..] else { unreachable!("linear weights are 2-D") };
        format.check_shape(n, k).map_err(|e| fail(format!("`{}`: {e}", p.name)))?;
        let part = |part: &str, dt: Dtype, w: usize| -> Result<&[u8]> {
            if w == 0 {
                return Ok(&[]);
            }
            read(&format!("qweight.{}.{part}", p.name), dt, &[n, w])
        };
        let qm = QMatrix {
            format,
            n,
            k,
            q: bytemuck::pod_collect_to_vec(part("q", Dtype::U32, format.q_words(k))?),
            scale: bytemuck::pod_collect_to_vec(part("scale", Dtype::F32, format.scales_per_row(k))?),
            zero: bytemuck::pod_collect_to_vec(part("zero", Dtype::U32, format.zero_words(k))?),
            meta: bytemuck::pod_collect_to_vec(part("meta", Dtype::U32, format.meta_words(k))?),
        };
        finite(&format!("qweight.{}.scale", p.name), &qm.scale)?;
        qm.validate().map_err(|e| fail(format!("`{}`: {e}", p.name)))?;
        params.push(Vec::new());
        quant.push(Some(qm));
    }
    let get = |k: &str| meta.get(k).cloned().unwrap_or_default();
    let extra = meta.iter().filter_map(|(k, v)| k.strip_prefix("extra.").map(|k| (k.to_string(), v.clone()))).collect();
    Ok(QCheckpoint { model, train, params, quant, method: get("quant.method"), plan: get("quant.plan"), extra })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init_params;

    fn tiny() -> (ModelConfig, TrainConfig) {
        let model = ModelConfig {
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 1,
            d_model: 64,
            vocab: 256,
            context: 32,
            mlp_ratio: 1,
            rope_theta: 10000.0,
            attention: crate::model::AttentionMode::Sparse { block: 8, keep_blocks: 2, index_heads: 1, index_dim: 4 },
        };
        let train = TrainConfig {
            steps: 4,
            batch: 1,
            seq: 16,
            accum: 1,
            precision: crate::DType::F32,
            lr: crate::train::LrSchedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 1, total_steps: 4 },
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
            grad_clip: 1.0,
            warmup_frac: 0.25,
            ramp_frac: 0.25,
            kl_every: 1,
            seed: 7,
        };
        (model, train)
    }

    fn compressed(f: QFormat) -> QCheckpoint {
        let (model, train) = tiny();
        let mut params = init_params(&model, 1);
        let mut quant = vec![None; params.len()];
        let infos = model.params();
        for i in Model::<crate::backend::cpu::CpuBackend>::quantizable(&model) {
            let [k, n] = infos[i].shape[..] else { unreachable!() };
            let wt = crate::quant::transpose(&params[i], k, n);
            quant[i] = Some(QMatrix::quantize(&wt, n, k, f).unwrap());
            params[i] = Vec::new();
        }
        QCheckpoint {
            model,
            train,
            params,
            quant,
            method: "rtn".into(),
            plan: "all int8".into(),
            extra: [("data".to_string(), "x.txt".to_string())].into(),
        }
    }

    #[test]
    fn save_then_load_gives_back_every_part_and_field() {
        let dir = std::env::temp_dir().join(format!("dynsparse-qck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [QFormat::Int8, QFormat::Int4 { group: 32, asym: true }, QFormat::Sparse24 { int8: true }] {
            let ck = compressed(f);
            let path = dir.join("c.safetensors");
            save(&path, &ck).unwrap();
            assert!(is_compressed_file(&path));
            assert_eq!(load_for_inference(&path).unwrap(), ck, "{f}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_or_inconsistent_files_are_one_error() {
        let dir = std::env::temp_dir().join(format!("dynsparse-qck-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.safetensors");
        save(&path, &compressed(QFormat::Int4 { group: 64, asym: false })).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let e = parse(&bytes[..bytes.len() - 100], "c").unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // A format whose parts do not match the stored tensors.
        let at = bytes.windows(8).position(|w| w == b"int4-g64").unwrap();
        let mut swapped = bytes.clone();
        swapped[at..at + 8].copy_from_slice(b"int4-g32");
        let e = parse(&swapped, "c").unwrap_err().to_string();
        assert!(e.contains("expected U32") || e.contains("expected F32") || e.contains("lacks"), "{e}");
    }
}
