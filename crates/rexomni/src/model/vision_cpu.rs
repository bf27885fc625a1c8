//! The vision tower's attention on the CPU in bf16 (RoPE, scores, softmax, weighted sum, per window or per
//! image), as one pass over plain slices; the SwiGLU product and residual adds it used to hold are now
//! bf16_lanes.rs's, shared with the decoder.
//!
//! In: bf16 tensors on the CPU (the block's qkv output and the rotary tables). Out: a bf16 tensor of the shape
//! the candle ops it replaces return. Runs on the caller's thread and candle's rayon pool.
//!
//! Why: at the real widths (1564 patches, 16 heads of 80) the attention ran as hundreds of small padded batched
//! matmuls over windows plus a 16 × 1564 × 1564 score tensor written and read three times for the full block
//! (docs/benchmarks.md, "bf16 vision on the CPU").
//!
//! Numerics (what transformers' bf16 forward does): RoPE in f32 with the same expression as candle's kernel,
//! rounded to bf16 (HF's `apply_rotary_pos_emb_vision`); scores, softmax and weighted sum in f32, the output
//! rounded once. The dot products here sum in a fixed order that differs from candle's f32 GEMM, so attention
//! outputs may differ from the previous path in the last f32 bit before their bf16 rounding. A sequence of
//! [`GEMM_KEYS`] or more (a full-attention block's image) runs on the packed bf16 GEMM instead: scores as the
//! same exact products summed in f32 (one chain per score over the head's feature pairs in order), the weighted
//! sum with each probability split into two bf16 parts (`hi + lo`, within 2⁻¹⁶ of the f32 value) and the two
//! f32 results added; a row's bits still depend only on its own sequence. f32 models never come here (the f32
//! path is unchanged).

use candle_core::{Device, Result, Tensor};

use super::bf16_lanes::{exp_lane, split_into, with_bf16};
use super::gemm_bf16::PackedBf16;
use half::bf16;
use rayon::prelude::*;

/// Query rows per attention task: 32 rows × (1564 + 15) f32 scores stay in L2 next to the head's keys.
const QB: usize = 32;
/// Score lanes computed together (one zmm of f32).
pub(super) const L: usize = 16;
/// Keys from which a sequence's scores and weighted sums run on the packed bf16 GEMM (gemm_bf16.rs; AMX tiles
/// where the CPU has them) rather than the f32 FMA loop: the full-attention blocks' whole images (1564 keys at
/// 640×480), not the 64-key windows, where packing keys and values per head and window would cost more than it
/// saves.
const GEMM_KEYS: usize = 256;

