//! Qwen2 decoder with sectioned M-RoPE (rex-omni-spec.md §3): input embeddings `[B, L, H]` + cos/sin tables
//! + mask + a [`KvCache`] → hidden states `[B, L, H]`; `logits` maps hidden rows to f32 vocabulary scores.
//!
//! The weights are immutable; each generation owns its cache (passed as `&mut`), so one loaded model can serve
//! batches one after the other. Layer code follows candle `qwen2.rs` (q/k/v bias, o_proj without bias), but
//! RoPE angles come from `rope::mrope_cos_sin` in f32 and prefill is causal (spec §7 lists the upstream
//! `qwen3_vl` bugs we avoid: 1-D RoPE, no causal mask in prefill).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::attention::{attend, MAX_SCORE_ELEMS};
use super::bf16_lanes;
use super::config::TextConfig;
use super::kv_slots::KvSlots;
use super::linear::{linear_forward, linear_forward_f32, Linear, LinearLoader};
use super::numerics::{self, RmsNorm};
use super::prefill_attention;

/// Keys and values per layer, `[B, kv_heads, T, head_dim]`, grown by concatenation. Plain data: rows can be
/// dropped (`select_rows`) when a sequence of the batch finishes.
#[derive(Default, Clone)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drop every slot from `len` on (speculative decoding: roll back the rejected draft tokens of a
    /// single-row batch). A no-op when the cache is not longer than `len`.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if self.len() <= len {
            return Ok(());
        }
        for l in self.layers.iter_mut().flatten() {
            *l = (l.0.narrow(2, 0, len)?, l.1.narrow(2, 0, len)?);
        }
        Ok(())
    }
    /// Keep batch rows `rows` (a u32 index tensor on the cache's device).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for l in self.layers.iter_mut().flatten() {
            *l = (l.0.index_select(rows, 0)?, l.1.index_select(rows, 0)?);
        }
        Ok(())
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct Layer {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    attn: Attention,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    /// The post-attention half of the layer, without the residual: norm, SwiGLU MLP (SiLU in f32, rounded
    /// once: numerics.rs).
    fn mlp(&self, h: &Tensor) -> Result<Tensor> {
        let n = self.post_norm.forward(h)?;
        let (g, u) = (
            linear_forward(&self.gate, &n)?,
            linear_forward(&self.up, &n)?,
        );
        let act = if bf16_lanes::applies(&g) {
            bf16_lanes::silu_mul(&g, &u)?
        } else {
            (numerics::silu(&g)? * u)?
        };
        linear_forward(&self.down, &act)
    }

    /// A prefill's final layer for the last position only: the keys and values of every position (the cache
    /// needs them), then the query, attention, output projection and MLP of the last position alone, so
    /// `[B, L, H]` in, `[B, 1, H]` out, where the full layer would compute all `L` rows of each and the caller keep
    /// one. On a 441-token prompt of the real config that is 2.7 % of the prefill's arithmetic not done.
    ///
    /// Exact: `None` unless every step here gives the last row the same bits as the full layer does (our
    /// row-independent GEMMs, the bf16 prefill attention, row-wise norms and RoPE, elementwise SiLU and adds);
    /// the caller then runs the full layer.
    fn forward_last_position(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Option<Tensor>> {
        let a = &self.attn;
        let exact = [&a.q, &a.k, &a.v, &a.o, &self.gate, &self.up, &self.down]
            .iter()
            .all(|l| l.rows_are_independent(x));
        if !LAST_POSITION_ONLY.is_on()
            || !exact
            || cache.is_some()
            || !bf16_lanes::applies(x)
            || !prefill_attention::enabled()
        {
            return Ok(None);
        }
        let (_, l, _) = x.dims3()?;
        let last = |t: &Tensor| t.narrow(t.rank() - 2, l - 1, 1);
        let n = self.input_norm.forward(x)?;
        let (k, v) = a.kv(&n, cos, sin)?;
        let q = a.q(&last(&n)?, &last(cos)?, &last(sin)?)?;
        let o = linear_forward(&a.o, &prefill_attention::causal(&q, &k, &v)?)?;
        *cache = Some((k, v));
        let h = residual(&last(x)?, &o)?;
        Ok(Some(residual(&h, &self.mlp(&h)?)?))
    }

    fn new(cfg: &TextConfig, vb: VarBuilder, lin: &LinearLoader) -> Result<Self> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        Ok(Self {
            input_norm: numerics::rms_norm(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_norm: numerics::rms_norm(h, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            attn: Attention {
                q: lin.load(h, cfg.num_attention_heads * hd, true, a.pp("q_proj"))?,
                k: lin.load(h, cfg.num_key_value_heads * hd, true, a.pp("k_proj"))?,
                v: lin.load(h, cfg.num_key_value_heads * hd, true, a.pp("v_proj"))?,
                o: lin.load(cfg.num_attention_heads * hd, h, false, a.pp("o_proj"))?,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: hd,
            },
            gate: lin.load(h, i, false, m.pp("gate_proj"))?,
            up: lin.load(h, i, false, m.pp("up_proj"))?,
            down: lin.load(i, h, false, m.pp("down_proj"))?,
        })
    }
}

impl Attention {
    /// Projections of `x [B, L, H]` to `q [B, heads, L, d]` and `k`, `v [B, kv_heads, L, d]`, with the rotary
    /// embedding applied to `q` and `k` (shared by the cached and the slot-cache forward).
    fn qkv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (k, v) = self.kv(x, cos, sin)?;
        Ok((self.q(x, cos, sin)?, k, v))
    }

    /// `q [B, heads, L, d]` of `x [B, L, H]`, rotated.
    fn q(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        rotate(
            &self.heads_of(linear_forward(&self.q, x)?, self.heads)?,
            cos,
            sin,
        )
    }

    /// `k` (rotated) and `v`, `[B, kv_heads, L, d]`, of `x [B, L, H]`.
    fn kv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.heads_of(linear_forward(&self.k, x)?, self.kv_heads)?;
        let v = self.heads_of(linear_forward(&self.v, x)?, self.kv_heads)?;
        Ok((rotate(&k, cos, sin)?, v))
    }

    /// `[B, L, n · d]` → `[B, n, L, d]`.
    fn heads_of(&self, t: Tensor, n: usize) -> Result<Tensor> {
        let (b, l, _) = t.dims3()?;
        t.reshape((b, l, n, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        visible: &Visible,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (q, k, v) = self.qkv(x, cos, sin)?;
        let cached = cache.is_some();
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let rep = self.heads / self.kv_heads;
        if let Visible::Causal(_) = visible {
            if !cached && prefill_attention::applies(&q, &k, &v) {
                return linear_forward(&self.o, &prefill_attention::causal(&q, &k, &v)?);
            }
        }
        let mask = visible.rows();
        let o = if l == 1 {
            // Decode: the `rep` query heads that share a kv head (head h uses kv head h / rep, as HF's repeat_kv)
            // become `rep` query rows against that kv head, so the cache is never copied `rep` times per step.
            // The padding mask `[B, 1, 1, T]` broadcasts over the grouped rows.
            let grouped = q.reshape((b, self.kv_heads, rep, self.head_dim))?;
            attend(&grouped, &k, &v, MAX_SCORE_ELEMS, mask)?.reshape((
                b,
                self.heads,
                1,
                self.head_dim,
            ))?
        } else if cached {
            // Decode block (draft verification, engine.rs): `l` new tokens on top of a cache. `mask(0, l)` is
            // `[B, 1, l, T]`: causal within the block and hiding each row's padding / rolled-back slots.
            let m = mask(0, l)?;
            if x.device().is_cpu() {
                // Each position exactly as the one-token step that would produce it.
                self.attend_position_by_position(&q, &k, &v, k.dim(2)? - l, m.as_ref())?
            } else {
                // One call for the whole block, the query heads grouped as in a decode step: rows `r·l + i` of
                // kv head `g` are query head `g·rep + r` at block position `i`; the mask is tiled to match. On
                // CUDA the kernels may differ from a step's in the last bits anyway (engine.rs module doc).
                let grouped = q.reshape((b, self.kv_heads, rep * l, self.head_dim))?;
                let m = match m {
                    Some(m) => Some(m.repeat((1, 1, rep, 1))?),
                    None => None,
                };
                let mask_g = move |start: usize, rows: usize| match &m {
                    Some(m) => m.narrow(2, start, rows).map(Some),
                    None => Ok(None),
                };
                attend(&grouped, &k, &v, MAX_SCORE_ELEMS, mask_g)?.reshape((
                    b,
                    self.heads,
                    l,
                    self.head_dim,
                ))?
            }
        } else {
            let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
            attend(&q, &k, &v, MAX_SCORE_ELEMS, mask)?
        };
        let o = o
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        linear_forward(&self.o, &o)
    }
}

impl Attention {
    /// Attention of a block of `l` query positions (`q` `[B, heads, l, d]`) over `t` cached keys plus the block's
    /// own, position by position with exactly the operands of a one-token decode step: keys and values cut to
    /// `t + i + 1` columns ([`lone_step_keys`]), query heads grouped over their kv head, `mask` (`[B, 1, l, ≥ t + l]`)
    /// cut to match. Each position's scores, softmax and weighted sum are then that step's bit for bit (candle's
    /// CPU softmax sums in 32-lane chunks plus a scalar tail, so even masked trailing keys would reorder the
    /// additions). Out: `[B, heads, l, d]`.
    fn attend_position_by_position(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        t: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, _, l, _) = q.dims4()?;
        let rep = self.heads / self.kv_heads;
        let mut outs = Vec::with_capacity(l);
        for i in 0..l {
            let qi =
                q.narrow(2, i, 1)?
                    .contiguous()?
                    .reshape((b, self.kv_heads, rep, self.head_dim))?;
            let (ki, vi) = (
                lone_step_keys(k.narrow(2, 0, t + i + 1)?)?,
                lone_step_keys(v.narrow(2, 0, t + i + 1)?)?,
            );
            let mi = match mask {
                Some(m) => Some(m.narrow(2, i, 1)?.narrow(3, 0, t + i + 1)?.contiguous()?),
                None => None,
            };
            let mask_i = move |_: usize, _: usize| Ok(mi.clone());
            outs.push(attend(&qi, &ki, &vi, MAX_SCORE_ELEMS, mask_i)?.reshape((
                b,
                self.heads,
                1,
                self.head_dim,
            ))?);
        }
        Tensor::cat(&outs, 2)
    }

    /// One decode pass over preallocated [`KvSlots`] (continuous batching): row `i` of `x` (`[B, l, H]`) is slot
    /// `rows[i]`; its `l` new keys and values are written in place from column `lens[i]` (its own length).
    /// - `l == 1`, a step: on the CPU row by row, each over its own columns exactly as a lone step (so every
    ///   row's bits are its lone decoding's); elsewhere every row attends to columns `0..t` (`t` = longest
    ///   row + 1), `mask` `[B, 1, 1, t]` hiding each row's columns past its own. The query heads are grouped
    ///   over their kv head exactly as in a plain decode step, and when the rows are consecutive slots the keys
    ///   and values are read as strided views of the slots (no gather).
    /// - `l > 1`, a draft verification block: each row sees only its own columns, causally. On the CPU position
    ///   by position with exactly the operands of a lone row's plain decode step (its keys cut to
    ///   `lens[i] + p + 1` columns, no mask), so each block row is that step's bit for bit (the
    ///   static block path does the same, see `forward`); elsewhere one call per row with a causal mask.
    #[allow(clippy::too_many_arguments)]
    fn forward_slots(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kv: &(Tensor, Tensor),
        rows: &[usize],
        lens: &[usize],
        t: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        if rows.len() != b || lens.len() != b {
            candle_core::bail!(
                "forward_slots: {b} rows of {l} tokens for {} slots",
                rows.len()
            );
        }
        let (q, k, v) = self.qkv(x, cos, sin)?;
        let (k_all, v_all) = kv;
        for (i, (&s, &len)) in rows.iter().zip(lens).enumerate() {
            k_all
                .narrow(0, s, 1)?
                .slice_set(&k.narrow(0, i, 1)?.contiguous()?, 2, len)?;
            v_all
                .narrow(0, s, 1)?
                .slice_set(&v.narrow(0, i, 1)?.contiguous()?, 2, len)?;
        }
        let rep = self.heads / self.kv_heads;
        let o = if l == 1 && b > 1 && x.device().is_cpu() {
            // Row by row with exactly a lone step's operands (its own `len + 1` columns, no mask):
            // one masked call over the longest row's columns would sum each shorter row's softmax and weighted
            // sum in a different order (candle's CPU softmax adds in 32-lane chunks plus a scalar tail), so its
            // bits, and at a near tie its id, could differ from the row decoded alone.
            let mut outs = Vec::with_capacity(b);
            for (i, (&s, &len)) in rows.iter().zip(lens).enumerate() {
                let qi = q.narrow(0, i, 1)?.contiguous()?.reshape((
                    1,
                    self.kv_heads,
                    rep,
                    self.head_dim,
                ))?;
                let ki = lone_step_keys(k_all.narrow(0, s, 1)?.narrow(2, 0, len + 1)?)?;
                let vi = lone_step_keys(v_all.narrow(0, s, 1)?.narrow(2, 0, len + 1)?)?;
                outs.push(
                    attend(&qi, &ki, &vi, MAX_SCORE_ELEMS, |_, _| Ok(None))?.reshape((
                        1,
                        self.heads,
                        1,
                        self.head_dim,
                    ))?,
                );
            }
            Tensor::cat(&outs, 0)?
        } else if l == 1 {
            let consecutive = rows.windows(2).all(|w| w[1] == w[0] + 1);
            let (k, v) = if consecutive {
                (
                    k_all.narrow(0, rows[0], b)?.narrow(2, 0, t)?,
                    v_all.narrow(0, rows[0], b)?.narrow(2, 0, t)?,
                )
            } else {
                let gather = |all: &Tensor| -> Result<Tensor> {
                    let parts = rows
                        .iter()
                        .map(|&s| all.narrow(0, s, 1)?.narrow(2, 0, t))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 0)
                };
                (gather(k_all)?, gather(v_all)?)
            };
            let grouped = q.reshape((b, self.kv_heads, rep, self.head_dim))?;
            let m = mask.cloned();
            attend(&grouped, &k, &v, MAX_SCORE_ELEMS, move |_, _| Ok(m.clone()))?.reshape((
                b,
                self.heads,
                1,
                self.head_dim,
            ))?
        } else {
            let mut outs = Vec::with_capacity(b);
            for (i, (&s, &len)) in rows.iter().zip(lens).enumerate() {
                let qi = q.narrow(0, i, 1)?;
                let (ks, vs) = (k_all.narrow(0, s, 1)?, v_all.narrow(0, s, 1)?);
                let o = if x.device().is_cpu() {
                    self.attend_position_by_position(&qi, &ks, &vs, len, None)?
                } else {
                    // Rows `r·l + p` of kv head `g` are query head `g·rep + r` at block position `p`.
                    let causal: Vec<f32> =
                        (0..rep)
                            .flat_map(|_| {
                                (0..l).flat_map(move |p| {
                                    (0..len + l).map(move |j| {
                                        if j <= len + p {
                                            0.0
                                        } else {
                                            f32::NEG_INFINITY
                                        }
                                    })
                                })
                            })
                            .collect();
                    let m = Tensor::from_vec(causal, (1, 1, rep * l, len + l), x.device())?;
                    let grouped = qi.reshape((1, self.kv_heads, rep * l, self.head_dim))?;
                    let (kr, vr) = (ks.narrow(2, 0, len + l)?, vs.narrow(2, 0, len + l)?);
                    let mask_g = move |start: usize, n: usize| m.narrow(2, start, n).map(Some);
                    attend(&grouped, &kr, &vr, MAX_SCORE_ELEMS, mask_g)?.reshape((
                        1,
                        self.heads,
                        l,
                        self.head_dim,
                    ))?
                };
                outs.push(o);
            }
            Tensor::cat(&outs, 0)?
        };
        let o = o
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        linear_forward(&self.o, &o)
    }
}

