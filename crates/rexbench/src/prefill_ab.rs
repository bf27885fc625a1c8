//! One frame's prefill one way and another, alternating in one process, N rounds each (docs/benchmarks.md):
//! `rexbench --prefill-ab N` with the final layer computing the last position alone (the default, text.rs
//! `Layer::forward_last_position`) and computing every position as before, with the decoder's GEMM arithmetic
//! per prefill both ways; `rexbench --tasks-ab N` (then decode steps, decode_ab.rs) with every kernel task a
//! rayon job of its own and with rayon's adaptive pieces (rexomni's `cpu_pool`).
//!
//! In: a loaded model, its tokenizer and the frame size. Out on stdout: one line per prefill, each way's
//! median, and whether both ways gave the last position the same bits (they must) and the same keys and values.

use std::time::Instant;

use rexomni::model::{text, Qwen25Vl};
use rexomni::protocol::RexTokenizer;

use crate::decode_ab::Toggle;
use crate::measure::{bench_frame, BenchFrame};

pub const LAST_POSITION: Toggle = Toggle {
    what: "prefill-ab",
    ways: ["last alone", "every row"],
    set: text::set_last_position_only,
};

pub fn run(
    toggle: &Toggle,
    model: &Qwen25Vl,
    tokenizer: &RexTokenizer,
    (w, h): (u32, u32),
    rounds: usize,
) -> anyhow::Result<()> {
    let BenchFrame {
        grid,
        ids,
        image_embeds: embeds,
        ..
    } = bench_frame(model, tokenizer, (w, h))?;
    let what = toggle.what;
    let modes = [(true, toggle.ways[0]), (false, toggle.ways[1])];
    let mut times = [Vec::new(), Vec::new()];
    let mut outputs = [None, None];
    // One warm-up prefill per mode, then `rounds` timed ones each, the order alternating per round.
    for round in 0..=rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (on, name) = modes[i];
            (toggle.set)(on);
            let t = Instant::now();
            let p = model.prefill(&ids, &embeds, grid)?;
            crate::measure::sync(&p.hidden)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if round > 0 {
                println!("{what} prefill round {round} {name:<10} {ms:>10.1} ms");
                times[i].push(ms);
            }
            outputs[i] = Some(p);
        }
    }
    (toggle.set)(true);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (on, off) = (median(&mut times[0]), median(&mut times[1]));
    if what == LAST_POSITION.what {
        let (every, last) = decoder_gflop(model, ids.len());
        println!(
            "{what} {} tokens: decoder GEMMs {every:.1} GFLOP every row, {last:.1} GFLOP last alone ({:.1} % less)",
            ids.len(),
            100.0 * (1.0 - last / every)
        );
    }
    let [a, b] = toggle.ways;
    println!(
        "{what} prefill median: {a} {on:.1} ms, {b} {off:.1} ms, speed-up {:.3}x",
        off / on
    );
    if let [Some(a), Some(b)] = &outputs {
        let bits = |t: &candle_core::Tensor| -> anyhow::Result<Vec<u32>> {
            let v = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(v.iter().map(|x| x.to_bits()).collect())
        };
        let mut same_cache = true;
        for (x, y) in a.cache.layers.iter().zip(&b.cache.layers) {
            if let (Some((kx, vx)), Some((ky, vy))) = (x, y) {
                same_cache &= bits(kx)? == bits(ky)? && bits(vx)? == bits(vy)?;
            }
        }
        println!(
            "{what} prefill last hidden state identical: {}, keys and values identical: {same_cache}",
            bits(&a.hidden)? == bits(&b.hidden)?
        );
    }
    Ok(())
}

/// The decoder's linear-layer arithmetic for one prefill of `l` tokens (2 FLOP per multiply-add), with every
/// row through the final layer and with only the keys and values of all rows there.
fn decoder_gflop(model: &Qwen25Vl, l: usize) -> (f64, f64) {
    let c = &model.cfg.text;
    let (h, hd) = (c.hidden_size, c.head_dim());
    let q_o = 2 * h * c.num_attention_heads * hd;
    let k_v = 2 * h * c.num_key_value_heads * hd;
    let mlp = 3 * h * c.intermediate_size;
    let per_row = (q_o + k_v + mlp) as f64;
    let every = 2.0 * (l * c.num_hidden_layers) as f64 * per_row;
    let saved = 2.0 * (l - 1) as f64 * (q_o + mlp) as f64;
    (every / 1e9, (every - saved) / 1e9)
}
