//! Element-wise bf16 work on the CPU, written lane by lane so that it vectorises: rounding the GEMM's f32 sums
//! to bf16, the SwiGLU product, residual adds and RMSNorm, for the vision tower and the decoder alike.
//!
//! In: bf16 tensors (or slices) on the CPU. Out: bf16 tensors of the shapes the candle ops they replace return.
//! Runs on the caller's thread and candle's rayon pool.
//!
//! Why: once the linear layers ran on AMX tiles (gemm_bf16.rs), a perf profile of a bf16 frame at the real
//! widths put the element-wise work ahead of the matrix products: `half`'s scalar `bf16::from_f32` on every
//! GEMM output (14 % of the run), libm's `expf` for SiLU, and candle's bf16 ops, which widen and round element
//! by element. Each function here is one pass, compiled for AVX-512 and AVX2+FMA (chosen at run time) and
//! portable code, all three giving the same bits.
//!
//! Numerics: rounding is `half`'s (round to nearest even, NaN kept quiet), bit for bit. SiLU is
//! `v / (1 + e^−v)` in f32 as candle's kernel writes it, but with a vectorised `exp` within 2 ulp of libm's
//! (Cephes' reduction and polynomial), so an output may differ from the scalar path by one bf16 step where the
//! f32 value sits on a rounding boundary (torch's own vectorised `exp` differs from libm the same way). RMSNorm
//! normalises in f32 and rounds once, as numerics.rs's composite did; its sum of squares runs in 16 lanes, so
//! the root mean square may differ from candle's sequential sum in the last f32 bit. Each row is computed
//! alone, so a row's bits never depend on the rows around it (the draft-verification contract).

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Elements per rayon task of the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// Whether `t` takes this module's kernels (bf16 on the CPU).
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::BF16
}

/// Whether every tensor is a rank-4 bf16 CPU tensor: the operands the attention kernels take
/// (decode_attention.rs, prefill_attention.rs).
pub fn all_bf16_cpu_4d(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::BF16 && t.rank() == 4)
}

/// On/off for a CPU kernel that has a general fallback path: on unless a benchmark or test that compares the two
/// paths turns it off.
pub struct KernelSwitch(std::sync::atomic::AtomicBool);

impl KernelSwitch {
    pub const fn on() -> Self {
        Self(std::sync::atomic::AtomicBool::new(true))
    }

    pub fn set(&self, on: bool) {
        self.0.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_on(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Runs `f` on `t`'s values (made contiguous first).
pub(crate) fn with_bf16<R>(t: &Tensor, f: impl FnOnce(&[bf16]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(v)) = &*st else {
        candle_core::bail!(
            "bf16_lanes: expected a bf16 CPU tensor, got {:?}",
            t.dtype()
        )
    };
    let (a, b) = l
        .contiguous_offsets()
        .expect("a contiguous tensor has contiguous offsets");
    Ok(f(&v[a..b]))
}

/// Defines `pub(crate) fn $name(args)` that runs `$body` compiled for AVX-512, else AVX2+FMA, else portable.
/// The body must be lane-wise code that LLVM vectorises; every build computes the same bits (no reassociation:
/// Rust never reorders float operations).
macro_rules! vectorised {
    ($(#[$doc:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name($($a: $t),*) {
            #[inline(always)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
                unsafe fn avx512($($a: $t),*) {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) {
                    body($($a),*)
                }
                use $crate::model::bf16_lanes::Isa;
                match Isa::best() {
                    // SAFETY: the features were detected on this CPU.
                    Isa::Avx512 => return unsafe { avx512($($a),*) },
                    Isa::Avx2 => return unsafe { avx2($($a),*) },
                    Isa::Portable => {}
                }
            }
            body($($a),*)
        }
    };
}

pub(crate) use vectorised;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub(crate) fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("fma")
                {
                    return Isa::Avx512;
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }
}

/// `bf16::from_f32(v)` (round to nearest even; a NaN stays a quiet NaN) without branches, so that it vectorises.
#[inline(always)]
pub(crate) fn round_lane(v: f32) -> bf16 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x40;
    bf16::from_bits(if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    } as u16)
}

