//! Tracked-object events through the real engine (issue 13): the `rexstream` binary runs the
//! trained tiny detector (tests/fixtures/tiny-detector) on its looped H.264 clip
//! (pipelines/media/tiny-detector.mp4: a blue disc crossing the frame left to right in 6 s, then
//! jumping back to the left), with `[events]`, a zone on the right half, snapshots, the SQLite store,
//! the HTTP API on loopback and Home Assistant discovery, publishing to a real mosquitto.
//!
//! - `clip_object_gives_new_update_end_snapshot_row_and_api`: the disc's first crossing is one event:
//!   `new` → `update`(s) (it enters the `right` zone) → `end` (the loop's jump back is too far for
//!   the tracker, so the first track is unseen for `max_disappeared_s` and ends while the process
//!   runs), one id, every message valid against docs/events.schema.json; the `end` says
//!   `has_snapshot`; the snapshot is a decodable 168×112 JPEG over HTTP and on the retained MQTT
//!   topic; the SQLite row has start and end times; `GET /api/events` lists it. After SIGTERM every
//!   id that got a `new` got exactly one `end`, and nothing followed it.
//! - `crash_mid_event_is_closed_and_ended_at_restart`: SIGKILL while an event is open, start again
//!   on the same store: the row is closed at its last-seen time, its `end` reaches MQTT, the
//!   retained count drops to 0, and no id is reused.
//! - `discovery_points_at_live_topics_and_is_reannounced`: the retained Home Assistant configs
//!   (binary_sensor, sensor, image per label of the prompt) are JSON with the keys Home Assistant
//!   needs, and their state, image and availability topics carry rexstream's values; after the
//!   broker is killed and restarted without persistence, rexstream publishes them and `online`
//!   again; Home Assistant's birth message (`homeassistant/status` = `online`) does the same, its
//!   last will (`offline`) does not.
//!
//! Run: `cargo test -p rexstream-e2e --test events_engine -- --nocapture` (prints what it saw).

#[path = "mqtt_schema_validator.rs"]
#[allow(dead_code)] // load_schema is for detections documents
mod mqtt_schema_validator;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rexstream_e2e::{
    free_port, http_get, mosquitto_pub, wait_until, workspace_root, Message, Mosquitto, Rexstream,
    Subscriber, TempDir,
};
use serde_json::Value;

const LABELS: [&str; 3] = ["red square", "blue disc", "green triangle"];
/// The stream's name in the pipeline file.
const CAM: &str = "clip";
/// The clip's size.
const SIZE: (u32, u32) = (168, 112);

/// One rexstream at a time: three at once on a small shared machine slow the detector down to
/// seconds per frame, which is not what these tests are about.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn fixture() -> PathBuf {
    workspace_root().join("tests/fixtures/tiny-detector")
}

/// A pipeline file for the looped clip with events, a zone on the right half, the store at `db`,
/// the API on `http_port` and, optionally, Home Assistant discovery.
fn write_config(
    dir: &Path,
    mqtt_port: u16,
    http_port: u16,
    db: &Path,
    discovery: bool,
) -> Result<PathBuf> {
    let clip = workspace_root().join("pipelines/media/tiny-detector.mp4");
    let cats = LABELS.map(|l| format!("{l:?}")).join(", ");
    let mut t = format!(
        "[model]\ndevice = \"cpu\"\nmax_batch = 1\nmax_new_tokens = 48\n\n\
         [mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\nkeep_alive_s = 2\n\n\
         [metrics]\nlisten = \"127.0.0.1:{http_port}\"\n\n\
         [[streams]]\nname = \"{CAM}\"\nuri = \"{}\"\nloop = true\nmax_fps = 4\ntask = \"detection\"\n\
         categories = [{cats}]\n\n\
         [[streams.zones]]\nname = \"right\"\npolygon = [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]]\ninertia = 1\n\n\
         [events]\n\
         # Tolerant of a detector slowed down by a loaded machine (seconds between frames), while the\n\
         # loop's jump back (0.6 of the diagonal) is never matched: the first track ends 3 s later.\n\
         max_disappeared_s = 3\nmax_distance = 0.4\ndb = \"{}\"\n",
        clip.display(),
        db.display()
    );
    if discovery {
        t.push_str("\n[homeassistant]\ndiscovery = true\n");
    }
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, t)?;
    Ok(path)
}

