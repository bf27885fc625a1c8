//! f32 `x · Wᵀ` on the CPU for the few-row case: decode steps (one row per sequence of the batch) and
//! drafts' verification blocks, with f32 weights (the CPU default dtype).
//!
//! Why: candle 0.11.1 sends these shapes to the `gemm` crate, which packs the weight panel it is about to use on
//! every call. A decode step reads every weight of the model once, so packing turns one pass over ~2.5 GB (the
//! real-width 4-layer config) into a read, a write and a second read: measured on this VM, one row of the
//! 2048×11008 MLP weight ran at 6.9 GB/s and four rows at 4.8 GB/s. Here each weight row is read once, while it
//! streams past, and dotted with every `x` row (kept in cache), so a step costs one pass over the weights
//! whatever the number of rows up to [`MAX_ROWS`]: the memory-bandwidth bound.
//!
//! Batch invariance: each output is one dot product whose sum order depends only on `k` (16 lanes in chunk
//! order, then the lanes in order, then the tail), never on `m` or on which other rows share the call. So a row
//! gives bit for bit the same result alone, in a batch of four, or as one row of a verification block: the
//! property continuous batching and drafts rely on (candle's one-row GEMV and its GEMM micro-kernel sum in
//! different orders).
//!
//! In: `x` `[m, k]` f32 (m ≤ [`MAX_ROWS`]), `w` `[n, k]` f32 (a `Linear` weight), both contiguous.
//! Out: `[m, n]` f32. Runs on the rayon pool candle already uses for CPU ops.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;

use super::cpu_bf16::RowsTimesWeightT;

/// Above this many rows the weight is reused enough that candle's packed GEMM is faster.
pub const MAX_ROWS: usize = 64;

/// Weight rows per rayon task: big enough to amortise scheduling, small enough to balance 2..64 cores.
const ROWS_PER_TASK: usize = 64;

/// `x` rows dotted with the same weight rows in a single pass (a register tile's height).
const GROUP: usize = 4;

/// Lanes of every dot product's partial sums: fixed, so the sum order never depends on the group size.
const LANES: usize = 16;

/// The custom op: `x [m, k] · w [n, k]ᵀ` → `[m, n]`, for f32 on the CPU.
pub struct F32RowsTimesWeightT;

impl CustomOp2 for F32RowsTimesWeightT {
    fn name(&self) -> &'static str {
        "f32-rows-times-weight-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("{}: both operands must be f32", self.name())
        };
        let RowsTimesWeightT { m, k, n, x, w } = RowsTimesWeightT::of(self.name(), x, l1, w, l2)?;
        let out = rows_times_weight_t(x, w, m, k, n);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// `x [m,k] · w [n,k]ᵀ` → `[m,n]`. Public for rexbench's GEMM comparison.
#[doc(hidden)]
pub fn rows_times_weight_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "w is not [{n}, {k}]");
    let block = block_for_this_cpu();
    // Column-major result chunks (one per task: ROWS_PER_TASK weight rows × m), transposed at the end.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let j0 = task * ROWS_PER_TASK;
            let rows = chunk.len() / m;
            block(x, &w[j0 * k..(j0 + rows) * k], k, m, chunk);
        });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

/// `out_t[j·m + i] = x row i · w row j` for every `x` row and every row of `w` (a task's weight rows), compiled
/// for the best instruction set this CPU has (release builds target baseline x86-64: SSE2, no FMA).
type Block = fn(&[f32], &[f32], usize, usize, &mut [f32]);

fn block_for_this_cpu() -> Block {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return |x, w, k, m, out_t| {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { x86::block_avx512(x, w, k, m, out_t) }
            };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return |x, w, k, m, out_t| {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                unsafe { x86::block_avx2_fma(x, w, k, m, out_t) }
            };
        }
    }
    block_tiled::<Portable, 1>
}