#[inline(always)]
pub(crate) fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// `e^x` for `x` in [−87, 88] (clamped there; below, e^−87 ≈ 1.6e−38 is nothing next to the 1 it is added to
/// in a softmax or a sigmoid; above, e^88 ≈ 1.7e38 already makes `v / (1 + e^x)` vanish), within 2 ulp of
/// libm's `expf`: Cephes' reduction and polynomial, lane by lane so that it vectorises.
#[inline(always)]
pub(crate) fn exp_lane(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // n = round(x / ln 2) by the 1.5 · 2^23 trick (ties to even), exact for |x / ln 2| < 2^22; the same
    // float's low mantissa bits hold n, from which 2^n is built with integer lane operations (no float→int
    // conversion, which would not vectorise with `as`'s saturating semantics).
    const MAGIC: f32 = 12_582_912.0;
    let t = x.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    y * two_n
}

vectorised! {
    /// `dst[i] = bf16(src[i] (+ bias[i]))`: a GEMM's f32 sums rounded once, the bias added in f32 first.
    fn round_into(dst: &mut [bf16], src: &[f32], bias: Option<&[f32]>) {
        match bias {
            Some(b) => {
                for ((d, &s), &b) in dst.iter_mut().zip(src).zip(b) {
                    *d = round_lane(s + b);
                }
            }
            None => {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = round_lane(s);
                }
            }
        }
    }
}

vectorised! {
    /// Each f32 as two bf16 parts, `hi = bf16(v)` and `lo = bf16(v − hi)`, so that `hi + lo` is within 2⁻¹⁶ · |v|
    /// of `v`: f32 operands for a bf16 GEMM (two calls, results added) at nearly f32 precision.
    fn split_into(hi: &mut [bf16], lo: &mut [bf16], src: &[f32]) {
        for ((h, l), &v) in hi.iter_mut().zip(lo.iter_mut()).zip(src) {
            let a = round_lane(v);
            *h = a;
            *l = round_lane(v - widen(a));
        }
    }
}

vectorised! {
    /// `out = bf16(bf16(silu(g)) · u)`, SiLU as `v / (1 + e^−v)` in f32.
    fn silu_mul_into(out: &mut [bf16], g: &[bf16], u: &[bf16]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            let v = widen(g);
            let s = round_lane(v / (1.0 + exp_lane(-v)));
            *o = round_lane(widen(s) * widen(u));
        }
    }
}

vectorised! {
    /// `out = bf16(a + b)` (the f32 sum rounded once, as candle's bf16 add).
    fn add_into(out: &mut [bf16], a: &[bf16], b: &[bf16]) {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = round_lane(widen(a) + widen(b));
        }
    }
}

vectorised! {
    /// One RMSNorm row: `out = bf16(x / sqrt(mean(x²) + eps) · w)`, all in f32; the sum of squares in 16
    /// lanes (each over every 16th element, in order), the lanes then added in order.
    fn rms_norm_row(out: &mut [bf16], x: &[bf16], w: &[f32], eps: f32) {
        let mut lanes = [0f32; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                let v = widen(v);
                *l = v.mul_add(v, *l);
            }
        }
        for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
            let v = widen(v);
            *l = v.mul_add(v, *l);
        }
        let sum = lanes.iter().fold(0f32, |s, &l| s + l);
        let d = (sum / x.len() as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
            *o = round_lane(widen(v) / d * w);
        }
    }
}

/// `bf16(bf16(silu(g)) · u)` over two same-shape bf16 CPU tensors, in one parallel pass.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    binary(g, u, "silu_mul", silu_mul_into)
}

/// `a + b` in bf16 (f32 sum rounded once), in one parallel pass.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, "add", add_into)
}

fn binary(
    a: &Tensor,
    b: &Tensor,
    what: &str,
    f: fn(&mut [bf16], &[bf16], &[bf16]),
) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!("{what}: shapes {:?} and {:?}", a.shape(), b.shape())
    }
    let out = with_bf16(a, |a| {
        with_bf16(b, |b| {
            let mut out = vec![bf16::ZERO; a.len()];
            out.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(o, (a, b))| f(o, a, b));
            out
        })
    })??;
    Tensor::from_vec(out, a.shape(), &Device::Cpu)
}