pub struct TextModel {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    cfg: TextConfig,
}

impl TextModel {
    /// `vb` points at the decoder prefix (`model` or `model.language_model`); `lm_head` is the separate
    /// `lm_head.weight` when the checkpoint has one, else the embedding (tied, spec §3.1).
    pub fn new(
        cfg: &TextConfig,
        vb: VarBuilder,
        lm_head_vb: Option<VarBuilder>,
        lin: &LinearLoader,
    ) -> Result<Self> {
        let embed = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp("layers").pp(i), lin))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = match lm_head_vb {
            Some(vb) => lin.load(cfg.hidden_size, cfg.vocab_size, false, vb)?,
            None => lin.from_weight(embed.embeddings().clone(), None, "lm_head (tied)")?,
        };
        Ok(Self {
            norm: numerics::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            embed,
            layers,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Weight bytes one decode step reads: every linear layer as held (bf16, packed or quantized blocks), the
    /// norms, and the lm_head; the embedding table only through its few looked-up rows (not counted).
    pub fn step_weight_bytes(&self) -> usize {
        let norm = |n: &RmsNorm| n.weight().elem_count() * n.weight().dtype().size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.attn;
                [&a.q, &a.k, &a.v, &a.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|x| x.weight_bytes())
                    .sum::<usize>()
                    + norm(&l.input_norm)
                    + norm(&l.post_norm)
            })
            .sum();
        layers + norm(&self.norm) + self.lm_head.weight_bytes()
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.forward(ids)
    }

    /// `cos`/`sin`: `[B, L, head_dim/2]` or `[L, head_dim/2]` in the model dtype. `mask(start, rows)` gives the
    /// additive f32 mask for query rows `start..start+rows` against all cached + new keys. Returns the hidden
    /// states of the positions `outputs` asks for: `[B, L, H]` or `[B, 1, H]`.
    pub fn forward(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        visible: &Visible,
        cache: &mut KvCache,
        outputs: Outputs,
    ) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let mut x = embeds.clone();
        let n = self.layers.len();
        for (i, (layer, c)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            if i + 1 == n && outputs == Outputs::Last && matches!(visible, Visible::Causal(_)) {
                if let Some(last) = layer.forward_last_position(&x, cos, sin, c)? {
                    return Ok(last);
                }
            }
            let a = layer
                .attn
                .forward(&layer.input_norm.forward(&x)?, cos, sin, visible, c)?;
            let h = residual(&x, &a)?;
            x = residual(&h, &layer.mlp(&h)?)?;
        }
        match outputs {
            Outputs::Every => Ok(x),
            Outputs::Last => x.narrow(1, x.dim(1)? - 1, 1),
        }
    }

    /// One decode pass of `B` rows of `l` tokens over [`KvSlots`] (continuous batching): row `i` is slot
    /// `rows[i]`, its tokens written from the slot's own length; for a step (`l == 1`) `mask` `[B, 1, 1, t]` (or
    /// `None` when every row has the same length) hides the columns past each row's length, a block (`l > 1`,
    /// draft verification) is causal per row (`Attention::forward_slots`). Every slot in `rows` grows by `l`
    /// columns.
    pub fn forward_slots(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        slots: &mut KvSlots,
        rows: &[usize],
    ) -> Result<Tensor> {
        if slots.layers.len() != self.layers.len() {
            candle_core::bail!(
                "forward_slots: {} cache layers for {} layers",
                slots.layers.len(),
                self.layers.len()
            );
        }
        let l = embeds.dim(1)?;
        let lens: Vec<usize> = rows.iter().map(|&s| slots.len(s)).collect();
        let t = lens.iter().copied().max().unwrap_or(0) + l;
        slots.reserve(t)?;
        let mut x = embeds.clone();
        for (layer, kv) in self.layers.iter().zip(&slots.layers) {
            let a = layer.attn.forward_slots(
                &layer.input_norm.forward(&x)?,
                cos,
                sin,
                kv,
                rows,
                &lens,
                t,
                mask,
            )?;
            let h = residual(&x, &a)?;
            x = residual(&h, &layer.mlp(&h)?)?;
        }
        slots.advance(rows, l);
        Ok(x)
    }

    /// Final norm + lm_head, f32 logits (spec §5.5: logits are f32 at the last position).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // f32 straight from the accumulators where the layer allows it (linear::linear_forward_f32).
        linear_forward_f32(&self.lm_head, &self.norm.forward(hidden)?)
    }
}

