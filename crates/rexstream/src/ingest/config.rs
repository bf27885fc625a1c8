//! `[[streams]]` entries of the pipeline file: where a stream's video comes from (uri, RTSP options,
//! reconnect policy), how often it is sent to the detector (`max_fps`) and what to look for (task,
//! categories, …). Parsed on the main thread before anything starts; read by ingest, the scheduler
//! and the worker.

use std::fmt;
use std::time::Duration;

use rexomni::protocol::{Task, TaskPrompt};
use serde::Deserialize;

use crate::config::FieldErrors;

/// One camera, file or network stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Unique name; used in MQTT topics (`<prefix>/<name>/detections`) and the `stream` metric
    /// label, so it must be a single topic level: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Where the video comes from: `rtsp://…`, `file:///…`, `http(s)://…`, or a plain path (relative
    /// paths are resolved against the pipeline file's folder). `${VAR}` is replaced by the
    /// environment variable VAR, so passwords need not be written in the file; the value is
    /// redacted whenever the uri is printed.
    pub uri: String,
    /// Name of an environment variable holding the RTSP password, inserted into the uri's userinfo
    /// (`rtsp://user@host/…` becomes `rtsp://user:<password>@host/…`). Alternative to `${VAR}`.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Which GStreamer source to use: `auto` (uridecodebin for everything) or `rtspsrc` (an
    /// explicit rtspsrc with `transport` and `latency_ms`; rtsp:// uris only).
    #[serde(default)]
    pub source: SourceKind,
    /// How RTP travels for `rtsp://` uris, with either `source`: `auto` (default: RTP over TCP
    /// first; UDP when the server refuses TCP, and back to TCP when UDP delivers no frame within
    /// `no_frame_timeout_s`; what worked is kept for the stream's later reconnects), `tcp`
    /// (interleaved in the RTSP connection; survives NAT and lossy links) or `udp`, which force
    /// one. Ignored for other uris.
    #[serde(default)]
    pub transport: Transport,
    /// rtspsrc jitter-buffer latency in milliseconds; lower is fresher, higher tolerates jitter.
    #[serde(default = "default_latency_ms")]
    pub latency_ms: u32,
    /// For file sources: start again from the beginning at end of stream instead of ending the
    /// stream.
    #[serde(default, rename = "loop")]
    pub loop_: bool,
    /// Most frames per second sent to the detector; frames in between are superseded in the slot
    /// and counted as dropped (`reason="superseded"`).
    #[serde(default = "default_max_fps")]
    pub max_fps: f64,
    /// Pixel format asked of the appsink; videoconvert converts whatever the decoder gives.
    #[serde(default)]
    pub format: FrameFormat,
    /// Seconds without a frame after which a live stream counts as disconnected and is rebuilt
    /// (a hung RTSP server sends nothing for ~25 s before TCP notices; build-env.md).
    #[serde(default = "default_no_frame_timeout_s")]
    pub no_frame_timeout_s: f64,
    /// First reconnect delay in seconds; doubles per failed attempt up to `reconnect_max_s`, with
    /// ±25 % jitter so many cameras behind one switch do not retry in lockstep.
    #[serde(default = "default_reconnect_min_s")]
    pub reconnect_min_s: f64,
    /// Longest reconnect delay in seconds.
    #[serde(default = "default_reconnect_max_s")]
    pub reconnect_max_s: f64,
    /// Seconds between attempts while the camera answers 401 (wrong or missing credentials),
    /// instead of the reconnect back-off: many cameras lock an account after a few failed
    /// logins, so a wrong password is tried at most once per this period.
    #[serde(default = "default_auth_retry_s")]
    pub auth_retry_s: f64,
    /// Rex-Omni task (rex-omni-spec.md §5.1): `detection`, `pointing`, `visual_prompting`,
    /// `keypoint`, `ocr_box`, `ocr_polygon`, `gui_grounding`, `gui_pointing`.
    #[serde(default = "default_task")]
    pub task: Task,
    /// What to look for (`["person", "forklift"]`); required by every task but visual_prompting.
    /// Changeable at run time over MQTT (`<prefix>/<stream>/prompt/set`).
    #[serde(default)]
    pub categories: Vec<String>,
    /// Keypoint skeleton for `task = "keypoint"`: `person` or `animal` (spec §5.2).
    #[serde(default)]
    pub keypoint_type: Option<String>,
    /// Reference boxes `[x0, y0, x1, y1]` in pixels of the original frame, for
    /// `task = "visual_prompting"`.
    #[serde(default)]
    pub boxes: Vec<[f64; 4]>,
    /// Named areas of the frame for events (`[[streams.zones]]`, issue 13): see `tracking::zones`.
    #[serde(default)]
    pub zones: Vec<crate::tracking::zones::ZoneConfig>,
    /// Events only for objects that entered one of these zones (empty = every object).
    #[serde(default)]
    pub required_zones: Vec<String>,
    /// `[streams.motion]`: drop frames of a still scene before the detector (on by default).
    #[serde(default)]
    pub motion: super::motion::MotionConfig,
    /// Most pixels of this stream's model input, as `[model] max_pixels` (which it overrides for this stream).
    #[serde(default)]
    pub max_pixels: Option<u64>,
}