fn events_schema() -> Result<Value> {
    let p = workspace_root().join("docs/events.schema.json");
    serde_json::from_str(&std::fs::read_to_string(&p)?).with_context(|| format!("{}", p.display()))
}

/// Parse and schema-check every `<prefix>/events` message.
fn parse_events(schema: &Value, msgs: &[Message]) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for m in msgs {
        let v: Value = serde_json::from_str(&m.payload)
            .with_context(|| format!("event is not JSON: {}", m.payload))?;
        let errs = mqtt_schema_validator::validate(schema, &v);
        if !errs.is_empty() {
            bail!("event invalid against docs/events.schema.json: {errs:?}\n{v:#}");
        }
        out.push(v);
    }
    Ok(out)
}

fn kind(v: &Value) -> &str {
    v["type"].as_str().unwrap_or("?")
}

fn id(v: &Value) -> &str {
    v["after"]["id"].as_str().unwrap_or("?")
}

/// Per id, the message kinds in arrival order (QoS 1 duplicates removed).
fn lifecycles(events: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut seen = HashSet::new();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for v in events {
        if seen.insert(v.to_string()) {
            out.entry(id(v).to_string())
                .or_default()
                .push(kind(v).to_string());
        }
    }
    out
}

/// Raw HTTP/1.0 GET on loopback returning the body bytes (JPEGs are not text).
fn http_get_bytes(port: u16, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response for {path}"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status line: {head}"))?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// A JPEG that decodes to the clip's size.
fn check_jpeg(bytes: &[u8], what: &str) -> Result<()> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
        .with_context(|| format!("{what}: not a decodable JPEG ({} bytes)", bytes.len()))?;
    if (img.width(), img.height()) != SIZE {
        bail!(
            "{what}: {}x{} instead of {SIZE:?}",
            img.width(),
            img.height()
        );
    }
    Ok(())
}

/// The retained payload of `topic` as raw bytes (rumqttc: mosquitto_sub prints lines, JPEGs are
/// binary).
fn retained_bytes(port: u16, topic: &str, timeout: Duration) -> Result<Vec<u8>> {
    use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
    let mut o = MqttOptions::new(
        format!("e2e-retained-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut conn) = Client::new(o, 16);
    client.subscribe(topic, QoS::AtLeastOnce)?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) if p.topic == topic => {
                let _ = client.disconnect();
                return Ok(p.payload.to_vec());
            }
            Ok(Err(e)) => bail!("MQTT: {e}"),
            _ => {}
        }
    }
    bail!("no retained message on {topic} within {timeout:?}")
}

/// The store's row of `id`: (start_time, end_time), read with SQLite directly.
fn db_row(db: &Path, id: &str) -> Result<Option<(f64, Option<f64>)>> {
    use rusqlite::{Connection, OpenFlags, OptionalExtension};
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(c.query_row(
        "SELECT start_time, end_time FROM events WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?)
}

/// Every row: id → end_time.
fn db_rows(db: &Path) -> Result<BTreeMap<String, Option<f64>>> {
    use rusqlite::{Connection, OpenFlags};
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut st = c.prepare("SELECT id, end_time FROM events")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Collect events until `done` holds (or `timeout`), failing early with the log if rexstream exits.
fn collect_events(
    sub: &Subscriber,
    rex: &mut Rexstream,
    got: &mut Vec<Message>,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&[Message]) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done(got) {
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}; events so far:\n{}\nlog:\n{}",
                got.iter()
                    .map(|m| m.payload.chars().take(160).collect::<String>())
                    .collect::<Vec<_>>()
                    .join("\n"),
                rex.log()
            );
        }
        if !rex.proc.running() {
            bail!(
                "rexstream exited while waiting for {what}; log:\n{}",
                rex.log()
            );
        }
        if let Some(m) = sub.recv(Duration::from_millis(200)) {
            got.push(m);
        }
    }
    Ok(())
}

fn has(msgs: &[Message], k: &str, of: Option<&str>) -> bool {
    msgs.iter().any(|m| {
        serde_json::from_str::<Value>(&m.payload)
            .is_ok_and(|v| kind(&v) == k && of.is_none_or(|i| id(&v) == i))
    })
}

fn first_id(msgs: &[Message], k: &str) -> Option<String> {
    msgs.iter().find_map(|m| {
        let v: Value = serde_json::from_str(&m.payload).ok()?;
        (kind(&v) == k).then(|| id(&v).to_string())
    })
}

