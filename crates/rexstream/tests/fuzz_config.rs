//! Fuzzing the pipeline-config parser (issue 6 item 6): `PipelineConfig::parse` + `validate` never
//! panic, whatever the file holds, and every rejection names the file (and, for semantic errors,
//! the field); an environment secret never appears in an error or in a parsed pipeline's `Debug`.
//!
//! In: generated text, three families: arbitrary strings (any Unicode, lossy bytes), TOML-ish
//! documents assembled from the real section and key names with hostile values (1e-300, 1e300,
//! nan, inf, huge integers, `${VAR}`, special tokens, wrong types), and valid skeletons with one
//! field mutated to a wrong value (the error must name that field). Out: pass/fail; runs on the
//! test thread, no I/O except `canonicalize`/`is_file` on generated relative paths under a folder
//! that does not exist.
//!
//! Budget: `PROPTEST_CASES` (default `fuzz_budget::DEFAULT_CASES` per property, a few seconds in CI). Long run
//! (docs/reliability.md): `PROPTEST_CASES=1000000 cargo test -p rexstream --test fuzz_config`.

use std::path::Path;

mod fuzz_budget;

use fuzz_budget::{config, count};
use proptest::prelude::*;
use rexstream::config::{ConfigError, PipelineConfig};

/// The name the parser is given; every error must start with it.
const FILE: &str = "fuzz/pipeline.toml";
/// What the injected environment returns for any `*_PW`/`*PASSWORD` variable: finding it in an
/// error or a Debug print would be a leak.
const SECRET: &str = "Fz-s3cr3t-9f41";

fn env(var: &str) -> Option<String> {
    (var.ends_with("_PW") || var.ends_with("PASSWORD")).then(|| SECRET.to_string())
}

/// Parse and validate `text`; panics inside are the bug we hunt (proptest reports them with the
/// shrunk input). Returns the rejection, if any, after checking what every rejection must hold.
fn check(text: &str) -> Option<ConfigError> {
    // The folder does not exist, so relative file uris resolve to missing files, deterministically.
    let file = Path::new("/nonexistent-rexstream-fuzz").join(FILE);
    let res = PipelineConfig::parse(text, FILE).and_then(|c| c.validate(&file, &env));
    match res {
        Ok(p) => {
            let dbg = format!("{p:?}");
            assert!(
                !dbg.contains(SECRET),
                "secret in Debug of a parsed pipeline"
            );
            for s in &p.streams {
                assert!(
                    !s.uri.to_string().contains(SECRET),
                    "secret in a printed uri"
                );
            }
            None
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains(SECRET), "secret in a config error: {msg}");
            match &e {
                ConfigError::Parse { .. } | ConfigError::Read { .. } => {
                    assert!(msg.starts_with(FILE), "error does not name the file: {msg}")
                }
                ConfigError::Invalid { errors, .. } => {
                    assert!(!errors.is_empty(), "Invalid with no field errors");
                    let file = file.display().to_string();
                    assert!(
                        msg.starts_with(&file),
                        "error does not name the file: {msg}"
                    );
                    // The field of each entry must be a path into the file (`streams[0].max_fps`),
                    // not free text: checked on the field itself, not on the message built from it.
                    for (field, why) in errors.iter() {
                        assert!(!why.is_empty(), "empty reason for {field:?}");
                        assert!(
                            is_field_path(field),
                            "{field:?} is not a config field path ({why})"
                        );
                    }
                }
            }
            Some(e)
        }
    }
}

