//! Every generated WGSL kernel variant translates to the shading languages
//! wgpu hands to the drivers — MSL (Metal), HLSL (DX12) and SPIR-V (Vulkan) —
//! with naga's own writers, after validating with only the capabilities wgpu
//! grants the device this backend opens (no optional features requested).
//! naga's WGSL validation alone (the `kernel` module's test) accepts
//! constructs a back end then rejects; this catches those without a Mac or a
//! Windows machine.
#![cfg(feature = "wgpu")]

use dynsparse::DType;
use dynsparse::backend::wgpu::KernelFeatures;
use dynsparse::backend::wgpu::kernel::{self, Role, SHADERS};

/// The naga capabilities wgpu-core validates a shader module with on a
/// device opened with no optional features (as the backend opens it) on a
/// Vulkan, Metal or DX12 adapter (the backends it asks wgpu for: all are
/// downlevel-compliant, which grants the f16 packing built-ins in f32).
/// With optional device features requested, the capabilities those grant
/// too (the backend asks for `SUBGROUP` and `SHADER_F16` where the adapter
/// has them).
fn granted_with(features: wgpu::Features) -> naga::valid::Capabilities {
    wgpu_naga_bridge::features_to_naga_capabilities(features, wgpu::DownlevelFlags::compliant())
}

/// The optional features a generated module uses: subgroup built-ins need
/// `SUBGROUP`, `enable f16;` needs `SHADER_F16`.
fn features_of(src: &str) -> wgpu::Features {
    let mut f = wgpu::Features::empty();
    if src.contains("subgroup") {
        f |= wgpu::Features::SUBGROUP;
    }
    if src.contains("enable f16;") {
        f |= wgpu::Features::SHADER_F16;
    }
    f
}

fn variants() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (family, src) in SHADERS {
        for k in kernel::parse_family(family, src).unwrap() {
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
                out.push((format!("shaders/{family}.wgsl::{} [{dt}]", k.name), kernel::generate(&k, &dts).unwrap()));
                // The optional-feature builds (subgroups, f16), where they change the code.
                let plain = kernel::generate_with(&k, &dts, KernelFeatures::NONE).unwrap();
                let mut seen = vec![plain];
                for f in KernelFeatures::every().into_iter().skip(1) {
                    let src = kernel::generate_with(&k, &dts, f).unwrap();
                    if !seen.contains(&src) {
                        out.push((format!("shaders/{family}.wgsl::{} [{dt}, {f}]", k.name), src.clone()));
                        seen.push(src);
                    }
                }
            }
        }
    }
    out
}

fn translate(label: &str, src: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| format!("{label}: parse: {}", e.emit_to_string(src)))?;
    let features = features_of(src);
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), granted_with(features))
        .validate(&module)
        .map_err(|e| format!("{label}: validation with wgpu's capabilities: {}", e.emit_to_string(src)))?;

    // Metal: MSL 2.0 (macOS 10.13, the oldest wgpu supports), buffer
    // accesses bounds-checked as wgpu asks.
    let checks = naga::proc::BoundsCheckPolicies {
        index: naga::proc::BoundsCheckPolicy::ReadZeroSkipWrite,
        buffer: naga::proc::BoundsCheckPolicy::ReadZeroSkipWrite,
        image_load: naga::proc::BoundsCheckPolicy::ReadZeroSkipWrite,
        binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
    };
    let msl = naga::back::msl::Options { lang_version: (2, 0), bounds_check_policies: checks, ..Default::default() };
    naga::back::msl::write_string(&module, &info, &msl, &Default::default())
        .map_err(|e| format!("{label}: MSL: {e}"))?;

    // DX12: shader model 5.1 (FXC) and 6.0 (DXC).
    for sm in [naga::back::hlsl::ShaderModel::V5_1, naga::back::hlsl::ShaderModel::V6_0] {
        let opts = naga::back::hlsl::Options { shader_model: sm, ..Default::default() };
        let pipeline = naga::back::hlsl::PipelineOptions { entry_point: None };
        let mut out = String::new();
        naga::back::hlsl::Writer::new(&mut out, &opts, &pipeline)
            .write(&module, &info, None)
            .map_err(|e| format!("{label}: HLSL {sm:?}: {e}"))?;
    }

    // Vulkan: SPIR-V 1.0, with the policies wgpu's Vulkan backend asks for
    // on a device without robustBufferAccess2 (indices clamped: `Restrict`;
    // naga has no ReadZeroSkipWrite for atomics, which `cached_pool` uses).
    let restrict = naga::proc::BoundsCheckPolicies {
        index: naga::proc::BoundsCheckPolicy::Restrict,
        buffer: naga::proc::BoundsCheckPolicy::Restrict,
        image_load: naga::proc::BoundsCheckPolicy::Restrict,
        binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
    };
    let spv = naga::back::spv::Options { lang_version: (1, 0), bounds_check_policies: restrict, ..Default::default() };
    let words = naga::back::spv::write_vec(&module, &info, &spv, None).map_err(|e| format!("{label}: SPIR-V: {e}"))?;
    if words.first() != Some(&0x0723_0203) {
        return Err(format!("{label}: SPIR-V output without the magic number"));
    }
    Ok(())
}

#[test]
fn every_generated_wgsl_variant_translates_to_msl_hlsl_and_spirv() {
    let all = variants();
    let failures: Vec<String> = all.iter().filter_map(|(label, src)| translate(label, src).err()).collect();
    println!("{} variants translated", all.len() - failures.len());
    assert!(all.len() >= 138, "only {} kernel variants found", all.len());
    // The hardware-GPU variants (DYNSPARSE_WGPU_KERNELS=hw) are kernels of
    // their own and go through every writer like the software ones.
    for hw in [
        "matmul.wgsl::matmul_hw ",
        "matmul.wgsl::matmul_acc_hw ",
        "attention_hw.wgsl::attn_fwd_tiled_hw ",
        "indexer.wgsl::indexer_block_scores_tiled_hw ",
    ] {
        let plain = all.iter().filter(|(l, _)| l.contains(hw) && !l.contains(", ")).count();
        assert_eq!(plain, 3, "{hw}in f32, f16 and bf16");
    }
    // The optional-feature builds are translated too (subgroup reductions, f16 arithmetic).
    for (what, n) in [("subgroups", "cached_attn_hw_sg "), ("f16", "matmul_hw [f16, ")] {
        assert!(all.iter().any(|(l, _)| l.contains(n)), "no {what} build ({n}) among the variants");
    }
    assert!(failures.is_empty(), "{} of {} variants fail:\n{}", failures.len(), all.len(), failures.join("\n\n"));
}

#[test]
fn a_variant_that_needs_a_capability_wgpu_does_not_grant_fails() {
    // f64 arithmetic needs SHADER_F64, which the backend never requests.
    let src = "@group(0) @binding(0) var<storage, read_write> x: array<f32>;\n\
               @compute @workgroup_size(1) fn main() { let d: f64 = 1.0lf; x[0] = f32(d); }\n";
    let e = translate("f64", src).unwrap_err();
    assert!(e.contains("capabilities"), "{e}");
}
