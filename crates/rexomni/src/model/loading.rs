//! Checkpoint folder → [`Qwen25Vl`]: `config.json`, the safetensors files (sharded through
//! `model.safetensors.index.json`, or a single `model.safetensors`), the key layout and the lm_head.
//!
//! Runs once on the loading thread. Layout A (`visual.*`, `model.*`) is what transformers ≤ 4.51 writes and what
//! Rex-Omni ships; layout B (`model.visual.*`, `model.language_model.*`) is what ≥ 4.52 writes (spec §2.4,
//! §3.2). We probe `visual.patch_embed.proj.weight` once and hand the prefix down.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::awq::AwqConfig;
use super::linear::{LinearLoader, LoadReport, Weights};
use super::{Config, ModelError, Qwen25Vl};

/// Weight files of a checkpoint folder, in index order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            path: index.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Weights {
                path: index.clone(),
                msg: format!("not valid JSON: {e}"),
            })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                path: index.clone(),
                field: "weight_map".into(),
                msg: "missing or not an object".into(),
            })?;
        let mut files = BTreeSet::new();
        for (key, f) in map {
            let f = f.as_str().ok_or_else(|| ModelError::Config {
                path: index.clone(),
                field: format!("weight_map.{key}"),
                msg: format!("expected a file name, got {f}"),
            })?;
            files.insert(f.to_string());
        }
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.exists() {
                return Err(ModelError::Weights {
                    path: index.clone(),
                    msg: format!("lists {} which does not exist", f.display()),
                });
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::Weights {
        path: dir.to_path_buf(),
        msg: "no model.safetensors.index.json and no model.safetensors in this folder".into(),
    })
}

/// Load a checkpoint folder in `dtype` on `device`, linear weights dense.
pub fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Qwen25Vl, ModelError> {
    load_dir_with(dir, device, dtype, Weights::Dense)
}

/// Load a checkpoint folder in `dtype` on `device` with the linear layers held as `weights` (an AWQ
/// checkpoint's layers are converted from its int4 groups, see `awq`).
pub fn load_dir_with(
    dir: &Path,
    device: &Device,
    dtype: DType,
    weights: Weights,
) -> Result<Qwen25Vl, ModelError> {
    load_dir_report(dir, device, dtype, weights).map(|(m, _)| m)
}

/// As [`load_dir_with`], also returning what was done with each linear layer (tests, rexbench).
pub fn load_dir_report(
    dir: &Path,
    device: &Device,
    dtype: DType,
    weights: Weights,
) -> Result<(Qwen25Vl, LoadReport), ModelError> {
    let cfg_path = dir.join("config.json");
    let cfg = Config::from_file(&cfg_path)?;
    let awq = AwqConfig::from_config_file(&cfg_path)?;
    let files = weight_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; candle copies every tensor out (to `dtype` / the device)
    // while building the layers, and we never write to them. Concurrent truncation by another process would be
    // undefined behaviour, as with every mmap-based loader.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| {
            ModelError::Weights {
                path: dir.to_path_buf(),
                msg: e.to_string(),
            }
        })?;
    let (vision_prefix, text_prefix) = if vb.contains_tensor("visual.patch_embed.proj.weight") {
        ("visual", "model")
    } else if vb.contains_tensor("model.visual.patch_embed.proj.weight") {
        ("model.visual", "model.language_model")
    } else {
        return Err(ModelError::Weights {
            path: dir.to_path_buf(),
            msg: "neither visual.patch_embed.proj.weight nor model.visual.patch_embed.proj.weight found: not a Qwen2.5-VL checkpoint".into(),
        });
    };
    let lm_head = if vb.contains_tensor("lm_head.weight") {
        Some(vb.pp("lm_head"))
    } else {
        if !cfg.text.tie_word_embeddings {
            tracing::warn!(message = "No lm_head.weight although tie_word_embeddings is false; tying to embed_tokens.", dir = %dir.display());
        }
        None
    };
    let is_awq = awq.is_some();
    let lin = LinearLoader::new(weights, awq);
    let model = Qwen25Vl::new_with(cfg, vb.pp(vision_prefix), vb.pp(text_prefix), lm_head, &lin)
        .map_err(|e| match e {
            ModelError::Candle(c) => ModelError::Weights {
                path: dir.to_path_buf(),
                msg: c.to_string(),
            },
            other => other,
        })?;
    let report = lin.report();
    let counts: Vec<String> = report
        .counts()
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect();
    tracing::info!(
        message = "Linear layers loaded.",
        dir = %dir.display(),
        weights = weights.name(),
        awq = is_awq,
        layers = %counts.join(" "),
        // The instruction set of the bf16 CPU GEMM (gemm_bf16.rs): "amx" on Sapphire Rapids and later.
        bf16_cpu_gemm = super::gemm_bf16::Level::best().name(),
    );
    let dense = report.kept_dense();
    if !dense.is_empty() {
        tracing::warn!(
            message = "Some linear layers stay unquantized: their input width is not a multiple of 32, the ggml block size.",
            weights = weights.name(),
            count = dense.len(),
            first = dense[0],
        );
    }
    Ok((model, report))
}
