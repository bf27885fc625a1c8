//! CPU path benchmark: `prepare` (RGB, and NV12 → RGB first) at 640×480, 1280×720 and 1920×1080, median
//! ms/frame. A plain `harness = false` binary (criterion is not in the offline dependency set; building it
//! on the shared CI box costs more than this table needs).
//!
//! Images: the committed fixtures astronaut_640x480.png and astronaut_1920x1080.png; 1280×720 is the 1080p
//! picture resized with our Pillow-exact bicubic, i.e. exactly what tests/reference/bench_hf_preprocess.py
//! feeds the HF processor. Run: `cargo bench -p rexprep --bench prepare`.

use std::path::Path;
use std::time::{Duration, Instant};

use rexprep::{prepare, resize::resize_rgb, Frame};

fn load(name: &str) -> (u32, u32, Vec<u8>) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/prep")
        .join(name);
    let img = image::open(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

fn median_ms(mut f: impl FnMut()) -> (f64, usize) {
    f(); // warm-up: fills the coefficient cache, as in a running stream
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed() < Duration::from_secs(3) && times.len() < 200) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times.len())
}

/// Packed I420→NV12 is irrelevant here; any plausible NV12 frame of the size times the same.
fn nv12_of(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
    let mut out = vec![128u8; w * h + w * h / 2];
    for (i, p) in rgb.chunks_exact(3).enumerate() {
        out[i] = (16 + (66 * p[0] as u32 + 129 * p[1] as u32 + 25 * p[2] as u32) / 256) as u8;
    }
    out
}

fn main() {
    let (w1, h1, full) = load("astronaut_1920x1080.png");
    let hd = resize_rgb(&full, w1, h1, w1 as usize * 3, 1280, 720);
    let images = [
        load("astronaut_640x480.png"),
        (1280, 720, hd),
        (w1, h1, full),
    ];
    println!("| input | resized | rgb ms/frame | nv12 ms/frame | of which resize | of which patchify | runs |");
    println!("|---|---|---|---|---|---|---|");
    for (w, h, rgb) in &images {
        let frame = Frame::rgb(*w, *h, rgb);
        let p = prepare(&frame).expect("prepare");
        let (rgb_ms, n) = median_ms(|| {
            std::hint::black_box(prepare(std::hint::black_box(&frame)).expect("prepare"));
        });
        let nv12 = nv12_of(*w as usize, *h as usize, rgb);
        let nframe = Frame::nv12(*w, *h, &nv12);
        let (nv12_ms, _) = median_ms(|| {
            std::hint::black_box(prepare(std::hint::black_box(&nframe)).expect("prepare"));
        });
        let (w2, h2) = p.resized;
        let (resize_ms, _) = median_ms(|| {
            std::hint::black_box(resize_rgb(rgb, *w, *h, *w as usize * 3, w2, h2));
        });
        let resized = resize_rgb(rgb, *w, *h, *w as usize * 3, w2, h2);
        let (patchify_ms, _) = median_ms(|| {
            std::hint::black_box(rexprep::patchify::patchify(
                &resized,
                w2 as usize,
                h2 as usize,
            ));
        });
        println!("| {w}x{h} | {w2}x{h2} | {rgb_ms:.2} | {nv12_ms:.2} | {resize_ms:.2} | {patchify_ms:.2} | {n} |");
    }
}
