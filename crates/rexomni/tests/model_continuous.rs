//! Continuous batching (`engine::continuous`): rows join and leave the decode batch between steps, over the
//! preallocated per-row cache, and every row's ids are the ones it gets alone with plain `generate`.
//!
//! On the trained tiny detector in f32 (real answers of 11, 23 and 35 ids, four frame sizes, so prompts of
//! different lengths share steps): rows admitted at different steps while others are mid-answer, a row
//! admitted into the slot another one just freed, budgets and the runaway guard per row, a lone row whose
//! logprobs are plain decoding's bit for bit, and drafts verified in blocks over the slots (exact, foreign,
//! truncated or none, mixed in one session).
#![cfg(feature = "model")]

mod model_support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use model_support::*;
use rexomni::engine::{
    ContinuousSession, DecodeOptions, GenerateOutput, GenerateParams, GenerateRequest, RexOmni,
    StopReason,
};
use rexomni::protocol::{Task, TaskPrompt};

const MODEL: &str = "tiny-detector";

/// The held-out reference frames (PNG → rexprep → chat prompt), as the detector sees them.
fn frames(engine: &RexOmni) -> Vec<GenerateRequest> {
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(MODEL).join("cases.json")).unwrap(),
    )
    .unwrap();
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
        .filter(|c| c["name"].as_str().unwrap().starts_with("heldout"))
        .map(|c| {
            let img = image::open(fixtures().join(MODEL).join(c["frame"].as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            let (w, h) = img.dimensions();
            let prep = rexprep::prepare(&rexprep::Frame::rgb(w, h, img.as_raw())).unwrap();
            let n = prep.grid_thw.iter().product::<usize>();
            GenerateRequest {
                pixel_values: Tensor::from_vec(prep.pixel_values.clone(), (n, 1176), &Device::Cpu)
                    .unwrap(),
                grid_thw: prep.grid_thw,
                prompt_ids: engine
                    .tokenizer()
                    .encode_chat(&prompt, w, h, prep.num_image_tokens())
                    .unwrap(),
            }
        })
        .collect()
}

fn clone_req(r: &GenerateRequest) -> GenerateRequest {
    GenerateRequest {
        pixel_values: r.pixel_values.clone(),
        grid_thw: r.grid_thw,
        prompt_ids: r.prompt_ids.clone(),
    }
}

fn params() -> GenerateParams {
    GenerateParams {
        max_new_tokens: 48,
        repetition_penalty: 1.05,
        top_logprobs: 3,
    }
}

/// Each request alone through the static path (one row, plain steps).
fn alone(
    engine: &RexOmni,
    reqs: &[GenerateRequest],
    budgets: &[usize],
    max_objects: Option<usize>,
) -> Vec<GenerateOutput> {
    reqs.iter()
        .zip(budgets)
        .map(|(r, &b)| {
            let options = DecodeOptions {
                max_objects,
                ..DecodeOptions::default()
            };
            engine
                .generate_with_options(&[clone_req(r)], &params(), &[b], &options)
                .unwrap()
                .remove(0)
        })
        .collect()
}

/// What happened to one request in a session.
struct Served {
    output: GenerateOutput,
    /// Rows already decoding when it was admitted.
    joined_busy: usize,
    slot: usize,
    /// Whether its slot had been freed by a finished row before it was admitted.
    reused_slot: bool,
}

/// Drive a session: admit `first` requests at once, then one more whenever a slot is free (each admission
/// between two steps), until all are served.
fn serve(
    engine: &RexOmni,
    session: &mut ContinuousSession,
    reqs: &[GenerateRequest],
    budgets: &[usize],
    first: usize,
) -> Vec<Served> {
    serve_with_drafts(engine, session, reqs, budgets, &[], first)
}

/// As [`serve`], request `i` admitted with draft `drafts[i]` (empty: none).
fn serve_with_drafts(
    engine: &RexOmni,
    session: &mut ContinuousSession,
    reqs: &[GenerateRequest],
    budgets: &[usize],
    drafts: &[Option<Vec<u32>>],
    first: usize,
) -> Vec<Served> {
    let mut by_ticket: HashMap<u64, (usize, usize)> = HashMap::new();
    let mut out: Vec<Option<Served>> = reqs.iter().map(|_| None).collect();
    let mut freed: Vec<usize> = Vec::new();
    let mut next = 0;
    let admit = |session: &mut ContinuousSession, i: usize| -> (u64, usize) {
        let busy = session.active();
        let draft: Vec<Option<Vec<u32>>> = drafts.get(i).cloned().into_iter().collect();
        let t = session
            .admit_with_drafts(
                engine.model(),
                &[clone_req(&reqs[i])],
                &[budgets[i]],
                &draft,
            )
            .unwrap()[0];
        (t, busy)
    };
    let mut reused: HashMap<u64, bool> = HashMap::new();
    while next < first.min(reqs.len()) {
        let (t, busy) = admit(session, next);
        by_ticket.insert(t, (next, busy));
        if let Some(s) = session.slot_of(t) {
            reused.insert(t, freed.contains(&s));
        }
        next += 1;
    }
    let mut steps = 0;
    while out.iter().any(Option::is_none) {
        for f in session.step(engine.model()).unwrap() {
            let (i, busy) = by_ticket[&f.ticket];
            freed.push(f.slot);
            out[i] = Some(Served {
                output: f.output,
                joined_busy: busy,
                slot: f.slot,
                reused_slot: reused.get(&f.ticket).copied().unwrap_or(false),
            });
        }
        steps += 1;
        assert!(steps < 10_000, "session does not finish");
        // One admission between two steps while there is room: a row joins mid-answer of the others.
        if next < reqs.len() && session.free_slots() > 0 {
            let (t, busy) = admit(session, next);
            by_ticket.insert(t, (next, busy));
            if let Some(s) = session.slot_of(t) {
                reused.insert(t, freed.contains(&s));
            }
            next += 1;
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn worst_logprob_delta(a: &GenerateOutput, b: &GenerateOutput) -> f32 {
    a.logprobs
        .iter()
        .zip(&b.logprobs)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// On the CPU a continuous step computes each row's attention over its own columns with a lone step's
/// operands and every linear layer is batch-invariant, so rows joining and leaving between steps get their lone
/// decoding's ids and logprobs bit for bit, in f32 and in bf16.
#[test]
fn rows_joining_between_steps_get_the_ids_they_get_alone() {
    for dtype in [DType::F32, DType::BF16] {
        rows_joining_between_steps(dtype);
    }
}

fn rows_joining_between_steps(dtype: DType) {
    let engine = load_engine(MODEL, dtype);
    let mut reqs = frames(&engine);
    // Twice over: 16 rows through 3 slots, so rows keep joining while others are mid-answer.
    let again: Vec<_> = reqs.iter().map(clone_req).collect();
    reqs.extend(again);
    // Budgets cut a few answers short (max_new_tokens stops) so lengths vary beyond the model's own.
    let budgets: Vec<usize> = (0..reqs.len())
        .map(|i| if i % 5 == 3 { 7 } else { 48 })
        .collect();
    let want = alone(&engine, &reqs, &budgets, None);
    let lens: std::collections::BTreeSet<usize> = want.iter().map(|o| o.token_ids.len()).collect();
    assert!(
        lens.len() >= 3,
        "answer lengths {lens:?} do not differ enough"
    );
    assert!(want.iter().any(|o| o.stopped_on_eos));

    let mut session = ContinuousSession::new(engine.model(), 3, params(), None).unwrap();
    let got = serve(&engine, &mut session, &reqs, &budgets, 2);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.output.token_ids, w.token_ids, "{dtype:?} row {i}: ids");
        assert_eq!(g.output.stop, w.stop, "{dtype:?} row {i}: stop reason");
        assert_eq!(g.output.stopped_on_eos, w.stopped_on_eos, "row {i}");
        assert_eq!(g.output.logprobs.len(), w.logprobs.len(), "row {i}");
        // One pass per id after the first (the prefill gives the first).
        assert_eq!(
            g.output.decode_forward_passes,
            w.token_ids.len().saturating_sub(1),
            "row {i}: passes"
        );
        assert_eq!(
            g.output.top_logprobs, w.top_logprobs,
            "{dtype:?} row {i}: top-K"
        );
        worst = worst.max(worst_logprob_delta(&g.output, w));
    }
    let joined = got.iter().filter(|s| s.joined_busy > 0).count();
    let reused = got.iter().filter(|s| s.reused_slot).count();
    eprintln!(
        "{} rows, answer lengths {lens:?}, {joined} joined a busy batch, {reused} reused a freed slot, {} forward \
         passes (alone: {}), cache {} columns per slot; {dtype:?}: ids identical, logprob max |Δ| {worst:.1e}",
        got.len(),
        session.forward_passes(),
        want.iter().map(|o| o.decode_forward_passes).sum::<usize>(),
        session.cache_capacity()
    );
    assert!(
        joined >= got.len() / 2,
        "only {joined} rows joined a busy batch"
    );
    assert!(reused >= 1, "no row reused a freed slot");
    assert!(got.iter().all(|s| s.slot < 3));
    // Every step carried up to 3 rows: far fewer passes than the rows' own passes summed.
    let own: usize = want.iter().map(|o| o.decode_forward_passes).sum();
    assert!(
        session.forward_passes() * 2 < own,
        "{} passes for {own} row-steps",
        session.forward_passes()
    );
    assert_eq!(worst, 0.0, "{dtype:?}: logprobs not bit-identical");
    assert!(session.is_idle());
}

#[test]
fn a_lone_row_is_plain_decoding_bit_for_bit() {
    let engine = load_engine(MODEL, DType::F32);
    let reqs = frames(&engine);
    let budgets = vec![48; reqs.len()];
    let want = alone(&engine, &reqs, &budgets, None);
    // One slot: each row decodes alone over the preallocated cache (the slot reused 7 times).
    let mut session = ContinuousSession::new(engine.model(), 1, params(), None).unwrap();
    let got = serve(&engine, &mut session, &reqs, &budgets, 1);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.output.token_ids, w.token_ids, "row {i}: ids");
        let bits = |o: &GenerateOutput| o.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&g.output),
            bits(w),
            "row {i}: logprobs not bit-identical"
        );
        assert_eq!(g.output.top_logprobs, w.top_logprobs, "row {i}: top-K");
        assert_eq!(g.slot, 0);
    }
    assert_eq!(got.iter().filter(|s| s.reused_slot).count(), reqs.len() - 1);
}

