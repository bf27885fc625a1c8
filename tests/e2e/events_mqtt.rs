//! Tracked-object events through the real MQTT outbox and mosquitto (issue 13): detections
//! documents go to the sinks, the events thread turns them into new/update/end on
//! `<prefix>/events` (QoS 1, outbox), retained counts on `<prefix>/<stream>/<label>` and
//! `<prefix>/<zone>/<label>`. The broker is killed (SIGKILL) for 10 s in the middle of an event and
//! restarted: every event message arrives, in order, and each one validates against
//! docs/events.schema.json.
//!
//! Run: `cargo test -p rexstream-e2e --test events_mqtt -- --nocapture` (prints the figures).

#[path = "mqtt_schema_validator.rs"]
mod mqtt_schema_validator;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use rexomni::protocol::{Detection, Geometry, Task, TaskPrompt};
use rexstream::event::{event_id, DetectionsDocument, FrameInfo, Timing, SCHEMA_VERSION};
use rexstream::metrics::{BrokerMode, Metrics};
use rexstream::sinks::mqtt::{MqttConfig, MqttSink};
use rexstream::sinks::prompts::PromptTable;
use rexstream::sinks::Sinks;
use rexstream::tracking::runtime::{EventsRuntime, OutputSink, StreamSetup};
use rexstream::tracking::stream::Output;
use rexstream::tracking::zones::ZoneConfig;
use rexstream::tracking::EventsConfig;
use rexstream_e2e::{free_port, wait_until, workspace_root, Mosquitto, Subscriber, TempDir};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;

fn prompt() -> TaskPrompt {
    TaskPrompt {
        task: Task::Detection,
        categories: vec!["person".into()],
        keypoint_type: None,
        boxes: vec![],
    }
}

/// A 1280×720 frame with at most one person box.
fn document(seq: u64, person: Option<[f64; 4]>) -> DetectionsDocument {
    let p = prompt();
    DetectionsDocument {
        schema: SCHEMA_VERSION,
        event_id: event_id("yard", seq),
        stream: "yard".into(),
        seq,
        frame: FrameInfo::new(None, SystemTime::now(), 1280, 720),
        task: p.task,
        prompt: p,
        model: "stand-in".into(),
        detections: person
            .into_iter()
            .map(|b| Detection {
                label: "person".into(),
                geometry: Geometry::Box {
                    coords: b,
                    norm: [b[0] / 1280.0, b[1] / 720.0, b[2] / 1280.0, b[3] / 720.0],
                },
                score: Some(0.8),
            })
            .collect(),
        timing: Timing::default(),
        output_tokens: 10,
        truncated: false,
    }
}

fn zone(name: &str, x0: f64, x1: f64) -> ZoneConfig {
    ZoneConfig {
        name: name.into(),
        polygon: vec![[x0, 0.5], [x1, 0.5], [x1, 1.0], [x0, 1.0]],
        objects: vec![],
        inertia: 1,
        loitering_time: 0.0,
    }
}

