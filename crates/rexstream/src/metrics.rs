//! The one Prometheus registry of the process and every metric design.md lists.
//!
//! In: events from every stage (ingest, scheduler, worker, sinks) through typed handles. Out: the
//! Prometheus text exposition ([`Metrics::encode`], served by `http.rs`) and a per-stream summary
//! for `/healthz` ([`Metrics::health`]). Handles are plain atomics, safe from any thread (GStreamer
//! callbacks included); per-stream handles are resolved once with [`Metrics::stream`] and kept by
//! the component (style.md §2.3), so the hot path never looks a label up.
//!
//! Naming (design.md): prefix `rexstream_`, base units (seconds), `_total` for counters, a
//! `stream` label where per-stream. Label values are bounded: stream names come from the config,
//! `reason`/`stage`/`sink`/`result` from closed enums below, detection labels from the prompt's
//! categories with a per-stream cap (anything else is `other`). Every metric is documented in
//! `docs/metrics.md`; a test keeps the two in sync.

mod decode;

pub use decode::DecodeMetrics;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde::Serialize;

/// Most distinct `label` values per stream in `rexstream_detections_total`. Prompts can change at
/// run time over MQTT, so categories are user input: without a cap every new phrase would create
/// a series forever. 64 covers any sensible category list; past it labels count as `other`.
pub const MAX_DETECTION_LABELS_PER_STREAM: usize = 64;

/// `[metrics]` section: where `/metrics` and `/healthz` are served (`http.rs`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address of the HTTP endpoint. Loopback by default: exposing metrics beyond the host
    /// (e.g. `0.0.0.0:9464` in a container) is an explicit choice.
    #[serde(default = "default_listen")]
    pub listen: std::net::SocketAddr,
}

fn default_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

/// Why a frame was not processed (`rexstream_frames_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Replaced in the latest-frame slot by a newer frame before the scheduler took it.
    Superseded,
    /// The frame could not be turned into model input (bad size or format).
    Invalid,
    /// The detector failed on the batch the frame was in.
    DetectorError,
    /// Taken but never run because the process was shutting down.
    Shutdown,
    /// Dropped by the motion gate before the slot: a still scene (`[streams.motion]`).
    NoMotion,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::Superseded,
        DropReason::Invalid,
        DropReason::DetectorError,
        DropReason::Shutdown,
        DropReason::NoMotion,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Superseded => "superseded",
            DropReason::Invalid => "invalid",
            DropReason::DetectorError => "detector_error",
            DropReason::Shutdown => "shutdown",
            DropReason::NoMotion => "no_motion",
        }
    }
}

/// Why an ingest pipeline was rebuilt (`rexstream_reconnects_total{reason}`); the same split as
/// gst-plugins-rs fallbacksrc's `RetryReason` (style.md §3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReconnectReason {
    /// A bus ERROR.
    Error,
    /// EOS on a live source.
    Eos,
    /// No frame for the watchdog timeout (a hung peer sends nothing; build-env.md).
    Timeout,
    /// The pipeline refused to go to PLAYING.
    StateChangeFailure,
    /// The server answered 401: credentials missing or wrong; retried only every `auth_retry_s`
    /// so a camera that locks accounts after failed logins is not locked (issue 16).
    Unauthorized,
}

impl ReconnectReason {
    pub const ALL: [ReconnectReason; 5] = [
        ReconnectReason::Error,
        ReconnectReason::Eos,
        ReconnectReason::Timeout,
        ReconnectReason::StateChangeFailure,
        ReconnectReason::Unauthorized,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ReconnectReason::Error => "error",
            ReconnectReason::Eos => "eos",
            ReconnectReason::Timeout => "timeout",
            ReconnectReason::StateChangeFailure => "state_change_failure",
            ReconnectReason::Unauthorized => "unauthorized",
        }
    }
}

/// Pipeline stages timed in `rexstream_stage_latency_seconds{stage}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Capture → batch start (latest-frame slot + hand-off queue), per frame.
    Queue,
    /// Frame → pixel_values, per frame.
    Preprocess,
    /// Vision tower, per batch.
    Vision,
    /// Prompt prefill, per batch.
    Prefill,
    /// Token decode loop, per batch.
    Decode,
    /// Tokens → detections, per frame.
    Parse,
    /// Document handed to the MQTT sink → broker acknowledgement (PUBACK for QoS 1), per document.
    Publish,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::Queue,
        Stage::Preprocess,
        Stage::Vision,
        Stage::Prefill,
        Stage::Decode,
        Stage::Parse,
        Stage::Publish,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Preprocess => "preprocess",
            Stage::Vision => "vision",
            Stage::Prefill => "prefill",
            Stage::Decode => "decode",
            Stage::Parse => "parse",
            Stage::Publish => "publish",
        }
    }
    fn index(self) -> usize {
        Stage::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// Where a document went (`rexstream_events_published_total{sink}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SinkKind {
    Mqtt,
    Jsonl,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Mqtt => "mqtt",
            SinkKind::Jsonl => "jsonl",
        }
    }
}

