//! Frame-to-frame association of one stream's detections: which detection of this frame is which
//! object of the previous ones.
//!
//! In: per detector frame, its time and the detections' bounding boxes, labels and scores. Out:
//! which track each detection continued or started, and which tracks ended. Runs on the events
//! thread (never the detector worker); pure state, no I/O.
//!
//! Built for a detector that runs at 0.5–5 fps, where a walking person moves a large part of their
//! own width between two frames, so plain IoU often sees no overlap at all:
//! - **constant-velocity prediction**: each track's centre is moved by its velocity times the time
//!   since it was last seen before it is compared;
//! - **IoU or centre distance**: a pair may match when the predicted box overlaps the detection
//!   (`iou_min`) *or* their centres are within `max_distance` of the frame diagonal; cost is
//!   `(1 - IoU) + distance / gate`, cheapest pairs first (greedy; a handful of objects per label
//!   makes an optimal assignment indistinguishable and not worth a Hungarian solver);
//! - **two stages by score** (ByteTrack, Zhang et al. 2022): detections scoring at least
//!   `high_score` are matched first and may start new tracks; those between `low_score` and
//!   `high_score` may only continue a track left unmatched, with a stricter gate, so a briefly
//!   occluded (low-confidence) person keeps their id instead of ending and starting again;
//! - **min_hits**: a new track is *tentative* until seen in `min_hits` detector frames in a row; a
//!   tentative track missed once is forgotten without a trace (no event);
//! - **max_disappeared_s**: a confirmed track unseen for longer ends.
//!
//! Tracks only ever match detections of the same label (the prompt's phrase). Points and keypoint
//! skeletons match by distance alone, boxes and polygons by IoU and distance (`shape::MatchBy`).
//!
//! Frames the motion gate dropped ([`Tracker::keep_alive`]) prove nothing moved: they refresh every
//! track's clock and stop its predicted motion, and never end a track.

use super::shape::{self, BBox, MatchBy};

/// Association settings (from `[events]`, see `tracking::config`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackerParams {
    pub min_hits: u32,
    pub max_disappeared_s: f64,
    pub high_score: f64,
    pub low_score: f64,
    pub iou_min: f64,
    /// Fraction of the frame diagonal.
    pub max_distance: f64,
}

impl Default for TrackerParams {
    fn default() -> Self {
        Self {
            min_hits: 2,
            max_disappeared_s: 5.0,
            high_score: 0.25,
            low_score: 0.05,
            iou_min: 0.1,
            max_distance: 0.15,
        }
    }
}

/// Second-stage gates (low-score detections may only continue a track that clearly fits):
/// twice the overlap ByteTrack asks of its second stage, half the distance of the first.
const LOW_STAGE_IOU: f64 = 0.5;
const LOW_STAGE_DISTANCE: f64 = 0.5;

/// One detection as the tracker sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub label: String,
    pub bbox: BBox,
    pub by: MatchBy,
    /// Model score; `None` (output parsed without log-probabilities) counts as certain.
    pub score: f64,
}

/// One tracked object's motion state.
#[derive(Debug, Clone, PartialEq)]
pub struct Track {
    /// Tracker-local key, unique for the tracker's life.
    pub key: u64,
    pub label: String,
    /// The last matched detection's bounding box.
    pub bbox: BBox,
    pub by: MatchBy,
    /// Centre velocity in pixels per second.
    pub velocity: [f64; 2],
    /// Time of the first detection (unix seconds).
    pub first_seen: f64,
    /// Time of the last matched detection.
    pub last_seen: f64,
    /// Last time the track was known to be present: a detection or a no-motion frame.
    pub last_alive: f64,
    /// Detector frames matched so far.
    pub hits: u32,
    /// Seen in `min_hits` consecutive frames: the object is real.
    pub confirmed: bool,
}

impl Track {
    /// The box moved by the constant-velocity model to time `t`. The prediction horizon is capped
    /// at `max_dt` so a long-lost track is not flung across the frame.
    pub fn predicted(&self, t: f64, max_dt: f64) -> BBox {
        let dt = (t - self.last_seen).clamp(0.0, max_dt);
        let c = shape::centre(&self.bbox);
        shape::moved_to(
            &self.bbox,
            [c[0] + self.velocity[0] * dt, c[1] + self.velocity[1] * dt],
        )
    }
}

