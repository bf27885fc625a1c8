//! The element-wise pieces of a bf16 forward where candle's kernels round more often than transformers does:
//! RMSNorm and SiLU. Each is computed in f32 and rounded to the model dtype once.
//!
//! Why: candle 0.11.1's CPU `rms_norm` rounds the root-mean-square to bf16, then rounds `x / rms`, then
//! `· weight` (three roundings; HF's `Qwen2RMSNorm` normalises in f32 and rounds twice, its CUDA kernel once),
//! and its bf16 `silu` is `v / (1 + exp(-v))` in bf16 arithmetic (three roundings; torch rounds once). At bf16's
//! 8-bit mantissa every extra rounding moves the hidden state by up to 0.4 %, enough to flip a greedy step
//! between two neighbouring coordinate bins (tests/model_tiny_detector.rs measured it).
//!
//! In: tensors in the model dtype, any device. Out: same shape and dtype. f32 inputs take candle's own kernels,
//! unchanged (the f32 path is token-exact against transformers and stays bit-for-bit what it was).

use candle_core::{DType, Module, Result, Tensor, D};

/// RMSNorm with HF's numerics for half-precision inputs.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    inner: candle_nn::RmsNorm,
    /// The weight widened once at load, for the f32 normalisation of half-precision rows.
    weight_f32: Tensor,
    /// The same values as a slice, for bf16_lanes.rs's row kernel (bf16 on the CPU).
    weight_f32_cpu: Vec<f32>,
    eps: f64,
}

impl RmsNorm {
    /// The weight as loaded (model dtype).
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's CUDA kernel already normalises and scales in f32 and rounds once; only its CPU kernel rounds
        // the intermediate values (module doc).
        if x.dtype() == DType::F32 || !x.device().is_cpu() {
            return self.inner.forward(x);
        }
        if crate::model::bf16_lanes::applies(x) {
            return crate::model::bf16_lanes::rms_norm(x, &self.weight_f32_cpu, self.eps as f32);
        }
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        y.broadcast_mul(&self.weight_f32)?.to_dtype(x.dtype())
    }
}

/// `candle_nn::rms_norm` with [`RmsNorm`]'s numerics.
pub fn rms_norm(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<RmsNorm> {
    let inner = candle_nn::rms_norm(size, eps, vb)?;
    let weight_f32 = inner.weight().to_dtype(DType::F32)?;
    let weight_f32_cpu = if weight_f32.device().is_cpu() {
        weight_f32.to_vec1()?
    } else {
        Vec::new()
    };
    Ok(RmsNorm {
        inner,
        weight_f32,
        weight_f32_cpu,
        eps,
    })
}

/// SiLU computed in f32 and rounded once for half-precision inputs (torch's `F.silu` on bf16); f32 as before.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return x.silu();
    }
    x.to_dtype(DType::F32)?.silu()?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;
    use std::collections::HashMap;

    /// bf16 RMSNorm and SiLU equal the f32 result rounded once to bf16 (what the module promises), where
    /// candle's bf16 CPU kernels differ on many elements.
    #[test]
    fn bf16_is_f32_rounded_once() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (7, 96), &dev)?).to_dtype(DType::BF16)?;
        let w = (Tensor::randn(1f32, 0.3, 96, &dev)?).to_dtype(DType::BF16)?;
        let vb = |dt| {
            let mut m = HashMap::new();
            m.insert("weight".to_string(), w.to_dtype(dt).unwrap());
            VarBuilder::from_tensors(m, dt, &dev)
        };
        let ours = rms_norm(96, 1e-6, vb(DType::BF16))?.forward(&x)?;
        let want = rms_norm(96, 1e-6, vb(DType::F32))?
            .forward(&x.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)?;
        let differing = |a: &Tensor, b: &Tensor| -> Result<usize> {
            let (a, b) = (
                a.flatten_all()?.to_vec1::<half::bf16>()?,
                b.flatten_all()?.to_vec1::<half::bf16>()?,
            );
            Ok(a.iter().zip(&b).filter(|(x, y)| x != y).count())
        };
        // The two f32 computations may differ in the last f32 bit, which moves a value sitting on a bf16
        // rounding boundary by one ulp: a handful of the 672 elements at most. candle's kernel (three
        // roundings) differs on about a third of them.
        let n = differing(&ours, &want)?;
        assert!(n <= 672 / 100, "rms_norm: {n}/672 elements differ");
        let candle = candle_nn::ops::rms_norm(&x, &w, 1e-6)?;
        assert!(
            differing(&candle, &want)? > 672 / 10,
            "candle's kernel rounds more"
        );
        let s = silu(&x)?;
        let want_s = x.to_dtype(DType::F32)?.silu()?.to_dtype(DType::BF16)?;
        assert_eq!(differing(&s, &want_s)?, 0, "silu");
        Ok(())
    }
}
