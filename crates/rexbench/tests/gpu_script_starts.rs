//! The GPU benchmark script starts and produces its JSON here, on CPU, with the tiny fixture config, so the
//! command documented for the GPU host is known to run (issue "Benchmarks": "tested to start (with CPU)").

use std::path::Path;
use std::process::Command;

#[test]
fn bench_gpu_script_runs_on_cpu_with_a_tiny_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::temp_dir().join(format!("rexbench-smoke-{}", std::process::id()));
    let status = Command::new(root.join("scripts/bench-gpu.sh"))
        .arg(&out)
        .env("REXBENCH", env!("CARGO_BIN_EXE_rexbench"))
        .env("DEVICE", "cpu")
        .env("DTYPE", "f32")
        .env("CONFIG", root.join("tests/fixtures/tiny-tied/config.json"))
        .env("BATCHES", "1,2")
        .env("CONCURRENT", "2")
        .env("OUTPUT_TOKENS", "4")
        .env("ITERS", "1")
        .env("SKIP_HF", "1")
        .status()
        .expect("run scripts/bench-gpu.sh");
    assert!(status.success(), "bench-gpu.sh failed: {status}");

    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("rexbench.json")).expect("rexbench.json"),
    )
    .expect("JSON");
    assert_eq!(
        report["image_tokens"], 391,
        "640x480 → 644x476 → 391 image tokens (spec §1.3)"
    );
    assert_eq!(report["decode"].as_array().map(Vec::len), Some(2));
    assert!(report["frames"][0]["frames_per_s"].as_f64().unwrap() > 0.0);
    // The saved checkpoint is loadable by our own loader (HF loads the same folder in bench_hf.py).
    assert!(out.join("checkpoint/model.safetensors").exists());
    assert!(out.join("checkpoint/config.json").exists());
    let reload = Command::new(env!("CARGO_BIN_EXE_rexbench"))
        .args([
            "--model",
            out.join("checkpoint").to_str().unwrap(),
            "--dtype",
            "f32",
            "--batches",
            "1",
        ])
        .args(["--concurrent", "1", "--output-tokens", "2", "--iters", "1"])
        .arg("--tokenizer")
        .arg(root.join("tests/fixtures/qwen-tokenizer"))
        .status()
        .expect("rexbench --model");
    assert!(reload.success());
    let _ = std::fs::remove_dir_all(&out);
}
