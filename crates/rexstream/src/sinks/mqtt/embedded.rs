//! The embedded MQTT broker: with no `[mqtt]` section, `rexstream run` serves MQTT 3.1.1 itself
//! so any client can subscribe at once (issue 5 item 7).
//!
//! In: a listen address (default [`DEFAULT_LISTEN`], loopback). Out: a running rumqttd broker on
//! its own threads (rumqttd starts a router thread and one thread with a current-thread tokio
//! runtime per listener; it does not use ours). The MQTT sink connects to it like to any broker,
//! with [`super::MqttConfig::embedded`].
//!
//! rumqttd keeps retained messages (`available`, `prompt/state`) in memory, so they are served
//! to late subscribers as with mosquitto; nothing survives a process restart, which is fine for
//! a broker whose only publisher is this process. rumqttd has no way to stop a broker: it lives
//! until the process exits.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::field::{Field, Visit};
use tracing::{error, info, Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::sinks::SinkError;

/// Loopback only: an unauthenticated broker must not be reachable from the network by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1883";

/// How long to wait for the broker's listener to accept connections after start.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// `[broker]` section: the embedded broker, used only when there is no `[mqtt]` section.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedBrokerConfig {
    /// Listen address; keep it on loopback unless the network is trusted (no authentication).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

/// A running embedded broker.
#[derive(Debug)]
pub struct Handle {
    pub addr: SocketAddr,
    _thread: std::thread::JoinHandle<()>,
}

/// Start the broker on `addr` and return once it accepts TCP connections.
///
/// # Errors
/// If the address is taken (checked before start: rumqttd only logs a bind failure on its own
/// thread) or the broker does not come up within [`READY_TIMEOUT`].
pub fn start(addr: SocketAddr) -> Result<Handle, SinkError> {
    // rumqttd binds on its server thread and only logs failure there; probe first so a taken
    // port is a clear start-up error. (A tiny race with another process binding in between
    // remains; the readiness wait below would then time out with the same message.)
    drop(TcpListener::bind(addr).map_err(|e| SinkError::Broker {
        addr,
        reason: format!(
            "cannot listen ({e}); set another address or configure an external [mqtt] broker"
        ),
    })?);

    let server = ServerSettings {
        name: "v4-embedded".to_string(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            // Detections documents with many polygons can be large; match the sink's 1 MiB.
            max_payload_size: 1 << 20,
            max_inflight_count: 1024,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 1024,
            // rumqttd keeps each topic's messages in segments; these bound its memory:
            // 10 segments of 16 MiB per topic.
            max_segment_size: 16 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("embedded".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let thread = std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                error!(message = "Embedded MQTT broker stopped.", error = %e);
            }
        })
        .map_err(|e| SinkError::Broker {
            addr,
            reason: format!("cannot spawn its thread: {e}"),
        })?;

    let deadline = Instant::now() + READY_TIMEOUT;
    while !mqtt_ready(addr) {
        if Instant::now() >= deadline || thread.is_finished() {
            return Err(SinkError::Broker {
                addr,
                reason: format!("not accepting connections after {READY_TIMEOUT:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    info!(message = "Embedded MQTT broker listening.", address = %addr);
    Ok(Handle {
        addr,
        _thread: thread,
    })
}

/// Readiness probe: an MQTT CONNECT answered by a CONNACK. A bare TCP connect would do for
/// "listening", but rumqttd logs a connection closed before its CONNECT at ERROR ("Error while
/// handling MQTT connect packet"), which a healthy start must not print (issue 15). The probe
/// closes without DISCONNECT: rumqttd logs a peer close at INFO, while a DISCONNECT makes it
/// handle the disconnection twice (see [`BrokerNoiseFilter`]).
fn mqtt_ready(addr: SocketAddr) -> bool {
    const CLIENT_ID: &[u8] = b"rexstream-ready-probe";
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    // MQTT 3.1.1 CONNECT: protocol "MQTT", level 4, clean session, keep-alive 5 s, client id.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 5];
    body.extend_from_slice(&(CLIENT_ID.len() as u16).to_be_bytes());
    body.extend_from_slice(CLIENT_ID);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    let mut connack = [0u8; 4];
    s.write_all(&packet).is_ok()
        && s.read_exact(&mut connack).is_ok()
        && connack == [0x20, 0x02, 0x00, 0x00]
}

/// Drops the two ERROR lines rumqttd 0.20 prints for a clean client exit (ours at shutdown, a
/// user's `mosquitto_sub` on Ctrl-C). It handles a client's DISCONNECT packet and then the closed
/// socket as two disconnections; whichever side sees the other's close second logs it at ERROR:
/// the router as `no-connection id N is already gone` (its own comment in router/routing.rs says
/// so), or the connection task as `router-drop` with `error=Recv(Disconnected)` (server/broker.rs:
/// the router dropped the link's channel after handling the DISCONNECT). Which one appears depends
/// on timing. Everything else rumqttd logs passes, `router-drop` with any other error included, so
/// real broker problems still reach the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct BrokerNoiseFilter;

impl BrokerNoiseFilter {
    /// True for an event this filter drops (target and message both match).
    fn is_noise(target: &str, message: &str, error: &str) -> bool {
        (target.starts_with("rumqttd::router")
            && message.starts_with("no-connection id ")
            && message.ends_with(" is already gone"))
            || (target.starts_with("rumqttd::server")
                && message == "router-drop"
                && error == "Recv(Disconnected)")
    }
}

impl<S: Subscriber> Layer<S> for BrokerNoiseFilter {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let target = event.metadata().target();
        if !target.starts_with("rumqttd") {
            return true;
        }
        #[derive(Default)]
        struct Fields {
            message: String,
            error: String,
        }
        impl Visit for Fields {
            fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
                match field.name() {
                    "message" => self.message = format!("{value:?}"),
                    "error" => self.error = format!("{value:?}"),
                    _ => {}
                }
            }
        }
        let mut f = Fields::default();
        event.record(&mut f);
        !Self::is_noise(target, &f.message, &f.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_filter_drops_only_the_clean_disconnect_lines() {
        let f = BrokerNoiseFilter::is_noise;
        let router = "rumqttd::router::routing";
        let server = "rumqttd::server::broker";
        assert!(f(router, "no-connection id 3 is already gone", ""));
        assert!(f(server, "router-drop", "Recv(Disconnected)"));
        assert!(!f(router, "no space for new connection", ""));
        assert!(!f(server, "no-connection id 3 is already gone", ""));
        assert!(!f(
            "rexstream::ingest",
            "no-connection id 3 is already gone",
            ""
        ));
        // A router-drop for any other reason, and other connection errors, still reach the log.
        assert!(!f(server, "router-drop", "Send(Full)"));
        assert!(!f(server, "disconnected", "Recv(Disconnected)"));
        assert!(!f(router, "router-drop", "Recv(Disconnected)"));
    }
}
