//! The rexstream runtime: GStreamer ingest → latest-frame slots → scheduler → detector worker → sinks.
pub mod event;
pub mod http;
pub mod metrics;
pub mod shard;
pub mod sinks;
