//! Rex-Omni on candle.
//!
//! Layout:
//! - `protocol`: what we send the model and how we read its answer — the 8 tasks, prompt templates,
//!   chat template, coordinate bins, output parsers, detection types. No candle.

pub mod protocol;
