//! The pipeline files shipped under `deploy/` are valid rexstream configurations, and the Kubernetes example
//! splits its streams across replicas as deploy/k8s/README.md says.
//!
//! In: `deploy/pipeline.toml` (compose) and the `pipeline.toml` embedded in `deploy/k8s/configmap.yaml`, parsed
//! and validated by the library's own config code (`rexstream::config`), with the environment the manifests
//! provide. Out: pass/fail. No services.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rexstream::config::{Pipeline, PipelineConfig};
use rexstream::shard::Shard;
use rexstream_e2e::{workspace_root, TempDir};

fn validate(text: &str, file: &Path, env: &[(&str, &str)]) -> Pipeline {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let name = file.display().to_string();
    PipelineConfig::parse(text, &name)
        .and_then(|c| c.validate(file, &|k| env.get(k).cloned()))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The block scalar under `pipeline.toml: |` in the ConfigMap, dedented.
fn configmap_pipeline(yaml: &str) -> String {
    let mut lines = yaml
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("pipeline.toml: |"))
        .skip(1);
    let mut out = Vec::new();
    let mut indent = None;
    for l in lines.by_ref() {
        if l.trim().is_empty() {
            out.push(String::new());
            continue;
        }
        let n = l.len() - l.trim_start().len();
        let base = *indent.get_or_insert(n);
        if n < base {
            break;
        }
        out.push(l[base..].to_string());
    }
    out.join("\n")
}

#[test]
fn compose_pipeline_is_valid_where_the_image_puts_it() {
    let root = workspace_root();
    let text =
        std::fs::read_to_string(root.join("deploy/pipeline.toml")).expect("deploy/pipeline.toml");
    // The image has the file at /etc/rexstream/pipeline.toml and pipelines/ at /etc/rexstream/examples
    // (deploy/Dockerfile); rebuild that layout so relative media paths resolve the same way.
    let etc = TempDir::new("deploy-etc").expect("temp dir");
    std::os::unix::fs::symlink(root.join("pipelines"), etc.path().join("examples"))
        .expect("symlink");
    let p = validate(&text, &etc.path().join("pipeline.toml"), &[]);
    assert!(!p.streams.is_empty());
    assert_eq!(
        p.raw.metrics.listen.to_string(),
        "0.0.0.0:9464",
        "Prometheus scrapes rexstream:9464 in compose"
    );
    let mqtt = p
        .raw
        .mqtt
        .as_ref()
        .expect("[mqtt] pointing at the compose broker");
    assert_eq!(mqtt.url, "mqtt://mosquitto:1883");
    // Prometheus in compose scrapes exactly this port.
    let prom = std::fs::read_to_string(root.join("deploy/prometheus/prometheus.yml"))
        .expect("prometheus.yml");
    assert!(prom.contains("\"rexstream:9464\""), "{prom}");
}

#[test]
fn kubernetes_pipeline_is_valid_with_the_statefulset_environment() {
    let root = workspace_root();
    let yaml =
        std::fs::read_to_string(root.join("deploy/k8s/configmap.yaml")).expect("configmap.yaml");
    let text = configmap_pipeline(&yaml);
    assert!(
        text.contains("[[streams]]"),
        "no pipeline.toml block found:\n{text}"
    );
    // The variables the StatefulSet fills from the rexstream-secrets Secret.
    let sts = std::fs::read_to_string(root.join("deploy/k8s/statefulset.yaml"))
        .expect("statefulset.yaml");
    for var in ["MQTT_PASSWORD", "CAMERA_PASSWORD"] {
        assert!(
            sts.contains(&format!("name: {var}")),
            "statefulset.yaml does not set {var}"
        );
    }
    let file = PathBuf::from("/etc/rexstream/pipeline.toml");
    let p = validate(
        &text,
        &file,
        &[
            ("MQTT_PASSWORD", "s3cr3t-mqtt"),
            ("CAMERA_PASSWORD", "s3cr3t-cam"),
        ],
    );
    assert_eq!(
        p.raw.metrics.listen.to_string(),
        "0.0.0.0:9464",
        "probes and Prometheus reach the pod IP"
    );
    // The camera password reaches GStreamer but never the printed form of the uri.
    for s in &p.streams {
        assert!(
            s.uri.expose().contains("s3cr3t-cam"),
            "{}: password_env not applied",
            s.name
        );
        assert!(
            !s.uri.to_string().contains("s3cr3t-cam"),
            "{}: password printed",
            s.name
        );
    }

    // deploy/k8s/README.md: with 2 replicas (the shipped count), gate → rexstream-0, the rest → rexstream-1;
    // with any count, each stream has exactly one owner.
    let owner = |name: &str, n: u32| (0..n).find(|&k| Shard { index: k, count: n }.owns(name));
    for s in &p.streams {
        let expect = if s.name == "gate" { 0 } else { 1 };
        assert_eq!(
            owner(&s.name, 2),
            Some(expect),
            "{} with 2 replicas",
            s.name
        );
        for n in 1..=8 {
            let owners = (0..n)
                .filter(|&k| Shard { index: k, count: n }.owns(&s.name))
                .count();
            assert_eq!(owners, 1, "{} with {n} replicas", s.name);
        }
    }
    let kust = std::fs::read_to_string(root.join("deploy/k8s/kustomization.yaml"))
        .expect("kustomization.yaml");
    let count = kust
        .split("count:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("replicas count");
    assert!(
        kust.contains(&format!(
            "name: REXSTREAM_SHARD_COUNT\n          value: \"{count}\""
        )),
        "kustomization.yaml: replica count {count} and REXSTREAM_SHARD_COUNT must agree"
    );
}
