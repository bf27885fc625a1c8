//! `Frame`: a borrowed decoded video frame as GStreamer hands it out (RGB, NV12 or I420, with per-plane
//! strides and offsets from `VideoInfo`/`VideoMeta`), plus the colorimetry and chroma siting needed to
//! turn YUV into RGB.
//! Plain data; validated by `Frame::check` before any pixel is read.

use crate::PrepError;

/// Pixel layouts the ingest stage may deliver (design.md: NV12 | I420 | RGB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Packed 8-bit R,G,B; plane 0 only. GStreamer pads RGB rows to 4 bytes: honour `strides[0]`.
    Rgb,
    /// Plane 0: Y (w×h); plane 1: interleaved U,V at half resolution (⌈w/2⌉×⌈h/2⌉ pairs).
    Nv12,
    /// Plane 0: Y; plane 1: U; plane 2: V; chroma planes ⌈w/2⌉×⌈h/2⌉.
    I420,
}

/// The YUV → RGB matrix (Kr, Kb pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorMatrix {
    /// ITU-R BT.601: Kr 0.299, Kb 0.114.
    Bt601,
    /// ITU-R BT.709: Kr 0.2126, Kb 0.0722.
    Bt709,
    /// ITU-R BT.2020: Kr 0.2627, Kb 0.0593.
    Bt2020,
}

/// Quantisation range of the Y'CbCr samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorRange {
    /// "TV" range: Y in 16..=235, Cb/Cr in 16..=240 (GStreamer `GST_VIDEO_COLOR_RANGE_16_235`).
    Limited,
    /// "PC" range: 0..=255 (`GST_VIDEO_COLOR_RANGE_0_255`, e.g. JPEG / `jpeg` colorimetry).
    Full,
}

/// How to read YUV samples. Ignored for RGB frames.
///
/// Take it from the caps' `colorimetry` field when present; when the caps do not say, use
/// [`Colorimetry::gstreamer_default`], which is what GStreamer 1.22's `videoconvert` assumes for 8-bit
/// NV12/I420 caps without colorimetry: BT.601 up to 576 lines, BT.709 above (also at 2160 lines),
/// limited range. Measured with `GST_DEBUG=video-converter:6` (its YUV matrix: 1.596027 for V→R at
/// height 576, 1.792741 at 578 and 2160).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Colorimetry {
    pub matrix: ColorMatrix,
    pub range: ColorRange,
}

impl Colorimetry {
    pub const BT601: Colorimetry = Colorimetry {
        matrix: ColorMatrix::Bt601,
        range: ColorRange::Limited,
    };
    pub const BT709: Colorimetry = Colorimetry {
        matrix: ColorMatrix::Bt709,
        range: ColorRange::Limited,
    };
    pub const BT2020: Colorimetry = Colorimetry {
        matrix: ColorMatrix::Bt2020,
        range: ColorRange::Limited,
    };
    /// `colorimetry=1:4:0:0` (what JPEG decoders put on their caps): BT.601 matrix, full range.
    pub const JPEG: Colorimetry = Colorimetry {
        matrix: ColorMatrix::Bt601,
        range: ColorRange::Full,
    };

    /// GStreamer's default for 8-bit YUV caps without a `colorimetry` field, by frame height.
    pub fn gstreamer_default(height: u32) -> Colorimetry {
        if height > 576 {
            Self::BT709
        } else {
            Self::BT601
        }
    }
}

/// Where each 4:2:0 chroma sample sits relative to the luma grid (the caps' `chroma-site`). Ignored for RGB
/// frames and for I420, whose conversion uses the nearest chroma sample like `videoconvert`'s I420 fast path.
///
/// Only the horizontal siting changes how GStreamer 1.22's `videoconvert` upsamples NV12 chroma: both
/// sitings interpolate vertically as if centred between two luma rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChromaSite {
    /// Between two luma columns (`chroma-site=jpeg`, GStreamer's `NONE`, and unknown).
    Centered,
    /// On the even luma columns (`chroma-site=mpeg2`, the `H_COSITED` flag).
    HCosited,
}

impl ChromaSite {
    /// What GStreamer assumes for YUV caps without `colorimetry` or `chroma-site`: centred up to 576
    /// lines, horizontally co-sited above (`set_default_colorimetry` in gst-libs/gst/video/video-info.c).
    pub fn gstreamer_default(height: u32) -> ChromaSite {
        if height > 576 {
            ChromaSite::HCosited
        } else {
            ChromaSite::Centered
        }
    }
}

/// One decoded frame, borrowed from the decoder's buffer (host memory).
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    /// The whole mapped buffer; planes are found through `offsets` and `strides`.
    pub data: &'a [u8],
    /// Bytes per row of each plane (unused planes: 0).
    pub strides: [usize; 3],
    /// Byte offset of each plane in `data` (unused planes: 0).
    pub offsets: [usize; 3],
    pub colorimetry: Colorimetry,
    pub chroma_site: ChromaSite,
}