/// Which broker the MQTT sink talks to, for `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerMode {
    /// No MQTT sink.
    None,
    /// The in-process broker (`sinks::mqtt::embedded`).
    Embedded,
    /// A broker from the `[mqtt]` section.
    External,
}

/// All metrics of the process, in one registry. Build once at start and share as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    frames_received: IntCounterVec,
    frames_processed: IntCounterVec,
    image_tokens: IntCounterVec,
    frames_dropped: IntCounterVec,
    stream_up: IntGaugeVec,
    motion_active: IntGaugeVec,
    reconnects: IntCounterVec,
    end_to_end: HistogramVec,
    stage_latency: Vec<Histogram>,
    /// Batches waiting in the scheduler → detector hand-off.
    pub queue_depth: IntGauge,
    pub batch_size: Histogram,
    pub output_tokens: Histogram,
    pub generated_tokens: IntCounter,
    /// Decode forward passes, draft ids, stop reasons (metrics/decode.rs).
    pub decode: DecodeMetrics,
    detections: IntCounterVec,
    events_published: IntCounterVec,
    pub mqtt_connected: IntGauge,
    pub mqtt_publish_failures: IntCounter,
    pub mqtt_outbox_depth: IntGauge,
    pub mqtt_outbox_dropped: IntCounter,
    prompt_updates: IntCounterVec,
    pub jsonl_write_failures: IntCounter,
    resident_memory: IntGauge,
    streams: Mutex<BTreeMap<String, Arc<StreamMetrics>>>,
    broker_mode: Mutex<BrokerMode>,
}

/// Handles of one stream, resolved once.
pub struct StreamMetrics {
    pub name: String,
    pub frames_received: IntCounter,
    pub frames_processed: IntCounter,
    /// Image tokens of the frames sent to the model (pixels of the model input / 784): vision and prefill work.
    pub image_tokens: IntCounter,
    dropped: HashMap<DropReason, IntCounter>,
    /// 1 while frames are flowing, 0 while the source is down or reconnecting.
    pub up: IntGauge,
    /// 1 while the motion gate sees motion (`ingest::motion`), else 0.
    pub motion_active: IntGauge,
    reconnects: HashMap<ReconnectReason, IntCounter>,
    /// True while the source's last answer was 401 (shown in `/healthz`, not a metric: the
    /// `reason="unauthorized"` reconnects already count it).
    pub unauthorized: std::sync::atomic::AtomicBool,
    pub end_to_end_latency: Histogram,
    published_mqtt: IntCounter,
    published_jsonl: IntCounter,
    detections_family: IntCounterVec,
    detection_labels: Mutex<HashMap<String, IntCounter>>,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, name, Box::new(c.clone()));
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, name, Box::new(g.clone()));
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, name, Box::new(g.clone()));
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, name, Box::new(c.clone()));
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, name, Box::new(h.clone()));
    h
}

/// # Panics
/// On a duplicate or malformed metric name: names are constants of this file, so that is a bug
/// here, caught by the unit test that builds a `Metrics`.
fn register(r: &Registry, name: &str, c: Box<dyn prometheus::core::Collector>) {
    r.register(c)
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
}

