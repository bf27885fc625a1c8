//! The MQTT sink over TLS with a client certificate and username/password from the environment,
//! against a mosquitto TLS listener whose certificates the test generates with `openssl`
//! (issue 6 item 7). Also checks that the password shows up neither in `/metrics` nor in
//! `/healthz`, and that a wrong password is refused by the broker (its log line is asserted) and keeps
//! the sink disconnected with documents kept.
//!
//! Run: `cargo test -p rexstream-e2e --test mqtt_tls -- --nocapture`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use rexomni::protocol::{Task, TaskPrompt};
use rexstream::event::{event_id, DetectionsDocument, FrameInfo, Timing, SCHEMA_VERSION};
use rexstream::metrics::{BrokerMode, Metrics};
use rexstream::sinks::mqtt::config::TlsConfig;
use rexstream::sinks::mqtt::{MqttConfig, MqttSink};
use rexstream::sinks::prompts::PromptTable;
use rexstream_e2e::{free_port, port_open, wait_until, ChildGuard, TempDir};

fn run(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .with_context(|| format!("run {}", args[0]))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// CA, server certificate for 127.0.0.1 (IP SAN: rustls checks it), client certificate.
fn make_certs(dir: &Path) -> Result<()> {
    run(
        dir,
        &[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=rexstream-e2e-ca",
        ],
    )?;
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        run(
            dir,
            &[
                "openssl",
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=rexstream-e2e-{name}"),
            ],
        )?;
        run(
            dir,
            &[
                "openssl",
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        )?;
    }
    Ok(())
}

fn doc(seq: u64) -> DetectionsDocument {
    let prompt = TaskPrompt {
        task: Task::Detection,
        categories: vec!["person".into()],
        keypoint_type: None,
        boxes: vec![],
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
        detections: vec![],
        timing: Timing::default(),
        output_tokens: 1,
        truncated: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_cert_and_password_from_env() -> Result<()> {
    let dir = TempDir::new("mqtt-tls")?;
    let d = dir.path().to_path_buf();
    make_certs(&d)?;
    // A password no test constant contains, so finding it anywhere is a real leak.
    let password = format!(
        "pw-{:x}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_nanos()
    );
    run(
        &d,
        &[
            "mosquitto_passwd",
            "-b",
            "-c",
            "passwd",
            "rexuser",
            &password,
        ],
    )?;
    // mosquitto started as root drops to the `mosquitto` user before reading its key and password
    // files: make these throw-away test files readable to it.
    for f in ["server.key", "passwd"] {
        run(&d, &["chmod", "0644", f])?;
    }
    let port = free_port()?;
    std::fs::write(
        d.join("mosquitto.conf"),
        format!(
            "listener {port} 127.0.0.1\ncafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\n\
             require_certificate true\nallow_anonymous false\npassword_file {0}/passwd\n",
            d.display()
        ),
    )?;
    let log = std::fs::File::create(d.join("mosquitto.log"))?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(d.join("mosquitto.conf"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let _broker = ChildGuard {
        name: "mosquitto-tls".into(),
        child: Some(child),
        log: Some(d.join("mosquitto.log")),
    };
    wait_until("mosquitto TLS listener", Duration::from_secs(10), || {
        port_open(port).then_some(())
    })?;

    // SAFETY of set_var: tests in this binary do not read this variable concurrently.
    std::env::set_var("REXSTREAM_E2E_MQTT_PASSWORD", &password);
    let cfg = |password_env: &str, prefix: &str| -> MqttConfig {
        let mut c = MqttConfig::embedded(([127, 0, 0, 1], port).into());
        c.url = format!("mqtts://127.0.0.1:{port}");
        c.prefix = prefix.into();
        c.username = Some("rexuser".into());
        c.password_env = Some(password_env.into());
        c.tls = Some(TlsConfig {
            ca_file: d.join("ca.crt"),
            client_cert: Some(d.join("client.crt")),
            client_key: Some(d.join("client.key")),
        });
        c
    };

    let metrics = Arc::new(Metrics::new());
    let prompts = Arc::new(PromptTable::new([(
        "cam1".to_string(),
        TaskPrompt {
            task: Task::Detection,
            categories: vec!["person".into()],
            keypoint_type: None,
            boxes: vec![],
        },
    )]));
    let sink = MqttSink::start(
        &cfg("REXSTREAM_E2E_MQTT_PASSWORD", "tls"),
        BrokerMode::External,
        prompts.clone(),
        metrics.clone(),
    )?;
    let handle = sink.handle();
    wait_until("TLS connection", Duration::from_secs(15), || {
        handle.connected().then_some(())
    })
    .with_context(|| std::fs::read_to_string(d.join("mosquitto.log")).unwrap_or_default())?;

    // A TLS subscriber (mosquitto_sub); the retained `online` tells us its subscription is live.
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-v",
            "-t",
            "tls/#",
        ])
        .args([
            "--cafile",
            &path(&d, "ca.crt"),
            "--cert",
            &path(&d, "client.crt"),
            "--key",
            &path(&d, "client.key"),
        ])
        .args(["-u", "rexuser", "-P", &password])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = sub.stdout.take().context("stdout")?;
    let _sub_guard = ChildGuard {
        name: "mosquitto_sub-tls".into(),
        child: Some(sub),
        log: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .context("retained online over TLS")?;
    assert!(first.starts_with("tls/"), "{first}");
    let cam = metrics.stream("cam1");
    for seq in 0..5 {
        handle.publish(&cam, "cam1", seq, doc(seq).to_json()?);
    }
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .context("documents over TLS")?;
        if let Some(json) = line.strip_prefix("tls/cam1/detections ") {
            let v: serde_json::Value = serde_json::from_str(json)?;
            seqs.push(v["seq"].as_u64().context("seq")?);
        }
    }
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);

    // The password is nowhere in /metrics or /healthz.
    let exposed = format!(
        "{}\n{}",
        metrics.encode(),
        serde_json::to_string(&metrics.health())?
    );
    assert!(
        !exposed.contains(&password),
        "password leaked into metrics/health"
    );
    sink.close(Duration::from_secs(3)).await;

    // Wrong password: refused by the broker, never connected, documents kept in the outbox. The
    // refusal itself is asserted (mosquitto logs `Client <unknown> disconnected, not authorised.`
    // after a completed TLS handshake and a CONNECT it answers with CONNACK "not authorised"), so a
    // broken TLS setup (handshake failure, wrong CA, closed port) cannot pass as "password refused".
    let log_path = d.join("mosquitto.log");
    let refusals = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .matches("disconnected, not authorised.")
            .count()
    };
    let refused_before = refusals();
    assert_eq!(
        refused_before,
        0,
        "a client with the right password was refused; log:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    std::env::set_var("REXSTREAM_E2E_MQTT_WRONG", "not-the-password");
    let m2 = Arc::new(Metrics::new());
    let bad = MqttSink::start(
        &cfg("REXSTREAM_E2E_MQTT_WRONG", "tls2"),
        BrokerMode::External,
        prompts,
        m2.clone(),
    )?;
    bad.handle()
        .publish(&m2.stream("cam1"), "cam1", 0, doc(0).to_json()?);
    wait_until(
        "the broker refusing the wrong password",
        Duration::from_secs(10),
        || (refusals() > refused_before).then_some(()),
    )
    .with_context(|| std::fs::read_to_string(&log_path).unwrap_or_default())?;
    assert!(!bad.handle().connected());
    assert_eq!(bad.handle().outbox_len(), 1);
    let report = bad.close(Duration::from_millis(200)).await;
    assert_eq!(report.undelivered, 1);
    Ok(())
}

fn path(d: &Path, f: &str) -> String {
    d.join(f).display().to_string()
}
