//! bf16 `x · Wᵀ` on the CPU for the few-row case (decode steps: one row per sequence of the batch), and the
//! entry point of packed bf16 layers ([`packed_forward`], gemm_bf16.rs), which every bf16 CPU linear now uses.
//! The row kernel below runs only where a bf16 weight stays unpacked (`REXOMNI_BF16_GEMM=candle`, the
//! before/after benchmark switch) and in rexbench-gemm's comparison.
//!
//! Why: candle 0.11.1 has no CPU bf16 GEMM; its `matmul` widens BOTH operands to f32 on every call
//! (cpu_backend/mod.rs, "no bf16 gemm kernel yet"). For a prefill that cost is amortised over hundreds of rows,
//! but a decode step would re-widen every weight of the model per token: 6 GB of conversion for the 3B model,
//! several times slower than reading the weights once. Here each weight row is widened in registers while it
//! streams past, so a decode step reads the bf16 weights once — the memory-bandwidth bound.
//!
//! In: `x` `[m, k]` bf16 (m ≤ [`MAX_ROWS`]), `w` `[n, k]` bf16 (a `Linear` weight), both contiguous.
//! Out: `[m, n]` bf16, accumulated in f32. Runs on the rayon pool candle already uses for CPU ops.
//! f32 few-row calls go to cpu_f32.rs; other dtypes and devices go to candle, with batched `[B, L, k]` rows
//! flattened into one matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Linear;
use half::bf16;
use rayon::prelude::*;

use super::cpu_f32;
use super::gemm_bf16::PackedBf16;

/// Above this many rows the widening cost is amortised and candle's GEMM is faster.
pub const MAX_ROWS: usize = 64;

/// Weight rows per rayon task: big enough to amortise scheduling, small enough to balance 2..64 cores.
const ROWS_PER_TASK: usize = 64;

/// `Linear::forward`, with the bf16 few-row case routed to [`Bf16RowsTimesWeightT`].
pub fn linear_forward(linear: &Linear, x: &Tensor) -> Result<Tensor> {
    let w = linear.weight();
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
    if x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && rows <= cpu_f32::MAX_ROWS
    {
        return few_rows_f32(linear, x, rows);
    }
    if !(x.device().is_cpu()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && rows <= MAX_ROWS)
    {
        // candle's `Linear` on `[B, L, k]` broadcasts the weight to `[B, k, n]` and runs B matmuls, which reads
        // every weight B times in a batched decode step (L = 1); one `[B·L, k]` matmul reads it once.
        return match *x.dims() {
            [b, l, k] if b > 1 => linear.forward(&x.reshape((b * l, k))?)?.reshape((b, l, ())),
            _ => linear.forward(x),
        };
    }
    let mut out_dims = x.dims().to_vec();
    let k = *out_dims.last().expect("x has a last dimension");
    let n = w.dim(0)?;
    *out_dims.last_mut().expect("x has a last dimension") = n;
    let x2 = x.reshape((rows, k))?.contiguous()?;
    let y = x2.apply_op2_no_bwd(&w.contiguous()?, &Bf16RowsTimesWeightT { f32_out: false })?;
    let y = match linear.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape(out_dims)
}

/// f32 few rows on the CPU: [`cpu_f32::F32RowsTimesWeightT`] (one pass over the weight, batch-invariant).
fn few_rows_f32(linear: &Linear, x: &Tensor, rows: usize) -> Result<Tensor> {
    let w = linear.weight();
    let mut out_dims = x.dims().to_vec();
    let k = *out_dims.last().expect("x has a last dimension");
    *out_dims.last_mut().expect("x has a last dimension") = w.dim(0)?;
    let x2 = x.reshape((rows, k))?.contiguous()?;
    let y = x2.apply_op2_no_bwd(&w.contiguous()?, &cpu_f32::F32RowsTimesWeightT)?;
    let y = match linear.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape(out_dims)
}

/// `x [.., k]` times a packed bf16 weight (every bf16 linear layer on the CPU, any number of rows), plus the
/// bias (added in f32 before the single rounding to bf16). An `x` of another dtype (never in a bf16 model)
/// takes the unpacked weight through candle.
pub fn packed_forward(
    w: &PackedBf16,
    bias: Option<&Tensor>,
    bias_f32: Option<&Vec<f32>>,
    x: &Tensor,
) -> Result<Tensor> {
    packed(w, bias, bias_f32, x, false)
}

