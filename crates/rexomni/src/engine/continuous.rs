//! Continuous batching: a decode batch that rows join and leave between steps.
//!
//! In: [`GenerateRequest`]s admitted at any time while there are free slots ([`ContinuousSession::admit`]:
//! vision and prefill, same-size frames in one call as in the static path), then one
//! [`ContinuousSession::step`] per decode forward pass. Out: each row's [`GenerateOutput`] as soon as it
//! finishes ([`Finished`], tagged with the [`Ticket`] `admit` gave it). Runs on the caller's thread (the
//! detector worker); the model is passed to each call (`&Qwen25Vl`, immutable), the session owns only the
//! per-row state and the cache.
//!
//! Why: a static batch decodes until its longest answer is done, so once its short answers finish the
//! remaining steps run for fewer rows, while new frames wait for the whole batch. Here a finished row frees
//! its slot at once and the next frame's row joins the very next step, so every step carries up to
//! `max_batch` rows. The cache is preallocated ([`KvSlots`]: one slot per row, each with its own length), so
//! rows of different lengths share a step without left padding or a per-step concatenation; a row's
//! columns past its own length are masked with −∞ (an exact zero weight).
//!
//! Exactness (the contract of engine.rs: each row's ids are those it gets alone): every emitted id is the
//! greedy pick (same `pick`: pre-penalty logprobs, repetition penalty over prompt + ids so far, first maximum,
//! stop ids, budget, runaway guard) from logits that depend only on the row's own prompt, image and ids — the
//! other rows only share the matmul calls. A lone row runs exactly the operations of a plain decode step
//! (no mask when no row is shorter), so its ids and logprobs are plain `generate`'s bit for bit; rows that
//! share a step meet multi-row matmul shapes and a masked softmax, which can move the last bits of a logit as
//! the static batch's padded rows do (same standing, same tolerances: tests/model_continuous.rs).
//!
//! Drafts (`drafts.rs`, [`ContinuousSession::admit_with_drafts`]): a row admitted with its stream's previous
//! answer verifies up to `draft_block` draft ids per pass. When any active row has draft ids to verify, the
//! pass is a block ([`Qwen25Vl::decode_slots_block`]): every row feeds its last id plus its proposed ids
//! (filled with its last id up to the longest), each row attends causally to its own columns only, and each
//! row then keeps its last id and the accepted ids (the slot is rolled back to them, no copy). On the CPU each
//! block row is, bit for bit, the logits a lone row's plain step gives (`TextModel::forward_slots`), so a
//! draft never changes an id; rows without a draft in such a pass just take their one step.
//! Where blocks are not exact ([`super::drafts_are_exact`]) drafts are ignored, as in the static path.

use std::collections::HashSet;
use std::time::Instant;

use crate::model::{KvSlots, ModelError, Qwen25Vl};

use super::{
    block_tokens, draft_cap, draft_from, drafts_are_exact, pick, prefill_group, same_size_groups,
    GenerateOutput, GenerateParams, GenerateRequest, GroupPrefill, Guard, Row, DEFAULT_DRAFT_BLOCK,
};

/// Identifies an admitted row until it finishes (increasing per session).
pub type Ticket = u64;

/// Columns reserved beyond a new row's prompt at admission; the cache doubles when a row outgrows it.
const FIRST_DECODE_COLUMNS: usize = 64;

/// A finished row.
#[derive(Debug)]
pub struct Finished {
    pub ticket: Ticket,
    /// The cache slot it held (free again now).
    pub slot: usize,
    pub output: GenerateOutput,
}

struct Active {
    ticket: Ticket,
    row: Row,
    /// End of its prefill: its decode time is measured from here.
    admitted_at: Instant,
}

/// Up to `max_batch` rows decoding together, joining and leaving between steps (module doc).
pub struct ContinuousSession {
    params: GenerateParams,
    max_objects: Option<usize>,
    slots: KvSlots,
    /// Per cache slot: the row in it.
    rows: Vec<Option<Active>>,
    /// Rows that finished (at admission or in a step) and were not returned yet.
    finished: Vec<Finished>,
    next_ticket: Ticket,
    forward_passes: usize,
    /// Most draft ids verified per row in one pass ([`DEFAULT_DRAFT_BLOCK`], as the worker's static batches).
    draft_block: usize,
    /// Blocks are exact for this model (drafts are used), from [`drafts_are_exact`].
    use_drafts: bool,
    vocab: usize,
}

