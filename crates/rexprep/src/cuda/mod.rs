//! The preprocessing of `prepare` as CUDA kernels on device buffers (feature `cuda`).
//!
//! In: a host `Frame` (its compact YUV/RGB planes are uploaded once) or a frame already in device memory
//! ([`DeviceFrame`]). Out: [`CudaPrepared`], whose `pixel_values` is a `CudaSlice<f32>` [N, 1176] on the
//! same context and stream, ready to become a candle tensor for the vision tower: no host round trip.
//! Kernels: kernels/prep.cu, compiled to PTX by build.rs and loaded here. Resize is the same fixed-point
//! integer arithmetic as `resize`, colour conversion the same integer ops as `yuv_to_rgb`, normalise the
//! same lookup table: the output equals the CPU path (tests/kernels_on_host.rs on every run,
//! tests/cuda_vs_cpu.rs on a GPU host).
//!
//! Runs on the detector worker thread that owns the device; `crate::tensor` (feature `candle`) puts it on
//! candle's stream and chooses between it and the CPU path. [`CudaPrep::new`] never lets cudarc's
//! missing-driver panic through (cudarc's `CudaContext::new` panics when libcuda cannot be loaded,
//! build-env.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg,
};

use crate::resize::Coeffs;
use crate::resize::ResizePlan;
use crate::{
    normalize, patchify, smart_resize_within, ChromaSite, Frame, PixelFormat, PrepError, YuvToRgb,
    MAX_PIXELS,
};

static PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/prep.ptx"));

fn err(stage: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> PrepError {
    move |e| PrepError::Cuda {
        stage,
        message: e.to_string(),
    }
}

/// Whether the NVIDIA driver library can be loaded, checked without touching cudarc (whose loader panics
/// when it is missing). With cudarc in `dynamic-linking` mode (candle's `cuda` feature) the process could
/// not have started without libcuda, so this is then trivially true.
pub fn driver_present() -> bool {
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    // SAFETY: loading libcuda runs its initialisers, which is what any CUDA program does at start.
    names
        .iter()
        .any(|n| unsafe { libloading::Library::new(*n) }.is_ok())
}

/// `#[repr(C)]` mirror of `struct YuvMatrix` in prep.cu, passed by value: `YuvToRgb`'s five
/// coefficients, then 1 for horizontally co-sited chroma.
#[repr(C)]
#[derive(Clone, Copy)]
struct YuvMatrix([i32; 6]);
// SAFETY: plain `#[repr(C)]` ints, same layout as the kernel's struct.
unsafe impl DeviceRepr for YuvMatrix {}

/// Filter taps of one axis, uploaded.
struct DevCoeffs {
    host: Arc<Coeffs>,
    start: CudaSlice<i32>,
    count: CudaSlice<i32>,
    weights: CudaSlice<i32>,
}

/// A frame whose planes are already in device memory (same strides/offsets convention as `Frame`).
pub struct DeviceFrame<'a> {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub data: &'a CudaSlice<u8>,
    pub strides: [usize; 3],
    pub offsets: [usize; 3],
    pub colorimetry: crate::Colorimetry,
    pub chroma_site: ChromaSite,
}

/// `Prepared`, with `pixel_values` left on the device.
pub struct CudaPrepared {
    pub pixel_values: CudaSlice<f32>,
    pub grid_thw: [usize; 3],
    pub resized: (u32, u32),
    pub original: (u32, u32),
}

impl CudaPrepared {
    pub fn num_image_tokens(&self) -> usize {
        patchify::num_image_tokens(self.grid_thw)
    }
}

/// Loaded kernels plus per-size cached filter taps, bound to one stream.
pub struct CudaPrep {
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    nv12_to_rgb: CudaFunction,
    i420_to_rgb: CudaFunction,
    resize_h: CudaFunction,
    resize_v: CudaFunction,
    patchify: CudaFunction,
    lut: CudaSlice<f32>,
    coeffs: Mutex<HashMap<(u32, u32), Arc<DevCoeffs>>>,
}

const BLOCK_2D: (u32, u32, u32) = (32, 8, 1);

fn grid_2d(w: usize, h: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            w.div_ceil(BLOCK_2D.0 as usize) as u32,
            h.div_ceil(BLOCK_2D.1 as usize) as u32,
            1,
        ),
        block_dim: BLOCK_2D,
        shared_mem_bytes: 0,
    }
}

