//! `[events]` and `[homeassistant]` sections of the pipeline file: tracker settings, snapshots, the
//! event store, Home Assistant discovery. Parsed and checked on the main thread before anything
//! starts; read by the events thread.
//!
//! Events are on when the file has an `[events]` section (an empty one takes every default).

use std::num::NonZeroU32;
use std::path::PathBuf;

use serde::Deserialize;

use super::tracker::TrackerParams;
use crate::config::FieldErrors;

/// `[events]`: from per-frame detections to tracked objects and new/update/end events.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Detector frames in a row an object must be seen in before it counts (and `new` is sent).
    #[serde(default = "default_min_hits")]
    pub min_hits: NonZeroU32,
    /// Seconds an object may go unseen before its event ends (`end`). Frames dropped by the motion
    /// gate do not count: nothing moved, so the object is still there.
    #[serde(default = "default_max_disappeared_s")]
    pub max_disappeared_s: f64,
    /// Detections scoring at least this start tracks and are matched first (ByteTrack's high
    /// threshold). A detection without a score (parsed without log-probabilities) counts as 1.
    #[serde(default = "default_high_score")]
    pub high_score: f64,
    /// Detections scoring between this and `high_score` may only continue an existing track;
    /// below it they are ignored.
    #[serde(default = "default_low_score")]
    pub low_score: f64,
    /// Least IoU between a track's predicted box and a detection for them to match (either this or
    /// `max_distance` suffices).
    #[serde(default = "default_iou_min")]
    pub iou_min: f64,
    /// Largest distance between a track's predicted centre and a detection's centre, as a fraction
    /// of the frame diagonal. Points and keypoints match by this alone.
    #[serde(default = "default_max_distance")]
    pub max_distance: f64,
    /// Seconds an object must stay put (box IoU ≥ 0.6 with where it stopped) before it is
    /// `stationary`.
    #[serde(default = "default_stationary_after_s")]
    pub stationary_after_s: f64,
    /// Frigate's `threshold`: an object whose median score over its last 10 frames stays below
    /// this is a `false_positive` and gets no event. Rex-Omni's scores are token probabilities, not
    /// calibrated confidences, hence 0 (off) by default.
    #[serde(default)]
    pub threshold: f64,
    /// Keep a JPEG of each object's best frame (retained on `<prefix>/<stream>/<label>/snapshot`,
    /// in the store, over HTTP).
    #[serde(default = "default_snapshots")]
    pub snapshots: bool,
    /// SQLite file of the event store; relative paths are resolved against the pipeline file's
    /// folder; `""` turns the store off.
    #[serde(default = "default_db")]
    pub db: String,
    /// Events (and their snapshots) older than this many days are deleted.
    #[serde(default = "default_retention_days")]
    pub retention_days: f64,
    /// Name of the environment variable holding the bearer token that `/api/events` requires when
    /// `[metrics] listen` is not a loopback address (snapshots show people's homes).
    #[serde(default)]
    pub api_token_env: Option<String>,
}

const fn default_min_hits() -> NonZeroU32 {
    NonZeroU32::new(2).expect("2 > 0")
}
const fn default_max_disappeared_s() -> f64 {
    // Frigate's max_disappeared is 5 s worth of frames; at 0.5 fps that is still 2 frames.
    5.0
}
const fn default_high_score() -> f64 {
    0.25
}
const fn default_low_score() -> f64 {
    0.05
}
const fn default_iou_min() -> f64 {
    0.1
}
const fn default_max_distance() -> f64 {
    0.15
}
const fn default_stationary_after_s() -> f64 {
    // Frigate: 50 frames at 5 fps.
    10.0
}
const fn default_snapshots() -> bool {
    true
}
fn default_db() -> String {
    "rexstream-data/events.db".to_string()
}
const fn default_retention_days() -> f64 {
    10.0
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            min_hits: default_min_hits(),
            max_disappeared_s: default_max_disappeared_s(),
            high_score: default_high_score(),
            low_score: default_low_score(),
            iou_min: default_iou_min(),
            max_distance: default_max_distance(),
            stationary_after_s: default_stationary_after_s(),
            threshold: 0.0,
            snapshots: default_snapshots(),
            db: default_db(),
            retention_days: default_retention_days(),
            api_token_env: None,
        }
    }
}

/// One year: upper bound of every duration (see ingest::config `MAX_SECONDS`).
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

