//! The motion gate through the real binary (issue 12 item 1): two `rtsp-serve` cameras, one still
//! (videotestsrc `smpte`) and one moving (`ball`), both with the gate on, into `rexstream` on a tiny
//! fixture checkpoint and a real mosquitto.
//!
//! - The still stream's frames are dropped before the detector (`rexstream_frames_dropped_total
//!   {reason="no_motion"}` grows with the frames received) and never reach it: its documents are the
//!   first frame and one per `refresh_s`, so consecutive documents' frames are at least `refresh_s` apart
//!   in stream time, and every received frame is accounted for (processed, gated, superseded, held).
//! - The moving stream is not gated (no `no_motion` drops beyond its first frames, documents keep coming).
//! - Retained `rexstream/<stream>/motion`: `OFF` for the still camera, `ON` for the moving one, seen by a
//!   subscriber that connects afterwards; `rexstream_motion_active` says the same.
//! - A prompt change over MQTT serves the still stream's next frame at once, before the next refresh.
//!
//! Run: `cargo test -p rexstream-e2e --test motion_gate -- --nocapture` (prints the figures).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use rexstream_e2e::{
    free_port, metric_sum, mosquitto_pub, tiny_model, wait_until, Message, Mosquitto, Rexstream,
    RtspServer, RtspSource, Subscriber, TempDir,
};
use serde_json::Value;

/// Still stream's refresh: long against the frame period (0.1 s), short against the test.
const REFRESH_S: f64 = 6.0;

fn parse(m: &Message) -> Result<Value> {
    serde_json::from_str(&m.payload)
        .with_context(|| format!("not JSON on {}: {}", m.topic, m.payload))
}

fn pts_s(d: &Value) -> f64 {
    d["frame"]["pts_ns"].as_f64().unwrap_or(f64::NAN) / 1e9
}

