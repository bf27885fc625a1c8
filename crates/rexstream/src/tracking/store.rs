//! The event store: every tracked-object event and its best snapshot in SQLite, queried by the
//! HTTP API (`/api/events`, Frigate's paths).
//!
//! In: [`EventMessage`]s and snapshots from the events thread, in publish order. Out: one row per
//! object id (its latest `after`, entered zones, snapshot JPEG), and JSON for the API. The
//! connection lives behind a mutex shared by the events thread (writes) and the HTTP tasks
//! (reads); SQLite work per event is one upsert of a few hundred bytes.
//!
//! Survives restarts: at open, rows a crash left open (`end_time` null) are closed at their
//! last-seen time, so the store never claims an object is still there, and their `end` messages are
//! handed back for the caller to publish (MQTT consumers saw a `new` and no `end`); new ids are never equal to
//! stored ones (random tails, and an insert never overwrites a row of another process: ids are
//! checked). Retention: rows older than `retention_days` (by start time) are deleted at open and
//! every hour.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::object::{EventMessage, EventType, ObjectState};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("events.db: {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("events.db: {path}: cannot create its folder: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Filters of `GET /api/events` (Frigate's query parameters).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    pub camera: Option<String>,
    pub label: Option<String>,
    pub zone: Option<String>,
    /// Started after this unix time.
    pub after: Option<f64>,
    /// Started before this unix time.
    pub before: Option<f64>,
    pub limit: usize,
}

/// Default and largest `limit` (Frigate's default is 100).
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

impl Query {
    /// Parse `camera=&label=&zone=&after=&before=&limit=` (percent-decoded); unknown keys are
    /// ignored, bad numbers are an error naming the parameter and value.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut q = Query {
            limit: DEFAULT_LIMIT,
            ..Query::default()
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            let num = |v: &str| {
                v.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| format!("{k}: {v:?} is not a number"))
            };
            match k {
                "camera" | "cameras" if v != "all" => q.camera = Some(v),
                "label" | "labels" if v != "all" => q.label = Some(v),
                "zone" | "zones" if v != "all" => q.zone = Some(v),
                "after" => q.after = Some(num(&v)?),
                "before" => q.before = Some(num(&v)?),
                "limit" => {
                    q.limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| format!("limit: {v:?} is not in 1..={MAX_LIMIT}"))?
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub struct EventStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    retention_days: f64,
}

