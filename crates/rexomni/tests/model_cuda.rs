//! The tiny checkpoints on CUDA in f32, token-exact against the transformers references (the same checks as
//! model_generate.rs runs on the CPU), plus q8/q4 agreement printed. Needs `--features cuda` and a GPU;
//! otherwise it prints why it was skipped. On a GPU host without Rust (scripts/device-check.sh): built with
//! `cargo test -p rexomni --features cuda --test model_cuda --no-run`, run as
//! `REXOMNI_FIXTURES=<copy of tests/fixtures> <binary> --nocapture`.
#![cfg(feature = "model")]

mod model_support;

#[test]
fn tiny_fixtures_on_cuda_match_transformers() {
    #[cfg(not(feature = "cuda"))]
    println!("SKIPPED tiny_fixtures_on_cuda_match_transformers: built without feature `cuda`.");
    #[cfg(feature = "cuda")]
    gpu::run();
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::model_support::*;
    use candle_core::{DType, Device};
    use rexomni::engine::{GenerateParams, GenerateRequest, LoadOptions, RexOmni, Weights};

    fn request(c: &Case) -> GenerateRequest {
        GenerateRequest {
            pixel_values: c.pixel_values.clone(),
            grid_thw: c.grid_thw,
            prompt_ids: c.prompt_ids.clone(),
        }
    }

    pub fn run() {
        let device = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                println!(
                    "SKIPPED tiny_fixtures_on_cuda_match_transformers: no usable CUDA device: {e}"
                );
                return;
            }
        };
        let cases = cases();
        let params = GenerateParams {
            max_new_tokens: 24,
            repetition_penalty: 1.05,
            top_logprobs: 0,
        };
        for name in ["tiny-tied", "tiny-untied", "tiny-awq"] {
            let r = reference(name);
            for weights in [Weights::Dense, Weights::Q8, Weights::Q4] {
                let engine = RexOmni::load(&LoadOptions {
                    source: fixtures().join(name).display().to_string(),
                    device: device.clone(),
                    dtype: DType::F32,
                    weights,
                })
                .unwrap();
                let mut exact = 0;
                let mut lp_diff = 0f32;
                for (i, c) in cases.iter().enumerate() {
                    let out = engine.generate(&[request(c)], &params).unwrap().remove(0);
                    let want: Vec<u32> = r[&format!("case{i}.greedy_ids")]
                        .to_vec1::<i64>()
                        .unwrap()
                        .iter()
                        .map(|&x| x as u32)
                        .collect();
                    let want_lp = r[&format!("case{i}.greedy_logprobs")]
                        .to_vec1::<f32>()
                        .unwrap();
                    if out.token_ids == want {
                        exact += 1;
                        for (a, b) in out.logprobs.iter().zip(&want_lp) {
                            lp_diff = lp_diff.max((a - b).abs());
                        }
                    }
                    if weights == Weights::Dense {
                        assert_eq!(out.token_ids, want, "cuda f32 {name} case{i}: greedy ids");
                    }
                }
                // Batched: all four cases in one call give what they give alone (asserted in f32 only).
                if weights == Weights::Dense {
                    let reqs: Vec<GenerateRequest> = cases.iter().map(request).collect();
                    let batch = engine.generate(&reqs, &params).unwrap();
                    for (i, b) in batch.iter().enumerate() {
                        let want: Vec<u32> = r[&format!("case{i}.greedy_ids")]
                            .to_vec1::<i64>()
                            .unwrap()
                            .iter()
                            .map(|&x| x as u32)
                            .collect();
                        assert_eq!(b.token_ids, want, "cuda f32 {name} batch row {i}");
                    }
                    assert!(
                        lp_diff <= 1e-3,
                        "cuda f32 {name}: logprob max |Δ| {lp_diff}"
                    );
                }
                println!(
                    "MODEL_CUDA {name} f32 weights={}: {exact}/{} cases token-exact, logprob max |d| {lp_diff:.1e}",
                    weights.name(),
                    cases.len()
                );
            }
        }
    }
}
