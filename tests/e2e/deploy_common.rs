//! Shared by the deploy_* tests: pull PromQL expressions and metric names out of the dashboard JSON and
//! the rules file. Included with `#[path]`; not a test target of its own.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;

/// `rexstream_*` tokens in `text`. A name directly followed by `::` or preceded by `::` is a Rust path,
/// not a metric.
pub fn referenced(text: &str) -> BTreeSet<String> {
    let re = Regex::new(r"\brexstream_[a-z0-9_]*[a-z0-9]\b").expect("regex");
    re.find_iter(text)
        .filter(|m| !text[m.end()..].starts_with("::") && !text[..m.start()].ends_with("::"))
        .map(|m| m.as_str().to_string())
        .collect()
}

/// Is `name` an exported family, or a histogram's `_bucket`/`_sum`/`_count` series?
pub fn is_exported(name: &str, families: &BTreeMap<String, String>) -> bool {
    if families.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .and_then(|base| families.get(base))
            .is_some_and(|kind| kind == "histogram")
    })
}

/// The `expr:` values of a Prometheus rules file: inline (`expr: up == 0`) or block scalars (`expr: |`
/// followed by more-indented lines). Enough YAML for rules files; avoids a YAML crate in the workspace.
pub fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                out.push(block.join(" ").trim().to_string());
            } else {
                out.push(rest.trim_matches(|c| c == '\'' || c == '"').to_string());
            }
        }
        i += 1;
    }
    out
}

/// Every `expr` string anywhere in a Grafana dashboard (panels, rows, nested panels).
pub fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, x) in map {
                if k == "expr" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_string());
                    }
                } else {
                    collect_exprs(x, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}