#[test]
fn clip_object_gives_new_update_end_snapshot_row_and_api() -> Result<()> {
    let _serial = serial();
    let schema = events_schema()?;
    let dir = TempDir::new("events-engine")?;
    let broker = Mosquitto::start()?;
    let http_port = free_port()?;
    let db = dir.path().join("data/events.db");
    let config = write_config(dir.path(), broker.port, http_port, &db, false)?;
    let sub = Subscriber::start(broker.port, &["rexstream/events"])?;
    let mut rex = Rexstream::run(&config, &fixture(), Some(http_port))?;
    let started = Instant::now();

    // The first crossing: new … end of one id.
    let mut got = Vec::new();
    collect_events(
        &sub,
        &mut rex,
        &mut got,
        Duration::from_secs(120),
        "the first event's end",
        |m| first_id(m, "new").is_some_and(|i| has(m, "end", Some(&i))),
    )?;
    let first = first_id(&got, "new").context("new")?;
    let events = parse_events(&schema, &got)?;
    for v in &events {
        let a = &v["after"];
        println!(
            "{:6} {} t {} box {} score {} zones {} snapshot {}",
            kind(v),
            id(v),
            a["frame_time"],
            a["box"],
            a["score"],
            a["entered_zones"],
            a["has_snapshot"]
        );
    }
    let life = lifecycles(&events);
    let kinds = &life[&first];
    println!(
        "first event {first} after {:.1} s: {kinds:?}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(kinds.first().map(String::as_str), Some("new"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("end"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| *k == "new").count(), 1, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| *k == "end").count(), 1, "{kinds:?}");
    assert!(
        kinds.iter().any(|k| k == "update"),
        "entering the right zone is an update: {kinds:?}"
    );
    let mine: Vec<&Value> = events.iter().filter(|v| id(v) == first).collect();
    for v in &mine {
        assert_eq!(v["before"]["id"], v["after"]["id"]);
        assert_eq!(v["after"]["camera"], CAM);
        assert_eq!(v["after"]["label"], "blue disc");
    }
    let end = mine.last().context("end")?;
    let a = &end["after"];
    println!(
        "end: start {} end {} entered {} top_score {} has_snapshot {}",
        a["start_time"], a["end_time"], a["entered_zones"], a["top_score"], a["has_snapshot"]
    );
    assert_eq!(a["has_snapshot"], true, "{end:#}");
    assert_eq!(a["entered_zones"], serde_json::json!(["right"]), "{end:#}");
    let (t0, t1) = (
        a["start_time"].as_f64().context("start_time")?,
        a["end_time"].as_f64().context("end_time")?,
    );
    assert!(t1 > t0, "end_time {t1} after start_time {t0}");
    assert!(
        mine.iter().any(|v| kind(v) == "update"
            && v["before"]["entered_zones"] == serde_json::json!([])
            && v["after"]["entered_zones"] == serde_json::json!(["right"])),
        "an update enters the zone"
    );

    // The store and the API, while the process runs.
    let (start, stop) = db_row(&db, &first)?.context("no SQLite row for the event")?;
    assert_eq!(start, t0);
    assert_eq!(stop, Some(t1), "the row's end_time is the end message's");
    let (status, body) = http_get(http_port, "/api/events?camera=clip&zone=right")?;
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body)?;
    let listed = list
        .as_array()
        .context("array")?
        .iter()
        .find(|e| e["id"] == first.as_str())
        .with_context(|| format!("GET /api/events does not list {first}: {body}"))?;
    assert_eq!(listed["end_time"], t1);
    assert_eq!(listed["has_snapshot"], true);
    assert_eq!(listed["zones"], serde_json::json!(["right"]));
    let (status, jpeg) = http_get_bytes(http_port, &format!("/api/events/{first}/snapshot.jpg"))?;
    assert_eq!(status, 200);
    check_jpeg(&jpeg, "API snapshot")?;
    let retained = retained_bytes(
        broker.port,
        "rexstream/clip/blue disc/snapshot",
        Duration::from_secs(10),
    )?;
    check_jpeg(&retained, "retained MQTT snapshot")?;
    println!(
        "snapshot: {} bytes over HTTP, {} bytes retained on MQTT, both {}x{} JPEGs",
        jpeg.len(),
        retained.len(),
        SIZE.0,
        SIZE.1
    );

    // Graceful stop: every announced object ends, nothing follows an end.
    rex.proc.signal("TERM")?;
    let code = rex.proc.wait_exit(Duration::from_secs(60))?;
    assert_eq!(code, Some(0), "exit status; log:\n{}", rex.log());
    got.extend(sub.collect_until(Duration::from_secs(3), |_| false));
    let events = parse_events(&schema, &got)?;
    let life = lifecycles(&events);
    for (i, k) in &life {
        assert_eq!(k.first().map(String::as_str), Some("new"), "{i}: {k:?}");
        assert_eq!(k.iter().filter(|k| *k == "new").count(), 1, "{i}: {k:?}");
        assert_eq!(k.iter().filter(|k| *k == "end").count(), 1, "{i}: {k:?}");
        assert_eq!(k.last().map(String::as_str), Some("end"), "{i}: {k:?}");
    }
    let rows = db_rows(&db)?;
    assert!(
        rows.values().all(Option::is_some),
        "rows closed after SIGTERM: {rows:?}"
    );
    for i in life.keys() {
        assert!(rows.contains_key(i), "{i} not stored: {rows:?}");
    }
    println!(
        "{} events over {:.1} s: {:?}",
        life.len(),
        started.elapsed().as_secs_f64(),
        life
    );
    Ok(())
}

