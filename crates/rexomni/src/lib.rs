//! Rex-Omni on candle.
//!
//! Layout:
//! - `protocol`: what we send the model and how we read its answer — the 8 tasks, prompt templates,
//!   chat template, coordinate bins, output parsers, detection types. No candle.
//! - `model` (feature `model`): the Qwen2.5-VL network on candle — config, loading, vision tower, decoder.
//! - `engine` (feature `model`): `RexOmni` — load once, greedy generation for batches of images.
//! - `hub` (feature `model`): model source (local folder or hub id) → checkpoint folder.

#[cfg(feature = "model")]
pub mod engine;
#[cfg(feature = "model")]
pub mod hub;
#[cfg(feature = "model")]
pub mod model;

pub mod protocol;
