//! `rexstream detect`: one image through the whole Rex-Omni path, printed as one JSON document.
//!
//! In: an image file, a task with its inputs (categories, keypoint type, visual-prompt boxes), a model source.
//! Out (stdout): `{"model", "task", "image_size", "resized_size", "grid_thw", "prompt_tokens", "detections",
//! "raw_output", "output_token_ids", "output_logprobs", "stopped_on_eos", "stop_reason", "decode_forward_passes",
//! "draft_tokens_accepted", "timings_ms", "top_logprobs"?}`. `--draft FILE` verifies an earlier document's ids
//! as a draft (same ids, fewer decode passes); `--exact` turns the runaway guard off (plain greedy).
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
    /// auto, cpu, cuda or cuda:N; `auto` (like `[model] device`) is CUDA when this build has it
    /// and a driver answers, else CPU. The device chosen is logged.
    #[arg(long, default_value = "auto")]
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
    /// JSON an earlier `rexstream detect` printed (same model): its `output_token_ids` are verified as a draft.
    /// The ids are the same as without it; `decode_forward_passes` and `draft_tokens_accepted` show the saving.
    #[arg(long)]
    pub draft: Option<PathBuf>,
    /// Plain greedy decoding: the runaway guard (stop on a repeated shape or past `--max-objects`) is off.
    #[arg(long)]
    pub exact: bool,
    /// Runaway guard: stop after more than this many shapes (ignored with `--exact`).
    #[arg(long, default_value_t = 100)]
    pub max_objects: usize,
    /// Most pixels of the model's input (as `[model] max_pixels`): a larger image is scaled down to about this
    /// many before the vision tower, for less vision and prefill work at less detail. 12544..=2007040.
    #[arg(long, default_value_t = rexprep::MAX_PIXELS, value_parser = parse_max_pixels)]
    pub max_pixels: u64,
}

fn parse_max_pixels(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of pixels"))?;
    rexprep::check_max_pixels(n).map(|()| n)
}

/// The draft ids in `path`, a document printed by `rexstream detect` for `model`.
pub fn read_draft(path: &std::path::Path, model: &str) -> Result<Vec<u32>> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("--draft {shown}"))?;
    let doc: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!("--draft {shown}: not JSON (expected what `rexstream detect` printed)")
    })?;
    let Some(ids) = doc.get("output_token_ids") else {
        bail!(
            "--draft {shown}: field `output_token_ids` missing: not a `rexstream detect` document"
        );
    };
    let Some(ids) = ids.as_array() else {
        bail!("--draft {shown}: field `output_token_ids` is {ids}, expected an array of token ids");
    };
    match doc.get("model").and_then(|m| m.as_str()) {
        Some(m) if m == model => {}
        Some(m) => bail!("--draft {shown}: field `model` is {m:?}, but this run uses {model:?}: a draft from another model"),
        None => bail!("--draft {shown}: field `model` missing: not a `rexstream detect` document"),
    }
    ids.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .with_context(|| format!("--draft {shown}: field `output_token_ids[{i}]` is {v}, expected a token id"))
        })
        .collect()
}

/// `auto`: CUDA device 0 when this build has CUDA and a driver answers, else the CPU (shared with
/// `[model] device = "auto"`).
pub fn auto_device() -> Device {
    if cfg!(feature = "cuda") {
        // Without a driver cudarc panics instead of returning an error (build-env.md).
        if let Ok(Ok(d)) = std::panic::catch_unwind(|| Device::new_cuda(0)) {
            return d;
        }
        tracing::info!(message = "No usable CUDA device; running on CPU.");
    }
    Device::Cpu
}

/// `cpu`, `cuda:N` (`metal:N`): what a device spec resolved to, for the log and the output.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(auto_device()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0)
            .context("--device cuda: CUDA not available (build with --features cuda)"),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n)
                .with_context(|| format!("--device {s}: CUDA device {n} not available")),
            _ => bail!("--device {s:?}: expected auto, cpu, cuda or cuda:N"),
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

    let draft = match &args.draft {
        Some(path) => Some(read_draft(path, &args.model)?),
        None => None,
    };
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    tracing::info!(
        message = "Loading model.",
        model = %args.model,
        requested = %args.device,
        device = device_name(&device),
        dtype = ?dtype
    );
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
        .prepare_within(&frame, args.max_pixels)
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
    let options = rexomni::engine::DecodeOptions {
        drafts: vec![draft],
        draft_block: 0,
        max_objects: (!args.exact).then_some(args.max_objects),
        ..Default::default()
    };
    let out = model
        .generate_with_options(
            std::slice::from_ref(&req),
            &params,
            &[args.max_new_tokens],
            &options,
        )?
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
        "device": device_name(&device),
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
        "stop_reason": out.stop.as_str(),
        "decode_forward_passes": out.decode_forward_passes,
        "draft_tokens_accepted": out.draft_accepted,
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

/// `--annotate` colours, one per label in order of first appearance (cycled past six labels).
pub const PALETTE: [[u8; 3]; 6] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
];

/// Draw boxes / polygons / points in [`PALETTE`] colours, lines 3 px wide; labels are left to the JSON
/// (no font dependency). Writes `path` (format from its extension).
pub fn annotate(
    mut img: image::RgbImage,
    dets: &[rexomni::protocol::Detection],
    path: &std::path::Path,
) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::read_draft;

    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rexstream-draft-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_draft_file_is_an_earlier_detect_document_of_the_same_model() {
        let ok = file(
            "ok.json",
            r#"{"model": "m", "output_token_ids": [1, 2, 151645]}"#,
        );
        assert_eq!(read_draft(&ok, "m").unwrap(), vec![1, 2, 151645]);
        let cases = [
            ("text.json", "not json", "not JSON"),
            (
                "nofield.json",
                r#"{"model": "m"}"#,
                "field `output_token_ids` missing",
            ),
            (
                "notarray.json",
                r#"{"model": "m", "output_token_ids": "x"}"#,
                "field `output_token_ids` is \"x\"",
            ),
            (
                "other.json",
                r#"{"model": "other", "output_token_ids": [1]}"#,
                "field `model` is \"other\"",
            ),
            (
                "nomodel.json",
                r#"{"output_token_ids": [1]}"#,
                "field `model` missing",
            ),
            (
                "badid.json",
                r#"{"model": "m", "output_token_ids": [1, -4]}"#,
                "field `output_token_ids[1]` is -4",
            ),
        ];
        for (name, text, want) in cases {
            let p = file(name, text);
            let err = format!("{:#}", read_draft(&p, "m").unwrap_err());
            assert!(
                err.contains(&p.display().to_string()) && err.contains(want),
                "{name}: {err}"
            );
        }
        let missing = std::env::temp_dir().join("rexstream-no-such-draft.json");
        let err = format!("{:#}", read_draft(&missing, "m").unwrap_err());
        assert!(err.contains("rexstream-no-such-draft.json"), "{err}");
    }
}
