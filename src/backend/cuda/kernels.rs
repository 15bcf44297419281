//! CUDA kernel sources and their compilation: `kernels/*.cu` are compiled at
//! first use with NVRTC for the device's compute capability (`sm_XY`: one
//! compilation gives a CUBIN, which the driver loads as is, and the PTX,
//! which the backend reads parameter sizes from and which a newer device's
//! driver JIT-compiles), kept in memory and on disk. [`load_plan`] orders
//! what the backend tries: CUBIN before PTX, since PTX from a new NVRTC needs
//! a driver as new (NVRTC 12.9 writes PTX ISA 8.8: R575+).
//!
//! Each family is one `.cu` file holding every dtype variant as an
//! `extern "C"` instantiation with a suffixed name (`gelu_f16`,
//! `axpby_bf16_f32`, `attn_fwd_f32_d4`), compiled with the shared prelude
//! `kernels/common.cuh` in front. No CUDA header is included, so the NVRTC of
//! a PyPI wheel (no `cuda_fp16.h`) is enough.
//!
//! The disk cache lives in `$DYNSPARSE_PTX_CACHE`, else
//! `$XDG_CACHE_HOME/dynsparse/ptx`, else `~/.cache/dynsparse/ptx`; a file is
//! named by a hash of the source, the options and the architecture, and by
//! the NVRTC version (see [`CacheKey`]), and is
//! written to a temporary name first, then renamed, so concurrent processes
//! never read half a file. A machine without NVRTC can run from a cache
//! filled elsewhere (the GPU bundle ships one).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The architectures the GPU bundle ships images for (A100, H100).
pub const SHIPPED_ARCHS: [(i32, i32); 2] = [(8, 0), (9, 0)];
const NEWEST_SHIPPED: (i32, i32) = (9, 0);

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
    ("qmatmul", include_str!("../../../kernels/qmatmul.cu")),
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

/// NVRTC options for a compute capability (`(9, 0)` → `sm_90`). A real
/// architecture makes NVRTC emit both the PTX (its `.target sm_90` is still
/// JIT-compiled by a newer device's driver) and a CUBIN of SASS for exactly
/// that architecture.
pub fn compile_options(arch: (i32, i32)) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{}{}", arch.0, arch.1),
        "--std=c++17".into(),
        "--fmad=true".into(),
        "-default-device".into(),
    ]
}

/// A stable 128-bit FNV-1a hash of the source, the options and the
/// architecture, in hex (stable across Rust versions, unlike
/// `DefaultHasher`). With [`CacheKey`] it names a cache entry.
pub fn source_key(source: &str, options: &[String], arch: (i32, i32)) -> String {
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

/// What a cached image depends on: the family's source and options (hashed,
/// architecture included) and the NVRTC version that compiled it. NVRTC 12.9
/// writes PTX ISA 8.8, which only an R575+ driver loads, while NVRTC 12.4
/// writes 8.4: an entry from one NVRTC is never taken for another's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheKey {
    pub source: String,
    pub nvrtc: (i32, i32),
}

impl CacheKey {
    pub fn new(source: &str, options: &[String], arch: (i32, i32), nvrtc: (i32, i32)) -> Self {
        CacheKey { source: source_key(source, options, arch), nvrtc }
    }
}

/// The two forms of compiled kernels the cache holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// SASS for one architecture: loads on any driver that knows the
    /// architecture (R525+ for sm_90), and on devices of the same major
    /// version with an equal or higher minor one (an sm_80 CUBIN runs on
    /// sm_86 and sm_89).
    Cubin,
    /// PTX: JIT-compiled by the driver for any newer architecture, but only
    /// by a driver that knows the PTX ISA version NVRTC wrote.
    Ptx,
}

impl Format {
    fn ext(self) -> &'static str {
        match self {
            Format::Cubin => "cubin",
            Format::Ptx => "ptx",
        }
    }
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

/// `<family>-sm<XY>-<source hash>-nvrtc<M>.<m>.<cubin|ptx>`.
pub fn cache_file_name(family: &str, arch: (i32, i32), key: &CacheKey, format: Format) -> String {
    format!("{family}-sm{}{}-{}-nvrtc{}.{}.{}", arch.0, arch.1, key.source, key.nvrtc.0, key.nvrtc.1, format.ext())
}

