//! Every example pipeline shipped in `pipelines/` parses and validates (issue 17 item 13): the
//! files the README and docs tell people to copy must not rot when a config field changes.
//!
//! In: every `pipelines/*.toml` (the folder is listed at run time, so a new example is covered
//! without touching this file). Out: pass/fail, one line per file. Runs on the test thread; reads
//! the files and checks that the media they name exist, nothing else.
//!
//! Environment variables the examples reference (`${LOBBY_PASSWORD}`, `password_env`) are
//! injected with a placeholder so the result does not depend on the caller's environment; the
//! placeholder must not leak into anything printed.

use std::path::{Path, PathBuf};

use rexstream::config::PipelineConfig;

const PLACEHOLDER: &str = "example-secret-7c1e";

fn pipelines_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines")
}

#[test]
fn every_example_pipeline_parses_and_validates() {
    let dir = pipelines_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    // The ones the docs name; a rename must update this test and the docs together.
    for must in ["demo.toml", "file.toml", "multi.toml", "rtsp-camera.toml"] {
        assert!(
            files.iter().any(|f| f.ends_with(must)),
            "pipelines/{must} is gone (docs point at it)"
        );
    }
    let env = |_: &str| Some(PLACEHOLDER.to_string());
    let mut failures = Vec::new();
    for file in &files {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).unwrap();
        match PipelineConfig::parse(&text, &name).and_then(|c| c.validate(file, &env)) {
            Ok(p) => {
                assert!(!p.streams.is_empty(), "{name}: validated without streams");
                for s in &p.streams {
                    assert!(
                        !s.uri.to_string().contains(PLACEHOLDER),
                        "{name}: stream {} prints its secret",
                        s.name
                    );
                }
                println!(
                    "{}: ok, {} stream(s): {}",
                    file.file_name().unwrap().to_string_lossy(),
                    p.streams.len(),
                    p.streams
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "example pipelines that do not validate:\n{}",
        failures.join("\n")
    );
}
