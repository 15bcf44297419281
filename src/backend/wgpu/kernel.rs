//! WGSL kernels: the shader registry, the per-dtype code generation, and naga
//! validation.
//!
//! Every file in `shaders/` holds one op family. A file starts with helper
//! code shared by its kernels, then one section per kernel, introduced by a
//! header line naming the kernel and its tensor arguments in call order:
//!
//! ```text
//! //!kernel add(a: in, b: in, out: out) : CountParams
//! @compute @workgroup_size(256)
//! fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
//!     let i = lin(g, nw);
//!     if (i >= P.n) { return; }
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
//! write races on shared `u32` words. Scalar parameters arrive in a typed
//! uniform struct `P` (below); `lin(g, nw)` turns a 2-D grid of 256-wide
//! workgroups into a linear index (see [`grid1d`]).
//!
//! # Typed parameters
//!
//! A kernel header names its parameter struct after its arguments,
//! `//!kernel matmul_hw(a: in, b: in, c: out) : MatmulParams`. The struct is
//! declared in WGSL (scalar `u32`/`i32`/`f32` members) and mirrored in Rust by
//! [`wgsl_params!`]; the generator binds it as `var<uniform> P: MatmulParams`,
//! and when the pipeline is created [`check_params`] compares
//! naga's layout of the WGSL struct (member names, offsets, sizes) with the
//! Rust field table, so a field added, renamed or reordered on one side only
//! is an error naming that field instead of a silently wrong kernel. A
//! struct several files share (`CountParams`, `AttnParams`, …) is declared
//! once, in `shaders/common.wgsl`. A header without a struct is an error
//! (the positional-word path the first kernels used is gone).
//!
//! # Shared helpers
//!
//! `shaders/common.wgsl` holds helpers every family may use (`neg_inf`,
//! `wg_index`, workgroup reductions, online softmax statistics, shared
//! parameter structs), in sections headed `//!helper NAME`.
//! A section is linked into a kernel's module when the kernel (or another
//! linked helper) uses `NAME` and does not define it itself.
//!
//! # Optional features
//!
//! [`KernelFeatures`] says which optional shader capabilities a device was
//! opened with: subgroup operations (`SUBGROUP`) and f16 arithmetic
//! (`SHADER_F16`); `DYNSPARSE_WGPU_SUBGROUPS=0|1` and `DYNSPARSE_WGPU_F16=0|1`
//! override the adapter's answer. A kernel section opts in with line blocks
//!
//! ```text
//! //#if subgroups
//! let s = subgroupAdd(v);
//! //#else
//! let s = wg_sum(lid, v);
//! //#endif
//! ```
//!
//! (`//#if f16`, `//#if !subgroups`, … likewise; blocks do not nest). The
//! generator keeps the branch of the features in effect for that kernel:
//! those requested that its text names in an `//#if`, and `f16` only when
//! every input the kernel reads as f16 (`ldh_x` / `ld4h_x` anywhere in its
//! text) is f16 — other inputs (an f32 `stats` or `scale` beside f16
//! activations) keep their own dtype. With `f16` in effect the module starts with
//! `enable f16;` and f16 inputs bind as `array<f16>`, read as f16 with
//! `ldh_x(i)` and `ld4h_x(o, e, d)` (and as f32 with `ld_x`, `ld4_x`). Subgroup builtins need no
//! directive in naga 30 (its `enable subgroups;` is not implemented yet).

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
    ("cached_hw", include_str!("../../../shaders/cached_hw.wgsl")),
    ("qmatmul", include_str!("../../../shaders/qmatmul.wgsl")),
    ("attention_hw", include_str!("../../../shaders/attention_hw.wgsl")),
];

/// Helpers linked into any kernel that uses them (see the module docs).
pub const COMMON: &str = include_str!("../../../shaders/common.wgsl");

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
    /// The WGSL struct its parameters arrive in (binding 0, `P`).
    pub params: String,
    /// Shared code of the file followed by this kernel's section.
    pub body: String,
}

/// Parses one shader file into its kernels.
pub fn parse_family(family: &'static str, src: &str) -> Result<Vec<KernelDef>> {
    let mut common = String::new();
    // (name, arguments, section text) of each kernel, in file order.
    type Section = (String, Vec<(String, Role)>, String, String);
    let mut kernels: Vec<Section> = Vec::new();
    for line in src.lines() {
        if let Some(head) = line.trim_start().strip_prefix("//!kernel ") {
            let bad = || Error::Device(format!("shaders/{family}.wgsl: bad kernel header `{line}`"));
            let (name, rest) = head.split_once('(').ok_or_else(bad)?;
            let (rest, params) = match rest.rsplit_once(')') {
                Some((args, tail)) => {
                    let tail = tail.trim();
                    let params = match tail.strip_prefix(':') {
                        Some(t) if is_ident(t.trim()) => t.trim().to_string(),
                        _ => return Err(bad()),
                    };
                    (args, params)
                }
                None => return Err(bad()),
            };
            let mut args = Vec::new();
            for a in rest.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                let (n, r) = a.split_once(':').ok_or_else(bad)?;
                args.push((n.trim().to_string(), Role::parse(r.trim()).ok_or_else(bad)?));
            }
            kernels.push((name.trim().to_string(), args, params, String::new()));
        } else if let Some(k) = kernels.last_mut() {
            k.3.push_str(line);
            k.3.push('\n');
        } else {
            common.push_str(line);
            common.push('\n');
        }
    }
    Ok(kernels
        .into_iter()
        .map(|(name, args, params, sec)| KernelDef { family, name, args, params, body: format!("{common}\n{sec}") })
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

/// Optional shader capabilities the kernels may use (see the module docs):
/// the device's features after the environment overrides, shared by every
/// kernel family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KernelFeatures {
    /// Subgroup operations (`subgroupAdd`, `subgroupMax`, …): `wgpu::Features::SUBGROUP`.
    pub subgroups: bool,
    /// f16 arithmetic and f16 storage arrays: `wgpu::Features::SHADER_F16`.
    pub f16: bool,
}

