//! The whole detector path from an image file, as `rexstream detect` runs it: PNG → `rexprep::prepare`
//! (Pillow-exact resize, normalise, patchify) → `RexTokenizer::encode_chat` (detection prompt) →
//! `RexOmni::generate`, against what transformers 4.51.3 + Pillow 10.4 produced from the same file.
#![cfg(feature = "model")]

mod model_support;

use candle_core::{DType, Device, Tensor};
use model_support::*;
use rexomni::engine::{GenerateParams, GenerateRequest};
use rexomni::protocol::{Task, TaskPrompt};

#[test]
fn image_file_to_greedy_ids_matches_transformers() {
    let cases = cases();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-cases/cases.json")).unwrap(),
    )
    .unwrap();
    let engine = load_engine("tiny-tied", DType::F32);
    let r = reference("tiny-tied");
    let params = GenerateParams {
        max_new_tokens: 24,
        repetition_penalty: 1.05,
        top_logprobs: 0,
    };
    for (i, c) in cases.iter().enumerate() {
        let img = image::open(fixtures().join(format!("tiny-cases/case{i}.png")))
            .unwrap()
            .to_rgb8();
        let (w, h) = img.dimensions();
        assert_eq!((w, h), c.original);
        let prep = rexprep::prepare(&rexprep::Frame::rgb(w, h, img.as_raw())).unwrap();
        assert_eq!(prep.grid_thw, c.grid_thw, "case{i}");
        let n = prep.grid_thw.iter().product::<usize>();
        let pv = Tensor::from_vec(prep.pixel_values.clone(), (n, 1176), &Device::Cpu).unwrap();
        let dpv = max_abs_diff(&pv, &c.pixel_values);
        // Pillow-exact resize gives identical uint8 → identical pixel_values (spec §1.4); `c.pixel_values`
        // are the HF processor's own, stored for every case by tests/reference/gen_model_fixtures.py.
        assert_eq!(
            dpv, 0.0,
            "case{i}: rexprep pixel_values differ from the HF processor's by {dpv}"
        );
        let cats: Vec<&str> = meta["cases"][i]["categories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        let prompt = TaskPrompt::new(Task::Detection, &cats);
        let ids = engine
            .tokenizer()
            .encode_chat(&prompt, w, h, prep.num_image_tokens())
            .unwrap();
        assert_eq!(ids, c.prompt_ids, "case{i}: prompt ids");
        let out = engine
            .generate(
                &[GenerateRequest {
                    pixel_values: pv,
                    grid_thw: prep.grid_thw,
                    prompt_ids: ids,
                }],
                &params,
            )
            .unwrap();
        let want: Vec<u32> = r[&format!("case{i}.greedy_ids")]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_eq!(out[0].token_ids, want, "case{i}: greedy ids");
    }
}
