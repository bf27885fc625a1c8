//! The MQTT sink: delivers detections documents from the outbox to the broker, tracks their
//! acknowledgements, announces availability and serves runtime prompt changes.
//!
//! In: documents pushed into the [`Outbox`] by [`MqttHandle::publish`] (detector worker thread,
//! never blocks); MQTT packets from the broker. Out: `<prefix>/<stream>/detections` (QoS from
//! config, not retained), `<prefix>/available` = `online`/`offline` (retained; `offline` is also
//! the last will), `<prefix>/<stream>/prompt/state` (retained, the prompt in force), retained state
//! topics such as `<prefix>/<stream>/motion` ([`MqttHandle::set_retained`]) or event counts,
//! snapshots and Home Assistant discovery configs ([`MqttHandle::set_retained_topic`]), and
//! accepted prompt changes written to the [`PromptTable`]. Retained states are announced again
//! after every reconnect (a broker without persistence forgot them) and when a re-announce topic
//! registered with [`MqttHandle::reannounce_on`] says so (Home Assistant's birth message
//! `homeassistant/status` = `online`: a restarted Home Assistant asks every integration again).
//!
//! Two tokio tasks:
//! - the *poll task* owns rumqttc's `EventLoop` and does nothing but `poll()` it and forward each
//!   event over a channel. rumqttc only makes progress (reconnects, keep-alive, acks) while polled,
//!   and `poll()` must not be cancelled half-way (a cancelled flush can lose a PUBACK we owe), so
//!   it runs alone in its own loop (Vector does the same, src/sinks/mqtt/sink.rs);
//! - the *sink task* owns the delivery logic: which outbox entry each packet id belongs to, what
//!   to resend after a reconnect, prompt-set handling, graceful close.
//!
//! Why the outbox and not rumqttc's own retransmission: rumqttc keeps unacknowledged publishes
//! in memory and republishes them only if the broker resumes the session
//! (`connack.session_present`); a broker restart without persistence (mosquitto's default)
//! returns a new session, and rumqttc then *clears* its pending queue (eventloop.rs,
//! `if !connack.session_present { self.pending.clear() }`): every document in flight or queued
//! in its channel is lost. So we connect with `clean_session = true`, never rely on rumqttc to
//! retransmit, and keep each document in our outbox until its PUBACK (PUBCOMP for QoS 2) comes
//! back. After any disconnect, everything unacknowledged is sent again in outbox order.
//!
//! Packet ids: rumqttc assigns them inside the event loop and reports `Outgoing::Publish(pkid)`
//! for each publish request, in request order. The sink task is the only sender, so it keeps a
//! FIFO of "what each request was" and pairs it with these events. On a disconnect the poll task
//! waits for the sink task to reset that pairing, then empties rumqttc's leftovers (`clean()`,
//! `pending`, queued events), so no stale request can be sent after reconnect and be paired with
//! the wrong document.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, Outgoing, QoS};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::config::MqttConfig;
use super::outbox::{Outbox, Pushed};
use crate::metrics::{BrokerMode, Metrics, SinkKind, Stage, StreamMetrics};
use crate::sinks::prompts::PromptTable;
use crate::sinks::SinkError;

/// First retry delay after a failed connection, doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between connection attempts: once the broker is back, documents flow again
/// within this time (issue 6 asks for recovery in seconds, not minutes).
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// "Broker unreachable" is logged at most this often while it stays down.
const DOWN_LOG_EVERY: Duration = Duration::from_secs(30);
/// Outbox overflow is logged at most this often, with the count since the last line.
const OVERFLOW_LOG_EVERY: Duration = Duration::from_secs(10);
/// After the outbox is flushed at close, how long to wait for the broker to acknowledge
/// `offline` and for the DISCONNECT to go out.
const OFFLINE_GRACE: Duration = Duration::from_secs(2);