impl KernelFeatures {
    /// No optional feature: every kernel's fallback path.
    pub const NONE: Self = Self { subgroups: false, f16: false };
    /// Both features.
    pub const ALL: Self = Self { subgroups: true, f16: true };

    /// Every combination, [`KernelFeatures::NONE`] first (for tests that
    /// build every variant).
    pub fn every() -> [Self; 4] {
        [Self::NONE, Self { subgroups: true, f16: false }, Self { subgroups: false, f16: true }, Self::ALL]
    }

    /// The features to open a device with, given what the adapter offers:
    /// each one on when the adapter has it, unless `DYNSPARSE_WGPU_SUBGROUPS`
    /// / `DYNSPARSE_WGPU_F16` says `0` (off) or `1` (on; an error if the
    /// adapter lacks it).
    pub fn detect(available: wgpu::Features) -> Result<Self> {
        let var = |n: &str| std::env::var(n).ok();
        Self::resolve(available, var("DYNSPARSE_WGPU_SUBGROUPS").as_deref(), var("DYNSPARSE_WGPU_F16").as_deref())
    }

    /// [`KernelFeatures::detect`] with the two variables' values given.
    pub fn resolve(available: wgpu::Features, subgroups: Option<&str>, f16: Option<&str>) -> Result<Self> {
        let pick = |var: &str, value: Option<&str>, feature: wgpu::Features| -> Result<bool> {
            let have = available.contains(feature);
            match value.map(str::trim) {
                None | Some("") | Some("auto") => Ok(have),
                Some("0") => Ok(false),
                Some("1") if have => Ok(true),
                Some("1") => Err(Error::Unavailable(format!("{var}=1: the adapter lacks {feature:?}"))),
                Some(other) => Err(Error::Unavailable(format!("{var}={other}: expected `0`, `1` or `auto`"))),
            }
        };
        Ok(Self {
            subgroups: pick("DYNSPARSE_WGPU_SUBGROUPS", subgroups, wgpu::Features::SUBGROUP)?,
            f16: pick("DYNSPARSE_WGPU_F16", f16, wgpu::Features::SHADER_F16)?,
        })
    }

    /// The wgpu device features these need.
    pub fn wgpu_features(self) -> wgpu::Features {
        let mut f = wgpu::Features::empty();
        if self.subgroups {
            f |= wgpu::Features::SUBGROUP;
        }
        if self.f16 {
            f |= wgpu::Features::SHADER_F16;
        }
        f
    }

    /// Whether every feature of `other` is in `self`.
    pub fn contains(self, other: Self) -> bool {
        (self.subgroups || !other.subgroups) && (self.f16 || !other.f16)
    }

    /// The features in effect for kernel `k` with argument `dtypes`: those of
    /// `self` that `k` names in an `//#if` block, `f16` only when every input
    /// `k` reads as f16 (`ldh_x` / `ld4h_x`) is f16, and there is one.
    pub fn for_kernel(self, k: &KernelDef, dtypes: &[DType]) -> Self {
        let names = |f: &str| k.body.lines().any(|l| cond_of(l).is_some_and(|(_, name)| name == f));
        let read_half = |n: &str| uses(&k.body, &format!("ldh_{n}")) || uses(&k.body, &format!("ld4h_{n}"));
        let mut half_ins = k.args.iter().zip(dtypes).filter(|((n, r), _)| *r == Role::In && read_half(n)).peekable();
        let halves = half_ins.peek().is_some() && half_ins.all(|(_, &d)| d == DType::F16);
        Self { subgroups: self.subgroups && names("subgroups"), f16: self.f16 && names("f16") && halves }
    }

    fn has(self, name: &str) -> Option<bool> {
        match name {
            "subgroups" => Some(self.subgroups),
            "f16" => Some(self.f16),
            _ => None,
        }
    }
}

impl std::fmt::Display for KernelFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(f, "subgroups {}, f16 {}", on(self.subgroups), on(self.f16))
    }
}

/// `(negated, name)` of an `//#if [!]name` line.
fn cond_of(line: &str) -> Option<(bool, &str)> {
    let c = line.trim().strip_prefix("//#if ")?.trim();
    Some(match c.strip_prefix('!') {
        Some(n) => (true, n.trim()),
        None => (false, c),
    })
}

/// Keeps the `//#if` / `//#else` / `//#endif` branches of `body` that
/// `features` select (dropped lines become empty, so line numbers in naga's
/// messages still match the section).
fn preprocess(label: &str, body: &str, features: KernelFeatures) -> Result<String> {
    let bad = |why: &str| Err(Error::Device(format!("{label}: {why}")));
    let mut out = String::with_capacity(body.len());
    // Some(keep) inside a block.
    let mut block: Option<bool> = None;
    for line in body.lines() {
        let t = line.trim();
        if let Some((neg, name)) = cond_of(line) {
            if block.is_some() {
                return bad("nested `//#if`");
            }
            let Some(on) = features.has(name) else {
                return bad(&format!("unknown feature in `{t}` (expected subgroups or f16)"));
            };
            block = Some(on != neg);
        } else if t == "//#else" {
            match block {
                Some(k) => block = Some(!k),
                None => return bad("`//#else` outside `//#if`"),
            }
        } else if t == "//#endif" {
            if block.take().is_none() {
                return bad("`//#endif` outside `//#if`");
            }
        } else if block != Some(false) {
            out.push_str(line);
        }
        out.push('\n');
    }
    if block.is_some() {
        return bad("`//#if` without `//#endif`");
    }
    Ok(out)
}

