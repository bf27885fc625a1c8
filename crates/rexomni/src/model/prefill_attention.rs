//! The decoder's causal attention over a whole prompt (prefill from an empty cache) on the CPU in bf16.
//!
//! In: q `[B, H, Lq, d]`, k and v `[B, Hkv, L, d]` bf16 after RoPE (`H` a multiple of `Hkv`; query head `h` reads
//! kv head `h / (H / Hkv)`, as HF's `repeat_kv`), the queries those of the last `Lq ≤ L` positions (all of them in
//! a prefill; the last alone in a prefill's final layer, text.rs), token `i` seeing tokens `0..=i`. Out:
//! `[B, Lq, H · d]` bf16, the layout the output projection reads. One rayon task per `(b, block of positions)`.
//!
//! Why: the general path (attention.rs) copied k and v once per query head (`repeat_kv`), widened everything
//! to f32, ran candle's f32 GEMM over every column — the masked upper triangle too — and built a `[L, L]` mask
//! sum and softmax through candle's strided loops: at 640×480 (441 tokens) about 45 % of a real-config prefill.
//! Here each kv head's keys and its values (transposed) are packed once as bf16 GEMM weights (gemm_bf16.rs: one
//! output column per key; one per feature, the positions as inputs), shared by its query heads; a block of
//! positions gets the scores of all the group's heads in one GEMM call over the keys it can see and their
//! weighted sums in two more over those positions' values (on AMX tiles where the CPU has them), and position `i`
//! softmaxes columns `0..=i` only.
//!
//! Numerics, as the general path: f32 scores (exact bf16 products summed in f32, one chain over the head's
//! feature pairs in order), softmax in f32 (vision_cpu.rs's block), the weighted sum in f32 with each probability
//! split into two bf16 parts (`hi + lo`, within 2⁻¹⁶ of the f32 value; a row's zeros past its own columns add
//! exactly nothing), the output rounded to bf16 once. A row's sums run over its own columns in a fixed order,
//! so its bits depend on nothing else in the batch or the block. They differ from the general path's in the last
//! f32 bits (another summation order, the split), which moves an output sitting on a bf16 rounding boundary by
//! one step. Prefill runs this same function in every decoding mode (plain, drafts, continuous), so the modes'
//! ids stay identical to each other.

use candle_core::{Device, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::bf16_lanes::{all_bf16_cpu_4d, split_into, KernelSwitch};
use super::gemm_bf16::PackedBf16;
use super::vision_cpu::Level;

/// Positions per task: enough tasks for the pool at 100-token prompts, few enough that a task's scratch (its
/// query heads' scores and probabilities, 16 × 8 rows of up to `L` columns) stays in L2.
const POSITIONS: usize = 16;

/// Off only for A/B measurements ([`set_enabled`]): the general path then runs the prefill.
static ENABLED: KernelSwitch = KernelSwitch::on();

/// Whether [`applies`] can say yes (default: yes). For benchmarks and tests that compare both paths.
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// Whether the switch above is on (the operands still have to pass [`applies`]).
pub fn enabled() -> bool {
    ENABLED.is_on()
}

/// Whether [`causal`] takes these operands: bf16 CPU tensors of the shapes above.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    if !ENABLED.is_on() || !all_bf16_cpu_4d(&[q, k, v]) {
        return false;
    }
    let (qd, kd) = (q.dims(), k.dims());
    kd == v.dims()
        && qd[0] == kd[0]
        && kd[1] > 0
        && qd[1] % kd[1] == 0
        && qd[2] <= kd[2]
        && qd[3] == kd[3]
}

