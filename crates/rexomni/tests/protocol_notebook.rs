//! Golden test: the official notebook answer (rex-omni-spec.md §4.3, cafe.jpg 1440×810) parses to
//! what the official parser computes. Expected values come from an independent Python
//! re-implementation of `parse_standard_prediction` + bins → pixels
//! (tests/reference/gen_parser_expected.py → tests/fixtures/protocol/cafe_expected.json).

use std::path::PathBuf;

use rexomni::protocol::{parse_output, Geometry, IncrementalParser, RexTokenizer, Task, TextPiece};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[derive(Deserialize)]
struct Expected {
    image: Image,
    raw_output: String,
    phrases: Vec<Phrase>,
}
#[derive(Deserialize)]
struct Image {
    width: u32,
    height: u32,
}
#[derive(Deserialize)]
struct Phrase {
    label: String,
    boxes_bins: Vec<Vec<u16>>,
    boxes_px: Vec<Vec<f64>>,
}

fn expected() -> Expected {
    let path = fixtures().join("protocol/cafe_expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Python's `b / 999 * W` and ours are the same IEEE operations; the tolerance only absorbs the
/// fixture's decimal round trip through serde_json's float parser (not always correctly rounded).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

fn boxes_by_label(dets: &[rexomni::protocol::Detection], label: &str) -> Vec<[f64; 4]> {
    dets.iter()
        .filter(|d| d.label == label)
        .map(|d| match &d.geometry {
            Geometry::Box { coords, .. } => *coords,
            other => panic!("{label}: expected a box, got {other:?}"),
        })
        .collect()
}

#[test]
fn notebook_answer_parses_like_the_official_parser() {
    let exp = expected();
    let (w, h) = (exp.image.width, exp.image.height);
    assert_eq!((w, h), (1440, 810));
    let parsed = parse_output(&exp.raw_output, Task::Detection, w, h);
    assert!(!parsed.truncated, "answer ends with <|im_end|>");
    assert_eq!(parsed.phrases.len(), 11);
    assert_eq!(parsed.detections.len(), 30);
    let labels: Vec<&str> = exp.phrases.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(parsed.phrases, labels);
    // The model corrected the prompt's "robot-shope" to "shape".
    assert!(parsed.phrases.iter().any(|p| p == "robot-shape light"));
    for p in &exp.phrases {
        let got = boxes_by_label(&parsed.detections, &p.label);
        assert_eq!(got.len(), p.boxes_px.len(), "{}", p.label);
        for (g, (want, bins)) in got.iter().zip(p.boxes_px.iter().zip(&p.boxes_bins)) {
            for i in 0..4 {
                assert!(
                    close(g[i], want[i]),
                    "{} coord {i}: got {} want {}",
                    p.label,
                    g[i],
                    want[i]
                );
                // And by hand from the bin: x = bin/999*w, y = bin/999*h.
                let size = if i % 2 == 0 { 1440.0 } else { 810.0 };
                assert_eq!(g[i], f64::from(bins[i]) / 999.0 * size);
            }
        }
        assert!(parsed.detections.iter().all(|d| d.score.is_none()));
    }
    // Spot check by hand: the first man box <23><294><106><525>.
    match &parsed.detections[0].geometry {
        Geometry::Box { coords, norm } => {
            assert!(close(coords[0], 33.153153153153156));
            assert!(close(coords[1], 238.3783783783784));
            assert!(close(norm[3], 525.0 / 999.0));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn notebook_answer_with_vllm_spaces_parses_the_same() {
    // vLLM's detokenizer puts a space around every special token (rex-omni-spec.md §4.2).
    let exp = expected();
    let spaced = exp
        .raw_output
        .replace("<|", " <|")
        .replace("|>", "|> ")
        .replace("><", "> <");
    assert_ne!(spaced, exp.raw_output);
    let a = parse_output(&exp.raw_output, Task::Detection, 1440, 810);
    let b = parse_output(&spaced, Task::Detection, 1440, 810);
    assert_eq!(a, b);
}

#[test]
fn notebook_answer_streams_box_by_box() {
    let exp = expected();
    let tok = RexTokenizer::from_dir(&fixtures().join("qwen-tokenizer")).expect("tokenizer");
    // The answer as ids: it is model output, so its special and <k> strings are tokens.
    let ids = tok
        .encode_pieces(&[TextPiece::Template(exp.raw_output.clone())])
        .expect("encode");
    assert_eq!(tok.decode(&ids), exp.raw_output);
    let mut parser = IncrementalParser::new(Task::Detection, 1440, 810, &tok);
    let mut streamed = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let new = parser.push(id, -0.01 * (i % 7) as f32);
        if !new.is_empty() {
            // A box is emitted by the id of its 4th coordinate.
            assert!(rexomni::protocol::coordinate_bin(id).is_some());
            assert_eq!(new.len(), 1);
        }
        streamed.extend(new);
    }
    let done = parser.finish();
    assert_eq!(streamed.len(), 30);
    assert_eq!(streamed, done.detections);
    let mut plain = done.clone();
    plain.detections.iter_mut().for_each(|d| d.score = None);
    assert_eq!(
        plain,
        parse_output(&exp.raw_output, Task::Detection, 1440, 810)
    );
    assert!(done
        .detections
        .iter()
        .all(|d| d.score.is_some_and(|s| s > 0.9 && s <= 1.0)));
}
