//! The Rex-Omni task protocol: what we send the model and how we read its answer. No candle.
//!
//! Data flow (rex-omni-spec.md §0): `TaskPrompt` → `task` (template text, §5.1) → `chat` (chat
//! template, §4.3) → `tokenizer` (ids, §4.2) → model → `tokenizer::decode` → `parse` /
//! `incremental` (§5.4) → `detection` (design.md detections entries). `bins` converts coordinates
//! against the ORIGINAL frame size (§5.3).

pub mod bins;
pub mod chat;
pub mod detection;
pub mod error;
pub mod incremental;
pub mod parse;
pub mod task;
pub mod tokenizer;

pub use bins::{bin_to_pixel, pixel_to_bin};
pub use chat::ids;
pub use detection::{Detection, Geometry, Keypoint, ParsedOutput};
pub use error::ProtocolError;
pub use incremental::IncrementalParser;
pub use parse::{parse_ids, parse_output, shape_score};
pub use task::{keypoint_names, Task, TaskPrompt, TextPiece, KEYPOINT_TYPES};
pub use tokenizer::{coordinate_bin, coordinate_id, RexTokenizer, TokenKind};
