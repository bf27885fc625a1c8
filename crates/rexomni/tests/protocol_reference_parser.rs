//! Differential test against an independent Python re-implementation of the official parsers
//! (tests/reference/gen_parser_expected.py → tests/fixtures/protocol/parser_cases.json): 600
//! grammar-shaped, mutated and random standard answers and 150 keypoint answers, parsed by Python's
//! `re`/`json` once and committed. Our parser must give the same phrase → shapes mapping for every
//! one (bins compared exactly; phrase order = the official dict's key order).

use std::path::PathBuf;

use rexomni::protocol::{parse_output, Detection, Geometry, ParsedOutput, Task};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Cases {
    standard: Vec<Case>,
    keypoint: Vec<Case>,
}
#[derive(Deserialize)]
struct Case {
    text: String,
    /// [[label, [shape, ...]], ...] in the official dict's order.
    parsed: Vec<(String, Vec<Value>)>,
}

fn cases() -> Cases {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/protocol/parser_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bin(norm: f64) -> u16 {
    (norm * 999.0).round() as u16
}

fn shape_json(d: &Detection) -> Value {
    match &d.geometry {
        Geometry::Box { norm, .. } => serde_json::json!(norm.map(bin)),
        Geometry::Point { norm, .. } => serde_json::json!(norm.map(bin)),
        Geometry::Polygon { norm, .. } => {
            serde_json::json!(norm.iter().map(|&n| bin(n)).collect::<Vec<_>>())
        }
        Geometry::Keypoints { norm, points, .. } => serde_json::json!({
            "bbox": norm.map(bin),
            "points": points.iter().map(|p| match p.norm {
                Some(n) => serde_json::json!([p.name, n.map(bin)]),
                None => serde_json::json!([p.name, "unvisible"]),
            }).collect::<Vec<_>>(),
        }),
    }
}

/// Our result in the official parser's shape: phrase → shapes, phrases in first-appearance order.
fn as_official(p: &ParsedOutput) -> Vec<(String, Vec<Value>)> {
    p.phrases
        .iter()
        .map(|ph| {
            let shapes = p
                .detections
                .iter()
                .filter(|d| &d.label == ph)
                .map(shape_json)
                .collect();
            (ph.clone(), shapes)
        })
        .collect()
}

#[test]
fn standard_parser_matches_python_reference() {
    let cases = cases().standard;
    assert_eq!(cases.len(), 600);
    let shapes: usize = cases
        .iter()
        .flat_map(|c| &c.parsed)
        .map(|(_, s)| s.len())
        .sum();
    assert!(
        shapes > 1000,
        "the fixture exercises many shapes ({shapes})"
    );
    for (i, c) in cases.iter().enumerate() {
        let got = as_official(&parse_output(&c.text, Task::Detection, 640, 480));
        assert_eq!(got, c.parsed, "case {i}: {:?}", c.text);
    }
}

#[test]
fn keypoint_parser_matches_python_reference() {
    let cases = cases().keypoint;
    assert_eq!(cases.len(), 150);
    assert!(cases.iter().filter(|c| !c.parsed.is_empty()).count() > 50);
    for (i, c) in cases.iter().enumerate() {
        let got = as_official(&parse_output(&c.text, Task::Keypoint, 640, 480));
        assert_eq!(got, c.parsed, "case {i}: {:?}", c.text);
    }
}
