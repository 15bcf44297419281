//! CUDA kernel sources and their compilation: `kernels/*.cu` are compiled at
//! first use with NVRTC for the device's compute capability (PTX for
//! `compute_XY`, which the driver JIT-compiles and caches), kept in memory and
//! on disk.
//!
//! Each family is one `.cu` file holding every dtype variant as an
//! `extern "C"` instantiation with a suffixed name (`gelu_f16`,
//! `axpby_bf16_f32`, `attn_fwd_f32_d4`), compiled with the shared prelude
//! `kernels/common.cuh` in front. No CUDA header is included, so the NVRTC of
//! a PyPI wheel (no `cuda_fp16.h`) is enough.
//!
//! The disk cache lives in `$DYNSPARSE_PTX_CACHE`, else
//! `$XDG_CACHE_HOME/dynsparse/ptx`, else `~/.cache/dynsparse/ptx`; a file is
//! named by a hash of the source, the options and the architecture, and is
//! written to a temporary name first, then renamed, so concurrent processes
//! never read half a file. A machine without NVRTC can run from a cache
//! filled elsewhere (the GPU bundle ships one).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The prelude prepended to every family.
pub const PRELUDE: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel family: (name, source).
pub const FAMILIES: &[(&str, &str)] = &[
    ("adamw", include_str!("../../../kernels/adamw.cu")),
    ("attention", include_str!("../../../kernels/attention.cu")),
    ("cached", include_str!("../../../kernels/cached.cu")),
    ("cast", include_str!("../../../kernels/cast.cu")),
    ("cross_entropy", include_str!("../../../kernels/cross_entropy.cu")),
    ("elementwise", include_str!("../../../kernels/elementwise.cu")),
    ("embedding", include_str!("../../../kernels/embedding.cu")),
    ("gelu", include_str!("../../../kernels/gelu.cu")),
    ("indexer", include_str!("../../../kernels/indexer.cu")),
    ("layernorm", include_str!("../../../kernels/layernorm.cu")),
    ("matmul", include_str!("../../../kernels/matmul.cu")),
    ("reduce", include_str!("../../../kernels/reduce.cu")),
    ("rope", include_str!("../../../kernels/rope.cu")),
    ("select", include_str!("../../../kernels/select.cu")),
    ("softmax", include_str!("../../../kernels/softmax.cu")),
];

/// The full source NVRTC compiles for a family.
pub fn family_source(family: &str) -> Option<String> {
    FAMILIES
        .iter()
        .find(|(n, _)| *n == family)
        .map(|(n, src)| format!("// dynsparse kernel family `{n}`\n{PRELUDE}\n#line 1 \"{n}.cu\"\n{src}"))
}

/// NVRTC options for a compute capability (`(9, 0)` → `compute_90`).
pub fn compile_options(arch: (i32, i32)) -> Vec<String> {
    vec![
        format!("--gpu-architecture=compute_{}{}", arch.0, arch.1),
        "--std=c++17".into(),
        "--fmad=true".into(),
        "-default-device".into(),
    ]
}

/// A stable 128-bit FNV-1a hash of the source, the options and the
/// architecture, in hex: the disk cache key (stable across Rust versions,
/// unlike `DefaultHasher`).
pub fn cache_key(source: &str, options: &[String], arch: (i32, i32)) -> String {
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013B;
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u128;
            h = h.wrapping_mul(PRIME);
        }
        h ^= 0xff;
        h = h.wrapping_mul(PRIME);
    };
    eat(source.as_bytes());
    for o in options {
        eat(o.as_bytes());
    }
    eat(format!("sm_{}{}", arch.0, arch.1).as_bytes());
    format!("{h:032x}")
}

/// The disk cache folder (see the module docs); `None` when no home is known.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DYNSPARSE_PTX_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("dynsparse").join("ptx"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("dynsparse").join("ptx"))
}

fn cache_file(dir: &Path, family: &str, arch: (i32, i32), key: &str) -> PathBuf {
    dir.join(format!("{family}-sm{}{}-{key}.ptx", arch.0, arch.1))
}

/// Reads a cached PTX file; anything that does not look like PTX is a miss.
pub fn read_cached(dir: &Path, family: &str, arch: (i32, i32), key: &str) -> Option<String> {
    let text = std::fs::read_to_string(cache_file(dir, family, arch, key)).ok()?;
    (text.contains(".version") && text.contains(".entry")).then_some(text)
}

/// Writes PTX to the cache: a temporary file in the same folder, then a rename.
pub fn write_cached(dir: &Path, family: &str, arch: (i32, i32), key: &str, ptx: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let dest = cache_file(dir, family, arch, key);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".{family}-{key}.{}.{nanos}.tmp", std::process::id()));
    std::fs::write(&tmp, ptx)?;
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(dest)
}

/// Whether NVRTC can be loaded, with the reason when it cannot.
pub fn nvrtc_status() -> Result<(), String> {
    // SAFETY: only tries to dlopen the NVRTC library by its usual names; no
    // symbol is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libnvrtc was not found on the library path (set LD_LIBRARY_PATH to a CUDA toolkit's lib64, \
             or to <dir>/nvidia/cuda_nvrtc/lib after scripts/fetch-cuda-tools.sh <dir>)"
            .into())
    }
}

