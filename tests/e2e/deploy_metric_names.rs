//! Every metric name the operator-facing files use is one rexstream exports, and every exported metric is
//! documented (issue 7, "Done when").
//!
//! In: the library's own registry (`rexstream::metrics::Metrics`, exercised so every family has a series),
//! `crates/rexstream/src/metrics.rs` (the name literals), the Grafana dashboard, the alert rules and their
//! tests, and every Markdown file under `docs/` plus `deploy/**/README.md`. Out: one failure listing every
//! unknown or undocumented name at once. No services; runs in milliseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;
use rexstream::metrics::{DropReason, Metrics, ReconnectReason, SinkKind, Stage};
use rexstream_e2e::workspace_root;

#[path = "deploy_common.rs"]
mod common;
use common::{collect_exprs, is_exported, referenced, rule_exprs};

/// Names Prometheus itself writes for every target or rule; dashboards and alerts may use them.
const PROMETHEUS_SYNTHETIC: &[&str] = &["up", "ALERTS", "ALERTS_FOR_STATE"];

/// Metric families and their types (`counter`, `gauge`, `histogram`), from the text exposition of a
/// registry in which every family has at least one series.
fn exported() -> BTreeMap<String, String> {
    let m = Metrics::new();
    let s = m.stream("cam-a");
    // Families whose series appear only on first use: create one of each so the encoder lists them.
    s.frames_received.inc();
    s.dropped(DropReason::ALL[0], 1);
    s.reconnect(ReconnectReason::ALL[0]);
    s.published(SinkKind::Mqtt);
    s.detections(&["person".to_string()], ["person"]);
    m.observe_stage(Stage::ALL[0], std::time::Duration::from_millis(1));
    m.prompt_update(true);
    let text = m.encode();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                out.insert(name.to_string(), kind.to_string());
            }
        }
    }
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Markdown files under `dir`, recursively, in name order.
fn markdown_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(markdown_under(&p));
        } else if p.extension().is_some_and(|x| x == "md") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Files whose metric names must all be real: dashboard, rules, rule tests, docs, deploy READMEs.
fn operator_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![
        root.join("deploy/grafana/dashboards/rexstream.json"),
        root.join("deploy/prometheus/rules.yml"),
        root.join("deploy/prometheus/rules_test.yml"),
    ];
    files.extend(markdown_under(&root.join("docs")));
    files.extend(markdown_under(&root.join("deploy")));
    files
}

#[test]
fn registry_lists_every_metric_defined_in_metrics_rs() {
    // Guards the other two tests: if a family were missing from `exported()` (declared but not
    // exercised above), a correct reference to it would be reported as unknown.
    let families = exported();
    let src = read(&workspace_root().join("crates/rexstream/src/metrics.rs"));
    let literal = Regex::new(r#""(rexstream_[a-z0-9_]+)""#).expect("regex");
    let declared: BTreeSet<String> = literal
        .captures_iter(&src)
        .map(|c| c[1].to_string())
        .collect();
    assert!(
        declared.len() >= 15,
        "expected the design.md metric set in metrics.rs, found {declared:?}"
    );
    let missing: Vec<&String> = declared
        .iter()
        .filter(|n| !families.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics.rs declares {missing:?} but the exercised registry does not export them; \
         exercise them in exported() of tests/e2e/deploy_metric_names.rs"
    );
    for name in families.keys() {
        assert!(
            name.starts_with("rexstream_"),
            "{name} lacks the rexstream_ prefix (design.md)"
        );
    }
}

#[test]
fn every_metric_name_in_dashboard_rules_and_docs_is_exported() {
    let root = workspace_root();
    let families = exported();
    let mut unknown = Vec::new();
    let mut checked = 0;
    for file in operator_files(&root) {
        if !file.exists() {
            unknown.push(format!("{}: file missing", file.display()));
            continue;
        }
        for name in referenced(&read(&file)) {
            checked += 1;
            if !is_exported(&name, &families) {
                let rel = file.strip_prefix(&root).unwrap_or(&file);
                unknown.push(format!("{}: {name}", rel.display()));
            }
        }
    }
    assert!(checked > 0, "no metric names found at all");
    assert!(
        unknown.is_empty(),
        "names not exported by rexstream (exported: {:?}, plus {PROMETHEUS_SYNTHETIC:?}):\n  {}",
        families.keys().collect::<Vec<_>>(),
        unknown.join("\n  ")
    );
}

#[test]
fn dashboard_and_rules_use_only_rexstream_or_prometheus_metrics() {
    // A non-rexstream name (e.g. a DCGM GPU metric) would be a query that can never return data here.
    let root = workspace_root();
    let families = exported();
    let dashboard: serde_json::Value = serde_json::from_str(&read(
        &root.join("deploy/grafana/dashboards/rexstream.json"),
    ))
    .expect("dashboard JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let rules = read(&root.join("deploy/prometheus/rules.yml"));
    let ident = Regex::new(r"[A-Za-z_:][A-Za-z0-9_:]*").expect("regex");
    // PromQL words that are not metric names.
    let keywords: BTreeSet<&str> = [
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "rate",
        "increase",
        "irate",
        "deriv",
        "delta",
        "histogram_quantile",
        "vector",
        "label_values",
        "instance",
        "stream",
        "reason",
        "stage",
        "sink",
        "label",
        "result",
        "le",
        "job",
        "offset",
        "bool",
        "topk",
        "bottomk",
        "abs",
        "clamp_min",
        "clamp_max",
        "time",
        "scalar",
        "__rate_interval",
        "__interval",
        "datasource",
    ]
    .into_iter()
    .collect();
    let mut bad = BTreeSet::new();
    let rule_exprs = rule_exprs(&rules);
    assert!(
        rule_exprs.len() >= 5,
        "expected the five alerts of issue 7, found {rule_exprs:?}"
    );
    let string_literal = Regex::new(r#""[^"]*""#).expect("regex");
    let range = Regex::new(r"\[[^\]]*\]").expect("regex");
    for e in exprs.iter().chain(rule_exprs.iter()) {
        // Drop string literals ("…" label values) and range selectors before looking for identifiers.
        let no_strings = string_literal.replace_all(e, "\"\"");
        let no_ranges = range.replace_all(&no_strings, "[]");
        for m in ident.find_iter(&no_ranges) {
            let w = m.as_str();
            if keywords.contains(w) || w.chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            // Identifiers followed by `=`/`!=`/`=~` inside braces are label names.
            let after = no_ranges[m.end()..].trim_start();
            if after.starts_with("=") || after.starts_with("!=") || after.starts_with("!~") {
                continue;
            }
            if !(is_exported(w, &families) || PROMETHEUS_SYNTHETIC.contains(&w)) {
                bad.insert(w.to_string());
            }
        }
    }
    assert!(!exprs.is_empty(), "dashboard has no queries");
    assert!(
        bad.is_empty(),
        "identifiers in queries that are neither rexstream metrics nor PromQL words: {bad:?}"
    );
}

#[test]
fn every_exported_metric_is_documented_in_docs_metrics_md() {
    let root = workspace_root();
    let path = root.join("docs/metrics.md");
    let doc = read(&path);
    let documented = referenced(&doc);
    let undocumented: Vec<String> = exported()
        .into_keys()
        .filter(|n| !documented.contains(n))
        .collect();
    assert!(
        undocumented.is_empty(),
        "{} does not document: {undocumented:?}",
        path.display()
    );
}
