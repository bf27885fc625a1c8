//! One stream's events: detector frames in, `new`/`update`/`end` messages, counts and snapshots out.
//!
//! In: [`FrameObservation`]s (built from detections documents, live or recorded), optionally the
//! frame's pixels for snapshots; "no motion" notices from the motion gate; clock ticks. Out:
//! [`Output`]s in the order they must be published. Runs on the events thread (one
//! [`StreamEvents`] per stream); pure state, no I/O, so replay and the live runtime share it.
//!
//! Per frame: the tracker associates detections with tracks; each track's [`TrackedObject`] takes
//! its detection (zones, stationary, scores, snapshot); ended tracks send `end`; then every live
//! object whose state changed meaningfully sends `new` or `update`; then the retained counts that
//! changed. Objects are visited in track order, so output is deterministic for a given input.

use std::collections::BTreeMap;
use std::sync::Arc;

use rexomni::protocol::Detection;
use serde::Deserialize;

use super::config::EventsConfig;
use super::object::{topic_label, EventMessage, EventType, ObjectParams, TrackedObject};
use super::shape;
use super::tracker::{FrameResult, Observation, Tracker};
use super::zones::ZoneConfig;

/// What the events layer needs of one detector frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FrameObservation {
    pub stream: String,
    /// Capture time, unix seconds.
    pub frame_time: f64,
    pub width: u32,
    pub height: u32,
    pub model: String,
    pub detections: Vec<Detection>,
}

impl FrameObservation {
    /// From a detections document (live: the worker's; replay: a recorded JSON line).
    pub fn from_document(doc: &crate::event::DetectionsDocument) -> Self {
        Self {
            stream: doc.stream.clone(),
            frame_time: parse_rfc3339(&doc.frame.captured_at).unwrap_or(0.0),
            width: doc.frame.width,
            height: doc.frame.height,
            model: doc.model.clone(),
            detections: doc.detections.clone(),
        }
    }

    /// From one JSON line written by the JSON-lines sink (`docs/detections.schema.json`).
    ///
    /// # Errors
    /// Not JSON, or a required field (`stream`, `frame.captured_at`, `frame.width`, `frame.height`,
    /// `detections`) missing or of the wrong type, or a `captured_at` that is not RFC 3339 UTC.
    pub fn from_json_line(line: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Frame {
            captured_at: String,
            width: u32,
            height: u32,
        }
        #[derive(Deserialize)]
        struct Doc {
            stream: String,
            frame: Frame,
            #[serde(default)]
            model: String,
            detections: Vec<Detection>,
        }
        let d: Doc = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let frame_time = parse_rfc3339(&d.frame.captured_at).ok_or_else(|| {
            format!(
                "frame.captured_at: {:?} is not RFC 3339 UTC",
                d.frame.captured_at
            )
        })?;
        Ok(Self {
            stream: d.stream,
            frame_time,
            width: d.frame.width,
            height: d.frame.height,
            model: d.model,
            detections: d.detections,
        })
    }
}

/// `2026-11-26T13:15:35.123Z` (what `event::rfc3339` writes; any number of fraction digits, `Z` or
/// `+00:00`) → unix seconds. Inverse of event.rs's civil-from-days.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.trim();
    let body = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = body.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let mut t = time.splitn(3, ':');
    let hh: i64 = t.next()?.parse().ok()?;
    let mm: i64 = t.next()?.parse().ok()?;
    let ss: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || !(0.0..61.0).contains(&ss)
    {
        return None;
    }
    // days_from_civil (H. Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// Something to publish, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A message for `<prefix>/events`.
    Event(EventMessage),
    /// Retained count on `<prefix>/<topic>`: `<stream>/<label>`, `<zone>/<label>`, with `all` for
    /// every label together.
    Count { topic: String, count: usize },
    /// Retained JPEG on `<prefix>/<stream>/<label>/snapshot` (the object's best frame).
    Snapshot {
        stream: String,
        label: String,
        id: String,
        jpeg: Arc<Vec<u8>>,
    },
    /// Retained Home Assistant discovery config on an absolute topic (empty payload = remove).
    Discovery { topic: String, payload: Vec<u8> },
}

