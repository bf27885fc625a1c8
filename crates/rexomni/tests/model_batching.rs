//! Same-size batching of vision and prefill: frames of one size with one prompt run as one batch, and every
//! row still gets exactly the ids (and, to rounding, the logprobs) it gets when vision and prefill run per
//! request — in f32 and in bf16, dense and q8.
#![cfg(feature = "model")]

mod model_support;

use candle_core::DType;
use model_support::*;
use rexomni::engine::{
    generate_per_request, generate_with_budgets, GenerateParams, GenerateRequest, Weights,
};

fn request(c: &Case) -> GenerateRequest {
    GenerateRequest {
        pixel_values: c.pixel_values.clone(),
        grid_thw: c.grid_thw,
        prompt_ids: c.prompt_ids.clone(),
    }
}

#[test]
fn batched_vision_and_prefill_give_the_per_request_ids() {
    let cases = cases();
    let params = GenerateParams {
        max_new_tokens: 24,
        repetition_penalty: 1.05,
        top_logprobs: 0,
    };
    // Three frames of case 1's size with different pixels (case 1's image, flipped, and darker) plus two of
    // case 2's: groups of 3 and 2, interleaved with a single (case 0).
    let c1 = &cases[1];
    let flipped = c1.pixel_values.flip(&[0]).unwrap();
    let darker = (&c1.pixel_values * 0.5).unwrap();
    let c2 = &cases[2];
    let c2b = (&c2.pixel_values - 0.25).unwrap();
    let mut reqs = vec![request(c1), request(&cases[0]), request(c2)];
    for (pv, c) in [(flipped, c1), (c2b, c2), (darker, c1)] {
        reqs.push(GenerateRequest {
            pixel_values: pv,
            grid_thw: c.grid_thw,
            prompt_ids: c.prompt_ids.clone(),
        });
    }
    let budgets = vec![24; reqs.len()];
    for (name, dtype, weights) in [
        ("tiny-tied", DType::F32, Weights::Dense),
        ("tiny-untied", DType::F32, Weights::Dense),
        ("tiny-tied", DType::BF16, Weights::Dense),
        ("tiny-tied", DType::F32, Weights::Q8),
    ] {
        let engine = load_engine_with(name, dtype, weights);
        let batched = generate_with_budgets(engine.model(), &reqs, &params, &budgets).unwrap();
        let single = generate_per_request(engine.model(), &reqs, &params, &budgets).unwrap();
        let mut worst = 0f32;
        for (i, (b, s)) in batched.iter().zip(&single).enumerate() {
            assert_eq!(
                b.token_ids,
                s.token_ids,
                "{name} {dtype:?} {}: row {i} ids",
                weights.name()
            );
            for (x, y) in b.logprobs.iter().zip(&s.logprobs) {
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!(
            "{name} {dtype:?} {}: 6 rows (groups 3+2+1) ids identical batched vs per request; logprob max |Δ| {worst:.1e}",
            weights.name()
        );
        let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
        assert!(worst <= tol, "{name} {dtype:?}: logprob max |Δ| {worst}");
    }
}
