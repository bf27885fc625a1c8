//! `rexbench`: how fast Rex-Omni runs here, stage by stage, on a chosen device and dtype.
//!
//! Measures preprocessing ms/frame, vision ms/image, prefill tokens/s, decode tokens/s at several batch sizes,
//! and detection frames/s for N concurrent requests with a fixed number of output tokens; prints a table and
//! writes JSON. The model is the real 3B config with seeded random weights (no download), any config.json, or a
//! checkpoint folder. It links no GStreamer, so the binary can be copied alone to a GPU host.
//! `--scenarios` instead replays generated clips with each work-saving feature off and on (`scenarios`);
//! `--continuous` compares static batches with continuous batching for streams of different answer lengths.
//!
//! The same measurements with HF transformers: `tests/reference/bench_hf.py` (docs/benchmarks.md).

// serde_json::json! of a whole config.json nests deeper than the default limit.
#![recursion_limit = "256"]

mod batch_ab;
mod continuous;
mod decode_ab;
mod drafts;
mod lockstep;
mod measure;
mod prefill_ab;
mod random_weights;
mod scenarios;
mod vision_ab;

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Parser;
use rexomni::model::{loading, Config, LinearLoader, Qwen25Vl, Weights};

use random_weights::RandomWeights;

#[derive(Parser, Debug)]
#[command(
    name = "rexbench",
    about = "Benchmark Rex-Omni stage by stage (preprocess, vision, prefill, decode, frames/s)",
    after_help = "Examples:\n  rexbench --config real --dtype bf16 --device cuda:0 --json h100.json\n  \
                  rexbench --config real --save-checkpoint /tmp/rex-random   # then bench_hf.py --model /tmp/rex-random\n  \
                  rexbench --model /tmp/rex-random --dtype f32 --batches 1,4 --concurrent 1,4\n  \
                  rexbench --scenarios --model tests/fixtures/tiny-untied --dtype f32 --output-tokens 16"
)]
struct Args {
    /// Checkpoint folder to load (as `rexstream --model`). Without it, random weights are built from --config.
    #[arg(long)]
    model: Option<PathBuf>,
    /// `real` (Qwen2.5-VL-3B = Rex-Omni hyper-parameters) or a config.json path; used without --model.
    #[arg(long, default_value = "real")]
    config: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the random weights and config.json to this folder (HF transformers can load it) and continue.
    #[arg(long)]
    save_checkpoint: Option<PathBuf>,
    /// Folder with vocab.json, merges.txt, tokenizer_config.json; defaults to --model, else the repo's
    /// tests/fixtures/qwen-tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Linear weights: bf16 (unquantized, in --dtype), q8 (ggml Q8_0) or q4 (ggml Q4K), quantized at load.
    #[arg(long, default_value = "bf16")]
    weights: String,
    /// Frame size WxH.
    #[arg(long, default_value = "640x480")]
    image_size: String,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    batches: Vec<usize>,
    /// Concurrent requests for the frames/s measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrent: Vec<usize>,
    /// Output tokens per request (70 ≈ a typical detection answer of ~9 boxes).
    #[arg(long, default_value_t = 70)]
    output_tokens: usize,
    /// Timed repetitions of the single-request stages (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Frames per drafts scenario (identical, slow change), each served with drafts off and on; 0 skips it.
    #[arg(long, default_value_t = 0)]
    drafts_frames: usize,
    /// Run the work-saving scenarios (generated clips: still, slow change, object crossing; each feature off
    /// and on) instead of the stage measurements. Frames are --image-size; answers --output-tokens long.
    #[arg(long)]
    scenarios: bool,
    /// Frames per scenario (5 frames/s: 300 = one minute).
    #[arg(long, default_value_t = 300)]
    scenario_frames: usize,
    /// With --scenarios: count model calls only, load and run no model.
    #[arg(long)]
    calls_only: bool,
    /// Compare static batches with continuous batching (one busy stream per --continuous-budgets entry, frames
    /// of --image-size) instead of the stage measurements.
    #[arg(long)]
    continuous: bool,
    /// With --continuous: each stream's answer length in tokens (its budget; random weights never stop early).
    #[arg(long, value_delimiter = ',', default_value = "16,32,48,64")]
    continuous_budgets: Vec<usize>,
    /// With --continuous: frames served per mode (rounded up to whole static batches).
    #[arg(long, default_value_t = 16)]
    continuous_frames: usize,
    /// With --continuous: repeat the three modes this many times, alternating their order, and print each
    /// round's ratios and their median (the machine's speed drifts; ratios of neighbouring runs hold better).
    #[arg(long, default_value_t = 1)]
    continuous_rounds: usize,
    /// Time the vision tower with the bf16 CPU kernels and with candle's ops as before, alternating in one
    /// process, this many rounds each, instead of the stage measurements; 0 = off.
    #[arg(long, default_value_t = 0)]
    vision_ab: usize,
    /// Time vision + prefill of --batch-ab-frames same-size frames in one call each against as many
    /// single-frame calls, alternating in one process, this many rounds each, instead of the stage
    /// measurements; 0 = off.
    #[arg(long, default_value_t = 0)]
    batch_ab: usize,
    /// With --batch-ab: frames per batched call.
    #[arg(long, default_value_t = 4)]
    batch_ab_frames: usize,
    /// With --batch-ab: AMX row caps (rows per GEMM task) to compare, taking turns within each round.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    batch_ab_caps: Vec<usize>,
    /// Time one frame's prefill with the final layer computing the last position alone (the default) and
    /// computing every position, alternating in one process, this many rounds each, instead of the stage
    /// measurements; 0 = off.
    #[arg(long, default_value_t = 0)]
    prefill_ab: usize,
    /// Time one frame's prefill, then --output-tokens decode steps per --batches entry, with every CPU kernel task
    /// a rayon job of its own (the default) and with rayon's adaptive pieces, alternating in one process, this
    /// many rounds each, instead of the stage measurements; 0 = off.
    #[arg(long, default_value_t = 0)]
    tasks_ab: usize,
    /// Time --output-tokens greedy decode steps per --batches entry with the CPU work on rayon's pool (the
    /// default) and on the calling thread, alternating in one process, this many rounds each; 0 = off.
    #[arg(long, default_value_t = 0)]
    pool_ab: usize,
    /// Time --output-tokens bf16 decode steps per --batches entry with the decode attention kernel and with the
    /// general attention path, alternating in one process, this many rounds each; 0 = off.
    #[arg(long, default_value_t = 0)]
    attention_ab: usize,
    /// Load, prepare one --image-size frame and prefill it, then measure stages on command: read `vision`,
    /// `prefill`, `decode <batch> <steps>` or `quit` lines from stdin and answer one JSON line each on stdout.
    /// tests/reference/side_by_side.py drives this to alternate with transformers stage by stage.
    #[arg(long)]
    lockstep: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let weight_format = Weights::parse(&args.weights)
        .with_context(|| format!("--weights: `{}` is not bf16, q8 or q4", args.weights))?;
    let (w, h) = parse_size(&args.image_size)?;
    let scenario_plan = scenarios::ScenarioPlan {
        image_size: (w, h),
        frames: args.scenario_frames,
        output_tokens: args.output_tokens,
    };
    if args.scenarios && args.calls_only {
        let rows = scenarios::run(None, &scenario_plan)?;
        return finish_scenarios(&rows, args.json.as_deref());
    }