/// Drafts in a session: each row verifies its draft in blocks over its own slot. A lone row with its own
/// previous answer takes at most 2 passes and gives plain decoding's logprobs bit for bit (block rows are a
/// lone step's, `Attention::forward_slots`), in f32 and bf16.
#[test]
fn a_lone_row_with_its_previous_answer_as_draft_is_plain_decoding_bit_for_bit() {
    for dtype in [DType::F32, DType::BF16] {
        let engine = load_engine(MODEL, dtype);
        let reqs = frames(&engine);
        let budgets = vec![48; reqs.len()];
        let want = alone(&engine, &reqs, &budgets, None);
        let drafts: Vec<Option<Vec<u32>>> =
            want.iter().map(|o| Some(o.token_ids.clone())).collect();
        let mut session = ContinuousSession::new(engine.model(), 1, params(), None).unwrap();
        let got = serve_with_drafts(&engine, &mut session, &reqs, &budgets, &drafts, 1);
        let bits = |o: &GenerateOutput| o.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.output.token_ids, w.token_ids, "{dtype:?} row {i}: ids");
            assert_eq!(
                bits(&g.output),
                bits(w),
                "{dtype:?} row {i}: logprobs not bit-identical"
            );
            assert_eq!(
                g.output.top_logprobs, w.top_logprobs,
                "{dtype:?} row {i}: top-K"
            );
            assert_eq!(g.output.stop, w.stop, "{dtype:?} row {i}: stop");
            assert!(
                g.output.decode_forward_passes <= 2,
                "{dtype:?} row {i}: {} passes with an exact draft",
                g.output.decode_forward_passes
            );
            // Every id after the first is an accepted draft id or a pass's own pick (one per pass, except a
            // pass that ends on an accepted stop id); an exact draft is never rejected.
            let own_picks = (w.token_ids.len() - 1) - g.output.draft_accepted;
            let passes = g.output.decode_forward_passes;
            assert!(
                own_picks == passes || own_picks + 1 == passes,
                "{dtype:?} row {i}: {} accepted, {passes} passes for {} ids",
                g.output.draft_accepted,
                w.token_ids.len()
            );
            assert_eq!(g.output.draft_rejected, 0, "{dtype:?} row {i}");
        }
        eprintln!(
            "{dtype:?}: {} passes with drafts, {} without",
            session.forward_passes(),
            want.iter().map(|o| o.decode_forward_passes).sum::<usize>()
        );
    }
}