fn looks_valid(bytes: &[u8], format: Format) -> bool {
    match format {
        // Every CUBIN is an ELF file.
        Format::Cubin => bytes.len() > 64 && bytes.starts_with(b"\x7fELF"),
        Format::Ptx => std::str::from_utf8(bytes).is_ok_and(|t| t.contains(".version") && t.contains(".entry")),
    }
}

/// Reads one cache entry; anything that does not look like its format is a miss.
pub fn read_cached(dir: &Path, family: &str, arch: (i32, i32), key: &CacheKey, format: Format) -> Option<Vec<u8>> {
    let bytes = std::fs::read(dir.join(cache_file_name(family, arch, key, format))).ok()?;
    looks_valid(&bytes, format).then_some(bytes)
}

/// The newest-NVRTC cache entry for this source and architecture, whichever
/// NVRTC wrote it: the path of a machine without NVRTC (the GPU bundle ships
/// a filled cache). Returns the NVRTC version with the bytes.
pub fn read_cached_any_nvrtc(
    dir: &Path,
    family: &str,
    arch: (i32, i32),
    source_key: &str,
    format: Format,
) -> Option<((i32, i32), Vec<u8>)> {
    let prefix = format!("{family}-sm{}{}-{source_key}-nvrtc", arch.0, arch.1);
    let suffix = format!(".{}", format.ext());
    let mut versions: Vec<(i32, i32)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| {
            let v = n.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
            let (a, b) = v.split_once('.')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    versions.sort();
    versions.into_iter().rev().find_map(|nvrtc| {
        let key = CacheKey { source: source_key.to_string(), nvrtc };
        read_cached(dir, family, arch, &key, format).map(|b| (nvrtc, b))
    })
}

/// Writes a cache entry: a temporary file in the same folder, then a rename.
pub fn write_cached(
    dir: &Path,
    family: &str,
    arch: (i32, i32),
    key: &CacheKey,
    format: Format,
    bytes: &[u8],
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let dest = dir.join(cache_file_name(family, arch, key, format));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".{family}-{}.{}.{nanos}.tmp", key.source, std::process::id()));
    std::fs::write(&tmp, bytes)?;
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

/// The version of the NVRTC on the library path, e.g. `(12, 9)`.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    nvrtc_status()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are to
    // live locals of the type the C signature names.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
    Ok((major, minor))
}

/// One family compiled for one architecture: the PTX (parameter sizes, and
/// the JIT path for newer devices) and the CUBIN.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub arch: (i32, i32),
    pub nvrtc: (i32, i32),
    pub ptx: String,
    pub cubin: Vec<u8>,
}

/// An NVRTC program, destroyed on drop.
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from `create_program` and is destroyed once, here.
        let _ = unsafe { cudarc::nvrtc::result::destroy_program(self.0) };
    }
}

/// Compiles a family with NVRTC (no cache): PTX and CUBIN from one
/// compilation for `sm_XY`. The error carries NVRTC's log.
pub fn compile_uncached(family: &str, arch: (i32, i32)) -> Result<Compiled, String> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::{CStr, CString};
    let src = family_source(family).ok_or_else(|| format!("no kernel family `{family}`"))?;
    let nvrtc = nvrtc_version()?;
    let what = format!("kernels/{family}.cu for sm_{}{} (NVRTC {}.{})", arch.0, arch.1, nvrtc.0, nvrtc.1);
    let csrc = CString::new(src).map_err(|_| format!("kernels/{family}.cu contains a NUL byte"))?;
    let cname = CString::new(format!("{family}.cu")).map_err(|_| "bad family name".to_string())?;
    let prog = Program(result::create_program(&csrc, Some(&cname)).map_err(|e| format!("NVRTC on {what}: {e:?}"))?);
    let options = compile_options(arch);
    // SAFETY: `prog` is a live program (destroyed only when `prog` drops).
    if let Err(e) = unsafe { result::compile_program(prog.0, &options) } {
        // SAFETY: as above; the log is NUL-terminated by NVRTC.
        let log = unsafe { result::get_program_log(prog.0) }
            .map(|l| unsafe { CStr::from_ptr(l.as_ptr()) }.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Err(format!("NVRTC failed to compile {what} ({e:?}, options {options:?}):\n{log}"));
    }
    // SAFETY: as above; NVRTC writes exactly the size it reported.
    let ptx = unsafe { result::get_ptx(prog.0) }.map_err(|e| format!("nvrtcGetPTX on {what}: {e:?}"))?;
    let ptx: Vec<u8> = ptx.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
    let ptx = String::from_utf8(ptx).map_err(|_| format!("NVRTC wrote PTX that is not UTF-8 for {what}"))?;
    let mut size = 0usize;
    // SAFETY: as above; `size` is a live local.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBINSize on {what}: {e:?}"))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: as above; `cubin` holds the `size` bytes NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN on {what}: {e:?}"))?;
    if !looks_valid(&cubin, Format::Cubin) {
        return Err(format!("NVRTC returned no CUBIN for {what} ({size} bytes)"));
    }
    Ok(Compiled { arch, nvrtc, ptx, cubin })
}

