//! Generation against transformers 4.51.3 `generate(do_sample=False, repetition_penalty=1.05)` on the tiny
//! checkpoints: 24 greedy ids identical, pre-penalty logprobs and top-5 within 1e-3; a batch of all four image
//! sizes gives every row exactly the ids it gets alone.
#![cfg(feature = "model")]

mod model_support;

use candle_core::DType;
use model_support::*;
use rexomni::engine::{GenerateParams, GenerateRequest};

fn request(c: &Case) -> GenerateRequest {
    GenerateRequest {
        pixel_values: c.pixel_values.clone(),
        grid_thw: c.grid_thw,
        prompt_ids: c.prompt_ids.clone(),
    }
}

#[test]
fn greedy_ids_match_transformers_and_batch_matches_singles() {
    let cases = cases();
    let params = GenerateParams {
        max_new_tokens: 24,
        repetition_penalty: 1.05,
        top_logprobs: 5,
    };
    for name in MODELS {
        let engine = load_engine(name, DType::F32);
        let r = reference(name);
        let mut singles = Vec::new();
        for (i, c) in cases.iter().enumerate() {
            let out = engine.generate(&[request(c)], &params).unwrap().remove(0);
            let want: Vec<u32> = r[&format!("case{i}.greedy_ids")]
                .to_vec1::<i64>()
                .unwrap()
                .iter()
                .map(|&x| x as u32)
                .collect();
            assert_eq!(out.token_ids, want, "{name} case{i}: greedy ids");
            assert!(!out.stopped_on_eos);
            let want_lp = r[&format!("case{i}.greedy_logprobs")]
                .to_vec1::<f32>()
                .unwrap();
            let d = out
                .logprobs
                .iter()
                .zip(&want_lp)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-3, "{name} case{i}: logprob max |Δ| {d}");
            let top_ids = r[&format!("case{i}.top5_ids")].to_vec2::<i64>().unwrap();
            let top_lp = r[&format!("case{i}.top5_logprobs")]
                .to_vec2::<f32>()
                .unwrap();
            for (s, step) in out.top_logprobs.iter().enumerate() {
                assert_eq!(step.len(), 5);
                for (k, &(id, lp)) in step.iter().enumerate() {
                    assert_eq!(
                        id as i64, top_ids[s][k],
                        "{name} case{i} step {s}: top-{k} id"
                    );
                    assert!(
                        (lp - top_lp[s][k]).abs() <= 1e-3,
                        "{name} case{i} step {s}: top-{k} logprob {lp} vs {}",
                        top_lp[s][k]
                    );
                }
            }
            eprintln!(
                "{name} case{i}: ids ok, logprob max |Δ| {d:.2e}, timings {:?}",
                out.timings
            );
            singles.push(out);
        }
        // All four sizes in one call, in a shuffled order.
        let order = [2usize, 0, 3, 1];
        let reqs: Vec<GenerateRequest> = order.iter().map(|&i| request(&cases[i])).collect();
        let batch = engine.generate(&reqs, &params).unwrap();
        for (b, &i) in order.iter().enumerate() {
            assert_eq!(
                batch[b].token_ids, singles[i].token_ids,
                "{name}: batch row {b} (case{i}) ids"
            );
            let d = batch[b]
                .logprobs
                .iter()
                .zip(&singles[i].logprobs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                d <= 1e-4,
                "{name}: batch row {b} (case{i}) logprob max |Δ| {d}"
            );
        }
        // max_new_tokens is honoured, and rows that stop early leave the batch without disturbing the others.
        let short = GenerateParams {
            max_new_tokens: 3,
            ..params.clone()
        };
        let out = engine
            .generate(&[request(&cases[0]), request(&cases[1])], &short)
            .unwrap();
        assert_eq!(out[0].token_ids, singles[0].token_ids[..3]);
        assert_eq!(out[1].token_ids, singles[1].token_ids[..3]);
        // Rows leaving the batch at different steps (budgets 3, 24, 0, 10): the others are not disturbed.
        let reqs: Vec<GenerateRequest> = cases.iter().map(request).collect();
        let budgets = [3usize, 24, 0, 10];
        let out = engine
            .generate_with_budgets(&reqs, &params, &budgets)
            .unwrap();
        for (i, b) in budgets.iter().enumerate() {
            assert_eq!(
                out[i].token_ids,
                singles[i].token_ids[..*b],
                "{name}: budget {b} row {i}"
            );
        }
    }
}

#[test]
fn bad_requests_are_reported_with_their_index() {
    let engine = load_engine("tiny-tied", DType::F32);
    let cases = cases();
    let mut bad = request(&cases[1]);
    bad.prompt_ids.retain(|&t| t != 151655); // no image pads for the image's embeddings
    let err = engine
        .generate(&[request(&cases[0]), bad], &GenerateParams::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("request 1") && err.contains("<|image_pad|>"),
        "{err}"
    );
}
