//! The previous answer per stream, kept by the detector worker as the next frame's draft (issue 12, item 2).
//!
//! In: each frame's stream, the prompt in force and the generated ids. Out: the draft for the stream's next
//! frame — `None` for a stream's first frame and after its prompt changed (the answer to another question is
//! no draft). Lives on the detector thread; a draft only saves decode passes, it never changes an id
//! (rexomni engine.rs), so a stale or poor draft is harmless.

use std::collections::HashMap;

use rexomni::protocol::TaskPrompt;

#[derive(Default)]
pub struct PreviousAnswers {
    by_stream: HashMap<usize, (TaskPrompt, Vec<u32>)>,
}

impl PreviousAnswers {
    /// The last answer of `stream` if it was for this same prompt.
    pub fn draft(&self, stream: usize, prompt: &TaskPrompt) -> Option<Vec<u32>> {
        self.by_stream
            .get(&stream)
            .filter(|(p, _)| p == prompt)
            .map(|(_, ids)| ids.clone())
    }

    /// Remember `ids` as `stream`'s latest answer to `prompt` (replacing any earlier answer or prompt).
    pub fn record(&mut self, stream: usize, prompt: &TaskPrompt, ids: &[u32]) {
        self.by_stream
            .insert(stream, (prompt.clone(), ids.to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(categories: &str) -> TaskPrompt {
        serde_json::from_value(serde_json::json!({"task": "detection", "categories": categories}))
            .unwrap()
    }

    #[test]
    fn a_draft_is_the_same_streams_answer_to_the_same_prompt() {
        let mut p = PreviousAnswers::default();
        let person = prompt("person");
        assert_eq!(p.draft(0, &person), None, "first frame");
        p.record(0, &person, &[1, 2, 3]);
        assert_eq!(p.draft(0, &person), Some(vec![1, 2, 3]));
        assert_eq!(p.draft(1, &person), None, "another stream");
        assert_eq!(p.draft(0, &prompt("cup")), None, "prompt changed");
        p.record(0, &prompt("cup"), &[4]);
        assert_eq!(p.draft(0, &person), None, "the old prompt's answer is gone");
        assert_eq!(p.draft(0, &prompt("cup")), Some(vec![4]));
    }
}