/// `section[(\[N\])](.key[(\[N\])])*` with a known top-level section and snake_case keys.
fn is_field_path(field: &str) -> bool {
    const SECTIONS: &[&str] = &["model", "streams", "mqtt", "broker", "metrics", "jsonl"];
    let mut parts = field.split('.');
    let segment_ok = |seg: &str| {
        let (name, index) = match seg.split_once('[') {
            Some((n, rest)) => (n, Some(rest)),
            None => (seg, None),
        };
        !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            && index.is_none_or(|i| {
                i.strip_suffix(']')
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
    };
    let first = parts.next().unwrap_or("");
    let section = first.split('[').next().unwrap_or("");
    SECTIONS.contains(&section) && segment_ok(first) && parts.all(segment_ok)
}

/// The field path `validate()` uses for `key` in `section` of the skeleton (one stream: index 0).
fn field_path(section: &str, key: &str) -> String {
    if section == "streams" {
        format!("streams[0].{key}")
    } else {
        format!("{section}.{key}")
    }
}

/// The 1-based line where `key = ` starts inside `section` of a [`render`]ed file (`password_env`
/// is in both `[[streams]]` and `[mqtt]`).
fn line_of(text: &str, section: &str, key: &str) -> usize {
    let prefix = format!("{key} = ");
    let mut current = "";
    for (i, l) in text.lines().enumerate() {
        if let Some(h) = l.strip_prefix('[') {
            current = h.trim_matches(|c| c == '[' || c == ']');
        } else if current == section && l.starts_with(&prefix) {
            return i + 1;
        }
    }
    panic!("{section}.{key} is not in the rendered file");
}

/// Fields whose value is checked together with another one, so a bad value may be reported on the
/// partner: the password from `password_env` goes into the uri's `user@` part (a uri without one
/// is reported on `password_env`); `reconnect_max_s < reconnect_min_s` is reported on the max; the
/// categories are part of the prompt, reported on `task`.
fn partner(path: &str) -> Option<&'static str> {
    Some(match path {
        "streams[0].uri" => "streams[0].password_env",
        "streams[0].reconnect_min_s" => "streams[0].reconnect_max_s",
        "streams[0].categories" => "streams[0].task",
        _ => return None,
    })
}

/// Whether the rejection `e` names the field at `path`, whose `key = value` starts on `line`
/// (1-based): a semantic error must carry that field path (or its partner); a TOML syntax or type
/// error must point at that line.
fn names_field(e: &ConfigError, path: &str, line: usize) -> bool {
    match e {
        ConfigError::Parse { line: l, .. } => *l == line,
        ConfigError::Invalid { errors, .. } => errors.iter().any(|(f, _)| {
            let is = |p: &str| {
                f == p
                    || f.strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
            };
            is(path) || partner(path).is_some_and(is)
        }),
        ConfigError::Read { .. } => false,
    }
}

/// Values that have broken parsers before: extreme floats (1e-300 makes `1/max_fps` overflow a
/// Duration), specials, huge integers, wrong types, secrets-by-reference, special tokens.
fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0",
            "-1",
            "1",
            "5",
            "1e-300",
            "1e300",
            "1.7976931348623157e308",
            "5e-324",
            "-0.0",
            "nan",
            "inf",
            "-inf",
            "+inf",
            "9223372036854775807",
            "-9223372036854775808",
            "18446744073709551615",
            "0x7fffffff",
            "1_000",
            "true",
            "false",
            "[]",
            "{}",
            "[1, 2, 3, 4]",
            "[[0.0, 0.0, 1e300, 1e300]]",
            "[[-1, -1, 0, 0]]",
            "[[nan, 0, 1, 1]]",
            "[\"person\", \"<|im_end|>\", \"<12>\"]",
            "[\"\"]",
            "\"\"",
            "\"auto\"",
            "\"cpu\"",
            "\"cuda:99999999999999999999\"",
            "\"detection\"",
            "\"visual_prompting\"",
            "\"keypoint\"",
            "\"rtspsrc\"",
            "\"udp\"",
            "\"nv12\"",
            "\"rtsp://u@cam/1\"",
            "\"rtsp://u:${CAM_PW}@cam/1\"",
            "\"rtsp://${CAM_PW}\"",
            "\"${CAM_PW}\"",
            "\"${\"",
            "\"${}\"",
            "\"${A-B}\"",
            "\"${NOT_SET}\"",
            "\"file:///dev/null\"",
            "\"../../etc/passwd\"",
            "\"mqtt://127.0.0.1:1883\"",
            "\"mqtts://h:0\"",
            "\"mqtt://user:pw@h\"",
            "\"127.0.0.1:99999\"",
            "\"[::1]:9464\"",
            "\"a/#\"",
            "\"+\"",
            "\"é\u{0}\u{202e}\"",
            "1979-05-27T07:32:00Z",
            "{ a = 1 }",
            "\"\"\"multi\nline\"\"\"",
        ])
        .prop_map(str::to_string),
        any::<f64>().prop_map(toml_float),
        any::<i64>().prop_map(|i| i.to_string()),
        "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
        any::<String>().prop_map(|s| format!("{s:?}")),
    ]
}

