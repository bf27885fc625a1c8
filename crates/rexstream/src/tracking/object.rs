//! One tracked object's life and the event payload that describes it.
//!
//! In: the detections the tracker assigned to this object, frame by frame. Out: an
//! [`ObjectState`] — the `before`/`after` of `<prefix>/events` messages — and the decision whether
//! this frame changed something worth an `update`. Runs on the events thread.
//!
//! Field names and meanings follow Frigate's tracked-object dictionary (frigate/track/
//! tracked_object.py, read to learn the meanings), so automations written for `frigate/events` work:
//! `score` is this frame's score, `top_score` the best median of the last 10 frame scores (a missed
//! frame counts 0), `false_positive` stays true until that median reaches `threshold` and is then
//! never true again, `stationary` is `not active`, `motionless_count` counts detector frames without
//! movement, `position_changes` counts how often a stationary object moved off again, `region` is the
//! part of the frame the detector looked at (the whole frame: Rex-Omni sees every frame whole),
//! `box`/`area`/`region` are integer pixels, times are unix seconds. Ours: `geometry` (the shape
//! exactly as the detections document has it), `phrase` (the model's phrase for it), `model`.

use std::collections::{BTreeMap, VecDeque};

use rexomni::protocol::Geometry;
use serde::{Deserialize, Serialize};

use super::shape::{self, BBox, MatchBy};
use super::zones::{ZoneConfig, ZoneState};

/// Scores kept for the median (Frigate keeps 10).
const SCORE_HISTORY: usize = 10;
/// A box overlapping where the object stopped by at least this much has not moved.
const STATIONARY_IOU: f64 = 0.6;
/// A point (or skeleton) within this fraction of the frame diagonal has not moved.
const STATIONARY_DISTANCE: f64 = 0.02;
/// An update is sent at least this often while an object lives (Frigate: once a minute), so a
/// consumer that missed one learns the current state.
const HEARTBEAT_S: f64 = 60.0;
/// A snapshot is replaced when the new frame's score is higher by this much (Frigate's 5 %), or
/// at least as high with a box this much larger.
const BETTER_SCORE: f64 = 0.05;
const BETTER_AREA: f64 = 1.2;

/// The best frame of an object (Frigate's `snapshot` dictionary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub frame_time: f64,
    #[serde(rename = "box")]
    pub bbox: [i64; 4],
    pub area: i64,
    pub region: [i64; 4],
    pub score: f64,
    pub attributes: Vec<serde_json::Value>,
}

/// The state of one tracked object: `before` and `after` of an event message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectState {
    /// `"<start unix>.<micros>-<6 random chars>"`, like Frigate's.
    pub id: String,
    /// The stream.
    pub camera: String,
    /// Time of the frame this state describes (unix seconds).
    pub frame_time: f64,
    /// Best frame so far.
    pub snapshot: Option<SnapshotInfo>,
    /// The model's phrase, made usable as an MQTT topic level (`/`, `+`, `#` become `_`).
    pub label: String,
    /// Always null: Rex-Omni has no sub-classifier (kept for Frigate consumers).
    pub sub_label: Option<(String, f64)>,
    pub top_score: f64,
    pub false_positive: bool,
    pub start_time: f64,
    /// Null while the object is tracked; the last time it was seen once it ended.
    pub end_time: Option<f64>,
    pub score: f64,
    #[serde(rename = "box")]
    pub bbox: [i64; 4],
    pub area: i64,
    /// Box width / height.
    pub ratio: f64,
    pub region: [i64; 4],
    pub active: bool,
    pub stationary: bool,
    pub motionless_count: u32,
    pub position_changes: u32,
    pub current_zones: Vec<String>,
    pub entered_zones: Vec<String>,
    /// Always false: rexstream records no video.
    pub has_clip: bool,
    pub has_snapshot: bool,
    /// Always empty: no attribute model (Frigate: face, license plate...).
    pub attributes: BTreeMap<String, f64>,
    pub current_attributes: Vec<serde_json::Value>,
    pub pending_loitering: bool,
    /// Ours: the detection's shape, as in the detections document.
    pub geometry: Geometry,
    /// Ours: the phrase exactly as the model answered it.
    pub phrase: String,
    /// Ours: the model that saw it.
    pub model: String,
}

/// `new` / `update` / `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    New,
    Update,
    End,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::New => "new",
            EventType::Update => "update",
            EventType::End => "end",
        }
    }
}

/// One message on `<prefix>/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub before: ObjectState,
    pub after: ObjectState,
}

