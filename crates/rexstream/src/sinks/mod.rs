//! Sinks: where detections documents go, and the MQTT side channel that changes prompts.
//!
//! In: [`DetectionsDocument`]s from the detector worker thread ([`Sinks::publish`], never
//! blocks). Out: MQTT messages (through the bounded outbox of [`mqtt`]) and JSON lines
//! ([`jsonl`]). Prompt changes received over MQTT land in the shared [`prompts::PromptTable`],
//! which the runtime reads per frame.
//!
//! Layout:
//! - [`mqtt`]: config, the rumqttc loop with its PUBACK-tracked outbox, the embedded broker.
//! - [`jsonl`]: one JSON document per line to stdout or a file.
//! - [`prompts`]: `stream → Arc<TaskPrompt>`, the prompt in force per stream.

pub mod jsonl;
pub mod mqtt;
pub mod prompts;

use std::sync::Arc;

use tracing::warn;

use crate::event::DetectionsDocument;
use crate::metrics::{Metrics, StreamMetrics};

/// Errors of the sinks, HTTP and broker modules. Config variants carry the TOML field path and
/// the offending value so the caller can prefix the file name (style.md §5: `file: field: value`).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{field}: {value:?} {reason}")]
    Config {
        field: String,
        value: String,
        reason: String,
    },
    #[error("{field}: cannot read {path:?}: {source}")]
    ReadFile {
        field: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded MQTT broker on {addr}: {reason}")]
    Broker {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("prompt for stream {stream:?} rejected: {reason}")]
    Prompt { stream: String, reason: String },
}

impl SinkError {
    pub(crate) fn config(
        field: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        SinkError::Config {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// The sinks of one process, fanned out per document. Clone-free: share it as `Arc<Sinks>`.
pub struct Sinks {
    pub mqtt: Option<mqtt::MqttHandle>,
    pub jsonl: Option<jsonl::JsonlSink>,
    /// The events thread (tracking, zones, events; `[events]`), fed beside the other sinks.
    pub events: Option<crate::tracking::runtime::EventsHandle>,
    metrics: Arc<Metrics>,
}

impl Sinks {
    pub fn new(
        mqtt: Option<mqtt::MqttHandle>,
        jsonl: Option<jsonl::JsonlSink>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            mqtt,
            jsonl,
            events: None,
            metrics,
        }
    }

    /// Also hand every document to the events thread.
    pub fn with_events(mut self, events: crate::tracking::runtime::EventsHandle) -> Self {
        self.events = Some(events);
        self
    }

    /// [`Sinks::publish`], and the frame itself to the events thread (for snapshots). Takes the
    /// frame by value: the worker is done with it, so nothing is copied.
    pub fn publish_frame(
        &self,
        stream: &Arc<StreamMetrics>,
        doc: &DetectionsDocument,
        frame: crate::ingest::frame::Frame,
    ) {
        self.publish_documents(stream, doc);
        if let Some(e) = &self.events {
            e.document(doc, Some(frame));
        }
    }

    /// Serialize `doc` once and hand the bytes to every sink. Never blocks on the network: MQTT
    /// documents go into the bounded outbox (its overflow policy applies), the JSON-lines sink
    /// writes one line. Safe to call from the detector worker thread.
    pub fn publish(&self, stream: &Arc<StreamMetrics>, doc: &DetectionsDocument) {
        self.publish_documents(stream, doc);
        if let Some(e) = &self.events {
            e.document(doc, None);
        }
    }

    fn publish_documents(&self, stream: &Arc<StreamMetrics>, doc: &DetectionsDocument) {
        let payload = match doc.to_json() {
            Ok(p) => p,
            Err(error) => {
                warn!(message = "Detections document not serializable; dropped.", stream = %doc.stream, seq = doc.seq, %error);
                return;
            }
        };
        if let Some(j) = &self.jsonl {
            j.write(stream, &payload, &self.metrics);
        }
        if let Some(m) = &self.mqtt {
            m.publish(stream, &doc.stream, doc.seq, payload);
        }
    }
}
