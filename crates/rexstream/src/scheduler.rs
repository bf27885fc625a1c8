//! The scheduler: picks which frames the detector sees next.
//!
//! In: the per-stream [`LatestFrameSlot`]s (filled by ingest) and credits from the worker (one per
//! batch it is ready to run, saying how many frames it can take: `max_batch`, or a continuous batch's free
//! slots). Out: a [`Batch`] of at most `max_batch` frames on a bounded channel.
//! Runs on its own OS thread and never touches a GStreamer thread.
//!
//! Demand-driven: a batch is formed only when the worker has asked for one, so the frames in it are
//! the newest available at that moment, not ones that waited a whole detector period in a queue
//! (the worst-case age of a frame is about one detector period plus the wait for `max_fps`).
//! Fairness: streams are visited round-robin starting after the last stream served, and each stream
//! becomes due again `1 / max_fps` after it was last served, so a fast camera cannot starve a slow one.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntGauge};
use tracing::debug;

use crate::ingest::frame::Frame;
use crate::ingest::StreamStatus;
use crate::shutdown::Shutdown;
use crate::slot::{LatestFrameSlot, Wakeup};

/// Longest the scheduler sleeps without re-checking shutdown and ended streams.
const POLL: Duration = Duration::from_millis(100);

/// Frames for one detector call, from distinct streams.
#[derive(Debug)]
pub struct Batch {
    pub frames: Vec<Frame>,
    /// When the scheduler handed it over (queue time ends here).
    pub formed_at: Instant,
}

/// One stream as the scheduler sees it.
pub struct ScheduledStream {
    pub slot: Arc<LatestFrameSlot>,
    pub status: Arc<StreamStatus>,
    /// `1 / max_fps`.
    pub min_interval: Duration,
}

/// Scheduler metrics (handles resolved once by the caller).
#[derive(Clone)]
pub struct SchedulerMetrics {
    /// `rexstream_batch_size`.
    pub batch_size: Histogram,
    /// `rexstream_queue_depth`: batches handed over and not yet taken by the worker (the worker
    /// decrements it when it takes one).
    pub queue_depth: IntGauge,
}

pub struct Scheduler {
    streams: Vec<ScheduledStream>,
    /// When each stream may be served again; `None` = now (never served).
    next_due: Vec<Option<Instant>>,
    cursor: usize,
    max_batch: usize,
    wakeup: Arc<Wakeup>,
    metrics: SchedulerMetrics,
}

impl Scheduler {
    pub fn new(
        streams: Vec<ScheduledStream>,
        max_batch: usize,
        wakeup: Arc<Wakeup>,
        metrics: SchedulerMetrics,
    ) -> Self {
        Self {
            next_due: vec![None; streams.len()],
            streams,
            cursor: 0,
            max_batch: max_batch.max(1),
            wakeup,
            metrics,
        }
    }

    /// Take up to `max_batch` frames from due streams, round-robin from the cursor. Empty when
    /// nothing is due; then `wait` says how long until a waiting frame becomes due (if any).
    pub fn pick(&mut self, now: Instant) -> (Vec<Frame>, Option<Duration>) {
        self.pick_up_to(now, self.max_batch)
    }

    /// As [`Scheduler::pick`], at most `limit` frames (and never more than `max_batch`).
    pub fn pick_up_to(&mut self, now: Instant, limit: usize) -> (Vec<Frame>, Option<Duration>) {
        let limit = limit.clamp(1, self.max_batch);
        let n = self.streams.len();
        let mut frames = Vec::new();
        let mut wait: Option<Duration> = None;
        let mut last = None;
        for k in 0..n {
            if frames.len() >= limit {
                break;
            }
            let i = (self.cursor + k) % n;
            let s = &self.streams[i];
            if !s.slot.is_full() {
                continue;
            }
            let due = self.next_due[i];
            if let Some(d) = due.filter(|d| now < *d) {
                let w = d - now;
                wait = Some(wait.map_or(w, |x: Duration| x.min(w)));
                continue;
            }
            if let Some(f) = s.slot.take() {
                // Due again one interval after the previous due time (keeps the exact rate when
                // the detector is fast), but never in the past (no catch-up bursts when it is slow).
                self.next_due[i] = Some(match due {
                    Some(d) => (d + s.min_interval).max(now),
                    None => now + s.min_interval,
                });
                frames.push(f);
                last = Some(i);
            }
        }
        if let Some(i) = last {
            self.cursor = (i + 1) % n.max(1);
        }
        (frames, wait)
    }

    fn all_ended(&self) -> bool {
        self.streams
            .iter()
            .all(|s| s.status.is_ended() && !s.slot.is_full())
    }