#[test]
fn crash_mid_event_is_closed_and_ended_at_restart() -> Result<()> {
    let _serial = serial();
    let schema = events_schema()?;
    let dir = TempDir::new("events-crash")?;
    let broker = Mosquitto::start()?;
    let http_port = free_port()?;
    let db = dir.path().join("events.db");
    let config = write_config(dir.path(), broker.port, http_port, &db, false)?;
    let sub = Subscriber::start(broker.port, &["rexstream/events"])?;
    let count_topic = "rexstream/clip/blue disc";
    let counts = Subscriber::start(broker.port, &[count_topic])?;

    let mut rex = Rexstream::run(&config, &fixture(), Some(http_port))?;
    let mut got = Vec::new();
    collect_events(
        &sub,
        &mut rex,
        &mut got,
        Duration::from_secs(120),
        "a new event",
        |m| first_id(m, "new").is_some(),
    )?;
    let open_id = first_id(&got, "new").context("new")?;
    // The row is written right after the message is queued: wait for it, then crash.
    wait_until("the new row", Duration::from_secs(10), || {
        db_row(&db, &open_id).ok().flatten()
    })?;
    wait_until("count 1", Duration::from_secs(10), || {
        counts
            .recv(Duration::from_millis(100))
            .filter(|m| m.payload == "1")
    })?;
    rex.proc.signal("KILL")?;
    let _ = rex.proc.wait_exit(Duration::from_secs(10))?;
    got.extend(sub.collect_until(Duration::from_millis(500), |_| false));
    let before_restart = got.len();
    let open: Vec<String> = db_rows(&db)?
        .into_iter()
        .filter(|(_, e)| e.is_none())
        .map(|(i, _)| i)
        .collect();
    println!("after SIGKILL: open rows {open:?}");
    assert!(
        open.contains(&open_id),
        "the event was open at the crash: {open:?}"
    );
    assert!(
        !has(&got, "end", Some(&open_id)),
        "no end before the restart"
    );

    // Restart on the same store.
    let mut rex = Rexstream::run(&config, &fixture(), Some(http_port))?;
    collect_events(
        &sub,
        &mut rex,
        &mut got,
        Duration::from_secs(60),
        "the crash-closed event's end",
        |m| has(&m[before_restart..], "end", Some(&open_id)),
    )?;
    let events = parse_events(&schema, &got)?;
    let end = events[before_restart..]
        .iter()
        .find(|v| kind(v) == "end" && id(v) == open_id)
        .context("end")?;
    let stop = end["after"]["end_time"].as_f64().context("end_time")?;
    assert_eq!(end["after"]["active"], false);
    assert_eq!(end["after"]["current_zones"], serde_json::json!([]));
    assert_eq!(end["before"]["end_time"], Value::Null);
    let row = db_row(&db, &open_id)?.context("row")?;
    assert_eq!(
        row.1,
        Some(stop),
        "the row is closed at the end message's time"
    );
    assert!(stop >= row.0);
    // Closed at the last time the crashed process saw it: no later than its last message.
    let last_seen = events[..before_restart]
        .iter()
        .filter(|v| id(v) == open_id)
        .filter_map(|v| v["after"]["frame_time"].as_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(
        stop >= last_seen,
        "end_time {stop} not before the last message's frame_time {last_seen}"
    );
    // The retained count the crash left at 1 drops to 0 (Home Assistant's occupancy turns off).
    let after_crash = counts.collect_until(Duration::from_secs(10), |m| {
        m.iter().any(|m| m.payload == "0")
    });
    println!(
        "after restart: end_time {stop} (start {}), count messages {:?}",
        row.0,
        after_crash.iter().map(|m| &m.payload).collect::<Vec<_>>()
    );
    assert!(
        after_crash.iter().any(|m| m.payload == "0"),
        "count reset to 0: {after_crash:?}"
    );
    // The API is installed right after the store is open, a moment after the `end` is queued.
    let body = wait_until("the API", Duration::from_secs(10), || {
        http_get(http_port, &format!("/api/events/{open_id}"))
            .ok()
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
    })?;
    let api: Value = serde_json::from_str(&body)?;
    assert_eq!(api["end_time"], stop);

    // Let the second run announce its own object, then stop it.
    collect_events(
        &sub,
        &mut rex,
        &mut got,
        Duration::from_secs(60),
        "a new event after the restart",
        |m| {
            m[before_restart..].iter().any(|m| {
                serde_json::from_str::<Value>(&m.payload)
                    .is_ok_and(|v| kind(&v) == "new" && id(&v) != open_id)
            })
        },
    )?;
    rex.proc.signal("TERM")?;
    let code = rex.proc.wait_exit(Duration::from_secs(60))?;
    assert_eq!(code, Some(0), "exit status; log:\n{}", rex.log());
    got.extend(sub.collect_until(Duration::from_secs(3), |_| false));
    let events = parse_events(&schema, &got)?;
    let life = lifecycles(&events);
    println!("events across the crash: {life:?}");
    // No id reused: each id has one new and one end, in that order, across both runs.
    for (i, k) in &life {
        assert_eq!(k.first().map(String::as_str), Some("new"), "{i}: {k:?}");
        assert_eq!(k.iter().filter(|k| *k == "new").count(), 1, "{i}: {k:?}");
        assert_eq!(k.iter().filter(|k| *k == "end").count(), 1, "{i}: {k:?}");
        assert_eq!(k.last().map(String::as_str), Some("end"), "{i}: {k:?}");
    }
    assert!(life.len() >= 2, "{life:?}");
    let rows = db_rows(&db)?;
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        life.keys().collect::<Vec<_>>(),
        "one row per id"
    );
    assert!(rows.values().all(Option::is_some), "{rows:?}");
    Ok(())
}

