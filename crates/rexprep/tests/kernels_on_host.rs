//! Every kernel of kernels/prep.cu, compiled for the host with the system C++ compiler
//! (tests/host/kernels.cpp) and driven the way src/cuda/mod.rs launches them (one thread per block):
//! NV12/I420 → RGB, the two Pillow resize passes and patchify must give the CPU path's resized bytes and
//! pixel_values exactly, on every RGB and YUV fixture. Runs without a GPU or nvcc; on a GPU host
//! tests/cuda_vs_cpu.rs runs the PTX itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{dir, manifest, png_rgb, yuv_data, yuv_frame};
use libloading::{Library, Symbol};
use rexprep::resize::{Coeffs, ResizePlan};
use rexprep::{
    normalize, prepare, resize_frame, smart_resize, ChromaSite, Frame, PixelFormat, YuvToRgb,
};

/// `struct YuvMatrix` of prep.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct YuvMatrix([i32; 6]);

type SetBlock = unsafe extern "C" fn(u32, u32);
type Nv12 = unsafe extern "C" fn(*const u8, i32, *const u8, i32, *mut u8, i32, i32, YuvMatrix);
type I420 = unsafe extern "C" fn(
    *const u8,
    i32,
    *const u8,
    i32,
    *const u8,
    i32,
    *mut u8,
    i32,
    i32,
    YuvMatrix,
);
type ResizeH = unsafe extern "C" fn(
    *const u8,
    i32,
    i32,
    i32,
    *mut u8,
    i32,
    *const i32,
    *const i32,
    *const i32,
    i32,
);
type ResizeV = unsafe extern "C" fn(
    *const u8,
    i32,
    i32,
    *mut u8,
    i32,
    i32,
    *const i32,
    *const i32,
    *const i32,
    i32,
);
type Patchify = unsafe extern "C" fn(*const u8, i32, i32, *const f32, *mut f32);

struct HostKernels {
    lib: Library,
}

impl HostKernels {
    fn build(out: &Path) -> HostKernels {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let so = out.join("libprep_kernels.so");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args(["-std=c++17", "-O1", "-w", "-shared", "-fPIC", "-I"])
            .arg(here.join("kernels"))
            .arg(here.join("tests/host/kernels.cpp"))
            .arg("-o")
            .arg(&so)
            .status()
            .unwrap_or_else(|e| panic!("{cxx}: {e} (install build-essential, or set CXX)"));
        assert!(status.success(), "{cxx} failed on tests/host/kernels.cpp");
        // SAFETY: our own freshly built library; its initialisers only set statics.
        HostKernels {
            lib: unsafe { Library::new(&so) }.unwrap_or_else(|e| panic!("{}: {e}", so.display())),
        }
    }

    fn sym<T>(&self, name: &str) -> Symbol<'_, T> {
        // SAFETY: each `T` above is the C signature of the kernel of that name in prep.cu.
        unsafe { self.lib.get(name.as_bytes()) }.unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Run `kernel` once per thread of a `w × h` grid of one-thread blocks.
    fn launch(&self, w: usize, h: usize, mut kernel: impl FnMut()) {
        let set: Symbol<SetBlock> = self.sym("host_set_block");
        for y in 0..h {
            for x in 0..w {
                // SAFETY: sets two statics.
                unsafe { set(x as u32, y as u32) };
                kernel();
            }
        }
    }