impl ContinuousSession {
    /// An empty session for `model` with `max_batch` slots. `params.max_new_tokens` is the default budget;
    /// `max_objects` is the runaway guard (`None` = plain greedy).
    pub fn new(
        model: &Qwen25Vl,
        max_batch: usize,
        params: GenerateParams,
        max_objects: Option<usize>,
    ) -> Result<Self, ModelError> {
        let max_batch = max_batch.max(1);
        Ok(Self {
            params,
            max_objects,
            slots: model.new_kv_slots(max_batch, FIRST_DECODE_COLUMNS)?,
            rows: (0..max_batch).map(|_| None).collect(),
            finished: Vec::new(),
            next_ticket: 0,
            forward_passes: 0,
            draft_block: DEFAULT_DRAFT_BLOCK,
            use_drafts: drafts_are_exact(model),
            vocab: model.cfg.text.vocab_size,
        })
    }

    pub fn max_batch(&self) -> usize {
        self.rows.len()
    }
    /// Rows decoding now.
    pub fn active(&self) -> usize {
        self.rows.iter().filter(|r| r.is_some()).count()
    }
    /// How many requests `admit` takes now.
    pub fn free_slots(&self) -> usize {
        self.max_batch() - self.active()
    }
    /// Nothing decoding and nothing finished waiting to be returned.
    pub fn is_idle(&self) -> bool {
        self.active() == 0 && self.finished.is_empty()
    }
    /// The slot an active row holds.
    pub fn slot_of(&self, ticket: Ticket) -> Option<usize> {
        self.rows
            .iter()
            .position(|r| r.as_ref().is_some_and(|a| a.ticket == ticket))
    }
    /// Decode forward passes run so far (each carries every active row).
    pub fn forward_passes(&self) -> usize {
        self.forward_passes
    }
    /// Columns per slot of the preallocated cache (grows by doubling).
    pub fn cache_capacity(&self) -> usize {
        self.slots.capacity()
    }

    /// Vision + prefill of `requests` (same-size frames with the same prompt in one call), their first ids
    /// from the prefill logits, and their caches into free slots (lowest first). `budgets`: most new ids per
    /// request, or empty for `params.max_new_tokens` each. Fails without admitting anything when there are
    /// fewer free slots than requests, or a prompt is empty; on a model error no request is admitted either.
    /// A row that is done at once (budget 0 or 1, a stop id first) goes straight to the finished list.
    pub fn admit(
        &mut self,
        model: &Qwen25Vl,
        requests: &[GenerateRequest],
        budgets: &[usize],
    ) -> Result<Vec<Ticket>, ModelError> {
        self.admit_with_drafts(model, requests, budgets, &[])
    }

    /// As [`Self::admit`], with a draft per request (same order, or empty for none): the ids of the stream's
    /// previous answer, verified as the row decodes (module doc); ignored where blocks are not exact.
    pub fn admit_with_drafts(
        &mut self,
        model: &Qwen25Vl,
        requests: &[GenerateRequest],
        budgets: &[usize],
        drafts: &[Option<Vec<u32>>],
    ) -> Result<Vec<Ticket>, ModelError> {
        if !drafts.is_empty() && drafts.len() != requests.len() {
            return Err(ModelError::Request {
                index: 0,
                msg: format!("{} drafts for {} requests", drafts.len(), requests.len()),
            });
        }
        if requests.len() > self.free_slots() {
            return Err(ModelError::Request {
                index: 0,
                msg: format!(
                    "{} requests for {} free decode slots",
                    requests.len(),
                    self.free_slots()
                ),
            });
        }
        if !budgets.is_empty() && budgets.len() != requests.len() {
            return Err(ModelError::Request {
                index: 0,
                msg: format!("{} budgets for {} requests", budgets.len(), requests.len()),
            });
        }
        if let Some(index) = requests.iter().position(|r| r.prompt_ids.is_empty()) {
            return Err(ModelError::Request {
                index,
                msg: "empty prompt".into(),
            });
        }
        // Run every group before touching the session, so a failure admits nothing.
        let mut prepared = Vec::with_capacity(requests.len());
        for group in same_size_groups(requests, true) {
            let GroupPrefill {
                prefills,
                last_logits,
                timings,
            } = prefill_group(model, requests, &group)?;
            for ((p, last), &index) in prefills.into_iter().zip(last_logits).zip(&group) {
                let last: Vec<f32> = last.to_vec1()?;
                prepared.push((index, p, last, timings));
            }
        }
        prepared.sort_by_key(|(index, ..)| *index);
        let mut tickets = Vec::with_capacity(requests.len());
        for (index, p, last, timings) in prepared {
            let budget = budgets
                .get(index)
                .copied()
                .unwrap_or(self.params.max_new_tokens);
            let mut row = Row {
                seen: requests[index]
                    .prompt_ids
                    .iter()
                    .copied()
                    .collect::<HashSet<u32>>(),
                out: GenerateOutput::empty(timings),
                base: requests[index].prompt_ids.len() as i64 + p.rope_delta,
                live: Vec::new(),
                budget,
                done: budget == 0,
                draft: drafts
                    .get(index)
                    .filter(|_| self.use_drafts)
                    .and_then(|d| draft_from(d.as_deref(), self.vocab)),
                guard: self.max_objects.map(Guard::new),
            };
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            tickets.push(ticket);
            let admitted_at = Instant::now();
            if !row.done {
                let id = pick(&mut row, &last, &self.params);
                if let Some(d) = row.draft.as_mut() {
                    d.advance(0, id, &row.out.token_ids);
                }
            }
            let slot = self
                .rows
                .iter()
                .position(Option::is_none)
                .expect("free slots were counted above");
            if row.done {
                self.finished.push(Finished {
                    ticket,
                    slot,
                    output: row.out,
                });
                continue;
            }
            self.slots.reserve(p.cache.len() + FIRST_DECODE_COLUMNS)?;
            self.slots.insert(slot, &p.cache)?;
            self.rows[slot] = Some(Active {
                ticket,
                row,
                admitted_at,
            });
        }
        Ok(tickets)
    }