/// 16 f32 lanes of partial sums, as one instruction set holds them. Every implementation does the same
/// arithmetic per lane (a fused multiply-add), so they all give the same bits.
trait Lanes16: Copy {
    fn zero() -> Self;
    /// # Safety
    /// `p` points at 16 readable f32 and the CPU has the instruction set.
    unsafe fn load(p: *const f32) -> Self;
    /// `a · b + self`, fused.
    fn fma(self, a: Self, b: Self) -> Self;
    fn to_array(self) -> [f32; LANES];
}

/// Scalar lanes: for CPUs without AVX2 (and other architectures).
#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Lanes16 for Portable {
    fn zero() -> Self {
        Self([0.0; LANES])
    }
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 16 readable f32 at `p`.
        Self(unsafe { std::ptr::read_unaligned(p as *const [f32; LANES]) })
    }
    fn fma(self, a: Self, b: Self) -> Self {
        Self(std::array::from_fn(|l| a.0[l].mul_add(b.0[l], self.0[l])))
    }
    fn to_array(self) -> [f32; LANES] {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block_tiled, Lanes16, LANES};
    use std::arch::x86_64::*;

    /// One zmm register.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    impl Lanes16 for Avx512 {
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: only reached from `block_avx512`, which requires AVX-512F.
            Self(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller guarantees 16 readable f32 and AVX-512F.
            Self(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: as `zero`.
            Self(unsafe { _mm512_fmadd_ps(a.0, b.0, self.0) })
        }
        #[inline(always)]
        fn to_array(self) -> [f32; LANES] {
            // SAFETY: __m512 and [f32; 16] have the same size, and every bit pattern is a valid f32.
            unsafe { std::mem::transmute(self.0) }
        }
    }

    /// Two ymm registers: lanes 0..8 and 8..16.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256, __m256);

    impl Lanes16 for Avx2 {
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: only reached from `block_avx2_fma`, which requires AVX2 and FMA.
            unsafe { Self(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller guarantees 16 readable f32 and AVX2.
            unsafe { Self(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe {
                Self(
                    _mm256_fmadd_ps(a.0, b.0, self.0),
                    _mm256_fmadd_ps(a.1, b.1, self.1),
                )
            }
        }
        #[inline(always)]
        fn to_array(self) -> [f32; LANES] {
            // SAFETY: two __m256 are 16 f32 in lane order, and every bit pattern is a valid f32.
            unsafe { std::mem::transmute([self.0, self.1]) }
        }
    }

    /// 4 weight rows × 4 `x` rows: 16 accumulators, one zmm register each (of 32).
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn block_avx512(x: &[f32], w: &[f32], k: usize, m: usize, out_t: &mut [f32]) {
        block_tiled::<Avx512, 4>(x, w, k, m, out_t)
    }

    /// 2 weight rows × 4 `x` rows: 8 accumulators of two ymm registers each (16 of 16: the loads go from
    /// memory operands).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2_fma(
        x: &[f32],
        w: &[f32],
        k: usize,
        m: usize,
        out_t: &mut [f32],
    ) {
        block_tiled::<Avx2, 2>(x, w, k, m, out_t)
    }
}

/// Tiles of `J` weight rows × up to [`GROUP`] `x` rows; the weight rows left over go one at a time.
#[inline(always)]
fn block_tiled<V: Lanes16, const J: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    m: usize,
    out_t: &mut [f32],
) {
    let n = w.len() / k;
    let mut j = 0;
    while j < n {
        if j + J <= n {
            rows_tile::<V, J>(
                x,
                &w[j * k..(j + J) * k],
                k,
                m,
                &mut out_t[j * m..(j + J) * m],
            );
            j += J;
        } else {
            rows_tile::<V, 1>(
                x,
                &w[j * k..(j + 1) * k],
                k,
                m,
                &mut out_t[j * m..(j + 1) * m],
            );
            j += 1;
        }
    }
}

/// `J` weight rows against every `x` row, in groups of [`GROUP`] rows.
#[inline(always)]
fn rows_tile<V: Lanes16, const J: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    m: usize,
    out_t: &mut [f32],
) {
    let mut i = 0;
    while i < m {
        let r = (m - i).min(GROUP);
        let xs = &x[i * k..(i + r) * k];
        match r {
            4 => tile::<V, J, 4>(xs, w, k, m, i, out_t),
            3 => tile::<V, J, 3>(xs, w, k, m, i, out_t),
            2 => tile::<V, J, 2>(xs, w, k, m, i, out_t),
            _ => tile::<V, J, 1>(xs, w, k, m, i, out_t),
        }
        i += r;
    }
}