/// Attention of the vision blocks.
///
/// `qkv`: `[rows, 3 · heads · hd]` bf16, each row `[q | k | v]` with heads × hd each, rows in the permuted
/// (window) order. `cos`, `sin`: `[n, hd / 2]` f32 RoPE tables; row `r` uses table row `r % n` (several images
/// of `n` rows each). `seqs`: `(start, end)` row ranges that attend within themselves (windows, or whole
/// images for the full-attention blocks), in order and covering `0..rows`. Out: `[rows, heads · hd]` bf16.
pub fn attention(
    qkv: &Tensor,
    cos: &[f32],
    sin: &[f32],
    n: usize,
    seqs: &[(usize, usize)],
    heads: usize,
    hd: usize,
) -> Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    let hidden = heads * hd;
    let half = hd / 2;
    if width != 3 * hidden || hd % 2 != 0 || cos.len() != n * half || sin.len() != n * half {
        candle_core::bail!(
            "vision attention: qkv {rows}x{width}, {heads} heads of {hd}, rope tables {} for {n} rows",
            cos.len()
        )
    }
    if seqs.first().map(|s| s.0) != Some(0)
        || seqs.last().map(|s| s.1) != Some(rows)
        || seqs.windows(2).any(|w| w[0].1 != w[1].0)
    {
        candle_core::bail!("vision attention: sequences {seqs:?} do not tile 0..{rows}")
    }
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    // q as f32 `[rows, heads, hd]` after RoPE (rounded to bf16, as the model dtype holds it). Per head, each
    // sequence's keys (after RoPE, the same way) in blocks of L: `[block][hd][L]` (zero past the sequence), so
    // the score loop reads one contiguous stream; v per head as `[rows][hd]` f32.
    let koff: Vec<usize> = seqs
        .iter()
        .scan(0, |o, &(s, e)| {
            let here = *o;
            *o += (e - s).div_ceil(L) * hd * L;
            Some(here)
        })
        .collect();
    let kper = seqs
        .iter()
        .map(|&(s, e)| (e - s).div_ceil(L) * hd * L)
        .sum::<usize>();
    let mut q = vec![0f32; rows * hidden];
    let mut kp = vec![0f32; heads * kper];
    let mut vh = vec![0f32; heads * rows * hd];
    with_bf16(qkv, |src| {
        q.par_chunks_mut(hidden).enumerate().for_each(|(r, q)| {
            let t = (r % n) * half;
            let (c, s) = (&cos[t..t + half], &sin[t..t + half]);
            for h in 0..heads {
                let o = h * hd;
                rope_row(&src[r * width + o..][..hd], c, s, &mut q[o..o + hd]);
            }
        });
        kp.par_chunks_mut(kper)
            .zip(vh.par_chunks_mut(rows * hd))
            .enumerate()
            .for_each(|(h, (kp, vh))| {
                let mut kr = vec![0f32; hd];
                for (&(s, e), &off) in seqs.iter().zip(&koff) {
                    for r in s..e {
                        let t = (r % n) * half;
                        let row = &src[r * width + hidden + h * hd..][..hd];
                        rope_row(row, &cos[t..t + half], &sin[t..t + half], &mut kr);
                        let (b, l) = ((r - s) / L, (r - s) % L);
                        for (d, &x) in kr.iter().enumerate() {
                            kp[off + (b * hd + d) * L + l] = x;
                        }
                    }
                }
                for (r, v) in vh.chunks_exact_mut(hd).enumerate() {
                    let row = &src[r * width + 2 * hidden + h * hd..][..hd];
                    for (v, x) in v.iter_mut().zip(row) {
                        *v = x.to_f32();
                    }
                }
            });
    })?;

    // Per head, each long sequence's keys (after RoPE: bf16 values, held exactly in `kp`'s f32) packed as a GEMM
    // weight, one output column per key; and its values transposed, one output column per feature.
    let packed: Vec<Vec<Option<(PackedBf16, PackedBf16)>>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            seqs.iter()
                .zip(&koff)
                .map(|(&(s, e), &off)| {
                    let lk = e - s;
                    (lk >= GEMM_KEYS).then(|| {
                        let kb = &kp[h * kper + off..];
                        let keys: Vec<bf16> = (0..lk * hd)
                            .map(|i| {
                                let (j, d) = (i / hd, i % hd);
                                bf16::from_f32(kb[((j / L) * hd + d) * L + j % L])
                            })
                            .collect();
                        let vs = &vh[(h * rows + s) * hd..][..lk * hd];
                        let vt: Vec<bf16> = (0..hd * lk)
                            .map(|i| bf16::from_f32(vs[(i % lk) * hd + i / lk]))
                            .collect();
                        (
                            PackedBf16::pack(&keys, lk, hd),
                            PackedBf16::pack(&vt, hd, lk),
                        )
                    })
                })
                .collect()
        })
        .collect();

    // Tasks: blocks of up to QB query rows inside one sequence, in row order, each owning its output rows.
    let mut out = vec![bf16::ZERO; rows * hidden];
    let mut tasks = Vec::new();
    let mut rest = out.as_mut_slice();
    for (seq, &(s, e)) in seqs.iter().enumerate() {
        let mut i = s;
        while i < e {
            let m = QB.min(e - i);
            let (mine, tail) = rest.split_at_mut(m * hidden);
            tasks.push((i, m, seq, (s, e), koff[seq], mine));
            rest = tail;
            i += m;
        }
    }
    let level = Level::best();
    tasks
        .into_par_iter()
        .with_max_len(super::cpu_pool::max_tasks_per_job())
        .for_each(|(i0, m, seq, (s, e), koff, out)| {
            let lk = e - s;
            let lkp = lk.div_ceil(L) * L;
            let mut scores = vec![0f32; R * lkp];
            let mut acc = vec![0f32; R * hd];
            let (mut qrows, mut hi, mut lo) = (Vec::new(), Vec::new(), Vec::new());
            for h in 0..heads {
                if let Some((keys, values)) = &packed[h][seq] {
                    // All the task's rows at once: scores `[m, lk]` from one GEMM call, softmax per row, then
                    // the weighted sum as two GEMM calls over the values: each probability split into bf16
                    // parts `hi + lo` (within 2⁻¹⁶ of the f32 value), the two f32 results added.
                    qrows.clear();
                    for r in 0..m {
                        let qr = &q[(i0 + r) * hidden + h * hd..][..hd];
                        qrows.extend(qr.iter().map(|&x| bf16::from_f32(x)));
                    }
                    let mut all = keys.matmul_f32(&qrows, m, None);
                    for row in all.chunks_exact_mut(lk) {
                        level.softmax(row, scale);
                    }
                    hi.resize(m * lk, bf16::ZERO);
                    lo.resize(m * lk, bf16::ZERO);
                    split_into(&mut hi, &mut lo, &all);
                    let (a, b) = (
                        values.matmul_f32(&hi, m, None),
                        values.matmul_f32(&lo, m, None),
                    );
                    for r in 0..m {
                        let o = &mut out[r * hidden + h * hd..][..hd];
                        for ((o, &a), &b) in
                            o.iter_mut().zip(&a[r * hd..][..hd]).zip(&b[r * hd..][..hd])
                        {
                            *o = bf16::from_f32(a + b);
                        }
                    }
                    continue;
                }
                let kblocks = &kp[h * kper + koff..][..lkp * hd];
                let vseq = &vh[(h * rows + s) * hd..(h * rows + e) * hd];
                let mut r0 = 0;
                while r0 < m {
                    let g = R.min(m - r0);
                    let qrow = |r: usize| &q[(i0 + r0 + r) * hidden + h * hd..][..hd];
                    level.scores(g, &qrow, kblocks, lkp, &mut scores);
                    for sr in scores.chunks_exact_mut(lkp).take(g) {
                        level.softmax(&mut sr[..lk], scale);
                    }
                    level.weighted_sum(g, &scores, lkp, lk, vseq, hd, &mut acc);
                    for r in 0..g {
                        let o = &mut out[(r0 + r) * hidden + h * hd..][..hd];
                        for (o, &a) in o.iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                            *o = bf16::from_f32(a);
                        }
                    }
                    r0 += g;
                }
            }
        });
    Tensor::from_vec(out, (rows, hidden), &Device::Cpu)
}