/// The object-level settings (from `[events]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectParams {
    pub stationary_after_s: f64,
    pub threshold: f64,
}

/// `/`, `+`, `#` and NUL cannot be in an MQTT topic level.
pub fn topic_label(phrase: &str) -> String {
    let s: String = phrase
        .chars()
        .map(|c| {
            if matches!(c, '/' | '+' | '#' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect();
    if s.is_empty() {
        "_".to_string()
    } else {
        s
    }
}

/// A new id: `<start unix>.<micros>-<6 chars of [a-z0-9]>` (Frigate's shape). The random part
/// comes from the OS-seeded generator, so a restarted process never repeats an id even for the
/// same start time.
pub fn new_id(start_time: f64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let micros = (start_time.max(0.0) * 1e6).round() as u64;
    let tail: String = (0..6)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect();
    format!("{}.{:06}-{tail}", micros / 1_000_000, micros % 1_000_000)
}

fn ipx(b: &BBox) -> [i64; 4] {
    [
        b[0].round() as i64,
        b[1].round() as i64,
        b[2].round() as i64,
        b[3].round() as i64,
    ]
}

/// What [`TrackedObject::observe`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// This frame is the object's best so far (take its snapshot).
    pub better_snapshot: bool,
}

/// One object, from its first detection to its end.
#[derive(Debug, Clone)]
pub struct TrackedObject {
    pub state: ObjectState,
    scores: VecDeque<f64>,
    /// Where the object stopped (or last moved to).
    anchor: BBox,
    by: MatchBy,
    motionless_since: f64,
    zones: ZoneState,
    best: Option<(f64, f64)>,
    /// The last state sent (`after` of the last event); `None` before `new`.
    pub published: Option<ObjectState>,
    /// A better snapshot was taken since the last event.
    snapshot_changed: bool,
    /// JPEG of the best frame, when frames are available.
    pub snapshot_jpeg: Option<std::sync::Arc<Vec<u8>>>,
}

impl TrackedObject {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        camera: &str,
        model: &str,
        g: &Geometry,
        phrase: &str,
        score: f64,
        t: f64,
        w: u32,
        h: u32,
    ) -> Self {
        let b = shape::bbox(g);
        let region = [0, 0, i64::from(w), i64::from(h)];
        let state = ObjectState {
            id: new_id(t),
            camera: camera.to_string(),
            frame_time: t,
            snapshot: None,
            label: topic_label(phrase),
            sub_label: None,
            top_score: 0.0,
            false_positive: true,
            start_time: t,
            end_time: None,
            score,
            bbox: ipx(&b),
            area: shape::area(&b).round() as i64,
            ratio: 0.0,
            region,
            active: true,
            stationary: false,
            motionless_count: 0,
            position_changes: 0,
            current_zones: vec![],
            entered_zones: vec![],
            has_clip: false,
            has_snapshot: false,
            attributes: BTreeMap::new(),
            current_attributes: vec![],
            pending_loitering: false,
            geometry: g.clone(),
            phrase: phrase.to_string(),
            model: model.to_string(),
        };
        Self {
            state,
            scores: VecDeque::new(),
            anchor: b,
            by: shape::match_by(g),
            motionless_since: t,
            zones: ZoneState::default(),
            best: None,
            published: None,
            snapshot_changed: false,
            snapshot_jpeg: None,
        }
    }

    fn push_score(&mut self, s: f64, p: &ObjectParams) {
        self.scores.push_back(s);
        while self.scores.len() > SCORE_HISTORY {
            self.scores.pop_front();
        }
        let mut v: Vec<f64> = self.scores.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        self.state.top_score = self.state.top_score.max(median);
        // Once a true positive, always a true positive.
        if self.state.false_positive && median >= p.threshold {
            self.state.false_positive = false;
        }
    }

    /// This frame's detection of the object.
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &mut self,
        g: &Geometry,
        score: f64,
        t: f64,
        w: u32,
        h: u32,
        zones: &[ZoneConfig],
        p: &ObjectParams,
    ) -> Observed {
        let b = shape::bbox(g);
        let diag = (f64::from(w).powi(2) + f64::from(h).powi(2))
            .sqrt()
            .max(1.0);
        let still = match self.by {
            MatchBy::Overlap => shape::iou(&b, &self.anchor) >= STATIONARY_IOU,
            MatchBy::Distance => {
                shape::distance(shape::centre(&b), shape::centre(&self.anchor))
                    <= STATIONARY_DISTANCE * diag
            }
        };
        let s = &mut self.state;
        if t > s.start_time {
            if still {
                s.motionless_count += 1;
            } else {
                if s.stationary {
                    s.position_changes += 1;
                }
                s.motionless_count = 0;
                self.anchor = b;
                self.motionless_since = t;
            }
        }
        s.frame_time = t;
        s.score = score;
        s.bbox = ipx(&b);
        s.area = shape::area(&b).round() as i64;
        let bh = b[3] - b[1];
        s.ratio = if bh > 0.0 { (b[2] - b[0]) / bh } else { 0.0 };
        s.region = [0, 0, i64::from(w), i64::from(h)];
        s.geometry = g.clone();
        self.update_stationary(t, p);
        self.push_score(score, p);
        self.zones
            .update(zones, &self.state.label, shape::reference_point(g, w, h), t);
        self.state.current_zones = self.zones.current.clone();
        self.state.entered_zones = self.zones.entered.clone();
        self.state.pending_loitering = self.zones.pending_loitering;

        let area = shape::area(&b);
        let better = !self.state.false_positive
            && match self.best {
                None => true,
                Some((bs, ba)) => {
                    score > bs + BETTER_SCORE || (score >= bs && area > ba * BETTER_AREA)
                }
            };
        if better {
            self.best = Some((score, area));
            self.state.snapshot = Some(SnapshotInfo {
                frame_time: t,
                bbox: self.state.bbox,
                area: self.state.area,
                region: self.state.region,
                score,
                attributes: vec![],
            });
            self.snapshot_changed = true;
        }
        Observed {
            better_snapshot: better,
        }
    }

    /// A detector frame at `t` in which the tracker kept the object but did not see it.
    pub fn missed(&mut self, p: &ObjectParams) {
        self.push_score(0.0, p);
    }

    /// A frame at `t` the motion gate dropped: nothing moved, the object stood still.
    pub fn no_motion(&mut self, t: f64, p: &ObjectParams) {
        if t > self.state.frame_time {
            self.state.motionless_count += 1;
            self.state.frame_time = t;
            self.update_stationary(t, p);
        }
    }

    fn update_stationary(&mut self, t: f64, p: &ObjectParams) {
        let s = &mut self.state;
        s.stationary = s.motionless_count > 0 && t - self.motionless_since >= p.stationary_after_s;
        s.active = !s.stationary;
    }

    /// Should an event go out now? `new` once the object is real (`confirmed`, not a false
    /// positive, in a required zone if any are required); afterwards `update` only on a meaningful
    /// change: zones, stationary/active, a position change, a better snapshot, or the heartbeat.
    pub fn due(&self, confirmed: bool, required_zones: &[String]) -> Option<EventType> {
        let s = &self.state;
        match &self.published {
            None => {
                let zone_ok = required_zones.is_empty()
                    || s.entered_zones.iter().any(|z| required_zones.contains(z));
                (confirmed && !s.false_positive && zone_ok).then_some(EventType::New)
            }
            Some(prev) => {
                let changed = prev.current_zones != s.current_zones
                    || prev.entered_zones != s.entered_zones
                    || prev.stationary != s.stationary
                    || prev.position_changes != s.position_changes
                    || prev.has_snapshot != s.has_snapshot
                    || self.snapshot_changed
                    || s.frame_time - prev.frame_time >= HEARTBEAT_S;
                changed.then_some(EventType::Update)
            }
        }
    }

    /// Build the message for `kind` and remember it as published.
    pub fn publish(&mut self, kind: EventType) -> EventMessage {
        let after = self.state.clone();
        let before = self
            .published
            .replace(after.clone())
            .unwrap_or_else(|| after.clone());
        self.snapshot_changed = false;
        EventMessage {
            kind,
            before,
            after,
        }
    }

    /// The object ended (unseen too long): the `end` message, if it was ever announced.
    pub fn end(&mut self, last_seen: f64) -> Option<EventMessage> {
        self.published.as_ref()?;
        self.state.end_time = Some(last_seen);
        self.state.frame_time = self.state.frame_time.max(last_seen);
        self.state.active = false;
        self.state.current_zones.clear();
        Some(self.publish(EventType::End))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_frigates_and_differ() {
        let a = new_id(1_700_000_000.123456);
        let re_ok = |s: &str| {
            let (t, r) = s.split_once('-').unwrap();
            let (secs, micros) = t.split_once('.').unwrap();
            secs == "1700000000"
                && micros == "123456"
                && r.len() == 6
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        assert!(re_ok(&a), "{a}");
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| new_id(1_700_000_000.123456)).collect();
        assert_eq!(ids.len(), 1000);
        assert_eq!(topic_label("a/b+c#"), "a_b_c_");
    }
}
