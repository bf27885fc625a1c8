//! With feature `cuda`: compile kernels/prep.cu to PTX with nvcc (found through CUDA_ROOT, CUDA_HOME,
//! CUDA_PATH, then PATH) into $OUT_DIR/prep.ptx, which src/cuda embeds and loads at run time.
//! Without the feature this does nothing, so CPU-only builds need no CUDA at all.
//! Recipe for hosts without a GPU: scripts/cuda-toolkit.sh (../shared/reference/build-env.md).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/prep.cu");
    for v in [
        "CUDA_ROOT",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "REXPREP_CUDA_ARCH",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "rexprep feature `cuda`: nvcc not found in $CUDA_ROOT/bin, $CUDA_HOME/bin, $CUDA_PATH/bin or PATH. \
             Install the CUDA 13.0 toolkit, e.g. `scripts/cuda-toolkit.sh install && eval \"$(scripts/cuda-toolkit.sh env)\"`, \
             or build without `--features cuda`."
        )
    });
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("prep.ptx");
    // PTX for sm_80 is JIT-compiled by the driver for newer GPUs (H100/H200 are sm_90). A toolkit newer than
    // the driver's CUDA version produces PTX the driver refuses: pin 13.0 (build-env.md).
    let arch = std::env::var("REXPREP_CUDA_ARCH").unwrap_or_else(|_| "sm_80".into());
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-fmad=false",
            &format!("-arch={arch}"),
            "kernels/prep.cu",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("rexprep: cannot run {}: {e}", nvcc.display()));
    if !status.success() {
        panic!(
            "rexprep: {} --ptx kernels/prep.cu failed ({status})",
            nvcc.display()
        );
    }
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    for var in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join(exe);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(exe))
        .find(|p| p.is_file())
}