/// [`packed_forward`] with f32 outputs, the accumulators (plus bias) unrounded: the lm_head (see
/// [`linear_forward_f32`] for why).
pub fn packed_forward_f32(
    w: &PackedBf16,
    bias: Option<&Tensor>,
    bias_f32: Option<&Vec<f32>>,
    x: &Tensor,
) -> Result<Tensor> {
    packed(w, bias, bias_f32, x, true)
}

fn packed(
    w: &PackedBf16,
    bias: Option<&Tensor>,
    bias_f32: Option<&Vec<f32>>,
    x: &Tensor,
    f32_out: bool,
) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    if k != w.k() {
        candle_core::bail!("linear: input has {k} features, the weight takes {}", w.k())
    }
    let rows = x.elem_count() / k.max(1);
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = w.n();
    if !(x.device().is_cpu() && x.dtype() == DType::BF16) {
        let wt = Tensor::from_vec(w.unpack(), (w.n(), w.k()), x.device())?.to_dtype(x.dtype())?;
        let y = x.reshape((rows, k))?.matmul(&wt.t()?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        };
        let y = if f32_out { y.to_dtype(DType::F32)? } else { y };
        return y.reshape(out_dims);
    }
    let x2 = x.reshape((rows, k))?.contiguous()?;
    x2.apply_op1_no_bwd(&PackedMatmul {
        w,
        bias: bias_f32.map(|b| b.as_slice()),
        f32_out,
    })?
    .reshape(out_dims)
}

/// The custom op behind [`packed_forward`] and [`packed_forward_f32`].
struct PackedMatmul<'a> {
    w: &'a PackedBf16,
    bias: Option<&'a [f32]>,
    /// Return the f32 accumulators instead of rounding them to bf16.
    f32_out: bool,
}

impl candle_core::CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "bf16-packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::BF16(x) = s else {
            candle_core::bail!("{}: x must be bf16", self.name())
        };
        let (m, _) = l.shape().dims2()?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: x must be contiguous", self.name())
        };
        let y = if self.f32_out {
            CpuStorage::F32(self.w.matmul_f32(&x[a..b], m, self.bias))
        } else {
            CpuStorage::BF16(self.w.matmul(&x[a..b], m, self.bias))
        };
        Ok((y, Shape::from((m, self.w.n()))))
    }
}

/// `x · Wᵀ` with f32 outputs: the lm_head, whose logits the caller wants in f32 anyway. On the CPU with bf16
/// weights and few rows the f32 accumulators are returned as they are instead of being rounded to bf16
/// first: logits of 10-20 would otherwise sit on a 0.06-0.125 grid, and two neighbouring coordinate bins whose
/// f32 logits differ by less than that become a tie or swap (transformers rounds there too, `lm_head` in the
/// model dtype; rounding less than it is the point). Everything else: [`linear_forward`], then widened.
pub fn linear_forward_f32(linear: &Linear, x: &Tensor) -> Result<Tensor> {
    let w = linear.weight();
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
    if !(x.device().is_cpu()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && rows <= MAX_ROWS)
    {
        return linear_forward(linear, x)?.to_dtype(DType::F32);
    }
    let mut out_dims = x.dims().to_vec();
    let k = *out_dims.last().expect("x has a last dimension");
    *out_dims.last_mut().expect("x has a last dimension") = w.dim(0)?;
    let x2 = x.reshape((rows, k))?.contiguous()?;
    let y = x2.apply_op2_no_bwd(&w.contiguous()?, &Bf16RowsTimesWeightT { f32_out: true })?;
    let y = match linear.bias() {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    y.reshape(out_dims)
}

/// The custom op behind [`linear_forward`] (bf16 out) and [`linear_forward_f32`] (f32 out).
pub struct Bf16RowsTimesWeightT {
    /// Return the f32 accumulators instead of rounding them to bf16.
    pub f32_out: bool,
}

impl CustomOp2 for Bf16RowsTimesWeightT {
    fn name(&self) -> &'static str {
        "bf16-rows-times-weight-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::BF16(x), CpuStorage::BF16(w)) = (s1, s2) else {
            candle_core::bail!("{}: both operands must be bf16", self.name())
        };
        let RowsTimesWeightT { m, k, n, x, w } = RowsTimesWeightT::of(self.name(), x, l1, w, l2)?;
        let out = rows_times_weight_t(x, w, m, k, n);
        let out = if self.f32_out {
            CpuStorage::F32(out)
        } else {
            CpuStorage::BF16(out.into_iter().map(bf16::from_f32).collect())
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// The operands of an `x [m, k] · w [n, k]ᵀ` custom op (this file's and cpu_f32.rs's), checked: both 2-D with
/// the same `k`, both contiguous; `x` and `w` are their elements.
pub(super) struct RowsTimesWeightT<'a, T> {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub x: &'a [T],
    pub w: &'a [T],
}

impl<'a, T> RowsTimesWeightT<'a, T> {
    pub fn of(op: &str, x: &'a [T], l1: &Layout, w: &'a [T], l2: &Layout) -> Result<Self> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("{op}: x is [{m}, {k}] but w is [{n}, {k2}]")
        }
        let (Some((xa, xb)), Some((wa, wb))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("{op}: operands must be contiguous")
        };
        Ok(Self {
            m,
            k,
            n,
            x: &x[xa..xb],
            w: &w[wa..wb],
        })
    }
}

fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// `x [m,k] · w [n,k]ᵀ` → `[m,n]` f32. Each weight row is read once and dotted with every (f32-widened) x row.
/// Public for rexbench's GEMM comparison (the previous few-row path).
#[doc(hidden)]
pub fn rows_times_weight_t(x: &[bf16], w: &[bf16], m: usize, k: usize, n: usize) -> Vec<f32> {
    let xf: Vec<f32> = x.iter().map(|&v| widen(v)).collect();
    let dot = dot_for_this_cpu();
    // Column-major result chunks (one per task: ROWS_PER_TASK weight rows × m), transposed at the end.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let j0 = task * ROWS_PER_TASK;
            let mut wrow = vec![0f32; k];
            for (jj, outs) in chunk.chunks_mut(m).enumerate() {
                let row = &w[(j0 + jj) * k..(j0 + jj + 1) * k];
                for (d, &s) in wrow.iter_mut().zip(row) {
                    *d = widen(s);
                }
                for (i, o) in outs.iter_mut().enumerate() {
                    *o = dot(&xf[i * k..(i + 1) * k], &wrow);
                }
            }
        });
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

/// The dot product compiled for the best instruction set this CPU has. Release builds target baseline x86-64
/// (SSE2, no FMA), which makes a batched decode step compute-bound; AVX2+FMA is chosen at run time.
fn dot_for_this_cpu() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return |a, b| {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { dot_avx2_fma(a, b) }
        };
    }
    dot
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// Dot product with 16 independent accumulators, so the compiler keeps them in vector registers (a single
/// running sum would serialise every add); `mul_add` becomes a vector FMA where the target has one.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ac, at) = a.split_at(a.len() / LANES * LANES);
    let (bc, bt) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let tail: f32 = at.iter().zip(bt).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Same result as candle's widen-multiply-narrow path, for shapes with tails (k not a multiple of 16,
    /// n not a multiple of the task size) and with a bias.
    #[test]
    fn matches_candle_matmul() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 37, 5), (3, 128, 130), (8, 1000, 257)] {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?.to_dtype(DType::BF16)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(DType::BF16)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?.to_dtype(DType::BF16)?;
            let lin = Linear::new(w, Some(b));
            let ours = linear_forward(&lin, &x)?.to_dtype(DType::F32)?;
            // The f32 batched path (flattened rows) against candle's broadcast matmul.
            let xf = Tensor::randn(0f32, 1.0, (3, 1, k), &dev)?;
            let linf = Linear::new(lin.weight().to_dtype(DType::F32)?, None);
            let (a, b) = (linear_forward(&linf, &xf)?, linf.forward(&xf)?);
            assert_eq!(a.dims(), b.dims());
            assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-3);
            let theirs = lin.forward(&x)?.to_dtype(DType::F32)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
            // Both accumulate in f32 and round once to bf16: at most one bf16 ulp apart (2^-8 relative).
            assert!(
                diff <= scale * 2f32.powi(-7),
                "m={m} k={k} n={n}: diff {diff} vs scale {scale}"
            );
        }
        Ok(())
    }
}