/// What one frame did to the tracks.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FrameResult {
    /// `(track key, detection index)` for every detection that continued or started a track.
    pub matched: Vec<(u64, usize)>,
    /// Confirmed tracks that ended (unseen for more than `max_disappeared_s`).
    pub ended: Vec<Track>,
    /// Tentative tracks forgotten (missed before reaching `min_hits`).
    pub forgotten: Vec<u64>,
}

/// All tracks of one stream (every label).
#[derive(Debug)]
pub struct Tracker {
    params: TrackerParams,
    tracks: Vec<Track>,
    next_key: u64,
}

impl Tracker {
    pub fn new(params: TrackerParams) -> Self {
        Self {
            params,
            tracks: Vec::new(),
            next_key: 0,
        }
    }

    pub fn tracks(&self) -> &[Track] {
        &self.tracks
    }

    pub fn get(&self, key: u64) -> Option<&Track> {
        self.tracks.iter().find(|t| t.key == key)
    }

    /// Associate one detector frame taken at `t` (unix seconds) of a `width`×`height` frame.
    pub fn update(&mut self, t: f64, width: u32, height: u32, dets: &[Observation]) -> FrameResult {
        let p = self.params;
        let diag = (f64::from(width).powi(2) + f64::from(height).powi(2))
            .sqrt()
            .max(1.0);
        let gate = (p.max_distance * diag).max(1e-9);
        let mut det_taken = vec![false; dets.len()];
        let mut track_taken = vec![false; self.tracks.len()];
        let mut result = FrameResult::default();

        // Stage 1: confident detections against every track; stage 2: the rest against what is
        // left, with stricter gates.
        for (stage, (iou_gate, dist_gate)) in
            [(p.iou_min, 1.0), (LOW_STAGE_IOU, LOW_STAGE_DISTANCE)]
                .into_iter()
                .enumerate()
        {
            let mut pairs = Vec::new();
            for (di, d) in dets.iter().enumerate() {
                let high = d.score >= p.high_score;
                let usable = if stage == 0 {
                    high
                } else {
                    !high && d.score >= p.low_score
                };
                if !usable || det_taken[di] {
                    continue;
                }
                for (ti, tr) in self.tracks.iter().enumerate() {
                    if track_taken[ti] || tr.label != d.label {
                        continue;
                    }
                    let pred = tr.predicted(t, p.max_disappeared_s);
                    let dist = shape::distance(shape::centre(&pred), shape::centre(&d.bbox)) / gate;
                    let cost = match d.by {
                        MatchBy::Overlap => {
                            let o = shape::iou(&pred, &d.bbox);
                            if o < iou_gate && dist > dist_gate {
                                continue;
                            }
                            (1.0 - o) + dist
                        }
                        MatchBy::Distance => {
                            if dist > dist_gate {
                                continue;
                            }
                            dist
                        }
                    };
                    pairs.push((cost, ti, di));
                }
            }
            // Cheapest first; ties broken by index so the result does not depend on sort order.
            pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            for (_, ti, di) in pairs {
                if track_taken[ti] || det_taken[di] {
                    continue;
                }
                track_taken[ti] = true;
                det_taken[di] = true;
                let tr = &mut self.tracks[ti];
                let d = &dets[di];
                let dt = t - tr.last_seen;
                if dt > 0.0 {
                    let (c0, c1) = (shape::centre(&tr.bbox), shape::centre(&d.bbox));
                    let v = [(c1[0] - c0[0]) / dt, (c1[1] - c0[1]) / dt];
                    // The first measured velocity is taken as is; later ones are averaged with
                    // the old estimate to damp detector jitter.
                    tr.velocity = if tr.hits <= 1 {
                        v
                    } else {
                        [(tr.velocity[0] + v[0]) / 2.0, (tr.velocity[1] + v[1]) / 2.0]
                    };
                }
                tr.bbox = d.bbox;
                tr.by = d.by;
                tr.last_seen = tr.last_seen.max(t);
                tr.last_alive = tr.last_alive.max(t);
                tr.hits += 1;
                if tr.hits >= p.min_hits {
                    tr.confirmed = true;
                }
                result.matched.push((tr.key, di));
            }
        }

        // Unmatched tracks: tentative ones are forgotten at the first miss, confirmed ones end
        // once unseen for too long.
        let mut keep = Vec::with_capacity(self.tracks.len());
        for (ti, tr) in std::mem::take(&mut self.tracks).into_iter().enumerate() {
            if track_taken[ti] {
                keep.push(tr);
            } else if !tr.confirmed && t > tr.last_alive {
                result.forgotten.push(tr.key);
            } else if tr.confirmed && t - tr.last_alive > p.max_disappeared_s {
                result.ended.push(tr);
            } else {
                keep.push(tr);
            }
        }
        self.tracks = keep;

        // Unmatched confident detections start tentative tracks.
        for (di, d) in dets.iter().enumerate() {
            if det_taken[di] || d.score < p.high_score {
                continue;
            }
            let key = self.next_key;
            self.next_key += 1;
            self.tracks.push(Track {
                key,
                label: d.label.clone(),
                bbox: d.bbox,
                by: d.by,
                velocity: [0.0, 0.0],
                first_seen: t,
                last_seen: t,
                last_alive: t,
                hits: 1,
                confirmed: p.min_hits <= 1,
            });
            result.matched.push((key, di));
        }
        result
    }

