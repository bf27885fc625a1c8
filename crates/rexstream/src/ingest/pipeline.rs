//! The per-stream ingest thread: build a GStreamer pipeline, play it, watch it, rebuild it.
//!
//! In: a [`ResolvedStream`]. Out: frames in the stream's [`LatestFrameSlot`], `StreamStatus` and
//! ingest metrics. Runs on one OS thread per stream (named `ingest-<stream>`), which owns the bus
//! loop; GStreamer's own streaming threads only run the appsink callback, which copies the pixels
//! and puts the frame in the slot (style.md §3.2).
//!
//! Graph: `uridecodebin uri=… ! videoconvert ! appsink caps=RGB|NV12 max-buffers=1 drop=true`, or
//! with `source = "rtspsrc"`: `rtspsrc location=… protocols=… latency=… ! decodebin ! videoconvert
//! ! appsink`. A disconnect is any of (build-env.md "How RTSP failures look to the client"): a bus
//! ERROR (UDP transport, server gone), EOS on a live source (TCP transport, server gone), no frame
//! for `no_frame_timeout_s` (server hung: nothing at all arrives for ~25 s), or a failed state
//! change. Each tears the pipeline down to Null and rebuilds it after an exponential back-off with
//! jitter; `rexstream_reconnects_total{stream,reason}` counts them. A file ends its stream at EOS,
//! or seeks back to the start with `loop = true`.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use tracing::{debug, error, info, info_span, warn};

use super::config::{FrameFormat, ResolvedStream, SourceKind};
use super::frame::Frame;
use super::motion::MotionStage;
use super::transport::{AttemptEnd, Lower, Next, TransportChoice};
use super::{StreamState, StreamStatus};
use crate::metrics::{ReconnectReason, StreamMetrics};
use crate::shutdown::Shutdown;
use crate::slot::LatestFrameSlot;

/// How often the bus loop wakes to check the watchdog and shutdown.
const BUS_POLL: Duration = Duration::from_millis(100);
/// Frames must flow this long before the back-off resets to `reconnect_min_s`, so a camera that
/// accepts the connection and drops it at once still backs off.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// rtspsrc waits this long for the server's TEARDOWN reply; a hung server must not hold the
/// rebuild (the property default is 100 ms on 1.22, set explicitly because it matters).
const RTSP_TEARDOWN_TIMEOUT_NS: u64 = 100_000_000;

/// Everything one ingest thread needs.
pub struct StreamIngest {
    pub index: usize,
    pub cfg: ResolvedStream,
    pub slot: Arc<LatestFrameSlot>,
    pub status: Arc<StreamStatus>,
    /// This stream's handles: frames received, up, reconnects{reason}.
    pub metrics: Arc<StreamMetrics>,
    /// The motion gate in front of the slot; `None` when `[streams.motion] enabled = false`.
    pub motion: Option<Arc<MotionStage>>,
}

/// How one pipeline run ended.
enum Outcome {
    Shutdown,
    Ended,
    Lost {
        reason: ReconnectReason,
        detail: String,
        had_frames: bool,
        /// The server refused the transport (RTSP 461), as told by rtspsrc.
        refused: bool,
    },
}

/// Delay before reconnect attempt `attempt` (0-based): `min * 2^attempt`, capped at `max`, times
/// `jitter` (expected in 0.75..=1.25).
pub fn backoff(min: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let base = min.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
    Duration::from_secs_f64(base.min(max.as_secs_f64()) * jitter)
}

/// A uniform draw in 0.75..=1.25 (std's per-instance random SipHash keys are enough for jitter).
fn jitter() -> f64 {
    let r = RandomState::new().hash_one(Instant::now());
    0.75 + (r % 10_001) as f64 / 20_000.0
}