    let started = std::time::Instant::now();
    let (model, source) = match &args.model {
        Some(dir) => (
            loading::load_dir_with(dir, &device, dtype, weight_format)?,
            dir.display().to_string(),
        ),
        None => {
            let cfg = match args.config.as_str() {
                "real" => Config::qwen25_vl_3b(),
                path => Config::from_file(std::path::Path::new(path))?,
            };
            let weights = RandomWeights::new(args.seed, args.save_checkpoint.is_some());
            let (vb, recorded) = weights.into_var_builder(dtype, &device);
            let model = Qwen25Vl::new_with(
                cfg.clone(),
                vb.pp("visual"),
                vb.pp("model"),
                None,
                &LinearLoader::new(weight_format, None),
            )?;
            if let Some(dir) = &args.save_checkpoint {
                let n = recorded.save(dir)?;
                std::fs::write(
                    dir.join("config.json"),
                    serde_json::to_string_pretty(&measure::hf_config_json(&cfg))?,
                )?;
                eprintln!("rexbench: wrote {n} parameters to {}", dir.display());
            }
            (
                model,
                format!(
                    "random weights (seed {}, config {})",
                    args.seed, args.config
                ),
            )
        }
    };
    eprintln!(
        "rexbench: model ready in {:.1} s ({source})",
        started.elapsed().as_secs_f64()
    );

