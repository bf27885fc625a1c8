//! The trained tiny detector (tests/fixtures/tiny-detector, made by tests/reference/train_tiny_detector.py)
//! through the whole engine path, against transformers 4.51.3 on the same frames:
//!
//! - `f32_matches_transformers`: PNG → rexprep → `encode_chat` → `generate` (greedy, repetition penalty
//!   1.05) on every reference frame (held-out frames of four sizes and a moving-shape clip): prompt ids,
//!   greedy ids identical (including the `<|im_end|>` stop), chosen and top-5 logprobs close, the boxes our
//!   parser reads from our ids equal the boxes HF's answer parses to; and the answers really detect (IoU ≥ 0.5
//!   with the ground truth for ≥ 90 % of shapes).
//! - `batch_of_mixed_sizes_matches_singles`: all four frame sizes in one `generate` call.
//! - `bf16_greedy_agrees_with_f32`: the bf16 engine (the CUDA default) against the f32 reference: on every
//!   frame the same labels in the same order, boxes within two grid steps (8 px) and the EOS stop; identical
//!   greedy ids on at least 90 % of frames (issue 18; measured 30/32). The margins of this checkpoint are real
//!   (unlike the random tiny ones, whose greedy steps are near-ties), so this can fail: with candle's bf16 CPU
//!   RMSNorm and SiLU, bf16 attention scores and bf16-rounded logits it was 26/32.
#![cfg(feature = "model")]

mod model_support;

use candle_core::{DType, Device, Tensor};
use model_support::*;
use rexomni::engine::{GenerateOutput, GenerateParams, GenerateRequest, RexOmni};
use rexomni::protocol::{parse_ids, Detection, Geometry, Task, TaskPrompt};
use serde_json::Value;

const MODEL: &str = "tiny-detector";
/// The training shapes' edges lie on a 4 px grid.
const GRID_PX: f64 = 4.0;

struct Frame {
    name: String,
    size: (u32, u32),
    req: GenerateRequest,
    meta: Value,
}

fn manifest() -> Value {
    let p = fixtures().join(MODEL).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every reference frame as the detector sees it: PNG → rexprep::prepare → the tokenizer's chat prompt.
fn frames(engine: &RexOmni) -> Vec<Frame> {
    let m = manifest();
    let cats: Vec<&str> = m["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let prompt = TaskPrompt::new(Task::Detection, &cats);
    m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            let img = image::open(fixtures().join(MODEL).join(c["frame"].as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            let (w, h) = img.dimensions();
            let prep = rexprep::prepare(&rexprep::Frame::rgb(w, h, img.as_raw())).unwrap();
            assert_eq!(
                prep.grid_thw.to_vec(),
                u32s(&c["grid_thw"])
                    .iter()
                    .map(|&x| x as usize)
                    .collect::<Vec<_>>(),
                "{name}: grid"
            );
            let n = prep.grid_thw.iter().product::<usize>();
            let pv = Tensor::from_vec(prep.pixel_values.clone(), (n, 1176), &Device::Cpu).unwrap();
            let ids = engine
                .tokenizer()
                .encode_chat(&prompt, w, h, prep.num_image_tokens())
                .unwrap();
            assert_eq!(ids, u32s(&c["prompt_ids"]), "{name}: prompt ids");
            Frame {
                name,
                size: (w, h),
                req: GenerateRequest {
                    pixel_values: pv,
                    grid_thw: prep.grid_thw,
                    prompt_ids: ids,
                },
                meta: c.clone(),
            }
        })
        .collect()
}

fn params() -> GenerateParams {
    GenerateParams {
        max_new_tokens: manifest()["max_new_tokens"].as_u64().unwrap() as usize,
        repetition_penalty: 1.05,
        top_logprobs: 5,
    }
}

fn clone_req(r: &GenerateRequest) -> GenerateRequest {
    GenerateRequest {
        pixel_values: r.pixel_values.clone(),
        grid_thw: r.grid_thw,
        prompt_ids: r.prompt_ids.clone(),
    }
}

/// Box detections in bins, as `(label, [x0, y0, x1, y1])`, from the HF answer's parse in cases.json.
fn hf_boxes(meta: &Value, w: u32, h: u32) -> Vec<Detection> {
    let mut out = Vec::new();
    for (label, boxes) in meta["parsed_bins"].as_object().unwrap() {
        for b in boxes.as_array().unwrap() {
            let bins: Vec<u16> = b
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u16)
                .collect();
            out.push(Detection {
                label: label.clone(),
                geometry: Geometry::from_bins(&bins, w, h).unwrap(),
                score: None,
            });
        }
    }
    out
}

fn iou(a: &[f64], b: &[f64]) -> f64 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if u > 0.0 {
        inter / u
    } else {
        0.0
    }
}

