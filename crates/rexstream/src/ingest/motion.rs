//! The motion gate stage: between the appsink and the latest-frame slot, it drops frames of a still scene
//! before they can reach the scheduler (issue 12, design.md "motion gate").
//!
//! In: every frame the stream's appsink delivers ([`MotionStage::admit`], on the GStreamer streaming
//! thread), and the prompt in force from the shared [`PromptTable`]. Out: `true` (put the frame in the
//! slot) or `false` (dropped, counted as `rexstream_frames_dropped_total{reason="no_motion"}`); the gauge
//! `rexstream_motion_active{stream}`; the retained MQTT topic `<prefix>/<stream>/motion` = `ON`/`OFF`.
//!
//! Why on the streaming thread rather than the slot consumer: the scheduler takes at most `max_fps` frames
//! from the slot, so a gate there would see only those and miss the motion between them; here it sees
//! every decoded frame. That is affordable because the algorithm (`rexprep::motion`) reads each luma byte
//! once and works on a ≤ 320-pixel-wide image (well under 1 ms for 1080p in release builds,
//! `cargo bench -p rexprep --bench motion`), next to the pixel copy the callback already does.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rexomni::protocol::TaskPrompt;
use rexprep::motion::{GateDecision, MotionGate};
use serde::Deserialize;
use tracing::debug;

use super::frame::Frame;
use crate::config::FieldErrors;
use crate::metrics::{DropReason, StreamMetrics};
use crate::sinks::mqtt::MqttHandle;
use crate::sinks::prompts::PromptTable;
use crate::tracking::runtime::EventsHandle;

/// `[streams.motion]`: the per-stream motion gate. On by default; a frame goes to the model when it is the
/// stream's first, while there is motion, when motion has just stopped, when the prompt changed, or every
/// `refresh_s` seconds of a still scene. Other frames are dropped before the scheduler.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MotionConfig {
    /// Gate frames on motion. `false` sends every frame on (up to `max_fps`), as before issue 12.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Luma difference (1..=255) from the background at which a pixel counts as changed, after the frame's
    /// overall brightness change is removed. Frigate's default; lower is more sensitive.
    #[serde(default = "default_threshold")]
    pub threshold: i64,
    /// Fraction of the frame (0 < min_area ≤ 1) that must change for motion. 0.0005 = 0.05 %, Frigate's
    /// default contour area; raise it to ignore small moving things (leaves, insects).
    #[serde(default = "default_min_area")]
    pub min_area: f64,
    /// Seconds after which a still scene is looked at again anyway (the last served frame is older).
    #[serde(default = "default_refresh_s")]
    pub refresh_s: f64,
}

const fn default_enabled() -> bool {
    true
}
const fn default_threshold() -> i64 {
    rexprep::motion::DEFAULT_THRESHOLD as i64
}
const fn default_min_area() -> f64 {
    rexprep::motion::DEFAULT_MIN_AREA
}
const fn default_refresh_s() -> f64 {
    rexprep::motion::DEFAULT_REFRESH_S
}
/// Longest `refresh_s`: one year, like every other duration in the file (bigger values are typos).
const MAX_REFRESH_S: f64 = 365.0 * 24.0 * 3600.0;

impl Default for MotionConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            threshold: default_threshold(),
            min_area: default_min_area(),
            refresh_s: default_refresh_s(),
        }
    }
}

impl MotionConfig {
    /// Push one error per bad field; `at` is the section's path, e.g. `streams[2].motion`.
    pub fn validate(&self, at: &str, errs: &mut FieldErrors) {
        if !(1..=255).contains(&self.threshold) {
            errs.push(
                format!("{at}.threshold"),
                format!("{} is not in 1..=255", self.threshold),
            );
        }
        if !(self.min_area.is_finite() && self.min_area > 0.0 && self.min_area <= 1.0) {
            errs.push(
                format!("{at}.min_area"),
                format!(
                    "{} is not a fraction of the frame in (0, 1] (0.0005 = 0.05 %)",
                    self.min_area
                ),
            );
        }
        if !(self.refresh_s.is_finite() && self.refresh_s > 0.0) {
            errs.push(
                format!("{at}.refresh_s"),
                format!("{} is not > 0", self.refresh_s),
            );
        } else if self.refresh_s > MAX_REFRESH_S {
            errs.push(
                format!("{at}.refresh_s"),
                format!(
                    "{:?} is more than {MAX_REFRESH_S} (one year)",
                    self.refresh_s
                ),
            );
        }
    }
}

