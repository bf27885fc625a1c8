//! `/metrics` scraped by a real Prometheus (Debian package) on loopback, and `docs/metrics.md`
//! kept in sync with what is exported.
//!
//! Drives the rexstream library directly (no model): counters and histograms are fed through the
//! same handles the runtime uses, the HTTP endpoint is the real one, Prometheus scrapes it every
//! second and the assertions go through its HTTP API.
//!
//! Run: `cargo test -p rexstream-e2e --test metrics_prometheus -- --nocapture`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use rexomni::protocol::{Task, TaskPrompt};
use rexstream::event::{event_id, DetectionsDocument, FrameInfo, Timing, SCHEMA_VERSION};
use rexstream::metrics::{DropReason, Metrics, Stage};
use rexstream_e2e::{http_get, Prometheus};

/// Metric family names exported by a fresh registry with one stream.
fn exported_families() -> BTreeSet<String> {
    let m = Metrics::new();
    // Label-less families appear at once; `rexstream_detections_total` gets its first series
    // with the first detection, so count one.
    m.stream("cam1")
        .detections(&["person".to_string()], ["person"]);
    m.encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_exported_metric_is_documented_and_every_documented_one_exported() -> Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
    let doc = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let exported = exported_families();
    assert!(exported.len() >= 20, "{exported:?}");
    let re = regex::Regex::new(r"rexstream_[a-z_]+")?;
    let documented: BTreeSet<String> = re
        .find_iter(&doc)
        .map(|m| m.as_str().to_string())
        // Queries in the doc use histogram series names.
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    n.strip_suffix(s)
                        .filter(|b| exported.contains(*b))
                        .map(str::to_string)
                })
                .unwrap_or(n)
        })
        .collect();
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&exported).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/metrics.md: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "in docs/metrics.md but not exported: {unknown:?}"
    );
    Ok(())
}

fn document(seq: u64, e2e_ms: f64, labels: &[&str]) -> DetectionsDocument {
    let prompt = TaskPrompt {
        task: Task::Detection,
        categories: vec!["person".into()],
        keypoint_type: None,
        boxes: Vec::new(),
    };
    DetectionsDocument {
        schema: SCHEMA_VERSION,
        event_id: event_id("cam1", seq),
        stream: "cam1".into(),
        seq,
        frame: FrameInfo::new(None, SystemTime::now(), 64, 48),
        task: prompt.task,
        prompt,
        model: "m".into(),
        detections: labels
            .iter()
            .map(|l| rexomni::protocol::Detection {
                label: l.to_string(),
                geometry: rexomni::protocol::Geometry::Point {
                    coords: [1.0, 1.0],
                    norm: [0.1, 0.1],
                },
                score: None,
            })
            .collect(),
        timing: Timing {
            end_to_end_ms: e2e_ms,
            ..Timing::default()
        },
        output_tokens: 30,
        truncated: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_metrics_and_answers_queries() -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let cam = metrics.stream("cam1");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = rexstream::http::serve("127.0.0.1:0".parse()?, metrics.clone(), async {
        let _ = stop_rx.await;
    })
    .await?;

    // Feed a little traffic, as the runtime would.
    cam.up.set(1);
    cam.frames_received.inc_by(30);
    cam.dropped(DropReason::Superseded, 20);
    for seq in 0..10 {
        let doc = document(seq, 120.0 + seq as f64, &["person", "made-up"]);
        metrics.record_document(&cam, &doc);
        metrics.observe_stage(Stage::Decode, Duration::from_millis(80));
    }
    metrics.batch_size.observe(2.0);

    // /healthz is JSON and names the stream.
    let (status, body) =
        tokio::task::spawn_blocking(move || http_get(addr.port(), "/healthz")).await??;
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(health["streams"]["cam1"]["up"], true);

    let started = Instant::now();
    let port = addr.port();
    let results = tokio::task::spawn_blocking(move || -> Result<Vec<(String, f64)>> {
        let prom = Prometheus::start(port)?;
        let processed = prom.wait_value(
            "rexstream_frames_processed_total{stream=\"cam1\"}",
            Duration::from_secs(30),
            |v| v > 0.0,
        )?;
        let mut out = vec![("processed".to_string(), processed)];
        for (name, q) in [
            ("e2e_count", "rexstream_end_to_end_latency_seconds_count{stream=\"cam1\"}"),
            ("e2e_p99", "histogram_quantile(0.99, sum by (le) (rexstream_end_to_end_latency_seconds_bucket{stream=\"cam1\"}))"),
            ("superseded", "rexstream_frames_dropped_total{stream=\"cam1\",reason=\"superseded\"}"),
            ("person", "rexstream_detections_total{stream=\"cam1\",label=\"person\"}"),
            ("other", "rexstream_detections_total{stream=\"cam1\",label=\"other\"}"),
            ("tokens", "rexstream_generated_tokens_total"),
            ("up", "rexstream_stream_up{stream=\"cam1\"}"),
            ("rss", "rexstream_process_resident_memory_bytes"),
        ] {
            let v = prom.query_scalar(q)?.with_context(|| format!("no data for {q}"))?;
            out.push((name.to_string(), v));
        }
        Ok(out)
    })
    .await??;
    println!(
        "prometheus answered after {:.1}s: {results:?}",
        started.elapsed().as_secs_f64()
    );
    let get = |k: &str| {
        results
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN)
    };
    assert_eq!(get("processed"), 10.0);
    assert_eq!(get("e2e_count"), 10.0);
    // All ten latencies are 120..129 ms: the p99 falls in the (0.1, 0.25] bucket.
    let p99 = get("e2e_p99");
    assert!(p99 > 0.1 && p99 <= 0.25, "p99 {p99}");
    assert_eq!(get("superseded"), 20.0);
    assert_eq!(get("person"), 10.0);
    assert_eq!(get("other"), 10.0);
    assert_eq!(get("tokens"), 300.0);
    assert_eq!(get("up"), 1.0);
    assert!(get("rss") > 1e6);
    let _ = stop_tx.send(());
    server.await?;
    Ok(())
}
