//! From per-frame detections to events people use: tracking, zones, new/update/end messages,
//! retained counts and snapshots (issue 13).
//!
//! Not to be confused with `crate::event`, the per-frame *detections document*: this module turns
//! a stream of those documents into Frigate-style *tracked-object events*.
//!
//! Data flow (design.md): detections document → [`stream::StreamEvents`] (one per stream, on the
//! events thread, beside the sinks, never inside the detector worker) → [`stream::Output`]s →
//! MQTT outbox (`<prefix>/events`, counts, snapshots), the event store, Home Assistant discovery.
//!
//! Layout (data-flow order):
//! - [`config`]: `[events]` (tracker settings, snapshots, store) and `[homeassistant]`.
//! - [`shape`]: bounding boxes, IoU, the bottom-centre point, point-in-polygon.
//! - [`tracker`]: association per stream and label (velocity prediction, two-stage by score).
//! - [`zones`]: `[[streams.zones]]`, `required_zones`, per-object zone membership.
//! - [`object`]: one tracked object and the Frigate-compatible event payload.
//! - [`stream`]: a stream's tracker + zones + objects → outputs.
//! - [`replay`]: `rexstream replay`, the same on recorded documents.
//! - [`snapshot`]: best frame → JPEG with the shape drawn.
//! - [`runtime`]: the events thread of `rexstream run` (documents in, outbox out).
//! - [`store`]: the SQLite event store; [`api`]: `/api/events` on the HTTP endpoint.
//! - [`homeassistant`]: Home Assistant MQTT discovery configs per (stream, label).

pub mod api;
pub mod config;
pub mod homeassistant;
pub mod object;
pub mod replay;
pub mod runtime;
pub mod shape;
pub mod snapshot;
pub mod store;
pub mod stream;
pub mod tracker;
pub mod zones;

pub use config::{EventsConfig, HomeAssistantConfig};
pub use object::{EventMessage, EventType, ObjectState};
pub use stream::{FrameObservation, Output, StreamEvents};
