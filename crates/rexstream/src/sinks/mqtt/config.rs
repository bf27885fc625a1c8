//! `[mqtt]` section of the pipeline config, and its resolution into rumqttc options.
//!
//! In: the TOML table (parsed by the top-level config) and the process environment (password).
//! Out: a validated [`MqttConfig`] and, at start, [`MqttConfig::build`] → rumqttc `MqttOptions`
//! with TLS and credentials resolved. The password is read from the environment variable named
//! in `password_env` at build time and only ever held inside rumqttc's options: it is never
//! stored here, logged, or shown in metrics or `/healthz`.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use serde::Deserialize;

use super::outbox::OverflowPolicy;
use crate::sinks::SinkError;

const fn default_qos() -> u8 {
    1
}
fn default_prefix() -> String {
    "rexstream".to_string()
}
const fn default_keep_alive_s() -> u64 {
    // A dead broker (or cut cable) is noticed within 1.5 × keep-alive; 10 s keeps that short
    // without PINGREQ chatter.
    10
}
const fn default_outbox_capacity() -> NonZeroUsize {
    // ~8 minutes of one stream at 20 documents/s, ~10 MB at 1 KiB each.
    match NonZeroUsize::new(10_000) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}
const fn default_max_inflight() -> NonZeroUsize {
    // Documents sent and awaiting PUBACK at once. Enough to keep a LAN round trip busy at
    // hundreds of documents per second; small enough that a reconnect resends little.
    match NonZeroUsize::new(32) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}

/// `[mqtt]`: an external broker. Without this section `rexstream run` starts the embedded broker
/// (`embedded::start`) and connects to it with [`MqttConfig::embedded`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker URL: `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (TLS,
    /// default port 8883). No credentials in the URL: use `username` and `password_env`.
    pub url: String,
    /// Topic prefix: documents go to `<prefix>/<stream>/detections`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// QoS of detections documents and state topics: 0, 1 (default) or 2. With 0 the outbox
    /// can only know a document was written to the socket, not that the broker got it.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// MQTT client id; default `rexstream-<random>` per process.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Keep-alive interval in seconds.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Most documents kept while the broker is unreachable or slow; see `outbox_overflow`.
    #[serde(default = "default_outbox_capacity")]
    pub outbox_capacity: NonZeroUsize,
    /// What a full outbox drops: `drop_oldest` (default) or `drop_newest`.
    #[serde(default)]
    pub outbox_overflow: OverflowPolicy,
    /// Most documents sent and not yet acknowledged.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: NonZeroUsize,
    /// Username, if the broker requires one.
    #[serde(default)]
    pub username: Option<String>,
    /// Name of the environment variable holding the password (the password itself never
    /// appears in the config file).
    #[serde(default)]
    pub password_env: Option<String>,
    /// TLS settings; required to trust a private CA, optional otherwise with `mqtts://`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// `[mqtt.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate, for brokers that require client authentication.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