fn run_all(engine: &RexOmni, frames: &[Frame]) -> Vec<GenerateOutput> {
    let p = params();
    frames
        .iter()
        .map(|f| engine.generate(&[clone_req(&f.req)], &p).unwrap().remove(0))
        .collect()
}

#[test]
fn f32_matches_transformers() {
    let engine = load_engine(MODEL, DType::F32);
    let r = reference(MODEL);
    let frames = frames(&engine);
    let outs = run_all(&engine, &frames);
    let (mut shapes, mut hits, mut worst_lp) = (0usize, 0usize, 0f32);
    for (i, (f, out)) in frames.iter().zip(&outs).enumerate() {
        let name = &f.name;
        let want = u32s(&f.meta["greedy_ids"]);
        assert_eq!(out.token_ids, want, "{name}: greedy ids");
        let want_ids: Vec<u32> = r[&format!("case{i}.greedy_ids")]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_eq!(
            want_ids, want,
            "{name}: cases.json and reference.safetensors disagree"
        );
        // The answer ends with <|im_end|> and the engine says it stopped there.
        assert_eq!(
            want.last(),
            Some(&151645),
            "{name}: HF answer ends with <|im_end|>"
        );
        assert!(out.stopped_on_eos, "{name}: stopped on EOS");
        let want_lp = r[&format!("case{i}.greedy_logprobs")]
            .to_vec1::<f32>()
            .unwrap();
        let d = out
            .logprobs
            .iter()
            .zip(&want_lp)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 2e-3, "{name}: chosen logprob max |Δ| {d}");
        worst_lp = worst_lp.max(d);
        let top_ids = r[&format!("case{i}.top5_ids")].to_vec2::<i64>().unwrap();
        let top_lp = r[&format!("case{i}.top5_logprobs")]
            .to_vec2::<f32>()
            .unwrap();
        for (s, step) in out.top_logprobs.iter().enumerate() {
            for (k, &(id, lp)) in step.iter().enumerate() {
                let want = top_lp[s][k];
                assert!(
                    (lp - want).abs() <= 2e-3,
                    "{name} step {s} top-{k}: {lp} vs {want}"
                );
                // Ids of never-trained tokens tie at logit exactly 0 (their order is the sort's); compare ids
                // only where the value is unique in the list (the 5th may tie with the unlisted 6th).
                let tied = k == 4
                    || top_lp[s]
                        .iter()
                        .enumerate()
                        .any(|(j, &v)| j != k && (v - want).abs() < 1e-3);
                if !tied {
                    assert_eq!(id as i64, top_ids[s][k], "{name} step {s}: top-{k} id");
                }
            }
        }
        // Our parser on our ids = the spec parser on HF's answer.
        let (w, h) = f.size;
        let parsed = parse_ids(
            engine.tokenizer(),
            &out.token_ids,
            None,
            Task::Detection,
            w,
            h,
        );
        assert!(!parsed.truncated, "{name}: truncated");
        let mut mine = parsed.detections.clone();
        let mut theirs = hf_boxes(&f.meta, w, h);
        mine.sort_by(|a, b| a.label.cmp(&b.label));
        theirs.sort_by(|a, b| a.label.cmp(&b.label));
        assert_eq!(mine, theirs, "{name}: parsed boxes");
        assert!(!mine.is_empty(), "{name}: no detections");
        // Against the ground truth.
        for (label, t) in f.meta["truth_bins"].as_object().unwrap() {
            let tb: Vec<u16> = t
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u16)
                .collect();
            let truth = Geometry::from_bins(&tb, w, h).unwrap();
            shapes += 1;
            hits += usize::from(
                mine.iter()
                    .any(|d| &d.label == label && iou(d.geometry.coords(), truth.coords()) >= 0.5),
            );
        }
    }
    eprintln!(
        "tiny-detector f32: {} frames, ids identical to HF on all, chosen logprob max |Δ| {worst_lp:.1e}, \
         IoU≥0.5 on {hits}/{shapes} shapes",
        frames.len()
    );
    assert!(
        hits * 10 >= shapes * 9,
        "IoU ≥ 0.5 on only {hits}/{shapes} shapes"
    );
}

