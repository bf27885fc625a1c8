//! The detector engine: load a Rex-Omni checkpoint once, then turn batches of (pixel_values, prompt ids) into
//! generated ids with per-token log-probabilities.
//!
//! In: [`GenerateRequest`]s (one image each, any sizes) + [`GenerateParams`]. Out: one [`GenerateOutput`] per
//! request. Decoding is greedy with HF's repetition penalty over prompt + generated ids, stopping on
//! `<|im_end|>` / `<|endoftext|>` (rex-omni-spec.md §5.5). Runs on the caller's thread (the detector worker);
//! the model is immutable, so `generate` takes `&self`.
//!
//! Batching: requests with the same image grid and the same prompt ids (frames of one size asking the same
//! question) run vision and prefill together, one weight pass for all of them (`same_size_groups`); others
//! run alone (prompt lengths differ by hundreds of image tokens). The caches are then left-padded to a
//! common length and all active rows decode together, padded key slots masked with −∞ (an exact zero
//! weight), finished rows dropped from the batch. Each row's ids are those it gets alone (tested in
//! tests/model_generate.rs and tests/model_batching.rs).
//! That is the static batch: it runs until its longest answer is done. [`ContinuousSession`] (`continuous.rs`)
//! instead lets rows join and leave between steps over a preallocated per-row cache (`model::KvSlots`).
//!
//! Drafts (exact speculative decoding, [`DecodeOptions::drafts`]): a row may carry the ids of the stream's
//! previous answer. Each decode pass then feeds the row's last token plus up to `draft_block` draft ids in one
//! forward over the cache ([`Qwen25Vl::decode_block`]: causal within the block, M-RoPE position `base + step`
//! per token) and walks the block's logits rows in order: at row `i` the greedy pick is made exactly as a
//! plain step makes it (`pick`: pre-penalty logprobs, penalty over prompt + every id emitted before, the
//! accepted draft ids included, first maximum); while the pick equals the next draft id it is accepted, the
//! first pick that differs is emitted as the model's own token and the rest of the block is discarded: its
//! cache slots are cut off (one row) or hidden by the mask (a batch; `live` below). The draft then re-aligns
//! (`drafts.rs`). Stop ids, budgets and the runaway guard act on every emitted id exactly as in plain decoding.
//!
//! Why the ids cannot change (the contract: identical to plain greedy decoding): each emitted id is the pick
//! from a logits row that depends only on the ids before it, and the ids before it are, by induction, the
//! ones plain decoding emitted. What remains is arithmetic: a block row is computed by other matmul shapes
//! than a one-token step (M = block length instead of 1), and a different summation order could move the
//! last bits of a logit and flip a near tie. The block path is therefore built so every row meets the same
//! per-row arithmetic as a step: on the CPU in bf16 the linear layers run gemm_bf16's packed kernel (each
//! output one sequential chain over the input feature pairs, whatever the number of rows; the block is still
//! kept within cpu_bf16's `MAX_ROWS`, the bound of the previous row kernel), in f32 cpu_f32's few-row kernel
//! (each output's sum ordered by the input features only, up to its `MAX_ROWS`, also 64), RMSNorm, RoPE and
//! the embedding are per row, and on the CPU the
//! attention of block position `i` is computed with exactly the operands of the step that would produce it
//! (keys cut to `T + i + 1` slots; text.rs says why the softmax needs that). tests/model_drafts.rs checks
//! the result directly — block logits rows against step logits rows, bit for bit, also after a roll-back —
//! and checks ids, logprobs and top-K on many random drafts. On CUDA the block's attention is one call
//! and cuBLAS may pick another kernel for another row count, so a row can differ from a step in the last
//! bits, as today's batched decode rows already differ from single rows; exactness there rests on
//! near-ties being rare, the same standing as batching (checked with the same tolerances). On the CPU in
//! f16 no block is exact (a step's one-row linear layers take candle's GEMV, a block's its GEMM, summing in
//! another order), so there drafts are ignored ([`drafts_are_exact`]): use bf16 or f32 on the CPU to get them.
//!
//! Runaway guard ([`DecodeOptions::max_objects`], `guard.rs`): a row also stops when it repeats a shape for
//! the same phrase or exceeds `max_objects` shapes; its answer is cut before the offending shape. `None`
//! turns it off (plain greedy, for parity checks).

