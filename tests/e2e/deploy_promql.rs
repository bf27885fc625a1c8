//! Every PromQL expression we ship runs against a live rexstream (issue 7, "Done when").
//!
//! In: the real `rexstream` binary on a tiny fixture checkpoint, watching two RTSP cameras (the
//! `rtsp-serve` helper) and publishing to a real mosquitto; the Debian Prometheus scraping it every second
//! with `deploy/prometheus/rules.yml` loaded; the dashboard `deploy/grafana/dashboards/rexstream.json`.
//! Out: pass/fail plus a printed tally.
//!
//! What it checks:
//! 1. every dashboard query (Grafana variables replaced as Grafana would, `$instance` = the live binary)
//!    succeeds as a range query and returns at least one finite sample; every template variable query finds
//!    label values. One exception is allowed and reported: a query may be empty on the live binary only if
//!    every metric it reads has no series at all in the binary's `/metrics` (a family whose series appear on
//!    first use, in practice `rexstream_detections_total`: the random tiny checkpoint detects nothing). Such
//!    a query must then return data from a second scrape target: the library's own `Metrics`, fed one real
//!    detections document through `Metrics::record_document` and served by the real `rexstream::http`;
//! 2. every alert rule is loaded, evaluated by Prometheus without error (`/api/v1/rules` health), its
//!    expression succeeds as an instant query, and each metric it reads has series;
//! 3. on the healthy pipeline no alert fires; after killing one camera and the broker, the
//!    RexstreamStreamDown alert (for that stream only) and RexstreamMqttDisconnected become active.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use rexomni::protocol::{Detection, Geometry, Task, TaskPrompt};
use rexstream::event::{event_id, DetectionsDocument, FrameInfo, Timing, SCHEMA_VERSION};
use rexstream::metrics::{Metrics, SinkKind, Stage};
use rexstream_e2e::{
    free_port, http_get, tiny_model, url_encode, wait_until, workspace_root, ChildGuard, Mosquitto,
    Rexstream, RtspServer, RtspSource, TempDir,
};
use serde_json::Value;

#[path = "deploy_common.rs"]
mod common;
use common::{collect_exprs, rule_exprs};

/// What Grafana's `$__rate_interval` becomes here. Grafana uses max(4 × scrape interval, step + scrape);
/// one minute covers the whole run at a 1 s scrape, so every rate() sees the pipeline's activity.
const RATE_INTERVAL: &str = "1m";

/// The Debian Prometheus, scraping rexstream every second and evaluating the shipped rules every second.
struct Prometheus {
    port: u16,
    proc: ChildGuard,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target_ports: &[u16], rules: &Path) -> Result<Self> {
        let dir = TempDir::new("prometheus-deploy")?;
        let port = free_port()?;
        let conf = dir.path().join("prometheus.yml");
        // job "rexstream" as in deploy/prometheus/prometheus.yml, so `up{job=~".*rexstream.*"}` matches.
        let targets: Vec<String> = target_ports
            .iter()
            .map(|p| format!("'127.0.0.1:{p}'"))
            .collect();
        std::fs::write(
            &conf,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: rexstream\n    static_configs:\n      - targets: [{}]\n",
                rules.display(),
                targets.join(", ")
            ),
        )?;
        let log = dir.path().join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawn prometheus (Debian package `prometheus`)")?;
        let mut proc = ChildGuard {
            name: "prometheus".into(),
            child: Some(child),
            log: Some(log),
        };
        let ready = wait_until("prometheus /-/ready", Duration::from_secs(30), || {
            matches!(http_get(port, "/-/ready"), Ok((200, _))).then_some(())
        });
        if ready.is_err() || !proc.running() {
            bail!("prometheus did not become ready; log:\n{}", proc.log_text());
        }
        Ok(Self {
            port,
            proc,
            _dir: dir,
        })
    }

    /// GET an API path; the JSON body when `status` is `success`, else the error Prometheus gave.
    fn api(&self, path_and_query: &str) -> Result<Value> {
        let (code, body) = http_get(self.port, path_and_query)?;
        let v: Value =
            serde_json::from_str(&body).with_context(|| format!("HTTP {code}: {body}"))?;
        if v["status"] != "success" {
            bail!("HTTP {code}: {} {}", v["errorType"], v["error"]);
        }
        Ok(v["data"].clone())
    }

    fn instant(&self, expr: &str) -> Result<Vec<Value>> {
        let d = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        Ok(d["result"].as_array().cloned().unwrap_or_default())
    }

    /// A range query over the last `secs` seconds, the way a dashboard panel asks.
    fn range(&self, expr: &str, secs: u64) -> Result<Vec<Value>> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let d = self.api(&format!(
            "/api/v1/query_range?query={}&start={}&end={now}&step=1",
            url_encode(expr),
            now - secs
        ))?;
        Ok(d["result"].as_array().cloned().unwrap_or_default())
    }

    fn scalar(&self, expr: &str) -> Option<f64> {
        let r = self.instant(expr).ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }
}