/// An f64 as a TOML float literal (Rust's Debug spells NaN `NaN`; TOML wants `nan`).
fn toml_float(f: f64) -> String {
    if f.is_nan() {
        "nan".to_string()
    } else {
        format!("{f:?}")
    }
}

const KEYS: &[&str] = &[
    "source",
    "device",
    "dtype",
    "max_batch",
    "max_new_tokens",
    "repetition_penalty",
    "name",
    "uri",
    "password_env",
    "transport",
    "latency_ms",
    "loop",
    "max_fps",
    "format",
    "no_frame_timeout_s",
    "reconnect_min_s",
    "reconnect_max_s",
    "auth_retry_s",
    "task",
    "categories",
    "keypoint_type",
    "boxes",
    "enabled",
    "threshold",
    "min_area",
    "refresh_s",
    "url",
    "prefix",
    "qos",
    "username",
    "client_id",
    "keep_alive_s",
    "listen",
    "path",
    "tls",
    "ca_file",
    "outbox_capacity",
    "nope",
    "",
];

const HEADERS: &[&str] = &[
    "[model]",
    "[[streams]]",
    "[mqtt]",
    "[metrics]",
    "[broker]",
    "[jsonl]",
    "[mqtt.tls]",
    "[[model]]",
    "[streams]",
    "[streams.x]",
    "[streams.motion]",
    "[[mqtt]]",
    "[",
    "[[]]",
    "[ model ]",
];

/// One line of a TOML-ish document.
fn toml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(HEADERS).prop_map(str::to_string),
        8 => (prop::sample::select(KEYS), hostile_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "[ -~]{0,40}",
        1 => any::<String>(),
    ]
}

/// A structurally valid file that `validate` accepts, as (header, key, value) slots, so one slot
/// can be replaced by a wrong value and the error is expected to name it.
fn valid_lines() -> Vec<(&'static str, &'static str, String)> {
    vec![
        ("model", "max_batch", "2".into()),
        ("model", "max_new_tokens", "32".into()),
        ("model", "device", "\"cpu\"".into()),
        ("model", "repetition_penalty", "1.05".into()),
        ("streams", "name", "\"cam\"".into()),
        (
            "streams",
            "uri",
            "\"rtsp://user@127.0.0.1:8554/cam\"".into(),
        ),
        ("streams", "password_env", "\"CAM_PW\"".into()),
        ("streams", "max_fps", "5".into()),
        ("streams", "no_frame_timeout_s", "5".into()),
        ("streams", "reconnect_min_s", "0.5".into()),
        ("streams", "reconnect_max_s", "30".into()),
        ("streams", "categories", "[\"person\"]".into()),
        ("mqtt", "url", "\"mqtt://127.0.0.1:1883\"".into()),
        ("mqtt", "username", "\"rex\"".into()),
        ("mqtt", "password_env", "\"MQTT_PASSWORD\"".into()),
    ]
}

