//! The CUDA kernels against the CPU reference path on the committed fixtures (RGB and NV12/I420), plus the
//! kernel time per 1080p frame. The GPU tests are `#[ignore]`d, so a plain `cargo test` lists them as
//! ignored (never as passed); run them on a GPU host with
//! `cargo test -p rexprep --features cuda,candle --test cuda_vs_cpu -- --include-ignored`. Run that way they
//! FAIL when the build lacks `cuda`, when there is no driver, or when the driver is there but the device or
//! the kernels do not work: asking for a GPU test on a machine that cannot run it is an error, not a skip.
//! scripts/cuda-build-check.sh compiles this file with `--features cuda,candle` (without running it).
//! On a GPU host without Rust: build here with
//! `cargo test -p rexprep --features cuda,candle --test cuda_vs_cpu --no-run`, copy the binary and
//! tests/fixtures/prep, run it with `REXPREP_FIXTURES=<that folder> <binary> --include-ignored --nocapture`.

#[cfg(feature = "cuda")]
mod common;

/// Why the GPU tests are ignored by default, and how to run them.
const NEEDS_GPU: &str =
    "needs a CUDA GPU: run with `cargo test -p rexprep --features cuda,candle --test cuda_vs_cpu -- --include-ignored`";

#[test]
#[ignore = "needs a CUDA GPU: run with `cargo test -p rexprep --features cuda,candle --test cuda_vs_cpu -- --include-ignored`"]
fn gpu_matches_cpu() {
    #[cfg(not(feature = "cuda"))]
    panic!("built without feature `cuda`; {NEEDS_GPU}");
    #[cfg(feature = "cuda")]
    gpu::run();
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::time::Instant;

    use super::common::{dir, manifest, png_rgb, yuv_data, yuv_frame};
    use cudarc::driver::CudaSlice;
    use rexprep::cuda::{driver_present, CudaPrep, DeviceFrame};
    use rexprep::{prepare, resize_frame, Frame};

    /// `frame`'s layout over planes already uploaded to `dev`.
    fn on_device<'a>(frame: &Frame, dev: &'a CudaSlice<u8>) -> DeviceFrame<'a> {
        DeviceFrame {
            width: frame.width,
            height: frame.height,
            format: frame.format,
            data: dev,
            strides: frame.strides,
            offsets: frame.offsets,
            colorimetry: frame.colorimetry,
            chroma_site: frame.chroma_site,
        }
    }

    fn compare(cuda: &CudaPrep, name: &str, frame: &Frame) {
        let cpu = prepare(frame).unwrap();
        let gpu = cuda.prepare(frame).unwrap();
        let pv = cuda.stream().clone_dtoh(&gpu.pixel_values).unwrap();
        assert_eq!(gpu.grid_thw, cpu.grid_thw, "{name}");
        let max = pv
            .iter()
            .zip(&cpu.pixel_values)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let (cpu_resized, (w2, h2)) = resize_frame(frame).unwrap();
        let dev = cuda.stream().clone_htod(frame.data).unwrap();
        let r = cuda.resize_device(&on_device(frame, &dev), w2, h2).unwrap();
        let gpu_resized = cuda.stream().clone_dtoh(&r).unwrap();
        let differing = gpu_resized
            .iter()
            .zip(&cpu_resized)
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "{name}: GPU vs CPU: resized differing bytes {differing}, pixel_values max |d| {max:e}"
        );
        assert_eq!(differing, 0, "{name}");
        assert!(max <= 1e-6, "{name}: {max}");
    }

    pub fn run() {
        assert!(
            driver_present(),
            "no NVIDIA driver (libcuda) on this host; {}",
            super::NEEDS_GPU
        );
        // A driver whose device or kernels do not work is a failure, not a skip.
        let cuda = CudaPrep::new(0)
            .unwrap_or_else(|e| panic!("driver present but the kernels cannot be loaded: {e}"));
        let m = manifest();
        for c in m["cases"].as_array().unwrap() {
            let name = c["case"].as_str().unwrap();
            let (w, h, rgb) = png_rgb(&dir().join(format!("{name}.png")));
            compare(&cuda, name, &Frame::rgb(w, h, &rgb));
        }
        for c in m["yuv"].as_array().unwrap() {
            let data = yuv_data(c);
            compare(&cuda, c["file"].as_str().unwrap(), &yuv_frame(c, &data));
        }

        // Kernel time per 1080p frame: RGB and an NV12 frame of the same picture, already on the device.
        let (w, h, rgb) = png_rgb(&dir().join("astronaut_1920x1080.png"));
        let nv12 = to_nv12(w as usize, h as usize, &rgb);
        for (label, frame) in [
            ("RGB", Frame::rgb(w, h, &rgb)),
            ("NV12", Frame::nv12(w, h, &nv12)),
        ] {
            compare(&cuda, &format!("1080p {label}"), &frame);
            let dev = cuda.stream().clone_htod(frame.data).unwrap();
            let df = on_device(&frame, &dev);
            for _ in 0..5 {
                cuda.prepare_device(&df).unwrap();
            }
            cuda.stream().synchronize().unwrap();
            let iters = 100;
            let t = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(cuda.prepare_device(&df).unwrap());
            }
            cuda.stream().synchronize().unwrap();
            let dev_ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
            let t = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(cuda.prepare(&frame).unwrap());
            }
            cuda.stream().synchronize().unwrap();
            let host_ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
            let t = Instant::now();
            for _ in 0..5 {
                std::hint::black_box(prepare(&frame).unwrap());
            }
            let cpu_ms = t.elapsed().as_secs_f64() * 1e3 / 5.0;
            println!(
                "1080p {label}: device frame -> pixel_values {dev_ms:.3} ms/frame; with host upload {host_ms:.3} ms/frame; CPU path {cpu_ms:.1} ms/frame"
            );
        }
    }

    /// Simple BT.709-limited NV12 of an RGB image (only used as a timing input).
    fn to_nv12(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; w * h + w * h / 2];
        for y in 0..h {
            for x in 0..w {
                let p = &rgb[(y * w + x) * 3..];
                let (r, g, b) = (p[0] as f32, p[1] as f32, p[2] as f32);
                out[y * w + x] = (16.0 + (0.1826 * r + 0.6142 * g + 0.0620 * b)).round() as u8;
                if y % 2 == 0 && x % 2 == 0 {
                    let o = w * h + (y / 2) * w + x;
                    out[o] = (128.0 - 0.1006 * r - 0.3386 * g + 0.4392 * b).round() as u8;
                    out[o + 1] = (128.0 + 0.4392 * r - 0.3989 * g - 0.0403 * b).round() as u8;
                }
            }
        }
        out
    }
}