/// A QoS-1 subscriber with a persistent session that reconnects by itself (the broker keeps its
/// queue across the restart, so the test sees what the broker got, not a resubscription race).
fn persistent_subscriber(port: u16, topic: String) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut o = MqttOptions::new(format!("e2e-events-sub-{port}"), "127.0.0.1", port);
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(2));
    let (client, mut el) = AsyncClient::new(o, 100);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    if !ack.session_present {
                        let _ = client.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    if tx.send(p.payload.to_vec()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_broker_outage_in_order() -> Result<()> {
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        workspace_root().join("docs/events.schema.json"),
    )?)?;
    let dir = TempDir::new("events-mosq")?;
    {
        use std::os::unix::fs::PermissionsExt;
        // mosquitto started as root drops to its own user, which writes the database here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    }
    let port = free_port()?;
    let mut broker = Mosquitto::start_with(
        port,
        &format!(
            "persistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 100000",
            dir.path().display()
        ),
    )?;
    let prefix = "ev1";
    let rx = persistent_subscriber(port, format!("{prefix}/events"));
    let counts = Subscriber::start(
        port,
        &[
            &format!("{prefix}/yard/person"),
            &format!("{prefix}/B/person"),
        ],
    )?;

    let mut cfg = MqttConfig::embedded(([127, 0, 0, 1], port).into());
    cfg.prefix = prefix.into();
    cfg.keep_alive_s = 2;
    let metrics = Arc::new(Metrics::new());
    let prompts = Arc::new(PromptTable::new([("yard".to_string(), prompt())]));
    let sink = MqttSink::start(&cfg, BrokerMode::External, prompts, metrics.clone())?;
    let handle = sink.handle();
    wait_until("sink connected", Duration::from_secs(10), || {
        handle.connected().then_some(())
    })?;

    // Every event the events thread hands to the outbox, in order: what must arrive.
    let produced: Arc<Mutex<Vec<Value>>> = Arc::default();
    let produced2 = produced.clone();
    let h2 = handle.clone();
    let out: OutputSink = Box::new(move |o: &Output| {
        if let Output::Event(m) = o {
            if let Ok(v) = serde_json::to_value(m) {
                produced2.lock().unwrap_or_else(|p| p.into_inner()).push(v);
            }
        }
        rexstream::tracking::replay::publish(&h2, o);
    });
    let ev_cfg = EventsConfig {
        max_disappeared_s: 2.0,
        db: String::new(),
        ..EventsConfig::default()
    };
    let events = EventsRuntime::start(
        &ev_cfg,
        vec![StreamSetup {
            name: "yard".into(),
            zones: vec![zone("A", 0.0, 0.5), zone("B", 0.5, 1.0)],
            required_zones: vec![],
        }],
        out,
    )?;
    let sinks =
        Sinks::new(Some(handle.clone()), None, metrics.clone()).with_events(events.handle());
    let cam = metrics.stream("yard");

    // 4 frames/s; a person (100×300 px, feet at y = 650) walks right at 40 px/s from x = 250:
    // zone A, then B after ~8.5 s — while the broker is down (from 2 s to 12 s).
    let period = Duration::from_millis(250);
    let mut seq = 0u64;
    let mut x = 250.0;
    let start = Instant::now();
    let mut killed = None;
    let mut restarted = None;
    while x + 100.0 <= 1280.0 && start.elapsed() < Duration::from_secs(20) {
        if killed.is_none() && start.elapsed() >= Duration::from_secs(2) {
            broker.kill();
            killed = Some(Instant::now());
        }
        if killed.is_some_and(|k| k.elapsed() >= Duration::from_secs(10)) && restarted.is_none() {
            broker.restart()?;
            restarted = Some(Instant::now());
        }
        sinks.publish(&cam, &document(seq, Some([x, 350.0, x + 100.0, 650.0])));
        seq += 1;
        x += 10.0;
        tokio::time::sleep(period).await;
    }
    if restarted.is_none() {
        broker.restart()?;
    }
    // The person has left: empty frames until max_disappeared_s (2 s) has passed.
    for _ in 0..14 {
        sinks.publish(&cam, &document(seq, None));
        seq += 1;
        tokio::time::sleep(period).await;
    }
    drop(sinks);
    events.close();

    let produced = produced.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut received: Vec<Value> = Vec::new();
    let mut unique: Vec<Value> = Vec::new();
    let mut seen = HashSet::new();
    while unique.len() < produced.len() && Instant::now() < deadline {
        if let Ok(p) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_slice(&p).context("event is JSON")?;
            // QoS 1 is at-least-once: a message whose PUBACK was lost in the crash comes twice.
            if seen.insert(v.to_string()) {
                unique.push(v.clone());
            }
            received.push(v);
        }
    }
    let kinds: Vec<String> = unique
        .iter()
        .map(|v| v["type"].as_str().unwrap_or("?").to_string())
        .collect();
    println!(
        "events through a 10 s broker outage: {} frames, {} events produced ({kinds:?}), {} received ({} unique), \
         outbox dropped {}",
        seq,
        produced.len(),
        received.len(),
        unique.len(),
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix("rexstream_mqtt_outbox_dropped_total ").map(str::to_string))
            .unwrap_or_default(),
    );
    if unique != produced {
        bail!("received events differ from those produced:\nproduced {produced:#?}\nreceived {unique:#?}");
    }
    for v in &received {
        let errs = mqtt_schema_validator::validate(&schema, v);
        assert!(errs.is_empty(), "{errs:?}\n{v:#}");
    }
    assert_eq!(kinds.first().map(String::as_str), Some("new"));
    assert_eq!(kinds.last().map(String::as_str), Some("end"));
    assert_eq!(kinds.iter().filter(|k| *k == "new").count(), 1);
    assert_eq!(kinds.iter().filter(|k| *k == "end").count(), 1);
    let ids: HashSet<&str> = unique
        .iter()
        .filter_map(|v| v["after"]["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 1, "one id throughout: {ids:?}");
    let end = unique.last().context("end")?;
    assert_eq!(end["after"]["entered_zones"], serde_json::json!(["A", "B"]));
    assert!(end["after"]["end_time"].is_number());
    // The zone change happened during the outage: its update arrived after the restart.
    assert!(
        unique.iter().any(|v| v["type"] == "update"
            && v["before"]["entered_zones"] == serde_json::json!(["A"])
            && v["after"]["entered_zones"] == serde_json::json!(["A", "B"])),
        "{kinds:?}"
    );

    // Retained counts: the last value of each is 0 and retained for a late subscriber.
    let got = counts.collect_until(Duration::from_secs(5), |m| {
        m.iter().filter(|m| m.payload == "0").count() >= 2
    });
    let yard: Vec<&str> = got
        .iter()
        .filter(|m| m.topic.ends_with("yard/person"))
        .map(|m| m.payload.as_str())
        .collect();
    assert_eq!(yard.first(), Some(&"1"), "{got:?}");
    assert_eq!(yard.last(), Some(&"0"), "{got:?}");
    let late = Subscriber::start(port, &[&format!("{prefix}/yard/person")])?;
    let m = late
        .recv(Duration::from_secs(5))
        .context("retained count")?;
    assert!(m.retained && m.payload == "0", "{m:?}");

    let report = sink.close(Duration::from_secs(5)).await;
    assert_eq!(report.undelivered, 0);
    Ok(())
}

/// Events of every geometry type (box, point, polygon, keypoints), through new, update
/// (zone change) and end, validate against docs/events.schema.json; broken ones do not (so the
/// validator can fail).
#[test]
fn schema_accepts_every_geometry_and_rejects_broken_events() -> Result<()> {
    use rexomni::protocol::Keypoint;
    use rexstream::tracking::stream::{FrameObservation, StreamEvents};
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        workspace_root().join("docs/events.schema.json"),
    )?)?;
    let mut s = StreamEvents::new(
        "yard",
        &EventsConfig::default(),
        vec![zone("A", 0.0, 0.5), zone("B", 0.5, 1.0)],
        vec![],
    );
    let shapes = |x: f64| -> Vec<Detection> {
        vec![
            Detection {
                label: "person".into(),
                geometry: Geometry::Box {
                    coords: [x, 300.0, x + 80.0, 600.0],
                    norm: [x / 1280.0, 0.41, (x + 80.0) / 1280.0, 0.83],
                },
                score: Some(0.7),
            },
            Detection {
                label: "cup".into(),
                geometry: Geometry::Point {
                    coords: [x, 500.0],
                    norm: [x / 1280.0, 0.69],
                },
                score: None,
            },
            Detection {
                label: "sign/text".into(),
                geometry: Geometry::Polygon {
                    coords: vec![x, 400.0, x + 50.0, 400.0, x + 50.0, 450.0],
                    norm: vec![
                        x / 1280.0,
                        0.55,
                        (x + 50.0) / 1280.0,
                        0.55,
                        (x + 50.0) / 1280.0,
                        0.62,
                    ],
                },
                score: Some(0.4),
            },
            Detection {
                label: "dog".into(),
                geometry: Geometry::Keypoints {
                    coords: [x, 380.0, x + 60.0, 700.0],
                    norm: [x / 1280.0, 0.52, (x + 60.0) / 1280.0, 0.97],
                    points: vec![
                        Keypoint {
                            name: "nose".into(),
                            visible: true,
                            coords: Some([x + 5.0, 390.0]),
                            norm: Some([x / 1280.0, 0.54]),
                        },
                        Keypoint {
                            name: "tail".into(),
                            visible: false,
                            coords: None,
                            norm: None,
                        },
                    ],
                },
                score: Some(0.9),
            },
        ]
    };
    let mut events = Vec::new();
    for i in 0..12 {
        let f = FrameObservation {
            stream: "yard".into(),
            frame_time: 1_800_000_000.0 + f64::from(i),
            width: 1280,
            height: 720,
            model: "m".into(),
            detections: shapes(300.0 + 60.0 * f64::from(i)),
        };
        events.extend(s.on_frame(&f, None));
    }
    events.extend(s.finish());
    let msgs: Vec<Value> = events
        .iter()
        .filter_map(|o| match o {
            Output::Event(m) => Some(serde_json::to_value(m).ok()?),
            _ => None,
        })
        .collect();
    let kinds: HashSet<&str> = msgs.iter().filter_map(|m| m["type"].as_str()).collect();
    assert_eq!(kinds, HashSet::from(["new", "update", "end"]), "{msgs:#?}");
    let geometries: HashSet<&str> = msgs
        .iter()
        .filter_map(|m| m["after"]["geometry"]["type"].as_str())
        .collect();
    assert_eq!(geometries.len(), 4, "{geometries:?}");
    for m in &msgs {
        let errs = mqtt_schema_validator::validate(&schema, m);
        assert!(errs.is_empty(), "{errs:?}\n{m:#}");
    }
    let good = &msgs[0];
    for (what, broken) in [
        ("type", {
            let mut b = good.clone();
            b["type"] = "begin".into();
            b
        }),
        ("id", {
            let mut b = good.clone();
            b["after"]["id"] = "42".into();
            b
        }),
        ("box", {
            let mut b = good.clone();
            b["after"]["box"] = serde_json::json!([1.5, 2, 3, 4]);
            b
        }),
        ("missing", {
            let mut b = good.clone();
            b["before"]
                .as_object_mut()
                .map(|o| o.remove("entered_zones"));
            b
        }),
        ("extra", {
            let mut b = good.clone();
            b["after"]["speed"] = 3.into();
            b
        }),
    ] {
        assert!(
            !mqtt_schema_validator::validate(&schema, &broken).is_empty(),
            "{what} passed validation"
        );
    }
    Ok(())
}