/// Latency buckets in seconds: from a fast stage (ms) to a slow CPU frame (tens of seconds).
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let stage_family = HistogramVec::new(
            HistogramOpts::new(
                "rexstream_stage_latency_seconds",
                "Time spent per pipeline stage (queue, preprocess, vision, prefill, decode, parse, publish).",
            )
            .buckets(latency_buckets()),
            &["stage"],
        )
        .unwrap_or_else(|e| panic!("metric rexstream_stage_latency_seconds: {e}"));
        register(
            &r,
            "rexstream_stage_latency_seconds",
            Box::new(stage_family.clone()),
        );
        let stage_latency = Stage::ALL
            .iter()
            .map(|s| stage_family.with_label_values(&[s.as_str()]))
            .collect();
        let end_to_end = HistogramVec::new(
            HistogramOpts::new(
                "rexstream_end_to_end_latency_seconds",
                "Frame capture to detections document handed to the sinks.",
            )
            .buckets(latency_buckets()),
            &["stream"],
        )
        .unwrap_or_else(|e| panic!("metric rexstream_end_to_end_latency_seconds: {e}"));
        register(
            &r,
            "rexstream_end_to_end_latency_seconds",
            Box::new(end_to_end.clone()),
        );

        let prompt_updates = counter_vec(
            &r,
            "rexstream_prompt_updates_total",
            "Prompt-set messages received over MQTT, by result (accepted, rejected).",
            &["result"],
        );
        for res in ["accepted", "rejected"] {
            prompt_updates.with_label_values(&[res]);
        }

        Self {
            frames_received: counter_vec(
                &r,
                "rexstream_frames_received_total",
                "Decoded frames delivered by the ingest pipeline.",
                &["stream"],
            ),
            frames_processed: counter_vec(
                &r,
                "rexstream_frames_processed_total",
                "Frames that went through the detector and produced a detections document.",
                &["stream"],
            ),
            image_tokens: counter_vec(
                &r,
                "rexstream_image_tokens_total",
                "Image tokens of the frames prepared for the model (model input pixels / 784; [model] max_pixels caps them).",
                &["stream"],
            ),
            frames_dropped: counter_vec(
                &r,
                "rexstream_frames_dropped_total",
                "Frames not processed, by reason (superseded, invalid, detector_error, shutdown, no_motion).",
                &["stream", "reason"],
            ),
            stream_up: gauge_vec(
                &r,
                "rexstream_stream_up",
                "1 while the stream's source delivers frames, else 0.",
                &["stream"],
            ),
            motion_active: gauge_vec(
                &r,
                "rexstream_motion_active",
                "1 while the stream's motion gate sees motion (frames go to the detector), else 0.",
                &["stream"],
            ),
            reconnects: counter_vec(
                &r,
                "rexstream_reconnects_total",
                "Ingest pipeline rebuilds, by reason (error, eos, timeout, state_change_failure, unauthorized).",
                &["stream", "reason"],
            ),
            end_to_end,
            stage_latency,
            queue_depth: gauge(
                &r,
                "rexstream_queue_depth",
                "Batches waiting in the scheduler to detector hand-off queue.",
            ),
            batch_size: histogram(
                &r,
                "rexstream_batch_size",
                "Frames per detector batch.",
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0],
            ),
            output_tokens: histogram(
                &r,
                "rexstream_output_tokens",
                "Tokens generated per frame.",
                vec![4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0],
            ),
            decode: DecodeMetrics::new(&r),
            generated_tokens: counter(
                &r,
                "rexstream_generated_tokens_total",
                "Tokens generated by the detector; rate() of it is the decode throughput in tokens/s.",
            ),
            detections: counter_vec(
                &r,
                "rexstream_detections_total",
                "Detections published, by stream and label (labels outside the prompt's categories count as other).",
                &["stream", "label"],
            ),
            events_published: counter_vec(
                &r,
                "rexstream_events_published_total",
                "Detections documents delivered, by stream and sink (mqtt: acknowledged by the broker; jsonl: written).",
                &["stream", "sink"],
            ),
            mqtt_connected: gauge(&r, "rexstream_mqtt_connected", "1 while connected to the MQTT broker, else 0."),
            mqtt_publish_failures: counter(
                &r,
                "rexstream_mqtt_publish_failures_total",
                "Publish attempts that did not complete (connection lost before the acknowledgement, or the client refused the request); the document stays in the outbox and is sent again.",
            ),
            mqtt_outbox_depth: gauge(
                &r,
                "rexstream_mqtt_outbox_depth",
                "Documents in the MQTT outbox (queued or sent and not yet acknowledged).",
            ),
            mqtt_outbox_dropped: counter(
                &r,
                "rexstream_mqtt_outbox_dropped_total",
                "Documents dropped because the MQTT outbox was full (see outbox_overflow).",
            ),
            prompt_updates,
            jsonl_write_failures: counter(
                &r,
                "rexstream_jsonl_write_failures_total",
                "Documents the JSON-lines sink failed to write.",
            ),
            resident_memory: gauge(
                &r,
                "rexstream_process_resident_memory_bytes",
                "Resident set size of the process (read from /proc/self/statm at scrape time).",
            ),
            registry: r,
            streams: Mutex::new(BTreeMap::new()),
            broker_mode: Mutex::new(BrokerMode::None),
        }
    }

    /// The registry, for components that bring their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Handles for `stream`, created on first use and cached: call once per stream at start
    /// and keep the `Arc`. Creating them also creates every `{stream, reason}` series at 0, so
    /// `rate()` and `increase()` work from the first scrape.
    pub fn stream(&self, stream: &str) -> Arc<StreamMetrics> {
        let mut map = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(stream) {
            return s.clone();
        }
        let s = Arc::new(StreamMetrics {
            name: stream.to_string(),
            frames_received: self.frames_received.with_label_values(&[stream]),
            frames_processed: self.frames_processed.with_label_values(&[stream]),
            image_tokens: self.image_tokens.with_label_values(&[stream]),
            dropped: DropReason::ALL
                .iter()
                .map(|r| {
                    (
                        *r,
                        self.frames_dropped.with_label_values(&[stream, r.as_str()]),
                    )
                })
                .collect(),
            up: self.stream_up.with_label_values(&[stream]),
            motion_active: self.motion_active.with_label_values(&[stream]),
            reconnects: ReconnectReason::ALL
                .iter()
                .map(|r| (*r, self.reconnects.with_label_values(&[stream, r.as_str()])))
                .collect(),
            unauthorized: std::sync::atomic::AtomicBool::new(false),
            end_to_end_latency: self.end_to_end.with_label_values(&[stream]),
            published_mqtt: self
                .events_published
                .with_label_values(&[stream, SinkKind::Mqtt.as_str()]),
            published_jsonl: self
                .events_published
                .with_label_values(&[stream, SinkKind::Jsonl.as_str()]),
            detections_family: self.detections.clone(),
            detection_labels: Mutex::new(HashMap::new()),
        });
        map.insert(stream.to_string(), s.clone());
        s
    }

    /// Record the time one stage took.
    pub fn observe_stage(&self, stage: Stage, took: Duration) {
        if let Some(h) = self.stage_latency.get(stage.index()) {
            h.observe(took.as_secs_f64());
        }
    }

    /// Record everything one finished frame tells: processed count, end-to-end latency
    /// (capture → document built, the same number as `timing.end_to_end_ms`), output and generated
    /// tokens, detections by label. The detector worker calls this once per document, right
    /// before handing it to the sinks.
    pub fn record_document(&self, stream: &StreamMetrics, doc: &crate::event::DetectionsDocument) {
        stream.frames_processed.inc();
        stream
            .end_to_end_latency
            .observe(doc.timing.end_to_end_ms / 1000.0);
        self.output_tokens.observe(doc.output_tokens as f64);
        self.generated_tokens.inc_by(doc.output_tokens as u64);
        stream.detections(
            &doc.prompt.categories,
            doc.detections.iter().map(|d| d.label.as_str()),
        );
    }

    /// Count one prompt-set message.
    pub fn prompt_update(&self, accepted: bool) {
        self.prompt_updates
            .with_label_values(&[if accepted { "accepted" } else { "rejected" }])
            .inc();
    }

    /// Set by the MQTT sink at start, shown in `/healthz`.
    pub fn set_broker_mode(&self, mode: BrokerMode) {
        *self.broker_mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// Prometheus text exposition format (version 0.0.4) of every metric.
    pub fn encode(&self) -> String {
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss as i64);
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding error: {e}\n"))
    }

    /// The `/healthz` body: per-stream state and broker state. No URIs, no credentials.
    pub fn health(&self) -> Health {
        let streams: BTreeMap<String, StreamHealth> = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    StreamHealth {
                        up: s.up.get() > 0,
                        frames_received: s.frames_received.get(),
                        frames_processed: s.frames_processed.get(),
                        reconnects: s.reconnects.values().map(|c| c.get()).sum(),
                        unauthorized: s.unauthorized.load(std::sync::atomic::Ordering::Relaxed),
                    },
                )
            })
            .collect();
        let mode = *self.broker_mode.lock().unwrap_or_else(|p| p.into_inner());
        let connected = self.mqtt_connected.get() > 0;
        let mqtt = MqttHealth {
            broker: mode,
            connected,
            outbox_depth: self.mqtt_outbox_depth.get().max(0) as u64,
            outbox_dropped: self.mqtt_outbox_dropped.get(),
        };
        let ok = streams.values().all(|s| s.up) && (mode == BrokerMode::None || connected);
        Health {
            status: if ok { "ok" } else { "degraded" },
            streams,
            mqtt,
        }
    }
}

