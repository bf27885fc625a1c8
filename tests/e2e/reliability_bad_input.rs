//! Bad input, for real (issue 6 item 4), against the `rexstream` binary:
//!
//! - `malformed_config_files_fail_with_one_clear_error`: the binary is run on a set of broken
//!   pipeline files; each run exits non-zero without a panic and prints one error that names the
//!   file, the field (or line:col for TOML syntax) and the bad value. Prints one line per file.
//! - `corrupt_video_and_bad_prompts_leave_the_rest_running`: one healthy RTSP camera plus a
//!   truncated, byte-flipped H.264 stream file and a text file posing as video. The bad streams
//!   reconnect or end with a clear log line; the process and the healthy stream go on (its
//!   processed rate after the failures is compared with the rate before). Then malformed
//!   prompt-set messages are published over a real mosquitto: each is rejected
//!   (`rexstream_prompt_updates_total{result="rejected"}`), the retained `prompt/state` still holds
//!   the old prompt and new documents still use it; a valid message afterwards is accepted, so
//!   rejection is not blanket.
//!
//! Run: `cargo test -p rexstream-e2e --test reliability_bad_input -- --nocapture`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rexstream_e2e::faults::{corrupt_h264_stream, metric, not_video, tail, wait_metric};
use rexstream_e2e::{
    free_port, http_get, mosquitto_pub, tiny_model, Mosquitto, Rexstream, RtspServer, RtspSource,
    Subscriber, TempDir,
};
use serde_json::{json, Value};

/// One broken pipeline file and what its error must say.
struct BadConfig {
    name: &'static str,
    text: String,
    /// Substrings the error must contain besides the file path (field and value).
    expect: &'static [&'static str],
}

fn bad_configs(rtsp_ok: &str) -> Vec<BadConfig> {
    let stream = |extra: &str| {
        format!(
            "[[streams]]\nname = \"cam\"\nuri = \"{rtsp_ok}\"\ncategories = [\"person\"]\n{extra}"
        )
    };
    vec![
        BadConfig {
            name: "syntax",
            text: "[[streams]\nname = \"cam\"\n".into(),
            expect: &[":1:"],
        },
        BadConfig {
            name: "unknown_field",
            text: stream("max_fsp = 3\n"),
            expect: &["max_fsp"],
        },
        BadConfig {
            name: "wrong_type",
            text: stream("max_fps = \"fast\"\n"),
            expect: &["max_fps", "fast"],
        },
        BadConfig {
            name: "negative_rate",
            text: stream("max_fps = -1\n"),
            expect: &["streams[0].max_fps", "-1"],
        },
        BadConfig {
            name: "huge_timeout",
            text: stream("no_frame_timeout_s = 1e300\n"),
            expect: &["streams[0].no_frame_timeout_s", "1e300"],
        },
        BadConfig {
            name: "unknown_task",
            text: stream("task = \"teleport\"\n"),
            expect: &["task", "teleport"],
        },
        BadConfig {
            name: "missing_categories",
            text: format!("[[streams]]\nname = \"cam\"\nuri = \"{rtsp_ok}\"\ntask = \"detection\"\n"),
            expect: &["streams[0].task", "categories"],
        },
        BadConfig {
            name: "bad_stream_name",
            text: format!("[[streams]]\nname = \"a/b#\"\nuri = \"{rtsp_ok}\"\ncategories = [\"x\"]\n"),
            expect: &["streams[0].name", "a/b#"],
        },
        BadConfig {
            name: "missing_file",
            text: "[[streams]]\nname = \"f\"\nuri = \"no/such/clip.mp4\"\ncategories = [\"x\"]\n".into(),
            expect: &["streams[0].uri", "no/such/clip.mp4"],
        },
        BadConfig {
            name: "unset_password_env",
            text: "[[streams]]\nname = \"cam\"\nuri = \"rtsp://admin:${REXSTREAM_E2E_NOT_SET_42}@127.0.0.1/x\"\n\
                 categories = [\"x\"]\n"
                .to_string(),
            expect: &["streams[0].uri", "REXSTREAM_E2E_NOT_SET_42"],
        },
        BadConfig {
            name: "bad_device",
            text: format!("[model]\ndevice = \"tpu\"\n{}", stream("")),
            expect: &["model.device", "tpu"],
        },
        BadConfig {
            name: "bad_mqtt_url",
            text: format!("{}\n[mqtt]\nurl = \"ftp://127.0.0.1\"\n", stream("")),
            expect: &["mqtt.url", "ftp://127.0.0.1"],
        },
        BadConfig {
            name: "bad_metrics_listen",
            text: format!("[metrics]\nlisten = \"localhost:notaport\"\n{}", stream("")),
            expect: &["listen", "localhost:notaport"],
        },
        BadConfig {
            name: "no_streams",
            text: "[model]\nmax_batch = 2\n".into(),
            expect: &["streams"],
        },
        BadConfig {
            name: "zero_batch",
            text: format!("[model]\nmax_batch = 0\n{}", stream("")),
            expect: &["max_batch", "0"],
        },
        BadConfig {
            name: "not_utf8",
            text: String::new(), // written as raw bytes below
            expect: &["UTF-8"],
        },
    ]
}

