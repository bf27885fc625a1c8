//! `GET /api/events`, `/api/events/<id>`, `/api/events/<id>/snapshot.jpg` on the existing HTTP
//! endpoint (Frigate's paths and query parameters: `camera`, `label`, `zone`, `after`, `before`,
//! `limit`).
//!
//! In: a request's path, query and head. Out: status, content type, body. Runs on the HTTP tokio
//! tasks (store reads are short; SQLite WAL keeps them from blocking the events thread).
//!
//! Access: the endpoint listens on loopback by default, where the API is open like `/metrics`.
//! Bound anywhere else, event snapshots are pictures of people's homes, so every API request must
//! carry `Authorization: Bearer <token>` with the token from the environment variable named by
//! `[events] api_token_env`; without one configured the API answers 403 there.

use std::sync::Arc;

use super::store::{EventStore, Query};

/// The API's state.
pub struct Api {
    pub store: Arc<EventStore>,
    /// Required bearer token (None: only loopback callers are served... by binding, see `open`).
    pub token: Option<String>,
    /// The endpoint is bound to a loopback address.
    pub loopback: bool,
}

pub type Response = (&'static str, &'static str, Vec<u8>);

fn json(status: &'static str, v: &serde_json::Value) -> Response {
    (status, "application/json", v.to_string().into_bytes())
}

fn text(status: &'static str, s: &str) -> Response {
    (
        status,
        "text/plain; charset=utf-8",
        format!("{s}\n").into_bytes(),
    )
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Api {
    /// Answer `path?query` if it is an API route; `None` for other paths.
    pub fn route(&self, head: &str, path: &str, query: &str) -> Option<Response> {
        let rest = path.strip_prefix("/api/events")?;
        if !self.loopback {
            let given = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("authorization")
                    .then(|| v.trim().to_string())
            });
            let ok = match (&self.token, given) {
                (Some(t), Some(g)) => g
                    .strip_prefix("Bearer ")
                    .is_some_and(|g| same(g.trim().as_bytes(), t.as_bytes())),
                _ => false,
            };
            if !ok {
                return Some(text(
                    "403 Forbidden",
                    "the event API needs Authorization: Bearer <token> when served beyond loopback ([events] api_token_env)",
                ));
            }
        }
        let result = match rest.trim_end_matches('/') {
            "" => match Query::parse(query) {
                Ok(q) => self
                    .store
                    .query(&q)
                    .map(|v| json("200 OK", &serde_json::Value::Array(v))),
                Err(e) => return Some(text("400 Bad Request", &e)),
            },
            r => {
                let r = r.strip_prefix('/').unwrap_or(r);
                if let Some(id) = r.strip_suffix("/snapshot.jpg") {
                    self.store.snapshot_jpeg(id).map(|j| match j {
                        Some(j) => ("200 OK", "image/jpeg", j),
                        None => text("404 Not Found", "no snapshot for this event"),
                    })
                } else if !r.contains('/') {
                    self.store.get(r).map(|v| match v {
                        Some(v) => json("200 OK", &v),
                        None => text("404 Not Found", "no such event"),
                    })
                } else {
                    return Some(text(
                        "404 Not Found",
                        "routes: /api/events /api/events/<id> /api/events/<id>/snapshot.jpg",
                    ));
                }
            }
        };
        Some(result.unwrap_or_else(|e| {
            tracing::warn!(message = "Event store query failed.", error = %e);
            text("500 Internal Server Error", "event store error")
        }))
    }
}
