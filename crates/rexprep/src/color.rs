//! NV12 / I420 → packed RGB on the CPU: a validated YUV `Frame` in, a tight `w·h·3` RGB `Vec<u8>` out,
//! ready for `resize`. Runs on the thread that prepares the frame.
//!
//! Matrix and range come from `Frame::colorimetry` (the caps' `colorimetry`, or GStreamer's default:
//! BT.601 limited up to 576 lines, BT.709 limited above). Chroma is 4:2:0; each chroma sample is
//! used for its 2×2 block of luma samples (nearest). GStreamer 1.22's `videoconvert` does the same for
//! I420 but interpolates chroma for NV12, and its 8-bit matrix is biased by about −2.4 levels; the
//! measured differences are asserted and explained in tests/prep_fixtures.rs.

use crate::{ColorMatrix, ColorRange, Colorimetry, Frame, PixelFormat};

/// Floating-point YUV → RGB coefficients for one colorimetry, folded with the range expansion.
#[derive(Debug, Clone, Copy)]
pub struct YuvToRgb {
    pub y_off: f32,
    pub y_mul: f32,
    /// R = y + rv·V';  G = y + gu·U' + gv·V';  B = y + bu·U'  with U' = U − 128, V' = V − 128.
    pub rv: f32,
    pub gu: f32,
    pub gv: f32,
    pub bu: f32,
}

impl YuvToRgb {
    pub fn new(c: Colorimetry) -> YuvToRgb {
        let (kr, kb) = match c.matrix {
            ColorMatrix::Bt601 => (0.299f64, 0.114f64),
            ColorMatrix::Bt709 => (0.2126, 0.0722),
            ColorMatrix::Bt2020 => (0.2627, 0.0593),
        };
        let kg = 1.0 - kr - kb;
        // Limited range: Y 16..235 (219 steps), chroma 16..240 (224 steps) map to 0..255.
        let (y_off, y_mul, c_mul) = match c.range {
            ColorRange::Limited => (16.0, 255.0 / 219.0, 255.0 / 224.0),
            ColorRange::Full => (0.0, 1.0, 1.0),
        };
        YuvToRgb {
            y_off: y_off as f32,
            y_mul: y_mul as f32,
            rv: (2.0 * (1.0 - kr) * c_mul) as f32,
            gu: (-2.0 * kb * (1.0 - kb) / kg * c_mul) as f32,
            gv: (-2.0 * kr * (1.0 - kr) / kg * c_mul) as f32,
            bu: (2.0 * (1.0 - kb) * c_mul) as f32,
        }
    }

    #[inline]
    pub fn pixel(&self, y: u8, u: u8, v: u8) -> [u8; 3] {
        let yy = (y as f32 - self.y_off) * self.y_mul;
        let (u, v) = (u as f32 - 128.0, v as f32 - 128.0);
        let q = |x: f32| (x + 0.5).clamp(0.0, 255.0) as u8;
        [
            q(yy + self.rv * v),
            q(yy + self.gu * u + self.gv * v),
            q(yy + self.bu * u),
        ]
    }
}

/// Convert a checked NV12 or I420 frame to packed RGB.
///
/// # Panics
/// On an RGB frame or one that failed `Frame::check` (callers check first).
pub fn yuv_to_rgb(frame: &Frame) -> Vec<u8> {
    let (w, h) = (frame.width as usize, frame.height as usize);
    let m = YuvToRgb::new(frame.colorimetry);
    let luma = frame.plane(0);
    let mut out = vec![0u8; w * h * 3];
    for (y, orow) in out.chunks_exact_mut(w * 3).enumerate() {
        let yrow = &luma[y * frame.strides[0]..][..w];
        let cy = y / 2;
        match frame.format {
            PixelFormat::Nv12 => {
                let uv = &frame.plane(1)[cy * frame.strides[1]..];
                for (x, px) in orow.chunks_exact_mut(3).enumerate() {
                    let c = (x / 2) * 2;
                    px.copy_from_slice(&m.pixel(yrow[x], uv[c], uv[c + 1]));
                }
            }
            PixelFormat::I420 => {
                let u = &frame.plane(1)[cy * frame.strides[1]..];
                let v = &frame.plane(2)[cy * frame.strides[2]..];
                for (x, px) in orow.chunks_exact_mut(3).enumerate() {
                    px.copy_from_slice(&m.pixel(yrow[x], u[x / 2], v[x / 2]));
                }
            }
            PixelFormat::Rgb => panic!("yuv_to_rgb called on an RGB frame"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_range_black_white_and_primaries() {
        let m = YuvToRgb::new(Colorimetry::BT601);
        assert_eq!(m.pixel(16, 128, 128), [0, 0, 0]);
        assert_eq!(m.pixel(235, 128, 128), [255, 255, 255]);
        // BT.601 limited red: Y 81, Cb 90, Cr 240.
        let [r, g, b] = m.pixel(81, 90, 240);
        assert!(r >= 254 && g <= 1 && b <= 1, "{r} {g} {b}");
        let m = YuvToRgb::new(Colorimetry::BT709);
        // BT.709 limited red: Y 63, Cb 102, Cr 240.
        let [r, g, b] = m.pixel(63, 102, 240);
        assert!(r >= 254 && g <= 1 && b <= 1, "{r} {g} {b}");
        assert_eq!(
            YuvToRgb::new(Colorimetry::JPEG).pixel(255, 128, 128),
            [255, 255, 255]
        );
    }

    #[test]
    fn nv12_and_i420_agree() {
        let (w, h) = (6usize, 4usize);
        let ys: Vec<u8> = (0..w * h).map(|i| (16 + i * 7) as u8).collect();
        let us: Vec<u8> = (0..9).map(|i| (100 + i * 5) as u8).collect();
        let vs: Vec<u8> = (0..9).map(|i| (150 - i * 4) as u8).collect();
        // Pad the uv rows a bit to exercise strides.
        let mut i420 = ys.clone();
        i420.extend(&us[..6]);
        i420.extend(&vs[..6]);
        let mut nv12 = ys.clone();
        for i in 0..6 {
            nv12.push(us[i]);
            nv12.push(vs[i]);
        }
        let a = yuv_to_rgb(&Frame::i420(w as u32, h as u32, &i420));
        let b = yuv_to_rgb(&Frame::nv12(w as u32, h as u32, &nv12));
        assert_eq!(a, b);
    }
}