/// RoPE on one head's `hd` bf16 values (rotate-half form), rounded to bf16, widened back to f32. The same
/// expressions as candle's `rotary_emb::rope` on f32, so the bits equal the previous path's.
fn rope_row(x: &[bf16], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = cos.len();
    for i in 0..half {
        let (x1, x2) = (x[i].to_f32(), x[i + half].to_f32());
        let (c, s) = (cos[i], sin[i]);
        out[i] = bf16::from_f32(x1 * c - x2 * s).to_f32();
        out[i + half] = bf16::from_f32(x1 * s + x2 * c).to_f32();
    }
}

/// The instruction set the two inner loops are compiled for; every level computes the same bits (each lane
/// is its own chain of separate multiplies and adds in the same order).
#[derive(Clone, Copy)]
pub(super) enum Level {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Level {
    pub(super) fn best() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") {
                return Level::Avx2;
            }
        }
        Level::Portable
    }

    /// For `g ≤ R` query rows `qrow(r)`: `out[r · lkp + j] = q_r · k_j` for `j < lkp`, the keys packed as
    /// `[lkp / L][hd][L]` (lanes past the sequence are zero and ignored).
    pub(super) fn scores<'a>(
        self,
        g: usize,
        qrow: &dyn Fn(usize) -> &'a [f32],
        kb: &[f32],
        lkp: usize,
        out: &mut [f32],
    ) {
        let hd = qrow(0).len();
        assert!(g <= R && out.len() >= g * lkp && kb.len() >= hd * lkp && lkp % L == 0);
        let qs: [*const f32; R] = std::array::from_fn(|r| qrow(r.min(g - 1)).as_ptr());
        let os: [*mut f32; R] = std::array::from_fn(|r| out[r.min(g - 1) * lkp..].as_mut_ptr());
        let k = kb.as_ptr();
        let nb = lkp / L;
        // SAFETY: the pointers cover hd query values, lkp outputs and lkp · hd packed keys (asserted above);
        // the level was detected on this CPU.
        unsafe {
            match (self, g) {
                #[cfg(target_arch = "x86_64")]
                (Level::Avx512, R) => scores_avx512::<R>(qs, hd, k, nb, os),
                #[cfg(target_arch = "x86_64")]
                (Level::Avx512, _) => {
                    (0..g).for_each(|r| scores_avx512::<1>([qs[r]], hd, k, nb, [os[r]]))
                }
                #[cfg(target_arch = "x86_64")]
                (Level::Avx2, R) => scores_avx2::<R>(qs, hd, k, nb, os),
                #[cfg(target_arch = "x86_64")]
                (Level::Avx2, _) => {
                    (0..g).for_each(|r| scores_avx2::<1>([qs[r]], hd, k, nb, [os[r]]))
                }
                (Level::Portable, R) => scores_body::<R>(qs, hd, k, nb, os),
                (Level::Portable, _) => {
                    (0..g).for_each(|r| scores_body::<1>([qs[r]], hd, k, nb, [os[r]]))
                }
            }
        }
    }

    /// `x ← softmax(x · scale)` in place (lane-wise max, exp and sum, combined in a fixed order).
    pub(super) fn softmax(self, x: &mut [f32], scale: f32) {
        match self {
            // SAFETY: the level was detected on this CPU.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { softmax_avx512(x, scale) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { softmax_avx2(x, scale) },
            Level::Portable => softmax_body(x, scale),
        }
    }

    /// For `g ≤ R` rows of probabilities `p[r · lkp ..][..lk]`: `acc[r · hd + c] = Σ_j p_rj · v[j · stride + c]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn weighted_sum(
        self,
        g: usize,
        p: &[f32],
        lkp: usize,
        lk: usize,
        v: &[f32],
        stride: usize,
        acc: &mut [f32],
    ) {
        let hd = acc.len() / R;
        assert!(g <= R && p.len() >= g * lkp && lk <= lkp && lk >= 1);
        assert!(v.len() >= (lk - 1) * stride + hd);
        let ps: [*const f32; R] = std::array::from_fn(|r| p[r.min(g - 1) * lkp..].as_ptr());
        let os: [*mut f32; R] = std::array::from_fn(|r| acc[r.min(g - 1) * hd..].as_mut_ptr());
        let vp = v.as_ptr();
        // SAFETY: as in `scores`.
        unsafe {
            match (self, g) {
                #[cfg(target_arch = "x86_64")]
                (Level::Avx512, R) => wsum_avx512::<R>(ps, lk, vp, stride, hd, os),
                #[cfg(target_arch = "x86_64")]
                (Level::Avx512, _) => {
                    (0..g).for_each(|r| wsum_avx512::<1>([ps[r]], lk, vp, stride, hd, [os[r]]))
                }
                #[cfg(target_arch = "x86_64")]
                (Level::Avx2, R) => wsum_avx2::<R>(ps, lk, vp, stride, hd, os),
                #[cfg(target_arch = "x86_64")]
                (Level::Avx2, _) => {
                    (0..g).for_each(|r| wsum_avx2::<1>([ps[r]], lk, vp, stride, hd, [os[r]]))
                }
                (Level::Portable, R) => wsum_body::<R>(ps, lk, vp, stride, hd, os),
                (Level::Portable, _) => {
                    (0..g).for_each(|r| wsum_body::<1>([ps[r]], lk, vp, stride, hd, [os[r]]))
                }
            }
        }
    }
}

