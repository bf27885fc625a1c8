//! bf16 `y = x · Wᵀ` on the CPU at the real model's layer shapes: candle's path, the previous few-row
//! kernel, the `gemmkit` crate and rexomni's packed GEMM (gemm_bf16.rs), in one process so the ratios share
//! the machine's state; then f32 at the decode shapes: candle against rexomni's few-row kernel (cpu_f32.rs);
//! `--q8`: Q8_0 weights, candle's `QMatMul` against rexomni's kernel (cpu_q8.rs), GB/s of weight bytes read.
//!
//! In: nothing (random bf16 operands; `--quick` for fewer shapes, `--f32` for the f32 table only, `--levels`
//! for rexomni's packed GEMM on each instruction-set level of this CPU only (AMX, AVX-512 BF16, AVX2+FMA),
//! `--q8` for the Q8_0 table only, `--q8-sweep` for one decode step's Q8_0 weights against a plain read,
//! `--bf16-sweep` for the same step's packed bf16 weights on each level, `--prefill-sweep` for a prefill's
//! weights at 441 rows, cold, `--vision-sweep` for the vision tower's weights at one and four frames' rows under
//! several AMX row caps, `--fused-sweep` for one decode step as separate and as fused q|k|v and gate|up calls,
//! `--peak` for the CPU's own `vdpbf16ps` ceiling).
//! Out: one table on stdout, ms per call (the
//! fastest of the repeats: the machine is shared, and the minimum is the least disturbed) and GFLOP/s
//! (2·m·k·n). Runs on the main thread and the rayon pool (`RAYON_NUM_THREADS`).
//!
//! Candidates, each given the weight the way it would hold it across calls:
//! - `candle`: `x.matmul(&w.t())`, what `candle_nn::Linear` does (widens both operands to f32 per call);
//! - `rows` (m ≤ 64): cpu_bf16's row kernel, the previous decode path (weight widened in registers);
//! - `gemmkit`: `gemm_packed_a` with the weight prepacked once as the left operand (`yᵀ = W · xᵀ`, so the
//!   result is transposed back, timed), and `gemmkit-plain` (`gemm`, packing the weight each call);
//! - `ours`: `PackedBf16::matmul` at the best level of this CPU, and at AVX2+FMA for comparison.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use gemmkit::{MatMut, MatRef, Parallelism};
use half::bf16;
use rexomni::model::gemm_bf16::{Level, PackedBf16};
use rexomni::model::{cpu_bf16, cpu_f32};

fn values(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 0.2 - 0.1)
        })
        .collect()
}

/// Fastest of at least 3 calls and at least `budget` in total (after one warm-up call).
fn best(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let (start, mut best, mut n) = (Instant::now(), f64::INFINITY, 0);
    while n < 3 || start.elapsed() < budget {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        n += 1;
    }
    best * 1e3
}

fn max_rel_diff(a: &[bf16], b: &[bf16]) -> f32 {
    let scale = b
        .iter()
        .fold(0f32, |m, v| m.max(v.to_f32().abs()))
        .max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x.to_f32() - y.to_f32()).abs()))
        / scale
}

/// The decoder MLP at one and four rows (what, m, k, n), the start of every table's shapes.
const DECODE_MLP: [(&str, usize, usize, usize); 4] = [
    ("decode gate/up", 1, 2048, 11008),
    ("decode gate/up", 4, 2048, 11008),
    ("decode down", 1, 11008, 2048),
    ("decode down", 4, 11008, 2048),
];