const fn default_latency_ms() -> u32 {
    200
}
const fn default_max_fps() -> f64 {
    5.0
}
const fn default_no_frame_timeout_s() -> f64 {
    5.0
}
const fn default_reconnect_min_s() -> f64 {
    0.5
}
const fn default_reconnect_max_s() -> f64 {
    30.0
}
const fn default_auth_retry_s() -> f64 {
    300.0
}
/// Upper bound for every duration field (one year): bigger values are typos, and values near
/// `Duration::MAX` would panic in `Duration::from_secs_f64` or overflow the back-off's jitter.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

const fn default_task() -> Task {
    Task::Detection
}

/// GStreamer source element choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// `uridecodebin`: any uri GStreamer can open.
    #[default]
    Auto,
    /// `rtspsrc ! decodebin`: RTSP with explicit transport and latency.
    Rtspsrc,
}

/// RTSP lower transport (`transport` field).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// TCP first, then UDP, remembering what worked (ingest/transport.rs).
    #[default]
    Auto,
    /// RTP interleaved in the RTSP TCP connection only.
    Tcp,
    /// RTP over UDP only.
    Udp,
}

/// Pixel format of frames handed to the detector (both are read by rexprep).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameFormat {
    /// Packed RGB, 3 bytes per pixel: what the CPU preprocessing reads directly.
    #[default]
    Rgb,
    /// NV12 (what hardware decoders emit): half the bytes; rexprep converts it (spec §1.2).
    Nv12,
}

/// A stream uri with its secrets. `Display`/`Debug` print `rtsp://user:***@host/…`; only
/// [`SecretUri::expose`] gives the real string, for GStreamer.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUri {
    full: String,
    redacted: String,
    /// Secret substrings (env values, the userinfo password) for [`SecretUri::scrub`].
    secrets: Vec<String>,
}

impl SecretUri {
    /// Wrap a uri whose userinfo password (if any) is secret. Values of `${VAR}` expansions are
    /// also hidden: `secrets` lists them and every occurrence is masked.
    pub fn new(full: String, secrets: &[String]) -> Self {
        // Known secret values first (they may contain `@` or `:` that confuse uri splitting).
        let mut masked = full.clone();
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            masked = masked.replace(s.as_str(), "***");
        }
        let redacted = redact_userinfo(&masked);
        let mut secrets: Vec<String> = secrets.iter().filter(|s| !s.is_empty()).cloned().collect();
        if let Some(pw) = userinfo_password(&full) {
            secrets.push(pw);
        }
        Self {
            full,
            redacted,
            secrets,
        }
    }
    /// The uri with its password, to hand to GStreamer. Never log this.
    pub fn expose(&self) -> &str {
        &self.full
    }
    /// Remove this uri's secrets from `text` (a GStreamer error message may quote the uri).
    pub fn scrub(&self, text: &str) -> String {
        let mut t = text.replace(&self.full, &self.redacted);
        for s in &self.secrets {
            t = t.replace(s.as_str(), "***");
        }
        t
    }
    /// The scheme in lower case (`rtsp`, `file`, …).
    pub fn scheme(&self) -> String {
        self.full
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default()
    }
    /// A live source reconnects on EOS; a file ends (or loops).
    pub fn is_live(&self) -> bool {
        !matches!(self.scheme().as_str(), "file")
    }
}

impl fmt::Display for SecretUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for SecretUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUri({})", self.redacted)
    }
}

/// The password in `scheme://user:pass@host/…`, if any.
fn userinfo_password(uri: &str) -> Option<String> {
    let (_, rest) = uri.split_once("://")?;
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let (_, pw) = userinfo.split_once(':')?;
    (!pw.is_empty()).then(|| pw.to_string())
}

/// `scheme://user:pass@host/…` → `scheme://user:***@host/…` (a user without password is kept).
fn redact_userinfo(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let auth_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let Some(at) = authority.rfind('@') else {
        return uri.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split_once(':').map(|(u, _)| u).unwrap_or(userinfo);
    let masked = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        user.to_string()
    };
    format!("{scheme}://{masked}@{}", &rest[at + 1..])
}

