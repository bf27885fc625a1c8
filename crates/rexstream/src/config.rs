//! The pipeline file: one TOML document per deployment (design.md "Pipeline configuration").
//!
//! In: the file's path and the environment. Out: a [`Pipeline`] with every section checked, or a
//! [`ConfigError`] listing *every* problem at once, each as `file: field: bad value and why`
//! (`pipelines/lab.toml: streams[2].max_fps: -1 is not > 0`). Runs on the main thread before
//! anything starts. Each section's struct lives in the module that uses it (`[[streams]]` in
//! `ingest::config`, `[mqtt]` in `sinks`, `[metrics]` in `metrics`); this file composes them.

use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ingest::config::{ResolvedStream, StreamConfig};
use crate::metrics::MetricsConfig;
use crate::sinks::jsonl::JsonlConfig;
use crate::sinks::mqtt::embedded::EmbeddedBrokerConfig;
use crate::sinks::mqtt::MqttConfig;
use crate::sinks::SinkError;

/// The hub id used when neither the file nor `--model` names a model.
pub const DEFAULT_MODEL: &str = "IDEA-Research/Rex-Omni";

/// The whole pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The detector: which checkpoint, on which device, batch and generation limits.
    #[serde(default)]
    pub model: ModelConfig,
    /// The video streams, each with its own prompt and rate.
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
    /// An external MQTT broker. Without it, the embedded broker (`[broker]`) is started and used.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// The embedded MQTT broker's listen address (only used without `[mqtt]`).
    #[serde(default)]
    pub broker: Option<EmbeddedBrokerConfig>,
    /// Where `/metrics` and `/healthz` are served.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Also write every detections document as one JSON line to stdout (`path = "-"`) or a file.
    #[serde(default)]
    pub jsonl: Option<JsonlConfig>,
    /// Tracked-object events (new/update/end, counts, snapshots, store); on when present.
    #[serde(default)]
    pub events: Option<crate::tracking::EventsConfig>,
    /// Home Assistant MQTT discovery (needs `[events]`).
    #[serde(default)]
    pub homeassistant: Option<crate::tracking::HomeAssistantConfig>,
}

/// `[model]`: the detector worker's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Hub id (`IDEA-Research/Rex-Omni`, downloaded once into the HF cache) or a local checkpoint
    /// folder (relative to the pipeline file). `--model` on the command line overrides it.
    #[serde(default = "default_source")]
    pub source: String,
    /// `auto` (CUDA when a driver is present, else CPU), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto` (bf16 on CUDA, f32 on CPU), `f32`, `bf16` or `f16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Linear layers (vision blocks, merger, decoder, lm_head): `bf16` (unquantized, in `dtype`), `q8`
    /// (ggml Q8_0) or `q4` (ggml Q4K) quantized at load time; an AWQ checkpoint is converted from its int4
    /// groups (docs/configuration.md).
    #[serde(default = "default_weights")]
    pub weights: String,
    /// Most frames per detector call; frames from different streams share one batched decode.
    #[serde(default = "default_max_batch")]
    pub max_batch: NonZeroUsize,
    /// Decode budget per frame; output cut here is published with `truncated: true`
    /// (rex-omni-spec.md §5.5 uses 2048–4096 for still images; live video wants less).
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: NonZeroUsize,
    /// HF repetition penalty over the whole sequence (spec §5.5: 1.05).
    #[serde(default = "default_repetition_penalty")]
    pub repetition_penalty: f32,
    /// Verify the stream's previous answer as a draft (exact speculative decoding): same ids as plain greedy
    /// decoding, fewer decode passes when consecutive answers agree. Reset when the stream's prompt changes.
    #[serde(default = "default_drafts")]
    pub drafts: bool,
    /// Runaway guard: a frame's decoding stops after more than this many shapes, or when a shape repeats for
    /// the same phrase (Rex-Omni#178). 0 turns the guard off.
    #[serde(default = "default_max_objects")]
    pub max_objects: usize,
    /// Continuous batching: a frame joins the decode batch as soon as a row finishes (up to `max_batch`)
    /// instead of waiting for the whole batch, with its stream's previous answer as a draft when `drafts` is
    /// on; same ids. `false` runs static batches.
    #[serde(default = "default_continuous_batching")]
    pub continuous_batching: bool,
    /// Most pixels of the model's input image (the processor's `max_pixels`): a larger frame is scaled down to
    /// about this many pixels (multiples of 28 a side, aspect kept) before the vision tower. Vision and prefill
    /// cost grows with it; lower it for more frames/s at less detail. Default and ceiling: Rex-Omni's 2 007 040.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

