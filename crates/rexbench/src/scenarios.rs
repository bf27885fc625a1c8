//! Scenarios (issue 12 item 5): generated frame sequences replayed through the runtime's per-frame
//! decisions, with each work-saving feature off and on in one run, so the table shows the work saved.
//!
//! In: the loaded model and tokenizer, a [`ScenarioPlan`]. Out: one [`ScenarioRow`] per (scenario, variant)
//! and a printed table. Runs on the calling thread; no GStreamer: frames come from
//! `rexprep::motion::synth`, the same generator the gate's unit tests use.
//!
//! Each frame goes through `rexprep::motion::MotionGate` (the code `rexstream`'s ingest runs) when the
//! variant has motion gating on; a served frame is preprocessed and sent to `rexomni::engine::generate`
//! alone, synchronously (no slot, no `max_fps`: every served frame is one model call). Wall time covers
//! the gate, preprocessing and the model, not the rendering of the synthetic frames.
//!
//! To add a feature column (drafts: decode forward passes per served frame), add a field to [`Variant`]
//! and one to [`ScenarioRow`], set it in [`run_one`], and print it in [`table`].

use std::time::{Duration, Instant};

use anyhow::Context;
use rexomni::engine::{generate, GenerateParams, GenerateRequest};
use rexomni::model::Qwen25Vl;
use rexomni::protocol::{RexTokenizer, Task, TaskPrompt};
use rexprep::motion::synth::Scene;
use rexprep::motion::MotionGate;
use rexprep::tensor::TensorPrep;
use rexprep::Frame;
use serde::Serialize;

/// A named generated clip.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub scene: Scene,
    pub frames: usize,
}

/// Which features are on.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub name: &'static str,
    pub motion: bool,
}

/// The variants compared in every scenario.
pub const VARIANTS: [Variant; 2] = [
    Variant {
        name: "motion off",
        motion: false,
    },
    Variant {
        name: "motion on",
        motion: true,
    },
];

pub struct ScenarioPlan {
    pub image_size: (u32, u32),
    /// Frames per scenario (at 5 fps: 300 = one minute).
    pub frames: usize,
    pub output_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct ScenarioRow {
    pub scenario: String,
    pub variant: String,
    pub frames: usize,
    pub model_calls: usize,
    pub model_calls_per_100_frames: f64,
    /// Gate + preprocess + model per 100 frames; `None` when no model ran.
    pub wall_s_per_100_frames: Option<f64>,
    /// Mean gate cost per frame (0 with motion off).
    pub gate_ms_per_frame: f64,
    pub generated_tokens: usize,
}

/// Still scene (noise + slow drift), slow lighting change, object crossing for 3 s in the middle.
pub fn scenarios(plan: &ScenarioPlan) -> Vec<Scenario> {
    let (width, height) = plan.image_size;
    let still = Scene {
        width,
        height,
        ..Scene::still()
    };
    let seconds = plan.frames as f64 / still.fps;
    vec![
        Scenario {
            name: "still + noise",
            scene: still.clone(),
            frames: plan.frames,
        },
        Scenario {
            name: "slow change",
            scene: Scene {
                drift_per_s: 1.0,
                gradient_drift_per_s: 20.0 / 60.0,
                ..still.clone()
            },
            frames: plan.frames,
        },
        Scenario {
            name: "object crossing 3 s",
            scene: Scene {
                crossing: Some((seconds / 2.0 - 1.5, 3.0)),
                ..still
            },
            frames: plan.frames,
        },
    ]
}

/// Every scenario × every variant.
/// `model`: `None` counts model calls only (the gate's decisions), without running a model.
pub fn run(
    model: Option<(&Qwen25Vl, &RexTokenizer)>,
    plan: &ScenarioPlan,
) -> anyhow::Result<Vec<ScenarioRow>> {
    let mut rows = Vec::new();
    for s in scenarios(plan) {
        for v in VARIANTS {
            let row = run_one(model, plan, &s, v)?;
            eprintln!(
                "rexbench: {} / {}: {} model calls in {} frames",
                row.scenario, row.variant, row.model_calls, row.frames
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

fn run_one(
    model: Option<(&Qwen25Vl, &RexTokenizer)>,
    plan: &ScenarioPlan,
    s: &Scenario,
    v: Variant,
) -> anyhow::Result<ScenarioRow> {
    let (w, h) = (s.scene.width, s.scene.height);
    let prep = model.map(|(m, _)| TensorPrep::new(m.device()));
    let prompt = TaskPrompt::new(Task::Detection, &["person", "car", "bicycle", "dog"]);
    let params = GenerateParams {
        max_new_tokens: plan.output_tokens,
        ..GenerateParams::default()
    };
    let mut gate = MotionGate::with_defaults();
    let (mut calls, mut tokens) = (0usize, 0usize);
    let (mut busy, mut gate_time) = (Duration::ZERO, Duration::ZERO);
    for i in 0..s.frames {
        let rgb = s.scene.frame(i);
        let frame = Frame::rgb(w, h, &rgb);
        let started = Instant::now();
        let serve = if v.motion {
            let d = gate.decide(&frame, s.scene.time(i), false)?;
            gate_time += started.elapsed();
            d.serve.is_some()
        } else {
            true
        };
        if serve {
            calls += 1;
            if let (Some((model, tokenizer)), Some(prep)) = (model, &prep) {
                let p = prep.prepare(&frame)?;
                let ids = tokenizer
                    .encode_chat(&prompt, w, h, p.num_image_tokens)
                    .context("encoding the scenario prompt")?;
                let out = generate(
                    model,
                    &[GenerateRequest {
                        pixel_values: p.pixel_values,
                        grid_thw: p.grid_thw,
                        prompt_ids: ids,
                    }],
                    &params,
                )?;
                tokens += out.iter().map(|o| o.token_ids.len()).sum::<usize>();
            }
        }
        busy += started.elapsed();
    }
    let per100 = 100.0 / s.frames.max(1) as f64;
    Ok(ScenarioRow {
        scenario: s.name.to_string(),
        variant: v.name.to_string(),
        frames: s.frames,
        model_calls: calls,
        model_calls_per_100_frames: calls as f64 * per100,
        wall_s_per_100_frames: model.map(|_| busy.as_secs_f64() * per100),
        gate_ms_per_frame: gate_time.as_secs_f64() * 1e3 / s.frames.max(1) as f64,
        generated_tokens: tokens,
    })
}

/// The rows as an aligned text table.
pub fn table(rows: &[ScenarioRow]) -> String {
    let mut s = format!(
        "{:<22} {:<11} {:>7} {:>12} {:>16} {:>14} {:>8}\n",
        "scenario", "variant", "frames", "calls/100 fr", "wall s/100 fr", "gate ms/frame", "tokens"
    );
    for r in rows {
        let wall = r
            .wall_s_per_100_frames
            .map_or_else(|| "-".to_string(), |w| format!("{w:.2}"));
        s.push_str(&format!(
            "{:<22} {:<11} {:>7} {:>12.1} {:>16} {:>14.3} {:>8}\n",
            r.scenario,
            r.variant,
            r.frames,
            r.model_calls_per_100_frames,
            wall,
            r.gate_ms_per_frame,
            r.generated_tokens
        ));
    }
    s
}
