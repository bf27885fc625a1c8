//! Static batches vs continuous batching, in one run (issue 12, item 4): frames/s for several always-busy
//! streams whose answers differ in length.
//!
//! In: the model, the tokenizer, a frame size, one token budget per stream (e.g. 16/32/48/64: with random
//! weights no answer ends on its own, so the budget is the answer length) and a number of frames to serve.
//! Out: one [`ContinuousRow`] per mode and a printed table. Runs on the calling thread, as the detector
//! worker runs the model.
//!
//! Every stream always has a new frame ready (a busy camera; each stream's frames are one generated image
//! with its own brightness, all of one size, so same-size vision and prefill apply in both modes).
//! - `static`: what the worker did before: one batch of one frame per stream through
//!   `engine::generate_with_budgets`, the next batch only when the longest answer is done; `frames / streams`
//!   batches.
//! - `continuous`: one `ContinuousSession` of `streams` slots; whenever a stream's row finishes, that stream's
//!   next frame is admitted before the next step (rows finishing in the same step are admitted together), until
//!   `frames` frames are admitted; a short-answer stream is served more often, as the scheduler would serve it.
//! - `continuous + drafts`: the same, each frame admitted with its stream's previous answer as a draft (what
//!   the worker does; here every stream's frames are one image, so the drafts are exact: a still camera).
//!
//! `rounds` repeats the three modes, in reverse order every other round, so that each ratio compares runs minutes
//! apart (this VM's speed drifts within minutes); `table` prints each round's ratios and their median.
//!
//! Wall time covers vision, prefill and decode (not preprocessing, done once up front). Decode forward passes
//! are counted as the engine runs them (a static batch's passes are its longest row's). Every answer is checked
//! against the static run's answer for its stream (ids identical: the exactness contract).

use std::time::Instant;

use anyhow::Context;
use rexomni::engine::{generate_with_budgets, ContinuousSession, GenerateParams, GenerateRequest};
use rexomni::model::Qwen25Vl;
use rexomni::protocol::{RexTokenizer, Task, TaskPrompt};
use rexprep::tensor::TensorPrep;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ContinuousRow {
    /// 1-based: `--continuous-rounds` repeats the modes, alternating their order, so each ratio's two sides
    /// are measured minutes apart at most (this VM's speed drifts within minutes).
    pub round: usize,
    pub mode: &'static str,
    pub streams: usize,
    pub budgets: Vec<usize>,
    pub frames: usize,
    /// Frames served per stream.
    pub frames_per_stream: Vec<usize>,
    pub wall_s: f64,
    /// CPU seconds of the whole process (all threads) during the mode: on a shared machine wall time depends on
    /// the other jobs, CPU time much less.
    pub cpu_s: Option<f64>,
    pub frames_per_s: f64,
    /// Wall seconds spent in vision + prefill (admissions; a static batch's shared group): the rest of `wall_s`
    /// is decode.
    pub vision_prefill_s: f64,
    pub decode_forward_passes: usize,
    pub passes_per_frame: f64,
    pub generated_tokens: usize,
    /// Every answer's ids equal the static run's answer for its stream.
    pub ids_identical: bool,
}

