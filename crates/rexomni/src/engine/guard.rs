//! Runaway guard (IDEA-Research/Rex-Omni#178): on cluttered frames Rex-Omni can repeat boxes until
//! `max_new_tokens`. A row stops when it completes the same shape for the same phrase a second time, or more
//! than `max_objects` shapes.
//!
//! In: each generated id, in order, on the decode thread. Out: `Some((reason, keep))` when the row must stop:
//! the answer is cut to its first `keep` ids, which drops the offending shape and its separator, so the parsed
//! detections are exactly the shapes before it. Reads the object/box grammar at the token level (rex-omni-spec.md
//! §5.4): a shape is a run of coordinate ids inside `<|box_start|>…<|box_end|>`, complete at the next
//! non-coordinate id; the phrase is the ids between `<|object_ref_start|>` and `<|object_ref_end|>`. Keypoint
//! answers (JSON, no phrase tokens) are not guarded; `max_new_tokens` still bounds them.

use std::collections::HashSet;

use crate::protocol::coordinate_bin;
use crate::protocol::ids::{BOX_END, BOX_START, OBJECT_REF_END, OBJECT_REF_START};

/// Why a row stopped (`rexstream_decode_stops_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// `<|im_end|>` or `<|endoftext|>`.
    Eos,
    /// The token budget ran out.
    MaxNewTokens,
    /// A shape repeated for the same phrase (runaway guard).
    Repeat,
    /// More than `max_objects` shapes (runaway guard).
    MaxObjects,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxNewTokens => "max_new_tokens",
            StopReason::Repeat => "repeat",
            StopReason::MaxObjects => "max_objects",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Outside,
    Phrase,
    Gap,
    Payload,
}

/// Per-row guard state.
#[derive(Debug, Clone)]
pub struct Guard {
    max_objects: usize,
    state: State,
    phrase: Vec<u32>,
    shape: Vec<u16>,
    shapes: usize,
    seen: HashSet<(Vec<u32>, Vec<u16>)>,
    /// Ids to keep if the shape being read has to go: up to the end of the previous shape of this payload,
    /// or up to `<|box_start|>`.
    keep: usize,
}

impl Guard {
    pub fn new(max_objects: usize) -> Self {
        Self {
            max_objects,
            state: State::Outside,
            phrase: Vec::new(),
            shape: Vec::new(),
            shapes: 0,
            seen: HashSet::new(),
            keep: 0,
        }
    }

    /// Feed the id at index `index` of the answer.
    pub fn push(&mut self, id: u32, index: usize) -> Option<(StopReason, usize)> {
        match self.state {
            State::Outside | State::Gap if id == OBJECT_REF_START => {
                self.phrase.clear();
                self.state = State::Phrase;
            }
            State::Outside => {}
            State::Phrase if id == OBJECT_REF_END => self.state = State::Gap,
            State::Phrase if id == OBJECT_REF_START => self.phrase.clear(),
            State::Phrase => self.phrase.push(id),
            State::Gap if id == BOX_START => {
                self.state = State::Payload;
                self.shape.clear();
                self.keep = index + 1;
            }
            State::Gap => {}
            State::Payload => {
                if let Some(bin) = coordinate_bin(id) {
                    self.shape.push(bin);
                    return None;
                }
                if !self.shape.is_empty() {
                    let shape = std::mem::take(&mut self.shape);
                    self.shapes += 1;
                    if self.shapes > self.max_objects {
                        return Some((StopReason::MaxObjects, self.keep));
                    }
                    if !self.seen.insert((self.phrase.clone(), shape)) {
                        return Some((StopReason::Repeat, self.keep));
                    }
                    self.keep = index;
                }
                if id == BOX_END {
                    self.state = State::Outside;
                } else if id == OBJECT_REF_START {
                    self.phrase.clear();
                    self.state = State::Phrase;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ids::COORD_BASE;

    const COMMA: u32 = 11;

    fn run(g: &mut Guard, ids: &[u32]) -> Option<(StopReason, usize)> {
        ids.iter().enumerate().find_map(|(i, &id)| g.push(id, i))
    }

    fn c(k: u32) -> u32 {
        COORD_BASE + k
    }

    #[test]
    fn a_repeated_box_for_the_same_phrase_stops_and_is_cut() {
        let ids = [
            OBJECT_REF_START,
            7,
            OBJECT_REF_END,
            BOX_START,
            c(1),
            c(2),
            c(3),
            c(4),
            COMMA,
            c(5),
            c(6),
            c(7),
            c(8),
            COMMA,
            c(1),
            c(2),
            c(3),
            c(4),
            COMMA,
            c(9),
        ];
        let stop = run(&mut Guard::new(100), &ids);
        // Kept: up to the end of the second box, before the "," that led to the repeat.
        assert_eq!(stop, Some((StopReason::Repeat, 13)));
    }

    #[test]
    fn the_same_box_for_another_phrase_is_fine() {
        let ids = [
            OBJECT_REF_START,
            7,
            OBJECT_REF_END,
            BOX_START,
            c(1),
            c(2),
            c(3),
            c(4),
            BOX_END,
            COMMA,
            OBJECT_REF_START,
            8,
            OBJECT_REF_END,
            BOX_START,
            c(1),
            c(2),
            c(3),
            c(4),
            BOX_END,
        ];
        assert_eq!(run(&mut Guard::new(100), &ids), None);
        // ... but the same phrase again (a repeated item extends the list) is a repeat.
        let mut again = ids.to_vec();
        again[11] = 7;
        assert_eq!(
            run(&mut Guard::new(100), &again),
            Some((StopReason::Repeat, 14))
        );
    }

    #[test]
    fn more_than_max_objects_shapes_stop() {
        let mut ids = vec![OBJECT_REF_START, 7, OBJECT_REF_END, BOX_START];
        for k in 0..3 {
            ids.extend([c(k), c(k), c(k + 1), c(k + 1), COMMA]);
        }
        assert_eq!(run(&mut Guard::new(3), &ids), None);
        assert_eq!(
            run(&mut Guard::new(2), &ids),
            Some((StopReason::MaxObjects, 13))
        );
    }

    #[test]
    fn keypoint_json_is_not_guarded() {
        let ids = [c(1), c(2), COMMA, c(1), c(2), COMMA, c(1), c(2)];
        assert_eq!(run(&mut Guard::new(0), &ids), None);
    }
}