/// Query rows computed together: 4 rows × 2 blocks of L lanes = 8 independent accumulator chains, enough to
/// hide the add latency.
pub(super) const R: usize = 4;

#[inline(always)]
unsafe fn load(p: *const f32) -> [f32; L] {
    unsafe { (p as *const [f32; L]).read_unaligned() }
}

#[inline(always)]
unsafe fn scores_body<const G: usize>(
    q: [*const f32; G],
    hd: usize,
    kb: *const f32,
    blocks: usize,
    out: [*mut f32; G],
) {
    unsafe {
        let mut jb = 0;
        while jb < blocks {
            let two = jb + 1 < blocks;
            let mut a = [[[0f32; L]; 2]; G];
            let mut k0p = kb.add(jb * hd * L);
            let mut k1p = if two { k0p.add(hd * L) } else { k0p };
            for d in 0..hd {
                let k0 = load(k0p);
                let k1 = load(k1p);
                for r in 0..G {
                    let qd = *q[r].add(d);
                    for l in 0..L {
                        a[r][0][l] = qd.mul_add(k0[l], a[r][0][l]);
                        a[r][1][l] = qd.mul_add(k1[l], a[r][1][l]);
                    }
                }
                k0p = k0p.add(L);
                k1p = k1p.add(L);
            }
            for r in 0..G {
                (out[r].add(jb * L) as *mut [f32; L]).write_unaligned(a[r][0]);
                if two {
                    (out[r].add(jb * L + L) as *mut [f32; L]).write_unaligned(a[r][1]);
                }
            }
            jb += 2;
        }
    }
}