/// Rows with exact, foreign, truncated and no drafts joining a 3-slot session between passes (steps and
/// verification blocks mixed): every row's ids are the ones it gets alone, and the exact drafts save passes.
#[test]
fn rows_with_and_without_drafts_joining_between_passes_get_the_ids_they_get_alone() {
    let engine = load_engine(MODEL, DType::F32);
    let mut reqs = frames(&engine);
    let again: Vec<_> = reqs.iter().map(clone_req).collect();
    reqs.extend(again);
    let budgets = vec![48; reqs.len()];
    let want = alone(&engine, &reqs, &budgets, None);
    let n = reqs.len();
    let drafts: Vec<Option<Vec<u32>>> = (0..n)
        .map(|i| match i % 4 {
            0 => Some(want[i].token_ids.clone()),
            1 => Some(want[(i + 1) % n].token_ids.clone()),
            2 => Some(want[i].token_ids[..want[i].token_ids.len() / 2].to_vec()),
            _ => None,
        })
        .collect();
    let mut plain = ContinuousSession::new(engine.model(), 3, params(), None).unwrap();
    serve(&engine, &mut plain, &reqs, &budgets, 2);
    let mut session = ContinuousSession::new(engine.model(), 3, params(), None).unwrap();
    let got = serve_with_drafts(&engine, &mut session, &reqs, &budgets, &drafts, 2);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.output.token_ids,
            w.token_ids,
            "row {i} (draft kind {}): ids",
            i % 4
        );
        assert_eq!(g.output.stop, w.stop, "row {i}: stop reason");
        worst = worst.max(worst_logprob_delta(&g.output, w));
        if i % 4 == 0 {
            assert!(
                g.output.decode_forward_passes < w.decode_forward_passes.max(2),
                "row {i}: {} passes with its exact draft, {} alone",
                g.output.decode_forward_passes,
                w.decode_forward_passes
            );
        }
        if i % 4 == 3 {
            assert_eq!(
                g.output.draft_accepted + g.output.draft_rejected,
                0,
                "row {i}"
            );
        }
    }
    eprintln!(
        "{n} rows: {} session passes with drafts, {} without; logprob max |Δ| {worst:.1e}",
        session.forward_passes(),
        plain.forward_passes()
    );
    assert!(session.forward_passes() < plain.forward_passes());
    assert_eq!(worst, 0.0, "logprobs not bit-identical");
    assert!(session.is_idle());
}