pub fn run(
    model: &Qwen25Vl,
    tokenizer: &RexTokenizer,
    (w, h): (u32, u32),
    budgets: &[usize],
    frames: usize,
    rounds: usize,
) -> anyhow::Result<Vec<ContinuousRow>> {
    anyhow::ensure!(!budgets.is_empty(), "--continuous-budgets: no stream");
    let streams = budgets.len();
    let prep = TensorPrep::new(model.device());
    let prompt = TaskPrompt::new(Task::Detection, &["person", "car", "bicycle", "dog"]);
    let base = crate::measure::test_frame(w, h);
    // One image per stream: the test frame at its own brightness.
    let requests = (0..streams)
        .map(|s| {
            let rgb: Vec<u8> = base
                .iter()
                .map(|&v| v.saturating_add((s * 23) as u8))
                .collect();
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
    let clone = |s: usize| GenerateRequest {
        pixel_values: requests[s].pixel_values.clone(),
        grid_thw: requests[s].grid_thw,
        prompt_ids: requests[s].prompt_ids.clone(),
    };
    let params = GenerateParams {
        max_new_tokens: budgets.iter().copied().max().unwrap_or(1),
        ..GenerateParams::default()
    };

    // Static batches: one frame per stream, the next batch after the longest answer. Continuous: a stream's
    // next frame joins as soon as its previous row is done; then the same with each frame verifying its
    // stream's previous answer as a draft (a still camera: the answers repeat). Odd rounds run the modes in
    // that order, even rounds in reverse.
    let batches = frames.div_ceil(streams).max(1);
    let batch: Vec<GenerateRequest> = (0..streams).map(clone).collect();
    let mut reference: Vec<Vec<u32>> = Vec::new();
    let mut rows = Vec::new();
    for round in 1..=rounds.max(1) {
        let mut modes = [Mode::Static, Mode::Continuous, Mode::Drafts];
        if round % 2 == 0 {
            modes.reverse();
        }
        // Round 1 runs static first: its answers are every stream's reference.
        for mode in modes {
            let row = match mode {
                Mode::Static => {
                    let (row, answers) =
                        static_batches(model, &batch, &params, budgets, batches, &reference)?;
                    if reference.is_empty() {
                        reference = answers;
                    }
                    row
                }
                Mode::Continuous | Mode::Drafts => continuous(
                    model,
                    &clone,
                    &params,
                    budgets,
                    &reference,
                    batches * streams,
                    mode == Mode::Drafts,
                )?,
            };
            rows.push(ContinuousRow { round, ..row });
        }
    }
    Ok(rows)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Static,
    Continuous,
    Drafts,
}

/// `batches` static batches of one frame per stream; the row and the first batch's answers (each stream's
/// reference when `reference` is still empty; otherwise every answer is checked against it).
fn static_batches(
    model: &Qwen25Vl,
    batch: &[GenerateRequest],
    params: &GenerateParams,
    budgets: &[usize],
    batches: usize,
    reference: &[Vec<u32>],
) -> anyhow::Result<(ContinuousRow, Vec<Vec<u32>>)> {
    let streams = batch.len();
    let t = Instant::now();
    let c0 = cpu_seconds();
    let mut first: Vec<Vec<u32>> = Vec::new();
    let (mut passes, mut tokens, mut identical) = (0, 0, true);
    let mut vision_prefill = 0.0;
    for _ in 0..batches {
        let out = generate_with_budgets(model, batch, params, budgets)?;
        // One same-size group: every row reports the group's vision and prefill time.
        vision_prefill += out.first().map_or(0.0, |o| {
            (o.timings.vision + o.timings.prefill).as_secs_f64()
        });
        passes += out
            .iter()
            .map(|o| o.decode_forward_passes)
            .max()
            .unwrap_or(0);
        tokens += out.iter().map(|o| o.token_ids.len()).sum::<usize>();
        if first.is_empty() {
            first = out.iter().map(|o| o.token_ids.clone()).collect();
        }
        let want = if reference.is_empty() {
            &first[..]
        } else {
            reference
        };
        identical &= out.iter().zip(want).all(|(o, r)| &o.token_ids == r);
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(c0).map(|(b, a)| b - a);
    let n = batches * streams;
    let row = ContinuousRow {
        round: 0,
        mode: "static",
        streams,
        budgets: budgets.to_vec(),
        frames: n,
        frames_per_stream: vec![batches; streams],
        wall_s: wall,
        cpu_s: cpu,
        frames_per_s: n as f64 / wall,
        vision_prefill_s: vision_prefill,
        decode_forward_passes: passes,
        passes_per_frame: passes as f64 / n as f64,
        generated_tokens: tokens,
        ids_identical: identical,
    };
    Ok((row, first))
}

/// One continuous run of `total` frames over `budgets.len()` always-busy streams; with `drafts`, each frame
/// is admitted with its stream's previous answer (none for a stream's first frame).
fn continuous(
    model: &Qwen25Vl,
    clone: &dyn Fn(usize) -> GenerateRequest,
    params: &GenerateParams,
    budgets: &[usize],
    reference: &[Vec<u32>],
    total: usize,
    drafts: bool,
) -> anyhow::Result<ContinuousRow> {
    let streams = budgets.len();
    let t = Instant::now();
    let c0 = cpu_seconds();
    let mut session = ContinuousSession::new(model, streams, params.clone(), None)?;
    let mut owner = std::collections::HashMap::new();
    let mut served = vec![0usize; streams];
    let mut previous: Vec<Option<Vec<u32>>> = vec![None; streams];
    let mut vision_prefill = 0.0;
    let (mut admitted, mut done, mut tokens, mut identical) = (0, 0, 0, true);
    let mut ready: Vec<usize> = (0..streams).collect();
    while done < total {
        // Admit the streams whose previous frame finished (together: same-size vision + prefill in one call).
        ready.truncate(total - admitted);
        if !ready.is_empty() {
            let reqs: Vec<GenerateRequest> = ready.iter().map(|&s| clone(s)).collect();
            let b: Vec<usize> = ready.iter().map(|&s| budgets[s]).collect();
            let d: Vec<Option<Vec<u32>>> = ready
                .iter()
                .map(|&s| previous[s].clone().filter(|_| drafts))
                .collect();
            let ta = Instant::now();
            let tickets = session.admit_with_drafts(model, &reqs, &b, &d)?;
            vision_prefill += ta.elapsed().as_secs_f64();
            for (ticket, &s) in tickets.into_iter().zip(&ready) {
                owner.insert(ticket, s);
            }
            admitted += ready.len();
            ready.clear();
        }
        for f in session.step(model)? {
            let s = owner[&f.ticket];
            served[s] += 1;
            done += 1;
            tokens += f.output.token_ids.len();
            identical &= f.output.token_ids == reference[s];
            previous[s] = Some(f.output.token_ids);
            ready.push(s);
        }
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(c0).map(|(b, a)| b - a);
    Ok(ContinuousRow {
        round: 0,
        mode: if drafts {
            "continuous + drafts"
        } else {
            "continuous"
        },
        streams,
        budgets: budgets.to_vec(),
        frames: total,
        frames_per_stream: served,
        wall_s: wall,
        cpu_s: cpu,
        frames_per_s: total as f64 / wall,
        vision_prefill_s: vision_prefill,
        decode_forward_passes: session.forward_passes(),
        passes_per_frame: session.forward_passes() as f64 / total as f64,
        generated_tokens: tokens,
        ids_identical: identical,
    })
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`; `None` elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the `(comm)`: state is field 3, utime 14 and stime 15 (1-based), in clock ticks.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ: 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

pub fn table(rows: &[ContinuousRow]) -> String {
    let static_of = |round: usize| rows.iter().find(|r| r.mode == "static" && r.round == round);
    let cpu_per_frame = |r: &ContinuousRow| r.cpu_s.map(|c| c / r.frames as f64);
    let mut s = String::from(
        "\n| round | mode | streams (budgets) | frames | per stream | wall s | vision+prefill s | frames/s | vs static | CPU s/frame | vs static | decode passes | passes/frame | ids identical |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let base = static_of(r.round).map(|b| b.frames_per_s);
        let base_cpu = static_of(r.round).and_then(cpu_per_frame);
        s += &format!(
            "| {} | {} | {} ({}) | {} | {} | {:.1} | {:.1} | {:.3} | {} | {} | {} | {} | {:.1} | {} |\n",
            r.round,
            r.mode,
            r.streams,
            r.budgets
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join("/"),
            r.frames,
            r.frames_per_stream
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join("/"),
            r.wall_s,
            r.vision_prefill_s,
            r.frames_per_s,
            base.map(|b| format!("{:.2}×", r.frames_per_s / b))
                .unwrap_or_default(),
            cpu_per_frame(r)
                .map(|c| format!("{c:.2}"))
                .unwrap_or_default(),
            cpu_per_frame(r)
                .zip(base_cpu)
                .map(|(c, b)| format!("{:.2}×", b / c))
                .unwrap_or_default(),
            r.decode_forward_passes,
            r.passes_per_frame,
            r.ids_identical,
        );
    }
    // Each mode against the same round's static run, then the median over rounds.
    for mode in ["continuous", "continuous + drafts"] {
        let mut ratios: Vec<f64> = rows
            .iter()
            .filter(|r| r.mode == mode)
            .filter_map(|r| static_of(r.round).map(|b| r.frames_per_s / b.frames_per_s))
            .collect();
        if ratios.is_empty() {
            continue;
        }
        let listed = ratios
            .iter()
            .map(|x| format!("{x:.2}×"))
            .collect::<Vec<_>>()
            .join(", ");
        ratios.sort_by(f64::total_cmp);
        let n = ratios.len();
        let median = (ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0;
        s += &format!("\n{mode} vs static, frames/s per round: {listed}; median {median:.2}×");
    }
    s + &cost_split(rows)
}

/// Where each mode's time went, per round: decode wall seconds (wall − vision + prefill) static against
/// continuous, and the ceiling on frames/s that saving decode alone allows.
///
/// Why: continuous batching saves decode passes and nothing else, so its frames/s ratio is
/// 1 / (f + (1 − f) / d), with f the static run's vision + prefill share and d the decode saving. On a CPU at
/// 640×480 f is ~0.7 and the ratio stays near 1.2× however well the scheduler does; printing d and the
/// zero-decode ceiling 1 / f beside it tells a scheduler regression from a frame size whose vision dominates.
fn cost_split(rows: &[ContinuousRow]) -> String {
    let decode_s = |r: &ContinuousRow| r.wall_s - r.vision_prefill_s;
    let mut s = String::new();
    for st in rows.iter().filter(|r| r.mode == "static") {
        let Some(cont) = rows
            .iter()
            .find(|r| r.mode == "continuous" && r.round == st.round)
        else {
            continue;
        };
        s += &format!(
            "\nround {}: decode {:.1} s static, {:.1} s continuous ({:.2}× less); vision + prefill {:.0} % of \
             the static run, so frames/s could gain at most {:.2}× from decode alone",
            st.round,
            decode_s(st),
            decode_s(cont),
            decode_s(st) / decode_s(cont),
            100.0 * st.vision_prefill_s / st.wall_s,
            st.wall_s / st.vision_prefill_s,
        );
    }
    s + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: &'static str, wall_s: f64, vision_prefill_s: f64) -> ContinuousRow {
        ContinuousRow {
            round: 1,
            mode,
            streams: 4,
            budgets: vec![16, 32, 48, 64],
            frames: 16,
            frames_per_stream: vec![4; 4],
            wall_s,
            cpu_s: None,
            frames_per_s: 16.0 / wall_s,
            vision_prefill_s,
            decode_forward_passes: 0,
            passes_per_frame: 0.0,
            generated_tokens: 0,
            ids_identical: true,
        }
    }

    #[test]
    fn the_cost_split_names_the_decode_saving_and_the_vision_bound_ceiling() {
        // Static: 28 s of vision + prefill in 40 s (f = 0.7), 12 s decode; continuous: 6 s decode.
        let split = cost_split(&[row("static", 40.0, 28.0), row("continuous", 34.0, 28.0)]);
        assert!(
            split.contains("decode 12.0 s static, 6.0 s continuous (2.00× less)"),
            "{split}"
        );
        assert!(split.contains("70 % of the static run"), "{split}");
        assert!(split.contains("at most 1.43× from decode alone"), "{split}");
    }
}
