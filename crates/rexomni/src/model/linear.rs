//! Linear layers of the vision blocks, merger, decoder and lm_head, dense or quantized at load time.
//!
//! In: a `VarBuilder` at the layer's prefix (`….q_proj`), the [`Weights`] format chosen in `[model] weights` /
//! `--weights`, and, for an AWQ checkpoint, its `quantization_config`. Out: a [`Linear`] whose `forward` maps
//! `[.., in]` to `[.., out]` in the activation dtype. Runs once per layer on the loading thread; `forward`
//! runs on the caller's thread.
//!
//! Quantized weights are candle's ggml blocks (`QMatMul`), which quantize along the input dimension: Q8_0
//! (32 values, one f16 scale) for `q8`; for `q4` Q4K (256-value super-blocks) where the input dimension is a
//! multiple of 256, else Q4_0 (32) where it is a multiple of 32. A layer whose input dimension is not a
//! multiple of 32 stays dense in the model dtype (at the real config that is only the vision MLP's
//! `down_proj`, input 3420; on the tiny fixtures every layer whose input is 80 or 48 wide) and the loader says
//! which. Embeddings, norms and the patch embedding are never quantized.
//!
//! AWQ layers (`qweight`/`qzeros`/`scales`) are converted group by group (see [`awq`]): exactly to the
//! dequantized values for `bf16` (f32 arithmetic, then the model dtype) and `q8` (Q8_0 holds `q − z` with
//! the group's scale), and to Q4_1 for `q4`, whose f16 block minimum rounds `−s·z` (see `awq::to_q4_1`).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::awq::{self, AwqConfig, AwqLayer};
use super::cpu_bf16;
use super::cpu_q8::{self, PackedQ8};
use super::gemm_bf16::PackedBf16;

/// How linear weights are held in memory (`[model] weights`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weights {
    /// Unquantized, in the model dtype (`"bf16"` in the config: what a bf16 run holds).
    #[default]
    Dense,
    /// 8-bit: ggml Q8_0.
    Q8,
    /// 4-bit: ggml Q4K (Q4_0 where the input dimension is not a multiple of 256; Q4_1 for AWQ layers).
    Q4,
}

impl Weights {
    /// The config / CLI spellings.
    pub const NAMES: [&'static str; 3] = ["bf16", "q8", "q4"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bf16" => Some(Self::Dense),
            "q8" => Some(Self::Q8),
            "q4" => Some(Self::Q4),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Dense => "bf16",
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }
}

/// A loaded linear layer.
pub enum Linear {
    Dense(candle_nn::Linear),
    /// A bf16 weight on the CPU, packed once for the bf16 GEMM (gemm_bf16.rs); the unpacked tensor is
    /// dropped, so the layer holds its weight once.
    PackedBf16 {
        w: Arc<PackedBf16>,
        /// `[out]` in the weight dtype, as loaded.
        bias: Option<Tensor>,
        /// The same bias widened once, added in f32 before the output's single rounding.
        bias_f32: Option<Arc<Vec<f32>>>,
    },
    /// A Q8_0 weight on the CPU, repacked once for cpu_q8.rs (candle's `QTensor` is dropped: one copy).
    PackedQ8 {
        w: Arc<PackedQ8>,
        /// `[out]` in the weight dtype, as loaded.
        bias: Option<Tensor>,
        /// The same bias widened once, added in f32 before the output's single rounding.
        bias_f32: Option<Arc<Vec<f32>>>,
    },
    Quant {
        w: QMatMul,
        bias: Option<Tensor>,
        /// Rows of the weight (output features), for shape checks in tests.
        out_dim: usize,
    },
}

