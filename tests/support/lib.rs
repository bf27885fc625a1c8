//! Shared helpers for the end-to-end tests: start real services (mosquitto, Prometheus, an RTSP
//! server) on free loopback ports, wait for them to be ready, and stop them when dropped.

use std::net::TcpListener;

/// A free TCP port on 127.0.0.1, found by binding port 0 and releasing it.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
