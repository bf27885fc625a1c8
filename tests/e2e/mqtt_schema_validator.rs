//! A small JSON Schema (draft 2020-12) validator for exactly the keywords
//! `docs/detections.schema.json` uses: `type` (one or a list), `const`, `enum`, `required`,
//! `properties`, `additionalProperties: false`, `items`, `minItems`, `maxItems`, `minimum`,
//! `maximum`, `minLength`, `pattern`, `oneOf`, and local `$ref` (`#/$defs/...`). Annotations
//! (`description`, `title`, `format`, `$id`, `$schema`) are ignored, as the spec allows for
//! `format`. Any other keyword is an error, so the schema cannot silently grow beyond what is
//! checked here.
//!
//! Why not the `jsonschema` crate: it pulls in an HTTP client, a regex engine with lookaround
//! and ~80 crates for a check this small; the tests crate already builds `regex`.
//! Included with `#[path]` by the e2e tests that validate documents.

use serde_json::Value;

const KNOWN: &[&str] = &[
    "$schema",
    "$id",
    "$defs",
    "$ref",
    "title",
    "description",
    "format",
    "type",
    "const",
    "enum",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "minLength",
    "pattern",
    "oneOf",
];

/// Validate `doc` against `root`; returns every violation as `path: problem`.
pub fn validate(root: &Value, doc: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    check(root, root, doc, "$", &mut errs);
    errs
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => false,
    }
}

fn check(root: &Value, schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let Some(s) = schema.as_object() else {
        errs.push(format!("{path}: schema is not an object"));
        return;
    };
    for k in s.keys() {
        if !KNOWN.contains(&k.as_str()) {
            errs.push(format!(
                "{path}: schema keyword {k:?} not supported by this validator"
            ));
        }
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let target = r
            .strip_prefix("#/")
            .and_then(|p| p.split('/').try_fold(root, |acc, seg| acc.get(seg)));
        match target {
            Some(t) => check(root, t, v, path, errs),
            None => errs.push(format!("{path}: unresolvable $ref {r}")),
        }
    }
    if let Some(t) = s.get("type") {
        let ok = match t {
            Value::String(t) => type_ok(t, v),
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(|t| type_ok(t, v)),
            _ => false,
        };
        if !ok {
            errs.push(format!("{path}: {v} is not of type {t}"));
            return;
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            errs.push(format!("{path}: {v} is not {c}"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!(
                "{path}: {v} is not one of {}",
                Value::Array(e.clone())
            ));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            if n < min {
                errs.push(format!("{path}: {n} < minimum {min}"));
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            if n > max {
                errs.push(format!("{path}: {n} > maximum {max}"));
            }
        }
    }
    if let Some(text) = v.as_str() {
        if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
            if (text.chars().count() as u64) < min {
                errs.push(format!("{path}: {text:?} shorter than {min}"));
            }
        }
        if let Some(p) = s.get("pattern").and_then(Value::as_str) {
            match regex::Regex::new(p) {
                Ok(re) if re.is_match(text) => {}
                Ok(_) => errs.push(format!("{path}: {text:?} does not match {p}")),
                Err(e) => errs.push(format!("{path}: bad pattern {p}: {e}")),
            }
        }
    }
    if let Some(obj) = v.as_object() {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(k) = r.as_str() {
                if !obj.contains_key(k) {
                    errs.push(format!("{path}: missing required {k:?}"));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => check(root, ps, val, &format!("{path}.{k}"), errs),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errs.push(format!("{path}: unexpected property {k:?}"));
                }
                None => {}
            }
        }
    }
    if let Some(arr) = v.as_array() {
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if (arr.len() as u64) < min {
                errs.push(format!("{path}: {} items < minItems {min}", arr.len()));
            }
        }
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64) {
            if (arr.len() as u64) > max {
                errs.push(format!("{path}: {} items > maxItems {max}", arr.len()));
            }
        }
        if let Some(items) = s.get("items") {
            for (i, item) in arr.iter().enumerate() {
                check(root, items, item, &format!("{path}[{i}]"), errs);
            }
        }
    }
    if let Some(one) = s.get("oneOf").and_then(Value::as_array) {
        let mut branch_errs = Vec::new();
        let passing = one
            .iter()
            .filter(|sub| {
                let mut e = Vec::new();
                check(root, sub, v, path, &mut e);
                let ok = e.is_empty();
                branch_errs.push(e);
                ok
            })
            .count();
        if passing != 1 {
            errs.push(format!(
                "{path}: matches {passing} of {} oneOf branches (need exactly 1): {branch_errs:?}",
                one.len()
            ));
        }
    }
}

/// The schema file, parsed.
pub fn load_schema() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/detections.schema.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}"))
}