#[test]
fn malformed_config_files_fail_with_one_clear_error() -> Result<()> {
    let dir = TempDir::new("rel-badcfg")?;
    let model = tiny_model()?;
    let mut failures = Vec::new();
    for case in bad_configs("rtsp://127.0.0.1:9/cam") {
        let path = dir.path().join(format!("{}.toml", case.name));
        if case.name == "not_utf8" {
            std::fs::write(&path, b"[[streams]]\nname = \"\xff\xfe\"\n")?;
        } else {
            std::fs::write(&path, &case.text)?;
        }
        let p = path.display().to_string();
        let m = model.display().to_string();
        let mut rex = Rexstream::spawn(&["run", &p, "--model", &m], &HashMap::new(), None)?;
        let code = rex.proc.wait_exit(Duration::from_secs(60))?;
        let log = rex.log();
        let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
        let first = errors.first().copied().unwrap_or("");
        println!("{:<20} exit {code:?}: {first}", case.name);
        let mut problems = Vec::new();
        if code.is_none() || code == Some(0) {
            problems.push(format!("exit status {code:?}"));
        }
        if log.contains("panicked") {
            problems.push("panicked".to_string());
        }
        if errors.len() != 1 {
            problems.push(format!("{} `error:` lines", errors.len()));
        }
        if !first.contains(&p) {
            problems.push(format!("error does not name the file {p}"));
        }
        for want in case.expect {
            if !first.contains(want) {
                problems.push(format!("error does not contain {want:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}\n{log}", case.name, problems.join(", ")));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} bad configs handled badly:\n{}",
            failures.len(),
            failures.join("\n---\n")
        );
    }
    Ok(())
}

fn processed(rex: &Rexstream, s: &str) -> Result<f64> {
    metric(rex, "rexstream_frames_processed_total", &[("stream", s)])
}

/// Processed frames per second of `stream` over `window`.
fn rate(rex: &Rexstream, s: &str, window: Duration) -> Result<f64> {
    let (a, t) = (processed(rex, s)?, Instant::now());
    std::thread::sleep(window);
    Ok((processed(rex, s)? - a) / t.elapsed().as_secs_f64())
}

/// The retained prompt/state of `stream`, read by a fresh subscriber.
fn retained_state(broker: u16, stream: &str) -> Result<Value> {
    let topic = format!("rexstream/{stream}/prompt/state");
    let sub = Subscriber::start(broker, &[&topic])?;
    let m = sub
        .recv(Duration::from_secs(5))
        .with_context(|| format!("no retained message on {topic}"))?;
    if !m.retained {
        bail!("{topic}: message not retained: {m:?}");
    }
    serde_json::from_str(&m.payload).with_context(|| m.payload.clone())
}