    /// `CudaPrep::resize_device` + `prepare_device` with host buffers: (resized bytes, pixel_values).
    fn prepare(&self, frame: &Frame) -> (Vec<u8>, Vec<f32>) {
        let (w, h) = (frame.width as usize, frame.height as usize);
        let (wi, hi) = (w as i32, h as i32);
        let data = frame.data;
        let plane = |i: usize| data[frame.offsets[i]..].as_ptr();
        let s = frame.strides.map(|s| s as i32);
        let (rgb, stride) = match frame.format {
            PixelFormat::Rgb => (data[frame.offsets[0]..].to_vec(), frame.strides[0]),
            yuv => {
                let k = YuvToRgb::new(frame.colorimetry);
                let cosited = i16::from(frame.chroma_site == ChromaSite::HCosited);
                let m = YuvMatrix([k.y, k.rv, k.gu, k.gv, k.bu, cosited].map(i32::from));
                let mut out = vec![0u8; w * h * 3];
                let o = out.as_mut_ptr();
                if yuv == PixelFormat::Nv12 {
                    let f: Symbol<Nv12> = self.sym("nv12_to_rgb");
                    // SAFETY: planes checked by Frame::check; `out` holds w·h·3 bytes.
                    self.launch(w, h, || unsafe {
                        f(plane(0), s[0], plane(1), s[1], o, wi, hi, m)
                    });
                } else {
                    let f: Symbol<I420> = self.sym("i420_to_rgb");
                    // SAFETY: as above.
                    self.launch(w, h, || unsafe {
                        f(plane(0), s[0], plane(1), s[1], plane(2), s[2], o, wi, hi, m)
                    });
                }
                (out, w * 3)
            }
        };
        let (h2, w2) = smart_resize(frame.height, frame.width).unwrap();
        let (dw, dh) = (w2 as usize, h2 as usize);
        let taps = |c: &Coeffs| {
            let i = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
            (i(&c.start), i(&c.count), c.weights.clone(), c.ksize as i32)
        };
        let plan = ResizePlan::new(frame.width, frame.height, w2, h2);
        let (mid, mid_stride, mid_row0) = match &plan.horizontal {
            Some(hc) => {
                let (st, ct, wt, ks) = taps(hc);
                let rows = plan.rows.len();
                let mut tmp = vec![0u8; dw * 3 * rows];
                let (src, dst) = (rgb.as_ptr(), tmp.as_mut_ptr());
                let f: Symbol<ResizeH> = self.sym("resize_h");
                // SAFETY: taps stay inside the source rows; `tmp` holds dw·3·rows bytes.
                self.launch(dw, rows, || unsafe {
                    f(
                        src,
                        stride as i32,
                        plan.rows.start as i32,
                        rows as i32,
                        dst,
                        dw as i32,
                        st.as_ptr(),
                        ct.as_ptr(),
                        wt.as_ptr(),
                        ks,
                    )
                });
                (tmp, dw * 3, plan.rows.start)
            }
            None => (rgb, stride, 0),
        };
        let resized = match &plan.vertical {
            // Without a vertical pass the rows are compacted (a no-op after the horizontal pass).
            None => (0..dh)
                .flat_map(|y| &mid[y * mid_stride..][..dw * 3])
                .copied()
                .collect(),
            Some(vc) => {
                let (st, ct, wt, ks) = taps(vc);
                let mut out = vec![0u8; dw * 3 * dh];
                let (src, dst) = (mid.as_ptr(), out.as_mut_ptr());
                let f: Symbol<ResizeV> = self.sym("resize_v");
                // SAFETY: as above; `out` holds dw·3·dh bytes.
                self.launch(dw * 3, dh, || unsafe {
                    f(
                        src,
                        mid_stride as i32,
                        mid_row0 as i32,
                        dst,
                        (dw * 3) as i32,
                        dh as i32,
                        st.as_ptr(),
                        ct.as_ptr(),
                        wt.as_ptr(),
                        ks,
                    )
                });
                out
            }
        };
        let n = (dh / 14) * (dw / 14) * rexprep::patchify::ROW;
        let mut pv = vec![0f32; n];
        let (src, dst, lut) = (resized.as_ptr(), pv.as_mut_ptr(), normalize::lut().as_ptr());
        let f: Symbol<Patchify> = self.sym("patchify");
        // SAFETY: `pv` holds N·1176 floats; the kernel bounds-checks its index.
        self.launch(n, 1, || unsafe { f(src, dw as i32, dh as i32, lut, dst) });
        (resized, pv)
    }
}

fn check(kernels: &HostKernels, name: &str, frame: &Frame) {
    let (resized, pv) = kernels.prepare(frame);
    let (cpu_resized, _) = resize_frame(frame).unwrap();
    let differing = resized
        .iter()
        .zip(&cpu_resized)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(resized.len(), cpu_resized.len(), "{name}");
    assert_eq!(differing, 0, "{name}: {differing} resized bytes differ");
    assert!(
        pv == prepare(frame).unwrap().pixel_values,
        "{name}: pixel_values differ"
    );
    println!(
        "{name}: host-compiled kernels == CPU path ({} resized bytes, {} values)",
        resized.len(),
        pv.len()
    );
}

#[test]
fn kernels_match_cpu_path() {
    let tmp: PathBuf = std::env::temp_dir().join(format!("rexprep-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let kernels = HostKernels::build(&tmp);
    let m = manifest();
    for c in m["cases"].as_array().expect("cases") {
        let name = c["case"].as_str().unwrap();
        let (w, h, rgb) = png_rgb(&dir().join(format!("{name}.png")));
        check(&kernels, name, &Frame::rgb(w, h, &rgb));
    }
    for c in m["yuv"].as_array().expect("yuv") {
        let data = yuv_data(c);
        check(&kernels, c["file"].as_str().unwrap(), &yuv_frame(c, &data));
    }
    // The plans no fixture needs: nothing to resize, height only, width only.
    for (w, h) in [(140u32, 112u32), (140, 120), (150, 112)] {
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        let (w2, h2) = resize_frame(&Frame::rgb(w, h, &rgb)).unwrap().1;
        check(
            &kernels,
            &format!("pattern {w}x{h} -> {w2}x{h2}"),
            &Frame::rgb(w, h, &rgb),
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
}
