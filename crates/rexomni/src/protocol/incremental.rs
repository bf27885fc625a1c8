//! `IncrementalParser`: reads the answer while it is generated, one token id at a time.
//!
//! In: each generated id with its log-probability, on the thread that runs the decode loop. Out:
//! each shape as soon as it is complete — a box at its 4th coordinate, a point at its 2nd (the task
//! fixes the count, `Task::coords_per_shape`); a polygon at the `,` or `<|box_end|>` after its last
//! coordinate (its length is not known before); a keypoint instance when its JSON object closes.
//! `finish()` is the authoritative result and equals the whole-answer parser on the decoded ids
//! (`parse::parse_ids`), scores included.
//!
//! The streamed shapes follow the grammar token by token (rex-omni-spec.md §5.4). On a well-formed
//! answer they are exactly `finish()`'s detections, in order (tested). The official regex can still
//! reject an item AFTER its shapes streamed (e.g. a newline inside the payload, or a 5th coordinate
//! after a box), so a consumer that must match the official parser in every case uses `finish()`.

use super::chat::ids;
use super::detection::{Detection, Geometry, ParsedOutput};
use super::parse::{parse_ids, parse_keypoints_raw, score_from_spans, shape_score, to_detection};
use super::task::Task;
use super::tokenizer::{RexTokenizer, TokenKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for `<|object_ref_start|>`.
    Outside,
    /// Reading the phrase up to `<|object_ref_end|>`.
    Phrase,
    /// Between `<|object_ref_end|>` and `<|box_start|>` (only whitespace allowed).
    Gap,
    /// Reading coordinates up to `<|box_end|>`.
    Payload,
    /// `<|im_end|>` seen: the rest is ignored, as by the official parser.
    Done,
}

/// Streaming parser for one answer. See the module doc.
pub struct IncrementalParser<'t> {
    tokenizer: &'t RexTokenizer,
    task: Task,
    image_w: u32,
    image_h: u32,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    state: State,
    phrase: Vec<u8>,
    gap: Vec<u8>,
    part_bins: Vec<u16>,
    part_logprobs: Vec<f32>,
    part_emitted: bool,
    /// Keypoint task: instances already emitted.
    keypoints_emitted: usize,
}

impl<'t> IncrementalParser<'t> {
    /// A parser for one answer to `task` on a frame of ORIGINAL size `image_w`×`image_h`.
    pub fn new(task: Task, image_w: u32, image_h: u32, tokenizer: &'t RexTokenizer) -> Self {
        IncrementalParser {
            tokenizer,
            task,
            image_w,
            image_h,
            ids: Vec::new(),
            logprobs: Vec::new(),
            state: State::Outside,
            phrase: Vec::new(),
            gap: Vec::new(),
            part_bins: Vec::new(),
            part_logprobs: Vec::new(),
            part_emitted: false,
            keypoints_emitted: 0,
        }
    }

    /// Feeds one generated id and its log-probability (natural log of the probability the model gave
    /// the chosen id). Returns the shapes this id completed.
    pub fn push(&mut self, id: u32, logprob: f32) -> Vec<Detection> {
        self.ids.push(id);
        self.logprobs.push(logprob);
        if self.state == State::Done {
            return Vec::new();
        }
        if id == ids::IM_END {
            self.state = State::Done;
            return Vec::new();
        }
        if self.task == Task::Keypoint {
            return self.push_keypoint(id);
        }
        let mut out = Vec::new();
        let kind = self.tokenizer.kind(id);
        match self.state {
            State::Done => {}
            State::Outside => {
                if id == ids::OBJECT_REF_START {
                    self.start_phrase();
                }
            }
            State::Phrase => match kind {
                // The phrase is `[^<]+`: a '<' anywhere fails the item.
                TokenKind::Bytes(b) if !b.contains(&b'<') => self.phrase.extend_from_slice(b),
                TokenKind::Unknown => {}
                TokenKind::Special(_) if id == ids::OBJECT_REF_START => self.start_phrase(),
                TokenKind::Special(_) if id == ids::OBJECT_REF_END && !self.phrase.is_empty() => {
                    self.gap.clear();
                    self.state = State::Gap;
                }
                _ => self.state = State::Outside,
            },
            State::Gap => match kind {
                TokenKind::Bytes(b) => self.gap.extend_from_slice(b),
                TokenKind::Unknown => {}
                TokenKind::Special(_) if id == ids::OBJECT_REF_START => self.start_phrase(),
                TokenKind::Special(_)
                    if id == ids::BOX_START
                        && String::from_utf8_lossy(&self.gap)
                            .chars()
                            .all(char::is_whitespace) =>
                {
                    self.start_part();
                    self.state = State::Payload;
                }
                _ => self.state = State::Outside,
            },
            State::Payload => match kind {
                TokenKind::Coordinate(k) => {
                    self.part_bins.push(k);
                    self.part_logprobs.push(logprob);
                    if !self.part_emitted
                        && self.task.coords_per_shape() == Some(self.part_bins.len())
                    {
                        out.extend(self.emit_part());
                    }
                }
                TokenKind::Bytes(b) => {
                    for &byte in b {
                        if byte == b',' {
                            out.extend(self.end_part());
                        } else if byte == b'\n' {
                            // `.` stops at a newline: the official regex drops this item.
                            self.state = State::Outside;
                            break;
                        }
                    }
                }
                TokenKind::Special(_) if id == ids::BOX_END => {
                    out.extend(self.end_part());
                    self.state = State::Outside;
                }
                // Anything else is payload text without coordinates (`.*?` takes it).
                TokenKind::Special(_) | TokenKind::Unknown => {}
            },
        }
        out
    }

