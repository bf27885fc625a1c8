//! CLIP normalisation (rex-omni-spec.md §1.5): uint8 channel value in, f32 model input out.
//!
//! transformers computes `(v as f64 * (1/255)) as f32`, then `(x - mean) / std` in f32. A uint8 has only
//! 256 values, so the whole computation is a 3×256 lookup table built once: bit-identical to the HF
//! processor and free per pixel. Shared by the CPU path and (uploaded once) by the CUDA kernels.

/// OPENAI_CLIP mean, as in Qwen2.5-VL's preprocessor_config.json (spec §1.5). Parsed as f64 and then
/// cast, as Python + numpy do (`np.array(mean, dtype=float32)`), rather than parsed straight to f32.
pub const MEAN: [f32; 3] = [
    0.48145466f64 as f32,
    0.4578275f64 as f32,
    0.40821073f64 as f32,
];
/// OPENAI_CLIP std (spec §1.5), same f64 → f32 route.
pub const STD: [f32; 3] = [
    0.26862954f64 as f32,
    0.26130258f64 as f32,
    0.27577711f64 as f32,
];
/// `rescale_factor` 1/255 as Python stores it (a double).
const RESCALE: f64 = 1.0 / 255.0;

/// One normalised value: the exact HF arithmetic.
#[inline]
pub fn normalize_value(v: u8, channel: usize) -> f32 {
    let x = (v as f64 * RESCALE) as f32;
    (x - MEAN[channel]) / STD[channel]
}

/// `lut[c * 256 + v]` = normalised value of uint8 `v` in channel `c`.
pub fn lut() -> &'static [f32; 768] {
    static LUT: std::sync::OnceLock<[f32; 768]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let mut t = [0f32; 768];
        for (i, o) in t.iter_mut().enumerate() {
            *o = normalize_value((i % 256) as u8, i / 256);
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        // (0 - mean) / std and (1 - mean) / std in f32.
        for c in 0..3 {
            assert_eq!(lut()[c * 256], -MEAN[c] / STD[c]);
            assert_eq!(lut()[c * 256 + 255], (1.0f32 - MEAN[c]) / STD[c]);
        }
        assert!((lut()[0] - (-1.7922626)).abs() < 1e-6);
    }
}