/// (what, m, k, n) at the real 3B config; vision rows for a 640×480 frame (1564 patches, 391 merged).
fn bf16_shapes(quick: bool) -> Vec<(&'static str, usize, usize, usize)> {
    let mut shapes = DECODE_MLP.to_vec();
    shapes.extend([
        ("decode q/o", 4, 2048, 2048),
        ("lm_head", 1, 2048, 151936),
        ("lm_head", 4, 2048, 151936),
        ("draft block", 64, 2048, 11008),
        ("prefill gate/up", 512, 2048, 11008),
        ("prefill down", 512, 11008, 2048),
        ("vision qkv", 1564, 1280, 3840),
        ("vision mlp up", 1564, 1280, 3420),
        ("vision mlp down", 1564, 3420, 1280),
        ("merger", 391, 5120, 5120),
    ]);
    if quick {
        shapes.retain(|s| [1, 4, 512].contains(&s.1) && s.0 != "lm_head");
    }
    shapes
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--f32") {
        return f32_table(quick);
    }
    if std::env::args().any(|a| a == "--levels") {
        return levels_table(quick);
    }
    if std::env::args().any(|a| a == "--bf16-sweep") {
        return bf16_sweep(Duration::from_millis(2000));
    }
    if std::env::args().any(|a| a == "--peak") {
        return peak_table();
    }
    if std::env::args().any(|a| a == "--fused-sweep") {
        return fused_sweep(8);
    }
    if std::env::args().any(|a| a == "--prefill-sweep") {
        return prefill_sweep(Duration::from_millis(3000));
    }
    if std::env::args().any(|a| a == "--vision-sweep") {
        return vision_sweep(6);
    }
    if std::env::args().any(|a| a == "--q8-sweep") {
        return q8_sweep(Duration::from_millis(2000));
    }
    if std::env::args().any(|a| a == "--q8") {
        return q8_table(quick);
    }
    let shapes = bf16_shapes(quick);
    let budget = Duration::from_millis(if quick { 300 } else { 1000 });
    let levels = Level::available();
    println!(
        "# bf16 x·Wᵀ, {} rayon threads, levels on this CPU: {:?}; best-of-repeats ms (GFLOP/s)",
        rayon::current_num_threads(),
        levels.iter().map(|l| l.name()).collect::<Vec<_>>()
    );
    println!(
        "| layer | m | k | n | candle | rows (m≤64) | gemmkit packed | gemmkit plain | ours {} | ours avx2+fma | ours vs best other | max rel diff ours/gemmkit vs candle |",
        Level::best().name()
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (what, m, k, n) in shapes {
        let flop = 2.0 * (m * k * n) as f64;
        let cell = |ms: f64| format!("{ms:.2} ({:.0})", flop / ms / 1e6);
        let (x, w) = (values(m * k, 1), values(n * k, 2));

        let dev = Device::Cpu;
        let xt = Tensor::from_slice(&x, (m, k), &dev)?;
        let wt = Tensor::from_slice(&w, (n, k), &dev)?;
        let candle_y: Vec<bf16> = xt.matmul(&wt.t()?)?.flatten_all()?.to_vec1()?;
        let t_candle = best(budget, || {
            let y = xt.matmul(&wt.t().unwrap()).unwrap();
            std::hint::black_box(y);
        });

        let t_rows = (m <= cpu_bf16::MAX_ROWS).then(|| {
            best(budget, || {
                std::hint::black_box(cpu_bf16::rows_times_weight_t(&x, &w, m, k, n));
            })
        });

        // gemmkit: yᵀ [n, m] = W [n, k] · xᵀ [k, m] with W prepacked; then transpose into y [m, n].
        let packed_a = gemmkit::prepack_lhs(MatRef::from_row_major(&w, n, k));
        let mut yt = vec![bf16::ZERO; n * m];
        let mut gk_y = vec![bf16::ZERO; m * n];
        let gemmkit_packed = |yt: &mut Vec<bf16>, y: &mut Vec<bf16>| {
            gemmkit::gemm_packed_a(
                bf16::ONE,
                &packed_a,
                MatRef::new(&x, k, m, 1, k as isize),
                bf16::ZERO,
                MatMut::from_row_major(yt, n, m),
                Parallelism::Rayon(0),
            );
            for j in 0..n {
                for i in 0..m {
                    y[i * n + j] = yt[j * m + i];
                }
            }
        };
        gemmkit_packed(&mut yt, &mut gk_y);
        let t_gk = best(budget, || gemmkit_packed(&mut yt, &mut gk_y));
        let t_gk_plain = best(budget, || {
            gemmkit::gemm(
                bf16::ONE,
                MatRef::from_row_major(&x, m, k),
                MatRef::new(&w, k, n, 1, k as isize),
                bf16::ZERO,
                MatMut::from_row_major(&mut gk_y, m, n),
                Parallelism::Rayon(0),
            );
        });

        let ours = PackedBf16::pack(&w, n, k);
        let ours_y = ours.matmul(&x, m, None);
        let t_ours = best(budget, || {
            std::hint::black_box(ours.matmul(&x, m, None));
        });
        let t_avx2 = levels.contains(&Level::Avx2Fma).then(|| {
            best(budget, || {
                std::hint::black_box(ours.matmul_on(Level::Avx2Fma, &x, m, None));
            })
        });

        let other = [Some(t_candle), t_rows, Some(t_gk), Some(t_gk_plain)]
            .into_iter()
            .flatten()
            .fold(f64::INFINITY, f64::min);
        println!(
            "| {what} | {m} | {k} | {n} | {} | {} | {} | {} | {} | {} | {:.2}× | {:.1e} / {:.1e} |",
            cell(t_candle),
            t_rows.map_or("-".into(), cell),
            cell(t_gk),
            cell(t_gk_plain),
            cell(t_ours),
            t_avx2.map_or("-".into(), cell),
            other / t_ours,
            max_rel_diff(&ours_y, &candle_y),
            max_rel_diff(&gk_y, &candle_y),
        );
    }
    f32_table(quick)?;
    Ok(())
}

