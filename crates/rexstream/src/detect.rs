//! `rexstream detect`: one image through the whole Rex-Omni path, printed as one JSON document.
//!
//! In: an image file, a task with its inputs (categories, keypoint type, visual-prompt boxes), a model source.
//! Out (stdout): `{"model", "task", "image_size", "resized_size", "grid_thw", "prompt_tokens", "detections",
//! "raw_output", "output_token_ids", "output_logprobs", "stopped_on_eos", "timings_ms", "top_logprobs"?}`.
//! Runs on the main thread: decode image → `rexprep::tensor::TensorPrep` (CUDA kernels on a GPU) →
//! `RexTokenizer::encode_chat` → `RexOmni::generate` → `protocol::parse_ids`.
//!
//! `score` of a detection is `exp(mean logprob)` of its coordinate tokens, the logprobs taken from the model's
//! distribution BEFORE the repetition penalty (`rexomni::protocol::shape_score`): the geometric-mean probability
//! the model gave the coordinates it emitted.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use rexomni::engine::{GenerateParams, GenerateRequest, LoadOptions, RexOmni};
use rexomni::protocol::{parse_ids, Geometry, Task, TaskPrompt};
use rexprep::tensor::TensorPrep;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct DetectArgs {
    /// Checkpoint folder or Hugging Face hub id.
    #[arg(long, env = "REXSTREAM_MODEL", default_value = rexomni::hub::DEFAULT_MODEL)]
    pub model: String,
    /// Image file (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,
    /// detection | pointing | visual_prompting | keypoint | ocr_box | ocr_polygon | gui_grounding | gui_pointing
    #[arg(long, default_value = "detection")]
    pub task: String,
    /// Comma-separated categories / phrases ("person, cup"); for GUI tasks the element description.
    #[arg(long)]
    pub categories: Option<String>,
    /// keypoint task: "person" or "animal".
    #[arg(long)]
    pub keypoint_type: Option<String>,
    /// visual_prompting reference boxes in pixels of the image: "x0,y0,x1,y1;x0,y0,x1,y1".
    #[arg(long)]
    pub boxes: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Linear weights: bf16 (unquantized, in --dtype), q8 or q4 (quantized at load time).
    #[arg(long, default_value = "bf16")]
    pub weights: String,
    #[arg(long, default_value_t = 4096)]
    pub max_new_tokens: usize,
    /// Also print the top-K (id, logprob) of the pre-penalty distribution at every generated step.
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
    /// Write a copy of the image with the detections drawn on it (PNG).
    #[arg(long)]
    pub annotate: Option<PathBuf>,
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0)
            .context("--device cuda: CUDA not available (build with --features cuda)"),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n)
                .with_context(|| format!("--device {s}: CUDA device {n} not available")),
            _ => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
        },
    }
}

pub fn parse_dtype(s: Option<&str>, device: &Device) -> Result<DType> {
    Ok(match s {
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
        Some("f32") | Some("float32") => DType::F32,
        Some("bf16") | Some("bfloat16") => DType::BF16,
        Some("f16") | Some("float16") => DType::F16,
        Some(other) => bail!("--dtype {other:?}: expected f32, bf16 or f16"),
    })
}

fn parse_boxes(s: &str) -> Result<Vec<[f64; 4]>> {
    s.split(';')
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let v: Vec<f64> = b
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse::<f64>()
                        .with_context(|| format!("--boxes: {x:?} in {b:?} is not a number"))
                })
                .collect::<Result<_>>()?;
            match v[..] {
                [a, b2, c, d] => Ok([a, b2, c, d]),
                _ => bail!(
                    "--boxes: {b:?} has {} numbers, expected x0,y0,x1,y1",
                    v.len()
                ),
            }
        })
        .collect()
}

