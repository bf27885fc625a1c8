//! A StatefulSet replica whose shard owns none of the pipeline's streams (more replicas than streams) stays
//! up, answers /healthz and /metrics, and stops cleanly on SIGTERM. If it exited instead, Kubernetes would
//! restart it forever (deploy/k8s/README.md).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use rexstream::shard::Shard;
use rexstream_e2e::{faults::demo_clip, free_port, tiny_model, Rexstream, TempDir};

#[test]
fn replica_without_streams_stays_up_until_sigterm() -> Result<()> {
    let dir = TempDir::new("idle-replica")?;
    let (broker_port, http_port) = (free_port()?, free_port()?);
    let config = dir.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nlisten = \"127.0.0.1:{broker_port}\"\n\n[metrics]\nlisten = \"127.0.0.1:{http_port}\"\n\n\
             [[streams]]\nname = \"demo\"\nuri = \"{}\"\nloop = true\nmax_fps = 1\ncategories = [\"cat\"]\n",
            demo_clip().display()
        ),
    )?;
    // The replica of two that does NOT own "demo".
    let idle = (0..2)
        .find(|&i| !Shard { index: i, count: 2 }.owns("demo"))
        .expect("one replica owns it");
    let shard = format!("{idle}/2");
    let model = tiny_model()?;
    let (c, m) = (
        config.to_string_lossy().into_owned(),
        model.to_string_lossy().into_owned(),
    );
    let mut rex = Rexstream::spawn(
        &["run", &c, "--model", &m, "--shard", &shard],
        &HashMap::new(),
        Some(http_port),
    )?;

    let health = rex.wait_healthy(Duration::from_secs(60))?;
    // Well past the point where a replica with nothing to do used to exit.
    std::thread::sleep(Duration::from_secs(3));
    let health_later = rex.wait_healthy(Duration::from_secs(5))?;
    assert!(
        !health_later.contains("\"demo\""),
        "the idle replica must not report demo: {health_later}"
    );
    assert!(rex.metrics()?.contains("rexstream_"), "metrics are served");
    println!(
        "idle replica {shard}: healthy at start ({} bytes) and after 3 s",
        health.len()
    );

    rex.proc.signal("TERM")?;
    let code = rex.proc.wait_exit(Duration::from_secs(20))?;
    assert_eq!(code, Some(0), "clean exit on SIGTERM; log:\n{}", rex.log());
    assert!(
        rex.log().contains("owns no stream"),
        "the log says why it idles:\n{}",
        rex.log()
    );
    Ok(())
}