/// Finite sample values of a query result (vector `value` or matrix `values`).
fn finite_values(result: &[Value]) -> Vec<f64> {
    let mut out = Vec::new();
    for series in result {
        let points: Vec<&Value> = match (series.get("value"), series.get("values")) {
            (Some(v), _) => vec![v],
            (_, Some(Value::Array(vs))) => vs.iter().collect(),
            _ => vec![],
        };
        for p in points {
            if let Some(x) = p[1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|x| x.is_finite())
            {
                out.push(x);
            }
        }
    }
    out
}

/// Replace Grafana's variables as Grafana does: `$instance` = one scrape target (a PromQL regex is anchored,
/// so `127.0.0.1:4000` cannot match another port), `$stream` = `.*` ("All") or one stream name.
fn grafana_to_promql(expr: &str, instance: &str, stream: &str) -> Result<String> {
    let e = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("${instance}", instance)
        .replace("$instance", instance)
        .replace("${stream}", stream)
        .replace("$stream", stream);
    if e.contains('$') {
        bail!("unknown Grafana variable left in {expr:?}");
    }
    Ok(e)
}

/// Metric names an expression reads (identifiers that start a selector or sit inside a function call),
/// for checking that each has series.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let re = Regex::new(r"\b(rexstream_[a-z0-9_]+|up)\b").expect("regex");
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

/// The second scrape target: the library's registry, fed the way the detector worker feeds it (one
/// detections document per frame through `Metrics::record_document`), served by the real HTTP endpoint.
struct LibraryTarget {
    port: u16,
    _metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: tokio::runtime::Runtime,
}

impl LibraryTarget {
    fn start() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let metrics = Arc::new(Metrics::new());
        let cam = metrics.stream("lib-cam");
        cam.up.set(1);
        metrics.mqtt_connected.set(1);
        let prompt = TaskPrompt {
            task: Task::Detection,
            categories: vec!["person".into(), "ball".into()],
            keypoint_type: None,
            boxes: Vec::new(),
        };
        for seq in 0..5 {
            let doc = DetectionsDocument {
                schema: SCHEMA_VERSION,
                event_id: event_id("lib-cam", seq),
                stream: "lib-cam".into(),
                seq,
                frame: FrameInfo::new(None, SystemTime::now(), 320, 240),
                task: prompt.task,
                prompt: prompt.clone(),
                model: "library-target".into(),
                detections: ["person", "ball"]
                    .iter()
                    .map(|l| Detection {
                        label: l.to_string(),
                        geometry: Geometry::Point {
                            coords: [10.0, 20.0],
                            norm: [0.03, 0.08],
                        },
                        score: None,
                    })
                    .collect(),
                timing: Timing {
                    end_to_end_ms: 150.0,
                    ..Timing::default()
                },
                output_tokens: 14,
                truncated: false,
            };
            cam.frames_received.inc();
            metrics.record_document(&cam, &doc);
            metrics.observe_stage(Stage::Decode, Duration::from_millis(90));
            metrics.batch_size.observe(1.0);
            cam.published(SinkKind::Mqtt);
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let m = metrics.clone();
        let (addr, _task) =
            rt.block_on(rexstream::http::serve("127.0.0.1:0".parse()?, m, async {
                let _ = rx.await;
            }))?;
        Ok(Self {
            port: addr.port(),
            _metrics: metrics,
            stop: Some(tx),
            rt,
        })
    }

    /// Keep the counters moving so rate() over the library target is not flat zero.
    fn tick(&self) {
        self._metrics.stream("lib-cam").frames_received.inc();
    }
}

