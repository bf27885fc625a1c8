//! Replay acceptance (issue 13): a scripted walk through two zones gives exactly one `new`,
//! `update`s whose `entered_zones` become [A, B], one `end` with `end_time`, one id throughout; and
//! a property test over random detection sequences: per id exactly one `new` first, at most one
//! `end` last, nothing after `end`.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::PathBuf;

use proptest::prelude::*;
use rexomni::protocol::{Detection, Geometry};
use rexstream::config::Pipeline;
use rexstream::tracking::replay::replay;
use rexstream::tracking::stream::{FrameObservation, Output, StreamEvents};
use rexstream::tracking::{EventMessage, EventType, EventsConfig};

const PIPELINE: &str = r#"
[[streams]]
name = "yard"
uri = "rtsp://127.0.0.1:1/cam"
categories = ["person"]

[[streams.zones]]
name = "A"
polygon = [[0.0, 0.5], [0.5, 0.5], [0.5, 1.0], [0.0, 1.0]]

[[streams.zones]]
name = "B"
polygon = [[0.5, 0.5], [1.0, 0.5], [1.0, 1.0], [0.5, 1.0]]
objects = ["person"]

[events]
db = ""
"#;

fn pipeline(text: &str, tag: &str) -> Pipeline {
    let dir = std::env::temp_dir().join(format!("rexstream-events-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file: PathBuf = dir.join("pipeline.toml");
    std::fs::write(&file, text).unwrap();
    Pipeline::load(&file).unwrap_or_else(|e| panic!("{e}"))
}

fn rfc3339(t: f64) -> String {
    rexstream::event::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(t))
}

/// A detections document as the JSON-lines sink writes it (the fields replay reads, plus a few).
fn doc_line(t: f64, boxes: &[[f64; 4]]) -> String {
    let dets: Vec<serde_json::Value> = boxes
        .iter()
        .map(|b| {
            serde_json::json!({
                "label": "person",
                "geometry": {"type": "box", "coords": b, "norm": [b[0] / 1280.0, b[1] / 720.0, b[2] / 1280.0, b[3] / 720.0]},
                "score": 0.9
            })
        })
        .collect();
    serde_json::json!({
        "schema": "rexstream.detections/v1",
        "stream": "yard",
        "seq": (t * 10.0) as u64,
        "frame": {"pts_ns": null, "captured_at": rfc3339(t), "width": 1280, "height": 720},
        "task": "detection",
        "model": "test",
        "detections": dets,
    })
    .to_string()
}

fn events(outputs: &[Output]) -> Vec<EventMessage> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Event(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn scripted_walk_through_two_zones() {
    let p = pipeline(PIPELINE, "walk");
    // 1 fps from t0; a 100×300 person with feet at y = 650 (0.9 of the frame) walks right at
    // 150 px/s from x = 100 (zone A), crosses x = 640 (into B) and leaves the frame; then 8 empty
    // frames (the camera keeps running) until max_disappeared_s (5 s) has passed.
    let t0 = 1_800_000_000.25;
    let mut lines = Vec::new();
    let mut last_seen = 0.0;
    let mut t = t0;
    let mut x = 100.0;
    while x + 100.0 <= 1280.0 {
        lines.push(doc_line(t, &[[x, 350.0, x + 100.0, 650.0]]));
        last_seen = t;
        x += 150.0;
        t += 1.0;
    }
    for _ in 0..8 {
        lines.push(doc_line(t, &[]));
        t += 1.0;
    }
    let text = lines.join("\n");
    let mut outputs = Vec::new();
    replay(&p, Cursor::new(text), "walk.jsonl", &mut |o| {
        outputs.push(o.clone());
        Ok(())
    })
    .unwrap();
    let ev = events(&outputs);
    let kinds: Vec<EventType> = ev.iter().map(|m| m.kind).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == EventType::New).count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == EventType::End).count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(kinds.first(), Some(&EventType::New));
    assert_eq!(kinds.last(), Some(&EventType::End));
    let id = &ev[0].after.id;
    assert!(ev.iter().all(|m| &m.after.id == id && &m.before.id == id));
    // new: confirmed at the second frame, in A.
    assert_eq!(ev[0].after.start_time, t0);
    assert_eq!(ev[0].after.frame_time, t0 + 1.0);
    assert_eq!(ev[0].after.entered_zones, ["A"]);
    assert_eq!(ev[0].after.current_zones, ["A"]);
    assert_eq!(ev[0].after.end_time, None);
    // updates: entered zones grow to [A, B]; never more updates than frames with a change.
    let updates: Vec<&EventMessage> = ev.iter().filter(|m| m.kind == EventType::Update).collect();
    assert!(!updates.is_empty());
    let entered: Vec<Vec<String>> = updates
        .iter()
        .map(|m| m.after.entered_zones.clone())
        .collect();
    assert_eq!(entered.last().unwrap(), &["A", "B"], "{entered:?}");
    assert!(updates
        .iter()
        .any(|m| m.before.entered_zones == ["A"] && m.after.entered_zones == ["A", "B"]));
    assert!(
        updates.len() <= 2,
        "update only on meaningful change, got {}: {kinds:?}",
        updates.len()
    );
    // end: end_time is the last time the person was seen.
    let end = ev.last().unwrap();
    assert_eq!(end.after.end_time, Some(last_seen));
    assert_eq!(end.after.entered_zones, ["A", "B"]);
    assert_eq!(end.before.end_time, None);
    // Counts: yard/person and the zones went 1 and back to 0.
    let counts: Vec<(String, usize)> = outputs
        .iter()
        .filter_map(|o| match o {
            Output::Count { topic, count } => Some((topic.clone(), *count)),
            _ => None,
        })
        .collect();
    for topic in ["yard/person", "A/person", "B/person", "yard/all"] {
        let seq: Vec<usize> = counts
            .iter()
            .filter(|c| c.0 == topic)
            .map(|c| c.1)
            .collect();
        assert_eq!(seq, [1, 0], "{topic}: {counts:?}");
    }
}

