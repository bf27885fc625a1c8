//! Drafts off and on, in one run (issue 12, item 5: decode columns): a sequence of frames from one camera
//! through `engine::generate_with_options` one frame at a time, as the detector worker serves a stream, once
//! with plain greedy decoding and once with the previous answer as the draft.
//!
//! Scenarios: `identical` (the same frame every time: a still scene) and `slow_change` (a square drifting by
//! 2 px per frame over the test frame). Out: decode forward passes per served frame and ms per frame for both
//! settings, and whether every frame's ids were the same with and without drafts (they must be).

use std::time::Instant;

use anyhow::Context;
use rexomni::engine::{generate_with_options, DecodeOptions, GenerateParams, GenerateRequest};
use rexomni::model::Qwen25Vl;
use rexomni::protocol::{RexTokenizer, Task, TaskPrompt};
use rexprep::tensor::TensorPrep;
use serde::Serialize;

#[derive(Serialize)]
pub struct DraftsRow {
    pub scenario: &'static str,
    pub frames: usize,
    pub passes_per_frame_off: f64,
    pub passes_per_frame_on: f64,
    pub ms_per_frame_off: f64,
    pub ms_per_frame_on: f64,
    /// Draft ids accepted / proposed with drafts on.
    pub draft_acceptance: f64,
    pub tokens_per_frame: f64,
    /// Every frame's ids identical with and without drafts.
    pub ids_identical: bool,
}

pub fn run(
    model: &Qwen25Vl,
    tokenizer: &RexTokenizer,
    base: &[u8],
    (w, h): (u32, u32),
    frames: usize,
    output_tokens: usize,
) -> anyhow::Result<Vec<DraftsRow>> {
    let prep = TensorPrep::new(model.device());
    let prompt = TaskPrompt::new(Task::Detection, &["person", "car", "bicycle", "dog"]);
    let params = GenerateParams {
        max_new_tokens: output_tokens,
        ..GenerateParams::default()
    };
    let mut rows = Vec::new();
    for scenario in ["identical", "slow_change"] {
        let requests = (0..frames)
            .map(|i| {
                let mut rgb = base.to_vec();
                if scenario == "slow_change" {
                    square(&mut rgb, w, h, 2 * i as u32);
                }
                let p = prep.prepare(&rexprep::Frame::rgb(w, h, &rgb))?;
                let ids = tokenizer
                    .encode_chat(&prompt, w, h, p.num_image_tokens)
                    .context("encoding the benchmark prompt")?;
                Ok(GenerateRequest {
                    pixel_values: p.pixel_values,
                    grid_thw: p.grid_thw,
                    prompt_ids: ids,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut per_setting = Vec::new();
        for drafts_on in [false, true] {
            let mut previous: Option<Vec<u32>> = None;
            let (mut passes, mut accepted, mut proposed, mut tokens) = (0, 0, 0, 0);
            let mut ids = Vec::new();
            let t = Instant::now();
            for r in &requests {
                let options = DecodeOptions {
                    drafts: vec![if drafts_on { previous.clone() } else { None }],
                    draft_block: 0,
                    max_objects: None,
                    ..Default::default()
                };
                let out = generate_with_options(
                    model,
                    std::slice::from_ref(r),
                    &params,
                    &[output_tokens],
                    &options,
                )?
                .remove(0);
                passes += out.decode_forward_passes;
                accepted += out.draft_accepted;
                proposed += out.draft_accepted + out.draft_rejected;
                tokens += out.token_ids.len();
                previous = Some(out.token_ids.clone());
                ids.push(out.token_ids);
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / frames as f64;
            eprintln!(
                "rexbench: drafts {} on {scenario}: {:.1} decode passes/frame, {ms:.1} ms/frame",
                if drafts_on { "on" } else { "off" },
                passes as f64 / frames as f64
            );
            per_setting.push((passes, ms, accepted, proposed, tokens, ids));
        }
        let (off, on) = (&per_setting[0], &per_setting[1]);
        rows.push(DraftsRow {
            scenario,
            frames,
            passes_per_frame_off: off.0 as f64 / frames as f64,
            passes_per_frame_on: on.0 as f64 / frames as f64,
            ms_per_frame_off: off.1,
            ms_per_frame_on: on.1,
            draft_acceptance: on.2 as f64 / on.3.max(1) as f64,
            tokens_per_frame: off.4 as f64 / frames as f64,
            ids_identical: off.5 == on.5,
        });
    }
    Ok(rows)
}

/// A 48 px white square at (x, h/3) on the RGB frame.
fn square(rgb: &mut [u8], w: u32, h: u32, x: u32) {
    let y0 = h / 3;
    for y in y0..(y0 + 48).min(h) {
        for xx in x.min(w)..(x + 48).min(w) {
            let i = ((y * w + xx) * 3) as usize;
            rgb[i..i + 3].copy_from_slice(&[255, 255, 255]);
        }
    }
}

pub fn table(rows: &[DraftsRow]) -> String {
    let mut s = String::from(
        "\ndrafts (previous answer verified as a draft; one stream, frames served one by one)\n\
         scenario     frames  tokens/frame  passes/frame off  on      ms/frame off  on        acceptance  ids identical\n",
    );
    for r in rows {
        s += &format!(
            "{:<12} {:>6}  {:>12.1}  {:>16.1}  {:>6.1}  {:>12.1}  {:>8.1}  {:>10.2}  {}\n",
            r.scenario,
            r.frames,
            r.tokens_per_frame,
            r.passes_per_frame_off,
            r.passes_per_frame_on,
            r.ms_per_frame_off,
            r.ms_per_frame_on,
            r.draft_acceptance,
            r.ids_identical
        );
    }
    s
}
