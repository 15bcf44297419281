//! WGSL kernels: the shader registry, the per-dtype code generation, and naga
//! validation.
//!
//! Every file in `shaders/` holds one op family. A file starts with helper
//! code shared by its kernels, then one section per kernel, introduced by a
//! header line naming the kernel and its tensor arguments in call order:
//!
//! ```text
//! //!kernel add(a: in, b: in, out: out)
//! @compute @workgroup_size(256)
//! fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
//!     let i = lin(g, nw);
//!     if (i >= pu(0u)) { return; }
//!     st_out(i, ld_a(i) + ld_b(i));
//! }
//! ```
//!
//! Kernels never name a storage type. For each argument the generator emits a
//! binding and accessors that match the tensor's runtime dtype:
//!
//! | role     | WGSL accessors                         | binding                                   |
//! |----------|----------------------------------------|-------------------------------------------|
//! | `in`     | `ld_x(i) -> f32`, `ld4_x(o, e, d)`     | f32, or f16/bf16 packed two per `u32`     |
//! | `out`    | `st_x(i, v)`, `ld_x(i)`                | f32 (half outputs go through f32 staging) |
//! | `inout`  | `ld_x(i)`, `st_x(i, v)`                | as `out`, staging preloaded with the data |
//! | `idx`    | `ldu_x(i) -> u32`                      | `array<u32>`, read-only                   |
//! | `idxout` | `ldu_x(i)`, `stu_x(i, v)`              | `array<u32>`, read-write                  |
//!
//! `ld4_x(o, e, d)` reads elements `o+e .. o+e+3` of a row of length `d` as a
//! `vec4<f32>`, zero past the row's end (for head-dim loops in steps of four).
//!
//! f16 is converted with `unpack2x16float`/`pack2x16float` and bf16 with bit
//! shifts (round to nearest even), so half precision works on every adapter,
//! with or without `SHADER_F16`. Half outputs are written in f32 to a staging
//! buffer and packed by `pack_half` afterwards, which keeps kernels free of
//! write races on shared `u32` words. Scalar parameters arrive in a uniform
//! block read with `pu(i) -> u32` and `pf(i) -> f32`; `lin(g, nw)` turns a 2-D
//! grid of 256-wide workgroups into a linear index (see [`grid1d`]).

use crate::DType;
use crate::error::{Error, Result};

/// Every shader file, by family name.
pub const SHADERS: &[(&str, &str)] = &[
    ("elementwise", include_str!("../../../shaders/elementwise.wgsl")),
    ("matmul", include_str!("../../../shaders/matmul.wgsl")),
    ("layernorm", include_str!("../../../shaders/layernorm.wgsl")),
    ("gelu", include_str!("../../../shaders/gelu.wgsl")),
    ("softmax", include_str!("../../../shaders/softmax.wgsl")),
    ("rope", include_str!("../../../shaders/rope.wgsl")),
    ("embedding", include_str!("../../../shaders/embedding.wgsl")),
    ("cross_entropy", include_str!("../../../shaders/cross_entropy.wgsl")),
    ("reduce", include_str!("../../../shaders/reduce.wgsl")),
    ("adamw", include_str!("../../../shaders/adamw.wgsl")),
    ("attention", include_str!("../../../shaders/attention.wgsl")),
    ("indexer", include_str!("../../../shaders/indexer.wgsl")),
    ("select", include_str!("../../../shaders/select.wgsl")),
    ("split", include_str!("../../../shaders/split.wgsl")),
    ("cached", include_str!("../../../shaders/cached.wgsl")),
    ("qmatmul", include_str!("../../../shaders/qmatmul.wgsl")),
];

/// Number of `u32` parameter words a kernel can receive.
pub const PARAM_WORDS: usize = 32;

