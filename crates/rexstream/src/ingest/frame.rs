//! [`Frame`]: one decoded picture, owned, as it leaves the GStreamer appsink.
//!
//! In: an appsink sample (on a GStreamer streaming thread). Out: a `Frame` with its own copy of the
//! pixels, so the decoder's buffer pool is never held by a slow detector. The copy is one memcpy
//! per frame (about 1 ms for 1080p RGB), the only work done on the streaming thread.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use gstreamer as gst;
use gstreamer_video as gst_video;

pub use rexprep::{ChromaSite, Colorimetry, PixelFormat};

/// One decoded frame of one stream (design.md: `Frame { stream, seq, pts, captured_at, width,
/// height, format, pixels }`).
#[derive(Debug, Clone)]
pub struct Frame {
    /// Stream name.
    pub stream: Arc<str>,
    /// Index of the stream in the pipeline (slot and scheduler index).
    pub stream_index: usize,
    /// Per-stream frame counter, from 0, counting every frame the appsink delivered (so a gap in
    /// published seqs = frames superseded before the detector saw them).
    pub seq: u64,
    /// Presentation timestamp from the source, in nanoseconds, when it has one.
    pub pts_ns: Option<u64>,
    /// Wall-clock time the frame left the decoder (the capture time we can observe).
    pub captured_at: SystemTime,
    /// Monotonic twin of `captured_at`, for latency measurement immune to clock steps.
    pub captured_mono: Instant,
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    /// Plane bytes, laid out as `strides`/`offsets` say.
    pub data: Vec<u8>,
    /// Bytes per row of each plane (unused planes 0).
    pub strides: [usize; 3],
    /// Start of each plane in `data`.
    pub offsets: [usize; 3],
    /// How to read YUV samples (from the caps; ignored for RGB).
    pub colorimetry: Colorimetry,
    /// Where NV12 chroma samples sit (from the caps, as GStreamer interprets them; ignored otherwise).
    pub chroma_site: ChromaSite,
}

/// Why a sample could not become a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("sample has no caps")]
    NoCaps,
    #[error("caps are not raw video: {0}")]
    BadCaps(String),
    #[error("unsupported pixel format {0:?} (appsink caps should prevent this)")]
    Format(gst_video::VideoFormat),
    #[error("sample has no buffer")]
    NoBuffer,
    #[error("buffer cannot be mapped readable")]
    Map,
    #[error("buffer of {got} bytes is smaller than the {need} its video info needs")]
    Short { got: usize, need: usize },
}

impl Frame {
    /// Copy a sample's pixels into a new frame. Runs on the streaming thread: no allocation beyond
    /// the pixel copy, no locks.
    pub fn from_sample(
        stream: &Arc<str>,
        stream_index: usize,
        seq: u64,
        sample: &gst::Sample,
    ) -> Result<Frame, FrameError> {
        let captured_at = SystemTime::now();
        let captured_mono = Instant::now();
        let caps = sample.caps().ok_or(FrameError::NoCaps)?;
        let info = gst_video::VideoInfo::from_caps(caps)
            .map_err(|_| FrameError::BadCaps(caps.to_string()))?;
        let format = match info.format() {
            gst_video::VideoFormat::Rgb => PixelFormat::Rgb,
            gst_video::VideoFormat::Nv12 => PixelFormat::Nv12,
            gst_video::VideoFormat::I420 => PixelFormat::I420,
            other => return Err(FrameError::Format(other)),
        };
        let buffer = sample.buffer().ok_or(FrameError::NoBuffer)?;
        let map = buffer.map_readable().map_err(|_| FrameError::Map)?;
        let mut strides = [0usize; 3];
        let mut offsets = [0usize; 3];
        // A VideoMeta (set by upstream elements with padded pools) overrides the caps layout.
        if let Some(meta) = buffer.meta::<gst_video::VideoMeta>() {
            for (i, (s, o)) in meta.stride().iter().zip(meta.offset()).enumerate().take(3) {
                strides[i] = *s as usize;
                offsets[i] = *o;
            }
        } else {
            for (i, (s, o)) in info.stride().iter().zip(info.offset()).enumerate().take(3) {
                strides[i] = *s as usize;
                offsets[i] = *o;
            }
        }
        let (w, h) = (info.width() as usize, info.height() as usize);
        if w == 0 || h == 0 {
            return Err(FrameError::BadCaps(caps.to_string()));
        }
        // The last byte the planes reach: a short buffer must not reach the detector.
        let need = match format {
            PixelFormat::Rgb => offsets[0] + strides[0] * (h - 1) + 3 * w,
            PixelFormat::Nv12 => offsets[1] + strides[1] * (h.div_ceil(2) - 1) + 2 * w.div_ceil(2),
            PixelFormat::I420 => offsets[2] + strides[2] * (h.div_ceil(2) - 1) + w.div_ceil(2),
        };
        if map.size() < need {
            return Err(FrameError::Short {
                got: map.size(),
                need,
            });
        }
        let pts_ns = buffer.pts().map(|t| t.nseconds());
        let colorimetry = colorimetry_of(&info);
        Ok(Frame {
            stream: stream.clone(),
            stream_index,
            seq,
            pts_ns,
            captured_at,
            captured_mono,
            width: info.width(),
            height: info.height(),
            format,
            data: map.as_slice().to_vec(),
            strides,
            offsets,
            colorimetry,
            chroma_site: chroma_site_of(&info),
        })
    }

    /// Borrow as rexprep's input.
    pub fn as_prep(&self) -> rexprep::Frame<'_> {
        rexprep::Frame {
            width: self.width,
            height: self.height,
            format: self.format,
            data: &self.data,
            strides: self.strides,
            offsets: self.offsets,
            colorimetry: self.colorimetry,
            chroma_site: self.chroma_site,
        }
    }
}

/// The caps' colorimetry as rexprep needs it; GStreamer's own default by height when the caps
/// leave the matrix unknown.
fn colorimetry_of(info: &gst_video::VideoInfo) -> Colorimetry {
    use gst_video::{VideoColorMatrix as M, VideoColorRange as R};
    let c = info.colorimetry();
    let default = Colorimetry::gstreamer_default(info.height());
    let matrix = match c.matrix() {
        M::Bt601 => rexprep::ColorMatrix::Bt601,
        M::Bt709 => rexprep::ColorMatrix::Bt709,
        M::Bt2020 => rexprep::ColorMatrix::Bt2020,
        _ => default.matrix,
    };
    let range = match c.range() {
        R::Range0_255 => rexprep::ColorRange::Full,
        R::Range16_235 => rexprep::ColorRange::Limited,
        _ => default.range,
    };
    Colorimetry { matrix, range }
}

/// The caps' chroma siting as `videoconvert` reads it: only the horizontal co-siting flag changes its
/// NV12 upsampling (unknown counts as centred, like GStreamer).
fn chroma_site_of(info: &gst_video::VideoInfo) -> ChromaSite {
    if info
        .chroma_site()
        .contains(gst_video::VideoChromaSite::H_COSITED)
    {
        ChromaSite::HCosited
    } else {
        ChromaSite::Centered
    }
}