#[test]
fn budgets_and_the_runaway_guard_act_per_row() {
    let engine = load_engine(MODEL, DType::F32);
    let reqs = frames(&engine);
    // The guard at one object cuts the 2- and 3-object answers; budgets 0 and 1 finish at admission.
    let budgets: Vec<usize> = (0..reqs.len())
        .map(|i| match i {
            0 => 0,
            1 => 1,
            _ => 48,
        })
        .collect();
    let want = alone(&engine, &reqs, &budgets, Some(1));
    assert!(want.iter().any(|o| o.stop == StopReason::MaxObjects));
    let mut session = ContinuousSession::new(engine.model(), 4, params(), Some(1)).unwrap();
    let got = serve(&engine, &mut session, &reqs, &budgets, 4);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.output.token_ids, w.token_ids, "row {i}: ids");
        assert_eq!(g.output.stop, w.stop, "row {i}: stop");
    }
    assert!(got[0].output.token_ids.is_empty());
    assert_eq!(got[1].output.token_ids.len(), 1);
}

#[test]
fn admit_refuses_more_rows_than_free_slots_and_empty_prompts() {
    let engine = load_engine(MODEL, DType::F32);
    let reqs = frames(&engine);
    let mut session = ContinuousSession::new(engine.model(), 2, params(), None).unwrap();
    let three: Vec<_> = reqs[..3].iter().map(clone_req).collect();
    let err = session.admit(engine.model(), &three, &[]).unwrap_err();
    assert!(
        err.to_string()
            .contains("3 requests for 2 free decode slots"),
        "{err}"
    );
    assert_eq!(session.active(), 0);
    let mut empty = clone_req(&reqs[0]);
    empty.prompt_ids.clear();
    let err = session.admit(engine.model(), &[empty], &[]).unwrap_err();
    assert!(err.to_string().contains("empty prompt"), "{err}");
    // Two same-size frames admitted together (one vision + prefill call) still decode to their own ids.
    let pair = [clone_req(&reqs[0]), clone_req(&reqs[4])];
    assert_eq!(pair[0].grid_thw, pair[1].grid_thw);
    let tickets = session.admit(engine.model(), &pair, &[]).unwrap();
    assert_eq!(session.free_slots(), 0);
    let want = alone(&engine, &pair, &[48, 48], None);
    let mut got: HashMap<u64, GenerateOutput> = HashMap::new();
    while got.len() < 2 {
        for f in session.step(engine.model()).unwrap() {
            got.insert(f.ticket, f.output);
        }
    }
    for (t, w) in tickets.iter().zip(&want) {
        assert_eq!(got[t].token_ids, w.token_ids);
    }
}