#[test]
fn still_camera_is_gated_moving_camera_is_served() -> Result<()> {
    let dir = TempDir::new("motion")?;
    let broker = Mosquitto::start()?;
    // `smpte100`, not `smpte`: videotestsrc's `smpte` has a block of animated snow in its lower right
    // corner (≈3 600 of 76 800 pixels change by ≥ 30 levels every frame, measured from the decoded RTSP
    // stream), which is real motion to the gate; `smpte100`'s decoded frames do not change at all.
    let still = RtspServer::start(RtspSource {
        fps: 10,
        pattern: "smpte100".into(),
        ..Default::default()
    })?;
    let moving = RtspServer::start(RtspSource {
        fps: 10,
        pattern: "ball".into(),
        ..Default::default()
    })?;
    let http_port = free_port()?;
    let mut cfg = format!(
        "[model]\nmax_batch = 2\nmax_new_tokens = 16\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n\
         [metrics]\nlisten = \"127.0.0.1:{http_port}\"\n",
        broker.port
    );
    for (name, url) in [("still", still.url()), ("moving", moving.url())] {
        // The gate is on by default; `[streams.motion]` only shortens the refresh.
        cfg.push_str(&format!(
            "[[streams]]\nname = \"{name}\"\nuri = \"{url}\"\nsource = \"rtspsrc\"\ntransport = \"tcp\"\n\
             latency_ms = 0\nmax_fps = 5\ncategories = [\"ball\"]\n[streams.motion]\nrefresh_s = {REFRESH_S}\n"
        ));
    }
    let path = dir.path().join("pipeline.toml");
    std::fs::write(&path, cfg)?;
    let sub = Subscriber::start(broker.port, &["rexstream/+/detections"])?;
    let mut rex = Rexstream::run(&path, &tiny_model()?, Some(http_port))?;
    rex.wait_healthy(Duration::from_secs(120))?;

    // Long enough for the first frame and at least two refreshes of the still stream.
    let window = Duration::from_secs_f64(REFRESH_S * 3.0 + 3.0);
    let msgs = sub.collect_until(window, |_| false);
    let docs: Vec<Value> = msgs.iter().map(parse).collect::<Result<_>>()?;
    let of = |s: &str| docs.iter().filter(|d| d["stream"] == s).collect::<Vec<_>>();
    let (ds, dm) = (of("still"), of("moving"));
    let metrics = rex.metrics()?;
    let m = |name: &str, labels: &[(&str, &str)]| metric_sum(&metrics, name, labels);
    let count = |s| {
        (
            m("rexstream_frames_received_total", &[("stream", s)]),
            m("rexstream_frames_processed_total", &[("stream", s)]),
            m(
                "rexstream_frames_dropped_total",
                &[("stream", s), ("reason", "no_motion")],
            ),
            m("rexstream_frames_dropped_total", &[("stream", s)]),
        )
    };
    let (s_recv, s_proc, s_gated, s_dropped) = count("still");
    let (m_recv, m_proc, m_gated, _) = count("moving");
    println!(
        "still: {} docs, received {s_recv}, processed {s_proc}, no_motion {s_gated}; \
         moving: {} docs, received {m_recv}, processed {m_proc}, no_motion {m_gated}",
        ds.len(),
        dm.len()
    );

    // Still: gated. The first frame plus one per refresh; everything else dropped before the detector.
    if ds.is_empty() {
        bail!("no document for the still stream; log:\n{}", rex.log());
    }
    assert!(
        s_recv >= 100.0,
        "still stream received only {s_recv} frames"
    );
    assert!(
        s_gated >= s_recv * 0.8,
        "still: {s_gated} of {s_recv} gated; log:\n{}",
        rex.log()
    );
    let pts: Vec<f64> = ds.iter().map(|d| pts_s(d)).collect();
    for w in pts.windows(2) {
        assert!(
            w[1] - w[0] >= REFRESH_S - 0.15,
            "still documents {:.2} s apart in stream time (refresh_s {REFRESH_S}): {pts:?}",
            w[1] - w[0]
        );
    }
    let bound = 2.0 + s_recv / 10.0 / REFRESH_S;
    assert!(s_proc <= bound, "still: {s_proc} processed > {bound:.1}");
    // Every frame is accounted for: processed, dropped (gated or superseded), or held (slot + batch).
    assert!(
        (s_recv - s_proc - s_dropped).abs() <= 2.0,
        "still: received {s_recv}, processed {s_proc}, dropped {s_dropped}"
    );

    // Moving: served. Not gated after the first frames; its documents keep coming.
    assert!(dm.len() >= 5, "moving stream: only {} documents", dm.len());
    assert!(m_gated <= 3.0, "moving stream gated {m_gated} frames");

    // The motion state: gauge and retained MQTT topic for a subscriber that comes late.
    assert_eq!(m("rexstream_motion_active", &[("stream", "still")]), 0.0);
    assert_eq!(m("rexstream_motion_active", &[("stream", "moving")]), 1.0);
    let late = Subscriber::start(broker.port, &["rexstream/+/motion"])?;
    let mut state = std::collections::BTreeMap::new();
    wait_until("retained motion topics", Duration::from_secs(10), || {
        while let Some(msg) = late.recv(Duration::from_millis(200)) {
            state.insert(msg.topic.clone(), (msg.payload.clone(), msg.retained));
        }
        (state.len() >= 2).then_some(())
    })?;
    assert_eq!(
        state.get("rexstream/still/motion"),
        Some(&("OFF".to_string(), true)),
        "{state:?}"
    );
    assert_eq!(
        state.get("rexstream/moving/motion"),
        Some(&("ON".to_string(), true)),
        "{state:?}"
    );

    // A prompt change serves the still stream's next frame without waiting for the refresh: publish it
    // right after a still document arrives, then the document for the new prompt must come from a frame
    // well before that document's refresh is due (stream time, so a slow detector does not matter).
    let next = sub.collect_until(Duration::from_secs_f64(REFRESH_S * 2.0 + 30.0), |m| {
        m.iter().any(|m| m.topic == "rexstream/still/detections")
    });
    let prev = next
        .iter()
        .filter(|m| m.topic == "rexstream/still/detections")
        .map(parse)
        .last()
        .with_context(|| {
            format!(
                "no refresh document for the still stream; log:\n{}",
                rex.log()
            )
        })??;
    mosquitto_pub(
        broker.port,
        "rexstream/still/prompt/set",
        r#"{"task":"detection","categories":["zebra"],"keypoint_type":null,"boxes":[]}"#,
        false,
    )?;
    let changed = sub.collect_until(Duration::from_secs(60), |m| {
        m.iter().any(|m| {
            m.topic == "rexstream/still/detections"
                && parse(m).is_ok_and(|d| d["prompt"]["categories"] == serde_json::json!(["zebra"]))
        })
    });
    let still_after: Vec<Value> = changed
        .iter()
        .filter(|m| m.topic == "rexstream/still/detections")
        .map(parse)
        .collect::<Result<_>>()?;
    let first_new = still_after
        .iter()
        .find(|d| d["prompt"]["categories"] == serde_json::json!(["zebra"]))
        .with_context(|| format!("prompt change never served a frame; log:\n{}", rex.log()))?;
    let gap = pts_s(first_new) - pts_s(&prev);
    println!("prompt change: served {gap:.2} s (stream time) after the previous still document");
    assert!(
        still_after[0]["prompt"]["categories"] == serde_json::json!(["zebra"])
            && gap < REFRESH_S - 1.0,
        "the prompt change waited for a refresh: {gap:.2} s, documents {still_after:?}"
    );

    rex.proc.signal("TERM")?;
    assert_eq!(
        rex.proc.wait_exit(Duration::from_secs(30))?,
        Some(0),
        "log:\n{}",
        rex.log()
    );
    Ok(())
}