/// RMSNorm over the last dimension of a bf16 CPU tensor with an f32 weight, rows in parallel.
pub fn rms_norm(x: &Tensor, w: &[f32], eps: f32) -> Result<Tensor> {
    let h = x.dim(candle_core::D::Minus1)?;
    if h != w.len() {
        candle_core::bail!("rms_norm: rows of {h} against a weight of {}", w.len())
    }
    let out = with_bf16(x, |x| {
        let mut out = vec![bf16::ZERO; x.len()];
        let rows_per_task = (CHUNK / h.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * h)
            .zip(x.par_chunks(rows_per_task * h))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(h).zip(x.chunks(h)) {
                    rms_norm_row(o, x, w, eps);
                }
            });
        out
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

vectorised! {
    /// One row of rotate-half RoPE: `x` is `[x1 | x2]` (`d / 2` each), `cos`/`sin` `d / 2` values. Every product,
    /// difference and sum is rounded to bf16 as `half`'s operators round it (candle's bf16 `rope`).
    fn rope_row(out: &mut [bf16], x: &[bf16], cos: &[bf16], sin: &[bf16]) {
        let half = cos.len();
        let (x1, x2) = x.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        let r = |v: f32| widen(round_lane(v));
        for i in 0..half {
            let (a, b, c, s) = (widen(x1[i]), widen(x2[i]), widen(cos[i]), widen(sin[i]));
            o1[i] = round_lane(r(a * c) - r(b * s));
            o2[i] = round_lane(r(a * s) + r(b * c));
        }
    }
}

/// candle's `rotary_emb::rope` on bf16, bit for bit, vectorised: `x [B, H, T, d]`, `cos`/`sin` `[T, d / 2]` or
/// `[B, T, d / 2]` (per batch row). candle's CPU kernel rounds each of its six bf16 operations through `half`'s
/// scalar conversions: 12 % of a real-config prefill.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let per_row = cos.rank() == 3;
    let want: &[usize] = if per_row { &[b, t, d / 2] } else { &[t, d / 2] };
    if d % 2 != 0 || cos.dims() != want || sin.dims() != want {
        candle_core::bail!(
            "rope: x {:?} against cos {:?} / sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    let out = with_bf16(x, |x| {
        with_bf16(cos, |cos| {
            with_bf16(sin, |sin| {
                let mut out = vec![bf16::ZERO; x.len()];
                out.par_chunks_mut(t * d)
                    .zip(x.par_chunks(t * d))
                    .enumerate()
                    .for_each(|(bh, (o, x))| {
                        let table = if per_row { (bh / h) * t * d / 2 } else { 0 };
                        for (i, (o, x)) in o.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                            let at = table + i * d / 2;
                            rope_row(o, x, &cos[at..at + d / 2], &sin[at..at + d / 2]);
                        }
                    });
                out
            })
        })
    })???;
    Tensor::from_vec(out, (b, h, t, d), &Device::Cpu)
}

/// Deterministic bf16 test tensors, shared by this module's tests and vision_cpu.rs's.
#[cfg(test)]
pub(crate) mod test_values {
    use candle_core::{Device, Tensor};
    use half::bf16;

