//! Camera faults, for real (issue 6 item 2): two `rtsp-serve` cameras feed the `rexstream` binary
//! (tiny fixture checkpoint); one camera process is SIGKILLed and restarted on the same port, then
//! SIGSTOPped (a hung camera: TCP stays open, nothing arrives).
//!
//! Asserted and printed:
//! - `rexstream_stream_up{stream="flaky"}` goes 1 → 0 after the kill and 0 → 1 after the restart;
//! - frames resume (`rexstream_frames_received_total` grows) within [`RESUME_BOUND`] of the
//!   server's return (its port accepting again);
//! - the healthy stream keeps its processed rate during the outage (≥ [`KEEP_RATE`] of the rate
//!   before, over 10 s windows);
//! - a SIGSTOPped camera is detected by the no-frame watchdog
//!   (`rexstream_reconnects_total{reason="timeout"}` +1) within `no_frame_timeout_s` +
//!   [`WATCHDOG_LATE`] and not before `no_frame_timeout_s` − [`WATCHDOG_EARLY`], and after SIGCONT
//!   frames come back;
//! - after all that, SIGINT ends the process with status 0.
//!
//! Every wall-clock bound below states its margin over what this test printed. Measured
//! 2026-11-30 14:38–14:41, 14:55–14:56 and 15:21 UTC, five runs of
//! `nice -n 10 cargo test -p rexstream-e2e --test reliability_camera -- --nocapture` on the 2-core
//! development box with other sessions' builds running (load average 14–20; the detector was
//! 94–99 % busy, so the healthy stream got 1.0–1.3 fps instead of its `max_fps` 1.5), tiny-tied
//! checkpoint, debug profile: first frame after the server's return 0.53 / 0.31 / 0.47 / 0.26 /
//! 0.37 s; watchdog 2.26 / 2.18 / 2.26 / 2.20 / 2.13 s; healthy rate during/before 1.00 / 0.92 /
//! 1.24 / 1.41 / 0.94. (On 2026-11-26,
//! load 3–10: first frame 0.16–0.88 s, watchdog 2.21–2.22 s, rate ratio 1.00.) The `wait_metric`
//! timeouts of 30–180 s are not bounds on the property: they only stop a test whose event never
//! comes (30 s is ≥ 13× the slowest such event printed: stream_up 1→0 0.06–0.07 s, watchdog
//! 2.26 s, frames back after SIGCONT 0.17–1.59 s).
//!
//! Run: `cargo test -p rexstream-e2e --test reliability_camera -- --nocapture`.

use std::time::{Duration, Instant};

use anyhow::Result;
use rexstream_e2e::faults::{metric, tail, wait_metric};
use rexstream_e2e::{free_port, tiny_model, Rexstream, RtspServer, RtspSource, TempDir};

/// Issue 6: frames resume within 3 s of the server's return. Arithmetic: the back-off is capped at
/// `reconnect_max_s = 1` (≤ 1.25 s with jitter), a rebuild connects in well under a second on
/// loopback and the camera sends a keyframe every second, so ≤ ~2.5 s even when an attempt has
/// just failed. Measured 0.26–0.53 s (2026-11-30, load 14–20) and 0.16–0.88 s (2026-11-26): the
/// bound is 3.4× the slowest resume seen. A back-off that ignores its cap breaks it (tried
/// 2026-11-30: first frame 7.15 s after the return; see docs/reliability.md).
const RESUME_BOUND: Duration = Duration::from_secs(3);
/// Share of the healthy stream's rate that must survive the other camera's outage. Over a 10 s
/// window at 1.0–1.5 fps one frame is 7–10 % of the rate, so 0.8 allows two frames of jitter.
/// Measured during/before: 1.00, 0.92, 1.24, 1.41, 0.94 (2026-11-30, detector saturated by the box's load;
/// the outage frees detector time, so the ratio tends to rise) and 1.00 (2026-11-26). The worst,
/// 0.92, is 0.12 above the bound.
const KEEP_RATE: f64 = 0.8;
/// How late the watchdog may fire after `no_frame_timeout_s`: its 100 ms bus-loop poll plus this
/// test's metric polling (one scrape per ~50 ms) on a loaded box. Measured 0.13–0.26 s late
/// (2026-11-30, load 14–20) and 0.21–0.22 s (2026-11-26): the bound is ~4× the latest seen; a
/// watchdog at twice its timeout (breakage tried, see docs/reliability.md) fires 2.17 s late.
const WATCHDOG_LATE: f64 = 1.0;
/// How early a timeout reconnect may be seen: it never came early in any run (it cannot, the
/// watchdog counts from the last frame, which precedes the SIGSTOP); the 0.5 s allow for a frame
/// in flight at the SIGSTOP. Earlier than that, it was not the watchdog.
const WATCHDOG_EARLY: f64 = 0.5;
/// The flaky stream's watchdog (seconds without a frame → reconnect).
const NO_FRAME_TIMEOUT_S: f64 = 2.0;
/// How long the killed camera stays away ("a few seconds").
/// Long enough that the healthy stream's rate over it is not dominated by ±1 frame.
const OUTAGE: Duration = Duration::from_secs(10);
/// Detector rate per stream: low enough that the tiny CPU model serves both streams with
/// headroom (2 × 1.5 = 3 frames/s; it managed ~3.8 frames/s at 88 % busy on the shared 2-core box
/// at load 10), so the healthy stream's rate is set by `max_fps`, not by how much CPU the box's
/// other tenants leave the detector (at 2 fps the detector saturated and the rate wobbled ±25 %).
const MAX_FPS: f64 = 1.5;

