//! `rexstream detect --annotate` end to end (issue 17 item 13): the binary on the tiny fixture checkpoint
//! (tests/fixtures/tiny-untied) and a committed test image, its JSON document on stdout, and the annotated
//! PNG decoded and compared with the input pixel by pixel.
//!
//! The tiny checkpoints are random: their greedy answer holds no coordinate tokens, so there is nothing to
//! draw and the PNG must equal the input exactly (that a drawn detection lands where the JSON says is
//! crates/rexstream/tests/detect_annotate.rs). If a fixture ever answers with shapes, the test checks that
//! every changed pixel is a palette colour and that something was drawn.
//!
//! Run: `cargo test -p rexstream-e2e --test detect_cli -- --nocapture`.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use rexstream::detect::PALETTE;
use rexstream_e2e::{rexstream_bin, workspace_root, TempDir};
use serde_json::Value;

#[test]
fn detect_annotate_writes_a_png_consistent_with_the_json() -> Result<()> {
    let root = workspace_root();
    let model = root.join("tests/fixtures/tiny-untied");
    let image = root.join("tests/fixtures/tiny-cases/case1.png");
    let dir = TempDir::new("detect-cli")?;
    let png = dir.path().join("annotated.png");
    let out = Command::new(rexstream_bin()?)
        .args(["detect", "--device", "cpu", "--max-new-tokens", "24"])
        .args(["--categories", "person, cup"])
        .arg("--model")
        .arg(&model)
        .arg("--image")
        .arg(&image)
        .arg("--annotate")
        .arg(&png)
        .env_remove("REXSTREAM_MODEL")
        .output()
        .context("run rexstream detect")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "rexstream detect failed: {}\n{stderr}",
        out.status
    );
    let doc: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "stdout is not one JSON document: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;

    let input = image::open(&image)?.to_rgb8();
    let (w, h) = input.dimensions();
    assert_eq!(doc["image_size"], serde_json::json!([w, h]), "{doc}");
    assert_eq!(doc["task"], "detection");
    let ids = doc["output_token_ids"]
        .as_array()
        .context("output_token_ids")?;
    assert!(
        !ids.is_empty() && ids.len() <= 24,
        "{} output ids",
        ids.len()
    );
    let dets = doc["detections"].as_array().context("detections")?;

    let annotated = image::open(&png)
        .with_context(|| format!("{} is not a decodable image", png.display()))?
        .to_rgb8();
    assert_eq!(annotated.dimensions(), (w, h), "annotated PNG size");
    let changed: Vec<[u8; 3]> = annotated
        .pixels()
        .zip(input.pixels())
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.0)
        .collect();
    println!(
        "detect --annotate: {} output tokens, {} detections, {} pixels drawn on {w}x{h}; raw output {:?}",
        ids.len(),
        dets.len(),
        changed.len(),
        doc["raw_output"]
    );
    if dets.is_empty() {
        assert!(
            changed.is_empty(),
            "{} pixels changed with no detection",
            changed.len()
        );
    } else {
        assert!(
            !changed.is_empty(),
            "{} detections but nothing drawn",
            dets.len()
        );
        assert!(
            changed.iter().all(|p| PALETTE.contains(p)),
            "a changed pixel is not a palette colour"
        );
    }
    Ok(())
}

/// `--max-pixels` (as `[model] max_pixels`): a 500×375 image capped at 50 176 pixels reaches the model at
/// transformers' `smart_resize(375, 500, max_pixels=50176)` = 252×168 (54 image tokens instead of 234) while
/// the document keeps the original size (what boxes convert against); a cap outside the model's range is refused
/// with its value.
#[test]
fn detect_max_pixels_shrinks_the_model_input_and_refuses_bad_caps() -> Result<()> {
    let root = workspace_root();
    let run = |extra: &[&str]| -> Result<std::process::Output> {
        Command::new(rexstream_bin()?)
            .args(["detect", "--device", "cpu", "--max-new-tokens", "4"])
            .args(["--categories", "cat"])
            .arg("--model")
            .arg(root.join("tests/fixtures/tiny-untied"))
            .arg("--image")
            .arg(root.join("tests/fixtures/prep/chelsea_500x375.png"))
            .args(extra)
            .env_remove("REXSTREAM_MODEL")
            .output()
            .context("run rexstream detect")
    };
    let doc = |out: std::process::Output| -> Result<Value> {
        ensure!(
            out.status.success(),
            "rexstream detect failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let full = doc(run(&[])?)?;
    let capped = doc(run(&["--max-pixels", "50176"])?)?;
    assert_eq!(
        full["resized_size"],
        serde_json::json!([504, 364]),
        "{full}"
    );
    assert_eq!(
        capped["resized_size"],
        serde_json::json!([252, 168]),
        "{capped}"
    );
    assert_eq!(capped["grid_thw"], serde_json::json!([1, 12, 18]));
    assert_eq!(capped["image_size"], serde_json::json!([500, 375]));
    let tokens = |d: &Value| d["prompt_tokens"].as_u64().unwrap_or(0);
    assert_eq!(
        tokens(&full) - tokens(&capped),
        234 - 54,
        "{full}\n{capped}"
    );

    let bad = run(&["--max-pixels", "5000"])?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("--max-pixels")
            && stderr.contains("5000")
            && stderr.contains("12544..=2007040"),
        "{stderr}"
    );
    Ok(())
}
