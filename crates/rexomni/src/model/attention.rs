//! Scaled dot-product attention shared by the vision tower and the decoder, chunked over query rows so that
//! memory stays bounded: a 2560-token image has ~10k patches and one full-attention block would otherwise
//! materialise 16 × 10k × 10k f32 scores (6.4 GB, spec §2.3).
//!
//! In: q `[B, H, Lq, D]`, k/v `[B, H, Lk, D]` in the model dtype, an optional additive f32 mask per query chunk.
//! Out: `[B, H, Lq, D]`. Scores are computed in the model dtype and the softmax in f32, as HF eager attention
//! does (`softmax(..., dtype=float32).to(q.dtype)`).

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
    let lk = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
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
        let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        outs.push(p.matmul(v)?);
        start += n;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, D::Minus2)
    }
}