impl StreamMetrics {
    /// Count `n` dropped frames.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        if let Some(c) = self.dropped.get(&reason) {
            c.inc_by(n);
        }
    }

    /// Count one pipeline rebuild.
    pub fn reconnect(&self, reason: ReconnectReason) {
        if let Some(c) = self.reconnects.get(&reason) {
            c.inc();
        }
    }

    /// Count one document delivered by `sink`.
    pub fn published(&self, sink: SinkKind) {
        match sink {
            SinkKind::Mqtt => self.published_mqtt.inc(),
            SinkKind::Jsonl => self.published_jsonl.inc(),
        }
    }

    /// Count detections by label. `categories` are the categories of the prompt in force: a
    /// label among them counts under its own name (up to [`MAX_DETECTION_LABELS_PER_STREAM`]
    /// names per stream), anything else (a phrase the model made up, or past the cap) as `other`.
    pub fn detections<'a>(&self, categories: &[String], labels: impl IntoIterator<Item = &'a str>) {
        let allowed: HashSet<&str> = categories.iter().map(String::as_str).collect();
        let mut map = self
            .detection_labels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for label in labels {
            // `other` is always available and does not count against the cap.
            let named = map.len() - usize::from(map.contains_key("other"));
            let key = if label != "other"
                && allowed.contains(label)
                && (map.contains_key(label) || named < MAX_DETECTION_LABELS_PER_STREAM)
            {
                label
            } else {
                "other"
            };
            map.entry(key.to_string())
                .or_insert_with(|| self.detections_family.with_label_values(&[&self.name, key]))
                .inc();
        }
    }
}