fn default_source() -> String {
    DEFAULT_MODEL.to_string()
}
fn default_device() -> String {
    "auto".to_string()
}
fn default_dtype() -> String {
    "auto".to_string()
}
fn default_weights() -> String {
    "bf16".to_string()
}
const fn default_max_batch() -> NonZeroUsize {
    NonZeroUsize::new(4).expect("4 > 0")
}
const fn default_max_new_tokens() -> NonZeroUsize {
    NonZeroUsize::new(512).expect("512 > 0")
}
const fn default_repetition_penalty() -> f32 {
    1.05
}
const fn default_drafts() -> bool {
    true
}
const fn default_continuous_batching() -> bool {
    true
}
const fn default_max_objects() -> usize {
    100
}
const fn default_max_pixels() -> u64 {
    rexprep::MAX_PIXELS
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            source: default_source(),
            device: default_device(),
            dtype: default_dtype(),
            weights: default_weights(),
            max_batch: default_max_batch(),
            max_new_tokens: default_max_new_tokens(),
            repetition_penalty: default_repetition_penalty(),
            drafts: default_drafts(),
            continuous_batching: default_continuous_batching(),
            max_objects: default_max_objects(),
            max_pixels: default_max_pixels(),
        }
    }
}

impl ModelConfig {
    fn validate(&self, errs: &mut FieldErrors) {
        let d = self.device.as_str();
        let cuda_n = d
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
        if !(matches!(d, "auto" | "cpu" | "cuda") || cuda_n) {
            errs.push(
                "model.device",
                format!("{d:?} is not one of auto, cpu, cuda, cuda:N"),
            );
        }
        if !matches!(self.dtype.as_str(), "auto" | "f32" | "bf16" | "f16") {
            errs.push(
                "model.dtype",
                format!("{:?} is not one of auto, f32, bf16, f16", self.dtype),
            );
        }
        if rexomni::engine::Weights::parse(&self.weights).is_none() {
            errs.push(
                "model.weights",
                format!("{:?} is not one of bf16, q8, q4", self.weights),
            );
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            errs.push(
                "model.repetition_penalty",
                format!("{} is not > 0", self.repetition_penalty),
            );
        }
        if self.source.trim().is_empty() {
            errs.push("model.source", "is empty".to_string());
        }
        if let Err(why) = rexprep::check_max_pixels(self.max_pixels) {
            errs.push("model.max_pixels", why);
        }
    }
}

/// Field-level problems collected during validation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldErrors(Vec<(String, String)>);

impl FieldErrors {
    pub fn push(&mut self, field: impl Into<String>, message: String) {
        self.0.push((field.into(), message));
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter()
    }
}

/// Why a pipeline file was rejected. Display prints one line per problem, each starting with the
/// file name.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// TOML syntax or type error (serde stops at the first); `line:col` locate it.
    #[error("{file}:{line}:{col}: {message}")]
    Parse {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
    /// Every semantic problem found by `validate()`.
    #[error("{}", format_fields(file, errors))]
    Invalid { file: String, errors: FieldErrors },
}

