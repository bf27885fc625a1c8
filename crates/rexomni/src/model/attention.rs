//! Scaled dot-product attention shared by the vision tower and the decoder, chunked over query rows so that
//! memory stays bounded: a 2560-token image has ~10k patches and one full-attention block would otherwise
//! materialise 16 × 10k × 10k f32 scores (6.4 GB, spec §2.3).
//!
//! In: q `[B, H, Lq, D]`, k/v `[B, H, Lk, D]` in the model dtype, an optional additive f32 mask per query chunk.
//! Out: `[B, H, Lq, D]` in the model dtype.
//!
//! Numerics: on the CPU, half-precision q, k and v are widened to f32 (exactly) and the scores, softmax and
//! weighted sum stay in f32, rounded to the model dtype once at the end: what the fused kernels behind
//! transformers' default `sdpa` attention do (torch's CPU flash attention accumulates in f32). It costs nothing
//! there: candle 0.11.1 has no CPU bf16 GEMM and widens both operands of a bf16 matmul anyway. On CUDA the
//! matmuls stay in the model dtype (cuBLAS accumulates in f32 and rounds the scores and the output once each,
//! HF's `eager` path), because widening would copy the whole KV cache to f32 in every layer of every decode
//! step. On the tiny detector (tests/model_tiny_detector.rs) the f32 scores change no greedy answer; the
//! RMSNorm, SiLU and logit roundings (numerics.rs, cpu_bf16.rs) were the ones that flipped answers.

use candle_core::{DType, Result, Tensor, D};

/// Upper bound on the f32 score elements of one chunk (B·H·rows·Lk): 64 Mi elements = 256 MB.
pub const MAX_SCORE_ELEMS: usize = 64 << 20;

/// `mask(start, rows)` returns an additive mask broadcastable to `[B, H, rows, Lk]`, or `None`.
pub fn attend<F>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    max_elems: usize,
    mut mask: F,
) -> Result<Tensor>
where
    F: FnMut(usize, usize) -> Result<Option<Tensor>>,
{
    let (b, h, lq, d) = q.dims4()?;
    if super::decode_attention::applies(q, k, v) {
        if let Some(o) = super::decode_attention::attend(q, k, v, mask(0, lq)?.as_ref())? {
            return Ok(o);
        }
    }
    let lk = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let out_dtype = v.dtype();
    let work = if q.device().is_cpu() {
        DType::F32
    } else {
        out_dtype
    };
    let (q, k, v) = (q.to_dtype(work)?, k.to_dtype(work)?, v.to_dtype(work)?);
    let kt = k.transpose(2, 3)?.contiguous()?;
    let rows = (max_elems / (b * h * lk).max(1)).clamp(1, lq.max(1));
    let mut outs = Vec::with_capacity(lq.div_ceil(rows));
    let mut start = 0;
    while start < lq {
        let n = rows.min(lq - start);
        let qc = if n == lq {
            q.clone()
        } else {
            q.narrow(2, start, n)?
        };
        let scores = (qc.contiguous()?.matmul(&kt)? * scale)?.to_dtype(DType::F32)?;
        let scores = match mask(start, n)? {
            Some(m) => scores.broadcast_add(&m)?,
            None => scores,
        };
        let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(work)?;
        outs.push(p.matmul(&v)?.to_dtype(out_dtype)?);
        start += n;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, D::Minus2)
    }
}