pub fn run(args: DetectArgs) -> Result<()> {
    let task: Task = serde_json::from_value(json!(args.task))
        .with_context(|| format!("--task {:?}: unknown task", args.task))?;
    let mut prompt = json!({ "task": task });
    if let Some(c) = &args.categories {
        prompt["categories"] = json!(c);
    }
    if let Some(k) = &args.keypoint_type {
        prompt["keypoint_type"] = json!(k);
    }
    if let Some(b) = &args.boxes {
        prompt["boxes"] = json!(parse_boxes(b)?);
    }
    let prompt: TaskPrompt = serde_json::from_value(prompt).context("task prompt")?;
    prompt.validate().context("task prompt")?;

    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    let weights = rexomni::engine::Weights::parse(&args.weights)
        .with_context(|| format!("--weights {:?}: expected bf16, q8 or q4", args.weights))?;
    let t_load = Instant::now();
    let model = RexOmni::load(&LoadOptions {
        source: args.model.clone(),
        device: device.clone(),
        dtype,
        weights,
    })
    .with_context(|| format!("loading model {}", args.model))?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;

    let img = image::open(&args.image)
        .with_context(|| format!("--image {}", args.image.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let frame = rexprep::Frame::rgb(w, h, img.as_raw());
    let preparer = TensorPrep::new(model.device());
    let t_prep = Instant::now();
    let prep = preparer
        .prepare(&frame)
        .with_context(|| format!("--image {}: preprocessing", args.image.display()))?;
    let ids = model
        .tokenizer()
        .encode_chat(&prompt, w, h, prep.num_image_tokens)
        .context("prompt")?;
    let prep_ms = t_prep.elapsed().as_secs_f64() * 1e3;

    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        repetition_penalty: 1.05,
        top_logprobs: args.top_logprobs,
    };
    let req = GenerateRequest {
        pixel_values: prep.pixel_values,
        grid_thw: prep.grid_thw,
        prompt_ids: ids.clone(),
    };
    let out = model
        .generate(std::slice::from_ref(&req), &params)?
        .remove(0);
    let t_parse = Instant::now();
    let parsed = parse_ids(
        model.tokenizer(),
        &out.token_ids,
        Some(&out.logprobs),
        task,
        w,
        h,
    );
    let raw = model.tokenizer().decode(&out.token_ids);
    let parse_ms = t_parse.elapsed().as_secs_f64() * 1e3;

    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let n_out = out.token_ids.len();
    let mut doc = json!({
        "model": model.model_id(),
        "device": args.device,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "task": task,
        "image_size": [w, h],
        "resized_size": [prep.resized.0, prep.resized.1],
        "grid_thw": prep.grid_thw,
        "prompt_tokens": ids.len(),
        "detections": parsed.detections,
        "truncated": parsed.truncated,
        "raw_output": raw,
        "output_token_ids": out.token_ids,
        "output_logprobs": out.logprobs,
        "stopped_on_eos": out.stopped_on_eos,
        "timings_ms": {
            "load": load_ms,
            "preprocess": prep_ms,
            "vision": ms(out.timings.vision),
            "prefill": ms(out.timings.prefill),
            "decode": ms(out.timings.decode),
            "parse": parse_ms,
            "decode_tokens_per_s": if out.timings.decode.is_zero() { 0.0 } else { n_out as f64 / out.timings.decode.as_secs_f64() },
        },
    });
    if args.top_logprobs > 0 {
        doc["top_logprobs"] = json!(out
            .top_logprobs
            .iter()
            .map(|step| step
                .iter()
                .map(|&(id, lp)| json!([id, lp]))
                .collect::<Vec<_>>())
            .collect::<Vec<_>>());
    }
    if let Some(path) = &args.annotate {
        annotate(img, &parsed.detections, path)?;
    }
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// Draw boxes / polygons / points in a fixed palette; labels are left to the JSON (no font dependency).
fn annotate(
    mut img: image::RgbImage,
    dets: &[rexomni::protocol::Detection],
    path: &std::path::Path,
) -> Result<()> {
    const PALETTE: [[u8; 3]; 6] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
    ];
    let (w, h) = img.dimensions();
    let mut put = |x: f64, y: f64, c: [u8; 3]| {
        let (x, y) = (x.round() as i64, y.round() as i64);
        if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
            img.put_pixel(x as u32, y as u32, image::Rgb(c));
        }
    };
    let mut line = |a: (f64, f64), b: (f64, f64), c: [u8; 3]| {
        let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            for d in [-1.0, 0.0, 1.0] {
                put(a.0 + (b.0 - a.0) * t + d, a.1 + (b.1 - a.1) * t, c);
                put(a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t + d, c);
            }
        }
    };
    let mut labels: Vec<&str> = Vec::new();
    for d in dets {
        let k = labels
            .iter()
            .position(|l| *l == d.label)
            .unwrap_or_else(|| {
                labels.push(&d.label);
                labels.len() - 1
            });
        let c = PALETTE[k % PALETTE.len()];
        match &d.geometry {
            Geometry::Box {
                coords: [x0, y0, x1, y1],
                ..
            }
            | Geometry::Keypoints {
                coords: [x0, y0, x1, y1],
                ..
            } => {
                let (x0, y0, x1, y1) = (*x0, *y0, *x1, *y1);
                line((x0, y0), (x1, y0), c);
                line((x1, y0), (x1, y1), c);
                line((x1, y1), (x0, y1), c);
                line((x0, y1), (x0, y0), c);
            }
            Geometry::Point { coords: [x, y], .. } => {
                line((x - 4.0, *y), (x + 4.0, *y), c);
                line((*x, y - 4.0), (*x, y + 4.0), c);
            }
            Geometry::Polygon { coords, .. } => {
                let pts: Vec<(f64, f64)> = coords.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                for i in 0..pts.len() {
                    line(pts[i], pts[(i + 1) % pts.len()], c);
                }
            }
        }
    }
    img.save(path)
        .with_context(|| format!("--annotate {}", path.display()))
}