/// Compiles a family with NVRTC (no cache). The error carries NVRTC's log.
pub fn compile_uncached(family: &str, arch: (i32, i32)) -> Result<String, String> {
    let src = family_source(family).ok_or_else(|| format!("no kernel family `{family}`"))?;
    nvrtc_status()?;
    let opts = cudarc::nvrtc::CompileOptions {
        options: compile_options(arch),
        name: Some(format!("{family}.cu")),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(&src, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, options, .. }) => Err(format!(
            "NVRTC failed to compile kernels/{family}.cu for sm_{}{} (options {options:?}):\n{}",
            arch.0,
            arch.1,
            log.to_string_lossy()
        )),
        Err(e) => Err(format!("NVRTC failed on kernels/{family}.cu for sm_{}{}: {e}", arch.0, arch.1)),
    }
}

/// PTX by (family, compute capability).
type PtxMap = HashMap<(String, (i32, i32)), String>;

static MEMORY: Mutex<Option<PtxMap>> = Mutex::new(None);

/// The PTX of a family for an architecture: from memory, else from the disk
/// cache, else compiled with NVRTC (and then stored in both). This is the
/// path the backend uses, and the one the compile test checks.
pub fn ptx_for(family: &str, arch: (i32, i32)) -> Result<String, String> {
    let mkey = (family.to_string(), arch);
    if let Some(p) = MEMORY.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).get(&mkey) {
        return Ok(p.clone());
    }
    let src = family_source(family).ok_or_else(|| format!("no kernel family `{family}`"))?;
    let key = cache_key(&src, &compile_options(arch), arch);
    let dir = cache_dir();
    let ptx = match dir.as_deref().and_then(|d| read_cached(d, family, arch, &key)) {
        Some(p) => p,
        None => {
            let p = compile_uncached(family, arch)?;
            if let Some(d) = dir.as_deref()
                && let Err(e) = write_cached(d, family, arch, &key, &p)
            {
                log::warn!("could not write the PTX cache in {}: {e}", d.display());
            }
            p
        }
    };
    MEMORY.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(mkey, ptx.clone());
    Ok(ptx)
}

/// Byte sizes of the parameters of kernel `name` as declared in `ptx`
/// (`.param .u64 x` is 8, `.param .align 4 .b8 x[36]` is 36); `None` when the
/// entry is not there. The backend checks every launch against this, so a
/// wrong argument list is an error, not a corrupted kernel.
pub fn entry_param_sizes(ptx: &str, name: &str) -> Option<Vec<usize>> {
    let start = ptx.find(&format!(".entry {name}("))? + ".entry ".len() + name.len() + 1;
    let body = &ptx[start..start + ptx[start..].find(')')?];
    let mut sizes = Vec::new();
    for param in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let size = if let (Some(a), Some(b)) = (param.rfind('['), param.rfind(']')) {
            param[a + 1..b].parse().ok()?
        } else if [".u64", ".s64", ".b64", ".f64"].iter().any(|t| param.contains(t)) {
            8
        } else if [".u32", ".s32", ".b32", ".f32"].iter().any(|t| param.contains(t)) {
            4
        } else if [".u16", ".s16", ".b16", ".f16"].iter().any(|t| param.contains(t)) {
            2
        } else {
            return None;
        };
        sizes.push(size);
    }
    Some(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_param_sizes_reads_scalars_pointers_and_structs() {
        let ptx = ".visible .entry k_f32(\n\t.param .align 4 .b8 k_f32_param_0[36],\n\t.param .u64 k_f32_param_1,\n\t\
                   .param .u32 k_f32_param_2,\n\t.param .f32 k_f32_param_3\n)\n{\n}\n.visible .entry k(\n)\n{\n}";
        assert_eq!(entry_param_sizes(ptx, "k_f32"), Some(vec![36, 8, 4, 4]));
        assert_eq!(entry_param_sizes(ptx, "k"), Some(vec![]));
        assert_eq!(entry_param_sizes(ptx, "k_f16"), None);
    }

    #[test]
    fn cache_key_changes_with_source_options_and_arch() {
        let o80 = compile_options((8, 0));
        let o90 = compile_options((9, 0));
        let k = cache_key("a", &o80, (8, 0));
        assert_eq!(k, cache_key("a", &o80, (8, 0)), "deterministic");
        assert_eq!(k.len(), 32);
        assert_ne!(k, cache_key("b", &o80, (8, 0)));
        assert_ne!(k, cache_key("a", &o90, (8, 0)));
        assert_ne!(k, cache_key("a", &o80, (8, 6)));
    }

    #[test]
    fn every_family_has_a_source_with_the_prelude() {
        for (name, _) in FAMILIES {
            let src = family_source(name).unwrap();
            assert!(src.contains("struct bf16") && src.contains("extern \"C\""), "{name}");
        }
        assert!(family_source("nope").is_none());
    }

    #[test]
    fn disk_cache_round_trips_and_ignores_garbage() {
        let dir = std::env::temp_dir().join(format!("dynsparse-ptx-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ptx = ".version 8.8\n.target sm_90\n.visible .entry k() { ret; }\n";
        assert_eq!(read_cached(&dir, "gelu", (9, 0), "abc"), None, "miss on an empty cache");
        let path = write_cached(&dir, "gelu", (9, 0), "abc", ptx).unwrap();
        assert!(path.exists());
        assert_eq!(read_cached(&dir, "gelu", (9, 0), "abc").as_deref(), Some(ptx));
        assert_eq!(read_cached(&dir, "gelu", (8, 0), "abc"), None, "arch is part of the name");
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(read_cached(&dir, "gelu", (9, 0), "abc"), None, "a torn file is a miss");
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().map(|e| e.file_name().to_string_lossy().ends_with(".tmp")).unwrap_or(false));
        assert_eq!(leftovers.count(), 0, "no temporary files left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
