//! Criterion benchmark of the CPU path: `prepare` from RGB and from NV12 at 640×480, 1280×720 and
//! 1920×1080, plus its two stages (Pillow-exact resize, normalise + patchify) from RGB.
//!
//! Images: the committed fixtures astronaut_640x480.png and astronaut_1920x1080.png; 1280×720 is the 1080p
//! picture resized with our Pillow-exact bicubic, i.e. exactly what tests/reference/bench_hf_preprocess.py
//! feeds the HF processor. `scripts/bench-prep.sh` runs this and that script and prints the ratio;
//! alone: `cargo bench -p rexprep --bench prepare` (results under target/criterion/prepare/).

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rexprep::{patchify::patchify, prepare, resize::resize_rgb, Frame};

fn load(name: &str) -> (u32, u32, Vec<u8>) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/prep")
        .join(name);
    let img = image::open(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

/// An NV12 frame of the picture (BT.601 limited, integer approximation). The conversion cost does not
/// depend on the values, only on the size.
fn nv12_of(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let mut out = vec![0u8; w * h + cw * ch * 2];
    let px = |x: usize, y: usize| {
        let p = &rgb[(y * w + x) * 3..][..3];
        (p[0] as i32, p[1] as i32, p[2] as i32)
    };
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = px(x, y);
            out[y * w + x] = (16 + ((66 * r + 129 * g + 25 * b + 128) >> 8)) as u8;
        }
    }
    for cy in 0..ch {
        for cx in 0..cw {
            let (r, g, b) = px(2 * cx, 2 * cy);
            let o = w * h + cy * cw * 2 + cx * 2;
            out[o] = (128 + ((-38 * r - 74 * g + 112 * b + 128) >> 8)) as u8;
            out[o + 1] = (128 + ((112 * r - 94 * g - 18 * b + 128) >> 8)) as u8;
        }
    }
    out
}

fn bench_prepare(c: &mut Criterion) {
    let (w1, h1, full) = load("astronaut_1920x1080.png");
    let hd = resize_rgb(&full, w1, h1, w1 as usize * 3, 1280, 720);
    let images = [
        load("astronaut_640x480.png"),
        (1280, 720, hd),
        (w1, h1, full),
    ];
    let mut group = c.benchmark_group("prepare");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for (w, h, rgb) in &images {
        let size = format!("{w}x{h}");
        let frame = Frame::rgb(*w, *h, rgb);
        group.bench_with_input(BenchmarkId::new("rgb", &size), &frame, |b, f| {
            b.iter(|| prepare(f).expect("prepare"))
        });
        let nv12 = nv12_of(*w as usize, *h as usize, rgb);
        let nv12_frame = Frame::nv12(*w, *h, &nv12);
        group.bench_with_input(BenchmarkId::new("nv12", &size), &nv12_frame, |b, f| {
            b.iter(|| prepare(f).expect("prepare"))
        });
        let (w2, h2) = prepare(&frame).expect("prepare").resized;
        group.bench_function(BenchmarkId::new("rgb_resize_stage", &size), |b| {
            b.iter(|| resize_rgb(rgb, *w, *h, *w as usize * 3, w2, h2))
        });
        let resized = resize_rgb(rgb, *w, *h, *w as usize * 3, w2, h2);
        group.bench_function(BenchmarkId::new("rgb_patchify_stage", &size), |b| {
            b.iter(|| patchify(&resized, w2 as usize, h2 as usize))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_prepare);
criterion_main!(benches);
