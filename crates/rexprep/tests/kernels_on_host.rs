//! The NV12/I420 kernels of kernels/prep.cu, compiled for the host with the system C++ compiler
//! (tests/host/colour_kernels.cpp) and run on every YUV fixture: their output must equal the CPU path
//! byte for byte. Runs without a GPU or nvcc; the GPU run (tests/cuda_vs_cpu.rs) covers the rest of the
//! kernels when a device is present.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{manifest, yuv_data, yuv_frame};
use rexprep::{yuv_to_rgb, ChromaSite, PixelFormat, YuvToRgb};

fn compile_harness(out: &Path) -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = out.join("colour_kernels");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-w", "-I"])
        .arg(here.join("kernels"))
        .arg(here.join("tests/host/colour_kernels.cpp"))
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("{cxx}: {e} (install build-essential, or set CXX)"));
    assert!(
        status.success(),
        "{cxx} failed on tests/host/colour_kernels.cpp"
    );
    exe
}

#[test]
fn colour_kernels_match_cpu_path() {
    let tmp = std::env::temp_dir().join(format!("rexprep-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let exe = compile_harness(&tmp);
    let m = manifest();
    let cases = m["yuv"].as_array().expect("yuv");
    for c in cases {
        let file = c["file"].as_str().unwrap();
        let data = yuv_data(c);
        let frame = yuv_frame(c, &data);
        let k = YuvToRgb::new(frame.colorimetry);
        let cosited = i16::from(frame.chroma_site == ChromaSite::HCosited);
        let format = match frame.format {
            PixelFormat::Nv12 => "nv12",
            _ => "i420",
        };
        let out = tmp.join(format!("{file}.rgb"));
        let mut args: Vec<String> = vec![format.into()];
        args.extend([frame.width, frame.height].map(|v| v.to_string()));
        args.extend(
            frame
                .strides
                .iter()
                .chain(&frame.offsets)
                .map(|v| v.to_string()),
        );
        args.extend([k.y, k.rv, k.gu, k.gv, k.bu, cosited].map(|v| v.to_string()));
        let status = Command::new(&exe)
            .args(&args)
            .arg(common::dir().join("yuv").join(file))
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "{file}: harness failed");
        let kernel = std::fs::read(&out).unwrap();
        let cpu = yuv_to_rgb(&frame);
        let differing = kernel.iter().zip(&cpu).filter(|(a, b)| a != b).count();
        assert_eq!(kernel.len(), cpu.len(), "{file}");
        assert_eq!(
            differing, 0,
            "{file}: kernel and CPU differ in {differing} bytes"
        );
        println!(
            "{file}: host-compiled kernel == CPU path ({} bytes)",
            cpu.len()
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
}