const PRELUDE: &str = "
fn lin(g: vec3<u32>, nw: vec3<u32>) -> u32 { return g.x + g.y * nw.x * 256u; }
fn bf16_lo(w: u32) -> f32 { return bitcast<f32>(w << 16u); }
fn bf16_hi(w: u32) -> f32 { return bitcast<f32>(w & 0xffff0000u); }
";

/// The WGSL module of `k` for the given argument dtypes (the dtype of each
/// argument as bound: for `out`/`inout` that is always F32, the staging type),
/// without optional features.
pub fn generate(k: &KernelDef, dtypes: &[DType]) -> Result<String> {
    generate_with(k, dtypes, KernelFeatures::NONE)
}

/// [`generate`] with the optional `features` of the device (narrowed to
/// those in effect for this kernel, see [`KernelFeatures::for_kernel`]).
pub fn generate_with(k: &KernelDef, dtypes: &[DType], features: KernelFeatures) -> Result<String> {
    if dtypes.len() != k.args.len() {
        return Err(Error::Device(format!(
            "kernel {}::{} takes {} tensors, got {}",
            k.family,
            k.name,
            k.args.len(),
            dtypes.len()
        )));
    }
    let features = features.for_kernel(k, dtypes);
    let body = preprocess(&format!("{}::{}", k.family, k.name), &k.body, features)?;
    let mut s = String::new();
    if features.f16 {
        s += "enable f16;\n";
    }
    s += &format!("\n@group(0) @binding(0) var<uniform> P: {};\n", k.params);
    s += PRELUDE;
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
                    DType::F16 if features.f16 => {
                        s += &decl("read", "f16");
                        s += &format!(
                            "fn ld_{name}(i: u32) -> f32 {{ return f32(b_{name}[i]); }}\n\
                             fn ldh_{name}(i: u32) -> f16 {{ return b_{name}[i]; }}\n\
                             fn ld4h_{name}(o: u32, e: u32, d: u32) -> vec4<f16> {{ var r = vec4<f16>(0.0h); \
                             if (e < d) {{ r.x = b_{name}[o + e]; }} if (e + 1u < d) {{ r.y = b_{name}[o + e + 1u]; }} \
                             if (e + 2u < d) {{ r.z = b_{name}[o + e + 2u]; }} if (e + 3u < d) {{ r.w = b_{name}[o + e + 3u]; }} return r; }}\n"
                        );
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
    s += &helpers(&format!("{s}\n{body}"))?;
    s += &body;
    Ok(s)
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_') && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `name` occurs in `src` as a whole identifier.
fn uses(src: &str, name: &str) -> bool {
    src.match_indices(name).any(|(i, _)| {
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        !word(src[..i].chars().next_back()) && !word(src[i + name.len()..].chars().next())
    })
}

/// Whether `src` declares `name` itself (a function, constant, variable or struct).
fn defines(src: &str, name: &str) -> bool {
    ["fn ", "const ", "var<workgroup> ", "var<private> ", "struct "].iter().any(|kw| {
        let decl = format!("{kw}{name}");
        src.match_indices(&decl).any(|(i, _)| {
            let after = src[i + decl.len()..].chars().next();
            !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    })
}

/// The sections of [`COMMON`]: (name, text), in file order.
pub fn helper_sections() -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in COMMON.lines() {
        if let Some(name) = line.trim_start().strip_prefix("//!helper ") {
            let name = name.trim();
            if !is_ident(name) {
                return Err(Error::Device(format!("shaders/common.wgsl: bad helper header `{line}`")));
            }
            out.push((name.to_string(), String::new()));
        } else if let Some(h) = out.last_mut() {
            h.1.push_str(line);
            h.1.push('\n');
        }
    }
    Ok(out)
}

/// The helper sections `src` needs (directly or through other helpers) and
/// does not define itself, in [`COMMON`]'s order.
fn helpers(src: &str) -> Result<String> {
    let sections = helper_sections()?;
    let mut linked = vec![false; sections.len()];
    let mut text = src.to_string();
    loop {
        let mut more = false;
        for (i, (name, body)) in sections.iter().enumerate() {
            if !linked[i] && uses(&text, name) && !defines(src, name) {
                linked[i] = true;
                text.push_str(body);
                more = true;
            }
        }
        if !more {
            break;
        }
    }
    Ok(sections.iter().zip(&linked).filter(|(_, l)| **l).map(|((_, b), _)| b.as_str()).collect())
}

/// Parses and validates a generated module with naga (what wgpu does too, but
/// here it yields an error message instead of a device error).
pub fn validate(label: &str, src: &str) -> Result<()> {
    parse_validated(label, src).map(|_| ())
}

/// The naga module of a generated kernel, validated.
pub fn parse_validated(label: &str, src: &str) -> Result<naga::Module> {
    let module = naga::front::wgsl::parse_str(src)
        .map_err(|e| Error::Device(format!("{label}: WGSL parse error: {}", e.emit_to_string(src))))?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .map_err(|e| Error::Device(format!("{label}: WGSL validation error: {}", e.emit_to_string(src))))?;
    Ok(module)
}

/// One field of a parameter struct: name, byte offset, byte size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
}

/// A kernel's parameters as a `#[repr(C)]` struct mirrored by a WGSL struct
/// of the same name; declare with [`wgsl_params!`].
pub trait KernelParams: bytemuck::Pod {
    /// The WGSL struct's name (the Rust struct's).
    const NAME: &'static str;
    /// The fields in declaration order.
    const FIELDS: &'static [Field];
}

/// Declares a kernel parameter struct: `#[repr(C)]`, `bytemuck::Pod`, and its
/// [`KernelParams`] field table (names, offsets and sizes from the compiler).
/// Fields are 4-byte scalars (`u32`, `i32`, `f32`), which WGSL's uniform
/// layout places exactly where `repr(C)` does.
#[macro_export]
macro_rules! wgsl_params {
    ($(#[$m:meta])* $vis:vis struct $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name { $($(#[$fm])* pub $f: $t),* }
        impl $crate::backend::wgpu::kernel::KernelParams for $name {
            const NAME: &'static str = stringify!($name);
            const FIELDS: &'static [$crate::backend::wgpu::kernel::Field] = &[$(
                $crate::backend::wgpu::kernel::Field {
                    name: stringify!($f),
                    offset: ::core::mem::offset_of!($name, $f),
                    size: ::core::mem::size_of::<$t>(),
                }
            ),*];
        }
    };
}

/// The parameters of one launch: a typed struct's bytes with its field table
/// (checked against the shader when the pipeline is made).
#[derive(Clone, Debug)]
pub struct ParamBlock {
    pub bytes: Vec<u8>,
    /// `(struct name, fields)` of the block.
    pub layout: (&'static str, &'static [Field]),
}

impl<P: KernelParams> From<&P> for ParamBlock {
    fn from(p: &P) -> Self {
        ParamBlock { bytes: bytemuck::bytes_of(p).to_vec(), layout: (P::NAME, P::FIELDS) }
    }
}

/// Checks a kernel's uniform parameter struct (binding 0 of `module`) against
/// the Rust side's `(name, fields)`. The error names the first field that
/// differs. Returns the bytes the uniform buffer must hold.
pub fn check_params(label: &str, module: &naga::Module, rust: (&str, &[Field])) -> Result<usize> {
    let err = |m: String| Err(Error::Device(format!("{label}: parameter struct mismatch: {m}")));
    let uniform = module.global_variables.iter().find(|(_, g)| {
        g.space == naga::AddressSpace::Uniform && g.binding.as_ref().is_some_and(|b| b.group == 0 && b.binding == 0)
    });
    let Some((_, g)) = uniform else { return err("the shader has no uniform at binding 0".into()) };
    let ty = &module.types[g.ty];
    let (rust_name, fields) = rust;
    let naga::TypeInner::Struct { members, span } = &ty.inner else {
        return err(format!("Rust passes struct `{rust_name}`, the shader's uniform is not a struct"));
    };
    let span = *span as usize;
    let wgsl_name = ty.name.clone().unwrap_or_default();
    if wgsl_name != rust_name {
        return err(format!("the shader takes struct `{wgsl_name}`, Rust passes `{rust_name}`"));
    }
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| Error::Device(format!("{label}: laying out the parameter struct: {e}")))?;
    for (i, m) in members.iter().enumerate() {
        let wname = m.name.as_deref().unwrap_or("?");
        let wsize = layouter[m.ty].size as usize;
        let Some(f) = fields.get(i) else {
            return err(format!(
                "field `{wname}` (member {i} of WGSL `{wgsl_name}`) is missing from Rust `{rust_name}`"
            ));
        };
        if f.name != wname {
            return err(format!("field `{}` of Rust `{rust_name}` is `{wname}` in WGSL (member {i})", f.name));
        }
        if f.offset != m.offset as usize || f.size != wsize {
            return err(format!(
                "field `{wname}`: WGSL offset {} size {wsize}, Rust offset {} size {}",
                m.offset, f.offset, f.size
            ));
        }
    }
    if let Some(f) = fields.get(members.len()) {
        return err(format!("field `{}` of Rust `{rust_name}` is missing from WGSL `{wgsl_name}`", f.name));
    }
    let rust_end = fields.last().map_or(0, |f| f.offset + f.size);
    if rust_end > span {
        return err(format!("Rust `{rust_name}` is {rust_end} bytes, WGSL `{wgsl_name}` {span}"));
    }
    Ok(uniform_size(span))
}

