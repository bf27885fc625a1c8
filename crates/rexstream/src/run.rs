//! `rexstream run <pipeline.toml>`: wires every component together and runs until a signal (or
//! until every stream has ended).
//!
//! In: the pipeline file, `--model`, `--shard`. Out: a running process; exit status 0 after a
//! graceful stop. Threads: the main thread runs a small tokio runtime (HTTP, MQTT sink, signals);
//! one OS thread per stream for ingest, one for the scheduler, one for the detector.
//!
//! Start order: metrics and HTTP first (so /healthz answers while the model loads), then the
//! broker and the MQTT sink (`available: online`), then the model, then ingest and the scheduler.
//! Stop order on SIGINT/SIGTERM (issue 5 item 9): the shared [`Shutdown`] stops ingest (pipelines
//! to Null) and the scheduler; the scheduler hanging up lets the worker finish the batch in flight
//! and exit; then the MQTT sink flushes its outbox and publishes `offline`; HTTP stops last.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rexomni::engine::GenerateParams;
use rexstream::config::Pipeline;
use rexstream::ingest::motion::MotionStage;
use rexstream::ingest::pipeline::StreamIngest;
use rexstream::ingest::StreamStatus;
use rexstream::metrics::{BrokerMode, Metrics};
use rexstream::scheduler::{ScheduledStream, Scheduler, SchedulerMetrics};
use rexstream::shard::Shard;
use rexstream::shutdown::Shutdown;
use rexstream::sinks::jsonl::JsonlSink;
use rexstream::sinks::mqtt::{embedded, MqttConfig, MqttSink};
use rexstream::sinks::prompts::PromptTable;
use rexstream::sinks::Sinks;
use rexstream::slot::{LatestFrameSlot, Wakeup};
use tracing::{info, warn};

use crate::worker::{self, WorkerContext};

/// How long the MQTT sink may keep delivering queued documents at shutdown before it publishes
/// `offline` and gives up on the rest (they are counted in the log).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// `rexstream run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The pipeline file (TOML): [model], [[streams]], optional [mqtt], [broker], [metrics],
    /// [jsonl]. See pipelines/*.toml for annotated examples.
    pub config: PathBuf,
    /// Model to load, overriding [model] source: a hub id (downloaded once into the Hugging Face
    /// cache) or a local checkpoint folder.
    #[arg(long, env = "REXSTREAM_MODEL")]
    pub model: Option<String>,
    /// Run only this replica's share of the streams: INDEX/COUNT (e.g. 0/3). Defaults to the
    /// REXSTREAM_SHARD_INDEX/REXSTREAM_SHARD_COUNT environment or a StatefulSet ordinal.
    #[arg(long)]
    pub shard: Option<String>,
}

/// The model source: `--model`, else `[model] source` (a relative folder is resolved against
/// the pipeline file's folder, a hub id is used as is).
fn model_source(args: &RunArgs, pipeline: &Pipeline) -> String {
    if let Some(m) = &args.model {
        return m.clone();
    }
    let src = &pipeline.model.source;
    let rel = pipeline.file.parent().unwrap_or(Path::new(".")).join(src);
    if !Path::new(src).is_absolute() && rel.is_dir() {
        return rel.display().to_string();
    }
    src.clone()
}

