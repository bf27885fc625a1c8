//! NV12 / I420 → packed RGB on the CPU: a validated YUV `Frame` in, a tight `w·h·3` RGB `Vec<u8>` out,
//! ready for `resize`. Runs on the thread that prepares the frame.
//!
//! The target is GStreamer 1.22's `videoconvert` to RGB, byte for byte: that is the pipeline a Rex-Omni
//! user runs before the Python processor, so matching it makes our pixel_values those of the reference
//! deployment (issue 4). Two properties of `videoconvert` follow, both measured against it on every
//! fixture and derived from gst-plugins-base 1.22 (`video-converter.c`, `video-chroma.c`,
//! `video-orc.orc`):
//!
//! - The matrix is 8-bit fixed point (`video_orc_convert_I420_ARGB` / `_AYUV_ARGB`): coefficients are
//!   `rint(256·m)`, samples are centred on 128 and widened by byte-splatting, products keep the high 16
//!   bits, and the range offset is dropped. Limited-range mid grey (Y 128) stays 128 and Y 235 gives 253,
//!   where exact BT.601 says 130.4 and 255.
//! - Chroma: I420 takes the fast path (nearest sample for each 2×2 block); NV12 goes through the generic
//!   path, which upsamples chroma with integer filters: horizontally per `ChromaSite`, then vertically
//!   3:1 / 1:3 between the two nearest chroma rows.
//!
//! The CUDA kernels in kernels/prep.cu implement the same integer arithmetic.

use crate::{ChromaSite, ColorMatrix, ColorRange, Colorimetry, Frame, PixelFormat};

/// `videoconvert`'s fixed-point YUV → RGB matrix for one colorimetry.
///
/// R = y' + rv·v';  G = y' + gu·u' + gv·v';  B = y' + bu·u', each product the high half of a 16×16-bit
/// multiply of a splatted sample, saturated to a signed byte and shifted back by 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YuvToRgb {
    /// Y gain ·256 (`im[0][0]`): 298 for limited range, 256 for full.
    pub y: i16,
    /// V → R (`im[0][2]`).
    pub rv: i16,
    /// U → G (`im[1][1]`).
    pub gu: i16,
    /// V → G (`im[1][2]`).
    pub gv: i16,
    /// U → B (`im[2][1]`).
    pub bu: i16,
}

impl YuvToRgb {
    /// The matrix `videoconvert` builds (`compute_matrix_to_RGB`, then `prepare_matrix`): range
    /// expansion with the scale as a single-precision reciprocal, the Kr/Kb matrix, ·255 for RGB, ·256,
    /// rounded half to even like `rint`.
    pub fn new(c: Colorimetry) -> YuvToRgb {
        let (kr, kb) = match c.matrix {
            ColorMatrix::Bt601 => (0.299f64, 0.114f64),
            ColorMatrix::Bt709 => (0.2126, 0.0722),
            ColorMatrix::Bt2020 => (0.2627, 0.0593),
        };
        let kg = 1.0 - kr - kb;
        // gst_video_color_range_offsets: limited Y spans 219 steps, chroma 224; full range 255.
        let (y_steps, c_steps) = match c.range {
            ColorRange::Limited => (219.0f32, 224.0f32),
            ColorRange::Full => (255.0, 255.0),
        };
        let (y_scale, c_scale) = ((1.0 / y_steps) as f64, (1.0 / c_steps) as f64);
        let fixed = |gain: f64, coeff: f64| (256.0 * 255.0 * gain * coeff).round_ties_even() as i16;
        YuvToRgb {
            y: fixed(y_scale, 1.0),
            rv: fixed(c_scale, 2.0 * (1.0 - kr)),
            gu: fixed(c_scale, -2.0 * kb * (1.0 - kb) / kg),
            gv: fixed(c_scale, -2.0 * kr * (1.0 - kr) / kg),
            bu: fixed(c_scale, 2.0 * (1.0 - kb)),
        }
    }

    /// One pixel, exactly as `videoconvert`'s ORC kernels compute it.
    #[inline]
    pub fn pixel(&self, y: u8, u: u8, v: u8) -> [u8; 3] {
        let wy = mulhs(splat(y), self.y);
        let (wu, wv) = (splat(u), splat(v));
        let r = wy.wrapping_add(mulhs(wv, self.rv));
        let g = wy
            .wrapping_add(mulhs(wu, self.gu))
            .wrapping_add(mulhs(wv, self.gv));
        let b = wy.wrapping_add(mulhs(wu, self.bu));
        [unbias(r), unbias(g), unbias(b)]
    }
}