    let tokenizer_dir = args
        .tokenizer
        .clone()
        .or_else(|| args.model.clone().filter(|d| d.join("vocab.json").exists()))
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/qwen-tokenizer"
            ))
        });
    let tokenizer =
        rexomni::protocol::RexTokenizer::from_dir(&tokenizer_dir).with_context(|| {
            format!(
                "tokenizer files in {} (set --tokenizer)",
                tokenizer_dir.display()
            )
        })?;

    if args.continuous {
        let rows = continuous::run(
            &model,
            &tokenizer,
            (w, h),
            &args.continuous_budgets,
            args.continuous_frames,
            args.continuous_rounds,
        )?;
        print!("{}", continuous::table(&rows));
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&rows)?)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("rexbench: wrote {}", path.display());
        }
        return Ok(());
    }
    if args.lockstep {
        return lockstep::serve(&model, &tokenizer, (w, h));
    }
    if args.batch_ab > 0 {
        return batch_ab::run(
            &model,
            &tokenizer,
            (w, h),
            args.batch_ab_frames,
            args.batch_ab,
            &args.batch_ab_caps,
        );
    }
    if args.vision_ab > 0 {
        return vision_ab::run(&model, (w, h), args.vision_ab);
    }
    if args.prefill_ab > 0 {
        return prefill_ab::run(
            &prefill_ab::LAST_POSITION,
            &model,
            &tokenizer,
            (w, h),
            args.prefill_ab,
        );
    }
    if args.tasks_ab > 0 {
        // Prefills first; the decode steps follow in the loop below.
        prefill_ab::run(&decode_ab::TASKS, &model, &tokenizer, (w, h), args.tasks_ab)?;
    }
    for (rounds, toggle) in [
        (args.pool_ab, &decode_ab::POOL),
        (args.attention_ab, &decode_ab::ATTENTION),
        (args.tasks_ab, &decode_ab::TASKS),
    ] {
        if rounds > 0 {
            let steps = args.output_tokens;
            return decode_ab::run(
                toggle,
                &model,
                &tokenizer,
                (w, h),
                &args.batches,
                steps,
                rounds,
            );
        }
    }
    if args.scenarios {
        let rows = scenarios::run(Some((&model, &tokenizer)), &scenario_plan)?;
        return finish_scenarios(&rows, args.json.as_deref());
    }

    let plan = measure::Plan {
        image_size: (w, h),
        batches: args.batches.clone(),
        concurrent: args.concurrent.clone(),
        output_tokens: args.output_tokens,
        iters: args.iters.max(1),
    };
    let report = measure::run(
        &model,
        &tokenizer,
        &plan,
        &source,
        &args.device,
        &match weight_format {
            Weights::Dense => args.dtype.clone(),
            w => format!("{}+{}", args.dtype, w.name()),
        },
    )?;
    print!("{}", report.table());
    let drafts = if args.drafts_frames > 0 {
        let rows = drafts::run(
            &model,
            &tokenizer,
            &measure::test_frame(w, h),
            (w, h),
            args.drafts_frames,
            args.output_tokens,
        )?;
        print!("{}", drafts::table(&rows));
        rows
    } else {
        Vec::new()
    };
    if let Some(path) = &args.json {
        let mut doc = serde_json::to_value(&report)?;
        doc["drafts"] = serde_json::to_value(&drafts)?;
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("rexbench: wrote {}", path.display());
    }
    Ok(())
}

fn finish_scenarios(
    rows: &[scenarios::ScenarioRow],
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    print!("{}", scenarios::table(rows));
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("rexbench: wrote {}", path.display());
    }
    Ok(())
}

fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = s
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()
                .context("--device cuda:N")?;
            Ok(Device::new_cuda(n.unwrap_or(0))?)
        }
        other => bail!("--device: `{other}` is not cpu, cuda or cuda:N"),
    }
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => bail!("--dtype: `{other}` is not f32, bf16 or f16"),
    }
}

fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = s
        .split_once('x')
        .with_context(|| format!("--image-size: `{s}` is not WxH"))?;
    Ok((
        w.parse().context("--image-size width")?,
        h.parse().context("--image-size height")?,
    ))
}