/// Discovery configs by topic (the last payload of each), from a subscriber's messages.
fn configs(msgs: &[Message]) -> HashMap<String, String> {
    msgs.iter()
        .filter(|m| m.topic.ends_with("/config"))
        .map(|m| (m.topic.clone(), m.payload.clone()))
        .collect()
}

/// The nine entities (three per label) with the keys Home Assistant needs and rexstream's topics.
fn check_configs(c: &HashMap<String, String>) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut uids = HashSet::new();
    for label in LABELS {
        let l = label.replace(' ', "_");
        for (component, what) in [
            ("binary_sensor", "occupancy"),
            ("sensor", "count"),
            ("image", "snapshot"),
        ] {
            let topic = format!("homeassistant/{component}/rexstream/{CAM}_{l}_{what}/config");
            let p = c
                .get(&topic)
                .with_context(|| format!("no config on {topic}; have {:?}", c.keys()))?;
            let v: Value =
                serde_json::from_str(p).with_context(|| format!("{topic}: not JSON: {p}"))?;
            let uid = v["unique_id"].as_str().context("unique_id")?;
            assert!(uids.insert(uid.to_string()), "unique_id {uid} twice");
            assert!(v["name"].is_string() && v["device"]["identifiers"].is_array());
            assert_eq!(v["device"]["name"], CAM);
            assert_eq!(v["availability"][0]["topic"], "rexstream/available");
            assert_eq!(v["availability"][0]["payload_available"], "online");
            let state = format!("rexstream/{CAM}/{label}");
            match component {
                "image" => {
                    assert_eq!(v["image_topic"], format!("{state}/snapshot"));
                    assert_eq!(v["content_type"], "image/jpeg");
                }
                _ => assert_eq!(v["state_topic"], state, "{topic}"),
            }
            out.push(v);
        }
    }
    assert_eq!(c.len(), 9, "{:?}", c.keys());
    Ok(out)
}