    /// `shape` bf16 values uniform in [−scale, scale), from a xorshift stream (no RNG dependency).
    pub fn rand_bf16(shape: (usize, usize), seed: u64, scale: f32) -> Tensor {
        let n = shape.0 * shape.1;
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<bf16> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                bf16::from_f32((((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale)
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A bf16 tensor's values as bits, for bit-for-bit comparisons.
    pub fn bits(t: &Tensor) -> Vec<u16> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap()
            .iter()
            .map(|b| b.to_bits())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_values::{bits, rand_bf16};
    use super::*;

    /// The branch-free rounding is `half`'s, bit for bit, on every class of f32: zeros, subnormals, ties,
    /// the largest finite values (which round to infinity), infinities and NaNs.
    #[test]
    fn round_lane_is_halfs_rounding() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7fff_ffff),
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x3f80_8000), // a tie, even below
            f32::from_bits(0x3f81_8000), // a tie, odd below
        ];
        let mut s = 1u32;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            specials.push(f32::from_bits(s));
        }
        for v in specials {
            assert_eq!(
                round_lane(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
        // And through the vectorised slice function, with and without a bias.
        let src: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let bias: Vec<f32> = (0..1000).map(|i| i as f32 * 1e-3).collect();
        let mut dst = vec![bf16::ZERO; 1000];
        round_into(&mut dst, &src, Some(&bias));
        for i in 0..1000 {
            assert_eq!(dst[i], bf16::from_f32(src[i] + bias[i]));
        }
    }

    /// The exponential is within 2 ulp of libm's `expf` over the softmax's and the sigmoid's range.
    #[test]
    fn exp_lane_is_accurate() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (a, b) = (exp_lane(x), x.exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst <= 2.0 * f32::EPSILON, "worst relative error {worst}");
    }

    /// `rope` is candle's bf16 `rope` bit for bit: one table for all rows and one per batch row, a prefill
    /// (`T > 1`) and a step (`T = 1`, candle's separate loop), head dims 128 and 6.
    #[test]
    fn rope_is_candles_bit_for_bit() -> Result<()> {
        for (b, h, t, d) in [(2, 3, 17, 128), (3, 2, 1, 128), (1, 4, 9, 6)] {
            let x = rand_bf16((b * h * t, d), 5, 8.0).reshape((b, h, t, d))?;
            for per_row in [false, true] {
                let rows = if per_row { b * t } else { t };
                let ang = rand_bf16((rows, d / 2), 6, 3.0);
                let (cos, sin) = (ang.cos()?, ang.sin()?);
                let (cos, sin) = if per_row {
                    (cos.reshape((b, t, d / 2))?, sin.reshape((b, t, d / 2))?)
                } else {
                    (cos, sin)
                };
                let want = candle_nn::rotary_emb::rope(&x, &cos, &sin)?;
                assert_eq!(
                    bits(&rope(&x, &cos, &sin)?),
                    bits(&want),
                    "b{b} h{h} t{t} d{d} per_row {per_row}"
                );
            }
        }
        Ok(())
    }

    /// `add` is bit-identical to candle's bf16 add; `silu_mul` to the scalar-`exp` composite
    /// (`numerics::silu(g) * u`) except where the 2-ulp `exp` moves a value across a bf16 rounding boundary,
    /// and then by one bf16 step.
    #[test]
    fn silu_mul_and_add_match_candle() -> Result<()> {
        let g = rand_bf16((37, 3000), 1, 12.0);
        let u = rand_bf16((37, 3000), 2, 3.0);
        assert_eq!(bits(&add(&g, &u)?), bits(&g.add(&u)?), "add");
        let ours = silu_mul(&g, &u)?.flatten_all()?.to_vec1::<bf16>()?;
        let want = (crate::model::numerics::silu(&g)? * &u)?
            .flatten_all()?
            .to_vec1::<bf16>()?;
        let mut differing = 0;
        for (a, b) in ours.iter().zip(&want) {
            if a != b {
                differing += 1;
                let step = b.to_f32().abs() * 2f32.powi(-7) + 1e-30;
                assert!((a.to_f32() - b.to_f32()).abs() <= step, "{a} vs {b}");
            }
        }
        assert!(
            differing <= ours.len() / 1000,
            "{differing} of {} differ",
            ours.len()
        );
        Ok(())
    }

    /// RMSNorm equals the f32 composite rounded once, but for rare one-step differences from the summation
    /// order of the mean square; rows are independent of each other.
    #[test]
    fn rms_norm_matches_the_f32_composite() -> Result<()> {
        use candle_core::D;
        let x = rand_bf16((29, 1280), 3, 4.0);
        let w: Vec<f32> = (0..1280).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let ours = rms_norm(&x, &w, 1e-6)?;
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let wt = Tensor::from_slice(&w, 1280, &Device::Cpu)?;
        let want = xf
            .broadcast_div(&(ms + 1e-6)?.sqrt()?)?
            .broadcast_mul(&wt)?
            .to_dtype(DType::BF16)?;
        let (a, b) = (bits(&ours), bits(&want));
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(
            differing <= a.len() / 100,
            "{differing} of {} differ",
            a.len()
        );
        let one = rms_norm(&x.narrow(0, 17, 1)?, &w, 1e-6)?;
        assert_eq!(bits(&one), a[17 * 1280..18 * 1280].to_vec(), "row 17 alone");
        Ok(())
    }
}