/// Makes the JPEG of a better snapshot: the frame with the object's shape drawn. `None` when no
/// frame is at hand (replay) or encoding failed.
pub type SnapshotMaker<'a> = &'a dyn Fn(&rexomni::protocol::Geometry) -> Option<Vec<u8>>;

/// Tracker, zones and objects of one stream.
pub struct StreamEvents {
    camera: String,
    zones: Vec<ZoneConfig>,
    required_zones: Vec<String>,
    params: ObjectParams,
    tracker: Tracker,
    /// Track key → object; ordered so outputs are deterministic.
    objects: BTreeMap<u64, TrackedObject>,
    /// Last published value of every count topic.
    counts: BTreeMap<String, usize>,
    /// Last frame or no-motion notice (unix seconds).
    last_activity: f64,
}

impl StreamEvents {
    pub fn new(
        camera: &str,
        cfg: &EventsConfig,
        zones: Vec<ZoneConfig>,
        required_zones: Vec<String>,
    ) -> Self {
        Self {
            camera: camera.to_string(),
            zones,
            required_zones,
            params: ObjectParams {
                stationary_after_s: cfg.stationary_after_s,
                threshold: cfg.threshold,
            },
            tracker: Tracker::new(cfg.tracker_params()),
            objects: BTreeMap::new(),
            counts: BTreeMap::new(),
            last_activity: f64::NEG_INFINITY,
        }
    }

    pub fn camera(&self) -> &str {
        &self.camera
    }

    /// Objects tracked now (tentative ones included).
    pub fn live_objects(&self) -> impl Iterator<Item = &TrackedObject> {
        self.objects.values()
    }

    /// One detector frame. `snapshot` renders a JPEG when an object's best frame improves.
    pub fn on_frame(
        &mut self,
        f: &FrameObservation,
        snapshot: Option<SnapshotMaker<'_>>,
    ) -> Vec<Output> {
        let t = f.frame_time;
        self.last_activity = self.last_activity.max(t);
        let obs: Vec<Observation> = f
            .detections
            .iter()
            .map(|d| Observation {
                label: topic_label(&d.label),
                bbox: shape::bbox(&d.geometry),
                by: shape::match_by(&d.geometry),
                score: d
                    .score
                    .map(f64::from)
                    .filter(|s| s.is_finite())
                    .unwrap_or(1.0),
            })
            .collect();
        let r = self.tracker.update(t, f.width, f.height, &obs);
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for &(key, di) in &r.matched {
            seen.insert(key);
            let d = &f.detections[di];
            let score = obs[di].score;
            let obj = self.objects.entry(key).or_insert_with(|| {
                TrackedObject::new(
                    &self.camera,
                    &f.model,
                    &d.geometry,
                    &d.label,
                    score,
                    t,
                    f.width,
                    f.height,
                )
            });
            let o = obj.observe(
                &d.geometry,
                score,
                t,
                f.width,
                f.height,
                &self.zones,
                &self.params,
            );
            if o.better_snapshot {
                if let Some(jpeg) = snapshot.and_then(|make| make(&d.geometry)) {
                    obj.snapshot_jpeg = Some(Arc::new(jpeg));
                    obj.state.has_snapshot = true;
                }
            }
        }
        for (key, obj) in self.objects.iter_mut() {
            if !seen.contains(key) {
                obj.missed(&self.params);
            }
        }
        self.finish_frame(r, &mut out);
        out
    }

    /// The motion gate dropped a frame captured at `t` (no motion): every object stays where it
    /// was. Keeps tracks alive, never ends one; may turn objects stationary (an `update`).
    pub fn no_motion(&mut self, t: f64) -> Vec<Output> {
        self.last_activity = self.last_activity.max(t);
        self.tracker.keep_alive(t);
        for obj in self.objects.values_mut() {
            obj.no_motion(t, &self.params);
        }
        let mut out = Vec::new();
        self.finish_frame(FrameResult::default(), &mut out);
        out
    }