/// Parsed `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl MqttConfig {
    /// Client settings for the embedded broker on `addr` (no `[mqtt]` section).
    pub fn embedded(addr: SocketAddr) -> Self {
        Self {
            url: format!("mqtt://{addr}"),
            prefix: default_prefix(),
            qos: default_qos(),
            client_id: None,
            keep_alive_s: default_keep_alive_s(),
            outbox_capacity: default_outbox_capacity(),
            outbox_overflow: OverflowPolicy::default(),
            max_inflight: default_max_inflight(),
            username: None,
            password_env: None,
            tls: None,
        }
    }

    /// Check every field; all problems at once, each naming its field and value.
    ///
    /// # Errors
    /// One [`SinkError::Config`] per bad field.
    pub fn validate(&self) -> Result<(), Vec<SinkError>> {
        let mut errs = Vec::new();
        if let Err(e) = self.broker() {
            errs.push(e);
        }
        if self.qos > 2 {
            errs.push(SinkError::config("mqtt.qos", self.qos, "is not 0, 1 or 2"));
        }
        if self.prefix.is_empty()
            || self.prefix.contains(['+', '#', '\0'])
            || self.prefix.starts_with('/')
            || self.prefix.ends_with('/')
        {
            errs.push(SinkError::config(
                "mqtt.prefix",
                &self.prefix,
                "must be a non-empty topic without wildcards (+, #) or leading/trailing /",
            ));
        }
        if self.keep_alive_s == 0 || self.keep_alive_s > 3600 {
            errs.push(SinkError::config(
                "mqtt.keep_alive_s",
                self.keep_alive_s,
                "is not in 1..=3600",
            ));
        }
        if self.max_inflight.get() > 1024 {
            errs.push(SinkError::config(
                "mqtt.max_inflight",
                self.max_inflight,
                "is more than 1024",
            ));
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > 128 {
                errs.push(SinkError::config(
                    "mqtt.client_id",
                    id,
                    "must be 1 to 128 characters",
                ));
            }
        }
        if self.password_env.is_some() && self.username.is_none() {
            errs.push(SinkError::config(
                "mqtt.password_env",
                self.password_env.as_deref().unwrap_or_default(),
                "is set but mqtt.username is not",
            ));
        }
        if let Some(tls) = &self.tls {
            if !self.broker().map(|b| b.tls).unwrap_or(true) {
                errs.push(SinkError::config(
                    "mqtt.tls",
                    "set",
                    "requires an mqtts:// url",
                ));
            }
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                errs.push(SinkError::config(
                    "mqtt.tls.client_key",
                    tls.client_key
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    "client_cert and client_key must be given together",
                ));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// Parse `url`.
    ///
    /// # Errors
    /// If the scheme, host or port is wrong, or the URL carries credentials.
    pub fn broker(&self) -> Result<BrokerAddr, SinkError> {
        let bad = |reason: &str| SinkError::config("mqtt.url", redact_url(&self.url), reason);
        let (scheme, rest) = self
            .url
            .split_once("://")
            .ok_or_else(|| bad("is not scheme://host[:port]"))?;
        let (tls, default_port) = match scheme {
            "mqtt" | "tcp" => (false, 1883),
            "mqtts" | "ssl" => (true, 8883),
            _ => return Err(bad("scheme is not mqtt:// or mqtts://")),
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('@') {
            return Err(bad(
                "must not contain credentials; use mqtt.username and mqtt.password_env",
            ));
        }
        if rest.contains('/') {
            return Err(bad("must not have a path"));
        }
        // [v6]:port, host:port or host.
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("has an unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p
                    .parse()
                    .map_err(|_| bad("port is not a number in 1..=65535"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("has text after ]")),
            };
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse()
                        .map_err(|_| bad("port is not a number in 1..=65535"))?,
                ),
                None => (rest.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        if port == 0 {
            return Err(bad("port is 0"));
        }
        Ok(BrokerAddr { tls, host, port })
    }

    pub fn qos(&self) -> QoS {
        match self.qos {
            0 => QoS::AtMostOnce,
            2 => QoS::ExactlyOnce,
            _ => QoS::AtLeastOnce,
        }
    }

    /// `<prefix>/available`.
    pub fn available_topic(&self) -> String {
        format!("{}/available", self.prefix)
    }

    /// Resolve into rumqttc options: last will, keep-alive, clean session, TLS files, password
    /// from the environment.
    ///
    /// `clean_session = true` on purpose: the outbox, not the broker session, is our record of
    /// what is undelivered. A broker restart without persistence forgets sessions anyway (and
    /// rumqttc then drops its own pending queue, eventloop.rs `if !connack.session_present`), and
    /// with a resumed session rumqttc would retransmit the same documents the outbox resends.
    ///
    /// # Errors
    /// Unreadable TLS files or a missing password variable, naming the field.
    pub fn build(&self, client_id: &str) -> Result<MqttOptions, SinkError> {
        let broker = self.broker()?;
        let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        o.set_keep_alive(Duration::from_secs(self.keep_alive_s));
        o.set_clean_session(true);
        // The request channel must never be full when the loop sends: the window of documents
        // plus the per-connection publishes (online, subscribe, one state per stream) fit easily.
        o.set_request_channel_capacity(self.max_inflight.get() + 1024);
        // Packet ids wrap at `inflight`. At most `max_inflight` documents + (1 + streams) state
        // publishes are outstanding, so 1024 spare ids make a collision (rumqttc parks the
        // publish until the old id is acked) practically impossible; rumqttc preallocates one
        // slot per id, so not the full u16 range.
        o.set_inflight(u16::try_from(self.max_inflight.get() + 1024).unwrap_or(u16::MAX));
        // Documents can be large (polygons, many boxes): allow 1 MiB each way.
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_last_will(LastWill::new(
            self.available_topic(),
            "offline",
            self.qos(),
            true,
        ));
        if let Some(user) = &self.username {
            let password = match &self.password_env {
                Some(var) => std::env::var(var).map_err(|_| {
                    SinkError::config(
                        "mqtt.password_env",
                        var,
                        "names an environment variable that is not set",
                    )
                })?,
                None => String::new(),
            };
            o.set_credentials(user.clone(), password);
        }
        if broker.tls {
            let tls = match &self.tls {
                Some(t) => {
                    let ca = read(&t.ca_file, "mqtt.tls.ca_file")?;
                    let client_auth = match (&t.client_cert, &t.client_key) {
                        (Some(c), Some(k)) => Some((
                            read(c, "mqtt.tls.client_cert")?,
                            read(k, "mqtt.tls.client_key")?,
                        )),
                        _ => None,
                    };
                    TlsConfiguration::Simple {
                        ca,
                        alpn: None,
                        client_auth,
                    }
                }
                None => {
                    return Err(SinkError::config(
                        "mqtt.tls.ca_file",
                        "",
                        "is required with mqtts:// (no system root store is bundled)",
                    ))
                }
            };
            o.set_transport(Transport::tls_with_config(tls));
        }
        Ok(o)
    }
}

fn read(path: &PathBuf, field: &str) -> Result<Vec<u8>, SinkError> {
    std::fs::read(path).map_err(|source| SinkError::ReadFile {
        field: field.into(),
        path: path.clone(),
        source,
    })
}

/// `scheme://user:***@host…` for error messages, in case someone put credentials in the URL.
pub fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (userinfo, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> MqttConfig {
        toml::from_str(s).expect("parse")
    }

    #[test]
    fn defaults() {
        let c = parse("url = \"mqtt://broker\"");
        assert_eq!(c.prefix, "rexstream");
        assert_eq!(c.qos, 1);
        assert_eq!(c.outbox_capacity.get(), 10_000);
        assert_eq!(c.outbox_overflow, OverflowPolicy::DropOldest);
        assert_eq!(
            c.broker().expect("url"),
            BrokerAddr {
                tls: false,
                host: "broker".into(),
                port: 1883
            }
        );
        c.validate().expect("valid");
    }

    #[test]
    fn urls() {
        let b = |u: &str| {
            MqttConfig {
                url: u.into(),
                ..MqttConfig::embedded("127.0.0.1:1".parse().expect("a"))
            }
            .broker()
        };
        assert_eq!(
            b("mqtts://h:1234").expect("ok"),
            BrokerAddr {
                tls: true,
                host: "h".into(),
                port: 1234
            }
        );
        assert_eq!(
            b("mqtt://[::1]:99").expect("ok"),
            BrokerAddr {
                tls: false,
                host: "::1".into(),
                port: 99
            }
        );
        assert_eq!(b("mqtts://h").expect("ok").port, 8883);
        assert!(b("http://h").is_err());
        assert!(b("mqtt://h:x").is_err());
        assert!(b("mqtt://h:0").is_err());
        let e = b("mqtt://bob:hunter2@h")
            .expect_err("credentials")
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("mqtt.url") && e.contains("bob:***@h"), "{e}");
    }

    #[test]
    fn all_errors_at_once_naming_fields() {
        let c = parse(
            "url = \"mqtt://h\"\nqos = 3\nprefix = \"a/#\"\nkeep_alive_s = 0\npassword_env = \"P\"\n\
             [tls]\nca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\n",
        );
        let errs: Vec<String> = c
            .validate()
            .expect_err("invalid")
            .iter()
            .map(|e| e.to_string())
            .collect();
        let joined = errs.join("\n");
        for field in [
            "mqtt.qos: \"3\"",
            "mqtt.prefix",
            "mqtt.keep_alive_s",
            "mqtt.password_env",
            "mqtt.tls:",
            "mqtt.tls.client_key",
        ] {
            assert!(joined.contains(field), "{field} missing in:\n{joined}");
        }
    }

    #[test]
    fn unknown_keys_and_zero_capacity_are_rejected() {
        assert!(toml::from_str::<MqttConfig>("url = \"mqtt://h\"\nqso = 1").is_err());
        assert!(toml::from_str::<MqttConfig>("url = \"mqtt://h\"\noutbox_capacity = 0").is_err());
        assert!(
            toml::from_str::<MqttConfig>("url = \"mqtt://h\"\noutbox_overflow = \"block\"")
                .is_err()
        );
    }

    #[test]
    fn password_comes_from_env_and_missing_var_is_named() {
        let c = parse(
            "url = \"mqtt://h\"\nusername = \"u\"\npassword_env = \"REXSTREAM_TEST_UNSET_VAR_42\"",
        );
        let e = c.build("id").expect_err("unset var").to_string();
        assert!(
            e.contains("mqtt.password_env") && e.contains("REXSTREAM_TEST_UNSET_VAR_42"),
            "{e}"
        );
    }

    #[test]
    fn tls_requires_readable_ca() {
        let c = parse("url = \"mqtts://h\"\n[tls]\nca_file = \"/nonexistent/ca.pem\"");
        let e = c.build("id").expect_err("missing file").to_string();
        assert!(
            e.contains("mqtt.tls.ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }
}