/// Install rustls' ring provider as the process default, once. rumqttc is built with
/// `use-rustls-no-provider` (no aws-lc C build), so something must choose a provider before the
/// first TLS connection; a provider someone else installed first is kept.
pub fn install_crypto_provider() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// State shared between the pushing side (any thread) and the sink task.
struct Shared {
    /// Tagged with the stream's metrics for detections documents; `None` for other messages
    /// (events, counts, snapshots, discovery), which are not counted as published documents.
    outbox: Mutex<Outbox<Option<Arc<StreamMetrics>>>>,
    notify: Notify,
    prefix: String,
    metrics: Arc<Metrics>,
    overflow_log: Mutex<(Option<Instant>, u64)>,
    /// Retained state topics (full topic) → (latest payload, not yet handed to the broker).
    /// A state, not a stream of messages: only the latest value matters, so it bypasses the outbox; every
    /// entry is sent again after a reconnect, because a broker without persistence forgot it, and on a
    /// re-announce message. An empty payload (deletes the broker's retained message) stays too: sent
    /// again it deletes nothing new, and a label that left the prompt stays removed.
    retained: Mutex<BTreeMap<String, (Vec<u8>, bool)>>,
    /// `(topic, payload)` pairs that ask for every retained state again ([`MqttHandle::reannounce_on`]).
    reannounce: Mutex<Vec<(String, Vec<u8>)>>,
}

/// Cheap, cloneable handle to push documents into the MQTT sink.
#[derive(Clone)]
pub struct MqttHandle {
    shared: Arc<Shared>,
}

impl MqttHandle {
    /// Queue a serialized document for `<prefix>/<stream>/detections`. Never blocks on the
    /// network; a full outbox applies its overflow policy and counts the drop.
    pub fn publish(
        &self,
        stream: &Arc<StreamMetrics>,
        stream_name: &str,
        seq: u64,
        payload: Vec<u8>,
    ) {
        let topic = format!("{}/{}/detections", self.shared.prefix, stream_name);
        self.push(topic, payload, false, Some(stream.clone()), seq);
    }

    /// Queue any message for `<prefix>/<suffix>` (events, counts, snapshots), in the same outbox
    /// and order as documents, with the configured QoS.
    pub fn publish_message(&self, suffix: &str, payload: Vec<u8>, retain: bool) {
        let topic = format!("{}/{}", self.shared.prefix, suffix);
        self.push(topic, payload, retain, None, 0);
    }

    /// Queue a message for an absolute topic (Home Assistant discovery lives outside the prefix).
    pub fn publish_absolute(&self, topic: String, payload: Vec<u8>, retain: bool) {
        self.push(topic, payload, retain, None, 0);
    }

    /// The topic prefix (`[mqtt] prefix`).
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    fn push(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        tag: Option<Arc<StreamMetrics>>,
        seq: u64,
    ) {
        let s = &self.shared;
        let (pushed, depth) = {
            let mut o = s.outbox.lock().unwrap_or_else(|p| p.into_inner());
            let pushed = o.push_message(topic, payload, retain, tag);
            (pushed, o.len())
        };
        s.metrics.mqtt_outbox_depth.set(depth as i64);
        let name =
            |t: &Option<Arc<StreamMetrics>>| t.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        let dropped = match pushed {
            Pushed::Queued => None,
            Pushed::DroppedOldest(e) => Some(("drop_oldest", name(&e.tag))),
            Pushed::Refused(e) => Some(("drop_newest", name(&e.tag))),
        };
        if let Some((policy, victim_stream)) = dropped {
            s.metrics.mqtt_outbox_dropped.inc();
            let mut log = s.overflow_log.lock().unwrap_or_else(|p| p.into_inner());
            log.1 += 1;
            if log.0.is_none_or(|t| t.elapsed() >= OVERFLOW_LOG_EVERY) {
                warn!(
                    message = "MQTT outbox full; dropping documents.",
                    policy,
                    dropped_since_last_log = log.1,
                    example_stream = %victim_stream,
                    latest_seq = seq,
                    capacity = depth,
                );
                *log = (Some(Instant::now()), 0);
            }
        }
        s.notify.notify_one();
    }

    /// Set the retained state topic `<prefix>/<suffix>` (e.g. `door/motion` = `ON`). Never blocks; the
    /// sink task publishes the latest value when connected, and again after each reconnect.
    pub fn set_retained(&self, suffix: &str, payload: Vec<u8>) {
        self.set_retained_topic(format!("{}/{suffix}", self.shared.prefix), payload);
    }