impl EventStore {
    /// Open (or create) the store, close what a crash left open, apply retention.
    ///
    /// # Errors
    /// The folder cannot be created, or SQLite cannot open or migrate the file.
    /// Returns the store and one `end` message per event a crash left open (see
    /// [`EventStore::close_open`]): the caller publishes them, so MQTT consumers (Home Assistant)
    /// learn that the object is gone.
    pub fn open(
        path: &Path,
        retention_days: f64,
        now: f64,
    ) -> Result<(Self, Vec<EventMessage>), StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(err)?;
        // WAL: the HTTP readers never block the events thread's writes.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events (
                id TEXT PRIMARY KEY,
                camera TEXT NOT NULL,
                label TEXT NOT NULL,
                start_time REAL NOT NULL,
                end_time REAL,
                last_seen REAL NOT NULL,
                top_score REAL NOT NULL,
                zones TEXT NOT NULL,
                data TEXT NOT NULL,
                snapshot BLOB
            );
            CREATE INDEX IF NOT EXISTS events_start ON events (start_time);
            CREATE INDEX IF NOT EXISTS events_camera_label ON events (camera, label);",
        )
        .map_err(err)?;
        let store = Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            retention_days,
        };
        let closed = store.close_open()?;
        store.purge(now)?;
        Ok((store, closed))
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rows left open by a crash end at their last-seen time (their stored `after` is updated to
    /// say so: `end_time`, `active: false`, no current zones). Returns one `end` message per row
    /// closed, `before` = the last state stored, `after` = the closed state, oldest first; rows
    /// whose stored state cannot be read back (written by another version) are closed all the same
    /// but give no message.
    pub fn close_open(&self) -> Result<Vec<EventMessage>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let open: Vec<(String, f64, String)> = {
            let mut st = tx
                .prepare(
                    "SELECT id, last_seen, data FROM events WHERE end_time IS NULL
                     ORDER BY start_time, id",
                )
                .map_err(|e| self.err(e))?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| self.err(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?
        };
        let mut ends = Vec::new();
        for (id, last_seen, data) in open {
            tx.execute(
                "UPDATE events SET end_time = last_seen,
                    data = json_set(data, '$.end_time', last_seen, '$.active', json('false'), '$.current_zones', json('[]'))
                 WHERE id = ?1",
                params![id],
            )
            .map_err(|e| self.err(e))?;
            match serde_json::from_str::<ObjectState>(&data) {
                Ok(before) => {
                    let mut after = before.clone();
                    after.end_time = Some(last_seen);
                    after.active = false;
                    after.current_zones.clear();
                    after.pending_loitering = false;
                    ends.push(EventMessage {
                        kind: EventType::End,
                        before,
                        after,
                    });
                }
                Err(error) => {
                    tracing::warn!(message = "Crash-closed event has an unreadable state; no end message.", %id, %error);
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(ends)
    }

    /// Delete rows that started more than `retention_days` before `now`.
    pub fn purge(&self, now: f64) -> Result<usize, StoreError> {
        let cutoff = now - self.retention_days * 86_400.0;
        self.conn()
            .execute(
                "DELETE FROM events WHERE start_time < ?1 AND end_time IS NOT NULL",
                params![cutoff],
            )
            .map_err(|e| self.err(e))
    }

    /// Write one event: `new` inserts the row (refusing an id already stored), `update`/`end`
    /// replace its state.
    pub fn record(&self, m: &EventMessage) -> Result<(), StoreError> {
        let a = &m.after;
        let data = serde_json::to_string(a).unwrap_or_else(|_| "{}".into());
        let zones = serde_json::to_string(&a.entered_zones).unwrap_or_else(|_| "[]".into());
        let last_seen = a.end_time.unwrap_or(a.frame_time);
        let conn = self.conn();
        let r = match m.kind {
            EventType::New => conn.execute(
                "INSERT INTO events (id, camera, label, start_time, end_time, last_seen, top_score, zones, data)
                 VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7, ?8)",
                params![a.id, a.camera, a.label, a.start_time, last_seen, a.top_score, zones, data],
            ),
            EventType::Update | EventType::End => conn.execute(
                "UPDATE events SET end_time = ?2, last_seen = ?3, top_score = ?4, zones = ?5, data = ?6 WHERE id = ?1",
                params![a.id, a.end_time, last_seen, a.top_score, zones, data],
            ),
        };
        r.map(|_| ()).map_err(|e| self.err(e))
    }

    /// Keep `jpeg` as the snapshot of `id`.
    pub fn snapshot(&self, id: &str, jpeg: &[u8]) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE events SET snapshot = ?2 WHERE id = ?1",
                params![id, jpeg],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Events matching `q`, newest first, as the API shows them.
    pub fn query(&self, q: &Query) -> Result<Vec<Value>, StoreError> {
        let mut sql = String::from("SELECT data, snapshot IS NOT NULL FROM events WHERE 1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut bind = |sql: &mut String, clause: &str, v: rusqlite::types::Value| {
            args.push(v);
            sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
        };
        if let Some(c) = &q.camera {
            bind(&mut sql, " AND camera = ?", c.clone().into());
        }
        if let Some(l) = &q.label {
            bind(&mut sql, " AND label = ?", l.clone().into());
        }
        if let Some(z) = &q.zone {
            bind(
                &mut sql,
                " AND EXISTS (SELECT 1 FROM json_each(events.zones) WHERE value = ?)",
                z.clone().into(),
            );
        }
        if let Some(a) = q.after {
            bind(&mut sql, " AND start_time > ?", a.into());
        }
        if let Some(b) = q.before {
            bind(&mut sql, " AND start_time < ?", b.into());
        }
        sql.push_str(&format!(
            " ORDER BY start_time DESC LIMIT {}",
            q.limit.clamp(1, MAX_LIMIT)
        ));
        let conn = self.conn();
        let mut st = conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (data, has) = row.map_err(|e| self.err(e))?;
            out.push(api_view(&data, has));
        }
        Ok(out)
    }

    /// One event by id.
    pub fn get(&self, id: &str) -> Result<Option<Value>, StoreError> {
        self.conn()
            .query_row(
                "SELECT data, snapshot IS NOT NULL FROM events WHERE id = ?1",
                params![id],
                |r| Ok(api_view(&r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The snapshot JPEG of `id`.
    pub fn snapshot_jpeg(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn()
            .query_row(
                "SELECT snapshot FROM events WHERE id = ?1",
                params![id],
                |r| r.get::<_, Option<Vec<u8>>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(|e| self.err(e))
    }

    /// Number of rows (tests, logs).
    pub fn len(&self) -> Result<usize, StoreError> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| self.err(e))
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        self.len().map(|n| n == 0)
    }
}

/// Frigate's event API shape: the stored state plus `zones` (= entered zones) and
/// `has_snapshot` as the store knows it.
fn api_view(data: &str, has_snapshot: bool) -> Value {
    let mut v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        let zones = o
            .get("entered_zones")
            .cloned()
            .unwrap_or(Value::Array(vec![]));
        o.insert("zones".into(), zones);
        o.insert("has_snapshot".into(), Value::Bool(has_snapshot));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::object::{ObjectState, TrackedObject};
    use rexomni::protocol::Geometry;

    fn state(id_time: f64) -> ObjectState {
        let g = Geometry::Box {
            coords: [10.0, 10.0, 50.0, 90.0],
            norm: [0.0; 4],
        };
        TrackedObject::new("yard", "m", &g, "person", 0.9, id_time, 100, 100).state
    }

    fn msg(kind: EventType, s: &ObjectState) -> EventMessage {
        EventMessage {
            kind,
            before: s.clone(),
            after: s.clone(),
        }
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rexstream-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d.join("sub/events.db")
    }

    #[test]
    fn crash_left_open_rows_close_at_last_seen_and_queries_filter() {
        let path = temp("crash");
        let now = 1_800_000_000.0;
        let (store, closed) = EventStore::open(&path, 10.0, now).unwrap();
        assert!(closed.is_empty());
        let mut a = state(now);
        store.record(&msg(EventType::New, &a)).unwrap();
        a.frame_time = now + 7.0;
        a.entered_zones = vec!["drive".into()];
        store.record(&msg(EventType::Update, &a)).unwrap();
        store.snapshot(&a.id, b"\xff\xd8jpeg").unwrap();
        // A second, ended event of another label.
        let mut b = state(now + 1.0);
        b.label = "car".into();
        store.record(&msg(EventType::New, &b)).unwrap();
        b.end_time = Some(now + 3.0);
        store.record(&msg(EventType::End, &b)).unwrap();
        // Same id twice: refused (no reuse).
        assert!(store.record(&msg(EventType::New, &a)).is_err());
        drop(store); // "crash": a is still open

        let (store, closed) = EventStore::open(&path, 10.0, now + 60.0).unwrap();
        // One `end` to publish, for a only, ending at its last-seen time.
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].kind, EventType::End);
        assert_eq!(closed[0].after.id, a.id);
        assert_eq!(closed[0].before, a);
        assert_eq!(closed[0].after.end_time, Some(now + 7.0));
        assert!(!closed[0].after.active && closed[0].after.current_zones.is_empty());
        // Closed once: the next open has nothing left to close.
        drop(store);
        let (store, again) = EventStore::open(&path, 10.0, now + 61.0).unwrap();
        assert!(again.is_empty());
        let got = store.get(&a.id).unwrap().unwrap();
        assert_eq!(got["end_time"], now + 7.0);
        assert_eq!(got["active"], false);
        assert_eq!(got["zones"], serde_json::json!(["drive"]));
        assert_eq!(got["has_snapshot"], true);
        assert_eq!(
            store.snapshot_jpeg(&a.id).unwrap().unwrap(),
            b"\xff\xd8jpeg"
        );
        let all = store.query(&Query::parse("").unwrap()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0]["id"], b.id.as_str(), "newest first");
        let q = |s: &str| store.query(&Query::parse(s).unwrap()).unwrap().len();
        assert_eq!(q("label=car"), 1);
        assert_eq!(q("camera=yard&label=person"), 1);
        assert_eq!(q("zone=drive"), 1);
        assert_eq!(q("zone=porch"), 0);
        assert_eq!(q(&format!("after={}", now + 0.5)), 1);
        assert_eq!(q(&format!("before={}", now + 0.5)), 1);
        assert_eq!(q("limit=1"), 1);
        assert!(Query::parse("limit=0").is_err());
        assert_eq!(
            Query::parse("after=abc").unwrap_err(),
            "after: \"abc\" is not a number"
        );
        // Retention: 100 days later both are gone.
        let (store, _) = EventStore::open(&path, 10.0, now + 100.0 * 86_400.0).unwrap();
        assert!(store.is_empty().unwrap());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("red%20car+x"), "red car x");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(
            Query::parse("label=red%20car").unwrap().label.as_deref(),
            Some("red car")
        );
    }
}