/// rexomni's packed bf16 GEMM on every level this CPU runs, at the bf16 table's shapes, levels alternating
/// per shape so they share the machine's state; the last column is the fastest level against AVX-512 BF16
/// (the level before AMX), and the largest difference between the two levels' results.
fn levels_table(quick: bool) -> anyhow::Result<()> {
    let levels: Vec<Level> = Level::available()
        .into_iter()
        .filter(|&l| l != Level::Scalar)
        .collect();
    let budget = Duration::from_millis(if quick { 300 } else { 1000 });
    println!(
        "# packed bf16 x·Wᵀ per level, {} rayon threads; best-of-repeats ms (GFLOP/s, GB/s of packed weight)",
        rayon::current_num_threads()
    );
    let names: Vec<String> = levels.iter().map(|l| l.name().to_string()).collect();
    println!(
        "| layer | m | k | n | {} | fastest vs avx512bf16 | max rel diff |",
        names.join(" | ")
    );
    println!("|---|---|---|---|{}---|---|", "---|".repeat(levels.len()));
    for (what, m, k, n) in bf16_shapes(quick) {
        let (x, w) = (values(m * k, 1), values(n * k, 2));
        let packed = PackedBf16::pack(&w, n, k);
        let flop = 2.0 * (m * k * n) as f64;
        let bytes = packed.packed_bytes() as f64;
        let times: Vec<f64> = levels
            .iter()
            .map(|&l| {
                best(budget, || {
                    std::hint::black_box(packed.matmul_on(l, &x, m, None));
                })
            })
            .collect();
        let cells: Vec<String> = times
            .iter()
            .map(|ms| format!("{ms:.2} ({:.0}, {:.1})", flop / ms / 1e6, bytes / ms / 1e6))
            .collect();
        let base = levels.iter().position(|&l| l == Level::Avx512Bf16);
        let (ratio, diff) = match base {
            Some(b) => (
                format!("{:.2}×", times[b] / times[0]),
                format!(
                    "{:.1e}",
                    max_rel_diff(
                        &packed.matmul_on(levels[0], &x, m, None),
                        &packed.matmul_on(levels[b], &x, m, None)
                    )
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {what} | {m} | {k} | {n} | {} | {ratio} | {diff} |",
            cells.join(" | ")
        );
    }
    Ok(())
}

/// f32 `x · Wᵀ` at the decode shapes (the CPU default dtype): candle's matmul against rexomni's few-row kernel
/// (cpu_f32.rs), which reads each weight row once for every row of `x`.
fn f32_table(quick: bool) -> anyhow::Result<()> {
    let mut shapes = DECODE_MLP.to_vec();
    shapes.extend([
        ("lm_head", 1, 2048, 151936),
        ("lm_head", 4, 2048, 151936),
        ("draft block", 16, 2048, 11008),
        ("draft block", 64, 2048, 11008),
    ]);
    if quick {
        shapes.retain(|s| s.0 != "lm_head");
    }
    let budget = Duration::from_millis(if quick { 300 } else { 1000 });
    println!();
    println!("# f32 x·Wᵀ; best-of-repeats ms (GB/s of weight read)");
    println!("| layer | m | k | n | candle | ours (cpu_f32) | ours vs candle | max rel diff |");
    println!("|---|---|---|---|---|---|---|---|");
    for (what, m, k, n) in shapes {
        let gbs = |ms: f64| format!("{ms:.2} ({:.1})", (n * k * 4) as f64 / ms / 1e6);
        let x: Vec<f32> = values(m * k, 1).iter().map(|v| v.to_f32()).collect();
        let w: Vec<f32> = values(n * k, 2).iter().map(|v| v.to_f32()).collect();
        let dev = Device::Cpu;
        let xt = Tensor::from_slice(&x, (m, k), &dev)?;
        let wt = Tensor::from_slice(&w, (n, k), &dev)?;
        let candle_y: Vec<f32> = xt.matmul(&wt.t()?)?.flatten_all()?.to_vec1()?;
        let t_candle = best(budget, || {
            std::hint::black_box(xt.matmul(&wt.t().unwrap()).unwrap());
        });
        let ours_y = cpu_f32::rows_times_weight_t(&x, &w, m, k, n);
        let t_ours = best(budget, || {
            std::hint::black_box(cpu_f32::rows_times_weight_t(&x, &w, m, k, n));
        });
        let scale = candle_y.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-30);
        let diff = ours_y
            .iter()
            .zip(&candle_y)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        println!(
            "| {what} | {m} | {k} | {n} | {} | {} | {:.2}× | {:.1e} |",
            gbs(t_candle),
            gbs(t_ours),
            t_candle / t_ours,
            diff / scale
        );
    }
    Ok(())
}

/// Q8_0 `x · Wᵀ` with bf16 activations and outputs (a q8 layer of a bf16 model): candle's `QMatMul` (what
/// `REXOMNI_Q8_KERNEL=candle` runs) against rexomni's kernel (cpu_q8.rs) at each level of this CPU. Both
/// quantize the activation inside the timed call. GB/s = Q8_0 bytes of the weight (34 per 32) / time.
fn q8_table(quick: bool) -> anyhow::Result<()> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;
    use rexomni::model::cpu_q8::{self, PackedQ8};
    let mut shapes = DECODE_MLP.to_vec();
    shapes.extend([
        ("decode q/o", 1, 2048, 2048),
        ("decode q/o", 4, 2048, 2048),
        ("lm_head", 1, 2048, 151936),
        ("lm_head", 4, 2048, 151936),
        ("draft block", 16, 2048, 11008),
        ("draft block", 64, 2048, 11008),
        ("prefill gate/up", 512, 2048, 11008),
    ]);
    if quick {
        shapes.retain(|s| s.0 != "lm_head" && s.1 <= 64);
    }
    let budget = Duration::from_millis(if quick { 300 } else { 1000 });
    let levels = cpu_q8::Level::available();
    println!();
    println!(
        "# Q8_0 x·Wᵀ, bf16 x and y, {} rayon threads; best-of-repeats ms (GB/s of Q8_0 weight bytes read)",
        rayon::current_num_threads()
    );
    let names: Vec<String> = levels
        .iter()
        .map(|l| format!("ours {}", l.name()))
        .collect();
    println!(
        "| layer | m | k | n | candle QMatMul | {} | ours vs candle | max rel diff ours/candle vs f32 |",
        names.join(" | ")
    );
    println!(
        "|---|---|---|---|---|{}---|---|",
        "---|".repeat(levels.len())
    );
    for (what, m, k, n) in shapes {
        let bytes = (n * k / 32 * 34) as f64;
        let cell = |ms: f64| format!("{ms:.2} ({:.1})", bytes / ms / 1e6);
        let dev = Device::Cpu;
        let wf = Tensor::from_vec(
            values(n * k, 2)
                .iter()
                .map(|v| v.to_f32())
                .collect::<Vec<f32>>(),
            (n, k),
            &dev,
        )?;
        let q = QTensor::quantize(&wf, GgmlDType::Q8_0)?;
        let exact: Vec<f32>;
        let x = values(m * k, 1);
        let xt = Tensor::from_slice(&x, (m, k), &dev)?;
        {
            let wd = q.dequantize(&dev)?;
            exact = xt
                .to_dtype(candle_core::DType::F32)?
                .matmul(&wd.t()?)?
                .flatten_all()?
                .to_vec1()?;
        }
        let qm = QMatMul::from_qtensor(q)?;
        let QMatMul::QTensor(qt) = &qm else {
            anyhow::bail!("QMatMul dequantized the weight (CANDLE_DEQUANTIZE_ALL?)")
        };
        let w = PackedQ8::from_q8_0(&qt.data()?, n, k)?;
        let candle_y: Vec<f32> = qm
            .forward(&xt)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let t_candle = best(budget, || {
            std::hint::black_box(qm.forward(&xt).unwrap());
        });
        let ours_y: Vec<bf16> = cpu_q8::matmul_on(levels[0], &w, &x, m, None);
        let times: Vec<f64> = levels
            .iter()
            .map(|&l| {
                best(budget, || {
                    std::hint::black_box(cpu_q8::matmul_on::<bf16, bf16>(l, &w, &x, m, None));
                })
            })
            .collect();
        let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-30);
        let diff = |y: &mut dyn Iterator<Item = f32>| {
            y.zip(&exact).fold(0f32, |a, (p, q)| a.max((p - q).abs())) / scale
        };
        println!(
            "| {what} | {m} | {k} | {n} | {} | {} | {:.2}× | {:.1e} / {:.1e} |",
            cell(t_candle),
            times
                .iter()
                .map(|&t| cell(t))
                .collect::<Vec<_>>()
                .join(" | "),
            t_candle / times[0],
            diff(&mut ours_y.iter().map(|v| v.to_f32())),
            diff(&mut candle_y.iter().copied()),
        );
    }
    q8_sweep(budget)
}

