//! A healthy run logs no WARN or ERROR line (issue 15 item 1): the README's demo pipeline
//! (`pipelines/demo.toml`, embedded rumqttd broker) with a tiny fixture checkpoint, a `mosquitto_sub`
//! that connects, receives and disconnects cleanly like a user's, then Ctrl-C (SIGINT). The log is
//! taken at the default level (`RUST_LOG` removed from the environment) and grepped.
//!
//! The pipeline is the demo file with two lines changed: the clip's path made absolute and the
//! broker/metrics ports moved to free ones, so this test can run beside `readme_demo` (which
//! owns 1883/9464).
//!
//! A second test shows the filter is narrow: a client that sends the broker garbage still gets a
//! rumqttd ERROR line into the log (real broker problems still reach it).
//!
//! Run: `cargo test -p rexstream-e2e --test healthy_run_log -- --nocapture`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rexstream_e2e::{
    free_port, http_get, rexstream_bin, tiny_model, wait_until, workspace_root, ChildGuard, TempDir,
};

/// The demo pipeline with its clip path absolute and its ports free.
fn demo_config(dir: &Path, broker: u16, http: u16) -> Result<PathBuf> {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("pipelines/demo.toml"))?;
    let clip = root.join("pipelines/media/demo.mp4");
    let from = "uri = \"media/demo.mp4\"";
    if !text.contains(from) {
        bail!("pipelines/demo.toml no longer has `{from}`; update this test");
    }
    let text = text.replace(from, &format!("uri = \"{}\"", clip.display()));
    // Appended after the [[streams]] table: TOML starts new tables, the stream is unchanged.
    let text = format!(
        "{text}\n[broker]\nlisten = \"127.0.0.1:{broker}\"\n\n[metrics]\nlisten = \"127.0.0.1:{http}\"\n"
    );
    let path = dir.join("demo.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `rexstream run <config> --model <tiny>` at the default log level, log in `dir/rexstream.log`.
fn start(dir: &Path, config: &Path, http: u16) -> Result<ChildGuard> {
    let log = dir.join("rexstream.log");
    let out = std::fs::File::create(&log)?;
    let child = Command::new(rexstream_bin()?)
        .arg("run")
        .arg(config)
        .arg("--model")
        .arg(tiny_model()?)
        .current_dir(workspace_root())
        .env_remove("RUST_LOG")
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("spawn rexstream")?;
    let mut guard = ChildGuard {
        name: "rexstream".into(),
        child: Some(child),
        log: Some(log),
    };
    wait_until("rexstream /healthz", Duration::from_secs(180), || {
        if !guard.running() {
            return Some(());
        }
        matches!(http_get(http, "/healthz"), Ok((200, _))).then_some(())
    })?;
    if !guard.running() {
        bail!("rexstream exited early; log:\n{}", guard.log_text());
    }
    Ok(guard)
}

/// WARN and ERROR lines of a plain-text tracing log (level is the second field).
fn bad_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let level = l.split_whitespace().nth(1).unwrap_or("");
            level == "WARN" || level == "ERROR"
        })
        .collect()
}

fn sigint_and_wait(rex: &mut ChildGuard) -> Result<()> {
    rex.signal("INT")?;
    let code = rex.wait_exit(Duration::from_secs(30))?;
    if code != Some(0) {
        bail!("exit code {code:?}; log:\n{}", rex.log_text());
    }
    Ok(())
}

#[test]
fn healthy_demo_run_logs_no_warn_or_error() -> Result<()> {
    let dir = TempDir::new("healthy-log")?;
    let (broker, http) = (free_port()?, free_port()?);
    let cfg = demo_config(dir.path(), broker, http)?;
    let mut rex = start(dir.path(), &cfg, http)?;

    // A user's subscriber: connects, takes two documents, disconnects cleanly (DISCONNECT packet).
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.to_string()])
        .args(["-t", "rexstream/demo/detections", "-C", "2", "-W", "120"])
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn mosquitto_sub")?;
    let out = sub.stdout.take().context("stdout")?;
    let docs = BufReader::new(out).lines().map_while(Result::ok).count();
    sub.wait()?;
    if docs < 2 {
        bail!(
            "mosquitto_sub got {docs} documents; log:\n{}",
            rex.log_text()
        );
    }
    sigint_and_wait(&mut rex)?;

    let log = rex.log_text();
    println!("--- log of a healthy run ---\n{log}");
    let bad = bad_lines(&log);
    assert!(
        bad.is_empty(),
        "WARN/ERROR lines on a healthy run:\n{}",
        bad.join("\n")
    );
    // The broker start is announced once (it was twice).
    assert_eq!(
        log.matches("Embedded MQTT broker listening.").count(),
        1,
        "{log}"
    );
    // The run did reach the lines it should have: not an empty log that passes by accident.
    for line in [
        "Model loaded.",
        "Starting stream.",
        "Shutting down",
        "Stopped.",
    ] {
        assert!(log.contains(line), "missing {line:?} in:\n{log}");
    }
    Ok(())
}

#[test]
fn a_broken_client_still_reaches_the_log() -> Result<()> {
    let dir = TempDir::new("broker-error-log")?;
    let (broker, http) = (free_port()?, free_port()?);
    let cfg = demo_config(dir.path(), broker, http)?;
    let mut rex = start(dir.path(), &cfg, http)?;
    // Not MQTT: a PUBLISH-typed first packet with a 5-byte remaining length (malformed).
    let mut s = TcpStream::connect(("127.0.0.1", broker))?;
    s.write_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f])?;
    drop(s);
    wait_until("a rumqttd ERROR line", Duration::from_secs(10), || {
        let log = rex.log_text();
        bad_lines(&log)
            .iter()
            .any(|l| l.contains("rumqttd"))
            .then_some(())
    })?;
    sigint_and_wait(&mut rex)
}
