//! Overload, for real (issue 6 item 3): an `rtsp-serve` camera much faster than the detector feeds
//! the `rexstream` binary (tiny fixture checkpoint, `max_fps` unthrottled, `max_batch = 1`), so the
//! latest-frame slot must drop what the detector cannot take instead of queueing it.
//!
//! Measured after a warm-up, over the run, and printed:
//! - source rate vs detector rate (frames received / processed per second) — the overload factor;
//! - end-to-end latency (capture → document handed to the sinks) p50/p99 from every document's
//!   `timing.end_to_end_ms` (the JSON-lines sink writes them to a file), and the same quantiles
//!   from the `/metrics` histogram (coarser: bucket interpolation);
//! - the detector period per frame (sum of the document's preprocess/vision/prefill/decode/parse);
//! - resident memory (VmRSS) of the process at the start and the end, and its maximum;
//! - drops: `rexstream_frames_dropped_total{reason="superseded"}` and the frame accounting
//!   received = processed + dropped + (≤ [`HELD`] frames not yet counted either way), every counter
//!   read from ONE `/metrics` scrape (see [`Counters::snapshot`]).
//!
//! Asserted: p99 latency < [`LATENCY_BOUND_PERIODS`] × the p99 detector period (a frame waits at
//! most one period in the slot, then takes one period to process; p99 rather than the median
//! because on a shared CPU a batch now and then takes 2–3× the median, and the frame that waited
//! for it is late by that much without anything queueing — queueing would grow without bound);
//! the p99 queue wait (capture → batch start, `timing.queue_ms`) below [`QUEUE_BOUND_PERIODS`]
//! median detector period; RSS at the end within [`RSS_GROWTH`] of the start; every frame
//! accounted for. Each bound's doc comment gives its margin over measured runs. The overload factor
//! (source rate / detector rate) is measured, not assumed: when it is at least [`MIN_OVERLOAD`] the
//! test also requires superseded drops; when the detector keeps up with the camera (a fast machine),
//! nothing has to be dropped, and the test prints `SKIPPED the overload-only assertions` with the
//! measured rates instead of failing or passing silently.
//!
//! Short (CI): ~25 s of load. Long (issue 6: ≥ 2 minutes): `REXSTREAM_LONG_TESTS=1 cargo test -p
//! rexstream-e2e --test reliability_overload -- --nocapture` (150 s of load).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rexstream_e2e::faults::{
    histogram_buckets, histogram_quantile, percentile, rss_kib, tail, wait_metric,
};
use rexstream_e2e::{
    free_port, metric_sum, tiny_model, Rexstream, RtspServer, RtspSource, TempDir,
};
use serde_json::Value;

/// The latency bound, in detector periods (issue 6: "about two detector periods"). Measured
/// 2026-11-30 14:41–14:46 and 14:56 UTC, four short runs of `nice -n 10 cargo test -p rexstream-e2e
/// --test reliability_overload -- --nocapture` (2 shared cores, load average 16–20, tiny-tied, debug
/// profile): p99 latency / p99 period = 1323/1317, 1295/1276, 2305/2296, 2398/2388 ms, i.e.
/// 1.00–1.01 (the long run, 15:00 UTC: 1629/1610). The bound, 2 periods, is twice the worst ratio
/// seen: one period in the slot at most, one to process; queueing would grow past it without limit.
const LATENCY_BOUND_PERIODS: f64 = 2.0;
/// The p99 queue wait (capture → batch start) must stay under this many median detector periods.
/// Measured on the same runs: 53/645, 66/810, 81/891, 39/845 ms, i.e. 0.05–0.09 of a period: the
/// bound is ~11× the worst seen. A frame that waited behind another would wait a whole period.
const QUEUE_BOUND_PERIODS: f64 = 1.0;
/// Resident memory at the end of the load may exceed the start by at most this share. Measured
/// +0.0 %, +0.1 %, +0.1 %, +0.2 % over 25 s (~1 000 frames received) and −0.1 % over the 150 s
/// long run (5 159 received): 10 % is far above that noise. What it catches, tried 2026-11-30:
/// leaking each *received* frame's pixels (in the slot) gave +78.0 % and failed; leaking each
/// *processed* frame's pixels (in the worker, 28 frames in the window, ~3 MiB) gave +0.3 % and
/// passed. A leak that small is served from free heap the allocator already holds after the
/// model's warm-up, so no RSS bound over this window would see it.
const RSS_GROWTH: f64 = 0.10;
/// The least measured source/detector rate ratio for the run to count as overload: at 2× at least
/// every other frame must be superseded, so the drop path runs all the time.
const MIN_OVERLOAD: f64 = 2.0;
/// Frames received but not yet counted as processed or dropped, at most: one in the appsink
/// callback between `frames_received.inc()` and `slot.put()`, one waiting in the slot, and one in
/// the detector's batch (`max_batch = 1`).
const HELD: f64 = 3.0;

