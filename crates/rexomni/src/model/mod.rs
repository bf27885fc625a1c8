//! Qwen2.5-VL (the Rex-Omni network) on candle: the glue between the vision tower and the decoder.
//!
//! In: a checkpoint folder (`loading`), then per request `pixel_values` + `grid_thw` + prompt ids.
//! Out: image embeddings, prefill hidden states / logits with a filled [`KvCache`] and the rope delta, and
//! decode steps. Owns only the glue (spec §3.4-3.5: splicing image rows into `<|image_pad|>` slots, M-RoPE
//! positions, masks); the sub-networks are `vision` and `text`. Generation policy lives in `crate::engine`.

pub mod attention;
pub mod awq;
pub mod bf16_lanes;
pub mod config;
pub mod cpu_bf16;
pub mod cpu_f32;
pub mod cpu_pool;
pub mod cpu_q8;
pub mod decode_attention;
pub mod gemm_bf16;
pub mod huge_pages;
pub mod kv_slots;
pub mod linear;
pub mod loading;
pub mod numerics;
pub mod prefetch;
pub mod prefill_attention;
pub mod rope;
pub mod text;
pub mod vision;
pub mod vision_cpu;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::{Config, TextConfig, VisionConfig};
pub use kv_slots::KvSlots;
pub use linear::{LinearLoader, Weights};
pub use text::KvCache;

