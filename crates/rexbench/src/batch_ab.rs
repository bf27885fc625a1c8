//! `rexbench --batch-ab N`: vision + prefill of `B` same-size frames in one call each (`encode_images`,
//! `prefill_batch`: what a static batch and a continuous session's joint admission do) against `B` single-frame
//! calls, alternating in one process, N rounds each, under each AMX row cap of `--batch-ab-caps`
//! (docs/benchmarks.md, "Batched vision and prefill against single frames").
//!
//! In: a loaded model, its tokenizer, the frame size and `B`. Out: one line per timed run and, per cap, the
//! medians and the batched / single ratio on stdout. Runs on the main thread. The modes and caps take turns
//! within each round, so they share the machine's state (this VM's speed moves ±40 % within minutes).

use std::time::Instant;

use anyhow::Context;
use rexomni::model::{gemm_bf16, Qwen25Vl};
use rexomni::protocol::{RexTokenizer, Task, TaskPrompt};
use rexprep::tensor::TensorPrep;

pub fn run(
    model: &Qwen25Vl,
    tokenizer: &RexTokenizer,
    (w, h): (u32, u32),
    frames: usize,
    rounds: usize,
    caps: &[usize],
) -> anyhow::Result<()> {
    anyhow::ensure!(
        frames >= 2,
        "--batch-ab compares {frames} frame(s): give --batch-ab-frames 2 or more"
    );
    // Each frame its own brightness, as the continuous benchmark's streams, so no call sees one image B times.
    let prep = TensorPrep::new(model.device());
    let rgb = crate::measure::test_frame(w, h);
    let prepared = (0..frames)
        .map(|i| {
            let shifted: Vec<u8> = rgb.iter().map(|&v| v.saturating_add(8 * i as u8)).collect();
            prep.prepare(&rexprep::Frame::rgb(w, h, &shifted))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let grid = prepared[0].grid_thw;
    let prompt = TaskPrompt::new(Task::Detection, &["person", "car", "bicycle", "dog"]);
    let ids = tokenizer
        .encode_chat(&prompt, w, h, prepared[0].num_image_tokens)
        .context("encoding the benchmark prompt")?;
    let pixels: Vec<_> = prepared.iter().map(|p| &p.pixel_values).collect();

    let batched = || -> anyhow::Result<(f64, f64)> {
        let t = Instant::now();
        let embeds = model.encode_images(&pixels, grid)?;
        let v = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let p = model.prefill_batch(&ids, &embeds, grid)?;
        for row in &p {
            crate::measure::last_argmax(model, &row.hidden)?;
        }
        Ok((v, t.elapsed().as_secs_f64()))
    };
    let single = || -> anyhow::Result<(f64, f64)> {
        let (mut v, mut pf) = (0.0, 0.0);
        for px in &pixels {
            let t = Instant::now();
            let e = model.encode_image(px, grid)?;
            v += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let p = model.prefill(&ids, &e, grid)?;
            crate::measure::last_argmax(model, &p.hidden)?;
            pf += t.elapsed().as_secs_f64();
        }
        Ok((v, pf))
    };

    println!(
        "batch-ab: {frames} frames of {w}x{h} ({} image tokens, {}-token prompt), {rounds} rounds, AMX row caps {caps:?}",
        prepared[0].num_image_tokens,
        ids.len()
    );
    // times[cap][mode] = (vision s, prefill s) per round; round 0 warms up and is not kept.
    let mut times = vec![[Vec::new(), Vec::new()]; caps.len()];
    for round in 0..=rounds {
        for (c, &cap) in caps.iter().enumerate() {
            gemm_bf16::set_amx_row_cap(Some(cap));
            // Alternate which mode goes first, so neither always follows the other's cache state.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for mode in order {
                let (v, p) = if mode == 0 { batched()? } else { single()? };
                if round > 0 {
                    let name = ["batched", "single"][mode];
                    println!(
                        "batch-ab round {round} cap {cap:>3} {name:<7} vision {:>8.1} ms  prefill {:>8.1} ms",
                        v * 1e3,
                        p * 1e3
                    );
                    times[c][mode].push((v, p));
                }
            }
        }
    }
    gemm_bf16::set_amx_row_cap(None);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\n| AMX row cap | vision batched / single s | prefill batched / single s | V+P batched / single | per-round V+P ratios |");
    println!("|---|---|---|---|---|");
    for (c, &cap) in caps.iter().enumerate() {
        let [b, s] = &times[c];
        let col = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
        let (bv, sv) = (col(b, |t| t.0), col(s, |t| t.0));
        let (bp, sp) = (col(b, |t| t.1), col(s, |t| t.1));
        let ratios: Vec<f64> = b
            .iter()
            .zip(s)
            .map(|(b, s)| (b.0 + b.1) / (s.0 + s.1))
            .collect();
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| {cap} | {bv:.2} / {sv:.2} | {bp:.2} / {sp:.2} | {:.2} | {} |",
            median(ratios.clone()),
            listed.join(", ")
        );
    }
    Ok(())
}