fn format_fields(file: &str, errs: &FieldErrors) -> String {
    errs.iter()
        .map(|(f, m)| format!("{file}: {f}: {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A checked pipeline, ready to run.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file it came from (for messages).
    pub file: PathBuf,
    pub model: ModelConfig,
    pub streams: Vec<ResolvedStream>,
    /// The parsed file, for sections owned by other modules.
    pub raw: PipelineConfig,
}

impl PipelineConfig {
    /// Parse TOML text; `file` only names the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            let mut message = e.message().trim().to_string();
            // serde's type errors ("invalid type: string \"fast\", expected f64", "invalid socket
            // address syntax") name neither the field nor the value; quoting the offending line
            // does both (found by tests/e2e/reliability_bad_input.rs, issue 6). A password
            // written inline in a uri on that line is redacted like everywhere else.
            if let Some(src) = text.lines().nth(line.wrapping_sub(1)).map(str::trim) {
                if !src.is_empty() {
                    let src: String = src.chars().take(120).collect();
                    let shown = crate::ingest::config::SecretUri::new(src, &[]).to_string();
                    message = format!("{message} (in `{shown}`)");
                }
            }
            ConfigError::Parse {
                file: file.to_string(),
                line,
                col,
                message,
            }
        })
    }

    /// Check every section; all problems are reported together.
    pub fn validate(
        self,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Pipeline, ConfigError> {
        let mut errs = FieldErrors::default();
        let base = file.parent().unwrap_or(Path::new("."));
        self.model.validate(&mut errs);
        if self.streams.is_empty() {
            errs.push(
                "streams",
                "no [[streams]] entry: nothing to watch".to_string(),
            );
        }
        if let Some(m) = &self.mqtt {
            if let Err(list) = m.validate() {
                for e in list {
                    match e {
                        SinkError::Config {
                            field,
                            value,
                            reason,
                        } => {
                            let field = if field.starts_with("mqtt") {
                                field
                            } else {
                                format!("mqtt.{field}")
                            };
                            errs.push(field, format!("{value:?} {reason}"));
                        }
                        other => errs.push("mqtt", other.to_string()),
                    }
                }
            }
            if self.broker.is_some() {
                errs.push("broker", "the embedded broker is only used without [mqtt]; remove one of the two sections".to_string());
            }
        }
        crate::tracking::config::validate_pipeline(&self, &mut errs);
        let mut names = std::collections::HashMap::new();
        let mut streams = Vec::new();
        for (i, s) in self.streams.iter().enumerate() {
            if let Some(first) = names.insert(s.name.clone(), i) {
                errs.push(
                    format!("streams[{i}].name"),
                    format!("{:?} is already used by streams[{first}]", s.name),
                );
            }
            if let Some(r) = s.validate(i, base, env, &mut errs) {
                streams.push(r);
            }
        }
        if !errs.is_empty() {
            return Err(ConfigError::Invalid {
                file: file.display().to_string(),
                errors: errs,
            });
        }
        Ok(Pipeline {
            file: file.to_path_buf(),
            model: self.model.clone(),
            streams,
            raw: self,
        })
    }
}

impl Pipeline {
    /// Read, parse and validate `file` against the process environment.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: name.clone(),
            source,
        })?;
        PipelineConfig::parse(&text, &name)?.validate(file, &|k| std::env::var(k).ok())
    }
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} streams, model {})",
            self.file.display(),
            self.streams.len(),
            self.model.source
        )
    }
}

