//! Attention of a few query rows over a bf16 KV cache on the CPU: the decode step's (the `rep` query heads that
//! share a kv head, one token each), and with it every pass that must give a decode step's bits (draft blocks
//! position by position, continuous steps row by row: text.rs).
//!
//! In: q `[B, H, lq, d]` (lq ≤ [`MAX_ROWS`]), k and v `[B, H, T, d]` bf16, any strides with `d` contiguous (so a
//! view of the cache is read in place), an optional additive f32 mask `[B|1, 1, lq|1, T]`.
//! Out: `[B, H, lq, d]` bf16. One rayon task per `(b, h)`.
//!
//! Why: the general path (attention.rs) widens the whole cache to f32 and transposes the keys into a new tensor
//! at every layer of every step, then runs two small matmuls; at 640×480 (~450 cached columns) and 4 rows that
//! is several MB of copies per layer in candle's single-threaded strided loops. Here each key and value is
//! read once, widened in registers.
//!
//! Numerics, as the general path: f32 scores, softmax and weighted sum, rounded to bf16 once. The order of
//! every sum is fixed by `d` and by the column index alone: a score is 16 lanes over `d` (lane `l` takes
//! elements `l, l + 16, …`), folded as a fixed tree; the softmax sum is 16 lanes by column index mod 16, folded
//! the same way; each output element is one chain over the columns in order. A masked column (−∞) adds an
//! exact 0 everywhere, so a row with masked trailing columns gets the bits it gets without them. The
//! exponential is `bf16_lanes::exp_lane` (within 2 ulp of libm's). Every instruction set gives the same bits.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::bf16_lanes::{all_bf16_cpu_4d, exp_lane, round_lane, vectorised, widen, KernelSwitch};

/// Query rows per `(b, h)` this path takes (a decode step has `heads / kv_heads` of them: 8 in the real model).
pub const MAX_ROWS: usize = 16;

const LANES: usize = 16;

/// Off only for A/B measurements ([`set_enabled`]): the general path then runs every shape.
static ENABLED: KernelSwitch = KernelSwitch::on();

/// Whether [`applies`] can say yes (default: yes). For benchmarks that time both paths.
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// Whether `attend` applies: bf16 CPU tensors of decode shape, the last dimension contiguous in k and v.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    if !ENABLED.is_on() || !all_bf16_cpu_4d(&[q, k, v]) {
        return false;
    }
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    qd[2] <= MAX_ROWS
        && qd[..2] == kd[..2]
        && kd == vd
        && qd[3] == kd[3]
        && k.stride()[3] == 1
        && v.stride()[3] == 1
}

/// The attention (see the module doc), or `None` when the mask's shape is not one this path reads.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (b, h, lq, d) = q.dims4()?;
    let t = k.dim(2)?;
    let mask = match mask {
        None => None,
        Some(m) => {
            let md = m.dims();
            let ok = m.rank() == 4
                && (md[0] == 1 || md[0] == b)
                && md[1] == 1
                && (md[2] == 1 || md[2] == lq)
                && md[3] == t;
            if !ok {
                return Ok(None);
            }
            let m = m.to_dtype(DType::F32)?.contiguous()?;
            let (batch_stride, row_stride) = (
                if md[0] == 1 { 0 } else { md[2] * t },
                if md[2] == 1 { 0 } else { t },
            );
            Some((m.flatten_all()?.to_vec1::<f32>()?, batch_stride, row_stride))
        }
    };
    let q: Vec<bf16> = q.contiguous()?.flatten_all()?.to_vec1()?;
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(CpuStorage::BF16(kv)), Storage::Cpu(CpuStorage::BF16(vv))) = (&*ks, &*vs)
    else {
        candle_core::bail!("decode_attention: k and v must be bf16 CPU tensors")
    };
    let heads = |l: &Layout| -> (usize, usize, usize, usize) {
        let s = l.stride();
        (l.start_offset(), s[0], s[1], s[2])
    };
    let (k_at, v_at) = (heads(kl), heads(vl));
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut out = vec![bf16::ZERO; b * h * lq * d];
    out.par_chunks_mut(lq * d)
        .with_max_len(super::cpu_pool::max_tasks_per_job())
        .enumerate()
        .for_each(|(task, o)| {
            let (bi, hi) = (task / h, task % h);
            let base = |(off, sb, sh, _): (usize, usize, usize, usize)| off + bi * sb + hi * sh;
            let empty: &[f32] = &[];
            let (m, m_row) = match &mask {
                Some((m, bs, rs)) => (&m[bi * bs..], *rs),
                None => (empty, 0),
            };
            let mut scores = vec![0f32; lq * t];
            rows(
                o,
                &q[task * lq * d..][..lq * d],
                &kv[base(k_at)..],
                k_at.3,
                &vv[base(v_at)..],
                v_at.3,
                t,
                d,
                scale,
                m,
                m_row,
                &mut scores,
            );
        });
    Ok(Some(Tensor::from_vec(out, (b, h, lq, d), k.device())?))
}

/// `lanes[0..16]` folded as a fixed tree: halves added lane by lane, 8 → 4 → 2 → 1.
#[inline(always)]
fn fold(mut lanes: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            lanes[i] += lanes[i + w];
        }
        w /= 2;
    }
    lanes[0]
}

