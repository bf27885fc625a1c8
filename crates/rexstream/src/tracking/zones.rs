//! Zones: named polygons of a stream's frame, and which zones each tracked object is in.
//!
//! In: `[[streams.zones]]` and `required_zones` of the pipeline file (checked on the main thread
//! before anything starts); per detector frame, an object's reference point. Out: the object's
//! `current_zones` and `entered_zones` (Frigate's meanings). Runs on the events thread.
//!
//! Rules, as Frigate 0.14+ documents them:
//! - polygons are in 0..1 of the frame (resolution-independent);
//! - an object is in a zone when the **bottom centre** of its box is inside or on the edge of the
//!   polygon (a point geometry: the point itself), not when the box merely overlaps it;
//! - `objects` limits a zone to some labels;
//! - `inertia`: detector frames in a row inside before the object counts as in the zone (a box
//!   jittering across the edge does not flap); once reached, the object counts at once whenever it
//!   is back inside;
//! - `loitering_time`: seconds of uninterrupted presence before the zone counts (0 = at once);
//!   while waiting the object is `pending_loitering`.

use serde::Deserialize;

use super::shape;
use crate::config::FieldErrors;
// Zone names follow the stream-name rule: one MQTT topic level, a plain label value.
use crate::ingest::config::valid_name;

/// One `[[streams.zones]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Zone name: used in events (`current_zones`, `entered_zones`) and in the retained count topic
    /// `<prefix>/<zone>/<label>`, so it must be one MQTT topic level and differ from every stream
    /// name.
    pub name: String,
    /// Corners `[[x, y], ...]` in 0..1 of the frame (x to the right, y down), at least 3.
    pub polygon: Vec<[f64; 2]>,
    /// Only these labels can be in the zone; empty = every label.
    #[serde(default)]
    pub objects: Vec<String>,
    /// Detector frames in a row inside before the object counts as in the zone.
    #[serde(default = "default_inertia")]
    pub inertia: u32,
    /// Seconds of uninterrupted presence before the zone counts (0 = at once).
    #[serde(default)]
    pub loitering_time: f64,
}

const fn default_inertia() -> u32 {
    // Frigate's default is 3 frames at 5 fps; at our 0.5–5 fps one confirming frame is already a
    // long time, so 1 (count at the first frame inside) is the default and 2+ an explicit choice.
    1
}

/// Longest accepted loitering time (one day): larger is a typo.
const MAX_LOITERING_S: f64 = 86_400.0;

/// Check a stream's zones and required zones, pushing `streams[i].zones[j].field` errors.
/// `stream_names` are every stream of the file (a zone may not share a stream's name: both are the
/// first level of a count topic).
pub fn validate(
    zones: &[ZoneConfig],
    required: &[String],
    index: usize,
    stream_names: &[&str],
    errs: &mut FieldErrors,
) {
    for (j, z) in zones.iter().enumerate() {
        let at = |f: &str| format!("streams[{index}].zones[{j}].{f}");
        if !valid_name(&z.name) {
            errs.push(
                at("name"),
                format!(
                    "{:?} is not a valid zone name (1-64 of A-Z a-z 0-9 - _ .; it becomes an MQTT topic level)",
                    z.name
                ),
            );
        } else if stream_names.contains(&z.name.as_str()) {
            errs.push(
                at("name"),
                format!(
                    "{:?} is also a stream name; zone and stream names share the count topics <prefix>/<name>/<label>",
                    z.name
                ),
            );
        }
        if let Some(k) = zones[..j].iter().position(|o| o.name == z.name) {
            errs.push(
                at("name"),
                format!(
                    "{:?} is already used by streams[{index}].zones[{k}]",
                    z.name
                ),
            );
        }
        if z.polygon.len() < 3 {
            errs.push(
                at("polygon"),
                format!(
                    "{:?} has {} corners; a zone needs at least 3",
                    z.polygon,
                    z.polygon.len()
                ),
            );
        }
        for (k, p) in z.polygon.iter().enumerate() {
            if !p.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)) {
                errs.push(
                    format!("streams[{index}].zones[{j}].polygon[{k}]"),
                    format!("{p:?} is not in 0..1 (corners are fractions of the frame width and height)"),
                );
            }
        }
        if z.polygon.len() >= 3 && polygon_area(&z.polygon).abs() < 1e-12 {
            errs.push(at("polygon"), format!("{:?} has no area", z.polygon));
        }
        if z.inertia == 0 {
            errs.push(at("inertia"), "0 is not >= 1".to_string());
        }
        if !(z.loitering_time.is_finite() && z.loitering_time >= 0.0) {
            errs.push(
                at("loitering_time"),
                format!("{} is not >= 0", z.loitering_time),
            );
        } else if z.loitering_time > MAX_LOITERING_S {
            errs.push(
                at("loitering_time"),
                format!(
                    "{} is more than {MAX_LOITERING_S} (one day)",
                    z.loitering_time
                ),
            );
        }
        for (k, o) in z.objects.iter().enumerate() {
            if o.trim().is_empty() {
                errs.push(
                    format!("streams[{index}].zones[{j}].objects[{k}]"),
                    "is empty".to_string(),
                );
            }
        }
    }
    for (k, r) in required.iter().enumerate() {
        if !zones.iter().any(|z| &z.name == r) {
            errs.push(
                format!("streams[{index}].required_zones[{k}]"),
                format!("{r:?} is not a zone of this stream"),
            );
        }
    }
}

/// Shoelace area (signed).
fn polygon_area(p: &[[f64; 2]]) -> f64 {
    let n = p.len();
    (0..n)
        .map(|i| {
            let (a, b) = (p[i], p[(i + 1) % n]);
            a[0] * b[1] - b[0] * a[1]
        })
        .sum::<f64>()
        / 2.0
}