#[inline(always)]
fn softmax_body(x: &mut [f32], scale: f32) {
    let full = x.len() / L * L;
    let (body, tail) = x.split_at_mut(full);
    let mut m = [f32::NEG_INFINITY; L];
    for c in body.chunks_exact_mut(L) {
        for l in 0..L {
            c[l] *= scale;
            m[l] = m[l].max(c[l]);
        }
    }
    let mut max = f32::NEG_INFINITY;
    for t in tail.iter_mut() {
        *t *= scale;
        max = max.max(*t);
    }
    let max = m.iter().fold(max, |a, &b| a.max(b));
    let mut s = [0f32; L];
    for c in body.chunks_exact_mut(L) {
        for l in 0..L {
            c[l] = exp_lane(c[l] - max);
            s[l] += c[l];
        }
    }
    let mut sum = s.iter().sum::<f32>();
    for t in tail.iter_mut() {
        *t = exp_lane(*t - max);
        sum += *t;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax_avx512(x: &mut [f32], scale: f32) {
    softmax_body(x, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32], scale: f32) {
    softmax_body(x, scale)
}

#[inline(always)]
unsafe fn wsum_body<const G: usize>(
    p: [*const f32; G],
    lk: usize,
    v: *const f32,
    stride: usize,
    hd: usize,
    acc: [*mut f32; G],
) {
    unsafe {
        // Two chunks of L output lanes at a time held in registers across all keys; the ragged tail lane by
        // lane (each lane is the same chain over j in order either way).
        let mut c = 0;
        while c + L <= hd {
            let two = c + 2 * L <= hd;
            let mut a = [[[0f32; L]; 2]; G];
            let mut vp = v.add(c);
            for j in 0..lk {
                let x0 = load(vp);
                let x1 = if two { load(vp.add(L)) } else { [0f32; L] };
                for r in 0..G {
                    let pj = *p[r].add(j);
                    for l in 0..L {
                        a[r][0][l] = pj.mul_add(x0[l], a[r][0][l]);
                        a[r][1][l] = pj.mul_add(x1[l], a[r][1][l]);
                    }
                }
                vp = vp.add(stride);
            }
            for r in 0..G {
                (acc[r].add(c) as *mut [f32; L]).write_unaligned(a[r][0]);
                if two {
                    (acc[r].add(c + L) as *mut [f32; L]).write_unaligned(a[r][1]);
                }
            }
            c += if two { 2 * L } else { L };
        }
        for c in c..hd {
            for r in 0..G {
                let mut a = 0f32;
                for j in 0..lk {
                    a = (*p[r].add(j)).mul_add(*v.add(j * stride + c), a);
                }
                *acc[r].add(c) = a;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scores_avx512<const G: usize>(
    q: [*const f32; G],
    hd: usize,
    kb: *const f32,
    blocks: usize,
    out: [*mut f32; G],
) {
    unsafe { scores_body::<G>(q, hd, kb, blocks, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2<const G: usize>(
    q: [*const f32; G],
    hd: usize,
    kb: *const f32,
    blocks: usize,
    out: [*mut f32; G],
) {
    unsafe { scores_body::<G>(q, hd, kb, blocks, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn wsum_avx512<const G: usize>(
    p: [*const f32; G],
    lk: usize,
    v: *const f32,
    stride: usize,
    hd: usize,
    acc: [*mut f32; G],
) {
    unsafe { wsum_body::<G>(p, lk, v, stride, hd, acc) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wsum_avx2<const G: usize>(
    p: [*const f32; G],
    lk: usize,
    v: *const f32,
    stride: usize,
    hd: usize,
    acc: [*mut f32; G],
) {
    unsafe { wsum_body::<G>(p, lk, v, stride, hd, acc) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::{attend, MAX_SCORE_ELEMS};
    use crate::model::bf16_lanes::test_values::{bits, rand_bf16};
    use candle_core::DType;

    /// The previous path: candle's RoPE on f32 rounded to bf16, then `attend` per sequence.
    fn reference(
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &[(usize, usize)],
        heads: usize,
        hd: usize,
    ) -> Result<Tensor> {
        let n = cos.dim(0)?;
        let rows = qkv.dim(0)?;
        let qkv = qkv.reshape((rows / n, n, 3, heads, hd))?;
        let part = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let rot = |t: Tensor| -> Result<Tensor> {
            candle_nn::rotary_emb::rope(&t.to_dtype(DType::F32)?, cos, sin)?.to_dtype(DType::BF16)
        };
        // [images, heads, n, hd] → [heads, rows, hd]
        let flat = |t: Tensor| -> Result<Tensor> {
            t.transpose(0, 1)?.contiguous()?.reshape((heads, rows, hd))
        };
        let (q, k, v) = (
            flat(rot(part(0)?)?)?,
            flat(rot(part(1)?)?)?,
            flat(part(2)?)?,
        );
        let outs = seqs
            .iter()
            .filter(|(s, e)| e > s)
            .map(|&(s, e)| {
                let c = |t: &Tensor| t.narrow(1, s, e - s)?.unsqueeze(0);
                attend(&c(&q)?, &c(&k)?, &c(&v)?, MAX_SCORE_ELEMS, |_, _| Ok(None))?.squeeze(0)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 1)?
            .transpose(0, 1)?
            .reshape((rows, heads * hd))
    }

    fn case(n: usize, images: usize, win: usize, heads: usize, hd: usize) -> Result<(f32, f32)> {
        let rows = n * images;
        let qkv = rand_bf16((rows, 3 * heads * hd), 7, 2.0);
        let ang: Vec<f32> = (0..n * hd / 2)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let ang = Tensor::from_vec(ang, (n, hd / 2), &Device::Cpu)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let seqs: Vec<(usize, usize)> = (0..images)
            .flat_map(|i| {
                (0..n.div_ceil(win)).map(move |w| (i * n + w * win, i * n + ((w + 1) * win).min(n)))
            })
            .collect();
        let ours = attention(
            &qkv,
            &cos.flatten_all()?.to_vec1()?,
            &sin.flatten_all()?.to_vec1()?,
            n,
            &seqs,
            heads,
            hd,
        )?;
        let want = reference(&qkv, &cos, &sin, &seqs, heads, hd)?;
        let (a, b) = (bits(&ours), bits(&want));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f32 / a.len() as f32;
        let d = (ours.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let top = want
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        Ok((same, d / top))
    }

    /// Window and full attention against the previous candle path: the same bf16 value on almost every
    /// element (the f32 sums run in another order, which moves a value sitting on a rounding boundary by one
    /// bf16 step), never more than one bf16 step apart relative to the output's scale.
    #[test]
    fn attention_matches_candle_path() -> Result<()> {
        // head_dim 80 (the real one: 2 × 16 lanes + 16 + the 4-row groups), 12 (tail lanes only); windows
        // of 13 rows with a ragged last one, two images; and one sequence per image (full attention), also
        // long enough to run on the packed GEMM (`GEMM_KEYS`), with a ragged last task.
        for &(n, images, win, heads, hd) in &[
            (61, 2, 13, 3, 80),
            (61, 2, 61, 3, 80),
            (300, 2, 300, 2, 80),
            (30, 1, 7, 2, 12),
            (45, 2, 45, 2, 12),
        ] {
            let (same, rel) = case(n, images, win, heads, hd)?;
            assert!(
                same >= 0.97 && rel <= 1.0 / 64.0,
                "n {n} images {images} window {win} heads {heads}x{hd}: {same} equal, rel diff {rel}"
            );
        }
        Ok(())
    }

    /// Timing at the real widths (1564 rows, 16 heads of 80, windows of 64 and one full sequence):
    /// `cargo test -p rexomni --lib vision_cpu -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_timing_real_widths() -> Result<()> {
        let (n, heads, hd) = (1564, 16, 80);
        let qkv = rand_bf16((n, 3 * heads * hd), 3, 2.0);
        let ang: Vec<f32> = (0..n * hd / 2)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let ang = Tensor::from_vec(ang, (n, hd / 2), &Device::Cpu)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let (cv, sv) = (cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?);
        for win in [64, n] {
            let seqs: Vec<(usize, usize)> = (0..n.div_ceil(win))
                .map(|w| (w * win, ((w + 1) * win).min(n)))
                .collect();
            let t = std::time::Instant::now();
            let ours = attention(&qkv, &cv, &sv, n, &seqs, heads, hd)?;
            let a = t.elapsed();
            let t = std::time::Instant::now();
            let want = reference(&qkv, &cos, &sin, &seqs, heads, hd)?;
            let b = t.elapsed();
            let same = bits(&ours)
                .iter()
                .zip(bits(&want))
                .filter(|(x, y)| **x == *y)
                .count();
            println!(
                "window {win}: ours {:.1} ms, candle path {:.1} ms, {same}/{} equal",
                a.as_secs_f64() * 1e3,
                b.as_secs_f64() * 1e3,
                n * heads * hd
            );
        }
        Ok(())
    }
}