/// Generates, validates and checks the parameters of kernel `k` — what the
/// backend does when it creates a pipeline. Returns the WGSL source, the naga
/// module and the uniform buffer size.
pub fn compile(k: &KernelDef, dtypes: &[DType], params: (&str, &[Field])) -> Result<(String, naga::Module, usize)> {
    compile_with(k, dtypes, KernelFeatures::NONE, params)
}

/// [`compile`] with the device's optional features.
pub fn compile_with(
    k: &KernelDef,
    dtypes: &[DType],
    features: KernelFeatures,
    params: (&str, &[Field]),
) -> Result<(String, naga::Module, usize)> {
    let label = format!("{}::{}", k.family, k.name);
    let src = generate_with(k, dtypes, features)?;
    let module = parse_validated(&label, &src)?;
    let bytes = check_params(&label, &module, params)?;
    Ok((src, module, bytes))
}

/// The uniform buffer size of a parameter block: WGSL's struct span rounded
/// to 16 bytes (uniform layout), at least the bytes passed.
pub fn uniform_size(bytes: usize) -> usize {
    bytes.max(16).div_ceil(16) * 16
}

/// What one workgroup of a kernel holds, from naga's module: workgroup
/// memory (the workgroup variables its entry point uses), invocations, and
/// the private (function-local) arrays of one invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceUse {
    pub workgroup_bytes: usize,
    pub invocations: u32,
    pub private_array_bytes: usize,
    /// Every function-local variable (arrays and scalars) of the entry point
    /// and the functions it calls: an upper bound of one invocation's
    /// variable registers (a compiler keeps fewer live at once; temporaries
    /// are not counted).
    pub local_bytes: usize,
}

