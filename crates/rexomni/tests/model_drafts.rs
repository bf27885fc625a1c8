//! Exact speculative decoding with drafts (engine.rs module doc, engine/drafts.rs) on the tiny checkpoints in
//! bf16 and f32 on the CPU (where blocks are exact and used; in f16 drafts are ignored, checked last): a draft
//! never changes an id. Checked at two levels:
//! - arithmetic: a verification block's logits rows are bit-identical to the rows plain one-token steps give,
//!   for single rows, batches with left padding, and blocks after a roll-back;
//! - behaviour: ids (and logprobs, top-K) identical to plain greedy with the same frame twice (at most 2 decode
//!   forward passes), a draft from another image, a truncated draft, shifted coordinates, random drafts
//!   (proptest), and batches mixing rows with and without drafts.
#![cfg(feature = "model")]

mod model_support;

use candle_core::{DType, Tensor};
use model_support::*;
use proptest::prelude::*;
use rexomni::engine::{DecodeOptions, GenerateOutput, GenerateParams, GenerateRequest, RexOmni};
use rexomni::protocol::ids::COORD_BASE;

const MAX_NEW: usize = 40;

fn request(c: &Case) -> GenerateRequest {
    GenerateRequest {
        pixel_values: c.pixel_values.clone(),
        grid_thw: c.grid_thw,
        prompt_ids: c.prompt_ids.clone(),
    }
}

fn params() -> GenerateParams {
    GenerateParams {
        max_new_tokens: MAX_NEW,
        repetition_penalty: 1.05,
        top_logprobs: 3,
    }
}

fn run(
    engine: &RexOmni,
    cases: &[&Case],
    drafts: Vec<Option<Vec<u32>>>,
    block: usize,
) -> Vec<GenerateOutput> {
    let reqs: Vec<GenerateRequest> = cases.iter().map(|c| request(c)).collect();
    engine
        .generate_with_options(
            &reqs,
            &params(),
            &vec![MAX_NEW; reqs.len()],
            &DecodeOptions {
                drafts,
                draft_block: block,
                max_objects: None,
                ..Default::default()
            },
        )
        .unwrap()
}

/// Ids, logprobs and top-K identical (bit for bit: they come from bit-identical logits rows).
fn assert_same(got: &GenerateOutput, want: &GenerateOutput, what: &str) {
    assert_eq!(got.token_ids, want.token_ids, "{what}: ids");
    assert_eq!(got.logprobs, want.logprobs, "{what}: logprobs");
    assert_eq!(got.top_logprobs, want.top_logprobs, "{what}: top logprobs");
    assert_eq!(got.stop, want.stop, "{what}: stop reason");
}

/// Every random checkpoint in each dtype where blocks are exact on the CPU: bf16 (gemm_bf16's packed kernel)
/// and f32 (cpu_f32's few-row kernel).
fn models() -> impl Iterator<Item = (&'static str, DType)> {
    [DType::BF16, DType::F32]
        .into_iter()
        .flat_map(|dtype| MODELS.into_iter().map(move |name| (name, dtype)))
}

fn plain(engine: &RexOmni, c: &Case) -> GenerateOutput {
    run(engine, &[c], vec![], 0).remove(0)
}

