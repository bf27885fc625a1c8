//! Drafts on the trained tiny detector's moving-shape clip (tests/fixtures/tiny-detector/frames/clip*.png, a
//! blue disc moving across the frame), bf16 on the CPU as the detector worker would serve one stream: each
//! frame's previous answer is its draft. Ids, logprobs and stop identical to plain greedy on every frame; the
//! acceptance and decode passes are printed (run with `--nocapture`), and the same frame served twice takes
//! one decode pass.
#![cfg(feature = "model")]

mod model_support;

use candle_core::{DType, Device, Tensor};
use model_support::*;
use rexomni::engine::{DecodeOptions, GenerateParams, GenerateRequest};
use rexomni::protocol::{Task, TaskPrompt};

#[test]
fn clip_frames_with_the_previous_answer_as_draft_give_plain_greedy_ids() {
    let dir = fixtures().join("tiny-detector");
    let engine = load_engine("tiny-detector", DType::BF16);
    let prompt = TaskPrompt::new(
        Task::Detection,
        &["red square", "blue disc", "green triangle"],
    );
    let params = GenerateParams {
        max_new_tokens: 64,
        repetition_penalty: 1.05,
        top_logprobs: 0,
    };
    let mut names: Vec<_> = std::fs::read_dir(dir.join("frames"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("clip"))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    let (mut prev, mut plain_passes, mut draft_passes, mut acc, mut prop) = (None, 0, 0, 0, 0);
    for name in &names {
        let img = image::open(dir.join("frames").join(name))
            .unwrap()
            .to_rgb8();
        let (w, h) = img.dimensions();
        let prep = rexprep::prepare(&rexprep::Frame::rgb(w, h, img.as_raw())).unwrap();
        let n = prep.grid_thw.iter().product::<usize>();
        let req = GenerateRequest {
            pixel_values: Tensor::from_vec(prep.pixel_values.clone(), (n, 1176), &Device::Cpu)
                .unwrap(),
            grid_thw: prep.grid_thw,
            prompt_ids: engine
                .tokenizer()
                .encode_chat(&prompt, w, h, prep.num_image_tokens())
                .unwrap(),
        };
        let run = |draft: Option<Vec<u32>>| {
            engine
                .generate_with_options(
                    std::slice::from_ref(&req),
                    &params,
                    &[params.max_new_tokens],
                    &DecodeOptions {
                        drafts: vec![draft],
                        draft_block: 0,
                        max_objects: None,
                        ..Default::default()
                    },
                )
                .unwrap()
                .remove(0)
        };
        let plain = run(None);
        let drafted = run(prev.clone());
        assert_eq!(drafted.token_ids, plain.token_ids, "{name}: ids");
        assert_eq!(drafted.logprobs, plain.logprobs, "{name}: logprobs");
        assert_eq!(drafted.stop, plain.stop, "{name}: stop");
        let again = run(Some(plain.token_ids.clone()));
        assert_eq!(again.token_ids, plain.token_ids, "{name}: same frame twice");
        assert!(
            again.decode_forward_passes <= 1,
            "{name}: {} passes",
            again.decode_forward_passes
        );
        eprintln!(
            "{name}: {} ids, plain {} passes, drafted {} passes ({} accepted, {} rejected)",
            plain.token_ids.len(),
            plain.decode_forward_passes,
            drafted.decode_forward_passes,
            drafted.draft_accepted,
            drafted.draft_rejected
        );
        plain_passes += plain.decode_forward_passes;
        draft_passes += drafted.decode_forward_passes;
        acc += drafted.draft_accepted;
        prop += drafted.draft_accepted + drafted.draft_rejected;
        prev = Some(plain.token_ids);
    }
    eprintln!(
        "clip: {} frames, decode passes plain {plain_passes}, with drafts {draft_passes}; acceptance {acc}/{prop}",
        names.len()
    );
    assert!(draft_passes < plain_passes);
}