pub fn run(args: RunArgs) -> Result<()> {
    let mut pipeline = Pipeline::load(&args.config).map_err(|e| anyhow!("{e}"))?;
    let shard = Shard::resolve(args.shard.as_deref(), |k| std::env::var(k).ok())
        .map_err(|e| anyhow!("{e}"))?;
    // A StatefulSet replica whose shard owns no stream (more replicas than streams) must stay up, healthy and
    // scrapeable until it is signalled: exiting would be restarted by Kubernetes forever.
    let mut idle_replica = false;
    if shard != Shard::ALL {
        let before = pipeline.streams.len();
        pipeline.streams.retain(|s| shard.owns(&s.name));
        info!(message = "Sharded.", shard = %shard, streams = pipeline.streams.len(), of = before);
        idle_replica = pipeline.streams.is_empty();
        if idle_replica {
            warn!(message = "This replica's shard owns no stream; serving /metrics and /healthz until stopped.", shard = %shard);
        }
    }
    let source = model_source(&args, &pipeline);
    rexstream::ingest::pipeline::init().map_err(|e| anyhow!(e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("rexstream-io")
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = runtime.block_on(run_async(pipeline, source, idle_replica));
    // A model still loading after an early signal must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// `idle_replica`: this replica's shard owns no stream; run until a signal instead of ending at once.
async fn run_async(pipeline: Pipeline, source: String, idle_replica: bool) -> Result<()> {
    let shutdown = Shutdown::new();
    let metrics = Arc::new(Metrics::new());
    let file = pipeline.file.display().to_string();
    let stream_metrics: Vec<_> = pipeline
        .streams
        .iter()
        .map(|s| metrics.stream(&s.name))
        .collect();

    // HTTP first: /healthz answers while the model loads.
    let sd = shutdown.clone();
    // The event API (issue 13) joins the endpoint once the event store is open.
    let api = Arc::new(std::sync::OnceLock::new());
    let (http_addr, http_task) = rexstream::http::serve_with(
        pipeline.raw.metrics.listen,
        metrics.clone(),
        Some(api.clone()),
        async move { sd.wait().await },
    )
    .await
    .with_context(|| format!("{file}: metrics.listen"))?;

    // MQTT: the configured broker, or the embedded one.
    let prompts = Arc::new(PromptTable::new(
        pipeline
            .streams
            .iter()
            .map(|s| (s.name.clone(), s.prompt.clone())),
    ));
    let (mqtt_cfg, mode, _broker) = match &pipeline.raw.mqtt {
        Some(m) => (m.clone(), BrokerMode::External, None),
        None => {
            let listen = pipeline.raw.broker.clone().unwrap_or_default().listen;
            let b = embedded::start(listen).with_context(|| format!("{file}: broker.listen"))?;
            (MqttConfig::embedded(b.addr), BrokerMode::Embedded, Some(b))
        }
    };
    let mqtt = MqttSink::start(&mqtt_cfg, mode, prompts.clone(), metrics.clone())
        .map_err(|e| anyhow!("{file}: {e}"))?;
    let jsonl = match &pipeline.raw.jsonl {
        Some(j) => Some(JsonlSink::open(j).map_err(|e| anyhow!("{file}: {e}"))?),
        None => None,
    };
    let mut sinks = Sinks::new(Some(mqtt.handle()), jsonl, metrics.clone());
    // Tracked-object events (issue 13): their own thread beside the sinks, output through the
    // same MQTT outbox as documents.
    let events = rexstream::tracking::runtime::start_for(&pipeline, mqtt.handle(), prompts.clone())
        .with_context(|| format!("{file}: events"))?;
    if let Some(e) = &events {
        sinks = sinks.with_events(e.runtime.handle());
        if let Some(store) = &e.store {
            let token_env = pipeline
                .raw
                .events
                .as_ref()
                .and_then(|c| c.api_token_env.clone());
            let _ = api.set(rexstream::tracking::api::Api {
                store: store.clone(),
                token: token_env
                    .and_then(|k| std::env::var(k).ok())
                    .filter(|t| !t.is_empty()),
                loopback: http_addr.ip().is_loopback(),
            });
        }
    }
    let sinks = Arc::new(sinks);

    // The model, on its own thread; wait for it to load (or fail) before opening cameras.
    let (credits_tx, credits_rx) = std::sync::mpsc::sync_channel::<usize>(1);
    let (batches_tx, batches_rx) = std::sync::mpsc::sync_channel(1);
    let ctx = WorkerContext {
        prompts: prompts.clone(),
        sinks,
        metrics: metrics.clone(),
        streams: stream_metrics.clone(),
        default_prompts: pipeline.streams.iter().map(|s| s.prompt.clone()).collect(),
        params: GenerateParams {
            max_new_tokens: pipeline.model.max_new_tokens.get(),
            repetition_penalty: pipeline.model.repetition_penalty,
            top_logprobs: 0,
        },
        drafts: pipeline.model.drafts,
        max_objects: (pipeline.model.max_objects > 0).then_some(pipeline.model.max_objects),
        max_batch: pipeline.model.max_batch.get(),
        continuous: pipeline.model.continuous_batching,
        max_pixels: pipeline
            .streams
            .iter()
            .map(|s| s.max_pixels.unwrap_or(pipeline.model.max_pixels))
            .collect(),
    };
    let model_cfg = pipeline.model.clone();
    let worker = {
        let sd = shutdown.clone();
        let load = tokio::task::spawn_blocking(move || {
            worker::spawn(&model_cfg, source, ctx, credits_tx, batches_rx)
        });
        tokio::select! {
            r = load => r.context("model loader panicked")??,
            _ = signal() => {
                sd.trigger();
                warn!(message = "Interrupted while loading the model.");
                let _ = mqtt.close(FLUSH_TIMEOUT).await;
                return Ok(());
            }
        }
    };

    // Ingest and scheduling.
    let wakeup = Wakeup::new();
    // The motion gates' line to the tracker; dropped before the events thread is closed.
    let gate_events = events.as_ref().map(|e| Arc::new(e.runtime.handle()));
    let mut ingest_threads = Vec::new();
    let mut scheduled = Vec::new();
    for (i, cfg) in pipeline.streams.iter().enumerate() {
        let slot = Arc::new(LatestFrameSlot::new(
            stream_metrics[i].clone(),
            wakeup.clone(),
        ));
        let status = Arc::new(StreamStatus::new(cfg.name.clone(), cfg.uri.to_string()));
        scheduled.push(ScheduledStream {
            slot: slot.clone(),
            status: status.clone(),
            min_interval: cfg.min_interval,
        });
        let motion = cfg.motion.enabled.then(|| {
            Arc::new(
                MotionStage::new(
                    &cfg.name,
                    &cfg.motion,
                    prompts.clone(),
                    Some(mqtt.handle()),
                    stream_metrics[i].clone(),
                )
                .with_events(gate_events.as_ref()),
            )
        });
        let ingest = StreamIngest {
            index: i,
            cfg: cfg.clone(),
            slot,
            status,
            metrics: stream_metrics[i].clone(),
            motion,
        };
        ingest_threads.push(
            ingest
                .spawn(shutdown.clone())
                .with_context(|| format!("stream {}: cannot start ingest thread", cfg.name))?,
        );
    }
    let scheduler = Scheduler::new(
        scheduled,
        pipeline.model.max_batch.get(),
        wakeup,
        SchedulerMetrics {
            batch_size: metrics.batch_size.clone(),
            queue_depth: metrics.queue_depth.clone(),
        },
    );
    let sd = shutdown.clone();
    let scheduler_thread = std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || scheduler.run(credits_rx, batches_tx, sd))
        .context("cannot start the scheduler thread")?;
    info!(message = "Pipeline running.", file = %pipeline.file.display(), streams = pipeline.streams.len(), metrics = %http_addr);

    // Run until a signal, or until the detector stops by itself (every stream ended).
    let mut worker_done = tokio::task::spawn_blocking(move || worker.join());
    let worker_finished = tokio::select! {
        _ = signal() => {
            info!(message = "Shutting down: stopping ingest, finishing the batch in flight.");
            false
        }
        _ = &mut worker_done, if !idle_replica => {
            info!(message = "Every stream has ended; shutting down.");
            true
        }
    };
    shutdown.trigger();
    // A second signal skips the graceful part.
    tokio::spawn(async {
        signal().await;
        warn!(message = "Second signal; exiting now.");
        std::process::exit(130);
    });
    let joins = tokio::task::spawn_blocking(move || {
        for t in ingest_threads {
            let _ = t.join();
        }
        let _ = scheduler_thread.join();
    });
    let _ = joins.await;
    if !worker_finished {
        let _ = worker_done.await;
    }
    drop(gate_events);
    if let Some(e) = events {
        // The worker (and its handle) is gone: end every object, so `end`s reach the outbox
        // before it is flushed.
        let _ = tokio::task::spawn_blocking(move || e.runtime.close()).await;
    }
    let report = mqtt.close(FLUSH_TIMEOUT).await;
    if report.undelivered > 0 {
        warn!(
            message = "Documents not delivered before the flush timeout.",
            undelivered = report.undelivered
        );
    }
    info!(
        message = "Stopped.",
        offline_published = report.offline_published
    );
    let _ = http_task.await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
