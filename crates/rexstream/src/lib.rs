//! The rexstream runtime: GStreamer ingest → latest-frame slots → scheduler → detector worker → sinks.
pub mod shard;
