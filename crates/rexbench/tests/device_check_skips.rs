//! scripts/device-check.sh on a machine without a usable GPU: says why it skipped and exits 0, so CI can run
//! it everywhere (issue 14). `CUDA_VISIBLE_DEVICES=""` hides any GPU the CI host might have, so the test
//! exercises the skip path there too.

use std::path::Path;
use std::process::Command;

#[test]
fn device_check_skips_cleanly_without_a_gpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let empty = std::env::temp_dir().join(format!("device-check-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(root.join("scripts/device-check.sh"))
        .arg(&empty)
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .expect("run scripts/device-check.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "exit status; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("device-check: SKIPPED: "))
        .unwrap_or_else(|| panic!("no SKIPPED line; stdout:\n{stdout}\nstderr:\n{stderr}"));
    // The reason names what is missing: no Python, no driver, or a driver without a visible device.
    assert!(
        ["python", "driver", "device", "cuInit"]
            .iter()
            .any(|w| line.contains(w)),
        "{line}"
    );
    // Nothing after the skip: no table, no benchmark started.
    assert!(!stdout.contains("| check"), "{stdout}");
    let _ = std::fs::remove_dir_all(&empty);
}