/// 1-based line and column of byte offset `pos`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let before = &text[..pos.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map(|n| before.len() - n)
        .unwrap_or(before.len() + 1);
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, env: &[(&str, &str)]) -> Result<Pipeline, ConfigError> {
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PipelineConfig::parse(text, "pipelines/lab.toml")?
            .validate(Path::new("pipelines/lab.toml"), &|k| env.get(k).cloned())
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let p = check(
            "[[streams]]\nname = \"door\"\nuri = \"rtsp://cam/1\"\ncategories = [\"person\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(p.model.source, DEFAULT_MODEL);
        assert_eq!(p.model.max_batch.get(), 4);
        assert!(p.model.drafts);
        assert!(p.model.continuous_batching);
        assert_eq!(p.model.max_objects, 100);
        let off = check(
            "[model]\ndrafts = false\nmax_objects = 0\ncontinuous_batching = false\n[[streams]]\nname = \"door\"\nuri = \"rtsp://cam/1\"\ncategories = [\"person\"]\n",
            &[],
        )
        .unwrap();
        assert!(!off.model.drafts);
        assert!(!off.model.continuous_batching);
        assert_eq!(off.model.max_objects, 0);
        assert_eq!(p.model.max_pixels, rexprep::MAX_PIXELS);
        assert_eq!(
            p.streams[0].min_interval,
            std::time::Duration::from_millis(200)
        );
    }

    #[test]
    fn all_errors_at_once_with_file_field_and_value() {
        let text = r#"
[model]
device = "tpu"
[[streams]]
name = "a"
uri = "rtsp://cam/1"
categories = ["person"]
[[streams]]
name = "a"
uri = "rtsp://cam/2"
categories = ["car"]
[[streams]]
name = "c"
uri = "rtsp://cam/3"
max_fps = -1
categories = ["dog"]
"#;
        let e = check(text, &[]).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert!(
            lines.contains(
                &"pipelines/lab.toml: model.device: \"tpu\" is not one of auto, cpu, cuda, cuda:N"
            ),
            "{e}"
        );
        assert!(
            lines.contains(
                &"pipelines/lab.toml: streams[1].name: \"a\" is already used by streams[0]"
            ),
            "{e}"
        );
        assert!(
            lines.contains(&"pipelines/lab.toml: streams[2].max_fps: -1 is not > 0"),
            "{e}"
        );
        assert_eq!(lines.len(), 3, "{e}");
    }

    #[test]
    fn max_pixels_outside_the_models_range_names_file_field_and_value() {
        let stream =
            "[[streams]]\nname = \"door\"\nuri = \"rtsp://cam/1\"\ncategories = [\"person\"]\n";
        let low = check(&format!("[model]\nmax_pixels = 5000\n{stream}"), &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            low.trim(),
            "pipelines/lab.toml: model.max_pixels: 5000 is not in 12544..=2007040 (16·28·28 up to Rex-Omni's 2560·28·28 pixels)"
        );
        assert!(check(&format!("[model]\nmax_pixels = 3000000\n{stream}"), &[]).is_err());
        let ok = check(&format!("[model]\nmax_pixels = 200704\n{stream}"), &[]).unwrap();
        assert_eq!(ok.model.max_pixels, 200_704);
        assert_eq!(ok.streams[0].max_pixels, None);
        // A stream's own cap, checked the same way.
        let own = check(&format!("{stream}max_pixels = 50176\n"), &[]).unwrap();
        assert_eq!(own.streams[0].max_pixels, Some(50_176));
        let bad = check(&format!("{stream}max_pixels = 0\n"), &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            bad.trim(),
            "pipelines/lab.toml: streams[0].max_pixels: 0 is not in 12544..=2007040 (16·28·28 up to Rex-Omni's 2560·28·28 pixels)"
        );
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let e = check(
            "[[streams]]\nname = \"a\"\nuri = \"rtsp://x\"\nmax_fsp = 3\n",
            &[],
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("pipelines/lab.toml:4:1: unknown field `max_fsp`"),
            "{s}"
        );
    }

    #[test]
    fn credentials_from_env_are_used_but_never_printed() {
        let p = check(
            "[[streams]]\nname = \"a\"\nuri = \"rtsp://admin@cam/1\"\npassword_env = \"CAM_PW\"\ncategories = [\"x\"]\n\
             [[streams]]\nname = \"b\"\nuri = \"rtsp://admin:${CAM_PW}@cam/2\"\ncategories = [\"x\"]\n",
            &[("CAM_PW", "p@ss:w/rd")],
        )
        .unwrap();
        assert_eq!(
            p.streams[0].uri.expose(),
            "rtsp://admin:p%40ss%3Aw%2Frd@cam/1"
        );
        assert_eq!(p.streams[0].uri.to_string(), "rtsp://admin:***@cam/1");
        assert_eq!(p.streams[1].uri.expose(), "rtsp://admin:p@ss:w/rd@cam/2");
        assert!(!format!("{p:?}").contains("p@ss"), "{p:?}");
        let e = check(
            "[[streams]]\nname = \"a\"\nuri = \"rtsp://admin:${MISSING}@cam/1\"\ncategories = [\"x\"]\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pipelines/lab.toml: streams[0].uri: environment variable MISSING is not set"
        );
    }

    #[test]
    fn missing_file_and_bad_prompt_are_reported() {
        let e = check(
            "[[streams]]\nname = \"f\"\nuri = \"no/such.mp4\"\nloop = true\ntask = \"detection\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("streams[0].uri: \"no/such.mp4\": no such file"),
            "{e}"
        );
        assert!(e.contains("streams[0].task:"), "{e}");
    }

    #[test]
    fn example_pipelines_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let env = |k: &str| k.ends_with("PASSWORD").then(|| "pw".to_string());
            PipelineConfig::parse(&text, &path.display().to_string())
                .and_then(|c| c.validate(&path, &env))
                .unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
        assert!(
            n >= 4,
            "expected the example pipelines in {}",
            dir.display()
        );
    }
}
