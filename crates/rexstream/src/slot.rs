//! The latest-frame slot: one per stream, between the GStreamer streaming thread (writer) and the
//! scheduler (reader).
//!
//! In: frames from `ingest` via [`LatestFrameSlot::put`] (never blocks beyond a short mutex).
//! Out: the newest frame via [`LatestFrameSlot::take`]. Policy "keep latest": a frame that is
//! replaced before anyone took it is counted as dropped with `reason="superseded"` — a slow
//! detector drops old frames instead of building latency (design.md "Rules of thumb").
//! Every `put` wakes the scheduler through the shared [`Wakeup`].

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::ingest::frame::Frame;
use crate::metrics::{DropReason, StreamMetrics};

/// A wake-up signal shared by all slots and the scheduler: "something changed, look again".
#[derive(Debug, Default)]
pub struct Wakeup {
    generation: Mutex<u64>,
    cv: Condvar,
}

impl Wakeup {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// Wake everyone waiting.
    pub fn notify(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        *g = g.wrapping_add(1);
        self.cv.notify_all();
    }
    /// Current generation; pass it to [`Wakeup::wait`] so a notify between looking and waiting
    /// is not lost.
    pub fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Wait until the generation moves past `seen` or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .cv
            .wait_timeout_while(g, timeout, |g| *g == seen)
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// Keep-latest single-frame buffer for one stream.
pub struct LatestFrameSlot {
    frame: Mutex<Option<Frame>>,
    metrics: Arc<StreamMetrics>,
    wakeup: Arc<Wakeup>,
}

impl LatestFrameSlot {
    /// Superseded frames are counted in this stream's
    /// `rexstream_frames_dropped_total{reason="superseded"}`.
    pub fn new(metrics: Arc<StreamMetrics>, wakeup: Arc<Wakeup>) -> Self {
        Self {
            frame: Mutex::new(None),
            metrics,
            wakeup,
        }
    }

    /// Store `frame`, replacing (and counting as dropped) an unconsumed one. Returns true when a
    /// frame was superseded.
    pub fn put(&self, frame: Frame) -> bool {
        let old = {
            let mut slot = self.frame.lock().unwrap_or_else(|e| e.into_inner());
            slot.replace(frame)
        };
        let superseded = old.is_some();
        if superseded {
            self.metrics.dropped(DropReason::Superseded, 1);
        }
        // The old frame's pixels are freed here, outside the lock.
        drop(old);
        self.wakeup.notify();
        superseded
    }

    /// Take the newest frame, leaving the slot empty.
    pub fn take(&self) -> Option<Frame> {
        self.frame.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Empty the slot at shutdown, counting a waiting frame as dropped with `reason="shutdown"`.
    pub fn discard_on_shutdown(&self) {
        if self.take().is_some() {
            self.metrics.dropped(DropReason::Shutdown, 1);
        }
    }

    /// Whether a frame is waiting.
    pub fn is_full(&self) -> bool {
        self.frame
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ingest::frame::{ChromaSite, Colorimetry, PixelFormat};
    use std::time::{Instant, SystemTime};

    pub(crate) fn frame(stream_index: usize, seq: u64) -> Frame {
        Frame {
            stream: format!("s{stream_index}").into(),
            stream_index,
            seq,
            pts_ns: None,
            captured_at: SystemTime::now(),
            captured_mono: Instant::now(),
            width: 2,
            height: 2,
            format: PixelFormat::Rgb,
            data: vec![0; 12],
            strides: [6, 0, 0],
            offsets: [0, 0, 0],
            colorimetry: Colorimetry::BT601,
            chroma_site: ChromaSite::Centered,
        }
    }

    pub(crate) fn stream_metrics() -> Arc<StreamMetrics> {
        crate::metrics::Metrics::new().stream("s")
    }

    fn superseded(m: &crate::metrics::Metrics) -> f64 {
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("rexstream_frames_dropped_total{reason=\"superseded\",stream=\"s\"}")
            })
            .unwrap_or_default();
        line.rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    }

    #[test]
    fn keeps_latest_and_counts_each_superseded_frame() {
        let m = crate::metrics::Metrics::new();
        let slot = LatestFrameSlot::new(m.stream("s"), Wakeup::new());
        assert!(!slot.put(frame(0, 0)));
        assert!(slot.put(frame(0, 1)));
        assert!(slot.put(frame(0, 2)));
        assert_eq!(superseded(&m), 2.0);
        assert_eq!(slot.take().map(|f| f.seq), Some(2));
        assert!(slot.take().is_none());
        assert!(!slot.put(frame(0, 3)));
        assert_eq!(superseded(&m), 2.0);
    }

    #[test]
    fn put_wakes_a_waiter() {
        let w = Wakeup::new();
        let slot = Arc::new(LatestFrameSlot::new(stream_metrics(), w.clone()));
        let g = w.generation();
        let s2 = slot.clone();
        let t = std::thread::spawn(move || s2.put(frame(0, 0)));
        let start = Instant::now();
        w.wait(g, Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(4));
        t.join().unwrap();
        assert!(slot.is_full());
    }
}
