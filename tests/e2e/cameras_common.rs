//! Shared by the `cameras_*` tests (issue 16): a pipeline file for N RTSP streams and the helpers
//! that read documents and log lines. Included with `#[path]`; not a test target of its own.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// One `[[streams]]` entry: name, uri, extra TOML lines.
pub struct Stream<'a> {
    pub name: &'a str,
    pub uri: String,
    pub extra: &'a str,
}

/// A pipeline file with short reconnect delays, the tiny model's small limits, the embedded
/// broker on `broker` and metrics on `http`.
pub fn pipeline(dir: &Path, http: u16, broker: u16, streams: &[Stream]) -> Result<PathBuf> {
    let mut text = format!(
        "[model]\nmax_batch = 2\nmax_new_tokens = 16\n\n[metrics]\nlisten = \"127.0.0.1:{http}\"\n\n\
         [broker]\nlisten = \"127.0.0.1:{broker}\"\n\n"
    );
    for s in streams {
        text.push_str(&format!(
            "[[streams]]\nname = \"{}\"\nuri = \"{}\"\nmax_fps = 2\nreconnect_min_s = 0.25\n\
             reconnect_max_s = 1.0\ncategories = [\"ball\"]\n{}\n\n",
            s.name, s.uri, s.extra
        ));
    }
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Log lines of `log` that mention `stream=<name>` (tracing's span field).
pub fn stream_lines<'a>(log: &'a str, name: &str) -> Vec<&'a str> {
    let tag = format!("stream={name}");
    log.lines()
        .filter(|l| {
            l.split(|c: char| c == ':' || c == '{' || c == '}' || c.is_whitespace())
                .any(|w| w == tag)
        })
        .collect()
}