    /// Set the retained state of an absolute `topic` (event counts, snapshots, Home Assistant
    /// discovery configs; an empty payload deletes the broker's copy). Like
    /// [`MqttHandle::set_retained`]: never blocks, only the latest value is sent, and it is sent again
    /// after each reconnect and on a re-announce message.
    pub fn set_retained_topic(&self, topic: String, payload: Vec<u8>) {
        let s = &self.shared;
        let changed = {
            let mut r = s.retained.lock().unwrap_or_else(|p| p.into_inner());
            let same = r.get(&topic).is_some_and(|(p, _)| *p == payload);
            if !same {
                r.insert(topic, (payload, true));
            }
            !same
        };
        if changed {
            s.notify.notify_one();
        }
    }

    /// Subscribe to `topic` (now, and after every reconnect); a message on it whose payload is
    /// `payload` makes the sink publish `online` on `<prefix>/available` and every retained state
    /// again. For Home Assistant's birth message (`homeassistant/status` = `online`).
    pub fn reannounce_on(&self, topic: &str, payload: &[u8]) {
        let s = &self.shared;
        s.reannounce
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((topic.to_string(), payload.to_vec()));
        s.notify.notify_one();
    }

    /// Documents in the outbox (queued or awaiting acknowledgement).
    pub fn outbox_len(&self) -> usize {
        self.shared
            .outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// True while connected to the broker.
    pub fn connected(&self) -> bool {
        self.shared.metrics.mqtt_connected.get() > 0
    }
}

/// A running MQTT sink. Keep it until shutdown, then [`MqttSink::close`].
pub struct MqttSink {
    handle: MqttHandle,
    close_tx: watch::Sender<Option<Duration>>,
    task: JoinHandle<CloseReport>,
}

/// What [`MqttSink::close`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReport {
    /// Documents still in the outbox when the flush deadline passed (0 = all delivered).
    pub undelivered: usize,
    /// True if the broker acknowledged `offline` on `<prefix>/available`.
    pub offline_published: bool,
}

impl MqttSink {
    /// Connect (in the background) and start delivering. Must be called inside a tokio runtime.
    /// Returns at once: the first connection, and every reconnection, happens in the poll task.
    ///
    /// # Errors
    /// Invalid config, unreadable TLS files, a missing password variable, or a stream name that
    /// cannot be an MQTT topic level.
    pub fn start(
        cfg: &MqttConfig,
        mode: BrokerMode,
        prompts: Arc<PromptTable>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SinkError> {
        cfg.validate().map_err(|mut errs| errs.remove(0))?;
        for s in prompts.streams() {
            if s.is_empty() || s.contains(['/', '+', '#', '\0']) {
                return Err(SinkError::config(
                    "streams.name",
                    &s,
                    "cannot be used in an MQTT topic (/, +, # or empty)",
                ));
            }
        }
        install_crypto_provider();
        let client_id = cfg
            .client_id
            .clone()
            .unwrap_or_else(|| format!("rexstream-{:016x}", crate::event::instance_id()));
        let options = cfg.build(&client_id)?;
        let (client, eventloop) = AsyncClient::new(options, cfg.max_inflight.get() + 1024);
        metrics.set_broker_mode(mode);
        metrics.mqtt_connected.set(0);
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox::new(cfg.outbox_capacity, cfg.outbox_overflow)),
            notify: Notify::new(),
            prefix: cfg.prefix.clone(),
            metrics: metrics.clone(),
            overflow_log: Mutex::new((None, 0)),
            retained: Mutex::new(BTreeMap::new()),
            reannounce: Mutex::new(Vec::new()),
        });
        let (events_tx, events_rx) = mpsc::channel(256);
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(poll_loop(eventloop, events_tx, stop_rx));
        let (close_tx, close_rx) = watch::channel(None);
        let broker = cfg.broker()?;
        info!(
            message = "MQTT sink starting.",
            broker = %format_args!("{}:{}", broker.host, broker.port),
            tls = broker.tls,
            client_id = %client_id,
            prefix = %cfg.prefix,
            qos = cfg.qos,
            outbox_capacity = cfg.outbox_capacity.get(),
            outbox_overflow = ?cfg.outbox_overflow,
        );
        let task = tokio::spawn(
            SinkLoop {
                client,
                qos: cfg.qos(),
                max_inflight: cfg.max_inflight.get(),
                shared: shared.clone(),
                prompts,
                metrics,
                connected: false,
                awaiting: VecDeque::new(),
                by_pkid: HashMap::new(),
                collided: None,
                down_since: None,
                last_down_log: None,
                offline: OfflineState::NotSent,
                reannounce_subscribed: 0,
            }
            .run(events_rx, close_rx, stop_tx),
        );
        Ok(Self {
            handle: MqttHandle { shared },
            close_tx,
            task,
        })
    }

    pub fn handle(&self) -> MqttHandle {
        self.handle.clone()
    }

    /// Graceful close: keep delivering until the outbox is empty or `flush_timeout` passes,
    /// publish `offline` (retained) and disconnect. Documents pushed after this call may not be
    /// delivered.
    pub async fn close(self, flush_timeout: Duration) -> CloseReport {
        let _ = self.close_tx.send(Some(flush_timeout));
        match self.task.await {
            Ok(r) => r,
            Err(error) => {
                error!(message = "MQTT sink task failed.", %error);
                CloseReport {
                    undelivered: self.handle.outbox_len(),
                    offline_published: false,
                }
            }
        }
    }
}

