//! Every CUDA kernel family compiles with NVRTC for sm_80 (A100) and sm_90
//! (H100), every dtype variant included, through the backend's own path
//! (`kernels::compiled`: memory cache, disk cache, NVRTC), to PTX and to a
//! CUBIN for that architecture (what loads on drivers older than the NVRTC).
//! No GPU needed.
//!
//! Without NVRTC on the library path the test prints "skipped" and passes,
//! unless `DYNSPARSE_REQUIRE_NVRTC=1`. `DYNSPARSE_PTX_OUT=<dir>` also writes
//! each PTX there (`<family>.sm_XY.ptx`, for `scripts/ptxas-report.sh`).
//! The disk cache is a fresh temporary folder unless `DYNSPARSE_PTX_CACHE` is
//! set (the GPU bundle sets it to ship a filled cache).
#![cfg(feature = "cuda")]

use dynsparse::backend::cuda::kernels;

const ARCHS: [(i32, i32); 2] = [(8, 0), (9, 0)];

/// Entry points the backend launches by name, per family (dtype suffixes added below).
fn expected_entries(family: &str) -> Vec<String> {
    let floats = ["f32", "f16", "bf16"];
    let per = |names: &[&str]| -> Vec<String> {
        names.iter().flat_map(|n| floats.iter().map(move |f| format!("{n}_{f}"))).collect()
    };
    let pairs = |name: &str| -> Vec<String> {
        floats.iter().flat_map(|x| floats.iter().map(move |y| format!("{name}_{x}_{y}"))).collect()
    };
    let dpl = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .flat_map(|n| floats.iter().flat_map(move |f| [1, 2, 4, 8].map(|d| format!("{n}_{f}_d{d}"))))
            .collect()
    };
    match family {
        "adamw" => per(&["adamw"]),
        "attention" => {
            let mut v = dpl(&["attn_fwd", "attn_bwd_pre", "attn_bwd_dq", "attn_bwd_dkdv", "indexer_kl"]);
            v.extend(floats.iter().flat_map(|f| {
                ["attn_fwd_tiled", "attn_bwd_dq_tiled", "attn_bwd_dkdv_tiled"]
                    .into_iter()
                    .flat_map(move |n| [1, 2, 4].map(|d| format!("{n}_{f}_d{d}")))
            }));
            v.extend(["csr_zero", "csr_count", "csr_scan", "csr_fill", "csr_sort"].map(String::from));
            v
        }
        "cached" => {
            let mut v = per(&["rope_rows", "cache_write", "cached_indexer_block_scores"]);
            v.extend(dpl(&["cached_attn", "cached_attn_merge"]));
            v.extend(floats.iter().flat_map(|f| [1, 2, 4].map(|d| format!("cached_attn_run_{f}_d{d}"))));
            v.push("cached_select".into());
            v
        }
        "cast" => pairs("cast"),
        "cross_entropy" => per(&["ce_fwd", "ce_bwd"]),
        "elementwise" => {
            let mut v = per(&["fill", "add", "scale", "bias_add", "sum_rows"]);
            v.extend(pairs("axpby"));
            v
        }
        "embedding" => per(&["embedding_fwd", "embedding_bwd"]),
        "gelu" => per(&["gelu", "gelu_backward", "bias_gelu"]),
        "indexer" => {
            let mut v = per(&["indexer_scores", "indexer_block_scores"]);
            v.extend(dpl(&["indexer_bwd_q", "indexer_bwd_k"]));
            v
        }
        "layernorm" => per(&["layernorm_fwd", "layernorm_bwd_dx", "layernorm_bwd_params"]),
        "matmul" => per(&["gemm_tiled"]),
        "qmatmul" => ["qmv", "qmm"]
            .iter()
            .flat_map(|k| ["int8", "int4", "s24", "s24i8"].map(|f| format!("{k}_{f}")))
            .flat_map(|n| floats.iter().map(move |f| format!("{n}_{f}")))
            .collect(),
        "reduce" => {
            let mut v = per(&["sum_squares_partial", "all_finite"]);
            v.extend(["sum_squares_final", "set_u32"].map(String::from));
            v
        }
        "rope" => per(&["rope"]),
        "select" => vec!["select_topk".into()],
        "softmax" => per(&["softmax_fwd", "softmax_bwd"]),
        other => panic!("new kernel family `{other}`: list its entry points in this test"),
    }
}

