//! Decode-work metrics: forward passes, draft ids accepted / rejected, why rows stopped (issue 12, items 2-3).
//!
//! In: one `GenerateOutput` per frame, from the detector worker thread. Out: three series in the process
//! registry. Labels are closed sets (`result`, `reason`).

use prometheus::{IntCounter, IntCounterVec, Registry};
use rexomni::engine::{GenerateOutput, StopReason};

use super::{counter, counter_vec};

/// Every `reason` of `rexstream_decode_stops_total`.
pub const STOP_REASONS: [StopReason; 4] = [
    StopReason::Eos,
    StopReason::MaxNewTokens,
    StopReason::Repeat,
    StopReason::MaxObjects,
];

pub struct DecodeMetrics {
    forward_passes: IntCounter,
    draft_accepted: IntCounter,
    draft_rejected: IntCounter,
    stops: IntCounterVec,
}

impl DecodeMetrics {
    pub(super) fn new(r: &Registry) -> Self {
        let drafts = counter_vec(
            r,
            "rexstream_draft_tokens_total",
            "Draft ids (the stream's previous answer) verified by the detector, by result: accepted ids cost no decode pass of their own.",
            &["result"],
        );
        let stops = counter_vec(
            r,
            "rexstream_decode_stops_total",
            "Frames whose decoding stopped, by reason (eos, max_new_tokens, repeat, max_objects).",
            &["reason"],
        );
        // Every label value exists from start-up, so rate() works from the first scrape.
        for reason in STOP_REASONS {
            stops.with_label_values(&[reason.as_str()]);
        }
        Self {
            forward_passes: counter(
                r,
                "rexstream_decode_forward_passes_total",
                "Decode forward passes per frame summed over frames (a plain step or one draft verification pass; the prefill is not counted).",
            ),
            draft_accepted: drafts.with_label_values(&["accepted"]),
            draft_rejected: drafts.with_label_values(&["rejected"]),
            stops,
        }
    }

    /// Count what one frame's decoding did.
    pub fn record(&self, out: &GenerateOutput) {
        self.forward_passes.inc_by(out.decode_forward_passes as u64);
        self.draft_accepted.inc_by(out.draft_accepted as u64);
        self.draft_rejected.inc_by(out.draft_rejected as u64);
        self.stops.with_label_values(&[out.stop.as_str()]).inc();
    }
}
