//! Ingest: one GStreamer pipeline per stream, from a uri to owned [`frame::Frame`]s in the stream's
//! latest-frame slot.
//!
//! Layout:
//! - `config`: the `[[streams]]` section, secret-holding [`config::SecretUri`].
//! - `frame`: [`frame::Frame`], copied out of an appsink sample on the streaming thread.
//! - `transport`: which RTP transport (TCP/UDP) the next RTSP attempt uses.
//! - `motion`: the `[streams.motion]` gate between the appsink and the slot (drops still frames).
//! - `pipeline`: the per-stream OS thread: build → play → watch the bus and the no-frame watchdog →
//!   tear down → back off → rebuild.
//!
//! [`StreamStatus`] is the stream's shared, lock-light state for the scheduler and `/healthz`.

pub mod config;
pub mod frame;
pub mod motion;
pub mod pipeline;
pub mod transport;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where a stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamState {
    /// Pipeline built, no frame yet.
    Connecting = 0,
    /// Frames are arriving.
    Up = 1,
    /// Lost; waiting out the back-off before the next attempt.
    Reconnecting = 2,
    /// A finite source reached its end (or ingest was stopped); no more frames will come.
    Ended = 3,
}

impl StreamState {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Connecting => "connecting",
            StreamState::Up => "up",
            StreamState::Reconnecting => "reconnecting",
            StreamState::Ended => "ended",
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            1 => StreamState::Up,
            2 => StreamState::Reconnecting,
            3 => StreamState::Ended,
            _ => StreamState::Connecting,
        }
    }
}

/// Shared status of one stream: written by its ingest thread and appsink callback, read by the
/// scheduler and `/healthz`. Holds only redacted text (no secrets).
#[derive(Debug)]
pub struct StreamStatus {
    /// Stream name.
    pub name: String,
    /// The uri as printable (`rtsp://user:***@host/…`).
    pub uri_redacted: String,
    state: AtomicU8,
    last_frame_unix_ms: AtomicU64,
    frames: AtomicU64,
    reconnects: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl StreamStatus {
    pub fn new(name: String, uri_redacted: String) -> Self {
        Self {
            name,
            uri_redacted,
            state: AtomicU8::new(StreamState::Connecting as u8),
            last_frame_unix_ms: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }
    pub fn state(&self) -> StreamState {
        StreamState::from_u8(self.state.load(Ordering::Acquire))
    }
    pub fn set_state(&self, s: StreamState) {
        self.state.store(s as u8, Ordering::Release);
    }
    pub fn is_ended(&self) -> bool {
        self.state() == StreamState::Ended
    }
    /// Called per frame by the appsink callback; returns true when this frame brought the stream up.
    pub fn frame_arrived(&self) -> bool {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.last_frame_unix_ms.store(ms, Ordering::Relaxed);
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.state.swap(StreamState::Up as u8, Ordering::AcqRel) != StreamState::Up as u8
    }
    /// Unix milliseconds of the last frame (0 = none yet).
    pub fn last_frame_unix_ms(&self) -> u64 {
        self.last_frame_unix_ms.load(Ordering::Relaxed)
    }
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
    /// Record a disconnect (the text must already be scrubbed of secrets).
    pub fn disconnected(&self, error: String) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        self.set_state(StreamState::Reconnecting);
    }
    /// The last disconnect reason, redacted.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