impl Linear {
    /// `x [.., in]` → `[.., out]` in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => cpu_bf16::linear_forward(l, x),
            Self::PackedBf16 { w, bias, bias_f32 } => {
                cpu_bf16::packed_forward(w, bias.as_ref(), bias_f32.as_deref(), x)
            }
            Self::PackedQ8 { w, bias, bias_f32 } => packed_q8(w, bias, bias_f32, x, false),
            Self::Quant { w, bias, .. } => {
                // QMatMul takes any leading dims and returns x's dtype (bf16/f16/f32 on CPU and CUDA).
                let y = w.forward(&x.contiguous()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }

    /// Whether a row of `forward(x)` gets the same bits whatever the other rows of `x` are, so a pass may
    /// compute only the rows it needs: our own CPU kernels fix each output's sum order by `k` alone
    /// (gemm_bf16.rs, cpu_q8.rs); candle's GEMMs and the few-row kernels they hand over to do not promise it.
    pub fn rows_are_independent(&self, x: &Tensor) -> bool {
        let cpu = x.device().is_cpu();
        match self {
            Self::PackedBf16 { .. } => cpu && x.dtype() == DType::BF16,
            Self::PackedQ8 { .. } => cpu && matches!(x.dtype(), DType::BF16 | DType::F32),
            Self::Dense(_) | Self::Quant { .. } => false,
        }
    }

    /// Bytes one forward reads for the weight and bias, as held: a dense tensor's elements, the packed bf16
    /// panels (padding included), or the quantized blocks (scales included).
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let bias = |b: &Option<Tensor>| b.as_ref().map_or(0, t);
        match self {
            Self::Dense(l) => t(l.weight()) + l.bias().map_or(0, t),
            Self::PackedBf16 { w, bias: b, .. } => w.packed_bytes() + bias(b),
            Self::PackedQ8 { w, bias: b, .. } => w.packed_bytes() + bias(b),
            Self::Quant { w, bias: b, .. } => {
                bias(b)
                    + match w {
                        QMatMul::QTensor(q) => q.storage_size_in_bytes(),
                        QMatMul::Tensor(w) | QMatMul::TensorF16(w) => t(w),
                    }
            }
        }
    }

    /// The ggml block type, or `None` for a dense layer.
    pub fn quant_type(&self) -> Option<GgmlDType> {
        match self {
            Self::Quant {
                w: QMatMul::QTensor(q),
                ..
            } => Some(q.dtype()),
            Self::PackedQ8 { .. } => Some(GgmlDType::Q8_0),
            _ => None,
        }
    }

    /// The weight as an f32 `[out, in]` tensor (dequantized when quantized).
    pub fn weight_f32(&self) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.weight().to_dtype(DType::F32),
            Self::PackedBf16 { w, .. } => {
                Tensor::from_vec(w.unpack(), (w.n(), w.k()), &Device::Cpu)?.to_dtype(DType::F32)
            }
            Self::PackedQ8 { w, .. } => {
                Tensor::from_vec(w.dequantize(), (w.n(), w.k()), &Device::Cpu)
            }
            Self::Quant { w, .. } => match w {
                QMatMul::QTensor(q) => q.dequantize(&q.device()),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32),
            },
        }
    }
}

/// `l.forward(x)`, spelled as the free function the layer code calls.
pub fn linear_forward(l: &Linear, x: &Tensor) -> Result<Tensor> {
    l.forward(x)
}

/// `l.forward(x)` as f32, without rounding to the activation dtype first where the layer can (dense bf16 on
/// the CPU, see `cpu_bf16::linear_forward_f32`): the lm_head.
pub fn linear_forward_f32(l: &Linear, x: &Tensor) -> Result<Tensor> {
    match l {
        Linear::Dense(d) => cpu_bf16::linear_forward_f32(d, x),
        Linear::PackedBf16 { w, bias, bias_f32 } => {
            cpu_bf16::packed_forward_f32(w, bias.as_ref(), bias_f32.as_deref(), x)
        }
        // Our Q8_0 kernel returns its f32 sums unrounded, like the packed bf16 layer.
        Linear::PackedQ8 { w, bias, bias_f32 } => packed_q8(w, bias, bias_f32, x, true),
        Linear::Quant { .. } => l.forward(x)?.to_dtype(DType::F32),
    }
}

