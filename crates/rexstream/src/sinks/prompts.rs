//! The prompt in force per stream, shared between the MQTT sink (writer) and the runtime
//! (reader, once per frame).
//!
//! In: the configured prompt of each stream at start ([`PromptTable::new`]), then prompt-set
//! messages from `<prefix>/<stream>/prompt/set` ([`PromptTable::apply`]: [`parse_prompt_set`], then
//! [`PromptTable::set`] only if it passed).
//! Out: `Arc<TaskPrompt>` per stream ([`PromptTable::get`]): the detector worker reads it when it
//! builds a frame's request, so a change takes effect from the next frame. Reads take a read lock
//! and clone an `Arc`; writes are rare (a person changing a prompt).
//!
//! For the RUNTIME side: build the table from the config's streams, share it as
//! `Arc<PromptTable>` with the MQTT sink and the worker, and call `get(stream)` per frame.
//! [`PromptTable::version`] changes on every accepted update, if a cache wants to notice.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rexomni::protocol::TaskPrompt;

use super::SinkError;

/// Largest prompt-set payload accepted. A prompt is a task, a few categories and maybe boxes:
/// a few KiB at most. The cap keeps a hostile message from costing memory or parse time.
pub const MAX_PROMPT_SET_BYTES: usize = 64 * 1024;

/// `stream → prompt in force`. Streams are fixed at start: a prompt for an unknown stream is
/// rejected, so MQTT input cannot create streams (or metric series).
pub struct PromptTable {
    inner: RwLock<BTreeMap<String, Arc<TaskPrompt>>>,
    version: AtomicU64,
}

impl PromptTable {
    pub fn new(initial: impl IntoIterator<Item = (String, TaskPrompt)>) -> Self {
        Self {
            inner: RwLock::new(initial.into_iter().map(|(s, p)| (s, Arc::new(p))).collect()),
            version: AtomicU64::new(0),
        }
    }

    /// The prompt in force for `stream`.
    pub fn get(&self, stream: &str) -> Option<Arc<TaskPrompt>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .cloned()
    }

    /// Replace the prompt of a known stream.
    ///
    /// # Errors
    /// [`SinkError::Prompt`] if `stream` is not configured.
    pub fn set(&self, stream: &str, prompt: TaskPrompt) -> Result<Arc<TaskPrompt>, SinkError> {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let slot = map.get_mut(stream).ok_or_else(|| SinkError::Prompt {
            stream: stream.to_string(),
            reason: "no such stream in the pipeline config".into(),
        })?;
        let p = Arc::new(prompt);
        *slot = p.clone();
        self.version.fetch_add(1, Ordering::Release);
        Ok(p)
    }

    /// Handle one prompt-set message for `stream`: parse and validate `payload`
    /// ([`parse_prompt_set`]) and, only if that succeeds, make it the prompt in force. This is what
    /// the MQTT sink runs for every `<prefix>/<stream>/prompt/set` message (and what
    /// tests/fuzz_prompt_set.rs drives), so a rejected payload never reaches the table.
    ///
    /// # Errors
    /// [`SinkError::Prompt`] naming the stream and the reason; the table is unchanged.
    pub fn apply(&self, stream: &str, payload: &[u8]) -> Result<Arc<TaskPrompt>, SinkError> {
        let prompt = parse_prompt_set(stream, payload)?;
        self.set(stream, prompt)
    }

    /// Configured stream names, sorted.
    pub fn streams(&self) -> Vec<String> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Incremented on every accepted change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// Parse and validate a prompt-set payload: JSON of `rexomni::protocol::TaskPrompt`, size-capped,
/// then `TaskPrompt::validate()`. Never panics on any input (fuzzed in issue 6).
///
/// # Errors
/// A reason that names what is wrong, for the log line; the old prompt stays.
pub fn parse_prompt_set(stream: &str, payload: &[u8]) -> Result<TaskPrompt, SinkError> {
    let reject = |reason: String| SinkError::Prompt {
        stream: stream.to_string(),
        reason,
    };
    if payload.len() > MAX_PROMPT_SET_BYTES {
        return Err(reject(format!(
            "payload is {} bytes, more than {MAX_PROMPT_SET_BYTES}",
            payload.len()
        )));
    }
    let prompt: TaskPrompt = serde_json::from_slice(payload)
        .map_err(|e| reject(format!("not a valid prompt JSON: {e}")))?;
    prompt
        .validate()
        .map_err(|e| reject(format!("invalid prompt: {e}")))?;
    Ok(prompt)
}