/// A stream config after validation: uri resolved (env expanded, paths made file:// uris),
/// prompt checked.
#[derive(Debug, Clone)]
pub struct ResolvedStream {
    pub name: String,
    pub uri: SecretUri,
    pub source: SourceKind,
    pub transport: Transport,
    pub latency_ms: u32,
    pub loop_: bool,
    pub min_interval: Duration,
    pub format: FrameFormat,
    pub no_frame_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub auth_retry: Duration,
    pub prompt: TaskPrompt,
    pub zones: Vec<crate::tracking::zones::ZoneConfig>,
    pub required_zones: Vec<String>,
    pub motion: super::motion::MotionConfig,
    /// The stream's own `max_pixels`, if set; `None` takes `[model] max_pixels`.
    pub max_pixels: Option<u64>,
}

/// True for names usable as one MQTT topic level and a Prometheus label value without escaping.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Replace `${VAR}` with the environment's value. Unset variables are reported by name (their
/// value would be a secret, so values never appear in errors).
fn expand_env(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${…} in uri".to_string())?;
        let var = &after[..end];
        if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "${{{var}}} is not a valid environment variable name"
            ));
        }
        let val = env(var).ok_or_else(|| format!("environment variable {var} is not set"))?;
        secrets.push(val.clone());
        out.push_str(&val);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Percent-encode a password for a uri's userinfo (RFC 3986 §3.2.1).
