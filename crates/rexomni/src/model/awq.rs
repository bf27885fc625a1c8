//! AWQ checkpoints (AutoAWQ "gemm" packing, e.g. IDEA-Research/Rex-Omni-AWQ): `quantization_config` and the
//! per-layer `qweight`/`qzeros`/`scales` → dequantized f32, or ggml Q8_0 / Q4_1 blocks.
//!
//! In: `config.json`'s `quantization_config` (once per load) and a layer's three tensors. Out: plain host
//! vectors and block buffers that `linear` hands to candle. Runs on the loading thread.
//!
//! Layout (AutoAWQ `WQLinear_GEMM`): `qweight` i32 `[in, out/8]`, `qzeros` i32 `[in/g, out/8]`, `scales`
//! f16 `[in/g, out]`; each i32 holds 8 nibbles, nibble `i` (bits `4i..4i+4`) being output column
//! `8c + AWQ_ORDER[i]` with `AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`. The weight is `W[o, i] = s·(q − z)`, with
//! `s`, `z` those of group `i / g` and column `o`.
//!
//! Exactness: Q8_0 (`d` f16, 32 × i8) holds a group exactly (`d = s`, `q − z ∈ [−15, 15]`). ggml Q4_1
//! (`d`, `m` f16, 32 × u4, `x = d·q + m`) needs `m = −s·z`, and the product of an f16 scale and a 4-bit
//! zero needs up to 15 significant bits while f16 has 11: it is rounded to the nearest f16, an error of at
//! most `|s·z|·2⁻¹¹` per weight (under 1 % of one quantization step `s`, since `z ≤ 15`). A bf16
//! dequantization would be worse (8 significant bits), so `q4` uses Q4_1 and says so; `bf16`/`q8` are exact.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use half::f16;

use super::ModelError;

/// Packing order of AutoAWQ's GEMM kernels: nibble `i` of a packed i32 is column `8c + AWQ_ORDER[i]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The parts of `quantization_config` we need, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AwqConfig {
    pub group_size: usize,
    /// Module name prefixes left unquantized by the exporter (e.g. `["visual"]`); informational, since a
    /// layer is AWQ exactly when its `qweight` is present.
    pub modules_to_not_convert: Vec<String>,
}

impl AwqConfig {
    /// `Ok(None)` when `config.json` has no `quantization_config`; an error naming the field for anything we
    /// cannot load (another method, bits ≠ 4, no zero point, a version other than gemm, a group size that is
    /// not a multiple of 32).
    pub fn from_config_file(path: &Path) -> std::result::Result<Option<Self>, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Weights {
                path: path.to_path_buf(),
                msg: format!("not valid JSON: {e}"),
            })?;
        let Some(q) = v.get("quantization_config") else {
            return Ok(None);
        };
        let err = |field: &str, msg: String| ModelError::Config {
            path: path.to_path_buf(),
            field: format!("quantization_config.{field}"),
            msg,
        };
        let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if !method.eq_ignore_ascii_case("awq") {
            return Err(err(
                "quant_method",
                format!(
                    "{:?}: only \"awq\" checkpoints can be loaded",
                    q.get("quant_method")
                ),
            ));
        }
        let bits = q.get("bits").and_then(|b| b.as_u64());
        if bits != Some(4) {
            return Err(err(
                "bits",
                format!("{bits:?}: AWQ is loaded with 4 bits only"),
            ));
        }
        let version = q.get("version").and_then(|b| b.as_str()).unwrap_or("gemm");
        if !version.eq_ignore_ascii_case("gemm") {
            return Err(err(
                "version",
                format!("{version:?}: only AutoAWQ's \"gemm\" packing is supported"),
            ));
        }
        if q.get("zero_point").and_then(|z| z.as_bool()) == Some(false) {
            return Err(err(
                "zero_point",
                "false: only zero-point (asymmetric) AWQ is supported".into(),
            ));
        }
        let group_size = q.get("group_size").and_then(|g| g.as_u64()).unwrap_or(0) as usize;
        if group_size == 0 || group_size % 32 != 0 {
            return Err(err(
                "group_size",
                format!(
                    "{:?}: must be a positive multiple of 32 (ggml blocks are 32 wide)",
                    q.get("group_size")
                ),
            ));
        }
        let modules_to_not_convert = q
            .get("modules_to_not_convert")
            .and_then(|m| m.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(Self {
            group_size,
            modules_to_not_convert,
        }))
    }
}