/// Compiled families by (family, architecture).
type CompiledMap = HashMap<(String, (i32, i32)), Compiled>;

static MEMORY: Mutex<Option<CompiledMap>> = Mutex::new(None);

/// A family compiled for an architecture by the NVRTC on the library path:
/// from memory, else from the disk cache (an entry of this NVRTC version),
/// else compiled (and then stored in both). `use_disk = false` skips the disk
/// read, for a retry when a cached image did not load.
pub fn compiled(family: &str, arch: (i32, i32), use_disk: bool) -> Result<Compiled, String> {
    let mkey = (family.to_string(), arch);
    if use_disk
        && let Some(c) = MEMORY.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).get(&mkey)
    {
        return Ok(c.clone());
    }
    let src = family_source(family).ok_or_else(|| format!("no kernel family `{family}`"))?;
    let nvrtc = nvrtc_version()?;
    let key = CacheKey::new(&src, &compile_options(arch), arch, nvrtc);
    let dir = cache_dir();
    let cached = dir.as_deref().filter(|_| use_disk).and_then(|d| {
        let cubin = read_cached(d, family, arch, &key, Format::Cubin)?;
        let ptx = String::from_utf8(read_cached(d, family, arch, &key, Format::Ptx)?).ok()?;
        Some(Compiled { arch, nvrtc, ptx, cubin })
    });
    let c = match cached {
        Some(c) => c,
        None => {
            let c = compile_uncached(family, arch)?;
            if let Some(d) = dir.as_deref() {
                for (format, bytes) in [(Format::Cubin, &c.cubin[..]), (Format::Ptx, c.ptx.as_bytes())] {
                    if let Err(e) = write_cached(d, family, arch, &key, format, bytes) {
                        log::warn!("could not write the kernel cache in {}: {e}", d.display());
                    }
                }
            }
            c
        }
    };
    MEMORY.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(mkey, c.clone());
    Ok(c)
}

/// The PTX of a family for an architecture (see [`compiled`]): what the
/// compile test and `scripts/ptxas-report.sh` check.
pub fn ptx_for(family: &str, arch: (i32, i32)) -> Result<String, String> {
    compiled(family, arch, true).map(|c| c.ptx)
}

/// Where the backend takes a family's kernels from, in the order it tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Compiled by the local NVRTC for this architecture (or its cache entry).
    Nvrtc { arch: (i32, i32), format: Format },
    /// A cache entry of any NVRTC version (the bundle's shipped images).
    Cached { arch: (i32, i32), format: Format },
}

/// The images to try for a device, best first:
/// 1. with NVRTC, the device's own architecture: its CUBIN, then its PTX;
/// 2. shipped CUBINs of the device's major version at or below its minor
///    one, newest first (SASS runs on a later minor revision: sm_80 on an
///    A10G's sm_86 or an L4's sm_89);
/// 3. shipped PTX at or below the device's capability, newest first (the
///    driver JIT-compiles it, if it knows the PTX ISA version);
/// 4. with NVRTC, PTX for sm_90 on a device newer than that (one the local
///    NVRTC may not know yet).
///
/// `shipped` lists the (architecture, format) pairs in the cache.
pub fn load_plan(device: (i32, i32), nvrtc: bool, shipped: &[((i32, i32), Format)]) -> Vec<Source> {
    let mut plan = Vec::new();
    if nvrtc {
        plan.push(Source::Nvrtc { arch: device, format: Format::Cubin });
        plan.push(Source::Nvrtc { arch: device, format: Format::Ptx });
    }
    let mut below: Vec<((i32, i32), Format)> = shipped.iter().copied().filter(|(a, _)| *a <= device).collect();
    below.sort_by_key(|x| std::cmp::Reverse(x.0));
    below.dedup();
    for (arch, format) in &below {
        if *format == Format::Cubin && arch.0 == device.0 {
            plan.push(Source::Cached { arch: *arch, format: Format::Cubin });
        }
    }
    for (arch, format) in &below {
        if *format == Format::Ptx {
            plan.push(Source::Cached { arch: *arch, format: Format::Ptx });
        }
    }
    if nvrtc && device > NEWEST_SHIPPED {
        plan.push(Source::Nvrtc { arch: NEWEST_SHIPPED, format: Format::Ptx });
    }
    plan
}