/// Without a driver, building the kernels is an error that says so, never cudarc's panic; with a driver it
/// must work (a present but broken GPU fails here, in the plain `cargo test` of a `cuda` build).
#[cfg(feature = "cuda")]
#[test]
fn no_driver_is_an_error_not_a_panic() {
    use rexprep::cuda::{driver_present, CudaPrep};
    let built = CudaPrep::new(0);
    if driver_present() {
        if let Err(e) = built {
            panic!("driver present but the kernels cannot be loaded: {e}");
        }
    } else {
        let e = built.err().expect("no driver must be an error");
        assert!(e.to_string().contains("driver"), "{e}");
    }
}

/// The worker's path on a GPU: kernels on candle's stream, pixel_values wrapped as a device tensor, equal
/// to the CPU path's values.
#[cfg(all(feature = "cuda", feature = "candle"))]
#[test]
#[ignore = "needs a CUDA GPU: run with `cargo test -p rexprep --features cuda,candle --test cuda_vs_cpu -- --include-ignored`"]
fn device_tensor_matches_cpu() {
    use candle_core::Device;
    use rexprep::tensor::TensorPrep;
    assert!(
        rexprep::cuda::driver_present(),
        "no NVIDIA driver (libcuda) on this host; {NEEDS_GPU}"
    );
    let device = Device::new_cuda(0)
        .unwrap_or_else(|e| panic!("driver present but no usable CUDA device: {e}"));
    let prep = TensorPrep::new(&device);
    assert_eq!(prep.path(), "cuda");
    let rgb: Vec<u8> = (0..97 * 61 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let frame = rexprep::Frame::rgb(97, 61, &rgb);
    let t = prep.prepare(&frame).unwrap();
    let cpu = rexprep::prepare(&frame).unwrap();
    assert_eq!(t.grid_thw, cpu.grid_thw);
    let values: Vec<f32> = t.pixel_values.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(values, cpu.pixel_values);
    println!("device_tensor_matches_cpu: {} values equal", values.len());
}