/// The event store behind the HTTP endpoint: a scripted walk through zones A and B is recorded
/// (events and a JPEG snapshot), then `GET /api/events` lists it (filtered by zone, label, time),
/// `/api/events/<id>` returns it and `/api/events/<id>/snapshot.jpg` the JPEG. Bound beyond
/// loopback, the API refuses requests without the bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_serves_events_over_http() -> Result<()> {
    use rexstream::tracking::api::Api;
    use rexstream::tracking::store::EventStore;
    use rexstream::tracking::stream::{FrameObservation, StreamEvents};
    let dir = TempDir::new("events-store")?;
    let t0 = 1_800_000_000.0;
    let (store, _) = EventStore::open(&dir.path().join("events.db"), 10.0, t0)?;
    let store = Arc::new(store);
    let mut s = StreamEvents::new(
        "yard",
        &EventsConfig::default(),
        vec![zone("A", 0.0, 0.5), zone("B", 0.5, 1.0)],
        vec![],
    );
    // A tiny valid JPEG stands in for the rendered frame (rendering is snapshot.rs's own test).
    let jpeg: Vec<u8> = {
        let mut v = vec![0xff, 0xd8, 0xff, 0xe0];
        v.extend_from_slice(b"stand-in");
        v.extend_from_slice(&[0xff, 0xd9]);
        v
    };
    let make = |_: &Geometry| Some(jpeg.clone());
    let mut outputs = Vec::new();
    let mut x = 100.0;
    let mut t = t0;
    while x + 100.0 <= 1280.0 {
        let f = FrameObservation {
            stream: "yard".into(),
            frame_time: t,
            width: 1280,
            height: 720,
            model: "m".into(),
            detections: vec![Detection {
                label: "person".into(),
                geometry: Geometry::Box {
                    coords: [x, 350.0, x + 100.0, 650.0],
                    norm: [0.0; 4],
                },
                score: Some(0.8),
            }],
        };
        outputs.extend(s.on_frame(
            &f,
            Some(&make as rexstream::tracking::stream::SnapshotMaker<'_>),
        ));
        x += 150.0;
        t += 1.0;
    }
    outputs.extend(s.finish());
    let mut id = String::new();
    for o in &outputs {
        match o {
            Output::Event(m) => {
                id = m.after.id.clone();
                store.record(m)?;
            }
            Output::Snapshot { id, jpeg, .. } => store.snapshot(id, jpeg)?,
            _ => {}
        }
    }
    assert!(
        outputs.iter().any(|o| matches!(o, Output::Snapshot { .. })),
        "a snapshot was taken"
    );

    let api = Arc::new(std::sync::OnceLock::new());
    let _ = api.set(Api {
        store: store.clone(),
        token: None,
        loopback: true,
    });
    let metrics = Arc::new(Metrics::new());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) =
        rexstream::http::serve_with("127.0.0.1:0".parse()?, metrics, Some(api), async {
            let _ = rx.await;
        })
        .await?;
    let port = addr.port();
    let get =
        |path: String| tokio::task::spawn_blocking(move || rexstream_e2e::http_get(port, &path));
    let (code, body) = get("/api/events".into()).await??;
    assert_eq!(code, 200, "{body}");
    let list: Value = serde_json::from_str(&body)?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list:#}");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["zones"], serde_json::json!(["A", "B"]));
    assert_eq!(list[0]["has_snapshot"], true);
    assert!(list[0]["end_time"].is_number());
    for (q, n) in [
        ("?zone=B", 1),
        ("?zone=C", 0),
        ("?label=person&camera=yard", 1),
        ("?label=car", 0),
        (&*format!("?after={}", t0 - 1.0), 1),
        (&*format!("?before={}", t0 - 1.0), 0),
        ("?limit=1", 1),
    ] {
        let (code, body) = get(format!("/api/events{q}")).await??;
        assert_eq!(code, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body)?;
        assert_eq!(v.as_array().map(Vec::len), Some(n), "{q}: {v:#}");
    }
    let (code, _) = get("/api/events?limit=nope".into()).await??;
    assert_eq!(code, 400);
    let (code, body) = get(format!("/api/events/{id}")).await??;
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Value>(&body)?["label"], "person");
    let (code, _) = get("/api/events/1.000000-nosuch".into()).await??;
    assert_eq!(code, 404);
    // The snapshot bytes come back as stored (read raw: the body is binary).
    let raw = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
        write!(c, "GET /api/events/{id}/snapshot.jpg HTTP/1.0\r\n\r\n")?;
        let mut v = Vec::new();
        c.read_to_end(&mut v)?;
        Ok(v)
    })
    .await??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("head")?
        + 4;
    assert!(String::from_utf8_lossy(&raw[..split]).contains("image/jpeg"));
    assert_eq!(&raw[split..], &jpeg[..]);
    let _ = tx.send(());
    server.await?;

    // Beyond loopback: token required.
    let open = Api {
        store: store.clone(),
        token: Some("s3cret".into()),
        loopback: false,
    };
    let head = |auth: &str| format!("GET /api/events HTTP/1.1\r\n{auth}\r\n\r\n");
    assert_eq!(
        open.route(&head(""), "/api/events", "").map(|r| r.0),
        Some("403 Forbidden")
    );
    assert_eq!(
        open.route(&head("Authorization: Bearer nope"), "/api/events", "")
            .map(|r| r.0),
        Some("403 Forbidden")
    );
    assert_eq!(
        open.route(&head("authorization: Bearer s3cret"), "/api/events", "")
            .map(|r| r.0),
        Some("200 OK")
    );
    let closed = Api {
        store,
        token: None,
        loopback: false,
    };
    assert_eq!(
        closed
            .route(&head("Authorization: Bearer s3cret"), "/api/events", "")
            .map(|r| r.0),
        Some("403 Forbidden")
    );
    Ok(())
}
