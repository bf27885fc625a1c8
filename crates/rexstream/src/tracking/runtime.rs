//! The events thread of `rexstream run`: detections documents in (beside the sinks, never inside
//! the detector worker), tracked-object events, counts and snapshots out through the MQTT outbox.
//!
//! In: [`EventsHandle::document`] from the sinks fan-out (detector worker thread; never blocks: a
//! bounded channel, a full one drops the frame for tracking only, which the tracker survives like
//! a missed detection), [`EventsHandle::no_motion`] from the motion gate. Out: `<prefix>/events`
//! (QoS of `[mqtt]`, not retained), retained counts `<prefix>/<stream>/<label>` and
//! `<prefix>/<zone>/<label>`, retained snapshots `<prefix>/<stream>/<label>/snapshot`, all queued
//! on the same outbox as documents so their order survives broker outages. One OS thread, woken
//! at least once a second to end the objects of streams that went silent.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::config::EventsConfig;
use super::homeassistant::Discovery;
use super::store::EventStore;
use super::stream::{FrameObservation, Output, StreamEvents};
use super::zones::ZoneConfig;
use crate::event::DetectionsDocument;
use crate::ingest::frame::Frame;
use crate::sinks::prompts::PromptTable;

/// Frames waiting for the events thread. Small: each may carry a full frame for snapshots, and
/// tracking a frame takes microseconds, so a backlog means the thread is stuck, not busy.
const QUEUE: usize = 8;
/// How often silent streams are checked.
const TICK: Duration = Duration::from_secs(1);
/// A full queue is logged at most this often.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Where outputs go (the MQTT outbox, the store, Home Assistant discovery). Called on the events
/// thread in output order.
pub type OutputSink = Box<dyn FnMut(&Output) + Send>;

enum Msg {
    Frame(FrameObservation, Option<Box<Frame>>),
    NoMotion(String, f64),
}

/// Cloneable handle to the events thread.
#[derive(Clone)]
pub struct EventsHandle {
    tx: SyncSender<Msg>,
    snapshots: bool,
    drop_log: Arc<Mutex<(Option<Instant>, u64)>>,
}

impl EventsHandle {
    /// A detections document (and, when snapshots are on, its frame). Never blocks.
    pub fn document(&self, doc: &DetectionsDocument, frame: Option<Frame>) {
        let frame = frame.filter(|_| self.snapshots).map(Box::new);
        self.send(Msg::Frame(FrameObservation::from_document(doc), frame));
    }

    /// The motion gate dropped a frame of `stream` captured at `captured_at`: nothing moved. Keeps
    /// that stream's objects alive (they never end while the gate vouches for them). Never blocks.
    pub fn no_motion(&self, stream: &str, captured_at: SystemTime) {
        let t = captured_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.send(Msg::NoMotion(stream.to_string(), t));
    }

    fn send(&self, m: Msg) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(m) {
            let mut log = self.drop_log.lock().unwrap_or_else(|p| p.into_inner());
            log.1 += 1;
            if log.0.is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY) {
                warn!(
                    message = "Events thread behind; frames skipped for tracking.",
                    skipped_since_last_log = log.1
                );
                *log = (Some(Instant::now()), 0);
            }
        }
    }
}

/// The running events thread. Dropping every handle (and this) stops it after it ended every
/// object (`end` for each announced one).
pub struct EventsRuntime {
    handle: EventsHandle,
    thread: JoinHandle<()>,
}

/// One stream's settings for the events thread.
pub struct StreamSetup {
    pub name: String,
    pub zones: Vec<ZoneConfig>,
    pub required_zones: Vec<String>,
}

impl EventsRuntime {
    /// Start the thread.
    ///
    /// # Errors
    /// If the OS refuses a thread.
    pub fn start(
        cfg: &EventsConfig,
        streams: Vec<StreamSetup>,
        sink: OutputSink,
    ) -> std::io::Result<Self> {
        Self::start_with(cfg, streams, sink, None)
    }

