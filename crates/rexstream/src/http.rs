//! HTTP endpoint for operators: `GET /metrics` (Prometheus text) and `GET /healthz` (JSON).
//!
//! In: a bound address (config `[metrics] listen`, default [`DEFAULT_LISTEN`]) and the shared
//! [`Metrics`]. Out: responses; nothing else. Runs as tokio tasks (one per connection) until the
//! shutdown future resolves.
//!
//! Why a hand-written HTTP/1.1 responder instead of hyper: the surface is two fixed GET routes with
//! no request body, answered with `Connection: close`. That is ~100 lines we can read in full,
//! versus three more crates (hyper, hyper-util, http-body-util) in every build. Prometheus and
//! Kubernetes probes both speak plain HTTP/1.1 and reconnect per scrape, so keep-alive buys
//! nothing at one request per second. Limits below bound what a misbehaving client can cost.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// Loopback by default (design.md): exposing metrics beyond the host is an explicit choice.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// Largest request head we read. A GET with headers from Prometheus is ~300 bytes; anything past
/// this is not a client we serve.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// A client that has not sent its request head within this time is dropped (slowloris guard).
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Most connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 64;

/// Bind `addr` now (so a taken port is an error at start, naming the address), then serve
/// until `shutdown` resolves. Returns the bound address (useful with port 0) and the server task.
///
/// # Errors
/// If the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(addr, metrics, None, shutdown).await
}

/// [`serve`], plus the event API (`/api/events…`, tracking::api) when `api` is given. The API is
/// set once the event store is open (after the bind, so `/healthz` answers early).
pub async fn serve_with(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    api: Option<Arc<std::sync::OnceLock<crate::tracking::api::Api>>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("metrics.listen: cannot bind {addr}: {e}"))
    })?;
    let local = listener.local_addr()?;
    info!(message = "HTTP endpoint listening.", address = %local, routes = "/metrics /healthz");
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = &mut shutdown => return,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = &mut shutdown => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let metrics = metrics.clone();
                    let api = api.clone();
                    tokio::spawn(async move {
                        let api = api.as_deref().and_then(|a| a.get());
                        if let Err(error) = handle(stream, &metrics, api).await {
                            debug!(message = "HTTP request failed.", %peer, %error);
                        }
                        drop(permit);
                    });
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(message = "HTTP accept failed.", %error);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok((local, task))
}

async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    api: Option<&crate::tracking::api::Api>,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let (status, content_type, body) = route(&head, metrics, api);
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head.starts_with("HEAD ") {
        resp.extend_from_slice(&body);
    }
    stream.write_all(&resp).await?;
    stream.shutdown().await
}

/// Read until the blank line that ends the request head (or the size limit).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST_HEAD {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Status line, content type and body for a request head.
fn route(
    head: &str,
    metrics: &Metrics,
    api: Option<&crate::tracking::api::Api>,
) -> (&'static str, &'static str, Vec<u8>) {
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    // Prometheus may add query parameters; routes ignore them (the event API reads its own).
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            b"only GET\n".to_vec(),
        );
    }
    if let Some(r) = api.and_then(|a| a.route(head, path, query)) {
        return r;
    }
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode().into_bytes(),
        ),
        "/healthz" => {
            let body = serde_json::to_string(&metrics.health())
                .unwrap_or_else(|e| format!("{{\"status\":\"error\",\"error\":\"{e}\"}}"));
            ("200 OK", "application/json", body.into_bytes())
        }
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            b"routes: /metrics /healthz\n".to_vec(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_healthz_and_404() {
        let metrics = Arc::new(Metrics::new());
        metrics.stream("cam1").frames_received.inc_by(5);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, task) = serve("127.0.0.1:0".parse().expect("addr"), metrics, async {
            let _ = rx.await;
        })
        .await
        .expect("bind");
        let m = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
        assert!(
            m.contains("rexstream_frames_received_total{stream=\"cam1\"} 5"),
            "{m}"
        );
        let h = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        let body = h.split("\r\n\r\n").nth(1).expect("body");
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["streams"]["cam1"]["frames_received"], 5);
        assert_eq!(v["mqtt"]["broker"], "none");
        let n = get(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(n.starts_with("HTTP/1.1 404"), "{n}");
        let p = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(p.starts_with("HTTP/1.1 405"), "{p}");
        let _ = tx.send(());
        task.await.expect("server task");
    }
}