    /// One decode forward pass for every active row (each at its own length; a verification block when a row
    /// has draft ids to verify), then the rows that finished (in this pass or at admission since the last
    /// call), their slots freed. With no active row it runs no forward and only returns the finished list.
    pub fn step(&mut self, model: &Qwen25Vl) -> Result<Vec<Finished>, ModelError> {
        let slots: Vec<usize> = (0..self.rows.len())
            .filter(|&s| self.rows[s].is_some())
            .collect();
        if !slots.is_empty() {
            let cap = draft_cap(model.device(), slots.len(), self.draft_block);
            let mut tokens = Vec::with_capacity(slots.len());
            let mut positions = Vec::with_capacity(slots.len());
            let mut proposals = Vec::with_capacity(slots.len());
            for &s in &slots {
                let r = &self.rows[s].as_ref().expect("active").row;
                tokens.push(*r.out.token_ids.last().unwrap_or(&0));
                positions.push((r.base + r.out.token_ids.len() as i64 - 1).max(0) as u32);
                proposals.push(r.proposal(cap));
            }
            let l = 1 + proposals.iter().map(Vec::len).max().unwrap_or(0);
            if l == 1 {
                let logits = model
                    .decode_slots(&tokens, &positions, &slots, &mut self.slots)?
                    .to_vec2::<f32>()?;
                self.forward_passes += 1;
                for (&s, lg) in slots.iter().zip(&logits) {
                    let row = &mut self.rows[s].as_mut().expect("active").row;
                    row.out.decode_forward_passes += 1;
                    let id = pick(row, lg, &self.params);
                    if let Some(d) = row.draft.as_mut() {
                        d.advance(0, id, &row.out.token_ids);
                    }
                    self.finish_if_done(s);
                }
            } else {
                let lens: Vec<usize> = slots.iter().map(|&s| self.slots.len(s)).collect();
                let block = block_tokens(&tokens, &proposals, l);
                let logits =
                    model.decode_slots_block(&block, &positions, &slots, &mut self.slots)?;
                self.forward_passes += 1;
                for (b, (&s, prop)) in slots.iter().zip(&proposals).enumerate() {
                    let row = &mut self.rows[s].as_mut().expect("active").row;
                    let accepted = row.verify(&logits.get(b)?, prop, &self.params)?;
                    // Keep the row's last id and the accepted draft ids; the rest of the block is stale.
                    self.slots.truncate(s, lens[b] + 1 + accepted)?;
                    self.finish_if_done(s);
                }
            }
        }
        Ok(std::mem::take(&mut self.finished))
    }

    /// Move the row in slot `s` to the finished list if it is done, freeing the slot.
    fn finish_if_done(&mut self, s: usize) {
        if !self.rows[s].as_ref().is_some_and(|a| a.row.done) {
            return;
        }
        let mut a = self.rows[s].take().expect("checked above");
        self.slots.free(s);
        a.row.out.timings.decode = a.admitted_at.elapsed();
        self.finished.push(Finished {
            ticket: a.ticket,
            slot: s,
            output: a.row.out,
        });
    }

    /// Drop every row (after a model error, or at shutdown): their tickets, slots freed.
    pub fn abort(&mut self) -> Vec<Ticket> {
        let mut out: Vec<Ticket> = self.finished.drain(..).map(|f| f.ticket).collect();
        for s in 0..self.rows.len() {
            if let Some(a) = self.rows[s].take() {
                self.slots.free(s);
                out.push(a.ticket);
            }
        }
        out
    }
}