/// The [`ResourceUse`] of a generated, validated kernel module.
pub fn resource_use(label: &str, src: &str) -> Result<ResourceUse> {
    let module = naga::front::wgsl::parse_str(src)
        .map_err(|e| Error::Device(format!("{label}: WGSL parse error: {}", e.emit_to_string(src))))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .map_err(|e| Error::Device(format!("{label}: WGSL validation error: {}", e.emit_to_string(src))))?;
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).map_err(|e| Error::Device(format!("{label}: layout: {e}")))?;
    let (ei, ep) = module
        .entry_points
        .iter()
        .enumerate()
        .next()
        .ok_or_else(|| Error::Device(format!("{label}: no entry point")))?;
    let ep_info = info.get_entry_point(ei);
    let workgroup_bytes = module
        .global_variables
        .iter()
        .filter(|(h, g)| g.space == naga::AddressSpace::WorkGroup && !ep_info[*h].is_empty())
        .map(|(_, g)| layouter[g.ty].size as usize)
        .sum();
    // Local arrays of the entry point and of every function it calls.
    let arrays = |f: &naga::Function| -> usize {
        f.local_variables
            .iter()
            .filter(|(_, v)| matches!(module.types[v.ty].inner, naga::TypeInner::Array { .. }))
            .map(|(_, v)| layouter[v.ty].size as usize)
            .sum()
    };
    let locals =
        |f: &naga::Function| -> usize { f.local_variables.iter().map(|(_, v)| layouter[v.ty].size as usize).sum() };
    let mut reached = Vec::new();
    calls(&module, &ep.function.body, &mut reached);
    let private_array_bytes =
        arrays(&ep.function) + reached.iter().map(|h| arrays(&module.functions[*h])).sum::<usize>();
    let local_bytes = locals(&ep.function) + reached.iter().map(|h| locals(&module.functions[*h])).sum::<usize>();
    Ok(ResourceUse {
        workgroup_bytes,
        invocations: ep.workgroup_size.iter().product(),
        private_array_bytes,
        local_bytes,
    })
}