/// The `R × J` dot products of `R` rows of `x` with `J` rows of `w`, in one pass over both: per pair 16
/// lanes of partial sums, fed by shared loads. Every pair's sum is ordered the same way (lanes over `k` in
/// chunk order, then the 16 lanes in order, then the tail), whatever `R`, `J` and the instruction set are.
#[inline(always)]
fn tile<V: Lanes16, const J: usize, const R: usize>(
    xs: &[f32],
    ws: &[f32],
    k: usize,
    m: usize,
    i0: usize,
    out_t: &mut [f32],
) {
    assert!(xs.len() >= R * k && ws.len() >= J * k);
    let body = k / LANES * LANES;
    let mut acc = [[V::zero(); J]; R];
    let mut c = 0;
    while c < body {
        let mut wv = [V::zero(); J];
        for (b, wv) in wv.iter_mut().enumerate() {
            // SAFETY: c + 16 ≤ body ≤ k, so row b's chunk is inside `ws` (asserted above).
            *wv = unsafe { V::load(ws.as_ptr().add(b * k + c)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above, for `xs`.
            let xv = unsafe { V::load(xs.as_ptr().add(r * k + c)) };
            for (acc, &wv) in acc.iter_mut().zip(&wv) {
                *acc = acc.fma(xv, wv);
            }
        }
        c += LANES;
    }
    for (r, acc) in acc.iter().enumerate() {
        let x = &xs[r * k..(r + 1) * k];
        for (b, acc) in acc.iter().enumerate() {
            let wr = &ws[b * k..(b + 1) * k];
            let tail: f32 = x[body..].iter().zip(&wr[body..]).map(|(a, b)| a * b).sum();
            out_t[b * m + i0 + r] = acc.to_array().iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Against a plain f64 dot product, for shapes with tails (k not a multiple of 16, n not a multiple of
    /// the task size, m not a multiple of the group).
    #[test]
    fn matches_a_plain_dot_product() {
        for (m, k, n) in [(1, 37, 5), (3, 128, 130), (7, 1000, 257), (64, 40, 70)] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            let y = rows_times_weight_t(&x, &w, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * (k as f64).sqrt(),
                        "m={m} k={k} n={n} [{i},{j}]: {got} vs {exact}"
                    );
                }
            }
        }
    }

    /// Every instruction set this CPU has gives the portable path's bits (a machine's choice of path must not
    /// change a token).
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let (m, k, n) = (7, 203, 11);
        let (x, w) = (values(m * k, 5), values(n * k, 6));
        let run = |block: Block| {
            let mut out_t = vec![0f32; n * m];
            block(&x, &w, k, m, &mut out_t);
            out_t
        };
        let portable = run(block_tiled::<Portable, 1>);
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: checked just above.
                let avx2 = run(|x, w, k, m, o| unsafe { x86::block_avx2_fma(x, w, k, m, o) });
                assert_eq!(avx2, portable, "AVX2");
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: checked just above.
                let avx512 = run(|x, w, k, m, o| unsafe { x86::block_avx512(x, w, k, m, o) });
                assert_eq!(avx512, portable, "AVX-512");
            }
        }
    }

    /// A row's outputs are bit for bit the same whatever rows share the call (batch invariance).
    #[test]
    fn a_row_alone_equals_the_row_in_any_batch() {
        let (k, n) = (300, 97);
        let w = values(n * k, 3);
        let x = values(9 * k, 4);
        let batched = rows_times_weight_t(&x, &w, 9, k, n);
        for i in 0..9 {
            let alone = rows_times_weight_t(&x[i * k..(i + 1) * k], &w, 1, k, n);
            assert_eq!(alone, batched[i * n..(i + 1) * n], "row {i}");
        }
    }
}