/// One AWQ layer unpacked on the host: `q[o][i]` and `z[o][gi]` as u8 nibbles, `s[o][gi]` as f32.
pub struct AwqLayer {
    pub in_dim: usize,
    pub out_dim: usize,
    pub group_size: usize,
    /// `[out, in]` row-major.
    pub q: Vec<u8>,
    /// `[out, in/g]` row-major.
    pub z: Vec<u8>,
    /// `[out, in/g]` row-major, the checkpoint's f16 values widened exactly.
    pub s: Vec<f32>,
}

impl AwqLayer {
    /// Read and unpack `qweight`, `qzeros`, `scales` at `vb`'s prefix, checking their shapes.
    pub fn read(vb: &VarBuilder, in_dim: usize, out_dim: usize, cfg: &AwqConfig) -> Result<Self> {
        let g = cfg.group_size;
        let name = vb.prefix();
        if in_dim % g != 0 || out_dim % 8 != 0 {
            candle_core::bail!(
                "{name}: AWQ layer {out_dim}x{in_dim} (out x in): in must be a multiple of group_size {g} and out of 8"
            )
        }
        let host = |t: &str, dtype: DType| -> Result<Tensor> {
            vb.get_unchecked_dtype(t, dtype)?.to_device(&Device::Cpu)
        };
        let qweight = host("qweight", DType::I32)?;
        let qzeros = host("qzeros", DType::I32)?;
        let scales = host("scales", DType::F32)?;
        let expect = [
            ("qweight", &qweight, (in_dim, out_dim / 8)),
            ("qzeros", &qzeros, (in_dim / g, out_dim / 8)),
            ("scales", &scales, (in_dim / g, out_dim)),
        ];
        for (t, tensor, want) in expect {
            if tensor.dims2().ok() != Some(want) {
                candle_core::bail!(
                    "{name}.{t}: shape {:?}, expected {want:?} for a {out_dim}x{in_dim} layer with group_size {g}",
                    tensor.dims()
                )
            }
        }
        let qw = qweight.flatten_all()?.to_vec1::<i32>()?;
        let qz = qzeros.flatten_all()?.to_vec1::<i32>()?;
        let sc = scales.flatten_all()?.to_vec1::<f32>()?;
        let groups = in_dim / g;
        let mut q = vec![0u8; out_dim * in_dim];
        for i in 0..in_dim {
            for c in 0..out_dim / 8 {
                let word = qw[i * (out_dim / 8) + c] as u32;
                for (nib, &col) in AWQ_ORDER.iter().enumerate() {
                    q[(8 * c + col) * in_dim + i] = ((word >> (4 * nib)) & 0xF) as u8;
                }
            }
        }
        let mut z = vec![0u8; out_dim * groups];
        let mut s = vec![0f32; out_dim * groups];
        for gi in 0..groups {
            for c in 0..out_dim / 8 {
                let word = qz[gi * (out_dim / 8) + c] as u32;
                for (nib, &col) in AWQ_ORDER.iter().enumerate() {
                    z[(8 * c + col) * groups + gi] = ((word >> (4 * nib)) & 0xF) as u8;
                }
            }
            for o in 0..out_dim {
                s[o * groups + gi] = sc[gi * out_dim + o];
            }
        }
        Ok(Self {
            in_dim,
            out_dim,
            group_size: g,
            q,
            z,
            s,
        })
    }

    /// `W[o, i] = s·(q − z)` in f32, `[out, in]` row-major: exact (an f16 times an integer below 16 in
    /// magnitude fits f32's 24-bit significand).
    pub fn dequantize(&self) -> Vec<f32> {
        let (g, groups) = (self.group_size, self.in_dim / self.group_size);
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        for o in 0..self.out_dim {
            for i in 0..self.in_dim {
                let gi = o * groups + i / g;
                let q = self.q[o * self.in_dim + i] as i32 - self.z[gi] as i32;
                w[o * self.in_dim + i] = self.s[gi] * q as f32;
            }
        }
        w
    }
}

/// Bytes of ggml blocks, 8-byte aligned (candle reinterprets them as block structs with f16 fields).
pub struct BlockBuf {
    words: Vec<u64>,
    len: usize,
}