/// Events the poll task forwards.
enum LoopEvent {
    Mqtt(Event),
    /// The connection failed or was lost. The poll task waits for `resume` before it empties
    /// rumqttc's leftovers and reconnects (see the module doc).
    Disconnected {
        error: String,
        resume: oneshot::Sender<()>,
    },
}

async fn poll_loop(
    mut el: EventLoop,
    tx: mpsc::Sender<LoopEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let polled = tokio::select! {
            r = el.poll() => r,
            _ = stop.changed() => return,
        };
        match polled {
            Ok(ev) => {
                if matches!(ev, Event::Incoming(Incoming::ConnAck(_))) {
                    backoff = MIN_BACKOFF;
                }
                if tx.send(LoopEvent::Mqtt(ev)).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                // Acks read in the same batch as the failure are real: pass them on first.
                while let Some(ev) = el.state.events.pop_front() {
                    if tx.send(LoopEvent::Mqtt(ev)).await.is_err() {
                        return;
                    }
                }
                let (resume, resumed) = oneshot::channel();
                if tx
                    .send(LoopEvent::Disconnected {
                        error: error.to_string(),
                        resume,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                if resumed.await.is_err() {
                    return;
                }
                // The sink task has forgotten every in-flight request; make rumqttc forget them
                // too, including requests that reached its channel after the failure.
                el.clean();
                el.pending.clear();
                el.state.events.clear();
                el.state.collision = None;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// What one publish request was, to pair it with its packet id.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Doc(u64),
    Offline,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OfflineState {
    NotSent,
    Sent,
    Acked,
}

struct SinkLoop {
    client: AsyncClient,
    qos: QoS,
    max_inflight: usize,
    shared: Arc<Shared>,
    prompts: Arc<PromptTable>,
    metrics: Arc<Metrics>,
    connected: bool,
    /// One entry per publish request handed to rumqttc and not yet seen as `Outgoing::Publish`.
    awaiting: VecDeque<Sent>,
    /// Packet id → what it carries, until acknowledged.
    by_pkid: HashMap<u16, Sent>,
    /// A packet id rumqttc parked on a collision (`Outgoing::AwaitAck`); its later
    /// `Outgoing::Publish` is the same request, not a new one.
    collided: Option<u16>,
    down_since: Option<Instant>,
    last_down_log: Option<Instant>,
    offline: OfflineState,
    /// How many of `Shared::reannounce`'s topics this connection has subscribed to.
    reannounce_subscribed: usize,
}

impl SinkLoop {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<LoopEvent>,
        mut close_rx: watch::Receiver<Option<Duration>>,
        stop_poll: watch::Sender<bool>,
    ) -> CloseReport {
        let shared = self.shared.clone();
        // Set when close() is called: flush until this instant.
        let mut flush_deadline: Option<Instant> = None;
        let mut disconnect_sent_at: Option<Instant> = None;
        loop {
            let wake = flush_deadline.map(|d| d.max(Instant::now()) + Duration::from_millis(50));
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(LoopEvent::Mqtt(e)) => {
                        if self.on_event(e) {
                            break; // our DISCONNECT went out
                        }
                    }
                    Some(LoopEvent::Disconnected { error, resume }) => {
                        self.on_disconnect(&error);
                        let _ = resume.send(());
                    }
                    None => break,
                },
                _ = shared.notify.notified() => {}
                changed = close_rx.changed(), if flush_deadline.is_none() => {
                    let timeout = match changed {
                        Ok(()) => (*close_rx.borrow()).unwrap_or_default(),
                        Err(_) => Duration::ZERO, // the MqttSink was dropped: close at once
                    };
                    flush_deadline = Some(Instant::now() + timeout);
                    info!(message = "MQTT sink closing; flushing the outbox.", documents = shared.outbox.lock().unwrap_or_else(|p| p.into_inner()).len(), timeout_s = timeout.as_secs_f64());
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {}
            }
            if self.connected && self.offline == OfflineState::NotSent {
                self.subscribe_reannounce();
                self.publish_retained();
                self.fill_window();
            }
            let Some(deadline) = flush_deadline else {
                continue;
            };
            let now = Instant::now();
            let empty = shared
                .outbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
            match self.offline {
                OfflineState::NotSent if self.connected && (empty || now >= deadline) => {
                    self.send(
                        Sent::Offline,
                        self.available_topic(),
                        true,
                        b"offline".to_vec(),
                    );
                    self.offline = OfflineState::Sent;
                }
                // Not connected at the deadline: the broker already published our last will
                // (`offline`) when the connection dropped; nothing more we can do.
                OfflineState::NotSent if now >= deadline => break,
                OfflineState::Sent if now >= deadline + OFFLINE_GRACE => break,
                OfflineState::Acked if disconnect_sent_at.is_none() => {
                    // A clean DISCONNECT: the broker discards the will, `offline` stays retained.
                    let _ = self.client.try_disconnect();
                    disconnect_sent_at = Some(now);
                }
                OfflineState::Acked
                    if disconnect_sent_at.is_some_and(|t| now >= t + OFFLINE_GRACE) =>
                {
                    break
                }
                _ => {}
            }
        }
        let _ = stop_poll.send(true);
        self.metrics.mqtt_connected.set(0);
        let undelivered = shared
            .outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        let report = CloseReport {
            undelivered,
            offline_published: self.offline == OfflineState::Acked,
        };
        if undelivered > 0 {
            warn!(
                message = "MQTT sink closed with undelivered documents.",
                undelivered
            );
        } else {
            info!(
                message = "MQTT sink closed; outbox empty.",
                offline_published = report.offline_published
            );
        }
        report
    }

    fn available_topic(&self) -> String {
        format!("{}/available", self.shared.prefix)
    }

    /// Hand one publish to rumqttc, remembering what it was.
    fn send(&mut self, what: Sent, topic: String, retain: bool, payload: Vec<u8>) {
        self.awaiting.push_back(what);
        if let Err(error) = self.client.try_publish(topic, self.qos, retain, payload) {
            // Only if the event loop is gone (channel closed) or its channel is full, which the
            // capacity (max_inflight + 1024) rules out: treat like a lost connection.
            self.awaiting.pop_back();
            self.metrics.mqtt_publish_failures.inc();
            error!(message = "MQTT client refused a publish.", %error);
            if let Sent::Doc(_) = what {
                let mut o = self.shared.outbox.lock().unwrap_or_else(|p| p.into_inner());
                let n = o.unsend_all();
                drop(o);
                self.metrics
                    .mqtt_publish_failures
                    .inc_by(n.saturating_sub(1) as u64);
            }
            self.connected = false;
        }
    }

    /// Publish every retained state not yet handed to the broker (see `Shared::retained`).
    fn publish_retained(&mut self) {
        let due: Vec<(String, Vec<u8>)> = {
            let mut r = self
                .shared
                .retained
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            r.iter_mut()
                .filter(|(_, (_, dirty))| *dirty)
                .map(|(k, (p, dirty))| {
                    *dirty = false;
                    (k.clone(), p.clone())
                })
                .collect()
        };
        for (topic, payload) in due {
            self.send(Sent::Other, topic, true, payload);
        }
    }

    /// Subscribe to re-announce topics registered since the connection was made.
    fn subscribe_reannounce(&mut self) {
        let topics: Vec<String> = {
            let r = self
                .shared
                .reannounce
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            r.iter()
                .skip(self.reannounce_subscribed)
                .map(|(t, _)| t.clone())
                .collect()
        };
        for topic in topics {
            if let Err(error) = self.client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                error!(message = "MQTT subscribe to a re-announce topic failed.", %topic, %error);
            }
            self.reannounce_subscribed += 1;
        }
    }

    /// `online` and every retained state again (a re-announce message, or a new connection).
    fn announce(&mut self) {
        self.send(
            Sent::Other,
            self.available_topic(),
            true,
            b"online".to_vec(),
        );
        for (_, dirty) in self
            .shared
            .retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values_mut()
        {
            *dirty = true;
        }
    }

    /// A message on a re-announce topic; true if the topic was one (whatever its payload).
    fn on_reannounce(&mut self, topic: &str, payload: &[u8]) -> bool {
        let wanted = {
            let r = self
                .shared
                .reannounce
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let matching: Vec<bool> = r
                .iter()
                .filter(|(t, _)| t == topic)
                .map(|(_, p)| p == payload)
                .collect();
            if matching.is_empty() {
                return false;
            }
            matching.contains(&true)
        };
        if wanted {
            info!(
                message =
                    "Re-announce requested; publishing availability and retained states again.",
                topic
            );
            self.announce();
        } else {
            debug!(message = "Ignoring re-announce topic message.", topic);
        }
        true
    }

    /// Send outbox entries until `max_inflight` are awaiting acknowledgement.
    fn fill_window(&mut self) {
        loop {
            let next = {
                let mut o = self.shared.outbox.lock().unwrap_or_else(|p| p.into_inner());
                if o.in_flight() >= self.max_inflight {
                    None
                } else {
                    o.next_unsent()
                        .map(|e| (e.id, e.topic.clone(), e.payload.clone(), e.retain))
                }
            };
            let Some((id, topic, payload, retain)) = next else {
                return;
            };
            self.send(Sent::Doc(id), topic, retain, payload);
            if !self.connected {
                return;
            }
        }
    }

    /// Returns true when our own DISCONNECT has been written (close finished).
    fn on_event(&mut self, ev: Event) -> bool {
        match ev {
            Event::Incoming(Incoming::ConnAck(ack)) => self.on_connected(ack.session_present),
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if self.collided == Some(pkid) {
                    self.collided = None;
                    return false;
                }
                let Some(what) = self.awaiting.pop_front() else {
                    return false;
                };
                if self.qos == QoS::AtMostOnce {
                    // QoS 0 has no acknowledgement: written to the socket is as good as it gets.
                    self.complete(what);
                } else {
                    self.by_pkid.insert(pkid, what);
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                if let Some(what) = self.awaiting.pop_front() {
                    self.by_pkid.insert(pkid, what);
                    self.collided = Some(pkid);
                }
            }
            Event::Incoming(Incoming::PubAck(ack)) if self.qos == QoS::AtLeastOnce => {
                if let Some(what) = self.by_pkid.remove(&ack.pkid) {
                    self.complete(what);
                }
            }
            Event::Incoming(Incoming::PubComp(ack)) if self.qos == QoS::ExactlyOnce => {
                if let Some(what) = self.by_pkid.remove(&ack.pkid) {
                    self.complete(what);
                }
            }
            // A re-announce topic's message is handled by `on_reannounce` (in the guard); any
            // other incoming message is a prompt change.
            Event::Incoming(Incoming::Publish(p)) if !self.on_reannounce(&p.topic, &p.payload) => {
                self.on_prompt_set(&p.topic, &p.payload)
            }
            Event::Incoming(Incoming::SubAck(_)) => {
                debug!(message = "Subscribed to prompt-set topics.", topic = %format!("{}/+/prompt/set", self.shared.prefix));
            }
            Event::Outgoing(Outgoing::Disconnect) => return self.offline == OfflineState::Acked,
            _ => {}
        }
        false
    }

    fn complete(&mut self, what: Sent) {
        match what {
            Sent::Doc(id) => {
                let (entry, depth) = {
                    let mut o = self.shared.outbox.lock().unwrap_or_else(|p| p.into_inner());
                    let e = o.ack(id);
                    (e, o.len())
                };
                self.metrics.mqtt_outbox_depth.set(depth as i64);
                if let Some(e) = entry {
                    // Only detections documents count as published documents and feed the
                    // `publish` stage latency; events, counts and snapshots ride along untagged.
                    if let Some(tag) = &e.tag {
                        tag.published(SinkKind::Mqtt);
                        self.metrics
                            .observe_stage(Stage::Publish, e.enqueued.elapsed());
                    }
                }
            }
            Sent::Offline => self.offline = OfflineState::Acked,
            Sent::Other => {}
        }
    }

    fn on_connected(&mut self, session_present: bool) {
        self.connected = true;
        self.metrics.mqtt_connected.set(1);
        let queued = self
            .shared
            .outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        match self.down_since.take() {
            Some(t) => info!(
                message = "Reconnected to MQTT broker; resending the outbox.",
                down_s = t.elapsed().as_secs_f64(),
                outbox = queued,
                session_present,
            ),
            None => info!(message = "Connected to MQTT broker.", outbox = queued),
        }
        self.last_down_log = None;
        // `online`, and every retained state marked due (the main loop sends them): a restarted
        // broker without persistence lost them.
        self.announce();
        // A clean session has no subscriptions: the main loop makes the re-announce ones again.
        self.reannounce_subscribed = 0;
        let topic = format!("{}/+/prompt/set", self.shared.prefix);
        if let Err(error) = self.client.try_subscribe(topic, QoS::AtLeastOnce) {
            error!(message = "MQTT subscribe to prompt-set topics failed.", %error);
        }
        // Re-announce every prompt in force: a restarted broker without persistence lost them.
        for stream in self.prompts.streams() {
            self.publish_state(&stream);
        }
    }

    fn publish_state(&mut self, stream: &str) {
        let Some(prompt) = self.prompts.get(stream) else {
            return;
        };
        match serde_json::to_vec(&*prompt) {
            Ok(payload) => {
                let topic = format!("{}/{}/prompt/state", self.shared.prefix, stream);
                self.send(Sent::Other, topic, true, payload);
            }
            Err(error) => {
                warn!(message = "Prompt not serializable; state not published.", stream, %error)
            }
        }
    }

    fn on_disconnect(&mut self, error: &str) {
        let was_connected = self.connected;
        self.connected = false;
        self.metrics.mqtt_connected.set(0);
        let (resent, queued) = {
            let mut o = self.shared.outbox.lock().unwrap_or_else(|p| p.into_inner());
            (o.unsend_all(), o.len())
        };
        // Each document that was sent and not acknowledged is a failed attempt; it stays queued.
        self.metrics.mqtt_publish_failures.inc_by(resent as u64);
        self.awaiting.clear();
        self.by_pkid.clear();
        self.collided = None;
        if self.offline == OfflineState::Sent {
            self.offline = OfflineState::NotSent;
        }
        let now = Instant::now();
        if was_connected {
            self.down_since = Some(now);
            self.last_down_log = Some(now);
            warn!(message = "MQTT connection lost; documents stay in the outbox.", %error, outbox = queued, unacknowledged = resent);
        } else if self
            .last_down_log
            .is_none_or(|t| now.duration_since(t) >= DOWN_LOG_EVERY)
        {
            self.last_down_log = Some(now);
            self.down_since.get_or_insert(now);
            warn!(message = "MQTT broker unreachable; retrying.", %error, outbox = queued);
        } else {
            debug!(message = "MQTT connection attempt failed.", %error);
        }
    }

    fn on_prompt_set(&mut self, topic: &str, payload: &[u8]) {
        let prefix = &self.shared.prefix;
        let stream = topic
            .strip_prefix(prefix.as_str())
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.strip_suffix("/prompt/set"));
        let Some(stream) = stream.filter(|s| !s.contains('/')) else {
            debug!(message = "Ignoring message on an unexpected topic.", topic);
            return;
        };
        let result = self.prompts.apply(stream, payload);
        match result {
            Ok(prompt) => {
                self.metrics.prompt_update(true);
                info!(message = "Prompt changed.", stream, task = ?prompt.task, categories = prompt.categories.len());
                self.publish_state(stream);
            }
            Err(error) => {
                self.metrics.prompt_update(false);
                warn!(message = "Prompt-set message rejected; the old prompt stays.", stream, %error);
            }
        }
    }
}