/// What the gate remembers between frames; touched only by the stream's streaming thread (the mutex is
/// uncontended; the appsink callback must be `Sync`).
struct GateState {
    gate: MotionGate,
    /// The prompt in force when the last served frame was decided; kept alive so the pointer comparison
    /// cannot be fooled by a freed and reused allocation.
    served_prompt: Option<Arc<TaskPrompt>>,
    /// The motion state last announced (gauge and MQTT); `None` before the first frame.
    announced: Option<bool>,
    /// When the tracker was last told that a dropped frame showed no motion.
    last_keep_alive: Option<Instant>,
}

/// How often a still stream tells the tracker its objects are still there. Far below any sensible
/// `max_disappeared_s` (seconds), far above the frame rate, so the events channel never fills with these.
const KEEP_ALIVE_EVERY: Duration = Duration::from_millis(500);

/// The gate of one stream.
pub struct MotionStage {
    stream: String,
    state: Mutex<GateState>,
    /// Origin of the gate's clock (frames carry a monotonic capture instant).
    epoch: Instant,
    prompts: Arc<PromptTable>,
    mqtt: Option<MqttHandle>,
    metrics: Arc<StreamMetrics>,
    /// The tracker: a frame dropped for no motion keeps the stream's objects alive (issue 13: gated frames
    /// never end a track). `None` without `[events]`. Weak, because the events thread stops only when
    /// every handle is gone: a pipeline that outlives shutdown (a GStreamer callback kept alive) must not
    /// keep it running.
    events: Option<Weak<EventsHandle>>,
}

impl MotionStage {
    /// The gate for `stream` with validated settings; `mqtt` receives the retained motion state.
    pub fn new(
        stream: &str,
        cfg: &MotionConfig,
        prompts: Arc<PromptTable>,
        mqtt: Option<MqttHandle>,
        metrics: Arc<StreamMetrics>,
    ) -> Self {
        let threshold = cfg.threshold.clamp(1, 255) as u8;
        Self {
            stream: stream.to_string(),
            state: Mutex::new(GateState {
                gate: MotionGate::new(threshold, cfg.min_area, cfg.refresh_s),
                served_prompt: None,
                announced: None,
                last_keep_alive: None,
            }),
            epoch: Instant::now(),
            prompts,
            mqtt,
            metrics,
            events: None,
        }
    }

    /// Tell `events` about frames dropped for no motion, so a still scene keeps its tracked objects.
    pub fn with_events(mut self, events: Option<&Arc<EventsHandle>>) -> Self {
        self.events = events.map(Arc::downgrade);
        self
    }

    /// The pipeline is being (re)built: the first frame after it is served (`MotionGate::restart`).
    pub fn restart(&self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .gate
            .restart();
    }

