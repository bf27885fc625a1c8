//! Whole-answer parsers (rex-omni-spec.md §5.4): the standard grammar and the keypoint JSON.
//!
//! In: the decoded answer text (special tokens kept, `<k>` for coordinates), or ids + log-probs,
//! and the ORIGINAL frame size. Out: `ParsedOutput`. Never fails: a malformed answer yields the
//! detections the official parser would find in it. Runs on whichever thread finishes a generation.
//!
//! Equivalent to `rex_omni/parser.py` except, deliberately: coordinates are ASCII digits (Python's
//! `\d` also takes other Unicode digits), `\s`/strip use Unicode White_Space (Python's `isspace` also
//! counts U+001C..U+001F), and bins above 999 (only possible from text, never from `<k>` ids) are
//! clamped to 999 so that `norm` stays in 0..1.

use std::ops::Range;
use std::sync::OnceLock;

use regex::Regex;

use super::bins::{bin_to_norm, bin_to_pixel, MAX_BIN};
use super::chat::ids;
use super::detection::{box_pixels, Detection, Geometry, Keypoint, ParsedOutput};
use super::task::Task;
use super::tokenizer::RexTokenizer;

const IM_END: &str = "<|im_end|>";
const ENDOFTEXT: &str = "<|endoftext|>";
const BOX_END: &str = "<|box_end|>";

fn item_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // The official pattern verbatim; `.` does not match `\n` (Python default, Rust default too).
    RE.get_or_init(|| {
        Regex::new(r"<\|object_ref_start\|>\s*([^<]+?)\s*<\|object_ref_end\|>\s*<\|box_start\|>(.*?)<\|box_end\|>")
            .expect("static regex")
    })
}

fn coord_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"<([0-9]+)>").expect("static regex"))
}

