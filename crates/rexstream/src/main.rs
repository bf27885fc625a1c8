//! The `rexstream` binary: thin `main` (style.md §4.6) — tracing, clap, then `run` or `detect`.
//!
//! `run` (run.rs) is the streaming runtime; `detect` (the library's detect.rs) runs one image
//! through the model.
//! The detector worker (worker.rs) lives in the binary with `run`: both wire the model crate to
//! the runtime library and report errors with `anyhow`.

mod run;
mod worker;

use clap::{Parser, Subcommand};
use rexstream::detect;
use rexstream::sinks::mqtt::embedded::BrokerNoiseFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Open-vocabulary detection on live video: GStreamer ingest → Rex-Omni → MQTT, with Prometheus
/// metrics.
///
/// Quick start (embedded MQTT broker on 127.0.0.1:1883, metrics on 127.0.0.1:9464):
///
///   rexstream run pipelines/demo.toml
///
///   mosquitto_sub -t 'rexstream/#' -v
///
///   mosquitto_pub -t rexstream/demo/prompt/set -m '{"task":"detection","categories":["cat"]}'
#[derive(Debug, Parser)]
#[command(name = "rexstream", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline file: watch its streams, detect, publish to MQTT, serve /metrics and
    /// /healthz. Stops gracefully on Ctrl-C / SIGTERM (finishes the batch in flight, flushes
    /// the MQTT outbox, publishes `offline`).
    ///
    /// Log level: RUST_LOG (default `info`), e.g. RUST_LOG=rexstream=debug.
    Run(run::RunArgs),
    /// Run one image through the model and print its detections as JSON.
    Detect(detect::DetectArgs),
    /// Re-run tracking, zones and events on recorded detections documents (JSON lines) and print
    /// the events as JSON lines; `--publish` also sends them to the pipeline's broker.
    Replay(rexstream::tracking::replay::ReplayArgs),
}

fn main() -> std::process::ExitCode {
    // rumqttd (the embedded broker) logs every client connect at INFO; keep it to warnings unless
    // RUST_LOG asks for more. Colours only on a terminal, so log files stay plain text.
    // BrokerNoiseFilter drops one benign rumqttd ERROR line (issue 15: a healthy run logs no
    // WARN/ERROR).
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .finish()
        .with(BrokerNoiseFilter)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Detect(args) => detect::run(args),
        Command::Replay(args) => rexstream::tracking::replay::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line per cause; config errors are already
            // one line per problem, each naming file, field and value.
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