/// `(k, n)` of every linear weight of the real-width 4-layer config's decoder plus the tied lm_head, in model
/// order: what one decode step reads.
fn decode_step_layers() -> Vec<(usize, usize)> {
    let mut layers: Vec<(usize, usize)> = Vec::new();
    for _ in 0..4 {
        layers.extend([(2048, 2048), (2048, 256), (2048, 256), (2048, 2048)]);
        layers.extend([(2048, 11008), (2048, 11008), (11008, 2048)]);
    }
    layers.push((2048, 151936));
    layers
}

/// Each `(k, n)` layer a packed weight of its own random values (seeded by its index).
fn pack_random(layers: &[(usize, usize)]) -> Vec<PackedBf16> {
    layers
        .iter()
        .enumerate()
        .map(|(i, &(k, n))| PackedBf16::pack(&values(n * k, 3 + i as u64), n, k))
        .collect()
}

/// [`q8_sweep`]'s decode step with the packed bf16 weights (1.24 GB), at one and four rows, on every level.
fn bf16_sweep(budget: Duration) -> anyhow::Result<()> {
    let layers = decode_step_layers();
    let ws = pack_random(&layers);
    let bytes: usize = ws.iter().map(|w| w.packed_bytes()).sum();
    let levels: Vec<Level> = Level::available()
        .into_iter()
        .filter(|l| *l != Level::Scalar)
        .collect();
    println!(
        "# One decode step's linear layers, cold: 4 × (q, k, v, o, gate, up, down) + lm_head at the real widths, {:.0} MB of packed bf16; best-of-repeats ms (GB/s)",
        bytes as f64 / 1e6
    );
    println!(
        "| m | {} |",
        levels
            .iter()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(levels.len()));
    for m in [1usize, 4] {
        let xs: Vec<Vec<bf16>> = [2048usize, 11008]
            .iter()
            .map(|&k| values(m * k, 1))
            .collect();
        let cells: Vec<String> = levels
            .iter()
            .map(|&level| {
                let ms = best(budget, || {
                    for w in &ws {
                        let x = &xs[usize::from(w.k() != 2048)];
                        std::hint::black_box(w.matmul_on(level, x, m, None));
                    }
                });
                format!("{ms:.1} ({:.1})", bytes as f64 / ms / 1e6)
            })
            .collect();
        println!("| {m} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// The CPU's own ceiling for a bf16 GEMM without AMX: `vdpbf16ps` on registers alone (24 independent
/// accumulators, no memory operand), on one thread and on every pool thread at once, in GFLOP/s (64 per
/// instruction: 16 lanes × 2 products, each a multiply and an add, counted like `2·m·k·n`). A GEMM's GFLOP/s in
/// the tables above over this says how much of the machine it uses; where it is near 100 %, only less
/// arithmetic, not a better kernel, makes that layer faster.
fn peak_table() -> anyhow::Result<()> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16") {
        const ITERS: usize = 20_000_000;
        let flop = (ITERS * peak::ACCUMULATORS * 64) as f64;
        let one = (0..3)
            .map(|_| {
                let t = Instant::now();
                // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked above).
                std::hint::black_box(unsafe { peak::dot_loop(ITERS) });
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        let threads = rayon::current_num_threads();
        let all = (0..3)
            .map(|_| {
                let t = Instant::now();
                rayon::broadcast(|_| {
                    // SAFETY: as above; every pool thread runs on the same CPU model.
                    std::hint::black_box(unsafe { peak::dot_loop(ITERS) })
                });
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        println!("# vdpbf16ps (zmm) on registers, best of 3 runs of {ITERS} × {} instructions per thread", peak::ACCUMULATORS);
        println!("| threads | GFLOP/s | instructions per ns per thread |");
        println!("|---|---|---|");
        println!(
            "| 1 | {:.0} | {:.2} |",
            flop / one / 1e9,
            flop / 64.0 / one / 1e9
        );
        println!(
            "| {threads} | {:.0} | {:.2} |",
            threads as f64 * flop / all / 1e9,
            flop / 64.0 / all / 1e9
        );
        return Ok(());
    }
    println!("# --peak: this CPU has no AVX-512 BF16; nothing to measure");
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// Independent chains: enough to cover the instruction's latency at its full throughput.
    pub const ACCUMULATORS: usize = 24;

    /// `iters` rounds of one `vdpbf16ps` per accumulator; returns their sum so nothing is optimised away.
    ///
    /// SAFETY: AVX-512F and AVX-512 BF16 present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot_loop(iters: usize) -> f32 {
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80));
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3c00_3c00));
        let mut acc = [_mm512_setzero_ps(); ACCUMULATORS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_dpbf16_ps(*r, a, b);
            }
        }
        acc.iter().map(|&r| _mm512_reduce_add_ps(r)).sum()
    }
}

