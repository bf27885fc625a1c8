//! Coordinate bins ↔ pixels (rex-omni-spec.md §5.3).
//!
//! In: pixels or bins and the ORIGINAL frame size (never the resized one). Out: bins 0..=999 or
//! pixels. Used by the visual-prompt encoder (pixels → bins) and the parsers (bins → pixels).

/// Number of the last bin: coordinates are `<0>`..`<999>`.
pub const MAX_BIN: u16 = 999;

/// Pixel → bin exactly as the official code: `clamp(int(clamp(x / size, 0, 1) * 999), 0, 999)`
/// (`int` truncates). Non-finite input maps to bin 0.
pub fn pixel_to_bin(pixel: f64, size: u32) -> u16 {
    let n = (pixel / f64::from(size)).clamp(0.0, 1.0);
    if n.is_nan() {
        return 0;
    }
    // n*999 is in [0, 999] so the truncating cast is in range.
    ((n * f64::from(MAX_BIN)) as u16).min(MAX_BIN)
}

/// Bin → pixel: `bin / 999 * size`, no half-bin offset (rex-omni-spec.md §5.3).
pub fn bin_to_pixel(bin: u16, size: u32) -> f64 {
    f64::from(bin) / f64::from(MAX_BIN) * f64::from(size)
}

/// Bin → normalised coordinate in 0..=1.
pub fn bin_to_norm(bin: u16) -> f64 {
    f64::from(bin) / f64::from(MAX_BIN)
}

/// A box `[x0, y0, x1, y1]` in pixels → its four bins.
pub fn box_to_bins(b: &[f64; 4], image_w: u32, image_h: u32) -> [u16; 4] {
    [
        pixel_to_bin(b[0], image_w),
        pixel_to_bin(b[1], image_h),
        pixel_to_bin(b[2], image_w),
        pixel_to_bin(b[3], image_h),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_formula() {
        assert_eq!(pixel_to_bin(0.0, 1440), 0);
        assert_eq!(pixel_to_bin(1440.0, 1440), 999);
        assert_eq!(pixel_to_bin(5000.0, 1440), 999);
        assert_eq!(pixel_to_bin(-3.0, 1440), 0);
        // 720/1440*999 = 499.5 → truncated to 499.
        assert_eq!(pixel_to_bin(720.0, 1440), 499);
        assert_eq!(bin_to_pixel(999, 810), 810.0);
        assert_eq!(bin_to_pixel(0, 810), 0.0);
        assert!((bin_to_pixel(23, 1440) - 23.0 / 999.0 * 1440.0).abs() < 1e-12);
    }
}