#[test]
fn corrupt_video_and_bad_prompts_leave_the_rest_running() -> Result<()> {
    let dir = TempDir::new("rel-badinput")?;
    let broker = Mosquitto::start()?;
    let cam = RtspServer::start(RtspSource::default())?;
    let corrupt = dir.path().join("corrupt.h264");
    corrupt_h264_stream(&corrupt)?;
    let garbage = dir.path().join("notvideo.mp4");
    not_video(&garbage)?;
    let http = free_port()?;
    let cfg = dir.path().join("pipeline.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nmax_batch = 2\nmax_new_tokens = 16\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{http}\"\n\n\
             [[streams]]\nname = \"good\"\nuri = \"{}\"\nsource = \"rtspsrc\"\nlatency_ms = 0\nmax_fps = 2\n\
             categories = [\"ball\"]\n\n\
             [[streams]]\nname = \"corrupt\"\nuri = \"{}\"\nmax_fps = 2\nreconnect_min_s = 0.5\nreconnect_max_s = 2\n\
             categories = [\"ball\"]\n\n\
             [[streams]]\nname = \"notvideo\"\nuri = \"{}\"\nmax_fps = 2\nreconnect_min_s = 0.5\nreconnect_max_s = 2\n\
             categories = [\"ball\"]\n",
            broker.port,
            cam.url(),
            corrupt.display(),
            garbage.display()
        ),
    )?;
    let docs = Subscriber::start(broker.port, &["rexstream/good/detections"])?;
    let mut rex = Rexstream::run(&cfg, &tiny_model()?, Some(http))?;
    rex.wait_healthy(Duration::from_secs(180))?;
    let good = [("stream", "good")];
    wait_metric(
        &rex,
        "rexstream_frames_processed_total",
        &good,
        Duration::from_secs(60),
        |v| v > 0.0,
    )?;
    let before = rate(&rex, "good", Duration::from_secs(8))?;

    // The non-video file fails at once: it must be logged and either retried or ended, never
    // take the process down.
    let nv_outcome = wait_until_ended_or_reconnected(&rex, "notvideo")?;
    let corrupt_outcome = wait_until_ended_or_reconnected(&rex, "corrupt")?;
    let after = rate(&rex, "good", Duration::from_secs(8))?;
    let log = rex.log();
    let line_for = |stream: &str| {
        log.lines()
            .filter(|l| {
                l.contains(&format!("stream={stream}")) || l.contains(&format!("stream: {stream}"))
            })
            .find(|l| l.contains("Stream lost") || l.contains("tream ended"))
            .map(str::to_string)
    };
    let (nv_line, c_line) = (line_for("notvideo"), line_for("corrupt"));
    println!(
        "bad video: notvideo → {nv_outcome}: {}; corrupt.h264 ({} frames decoded) → {corrupt_outcome}; healthy stream {before:.2} fps \
         before, {after:.2} fps after; process running {}",
        nv_line.as_deref().unwrap_or("<no log line>"),
        metric(&rex, "rexstream_frames_received_total", &[("stream", "corrupt")])?,
        rex.proc.running()
    );
    println!(
        "bad video: corrupt log line: {}",
        c_line.as_deref().unwrap_or("<none>")
    );
    assert!(
        rex.proc.running(),
        "rexstream exited; log:\n{}",
        tail(&log, 40)
    );
    assert!(
        nv_line.is_some(),
        "no clear log line for the non-video file; log:\n{}",
        tail(&log, 40)
    );
    assert!(
        c_line.is_some(),
        "no clear log line for the corrupt clip; log:\n{}",
        tail(&log, 40)
    );
    assert!(
        !log.contains("panicked"),
        "a thread panicked; log:\n{}",
        tail(&log, 40)
    );
    // The healthy stream keeps ≥ 80 % of its rate. Over an 8 s window at 1.1–1.6 fps one frame is
    // 8–11 % of the rate, so 0.8 allows about two frames of jitter. Measured 2026-11-30 14:59 and
    // 15:14 UTC, three runs of `nice -n 10 cargo test -p rexstream-e2e --test reliability_bad_input
    // -- --nocapture` (load 19–20): after/before = 1.12/1.25 (0.90), 1.37/1.12 (1.22), 1.62/1.62
    // (1.00). The worst is one frame above the bound: the tightest margin of the e2e suite.
    assert!(
        after >= 0.8 * before && after > 0.0,
        "healthy stream slowed from {before:.2} to {after:.2} fps"
    );
    let (status, health) = http_get(http, "/healthz")?;
    assert_eq!(status, 200, "{health}");

    // --- Malformed prompt-set messages: rejected, the old prompt stays.
    let old = retained_state(broker.port, "good")?;
    assert_eq!(
        old["categories"],
        json!(["ball"]),
        "initial retained state {old}"
    );
    let huge = format!(
        "{{\"task\":\"detection\",\"categories\":[\"{}\"]}}",
        "x".repeat(70 * 1024)
    );
    let bad: Vec<(&str, String)> = vec![
        ("not JSON", "person, car".into()),
        ("empty", String::new()),
        (
            "unknown task",
            r#"{"task":"teleport","categories":["x"]}"#.into(),
        ),
        ("no categories", r#"{"task":"detection"}"#.into()),
        (
            "empty categories",
            r#"{"task":"detection","categories":[]}"#.into(),
        ),
        (
            "wrong type",
            r#"{"task":"detection","categories":[1,2]}"#.into(),
        ),
        (
            "unknown field",
            r#"{"task":"detection","categories":["x"],"colour":"red"}"#.into(),
        ),
        (
            "boxes on detection",
            r#"{"task":"detection","categories":["x"],"boxes":[[0,0,1,1]]}"#.into(),
        ),
        (
            "visual prompt without boxes",
            r#"{"task":"visual_prompting"}"#.into(),
        ),
        (
            "inverted box",
            r#"{"task":"visual_prompting","boxes":[[50,50,10,10]]}"#.into(),
        ),
        (
            "truncated",
            r#"{"task":"detection","categories":["pers"#.into(),
        ),
        ("over 64 KiB", huge),
    ];
    let rejected0 = metric(
        &rex,
        "rexstream_prompt_updates_total",
        &[("result", "rejected")],
    )?;
    for (_, payload) in &bad {
        mosquitto_pub(broker.port, "rexstream/good/prompt/set", payload, false)?;
    }
    // Invalid UTF-8 bytes, from a file.
    let raw = dir.path().join("raw.bin");
    std::fs::write(&raw, b"\xff\xfe{\"task\":\"detection\"}\x00")?;
    let st = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-t",
            "rexstream/good/prompt/set",
            "-f",
        ])
        .arg(&raw)
        .status()?;
    assert!(st.success());
    let n_bad = bad.len() as f64 + 1.0;
    let (rejected, _) = wait_metric(
        &rex,
        "rexstream_prompt_updates_total",
        &[("result", "rejected")],
        Duration::from_secs(20),
        |v| v >= rejected0 + n_bad,
    )?;
    let accepted = metric(
        &rex,
        "rexstream_prompt_updates_total",
        &[("result", "accepted")],
    )?;
    let state = retained_state(broker.port, "good")?;
    // Documents after the rejections still use the old prompt: drain what came before, then
    // take the next few.
    let _ = docs.collect_until(Duration::from_millis(500), |_| false);
    let later = docs.collect_until(Duration::from_secs(30), |m| m.len() >= 3);
    let last: Value = later
        .last()
        .map(|m| serde_json::from_str(&m.payload))
        .transpose()?
        .context("no documents after the rejected prompts")?;
    println!(
        "bad prompts: {} published, {} rejected, {accepted} accepted; retained state {state}; latest document prompt {}",
        n_bad,
        rejected - rejected0,
        last["prompt"]
    );
    assert_eq!(accepted, 0.0, "a malformed prompt was accepted");
    assert_eq!(state, old, "retained prompt/state changed");
    assert_eq!(last["prompt"]["categories"], json!(["ball"]), "{last}");
    let rejections = rex.log().matches("Prompt-set message rejected").count();
    assert!(
        rejections as f64 >= n_bad,
        "{rejections} rejection log lines for {n_bad} messages"
    );

    // Anchor: a valid message is accepted and becomes the retained state.
    mosquitto_pub(
        broker.port,
        "rexstream/good/prompt/set",
        r#"{"task":"detection","categories":["cat"]}"#,
        false,
    )?;
    wait_metric(
        &rex,
        "rexstream_prompt_updates_total",
        &[("result", "accepted")],
        Duration::from_secs(20),
        |v| v >= 1.0,
    )?;
    let new_state = wait_for_state(broker.port, "good", json!(["cat"]))?;
    println!("valid prompt afterwards: accepted, retained state {new_state}");
    assert!(rex.proc.running());
    Ok(())
}

/// Wait until `stream` has ended or has been rebuilt at least once; describe which.
fn wait_until_ended_or_reconnected(rex: &Rexstream, stream: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reconnects = metric(rex, "rexstream_reconnects_total", &[("stream", stream)])?;
        let (_, health) = http_get(rex.http_port.unwrap_or(0), "/healthz")?;
        let h: Value = serde_json::from_str(&health).unwrap_or(Value::Null);
        let up = h["streams"][stream]["up"].as_bool();
        if reconnects >= 1.0 {
            return Ok(format!("reconnecting ({reconnects} rebuilds)"));
        }
        let ended = rex
            .log()
            .lines()
            .any(|l| l.contains(&format!("stream={stream}")) && l.contains("tream ended"));
        if ended && up == Some(false) {
            return Ok("ended".into());
        }
        if Instant::now() > deadline {
            bail!(
                "{stream} neither ended nor reconnected in 60 s; log:\n{}",
                tail(&rex.log(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Poll the retained state until its categories are `want`.
fn wait_for_state(broker: u16, stream: &str, want: Value) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = retained_state(broker, stream)?;
        if s["categories"] == want {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("retained state stayed {s}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
