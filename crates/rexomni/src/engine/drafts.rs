//! Draft alignment for exact speculative decoding: which tokens of the stream's previous answer to propose
//! next, given what this frame's answer has generated so far.
//!
//! In: the previous answer's ids (the draft) and, after each verification pass, how many draft tokens were
//! accepted and the model's own token that followed. Out: the next draft tokens to verify. Runs on the
//! detector thread inside the decode loop. Pure bookkeeping: a bad alignment costs forward passes, never a
//! different token, because every proposed token is checked against the model's own greedy pick (engine.rs).
//!
//! Re-alignment after the model's token `t` differs from the draft's `d` (issue 12):
//! - both are coordinates (`<k>`): the box moved by some bins; a substitution, so the draft continues after
//!   `d`;
//! - otherwise an object appeared or vanished: the draft re-syncs on the first occurrence, at or after the
//!   current place, of the last [`NGRAM`] generated ids in the previous answer, and continues after it. Until
//!   one matches (tried after every emitted token) no draft is proposed and decoding is plain greedy.

use crate::protocol::coordinate_bin;

/// Length of the n-gram that re-syncs a lost draft: 3 ids is e.g. `,<x0><y0>` or `phrase<|object_ref_end|>
/// <|box_start|>`, specific enough not to jump to a wrong object most of the time.
pub const NGRAM: usize = 3;

/// The previous answer and where this answer stands in it.
#[derive(Debug, Clone)]
pub struct Draft {
    prev: Vec<u32>,
    /// Index in `prev` of the next id to propose; `None` while lost (waiting for an n-gram re-sync).
    cursor: Option<usize>,
    /// Re-syncs search from here on, so the draft never moves backwards.
    floor: usize,
}

impl Draft {
    pub fn new(prev: Vec<u32>) -> Self {
        Self {
            prev,
            cursor: Some(0),
            floor: 0,
        }
    }

    /// Up to `k` ids to verify next (empty while lost or past the end).
    pub fn next(&self, k: usize) -> &[u32] {
        match self.cursor {
            Some(c) if c < self.prev.len() => &self.prev[c..(c + k).min(self.prev.len())],
            _ => &[],
        }
    }

    /// After a pass: `accepted` proposed ids were taken as they were, then the model chose `model_id` itself
    /// (`generated` is the whole answer so far, ending with `model_id`).
    pub fn advance(&mut self, accepted: usize, model_id: u32, generated: &[u32]) {
        if let Some(c) = self.cursor {
            let c = c + accepted;
            self.floor = c;
            match self.prev.get(c) {
                Some(&d) if d == model_id => self.cursor = Some(c + 1),
                Some(&d) if coordinate_bin(d).is_some() && coordinate_bin(model_id).is_some() => {
                    self.cursor = Some(c + 1)
                }
                _ => self.cursor = None,
            }
            if self.cursor.is_some() {
                self.floor = c + 1;
                return;
            }
        }
        self.resync(generated);
    }

    /// Find the last `NGRAM` generated ids in `prev[floor..]`; continue after the first match.
    fn resync(&mut self, generated: &[u32]) {
        let n = NGRAM.min(generated.len());
        if n == 0 {
            return;
        }
        let tail = &generated[generated.len() - n..];
        let from = self.floor.min(self.prev.len());
        if let Some(i) = self.prev[from..].windows(n).position(|w| w == tail) {
            self.cursor = Some(from + i + n);
            self.floor = from + i + n;
        }
    }

    /// Whether a draft is being followed right now (tests, metrics).
    pub fn is_aligned(&self) -> bool {
        self.cursor.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ids::{BOX_END, BOX_START, COORD_BASE, OBJECT_REF_END, OBJECT_REF_START};

    fn c(k: u32) -> u32 {
        COORD_BASE + k
    }

    #[test]
    fn identical_answer_is_followed_to_the_end() {
        let prev = vec![1, 2, 3, 4, 5];
        let mut d = Draft::new(prev.clone());
        assert_eq!(d.next(2), &[1, 2]);
        d.advance(2, 3, &prev[..3]);
        assert_eq!(d.next(10), &[4, 5]);
        d.advance(2, 9, &[1, 2, 3, 4, 5, 9]);
        assert!(d.next(10).is_empty());
    }

    #[test]
    fn a_moved_coordinate_is_a_substitution() {
        let prev = vec![
            OBJECT_REF_START,
            7,
            OBJECT_REF_END,
            BOX_START,
            c(10),
            c(20),
            c(30),
            c(40),
            BOX_END,
        ];
        let mut d = Draft::new(prev.clone());
        // Accepted up to <10>, then the model says <21> where the draft had <20>.
        d.advance(
            5,
            c(21),
            &[OBJECT_REF_START, 7, OBJECT_REF_END, BOX_START, c(10), c(21)],
        );
        assert_eq!(d.next(3), &[c(30), c(40), BOX_END]);
    }

    #[test]
    fn an_extra_object_resyncs_on_the_next_matching_ngram() {
        // prev: one box for "a", then one for "b"; now "a" has two boxes.
        let prev = vec![
            OBJECT_REF_START,
            1,
            OBJECT_REF_END,
            BOX_START,
            c(1),
            c(2),
            c(3),
            c(4),
            BOX_END,
            44,
            OBJECT_REF_START,
            2,
            OBJECT_REF_END,
            BOX_START,
            c(5),
            c(6),
            c(7),
            c(8),
            BOX_END,
        ];
        let mut d = Draft::new(prev.clone());
        let mut gen: Vec<u32> = prev[..8].to_vec();
        gen.push(45); // "," where the draft says <|box_end|>: lost
        d.advance(8, 45, &gen);
        assert!(!d.is_aligned());
        assert!(d.next(4).is_empty());
        for t in [c(9), c(9), c(9), c(9), BOX_END, 44, OBJECT_REF_START] {
            gen.push(t);
            d.advance(0, t, &gen);
        }
        // `<|box_end|> 44 <|object_ref_start|>` matched: the draft goes on with phrase "b".
        assert_eq!(d.next(3), &[2, OBJECT_REF_END, BOX_START]);
    }

    #[test]
    fn resync_never_moves_backwards() {
        let prev = vec![5, 6, 7, 8, 5, 6, 7, 9];
        let mut d = Draft::new(prev);
        let mut gen = vec![5, 6, 7, 8, 5, 1];
        d.advance(5, 1, &gen);
        // The trigram 5 6 7 occurs at 0 and 4, both before the place reached (5): neither is used.
        for t in [5, 6, 7] {
            gen.push(t);
            d.advance(0, t, &gen);
        }
        assert!(!d.is_aligned());
    }
}
