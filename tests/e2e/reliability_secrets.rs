//! Secrets stay secret (issue 6 item 7), against the `rexstream` binary: an RTSP password and an
//! MQTT password, both only in the environment, are used for real — a mosquitto that refuses
//! anonymous clients (password file made by the test) and two RTSP streams carrying the password
//! in their uri (`${VAR}` expansion and `password_env`), one of them pointing at a closed port so
//! that GStreamer errors quoting the uri are logged on every reconnect. After the documents flow
//! and several reconnects, the test greps the process's whole stdout/stderr (at `RUST_LOG=debug`,
//! including the shutdown), `/metrics` and `/healthz` for both passwords and finds neither.
//!
//! Run: `cargo test -p rexstream-e2e --test reliability_secrets -- --nocapture`.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rexstream_e2e::faults::{metric, tail, wait_metric};
use rexstream_e2e::{
    free_port, http_get, tiny_model, Mosquitto, Rexstream, RtspServer, RtspSource, TempDir,
};

const CAM_VAR: &str = "REXSTREAM_E2E_CAM_PASSWORD";
const MQTT_VAR: &str = "REXSTREAM_E2E_MQTT_PASSWORD";

/// A password no source file contains, so any hit is a leak.
fn password(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{tag}Pw{}x{nanos}", std::process::id())
}

#[test]
fn passwords_never_reach_logs_metrics_or_health() -> Result<()> {
    let dir = TempDir::new("rel-secrets")?;
    let (cam_pw, mqtt_pw) = (password("Cam"), password("Mqtt"));
    let passwd = dir.path().join("passwd");
    let st = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["rexuser", &mqtt_pw])
        .status()
        .context("run mosquitto_passwd")?;
    if !st.success() {
        bail!("mosquitto_passwd failed");
    }
    let broker = Mosquitto::start_with(
        free_port()?,
        &format!(
            "allow_anonymous false\npassword_file {}\n",
            passwd.display()
        ),
    )?;
    let cam = RtspServer::start(RtspSource::default())?;
    let closed = free_port()?; // nothing listens here: every attempt fails and is logged
    let http = free_port()?;
    let cfg = dir.path().join("pipeline.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nmax_batch = 2\nmax_new_tokens = 16\n\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nusername = \"rexuser\"\npassword_env = \"{MQTT_VAR}\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{http}\"\n\n\
             [[streams]]\nname = \"cam\"\nuri = \"rtsp://viewer:${{{CAM_VAR}}}@127.0.0.1:{}/cam\"\n\
             source = \"rtspsrc\"\nlatency_ms = 0\nmax_fps = 2\ncategories = [\"ball\"]\n\n\
             [[streams]]\nname = \"dead\"\nuri = \"rtsp://viewer@127.0.0.1:{closed}/cam\"\npassword_env = \"{CAM_VAR}\"\n\
             reconnect_min_s = 0.2\nreconnect_max_s = 0.5\nmax_fps = 2\ncategories = [\"ball\"]\n",
            broker.port, cam.port
        ),
    )?;
    let env: HashMap<String, String> = [
        (CAM_VAR.to_string(), cam_pw.clone()),
        (MQTT_VAR.to_string(), mqtt_pw.clone()),
        ("RUST_LOG".to_string(), "debug".to_string()),
    ]
    .into();
    let (c, m) = (
        cfg.display().to_string(),
        tiny_model()?.display().to_string(),
    );
    let mut rex = Rexstream::spawn(&["run", &c, "--model", &m], &env, Some(http))?;
    rex.wait_healthy(Duration::from_secs(180))?;
    // The passwords were really used: the broker only lets rexuser in with the right one, and
    // documents of the camera stream get published there.
    wait_metric(
        &rex,
        "rexstream_mqtt_connected",
        &[],
        Duration::from_secs(60),
        |v| v == 1.0,
    )?;
    wait_metric(
        &rex,
        "rexstream_events_published_total",
        &[("sink", "mqtt")],
        Duration::from_secs(90),
        |v| v >= 3.0,
    )?;
    wait_metric(
        &rex,
        "rexstream_reconnects_total",
        &[("stream", "dead")],
        Duration::from_secs(60),
        |v| v >= 3.0,
    )?;
    let metrics = rex.metrics()?;
    let (_, health) = http_get(http, "/healthz")?;
    let published = metric(
        &rex,
        "rexstream_events_published_total",
        &[("sink", "mqtt")],
    )?;
    rex.proc.signal("INT")?;
    let code = rex.proc.wait_exit(Duration::from_secs(60))?;
    let log = rex.log();

    let mut leaks = Vec::new();
    for (what, text) in [("log", &log), ("/metrics", &metrics), ("/healthz", &health)] {
        for (name, pw) in [("RTSP password", &cam_pw), ("MQTT password", &mqtt_pw)] {
            if text.contains(pw.as_str()) {
                let line = text.lines().find(|l| l.contains(pw.as_str())).unwrap_or("");
                leaks.push(format!("{name} in {what}: {line}"));
            }
        }
    }
    let redacted = log.matches("viewer:***@").count();
    let stream_lost = log.matches("Stream lost").count();
    println!(
        "secrets: searched {} log lines ({} KiB, RUST_LOG=debug, incl. {stream_lost} reconnect warnings and \
         {redacted} redacted uris), /metrics ({} B), /healthz ({} B) for the RTSP and MQTT passwords: {} \
         found; {published} documents published with the MQTT password; exit {code:?}",
        log.lines().count(),
        log.len() / 1024,
        metrics.len(),
        health.len(),
        leaks.len()
    );
    let sample = log
        .lines()
        .find(|l| l.contains("stream=dead") && l.contains("Stream lost"))
        .unwrap_or("<none>");
    println!("secrets: a reconnect line of the dead stream: {sample}");
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    assert!(
        stream_lost >= 3,
        "the dead stream's failures were not logged; log:\n{}",
        tail(&log, 40)
    );
    assert!(
        redacted >= 1,
        "no redacted uri in the log (is the uri logged at all?)"
    );
    assert_eq!(code, Some(0), "exit status; log:\n{}", tail(&log, 40));
    Ok(())
}
