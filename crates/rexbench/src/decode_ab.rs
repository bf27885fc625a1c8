//! Decode steps one way and another, alternating in one process, N rounds each, per batch size of `--batches`
//! (docs/benchmarks.md): `rexbench --pool-ab N` times the model's CPU work on rayon's pool (the default,
//! rexomni's `cpu_pool`) against the calling thread, and checks that both give the same logits, bit for bit;
//! `rexbench --attention-ab N` times bf16 decode attention with `decode_attention`'s kernel against the general
//! path (the logits differ in the last bits there: another summation order); `rexbench --tasks-ab N` times every
//! kernel task as its own rayon job against rayon's adaptive pieces (after the same comparison of prefills,
//! prefill_ab.rs).
//!
//! In: a loaded model, its tokenizer, the frame size, `--output-tokens` steps per round. Out: one line per round
//! and the median of each way on stdout. Alternating in one process keeps both under the same machine load.

use std::time::Instant;

use candle_core::{DType, D};
use rexomni::model::{cpu_pool, decode_attention, Qwen25Vl};
use rexomni::protocol::{RexTokenizer, Task, TaskPrompt};
use rexprep::tensor::TensorPrep;

use crate::measure::{replicate, test_frame};

/// What an A/B run toggles: its name in the output, the two ways' names, and the switch.
pub struct Toggle {
    pub what: &'static str,
    pub ways: [&'static str; 2],
    pub set: fn(bool),
}

pub const POOL: Toggle = Toggle {
    what: "pool-ab",
    ways: ["pool", "caller"],
    set: cpu_pool::set_enabled,
};

pub const ATTENTION: Toggle = Toggle {
    what: "attention-ab",
    ways: ["kernel", "general"],
    set: decode_attention::set_enabled,
};

/// Every kernel task a rayon job of its own against rayon's adaptive pieces (rexomni's `cpu_pool`).
pub const TASKS: Toggle = Toggle {
    what: "tasks-ab",
    ways: ["jobs", "pieces"],
    set: cpu_pool::set_task_jobs,
};

pub fn run(
    toggle: &Toggle,
    model: &Qwen25Vl,
    tokenizer: &RexTokenizer,
    (w, h): (u32, u32),
    batches: &[usize],
    steps: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let rgb = test_frame(w, h);
    let prepared = TensorPrep::new(model.device()).prepare(&rexprep::Frame::rgb(w, h, &rgb))?;
    let grid = prepared.grid_thw;
    let prompt = TaskPrompt::new(Task::Detection, &["person", "car"]);
    let ids = tokenizer.encode_chat(&prompt, w, h, prepared.num_image_tokens)?;
    let embeds = model.encode_image(&prepared.pixel_values, grid)?;
    let p = model.prefill(&ids, &embeds, grid)?;
    let start = (ids.len() as i64 + p.rope_delta) as u32;
    let steps = steps.max(1);
    for &b in batches {
        let mut times = [Vec::new(), Vec::new()];
        let mut last = [None, None];
        // Round 0 warms both ways up and is not counted.
        for round in 0..=rounds {
            for (i, (on, name)) in [(true, toggle.ways[0]), (false, toggle.ways[1])]
                .into_iter()
                .enumerate()
            {
                (toggle.set)(on);
                let mut cache = replicate(&p.cache, b, model.device())?;
                let mut tokens = vec![0u32; b];
                let t = Instant::now();
                for s in 0..steps {
                    let logits =
                        model.decode_step(&tokens, &vec![start + s as u32; b], None, &mut cache)?;
                    tokens = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()?;
                    last[i] = Some(logits);
                }
                let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
                if round > 0 {
                    println!(
                        "{} batch {b} round {round} {name:<7} {ms:>8.1} ms/step",
                        toggle.what
                    );
                    times[i].push(ms);
                }
            }
        }
        (toggle.set)(true);
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, c) = (median(&mut times[0]), median(&mut times[1]));
        let same = match &last {
            [Some(x), Some(y)] => x.to_vec2::<f32>()? == y.to_vec2::<f32>()?,
            _ => false,
        };
        let [on, off] = toggle.ways;
        println!(
            "{} batch {b} median: {on} {a:.1} ms/step, {off} {c:.1} ms/step, speed-up {:.2}x, logits identical: {same}",
            toggle.what,
            c / a
        );
    }
    Ok(())
}
