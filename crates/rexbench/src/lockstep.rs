//! `--lockstep`: the stage measurements one at a time, on command, so another process can take turns with us.
//!
//! Why: side by side with transformers on a shared 2-core VM, the machine's speed changes within minutes (the
//! same vision pass took 3.0 s and then 5.1 s in one hour), so two whole runs one after the other compare two
//! different machines. `tests/reference/side_by_side.py` loads transformers in its own process, starts us with
//! `--lockstep`, and alternates stage by stage — ours, theirs, theirs, ours, … — so both sides of every ratio
//! are measured seconds apart.
//!
//! In: commands on stdin, one per line: `vision`, `prefill`, `decode <batch> <steps>`, `quit` (or end of
//! input). Out: one JSON object per line on stdout — `{"ready":true,...}` once the frame is prepared and the
//! first prefill (whose cache the decode commands start from) is done, then one `{"stage":...,"ms":...}` per
//! command; an unknown command answers `{"error":...}` and the loop goes on. Logs go to stderr.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::Context;
use rexomni::model::Qwen25Vl;
use rexomni::protocol::RexTokenizer;
use serde_json::json;

use crate::measure::{bench_frame, decode_steps, last_argmax, replicate, sync, BenchFrame};

pub fn serve(model: &Qwen25Vl, tokenizer: &RexTokenizer, (w, h): (u32, u32)) -> anyhow::Result<()> {
    let BenchFrame {
        pixel_values,
        grid,
        ids,
        image_embeds,
    } = bench_frame(model, tokenizer, (w, h))?;
    // Decode commands start from this prefill's cache (replicated per batch row), as `measure` does.
    let prefilled = model.prefill(&ids, &image_embeds, grid)?;
    let first = last_argmax(model, &prefilled.hidden)?;
    let start_pos = (ids.len() as i64 + prefilled.rope_delta) as u32;

    let mut out = std::io::stdout().lock();
    let mut say = |v: serde_json::Value| -> anyhow::Result<()> {
        writeln!(out, "{v}")?;
        out.flush()?;
        Ok(())
    };
    say(json!({"ready": true, "image_size": [w, h], "prompt_tokens": ids.len()}))?;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading a lockstep command from stdin")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let t = Instant::now();
        match words.as_slice() {
            ["vision"] => {
                sync(&model.encode_image(&pixel_values, grid)?)?;
                say(json!({"stage": "vision", "ms": ms(t)}))?;
            }
            ["prefill"] => {
                // Up to the first token's logits, as side_by_side.py times transformers' prefill.
                last_argmax(model, &model.prefill(&ids, &image_embeds, grid)?.hidden)?;
                say(json!({"stage": "prefill", "ms": ms(t)}))?;
            }
            ["decode", batch, steps] => match (batch.parse::<usize>(), steps.parse::<usize>()) {
                (Ok(b), Ok(steps)) if b > 0 && steps > 0 => {
                    let mut cache = replicate(&prefilled.cache, b, model.device())?;
                    let t = Instant::now();
                    decode_steps(model, &mut cache, vec![first; b], start_pos, steps)?;
                    say(json!({"stage": "decode", "batch": b, "steps": steps,
                               "ms_per_step": ms(t) / steps as f64}))?;
                }
                _ => say(
                    json!({"error": format!("`{line}`: want `decode <batch ≥ 1> <steps ≥ 1>`")}),
                )?,
            },
            ["quit"] => break,
            _ => say(json!({"error": format!(
                "`{line}` is not a command: vision, prefill, decode <batch> <steps> or quit"
            )}))?,
        }
    }
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