/// Adds the functions `block` calls, directly or not, to `out` (once each).
fn calls(module: &naga::Module, block: &naga::Block, out: &mut Vec<naga::Handle<naga::Function>>) {
    use naga::Statement as S;
    for st in block.iter() {
        match st {
            S::Call { function, .. } if !out.contains(function) => {
                out.push(*function);
                calls(module, &module.functions[*function].body, out);
            }
            S::Block(b) => calls(module, b, out),
            S::If { accept, reject, .. } => {
                calls(module, accept, out);
                calls(module, reject, out);
            }
            S::Loop { body, continuing, .. } => {
                calls(module, body, out);
                calls(module, continuing, out);
            }
            S::Switch { cases, .. } => cases.iter().for_each(|c| calls(module, &c.body, out)),
            _ => {}
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel of every shader file, with every float dtype its inputs
    /// can take and every optional-feature branch it has (subgroups, f16),
    /// passes naga's parser and validator.
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
                    // Each distinct feature set in effect (every `//#if` branch).
                    let mut seen = Vec::new();
                    for f in KernelFeatures::every() {
                        let f = f.for_kernel(&k, &dts);
                        if seen.contains(&f) {
                            continue;
                        }
                        seen.push(f);
                        let label = format!("shaders/{family}.wgsl::{} [{dt}, {f}]", k.name);
                        let src = generate_with(&k, &dts, f).unwrap();
                        if let Err(e) = validate(&label, &src) {
                            panic!("{e}");
                        }
                        count += 1;
                    }
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
            "struct K { n: u32 }\n//!kernel k(x: in, y: out) : K\n@compute @workgroup_size(1) fn main() { st_y(0u, ld_z(0u)); }\n",
        )
        .unwrap()
        .remove(0);
        let e = validate("t::k", &generate(&k, &[DType::F32, DType::F32]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("ld_z"), "{e}");
    }

    #[test]
    fn headers_parse_names_and_roles() {
        let ks =
            parse_family("f", "fn common() {}\n//!kernel a(x: in, i: idx, y: inout) : AP\nA\n//!kernel b() : BP\nB\n")
                .unwrap();
        assert_eq!(ks.len(), 2);
        assert_eq!(ks[0].args, vec![("x".into(), Role::In), ("i".into(), Role::Idx), ("y".into(), Role::InOut)]);
        assert_eq!((ks[0].params.as_str(), ks[1].params.as_str()), ("AP", "BP"));
        assert!(ks[0].body.contains("common") && ks[0].body.contains('A') && !ks[0].body.contains('B'));
        assert!(parse_family("f", "//!kernel bad(x: sideways) : P\n").is_err());
        // Every kernel names its parameter struct (no positional words).
        assert!(parse_family("f", "//!kernel untyped(x: in)\n").is_err());
        assert!(parse_family("f", "//!kernel untyped(x: in) : \n").is_err());
    }

    crate::wgsl_params! {
        struct GoodParams { n: u32, scale: f32, z0: u32 }
    }
    // Same size as GoodParams, but the last two fields swapped.
    crate::wgsl_params! {
        struct SwappedParams { n: u32, z0: u32, scale: f32 }
    }
    crate::wgsl_params! {
        struct ShortParams { n: u32, scale: f32 }
    }

    fn typed_kernel(struct_name: &str) -> KernelDef {
        let src = format!(
            "struct {struct_name} {{ n: u32, scale: f32, z0: u32 }}\n\
             //!kernel k(x: in, y: out) : {struct_name}\n\
             @compute @workgroup_size(1) fn main() {{ if (P.z0 < P.n) {{ st_y(P.z0, P.scale * ld_x(0u)); }} }}\n"
        );
        parse_family("t", Box::leak(src.into_boxed_str())).unwrap().remove(0)
    }

    /// A Rust parameter struct that differs from the shader's in a field's
    /// name, offset or presence is refused when the pipeline is compiled,
    /// with the field named; the matching one is accepted.
    #[test]
    fn a_mismatched_parameter_struct_fails_naming_the_field() {
        let dts = [DType::F32, DType::F32];
        let ok = compile(&typed_kernel("GoodParams"), &dts, (GoodParams::NAME, GoodParams::FIELDS));
        assert_eq!(ok.unwrap().2, 16, "12 bytes of fields, a 16-byte uniform");

        let k = typed_kernel("SwappedParams");
        let e = compile(&k, &dts, (SwappedParams::NAME, SwappedParams::FIELDS)).unwrap_err().to_string();
        assert!(e.contains("field `z0`") && e.contains("`scale` in WGSL"), "{e}");

        let k = typed_kernel("ShortParams");
        let e = compile(&k, &dts, (ShortParams::NAME, ShortParams::FIELDS)).unwrap_err().to_string();
        assert!(e.contains("field `z0`") && e.contains("missing from Rust"), "{e}");

        let k = typed_kernel("GoodParams");
        let e = compile(&k, &dts, (ShortParams::NAME, ShortParams::FIELDS)).unwrap_err().to_string();
        assert!(e.contains("`GoodParams`") && e.contains("`ShortParams`"), "{e}");
    }

    /// Every typed kernel in `shaders/` declares a struct the Rust side can
    /// mirror: scalar 4-byte members at consecutive offsets.
    #[test]
    fn typed_kernels_declare_packed_scalar_structs() {
        let mut typed = 0;
        for (family, src) in SHADERS {
            for k in parse_family(family, src).unwrap() {
                let name = &k.params;
                let dts: Vec<DType> =
                    k.args.iter().map(|(_, r)| if r.is_index() { DType::U32 } else { DType::F32 }).collect();
                let m = parse_validated(name, &generate(&k, &dts).unwrap()).unwrap();
                let (_, g) = m.global_variables.iter().find(|(_, g)| g.space == naga::AddressSpace::Uniform).unwrap();
                let naga::TypeInner::Struct { members, .. } = &m.types[g.ty].inner else { panic!("{name}") };
                for (i, mb) in members.iter().enumerate() {
                    assert_eq!(mb.offset as usize, 4 * i, "{family}::{}: {name}.{:?}", k.name, mb.name);
                }
                typed += 1;
            }
        }
        assert!(typed >= 2, "only {typed} typed kernels");
    }

    /// Helpers of shaders/common.wgsl are linked where used (also through
    /// other helpers), left out where unused or defined by the kernel.
    #[test]
    fn common_helpers_link_where_used() {
        let names: Vec<String> = helper_sections().unwrap().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().any(|n| n == "neg_inf") && names.iter().any(|n| n == "wg_reduce"), "{names:?}");
        let linked = helpers("fn main() { let x = neg_inf(); }").unwrap();
        assert!(linked.contains("fn neg_inf") && !linked.contains("wg_reduce"), "{linked}");
        assert!(helpers("fn neg_inf() -> f32 { return 0.0; } fn f() { neg_inf(); }").unwrap().is_empty());
        assert!(helpers("fn not_neg_inf() {}").unwrap().is_empty());
    }

    /// The figures of BENCHMARKS.md's kernel-variant table (printed with
    /// `cargo test --lib kernel_variant_resources -- --nocapture`): each hot
    /// kernel's software and hardware variant. The hardware variants run at
    /// least 64 invocations per workgroup. Where the software variant is
    /// tiled too (same tiles) the hardware one holds less private memory per
    /// invocation and no more workgroup memory; where it is not (the
    /// backward, an invocation per row), no more private memory and at most
    /// 16 KiB + 512 B of workgroup memory (the launchers check the adapter's
    /// limit and fall back).
    #[test]
    fn kernel_variant_resources() {
        let pairs = [
            ("matmul", "matmul", "matmul", "matmul_hw", true),
            ("attention", "attn_fwd_tiled", "attention_hw", "attn_fwd_tiled_hw", true),
            ("indexer", "indexer_block_scores_tiled", "indexer", "indexer_block_scores_tiled_hw", true),
            ("attention", "attn_bwd_dq", "attention_hw", "attn_bwd_dq_tiled_hw", false),
            ("attention", "attn_bwd_dkdv", "attention_hw", "attn_bwd_dkdv_tiled_hw", false),
            ("cached", "cached_attn", "cached_hw", "cached_attn_hw", false),
            ("cached", "cached_attn", "cached_hw", "cached_attn_hw_sg", false),
            ("qmatmul", "qmm", "qmatmul", "qmm_hw", false),
            ("qmatmul", "qmm", "qmatmul", "qmm_hw_sg", false),
            ("indexer", "indexer_scores", "indexer", "indexer_scores_hw", false),
            ("indexer", "indexer_bwd_q", "indexer", "indexer_bwd_q_hw", false),
            ("indexer", "indexer_bwd_k", "indexer", "indexer_bwd_k_hw", false),
            // One kernel for both variants (already 256-wide); its subgroup build differs.
            ("attention", "indexer_kl", "attention", "indexer_kl", false),
            ("cached", "cached_pool", "cached", "cached_pool_hw", false),
            ("cached", "cached_select", "cached", "cached_select_hw", false),
        ];
        println!(
            "| kernel | variant | features | invocations/workgroup | workgroup memory (bytes) | \
             private arrays per invocation (bytes) | function variables per invocation (bytes) |"
        );
        println!("|---|---|---|---:|---:|---:|---:|");
        let row = |fam: &str, name: &str, variant: &str, f: KernelFeatures, dt: DType| -> (ResourceUse, String) {
            let k = find(fam, name).unwrap();
            let dts: Vec<DType> = k
                .args
                .iter()
                .map(|(_, r)| match r {
                    Role::In => dt,
                    Role::Idx | Role::IdxOut => DType::U32,
                    _ => DType::F32,
                })
                .collect();
            let f = f.for_kernel(&k, &dts);
            let src = generate_with(&k, &dts, f).unwrap();
            let u = resource_use(name, &src).unwrap();
            let feats = match (f.subgroups, f.f16) {
                (false, false) => "none".to_string(),
                (true, false) => "subgroups".to_string(),
                (false, true) => format!("f16 ({dt} inputs)"),
                (true, true) => format!("subgroups, f16 ({dt} inputs)"),
            };
            println!(
                "| {fam}::{name} | {variant} | {feats} | {} | {} | {} | {} |",
                u.invocations, u.workgroup_bytes, u.private_array_bytes, u.local_bytes
            );
            (u, src)
        };
        for (sf, sn, hf, hn, same_tiles) in pairs {
            let (sw, _) = row(sf, sn, "sw", KernelFeatures::NONE, DType::F32);
            let (hw, plain) = row(hf, hn, "hw", KernelFeatures::NONE, DType::F32);
            // The feature variants of the hardware kernel, where a feature changes its code.
            let mut seen = vec![plain];
            for f in KernelFeatures::every().into_iter().skip(1) {
                let dt = if f.f16 { DType::F16 } else { DType::F32 };
                let k = find(hf, hn).unwrap();
                let dts: Vec<DType> =
                    k.args.iter().map(|(_, r)| if *r == Role::In { dt } else { DType::U32 }).collect();
                let fk = f.for_kernel(&k, &dts);
                if fk != f {
                    continue;
                }
                let (u, src) = row(hf, hn, "hw", f, dt);
                if seen.contains(&src) {
                    continue;
                }
                seen.push(src);
                assert!(u.workgroup_bytes <= hw.workgroup_bytes && u.invocations == hw.invocations, "{hn} {f}: {u:?}");
                if f.f16 && fk.f16 {
                    assert!(u.local_bytes <= hw.local_bytes, "{hn} {f}: {u:?} vs {hw:?}");
                }
            }
            assert!(hw.invocations >= 64, "{hn}: {hw:?}");
            if same_tiles {
                assert!(hw.private_array_bytes < sw.private_array_bytes, "{hn}: {hw:?} vs {sw:?}");
                // Same tiles, so the launcher's workgroup-memory checks hold for both.
                assert!(hw.workgroup_bytes <= sw.workgroup_bytes, "{hn}: {hw:?}");
            } else {
                assert!(hw.private_array_bytes <= sw.private_array_bytes, "{hn}: {hw:?} vs {sw:?}");
                assert!(hw.workgroup_bytes > 0 && hw.workgroup_bytes <= 16 * 1024 + 512, "{hn}: {hw:?}");
            }
        }
    }

    /// Every `wgsl_params!` struct a launcher passes, by WGSL name. A typed
    /// kernel whose struct is missing here fails the tests below.
    fn registered_params() -> Vec<(&'static str, &'static [Field])> {
        use crate::backend::wgpu::{attention as at, cached as ca, core_ops as co, qmatmul as qm};
        fn e<P: KernelParams>() -> (&'static str, &'static [Field]) {
            (P::NAME, P::FIELDS)
        }
        vec![
            e::<co::CountParams>(),
            e::<co::BiasParams>(),
            e::<co::HalfParams>(),
            e::<co::ScalarParams>(),
            e::<co::AxpbyParams>(),
            e::<co::SumRowsPartParams>(),
            e::<co::SumRowsFinalParams>(),
            e::<co::LayerNormParams>(),
            e::<co::LnColPartParams>(),
            e::<co::LnColSumParams>(),
            e::<co::SoftmaxParams>(),
            e::<co::RopeParams>(),
            e::<co::EmbeddingParams>(),
            e::<co::CrossEntropyParams>(),
            e::<co::AdamWParams>(),
            e::<co::MatmulParams>(),
            e::<at::AttnParams>(),
            e::<at::AttnKlParams>(),
            e::<at::SumChunksParams>(),
            e::<at::AttnTiledParams>(),
            e::<at::AttnBwdKvParams>(),
            e::<at::IndexerParams>(),
            e::<at::SelectParams>(),
            e::<ca::RopeRowsParams>(),
            e::<ca::CacheWriteParams>(),
            e::<ca::CachedAttnParams>(),
            e::<ca::CachedPoolParams>(),
            e::<ca::CachedSelectParams>(),
            e::<qm::QmmParams>(),
        ]
    }

    fn f32_dtypes(k: &KernelDef) -> Vec<DType> {
        k.args.iter().map(|(_, r)| if r.is_index() { DType::U32 } else { DType::F32 }).collect()
    }

    /// Table-driven over every kernel of `shaders/`: a typed kernel's WGSL
    /// struct has a registered Rust mirror that passes the pipeline check
    /// (names, offsets, sizes, span), and every registered struct is some
    /// kernel's (every kernel is typed: the parser refuses a header without
    /// a struct).
    #[test]
    fn every_kernel_struct_matches_its_rust_mirror() {
        let reg = registered_params();
        let mut used = vec![false; reg.len()];
        let mut typed = 0;
        for (family, src) in SHADERS {
            for k in parse_family(family, src).unwrap() {
                let label = format!("{family}::{}", k.name);
                let name = &k.params;
                let i = reg
                    .iter()
                    .position(|(n, _)| n == name)
                    .unwrap_or_else(|| panic!("{label}: no Rust struct `{name}` registered"));
                used[i] = true;
                let (_, _, bytes) = compile(&k, &f32_dtypes(&k), reg[i]).unwrap();
                let rust_bytes = reg[i].1.last().map_or(0, |f| f.offset + f.size);
                assert_eq!(bytes, uniform_size(rust_bytes), "{label}: uniform size");
                typed += 1;
            }
        }
        for ((name, _), u) in reg.iter().zip(&used) {
            assert!(*u, "Rust struct `{name}` is registered but no kernel takes it");
        }
        assert!(typed >= 60, "only {typed} typed kernels");
    }

    /// For every registered struct, Rust tables that differ from the shader's
    /// in one field (dropped, renamed, moved, resized) fail the pipeline check
    /// with that field named.
    #[test]
    fn every_registered_struct_mismatch_names_the_field() {
        let reg = registered_params();
        for (name, fields) in &reg {
            let k = SHADERS
                .iter()
                .flat_map(|(family, src)| parse_family(family, src).unwrap())
                .find(|k| k.params == *name)
                .unwrap();
            let dts = f32_dtypes(&k);
            let check = |fs: &[Field]| compile(&k, &dts, (name, fs)).map(|_| ()).unwrap_err().to_string();
            let last = fields.last().unwrap();

            let e = check(&fields[..fields.len() - 1]);
            assert!(e.contains(&format!("field `{}`", last.name)) && e.contains("missing from Rust"), "{name}: {e}");

            let mut extra = fields.to_vec();
            extra.push(Field { name: "extra", offset: last.offset + 4, size: 4 });
            let e = check(&extra);
            assert!(e.contains("field `extra`") && e.contains("missing from WGSL"), "{name}: {e}");

            let mut renamed = fields.to_vec();
            renamed[0].name = "renamed";
            let e = check(&renamed);
            assert!(
                e.contains("field `renamed`") && e.contains(&format!("`{}` in WGSL", fields[0].name)),
                "{name}: {e}"
            );

            let mut moved = fields.to_vec();
            moved[fields.len() - 1].offset += 4;
            let e = check(&moved);
            assert!(e.contains(&format!("field `{}`: WGSL offset {}", last.name, last.offset)), "{name}: {e}");

            let mut wide = fields.to_vec();
            wide[0].size = 8;
            let e = check(&wide);
            assert!(e.contains(&format!("field `{}`", fields[0].name)) && e.contains("size 8"), "{name}: {e}");
        }
    }

    /// `DYNSPARSE_WGPU_SUBGROUPS` / `DYNSPARSE_WGPU_F16`: default to the
    /// adapter, `0` turns off, `1` insists (an error without the feature).
    #[test]
    fn kernel_features_follow_the_adapter_and_the_overrides() {
        let both = wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16;
        assert_eq!(KernelFeatures::resolve(both, None, None).unwrap(), KernelFeatures::ALL);
        assert_eq!(KernelFeatures::resolve(wgpu::Features::empty(), None, Some("")).unwrap(), KernelFeatures::NONE);
        let f = KernelFeatures::resolve(both, Some("0"), Some("1")).unwrap();
        assert_eq!(f, KernelFeatures { subgroups: false, f16: true });
        assert_eq!(f.wgpu_features(), wgpu::Features::SHADER_F16);
        let e = KernelFeatures::resolve(wgpu::Features::SUBGROUP, None, Some("1")).unwrap_err().to_string();
        assert!(e.contains("DYNSPARSE_WGPU_F16=1"), "{e}");
        let e = KernelFeatures::resolve(both, Some("yes"), None).unwrap_err().to_string();
        assert!(e.contains("DYNSPARSE_WGPU_SUBGROUPS=yes"), "{e}");
        assert!(KernelFeatures::ALL.contains(f) && !f.contains(KernelFeatures::ALL));
    }

    /// `//#if` blocks keep the branch of the features in effect; `f16` is in
    /// effect only for kernels that name it and whose inputs read as f16
    /// (`ldh_x`) are f16 — an input read as f32 only (`s`) keeps its dtype.
    #[test]
    fn feature_blocks_select_their_branch() {
        let k = parse_family(
            "t",
            "struct K { n: u32 }\n//!kernel k(x: in, s: in, y: out) : K\n\
             @compute @workgroup_size(64) fn main(@builtin(local_invocation_id) l: vec3<u32>) {\n\
             //#if f16\nlet v = f32(ldh_x(l.x) * ldh_x(l.x)) + ld_s(0u);\n//#else\nlet v = ld_x(l.x) * ld_x(l.x) + ld_s(0u);\n//#endif\n\
             //#if subgroups\nlet s = subgroupAdd(v);\n//#else\nlet s = v;\n//#endif\nst_y(l.x, s); }\n",
        )
        .unwrap()
        .remove(0);
        let (h, f, b) = (DType::F16, DType::F32, DType::BF16);
        for fs in KernelFeatures::every() {
            for dts in [[h, f, f], [h, h, f], [h, b, f], [f, f, f], [b, h, f]] {
                let src = generate_with(&k, &dts, fs).unwrap();
                validate("t::k", &src).unwrap();
                let want = fs.for_kernel(&k, &dts);
                assert_eq!(want.f16, fs.f16 && dts[0] == h, "{fs:?} {dts:?}");
                assert_eq!(src.contains("enable f16;") && src.contains("ldh_x(l.x)"), want.f16, "{fs:?} {dts:?}");
                assert_eq!(src.contains("subgroupAdd"), want.subgroups, "{fs:?}");
            }
        }
        assert!(!KernelFeatures::ALL.for_kernel(&k, &[b, f, f]).f16);
        for bad in ["//#if f17\n//#endif\n", "//#else\n", "//#if f16\n", "//#endif\n"] {
            assert!(preprocess("t", bad, KernelFeatures::ALL).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn grid_folds_large_launches() {
        assert_eq!(grid1d(1), [1, 1, 1]);
        assert_eq!(grid1d(256 * 65_535), [65_535, 1, 1]);
        assert_eq!(grid1d(256 * 65_536), [65_535, 2, 1]);
    }
}