vectorised! {
    /// One `(b, h)`: `o [lq, d]` from `q [lq, d]`, keys and values `j` at `k[j · k_stride..][..d]`,
    /// `v[j · v_stride..][..d]` for `j < t`; the mask (row `r` at `m[r · m_row..][..t]`, or none when `m` is
    /// empty); `scores` holds `lq · t` floats of scratch.
    #[allow(clippy::too_many_arguments)]
    fn rows(
        o: &mut [bf16],
        q: &[bf16],
        k: &[bf16],
        k_stride: usize,
        v: &[bf16],
        v_stride: usize,
        t: usize,
        d: usize,
        scale: f32,
        m: &[f32],
        m_row: usize,
        scores: &mut [f32],
    ) {
        let lq = q.len() / d;
        for (r, s_row) in scores.chunks_exact_mut(t).enumerate() {
            let qr = &q[r * d..][..d];
            for (j, s) in s_row.iter_mut().enumerate() {
                let kj = &k[j * k_stride..][..d];
                let mut lanes = [0f32; LANES];
                for (qc, kc) in qr.chunks(LANES).zip(kj.chunks(LANES)) {
                    for ((l, &a), &b) in lanes.iter_mut().zip(qc).zip(kc) {
                        *l = widen(a).mul_add(widen(b), *l);
                    }
                }
                let masked = if m.is_empty() { 0.0 } else { m[r * m_row + j] };
                *s = fold(lanes) * scale + masked;
            }
        }
        let mut acc = vec![0f32; d];
        for r in 0..lq {
            let s_row = &mut scores[r * t..][..t];
            let max = s_row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut lanes = [0f32; LANES];
            for chunk in s_row.chunks_mut(LANES) {
                for (l, s) in lanes.iter_mut().zip(chunk) {
                    *s = if *s == f32::NEG_INFINITY { 0.0 } else { exp_lane(*s - max) };
                    *l += *s;
                }
            }
            let sum = fold(lanes);
            acc.fill(0.0);
            for (j, &e) in s_row.iter().enumerate() {
                let vj = &v[j * v_stride..][..d];
                for (a, &x) in acc.iter_mut().zip(vj) {
                    *a = e.mul_add(widen(x), *a);
                }
            }
            for (out, &a) in o[r * d..][..d].iter_mut().zip(&acc) {
                *out = round_lane(a / sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bf16_lanes::test_values::{bits, rand_bf16};
    use candle_core::Device;

    fn qkv(b: usize, h: usize, lq: usize, t: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let q = rand_bf16((b * h * lq, d), 1, 2.0).reshape((b, h, lq, d))?;
        let k = rand_bf16((b * h * t, d), 2, 2.0).reshape((b, h, t, d))?;
        let v = rand_bf16((b * h * t, d), 3, 1.0).reshape((b, h, t, d))?;
        Ok((q, k, v))
    }

    /// The same attention in f32 with candle's ops, rounded to bf16 once.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let d = q.dim(3)? as f64;
        let mut s = (f(q)?.matmul(&f(k)?.t()?)? / d.sqrt())?;
        if let Some(m) = mask {
            s = s.broadcast_add(m)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        p.matmul(&f(v)?)?.to_dtype(DType::BF16)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    }

    /// Within one bf16 rounding of the f32 composite, with and without a padding mask (odd `d` and `t` too).
    #[test]
    fn close_to_the_f32_composite() -> Result<()> {
        for (b, h, lq, t, d) in [(2, 2, 8, 37, 128), (1, 4, 1, 5, 16), (3, 1, 2, 70, 40)] {
            let (q, k, v) = qkv(b, h, lq, t, d)?;
            let want = reference(&q, &k, &v, None)?;
            let got = attend(&q, &k, &v, None)?.expect("no mask");
            let e = max_rel(&got, &want)?;
            assert!(e <= 1.0 / 128.0, "b{b} h{h} lq{lq} t{t} d{d}: {e}");
            let m: Vec<f32> = (0..b * t)
                .map(|i| {
                    if i % t >= t - t / 3 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let m = Tensor::from_vec(m, (b, 1, 1, t), &Device::Cpu)?;
            let want = reference(&q, &k, &v, Some(&m))?;
            let got = attend(&q, &k, &v, Some(&m))?.expect("a [B, 1, 1, T] mask");
            let e = max_rel(&got, &want)?;
            assert!(e <= 1.0 / 128.0, "masked b{b} h{h} lq{lq} t{t} d{d}: {e}");
        }
        Ok(())
    }

    /// A row's bits do not depend on masked trailing columns, nor on whether the cache is a strided view:
    /// what lets a continuous step or a padded batch row give a lone step's bits.
    #[test]
    fn masked_trailing_columns_and_views_change_no_bit() -> Result<()> {
        let (b, h, lq, t, d) = (2, 2, 8, 45, 128);
        let (q, k, v) = qkv(b, h, lq, t, d)?;
        let own = 29;
        let alone = attend(
            &q,
            &k.narrow(2, 0, own)?.contiguous()?,
            &v.narrow(2, 0, own)?.contiguous()?,
            None,
        )?
        .expect("no mask");
        let m: Vec<f32> = (0..b * t)
            .map(|i| if i % t >= own { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let m = Tensor::from_vec(m, (b, 1, 1, t), &Device::Cpu)?;
        let masked = attend(&q, &k, &v, Some(&m))?.expect("a [B, 1, 1, T] mask");
        assert_eq!(bits(&alone), bits(&masked), "masked trailing columns");
        let view =
            attend(&q, &k.narrow(2, 0, own)?, &v.narrow(2, 0, own)?, None)?.expect("no mask");
        assert!(!k.narrow(2, 0, own)?.is_contiguous());
        assert_eq!(bits(&alone), bits(&view), "strided view of the cache");
        // The rows agree with a row alone too (`lq` query rows are independent).
        let one = attend(&q.narrow(2, 3, 1)?, &k, &v, None)?.expect("no mask");
        let all = attend(&q, &k, &v, None)?.expect("no mask");
        assert_eq!(bits(&one), bits(&all.narrow(2, 3, 1)?.contiguous()?));
        Ok(())
    }
}
