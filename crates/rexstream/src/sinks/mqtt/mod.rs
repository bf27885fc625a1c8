//! MQTT: the sink (rumqttc), its outbox, its config, and the embedded broker (rumqttd).
//!
//! Layout:
//! - [`config`]: `[mqtt]` section → rumqttc options (TLS, credentials from the environment).
//! - [`outbox`]: bounded FIFO of documents kept until the broker acknowledges them.
//! - [`sink`]: the event loop, PUBACK tracking, availability, prompt set/state.
//! - [`embedded`]: the in-process broker used when no `[mqtt]` section is given.

pub mod config;
pub mod embedded;
pub mod outbox;
pub mod sink;

pub use config::MqttConfig;
pub use outbox::OverflowPolicy;
pub use sink::{install_crypto_provider, CloseReport, MqttHandle, MqttSink};