    /// A frame at `t` was dropped by the motion gate: nothing moved. Every track is still where it
    /// was: refresh its clock and stop its predicted motion. Never ends a track.
    pub fn keep_alive(&mut self, t: f64) {
        for tr in &mut self.tracks {
            tr.last_alive = tr.last_alive.max(t);
            tr.velocity = [0.0, 0.0];
        }
    }

    /// End every confirmed track not alive since `t - max_disappeared_s` without a frame (the
    /// stream stopped sending frames and no motion gate vouched for them); forget tentative ones.
    pub fn expire(&mut self, t: f64) -> FrameResult {
        let mut result = FrameResult::default();
        let max = self.params.max_disappeared_s;
        let mut keep = Vec::new();
        for tr in std::mem::take(&mut self.tracks) {
            if t - tr.last_alive <= max {
                keep.push(tr);
            } else if tr.confirmed {
                result.ended.push(tr);
            } else {
                result.forgotten.push(tr.key);
            }
        }
        self.tracks = keep;
        result
    }

    /// End every track now (end of a replayed recording).
    pub fn finish(&mut self) -> FrameResult {
        let mut result = FrameResult::default();
        for tr in std::mem::take(&mut self.tracks) {
            if tr.confirmed {
                result.ended.push(tr);
            } else {
                result.forgotten.push(tr.key);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(label: &str, b: BBox, score: f64) -> Observation {
        Observation {
            label: label.into(),
            bbox: b,
            by: MatchBy::Overlap,
            score,
        }
    }

    fn key_of(r: &FrameResult, det: usize) -> u64 {
        r.matched.iter().find(|m| m.1 == det).expect("matched").0
    }

    /// 1 fps, a 100-px-wide person speeding up: 150 px, then 200 px per frame. The gate is 165 px
    /// (0.15 of the 1101 px diagonal), so the first step matches by distance and every later one
    /// only because the velocity prediction closes most of the gap; no two consecutive boxes
    /// overlap at all.
    #[test]
    fn fast_walker_keeps_its_track_through_zero_overlap() {
        let mut tr = Tracker::new(TrackerParams::default());
        let mut keys = Vec::new();
        for (i, x) in [50.0, 200.0, 400.0, 600.0, 800.0].into_iter().enumerate() {
            let r = tr.update(
                i as f64,
                1000,
                460,
                &[det("person", [x, 100.0, x + 100.0, 300.0], 0.9)],
            );
            keys.push(key_of(&r, 0));
            assert!(
                r.ended.is_empty() && r.forgotten.is_empty(),
                "frame {i}: {r:?}"
            );
        }
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        assert_eq!(tr.tracks().len(), 1);
        assert!(tr.tracks()[0].confirmed);
    }

    #[test]
    fn distance_gate_matches_first_moves_then_prediction_takes_over() {
        let mut tr = Tracker::new(TrackerParams::default());
        let mut keys = Vec::new();
        for i in 0..5 {
            let x = 50.0 + 120.0 * f64::from(i);
            let r = tr.update(
                f64::from(i) * 2.0,
                1280,
                720,
                &[det("person", [x, 100.0, x + 80.0, 300.0], 0.9)],
            );
            keys.push(key_of(&r, 0));
        }
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    }

    #[test]
    fn min_hits_and_max_disappeared() {
        let p = TrackerParams {
            min_hits: 3,
            max_disappeared_s: 2.0,
            ..TrackerParams::default()
        };
        let mut tr = Tracker::new(p);
        let b = [100.0, 100.0, 200.0, 200.0];
        tr.update(0.0, 640, 480, &[det("car", b, 0.9)]);
        tr.update(1.0, 640, 480, &[det("car", b, 0.9)]);
        assert!(!tr.tracks()[0].confirmed);
        tr.update(2.0, 640, 480, &[det("car", b, 0.9)]);
        assert!(tr.tracks()[0].confirmed);
        // Missing at 3 and 4 (≤ 2 s): alive. At 4.5: 2.5 s unseen → ended.
        assert!(tr.update(3.0, 640, 480, &[]).ended.is_empty());
        assert!(tr.update(4.0, 640, 480, &[]).ended.is_empty());
        let r = tr.update(4.5, 640, 480, &[]);
        assert_eq!(r.ended.len(), 1);
        assert_eq!(r.ended[0].last_seen, 2.0);
        assert!(tr.tracks().is_empty());
    }

    #[test]
    fn tentative_track_missed_once_is_forgotten() {
        let mut tr = Tracker::new(TrackerParams::default());
        tr.update(0.0, 640, 480, &[det("car", [0.0, 0.0, 50.0, 50.0], 0.9)]);
        let r = tr.update(1.0, 640, 480, &[]);
        assert_eq!(r.forgotten.len(), 1);
        assert!(r.ended.is_empty());
        assert!(tr.tracks().is_empty());
    }

    #[test]
    fn low_score_detection_continues_but_never_starts_a_track() {
        let mut tr = Tracker::new(TrackerParams::default());
        let b = [100.0, 100.0, 200.0, 300.0];
        tr.update(0.0, 640, 480, &[det("person", b, 0.9)]);
        let r = tr.update(1.0, 640, 480, &[det("person", b, 0.9)]);
        let k = key_of(&r, 0);
        // Occluded: score 0.1 (between low and high) still continues the same track...
        let r = tr.update(2.0, 640, 480, &[det("person", b, 0.1)]);
        assert_eq!(key_of(&r, 0), k);
        // ...but a low-score detection elsewhere starts nothing.
        let r = tr.update(
            3.0,
            640,
            480,
            &[
                det("person", b, 0.9),
                det("person", [400.0, 0.0, 450.0, 80.0], 0.1),
            ],
        );
        assert_eq!(r.matched.len(), 1);
        assert_eq!(tr.tracks().len(), 1);
        // Below low_score: ignored altogether.
        let r = tr.update(4.0, 640, 480, &[det("person", b, 0.01)]);
        assert!(r.matched.is_empty());
    }

    #[test]
    fn labels_never_mix_and_points_match_by_distance() {
        let mut tr = Tracker::new(TrackerParams::default());
        let b = [100.0, 100.0, 200.0, 300.0];
        let r = tr.update(0.0, 640, 480, &[det("person", b, 0.9), det("dog", b, 0.9)]);
        assert_ne!(key_of(&r, 0), key_of(&r, 1));
        let pt = |x: f64| Observation {
            label: "cup".into(),
            bbox: [x, 50.0, x, 50.0],
            by: MatchBy::Distance,
            score: 1.0,
        };
        let a = key_of(&tr.update(1.0, 640, 480, &[pt(100.0)]), 0);
        let b2 = key_of(&tr.update(2.0, 640, 480, &[pt(120.0)]), 0);
        assert_eq!(a, b2, "a zero-area point is matched by distance");
    }

    #[test]
    fn keep_alive_never_ends_a_track() {
        let p = TrackerParams {
            max_disappeared_s: 2.0,
            ..TrackerParams::default()
        };
        let mut tr = Tracker::new(p);
        let b = [100.0, 100.0, 200.0, 200.0];
        tr.update(0.0, 640, 480, &[det("car", b, 0.9)]);
        tr.update(1.0, 640, 480, &[det("car", b, 0.9)]);
        for s in 2..100 {
            tr.keep_alive(f64::from(s));
            assert!(tr.expire(f64::from(s)).ended.is_empty());
        }
        // The car is still there when motion resumes: same track.
        let r = tr.update(100.0, 640, 480, &[det("car", b, 0.9)]);
        assert_eq!(r.matched.len(), 1);
        assert_eq!(tr.tracks().len(), 1);
        assert_eq!(tr.tracks()[0].hits, 3);
        // Without keep-alive the clock runs out.
        assert_eq!(tr.expire(103.0).ended.len(), 1);
    }
}