/// Everything that can go wrong loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: field `{field}`: {msg}", path.display())]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },
    #[error("model `{model}`: {msg}")]
    Hub { model: String, msg: String },
    #[error("request {index}: {msg}")]
    Request { index: usize, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The loaded network. Immutable after load; per-sequence state is in [`KvCache`].
pub struct Qwen25Vl {
    pub cfg: Config,
    vision: vision::VisionTower,
    text: text::TextModel,
    device: Device,
    dtype: DType,
}

/// Result of a prefill for one sequence.
pub struct Prefill {
    /// Final-layer hidden states (before the final norm): `[1, 1, hidden]`, the last position's, from
    /// [`Qwen25Vl::prefill`] and [`Qwen25Vl::prefill_batch`] (the next id needs no other); `[1, L, hidden]` from
    /// [`Qwen25Vl::prefill_every_position`].
    pub hidden: Tensor,
    pub cache: KvCache,
    /// Position offset for decode: the token at cache index `p` gets position `p + rope_delta` (spec §3.4).
    pub rope_delta: i64,
    pub positions: Vec<[u32; 3]>,
}

impl Qwen25Vl {
    /// Build from a `VarBuilder` rooted at the checkpoint, with the tensor prefixes already chosen
    /// (`loading::load` does that for a folder; the benchmark passes random weights).
    pub fn new(
        cfg: Config,
        vision_vb: VarBuilder,
        text_vb: VarBuilder,
        lm_head: Option<VarBuilder>,
    ) -> Result<Self, ModelError> {
        Self::new_with(cfg, vision_vb, text_vb, lm_head, &LinearLoader::dense())
    }

    /// As [`Qwen25Vl::new`], with the linear layers built by `lin` (quantized, or from AWQ tensors).
    pub fn new_with(
        cfg: Config,
        vision_vb: VarBuilder,
        text_vb: VarBuilder,
        lm_head: Option<VarBuilder>,
        lin: &LinearLoader,
    ) -> Result<Self, ModelError> {
        let device = text_vb.device().clone();
        let dtype = text_vb.dtype();
        // A model in this process: its per-step temporaries should reuse freed memory (huge_pages.rs).
        huge_pages::keep_freed_memory();
        let vision = vision::VisionTower::new(&cfg.vision, vision_vb, lin)?;
        let text = text::TextModel::new(&cfg.text, text_vb, lm_head, lin)?;
        Ok(Self {
            cfg,
            vision,
            text,
            device,
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Decoder weight bytes one decode step reads, as the layers hold them (see `TextModel::step_weight_bytes`).
    pub fn decoder_step_weight_bytes(&self) -> usize {
        self.text.step_weight_bytes()
    }

    /// Vision tower: `[gh·gw, 1176]` → `[gh·gw/4, hidden]` in the model dtype.
    pub fn encode_image(
        &self,
        pixel_values: &Tensor,
        grid_thw: [usize; 3],
    ) -> Result<Tensor, ModelError> {
        cpu_pool::run(&self.device, || {
            Ok(self.vision.forward(pixel_values, grid_thw)?)
        })
    }

    /// Vision tower over several images of the same `grid_thw` in one pass (see `VisionTower::forward_batch`).
    pub fn encode_images(
        &self,
        pixel_values: &[&Tensor],
        grid_thw: [usize; 3],
    ) -> Result<Vec<Tensor>, ModelError> {
        cpu_pool::run(&self.device, || {
            Ok(self.vision.forward_batch(pixel_values, grid_thw)?)
        })
    }

    /// Text embeddings with the image rows spliced into the `<|image_pad|>` slots, in order (spec §3.5).
    fn splice(&self, ids: &[u32], image_embeds: &Tensor) -> Result<Tensor, ModelError> {
        let l = ids.len();
        let n_img = image_embeds.dim(0)?;
        let pads = ids
            .iter()
            .filter(|&&t| t == self.cfg.image_token_id)
            .count();
        if pads != n_img {
            return Err(ModelError::Request {
                index: 0,
                msg: format!(
                    "prompt has {pads} <|image_pad|> tokens but the image gives {n_img} embeddings"
                ),
            });
        }
        let ids_t = Tensor::from_vec(ids.to_vec(), l, &self.device)?;
        let text = self.text.embed(&ids_t)?;
        if n_img == 0 {
            return Ok(text);
        }
        let mut k = 0u32;
        let gather: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == self.cfg.image_token_id {
                    k += 1;
                    (l as u32) + k - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let all = Tensor::cat(&[&text, &image_embeds.to_dtype(self.dtype)?], 0)?;
        Ok(all.index_select(&Tensor::from_vec(gather, l, &self.device)?, 0)?)
    }

    /// Causal prefill of one prompt holding one image (`grid_thw`), starting from an empty cache; the hidden
    /// state of the last position only.
    pub fn prefill(
        &self,
        ids: &[u32],
        image_embeds: &Tensor,
        grid_thw: [usize; 3],
    ) -> Result<Prefill, ModelError> {
        self.prefill_one(ids, image_embeds, grid_thw, text::Outputs::Last)
    }

    /// [`Self::prefill`] with every position's hidden state (parity tests compare all positions' logits); the
    /// last position's bits are the same either way.
    pub fn prefill_every_position(
        &self,
        ids: &[u32],
        image_embeds: &Tensor,
        grid_thw: [usize; 3],
    ) -> Result<Prefill, ModelError> {
        self.prefill_one(ids, image_embeds, grid_thw, text::Outputs::Every)
    }

    fn prefill_one(
        &self,
        ids: &[u32],
        image_embeds: &Tensor,
        grid_thw: [usize; 3],
        outputs: text::Outputs,
    ) -> Result<Prefill, ModelError> {
        cpu_pool::run(&self.device, || {
            let embeds = self.splice(ids, image_embeds)?.unsqueeze(0)?;
            self.prefill_embeds(ids, &embeds, grid_thw, outputs)
        })
    }

    /// Causal prefill of `[B, L, D]` spliced embeddings that all share the prompt `ids` (so the same
    /// positions and mask), starting from an empty cache: one `Prefill` holding all `B` rows.
    fn prefill_embeds(
        &self,
        ids: &[u32],
        embeds: &Tensor,
        grid_thw: [usize; 3],
        outputs: text::Outputs,
    ) -> Result<Prefill, ModelError> {
        let m = self.cfg.vision.spatial_merge_size;
        let (lh, lw) = (grid_thw[1] / m, grid_thw[2] / m);
        let (positions, rope_delta) = rope::mrope_positions(ids, self.cfg.image_token_id, lh, lw);
        let (cos, sin) = self.cos_sin(&positions)?;
        let l = ids.len();
        let causal = text::Visible::Causal(text::CausalMask::new(l, &self.device));
        let mut cache = KvCache::new(self.cfg.text.num_hidden_layers);
        let hidden = self
            .text
            .forward(embeds, &cos, &sin, &causal, &mut cache, outputs)?;
        Ok(Prefill {
            hidden,
            cache,
            rope_delta,
            positions,
        })
    }

    /// Causal prefill of one prompt `ids` for several images of the same `grid_thw` as one `[B, L]` batch
    /// (same ids → same positions and mask); returns one [`Prefill`] per image, each with its own cache rows
    /// and its last position's hidden state.
    pub fn prefill_batch(
        &self,
        ids: &[u32],
        image_embeds: &[Tensor],
        grid_thw: [usize; 3],
    ) -> Result<Vec<Prefill>, ModelError> {
        cpu_pool::run(&self.device, || {
            if image_embeds.len() == 1 {
                return Ok(vec![self.prefill(ids, &image_embeds[0], grid_thw)?]);
            }
            let embeds = image_embeds
                .iter()
                .map(|e| self.splice(ids, e))
                .collect::<Result<Vec<_>, _>>()?;
            let Prefill {
                hidden,
                cache,
                rope_delta,
                positions,
            } = self.prefill_embeds(
                ids,
                &Tensor::stack(&embeds, 0)?,
                grid_thw,
                text::Outputs::Last,
            )?;
            (0..image_embeds.len())
                .map(|b| {
                    let mut row = KvCache::new(cache.layers.len());
                    for (dst, src) in row.layers.iter_mut().zip(&cache.layers) {
                        if let Some((k, v)) = src {
                            *dst = Some((k.narrow(0, b, 1)?, v.narrow(0, b, 1)?));
                        }
                    }
                    Ok(Prefill {
                        hidden: hidden.narrow(0, b, 1)?,
                        cache: row,
                        rope_delta,
                        positions: positions.clone(),
                    })
                })
                .collect()
        })
    }

    /// f32 logits for hidden rows `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        cpu_pool::run(&self.device, || Ok(self.text.logits(hidden)?))
    }

    /// One decode step for `B` sequences sharing a (left-padded) cache: `tokens[b]` sits at M-RoPE position
    /// `positions[b]` (all three components equal after the image, spec §3.4). `key_mask`: additive f32
    /// `[B, 1, 1, T+1]` hiding the padding slots, or `None` when no row is padded. Returns `[B, vocab]` f32.
    pub fn decode_step(
        &self,
        tokens: &[u32],
        positions: &[u32],
        key_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        cpu_pool::run(&self.device, || {
            let (embeds, cos, sin) = self.block_inputs(tokens, positions, 1)?;
            let mask = key_mask.cloned();
            let mask_fn = move |_: usize, _: usize| Ok(mask.clone());
            let visible = text::Visible::Masked(&mask_fn);
            let hidden =
                self.text
                    .forward(&embeds, &cos, &sin, &visible, cache, text::Outputs::Every)?;
            Ok(self.text.logits(&hidden)?.squeeze(1)?)
        })
    }

    /// A decode block (draft verification): `B` rows of `L` tokens each, `tokens` row-major `[B·L]`, row `b`'s
    /// token `i` at M-RoPE position `first_positions[b] + i`. `key_mask`: additive f32 `[B, 1, L, T+L]`, causal
    /// within the block and hiding each row's padding / rolled-back slots. The attention groups query heads as a
    /// decode step does (text.rs). Returns `[B, L, vocab]` f32; the cache grows by `L` slots.
    pub fn decode_block(
        &self,
        tokens: &[u32],
        first_positions: &[u32],
        key_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        cpu_pool::run(&self.device, || {
            let b = first_positions.len();
            if b == 0 || tokens.len() % b != 0 {
                return Err(ModelError::Request {
                    index: 0,
                    msg: format!("decode block: {} tokens for {b} rows", tokens.len()),
                });
            }
            let l = tokens.len() / b;
            let (embeds, cos, sin) = self.block_inputs(tokens, first_positions, l)?;
            let mask = key_mask.cloned();
            let mask_fn = move |_: usize, _: usize| Ok(mask.clone());
            let visible = text::Visible::Masked(&mask_fn);
            let hidden =
                self.text
                    .forward(&embeds, &cos, &sin, &visible, cache, text::Outputs::Every)?;
            Ok(self.text.logits(&hidden)?)
        })
    }

    /// Embeddings `[B, l, H]` and rotary `cos`/`sin` `[B, l, head_dim/2]` of a pass of `l` ids per row, row `i`'s
    /// ids at text positions `first_positions[i]..+l` (decode ids: the same position on all three M-RoPE axes).
    fn block_inputs(
        &self,
        tokens: &[u32],
        first_positions: &[u32],
        l: usize,
    ) -> Result<(Tensor, Tensor, Tensor), ModelError> {
        let b = first_positions.len();
        let ids = Tensor::from_vec(tokens.to_vec(), (b, l), &self.device)?;
        let embeds = self.text.embed(&ids)?;
        let pos: Vec<[u32; 3]> = first_positions
            .iter()
            .flat_map(|&p| (0..l as u32).map(move |i| [p + i; 3]))
            .collect();
        let (cos, sin) = self.cos_sin(&pos)?;
        let half = cos.dim(1)?;
        Ok((
            embeds,
            cos.reshape((b, l, half))?,
            sin.reshape((b, l, half))?,
        ))
    }

    /// An empty [`KvSlots`] cache for this model: `slots` rows of `capacity` columns (grown on demand).
    pub fn new_kv_slots(&self, slots: usize, capacity: usize) -> Result<KvSlots, ModelError> {
        let t = &self.cfg.text;
        Ok(KvSlots::new(
            t.num_hidden_layers,
            slots,
            t.num_key_value_heads,
            t.head_dim(),
            capacity,
            self.dtype,
            &self.device,
        )?)
    }

    /// One decode step for the rows of a continuous batch: `tokens[i]` at M-RoPE position `positions[i]` for slot
    /// `rows[i]` of `slots`, which holds that row's own length of cache (no padding; the columns past a row's
    /// length are masked). Returns `[B, vocab]` f32; each slot in `rows` grows by one column.
    pub fn decode_slots(
        &self,
        tokens: &[u32],
        positions: &[u32],
        rows: &[usize],
        slots: &mut KvSlots,
    ) -> Result<Tensor, ModelError> {
        cpu_pool::run(&self.device, || {
            let b = tokens.len();
            if b == 0 || positions.len() != b || rows.len() != b {
                return Err(ModelError::Request {
                    index: 0,
                    msg: format!(
                        "decode_slots: {b} tokens, {} positions, {} rows",
                        positions.len(),
                        rows.len()
                    ),
                });
            }
            let (embeds, cos, sin) = self.block_inputs(tokens, positions, 1)?;
            // Row i sees its own columns 0..=len_i (the new one included); None when no row is shorter than another,
            // so a lone row runs exactly the operations of a plain decode step.
            let lens: Vec<usize> = rows.iter().map(|&s| slots.len(s)).collect();
            let t = lens.iter().copied().max().unwrap_or(0) + 1;
            let mask = if lens.iter().all(|&l| l + 1 == t) {
                None
            } else {
                let m: Vec<f32> = lens
                    .iter()
                    .flat_map(|&l| {
                        (0..t).map(move |j| if j <= l { 0.0 } else { f32::NEG_INFINITY })
                    })
                    .collect();
                Some(Tensor::from_vec(m, (b, 1, 1, t), &self.device)?)
            };
            let hidden =
                self.text
                    .forward_slots(&embeds, &cos, &sin, mask.as_ref(), slots, rows)?;
            Ok(self.text.logits(&hidden)?.squeeze(1)?)
        })
    }

    /// A draft verification pass for the rows of a continuous batch: `l = tokens.len() / B` ids per row (row
    /// `i`'s are `tokens[i·l..(i+1)·l]`, at M-RoPE positions `first_positions[i]..+l`) for slot `rows[i]`. Each
    /// row attends causally to its own columns only; on the CPU each block row's logits are those of a lone
    /// row's plain decode step bit for bit (`TextModel::forward_slots`). Returns `[B, l, vocab]` f32; each slot
    /// in `rows` grows by `l` columns (roll back with [`KvSlots::truncate`]).
    pub fn decode_slots_block(
        &self,
        tokens: &[u32],
        first_positions: &[u32],
        rows: &[usize],
        slots: &mut KvSlots,
    ) -> Result<Tensor, ModelError> {
        cpu_pool::run(&self.device, || {
            let b = first_positions.len();
            if b == 0 || rows.len() != b || tokens.len() % b != 0 {
                return Err(ModelError::Request {
                    index: 0,
                    msg: format!(
                        "decode_slots_block: {} tokens, {b} positions, {} rows",
                        tokens.len(),
                        rows.len()
                    ),
                });
            }
            let l = tokens.len() / b;
            if l == 1 {
                // A step: rows of different lengths need the step's key mask.
                return Ok(self
                    .decode_slots(tokens, first_positions, rows, slots)?
                    .unsqueeze(1)?);
            }
            let (embeds, cos, sin) = self.block_inputs(tokens, first_positions, l)?;
            let hidden = self
                .text
                .forward_slots(&embeds, &cos, &sin, None, slots, rows)?;
            Ok(self.text.logits(&hidden)?)
        })
    }

    fn cos_sin(&self, positions: &[[u32; 3]]) -> Result<(Tensor, Tensor), ModelError> {
        let t = &self.cfg.text;
        let (c, s) = rope::mrope_cos_sin(
            positions,
            t.head_dim(),
            t.rope_theta,
            t.mrope_section,
            &self.device,
        )?;
        // Angles and cos/sin in f32, applied in the model dtype (spec §3.3, §7 "Numerics").
        Ok((c.to_dtype(self.dtype)?, s.to_dtype(self.dtype)?))
    }
}
