//! `rexbench --vision-ab N`: the vision tower with `vision_cpu`'s bf16 CPU kernels and with candle's ops as
//! before, alternating in one process, N rounds each (docs/benchmarks.md, "bf16 vision on the CPU").
//!
//! In: a loaded model and the frame size. Out: one line per forward and the median of each mode on stdout.
//! Runs on the main thread. Alternating in one process keeps the two modes under the same machine load, which
//! on the shared 2-core VM moves separate runs by ±40 %.

use std::time::Instant;

use rexomni::model::{vision, Qwen25Vl};
use rexprep::tensor::TensorPrep;

pub fn run(model: &Qwen25Vl, (w, h): (u32, u32), rounds: usize) -> anyhow::Result<()> {
    let rgb = crate::measure::test_frame(w, h);
    let frame = rexprep::Frame::rgb(w, h, &rgb);
    let prepared = TensorPrep::new(model.device()).prepare(&frame)?;
    let grid = prepared.grid_thw;
    let mut times = [Vec::new(), Vec::new()];
    let mut outputs = [None, None];
    // One warm-up forward per mode, then `rounds` timed ones each.
    for round in 0..=rounds {
        for (i, (own, name)) in [(true, "vision_cpu"), (false, "candle ops")]
            .into_iter()
            .enumerate()
        {
            vision::set_own_kernels(own);
            let t = Instant::now();
            let e = model.encode_image(&prepared.pixel_values, grid)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if round > 0 {
                println!("vision-ab round {round} {name:<10} {ms:>10.1} ms");
                times[i].push(ms);
            }
            outputs[i] = Some(e);
        }
    }
    vision::set_own_kernels(true);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut times[0]), median(&mut times[1]));
    println!(
        "vision-ab median   vision_cpu {a:.1} ms, candle ops {b:.1} ms, speed-up {:.2}x",
        b / a
    );
    if let [Some(x), Some(y)] = &outputs {
        let (x, y) = (
            x.to_dtype(candle_core::DType::F32)?,
            y.to_dtype(candle_core::DType::F32)?,
        );
        let d = (x - &y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let top = y.abs()?.max_all()?.to_scalar::<f32>()?;
        println!(
            "vision-ab image embeddings: max |difference| {d:.3e} (largest |value| {top:.3e})"
        );
    }
    Ok(())
}