impl StreamIngest {
    /// Start the ingest thread.
    pub fn spawn(self, shutdown: Shutdown) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("ingest-{}", self.cfg.name))
            .spawn(move || self.run(shutdown))
    }

    fn run(self, shutdown: Shutdown) {
        let span = info_span!("stream", stream = %self.cfg.name);
        let _e = span.enter();
        // seq survives rebuilds: it counts frames of this stream for the life of the process.
        let seq = Arc::new(AtomicU64::new(0));
        let mut attempt = 0u32;
        // Only rtsp:// has a lower transport to choose; other uris ignore it.
        let rtsp = self.cfg.uri.scheme().starts_with("rtsp");
        let mut transport = TransportChoice::new(self.cfg.transport);
        info!(message = "Starting stream.", uri = %self.cfg.uri);
        loop {
            if shutdown.is_triggered() {
                break;
            }
            self.status.set_state(StreamState::Connecting);
            let started = Instant::now();
            let lower = rtsp.then(|| transport.current());
            let outcome = match self.build(&seq, lower) {
                Ok(pipeline) => self.watch(&pipeline, &shutdown),
                Err(e) => Outcome::Lost {
                    reason: ReconnectReason::Error,
                    detail: e,
                    had_frames: false,
                    refused: false,
                },
            };
            self.metrics.up.set(0);
            match outcome {
                Outcome::Shutdown => break,
                Outcome::Ended => {
                    info!(message = "Stream ended.", frames = self.status.frames());
                    break;
                }
                Outcome::Lost {
                    reason,
                    mut detail,
                    had_frames,
                    refused,
                } => {
                    // A file that cannot be played (not video, corrupt, unreadable) will fail the
                    // same way again: end its stream with the reason instead of retrying forever.
                    if !self.cfg.uri.is_live() && reason == ReconnectReason::Error {
                        self.status
                            .disconnected(format!("{}: {detail}", reason.as_str()));
                        error!(message = "File cannot be played; stream ended.", error = %detail);
                        break;
                    }
                    self.metrics.reconnect(reason);
                    if reason == ReconnectReason::Unauthorized {
                        // Not the back-off: a camera that locks accounts after a few failed
                        // logins must see at most one attempt per auth_retry_s (issue 16).
                        self.metrics.unauthorized.store(true, Ordering::Relaxed);
                        let delay = self.cfg.auth_retry.mul_f64(jitter() + 0.25);
                        self.status
                            .disconnected(format!("{}: {detail}", reason.as_str()));
                        warn!(
                            message = "Camera refused the credentials; retrying later.",
                            uri = %self.cfg.uri,
                            error = %detail,
                            retry_in_s = format!("{:.0}", delay.as_secs_f64())
                        );
                        if shutdown.sleep(delay) {
                            break;
                        }
                        continue;
                    }
                    if let Some(t) = lower {
                        let end = if had_frames {
                            AttemptEnd::Delivered
                        } else if refused {
                            AttemptEnd::Refused
                        } else if t == Lower::Udp && reason == ReconnectReason::Timeout {
                            AttemptEnd::Silent(self.cfg.no_frame_timeout)
                        } else {
                            AttemptEnd::Other
                        };
                        match transport.record(end.clone()) {
                            Next::Retry => {
                                if matches!(end, AttemptEnd::Refused | AttemptEnd::Silent(_)) {
                                    // A forced transport: say what failed, not GStreamer's text.
                                    detail = format!(
                                        "{} (transport = \"{}\" allows no other)",
                                        end.describe(t),
                                        t.protocols()
                                    );
                                }
                            }
                            Next::Switch { to, because } => {
                                self.status
                                    .disconnected(format!("{}: {because}", reason.as_str()));
                                info!(
                                    message = "Trying another RTP transport.",
                                    transport = %to,
                                    because = %because
                                );
                                // A short pause: a shared server media torn down by the refused
                                // attempt answers 503 for a moment.
                                if shutdown.sleep(self.cfg.reconnect_min) {
                                    break;
                                }
                                continue;
                            }
                            Next::Exhausted { because } => {
                                detail = format!("no RTP transport works: {because}");
                            }
                        }
                    }
                    if had_frames && started.elapsed() >= STABLE_AFTER {
                        attempt = 0;
                    }
                    let delay = backoff(
                        self.cfg.reconnect_min,
                        self.cfg.reconnect_max,
                        attempt,
                        jitter(),
                    );
                    attempt = attempt.saturating_add(1);
                    self.status
                        .disconnected(format!("{}: {detail}", reason.as_str()));
                    // One line per attempt; the back-off itself rate-limits this (≥ reconnect_min_s).
                    warn!(
                        message = "Stream lost; reconnecting.",
                        reason = reason.as_str(),
                        error = %detail,
                        attempt,
                        retry_in_s = format!("{:.2}", delay.as_secs_f64())
                    );
                    if shutdown.sleep(delay) {
                        break;
                    }
                }
            }
        }
        self.status.set_state(StreamState::Ended);
        self.metrics.up.set(0);
        // The scheduler notices `Ended` within its poll interval.
        debug!(message = "Ingest thread stopped.");
    }

    /// Build the graph for this stream. Errors are texts already scrubbed of secrets.
    /// `lower`: the RTP transport for an rtsp:// uri (None for other uris).
    fn build(&self, seq: &Arc<AtomicU64>, lower: Option<Lower>) -> Result<gst::Pipeline, String> {
        let cfg = &self.cfg;
        let make = |factory: &str| {
            gst::ElementFactory::make(factory).build().map_err(|e| {
                format!("cannot create {factory}: {e} (is its GStreamer plugin installed?)")
            })
        };
        let pipeline = gst::Pipeline::with_name(&format!("stream-{}", cfg.name));
        let convert = make("videoconvert")?;
        let caps = match cfg.format {
            FrameFormat::Rgb => gst_video::VideoCapsBuilder::new()
                .format(gst_video::VideoFormat::Rgb)
                .build(),
            FrameFormat::Nv12 => gst_video::VideoCapsBuilder::new()
                .format(gst_video::VideoFormat::Nv12)
                .build(),
        };
        // max-buffers 1 + drop: the appsink never queues; freshness is the slot's job. Files play
        // at their own frame rate (sync) like a camera; live sources are already paced.
        let sink = gst_app::AppSink::builder()
            .caps(&caps)
            .max_buffers(1)
            .drop(true)
            .sync(!cfg.uri.is_live())
            .build();
        pipeline
            .add_many([&convert, sink.upcast_ref()])
            .and_then(|_| convert.link(&sink))
            .map_err(|e| format!("cannot link videoconvert ! appsink: {e}"))?;

        let stream_name: Arc<str> = Arc::from(cfg.name.as_str());
        let (slot, status, index, frames_received, up, metrics) = (
            self.slot.clone(),
            self.status.clone(),
            self.index,
            self.metrics.frames_received.clone(),
            self.metrics.up.clone(),
            self.metrics.clone(),
        );
        let seq = seq.clone();
        let motion = self.motion.clone();
        if let Some(m) = &motion {
            // After a reconnect the scene may have changed while nothing arrived: serve the first frame.
            m.restart();
        }
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    match Frame::from_sample(&stream_name, index, n, &sample) {
                        Ok(frame) => {
                            frames_received.inc();
                            if status.frame_arrived() {
                                up.set(1);
                                metrics.unauthorized.store(false, Ordering::Relaxed);
                            }
                            // The gate drops (and counts) frames of a still scene here, before the slot.
                            if motion.as_ref().is_none_or(|m| m.admit(&frame)) {
                                slot.put(frame);
                            }
                            Ok(gst::FlowSuccess::Ok)
                        }
                        Err(e) => {
                            gst::element_error!(
                                sink,
                                gst::StreamError::Format,
                                ("Bad frame: {}", e)
                            );
                            Err(gst::FlowError::Error)
                        }
                    }
                })
                .build(),
        );

        // Decoded video pads (from uridecodebin or decodebin) link to videoconvert; audio and
        // other pads are left unlinked (and pruned by the bins). A weak ref avoids a
        // pipeline → element → closure → element cycle (style.md §3.4).
        let convert_weak = convert.downgrade();
        let link_video = move |pad: &gst::Pad| {
            let Some(convert) = convert_weak.upgrade() else {
                return;
            };
            let is_video = pad
                .current_caps()
                .or_else(|| Some(pad.query_caps(None)))
                .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
                .unwrap_or(false);
            let Some(sinkpad) = convert.static_pad("sink") else {
                return;
            };
            if is_video && !sinkpad.is_linked() {
                if let Err(e) = pad.link(&sinkpad) {
                    warn!(message = "Cannot link decoded video pad.", error = ?e);
                }
            }
        };

        let latency = cfg.latency_ms;
        let configure_rtspsrc = move |src: &gst::Element| {
            if src.find_property("latency").is_some() {
                src.set_property("latency", latency);
            }
            // Exactly one transport per attempt; transport.rs picks it (rtspsrc's own fallback
            // is UDP first).
            if let (Some(t), Some(_)) = (lower, src.find_property("protocols")) {
                src.set_property_from_str("protocols", t.protocols());
            }
            if src.find_property("teardown-timeout").is_some() {
                src.set_property("teardown-timeout", RTSP_TEARDOWN_TIMEOUT_NS);
            }
            // SETUP only the video streams: a camera's audio track would cost bandwidth and a
            // decoder for nothing, and with rtspsrc ! decodebin only one stream can be linked.
            src.connect("select-stream", false, |args| {
                let caps = args.get(2).and_then(|v| v.get::<gst::Caps>().ok());
                let media = caps
                    .as_ref()
                    .and_then(|c| c.structure(0))
                    .and_then(|s| s.get::<String>("media").ok());
                let keep = media.as_deref().is_none_or(|m| m == "video");
                if !keep {
                    debug!(message = "Skipping a non-video RTSP stream.", media = ?media);
                }
                Some(keep.to_value())
            });
        };

        match cfg.source {
            SourceKind::Auto => {
                let src = gst::ElementFactory::make("uridecodebin")
                    .property("uri", cfg.uri.expose())
                    .build()
                    .map_err(|e| format!("cannot create uridecodebin: {e}"))?;
                // rtsp:// through uridecodebin still gets our latency/transport.
                src.connect("source-setup", false, move |args| {
                    if let Some(Ok(source)) = args.get(1).map(|v| v.get::<gst::Element>()) {
                        if source.factory().is_some_and(|f| f.name() == "rtspsrc") {
                            configure_rtspsrc(&source);
                        }
                    }
                    None
                });
                src.connect_pad_added(move |_, pad| link_video(pad));
                pipeline
                    .add(&src)
                    .map_err(|e| format!("cannot add uridecodebin: {e}"))?;
            }
            SourceKind::Rtspsrc => {
                let src = gst::ElementFactory::make("rtspsrc")
                    .property("location", cfg.uri.expose())
                    .build()
                    .map_err(|e| {
                        format!("cannot create rtspsrc (gstreamer1.0-plugins-good): {e}")
                    })?;
                configure_rtspsrc(&src);
                let decode = make("decodebin")?;
                pipeline
                    .add_many([&src, &decode])
                    .map_err(|e| format!("cannot add rtspsrc/decodebin: {e}"))?;
                let decode_weak = decode.downgrade();
                src.connect_pad_added(move |_, pad| {
                    let Some(decode) = decode_weak.upgrade() else {
                        return;
                    };
                    if let Some(sinkpad) = decode.static_pad("sink") {
                        if !sinkpad.is_linked() {
                            if let Err(e) = pad.link(&sinkpad) {
                                warn!(message = "Cannot link rtspsrc to decodebin.", error = ?e);
                            }
                        }
                    }
                });
                decode.connect_pad_added(move |_, pad| link_video(pad));
            }
        }
        Ok(pipeline)
    }

    /// Play `pipeline` and watch it until it is lost, ends, or shutdown is asked.
    fn watch(&self, pipeline: &gst::Pipeline, shutdown: &Shutdown) -> Outcome {
        let cfg = &self.cfg;
        let frames_at_start = self.status.frames();
        let outcome = self.watch_inner(pipeline, shutdown);
        // Teardown to Null releases sockets and decoder state; a rebuild starts clean.
        let _ = pipeline.set_state(gst::State::Null);
        match outcome {
            Outcome::Lost {
                reason,
                detail,
                refused,
                ..
            } => Outcome::Lost {
                reason,
                detail: cfg.uri.scrub(&detail),
                had_frames: self.status.frames() > frames_at_start,
                refused,
            },
            o => o,
        }
    }

    fn watch_inner(&self, pipeline: &gst::Pipeline, shutdown: &Shutdown) -> Outcome {
        let cfg = &self.cfg;
        let Some(bus) = pipeline.bus() else {
            return Outcome::Lost {
                reason: ReconnectReason::Error,
                detail: "pipeline has no bus".into(),
                had_frames: false,
                refused: false,
            };
        };
        if let Err(e) = pipeline.set_state(gst::State::Playing) {
            // The bus usually carries the reason; take it if it is there.
            let detail = bus
                .timed_pop_filtered(
                    gst::ClockTime::from_mseconds(200),
                    &[gst::MessageType::Error],
                )
                .and_then(|m| match m.view() {
                    gst::MessageView::Error(err) => {
                        Some(format!("{} ({:?})", err.error(), err.debug()))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| e.to_string());
            return Outcome::Lost {
                reason: ReconnectReason::StateChangeFailure,
                detail,
                had_frames: false,
                refused: false,
            };
        }
        let mut last_frames = self.status.frames();
        let mut last_progress = Instant::now();
        // rtspsrc tells some failures (a refused transport) only as a WARNING before the bins
        // post a generic ERROR ("missing a plug-in"); keep them to explain that ERROR.
        let mut warnings: Vec<String> = Vec::new();
        loop {
            if shutdown.is_triggered() {
                return Outcome::Shutdown;
            }
            if let Some(msg) =
                bus.timed_pop(gst::ClockTime::from_nseconds(BUS_POLL.as_nanos() as u64))
            {
                match msg.view() {
                    gst::MessageView::Error(err) => {
                        let src = msg
                            .src()
                            .map(|s| s.path_string().to_string())
                            .unwrap_or_default();
                        let detail = format!(
                            "{src}: {} ({})",
                            err.error(),
                            err.debug().unwrap_or_default()
                        );
                        let (reason, refused) = classify_error(&err.error(), &detail, &warnings);
                        let detail = match (refused, warnings.last()) {
                            // The warning says what happened; the ERROR after it does not.
                            (true, Some(w)) => w.clone(),
                            _ => detail,
                        };
                        return Outcome::Lost {
                            reason,
                            detail,
                            had_frames: false,
                            refused,
                        };
                    }
                    gst::MessageView::Eos(_) => {
                        if cfg.uri.is_live() {
                            return Outcome::Lost {
                                reason: ReconnectReason::Eos,
                                detail: "end of stream from a live source".into(),
                                had_frames: false,
                                refused: false,
                            };
                        }
                        if !cfg.loop_ {
                            return Outcome::Ended;
                        }
                        debug!(message = "End of file; looping.");
                        if let Err(e) = pipeline.seek_simple(
                            gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
                            gst::ClockTime::ZERO,
                        ) {
                            // A rebuild also starts from the beginning.
                            return Outcome::Lost {
                                reason: ReconnectReason::Eos,
                                detail: format!("cannot seek back to start for loop: {e}"),
                                had_frames: false,
                                refused: false,
                            };
                        }
                        last_progress = Instant::now();
                    }
                    gst::MessageView::Warning(w) => {
                        let text = format!("{} ({})", w.error(), w.debug().unwrap_or_default());
                        debug!(message = "GStreamer warning.", warning = %cfg.uri.scrub(&text));
                        if warnings.len() < 8 {
                            warnings.push(text);
                        }
                    }
                    _ => {}
                }
            }
            // No-frame watchdog: a hung server sends nothing, not even an error.
            let frames = self.status.frames();
            if frames != last_frames {
                last_frames = frames;
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= cfg.no_frame_timeout {
                return Outcome::Lost {
                    reason: ReconnectReason::Timeout,
                    detail: format!("no frame for {:.1} s", cfg.no_frame_timeout.as_secs_f64()),
                    had_frames: false,
                    refused: false,
                };
            }
        }
    }
}

/// Reconnect reason of a bus ERROR, and whether it means the server refused the RTP transport.
/// `text` is the error with its debug string; `warnings` the WARNINGs posted before it.
///
/// What rtspsrc 1.22 posts (measured against gst-rtsp-server): a 401 is `Unauthorized` with
/// debug `Unauthorized (401)`; a SETUP refused for the one transport allowed (461) is "No
/// supported stream was found. You might need to allow more transport protocols …".
fn classify_error(
    err: &gst::glib::Error,
    text: &str,
    warnings: &[String],
) -> (ReconnectReason, bool) {
    if err.matches(gst::ResourceError::NotAuthorized) || text.contains("Unauthorized (401)") {
        return (ReconnectReason::Unauthorized, false);
    }
    let refusal = |t: &str| {
        t.contains("No supported stream was found")
            // uridecodebin re-posts that error as "missing a plug-in" with rtspsrc's SETUP
            // function in the debug text.
            || t.contains("gst_rtspsrc_setup_streams_start")
            || t.contains("Unsupported transport")
            || t.contains("(461)")
    };
    let refused = refusal(text) || warnings.iter().any(|w| refusal(w));
    (ReconnectReason::Error, refused)
}

/// Initialise GStreamer once (scans plugins on first use, ~1 s cold).
pub fn init() -> Result<(), String> {
    gst::init().map_err(|e| format!("GStreamer init failed: {e}"))
}

/// Log a stream's final error at ERROR level (used by run.rs when a thread cannot start).
pub fn log_spawn_error(stream: &str, e: &std::io::Error) {
    error!(message = "Cannot start ingest thread.", stream, %e);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineConfig;
    use crate::ingest::frame::PixelFormat;
    use crate::slot::Wakeup;

    #[test]
    fn backoff_doubles_then_caps_and_applies_jitter() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let d: Vec<f64> = (0..9)
            .map(|a| backoff(min, max, a, 1.0).as_secs_f64())
            .collect();
        assert_eq!(d, vec![0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
        assert_eq!(backoff(min, max, 2, 0.75), Duration::from_millis(1500));
        assert_eq!(backoff(min, max, 1000, 1.25), Duration::from_secs_f64(37.5));
        for _ in 0..100 {
            let j = jitter();
            assert!((0.75..=1.25).contains(&j), "{j}");
        }
    }

    /// Run one stream from `uri` (a `[[streams]]` snippet's extra lines) until its thread ends or
    /// `limit` passes; returns (frames seen in the slot in order, final status, metrics text).
    fn ingest(uri: &str, extra: &str, limit: Duration) -> (Vec<Frame>, Arc<StreamStatus>, String) {
        init().unwrap();
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let file = manifest.join("../../pipelines/test.toml");
        let text =
            format!("[[streams]]\nname = \"t\"\nuri = \"{uri}\"\ncategories = [\"x\"]\n{extra}");
        let cfg = PipelineConfig::parse(&text, "test.toml")
            .unwrap()
            .validate(&file, &|_| None)
            .unwrap();
        let metrics = crate::metrics::Metrics::new();
        let sm = metrics.stream("t");
        let wakeup = Wakeup::new();
        let slot = Arc::new(LatestFrameSlot::new(sm.clone(), wakeup.clone()));
        let status = Arc::new(StreamStatus::new(
            "t".into(),
            cfg.streams[0].uri.to_string(),
        ));
        let ing = StreamIngest {
            index: 0,
            cfg: cfg.streams[0].clone(),
            slot: slot.clone(),
            status: status.clone(),
            metrics: sm,
            motion: None,
        };
        let shutdown = Shutdown::new();
        let t = ing.spawn(shutdown.clone()).unwrap();
        let deadline = Instant::now() + limit;
        let mut frames = Vec::new();
        while Instant::now() < deadline && !t.is_finished() {
            let g = wakeup.generation();
            if let Some(f) = slot.take() {
                frames.push(f);
            }
            wakeup.wait(g, Duration::from_millis(50));
        }
        frames.extend(slot.take());
        shutdown.trigger();
        t.join().unwrap();
        (frames, status, metrics.encode())
    }

    #[test]
    fn file_plays_to_its_end_with_increasing_seq_and_owned_rgb_frames() {
        // The demo clip: 64 frames of 480x360 at 8 fps, played in real time (8 s).
        let (frames, status, text) = ingest("media/demo.mp4", "", Duration::from_secs(30));
        assert_eq!(status.state(), StreamState::Ended);
        assert_eq!(status.frames(), 64, "{text}");
        assert!(
            frames.len() >= 32,
            "the test drains the slot faster than 8 fps: {}",
            frames.len()
        );
        assert!(frames.windows(2).all(|w| w[0].seq < w[1].seq));
        let f = &frames[0];
        assert_eq!((f.width, f.height, f.format), (480, 360, PixelFormat::Rgb));
        assert!(f.data.len() >= f.strides[0] * 359 + 480 * 3);
        assert!(f.pts_ns.is_some());
        let prepared = rexprep::prepare(&f.as_prep()).unwrap();
        assert_eq!(prepared.original, (480, 360));
        assert!(
            text.contains("rexstream_frames_received_total{stream=\"t\"} 64"),
            "{text}"
        );
    }

    #[test]
    fn a_file_that_is_not_video_ends_its_stream_with_the_reason() {
        let (frames, status, _) = ingest("../Cargo.toml", "", Duration::from_secs(20));
        assert!(frames.is_empty());
        assert_eq!(status.state(), StreamState::Ended);
        let err = status.last_error().unwrap_or_default();
        assert!(err.starts_with("error: "), "{err}");
    }
}