#[test]
fn every_kernel_family_compiles_for_sm80_and_sm90() {
    if let Err(why) = kernels::nvrtc_status() {
        if std::env::var("DYNSPARSE_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("DYNSPARSE_REQUIRE_NVRTC=1 but NVRTC is unavailable: {why}");
        }
        println!("skipped: NVRTC not found ({why})");
        return;
    }
    let tmp_cache = std::env::temp_dir().join(format!("dynsparse-nvrtc-test-{}", std::process::id()));
    if std::env::var_os("DYNSPARSE_PTX_CACHE").is_none() {
        // SAFETY (of the environment write): set before any other thread of
        // this test binary reads it; this is the binary's only test.
        unsafe { std::env::set_var("DYNSPARSE_PTX_CACHE", &tmp_cache) };
    }
    let out = std::env::var_os("DYNSPARSE_PTX_OUT").map(std::path::PathBuf::from);
    if let Some(o) = &out {
        std::fs::create_dir_all(o).unwrap();
    }
    let mut failures = Vec::new();
    for (family, _) in kernels::FAMILIES {
        for arch in ARCHS {
            let t0 = std::time::Instant::now();
            match kernels::compiled(family, arch, true) {
                Ok(c) => {
                    let ptx = c.ptx;
                    // ELF header: class 64-bit, machine EM_CUDA (190) at offset 18.
                    let elf = c.cubin.starts_with(b"\x7fELF")
                        && c.cubin.len() > 20
                        && u16::from_le_bytes([c.cubin[18], c.cubin[19]]) == 190;
                    if !elf {
                        failures.push(format!("{family} sm_{}{}: the CUBIN is not a CUDA ELF image", arch.0, arch.1));
                    }
                    let target = format!(".target sm_{}{}", arch.0, arch.1);
                    if !ptx.contains(&target) {
                        failures.push(format!("{family}: PTX without `{target}`"));
                    }
                    let missing: Vec<String> = expected_entries(family)
                        .into_iter()
                        .filter(|e| !ptx.contains(&format!(".entry {e}(")))
                        .collect();
                    if !missing.is_empty() {
                        failures.push(format!("{family} sm_{}{}: missing entry points {missing:?}", arch.0, arch.1));
                    }
                    println!(
                        "{family:>14} sm_{}{}: {} bytes of PTX, {} of CUBIN in {:?}",
                        arch.0,
                        arch.1,
                        ptx.len(),
                        c.cubin.len(),
                        t0.elapsed()
                    );
                    if let Some(o) = &out {
                        std::fs::write(o.join(format!("{family}.sm_{}{}.ptx", arch.0, arch.1)), ptx).unwrap();
                    }
                }
                Err(e) => failures.push(e),
            }
        }
    }
    // The cache now holds both formats for both architectures, under keys
    // that name this NVRTC's version (what the GPU bundle ships).
    let dir = kernels::cache_dir().unwrap();
    let v = kernels::nvrtc_version().unwrap();
    for (family, _) in kernels::FAMILIES {
        let src = kernels::family_source(family).unwrap();
        for arch in ARCHS {
            let key = kernels::CacheKey::new(&src, &kernels::compile_options(arch), arch, v);
            for format in [kernels::Format::Cubin, kernels::Format::Ptx] {
                if kernels::read_cached(&dir, family, arch, &key, format).is_none() {
                    failures.push(format!("{family} sm_{}{}: no {format:?} cached for NVRTC {v:?}", arch.0, arch.1));
                }
            }
        }
        let shipped = kernels::shipped(&dir, family);
        if ARCHS.iter().any(|a| !shipped.contains(&(*a, kernels::Format::Cubin))) {
            failures.push(format!("{family}: kernels::shipped lists {shipped:?}"));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp_cache);
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n\n"));
}
