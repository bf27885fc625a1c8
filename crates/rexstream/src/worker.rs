//! The detector worker (part of the binary: it wires the model crate to the runtime and uses
//! `anyhow`): the one OS thread that owns the model and its device.
//!
//! In: [`Batch`]es from the scheduler (it sends one credit per batch it is ready for, so the
//! scheduler picks the newest frames at that moment). Out: one [`DetectionsDocument`] per frame,
//! handed to [`Sinks::publish`] (never blocks), plus stage metrics. Per batch: rexprep's `TensorPrep`
//! (CUDA kernels on the engine's stream on a GPU, the CPU path otherwise) → `pixel_values` tensor on the
//! engine's device → chat prompt ids with the stream's prompt in force (read from the
//! [`PromptTable`] per frame, so an MQTT prompt change applies from the next frame) →
//! `RexOmni::generate` (vision, prefill, batched decode) → decode ids → `parse_output` in
//! original-frame pixels (rex-omni-spec.md §5.3–5.4).
//!
//! With `[model] continuous_batching` (the default) the batch is continuous instead (`worker/continuous.rs`):
//! frames join the decode batch between steps as rows finish, each verifying its stream's previous answer
//! as a draft where drafts are on.
//!
//! Stops when the scheduler hangs up (shutdown or every stream ended) — always after finishing the
//! batch in flight, so no frame that reached the model is lost.

use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device};
use rexomni::engine::{
    DecodeOptions, GenerateOutput, GenerateParams, GenerateRequest, LoadOptions, RexOmni,
};
use rexomni::protocol::{parse_ids, TaskPrompt};
use rexprep::tensor::TensorPrep;
use tracing::{debug, error, info, warn};

use rexstream::config::ModelConfig;
use rexstream::event::{event_id, ms, DetectionsDocument, FrameInfo, Timing, SCHEMA_VERSION};
use rexstream::ingest::frame::Frame;
use rexstream::metrics::{DropReason, Metrics, Stage, StreamMetrics};
use rexstream::previous::PreviousAnswers;
use rexstream::scheduler::Batch;
use rexstream::sinks::prompts::PromptTable;
use rexstream::sinks::Sinks;

mod continuous;

/// At most one "batch failed" log line per this interval: a broken device fails every batch.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Resolve `[model] device`: `auto` is CUDA when this build has it and a driver answers, else CPU.
pub fn pick_device(spec: &str) -> anyhow::Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        // One rule for `[model] device` and `rexstream detect --device` (issue 15).
        "auto" => return Ok(rexstream::detect::auto_device()),
        "cuda" => 0,
        s => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("model.device: {s:?}"))?,
    };
    std::panic::catch_unwind(|| Device::new_cuda(ordinal))
        .map_err(|_| anyhow::anyhow!("model.device: cuda:{ordinal}: no CUDA driver"))?
        .with_context(|| format!("model.device: cuda:{ordinal}"))
}

/// Resolve `[model] dtype`: `auto` is bf16 on CUDA (the checkpoint's dtype), f32 on CPU (CPU bf16
/// matmuls are slow and less exact).
pub fn pick_dtype(spec: &str, device: &Device) -> DType {
    match spec {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ if device.is_cuda() => DType::BF16,
        _ => DType::F32,
    }
}

/// Everything the worker thread needs besides the model.
pub struct WorkerContext {
    pub prompts: Arc<PromptTable>,
    pub sinks: Arc<Sinks>,
    pub metrics: Arc<Metrics>,
    /// Per-stream handles, indexed by `Frame::stream_index`.
    pub streams: Vec<Arc<StreamMetrics>>,
    /// Configured prompts, indexed like `streams` (fallback if the table has no entry).
    pub default_prompts: Vec<TaskPrompt>,
    pub params: GenerateParams,
    /// `[model] drafts`: verify each stream's previous answer as a draft (same ids, fewer passes).
    pub drafts: bool,
    /// `[model] max_objects` (runaway guard); `None` = off.
    pub max_objects: Option<usize>,
    /// `[model] max_batch`: most frames decoding together.
    pub max_batch: usize,
    /// `[model] continuous_batching`: frames join the decode batch between steps (`worker/continuous.rs`).
    pub continuous: bool,
    /// Each stream's model input cap (its `max_pixels`, else `[model] max_pixels`), indexed like `streams`.
    pub max_pixels: Vec<u64>,
}