impl Drop for LibraryTarget {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = &self.rt;
    }
}

/// Does rexstream's exposition text have any sample of `family` (or its histogram series)?
fn has_samples(exposition: &str, family: &str) -> bool {
    exposition.lines().filter(|l| !l.starts_with('#')).any(|l| {
        l.strip_prefix(family).is_some_and(|rest| {
            rest.starts_with('{')
                || rest.starts_with(' ')
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| rest.starts_with(s))
        })
    })
}

fn pipeline_toml(model: &Path, mqtt_port: u16, http_port: u16, cams: &[(&str, String)]) -> String {
    let mut s = format!(
        "[model]\nsource = \"{}\"\ndevice = \"cpu\"\nmax_batch = 2\nmax_new_tokens = 24\n\n\
         [mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\nprefix = \"deploytest\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{http_port}\"\n",
        model.display()
    );
    // Motion gating off: cam-b is a still pattern and every panel needs frames through the detector.
    for (name, uri) in cams {
        s.push_str(&format!(
            "\n[[streams]]\nname = \"{name}\"\nuri = \"{uri}\"\nmax_fps = 4\ncategories = [\"person\", \"ball\"]\n\
             no_frame_timeout_s = 3\nreconnect_min_s = 0.5\nreconnect_max_s = 2\n\
             [streams.motion]\nenabled = false\n"
        ));
    }
    s
}

