//! Camera faults against the real ingest (issue 5 item 2, issue 6 item 2): the `rexstream` binary
//! on a tiny checkpoint watches two `rtsp-serve` cameras.
//!
//! - Killed camera (SIGKILL, TCP transport: the client sees EOS): `rexstream_stream_up` goes 1 → 0,
//!   the pipeline is rebuilt with back-off, frames resume within 3 s of the server's return, and the
//!   healthy camera keeps its processed rate meanwhile.
//! - Hung camera (SIGSTOP: nothing arrives, not even an error) is caught by the no-frame watchdog
//!   within its configured timeout (`reason="timeout"`).
//!
//! Run: `cargo test -p rexstream-e2e --test reconnect -- --nocapture` (prints the figures).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rexstream_e2e::{
    free_port, metric_sum, tiny_model, wait_until, Mosquitto, Rexstream, RtspServer, RtspSource,
    TempDir,
};

/// Watchdog and back-off settings of the test pipeline (seconds).
const NO_FRAME_TIMEOUT_S: f64 = 2.0;
const RECONNECT_MIN_S: f64 = 0.2;
const RECONNECT_MAX_S: f64 = 1.0;

fn value(rex: &Rexstream, name: &str, labels: &[(&str, &str)]) -> f64 {
    rex.metrics()
        .map(|m| metric_sum(&m, name, labels))
        .unwrap_or(f64::NAN)
}

#[test]
fn killed_and_hung_cameras_reconnect_while_the_other_stream_goes_on() -> Result<()> {
    let dir = TempDir::new("reconnect")?;
    let broker = Mosquitto::start()?;
    let mut flaky = RtspServer::start(RtspSource {
        fps: 10,
        ..Default::default()
    })?;
    let steady = RtspServer::start(RtspSource {
        fps: 10,
        pattern: "smpte".into(),
        ..Default::default()
    })?;
    let http_port = free_port()?;
    let mut cfg = format!(
        "[model]\nmax_batch = 2\nmax_new_tokens = 16\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n[metrics]\nlisten = \"127.0.0.1:{http_port}\"\n",
        broker.port
    );
    // Motion gating off: the steady stream is a still pattern whose processing rate is measured.
    for (name, url) in [("flaky", flaky.url()), ("steady", steady.url())] {
        cfg.push_str(&format!(
            "[[streams]]\nname = \"{name}\"\nuri = \"{url}\"\nsource = \"rtspsrc\"\ntransport = \"tcp\"\nlatency_ms = 0\n\
             max_fps = 4\nno_frame_timeout_s = {NO_FRAME_TIMEOUT_S}\nreconnect_min_s = {RECONNECT_MIN_S}\n\
             reconnect_max_s = {RECONNECT_MAX_S}\ncategories = [\"ball\"]\n\
             [streams.motion]\nenabled = false\n"
        ));
    }
    let path = dir.path().join("pipeline.toml");
    std::fs::write(&path, cfg)?;
    let mut rex = Rexstream::run(&path, &tiny_model()?, Some(http_port))?;
    rex.wait_healthy(Duration::from_secs(120))?;
    let up = |rex: &Rexstream, s: &str| value(rex, "rexstream_stream_up", &[("stream", s)]);
    let processed =
        |rex: &Rexstream, s: &str| value(rex, "rexstream_frames_processed_total", &[("stream", s)]);
    let received =
        |rex: &Rexstream, s: &str| value(rex, "rexstream_frames_received_total", &[("stream", s)]);
    wait_until(
        "both streams up and processed",
        Duration::from_secs(90),
        || {
            (up(&rex, "flaky") == 1.0
                && up(&rex, "steady") == 1.0
                && processed(&rex, "steady") > 2.0)
                .then_some(())
        },
    )
    .with_context(|| rex.log())?;

    // Healthy rate of the steady stream, before the fault.
    let window = Duration::from_secs(6);
    let p0 = processed(&rex, "steady");
    std::thread::sleep(window);
    let rate_before = (processed(&rex, "steady") - p0) / window.as_secs_f64();

    // 1. Kill the flaky camera.
    flaky.kill();
    let t_kill = Instant::now();
    wait_until("flaky down", Duration::from_secs(10), || {
        (up(&rex, "flaky") == 0.0).then_some(())
    })
    .with_context(|| rex.log())?;
    let detect_s = t_kill.elapsed().as_secs_f64();
    let p1 = processed(&rex, "steady");
    // The outage itself: a few seconds of a missing camera, the scenario under test.
    std::thread::sleep(Duration::from_secs(4));
    let outage_s = t_kill.elapsed().as_secs_f64() - detect_s;
    let rate_during = (processed(&rex, "steady") - p1) / outage_s;
    let reconnects_during = value(&rex, "rexstream_reconnects_total", &[("stream", "flaky")]);

    let r0 = received(&rex, "flaky");
    flaky.restart()?;
    let t_back = Instant::now();
    wait_until("flaky frames again", Duration::from_secs(10), || {
        (received(&rex, "flaky") > r0).then_some(())
    })
    .with_context(|| rex.log())?;
    let resume_s = t_back.elapsed().as_secs_f64();
    wait_until("flaky up again", Duration::from_secs(5), || {
        (up(&rex, "flaky") == 1.0).then_some(())
    })?;
    println!(
        "kill: down detected in {detect_s:.2} s, {reconnects_during} reconnect attempts during the outage, \
         frames resumed {resume_s:.2} s after the server returned; steady stream {rate_before:.2} docs/s before, \
         {rate_during:.2} docs/s during"
    );
    assert!(
        resume_s <= 3.0,
        "frames resumed only {resume_s:.2} s after the server came back"
    );
    assert!(reconnects_during >= 1.0);
    assert!(
        rate_during >= 0.7 * rate_before,
        "steady stream slowed: {rate_before:.2} → {rate_during:.2} docs/s"
    );

    // 2. Hang it: the watchdog must notice within its timeout (plus one bus poll and a scrape).
    let timeouts0 = value(
        &rex,
        "rexstream_reconnects_total",
        &[("stream", "flaky"), ("reason", "timeout")],
    );
    flaky.proc.signal("STOP")?;
    let t_stop = Instant::now();
    wait_until(
        "watchdog timeout",
        Duration::from_secs_f64(NO_FRAME_TIMEOUT_S + 3.0),
        || {
            (value(
                &rex,
                "rexstream_reconnects_total",
                &[("stream", "flaky"), ("reason", "timeout")],
            ) > timeouts0)
                .then_some(())
        },
    )
    .with_context(|| rex.log())?;
    let hung_s = t_stop.elapsed().as_secs_f64();
    println!(
        "hung camera detected by the watchdog after {hung_s:.2} s (timeout {NO_FRAME_TIMEOUT_S} s)"
    );
    assert!(
        hung_s >= NO_FRAME_TIMEOUT_S - 0.5,
        "watchdog fired early: {hung_s:.2} s"
    );
    flaky.kill();

    rex.proc.signal("INT")?;
    assert_eq!(
        rex.proc.wait_exit(Duration::from_secs(60))?,
        Some(0),
        "log:\n{}",
        rex.log()
    );
    Ok(())
}
