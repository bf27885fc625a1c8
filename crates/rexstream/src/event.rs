//! The detections document: one JSON object per processed frame (design.md "Wire formats",
//! schema in `docs/detections.schema.json`).
//!
//! In: what the detector worker knows about one frame (stream, seq, capture time, prompt, parsed
//! detections, stage timings). Out: a [`DetectionsDocument`] that every sink serializes once with
//! [`DetectionsDocument::to_json`]; the bytes are what the MQTT outbox keeps and redelivers, so a
//! redelivered document is byte-identical to the first copy (same `event_id`).
//! Built on the detector worker thread; no I/O here.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rexomni::protocol::{Detection, Task, TaskPrompt};
use serde::Serialize;

/// Value of the `schema` field. Bump the suffix on any incompatible change of the document and
/// of `docs/detections.schema.json` (which pins this exact string with `const`).
pub const SCHEMA_VERSION: &str = "rexstream.detections/v1";

/// One detections document (design.md "Wire formats"). Field names are the wire names.
#[derive(Debug, Clone, Serialize)]
pub struct DetectionsDocument {
    /// Always [`SCHEMA_VERSION`].
    pub schema: &'static str,
    /// Unique per (process instance, stream, seq); see [`event_id`]. Consumers deduplicate on it:
    /// MQTT QoS 1 is at-least-once, so a document may arrive twice after a broker outage.
    pub event_id: String,
    /// Stream name from the pipeline config.
    pub stream: String,
    /// Frame sequence number, monotonic per stream; a gap means frames were dropped upstream.
    pub seq: u64,
    pub frame: FrameInfo,
    /// The task that produced `detections` (same as `prompt.task`, repeated for easy filtering).
    pub task: Task,
    /// The prompt in force for this frame.
    pub prompt: TaskPrompt,
    /// Model id (hub id or local directory name).
    pub model: String,
    pub detections: Vec<Detection>,
    pub timing: Timing,
    /// Tokens the model generated for this frame (the end-of-turn token excluded).
    pub output_tokens: usize,
    /// True when generation stopped at `max_new_tokens` before the model finished its answer:
    /// `detections` holds what was parsed so far (style.md §4.5).
    pub truncated: bool,
}

/// Where the frame came from.
#[derive(Debug, Clone, Serialize)]
pub struct FrameInfo {
    /// Presentation timestamp in nanoseconds from the source, when the source has one.
    pub pts_ns: Option<u64>,
    /// Wall-clock capture time (when the frame left the decoder), RFC 3339 UTC.
    pub captured_at: String,
    /// Original frame size in pixels; detections coordinates are in this space.
    pub width: u32,
    pub height: u32,
}

impl FrameInfo {
    pub fn new(pts_ns: Option<u64>, captured_at: SystemTime, width: u32, height: u32) -> Self {
        Self {
            pts_ns,
            captured_at: rfc3339(captured_at),
            width,
            height,
        }
    }
}

/// Time spent per stage for this frame, in milliseconds. Batched stages (vision, prefill,
/// decode) report the time of the whole batch the frame was in.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    /// Capture → start of the batch (time in the latest-frame slot and the hand-off queue).
    pub queue_ms: f64,
    pub preprocess_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub parse_ms: f64,
    /// Capture → document built and handed to the sinks.
    pub end_to_end_ms: f64,
}

/// Milliseconds as f64 with microsecond resolution (keeps the JSON short).
pub fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl DetectionsDocument {
    /// Serialize to compact JSON.
    ///
    /// # Errors
    /// Only if a `Detection` serializer fails (non-finite numbers serialize as `null`, so in
    /// practice never); the caller counts and logs it.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

/// A random 64-bit id for this process, drawn once. `RandomState` is seeded from the OS per
/// process; time and pid are mixed in so two processes started in the same nanosecond still differ.
pub fn instance_id() -> u64 {
    static ID: OnceLock<u64> = OnceLock::new();
    *ID.get_or_init(|| {
        let mut h = RandomState::new().build_hasher();
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .hash(&mut h);
        std::process::id().hash(&mut h);
        h.finish()
    })
}

/// `event_id` of frame `seq` of `stream`: `<instance:16 hex>-<stream hash:16 hex>-<seq:16 hex>`.
///
/// Derived, not random, so the id is a pure function of (process instance, stream, seq): the
/// document is serialized once and redelivered byte for byte, and a restarted process (new
/// instance id) can never reuse an id even though its seq restarts at 0. The stream part is a
/// fixed-key SipHash (std's `DefaultHasher::new()`), stable across runs.
pub fn event_id(stream: &str, seq: u64) -> String {
    #[allow(deprecated)]
    // SipHasher is the stable-keyed hasher we want; DefaultHasher::new() is the same.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    stream.hash(&mut h);
    format!("{:016x}-{:016x}-{:016x}", instance_id(), h.finish(), seq)
}

/// RFC 3339 UTC with millisecond precision, e.g. `2026-11-26T13:15:35.123Z`.
/// Hand-written (civil-from-days, H. Hinnant's algorithm) to avoid a date crate for one format.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day) 12:34:56.789
        let t = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(rfc3339(t), "2000-02-29T12:34:56.789Z");
        // 2026-11-26T13:15:35Z
        let t = UNIX_EPOCH + Duration::from_secs(1_795_698_935);
        assert_eq!(rfc3339(t), "2026-11-26T13:15:35.000Z");
        // 2100-03-01 (2100 is not a leap year)
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_400);
        assert_eq!(rfc3339(t), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn event_id_is_stable_and_distinct() {
        assert_eq!(event_id("cam1", 7), event_id("cam1", 7));
        assert_ne!(event_id("cam1", 7), event_id("cam1", 8));
        assert_ne!(event_id("cam1", 7), event_id("cam2", 7));
        let id = event_id("cam1", 255);
        assert_eq!(id.len(), 16 * 3 + 2);
        assert!(id.ends_with("-00000000000000ff"), "{id}");
    }
}
