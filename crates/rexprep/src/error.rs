//! The one error type of rexprep. Every variant names the frame size, plane or field and the bad value,
//! because these errors end up in a stream's log line and must be actionable there.

use crate::PixelFormat;

/// Why a frame could not be turned into `pixel_values`.
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    /// rex-omni-spec.md §1.3: transformers 4.51.3 refuses sides under the patch-merge factor.
    #[error("frame {width}x{height}: height {height} and width {width} must both be at least {factor} px")]
    TooSmall {
        width: u32,
        height: u32,
        factor: u32,
    },

    /// rex-omni-spec.md §1.3: the aspect-ratio guard of smart_resize (true division, > 200 fails).
    #[error("frame {width}x{height}: absolute aspect ratio must be at most 200, got {ratio}")]
    AspectRatio { width: u32, height: u32, ratio: f64 },

    /// `max_pixels` so small for this aspect ratio that smart_resize's short side floors to 0 rows.
    #[error("frame {width}x{height}: max_pixels {max_pixels} leaves the short side no 28 px row; raise max_pixels or crop the frame")]
    MaxPixelsTooSmall {
        width: u32,
        height: u32,
        max_pixels: u64,
    },

    /// A plane does not fit in the buffer the decoder handed us.
    #[error("{format:?} frame {width}x{height}: plane {plane} needs bytes {offset}..{end} (stride {stride}) but the buffer has {len}")]
    BufferTooSmall {
        format: PixelFormat,
        width: u32,
        height: u32,
        plane: usize,
        offset: usize,
        stride: usize,
        end: usize,
        len: usize,
    },

    /// A row stride shorter than one row of pixels.
    #[error("{format:?} frame {width}x{height}: plane {plane} stride {stride} is shorter than a row ({min} bytes)")]
    StrideTooSmall {
        format: PixelFormat,
        width: u32,
        height: u32,
        plane: usize,
        stride: usize,
        min: usize,
    },

    /// The prepared values could not become a tensor on the engine's device.
    #[cfg(feature = "candle")]
    #[error("pixel_values tensor: {0}")]
    Tensor(#[from] candle_core::Error),

    /// The CUDA path failed after it was selected (driver call, kernel load or launch).
    #[cfg(feature = "cuda")]
    #[error("cuda preprocessing: {stage}: {message}")]
    Cuda {
        stage: &'static str,
        message: String,
    },
}
