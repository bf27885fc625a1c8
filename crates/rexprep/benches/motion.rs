//! Criterion benchmark of the motion gate (issue 12: under 1 ms per 1080p frame on this CPU): one
//! `MotionGate::decide` per iteration at 1920×1080 from NV12 (the Y plane) and from RGB, on consecutive
//! frames of a generated clip with sensor noise and an object crossing (the cost does not depend on the
//! content: every luma byte is read once, then a fixed ≤ 320 × 180 image is compared).
//!
//! `cargo bench -p rexprep --bench motion` (results under target/criterion/motion/). In the dev profile
//! (`cargo build -p rexprep --benches`, then run the built binary with `--bench`) the numbers are an
//! upper bound: rexprep is built at opt-level 1 there.

use criterion::{criterion_group, criterion_main, Criterion};
use rexprep::motion::synth::Scene;
use rexprep::motion::MotionGate;
use rexprep::Frame;

/// The Y plane of an RGB frame (BT.601 limited, integer approximation) followed by neutral chroma.
fn nv12_of(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
    let mut out = vec![128u8; w * h + w.div_ceil(2) * h.div_ceil(2) * 2];
    for (y, p) in out[..w * h].iter_mut().zip(rgb.chunks_exact(3)) {
        let (r, g, b) = (i32::from(p[0]), i32::from(p[1]), i32::from(p[2]));
        *y = (16 + ((66 * r + 129 * g + 25 * b + 128) >> 8)) as u8;
    }
    out
}

fn bench_gate(c: &mut Criterion) {
    let scene = Scene {
        width: 1920,
        height: 1080,
        crossing: Some((0.2, 1.0)),
        ..Scene::still()
    };
    let (w, h) = (scene.width, scene.height);
    // Eight frames, replayed in a loop with increasing time stamps.
    let rgb: Vec<Vec<u8>> = (0..8).map(|i| scene.frame(i)).collect();
    let nv12: Vec<Vec<u8>> = rgb
        .iter()
        .map(|f| nv12_of(w as usize, h as usize, f))
        .collect();
    let mut group = c.benchmark_group("motion");
    group.bench_function("gate_nv12_1920x1080", |b| {
        let mut gate = MotionGate::with_defaults();
        let mut i = 0usize;
        b.iter(|| {
            let f = Frame::nv12(w, h, &nv12[i % nv12.len()]);
            i += 1;
            gate.decide(&f, i as f64 * 0.2, false).unwrap()
        })
    });
    group.bench_function("gate_rgb_1920x1080", |b| {
        let mut gate = MotionGate::with_defaults();
        let mut i = 0usize;
        b.iter(|| {
            let f = Frame::rgb(w, h, &rgb[i % rgb.len()]);
            i += 1;
            gate.decide(&f, i as f64 * 0.2, false).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_gate);
criterion_main!(benches);