#[test]
fn required_zones_hold_back_new_until_entered() {
    let text = PIPELINE.replace(
        "categories = [\"person\"]\n",
        "categories = [\"person\"]\nrequired_zones = [\"B\"]\n",
    );
    let p = pipeline(&text, "required");
    let mut lines = Vec::new();
    let mut x = 100.0;
    let mut t = 1_800_000_000.0;
    while x + 100.0 <= 1280.0 {
        lines.push(doc_line(t, &[[x, 350.0, x + 100.0, 650.0]]));
        x += 150.0;
        t += 1.0;
    }
    let mut ev = Vec::new();
    replay(&p, Cursor::new(lines.join("\n")), "walk.jsonl", &mut |o| {
        if let Output::Event(m) = o {
            ev.push(m.clone());
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(ev[0].kind, EventType::New);
    // First announced when it entered B (frame 4: x = 700), carrying A in its history.
    assert_eq!(ev[0].after.entered_zones, ["A", "B"]);
    assert_eq!(ev.last().unwrap().kind, EventType::End);
}

#[test]
fn bad_lines_are_named_by_file_and_line() {
    let p = pipeline(PIPELINE, "bad");
    let text = format!("{}\n{{\"stream\": \"yard\"}}\n", doc_line(1.0, &[]));
    let e = replay(&p, Cursor::new(text), "rec.jsonl", &mut |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("rec.jsonl:2: missing field `frame`"), "{e}");
    let other = doc_line(1.0, &[]).replace("\"yard\"", "\"gate\"");
    let e = replay(&p, Cursor::new(other), "rec.jsonl", &mut |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rec.jsonl:1: stream \"gate\" is not in"), "{e}");
}

/// One step of a random detection sequence.
#[derive(Debug, Clone)]
enum Step {
    /// A detector frame `dt` seconds after the previous step, with (label, x, y, size, score).
    Frame(f64, Vec<(u8, f64, f64, f64, Option<f32>)>),
    NoMotion(f64),
    Tick(f64),
}

fn step() -> impl Strategy<Value = Step> {
    let det = (
        0u8..3,
        0.0..1200.0f64,
        0.0..650.0f64,
        5.0..300.0f64,
        prop::option::of(0.0f32..1.0),
    );
    prop_oneof![
        6 => (0.05..4.0f64, prop::collection::vec(det, 0..5)).prop_map(|(dt, d)| Step::Frame(dt, d)),
        1 => (0.05..4.0f64).prop_map(Step::NoMotion),
        1 => (0.05..8.0f64).prop_map(Step::Tick),
    ]
}

fn run_steps(steps: &[Step], cfg: &EventsConfig, required: bool) -> Vec<EventMessage> {
    let zones: Vec<rexstream::tracking::zones::ZoneConfig> =
        toml::from_str::<toml::Table>(PIPELINE).unwrap()["streams"][0]["zones"]
            .clone()
            .try_into()
            .unwrap();
    // With a required zone (or a score threshold) some confirmed objects are never announced:
    // they must end without a message.
    let required = if required {
        vec!["B".to_string()]
    } else {
        vec![]
    };
    let mut s = StreamEvents::new("yard", cfg, zones, required);
    let mut out = Vec::new();
    let mut t = 1_800_000_000.0;
    for st in steps {
        match st {
            Step::Frame(dt, dets) => {
                t += dt;
                let f = FrameObservation {
                    stream: "yard".into(),
                    frame_time: t,
                    width: 1280,
                    height: 720,
                    model: "m".into(),
                    detections: dets
                        .iter()
                        .map(|&(l, x, y, size, score)| Detection {
                            label: ["person", "car", "a/b"][l as usize].to_string(),
                            geometry: if l == 2 {
                                Geometry::Point {
                                    coords: [x, y],
                                    norm: [x / 1280.0, y / 720.0],
                                }
                            } else {
                                Geometry::Box {
                                    coords: [x, y, x + size, y + size],
                                    norm: [0.0; 4],
                                }
                            },
                            score,
                        })
                        .collect(),
                };
                out.extend(s.on_frame(&f, None));
            }
            Step::NoMotion(dt) => {
                t += dt;
                out.extend(s.no_motion(t));
            }
            Step::Tick(silent) => {
                // Wall-clock silence since the last frame; frame time does not move.
                out.extend(s.tick(*silent));
            }
        }
    }
    out.extend(s.finish());
    events(&out)
}

fn check_lifecycles(ev: &[EventMessage]) -> Result<(), TestCaseError> {
    let mut state: HashMap<&str, (usize, bool)> = HashMap::new(); // id → (messages, ended)
    for m in ev {
        prop_assert_eq!(&m.before.id, &m.after.id);
        let e = state.entry(&m.after.id).or_insert((0, false));
        prop_assert!(!e.1, "message after end for {}", m.after.id);
        match m.kind {
            EventType::New => prop_assert_eq!(e.0, 0, "new is not first for {}", &m.after.id),
            EventType::Update | EventType::End => prop_assert!(e.0 > 0, "{:?} before new", m.kind),
        }
        if m.kind == EventType::End {
            prop_assert!(m.after.end_time.is_some());
            e.1 = true;
        } else {
            prop_assert!(m.after.end_time.is_none());
        }
        e.0 += 1;
        // Every message serializes (what the sinks publish).
        prop_assert!(serde_json::to_vec(m).is_ok());
    }
    // finish() ends everything: every announced object got exactly one end.
    for (id, (_, ended)) in state {
        prop_assert!(ended, "{} never ended", id);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn every_id_has_one_new_first_and_at_most_one_end_last(
        steps in prop::collection::vec(step(), 0..60),
        min_hits in 1u32..4,
        max_dis in 0.5..10.0f64,
        required in any::<bool>(),
        threshold in prop_oneof![Just(0.0), Just(0.5)],
    ) {
        let cfg = EventsConfig {
            min_hits: std::num::NonZeroU32::new(min_hits).unwrap(),
            max_disappeared_s: max_dis,
            stationary_after_s: 3.0,
            threshold,
            ..EventsConfig::default()
        };
        let ev = run_steps(&steps, &cfg, required);
        check_lifecycles(&ev)?;
    }
}