/// ORC `subb x, c128` then `splatbw`: the sample minus 128 as a signed byte, copied into both bytes of a
/// 16-bit word (a word of about 257 × the signed byte).
#[inline]
fn splat(sample: u8) -> i16 {
    let b = sample ^ 0x80; // the bit pattern of (sample − 128) as i8
    i16::from_ne_bytes([b, b])
}

/// ORC `mulhsw`: the high 16 bits of the signed 32-bit product.
#[inline]
fn mulhs(a: i16, b: i16) -> i16 {
    ((a as i32 * b as i32) >> 16) as i16
}

/// ORC `convssswb` (saturate to a signed byte) and the final `addb 128`.
#[inline]
fn unbias(w: i16) -> u8 {
    (w.clamp(-128, 127) as i8 as u8) ^ 0x80
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
    match frame.format {
        PixelFormat::I420 => {
            for (y, orow) in out.chunks_exact_mut(w * 3).enumerate() {
                let yrow = &luma[y * frame.strides[0]..][..w];
                let u = &frame.plane(1)[y / 2 * frame.strides[1]..];
                let v = &frame.plane(2)[y / 2 * frame.strides[2]..];
                for (x, px) in orow.chunks_exact_mut(3).enumerate() {
                    px.copy_from_slice(&m.pixel(yrow[x], u[x / 2], v[x / 2]));
                }
            }
        }
        PixelFormat::Nv12 => {
            // Each chroma row upsampled to full width once; rows then blend two of these.
            let wide = nv12_wide_chroma(frame);
            for (y, orow) in out.chunks_exact_mut(w * 3).enumerate() {
                let yrow = &luma[y * frame.strides[0]..][..w];
                let ((ra, wa), (rb, wb)) = chroma_rows(y, h);
                let (a, b) = (&wide[ra * w * 2..][..w * 2], &wide[rb * w * 2..][..w * 2]);
                for (x, px) in orow.chunks_exact_mut(3).enumerate() {
                    let blend = |i: usize| ((wa * a[i] as u16 + wb * b[i] as u16 + 2) >> 2) as u8;
                    px.copy_from_slice(&m.pixel(yrow[x], blend(2 * x), blend(2 * x + 1)));
                }
            }
        }
        PixelFormat::Rgb => panic!("yuv_to_rgb called on an RGB frame"),
    }
    out
}

/// The two chroma rows blended into luma row `y` of `h`, with their weights (out of 4).
///
/// `videoconvert` pairs luma rows (−1, 0), (1, 2), (3, 4), … (rows clamped to the frame): the first of
/// a pair takes 3/4 of its own chroma row and 1/4 of the next, the second 1/4 of the previous and 3/4
/// of its own.
#[inline]
fn chroma_rows(y: usize, h: usize) -> ((usize, u16), (usize, u16)) {
    if y % 2 == 1 {
        ((y / 2, 3), ((y + 1).min(h - 1) / 2, 1))
    } else {
        (((y.max(1) - 1) / 2, 1), (y / 2, 3))
    }
}

/// Every NV12 chroma row as interleaved U,V at full width (`⌈h/2⌉ × w × 2` bytes), upsampled the way
/// `video_chroma_up_h2_u8` (centred) or `video_chroma_up_h2_cs_u8` (co-sited) does.
fn nv12_wide_chroma(frame: &Frame) -> Vec<u8> {
    let (w, ch) = (frame.width as usize, (frame.height as usize).div_ceil(2));
    let uv = frame.plane(1);
    let mut wide = vec![0u8; ch * w * 2];
    for (cy, row) in wide.chunks_exact_mut(w * 2).enumerate() {
        let src = &uv[cy * frame.strides[1]..][..w.div_ceil(2) * 2];
        for x in 0..w {
            for c in 0..2 {
                row[2 * x + c] = upsample_h(src, x, w, c, frame.chroma_site);
            }
        }
    }
    wide
}