/// A row's own keys (or values) cut from a larger cache, as a lone decode step's attention gets them: a view
/// where the bf16 decode kernel reads it in place with the same bits (decode_attention.rs, tested there),
/// otherwise a contiguous copy, the operand the general path's lone step has.
fn lone_step_keys(cut: Tensor) -> Result<Tensor> {
    if cut.device().is_cpu() && cut.dtype() == DType::BF16 {
        Ok(cut)
    } else {
        cut.contiguous()
    }
}

/// Rotate-half RoPE of `t [B, n, L, d]` with `cos`/`sin` `[L, d/2]` or `[B, L, d/2]`.
fn rotate(t: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if bf16_lanes::applies(t) {
        bf16_lanes::rope(t, cos, sin)
    } else {
        candle_nn::rotary_emb::rope(t, cos, sin)
    }
}

/// `x + y`: the residual add, bf16 on the CPU through bf16_lanes.rs (one vectorised pass, the same bits as
/// candle's bf16 add), anything else through candle.
fn residual(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if bf16_lanes::applies(x) && x.shape() == y.shape() {
        bf16_lanes::add(x, y)
    } else {
        x + y
    }
}

/// Off only for A/B measurements ([`set_last_position_only`]): a prefill's final layer then computes every
/// position and the pass keeps the last.
static LAST_POSITION_ONLY: bf16_lanes::KernelSwitch = bf16_lanes::KernelSwitch::on();