mod continuous;
mod drafts;
mod guard;

pub use continuous::{ContinuousSession, Finished, Ticket};
pub use drafts::Draft;
pub use guard::{Guard, StopReason};

use std::collections::HashSet;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

pub use crate::model::ModelError;
pub use crate::model::Weights;
use crate::model::{KvCache, Prefill, Qwen25Vl};
use crate::protocol::RexTokenizer;

/// `<|im_end|>` and `<|endoftext|>` (spec §5.5).
pub const STOP_IDS: [u32; 2] = [151645, 151643];

pub struct LoadOptions {
    /// Hub id (e.g. "IDEA-Research/Rex-Omni") or a local checkpoint folder.
    pub source: String,
    pub device: Device,
    pub dtype: DType,
    /// Linear weights dense in `dtype`, or quantized at load time (`[model] weights`).
    pub weights: Weights,
}

pub struct GenerateRequest {
    /// `[N, 1176]` f32, rows in merge-group order (rexprep::Prepared::pixel_values).
    pub pixel_values: Tensor,
    pub grid_thw: [usize; 3],
    /// Full chat-templated prompt with `N/4` `<|image_pad|>` ids (RexTokenizer::encode_chat).
    pub prompt_ids: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    /// HF `RepetitionPenaltyLogitsProcessor`; Rex-Omni uses 1.05. 1.0 disables it.
    pub repetition_penalty: f32,
    /// How many (id, logprob) of the pre-penalty distribution to keep per step; 0 = none.
    pub top_logprobs: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 4096,
            repetition_penalty: 1.05,
            top_logprobs: 0,
        }
    }
}

/// Per-call decoding options beyond [`GenerateParams`]: drafts and the runaway guard.
#[derive(Debug, Clone, Default)]
pub struct DecodeOptions {
    /// Per request (same order, or empty for none): the previous answer's ids to verify as a draft.
    pub drafts: Vec<Option<Vec<u32>>>,
    /// Most draft ids verified in one forward pass (0 = [`DEFAULT_DRAFT_BLOCK`]).
    pub draft_block: usize,
    /// Runaway guard: stop a row after more than this many shapes or a repeated shape; `None` = off.
    pub max_objects: Option<usize>,
    /// Run vision and prefill one request at a time instead of batching same-size requests (the baseline
    /// [`generate_per_request`] measures against; the ids are the same either way).
    pub per_request_prefill: bool,
}

/// Draft ids per verification pass: a 70-id answer is verified in 3 passes. On a GPU (memory-bound decode) a
/// longer block is almost free; on a CPU each block row costs compute, so a bad draft wastes at most this much.
pub const DEFAULT_DRAFT_BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimings {
    pub vision: Duration,
    pub prefill: Duration,
    /// Wall time of the decode steps while this row was in the batch.
    pub decode: Duration,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// Generated ids, including the stop id when one was produced.
    pub token_ids: Vec<u32>,
    /// `log_softmax` of the raw (pre-penalty) logits at each chosen id.
    pub logprobs: Vec<f32>,
    /// Top-K (id, logprob) of the pre-penalty distribution per step (empty when `top_logprobs` = 0).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub stopped_on_eos: bool,
    /// Why decoding stopped (`Eos` iff `stopped_on_eos`).
    pub stop: StopReason,
    pub timings: StageTimings,
    /// Decode forward passes this row took part in (a plain step or a draft verification pass; the first id
    /// comes from the prefill and is not counted).
    pub decode_forward_passes: usize,
    /// Draft ids accepted (emitted without a forward pass of their own).
    pub draft_accepted: usize,
    /// Draft ids proposed but not accepted.
    pub draft_rejected: usize,
}

impl GenerateOutput {
    /// A row's output before its first decode step: no ids yet, the prefill's `timings`.
    pub(crate) fn empty(timings: StageTimings) -> Self {
        Self {
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            stopped_on_eos: false,
            stop: StopReason::MaxNewTokens,
            timings,
            decode_forward_passes: 0,
            draft_accepted: 0,
            draft_rejected: 0,
        }
    }
}

pub struct RexOmni {
    model: Qwen25Vl,
    tokenizer: RexTokenizer,
    model_id: String,
}

