//! Criterion benchmark of the motion gate (issue 12: under 1 ms per 1080p frame on this CPU): one
//! `MotionGate::decide` per iteration at 1920×1080 from NV12 (the Y plane) and from RGB, on consecutive
//! frames of a generated clip with sensor noise and an object crossing (the cost does not depend on the
//! content: two source rows per small-image row are read, then a fixed ≤ 320 × 180 image is compared).
//!
//! `cargo bench -p rexprep --bench motion` (results under target/criterion/motion/). In the dev profile
//! (`cargo build -p rexprep --benches`, then run the built binary with `--bench`) the numbers are an
//! upper bound: rexprep is built at opt-level 1 there.
//!
//! Two groups: `motion` in wall time (criterion's default) and `motion_cpu` in the benchmark thread's own CPU
//! time (`CLOCK_THREAD_CPUTIME_ID`). On an idle machine they agree; on a shared 2-core box, where other
//! processes take the cores away mid-iteration, wall time counts their time slices too and only the CPU
//! time says what one frame costs the streaming thread.

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
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

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Criterion measurement: CPU time of the benchmark thread (see the header).
struct ThreadCpuTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuNanos
    }
}

/// Formats nanoseconds of CPU time as µs or ms (the only scales a motion frame reaches).
struct CpuNanos;

impl ValueFormatter for CpuNanos {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical < 1e6 {
            (1e-3, "µs cpu")
        } else {
            (1e-6, "ms cpu")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }
    fn scale_throughputs(&self, _: f64, _: &Throughput, values: &mut [f64]) -> &'static str {
        values.iter_mut().for_each(|v| *v = 1e9 / *v);
        "frames/cpu-s"
    }
    fn scale_for_machines(&self, _: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn bench_gate(c: &mut Criterion) {
    gate_group(c, "motion");
}

fn bench_gate_cpu(c: &mut Criterion<ThreadCpuTime>) {
    gate_group(c, "motion_cpu");
}

/// Both groups run exactly this code; only the clock differs.
fn gate_group<M: Measurement>(c: &mut Criterion<M>, name: &str) {
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
    let mut group = c.benchmark_group(name);
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
criterion_group! {
    name = cpu_benches;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = bench_gate_cpu
}
criterion_main!(benches, cpu_benches);