    /// Decide for `frame`: `true` to put it in the slot, `false` when it was dropped (and counted).
    /// A frame whose planes do not fit its buffer is let through, so the worker rejects it as `invalid`
    /// exactly as without the gate.
    pub fn admit(&self, frame: &Frame) -> bool {
        let t = frame
            .captured_mono
            .saturating_duration_since(self.epoch)
            .as_secs_f64();
        let prompt = self.prompts.get(&self.stream);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let prompt_changed = match (&st.served_prompt, &prompt) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            _ => false,
        };
        let decision: GateDecision = match st.gate.decide(&frame.as_prep(), t, prompt_changed) {
            Ok(d) => d,
            Err(error) => {
                debug!(message = "Motion gate cannot read the frame; passing it on.", seq = frame.seq, %error);
                return true;
            }
        };
        if st.announced != Some(decision.active) {
            st.announced = Some(decision.active);
            self.metrics.motion_active.set(i64::from(decision.active));
            if let Some(m) = &self.mqtt {
                let payload: &[u8] = if decision.active { b"ON" } else { b"OFF" };
                m.set_retained(&format!("{}/motion", self.stream), payload.to_vec());
            }
            if decision.active {
                debug!(
                    message = "Motion started.",
                    seq = frame.seq,
                    changed = decision.sample.changed
                );
            } else {
                debug!(message = "Motion stopped.", seq = frame.seq);
            }
        }
        match decision.serve {
            Some(reason) => {
                st.served_prompt = prompt;
                debug!(
                    message = "Frame served by the motion gate.",
                    seq = frame.seq,
                    reason = reason.as_str()
                );
                true
            }
            None => {
                let keep_alive = self.events.is_some()
                    && st
                        .last_keep_alive
                        .is_none_or(|t| t.elapsed() >= KEEP_ALIVE_EVERY);
                if keep_alive {
                    st.last_keep_alive = Some(Instant::now());
                }
                drop(st);
                self.metrics.dropped(DropReason::NoMotion, 1);
                if let Some(events) = self
                    .events
                    .as_ref()
                    .filter(|_| keep_alive)
                    .and_then(Weak::upgrade)
                {
                    events.no_motion(&self.stream, frame.captured_at);
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineConfig;
    use rexprep::motion::synth::Scene;
    use std::path::Path;
    use std::time::Duration;

    fn parse(extra: &str) -> Result<crate::config::Pipeline, String> {
        let text = format!(
            "[[streams]]\nname = \"door\"\nuri = \"rtsp://cam/1\"\ncategories = [\"person\"]\n{extra}"
        );
        PipelineConfig::parse(&text, "pipelines/lab.toml")
            .and_then(|c| c.validate(Path::new("pipelines/lab.toml"), &|_| None))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_on_with_frigate_values() {
        let p = parse("").unwrap();
        assert_eq!(p.streams[0].motion, MotionConfig::default());
        assert!(p.streams[0].motion.enabled);
        assert_eq!(p.streams[0].motion.threshold, 30);
        let p = parse("[streams.motion]\nenabled = false\nrefresh_s = 5\n").unwrap();
        assert!(!p.streams[0].motion.enabled);
        assert_eq!(p.streams[0].motion.refresh_s, 5.0);
    }

    #[test]
    fn bad_settings_name_file_field_and_value() {
        let e =
            parse("[streams.motion]\nthreshold = 300\nmin_area = 0\nrefresh_s = -1\n").unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(
            lines,
            vec![
                "pipelines/lab.toml: streams[0].motion.threshold: 300 is not in 1..=255",
                "pipelines/lab.toml: streams[0].motion.min_area: 0 is not a fraction of the frame in (0, 1] (0.0005 = 0.05 %)",
                "pipelines/lab.toml: streams[0].motion.refresh_s: -1 is not > 0",
            ],
            "{e}"
        );
        let e = parse("[streams.motion]\nthresold = 3\n").unwrap_err();
        assert!(
            e.starts_with("pipelines/lab.toml:6:1: unknown field `thresold`"),
            "{e}"
        );
        let e = parse("[streams.motion]\nrefresh_s = 1e300\n").unwrap_err();
        assert!(
            e.contains("streams[0].motion.refresh_s: 1e300 is more than"),
            "{e}"
        );
    }

    fn frame_at(scene: &Scene, i: usize, epoch: Instant) -> Frame {
        let mut f = crate::slot::tests::frame(0, i as u64);
        f.width = scene.width;
        f.height = scene.height;
        f.strides = [scene.width as usize * 3, 0, 0];
        f.data = scene.frame(i);
        f.captured_mono = epoch + Duration::from_secs_f64(scene.time(i));
        f
    }

    fn counter(text: &str, prefix: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    }

    #[test]
    fn stage_counts_drops_sets_the_gauge_and_serves_prompt_changes() {
        let metrics = crate::metrics::Metrics::new();
        let prompts = Arc::new(PromptTable::new([(
            "s0".to_string(),
            TaskPrompt::new(rexomni::protocol::Task::Detection, &["person"]),
        )]));
        let stage = MotionStage::new(
            "s0",
            &MotionConfig::default(),
            prompts.clone(),
            None,
            metrics.stream("s0"),
        );
        let scene = Scene {
            width: 160,
            height: 120,
            crossing: Some((5.0, 2.0)),
            ..Scene::still()
        };
        let epoch = stage.epoch;
        let mut admitted = Vec::new();
        for i in 0..20 {
            admitted.push(stage.admit(&frame_at(&scene, i, epoch)));
        }
        // First frame only.
        assert_eq!(admitted.iter().filter(|a| **a).count(), 1, "{admitted:?}");
        let text = metrics.encode();
        assert_eq!(
            counter(
                &text,
                "rexstream_frames_dropped_total{reason=\"no_motion\",stream=\"s0\"}"
            ),
            19.0,
            "{text}"
        );
        assert_eq!(
            counter(&text, "rexstream_motion_active{stream=\"s0\"}"),
            0.0
        );
        // A prompt change serves the next frame, once.
        prompts
            .set(
                "s0",
                TaskPrompt::new(rexomni::protocol::Task::Detection, &["cat"]),
            )
            .unwrap();
        assert!(stage.admit(&frame_at(&scene, 20, epoch)));
        for i in 21..25 {
            assert!(!stage.admit(&frame_at(&scene, i, epoch)), "frame {i}");
        }
        // The crossing (t = 5..7 s): motion active, frames admitted.
        let during: Vec<bool> = (26..34)
            .map(|i| stage.admit(&frame_at(&scene, i, epoch)))
            .collect();
        assert!(during.iter().all(|a| *a), "{during:?}");
        let text = metrics.encode();
        assert_eq!(
            counter(&text, "rexstream_motion_active{stream=\"s0\"}"),
            1.0,
            "{text}"
        );
    }
}