/// What the loader did with each layer, for the load-time log line.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// `(layer prefix, ggml type or "dense", source "awq" or "checkpoint")`.
    pub layers: Vec<(String, String, &'static str)>,
}

impl LoadReport {
    /// Layers that `weights` asked to quantize but stayed dense (input dimension not a multiple of 32).
    pub fn kept_dense(&self) -> Vec<&str> {
        self.layers
            .iter()
            .filter(|(_, t, _)| t == "dense-fallback")
            .map(|(n, _, _)| n.as_str())
            .collect()
    }

    /// `type → count`, sorted, e.g. `[("q4k", 252), ("dense-fallback", 32)]`.
    pub fn counts(&self) -> Vec<(String, usize)> {
        let mut m = std::collections::BTreeMap::<String, usize>::new();
        for (_, t, _) in &self.layers {
            *m.entry(t.clone()).or_default() += 1;
        }
        m.into_iter().collect()
    }
}

/// Builds every [`Linear`] of one model load.
pub struct LinearLoader {
    weights: Weights,
    awq: Option<AwqConfig>,
    report: Mutex<LoadReport>,
}

impl LinearLoader {
    pub fn new(weights: Weights, awq: Option<AwqConfig>) -> Self {
        Self {
            weights,
            awq,
            report: Mutex::new(LoadReport::default()),
        }
    }

    /// Dense weights, no AWQ: what `Qwen25Vl::new` uses.
    pub fn dense() -> Self {
        Self::new(Weights::Dense, None)
    }

    pub fn weights(&self) -> Weights {
        self.weights
    }

    pub fn report(&self) -> LoadReport {
        self.report.lock().expect("report lock").clone()
    }