#[test]
fn every_dashboard_and_alert_query_runs_against_live_rexstream() -> Result<()> {
    let t0 = Instant::now();
    let root = workspace_root();
    let rules_path = root.join("deploy/prometheus/rules.yml");
    let dashboard_path = root.join("deploy/grafana/dashboards/rexstream.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&dashboard_path)?)
        .with_context(|| format!("parse {}", dashboard_path.display()))?;
    let rules_text = std::fs::read_to_string(&rules_path)?;

    // --- services ------------------------------------------------------------------------------
    let mut broker = Mosquitto::start()?;
    let cam_a = RtspServer::start(RtspSource {
        fps: 10,
        ..RtspSource::default()
    })?;
    let mut cam_b = RtspServer::start(RtspSource {
        fps: 10,
        pattern: "smpte".into(),
        ..RtspSource::default()
    })?;
    let http_port = free_port()?;
    let dir = TempDir::new("deploy-promql")?;
    let config = dir.path().join("pipeline.toml");
    std::fs::write(
        &config,
        pipeline_toml(
            &tiny_model()?,
            broker.port,
            http_port,
            &[("cam-a", cam_a.url()), ("cam-b", cam_b.url())],
        ),
    )?;
    let mut rex = Rexstream::run(&config, &tiny_model()?, Some(http_port))?;
    rex.wait_healthy(Duration::from_secs(180))?;
    let library = LibraryTarget::start()?;
    let prom = Prometheus::start(&[http_port, library.port], &rules_path)?;
    let started = t0.elapsed();
    let live = format!("127.0.0.1:{http_port}");
    let lib = format!("127.0.0.1:{}", library.port);

    // Wait until the pipeline has produced everything the panels show: frames through the detector on
    // both streams, latency observations, documents acknowledged by the broker.
    let ready = [
        format!("min(rexstream_stream_up{{instance=\"{live}\"}})"),
        format!("min(increase(rexstream_frames_processed_total{{instance=\"{live}\"}}[1m]))"),
        format!("sum(rexstream_end_to_end_latency_seconds_count{{instance=\"{live}\"}})"),
        format!("min(rexstream_mqtt_connected{{instance=\"{live}\"}})"),
        format!("sum(rexstream_events_published_total{{instance=\"{live}\", sink=\"mqtt\"}})"),
        format!("up{{instance=\"{lib}\"}}"),
    ];
    for q in &ready {
        wait_until(
            &format!("{q} > 0 in Prometheus"),
            Duration::from_secs(120),
            || prom.scalar(q).filter(|v| *v > 0.0),
        )
        .with_context(|| format!("rexstream log:\n{}", rex.log()))?;
    }
    // A few more scrapes so every rate() window holds several increments.
    for _ in 0..4 {
        library.tick();
        std::thread::sleep(Duration::from_secs(1));
    }
    let processed = prom
        .scalar(&format!(
            "sum(rexstream_frames_processed_total{{instance=\"{live}\"}})"
        ))
        .unwrap_or(0.0);
    let exposition = rex.metrics()?;

    // --- 1. dashboard queries --------------------------------------------------------------------
    let mut failures = Vec::new();
    let mut panel_exprs = Vec::new();
    collect_exprs(&dashboard, &mut panel_exprs);
    assert!(
        panel_exprs.len() >= 20,
        "dashboard has only {} queries",
        panel_exprs.len()
    );
    let mut from_library = Vec::new();
    let mut runs = 0;
    for expr in &panel_exprs {
        // "All" streams, then (for queries filtered by $stream) one stream: a misspelt label name next to
        // `=~".*"` still matches everything (absent labels match the empty string), but not with a name.
        let mut choices = vec![(".*", ".*")];
        if expr.contains("$stream") || expr.contains("${stream}") {
            choices.push(("cam-a", "lib-cam"));
        }
        for (live_stream, lib_stream) in choices {
            runs += 1;
            let q = grafana_to_promql(expr, &live, live_stream)?;
            match prom.range(&q, 20) {
                Err(e) => failures.push(format!("dashboard {q}: {e}")),
                Ok(r) if finite_values(&r).is_empty() => {
                    // Empty on the live binary: allowed only when the binary has no series of any rexstream
                    // metric the query reads (so no selector or label can be at fault), and then the same
                    // query must answer from the library target.
                    let families: Vec<String> = metrics_in(expr)
                        .into_iter()
                        .filter(|m| m.starts_with("rexstream_"))
                        .collect();
                    let live_has: Vec<&String> = families
                        .iter()
                        .filter(|f| has_samples(&exposition, f))
                        .collect();
                    if families.is_empty() || !live_has.is_empty() {
                        failures.push(format!(
                            "dashboard {q}: no finite sample ({} series), although rexstream exports {live_has:?}",
                            r.len()
                        ));
                        continue;
                    }
                    let lq = grafana_to_promql(expr, &lib, lib_stream)?;
                    match prom.range(&lq, 20) {
                        Ok(r) if !finite_values(&r).is_empty() => {
                            if !from_library.contains(expr) {
                                from_library.push(expr.clone());
                            }
                        }
                        other => failures.push(format!(
                            "dashboard {lq}: no data from the library target either: {other:?}"
                        )),
                    }
                }
                Ok(_) => {}
            }
        }
    }
    // Template variables: `label_values(<selector>, <label>)` is Grafana's, not PromQL; the equivalent
    // series query must find at least one value of the label.
    let label_values = Regex::new(r"^label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\)$")?;
    let mut variables = 0;
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        variables += 1;
        let def = var["definition"]
            .as_str()
            .ok_or_else(|| anyhow!("variable {} has no definition", var["name"]))?;
        let caps = label_values
            .captures(def)
            .ok_or_else(|| anyhow!("variable {}: {def:?}", var["name"]))?;
        let q = grafana_to_promql(
            &format!("count by ({}) ({})", &caps[2], &caps[1]),
            &live,
            ".*",
        )?;
        match prom.instant(&q) {
            Ok(r)
                if r.iter().any(|s| {
                    s["metric"][&caps[2]]
                        .as_str()
                        .is_some_and(|v| !v.is_empty())
                }) => {}
            Ok(r) => failures.push(format!(
                "variable {}: {q} found no {} values: {r:?}",
                var["name"], &caps[2]
            )),
            Err(e) => failures.push(format!("variable {}: {q}: {e}", var["name"])),
        }
    }

    // --- 2. alert rules ----------------------------------------------------------------------------
    let alert_exprs = rule_exprs(&rules_text);
    let alerts_in_file = rules_text
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(
        alert_exprs.len(),
        alerts_in_file,
        "one expr per alert in {}",
        rules_path.display()
    );
    // Prometheus loaded and evaluated every rule (lastEvaluation set) without error.
    let rules = wait_until("every rule evaluated", Duration::from_secs(20), || {
        let d = prom.api("/api/v1/rules").ok()?;
        let rules: Vec<Value> = d["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.iter().all(|r| {
            r["lastEvaluation"]
                .as_str()
                .is_some_and(|t| !t.starts_with("0001"))
        });
        (rules.len() == alerts_in_file && evaluated).then_some(rules)
    })
    .with_context(|| format!("prometheus log:\n{}", prom.proc.log_text()))?;
    for r in &rules {
        if r["health"] != "ok" || r["lastError"].as_str().is_some_and(|e| !e.is_empty()) {
            failures.push(format!(
                "rule {}: health {} error {}",
                r["name"], r["health"], r["lastError"]
            ));
        }
    }
    let mut inputs = BTreeSet::new();
    for expr in &alert_exprs {
        if let Err(e) = prom.instant(expr) {
            failures.push(format!("alert expr {expr}: {e}"));
        }
        inputs.extend(metrics_in(expr));
    }
    for m in &inputs {
        match prom.instant(&format!("count({{__name__=\"{m}\"}})")) {
            Ok(r) if !finite_values(&r).is_empty() => {}
            other => failures.push(format!("alert input {m} has no series: {other:?}")),
        }
    }
    // Healthy pipeline: nothing may be firing (pending is allowed: the broker connects during start-up).
    let firing = prom.instant("ALERTS{alertstate=\"firing\"}")?;
    if !firing.is_empty() {
        failures.push(format!("alerts firing on a healthy pipeline: {firing:?}"));
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n  {}\nrexstream log tail:\n{}",
        failures.len(),
        failures.join("\n  "),
        tail(&rex.log(), 40)
    );

    // --- 3. the alerts react to real faults --------------------------------------------------------
    let fault_at = Instant::now();
    cam_b.kill();
    broker.kill();
    let stream_down = format!("ALERTS{{alertname=\"RexstreamStreamDown\", instance=\"{live}\"}}");
    let down = wait_until(
        "RexstreamStreamDown active for cam-b",
        Duration::from_secs(60),
        || prom.instant(&stream_down).ok().filter(|r| !r.is_empty()),
    )
    .with_context(|| format!("rexstream log:\n{}", tail(&rex.log(), 40)))?;
    let down_streams: BTreeSet<&str> = down
        .iter()
        .filter_map(|s| s["metric"]["stream"].as_str())
        .collect();
    assert_eq!(
        down_streams,
        BTreeSet::from(["cam-b"]),
        "only the killed camera is down: {down:?}"
    );
    let stream_down_after = fault_at.elapsed();
    wait_until(
        "RexstreamMqttDisconnected active",
        Duration::from_secs(60),
        || {
            prom.instant(&format!(
                "ALERTS{{alertname=\"RexstreamMqttDisconnected\", instance=\"{live}\"}}"
            ))
            .ok()
            .filter(|r| !r.is_empty())
        },
    )?;
    let mqtt_down_after = fault_at.elapsed();
    // The reconnect panel now has something to show for cam-b.
    wait_until("cam-b reconnects counted", Duration::from_secs(30), || {
        prom.scalar(&format!(
            "sum(rexstream_reconnects_total{{instance=\"{live}\", stream=\"cam-b\"}})"
        ))
        .filter(|v| *v > 0.0)
    })?;

    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        *by_kind
            .entry(p["type"].as_str().unwrap_or("?"))
            .or_default() += 1;
    }
    println!(
        "deploy_promql: services up in {:.1}s; {processed} frames processed; {} of {} dashboard queries returned \
         data from the live binary ({runs} runs: all streams, then one), {} only from the library target \
         ({from_library:?}); {variables} variables \
         found values; {} alert rules evaluated OK reading {} metrics; StreamDown active {:.1}s and \
         MqttDisconnected {:.1}s after the faults; panels {by_kind:?}; total {:.1}s",
        started.as_secs_f64(),
        panel_exprs.len() - from_library.len(),
        panel_exprs.len(),
        from_library.len(),
        rules.len(),
        inputs.len(),
        stream_down_after.as_secs_f64(),
        mqtt_down_after.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    drop(prom);
    drop(rex);
    drop(library);
    Ok(())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn grafana_variables_are_substituted_completely() {
    assert_eq!(
        grafana_to_promql(
            "sum by (stream) (rate(x{instance=~\"$instance\", stream=~\"${stream}\"}[$__rate_interval]))",
            "h:1",
            "cam-a"
        )
        .unwrap(),
        "sum by (stream) (rate(x{instance=~\"h:1\", stream=~\"cam-a\"}[1m]))"
    );
    assert!(grafana_to_promql("rate(x[$__range])", ".*", ".*").is_err());
}