impl RexOmni {
    pub fn load(opts: &LoadOptions) -> Result<Self, ModelError> {
        let dir = crate::hub::resolve(&opts.source)?;
        let tokenizer =
            RexTokenizer::from_dir(&dir).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let model =
            crate::model::loading::load_dir_with(&dir, &opts.device, opts.dtype, opts.weights)?;
        Ok(Self {
            model,
            tokenizer,
            model_id: opts.source.clone(),
        })
    }

    /// Wrap an already-built network (benchmarks with random weights, tests).
    pub fn from_parts(model: Qwen25Vl, tokenizer: RexTokenizer, model_id: String) -> Self {
        Self {
            model,
            tokenizer,
            model_id,
        }
    }

    pub fn tokenizer(&self) -> &RexTokenizer {
        &self.tokenizer
    }
    pub fn device(&self) -> &Device {
        self.model.device()
    }
    pub fn model_id(&self) -> &str {
        &self.model_id
    }
    pub fn model(&self) -> &Qwen25Vl {
        &self.model
    }

    /// One batch; each row's output identical to running it alone.
    pub fn generate(
        &self,
        requests: &[GenerateRequest],
        params: &GenerateParams,
    ) -> Result<Vec<GenerateOutput>, ModelError> {
        generate(&self.model, requests, params)
    }

    /// As [`RexOmni::generate`] with a token budget per request (see [`generate_with_budgets`]).
    pub fn generate_with_budgets(
        &self,
        requests: &[GenerateRequest],
        params: &GenerateParams,
        budgets: &[usize],
    ) -> Result<Vec<GenerateOutput>, ModelError> {
        generate_with_budgets(&self.model, requests, params, budgets)
    }

    /// A continuous-batching session over this engine's model (`continuous.rs`); pass [`RexOmni::model`] to
    /// its `admit` and `step`.
    pub fn continuous(
        &self,
        max_batch: usize,
        params: GenerateParams,
        max_objects: Option<usize>,
    ) -> Result<ContinuousSession, ModelError> {
        ContinuousSession::new(&self.model, max_batch, params, max_objects)
    }

    /// As [`RexOmni::generate_with_budgets`] with drafts and the runaway guard (see [`DecodeOptions`]).
    pub fn generate_with_options(
        &self,
        requests: &[GenerateRequest],
        params: &GenerateParams,
        budgets: &[usize],
        options: &DecodeOptions,
    ) -> Result<Vec<GenerateOutput>, ModelError> {
        generate_with_options(&self.model, requests, params, budgets, options)
    }
}

/// Per-row decoding state.
struct Row {
    seen: HashSet<u32>,
    out: GenerateOutput,
    /// Prompt length + rope delta: the token fed at step `s` sits at position `base + s`.
    base: i64,
    /// Which slots of the shared cache this row attends to (false: left padding, or draft ids it rejected
    /// while other rows of the batch kept theirs).
    live: Vec<bool>,
    /// Most tokens this row may generate.
    budget: usize,
    done: bool,
    draft: Option<Draft>,
    guard: Option<Guard>,
}

/// Greedy generation for a batch (see the module doc for the batching scheme).
pub fn generate(
    model: &Qwen25Vl,
    requests: &[GenerateRequest],
    params: &GenerateParams,
) -> Result<Vec<GenerateOutput>, ModelError> {
    generate_with_budgets(
        model,
        requests,
        params,
        &vec![params.max_new_tokens; requests.len()],
    )
}

/// As [`generate`], with a token budget per request (`params.max_new_tokens` is ignored): rows that run out
/// or stop early leave the decode batch while the others go on.
pub fn generate_with_budgets(
    model: &Qwen25Vl,
    requests: &[GenerateRequest],
    params: &GenerateParams,
    budgets: &[usize],
) -> Result<Vec<GenerateOutput>, ModelError> {
    generate_with_options(model, requests, params, budgets, &DecodeOptions::default())
}

/// As [`generate_with_budgets`] with vision and prefill run one request at a time (no same-size batching):
/// the baseline the batching test and benchmark compare against.
pub fn generate_per_request(
    model: &Qwen25Vl,
    requests: &[GenerateRequest],
    params: &GenerateParams,
    budgets: &[usize],
) -> Result<Vec<GenerateOutput>, ModelError> {
    let options = DecodeOptions {
        per_request_prefill: true,
        ..DecodeOptions::default()
    };
    generate_with_options(model, requests, params, budgets, &options)
}

