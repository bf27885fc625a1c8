//! `rexstream replay DOCS.jsonl --config FILE`: re-run tracking, zones and events on detections
//! documents recorded by the JSON-lines sink, and print the events as JSON lines (`--publish` also
//! sends events and counts to the configured broker). Tune zones and tracker settings on a laptop
//! without a GPU or a camera.
//!
//! In: a JSON-lines file (`-` = stdin) and the pipeline file (its `[events]`, zones, `[mqtt]`).
//! Out: one `{"type","before","after"}` line per event on stdout. Main thread (plus a small tokio
//! runtime with `--publish`). At the end of the recording every object still tracked ends.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::stream::{FrameObservation, Output, StreamEvents};
use crate::config::Pipeline;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Detections documents, one JSON object per line (what `[jsonl]` writes); `-` reads stdin.
    pub docs: PathBuf,
    /// The pipeline file whose `[events]`, `[[streams.zones]]` and `[mqtt]` to use.
    #[arg(long)]
    pub config: PathBuf,
    /// Also publish events, counts and snapshots to the pipeline's `[mqtt]` broker.
    #[arg(long)]
    pub publish: bool,
}

/// Run the replay; events go to `out`.
pub fn run(args: ReplayArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let pipeline = Pipeline::load(&args.config).map_err(|e| anyhow!("{e}"))?;
    let file = args.docs.display().to_string();
    let reader: Box<dyn BufRead> = if args.docs.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.docs).with_context(|| format!("{file}: cannot open"))?,
        ))
    };
    if !args.publish {
        return replay(&pipeline, reader, &file, &mut |o| print(&mut out, o));
    }
    let mqtt_cfg = pipeline.raw.mqtt.clone().ok_or_else(|| {
        anyhow!(
            "{}: --publish needs an [mqtt] section",
            pipeline.file.display()
        )
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let prompts = Arc::new(crate::sinks::prompts::PromptTable::new(
            pipeline
                .streams
                .iter()
                .map(|s| (s.name.clone(), s.prompt.clone())),
        ));
        let sink = crate::sinks::mqtt::MqttSink::start(
            &mqtt_cfg,
            crate::metrics::BrokerMode::External,
            prompts,
            metrics,
        )
        .map_err(|e| anyhow!("{}: {e}", pipeline.file.display()))?;
        let handle = sink.handle();
        let result = replay(&pipeline, reader, &file, &mut |o| {
            publish(&handle, o);
            print(&mut out, o)
        });
        let report = sink.close(Duration::from_secs(30)).await;
        if report.undelivered > 0 {
            bail!(
                "{} messages not delivered to the broker",
                report.undelivered
            );
        }
        result
    })
}

fn print(out: &mut impl Write, o: &Output) -> Result<()> {
    if let Output::Event(m) = o {
        serde_json::to_writer(&mut *out, m)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Hand one output to the MQTT sink (topics as the live runtime uses them). Events are messages:
/// they queue on the outbox, in order, and survive broker outages. Counts, snapshots and
/// discovery configs are retained *states*: only the latest value of each topic matters, and the
/// sink announces them again after every reconnect (a broker restarted without persistence forgot
/// them) and on Home Assistant's birth message.
pub fn publish(h: &crate::sinks::mqtt::MqttHandle, o: &Output) {
    match o {
        Output::Event(m) => match serde_json::to_vec(m) {
            Ok(p) => h.publish_message("events", p, false),
            Err(error) => tracing::warn!(message = "Event not serializable; dropped.", %error),
        },
        Output::Count { topic, count } => h.set_retained(topic, count.to_string().into_bytes()),
        Output::Snapshot {
            stream,
            label,
            jpeg,
            ..
        } => h.set_retained(&format!("{stream}/{label}/snapshot"), jpeg.to_vec()),
        Output::Discovery { topic, payload } => {
            h.set_retained_topic(topic.clone(), payload.clone())
        }
    }
}

/// The replay loop, separated from I/O for tests: every output goes to `emit`, in order.
///
/// # Errors
/// A line that is not a detections document (named by file and line number), a document of a
/// stream the pipeline does not have, or an `emit` failure.
pub fn replay(
    pipeline: &Pipeline,
    reader: impl BufRead,
    file: &str,
    emit: &mut dyn FnMut(&Output) -> Result<()>,
) -> Result<()> {
    let cfg = pipeline.raw.events.clone().unwrap_or_default();
    let mut streams: HashMap<String, StreamEvents> = pipeline
        .streams
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                StreamEvents::new(&s.name, &cfg, s.zones.clone(), s.required_zones.clone()),
            )
        })
        .collect();
    let mut order: Vec<String> = pipeline.streams.iter().map(|s| s.name.clone()).collect();
    order.dedup();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{file}: cannot read line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let f = FrameObservation::from_json_line(&line)
            .map_err(|e| anyhow!("{file}:{}: {e}", n + 1))?;
        let s = streams.get_mut(&f.stream).ok_or_else(|| {
            anyhow!(
                "{file}:{}: stream {:?} is not in {} (streams: {})",
                n + 1,
                f.stream,
                pipeline.file.display(),
                order.join(", ")
            )
        })?;
        for o in s.on_frame(&f, None) {
            emit(&o)?;
        }
    }
    for name in &order {
        if let Some(s) = streams.get_mut(name) {
            for o in s.finish() {
                emit(&o)?;
            }
        }
    }
    Ok(())
}