/// What a kernel does with one tensor argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    In,
    Out,
    InOut,
    Idx,
    IdxOut,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "in" => Role::In,
            "out" => Role::Out,
            "inout" => Role::InOut,
            "idx" => Role::Idx,
            "idxout" => Role::IdxOut,
            _ => return None,
        })
    }
    pub fn writes(self) -> bool {
        matches!(self, Role::Out | Role::InOut | Role::IdxOut)
    }
    pub fn is_index(self) -> bool {
        matches!(self, Role::Idx | Role::IdxOut)
    }
}

/// One kernel section of a shader file.
#[derive(Clone, Debug)]
pub struct KernelDef {
    pub family: &'static str,
    pub name: String,
    pub args: Vec<(String, Role)>,
    /// Shared code of the file followed by this kernel's section.
    pub body: String,
}

/// Parses one shader file into its kernels.
pub fn parse_family(family: &'static str, src: &str) -> Result<Vec<KernelDef>> {
    let mut common = String::new();
    // (name, arguments, section text) of each kernel, in file order.
    type Section = (String, Vec<(String, Role)>, String);
    let mut kernels: Vec<Section> = Vec::new();
    for line in src.lines() {
        if let Some(head) = line.trim_start().strip_prefix("//!kernel ") {
            let bad = || Error::Device(format!("shaders/{family}.wgsl: bad kernel header `{line}`"));
            let (name, rest) = head.split_once('(').ok_or_else(bad)?;
            let rest = rest.trim_end().strip_suffix(')').ok_or_else(bad)?;
            let mut args = Vec::new();
            for a in rest.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                let (n, r) = a.split_once(':').ok_or_else(bad)?;
                args.push((n.trim().to_string(), Role::parse(r.trim()).ok_or_else(bad)?));
            }
            kernels.push((name.trim().to_string(), args, String::new()));
        } else if let Some(k) = kernels.last_mut() {
            k.2.push_str(line);
            k.2.push('\n');
        } else {
            common.push_str(line);
            common.push('\n');
        }
    }
    Ok(kernels
        .into_iter()
        .map(|(name, args, sec)| KernelDef { family, name, args, body: format!("{common}\n{sec}") })
        .collect())
}

/// Storage buffers WebGPU guarantees per shader stage (`Limits::default()`);
/// no kernel may bind more, so every adapter runs every kernel.
pub const DEFAULT_STORAGE_BINDINGS: usize = 8;

/// The most storage buffers any kernel binds (one per tensor argument), and
/// that kernel's name.
pub fn max_storage_bindings() -> Result<(usize, String)> {
    let mut widest = (0, String::new());
    for (family, src) in SHADERS {
        for k in parse_family(family, src)? {
            if k.args.len() > widest.0 {
                widest = (k.args.len(), format!("{family}::{}", k.name));
            }
        }
    }
    Ok(widest)
}

/// Finds a kernel by family and name.
pub fn find(family: &str, name: &str) -> Result<KernelDef> {
    let (fam, src) = SHADERS
        .iter()
        .find(|(f, _)| *f == family)
        .ok_or_else(|| Error::Device(format!("no shader family `{family}`")))?;
    parse_family(fam, src)?
        .into_iter()
        .find(|k| k.name == name)
        .ok_or_else(|| Error::Device(format!("shaders/{family}.wgsl has no kernel `{name}`")))
}

const PRELUDE: &str = "
@group(0) @binding(0) var<uniform> P_: array<vec4<u32>, 8>;
fn pu(i: u32) -> u32 { return P_[i >> 2u][i & 3u]; }
fn pf(i: u32) -> f32 { return bitcast<f32>(pu(i)); }
fn lin(g: vec3<u32>, nw: vec3<u32>) -> u32 { return g.x + g.y * nw.x * 256u; }
fn bf16_lo(w: u32) -> f32 { return bitcast<f32>(w << 16u); }
fn bf16_hi(w: u32) -> f32 { return bitcast<f32>(w & 0xffff0000u); }
";