#[test]
fn block_logits_rows_equal_step_logits_rows_bit_for_bit() {
    let cases = cases();
    for (name, dtype) in models() {
        let engine = load_engine(name, dtype);
        let model = engine.model();
        for c in &cases[..2] {
            let want = plain(&engine, c);
            let emb = model.encode_image(&c.pixel_values, c.grid_thw).unwrap();
            let p = model.prefill(&c.prompt_ids, &emb, c.grid_thw).unwrap();
            let base = (c.prompt_ids.len() as i64 + p.rope_delta) as u32;
            // Plain steps: logits for ids 1..n.
            let n = 12;
            let mut cache = p.cache.clone();
            let mut step_rows = Vec::new();
            for s in 0..n {
                let l = model
                    .decode_step(&[want.token_ids[s]], &[base + s as u32], None, &mut cache)
                    .unwrap();
                step_rows.push(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            // One block of the same n ids, then a roll-back to 5 and a second block from there.
            let mut cache = p.cache.clone();
            let t = cache.len();
            let block = model
                .decode_block(
                    &want.token_ids[..n],
                    &[base],
                    Some(&causal(t, n)),
                    &mut cache,
                )
                .unwrap();
            for s in 0..n {
                let row = block
                    .get(0)
                    .unwrap()
                    .get(s)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert!(
                    row == step_rows[s],
                    "{name} {dtype:?}: block row {s} differs from step {s}"
                );
            }
            cache.truncate(t + 5).unwrap();
            let block = model
                .decode_block(
                    &want.token_ids[5..n],
                    &[base + 5],
                    Some(&causal(t + 5, n - 5)),
                    &mut cache,
                )
                .unwrap();
            for s in 5..n {
                let row = block
                    .get(0)
                    .unwrap()
                    .get(s - 5)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert!(
                    row == step_rows[s],
                    "{name} {dtype:?}: block row {s} after roll-back differs"
                );
            }
        }
    }
}

/// `[1, 1, l, t + l]`: every cached slot visible, causal within the block.
fn causal(t: usize, l: usize) -> Tensor {
    let m: Vec<f32> = (0..l)
        .flat_map(|i| {
            (0..t + l).map(move |j| {
                if j < t || j - t <= i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(m, (1, 1, l, t + l), &candle_core::Device::Cpu).unwrap()
}

#[test]
fn same_frame_twice_takes_at_most_two_passes_and_gives_the_same_ids() {
    let cases = cases();
    for (name, dtype) in models() {
        let engine = load_engine(name, dtype);
        for (i, c) in cases.iter().enumerate() {
            let first = plain(&engine, c);
            assert_eq!(first.decode_forward_passes, first.token_ids.len() - 1);
            for block in [0, 8, 64] {
                let second =
                    run(&engine, &[c], vec![Some(first.token_ids.clone())], block).remove(0);
                assert_same(
                    &second,
                    &first,
                    &format!("{name} {dtype:?} case{i} block {block}"),
                );
                let bound = if block == 8 {
                    (MAX_NEW - 1).div_ceil(9)
                } else {
                    2
                };
                assert!(
                    second.decode_forward_passes <= bound,
                    "{name} case{i} block {block}: {} passes",
                    second.decode_forward_passes
                );
                assert_eq!(
                    second.draft_accepted,
                    MAX_NEW - 1 - second.decode_forward_passes
                );
                eprintln!(
                    "{name} case{i} block {block}: {} decode passes (plain {}), {} draft ids accepted, {} rejected",
                    second.decode_forward_passes, first.decode_forward_passes, second.draft_accepted, second.draft_rejected
                );
            }
        }
    }
}

#[test]
fn other_truncated_and_shifted_drafts_give_the_same_ids() {
    let cases = cases();
    for (name, dtype) in models() {
        let engine = load_engine(name, dtype);
        let plains: Vec<GenerateOutput> = cases.iter().map(|c| plain(&engine, c)).collect();
        for (i, c) in cases.iter().enumerate() {
            let own = &plains[i].token_ids;
            let other = plains[(i + 1) % cases.len()].token_ids.clone();
            // Shifted coordinates: every coordinate id one bin on; other ids: every 5th id replaced by a bin.
            let shifted: Vec<u32> = own
                .iter()
                .enumerate()
                .map(|(k, &t)| {
                    if (COORD_BASE..COORD_BASE + 999).contains(&t) {
                        t + 1
                    } else if k % 5 == 4 {
                        COORD_BASE + k as u32
                    } else {
                        t
                    }
                })
                .collect();
            let mut with_extra = own.clone();
            with_extra.insert(7, own[3]); // an object that vanished: the draft has ids this frame does not
            let mut missing = own.clone();
            missing.drain(10..14); // an object that appeared: this frame has ids the draft does not
            for (what, d) in [
                ("other image", other),
                ("truncated", own[..own.len() / 2].to_vec()),
                ("shifted", shifted),
                ("extra ids", with_extra),
                ("missing ids", missing),
                ("empty", vec![]),
            ] {
                let out = run(&engine, &[c], vec![Some(d)], 0).remove(0);
                assert_same(
                    &out,
                    &plains[i],
                    &format!("{name} {dtype:?} case{i} {what}"),
                );
                eprintln!(
                    "{name} case{i} {what}: {} passes, {} accepted, {} rejected",
                    out.decode_forward_passes, out.draft_accepted, out.draft_rejected
                );
            }
        }
    }
}

#[test]
fn batches_mixing_rows_with_and_without_drafts_give_each_row_its_own_ids() {
    let cases = cases();
    for (name, dtype) in models() {
        let engine = load_engine(name, dtype);
        let plains: Vec<GenerateOutput> = cases.iter().map(|c| plain(&engine, c)).collect();
        let order = [2usize, 0, 3, 1];
        let refs: Vec<&Case> = order.iter().map(|&i| &cases[i]).collect();
        let mut half = plains[3].token_ids.clone();
        half.truncate(20);
        let drafts = vec![
            Some(plains[2].token_ids.clone()), // exact
            None,
            Some(half),                        // right for 20 ids, then nothing
            Some(plains[2].token_ids.clone()), // another image's
        ];
        for block in [0, 5] {
            let out = run(&engine, &refs, drafts.clone(), block);
            for (b, &i) in order.iter().enumerate() {
                // Batched rows: ids identical; logprobs as close as batching gets in bf16 (left padding and
                // hidden slots reorder the softmax sums, one bf16 ulp of a logit is ~0.4 %).
                assert_eq!(
                    out[b].token_ids, plains[i].token_ids,
                    "{name} {dtype:?} block {block} row {b} (case{i})"
                );
                let d = out[b]
                    .logprobs
                    .iter()
                    .zip(&plains[i].logprobs)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 2e-2, "{name} row {b}: logprob max |Δ| {d}");
                eprintln!(
                    "{name} block {block} row {b}: logprob max |Δ| {d:.2e}, {} passes",
                    out[b].decode_forward_passes
                );
            }
            assert!(out[0].decode_forward_passes < plains[2].decode_forward_passes);
            assert_eq!(out[1].draft_accepted, 0);
        }
    }
}

fn edit() -> impl Strategy<Value = (u8, usize, u32)> {
    (
        0u8..4,
        0usize..MAX_NEW,
        prop_oneof![0u32..151936, COORD_BASE..COORD_BASE + 1000],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random drafts: the true answer with random substitutions, insertions, deletions and a random cut, or
    /// random ids. Ids, logprobs and top-K stay those of plain greedy.
    #[test]
    fn random_drafts_never_change_an_id(
        model in 0usize..4,
        case in 0usize..4,
        edits in proptest::collection::vec(edit(), 0..6),
        cut in 0usize..=MAX_NEW,
        block in 1usize..40,
        noise in proptest::collection::vec(0u32..151936, 0..10),
    ) {
        thread_local! {
            static STATE: (Vec<RexOmni>, Vec<Case>, std::cell::RefCell<std::collections::HashMap<(usize, usize), GenerateOutput>>) =
                (models().map(|(n, dtype)| load_engine(n, dtype)).collect(), cases(), Default::default());
        }
        STATE.with(|(engines, cases, plains)| {
            let engine = &engines[model];
            let want = plains
                .borrow_mut()
                .entry((model, case))
                .or_insert_with(|| plain(engine, &cases[case]))
                .clone();
            let mut d = want.token_ids.clone();
            for (op, at, id) in edits {
                let at = at.min(d.len());
                match op {
                    0 if at < d.len() => d[at] = id,
                    1 => d.insert(at, id),
                    2 if at < d.len() => { d.remove(at); }
                    _ => d.splice(at..at, noise.iter().copied()).for_each(drop),
                }
            }
            d.truncate(cut);
            let got = run(engine, &[&cases[case]], vec![Some(d)], block).remove(0);
            assert_same(&got, &want, "random draft");
        });
    }
}

#[test]
fn drafts_are_ignored_where_a_block_would_not_be_exact() {
    // f16 on the CPU: its linear layers take candle's GEMV for a step and its GEMM for a block.
    let cases = cases();
    let engine = load_engine("tiny-tied", DType::F16);
    assert!(!rexomni::engine::drafts_are_exact(engine.model()));
    let first = plain(&engine, &cases[0]);
    let second = run(
        &engine,
        &[&cases[0]],
        vec![Some(first.token_ids.clone())],
        0,
    )
    .remove(0);
    assert_same(&second, &first, "f16");
    assert_eq!(second.decode_forward_passes, first.decode_forward_passes);
    assert_eq!(second.draft_accepted + second.draft_rejected, 0);
}
