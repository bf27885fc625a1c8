//! Vision tower and prefill against the transformers 4.51.3 float32 references (tests/reference/
//! gen_model_fixtures.py): vision embeddings max |Δ| ≤ 1e-4, M-RoPE positions and rope delta exact,
//! prefill logits max |Δ| ≤ 1e-3, for the tied and untied tiny checkpoints and four image sizes.
#![cfg(feature = "model")]

mod model_support;

use candle_core::{DType, Device, IndexOp, Tensor};
use model_support::*;
use rexomni::model::loading::load_dir;

#[test]
fn vision_and_prefill_match_transformers_f32() {
    let cases = cases();
    for name in MODELS {
        let model = load_dir(&fixtures().join(name), &Device::Cpu, DType::F32).unwrap();
        let r = reference(name);
        let cols = &r["logit_cols"].to_dtype(DType::U32).unwrap();
        let allcols = &r["allpos_cols"].to_dtype(DType::U32).unwrap();
        for (i, c) in cases.iter().enumerate() {
            let emb = model.encode_image(&c.pixel_values, c.grid_thw).unwrap();
            let dv = max_abs_diff(&emb, &r[&format!("case{i}.vision_embeds")]);
            assert!(dv <= 1e-4, "{name} case{i}: vision embeds max |Δ| {dv}");

            let p = model
                .prefill_every_position(&c.prompt_ids, &emb, c.grid_thw)
                .unwrap();
            let want_pos = r[&format!("case{i}.position_ids")]
                .to_vec2::<i64>()
                .unwrap();
            for (j, pos) in p.positions.iter().enumerate() {
                for k in 0..3 {
                    assert_eq!(
                        pos[k] as i64, want_pos[k][j],
                        "{name} case{i}: position {j} component {k}"
                    );
                }
            }
            assert_eq!(
                p.rope_delta,
                r[&format!("case{i}.rope_delta")].to_vec1::<i64>().unwrap()[0]
            );

            let logits = model.logits(&p.hidden).unwrap().squeeze(0).unwrap(); // [L, V]
            let l = logits.dim(0).unwrap();
            let last = logits.i(l - 1).unwrap();
            let dl = max_abs_diff(
                &last.index_select(cols, 0).unwrap(),
                &r[&format!("case{i}.last_logits_cols")],
            );
            let da = max_abs_diff(
                &logits.index_select(allcols, 1).unwrap(),
                &r[&format!("case{i}.allpos_logits_cols")],
            );
            if i == 0 {
                let df = max_abs_diff(&last, &r["case0.last_logits"]);
                assert!(df <= 1e-3, "{name} case{i}: full last logits max |Δ| {df}");
            }
            eprintln!("{name} case{i}: grid {:?} vision {dv:.2e} last logits {dl:.2e} all-position logits {da:.2e}", c.grid_thw);
            assert!(dl <= 1e-3, "{name} case{i}: last logits max |Δ| {dl}");
            assert!(
                da <= 1e-3,
                "{name} case{i}: all-position logits max |Δ| {da}"
            );
        }
    }
}

#[test]
fn full_attention_chunking_is_exact() {
    // The chunked path (many query chunks) must give the same result as one chunk.
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev).unwrap();
    let one = rexomni::model::attention::attend(&q, &k, &v, usize::MAX, |_, _| Ok(None)).unwrap();
    let many = rexomni::model::attention::attend(&q, &k, &v, 2 * 37 * 5, |_, _| Ok(None)).unwrap();
    assert_eq!(max_abs_diff(&one, &many), 0.0);
}

/// A prefill keeps the last position only, and where its final layer can it computes that position alone
/// (text.rs, `Layer::forward_last_position`): the last hidden row and every layer's keys and values must be
/// the bits of the full prefill, in bf16 dense and q8 (where the shortcut runs) and in f32 (where it does not).
#[test]
fn the_last_position_prefill_is_the_full_prefills_last_row_bit_for_bit() {
    use rexomni::model::loading::load_dir_with;
    use rexomni::model::Weights;
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let cases = cases();
    for (name, dtype, weights) in [
        ("tiny-tied", DType::BF16, Weights::Dense),
        ("tiny-untied", DType::BF16, Weights::Dense),
        ("tiny-tied", DType::BF16, Weights::Q8),
        ("tiny-untied", DType::F32, Weights::Dense),
    ] {
        let model = load_dir_with(&fixtures().join(name), &Device::Cpu, dtype, weights).unwrap();
        for (i, c) in cases.iter().enumerate() {
            let emb = model.encode_image(&c.pixel_values, c.grid_thw).unwrap();
            let last = model.prefill(&c.prompt_ids, &emb, c.grid_thw).unwrap();
            let every = model
                .prefill_every_position(&c.prompt_ids, &emb, c.grid_thw)
                .unwrap();
            let l = c.prompt_ids.len();
            let what = format!("{name} {dtype:?} {weights:?} case{i}");
            assert_eq!(last.hidden.dims(), &[1, 1, every.hidden.dim(2).unwrap()]);
            assert_eq!(every.hidden.dim(1).unwrap(), l, "{what}");
            assert_eq!(
                bits(&last.hidden),
                bits(&every.hidden.narrow(1, l - 1, 1).unwrap()),
                "{what}: last hidden row"
            );
            for (j, (a, b)) in last
                .cache
                .layers
                .iter()
                .zip(&every.cache.layers)
                .enumerate()
            {
                let ((ka, va), (kb, vb)) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                assert_eq!(bits(ka), bits(kb), "{what}: layer {j} keys");
                assert_eq!(bits(va), bits(vb), "{what}: layer {j} values");
            }
        }
    }
}
