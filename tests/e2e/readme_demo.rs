//! The README's main command, `rexstream run pipelines/demo.toml`, with `--model` pointing at a
//! tiny fixture checkpoint: the demo clip (real photos) plays, detections go to the embedded
//! broker on 127.0.0.1:1883, and `mosquitto_sub` sees them (issue 5 "Done when").
//!
//! Uses the fixed ports of the demo (1883 for MQTT, 9464 for metrics), exactly as a user would;
//! the test fails clearly if something else holds them.
//!
//! Run: `cargo test -p rexstream-e2e --test readme_demo -- --nocapture`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rexstream_e2e::{http_get, port_open, tiny_model, wait_until, Rexstream};
use serde_json::Value;

#[test]
fn readme_main_command_publishes_to_the_embedded_broker() -> Result<()> {
    for port in [1883, 9464] {
        if port_open(port) {
            bail!("port {port} is already in use; the demo needs it (stop the other service)");
        }
    }
    let model = tiny_model()?;
    let model_s = model.to_string_lossy().into_owned();
    let mut rex = Rexstream::spawn(
        &["run", "pipelines/demo.toml", "--model", &model_s],
        &HashMap::new(),
        Some(9464),
    )?;
    rex.wait_healthy(Duration::from_secs(120))?;
    wait_until("embedded broker on 1883", Duration::from_secs(10), || {
        port_open(1883).then_some(())
    })?;

    // Exactly what the README tells a user to run, with a count so it exits.
    let t0 = Instant::now();
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-t",
            "rexstream/demo/detections",
            "-C",
            "3",
            "-W",
            "90",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn mosquitto_sub")?;
    let out = sub.stdout.take().context("stdout")?;
    let lines: Vec<String> = BufReader::new(out).lines().map_while(Result::ok).collect();
    let st = sub.wait()?;
    if lines.len() < 3 {
        bail!(
            "mosquitto_sub got {} documents ({st}); rexstream log:\n{}",
            lines.len(),
            rex.log()
        );
    }
    println!(
        "mosquitto_sub received {} documents in {:.1} s",
        lines.len(),
        t0.elapsed().as_secs_f64()
    );
    for l in &lines {
        let d: Value = serde_json::from_str(l).with_context(|| format!("not JSON: {l}"))?;
        assert_eq!(d["stream"], "demo");
        assert_eq!(
            (d["frame"]["width"].as_u64(), d["frame"]["height"].as_u64()),
            (Some(480), Some(360))
        );
        assert_eq!(
            d["prompt"]["categories"],
            serde_json::json!(["cat", "cup", "person", "rocket"])
        );
    }
    let (status, body) = http_get(9464, "/metrics")?;
    assert_eq!(status, 200);
    assert!(
        body.contains("rexstream_frames_processed_total{stream=\"demo\"}"),
        "{body}"
    );

    rex.proc.signal("INT")?;
    assert_eq!(
        rex.proc.wait_exit(Duration::from_secs(30))?,
        Some(0),
        "log:\n{}",
        rex.log()
    );
    Ok(())
}