/// Per object and zone: how long it has been inside.
#[derive(Debug, Clone, Default, PartialEq)]
struct Presence {
    /// Consecutive detector frames inside, until `inertia` is reached.
    frames: u32,
    /// `inertia` was reached once; from then on the object counts as soon as it is inside.
    latched: bool,
    /// Start of the current uninterrupted stay (for `loitering_time`).
    since: Option<f64>,
}

/// Zone membership of one tracked object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZoneState {
    presence: Vec<Presence>,
    /// Zones the object is in now, in config order.
    pub current: Vec<String>,
    /// Zones the object has been in, in the order entered.
    pub entered: Vec<String>,
    /// Inside a zone with `loitering_time`, waiting for it to pass.
    pub pending_loitering: bool,
}

impl ZoneState {
    /// Update with the object's reference point `p` (0..1) at detector frame time `t`.
    pub fn update(&mut self, zones: &[ZoneConfig], label: &str, p: [f64; 2], t: f64) {
        self.presence.resize(zones.len(), Presence::default());
        self.current.clear();
        self.pending_loitering = false;
        for (z, pr) in zones.iter().zip(self.presence.iter_mut()) {
            if !z.objects.is_empty() && !z.objects.iter().any(|o| o == label) {
                continue;
            }
            if !shape::in_polygon(p, &z.polygon) {
                pr.frames = 0;
                pr.since = None;
                continue;
            }
            pr.frames = pr.frames.saturating_add(1);
            if pr.frames >= z.inertia {
                pr.latched = true;
            }
            if !pr.latched {
                continue;
            }
            let since = *pr.since.get_or_insert(t);
            if t - since >= z.loitering_time {
                self.current.push(z.name.clone());
                if !self.entered.contains(&z.name) {
                    self.entered.push(z.name.clone());
                }
            } else {
                self.pending_loitering = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &str, poly: &[[f64; 2]]) -> ZoneConfig {
        ZoneConfig {
            name: name.into(),
            polygon: poly.to_vec(),
            objects: vec![],
            inertia: 1,
            loitering_time: 0.0,
        }
    }

    const LEFT: [[f64; 2]; 4] = [[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]];
    const RIGHT: [[f64; 2]; 4] = [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]];

    #[test]
    fn inertia_objects_and_loitering() {
        let mut a = zone("a", &LEFT);
        a.inertia = 2;
        let mut b = zone("b", &RIGHT);
        b.objects = vec!["car".into()];
        let mut c = zone("c", &RIGHT);
        c.loitering_time = 3.0;
        let zones = [a, b, c];
        let mut s = ZoneState::default();
        s.update(&zones, "person", [0.2, 0.9], 0.0);
        assert!(s.current.is_empty(), "inertia 2: not yet");
        s.update(&zones, "person", [0.2, 0.9], 1.0);
        assert_eq!(s.current, ["a"]);
        // Into the right half: b is for cars only; c needs 3 s.
        s.update(&zones, "person", [0.8, 0.9], 2.0);
        assert!(s.current.is_empty());
        assert!(s.pending_loitering);
        s.update(&zones, "person", [0.8, 0.9], 4.0);
        assert!(s.current.is_empty());
        s.update(&zones, "person", [0.8, 0.9], 5.0);
        assert_eq!(s.current, ["c"]);
        assert_eq!(s.entered, ["a", "c"]);
        // Back into a: latched, counts at once.
        s.update(&zones, "person", [0.2, 0.9], 6.0);
        assert_eq!(s.current, ["a"]);
    }

    fn check(toml_zones: &str, required: &[&str]) -> Vec<String> {
        #[derive(Deserialize)]
        struct W {
            zones: Vec<ZoneConfig>,
        }
        let w: W = toml::from_str(toml_zones).unwrap();
        let mut errs = FieldErrors::default();
        let required: Vec<String> = required.iter().map(|s| s.to_string()).collect();
        validate(&w.zones, &required, 2, &["door", "yard"], &mut errs);
        errs.iter().map(|(f, m)| format!("{f}: {m}")).collect()
    }

    #[test]
    fn validation_names_field_and_value() {
        let e = check(
            "[[zones]]\nname = \"yard\"\npolygon = [[0.0, 0.0], [1.5, 0.0], [1.0, 1.0]]\ninertia = 0\n\
             [[zones]]\nname = \"a b\"\npolygon = [[0.0, 0.0], [1.0, 0.0]]\nloitering_time = -1\n",
            &["drive"],
        );
        assert_eq!(
            e,
            [
                "streams[2].zones[0].name: \"yard\" is also a stream name; zone and stream names share the count topics <prefix>/<name>/<label>",
                "streams[2].zones[0].polygon[1]: [1.5, 0.0] is not in 0..1 (corners are fractions of the frame width and height)",
                "streams[2].zones[0].inertia: 0 is not >= 1",
                "streams[2].zones[1].name: \"a b\" is not a valid zone name (1-64 of A-Z a-z 0-9 - _ .; it becomes an MQTT topic level)",
                "streams[2].zones[1].polygon: [[0.0, 0.0], [1.0, 0.0]] has 2 corners; a zone needs at least 3",
                "streams[2].zones[1].loitering_time: -1 is not >= 0",
                "streams[2].required_zones[0]: \"drive\" is not a zone of this stream",
            ]
        );
        assert!(check(
            "[[zones]]\nname = \"drive\"\npolygon = [[0.0, 0.5], [0.5, 0.5], [0.5, 1.0], [0.0, 1.0]]\nobjects = [\"car\"]\n",
            &["drive"]
        )
        .is_empty());
    }
}