impl EventsConfig {
    pub fn validate(&self, errs: &mut FieldErrors) {
        let positive = |errs: &mut FieldErrors, field: &str, v: f64| {
            if !(v.is_finite() && v > 0.0) {
                errs.push(format!("events.{field}"), format!("{v} is not > 0"));
            } else if v > MAX_SECONDS {
                errs.push(
                    format!("events.{field}"),
                    format!("{v} is more than {MAX_SECONDS} (one year)"),
                );
            }
        };
        positive(errs, "max_disappeared_s", self.max_disappeared_s);
        positive(errs, "stationary_after_s", self.stationary_after_s);
        positive(errs, "max_distance", self.max_distance);
        if !(self.retention_days.is_finite()
            && self.retention_days > 0.0
            && self.retention_days <= 36_500.0)
        {
            errs.push(
                "events.retention_days",
                format!("{} is not in (0, 36500]", self.retention_days),
            );
        }
        for (field, v) in [
            ("high_score", self.high_score),
            ("low_score", self.low_score),
            ("iou_min", self.iou_min),
            ("threshold", self.threshold),
        ] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                errs.push(format!("events.{field}"), format!("{v} is not in 0..1"));
            }
        }
        if self.low_score > self.high_score {
            errs.push(
                "events.low_score",
                format!(
                    "{} is more than high_score = {}",
                    self.low_score, self.high_score
                ),
            );
        }
    }

    pub fn tracker_params(&self) -> TrackerParams {
        TrackerParams {
            min_hits: self.min_hits.get(),
            max_disappeared_s: self.max_disappeared_s,
            high_score: self.high_score,
            low_score: self.low_score,
            iou_min: self.iou_min,
            max_distance: self.max_distance,
        }
    }

    /// The store's file, resolved against the pipeline file's folder; `None` when turned off.
    pub fn db_path(&self, base: &std::path::Path) -> Option<PathBuf> {
        if self.db.is_empty() {
            return None;
        }
        let p = std::path::Path::new(&self.db);
        Some(if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        })
    }
}

/// `[homeassistant]`: Home Assistant MQTT discovery (opt-in).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantConfig {
    /// Publish discovery configs (retained) so Home Assistant creates the entities by itself.
    #[serde(default)]
    pub discovery: bool,
    /// Home Assistant's discovery prefix (its `discovery_prefix` setting).
    #[serde(default = "default_discovery_prefix")]
    pub prefix: String,
}

fn default_discovery_prefix() -> String {
    "homeassistant".to_string()
}

impl HomeAssistantConfig {
    pub fn validate(&self, errs: &mut FieldErrors) {
        if self.prefix.is_empty()
            || self.prefix.contains(['+', '#', '\0'])
            || self.prefix.ends_with('/')
        {
            errs.push(
                "homeassistant.prefix",
                format!("{:?} is not a usable MQTT topic prefix", self.prefix),
            );
        }
    }
}

/// The pipeline-wide checks of issue 13: `[events]`, `[homeassistant]`, every stream's zones
/// (zone names unique across streams too: they share the count topics `<prefix>/<zone>/<label>`).
pub fn validate_pipeline(p: &crate::config::PipelineConfig, errs: &mut FieldErrors) {
    if let Some(e) = &p.events {
        e.validate(errs);
    }
    if let Some(h) = &p.homeassistant {
        h.validate(errs);
        if h.discovery && p.events.is_none() {
            errs.push(
                "homeassistant.discovery",
                "true needs an [events] section (the entities show tracked objects)".to_string(),
            );
        }
    }
    let names: Vec<&str> = p.streams.iter().map(|s| s.name.as_str()).collect();
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, s) in p.streams.iter().enumerate() {
        super::zones::validate(&s.zones, &s.required_zones, i, &names, errs);
        for (j, z) in s.zones.iter().enumerate() {
            match seen.get(z.name.as_str()) {
                Some(&k) if k != i => errs.push(
                    format!("streams[{i}].zones[{j}].name"),
                    format!("{:?} is already a zone of streams[{k}]; zone names must be unique across streams", z.name),
                ),
                _ => {
                    seen.insert(z.name.as_str(), i);
                }
            }
        }
        if (!s.zones.is_empty() || !s.required_zones.is_empty()) && p.events.is_none() {
            errs.push(
                format!("streams[{i}].zones"),
                "zones are used by events; add an [events] section to turn them on".to_string(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_takes_defaults_and_bad_values_are_named() {
        let c: EventsConfig = toml::from_str("").unwrap();
        assert_eq!(c, EventsConfig::default());
        let mut errs = FieldErrors::default();
        c.validate(&mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        let c: EventsConfig =
            toml::from_str("max_disappeared_s = 0\nhigh_score = 0.2\nlow_score = 0.3\niou_min = 2")
                .unwrap();
        let mut errs = FieldErrors::default();
        c.validate(&mut errs);
        let got: Vec<String> = errs.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        assert_eq!(
            got,
            [
                "events.max_disappeared_s: 0 is not > 0",
                "events.iou_min: 2 is not in 0..1",
                "events.low_score: 0.3 is more than high_score = 0.2",
            ]
        );
        assert!(toml::from_str::<EventsConfig>("min_hits = 0").is_err());
    }
}
