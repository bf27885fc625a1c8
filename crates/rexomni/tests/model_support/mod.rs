//! Shared helpers for the model tests: fixture paths, the committed test cases (tests/fixtures/tiny-cases),
//! the transformers references (tests/fixtures/tiny-*/reference.safetensors). Each case's `pixel_values` are
//! the HF processor's own (stored for every case); rexprep's normalise + patchify (rex-omni-spec.md
//! §1.5-1.6) of the stored resized image is checked to equal them exactly.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// tests/fixtures; `REXOMNI_FIXTURES` overrides the compile-time path, for a test binary copied to a GPU
/// host (scripts/device-check.sh).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("REXOMNI_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

pub struct Case {
    pub original: (u32, u32),
    pub grid_thw: [usize; 3],
    pub prompt_ids: Vec<u32>,
    pub pixel_values: Tensor,
}

pub fn cases() -> Vec<Case> {
    let dir = fixtures().join("tiny-cases");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let t = candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu).unwrap();
    let mut out = Vec::new();
    for (i, m) in meta["cases"].as_array().unwrap().iter().enumerate() {
        let g: Vec<usize> = m["grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let o: Vec<u32> = m["original_size"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let rgb = &t[&format!("case{i}.resized_rgb")];
        let ids: Vec<u32> = t[&format!("case{i}.prompt_ids")]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let hf = t[&format!("case{i}.pixel_values")].clone();
        // rexprep's patchify of HF's resized image must reproduce the HF processor's values exactly.
        let d = (&patchify(rgb) - &hf)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            d, 0.0,
            "case{i}: rexprep patchify differs from the HF processor"
        );
        out.push(Case {
            original: (o[0], o[1]),
            grid_thw: [g[0], g[1], g[2]],
            prompt_ids: ids,
            pixel_values: hf,
        });
    }
    out
}

/// `[H, W, 3]` u8 → `[gh·gw, 1176]` f32 through rexprep's normalise + patchify (the detector's own code).
pub fn patchify(rgb: &Tensor) -> Tensor {
    let (h, w, _) = rgb.dims3().unwrap();
    let px = rgb.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let pv = rexprep::patchify::patchify(&px, w, h);
    let rows = pv.len() / rexprep::patchify::ROW;
    Tensor::from_vec(pv, (rows, rexprep::patchify::ROW), &Device::Cpu).unwrap()
}

pub fn reference(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(model).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max |a − want| / max |want|`: a difference relative to the reference's scale.
pub fn rel_diff(a: &Tensor, want: &Tensor) -> f32 {
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs_diff(a, want) / scale
}

/// A tiny fixture checkpoint (tests/fixtures/<name>) as an engine on the CPU.
pub fn load_engine(name: &str, dtype: DType) -> rexomni::engine::RexOmni {
    load_engine_with(name, dtype, rexomni::engine::Weights::Dense)
}

/// As [`load_engine`] with the linear layers held as `weights`.
pub fn load_engine_with(
    name: &str,
    dtype: DType,
    weights: rexomni::engine::Weights,
) -> rexomni::engine::RexOmni {
    rexomni::engine::RexOmni::load(&rexomni::engine::LoadOptions {
        source: fixtures().join(name).display().to_string(),
        device: Device::Cpu,
        dtype,
        weights,
    })
    .unwrap()
}

pub const MODELS: [&str; 2] = ["tiny-tied", "tiny-untied"];