#[test]
fn batch_of_mixed_sizes_matches_singles() {
    let engine = load_engine(MODEL, DType::F32);
    let frames = frames(&engine);
    // One frame of each size (held-out frames 0-3 are 112x112, 168x112, 112x168, 140x140) and a clip frame.
    let pick: Vec<usize> = ["heldout2", "clip05", "heldout0", "heldout3", "heldout1"]
        .iter()
        .map(|n| frames.iter().position(|f| f.name == *n).unwrap())
        .collect();
    let sizes: std::collections::BTreeSet<(u32, u32)> =
        pick.iter().map(|&i| frames[i].size).collect();
    assert_eq!(sizes.len(), 4, "four distinct sizes");
    let p = params();
    let reqs: Vec<GenerateRequest> = pick.iter().map(|&i| clone_req(&frames[i].req)).collect();
    let batch = engine.generate(&reqs, &p).unwrap();
    for (b, &i) in pick.iter().enumerate() {
        let single = engine
            .generate(&[clone_req(&frames[i].req)], &p)
            .unwrap()
            .remove(0);
        assert_eq!(
            batch[b].token_ids, single.token_ids,
            "row {b} ({})",
            frames[i].name
        );
        assert_eq!(
            batch[b].token_ids,
            u32s(&frames[i].meta["greedy_ids"]),
            "row {b} ({}) vs HF",
            frames[i].name
        );
        assert!(batch[b].stopped_on_eos);
        let d = batch[b]
            .logprobs
            .iter()
            .zip(&single.logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4, "row {b}: logprob max |Δ| {d}");
    }
}

#[test]
fn bf16_greedy_agrees_with_f32() {
    let engine = load_engine(MODEL, DType::BF16);
    let frames = frames(&engine);
    let outs = run_all(&engine, &frames);
    let (mut same, mut ids_same, mut ids_total, mut eos) = (0usize, 0usize, 0usize, 0usize);
    let mut worst_px = 0f64;
    for (f, out) in frames.iter().zip(&outs) {
        let want = u32s(&f.meta["greedy_ids"]);
        // Where the ids differ, they differ in a coordinate by a grid step or two: same labels in the same
        // order, same number of boxes, every coordinate within two grid steps of f32's, and the EOS stop.
        let (w, h) = f.size;
        let mine = parse_ids(
            engine.tokenizer(),
            &out.token_ids,
            None,
            Task::Detection,
            w,
            h,
        );
        let theirs = parse_ids(engine.tokenizer(), &want, None, Task::Detection, w, h);
        let labels = |p: &rexomni::protocol::ParsedOutput| -> Vec<String> {
            p.detections.iter().map(|d| d.label.clone()).collect()
        };
        assert_eq!(labels(&mine), labels(&theirs), "bf16 {}: labels", f.name);
        for (a, b) in mine.detections.iter().zip(&theirs.detections) {
            let (Geometry::Box { norm: na, .. }, Geometry::Box { norm: nb, .. }) =
                (&a.geometry, &b.geometry)
            else {
                panic!("bf16 {}: not boxes", f.name);
            };
            // In pixels of the frame (the grid is 4 px on both axes; bins per px differ by side).
            let d = na
                .iter()
                .zip(nb)
                .enumerate()
                .map(|(k, (x, y))| (x - y).abs() * f64::from(if k % 2 == 0 { w } else { h }))
                .fold(0.0, f64::max);
            worst_px = worst_px.max(d);
            assert!(
                d <= 2.0 * GRID_PX + 0.5,
                "bf16 {}: box {na:?} vs f32 {nb:?}: {d:.1} px apart",
                f.name
            );
        }
        assert!(out.stopped_on_eos, "bf16 {}: no EOS stop", f.name);
        let prefix = out
            .token_ids
            .iter()
            .zip(&want)
            .take_while(|(a, b)| a == b)
            .count();
        ids_same += prefix;
        ids_total += want.len();
        same += usize::from(out.token_ids == want);
        eos += usize::from(out.stopped_on_eos);
        if out.token_ids != want {
            eprintln!(
                "bf16 {}: differs from f32 after {prefix}/{} ids",
                f.name,
                want.len()
            );
        }
    }
    let n = frames.len();
    eprintln!(
        "bf16 vs f32 (HF) greedy ids: identical on {same}/{n} frames ({:.0}%), {ids_same}/{ids_total} ids inside \
         the agreeing prefixes, EOS on {eos}/{n}, boxes at most {worst_px:.1} px from f32's",
        100.0 * same as f64 / n as f64
    );
    // Issue 18 asks for 90 %. Measured on this checkpoint (the one-run 2800-step fixture, 2026-11-30, packed bf16
    // GEMM): 30/32 (94 %; the two misses, clip16 and clip19, each move one coordinate by one grid step).
    // transformers' own bf16 gets 30/32 with sdpa and with eager attention (tests/reference/hf_bf16_agreement.py).
    // On the previous two-stage checkpoint ours was 30/32 against HF's 26/32 (sdpa) and 27/32 (eager): our path
    // rounds less than HF's (model/numerics.rs, attention.rs, cpu_bf16::linear_forward_f32); before those fixes
    // ours was 26/32 there and this assertion failed.
    assert!(
        same * 10 >= n * 9,
        "bf16 greedy ids equal f32's on only {same}/{n} frames (want >= 90 %)"
    );
}