/// Whether fewer, wider calls stream a decode step faster: [`bf16_sweep`]'s step at one row as 29 calls
/// (q, k, v, o, gate, up, down per layer, then the lm_head) against 17 (q|k|v and gate|up each one weight of their
/// outputs side by side, as a fused loader would hold them), the two taking turns for `rounds` rounds. The bytes
/// are the same; only the number of fork-joins and of cold starts of the weight stream differs. Then the
/// decoder layers' calls alone against the lm_head's one call, in GB/s: whether small calls stream worse.
fn fused_sweep(rounds: usize) -> anyhow::Result<()> {
    let separate = pack_random(&decode_step_layers());
    let mut fused_layers = Vec::new();
    for _ in 0..4 {
        fused_layers.extend([
            (2048usize, 2048 + 2 * 256),
            (2048, 2048),
            (2048, 2 * 11008),
            (11008, 2048),
        ]);
    }
    fused_layers.push((2048, 151936));
    let fused = pack_random(&fused_layers);
    let bytes: usize = separate.iter().map(|w| w.packed_bytes()).sum();
    let xs: Vec<Vec<bf16>> = [2048usize, 11008].iter().map(|&k| values(k, 1)).collect();
    let step = |ws: &[PackedBf16]| {
        let t = Instant::now();
        for w in ws {
            std::hint::black_box(w.matmul(&xs[usize::from(w.k() != 2048)], 1, None));
        }
        t.elapsed().as_secs_f64() * 1e3
    };
    // Warm both (page faults, the pool), then a best of 3 per side per round.
    step(&separate);
    step(&fused);
    println!(
        "# One decode step at one row, {:.0} MB of packed bf16: {} calls against {} (q|k|v and gate|up fused); best of 3 ms per round",
        bytes as f64 / 1e6,
        separate.len(),
        fused.len()
    );
    println!("| round | separate | fused | separate / fused |");
    println!("|---|---|---|---|");
    let best3 = |ws: &[PackedBf16]| (0..3).map(|_| step(ws)).fold(f64::INFINITY, f64::min);
    let mut ratios = Vec::new();
    for r in 0..rounds {
        let (a, b) = if r % 2 == 0 {
            let a = best3(&separate);
            (a, best3(&fused))
        } else {
            let b = best3(&fused);
            (best3(&separate), b)
        };
        ratios.push(a / b);
        println!("| {} | {a:.1} | {b:.1} | {:.3} |", r + 1, a / b);
    }
    ratios.sort_by(f64::total_cmp);
    println!("median separate / fused: {:.3}", ratios[ratios.len() / 2]);
    // Where the step's time goes by call size: the decoder layers' calls against the one lm_head call.
    let (layers, head) = separate.split_at(separate.len() - 1);
    let gbs = |ws: &[PackedBf16]| {
        let b: usize = ws.iter().map(|w| w.packed_bytes()).sum();
        let ms = (0..5).map(|_| step(ws)).fold(f64::INFINITY, f64::min);
        format!("{ms:.1} ms ({:.1} GB/s)", b as f64 / ms / 1e6)
    };
    println!(
        "decoder layers alone ({} calls): {}; lm_head alone: {}",
        layers.len(),
        gbs(layers),
        gbs(head)
    );
    Ok(())
}