/// The (architecture, format) pairs a cache folder holds for a family's
/// current source (any NVRTC version).
pub fn shipped(dir: &Path, family: &str) -> Vec<((i32, i32), Format)> {
    let Some(src) = family_source(family) else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    let mut out = Vec::new();
    for name in &names {
        let Some(rest) = name.strip_prefix(&format!("{family}-sm")) else { continue };
        let Some((xy, _)) = rest.split_once('-') else { continue };
        let Ok(xy) = xy.parse::<i32>() else { continue };
        let arch = (xy / 10, xy % 10);
        let key = source_key(&src, &compile_options(arch), arch);
        for format in [Format::Cubin, Format::Ptx] {
            if name.contains(&key) && name.ends_with(&format!(".{}", format.ext())) && !out.contains(&(arch, format)) {
                out.push((arch, format));
            }
        }
    }
    out
}

/// One loadable image of a family: the bytes to hand the driver and the PTX
/// its parameter sizes are read from.
#[derive(Clone, Debug)]
pub struct Image {
    pub source: Source,
    /// CUBIN bytes, or PTX text.
    pub bytes: Vec<u8>,
    pub ptx: String,
}

/// Fetches the image `source` names (compiling when it says NVRTC).
pub fn image(family: &str, source: Source, use_disk: bool) -> Result<Image, String> {
    match source {
        Source::Nvrtc { arch, format } => {
            let c = compiled(family, arch, use_disk)?;
            let bytes = match format {
                Format::Cubin => c.cubin,
                Format::Ptx => c.ptx.clone().into_bytes(),
            };
            Ok(Image { source, bytes, ptx: c.ptx })
        }
        Source::Cached { .. } => cached_image(&cache_dir().ok_or("no kernel cache folder")?, family, source),
    }
}

