//! `ProtocolError`: everything that can go wrong while building a prompt or loading the tokenizer.
//!
//! In: invalid task inputs, unreadable or inconsistent tokenizer files. Out: an error whose message
//! names the file, the field and the bad value. Parsing model output never fails (a malformed answer
//! parses to fewer detections, see `parse`), so there is no parse variant.

use std::path::PathBuf;

use super::task::Task;

/// Errors of `rexomni::protocol`.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A task other than visual_prompting was given no categories (rex-omni-spec.md §5.1: the
    /// official wrapper raises here too).
    #[error("task {task}: categories: missing (give at least one category or phrase)")]
    MissingCategories { task: Task },
    /// A category is empty or only whitespace.
    #[error("task {task}: categories[{index}]: {value:?} is empty")]
    EmptyCategory {
        task: Task,
        index: usize,
        value: String,
    },
    /// keypoint task without `keypoint_type`.
    #[error("task keypoint: keypoint_type: missing (known types: {known})")]
    MissingKeypointType { known: String },
    /// `keypoint_type` names no list of rex-omni-spec.md §5.2 (e.g. "hand", which the upstream README
    /// mentions but the code does not define).
    #[error("task keypoint: keypoint_type: {value:?} is unknown (known types: {known})")]
    UnknownKeypointType { value: String, known: String },
    /// visual_prompting without reference boxes.
    #[error(
        "task visual_prompting: boxes: missing (give at least one [x0, y0, x1, y1] box in pixels)"
    )]
    MissingBoxes,
    /// A visual-prompt box is not finite, negative or inverted.
    #[error("task visual_prompting: boxes[{index}]: {value:?} {reason}")]
    InvalidBox {
        index: usize,
        value: [f64; 4],
        reason: &'static str,
    },
    /// A field was given that the task does not use (it would be silently ignored otherwise).
    #[error("task {task}: {field}: not used by this task (remove it)")]
    UnusedField { task: Task, field: &'static str },
    /// The original frame size is zero: bins are relative to it (rex-omni-spec.md §5.3).
    #[error("image size {width}x{height}: both sides must be > 0")]
    InvalidImageSize { width: u32, height: u32 },
    /// A tokenizer file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A tokenizer file is not what a Qwen2 / Rex-Omni checkpoint ships.
    #[error("{path}: {field}: {message}")]
    TokenizerFile {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// The checkpoint folder has neither tokenizer.json nor vocab.json + merges.txt.
    #[error("{dir}: no tokenizer.json and no vocab.json + merges.txt")]
    NoTokenizer { dir: PathBuf },
    /// The BPE encoder itself failed (tokenizers crate).
    #[error("tokenizer: {0}")]
    Encode(String),
}