/// Component `c` (0 = U, 1 = V) of full-width chroma sample `x` from one interleaved half-width row.
/// The last column of an even width keeps its nearest sample: GStreamer's loops stop one short.
#[inline]
fn upsample_h(src: &[u8], x: usize, w: usize, c: usize, site: ChromaSite) -> u8 {
    let at = |k: usize| src[2 * k + c] as u16;
    if x == 0 || x == w - 1 && x % 2 == 1 {
        return at(x / 2) as u8;
    }
    match (site, x % 2) {
        (ChromaSite::HCosited, 0) => at(x / 2) as u8,
        (ChromaSite::HCosited, _) => ((at(x / 2) + at(x / 2 + 1) + 1) >> 1) as u8,
        // Centred: odd x sits 1/4 past sample (x−1)/2, even x 1/4 before sample x/2.
        (ChromaSite::Centered, 1) => ((3 * at(x / 2) + at(x / 2 + 1) + 2) >> 2) as u8,
        (ChromaSite::Centered, _) => ((at(x / 2 - 1) + 3 * at(x / 2) + 2) >> 2) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The integer matrices `GST_DEBUG=video-converter:7` prints for NV12 → RGB (rows of `im`; its 4th
    /// column, the range offset, is what the ORC kernels leave out).
    #[test]
    fn matrices_equal_videoconvert() {
        let m = |c| {
            let m = YuvToRgb::new(c);
            [m.y, m.rv, m.bu, m.gu, m.gv]
        };
        assert_eq!(m(Colorimetry::BT601), [298, 409, 516, -100, -208]);
        assert_eq!(m(Colorimetry::BT709), [298, 459, 541, -55, -136]);
        assert_eq!(m(Colorimetry::BT2020), [298, 430, 548, -48, -167]);
        assert_eq!(m(Colorimetry::JPEG), [256, 359, 454, -88, -183]);
    }

    #[test]
    fn fixed_point_grey_black_white() {
        let m = YuvToRgb::new(Colorimetry::BT601);
        // videoconvert's bias: the range offset is dropped, so 16 → 0 only by saturation…
        assert_eq!(m.pixel(16, 128, 128), [0, 0, 0]);
        assert_eq!(m.pixel(128, 128, 128), [128, 128, 128]);
        // …and white reaches 253, not 255.
        assert_eq!(m.pixel(235, 128, 128), [253, 253, 253]);
        assert_eq!(
            YuvToRgb::new(Colorimetry::JPEG).pixel(255, 128, 128),
            [255, 255, 255]
        );
    }

    #[test]
    fn chroma_row_pairs_clamp_at_the_edges() {
        assert_eq!(chroma_rows(0, 4), ((0, 1), (0, 3)));
        assert_eq!(chroma_rows(1, 4), ((0, 3), (1, 1)));
        assert_eq!(chroma_rows(2, 4), ((0, 1), (1, 3)));
        assert_eq!(chroma_rows(3, 4), ((1, 3), (1, 1)));
        assert_eq!(chroma_rows(4, 5), ((1, 1), (2, 3)));
    }

    #[test]
    fn horizontal_upsampling_per_site() {
        let row = [0u8, 0, 100, 0, 200, 0]; // U samples 0, 100, 200
        let up = |site, w| {
            (0..w)
                .map(|x| upsample_h(&row, x, w, 0, site))
                .collect::<Vec<_>>()
        };
        assert_eq!(up(ChromaSite::Centered, 6), [0, 25, 75, 125, 175, 200]);
        assert_eq!(up(ChromaSite::Centered, 5), [0, 25, 75, 125, 175]);
        assert_eq!(up(ChromaSite::HCosited, 6), [0, 50, 100, 150, 200, 200]);
        assert_eq!(up(ChromaSite::HCosited, 5), [0, 50, 100, 150, 200]);
    }

    #[test]
    fn i420_uses_nearest_chroma_nv12_interpolates() {
        let (w, h) = (4usize, 2usize);
        let ys = [128u8; 8];
        let mut i420 = ys.to_vec();
        i420.extend([100, 200, 128, 128]); // U row, then V row
        let mut nv12 = ys.to_vec();
        nv12.extend([100, 128, 200, 128]);
        let a = yuv_to_rgb(&Frame::i420(w as u32, h as u32, &i420));
        let b = yuv_to_rgb(&Frame::nv12(w as u32, h as u32, &nv12));
        // Column 1: I420 repeats U 100; NV12 (centred) blends (3·100 + 200 + 2) >> 2 = 125.
        let m = YuvToRgb::new(Colorimetry::BT601);
        assert_eq!(a[3..6], m.pixel(128, 100, 128));
        assert_eq!(b[3..6], m.pixel(128, 125, 128));
        assert_eq!(a[..3], b[..3], "column 0 is the sample itself in both");
    }
}