    /// The stream has sent neither a frame nor a no-motion notice for `silent_for_s` seconds of
    /// wall-clock time (camera gone, stream ended): objects unseen for `max_disappeared_s` by then
    /// end. Measured from the last arrival rather than against capture times, so a detector that
    /// lags behind real time (seconds per frame on a CPU) never ends objects between two frames.
    pub fn tick(&mut self, silent_for_s: f64) -> Vec<Output> {
        if !self.last_activity.is_finite() {
            return Vec::new();
        }
        let r = self
            .tracker
            .expire(self.last_activity + silent_for_s.max(0.0));
        let mut out = Vec::new();
        if !r.ended.is_empty() || !r.forgotten.is_empty() {
            self.finish_frame(r, &mut out);
        }
        out
    }

    /// End everything (end of a replayed recording, or shutdown).
    pub fn finish(&mut self) -> Vec<Output> {
        let r = self.tracker.finish();
        let mut out = Vec::new();
        self.finish_frame(r, &mut out);
        out
    }

    fn finish_frame(&mut self, r: FrameResult, out: &mut Vec<Output>) {
        for key in r.forgotten {
            self.objects.remove(&key);
        }
        for tr in r.ended {
            if let Some(mut obj) = self.objects.remove(&tr.key) {
                if let Some(m) = obj.end(tr.last_seen) {
                    out.push(Output::Event(m));
                }
            }
        }
        for (key, obj) in self.objects.iter_mut() {
            let confirmed = self.tracker.get(*key).is_some_and(|t| t.confirmed);
            let Some(kind) = obj.due(confirmed, &self.required_zones) else {
                continue;
            };
            let snapshot_news = kind == EventType::New
                || obj.published.as_ref().and_then(|p| p.snapshot.as_ref())
                    != obj.state.snapshot.as_ref();
            let m = obj.publish(kind);
            out.push(Output::Event(m));
            if snapshot_news {
                if let Some(jpeg) = &obj.snapshot_jpeg {
                    out.push(Output::Snapshot {
                        stream: self.camera.clone(),
                        label: obj.state.label.clone(),
                        id: obj.state.id.clone(),
                        jpeg: jpeg.clone(),
                    });
                }
            }
        }
        self.publish_counts(out);
    }

    /// Recount announced objects per label, per (zone, label) and `all`; emit what changed.
    fn publish_counts(&mut self, out: &mut Vec<Output>) {
        let mut now: BTreeMap<String, usize> = BTreeMap::new();
        // Every topic published before stays in the map, so it drops to 0 rather than going stale.
        for k in self.counts.keys() {
            now.insert(k.clone(), 0);
        }
        for obj in self.objects.values() {
            if obj.published.is_none() {
                continue;
            }
            let s = &obj.state;
            for label in [s.label.as_str(), "all"] {
                *now.entry(format!("{}/{label}", self.camera)).or_default() += 1;
                for z in &s.current_zones {
                    *now.entry(format!("{z}/{label}")).or_default() += 1;
                }
            }
        }
        // Zones of objects that left: their count topics exist in `now` from `self.counts`.
        for (topic, count) in &now {
            if self.counts.get(topic) != Some(count) {
                out.push(Output::Count {
                    topic: topic.clone(),
                    count: *count,
                });
            }
        }
        self.counts = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_event_rs() {
        use std::time::{Duration, UNIX_EPOCH};
        for ms in [0u64, 951_827_696_789, 1_795_698_935_000, 4_107_542_400_123] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            let s = crate::event::rfc3339(t);
            let back = parse_rfc3339(&s).unwrap();
            assert!((back - ms as f64 / 1000.0).abs() < 1e-6, "{s} -> {back}");
        }
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2026-01-01 00:00:00Z"), None);
    }
}