/// The causal attention (see the module doc). A position's bits are the same whether its query comes alone or
/// with the others: its sums run over its own columns in a fixed order.
pub fn causal(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, heads, lq, d) = q.dims4()?;
    let (kv_heads, l) = (k.dim(1)?, k.dim(2)?);
    if lq > l {
        candle_core::bail!("prefill attention: {lq} queries over {l} keys")
    }
    // Query `i` of `q` is position `first + i`.
    let first = l - lq;
    let rep = heads / kv_heads;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let flat = |t: &Tensor| -> Result<Vec<bf16>> { t.contiguous()?.flatten_all()?.to_vec1() };
    let (q, k, v) = (flat(q)?, flat(k)?, flat(v)?);
    // Per (b, kv head): the keys packed as a GEMM weight (one output column per key), so a block of positions'
    // scores for all the group's query heads is one call over a prefix of the keys.
    let keys: Vec<PackedBf16> = (0..b * kv_heads)
        .into_par_iter()
        .map(|bg| PackedBf16::pack(&k[bg * l * d..][..l * d], l, d))
        .collect();
    // And the values transposed (`[d, l]`: one output column per feature, the positions as its inputs), so the
    // weighted sum of a block of positions is a GEMM call over the prefix of positions they see.
    let values: Vec<PackedBf16> = (0..b * kv_heads)
        .into_par_iter()
        .map(|bg| {
            let vs = &v[bg * l * d..][..l * d];
            let vt: Vec<bf16> = (0..d * l).map(|i| vs[(i % l) * d + i / l]).collect();
            PackedBf16::pack(&vt, d, l)
        })
        .collect();

    let level = Level::best();
    let width = heads * d;
    let mut out = vec![bf16::ZERO; b * lq * width];
    // Tasks: (batch row, block of queries), each owning its `[positions, H · d]` slice of the output.
    let blocks = lq.div_ceil(POSITIONS);
    let mut tasks = Vec::with_capacity(b * blocks);
    let mut rest = out.as_mut_slice();
    for bi in 0..b {
        for blk in 0..blocks {
            let i0 = blk * POSITIONS;
            let n = POSITIONS.min(lq - i0);
            let (mine, tail) = rest.split_at_mut(n * width);
            tasks.push((bi, i0, n, mine));
            rest = tail;
        }
    }
    tasks
        .into_par_iter()
        .with_max_len(super::cpu_pool::max_tasks_per_job())
        .for_each(|(bi, i0, np, o)| {
            // The block's last position sees keys `0..seen`; earlier rows ignore their columns past their own.
            let seen = first + i0 + np;
            let mut qrows = vec![bf16::ZERO; np * rep * d];
            let (mut hi, mut lo) = (
                vec![bf16::ZERO; np * rep * seen],
                vec![bf16::ZERO; np * rep * seen],
            );
            for g in 0..kv_heads {
                let bg = bi * kv_heads + g;
                // Rows position-major: row `pi · rep + hr` is query head `g · rep + hr` at position `i0 + pi`.
                for (r, dst) in qrows.chunks_exact_mut(d).enumerate() {
                    let (pi, hr) = (r / rep, r % rep);
                    let h = g * rep + hr;
                    dst.copy_from_slice(&q[((bi * heads + h) * lq + i0 + pi) * d..][..d]);
                }
                let rows = np * rep;
                let mut p = keys[bg].matmul_f32_cols(&qrows, rows, seen);
                for (r, row) in p.chunks_exact_mut(seen).enumerate() {
                    let cols = first + i0 + r / rep + 1;
                    level.softmax(&mut row[..cols], scale);
                    row[cols..].fill(0.0);
                }
                // The weighted sum: each probability as two bf16 parts (`hi + lo` within 2⁻¹⁶ of it), two GEMM calls
                // over the values, the f32 results added; the zeros past a row's own columns add exactly nothing.
                split_into(&mut hi, &mut lo, &p);
                let (a, c) = (
                    values[bg].matmul_f32_within(&hi, rows, seen),
                    values[bg].matmul_f32_within(&lo, rows, seen),
                );
                for (r, (a, c)) in a.chunks_exact(d).zip(c.chunks_exact(d)).enumerate() {
                    let (pi, hr) = (r / rep, r % rep);
                    let y = &mut o[pi * width + (g * rep + hr) * d..][..d];
                    for ((y, &a), &c) in y.iter_mut().zip(a).zip(c) {
                        *y = bf16::from_f32(a + c);
                    }
                }
            }
        });
    Tensor::from_vec(out, (b, lq, width), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::{attend, MAX_SCORE_ELEMS};
    use crate::model::bf16_lanes::test_values::{bits, rand_bf16};
    use crate::model::text::causal_mask;
    use candle_core::DType;

    fn operands(b: usize, h: usize, hkv: usize, l: usize, d: usize) -> (Tensor, Tensor, Tensor) {
        let q = rand_bf16((b * h * l, d), 11, 2.0)
            .reshape((b, h, l, d))
            .unwrap();
        let k = rand_bf16((b * hkv * l, d), 12, 2.0)
            .reshape((b, hkv, l, d))
            .unwrap();
        let v = rand_bf16((b * hkv * l, d), 13, 1.0)
            .reshape((b, hkv, l, d))
            .unwrap();
        (q, k, v)
    }

    /// The general path as prefill ran it: k and v repeated per query head, f32 composite with the causal
    /// mask, then `[B, H, L, d]` → `[B, L, H · d]`.
    fn general(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, h, l, d) = q.dims4()?;
        let rep = h / k.dim(1)?;
        let k = candle_transformers::utils::repeat_kv(k.clone(), rep)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v.clone(), rep)?.contiguous()?;
        let mask = causal_mask(0, l, 0, l, &Device::Cpu)?;
        let o = attend(q, &k, &v, MAX_SCORE_ELEMS, |s, n| {
            mask.narrow(2, s, n).map(Some)
        })?;
        o.transpose(1, 2)?.reshape((b, l, h * d))
    }

    /// Against the general path: the same bf16 value on almost every element, never more than one bf16
    /// step apart relative to the output's scale. Shapes: the real head layout (16 over 2, d 128) at a length
    /// that is no multiple of 16, grouped heads that do not fill the 4-row groups, no grouping, two batch rows.
    #[test]
    fn matches_the_general_path() -> Result<()> {
        for (b, h, hkv, l, d) in [
            (1, 16, 2, 53, 128),
            (2, 6, 2, 37, 40),
            (1, 3, 3, 20, 16),
            (2, 4, 1, 1, 8),
        ] {
            let (q, k, v) = operands(b, h, hkv, l, d);
            assert!(applies(&q, &k, &v));
            let ours = causal(&q, &k, &v)?;
            let want = general(&q, &k, &v)?;
            assert_eq!(ours.dims(), want.dims());
            let (a, w) = (bits(&ours), bits(&want));
            let same = a.iter().zip(&w).filter(|(x, y)| x == y).count() as f32 / a.len() as f32;
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let diff = (f(&ours)? - f(&want)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let top = f(&want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                same >= 0.97 && diff / top <= 1.0 / 64.0,
                "b{b} h{h}/{hkv} l{l} d{d}: {same} equal, rel diff {}",
                diff / top
            );
        }
        Ok(())
    }

    /// Causality and row independence: position `i`'s output depends on tokens `0..=i` only (a prompt cut
    /// after `i` gives the same bits), and a batch row's bits are its own alone.
    #[test]
    fn a_position_sees_only_its_past_and_rows_are_independent() -> Result<()> {
        let (b, h, hkv, l, d) = (2, 8, 2, 45, 64);
        let (q, k, v) = operands(b, h, hkv, l, d);
        let all = causal(&q, &k, &v)?;
        let cut = 30;
        let short = causal(
            &q.narrow(2, 0, cut)?,
            &k.narrow(2, 0, cut)?,
            &v.narrow(2, 0, cut)?,
        )?;
        assert_eq!(bits(&short), bits(&all.narrow(1, 0, cut)?.contiguous()?));
        let row = causal(
            &q.narrow(0, 1, 1)?,
            &k.narrow(0, 1, 1)?,
            &v.narrow(0, 1, 1)?,
        )?;
        assert_eq!(bits(&row), bits(&all.narrow(0, 1, 1)?.contiguous()?));
        Ok(())
    }

    /// The queries of the last positions alone (a prefill's final layer asks for the last one only) give
    /// those positions' rows of the full call bit for bit, whether the tail starts inside a block of
    /// [`POSITIONS`] or spans several.
    #[test]
    fn the_last_positions_alone_equal_the_full_calls_rows() -> Result<()> {
        let (b, h, hkv, l, d) = (2, 8, 2, 45, 64);
        let (q, k, v) = operands(b, h, hkv, l, d);
        let all = causal(&q, &k, &v)?;
        for lq in [1, 3, 20] {
            let tail = q.narrow(2, l - lq, lq)?;
            assert!(applies(&tail, &k, &v));
            let ours = causal(&tail, &k, &v)?;
            assert_eq!(ours.dims(), &[b, lq, h * d]);
            assert_eq!(
                bits(&ours),
                bits(&all.narrow(1, l - lq, lq)?.contiguous()?),
                "last {lq} positions"
            );
        }
        assert!(!applies(
            &q,
            &k.narrow(2, 0, l - 1)?,
            &v.narrow(2, 0, l - 1)?
        ));
        Ok(())
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::model::bf16_lanes::test_values::rand_bf16;

    /// Not a check: prints ms per call at a real-config layer's shapes (640×480: 441 positions, 16 heads over
    /// 2, d 128). `cargo test -p rexomni --lib prefill_attention::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn real_layer_ms() -> Result<()> {
        let (b, h, hkv, l, d) = (1, 16, 2, 441, 128);
        let q = rand_bf16((b * h * l, d), 11, 2.0).reshape((b, h, l, d))?;
        let k = rand_bf16((b * hkv * l, d), 12, 2.0).reshape((b, hkv, l, d))?;
        let v = rand_bf16((b * hkv * l, d), 13, 1.0).reshape((b, hkv, l, d))?;
        causal(&q, &k, &v)?;
        let mut ms = Vec::new();
        for _ in 0..30 {
            let t = std::time::Instant::now();
            causal(&q, &k, &v)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        eprintln!(
            "prefill attention {l} positions: fastest {:.2} ms, median {:.2} ms",
            ms[0], ms[15]
        );
        Ok(())
    }
}