    /// [`EventsRuntime::start`] with Home Assistant discovery kept in line with the prompts in
    /// force (checked every tick, so a prompt changed over MQTT shows within a second).
    ///
    /// # Errors
    /// If the OS refuses a thread.
    pub fn start_with(
        cfg: &EventsConfig,
        streams: Vec<StreamSetup>,
        sink: OutputSink,
        discovery: Option<(Discovery, Arc<PromptTable>)>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        let states: HashMap<String, StreamEvents> = streams
            .into_iter()
            .map(|s| {
                (
                    s.name.clone(),
                    StreamEvents::new(&s.name, cfg, s.zones, s.required_zones),
                )
            })
            .collect();
        let thread = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || run(rx, states, sink, discovery))?;
        info!(
            message = "Events thread started.",
            snapshots = cfg.snapshots,
            min_hits = cfg.min_hits.get(),
            max_disappeared_s = cfg.max_disappeared_s
        );
        Ok(Self {
            handle: EventsHandle {
                tx,
                snapshots: cfg.snapshots,
                drop_log: Arc::new(Mutex::new((None, 0))),
            },
            thread,
        })
    }

    pub fn handle(&self) -> EventsHandle {
        self.handle.clone()
    }

    /// Stop once every other handle is gone: remaining objects end (`end` messages go out
    /// before the MQTT sink is closed by the caller).
    pub fn close(self) {
        drop(self.handle);
        let _ = self.thread.join();
    }
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn sync_discovery(
    discovery: &mut Option<(Discovery, Arc<PromptTable>)>,
    names: &[String],
    sink: &mut OutputSink,
) {
    let Some((d, prompts)) = discovery else {
        return;
    };
    for n in names {
        let categories = prompts
            .get(n)
            .map(|p| p.categories.clone())
            .unwrap_or_default();
        for (topic, payload) in d.sync(n, &categories) {
            sink(&Output::Discovery { topic, payload });
        }
    }
}