/// `/healthz` document.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// `ok` when every stream is up and the broker (if any) is connected, else `degraded`.
    pub status: &'static str,
    pub streams: BTreeMap<String, StreamHealth>,
    pub mqtt: MqttHealth,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamHealth {
    pub up: bool,
    pub frames_received: u64,
    pub frames_processed: u64,
    pub reconnects: u64,
    /// The camera refused the credentials (401); fix the password, the stream retries every
    /// `auth_retry_s`.
    pub unauthorized: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MqttHealth {
    pub broker: BrokerMode,
    pub connected: bool,
    pub outbox_depth: u64,
    pub outbox_dropped: u64,
}

/// RSS from `/proc/self/statm` (second field, in pages). Linux only; None elsewhere.
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // The page size is 4 KiB on every Linux target we build for (x86-64, aarch64 default).
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_prefix() {
        let m = Metrics::new();
        let s = m.stream("cam1");
        s.frames_received.inc();
        s.dropped(DropReason::Superseded, 3);
        m.observe_stage(Stage::Decode, Duration::from_millis(20));
        let text = m.encode();
        assert!(
            text.contains(
                "rexstream_frames_dropped_total{reason=\"superseded\",stream=\"cam1\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("rexstream_frames_dropped_total{reason=\"invalid\",stream=\"cam1\"} 0")
        );
        assert!(text.contains("rexstream_reconnects_total{reason=\"timeout\",stream=\"cam1\"} 0"));
        assert!(text.contains("rexstream_stage_latency_seconds_count{stage=\"decode\"} 1"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(name.starts_with("rexstream_"), "{name}");
        }
    }

    #[test]
    fn stream_handles_are_cached() {
        let m = Metrics::new();
        let a = m.stream("cam1");
        let b = m.stream("cam1");
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn detection_labels_are_bounded() {
        let m = Metrics::new();
        let s = m.stream("cam1");
        let cats: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
        let labels: Vec<String> = cats
            .iter()
            .cloned()
            .chain(["made up".to_string()])
            .collect();
        s.detections(&cats, labels.iter().map(String::as_str));
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("rexstream_detections_total{"))
            .count();
        assert_eq!(series, MAX_DETECTION_LABELS_PER_STREAM + 1, "{text}");
        // 100 categories: 64 named, 36 + 1 made-up label counted as other.
        assert!(
            text.contains("rexstream_detections_total{label=\"other\",stream=\"cam1\"} 37"),
            "{text}"
        );
    }

    #[test]
    fn health_reports_streams_and_broker() {
        let m = Metrics::new();
        let s = m.stream("cam1");
        s.up.set(1);
        m.set_broker_mode(BrokerMode::Embedded);
        let h = m.health();
        assert_eq!(h.status, "degraded"); // broker not connected yet
        m.mqtt_connected.set(1);
        let h = m.health();
        assert_eq!(h.status, "ok");
        assert!(h.streams["cam1"].up);
    }
}