impl BlockBuf {
    fn new(len: usize) -> Self {
        Self {
            words: vec![0u64; len.div_ceil(8)],
            len,
        }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the Vec<u64> owns at least `len` initialised bytes; u8 has no alignment or validity needs.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: as in `bytes_mut`, read-only.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// Q8_0: per 32 inputs `d` (f16, little-endian) then 32 × i8. `d = s`, `q8 = q − z`: exact when the scale
/// is an f16 value (AutoAWQ writes f16 scales).
pub fn to_q8_0(l: &AwqLayer) -> BlockBuf {
    const QK: usize = 32;
    const SIZE: usize = 2 + QK;
    let (g, groups) = (l.group_size, l.in_dim / l.group_size);
    let blocks_per_row = l.in_dim / QK;
    let mut buf = BlockBuf::new(l.out_dim * blocks_per_row * SIZE);
    let out = buf.bytes_mut();
    for o in 0..l.out_dim {
        for b in 0..blocks_per_row {
            let gi = o * groups + b * QK / g;
            let blk = &mut out[(o * blocks_per_row + b) * SIZE..][..SIZE];
            blk[..2].copy_from_slice(&f16::from_f32(l.s[gi]).to_le_bytes());
            for j in 0..QK {
                let q = l.q[o * l.in_dim + b * QK + j] as i8 - l.z[gi] as i8;
                blk[2 + j] = q as u8;
            }
        }
    }
    buf
}

/// Q4_1: per 32 inputs `d`, `m` (f16) then 16 bytes, byte `j` = value `j` (low nibble) | value `j + 16`
/// (high nibble); `x = d·q + m`. `d = s` exactly, `m = f16(−s·z)` rounded (see the module doc).
pub fn to_q4_1(l: &AwqLayer) -> BlockBuf {
    const QK: usize = 32;
    const SIZE: usize = 4 + QK / 2;
    let (g, groups) = (l.group_size, l.in_dim / l.group_size);
    let blocks_per_row = l.in_dim / QK;
    let mut buf = BlockBuf::new(l.out_dim * blocks_per_row * SIZE);
    let out = buf.bytes_mut();
    for o in 0..l.out_dim {
        for b in 0..blocks_per_row {
            let gi = o * groups + b * QK / g;
            let s = l.s[gi];
            let blk = &mut out[(o * blocks_per_row + b) * SIZE..][..SIZE];
            blk[..2].copy_from_slice(&f16::from_f32(s).to_le_bytes());
            blk[2..4].copy_from_slice(&f16::from_f32(-s * l.z[gi] as f32).to_le_bytes());
            let row = &l.q[o * l.in_dim + b * QK..][..QK];
            for j in 0..QK / 2 {
                blk[4 + j] = row[j] | (row[j + QK / 2] << 4);
            }
        }
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-packed layer: 1 input row-group of 32 (g = 32), 8 outputs, so one i32 per input row.
    fn layer() -> AwqLayer {
        let (in_dim, out_dim, g) = (32, 8, 32);
        let mut q = vec![0u8; out_dim * in_dim];
        for (k, v) in q.iter_mut().enumerate() {
            *v = (k * 7 % 16) as u8;
        }
        AwqLayer {
            in_dim,
            out_dim,
            group_size: g,
            q,
            z: (0..8).map(|o| (o * 2 + 1) as u8).collect(),
            s: (0..8)
                .map(|o| 0.01 + o as f32 * 0.003)
                .map(|s| f16::from_f32(s).to_f32())
                .collect(),
        }
    }

    #[test]
    fn q8_0_blocks_are_exact_and_q4_1_within_the_f16_rounding_of_the_minimum() -> Result<()> {
        use candle_core::quantized::{GgmlDType, QStorage, QTensor};
        use std::borrow::Cow;
        let l = layer();
        let want = l.dequantize();
        for (ty, buf) in [
            (GgmlDType::Q8_0, to_q8_0(&l)),
            (GgmlDType::Q4_1, to_q4_1(&l)),
        ] {
            let st = QStorage::from_data(Cow::Borrowed(buf.as_bytes()), &Device::Cpu, ty)?;
            let got = QTensor::new(st, (8, 32))?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let o = k / 32;
                let bound = match ty {
                    GgmlDType::Q8_0 => 0.0,
                    _ => (l.s[o] * l.z[o] as f32).abs() * 2f32.powi(-11) * 1.0001,
                };
                assert!((g - w).abs() <= bound, "{ty:?} [{k}]: {g} vs {w}");
            }
        }
        Ok(())
    }
}