#[test]
fn discovery_points_at_live_topics_and_is_reannounced() -> Result<()> {
    let _serial = serial();
    let dir = TempDir::new("events-ha")?;
    let mut broker = Mosquitto::start()?;
    let port = broker.port;
    let http_port = free_port()?;
    let db = dir.path().join("events.db");
    let config = write_config(dir.path(), port, http_port, &db, true)?;
    let topics = ["homeassistant/#", "rexstream/available"];
    let ha = Subscriber::start(port, &topics)?;
    let mut rex = Rexstream::run(&config, &fixture(), Some(http_port))?;
    let announced = |msgs: &[Message]| {
        configs(msgs).len() >= 9
            && msgs
                .iter()
                .any(|m| m.topic == "rexstream/available" && m.payload == "online")
    };
    let first = ha.collect_until(Duration::from_secs(60), announced);
    if !announced(&first) {
        bail!("discovery not announced: {first:?}\nlog:\n{}", rex.log());
    }
    let entities = check_configs(&configs(&first))?;
    println!("{} discovery configs, e.g. {}", entities.len(), entities[0]);

    // The state topics carry rexstream's values: the disc's count (an integer the binary
    // sensor's template reads), its snapshot.
    let state = Subscriber::start(port, &["rexstream/clip/blue disc"])?;
    let count = wait_until("a count of 1", Duration::from_secs(60), || {
        state
            .recv(Duration::from_millis(200))
            .filter(|m| m.payload == "1")
    })
    .with_context(|| rex.log())?;
    let v: u64 = count.payload.parse()?;
    assert_eq!(v, 1);
    let jpeg = retained_bytes(
        port,
        entities[5]["image_topic"].as_str().context("image_topic")?,
        Duration::from_secs(30),
    )?;
    check_jpeg(&jpeg, "image entity's topic")?;
    drop(state);
    drop(ha);

    // Broker killed and restarted without persistence: every retained message is gone, and
    // rexstream must publish the configs and `online` again once it reconnects.
    broker.kill();
    std::thread::sleep(Duration::from_secs(1));
    broker.restart()?;
    let killed = Instant::now();
    let ha = Subscriber::start(port, &topics)?;
    let again = ha.collect_until(Duration::from_secs(30), announced);
    if !announced(&again) {
        bail!(
            "not announced again after the broker restart: {again:?}\nlog:\n{}",
            rex.log()
        );
    }
    check_configs(&configs(&again))?;
    println!(
        "re-announced {} configs {:.1} s after the broker restart",
        configs(&again).len(),
        killed.elapsed().as_secs_f64()
    );
    // Everything retained has arrived; live messages from now on come with retain = 0.
    let _ = ha.collect_until(Duration::from_secs(2), |_| false);

    // Home Assistant's last will (`offline`) asks for nothing.
    mosquitto_pub(port, "homeassistant/status", "offline", false)?;
    let quiet = ha.collect_until(Duration::from_secs(3), |m| !configs(m).is_empty());
    assert!(
        configs(&quiet).is_empty(),
        "offline is not a birth: {quiet:?}"
    );
    // Its birth message: configs and `online` again, live.
    mosquitto_pub(port, "homeassistant/status", "online", false)?;
    let birth = ha.collect_until(Duration::from_secs(15), announced);
    if !announced(&birth) {
        bail!(
            "not announced on Home Assistant's birth message: {birth:?}\nlog:\n{}",
            rex.log()
        );
    }
    assert!(
        birth
            .iter()
            .filter(|m| m.topic.ends_with("/config"))
            .all(|m| !m.retained),
        "live messages, sent for the birth"
    );
    check_configs(&configs(&birth))?;
    println!(
        "birth message: {} configs and online again",
        configs(&birth).len()
    );
    rex.proc.signal("TERM")?;
    let code = rex.proc.wait_exit(Duration::from_secs(60))?;
    assert_eq!(code, Some(0), "exit status; log:\n{}", rex.log());
    Ok(())
}
