//! JSON-lines sink: one detections document per line, to stdout or a file (appended).
//!
//! In: serialized documents from [`super::Sinks::publish`] on the detector worker thread.
//! Out: `<json>\n`, flushed per line so `tail -f` and pipes see each frame at once. A write
//! error is counted (`rexstream_jsonl_write_failures_total`) and logged at most once per
//! [`ERROR_LOG_EVERY`] so a full disk does not flood the log; the pipeline goes on.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::warn;

use super::SinkError;
use crate::metrics::{Metrics, SinkKind, StreamMetrics};

/// Repeated write errors are logged at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// `[jsonl]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// `-` for stdout, else a file path (created if missing, appended to).
    pub path: String,
}

pub struct JsonlSink {
    out: Mutex<Box<dyn Write + Send>>,
    last_error_log: Mutex<Option<Instant>>,
}

impl JsonlSink {
    /// Open the output.
    ///
    /// # Errors
    /// If the file cannot be opened, naming `jsonl.path` and the path.
    pub fn open(cfg: &JsonlConfig) -> Result<Self, SinkError> {
        let out: Box<dyn Write + Send> = if cfg.path == "-" {
            Box::new(std::io::stdout())
        } else {
            let path = PathBuf::from(&cfg.path);
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| SinkError::ReadFile {
                    field: "jsonl.path".into(),
                    path: path.clone(),
                    source,
                })?;
            Box::new(BufWriter::new(f))
        };
        Ok(Self {
            out: Mutex::new(out),
            last_error_log: Mutex::new(None),
        })
    }

    /// Write one line. Counts success per stream, failure globally.
    pub fn write(&self, stream: &StreamMetrics, payload: &[u8], metrics: &Metrics) {
        let res = {
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            out.write_all(payload)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush())
        };
        match res {
            Ok(()) => stream.published(SinkKind::Jsonl),
            Err(error) => {
                metrics.jsonl_write_failures.inc();
                let mut last = self
                    .last_error_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
                    *last = Some(Instant::now());
                    warn!(message = "JSON-lines write failed; document lost for this sink.", stream = %stream.name, %error);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_and_rejects_unknown_keys() {
        let c: JsonlConfig = toml::from_str("path = \"-\"").expect("parse");
        assert_eq!(c.path, "-");
        assert!(toml::from_str::<JsonlConfig>("path = \"-\"\nformat = \"x\"").is_err());
    }

    #[test]
    fn writes_one_line_per_document() {
        let dir = std::env::temp_dir().join(format!("rexstream-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("out.jsonl");
        let _ = std::fs::remove_file(&path);
        let sink = JsonlSink::open(&JsonlConfig {
            path: path.display().to_string(),
        })
        .expect("open");
        let m = Metrics::new();
        let s = m.stream("cam1");
        sink.write(&s, br#"{"seq":1}"#, &m);
        sink.write(&s, br#"{"seq":2}"#, &m);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"seq\":1}\n{\"seq\":2}\n");
        assert!(m
            .encode()
            .contains("rexstream_events_published_total{sink=\"jsonl\",stream=\"cam1\"} 2"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