/// The WGSL module of `k` for the given argument dtypes (the dtype of each
/// argument as bound: for `out`/`inout` that is always F32, the staging type).
pub fn generate(k: &KernelDef, dtypes: &[DType]) -> Result<String> {
    if dtypes.len() != k.args.len() {
        return Err(Error::Device(format!(
            "kernel {}::{} takes {} tensors, got {}",
            k.family,
            k.name,
            k.args.len(),
            dtypes.len()
        )));
    }
    let mut s = String::from(PRELUDE);
    for (i, ((name, role), &dt)) in k.args.iter().zip(dtypes).enumerate() {
        let b = i + 1;
        let decl =
            |access: &str, ty: &str| format!("@group(0) @binding({b}) var<storage, {access}> b_{name}: array<{ty}>;\n");
        match role {
            Role::In => {
                match dt {
                    DType::F32 => {
                        s += &decl("read", "f32");
                        s += &format!("fn ld_{name}(i: u32) -> f32 {{ return b_{name}[i]; }}\n");
                    }
                    DType::F16 => {
                        s += &decl("read", "u32");
                        s += &format!(
                            "fn ld_{name}(i: u32) -> f32 {{ return unpack2x16float(b_{name}[i >> 1u])[i & 1u]; }}\n"
                        );
                    }
                    DType::BF16 => {
                        s += &decl("read", "u32");
                        s += &format!(
                            "fn ld_{name}(i: u32) -> f32 {{ let w = b_{name}[i >> 1u]; \
                             if ((i & 1u) == 0u) {{ return bf16_lo(w); }} return bf16_hi(w); }}\n"
                        );
                    }
                    _ => {
                        return Err(Error::Device(format!(
                            "{}::{}: `{name}` must be a float tensor",
                            k.family, k.name
                        )));
                    }
                }
                // Four consecutive elements o+e..o+e+3 of a row of length d (zero beyond d).
                s += &format!(
                    "fn ld4_{name}(o: u32, e: u32, d: u32) -> vec4<f32> {{ var r = vec4<f32>(0.0); \
                     if (e < d) {{ r.x = ld_{name}(o + e); }} if (e + 1u < d) {{ r.y = ld_{name}(o + e + 1u); }} if (e + 2u < d) {{ r.z = ld_{name}(o + e + 2u); }} \
                     if (e + 3u < d) {{ r.w = ld_{name}(o + e + 3u); }} return r; }}\n"
                );
            }
            Role::Out | Role::InOut => {
                if dt != DType::F32 {
                    return Err(Error::Device(format!("{}::{}: output `{name}` must bind as f32", k.family, k.name)));
                }
                s += &decl("read_write", "f32");
                s += &format!(
                    "fn ld_{name}(i: u32) -> f32 {{ return b_{name}[i]; }}\n\
                     fn st_{name}(i: u32, v: f32) {{ b_{name}[i] = v; }}\n"
                );
            }
            Role::Idx => {
                s += &decl("read", "u32");
                s += &format!("fn ldu_{name}(i: u32) -> u32 {{ return b_{name}[i]; }}\n");
            }
            Role::IdxOut => {
                s += &decl("read_write", "u32");
                s += &format!(
                    "fn ldu_{name}(i: u32) -> u32 {{ return b_{name}[i]; }}\n\
                     fn stu_{name}(i: u32, v: u32) {{ b_{name}[i] = v; }}\n"
                );
            }
        }
    }
    s += &k.body;
    Ok(s)
}

/// Parses and validates a generated module with naga (what wgpu does too, but
/// here it yields an error message instead of a device error).
pub fn validate(label: &str, src: &str) -> Result<()> {
    let module = naga::front::wgsl::parse_str(src)
        .map_err(|e| Error::Device(format!("{label}: WGSL parse error: {}", e.emit_to_string(src))))?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .map_err(|e| Error::Device(format!("{label}: WGSL validation error: {}", e.emit_to_string(src))))?;
    Ok(())
}