impl CudaPrep {
    /// Kernels on device `ordinal`'s default stream. Fails (never panics) when no driver is present.
    pub fn new(ordinal: usize) -> Result<CudaPrep, PrepError> {
        if !driver_present() {
            return Err(PrepError::Cuda {
                stage: "driver",
                message: "libcuda cannot be loaded (no NVIDIA driver)".into(),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(err("context"))?;
        CudaPrep::on_stream(ctx.default_stream())
    }

    /// Kernels on an existing stream, e.g. candle's `CudaDevice` stream, so `pixel_values` needs no
    /// cross-stream synchronisation before the vision tower reads it.
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<CudaPrep, PrepError> {
        let ctx = stream.context().clone();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(PTX))
            .map_err(err("load PTX"))?;
        let f = |name| module.load_function(name).map_err(err("load function"));
        let lut = stream
            .clone_htod(&normalize::lut()[..])
            .map_err(err("upload lut"))?;
        Ok(CudaPrep {
            nv12_to_rgb: f("nv12_to_rgb")?,
            i420_to_rgb: f("i420_to_rgb")?,
            resize_h: f("resize_h")?,
            resize_v: f("resize_v")?,
            patchify: f("patchify")?,
            _module: module.clone(),
            stream,
            lut,
            coeffs: Mutex::new(HashMap::new()),
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn coeffs(&self, in_len: u32, out_len: u32) -> Result<Arc<DevCoeffs>, PrepError> {
        let mut map = self.coeffs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&(in_len, out_len)) {
            return Ok(c.clone());
        }
        let host = Coeffs::cached(in_len, out_len);
        let up = |v: Vec<i32>| {
            self.stream
                .clone_htod(&v)
                .map_err(err("upload coefficients"))
        };
        let c = Arc::new(DevCoeffs {
            start: up(host.start.iter().map(|&v| v as i32).collect())?,
            count: up(host.count.iter().map(|&v| v as i32).collect())?,
            weights: up(host.weights.clone())?,
            host,
        });
        if map.len() >= 32 {
            map.clear();
        }
        map.insert((in_len, out_len), c.clone());
        Ok(c)
    }

    /// Host frame → device `pixel_values`: uploads the planes as they are (compact YUV), then runs the kernels.
    pub fn prepare(&self, frame: &Frame) -> Result<CudaPrepared, PrepError> {
        self.prepare_within(frame, MAX_PIXELS)
    }

    /// [`CudaPrep::prepare`] with the model input capped at `max_pixels` (`crate::smart_resize_within`).
    pub fn prepare_within(
        &self,
        frame: &Frame,
        max_pixels: u64,
    ) -> Result<CudaPrepared, PrepError> {
        frame.check()?;
        let dev = self
            .stream
            .clone_htod(frame.data)
            .map_err(err("upload frame"))?;
        self.prepare_device_within(
            &DeviceFrame {
                width: frame.width,
                height: frame.height,
                format: frame.format,
                data: &dev,
                strides: frame.strides,
                offsets: frame.offsets,
                colorimetry: frame.colorimetry,
                chroma_site: frame.chroma_site,
            },
            max_pixels,
        )
    }

    /// Device frame → device `pixel_values`, all on this stream (asynchronous: the caller's next kernel on
    /// the same stream sees the result).
    pub fn prepare_device(&self, f: &DeviceFrame) -> Result<CudaPrepared, PrepError> {
        self.prepare_device_within(f, MAX_PIXELS)
    }

    /// [`CudaPrep::prepare_device`] with the model input capped at `max_pixels`.
    pub fn prepare_device_within(
        &self,
        f: &DeviceFrame,
        max_pixels: u64,
    ) -> Result<CudaPrepared, PrepError> {
        let (h2, w2) = smart_resize_within(f.height, f.width, max_pixels)?;
        let resized = self.resize_device(f, w2, h2)?;
        let (w2u, h2u) = (w2 as usize, h2 as usize);
        let n = (h2u / 14) * (w2u / 14) * crate::patchify::ROW;
        // SAFETY: every element is written by the patchify kernel (one thread per element).
        let mut pv = unsafe { self.stream.alloc::<f32>(n) }.map_err(err("alloc pixel_values"))?;
        let (w_i, h_i) = (w2 as i32, h2 as i32);
        let mut b = self.stream.launch_builder(&self.patchify);
        b.arg(&resized)
            .arg(&w_i)
            .arg(&h_i)
            .arg(&self.lut)
            .arg(&mut pv);
        // SAFETY: arguments match `patchify` in prep.cu; buffers hold w'·h'·3 bytes and N·1176 floats.
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }
            .map_err(err("launch patchify"))?;
        Ok(CudaPrepared {
            pixel_values: pv,
            grid_thw: [1, h2u / 14, w2u / 14],
            resized: (w2, h2),
            original: (f.width, f.height),
        })
    }

    /// The resized uint8 RGB image on the device (w'·h'·3 bytes), as `resize_frame` on the CPU.
    pub fn resize_device(
        &self,
        f: &DeviceFrame,
        w2: u32,
        h2: u32,
    ) -> Result<CudaSlice<u8>, PrepError> {
        let (w, h) = (f.width as usize, f.height as usize);
        let (w_i, h_i) = (f.width as i32, f.height as i32);
        // Colour conversion (or the RGB plane as is).
        let (rgb, rgb_off, rgb_stride) = match f.format {
            PixelFormat::Rgb => (None, f.offsets[0], f.strides[0]),
            PixelFormat::Nv12 | PixelFormat::I420 => {
                let m = YuvToRgb::new(f.colorimetry);
                let cosited = i16::from(f.chroma_site == ChromaSite::HCosited);
                let mat = YuvMatrix([m.y, m.rv, m.gu, m.gv, m.bu, cosited].map(i32::from));
                // SAFETY: every pixel is written by the conversion kernel.
                let mut out =
                    unsafe { self.stream.alloc::<u8>(w * h * 3) }.map_err(err("alloc rgb"))?;
                let s = f.strides.map(|s| s as i32);
                let y = f.data.slice(f.offsets[0]..);
                let p1 = f.data.slice(f.offsets[1]..);
                let mut b;
                let p2;
                if f.format == PixelFormat::Nv12 {
                    b = self.stream.launch_builder(&self.nv12_to_rgb);
                    b.arg(&y).arg(&s[0]).arg(&p1).arg(&s[1]);
                } else {
                    p2 = f.data.slice(f.offsets[2]..);
                    b = self.stream.launch_builder(&self.i420_to_rgb);
                    b.arg(&y).arg(&s[0]).arg(&p1).arg(&s[1]).arg(&p2).arg(&s[2]);
                }
                b.arg(&mut out).arg(&w_i).arg(&h_i).arg(&mat);
                // SAFETY: arguments match the kernels in prep.cu; planes were bounds-checked by the caller
                // (Frame::check) or come from a decoder that sized them.
                unsafe { b.launch(grid_2d(w, h)) }.map_err(err("launch yuv_to_rgb"))?;
                (Some(out), 0, w * 3)
            }
        };
        let src = match &rgb {
            Some(s) => s.slice(..),
            None => f.data.slice(rgb_off..),
        };
        let (dw, dh) = (w2 as usize, h2 as usize);
        let plan = ResizePlan::new(f.width, f.height, w2, h2);
        if plan.horizontal.is_none() && plan.vertical.is_none() {
            // Pillow returns a copy; compact the rows.
            // SAFETY: every byte is written by the row copies below.
            let mut out =
                unsafe { self.stream.alloc::<u8>(w * h * 3) }.map_err(err("alloc resized"))?;
            for y in 0..h {
                let row = src.slice(y * rgb_stride..y * rgb_stride + w * 3);
                self.stream
                    .memcpy_dtod(&row, &mut out.slice_mut(y * w * 3..(y + 1) * w * 3))
                    .map_err(err("copy"))?;
            }
            return Ok(out);
        }
        // Horizontal pass over the rows the vertical pass reads (the plan's rows), or the identity.
        let (mid, mid_stride, mid_row0) = if plan.horizontal.is_some() {
            let hc = self.coeffs(f.width, w2)?;
            let rows = plan.rows.len();
            // SAFETY: every byte is written by resize_h.
            let mut tmp =
                unsafe { self.stream.alloc::<u8>(dw * 3 * rows) }.map_err(err("alloc tmp"))?;
            let (s_i, r0, rows_i, dw_i, k_i) = (
                rgb_stride as i32,
                plan.rows.start as i32,
                rows as i32,
                dw as i32,
                hc.host.ksize as i32,
            );
            let mut b = self.stream.launch_builder(&self.resize_h);
            b.arg(&src)
                .arg(&s_i)
                .arg(&r0)
                .arg(&rows_i)
                .arg(&mut tmp)
                .arg(&dw_i);
            b.arg(&hc.start).arg(&hc.count).arg(&hc.weights).arg(&k_i);
            // SAFETY: arguments match `resize_h`; taps stay inside the source rows by construction.
            unsafe { b.launch(grid_2d(dw, rows)) }.map_err(err("launch resize_h"))?;
            if plan.vertical.is_none() {
                return Ok(tmp);
            }
            (Some(tmp), dw * 3, plan.rows.start)
        } else {
            (None, rgb_stride, 0)
        };
        let vc = self.coeffs(f.height, h2)?;
        let row_bytes = dw * 3;
        // SAFETY: every byte is written by resize_v.
        let mut out =
            unsafe { self.stream.alloc::<u8>(row_bytes * dh) }.map_err(err("alloc resized"))?;
        let mid_view = match &mid {
            Some(m) => m.slice(..),
            None => src,
        };
        let (s_i, r0, rb_i, dh_i, k_i) = (
            mid_stride as i32,
            mid_row0 as i32,
            row_bytes as i32,
            dh as i32,
            vc.host.ksize as i32,
        );
        let mut b = self.stream.launch_builder(&self.resize_v);
        b.arg(&mid_view)
            .arg(&s_i)
            .arg(&r0)
            .arg(&mut out)
            .arg(&rb_i)
            .arg(&dh_i);
        b.arg(&vc.start).arg(&vc.count).arg(&vc.weights).arg(&k_i);
        // SAFETY: arguments match `resize_v`.
        unsafe { b.launch(grid_2d(row_bytes, dh)) }.map_err(err("launch resize_v"))?;
        Ok(out)
    }
}
