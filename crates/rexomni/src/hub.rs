//! Model source → local checkpoint folder.
//!
//! In: the `--model` / `LoadOptions::source` string. An existing directory is used as is; anything else is a
//! Hugging Face hub id (default [`DEFAULT_MODEL`]) fetched with hf-hub into the standard cache
//! (`$HF_HOME/hub`, `~/.cache/huggingface/hub`) with a progress bar, or taken from that cache without network
//! when every file is already there. Out: the snapshot folder. Runs on the loading thread (blocking I/O).

use std::path::{Path, PathBuf};

use crate::model::ModelError;

pub const DEFAULT_MODEL: &str = "IDEA-Research/Rex-Omni";

/// Files besides the weights. The tokenizer is the slow one (no tokenizer.json, spec §4.2).
const REQUIRED: [&str; 4] = [
    "config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
];
const OPTIONAL: [&str; 3] = [
    "generation_config.json",
    "chat_template.json",
    "preprocessor_config.json",
];

/// Resolve `source` to a folder holding config.json, the tokenizer files and the weights.
pub fn resolve(source: &str) -> Result<PathBuf, ModelError> {
    let path = Path::new(source);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists()
        || source.starts_with('.')
        || source.starts_with('/')
        || source.matches('/').count() != 1
    {
        return Err(ModelError::Hub {
            model: source.into(),
            msg: "is neither a checkpoint folder nor a hub id of the form owner/name".into(),
        });
    }
    if let Some(dir) = from_cache(source) {
        tracing::info!(message = "Using cached model.", model = source, dir = %dir.display());
        return Ok(dir);
    }
    download(source)
}

fn offline_hint(source: &str, what: &str, err: impl std::fmt::Display) -> ModelError {
    ModelError::Hub {
        model: source.into(),
        msg: format!(
            "cannot fetch {what} from the Hugging Face hub ({err}). If this machine is offline, copy the checkpoint \
             folder (config.json, *.safetensors, vocab.json, merges.txt, tokenizer_config.json) here and pass it \
             as a local folder, e.g. `--model /path/to/Rex-Omni`"
        ),
    }
}

/// Every file already in the hf-hub cache → its snapshot folder, without touching the network.
fn from_cache(source: &str) -> Option<PathBuf> {
    let repo = hf_hub::Cache::from_env().model(source.to_string());
    let config = repo.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    for f in REQUIRED {
        repo.get(f)?;
    }
    let files = crate::model::loading::weight_files(&dir).ok()?;
    files.iter().all(|f| f.exists()).then_some(dir)
}

fn download(source: &str) -> Result<PathBuf, ModelError> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| offline_hint(source, "the hub client", e))?;
    let repo = api.model(source.to_string());
    let mut dir = None;
    for f in REQUIRED {
        let p = repo.get(f).map_err(|e| offline_hint(source, f, e))?;
        dir.get_or_insert_with(|| p.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    for f in OPTIONAL {
        if let Err(e) = repo.get(f) {
            tracing::debug!(message = "Optional model file not fetched.", file = f, %e);
        }
    }
    let dir = dir.unwrap_or_default();
    // Sharded (what Rex-Omni ships) or a single file.
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io {
                path: index.clone(),
                source: e,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Weights {
                    path: index.clone(),
                    msg: format!("not valid JSON: {e}"),
                })?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                repo.get(&s).map_err(|e| offline_hint(source, &s, e))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| offline_hint(source, "model.safetensors", e))?;
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_folder_is_used_as_is_and_junk_is_rejected() {
        let here = env!("CARGO_MANIFEST_DIR");
        assert_eq!(resolve(here).unwrap(), PathBuf::from(here));
        let e = resolve("/no/such/folder").unwrap_err().to_string();
        assert!(e.contains("/no/such/folder"), "{e}");
        let e = resolve("not-a-hub-id").unwrap_err().to_string();
        assert!(e.contains("owner/name"), "{e}");
    }
}