/// A 1-D launch of `threads` invocations in 256-wide workgroups, folded into
/// two grid dimensions so it stays under the 65 535-per-dimension limit; the
/// kernel recovers the index with `lin(g, nw)` and bounds-checks it.
pub fn grid1d(threads: usize) -> [u32; 3] {
    let groups = threads.div_ceil(256).max(1);
    if groups <= 65_535 {
        [groups as u32, 1, 1]
    } else {
        let x = 65_535usize;
        [x as u32, groups.div_ceil(x) as u32, 1]
    }
}

/// Packs kernel parameters: each entry is one `u32` word.
#[derive(Clone, Debug, Default)]
pub struct Params(pub Vec<u32>);

impl Params {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u(mut self, v: usize) -> Self {
        self.0.push(v as u32);
        self
    }
    pub fn f(mut self, v: f32) -> Self {
        self.0.push(v.to_bits());
        self
    }
    pub fn b(mut self, v: bool) -> Self {
        self.0.push(v as u32);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel of every shader file, with every float dtype its inputs
    /// can take, passes naga's parser and validator.
    #[test]
    fn every_shader_and_dtype_variant_validates_with_naga() {
        let mut count = 0;
        for (family, src) in SHADERS {
            for k in parse_family(family, src).unwrap() {
                for dt in DType::FLOATS {
                    let dts: Vec<DType> = k
                        .args
                        .iter()
                        .map(|(_, r)| match r {
                            Role::In => dt,
                            Role::Out | Role::InOut => DType::F32,
                            Role::Idx | Role::IdxOut => DType::U32,
                        })
                        .collect();
                    let label = format!("shaders/{family}.wgsl::{} [{dt}]", k.name);
                    let src = generate(&k, &dts).unwrap();
                    if let Err(e) = validate(&label, &src) {
                        panic!("{e}");
                    }
                    count += 1;
                }
            }
        }
        assert!(count >= 3 * 20, "only {count} kernel variants found");
    }

    /// WebGPU's default limit is 8 storage buffers per stage; a kernel binding
    /// more only runs where the adapter's own limits are requested.
    #[test]
    fn every_kernel_binds_at_most_the_default_storage_buffer_limit() {
        let (n, which) = max_storage_bindings().unwrap();
        assert!(
            n <= DEFAULT_STORAGE_BINDINGS,
            "{which} binds {n} storage buffers (at most {DEFAULT_STORAGE_BINDINGS})"
        );
        assert_eq!(DEFAULT_STORAGE_BINDINGS as u32, wgpu::Limits::default().max_storage_buffers_per_shader_stage);
    }

    #[test]
    fn a_broken_shader_fails_validation_with_a_message() {
        let k = parse_family(
            "t",
            "//!kernel k(x: in, y: out)\n@compute @workgroup_size(1) fn main() { st_y(0u, ld_z(0u)); }\n",
        )
        .unwrap()
        .remove(0);
        let e = validate("t::k", &generate(&k, &[DType::F32, DType::F32]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("ld_z"), "{e}");
    }

    #[test]
    fn headers_parse_names_and_roles() {
        let ks =
            parse_family("f", "fn common() {}\n//!kernel a(x: in, i: idx, y: inout)\nA\n//!kernel b()\nB\n").unwrap();
        assert_eq!(ks.len(), 2);
        assert_eq!(ks[0].args, vec![("x".into(), Role::In), ("i".into(), Role::Idx), ("y".into(), Role::InOut)]);
        assert!(ks[0].body.contains("common") && ks[0].body.contains('A') && !ks[0].body.contains('B'));
        assert!(parse_family("f", "//!kernel bad(x: sideways)\n").is_err());
    }

    #[test]
    fn grid_folds_large_launches() {
        assert_eq!(grid1d(1), [1, 1, 1]);
        assert_eq!(grid1d(256 * 65_535), [65_535, 1, 1]);
        assert_eq!(grid1d(256 * 65_536), [65_535, 2, 1]);
    }
}