/// The frame counters of the `fast` stream, all from one `/metrics` scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counters {
    received: f64,
    processed: f64,
    superseded: f64,
    dropped: f64,
}

impl Counters {
    fn from_text(m: &str) -> Self {
        let s = [("stream", "fast")];
        Counters {
            received: metric_sum(m, "rexstream_frames_received_total", &s),
            processed: metric_sum(m, "rexstream_frames_processed_total", &s),
            superseded: metric_sum(
                m,
                "rexstream_frames_dropped_total",
                &[("stream", "fast"), ("reason", "superseded")],
            ),
            dropped: metric_sum(m, "rexstream_frames_dropped_total", &s),
        }
    }

    /// One scrape whose counters hold together: a scrape reads each counter once, within
    /// microseconds but not atomically, so it is taken again until the next scrape shows the same
    /// values (counters only grow: equal values mean nothing changed in between, so the first scrape
    /// is a consistent snapshot). At 30 fps a frame arrives every 33 ms and a scrape takes ~1 ms,
    /// so this usually succeeds at once. Returns the scrape's text and the tries it took.
    fn snapshot(rex: &Rexstream) -> Result<(String, Self, usize)> {
        let mut a = rex.metrics()?;
        for tries in 1..=100 {
            let b = rex.metrics()?;
            if Counters::from_text(&a) == Counters::from_text(&b) {
                let c = Counters::from_text(&a);
                return Ok((a, c, tries));
            }
            a = b;
        }
        bail!("no two consecutive /metrics scrapes agreed in 100 tries")
    }
}
/// Camera rate: a real camera's 30 fps.
const SOURCE_FPS: u32 = 30;

fn long() -> bool {
    std::env::var_os("REXSTREAM_LONG_TESTS").is_some_and(|v| v != "0" && !v.is_empty())
}

fn docs_from(path: &std::path::Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    // The last line may be half written while the process runs.
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect())
}

fn period_ms(d: &Value) -> Option<f64> {
    let t = &d["timing"];
    [
        "preprocess_ms",
        "vision_ms",
        "prefill_ms",
        "decode_ms",
        "parse_ms",
    ]
    .iter()
    .map(|k| t[k].as_f64())
    .sum()
}

