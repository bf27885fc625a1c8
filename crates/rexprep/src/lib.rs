//! Frame → Rex-Omni `pixel_values` [N, 1176] and `grid_thw` (../shared/reference/rex-omni-spec.md §1).
//!
//! Layout, in data-flow order:
//! - `frame`: the borrowed decoded frame (RGB / NV12 / I420, strides and offsets as GStreamer gives them)
//!   and its colorimetry and chroma siting.
//! - `color`: NV12 / I420 → RGB (CPU), byte-identical to GStreamer 1.22 `videoconvert`.
//! - `smart_resize`: original size → model size, multiples of 28 (spec §1.3).
//! - `resize`: Pillow 10.4 bicubic, bit-exact (spec §1.4).
//! - `normalize`: CLIP rescale + normalise as a lookup table (spec §1.5).
//! - `patchify`: temporal duplication and 2×2 merge-group patch order (spec §1.6).
//! - `motion`: the motion gate (small luma image against a running background, serve rule); used by
//!   rexstream's ingest and by rexbench's scenarios, not by `prepare`.
//! - `cuda` (feature `cuda`): the same computation as CUDA kernels on device buffers.
//! - `tensor` (feature `candle`): a frame → `pixel_values` as a candle tensor on the engine's device,
//!   through the CUDA kernels on a GPU (the values never visit the host) or the CPU path.
//!
//! [`prepare`] is the CPU reference path; it runs on the calling thread (the detector worker).

mod color;
mod error;
mod frame;
pub mod motion;
pub mod normalize;
pub mod patchify;
pub mod resize;
mod smart_resize;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "candle")]
pub mod tensor;

pub use color::{yuv_to_rgb, YuvToRgb};
pub use error::PrepError;
pub use frame::{ChromaSite, ColorMatrix, ColorRange, Colorimetry, Frame, PixelFormat};
pub use smart_resize::{
    check_max_pixels, smart_resize, smart_resize_within, FACTOR, MAX_PIXELS, MIN_PIXELS,
};

/// The model input for one frame.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// [N, 1176] row-major, N = grid_thw[1] · grid_thw[2].
    pub pixel_values: Vec<f32>,
    /// (t, h/14, w/14) = (1, gh, gw); gh and gw are even.
    pub grid_thw: [usize; 3],
    /// Model input size (w', h').
    pub resized: (u32, u32),
    /// Frame size (w, h): bins convert against this (design.md).
    pub original: (u32, u32),
}

impl Prepared {
    /// `<|image_pad|>` copies in the prompt: t·gh·gw / 4 (spec §1.6).
    pub fn num_image_tokens(&self) -> usize {
        patchify::num_image_tokens(self.grid_thw)
    }
}

/// The resized uint8 RGB image (w'·h'·3, packed) and its size (w', h'): the bit-exact intermediate.
pub fn resize_frame(frame: &Frame) -> Result<(Vec<u8>, (u32, u32)), PrepError> {
    resize_frame_within(frame, MAX_PIXELS)
}

/// [`resize_frame`] with the model input capped at `max_pixels` ([`smart_resize_within`]).
pub fn resize_frame_within(
    frame: &Frame,
    max_pixels: u64,
) -> Result<(Vec<u8>, (u32, u32)), PrepError> {
    frame.check()?;
    let (h2, w2) = smart_resize_within(frame.height, frame.width, max_pixels)?;
    let rgb_owned;
    let (rgb, stride): (&[u8], usize) = match frame.format {
        PixelFormat::Rgb => (frame.plane(0), frame.strides[0]),
        PixelFormat::Nv12 | PixelFormat::I420 => {
            rgb_owned = yuv_to_rgb(frame);
            (&rgb_owned, frame.width as usize * 3)
        }
    };
    Ok((
        resize::resize_rgb(rgb, frame.width, frame.height, stride, w2, h2),
        (w2, h2),
    ))
}

/// CPU reference path: frame in, `pixel_values` + `grid_thw` out, identical to the HF slow
/// `Qwen2VLImageProcessor` with Rex-Omni's bounds (spec §1.1) for RGB input.
pub fn prepare(frame: &Frame) -> Result<Prepared, PrepError> {
    prepare_within(frame, MAX_PIXELS)
}

/// [`prepare`] with the model input capped at `max_pixels` ([`smart_resize_within`]): the processor's
/// `max_pixels` argument, for fewer image tokens per frame.
pub fn prepare_within(frame: &Frame, max_pixels: u64) -> Result<Prepared, PrepError> {
    let (resized, (w2, h2)) = resize_frame_within(frame, max_pixels)?;
    let pixel_values = patchify::patchify(&resized, w2 as usize, h2 as usize);
    Ok(Prepared {
        pixel_values,
        grid_thw: [
            1,
            h2 as usize / patchify::PATCH,
            w2 as usize / patchify::PATCH,
        ],
        resized: (w2, h2),
        original: (frame.width, frame.height),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_shapes_follow_the_spec_table() {
        let data = vec![128u8; 640 * 480 * 3];
        let p = prepare(&Frame::rgb(640, 480, &data)).unwrap();
        assert_eq!(p.grid_thw, [1, 34, 46]);
        assert_eq!(p.pixel_values.len(), 1564 * 1176);
        assert_eq!(p.num_image_tokens(), 391);
        assert_eq!((p.resized, p.original), ((644, 476), (640, 480)));
    }

    #[test]
    fn prepare_rejects_bad_frames_with_names() {
        let data = vec![0u8; 30 * 20 * 3];
        let e = prepare(&Frame::rgb(30, 20, &data)).unwrap_err();
        assert!(e.to_string().contains("30x20"), "{e}");
        let e = prepare(&Frame::rgb(64, 64, &data)).unwrap_err();
        assert!(
            matches!(e, PrepError::BufferTooSmall { plane: 0, .. }),
            "{e}"
        );
    }
}