    fn start_phrase(&mut self) {
        self.phrase.clear();
        self.state = State::Phrase;
    }

    fn start_part(&mut self) {
        self.part_bins.clear();
        self.part_logprobs.clear();
        self.part_emitted = false;
    }

    fn emit_part(&mut self) -> Option<Detection> {
        self.part_emitted = true;
        let geometry = Geometry::from_bins(&self.part_bins, self.image_w, self.image_h)?;
        Some(Detection {
            label: String::from_utf8_lossy(&self.phrase).trim().to_string(),
            geometry,
            score: shape_score(&self.part_logprobs),
        })
    }

    /// A `,` or `<|box_end|>`: the part is over; emit it now if its length was open.
    fn end_part(&mut self) -> Option<Detection> {
        let out = if self.part_emitted {
            None
        } else {
            self.emit_part()
        };
        self.start_part();
        out
    }

    /// Keypoint answers are JSON: when a token closes an instance object (depth 2 → 1), the JSON so
    /// far, closed with `}`, is parsed and the new instances are emitted.
    fn push_keypoint(&mut self, id: u32) -> Vec<Detection> {
        match self.tokenizer.kind(id) {
            TokenKind::Bytes(b) if b.contains(&b'}') => {}
            _ => return Vec::new(),
        }
        let (text, starts) = self.tokenizer.decode_with_offsets(&self.ids);
        let json_start = match text.find("```json") {
            Some(f) => text[f..].find('{').map(|o| f + o),
            None => text.find('{'),
        };
        let Some(json_start) = json_start else {
            return Vec::new();
        };
        let Some(close) = last_closed_instance(&text[json_start..]) else {
            return Vec::new();
        };
        let candidate = format!("{}}}", &text[json_start..json_start + close]);
        let raw = parse_keypoints_raw(&candidate);
        let mut out = Vec::new();
        for shape in raw.shapes.iter().skip(self.keypoints_emitted) {
            let spans: Vec<_> = shape
                .coord_spans
                .iter()
                .map(|s| s.start + json_start..s.end + json_start)
                .collect();
            let score = score_from_spans(&spans, &starts, &self.logprobs);
            out.extend(to_detection(shape, self.image_w, self.image_h, score));
        }
        self.keypoints_emitted = self.keypoints_emitted.max(raw.shapes.len());
        out
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The authoritative result: the whole-answer parser on everything pushed, scores from the
    /// pushed log-probabilities (`parse::parse_ids`).
    pub fn finish(&self) -> ParsedOutput {
        parse_ids(
            self.tokenizer,
            &self.ids,
            Some(&self.logprobs),
            self.task,
            self.image_w,
            self.image_h,
        )
    }
}

/// Byte offset just past the last `}` that closed a depth-2 object in `json` (which starts at its
/// top-level `{`), ignoring braces inside strings.
fn last_closed_instance(json: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut last = None;
    for (i, c) in json.bytes().enumerate() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                if depth == 2 && c == b'}' {
                    last = Some(i + 1);
                }
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
            }
            _ => {}
        }
    }
    last
}