    /// The layer at `vb` (`weight [out, in]` and optionally `bias [out]`, or AWQ's `qweight`/`qzeros`/`scales`).
    pub fn load(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Linear> {
        let b = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        // Only with an AWQ config: a backend that makes up any tensor (rexbench's random weights) reports
        // every name as present.
        if let Some(cfg) = self.awq.as_ref().filter(|_| vb.contains_tensor("qweight")) {
            let layer = AwqLayer::read(&vb, in_dim, out_dim, cfg)?;
            return self.finish_awq(layer, b, &vb);
        }
        let w = vb.get((out_dim, in_dim), "weight")?;
        self.from_weight(w, b, &vb.prefix())
    }

    /// A layer from an already-loaded `[out, in]` weight (the tied lm_head shares the embedding's tensor).
    pub fn from_weight(&self, w: Tensor, bias: Option<Tensor>, name: &str) -> Result<Linear> {
        let (out_dim, in_dim) = w.dims2()?;
        let ty = match self.weights {
            Weights::Dense => None,
            Weights::Q8 if in_dim % 32 == 0 => Some(GgmlDType::Q8_0),
            Weights::Q4 if in_dim % 256 == 0 => Some(GgmlDType::Q4K),
            Weights::Q4 if in_dim % 32 == 0 => Some(GgmlDType::Q4_0),
            Weights::Q8 | Weights::Q4 => {
                self.record(name, "dense-fallback", "checkpoint");
                return dense(w, bias);
            }
        };
        let Some(ty) = ty else {
            self.record(name, "dense", "checkpoint");
            return dense(w, bias);
        };
        let device = w.device().clone();
        // ggml quantizes from f32 on the host; the blocks are then uploaded to the weight's device.
        let host = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let q = QTensor::quantize_onto(&host, ty, &device)?;
        self.record(name, &type_name(ty), "checkpoint");
        quant(q, bias, out_dim)
    }

    fn finish_awq(&self, layer: AwqLayer, bias: Option<Tensor>, vb: &VarBuilder) -> Result<Linear> {
        let device = vb.device().clone();
        let (out_dim, in_dim) = (layer.out_dim, layer.in_dim);
        let name = vb.prefix();
        let (blocks, ty) = match self.weights {
            Weights::Dense => {
                let w = Tensor::from_vec(layer.dequantize(), (out_dim, in_dim), &device)?
                    .to_dtype(vb.dtype())?;
                self.record(&name, "dense", "awq");
                return dense(w, bias);
            }
            Weights::Q8 => (awq::to_q8_0(&layer), GgmlDType::Q8_0),
            // candle's Q4_1 dot product (ggml's) takes blocks in pairs: an odd count of 32-wide blocks per
            // row goes to the exact Q8_0 form instead (never at the real config, whose inputs are multiples
            // of 128; on the tiny AWQ fixture, the 32-wide inputs).
            Weights::Q4 if (in_dim / 32) % 2 == 1 => (awq::to_q8_0(&layer), GgmlDType::Q8_0),
            Weights::Q4 => (awq::to_q4_1(&layer), GgmlDType::Q4_1),
        };
        let storage = QStorage::from_data(Cow::Borrowed(blocks.as_bytes()), &device, ty)?;
        let q = QTensor::new(storage, (out_dim, in_dim))?;
        self.record(&name, &type_name(ty), "awq");
        quant(q, bias, out_dim)
    }

    fn record(&self, name: &str, ty: &str, source: &'static str) {
        self.report.lock().expect("report lock").layers.push((
            name.to_string(),
            ty.to_string(),
            source,
        ));
    }
}

/// A dense layer: packed for the bf16 GEMM when the weight is bf16 on the CPU (every bf16 CPU linear runs
/// there), else candle's `Linear`.
///
/// `REXOMNI_BF16_GEMM=candle` in the environment keeps the previous path (candle's matmul, the row kernel for
/// few rows): only so that a benchmark can measure before and after with one binary (docs/benchmarks.md).
fn dense(w: Tensor, bias: Option<Tensor>) -> Result<Linear> {
    static PREVIOUS_PATH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let previous = *PREVIOUS_PATH
        .get_or_init(|| std::env::var("REXOMNI_BF16_GEMM").is_ok_and(|v| v == "candle"));
    if previous || !(w.device().is_cpu() && w.dtype() == DType::BF16) {
        return Ok(Linear::Dense(candle_nn::Linear::new(w, bias)));
    }
    let (n, k) = w.dims2()?;
    let packed = PackedBf16::pack(&w.flatten_all()?.to_vec1::<half::bf16>()?, n, k);
    let bias_f32 = match &bias {
        Some(b) => Some(Arc::new(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
        None => None,
    };
    Ok(Linear::PackedBf16 {
        w: Arc::new(packed),
        bias,
        bias_f32,
    })
}

/// A quantized layer: a CPU Q8_0 weight repacked for cpu_q8.rs (unless `REXOMNI_Q8_KERNEL=candle`), anything
/// else candle's `QMatMul`.
fn quant(q: QTensor, bias: Option<Tensor>, out_dim: usize) -> Result<Linear> {
    if q.dtype() == GgmlDType::Q8_0 && q.device().is_cpu() && cpu_q8::enabled() {
        let (n, k) = q.shape().dims2()?;
        let w = PackedQ8::from_q8_0(&q.data()?, n, k)?;
        let bias_f32 = match &bias {
            Some(b) => Some(Arc::new(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
            None => None,
        };
        return Ok(Linear::PackedQ8 {
            w: Arc::new(w),
            bias,
            bias_f32,
        });
    }
    Ok(Linear::Quant {
        w: QMatMul::from_qtensor(q)?,
        bias,
        out_dim,
    })
}

/// A packed Q8_0 layer's forward: cpu_q8.rs for bf16 / f32 activations on the CPU; another dtype (never in a
/// bf16 or f32 model) through the dequantized weight.
fn packed_q8(
    w: &PackedQ8,
    bias: &Option<Tensor>,
    bias_f32: &Option<Arc<Vec<f32>>>,
    x: &Tensor,
    f32_out: bool,
) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::BF16 | DType::F32) {
        return cpu_q8::forward(w, bias_f32.as_ref().map(|b| b.as_slice()), x, f32_out);
    }
    let wt = Tensor::from_vec(w.dequantize(), (w.n(), w.k()), x.device())?.to_dtype(x.dtype())?;
    let k = w.k();
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = w.n();
    let y = x.reshape(((), k))?.matmul(&wt.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
        None => y,
    };
    let y = if f32_out { y.to_dtype(DType::F32)? } else { y };
    y.reshape(dims)
}

fn type_name(t: GgmlDType) -> String {
    format!("{t:?}").to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each block type on a layer wide enough for it, against the dense layer: the forward error relative to
    /// the output's scale, and the chosen type (Q4K needs inputs in multiples of 256, Q4_0/Q8_0 of 32).
    #[test]
    fn quantized_forward_is_close_to_dense_and_picks_the_block_type_by_width() -> Result<()> {
        let dev = Device::Cpu;
        // The inputs are random (unseeded), so each bound sits well above the error's spread. Q8_0 rounds
        // both the weights and (inside QMatMul) the activations to 8 bits per 32-block scaled by its max:
        // for Gaussian blocks each rounding has a relative RMS error near 2.1/127/sqrt(12) = 0.5 %, both
        // together about 0.7 %; runs measured up to 1.0 %, so 0.02. Q4 (16 levels) is ~10x coarser.
        for (k, weights, ty, tol) in [
            (512, Weights::Q4, GgmlDType::Q4K, 0.2),
            (96, Weights::Q4, GgmlDType::Q4_0, 0.2),
            (96, Weights::Q8, GgmlDType::Q8_0, 0.02),
            (512, Weights::Q8, GgmlDType::Q8_0, 0.02),
        ] {
            let w = Tensor::randn(0f32, 1.0, (64, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, 64, &dev)?;
            let x = Tensor::randn(0f32, 1.0, (3, 5, k), &dev)?;
            let dense = LinearLoader::dense().from_weight(w.clone(), Some(b.clone()), "d")?;
            let q = LinearLoader::new(weights, None).from_weight(w, Some(b), "q")?;
            assert_eq!(q.quant_type(), Some(ty), "k={k}");
            let (want, got) = (dense.forward(&x)?, q.forward(&x)?);
            assert_eq!(got.dims(), &[3, 5, 64]);
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?
                / want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < tol, "{ty:?} k={k}: relative error {err}");
        }
        // Not a multiple of 32: stays dense and is reported.
        // Bytes as held: Q8_0 is 34 bytes per 32 weights, Q4K 144 per 256, bf16 2 per weight (+ f32 bias).
        let w = Tensor::randn(0f32, 1.0, (64, 512), &dev)?;
        let b = Tensor::zeros(64, DType::F32, &dev)?;
        for (weights, per_row) in [(Weights::Q8, 512 / 32 * 34), (Weights::Q4, 512 / 256 * 144)] {
            let q =
                LinearLoader::new(weights, None).from_weight(w.clone(), Some(b.clone()), "q")?;
            assert_eq!(q.weight_bytes(), 64 * per_row + 64 * 4, "{weights:?}");
        }
        let d = LinearLoader::dense().from_weight(w.to_dtype(DType::BF16)?, None, "d")?;
        assert!(matches!(d, Linear::PackedBf16 { .. }));
        assert_eq!(d.weight_bytes(), 64 * 512 * 2);
        let lin = LinearLoader::new(Weights::Q8, None);
        let l = lin.from_weight(Tensor::zeros((8, 80), DType::F32, &dev)?, None, "odd")?;
        assert_eq!(l.quant_type(), None);
        assert_eq!(lin.report().kept_dense(), vec!["odd"]);
        Ok(())
    }
}