/// A prefill's linear layers, cold: the 4-layer decoder's weights of [`decode_step_layers`] (without the lm_head,
/// which a prefill calls for one row) at 441 rows, a 640×480 frame's prompt, in model order. Unlike the table
/// above, which repeats one weight that the last-level cache then holds, every weight here comes from memory, as
/// in a real prefill; so this is what a blocking change does in place.
fn prefill_sweep(budget: Duration) -> anyhow::Result<()> {
    const ROWS: usize = 441;
    let mut layers = decode_step_layers();
    layers.pop();
    let ws = pack_random(&layers);
    let bytes: usize = ws.iter().map(|w| w.packed_bytes()).sum();
    let flop: f64 = layers
        .iter()
        .map(|&(k, n)| 2.0 * (ROWS * k * n) as f64)
        .sum();
    let xs: Vec<Vec<bf16>> = [2048usize, 11008]
        .iter()
        .map(|&k| values(ROWS * k, 1))
        .collect();
    println!(
        "# A prefill's linear layers, cold: 4 × (q, k, v, o, gate, up, down) at the real widths, {ROWS} rows, {:.0} MB of packed bf16, {:.0} GFLOP; best-of-repeats ms (TFLOP/s)",
        bytes as f64 / 1e6,
        flop / 1e9
    );
    // Groups of one layer: attention (q, k, v, o), gate/up, down; each row's times are from its fastest pass.
    let group = |i: usize| match i % 7 {
        0..=3 => 0,
        4 | 5 => 1,
        _ => 2,
    };
    let mut group_flop = [0f64; 3];
    for (i, &(k, n)) in layers.iter().enumerate() {
        group_flop[group(i)] += 2.0 * (ROWS * k * n) as f64;
    }
    println!("| level | all: ms (TFLOP/s) | q, k, v, o | gate, up | down |");
    println!("|---|---|---|---|---|");
    for level in Level::available()
        .into_iter()
        .filter(|l| matches!(l, Level::Amx | Level::Avx512Bf16))
    {
        let mut fastest = (f64::INFINITY, [0f64; 3]);
        let start = Instant::now();
        for pass in 0.. {
            if pass >= 4 && start.elapsed() >= budget {
                break;
            }
            let mut groups = [0f64; 3];
            for (i, w) in ws.iter().enumerate() {
                let x = &xs[usize::from(w.k() != 2048)];
                let t = Instant::now();
                std::hint::black_box(w.matmul_on(level, x, ROWS, None));
                groups[group(i)] += t.elapsed().as_secs_f64() * 1e3;
            }
            let total: f64 = groups.iter().sum();
            // The first pass warms the code and the allocator, as in `best`.
            if pass > 0 && total < fastest.0 {
                fastest = (total, groups);
            }
        }
        let cell = |ms: f64, flop: f64| format!("{ms:.1} ({:.2})", flop / ms / 1e9);
        println!(
            "| {} | {} | {} | {} | {} |",
            level.name(),
            cell(fastest.0, flop),
            cell(fastest.1[0], group_flop[0]),
            cell(fastest.1[1], group_flop[1]),
            cell(fastest.1[2], group_flop[2]),
        );
    }
    Ok(())
}

