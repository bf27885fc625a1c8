//! Frame → `pixel_values` as a candle tensor on the engine's device (feature `candle`): the "pixel_values
//! in" side of the detector's narrow interface, used by the streaming worker, `rexstream detect` and
//! rexbench alike.
//!
//! On a CUDA device (feature `cuda`) the frame's planes are uploaded once and the kernels of `crate::cuda`
//! run on candle's own stream, so `pixel_values` is born in device memory and the vision tower reads it in
//! stream order: no host round trip, no cross-stream synchronisation. Everywhere else, or if the kernels
//! cannot be loaded, the CPU reference path runs and the tensor takes its `Vec` (on a GPU device candle
//! then uploads it). Both paths give the same values (tests/kernels_on_host.rs, tests/cuda_vs_cpu.rs).

use std::sync::OnceLock;

use candle_core::{Device, Tensor};

use crate::{patchify, Frame, PrepError};

/// One frame, ready for the engine.
#[derive(Debug)]
pub struct PreparedTensor {
    /// `[N, 1176]` f32 on the preparer's device, rows in merge-group order.
    pub pixel_values: Tensor,
    pub grid_thw: [usize; 3],
    /// `<|image_pad|>` copies the prompt needs.
    pub num_image_tokens: usize,
    /// Model input size (w', h').
    pub resized: (u32, u32),
}

/// Prepares frames for one device; the path is chosen once, when it is built.
pub struct TensorPrep {
    device: Device,
    #[cfg(feature = "cuda")]
    cuda: Option<(crate::cuda::CudaPrep, candle_core::CudaDevice)>,
}

impl TensorPrep {
    /// The preparer for tensors on `device`. The first one built in a process logs which path it took.
    pub fn new(device: &Device) -> TensorPrep {
        #[cfg(feature = "cuda")]
        let cuda = match device {
            Device::Cuda(d) => match crate::cuda::CudaPrep::on_stream(d.cuda_stream()) {
                Ok(k) => Some((k, d.clone())),
                Err(e) => {
                    tracing::warn!(message = "CUDA preprocessing kernels unavailable; using the CPU path.", error = %e);
                    None
                }
            },
            _ => None,
        };
        let prep = TensorPrep {
            device: device.clone(),
            #[cfg(feature = "cuda")]
            cuda,
        };
        static LOGGED: OnceLock<()> = OnceLock::new();
        LOGGED.get_or_init(|| {
            tracing::info!(message = "Preprocessing path selected.", path = prep.path(), device = ?device.location())
        });
        prep
    }

    /// `"cuda"` (rexprep's kernels on the device) or `"cpu"` (the reference path).
    pub fn path(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if self.cuda.is_some() {
            return "cuda";
        }
        "cpu"
    }

    /// The frame as the model's input. On the CUDA path this waits for the kernels, so a caller's timing
    /// of this call is the preprocessing time.
    pub fn prepare(&self, frame: &Frame) -> Result<PreparedTensor, PrepError> {
        self.prepare_within(frame, crate::MAX_PIXELS)
    }

    /// [`TensorPrep::prepare`] with the model input capped at `max_pixels` (`[model] max_pixels`, a stream's
    /// own, `rexstream detect --max-pixels`): fewer image tokens, so cheaper vision and prefill, for less detail.
    pub fn prepare_within(
        &self,
        frame: &Frame,
        max_pixels: u64,
    ) -> Result<PreparedTensor, PrepError> {
        #[cfg(feature = "cuda")]
        if let Some((kernels, dev)) = &self.cuda {
            use candle_core::cuda_backend::CudaStorage;
            use candle_core::op::BackpropOp;
            let p = kernels.prepare_within(frame, max_pixels)?;
            kernels
                .stream()
                .synchronize()
                .map_err(|e| PrepError::Cuda {
                    stage: "synchronize",
                    message: e.to_string(),
                })?;
            let rows = p.grid_thw[1] * p.grid_thw[2];
            let storage = CudaStorage::wrap_cuda_slice(p.pixel_values, dev.clone());
            return Ok(PreparedTensor {
                pixel_values: Tensor::from_storage(
                    candle_core::Storage::Cuda(storage),
                    (rows, patchify::ROW),
                    BackpropOp::none(),
                    false,
                ),
                grid_thw: p.grid_thw,
                num_image_tokens: patchify::num_image_tokens(p.grid_thw),
                resized: p.resized,
            });
        }
        let p = crate::prepare_within(frame, max_pixels)?;
        let rows = p.pixel_values.len() / patchify::ROW;
        Ok(PreparedTensor {
            pixel_values: Tensor::from_vec(p.pixel_values, (rows, patchify::ROW), &self.device)?,
            grid_thw: p.grid_thw,
            num_image_tokens: patchify::num_image_tokens(p.grid_thw),
            resized: p.resized,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_tensor_equals_prepare() {
        let rgb: Vec<u8> = (0..97 * 61 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let frame = Frame::rgb(97, 61, &rgb);
        let prep = TensorPrep::new(&Device::Cpu);
        assert_eq!(prep.path(), "cpu");
        let t = prep.prepare(&frame).unwrap();
        let p = crate::prepare(&frame).unwrap();
        assert_eq!(t.grid_thw, p.grid_thw);
        assert_eq!(t.num_image_tokens, p.num_image_tokens());
        assert_eq!(t.resized, p.resized);
        assert_eq!(
            t.pixel_values.dims(),
            [p.pixel_values.len() / patchify::ROW, patchify::ROW]
        );
        let values: Vec<f32> = t.pixel_values.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(values, p.pixel_values);
    }

    #[test]
    fn a_lower_pixel_cap_gives_fewer_image_tokens_and_the_capped_reference_values() {
        let rgb: Vec<u8> = (0..640 * 480 * 3).map(|i| (i * 13 % 256) as u8).collect();
        let frame = Frame::rgb(640, 480, &rgb);
        let full = TensorPrep::new(&Device::Cpu).prepare(&frame).unwrap();
        let capped = TensorPrep::new(&Device::Cpu)
            .prepare_within(&frame, 200_704)
            .unwrap();
        assert_eq!((full.resized, full.num_image_tokens), ((644, 476), 391));
        // smart_resize(480, 640, max_pixels=200704) = (364, 504): 13 × 18 merged tokens.
        assert_eq!((capped.resized, capped.num_image_tokens), ((504, 364), 234));
        let p = crate::prepare_within(&frame, 200_704).unwrap();
        let values: Vec<f32> = capped
            .pixel_values
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(values, p.pixel_values);
    }
}
