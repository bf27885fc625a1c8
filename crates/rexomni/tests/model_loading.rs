//! Loading variants of the same tiny checkpoint must give the same numbers: layout B keys
//! (`model.visual.*`, `model.language_model.*`) in one `model.safetensors`, a nested `text_config` with
//! `rope_parameters` and `in_channels`, and f16/bf16 dtypes; bad folders fail naming file and field.
#![cfg(feature = "model")]

mod model_support;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use model_support::*;
use rexomni::model::loading::load_dir;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rexomni-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Last-position logits for case 0 (the smallest image), f32.
fn case0_last_logits(dir: &Path, dtype: DType) -> Tensor {
    let c = &cases()[0];
    let m = load_dir(dir, &Device::Cpu, dtype).unwrap();
    let emb = m.encode_image(&c.pixel_values, c.grid_thw).unwrap();
    let p = m.prefill(&c.prompt_ids, &emb, c.grid_thw).unwrap();
    m.logits(&p.hidden).unwrap().flatten_all().unwrap()
}

#[test]
fn layout_b_single_file_and_nested_config_load_the_same_model() {
    let src = fixtures().join("tiny-untied");
    let dst = tmpdir("layout-b");
    // Re-key every tensor as transformers >= 4.52 does (spec §3.2) into one model.safetensors.
    let mut all = std::collections::HashMap::new();
    for f in rexomni::model::loading::weight_files(&src).unwrap() {
        for (k, v) in candle_core::safetensors::load(&f, &Device::Cpu).unwrap() {
            let k = if let Some(rest) = k.strip_prefix("visual.") {
                format!("model.visual.{rest}")
            } else if let Some(rest) = k.strip_prefix("model.") {
                format!("model.language_model.{rest}")
            } else {
                k
            };
            all.insert(k, v);
        }
    }
    candle_core::safetensors::save(&all, dst.join("model.safetensors")).unwrap();
    // Nested config: text keys under text_config, rope_parameters, in_channels.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let obj = cfg.as_object_mut().unwrap();
    let mut text = serde_json::Map::new();
    for k in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "rope_theta",
    ] {
        text.insert(k.into(), obj.remove(k).unwrap());
    }
    let rope = obj.remove("rope_scaling").unwrap();
    text.insert("rope_parameters".into(), serde_json::json!({"rope_type": "default", "mrope_section": rope["mrope_section"], "rope_theta": 1000000.0}));
    obj.insert("text_config".into(), serde_json::Value::Object(text));
    let vis = obj
        .get_mut("vision_config")
        .unwrap()
        .as_object_mut()
        .unwrap();
    let c = vis.remove("in_chans").unwrap();
    vis.insert("in_channels".into(), c);
    std::fs::write(
        dst.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();

    let a = case0_last_logits(&src, DType::F32);
    let b = case0_last_logits(&dst, DType::F32);
    assert_eq!(
        max_abs_diff(&a, &b),
        0.0,
        "layout B / nested config differ from layout A"
    );
    let d = max_abs_diff(&a, &reference("tiny-untied")["case0.last_logits"]);
    assert!(d <= 1e-3, "{d}");
    // Half precisions load and run; their logits stay near the f32 ones (loose: random tiny weights).
    for dt in [DType::F16, DType::BF16] {
        let h = case0_last_logits(&src, dt);
        let rel = rel_diff(&h, &a);
        eprintln!("{dt:?}: last logits max |Δ| / max |logit| = {rel:.4}");
        assert!(rel < 0.1, "{dt:?}: relative logit error {rel}");
    }
    std::fs::remove_dir_all(&dst).unwrap();
}

#[test]
fn bad_folders_fail_naming_file_and_field() {
    let src = fixtures().join("tiny-tied");
    let dst = tmpdir("bad");
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    // A config with a broken mrope_section.
    std::fs::write(
        dst.join("config.json"),
        cfg.replace(
            "\"mrope_section\": [\n      2,\n      1,\n      1\n    ]",
            "\"mrope_section\": [2, 2, 2]",
        ),
    )
    .unwrap();
    let e = load_error(&dst);
    assert!(
        e.contains("config.json")
            && e.contains("rope_scaling.mrope_section")
            && e.contains("[2, 2, 2]"),
        "{e}"
    );
    // Good config, no weights.
    std::fs::write(dst.join("config.json"), &cfg).unwrap();
    let e = load_error(&dst);
    assert!(e.contains("model.safetensors"), "{e}");
    // Index naming a missing shard.
    std::fs::copy(
        src.join("model.safetensors.index.json"),
        dst.join("model.safetensors.index.json"),
    )
    .unwrap();
    let e = load_error(&dst);
    assert!(
        e.contains("model-00001-of-00002.safetensors") && e.contains("does not exist"),
        "{e}"
    );
    // Missing key in the config.
    std::fs::remove_file(dst.join("model.safetensors.index.json")).unwrap();
    std::fs::write(
        dst.join("config.json"),
        cfg.replace("\"num_hidden_layers\"", "\"num_hidden_layerz\""),
    )
    .unwrap();
    let e = load_error(&dst);
    assert!(
        e.contains("num_hidden_layers") && e.contains("missing"),
        "{e}"
    );
    std::fs::remove_dir_all(&dst).unwrap();
}

#[test]
fn hub_id_offline_error_says_how_to_use_a_local_folder() {
    // An unreachable endpoint stands in for "offline"; the cache is an empty temp folder.
    let cache = tmpdir("hub-cache");
    std::env::set_var("HF_HOME", &cache);
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let e = rexomni::hub::resolve("IDEA-Research/Rex-Omni")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("IDEA-Research/Rex-Omni") && e.contains("--model /path/to/Rex-Omni"),
        "{e}"
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

/// The error text of loading `dir`, which must fail.
fn load_error(dir: &Path) -> String {
    load_dir(dir, &Device::Cpu, DType::F32)
        .err()
        .expect("loading should fail")
        .to_string()
}