#[test]
fn fast_camera_is_dropped_not_queued() -> Result<()> {
    let (warmup, load) = if long() {
        (Duration::from_secs(20), Duration::from_secs(150))
    } else {
        (Duration::from_secs(8), Duration::from_secs(25))
    };
    let dir = TempDir::new("rel-overload")?;
    let cam = RtspServer::start(RtspSource {
        fps: SOURCE_FPS,
        width: 320,
        height: 240,
        pattern: "ball".into(),
        ..Default::default()
    })?;
    let http = free_port()?;
    let jsonl = dir.path().join("docs.jsonl");
    let cfg = dir.path().join("pipeline.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nmax_batch = 1\nmax_new_tokens = 24\n\n[broker]\nlisten = \"127.0.0.1:{}\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{http}\"\n\n[jsonl]\npath = \"{}\"\n\n\
             [[streams]]\nname = \"fast\"\nuri = \"{}\"\nsource = \"rtspsrc\"\ntransport = \"tcp\"\n\
             latency_ms = 0\nmax_fps = 1000\nno_frame_timeout_s = 10\ncategories = [\"ball\", \"person\"]\n",
            free_port()?,
            jsonl.display(),
            cam.url()
        ),
    )?;
    let mut rex = Rexstream::run(&cfg, &tiny_model()?, Some(http))?;
    rex.wait_healthy(Duration::from_secs(180))?;
    let s = [("stream", "fast")];
    wait_metric(
        &rex,
        "rexstream_frames_processed_total",
        &s,
        Duration::from_secs(60),
        |v| v > 0.0,
    )?;
    std::thread::sleep(warmup);

    // Start of the measured window.
    let pid = rex.proc.pid();
    let rss_start = rss_kib(pid)?;
    let docs_start = docs_from(&jsonl)?.len();
    let (m0, c0, _) = Counters::snapshot(&rex)?;
    let t0 = Instant::now();
    let mut rss_max = rss_start;
    while t0.elapsed() < load {
        std::thread::sleep(Duration::from_secs(1));
        rss_max = rss_max.max(rss_kib(pid)?);
        if !rex.proc.running() {
            bail!(
                "rexstream exited under load; log:\n{}",
                tail(&rex.log(), 60)
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let rss_end = rss_kib(pid)?;
    let (m1, c1, tries) = Counters::snapshot(&rex)?;
    let Counters {
        received,
        processed,
        superseded,
        dropped: dropped_all,
    } = c1;
    let docs: Vec<Value> = docs_from(&jsonl)?.into_iter().skip(docs_start).collect();

    let source_fps = (received - c0.received) / secs;
    let detector_fps = (processed - c0.processed) / secs;
    let overload = source_fps / detector_fps;
    let e2e: Vec<f64> = docs
        .iter()
        .filter_map(|d| d["timing"]["end_to_end_ms"].as_f64())
        .collect();
    let periods: Vec<f64> = docs.iter().filter_map(period_ms).collect();
    let (p50, p99) = (percentile(&e2e, 0.50), percentile(&e2e, 0.99));
    let (period, period_p99) = (percentile(&periods, 0.50), percentile(&periods, 0.99));
    let bound = LATENCY_BOUND_PERIODS * period_p99;
    let queue: Vec<f64> = docs
        .iter()
        .filter_map(|d| d["timing"]["queue_ms"].as_f64())
        .collect();
    let queue_p99 = percentile(&queue, 0.99);
    let name = "rexstream_end_to_end_latency_seconds";
    let (h0, h1) = (
        histogram_buckets(&m0, name, &s),
        histogram_buckets(&m1, name, &s),
    );
    let (hp50, hp99) = (
        histogram_quantile(0.50, &h0, &h1) * 1e3,
        histogram_quantile(0.99, &h0, &h1) * 1e3,
    );
    // Latency trend: the last third of the run against the first third.
    let third = e2e.len() / 3;
    let (early, late) = (
        percentile(&e2e[..third], 0.5),
        percentile(&e2e[e2e.len() - third..], 0.5),
    );
    let unaccounted = received - processed - dropped_all;
    println!(
        "overload ({:.0} s after {:.0} s warm-up): source {source_fps:.1} fps, detector {detector_fps:.2} fps \
         (×{:.1} overload); {} documents; e2e latency p50 {p50:.0} ms, p99 {p99:.0} ms (bound {bound:.0} ms = \
         {LATENCY_BOUND_PERIODS} × p99 detector period {period_p99:.0} ms; median period {period:.0} ms, \
         p99 queue wait {queue_p99:.0} ms); histogram p50 {hp50:.0} ms, p99 \
         {hp99:.0} ms; median latency first third {early:.0} ms, last third {late:.0} ms; RSS start {} KiB, \
         end {} KiB ({:+.1} %), max {} KiB; dropped superseded {superseded}, received {received}, processed \
         {processed}, unaccounted {unaccounted} (one scrape, consistent after {tries} tries)",
        secs,
        warmup.as_secs_f64(),
        overload,
        docs.len(),
        rss_start,
        rss_end,
        (rss_end as f64 / rss_start as f64 - 1.0) * 100.0,
        rss_max,
    );

    assert!(docs.len() >= 10, "only {} documents under load", docs.len());
    assert!(
        p99 < bound,
        "e2e p99 {p99:.0} ms ≥ bound {bound:.0} ms ({LATENCY_BOUND_PERIODS} × {period_p99:.0} ms)"
    );
    // Nothing queues: the time from capture to the start of a frame's batch stays under one
    // (median) detector period — the slot hands over the newest frame when the worker asks.
    assert!(
        queue_p99 < QUEUE_BOUND_PERIODS * period,
        "p99 queue wait {queue_p99:.0} ms ≥ median detector period {period:.0} ms: frames are queueing"
    );
    assert!(
        (rss_end as f64) <= (1.0 + RSS_GROWTH) * rss_start as f64,
        "RSS grew from {rss_start} KiB to {rss_end} KiB (> {:.0} %)",
        RSS_GROWTH * 100.0
    );
    // Every received frame is processed, dropped, or one of the ≤ HELD not yet counted either way;
    // exact, because all counters come from one consistent scrape.
    assert!(
        (0.0..=HELD).contains(&unaccounted),
        "frame accounting off by {unaccounted}: received {received}, processed {processed}, dropped {dropped_all}"
    );
    if overload >= MIN_OVERLOAD {
        assert!(
            superseded > 0.0,
            "no superseded drops under ×{overload:.1} overload"
        );
        // Under overload the only drops are superseded frames (no invalid frames, no detector errors).
        assert_eq!(
            superseded, dropped_all,
            "drops other than superseded under overload"
        );
    } else {
        println!(
            "SKIPPED the overload-only assertions (superseded drops): the detector kept up, {detector_fps:.2} fps \
             against a {source_fps:.1} fps source (×{overload:.1} < ×{MIN_OVERLOAD}); on this machine a \
             {SOURCE_FPS} fps camera is not an overload. The latency, memory and accounting checks above ran."
        );
    }
    Ok(())
}