fn render(lines: &[(&str, &str, String)]) -> String {
    let mut out = String::new();
    for section in ["model", "streams", "mqtt"] {
        out.push_str(if section == "streams" {
            "[[streams]]\n"
        } else {
            ""
        });
        if section != "streams" {
            out.push_str(&format!("[{section}]\n"));
        }
        for (_, k, v) in lines.iter().filter(|(s, _, _)| *s == section) {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    out
}

#[test]
fn the_valid_skeleton_is_valid() {
    // Otherwise the mutation property below would prove nothing.
    if let Some(e) = check(&render(&valid_lines())) {
        panic!("the skeleton is rejected: {e}");
    }
}

/// Numeric fields that `validate` requires to be finite and > 0 (and, after the fix found by this
/// fuzzer, small enough to become a `Duration`).
const POSITIVE_STREAM_FIELDS: &[&str] = &[
    "max_fps",
    "no_frame_timeout_s",
    "reconnect_min_s",
    "reconnect_max_s",
    "auth_retry_s",
];

/// `[streams.motion]` fields and whether a value is acceptable (issue 12).
fn motion_ok(field: &str, v: f64) -> bool {
    match field {
        "min_area" => v.is_finite() && v > 0.0 && v <= 1.0,
        _ => v.is_finite() && v > 0.0 && v <= 365.0 * 24.0 * 3600.0, // refresh_s
    }
}

proptest! {
    #![proptest_config(config())]

    /// Motion gate settings: any f64 either passes or is rejected naming `streams[0].motion.<field>`.
    #[test]
    fn motion_settings_are_checked(field in prop::sample::select(&["min_area", "refresh_s"][..]),
                                   v in prop_oneof![any::<f64>(), -1.0f64..2.0, 1e6f64..1e308],
                                   threshold in prop_oneof![any::<i64>(), -5i64..300]) {
        count("motion_settings_are_checked");
        let mut text = render(&valid_lines());
        text = text.replacen("[mqtt]", &format!("[streams.motion]\n{field} = {}\nthreshold = {threshold}\n[mqtt]", toml_float(v)), 1);
        let ok = motion_ok(field, v) && (1..=255).contains(&threshold);
        match check(&text) {
            None => prop_assert!(ok, "{field} = {v}, threshold = {threshold} accepted"),
            Some(e) => {
                prop_assert!(!ok, "valid {field} = {v}, threshold = {threshold} rejected: {e}");
                // A value TOML cannot hold in the field's type is a parse error at its line; `threshold` is
                // on the line after `field` in the rendered text.
                let line = |key: &str| text.lines().position(|l| l.starts_with(&format!("{key} ="))).map_or(0, |i| i + 1);
                let named = (!motion_ok(field, v) && names_field(&e, &format!("streams[0].motion.{field}"), line(field)))
                    || (!(1..=255).contains(&threshold)
                        && names_field(&e, "streams[0].motion.threshold", line("threshold")));
                prop_assert!(named, "{field} = {v}, threshold = {threshold}: {e}");
            }
        }
    }

    /// Any Unicode text at all.
    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        count("arbitrary_text_never_panics");
        check(&text);
    }

    /// Arbitrary bytes, decoded lossily (what a corrupt file read as UTF-8 would look like).
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        count("arbitrary_bytes_never_panic");
        check(&String::from_utf8_lossy(&bytes));
    }

    /// Documents made of the real headers and keys with hostile values, in any order.
    #[test]
    fn toml_ish_documents_never_panic(lines in prop::collection::vec(toml_line(), 0..24)) {
        count("toml_ish_documents_never_panic");
        check(&lines.join("\n"));
    }

    /// A valid file with one field replaced by a hostile value: no panic, and a rejection names
    /// that field: its path for a semantic error, its line for a TOML syntax or type error.
    #[test]
    fn one_wrong_field_is_named(slot in 0usize..15, value in hostile_value()) {
        count("one_wrong_field_is_named");
        let mut lines = valid_lines();
        let (section, key, _) = lines[slot].clone();
        lines[slot].2 = value.clone();
        let text = render(&lines);
        let line = line_of(&text, section, key);
        if let Some(e) = check(&text) {
            let path = field_path(section, key);
            prop_assert!(
                names_field(&e, &path, line),
                "error for {path} = {value} (line {line}) does not name it: {e}"
            );
        }
    }

    /// Stream durations: any f64 either passes with a usable Duration or is rejected naming the
    /// field (1e-300 fps and 1e300 s used to panic in `Duration::from_secs_f64`).
    #[test]
    fn stream_durations_never_panic(field in prop::sample::select(POSITIVE_STREAM_FIELDS),
                                    v in prop_oneof![any::<f64>(), 0.0f64..1e-280, 1e15f64..1e308]) {
        count("stream_durations_never_panic");
        let mut lines = valid_lines();
        lines.retain(|(_, k, _)| *k != field);
        if field == "reconnect_max_s" || field == "reconnect_min_s" {
            // Keep min ≤ max from failing for the other field only.
            lines.retain(|(_, k, _)| *k != "reconnect_min_s" && *k != "reconnect_max_s");
        }
        lines.push(("streams", field, toml_float(v)));
        let text = render(&lines);
        let line = line_of(&text, "streams", field);
        match check(&text) {
            None => prop_assert!(v.is_finite() && v > 0.0, "{field} = {v} accepted"),
            Some(e) => prop_assert!(
                names_field(&e, &field_path("streams", field), line),
                "{field} = {v} rejected without naming it: {e}"
            ),
        }
    }
}