/// A cached image of any NVRTC version from `dir` (see [`Source::Cached`]).
pub fn cached_image(dir: &Path, family: &str, source: Source) -> Result<Image, String> {
    let (Source::Cached { arch, format } | Source::Nvrtc { arch, format }) = source;
    let src = family_source(family).ok_or_else(|| format!("no kernel family `{family}`"))?;
    let key = source_key(&src, &compile_options(arch), arch);
    let (nvrtc, bytes) = read_cached_any_nvrtc(dir, family, arch, &key, format)
        .ok_or_else(|| format!("no cached {format:?} of kernels/{family}.cu for sm_{}{}", arch.0, arch.1))?;
    // The parameter sizes are the same for every architecture: the
    // PTX beside the image, else any cached PTX of the family (the
    // bundle ships PTX for its newest architecture only).
    let beside = read_cached(dir, family, arch, &CacheKey { source: key, nvrtc }, Format::Ptx);
    let any = || {
        let mut ptx: Vec<_> = shipped(dir, family).into_iter().filter(|(_, f)| *f == Format::Ptx).collect();
        ptx.sort_by_key(|(a, _)| *a);
        ptx.into_iter().rev().find_map(|(a, _)| {
            let k = source_key(&src, &compile_options(a), a);
            read_cached_any_nvrtc(dir, family, a, &k, Format::Ptx).map(|(_, b)| b)
        })
    };
    let ptx = beside
        .or_else(any)
        .and_then(|p| String::from_utf8(p).ok())
        .ok_or_else(|| format!("the cached {format:?} of kernels/{family}.cu has no PTX to read parameters from"))?;
    Ok(Image { source, bytes, ptx })
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
    fn cache_key_changes_with_source_options_arch_and_nvrtc_version() {
        let o80 = compile_options((8, 0));
        let o90 = compile_options((9, 0));
        let k = CacheKey::new("a", &o80, (8, 0), (12, 9));
        assert_eq!(k, CacheKey::new("a", &o80, (8, 0), (12, 9)), "deterministic");
        assert_eq!(k.source.len(), 32);
        assert_ne!(k, CacheKey::new("b", &o80, (8, 0), (12, 9)));
        assert_ne!(k, CacheKey::new("a", &o90, (8, 0), (12, 9)));
        assert_ne!(k, CacheKey::new("a", &o80, (8, 6), (12, 9)));
        let older = CacheKey::new("a", &o80, (8, 0), (12, 4));
        assert_ne!(k, older, "the NVRTC version is part of the key");
        assert_ne!(
            cache_file_name("gelu", (8, 0), &k, Format::Ptx),
            cache_file_name("gelu", (8, 0), &older, Format::Ptx),
            "…and of the file name"
        );
    }

    #[test]
    fn compile_options_ask_for_a_real_architecture() {
        // `compute_XY` would give PTX only: no CUBIN to load on an older driver.
        assert_eq!(compile_options((8, 0))[0], "--gpu-architecture=sm_80");
        assert_eq!(compile_options((9, 0))[0], "--gpu-architecture=sm_90");
    }

    #[test]
    fn every_family_has_a_source_with_the_prelude() {
        for (name, _) in FAMILIES {
            let src = family_source(name).unwrap();
            assert!(src.contains("struct bf16") && src.contains("extern \"C\""), "{name}");
        }
        assert!(family_source("nope").is_none());
    }

    const CUBIN: &[u8] = b"\x7fELF\x02\x01\x01\x33-------------------------------------------------------------------";

    #[test]
    fn disk_cache_round_trips_and_ignores_garbage() {
        let dir = std::env::temp_dir().join(format!("dynsparse-ptx-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ptx = b".version 8.8\n.target sm_90\n.visible .entry k() { ret; }\n";
        let k = CacheKey { source: "abc".into(), nvrtc: (12, 9) };
        assert_eq!(read_cached(&dir, "gelu", (9, 0), &k, Format::Ptx), None, "miss on an empty cache");
        let path = write_cached(&dir, "gelu", (9, 0), &k, Format::Ptx, ptx).unwrap();
        assert!(path.exists());
        assert_eq!(read_cached(&dir, "gelu", (9, 0), &k, Format::Ptx).as_deref(), Some(&ptx[..]));
        assert_eq!(read_cached(&dir, "gelu", (8, 0), &k, Format::Ptx), None, "arch is part of the name");
        assert_eq!(read_cached(&dir, "gelu", (9, 0), &k, Format::Cubin), None, "format is part of the name");
        let k124 = CacheKey { nvrtc: (12, 4), ..k.clone() };
        assert_eq!(read_cached(&dir, "gelu", (9, 0), &k124, Format::Ptx), None, "another NVRTC's entry is a miss");
        write_cached(&dir, "gelu", (9, 0), &k, Format::Cubin, CUBIN).unwrap();
        assert_eq!(read_cached(&dir, "gelu", (9, 0), &k, Format::Cubin).as_deref(), Some(CUBIN));
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(read_cached(&dir, "gelu", (9, 0), &k, Format::Ptx), None, "a torn file is a miss");
        write_cached(
            &dir,
            "gelu",
            (9, 0),
            &k,
            Format::Cubin,
            b"not an ELF file, long enough to pass the size check....",
        )
        .unwrap();
        assert_eq!(read_cached(&dir, "gelu", (9, 0), &k, Format::Cubin), None, "a CUBIN must be ELF");
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().map(|e| e.file_name().to_string_lossy().ends_with(".tmp")).unwrap_or(false));
        assert_eq!(leftovers.count(), 0, "no temporary files left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_machine_without_nvrtc_reads_the_newest_nvrtcs_entry_and_lists_what_is_shipped() {
        let dir = std::env::temp_dir().join(format!("dynsparse-ptx-any-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let src = family_source("gelu").unwrap();
        let ptx = |v: &str| format!(".version {v}\n.visible .entry k() {{ ret; }}\n");
        for (arch, nvrtc, v) in [((8, 0), (12, 4), "8.4"), ((8, 0), (12, 9), "8.8"), ((9, 0), (12, 9), "8.8")] {
            let key = CacheKey::new(&src, &compile_options(arch), arch, nvrtc);
            write_cached(&dir, "gelu", arch, &key, Format::Ptx, ptx(v).as_bytes()).unwrap();
            write_cached(&dir, "gelu", arch, &key, Format::Cubin, CUBIN).unwrap();
        }
        // An entry for a stale source is not listed.
        let stale = CacheKey::new("old source", &compile_options((8, 6)), (8, 6), (12, 9));
        write_cached(&dir, "gelu", (8, 6), &stale, Format::Cubin, CUBIN).unwrap();
        let sk = source_key(&src, &compile_options((8, 0)), (8, 0));
        let (v, bytes) = read_cached_any_nvrtc(&dir, "gelu", (8, 0), &sk, Format::Ptx).unwrap();
        assert_eq!(v, (12, 9));
        assert_eq!(bytes, ptx("8.8").into_bytes());
        let mut got = shipped(&dir, "gelu");
        got.sort_by_key(|(a, f)| (*a, *f == Format::Ptx));
        assert_eq!(
            got,
            vec![((8, 0), Format::Cubin), ((8, 0), Format::Ptx), ((9, 0), Format::Cubin), ((9, 0), Format::Ptx)]
        );
        assert!(shipped(&dir, "softmax").is_empty());
        // Without the PTX beside the sm_80 CUBIN (the bundle drops it), the
        // parameters come from the sm_90 PTX.
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.to_string_lossy().contains("-sm80-") && p.extension().is_some_and(|x| x == "ptx") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let img = cached_image(&dir, "gelu", Source::Cached { arch: (8, 0), format: Format::Cubin }).unwrap();
        assert_eq!(img.bytes, CUBIN);
        assert_eq!(img.ptx, ptx("8.8"));
        assert!(cached_image(&dir, "gelu", Source::Cached { arch: (8, 0), format: Format::Ptx }).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn bundle() -> Vec<((i32, i32), Format)> {
        SHIPPED_ARCHS.iter().flat_map(|&a| [(a, Format::Cubin), (a, Format::Ptx)]).collect()
    }

    #[test]
    fn load_plan_takes_cubin_first_and_the_newest_image_at_or_below_the_device() {
        use Format::*;
        use Source::*;
        let b = bundle();
        // H100 without NVRTC: its own CUBIN, then PTX (sm_90 then sm_80).
        assert_eq!(
            load_plan((9, 0), false, &b),
            vec![
                Cached { arch: (9, 0), format: Cubin },
                Cached { arch: (9, 0), format: Ptx },
                Cached { arch: (8, 0), format: Ptx }
            ]
        );
        // A10G (sm_86), L4 / L40S (sm_89): the sm_80 CUBIN runs there; sm_90 is newer, never tried.
        for dev in [(8, 6), (8, 9)] {
            let plan = load_plan(dev, false, &b);
            assert_eq!(plan[0], Cached { arch: (8, 0), format: Cubin }, "{dev:?}");
            assert!(!plan.iter().any(|s| matches!(s, Cached { arch: (9, 0), .. })), "{dev:?}");
        }
        // Blackwell (sm_100): no CUBIN of another major version; PTX JIT from sm_90.
        let plan = load_plan((10, 0), false, &b);
        assert_eq!(plan[0], Cached { arch: (9, 0), format: Ptx });
        assert!(!plan.iter().any(|s| matches!(s, Cached { format: Cubin, .. })));
        // With NVRTC: the device's own compile first, cached images after.
        let plan = load_plan((8, 6), true, &b);
        assert_eq!(plan[..2], [Nvrtc { arch: (8, 6), format: Cubin }, Nvrtc { arch: (8, 6), format: Ptx }]);
        assert_eq!(plan[2], Cached { arch: (8, 0), format: Cubin });
        assert_eq!(load_plan((12, 0), true, &[]).last(), Some(&Nvrtc { arch: (9, 0), format: Ptx }));
        // Turing (sm_75) with no NVRTC: nothing to load (the error names the plan).
        assert!(load_plan((7, 5), false, &b).is_empty());
    }
}