fn encode_userinfo(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl StreamConfig {
    /// Check every field, pushing one error per bad field into `errs` (prefix `streams[i]`), and
    /// return the resolved stream when all is well. `base_dir` resolves relative file paths; `env`
    /// looks up environment variables (injected for tests).
    pub fn validate(
        &self,
        index: usize,
        base_dir: &std::path::Path,
        env: &dyn Fn(&str) -> Option<String>,
        errs: &mut FieldErrors,
    ) -> Option<ResolvedStream> {
        let at = |field: &str| format!("streams[{index}].{field}");
        let before = errs.len();
        if !valid_name(&self.name) {
            errs.push(
                at("name"),
                format!(
                    "{:?} is not a valid stream name (1-64 of A-Z a-z 0-9 - _ .; it becomes an MQTT topic level)",
                    self.name
                ),
            );
        }
        let positive = |errs: &mut FieldErrors, field: &str, v: f64| {
            if !(v.is_finite() && v > 0.0) {
                errs.push(at(field), format!("{v} is not > 0"));
            } else if v > MAX_SECONDS {
                // Found by tests/fuzz_config.rs (issue 6): `Duration::from_secs_f64(1e300)` panics,
                // so a huge value must be rejected here, not crash the process below.
                errs.push(
                    at(field),
                    format!("{v:?} is more than {MAX_SECONDS} (one year)"),
                );
            }
        };
        // max_fps becomes the Duration 1/max_fps: the same bound, the other way round.
        if !(self.max_fps.is_finite() && self.max_fps > 0.0) {
            errs.push(at("max_fps"), format!("{} is not > 0", self.max_fps));
        } else if 1.0 / self.max_fps > MAX_SECONDS {
            errs.push(
                at("max_fps"),
                format!("{} is less than one frame per year", self.max_fps),
            );
        }
        positive(errs, "no_frame_timeout_s", self.no_frame_timeout_s);
        self.motion.validate(&at("motion"), errs);
        positive(errs, "reconnect_min_s", self.reconnect_min_s);
        positive(errs, "reconnect_max_s", self.reconnect_max_s);
        positive(errs, "auth_retry_s", self.auth_retry_s);
        if self.reconnect_max_s.is_finite()
            && self.reconnect_min_s.is_finite()
            && self.reconnect_max_s < self.reconnect_min_s
        {
            errs.push(
                at("reconnect_max_s"),
                format!(
                    "{} is less than reconnect_min_s = {}",
                    self.reconnect_max_s, self.reconnect_min_s
                ),
            );
        }

        // The uri: expand ${VAR}, turn plain paths into file:// uris, insert password_env.
        let mut secrets = Vec::new();
        let mut uri = match expand_env(&self.uri, env, &mut secrets) {
            Ok(u) => Some(u),
            Err(e) => {
                errs.push(at("uri"), e);
                None
            }
        };
        if let Some(u) = uri.as_mut() {
            if u.trim().is_empty() {
                errs.push(at("uri"), "is empty".to_string());
            } else if !u.contains("://") {
                let p = std::path::Path::new(u.as_str());
                let abs = if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    base_dir.join(p)
                };
                // Normalise so GStreamer gets an absolute file uri even for `../x.mp4`.
                let abs = abs.canonicalize().unwrap_or(abs);
                if !abs.is_file() {
                    errs.push(at("uri"), format!("{:?}: no such file", self.uri));
                }
                *u = format!("file://{}", abs.display());
            }
        }
        if let (Some(var), Some(u)) = (&self.password_env, uri.as_mut()) {
            match env(var) {
                None => errs.push(
                    at("password_env"),
                    format!("environment variable {var} is not set"),
                ),
                Some(pw) => match u.split_once("://") {
                    Some((scheme, rest))
                        if rest[..rest.find('/').unwrap_or(rest.len())].contains('@') =>
                    {
                        let at_pos = rest.find('@').unwrap_or(0);
                        let user = rest[..at_pos].split(':').next().unwrap_or("");
                        let enc = encode_userinfo(&pw);
                        *u = format!("{scheme}://{user}:{enc}@{}", &rest[at_pos + 1..]);
                        secrets.push(pw);
                        secrets.push(enc);
                    }
                    _ => errs.push(
                        at("password_env"),
                        format!(
                            "uri {} has no user@ part to add the password to",
                            // Not just redact_userinfo: a `${VAR}` value may sit outside the
                            // userinfo (`rtsp://${CAM_PW}`); found by tests/fuzz_config.rs.
                            SecretUri::new(u.clone(), &secrets)
                        ),
                    ),
                },
            }
        }
        let uri = uri.map(|u| SecretUri::new(u, &secrets));
        if let Some(u) = &uri {
            let scheme = u.scheme();
            if self.source == SourceKind::Rtspsrc && !scheme.starts_with("rtsp") {
                errs.push(
                    at("source"),
                    format!("rtspsrc needs an rtsp:// uri, got {u}"),
                );
            }
            if self.loop_ && u.is_live() {
                errs.push(
                    at("loop"),
                    format!("true only makes sense for file sources, uri is {u}"),
                );
            }
        }

        let prompt = TaskPrompt {
            task: self.task,
            categories: self.categories.clone(),
            keypoint_type: self.keypoint_type.clone(),
            boxes: self.boxes.clone(),
        };
        if let Err(e) = prompt.validate() {
            errs.push(
                at("task"),
                format!("{:?} prompt is invalid: {e}", self.task),
            );
        }

        if let Some(Err(why)) = self.max_pixels.map(rexprep::check_max_pixels) {
            errs.push(at("max_pixels"), why);
        }

        if errs.len() > before {
            return None;
        }
        Some(ResolvedStream {
            name: self.name.clone(),
            uri: uri?,
            source: self.source,
            transport: self.transport,
            latency_ms: self.latency_ms,
            loop_: self.loop_,
            min_interval: Duration::from_secs_f64(1.0 / self.max_fps),
            format: self.format,
            no_frame_timeout: Duration::from_secs_f64(self.no_frame_timeout_s),
            reconnect_min: Duration::from_secs_f64(self.reconnect_min_s),
            reconnect_max: Duration::from_secs_f64(self.reconnect_max_s),
            auth_retry: Duration::from_secs_f64(self.auth_retry_s),
            prompt,
            zones: self.zones.clone(),
            required_zones: self.required_zones.clone(),
            motion: self.motion.clone(),
            max_pixels: self.max_pixels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_but_keeps_user_and_host() {
        let u = SecretUri::new("rtsp://admin:hunter2@10.0.0.5:554/stream1".into(), &[]);
        assert_eq!(u.to_string(), "rtsp://admin:***@10.0.0.5:554/stream1");
        assert_eq!(
            format!("{u:?}"),
            "SecretUri(rtsp://admin:***@10.0.0.5:554/stream1)"
        );
        assert_eq!(u.expose(), "rtsp://admin:hunter2@10.0.0.5:554/stream1");
        assert_eq!(
            u.scrub("Could not open rtsp://admin:hunter2@10.0.0.5:554/stream1 (auth hunter2)"),
            "Could not open rtsp://admin:***@10.0.0.5:554/stream1 (auth ***)"
        );
        let plain = SecretUri::new("rtsp://cam/x@y".into(), &[]);
        assert_eq!(plain.to_string(), "rtsp://cam/x@y");
    }

    #[test]
    fn env_values_are_masked_wherever_they_land() {
        let env = |k: &str| (k == "TOKEN").then(|| "s3cr3t".to_string());
        let mut secrets = Vec::new();
        let u = expand_env("http://cam/live?token=${TOKEN}", &env, &mut secrets).unwrap();
        assert_eq!(u, "http://cam/live?token=s3cr3t");
        let s = SecretUri::new(u, &secrets);
        assert_eq!(s.to_string(), "http://cam/live?token=***");
        assert_eq!(
            expand_env("${NOPE}", &env, &mut secrets).unwrap_err(),
            "environment variable NOPE is not set"
        );
    }
}