/// Indices of `requests` grouped by (grid, prompt ids, pixel_values shape), groups in first-appearance order;
/// with `batch` false every request is its own group.
fn same_size_groups(requests: &[GenerateRequest], batch: bool) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let found = groups.iter_mut().find(|g| {
            let f = &requests[g[0]];
            batch
                && f.grid_thw == r.grid_thw
                && f.prompt_ids == r.prompt_ids
                && f.pixel_values.dims() == r.pixel_values.dims()
        });
        match found {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
}

/// As [`generate_with_budgets`], with drafts and the runaway guard (module doc).
pub fn generate_with_options(
    model: &Qwen25Vl,
    requests: &[GenerateRequest],
    params: &GenerateParams,
    budgets: &[usize],
    options: &DecodeOptions,
) -> Result<Vec<GenerateOutput>, ModelError> {
    if budgets.len() != requests.len() {
        return Err(ModelError::Request {
            index: 0,
            msg: format!("{} budgets for {} requests", budgets.len(), requests.len()),
        });
    }
    if !options.drafts.is_empty() && options.drafts.len() != requests.len() {
        return Err(ModelError::Request {
            index: 0,
            msg: format!(
                "{} drafts for {} requests",
                options.drafts.len(),
                requests.len()
            ),
        });
    }
    if let Some(index) = requests.iter().position(|r| r.prompt_ids.is_empty()) {
        return Err(ModelError::Request {
            index,
            msg: "empty prompt".into(),
        });
    }
    let block = match options.draft_block {
        0 => DEFAULT_DRAFT_BLOCK,
        k => k,
    };
    let dev = model.device().clone();
    let vocab = model.cfg.text.vocab_size;
    let use_drafts = drafts_are_exact(model);
    // Per request, in request order: (row, prefill cache, step-0 logits).
    let mut slots: Vec<Option<(Row, KvCache, Tensor)>> = requests.iter().map(|_| None).collect();
    for group in same_size_groups(requests, !options.per_request_prefill) {
        let l = requests[group[0]].prompt_ids.len();
        let GroupPrefill {
            prefills,
            last_logits: lasts,
            timings,
        } = prefill_group(model, requests, &group)?;
        for ((p, last), &index) in prefills.into_iter().zip(lasts).zip(&group) {
            let r = &requests[index];
            let draft = options
                .drafts
                .get(index)
                .filter(|_| use_drafts)
                .and_then(|d| draft_from(d.as_deref(), vocab));
            let row = Row {
                seen: r.prompt_ids.iter().copied().collect(),
                out: GenerateOutput::empty(timings),
                base: l as i64 + p.rope_delta,
                live: Vec::new(),
                budget: budgets[index],
                done: budgets[index] == 0,
                draft,
                guard: options.max_objects.map(Guard::new),
            };
            slots[index] = Some((row, p.cache, last));
        }
    }
    let mut rows = Vec::with_capacity(requests.len());
    let mut caches = Vec::with_capacity(requests.len());
    let mut first_logits = Vec::with_capacity(requests.len());
    for (row, cache, last) in slots.into_iter().flatten() {
        rows.push(row);
        caches.push(cache);
        first_logits.push(last);
    }
    if rows.iter().all(|r| r.done) {
        return Ok(rows.into_iter().map(|r| r.out).collect());
    }

    // Step 0 from the prefill logits.
    let t_dec = Instant::now();
    for (row, logits) in rows.iter_mut().zip(&first_logits) {
        if !row.done {
            let id = pick(row, &logits.to_vec1::<f32>()?, params);
            if let Some(d) = row.draft.as_mut() {
                d.advance(0, id, &row.out.token_ids);
            }
        }
    }
    let mut cache = left_pad_and_stack(&caches, &mut rows, &dev, model.dtype())?;
    drop(caches);
    // `active[i]` = index into `rows` of batch row i.
    let mut active: Vec<usize> = (0..rows.len()).collect();
    loop {
        let keep: Vec<usize> = (0..active.len())
            .filter(|&i| !rows[active[i]].done)
            .collect();
        let elapsed = t_dec.elapsed();
        for &a in &active {
            if rows[a].done && rows[a].out.timings.decode.is_zero() {
                rows[a].out.timings.decode = elapsed;
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            let idx: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
            cache.select_rows(&Tensor::from_vec(idx, keep.len(), &dev)?)?;
            active = keep.iter().map(|&i| active[i]).collect();
            // Columns hidden for every remaining row could be trimmed here; kept for simplicity.
        }
        let last_tokens: Vec<u32> = active
            .iter()
            .map(|&a| *rows[a].out.token_ids.last().unwrap_or(&0))
            .collect();
        let positions: Vec<u32> = active
            .iter()
            .map(|&a| (rows[a].base + rows[a].out.token_ids.len() as i64 - 1).max(0) as u32)
            .collect();
        let cap = draft_cap(&dev, active.len(), block);
        let proposals: Vec<Vec<u32>> = active.iter().map(|&a| rows[a].proposal(cap)).collect();
        let t = cache.len();
        let l = 1 + proposals.iter().map(Vec::len).max().unwrap_or(0);
        if l == 1 {
            // Plain step: the reference path.
            let mask = key_mask(&active, &rows, t, 1, &dev)?;
            let logits = model
                .decode_step(&last_tokens, &positions, mask.as_ref(), &mut cache)?
                .to_vec2::<f32>()?;
            for (&a, lg) in active.iter().zip(&logits) {
                let row = &mut rows[a];
                row.live.push(true);
                row.out.decode_forward_passes += 1;
                let id = pick(row, lg, params);
                if let Some(d) = row.draft.as_mut() {
                    d.advance(0, id, &row.out.token_ids);
                }
            }
            continue;
        }
        // Verification pass: rows shorter than the block are filled with their last id; those slots are hidden.
        let tokens = block_tokens(&last_tokens, &proposals, l);
        let mask = key_mask(&active, &rows, t, l, &dev)?;
        let logits = model.decode_block(&tokens, &positions, mask.as_ref(), &mut cache)?;
        let mut kept = Vec::with_capacity(active.len());
        for (b, (&a, prop)) in active.iter().zip(&proposals).enumerate() {
            // Cache slots this row keeps: its last id and the accepted draft ids.
            kept.push(1 + rows[a].verify(&logits.get(b)?, prop, params)?);
        }
        let max_kept = kept.iter().copied().max().unwrap_or(1);
        cache.truncate(t + max_kept)?;
        for (&a, &k) in active.iter().zip(&kept) {
            let live = &mut rows[a].live;
            live.extend(std::iter::repeat_n(true, k));
            live.extend(std::iter::repeat_n(false, max_kept - k));
        }
    }
    Ok(rows.into_iter().map(|r| r.out).collect())
}

/// A request's draft: the previous answer's ids up to the first one outside the vocabulary (it can never be
/// picked, and could not be embedded); `None` when nothing is left.
pub(crate) fn draft_from(ids: Option<&[u32]>, vocab: usize) -> Option<Draft> {
    let d: Vec<u32> = ids?
        .iter()
        .take_while(|&&t| (t as usize) < vocab)
        .copied()
        .collect();
    (!d.is_empty()).then(|| Draft::new(d))
}

/// Most draft ids per row in a verification pass of `rows` rows. On the CPU the linear layers' per-row
/// arithmetic is the same for any row count up to a kernel's MAX_ROWS (bf16: gemm_bf16, and the previous path
/// REXOMNI_BF16_GEMM=candle; f32: cpu_f32), so the whole block stays within it; elsewhere `block`.
pub(crate) fn draft_cap(dev: &Device, rows: usize, block: usize) -> usize {
    if dev.is_cpu() {
        let max_rows = crate::model::cpu_bf16::MAX_ROWS.min(crate::model::cpu_f32::MAX_ROWS);
        (max_rows / rows.max(1)).saturating_sub(1).min(block)
    } else {
        block
    }
}

/// A verification pass's ids, `l` per row: the row's last id, its proposed draft ids, then its last id again
/// as filler (the filler's cache columns are hidden or rolled back, and its logits never read).
pub(crate) fn block_tokens(last_tokens: &[u32], proposals: &[Vec<u32>], l: usize) -> Vec<u32> {
    last_tokens
        .iter()
        .zip(proposals)
        .flat_map(|(&last, p)| {
            std::iter::once(last)
                .chain(p.iter().copied())
                .chain(std::iter::repeat(last))
                .take(l)
        })
        .collect()
}

impl Row {
    /// The draft ids to verify in this row's next pass: at most `cap`, and never more than the budget can
    /// still take after the pass's own pick.
    fn proposal(&self, cap: usize) -> Vec<u32> {
        let room = self
            .budget
            .saturating_sub(self.out.token_ids.len() + 1)
            .min(cap);
        self.draft
            .as_ref()
            .map(|d| d.next(room).to_vec())
            .unwrap_or_default()
    }

    /// Picks from a verification pass's logits (`[l, vocab]`, position `i` after the row's last id and the
    /// first `i` proposed ids): the longest prefix of `prop` that greedy decoding picks, then the model's own
    /// id at the first mismatch (or after the whole proposal); the draft re-aligns there. Returns how many
    /// proposed ids were accepted; counts the pass and the accepted / rejected draft ids.
    fn verify(
        &mut self,
        logits: &Tensor,
        prop: &[u32],
        params: &GenerateParams,
    ) -> Result<usize, ModelError> {
        self.out.decode_forward_passes += 1;
        let mut accepted = 0;
        for i in 0..=prop.len() {
            let id = pick(self, &logits.get(i)?.to_vec1::<f32>()?, params);
            if self.done {
                if id == prop.get(i).copied().unwrap_or(u32::MAX) {
                    accepted += 1;
                }
                break;
            }
            if i < prop.len() && id == prop[i] {
                accepted += 1;
                continue;
            }
            if let Some(d) = self.draft.as_mut() {
                d.advance(accepted, id, &self.out.token_ids);
            }
            break;
        }
        self.out.draft_accepted += accepted;
        self.out.draft_rejected += prop.len() - accepted;
        Ok(accepted)
    }
}

/// Vision and prefill of one same-size group (indices into `requests`, from [`same_size_groups`]), one call
/// each, and the step-0 logits of every row: the static batches below and continuous admissions share it.
pub(crate) struct GroupPrefill {
    pub prefills: Vec<Prefill>,
    /// `[vocab]` f32 logits at each row's last prompt position.
    pub last_logits: Vec<Tensor>,
    /// The group's vision and prefill wall time; every row of a batched group reports it (what each frame
    /// waited). `decode` is zero.
    pub timings: StageTimings,
}

pub(crate) fn prefill_group(
    model: &Qwen25Vl,
    requests: &[GenerateRequest],
    group: &[usize],
) -> Result<GroupPrefill, ModelError> {
    let dev = model.device();
    let first = &requests[group[0]];
    let t0 = Instant::now();
    let pvs: Vec<&Tensor> = group.iter().map(|&i| &requests[i].pixel_values).collect();
    let embs = model
        .encode_images(&pvs, first.grid_thw)
        .map_err(|e| with_index(e, group[0]))?;
    sync(dev)?;
    let t1 = Instant::now();
    let prefills = model
        .prefill_batch(&first.prompt_ids, &embs, first.grid_thw)
        .map_err(|e| with_index(e, group[0]))?;
    let mut last_logits = Vec::with_capacity(prefills.len());
    for p in &prefills {
        last_logits.push(model.logits(&p.hidden)?.flatten_all()?);
    }
    sync(dev)?;
    Ok(GroupPrefill {
        prefills,
        last_logits,
        timings: StageTimings {
            vision: t1 - t0,
            prefill: t1.elapsed(),
            decode: Duration::ZERO,
        },
    })
}

/// Whether a verification block gives this model's rows bit for bit what one-token steps give (module doc).
/// On the CPU: in bf16 and f32, whose few-row linear kernels are batch-invariant; not in f16, where a step's
/// linear layers run candle's one-row GEMV and a block's its GEMM micro-kernel, whose sums are ordered
/// differently; there drafts are ignored and decoding is plain.
pub fn drafts_are_exact(model: &Qwen25Vl) -> bool {
    !model.device().is_cpu() || matches!(model.dtype(), DType::BF16 | DType::F32)
}

/// Additive f32 mask `[B, 1, l, t + l]` for a pass of `l` new ids per row over `t` cached slots: each row's
/// hidden slots are −∞, and the block is causal (id `i` sees block ids `0..=i`). `None` when nothing is hidden
/// (a plain step with no padding), as before drafts existed.
fn key_mask(
    active: &[usize],
    rows: &[Row],
    t: usize,
    l: usize,
    dev: &Device,
) -> Result<Option<Tensor>, ModelError> {
    if l == 1 && active.iter().all(|&a| rows[a].live.iter().all(|&x| x)) {
        return Ok(None);
    }
    let m: Vec<f32> = active
        .iter()
        .flat_map(|&a| {
            let live = &rows[a].live;
            (0..l).flat_map(move |i| {
                (0..t + l).map(move |j| {
                    let visible = if j < t { live[j] } else { j - t <= i };
                    if visible {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(m, (active.len(), 1, l, t + l), dev)?))
}

fn with_index(e: ModelError, index: usize) -> ModelError {
    match e {
        ModelError::Request { msg, .. } => ModelError::Request { index, msg },
        ModelError::Candle(c) => ModelError::Request {
            index,
            msg: c.to_string(),
        },
        other => other,
    }
}

/// CUDA runs asynchronously: synchronise so stage timings are real.
fn sync(dev: &Device) -> Result<(), ModelError> {
    Ok(dev.synchronize()?)
}

/// Record the pre-penalty log-probabilities, apply the repetition penalty, take the argmax (first maximum, as
/// torch.argmax), append it. Returns the chosen id.
fn pick(row: &mut Row, logits: &[f32], params: &GenerateParams) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64
        + logits
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln();
    // Penalise only the ids seen so far (HF gathers them, rescales, scatters back), then argmax.
    let p = params.repetition_penalty;
    let mut scores = logits.to_vec();
    if p != 1.0 {
        for &id in &row.seen {
            if let Some(x) = scores.get_mut(id as usize) {
                *x = if *x > 0.0 { *x / p } else { *x * p };
            }
        }
    }
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &s) in scores.iter().enumerate() {
        if s > best.1 {
            best = (i as u32, s);
        }
    }
    let id = best.0;
    row.out.token_ids.push(id);
    row.out
        .logprobs
        .push((logits[id as usize] as f64 - lse) as f32);
    if params.top_logprobs > 0 {
        let k = params.top_logprobs.min(logits.len());
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        idx.truncate(k);
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        row.out.top_logprobs.push(
            idx.into_iter()
                .map(|i| (i, (logits[i as usize] as f64 - lse) as f32))
                .collect(),
        );
    }
    row.seen.insert(id);
    if STOP_IDS.contains(&id) {
        row.out.stopped_on_eos = true;
        row.out.stop = StopReason::Eos;
        row.done = true;
        return id;
    }
    let index = row.out.token_ids.len() - 1;
    if let Some((reason, keep)) = row.guard.as_mut().and_then(|g| g.push(id, index)) {
        row.out.token_ids.truncate(keep);
        row.out.logprobs.truncate(keep);
        row.out.top_logprobs.truncate(keep);
        row.out.stop = reason;
        row.done = true;
    } else if row.out.token_ids.len() >= row.budget {
        row.out.stop = StopReason::MaxNewTokens;
        row.done = true;
    }
    id
}

/// Stack per-row prefill caches `[1, kvh, L_i, hd]` into `[B, kvh, max L, hd]`, zero-padded on the left;
/// records each row's padding for the decode mask.
fn left_pad_and_stack(
    caches: &[KvCache],
    rows: &mut [Row],
    dev: &Device,
    dtype: DType,
) -> Result<KvCache, ModelError> {
    let t = caches.iter().map(KvCache::len).max().unwrap_or(0);
    for (c, r) in caches.iter().zip(rows.iter_mut()) {
        r.live = vec![false; t - c.len()];
        r.live.resize(t, true);
    }
    if caches.len() == 1 {
        return Ok(caches[0].clone());
    }
    let n_layers = caches[0].layers.len();
    let mut out = KvCache::new(n_layers);
    for li in 0..n_layers {
        let mut ks = Vec::with_capacity(caches.len());
        let mut vs = Vec::with_capacity(caches.len());
        for c in caches {
            let (k, v) = c.layers[li].as_ref().ok_or_else(|| ModelError::Request {
                index: 0,
                msg: "empty cache".into(),
            })?;
            let pad = t - k.dim(2)?;
            if pad == 0 {
                ks.push(k.clone());
                vs.push(v.clone());
            } else {
                let (_, h, _, d) = k.dims4()?;
                let z = Tensor::zeros((1, h, pad, d), dtype, dev)?;
                ks.push(Tensor::cat(&[&z, k], 2)?);
                vs.push(Tensor::cat(&[&z, v], 2)?);
            }
        }
        out.layers[li] = Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seen: &[u32]) -> Row {
        Row {
            seen: seen.iter().copied().collect(),
            out: GenerateOutput {
                token_ids: vec![],
                logprobs: vec![],
                top_logprobs: vec![],
                stopped_on_eos: false,
                stop: StopReason::MaxNewTokens,
                timings: StageTimings::default(),
                decode_forward_passes: 0,
                draft_accepted: 0,
                draft_rejected: 0,
            },
            base: 0,
            live: vec![],
            budget: 2,
            done: false,
            draft: None,
            guard: None,
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores() {
        let params = GenerateParams {
            max_new_tokens: 10,
            repetition_penalty: 1.05,
            top_logprobs: 2,
        };
        // Seen id 0 at 1.0 → 0.952 < 0.96 (id 1) → 1 wins.
        let mut r = row(&[0]);
        assert_eq!(pick(&mut r, &[1.0, 0.96, -3.0], &params), 1);
        // The logprob and top-K are of the distribution BEFORE the penalty: id 0 is still the top.
        assert_eq!(r.out.top_logprobs[0][0].0, 0);
        let lse = (1f64.exp() + 0.96f64.exp() + (-3f64).exp()).ln();
        assert!((r.out.logprobs[0] as f64 - (0.96 - lse)).abs() < 1e-6);
        // Negative: seen id 0 at -0.5 → -0.525 < -0.51 → 1 wins; without the penalty 0 would.
        let mut r = row(&[0]);
        assert_eq!(pick(&mut r, &[-0.5, -0.51], &params), 1);
        let mut r = row(&[0]);
        assert_eq!(
            pick(
                &mut r,
                &[-0.5, -0.51],
                &GenerateParams {
                    repetition_penalty: 1.0,
                    ..params.clone()
                }
            ),
            0
        );
        // A generated id is penalised on the next step.
        let mut r = row(&[]);
        assert_eq!(pick(&mut r, &[1.0, 0.96], &params), 0);
        assert_eq!(pick(&mut r, &[1.0, 0.96], &params), 1);
    }

    #[test]
    fn the_runaway_guard_stops_a_repeating_row_and_cuts_the_repeat() {
        use crate::protocol::ids::{BOX_START, COORD_BASE, OBJECT_REF_END, OBJECT_REF_START};
        let params = GenerateParams {
            max_new_tokens: 100,
            repetition_penalty: 1.0,
            top_logprobs: 1,
        };
        let mut r = row(&[]);
        r.budget = 100;
        r.guard = Some(Guard::new(100));
        let comma = 11;
        let answer = [
            OBJECT_REF_START,
            7,
            OBJECT_REF_END,
            BOX_START,
            COORD_BASE + 1,
            COORD_BASE + 2,
            COORD_BASE + 3,
            COORD_BASE + 4,
            comma,
            COORD_BASE + 1,
            COORD_BASE + 2,
            COORD_BASE + 3,
            COORD_BASE + 4,
            comma,
        ];
        let mut logits = vec![0f32; 151936];
        for (i, &id) in answer.iter().enumerate() {
            assert!(!r.done, "stopped early at {i}");
            logits.iter_mut().for_each(|x| *x = 0.0);
            logits[id as usize] = 9.0;
            assert_eq!(pick(&mut r, &logits, &params), id);
        }
        assert!(r.done && !r.out.stopped_on_eos);
        assert_eq!(r.out.stop, StopReason::Repeat);
        assert_eq!(r.out.token_ids, answer[..8]);
        assert_eq!(r.out.logprobs.len(), 8);
        assert_eq!(r.out.top_logprobs.len(), 8);
    }

    #[test]
    fn stops_on_either_stop_id_or_at_max_new_tokens() {
        let params = GenerateParams {
            max_new_tokens: 2,
            repetition_penalty: 1.05,
            top_logprobs: 0,
        };
        for stop in STOP_IDS {
            let mut logits = vec![0f32; 151936];
            logits[stop as usize] = 5.0;
            let mut r = row(&[]);
            pick(&mut r, &logits, &params);
            assert!(r.done && r.out.stopped_on_eos, "{stop}");
        }
        let mut r = row(&[]);
        pick(&mut r, &[1.0, 0.0], &params);
        assert!(!r.done);
        pick(&mut r, &[1.0, 0.0], &params);
        assert!(r.done && !r.out.stopped_on_eos);
    }
}