    /// The scheduler thread's loop. Returns when shutdown is triggered, when every stream has ended
    /// (finite files), or when the worker hangs up. Dropping `batches` tells the worker to finish.
    /// Each credit says how many frames the worker can take now (a continuous batch has only its free
    /// slots; a static one `max_batch`).
    pub fn run(mut self, credits: Receiver<usize>, batches: SyncSender<Batch>, shutdown: Shutdown) {
        'credits: loop {
            // Wait for the worker to ask for a batch.
            let want = loop {
                if shutdown.is_triggered() || self.all_ended() {
                    break 'credits;
                }
                match credits.recv_timeout(POLL) {
                    Ok(n) => break n,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break 'credits,
                }
            };
            // Form it from the newest due frames.
            loop {
                if shutdown.is_triggered() || self.all_ended() {
                    break 'credits;
                }
                let seen = self.wakeup.generation();
                let (frames, wait) = self.pick_up_to(Instant::now(), want);
                if !frames.is_empty() {
                    self.metrics.queue_depth.inc();
                    self.metrics.batch_size.observe(frames.len() as f64);
                    debug!(message = "Batch formed.", size = frames.len());
                    if batches
                        .send(Batch {
                            frames,
                            formed_at: Instant::now(),
                        })
                        .is_err()
                    {
                        self.metrics.queue_depth.dec();
                        break 'credits;
                    }
                    break;
                }
                self.wakeup.wait(seen, wait.unwrap_or(POLL).min(POLL));
            }
        }
        for s in &self.streams {
            s.slot.discard_on_shutdown();
        }
        debug!(message = "Scheduler stopped.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::tests::frame;
    use prometheus::HistogramOpts;

    fn sched(intervals: &[u64], max_batch: usize) -> Scheduler {
        let w = Wakeup::new();
        let streams = intervals
            .iter()
            .enumerate()
            .map(|(i, ms)| ScheduledStream {
                slot: Arc::new(LatestFrameSlot::new(
                    crate::slot::tests::stream_metrics(),
                    w.clone(),
                )),
                status: Arc::new(StreamStatus::new(format!("s{i}"), "x".into())),
                min_interval: Duration::from_millis(*ms),
            })
            .collect();
        let m = SchedulerMetrics {
            batch_size: Histogram::with_opts(HistogramOpts::new("b", "b")).unwrap(),
            queue_depth: IntGauge::new("q", "q").unwrap(),
        };
        Scheduler::new(streams, max_batch, w, m)
    }

    #[test]
    fn round_robin_with_batch_one_alternates_between_always_ready_streams() {
        let mut s = sched(&[0, 0, 0], 1);
        let t0 = Instant::now();
        let mut served = Vec::new();
        for k in 0..9 {
            for i in 0..3 {
                s.streams[i].slot.put(frame(i, k));
            }
            let (f, _) = s.pick(t0);
            served.push(f[0].stream_index);
        }
        assert_eq!(served, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn max_fps_limits_each_stream_and_reports_the_wait() {
        let mut s = sched(&[100, 10], 4);
        let t0 = Instant::now();
        s.streams[0].slot.put(frame(0, 0));
        s.streams[1].slot.put(frame(1, 0));
        assert_eq!(s.pick(t0).0.len(), 2);
        s.streams[0].slot.put(frame(0, 1));
        s.streams[1].slot.put(frame(1, 1));
        let (f, wait) = s.pick(t0 + Duration::from_millis(20));
        assert_eq!(
            f.iter().map(|f| f.stream_index).collect::<Vec<_>>(),
            vec![1]
        );
        let (f, wait2) = s.pick(t0 + Duration::from_millis(20));
        assert!(f.is_empty());
        assert_eq!(wait.or(wait2), Some(Duration::from_millis(80)));
        let (f, _) = s.pick(t0 + Duration::from_millis(100));
        assert_eq!(
            f.iter().map(|f| f.stream_index).collect::<Vec<_>>(),
            vec![0]
        );
    }

    #[test]
    fn batch_is_capped_and_the_next_one_starts_where_this_one_stopped() {
        let mut s = sched(&[0, 0, 0, 0, 0], 2);
        let t0 = Instant::now();
        for i in 0..5 {
            s.streams[i].slot.put(frame(i, 0));
        }
        let ids = |f: Vec<Frame>| f.iter().map(|f| f.stream_index).collect::<Vec<_>>();
        assert_eq!(ids(s.pick(t0).0), vec![0, 1]);
        assert_eq!(ids(s.pick(t0).0), vec![2, 3]);
        s.streams[0].slot.put(frame(0, 1));
        assert_eq!(ids(s.pick(t0).0), vec![4, 0]);
    }

    #[test]
    fn run_serves_a_credit_and_stops_on_shutdown() {
        let s = sched(&[0], 1);
        let slot = s.streams[0].slot.clone();
        let (ctx, crx) = std::sync::mpsc::sync_channel(1);
        let (btx, brx) = std::sync::mpsc::sync_channel(1);
        let sd = Shutdown::new();
        let sd2 = sd.clone();
        let t = std::thread::spawn(move || s.run(crx, btx, sd2));
        ctx.send(1).unwrap();
        slot.put(frame(0, 42));
        let b = brx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(b.frames[0].seq, 42);
        sd.trigger();
        t.join().unwrap();
        assert!(brx.recv().is_err(), "sender dropped after shutdown");
    }
}