/// Load the model on a new thread and run batches there. Returns once the model is loaded (or
/// failed to load), so `run` can fail fast with the loader's error.
pub fn spawn(
    model: &ModelConfig,
    source: String,
    ctx: WorkerContext,
    credits: SyncSender<usize>,
    batches: Receiver<Batch>,
) -> anyhow::Result<JoinHandle<()>> {
    let (device_spec, dtype_spec) = (model.device.clone(), model.dtype.clone());
    let weights = rexomni::engine::Weights::parse(&model.weights).unwrap_or_default();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
    let handle = std::thread::Builder::new()
        .name("detector".into())
        .spawn(move || {
            let loaded = (|| {
                let device = pick_device(&device_spec)?;
                let dtype = pick_dtype(&dtype_spec, &device);
                info!(message = "Loading model.", model = %source, device = ?device, dtype = ?dtype);
                let t = Instant::now();
                let engine = RexOmni::load(&LoadOptions { source: source.clone(), device, dtype, weights })
                    .with_context(|| format!("model {source}: cannot load"))?;
                info!(message = "Model loaded.", model = engine.model_id(), seconds = format!("{:.1}", t.elapsed().as_secs_f64()));
                anyhow::Ok(engine)
            })();
            match loaded {
                Ok(engine) => {
                    let _ = ready_tx.send(Ok(()));
                    let prep = TensorPrep::new(engine.device());
                    Worker { engine, prep, ctx, last_error_log: None, previous: PreviousAnswers::default() }.run(credits, batches);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .context("cannot start the detector thread")?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            anyhow::bail!("the detector thread died while loading the model")
        }
    }
}

struct Worker {
    engine: RexOmni,
    /// Frames → pixel_values on the engine's device (CUDA kernels on a GPU).
    prep: TensorPrep,
    ctx: WorkerContext,
    last_error_log: Option<Instant>,
    /// Each stream's last answer: the draft for its next frame.
    previous: PreviousAnswers,
}

/// What is kept about one frame between its request and its document.
struct Pending {
    frame: Frame,
    prompt: Arc<TaskPrompt>,
    queue: Duration,
    preprocess: Duration,
}

impl Worker {
    fn run(mut self, credits: SyncSender<usize>, batches: Receiver<Batch>) {
        if self.ctx.continuous {
            let drafts_in_effect =
                self.ctx.drafts && rexomni::engine::drafts_are_exact(self.engine.model());
            info!(
                message = "Continuous batching.",
                max_batch = self.ctx.max_batch,
                drafts = drafts_in_effect
            );
            continuous::run(&mut self, &credits, &batches);
            info!(message = "Detector stopped.");
            return;
        }
        loop {
            if credits.send(self.ctx.max_batch).is_err() {
                break;
            }
            let Ok(batch) = batches.recv() else { break };
            self.ctx.metrics.queue_depth.dec();
            self.run_batch(batch);
        }
        info!(message = "Detector stopped.");
    }

    fn run_batch(&mut self, batch: Batch) {
        let (requests, pending) = self.prepare(batch.frames);
        if requests.is_empty() {
            return;
        }
        let options = DecodeOptions {
            drafts: pending.iter().map(|p| self.draft_for(p)).collect(),
            draft_block: 0,
            max_objects: self.ctx.max_objects,
            ..DecodeOptions::default()
        };
        let budgets = vec![self.ctx.params.max_new_tokens; requests.len()];
        let outputs =
            match self
                .engine
                .generate_with_options(&requests, &self.ctx.params, &budgets, &options)
            {
                Ok(o) if o.len() == requests.len() => o,
                result => {
                    let error = match result {
                        Err(e) => e.to_string(),
                        Ok(o) => format!("{} outputs for {} requests", o.len(), requests.len()),
                    };
                    self.failed(&pending, error);
                    return;
                }
            };
        if let Some(o) = outputs.first() {
            self.observe_model_stages(o);
        }
        for (p, out) in pending.into_iter().zip(outputs) {
            self.publish(p, out);
        }
    }

    /// The frame's draft: its stream's previous answer to the same prompt, when `[model] drafts` is on.
    fn draft_for(&self, p: &Pending) -> Option<Vec<u32>> {
        self.ctx
            .drafts
            .then(|| self.previous.draft(p.frame.stream_index, &p.prompt))
            .flatten()
    }

    /// Frames → generate requests (preprocess and prompt ids) and what is kept about each until its document;
    /// frames that cannot become model input are dropped (counted) here.
    fn prepare(&mut self, frames: Vec<Frame>) -> (Vec<GenerateRequest>, Vec<Pending>) {
        let start = Instant::now();
        let mut requests = Vec::with_capacity(frames.len());
        let mut pending = Vec::with_capacity(frames.len());
        for frame in frames {
            let sm = self.ctx.streams[frame.stream_index].clone();
            let queue = start.saturating_duration_since(frame.captured_mono);
            self.ctx.metrics.observe_stage(Stage::Queue, queue);
            let prompt =
                self.ctx.prompts.get(&frame.stream).unwrap_or_else(|| {
                    Arc::new(self.ctx.default_prompts[frame.stream_index].clone())
                });
            let t = Instant::now();
            match self.request(&frame, &prompt) {
                Ok(req) => {
                    let preprocess = t.elapsed();
                    self.ctx
                        .metrics
                        .observe_stage(Stage::Preprocess, preprocess);
                    requests.push(req);
                    pending.push(Pending {
                        frame,
                        prompt,
                        queue,
                        preprocess,
                    });
                }
                Err(e) => {
                    sm.dropped(DropReason::Invalid, 1);
                    warn!(message = "Frame cannot become model input; dropped.", stream = %frame.stream, seq = frame.seq, width = frame.width, height = frame.height, error = %e);
                }
            }
        }
        (requests, pending)
    }

    /// The model failed on these frames: count them dropped, log at most every [`ERROR_LOG_EVERY`].
    fn failed(&mut self, pending: &[Pending], error: String) {
        for p in pending {
            self.ctx.streams[p.frame.stream_index].dropped(DropReason::DetectorError, 1);
        }
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now - t >= ERROR_LOG_EVERY)
        {
            self.last_error_log = Some(now);
            error!(message = "Detector failed on a batch; its frames are dropped.", frames = pending.len(), %error);
        }
    }

    fn observe_model_stages(&self, o: &GenerateOutput) {
        self.ctx
            .metrics
            .observe_stage(Stage::Vision, o.timings.vision);
        self.ctx
            .metrics
            .observe_stage(Stage::Prefill, o.timings.prefill);
        self.ctx
            .metrics
            .observe_stage(Stage::Decode, o.timings.decode);
    }

    /// One frame's output → parsed detections → its document, published (with the frame for snapshots).
    fn publish(&mut self, p: Pending, out: GenerateOutput) {
        self.ctx.metrics.decode.record(&out);
        self.previous
            .record(p.frame.stream_index, &p.prompt, &out.token_ids);
        let t = Instant::now();
        let (w, h) = (p.frame.width, p.frame.height);
        // Scores are exp(mean logprob) of each shape's coordinate tokens (protocol::shape_score).
        let parsed = parse_ids(
            self.engine.tokenizer(),
            &out.token_ids,
            Some(&out.logprobs),
            p.prompt.task,
            w,
            h,
        );
        let parse = t.elapsed();
        self.ctx.metrics.observe_stage(Stage::Parse, parse);
        // The end-of-turn token is not output (event.rs `output_tokens`).
        let output_tokens =
            out.token_ids.len() - usize::from(out.stopped_on_eos && !out.token_ids.is_empty());
        let doc = DetectionsDocument {
            schema: SCHEMA_VERSION,
            event_id: event_id(&p.frame.stream, p.frame.seq),
            stream: p.frame.stream.to_string(),
            seq: p.frame.seq,
            frame: FrameInfo::new(p.frame.pts_ns, p.frame.captured_at, w, h),
            task: p.prompt.task,
            prompt: (*p.prompt).clone(),
            model: self.engine.model_id().to_string(),
            detections: parsed.detections,
            timing: Timing {
                queue_ms: ms(p.queue),
                preprocess_ms: ms(p.preprocess),
                vision_ms: ms(out.timings.vision),
                prefill_ms: ms(out.timings.prefill),
                decode_ms: ms(out.timings.decode),
                parse_ms: ms(parse),
                end_to_end_ms: ms(p.frame.captured_mono.elapsed()),
            },
            output_tokens,
            truncated: parsed.truncated || !out.stopped_on_eos,
        };
        let sm = &self.ctx.streams[p.frame.stream_index];
        self.ctx.metrics.record_document(sm, &doc);
        // The frame goes along for event snapshots (moved, not copied).
        self.ctx.sinks.publish_frame(sm, &doc, p.frame);
        debug!(message = "Frame processed.", stream = %doc.stream, seq = doc.seq, detections = doc.detections.len(), tokens = output_tokens);
    }

    /// Frame + prompt → one generate request (preprocess and prompt ids).
    fn request(&self, frame: &Frame, prompt: &TaskPrompt) -> anyhow::Result<GenerateRequest> {
        let cap = self.ctx.max_pixels[frame.stream_index];
        let prepared = self.prep.prepare_within(&frame.as_prep(), cap)?;
        let prompt_ids = self.engine.tokenizer().encode_chat(
            prompt,
            frame.width,
            frame.height,
            prepared.num_image_tokens,
        )?;
        self.ctx.streams[frame.stream_index]
            .image_tokens
            .inc_by(prepared.num_image_tokens as u64);
        Ok(GenerateRequest {
            pixel_values: prepared.pixel_values,
            grid_thw: prepared.grid_thw,
            prompt_ids,
        })
    }
}