/// A parsed shape before pixels: its label, bins and where its coordinates are in the text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawShape {
    pub label: String,
    pub shape: RawGeometry,
    /// Byte ranges of the coordinate strings `<k>` this shape was read from (for scores).
    pub coord_spans: Vec<Range<usize>>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawGeometry {
    /// Standard grammar: 2, 4 or an even number > 4 of bins.
    Bins(Vec<u16>),
    /// Keypoint JSON: box bins and (name, point bins if visible).
    Keypoints {
        bbox: [u16; 4],
        points: Vec<(String, Option<[u16; 2]>)>,
    },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct RawParse {
    pub shapes: Vec<RawShape>,
    pub phrases: Vec<String>,
    pub truncated: bool,
}

/// A coordinate string's value as a bin, clamped to 999.
fn bin_value(digits: &str) -> u16 {
    // Any digit string longer than 3 digits (or with a value > 999) clamps.
    digits.parse::<u16>().map_or(MAX_BIN, |v| v.min(MAX_BIN))
}

/// All `<digits>` in `s[range]`: (bin, absolute byte span).
fn coords_in(s: &str, base: usize) -> Vec<(u16, Range<usize>)> {
    coord_regex()
        .captures_iter(s)
        .filter_map(|c| {
            let whole = c.get(0)?;
            let digits = c.get(1)?;
            Some((
                bin_value(digits.as_str()),
                base + whole.start()..base + whole.end(),
            ))
        })
        .collect()
}

/// The answer was cut before its end token.
fn is_truncated(text: &str) -> bool {
    !text.contains(IM_END) && !text.contains(ENDOFTEXT)
}

/// `parse_standard_prediction` (rex-omni-spec.md §5.4) with coordinate spans.
pub(crate) fn parse_standard_raw(text: &str) -> RawParse {
    let truncated = is_truncated(text);
    // 1. Everything after the first <|im_end|> is ignored; a cut last item gets its <|box_end|>.
    let head = text.split(IM_END).next().unwrap_or("");
    let mut body = head.to_string();
    if !body.ends_with(BOX_END) {
        body.push_str(BOX_END);
    }
    let mut out = RawParse {
        truncated,
        ..RawParse::default()
    };
    // 2. findall of the item pattern: leftmost-first, non-overlapping, as Python's re.findall.
    for caps in item_regex().captures_iter(&body) {
        let (Some(phrase), Some(payload)) = (caps.get(1), caps.get(2)) else {
            continue;
        };
        let label = phrase.as_str().trim().to_string();
        if !out.phrases.contains(&label) {
            // `None` payloads still create the key: the phrase is answered, with nothing.
            out.phrases.push(label.clone());
        }
        // 3. Shapes are separated by ","; each part is classified by its coordinate count.
        let mut offset = payload.start();
        for part in payload.as_str().split(',') {
            let coords = coords_in(part, offset);
            offset += part.len() + 1;
            let n = coords.len();
            if n == 2 || n == 4 || (n > 4 && n % 2 == 0) {
                let (bins, coord_spans) = coords.into_iter().unzip();
                out.shapes.push(RawShape {
                    label: label.clone(),
                    shape: RawGeometry::Bins(bins),
                    coord_spans,
                });
            }
        }
    }
    out
}

/// The JSON document of a keypoint answer: the first ```json fenced block, else the first `{` to
/// the last `}` (rex-omni-spec.md §5.4). Returns its byte range in `text`.
fn keypoint_json_span(text: &str) -> Option<Range<usize>> {
    const FENCE: &str = "```json";
    if let Some(start) = text.find(FENCE) {
        let body_start = start + FENCE.len();
        if let Some(len) = text[body_start..].find("```") {
            let inner = &text[body_start..body_start + len];
            // Python's .strip(); an all-whitespace body is an empty range, not start > end.
            let lead = inner.len() - inner.trim_start().len();
            let start = body_start + lead;
            return Some(start..start + inner.trim().len());
        }
    }
    let open = text.find('{')?;
    let close = text.rfind('}')?;
    (close > open).then_some(open..close + 1)
}

/// Top-level members of a JSON object, in document order, as (key, value byte range). `doc` must
/// already be valid JSON. Duplicate keys keep the first position and the last value, as Python's
/// dict does.
fn object_members(doc: &str) -> Option<Vec<(String, Range<usize>)>> {
    let b = doc.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\n' | b'\r') {
            *i += 1;
        }
    };
    // End (exclusive) of the string starting at `i` (a '"').
    let string_end = |mut i: usize| -> usize {
        i += 1;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 2,
                b'"' => return i + 1,
                _ => i += 1,
            }
        }
        b.len()
    };
    skip_ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut members: Vec<(String, Range<usize>)> = Vec::new();
    loop {
        skip_ws(&mut i);
        match b.get(i) {
            Some(b'}') | None => break,
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(b'"') => {}
            Some(_) => return None,
        }
        let key_end = string_end(i);
        let key: String = serde_json::from_str(&doc[i..key_end]).ok()?;
        i = key_end;
        skip_ws(&mut i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        let start = i;
        let mut depth = 0usize;
        while i < b.len() {
            match b[i] {
                b'"' => {
                    i = string_end(i);
                    if depth == 0 {
                        break;
                    }
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth == 0 => break,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                b',' if depth == 0 => break,
                _ => {}
            }
            i += 1;
        }
        let span = start..i;
        match members.iter_mut().find(|(k, _)| *k == key) {
            Some(m) => m.1 = span,
            None => members.push((key, span)),
        }
    }
    Some(members)
}

/// `parse_keypoint_prediction` (rex-omni-spec.md §5.4) with coordinate spans.
pub(crate) fn parse_keypoints_raw(text: &str) -> RawParse {
    let mut out = RawParse {
        truncated: is_truncated(text),
        ..RawParse::default()
    };
    let Some(span) = keypoint_json_span(text) else {
        return out;
    };
    let doc = &text[span.clone()];
    // json.loads must accept the whole document, else the official parser returns nothing.
    if serde_json::from_str::<serde::de::IgnoredAny>(doc).is_err() {
        return out;
    }
    let Some(members) = object_members(doc) else {
        return out;
    };
    for (key, value_span) in members {
        let value_text = &doc[value_span.clone()];
        let Ok(serde_json::Value::Object(instance)) =
            serde_json::from_str::<serde_json::Value>(value_text)
        else {
            continue;
        };
        let Some(serde_json::Value::String(bbox)) = instance.get("bbox") else {
            continue;
        };
        let bbox_bins: Vec<u16> = coords_in(bbox, 0).into_iter().map(|(b, _)| b).collect();
        let Ok(bbox) = <[u16; 4]>::try_from(bbox_bins) else {
            continue;
        };
        let Some(serde_json::Value::Object(kps)) = instance.get("keypoints") else {
            continue;
        };
        // serde_json's Map is sorted by key; the document order comes from the scanner.
        let names = kp_offset(value_text)
            .and_then(|o| object_members(&value_text[o..]))
            .map(|m| m.into_iter().map(|(k, _)| k).collect::<Vec<_>>())
            .unwrap_or_else(|| kps.keys().cloned().collect());
        let points = names
            .into_iter()
            .filter_map(|name| {
                let v = kps.get(&name)?;
                let point = match v {
                    serde_json::Value::String(s) => {
                        let c: Vec<u16> = coords_in(s, 0).into_iter().map(|(b, _)| b).collect();
                        <[u16; 2]>::try_from(c).ok()
                    }
                    // Anything but a 2-coordinate string, "unvisible" included, is not visible.
                    _ => None,
                };
                Some((name, point))
            })
            .collect();
        let label = {
            let n = key
                .bytes()
                .take_while(|c| c.is_ascii_alphabetic() || *c == b'_')
                .count();
            if n == 0 {
                key.clone()
            } else {
                key[..n].to_string()
            }
        };
        if !out.phrases.contains(&label) {
            out.phrases.push(label.clone());
        }
        let base = span.start + value_span.start;
        let coord_spans = coords_in(value_text, base)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        out.shapes.push(RawShape {
            label,
            shape: RawGeometry::Keypoints { bbox, points },
            coord_spans,
        });
    }
    out
}

/// Offset of the `"keypoints"` member's value inside an instance object's text.
fn kp_offset(instance: &str) -> Option<usize> {
    let members = object_members(instance)?;
    members
        .into_iter()
        .find(|(k, _)| k == "keypoints")
        .map(|(_, r)| r.start)
}

/// Parses per task: the keypoint task answers JSON, every other task the standard grammar.
pub(crate) fn parse_raw(text: &str, task: Task) -> RawParse {
    match task {
        Task::Keypoint => parse_keypoints_raw(text),
        _ => parse_standard_raw(text),
    }
}

/// Raw shape → `Detection` in pixels of the original frame.
pub(crate) fn to_detection(
    raw: &RawShape,
    image_w: u32,
    image_h: u32,
    score: Option<f32>,
) -> Option<Detection> {
    let geometry = match &raw.shape {
        RawGeometry::Bins(bins) => Geometry::from_bins(bins, image_w, image_h)?,
        RawGeometry::Keypoints { bbox, points } => Geometry::Keypoints {
            coords: box_pixels(bbox, image_w, image_h),
            norm: bbox.map(bin_to_norm),
            points: points
                .iter()
                .map(|(name, p)| Keypoint {
                    name: name.clone(),
                    visible: p.is_some(),
                    coords: p.map(|[x, y]| [bin_to_pixel(x, image_w), bin_to_pixel(y, image_h)]),
                    norm: p.map(|[x, y]| [bin_to_norm(x), bin_to_norm(y)]),
                })
                .collect(),
        },
    };
    Some(Detection {
        label: raw.label.clone(),
        geometry,
        score,
    })
}

/// Parses a whole answer. `image_w`/`image_h` are the ORIGINAL frame size. Scores are `None`: text
/// carries no probabilities (use `parse_ids` with log-probs for scores).
pub fn parse_output(text: &str, task: Task, image_w: u32, image_h: u32) -> ParsedOutput {
    let raw = parse_raw(text, task);
    ParsedOutput {
        detections: raw
            .shapes
            .iter()
            .filter_map(|s| to_detection(s, image_w, image_h, None))
            .collect(),
        truncated: raw.truncated,
        phrases: raw.phrases,
    }
}

/// Detection score from token probabilities: `exp(mean(logprob))` over the shape's coordinate
/// tokens, i.e. the geometric mean of their probabilities (1.0 = every coordinate was certain). The
/// phrase tokens are left out: they are shared by all shapes of a phrase and say nothing about this
/// shape's place. `None` for no tokens.
pub fn shape_score(logprobs: &[f32]) -> Option<f32> {
    if logprobs.is_empty() {
        return None;
    }
    let sum: f64 = logprobs.iter().map(|&l| f64::from(l)).sum();
    Some((sum / logprobs.len() as f64).exp() as f32)
}

/// Parses generated ids (as `parse_output(&tok.decode(ids), ..)`), with scores from `logprobs`
/// (one per id, natural log; `None` → scores are `None`). A shape's score uses the tokens whose text
/// overlaps its coordinate strings.
pub fn parse_ids(
    tokenizer: &RexTokenizer,
    ids: &[u32],
    logprobs: Option<&[f32]>,
    task: Task,
    image_w: u32,
    image_h: u32,
) -> ParsedOutput {
    let (text, starts) = tokenizer.decode_with_offsets(ids);
    let raw = parse_raw(&text, task);
    let detections = raw
        .shapes
        .iter()
        .filter_map(|shape| {
            let score = logprobs.and_then(|lp| score_from_spans(&shape.coord_spans, &starts, lp));
            to_detection(shape, image_w, image_h, score)
        })
        .collect();
    ParsedOutput {
        detections,
        truncated: raw.truncated,
        phrases: raw.phrases,
    }
}

/// `shape_score` over the tokens whose text (`starts[i]..starts[i + 1]`, from
/// `RexTokenizer::decode_with_offsets`) overlaps one of `spans`.
pub(crate) fn score_from_spans(
    spans: &[Range<usize>],
    starts: &[usize],
    logprobs: &[f32],
) -> Option<f32> {
    let mut picked = Vec::new();
    for (i, lp) in logprobs
        .iter()
        .enumerate()
        .take(starts.len().saturating_sub(1))
    {
        let (a, b) = (starts[i], starts[i + 1]);
        if a < b && spans.iter().any(|s| a < s.end && s.start < b) {
            picked.push(*lp);
        }
    }
    shape_score(&picked)
}

/// Whether an id ends generation (rex-omni-spec.md §5.5: `<|im_end|>` or `<|endoftext|>`).
pub fn is_stop_id(id: u32) -> bool {
    id == ids::IM_END || id == ids::ENDOFTEXT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bins_of(p: &RawParse) -> Vec<(String, Vec<u16>)> {
        p.shapes
            .iter()
            .map(|s| match &s.shape {
                RawGeometry::Bins(b) => (s.label.clone(), b.clone()),
                RawGeometry::Keypoints { bbox, .. } => (s.label.clone(), bbox.to_vec()),
            })
            .collect()
    }

    #[test]
    fn standard_grammar_cases() {
        let t = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>None<|box_end|>, \
                 <|object_ref_start|>dog<|object_ref_end|><|box_start|><1><2><3><4>,<5><6>,<1><2><3>,<1><2><3><4><5><6><|box_end|>, \
                 <|object_ref_start|>dog<|object_ref_end|><|box_start|><7><8><|box_end|><|im_end|>junk";
        let p = parse_standard_raw(t);
        assert_eq!(p.phrases, ["cat", "dog"]);
        assert!(!p.truncated);
        assert_eq!(
            bins_of(&p),
            [
                ("dog".into(), vec![1, 2, 3, 4]),
                ("dog".into(), vec![5, 6]),
                ("dog".into(), vec![1, 2, 3, 4, 5, 6]),
                ("dog".into(), vec![7, 8]),
            ]
        );
        // Coordinate spans point at the `<k>` strings.
        assert_eq!(&t[p.shapes[1].coord_spans[0].clone()], "<5>");
    }

    #[test]
    fn vllm_spaces_and_truncation() {
        let t = " <|object_ref_start|> text line <|object_ref_end|> <|box_start|> <44> <3> <500> <20> , <1> <2> <|box_end|> , <|object_ref_start|> b <|object_ref_end|> <|box_start|> <9> <9> <9>";
        let p = parse_standard_raw(t);
        assert!(p.truncated);
        assert_eq!(
            bins_of(&p),
            [
                ("text line".into(), vec![44, 3, 500, 20]),
                ("text line".into(), vec![1, 2])
            ]
        );
        assert_eq!(p.phrases, ["text line", "b"]);
        // A newline inside a payload breaks that item, as `.` does not match newlines.
        let p = parse_standard_raw(
            "<|object_ref_start|>a<|object_ref_end|><|box_start|><1>\n<2><|box_end|>",
        );
        assert!(p.shapes.is_empty());
        // Huge bins clamp.
        let p = parse_standard_raw("<|object_ref_start|>a<|object_ref_end|><|box_start|><1234><99999999999999999999><|box_end|>");
        assert_eq!(bins_of(&p), [("a".into(), vec![999, 999])]);
    }

    /// Found by proptest: a fence whose body is only whitespace made a reversed slice range.
    #[test]
    fn whitespace_only_json_fence_is_empty_not_a_panic() {
        let out = parse_output("```json\n \n```", Task::Keypoint, 100, 100);
        assert!(out.detections.is_empty());
    }

    #[test]
    fn keypoint_json() {
        let t = "```json\n{\"person1\": {\"bbox\": \"<1><36><987><984>\", \"keypoints\": {\"nose\": \"<540><351>\", \"right eye\": \"unvisible\", \"left eye\": \"<5>\"}}, \"person2\": {\"bbox\": \"<1><2><3>\", \"keypoints\": {}}, \"cat_3\": {\"bbox\": \"<1><2><3><4>\", \"keypoints\": {}}}\n```<|im_end|>";
        let p = parse_keypoints_raw(t);
        assert_eq!(p.phrases, ["person", "cat_"]);
        assert_eq!(p.shapes.len(), 2);
        match &p.shapes[0].shape {
            RawGeometry::Keypoints { bbox, points } => {
                assert_eq!(bbox, &[1, 36, 987, 984]);
                assert_eq!(
                    points,
                    &[
                        ("nose".to_string(), Some([540, 351])),
                        ("right eye".to_string(), None),
                        ("left eye".to_string(), None)
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.shapes[0].coord_spans.len(), 7);
        assert_eq!(&t[p.shapes[0].coord_spans[4].clone()], "<540>");
        // No fence: first { to last }.
        let p = parse_keypoints_raw(
            "x {\"a1\": {\"bbox\": \"<1><2><3><4>\", \"keypoints\": {\"n\": \"<1><1>\"}}} y",
        );
        assert_eq!(p.shapes.len(), 1);
        // Invalid JSON: nothing.
        assert!(parse_keypoints_raw("{\"a1\": {\"bbox\": ")
            .shapes
            .is_empty());
    }

    #[test]
    fn score_is_geometric_mean_probability() {
        assert_eq!(shape_score(&[]), None);
        let s = shape_score(&[0.5f32.ln(), 0.5f32.ln()]).unwrap();
        assert!((s - 0.5).abs() < 1e-6);
    }
}