impl<'a> Frame<'a> {
    /// A tightly packed RGB frame (stride `3*width`).
    pub fn rgb(width: u32, height: u32, data: &'a [u8]) -> Frame<'a> {
        Frame {
            width,
            height,
            format: PixelFormat::Rgb,
            data,
            strides: [width as usize * 3, 0, 0],
            offsets: [0; 3],
            colorimetry: Colorimetry::gstreamer_default(height),
            chroma_site: ChromaSite::gstreamer_default(height),
        }
    }

    /// A tightly packed NV12 frame (Y then UV, no padding) with GStreamer's default colorimetry and
    /// chroma siting.
    pub fn nv12(width: u32, height: u32, data: &'a [u8]) -> Frame<'a> {
        let (w, h) = (width as usize, height as usize);
        let cw = w.div_ceil(2);
        Frame {
            width,
            height,
            format: PixelFormat::Nv12,
            data,
            strides: [w, cw * 2, 0],
            offsets: [0, w * h, 0],
            colorimetry: Colorimetry::gstreamer_default(height),
            chroma_site: ChromaSite::gstreamer_default(height),
        }
    }

    /// A tightly packed I420 frame (Y, U, V, no padding) with GStreamer's default colorimetry and
    /// chroma siting.
    pub fn i420(width: u32, height: u32, data: &'a [u8]) -> Frame<'a> {
        let (w, h) = (width as usize, height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        Frame {
            width,
            height,
            format: PixelFormat::I420,
            data,
            strides: [w, cw, cw],
            offsets: [0, w * h, w * h + cw * ch],
            colorimetry: Colorimetry::gstreamer_default(height),
            chroma_site: ChromaSite::gstreamer_default(height),
        }
    }

    /// (bytes per row actually read, rows) of each used plane.
    fn planes(&self) -> Vec<(usize, usize)> {
        let (w, h) = (self.width as usize, self.height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        match self.format {
            PixelFormat::Rgb => vec![(w * 3, h)],
            PixelFormat::Nv12 => vec![(w, h), (cw * 2, ch)],
            PixelFormat::I420 => vec![(w, h), (cw, ch), (cw, ch)],
        }
    }

    /// Every used plane lies inside `data` with a stride at least one row long.
    pub fn check(&self) -> Result<(), PrepError> {
        for (plane, (row, rows)) in self.planes().into_iter().enumerate() {
            let (stride, offset) = (self.strides[plane], self.offsets[plane]);
            if stride < row {
                return Err(PrepError::StrideTooSmall {
                    format: self.format,
                    width: self.width,
                    height: self.height,
                    plane,
                    stride,
                    min: row,
                });
            }
            // The last row needs only `row` bytes, not a full stride (decoders may trim the tail).
            let end = offset
                .checked_add(stride.saturating_mul(rows.saturating_sub(1)))
                .and_then(|e| e.checked_add(row))
                .unwrap_or(usize::MAX);
            if rows > 0 && end > self.data.len() {
                return Err(PrepError::BufferTooSmall {
                    format: self.format,
                    width: self.width,
                    height: self.height,
                    plane,
                    offset,
                    stride,
                    end,
                    len: self.data.len(),
                });
            }
        }
        Ok(())
    }

    /// Plane `i` from its offset to the end of the buffer (call after `check`).
    pub(crate) fn plane(&self, i: usize) -> &'a [u8] {
        &self.data[self.offsets[i].min(self.data.len())..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_plane_and_sizes() {
        let buf = vec![0u8; 100];
        let e = Frame::nv12(10, 10, &buf).check().unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("plane 1") && msg.contains("150") && msg.contains("100"),
            "{msg}"
        );
        let mut f = Frame::rgb(10, 2, &buf);
        f.strides[0] = 20;
        assert!(f.check().unwrap_err().to_string().contains("stride 20"));
        assert!(Frame::rgb(10, 3, &buf[..90]).check().is_ok());
    }

    #[test]
    fn default_colorimetry_follows_gstreamer() {
        assert_eq!(Colorimetry::gstreamer_default(480), Colorimetry::BT601);
        assert_eq!(Colorimetry::gstreamer_default(576), Colorimetry::BT601);
        assert_eq!(Colorimetry::gstreamer_default(720), Colorimetry::BT709);
        assert_eq!(Colorimetry::gstreamer_default(578), Colorimetry::BT709);
        assert_eq!(Colorimetry::gstreamer_default(2160), Colorimetry::BT709);
        assert_eq!(ChromaSite::gstreamer_default(576), ChromaSite::Centered);
        assert_eq!(ChromaSite::gstreamer_default(577), ChromaSite::HCosited);
    }
}