/// The vision tower's linear layers (qkv, proj, gate, up, down) of 8 blocks at the real widths (315 MB of
/// packed bf16, more than this VM's caches hold; the real tower has 32 blocks) at one 640×480 frame's 1564 rows
/// and at four frames' 6256, under AMX row caps of 128, 256 and 512 rows per task: the caps take turns within
/// each of `passes` passes, so they share the machine's state. Prints each cap's fastest and median pass.
fn vision_sweep(passes: usize) -> anyhow::Result<()> {
    use rexomni::model::gemm_bf16::set_amx_row_cap;
    const CAPS: [usize; 3] = [128, 256, 512];
    let mut layers = Vec::new();
    for _ in 0..8 {
        layers.extend([
            (1280, 3840),
            (1280, 1280),
            (1280, 3420),
            (1280, 3420),
            (3420, 1280),
        ]);
    }
    let ws = pack_random(&layers);
    let bytes: usize = ws.iter().map(|w| w.packed_bytes()).sum();
    println!(
        "# The vision tower's linear layers, 8 blocks at the real widths ({:.0} MB of packed bf16), AMX, caps taking turns in {passes} passes; fastest / median pass ms (TFLOP/s of the fastest)",
        bytes as f64 / 1e6
    );
    println!("| rows | cap 128 | cap 256 | cap 512 |");
    println!("|---|---|---|---|");
    for rows in [1564usize, 4 * 1564] {
        let xs: Vec<Vec<bf16>> = [1280usize, 3420]
            .iter()
            .map(|&k| values(rows * k, 1))
            .collect();
        let flop: f64 = layers
            .iter()
            .map(|&(k, n)| 2.0 * (rows * k * n) as f64)
            .sum();
        let mut times = vec![Vec::new(); CAPS.len()];
        // Pass 0 warms the code and the allocator and is not counted.
        for pass in 0..=passes {
            for (i, &cap) in CAPS.iter().enumerate() {
                set_amx_row_cap(Some(cap));
                let t = Instant::now();
                for w in &ws {
                    let x = &xs[usize::from(w.k() != 1280)];
                    std::hint::black_box(w.matmul_on(Level::Amx, x, rows, None));
                }
                if pass > 0 {
                    times[i].push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        set_amx_row_cap(None);
        let cells: Vec<String> = times
            .iter_mut()
            .map(|v| {
                v.sort_by(f64::total_cmp);
                format!(
                    "{:.0} / {:.0} ({:.2})",
                    v[0],
                    v[v.len() / 2],
                    flop / v[0] / 1e9
                )
            })
            .collect();
        println!("| {rows} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// Every linear weight of the real-width 4-layer config's decoder plus the tied lm_head, each its own Q8_0
/// tensor (658 MB in all, more than this VM's caches; candle's blocks and our packed copy both held, each read by its own kernel), called in model order: what one decode step reads, cold.
/// The table above calls one weight repeatedly, so a weight that fits in the last-level cache is read from there.
fn q8_sweep(budget: Duration) -> anyhow::Result<()> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;
    use rexomni::model::cpu_q8::{self, PackedQ8};
    let dev = Device::Cpu;
    let layers = decode_step_layers();
    let mut ws = Vec::new();
    for (i, &(k, n)) in layers.iter().enumerate() {
        let wf = Tensor::from_vec(
            values(n * k, 3 + i as u64)
                .iter()
                .map(|v| v.to_f32())
                .collect::<Vec<f32>>(),
            (n, k),
            &dev,
        )?;
        let qm = QMatMul::from_qtensor(QTensor::quantize(&wf, GgmlDType::Q8_0)?)?;
        let QMatMul::QTensor(q) = &qm else {
            anyhow::bail!("QMatMul dequantized the weight (CANDLE_DEQUANTIZE_ALL?)")
        };
        let packed = PackedQ8::from_q8_0(&q.data()?, n, k)?;
        ws.push((k, n, qm, packed));
    }
    let bytes: usize = layers.iter().map(|&(k, n)| n * k / 32 * 34).sum();
    println!();
    println!(
        "# One decode step's linear layers, cold: 4 × (q, k, v, o, gate, up, down) + lm_head at the real widths, {:.0} MB of Q8_0; best-of-repeats ms (GB/s)",
        bytes as f64 / 1e6
    );
    println!(
        "| m | candle QMatMul | ours {} | ours vs candle | read only (the same bytes, no arithmetic) | read only / ours |",
        cpu_q8::Level::best().name()
    );
    println!("|---|---|---|---|---|---|");
    for m in [1usize, 4] {
        let xs: Vec<(Vec<bf16>, Tensor)> = [2048usize, 11008]
            .iter()
            .map(|&k| {
                let x = values(m * k, 1);
                let t = Tensor::from_slice(&x, (m, k), &dev).unwrap();
                (x, t)
            })
            .collect();
        let x_for = |k: usize| &xs[usize::from(k != 2048)];
        let t_candle = best(budget, || {
            for (k, _, qm, _) in &ws {
                std::hint::black_box(qm.forward(&x_for(*k).1).unwrap());
            }
        });
        let t_ours = best(budget, || {
            for (k, _, _, w) in &ws {
                std::hint::black_box(cpu_q8::matmul_on::<bf16, bf16>(
                    cpu_q8::Level::best(),
                    w,
                    &x_for(*k).0,
                    m,
                    None,
                ));
            }
        });
        let t_read = best(budget, || {
            for (_, _, _, w) in &ws {
                std::hint::black_box(w.read_all());
            }
        });
        let gbs = |ms: f64| format!("{ms:.1} ({:.1})", bytes as f64 / ms / 1e6);
        println!(
            "| {m} | {} | {} | {:.2}× | {} | {:.0} % |",
            gbs(t_candle),
            gbs(t_ours),
            t_candle / t_ours,
            gbs(t_read),
            100.0 * t_read / t_ours
        );
    }
    Ok(())
}
