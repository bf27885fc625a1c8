//! Fault-injection and measurement helpers for the reliability tests (issue 6): reading
//! `/metrics` values over time, resident memory of a child, histogram quantiles, percentiles of
//! document timings, and bad input files (a corrupt H.264 clip, a file that is not video).
//!
//! In: a running [`Rexstream`] (its HTTP port), a PID, a source clip. Out: numbers and files.
//! Runs on the test thread; every wait polls with a deadline (no blind sleeps).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::{metric_sum, wait_until, workspace_root, Rexstream};

/// The value of `name{labels}` in the current `/metrics` (summed over other labels).
pub fn metric(rex: &Rexstream, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(metric_sum(&rex.metrics()?, name, labels))
}

/// Poll `/metrics` every 50 ms until `name{labels}` satisfies `pred`; returns the value and the
/// instant it was first seen. Fails (with the rexstream log) after `timeout`.
pub fn wait_metric(
    rex: &Rexstream,
    name: &str,
    labels: &[(&str, &str)],
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> Result<(f64, Instant)> {
    let what = format!("{name}{labels:?}");
    wait_until(&what, timeout, || {
        let v = metric(rex, name, labels).ok()?;
        pred(v).then(|| (v, Instant::now()))
    })
    .with_context(|| format!("rexstream log:\n{}", tail(&rex.log(), 60)))
}

/// The last `n` lines of `text` (for failure messages).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Resident set size of process `pid` in KiB (`VmRSS` in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// The `q`-quantile (0..1) of a sorted-or-not sample, nearest rank; NaN when empty.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Cumulative histogram buckets `(le, count)` of `name_bucket{labels}` in Prometheus text.
pub fn histogram_buckets(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut out: Vec<(f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(&bucket)) {
        let Some((lbl, val)) = line
            .strip_prefix(&bucket)
            .and_then(|r| r.strip_prefix('{'))
            .and_then(|r| r.split_once('}'))
        else {
            continue;
        };
        if !labels
            .iter()
            .all(|(k, v)| lbl.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let le = lbl
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix("le=\""))
            .and_then(|v| v.strip_suffix('"'))
            .map(|v| {
                if v == "+Inf" {
                    f64::INFINITY
                } else {
                    v.parse().unwrap_or(f64::NAN)
                }
            });
        let count = val.trim().parse::<f64>().ok();
        if let (Some(le), Some(c)) = (le, count) {
            match out.iter_mut().find(|(l, _)| *l == le) {
                Some(e) => e.1 += c,
                None => out.push((le, c)),
            }
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// `histogram_quantile` as Prometheus computes it (linear inside the bucket) over the increase
/// between two snapshots of the same histogram (`before` may be empty).
pub fn histogram_quantile(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> f64 {
    let inc: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map(|x| x.1)
                .unwrap_or(0.0);
            (*le, c - b)
        })
        .collect();
    let Some(&(_, total)) = inc.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in &inc {
        if c >= rank {
            if le.is_infinite() {
                return prev.0; // Prometheus returns the highest finite bound
            }
            let in_bucket = c - prev.1;
            let frac = if in_bucket > 0.0 {
                (rank - prev.1) / in_bucket
            } else {
                0.0
            };
            return prev.0 + (le - prev.0) * frac;
        }
        prev = (le, c);
    }
    f64::NAN
}

/// The demo clip shipped with the repo (H.264 in MP4, real photos).
pub fn demo_clip() -> PathBuf {
    workspace_root().join("pipelines/media/demo.mp4")
}

/// Write a damaged copy of an H.264 clip: the first `keep_percent`% of `src` with every 97th byte
/// of its second half overwritten (a deterministic pattern, so failures reproduce): broken NAL
/// units in the middle, then a cut-off end with no `moov`-trailer guarantees.
pub fn corrupt_copy(src: &Path, dst: &Path, keep_percent: usize) -> Result<()> {
    let mut bytes = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
    if bytes.len() < 1024 {
        bail!("{} is too small to corrupt meaningfully", src.display());
    }
    bytes.truncate(bytes.len() * keep_percent.clamp(1, 100) / 100);
    let half = bytes.len() / 2;
    for (i, b) in bytes.iter_mut().enumerate().skip(half) {
        if i % 97 == 0 {
            *b ^= 0xA5;
        }
    }
    std::fs::write(dst, bytes).with_context(|| format!("write {}", dst.display()))
}

/// Make a raw H.264 elementary stream (`.h264`, Annex B) with gst-launch, then truncate it in the
/// middle of a NAL unit and flip bytes after the first keyframe: a camera recording cut short.
pub fn corrupt_h264_stream(dst: &Path) -> Result<()> {
    let raw = dst.with_extension("orig.h264");
    let st = std::process::Command::new("gst-launch-1.0")
        .args([
            "-q",
            "videotestsrc",
            "num-buffers=90",
            "pattern=ball",
            "!",
            "video/x-raw,width=320,height=240,framerate=15/1",
            "!",
            "x264enc",
            "key-int-max=15",
            "speed-preset=ultrafast",
            "!",
            "video/x-h264,stream-format=byte-stream",
            "!",
            "filesink",
        ])
        .arg(format!("location={}", raw.display()))
        .status()
        .context("run gst-launch-1.0 (gstreamer1.0-tools)")?;
    if !st.success() {
        bail!("gst-launch-1.0 failed making {}", raw.display());
    }
    corrupt_copy(&raw, dst, 60)?;
    let _ = std::fs::remove_file(&raw);
    Ok(())
}

/// A file that is not video at all (a text file with a video extension).
pub fn not_video(dst: &Path) -> Result<()> {
    let mut text = String::from("This is not a video. ");
    while text.len() < 64 * 1024 {
        text.push_str("rexstream reliability test filler; no container, no codec. ");
    }
    std::fs::write(dst, text).with_context(|| format!("write {}", dst.display()))
}

/// Wait until `rexstream` has exited on its own (bad config) and return (exit code, log).
pub fn wait_exit_with_log(rex: &mut Rexstream, timeout: Duration) -> Result<(Option<i32>, String)> {
    let code = rex.proc.wait_exit(timeout)?;
    Ok((code, rex.log()))
}