fn config(
    dir: &std::path::Path,
    http: u16,
    broker: u16,
    flaky: &str,
    steady: &str,
) -> Result<std::path::PathBuf> {
    // Motion gating off: the steady stream is a still pattern whose processing is counted.
    let stream = |name: &str, url: &str| {
        format!(
            "[[streams]]\nname = \"{name}\"\nuri = \"{url}\"\nsource = \"rtspsrc\"\ntransport = \"tcp\"\n\
             latency_ms = 0\nmax_fps = {MAX_FPS}\nno_frame_timeout_s = {NO_FRAME_TIMEOUT_S}\n\
             reconnect_min_s = 0.25\nreconnect_max_s = 1.0\ncategories = [\"ball\"]\n\
             [streams.motion]\nenabled = false\n\n"
        )
    };
    let text = format!(
        "[model]\nmax_batch = 2\nmax_new_tokens = 16\n\n[broker]\nlisten = \"127.0.0.1:{broker}\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{http}\"\n\n{}{}",
        stream("flaky", flaky),
        stream("steady", steady)
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn processed(rex: &Rexstream, stream: &str) -> Result<f64> {
    metric(
        rex,
        "rexstream_frames_processed_total",
        &[("stream", stream)],
    )
}

/// Counters that explain a rate change: frames received by `stream`, and the detector's busy time
/// (sum of its stage latencies) and batch count.
fn diag(rex: &Rexstream, stream: &str) -> Result<[f64; 3]> {
    let busy: f64 = ["preprocess", "vision", "prefill", "decode", "parse"]
        .iter()
        .map(|st| metric(rex, "rexstream_stage_latency_seconds_sum", &[("stage", st)]))
        .sum::<Result<f64>>()?;
    Ok([
        metric(
            rex,
            "rexstream_frames_received_total",
            &[("stream", stream)],
        )?,
        busy,
        metric(rex, "rexstream_batch_size_count", &[])?,
    ])
}

/// Processed frames per second of `stream` over `window`; prints the diagnostics beside it.
fn rate(rex: &Rexstream, stream: &str, window: Duration) -> Result<f64> {
    let (a, d0, t) = (processed(rex, stream)?, diag(rex, stream)?, Instant::now());
    std::thread::sleep(window);
    let (b, d1, secs) = (
        processed(rex, stream)?,
        diag(rex, stream)?,
        t.elapsed().as_secs_f64(),
    );
    let batches = d1[2] - d0[2];
    println!(
        "  {stream}: processed {:.2} fps, received {:.1} fps; detector {batches} batches, busy {:.0} % \
         ({:.0} ms per batch) over {secs:.1} s",
        (b - a) / secs,
        (d1[0] - d0[0]) / secs,
        (d1[1] - d0[1]) / secs * 100.0,
        (d1[1] - d0[1]) / batches.max(1.0) * 1e3
    );
    Ok((b - a) / secs)
}

#[test]
fn camera_killed_restarted_and_hung() -> Result<()> {
    let dir = TempDir::new("rel-camera")?;
    let src = RtspSource {
        fps: 15,
        ..Default::default()
    };
    let mut flaky = RtspServer::start(src.clone())?;
    let steady = RtspServer::start(RtspSource {
        pattern: "smpte".into(),
        ..src
    })?;
    let http = free_port()?;
    let cfg = config(dir.path(), http, free_port()?, &flaky.url(), &steady.url())?;
    let mut rex = Rexstream::run(&cfg, &tiny_model()?, Some(http))?;
    rex.wait_healthy(Duration::from_secs(180))?;
    fn up(s: &str) -> [(&str, &str); 1] {
        [("stream", s)]
    }
    for s in ["flaky", "steady"] {
        wait_metric(
            &rex,
            "rexstream_stream_up",
            &up(s),
            Duration::from_secs(60),
            |v| v == 1.0,
        )?;
        wait_metric(
            &rex,
            "rexstream_frames_processed_total",
            &up(s),
            Duration::from_secs(60),
            |v| v > 0.0,
        )?;
    }

    // Healthy stream's rate with both cameras up.
    let before = rate(&rex, "steady", OUTAGE)?;

    // --- Outage: SIGKILL the camera, keep it away, bring it back on the same port.
    let killed = Instant::now();
    flaky.kill();
    let (_, down_at) = wait_metric(
        &rex,
        "rexstream_stream_up",
        &up("flaky"),
        Duration::from_secs(30),
        |v| v == 0.0,
    )?;
    let detect_kill = down_at - killed;
    let during = rate(&rex, "steady", OUTAGE.saturating_sub(killed.elapsed()))?;
    let received_before = metric(&rex, "rexstream_frames_received_total", &up("flaky"))?;
    flaky.restart()?; // returns once the port accepts again: the server is back
    let back = Instant::now();
    let outage = back - killed;
    let (_, resumed_at) = wait_metric(
        &rex,
        "rexstream_frames_received_total",
        &up("flaky"),
        Duration::from_secs(30),
        |v| v > received_before,
    )?;
    let resume = resumed_at - back;
    let (_, up_at) = wait_metric(
        &rex,
        "rexstream_stream_up",
        &up("flaky"),
        Duration::from_secs(30),
        |v| v == 1.0,
    )?;
    let reconnects = metric(&rex, "rexstream_reconnects_total", &up("flaky"))?;
    println!(
        "camera outage: server down {:.1} s, stream_up 1→0 after {:.2} s, server back → first frame {:.2} s \
         (bound {:.0} s), stream_up 0→1 after {:.2} s; reconnect attempts {reconnects}; healthy stream \
         processed {before:.2} fps before, {during:.2} fps during the outage",
        outage.as_secs_f64(),
        detect_kill.as_secs_f64(),
        resume.as_secs_f64(),
        RESUME_BOUND.as_secs_f64(),
        (up_at - back).as_secs_f64(),
    );
    assert!(
        resume <= RESUME_BOUND,
        "frames resumed {:.2} s after the server returned (bound {RESUME_BOUND:?}); log:\n{}",
        resume.as_secs_f64(),
        tail(&rex.log(), 40)
    );
    assert!(
        reconnects >= 1.0,
        "no reconnect attempt counted for the killed camera"
    );
    assert!(
        before > 0.0,
        "healthy stream processed nothing before the outage"
    );
    assert!(
        during >= KEEP_RATE * before,
        "healthy stream slowed from {before:.2} to {during:.2} fps during the other camera's outage"
    );

    // --- Hung camera: SIGSTOP. TCP stays open and silent; only the watchdog can notice.
    wait_metric(
        &rex,
        "rexstream_frames_processed_total",
        &up("flaky"),
        Duration::from_secs(30),
        {
            let p = processed(&rex, "flaky")?;
            move |v| v > p
        },
    )?;
    let timeouts = metric(
        &rex,
        "rexstream_reconnects_total",
        &[("stream", "flaky"), ("reason", "timeout")],
    )?;
    let stopped = Instant::now();
    flaky.proc.signal("STOP")?;
    let (_, detected_at) = wait_metric(
        &rex,
        "rexstream_reconnects_total",
        &[("stream", "flaky"), ("reason", "timeout")],
        Duration::from_secs(30),
        |v| v > timeouts,
    )?;
    let detect = detected_at - stopped;
    let up_now = metric(&rex, "rexstream_stream_up", &up("flaky"))?;
    let steady_during_hang = rate(&rex, "steady", Duration::from_secs(3))?;
    flaky.proc.signal("CONT")?;
    let continued = Instant::now();
    let received = metric(&rex, "rexstream_frames_received_total", &up("flaky"))?;
    let (_, back_at) = wait_metric(
        &rex,
        "rexstream_frames_received_total",
        &up("flaky"),
        Duration::from_secs(30),
        |v| v > received,
    )?;
    println!(
        "hung camera (SIGSTOP): watchdog fired after {:.2} s (no_frame_timeout_s = {NO_FRAME_TIMEOUT_S}), \
         stream_up then {up_now}; healthy stream {steady_during_hang:.2} fps while hung; frames back \
         {:.2} s after SIGCONT",
        detect.as_secs_f64(),
        (back_at - continued).as_secs_f64()
    );
    assert!(
        detect.as_secs_f64() <= NO_FRAME_TIMEOUT_S + WATCHDOG_LATE,
        "watchdog took {:.2} s for a {NO_FRAME_TIMEOUT_S} s timeout",
        detect.as_secs_f64()
    );
    assert!(
        detect.as_secs_f64() >= NO_FRAME_TIMEOUT_S - WATCHDOG_EARLY,
        "disconnect seen after {:.2} s, before the watchdog could fire: not the watchdog",
        detect.as_secs_f64()
    );
    assert_eq!(up_now, 0.0, "stream_up still 1 after the watchdog fired");
    assert!(
        rex.proc.running(),
        "rexstream exited; log:\n{}",
        tail(&rex.log(), 40)
    );
    flaky.kill();

    // After all that, a clean shutdown: SIGINT → exit status 0.
    rex.proc.signal("INT")?;
    assert_eq!(
        rex.proc.wait_exit(Duration::from_secs(60))?,
        Some(0),
        "log:\n{}",
        tail(&rex.log(), 40)
    );
    Ok(())
}
