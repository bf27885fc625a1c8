//! The rexstream runtime: GStreamer ingest → latest-frame slots → scheduler → detector worker → sinks.
//!
//! Layout (data-flow order, design.md):
//! - `config`: the pipeline TOML file, composed of the sections below; every error at once.
//! - `ingest`: one GStreamer pipeline per stream → owned `Frame`s; reconnect with back-off.
//! - `slot`: the latest-frame slot per stream (superseded frames counted as dropped).
//! - `scheduler`: fair round-robin batches under each stream's `max_fps`, on request of the worker.
//! - `worker`: the detector thread that owns the model (feature `model` of rexomni).
//! - `event`: the detections document; `previous`: each stream's last answer, the next frame's draft.
//! - `sinks`: MQTT (outbox, embedded broker, prompt set/state), JSON lines.
//! - `metrics`, `http`: the Prometheus registry, `/metrics` and `/healthz`.
//! - `shutdown`: the injected stop signal; `run`: wires all of it for `rexstream run`.
//! - `shard`: which streams this replica owns when scaled out.
//! - `detect`: the `rexstream detect` subcommand (one image → JSON).
//! - `tracking`: detections → tracked objects → new/update/end events, zones, counts (issue 13).
pub mod config;
pub mod detect;
pub mod event;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod previous;
pub mod scheduler;
pub mod shard;
pub mod shutdown;
pub mod sinks;
pub mod slot;
pub mod tracking;