/// Whether a prefill's final layer may compute the last position alone (default: yes; the ids and bits are the
/// same either way). For `rexbench --prefill-ab`.
pub fn set_last_position_only(on: bool) {
    LAST_POSITION_ONLY.set(on);
}

/// Which positions' hidden states a [`TextModel::forward`] pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outputs {
    /// All of them: decode steps and blocks (each position's logits are used), parity tests.
    Every,
    /// The last one: a prefill, whose next step needs only the last position's logits (the final layer then
    /// computes only that position where it can do so exactly, `Layer::forward_last_position`).
    Last,
}

/// What the attention of a [`TextModel::forward`] pass may see.
pub enum Visible<'a> {
    /// A prefill from an empty cache: token `i` sees tokens `0..=i`.
    Causal(CausalMask),
    /// `mask(start, rows)`: the additive f32 mask for query rows `start..start + rows` against all cached + new
    /// keys, or `None` when every key is visible.
    Masked(&'a dyn Fn(usize, usize) -> Result<Option<Tensor>>),
}

/// The `[1, 1, L, L]` additive mask of a causal prefill, built on first use and then shared by every layer and
/// chunk: the general attention path needs it, the bf16 CPU kernel (prefill_attention.rs) does not, and at the
/// largest frames (~2600 prompt tokens) it is 27 MB of f32.
pub struct CausalMask {
    len: usize,
    device: candle_core::Device,
    built: std::cell::OnceCell<Tensor>,
}

impl CausalMask {
    pub fn new(len: usize, device: &candle_core::Device) -> Self {
        Self {
            len,
            device: device.clone(),
            built: std::cell::OnceCell::new(),
        }
    }

    fn rows(&self, start: usize, rows: usize) -> Result<Tensor> {
        let full = match self.built.get() {
            Some(m) => m,
            None => {
                let m = causal_mask(0, self.len, 0, self.len, &self.device)?;
                self.built.get_or_init(|| m)
            }
        };
        full.narrow(2, start, rows)
    }
}

impl Visible<'_> {
    /// The mask rows as the general attention path asks for them.
    fn rows(&self) -> impl Fn(usize, usize) -> Result<Option<Tensor>> + '_ {
        move |start, rows| match self {
            Visible::Causal(m) => m.rows(start, rows).map(Some),
            Visible::Masked(f) => f(start, rows),
        }
    }
}

/// Causal additive mask rows `start..start+rows` for a prefill of `l` new tokens after `past` cached ones.
pub fn causal_mask(
    start: usize,
    rows: usize,
    past: usize,
    l: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let lk = past + l;
    let m: Vec<f32> = (start..start + rows)
        .flat_map(|i| {
            (0..lk).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(m, (1, 1, rows, lk), dev)
}