fn run(
    rx: Receiver<Msg>,
    mut states: HashMap<String, StreamEvents>,
    mut sink: OutputSink,
    mut discovery: Option<(Discovery, Arc<PromptTable>)>,
) {
    let mut names: Vec<String> = states.keys().cloned().collect();
    names.sort();
    sync_discovery(&mut discovery, &names, &mut sink);
    let mut last_tick = Instant::now();
    // Wall-clock arrival of each stream's last frame or no-motion notice (for `tick`).
    let mut arrived: HashMap<String, Instant> = HashMap::new();
    loop {
        match rx.recv_timeout(TICK) {
            Ok(Msg::Frame(f, frame)) => {
                let Some(s) = states.get_mut(&f.stream) else {
                    continue;
                };
                arrived.insert(f.stream.clone(), Instant::now());
                let make = |g: &rexomni::protocol::Geometry| {
                    frame.as_deref().and_then(|fr| super::snapshot::jpeg(fr, g))
                };
                let outputs = s.on_frame(
                    &f,
                    frame
                        .as_ref()
                        .map(|_| &make as super::stream::SnapshotMaker<'_>),
                );
                for o in &outputs {
                    sink(o);
                }
            }
            Ok(Msg::NoMotion(stream, t)) => {
                if let Some(s) = states.get_mut(&stream) {
                    arrived.insert(stream.clone(), Instant::now());
                    for o in &s.no_motion(t) {
                        sink(o);
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            for (name, s) in states.iter_mut() {
                let Some(at) = arrived.get(name) else {
                    continue;
                };
                for o in &s.tick(at.elapsed().as_secs_f64()) {
                    sink(o);
                }
            }
            sync_discovery(&mut discovery, &names, &mut sink);
        }
    }
    for n in &names {
        if let Some(s) = states.get_mut(n) {
            for o in &s.finish() {
                sink(o);
            }
        }
    }
}

/// What to publish for events a crash left open (closed by [`EventStore::open`]): each one's
/// `end`, then 0 on every count topic it was counted in (`<stream>/<label>`, `<stream>/all`, and
/// `<zone>/<label>`, `<zone>/all` for the zones it was in). Nothing is tracked yet at start, so 0
/// is the truth; without it a retained count stays at its crash-time value and Home Assistant's
/// occupancy sensor stays "on".
pub fn crash_outputs(closed: &[super::object::EventMessage]) -> Vec<Output> {
    let mut out: Vec<Output> = closed.iter().cloned().map(Output::Event).collect();
    let mut topics = std::collections::BTreeSet::new();
    for m in closed {
        let s = &m.before;
        for label in [s.label.as_str(), "all"] {
            topics.insert(format!("{}/{label}", s.camera));
            for z in &s.current_zones {
                topics.insert(format!("{z}/{label}"));
            }
        }
    }
    out.extend(
        topics
            .into_iter()
            .map(|topic| Output::Count { topic, count: 0 }),
    );
    out
}

/// What [`start_for`] started.
pub struct Started {
    pub runtime: EventsRuntime,
    /// The event store, when `[events] db` is set (for the HTTP API).
    pub store: Option<Arc<EventStore>>,
}

/// How often the store deletes events past their retention.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Start the events thread for `rexstream run` when the pipeline has `[events]`: outputs go to the
/// MQTT outbox behind `mqtt` (topics as in design.md) and to the event store.
///
/// # Errors
/// If the store cannot be opened (naming the file) or the thread cannot start.
pub fn start_for(
    pipeline: &crate::config::Pipeline,
    mqtt: crate::sinks::mqtt::MqttHandle,
    prompts: Arc<PromptTable>,
) -> anyhow::Result<Option<Started>> {
    let Some(cfg) = &pipeline.raw.events else {
        return Ok(None);
    };
    let streams = pipeline
        .streams
        .iter()
        .map(|s| StreamSetup {
            name: s.name.clone(),
            zones: s.zones.clone(),
            required_zones: s.required_zones.clone(),
        })
        .collect();
    let discovery = pipeline
        .raw
        .homeassistant
        .as_ref()
        .filter(|h| h.discovery)
        .map(|h| (Discovery::new(&h.prefix, mqtt.prefix()), prompts));
    let base = pipeline.file.parent().unwrap_or(std::path::Path::new("."));
    let store = match cfg.db_path(base) {
        None => None,
        Some(path) => {
            let (store, closed) = EventStore::open(&path, cfg.retention_days, now_s())?;
            info!(message = "Event store open.", path = %path.display(), closed_after_crash = closed.len(), events = store.len().unwrap_or(0));
            // Events a crash left open: their `end` and zeroed counts go out first, so Home
            // Assistant and automations do not show the object as present forever.
            for o in crash_outputs(&closed) {
                super::replay::publish(&mqtt, &o);
            }
            Some(Arc::new(store))
        }
    };
    if let Some(h) = pipeline.raw.homeassistant.as_ref().filter(|h| h.discovery) {
        // Home Assistant's birth message: a restarted Home Assistant asks for discovery again.
        mqtt.reannounce_on(&format!("{}/status", h.prefix), b"online");
    }
    let st = store.clone();
    let mut last_purge = Instant::now();
    let sink: OutputSink = Box::new(move |o| {
        super::replay::publish(&mqtt, o);
        let Some(st) = &st else {
            return;
        };
        let r = match o {
            Output::Event(m) => st.record(m),
            Output::Snapshot { id, jpeg, .. } => st.snapshot(id, jpeg),
            _ => Ok(()),
        };
        if let Err(error) = r {
            warn!(message = "Event not stored.", %error);
        }
        if last_purge.elapsed() >= PURGE_EVERY {
            last_purge = Instant::now();
            if let Err(error) = st.purge(now_s()) {
                warn!(message = "Event store retention failed.", %error);
            }
        }
    });
    let runtime = EventsRuntime::start_with(cfg, streams, sink, discovery)?;
    Ok(Some(Started { runtime, store }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::object::{EventMessage, EventType, TrackedObject};
    use rexomni::protocol::Geometry;

    #[test]
    fn crash_outputs_end_each_event_and_zero_its_counts() {
        let g = Geometry::Box {
            coords: [10.0, 10.0, 50.0, 90.0],
            norm: [0.0; 4],
        };
        let mut a = TrackedObject::new("yard", "m", &g, "person", 0.9, 100.0, 100, 100).state;
        a.current_zones = vec!["drive".into()];
        let mut b = TrackedObject::new("yard", "m", &g, "car", 0.9, 101.0, 100, 100).state;
        b.current_zones = vec![];
        let end = |s: &crate::tracking::ObjectState| EventMessage {
            kind: EventType::End,
            before: s.clone(),
            after: s.clone(),
        };
        let out = crash_outputs(&[end(&a), end(&b)]);
        assert_eq!(out[0], Output::Event(end(&a)));
        assert_eq!(out[1], Output::Event(end(&b)));
        let counts: Vec<(&str, usize)> = out[2..]
            .iter()
            .map(|o| match o {
                Output::Count { topic, count } => (topic.as_str(), *count),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            counts,
            [
                ("drive/all", 0),
                ("drive/person", 0),
                ("yard/all", 0),
                ("yard/car", 0),
                ("yard/person", 0)
            ]
        );
        assert!(crash_outputs(&[]).is_empty());
    }
}
