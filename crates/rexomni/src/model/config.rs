//! `config.json` of a Rex-Omni / Qwen2.5-VL checkpoint → the plain [`Config`] the layers read.
//!
//! In: the file's text (any thread, once at load). Out: [`Config`] or a [`ModelError::Config`] naming the file,
//! the key and the value. Two shapes exist in the wild (rex-omni-spec.md §3.1): text keys at the top level
//! (transformers ≤ 4.51, what Rex-Omni ships) or nested under `text_config`, with RoPE under `rope_scaling` or
//! `rope_parameters`; vision keys are always under `vision_config`, with `in_chans` (old) or `in_channels`.

use std::path::Path;

use serde_json::Value;

use super::ModelError;

/// Vision tower hyper-parameters (spec §2.1).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub out_hidden_size: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Columns of one `pixel_values` row: c · t · p · p (1176 for the real model).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// Text decoder hyper-parameters (spec §3.1).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Half-dimension split of M-RoPE over (t, h, w); sums to head_dim / 2.
    pub mrope_section: [usize; 3],
    pub tie_word_embeddings: bool,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
}

struct Keys<'a> {
    file: &'a Path,
    obj: &'a Value,
    prefix: &'static str,
}

impl Keys<'_> {
    fn err(&self, key: &str, msg: String) -> ModelError {
        ModelError::Config {
            path: self.file.to_path_buf(),
            field: format!("{}{key}", self.prefix),
            msg,
        }
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn usize_or(&self, keys: &[&str], default: Option<usize>) -> Result<usize, ModelError> {
        for k in keys {
            if let Some(v) = self.get(k) {
                return v.as_u64().map(|x| x as usize).ok_or_else(|| {
                    self.err(k, format!("expected a non-negative integer, got {v}"))
                });
            }
        }
        default.ok_or_else(|| self.err(keys[0], "missing".into()))
    }
    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.usize_or(&[key], None)
    }
    fn f64_or(&self, key: &str, default: Option<f64>) -> Result<f64, ModelError> {
        match self.get(key) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
            None => default.ok_or_else(|| self.err(key, "missing".into())),
        }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// `path` is only used in error messages.
    pub fn from_json_str(json: &str, path: &Path) -> Result<Self, ModelError> {
        let root: Value = serde_json::from_str(json).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            field: "<file>".into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let top = Keys {
            file: path,
            obj: &root,
            prefix: "",
        };
        // Nested layout (transformers ≥ 4.52 / v5) if `text_config` carries the decoder keys.
        let text_obj = root
            .get("text_config")
            .filter(|t| t.get("hidden_size").is_some());
        let t = match text_obj {
            Some(obj) => Keys {
                file: path,
                obj,
                prefix: "text_config.",
            },
            None => Keys {
                file: path,
                obj: &root,
                prefix: "",
            },
        };
        let vobj = root
            .get("vision_config")
            .ok_or_else(|| top.err("vision_config", "missing".into()))?;
        let v = Keys {
            file: path,
            obj: vobj,
            prefix: "vision_config.",
        };

        let hidden_size = t.usize("hidden_size")?;
        let num_attention_heads = t.usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(t.err(
                "num_attention_heads",
                format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        let num_key_value_heads =
            t.usize_or(&["num_key_value_heads"], Some(num_attention_heads))?;
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(t.err("num_key_value_heads", format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}")));
        }
        let head_dim = hidden_size / num_attention_heads;

        // RoPE: `rope_scaling` (old) or `rope_parameters` (new), at the text level or the top level.
        let rope = ["rope_scaling", "rope_parameters"]
            .iter()
            .find_map(|k| t.get(k).or_else(|| top.get(k)).map(|v| (*k, v)));
        let (rope_key, rope_obj) =
            rope.ok_or_else(|| t.err("rope_scaling", "missing (need mrope_section)".into()))?;
        let sec = rope_obj
            .get("mrope_section")
            .and_then(|s| s.as_array())
            .ok_or_else(|| {
                t.err(
                    &format!("{rope_key}.mrope_section"),
                    format!("missing in {rope_obj}"),
                )
            })?;
        let sec: Vec<usize> = sec
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as usize))
            .collect();
        if sec.len() != 3 || sec.iter().sum::<usize>() * 2 != head_dim {
            return Err(t.err(
                &format!("{rope_key}.mrope_section"),
                format!(
                    "{sec:?} must be 3 values summing to head_dim/2 = {}",
                    head_dim / 2
                ),
            ));
        }
        let rope_theta = match rope_obj.get("rope_theta").and_then(|x| x.as_f64()) {
            Some(x) => x,
            None => t.f64_or(
                "rope_theta",
                top.get("rope_theta")
                    .and_then(|x| x.as_f64())
                    .or(Some(1_000_000.0)),
            )?,
        };
        let tie = t
            .get("tie_word_embeddings")
            .or_else(|| top.get("tie_word_embeddings"))
            .map(|x| {
                x.as_bool().ok_or_else(|| {
                    t.err("tie_word_embeddings", format!("expected a bool, got {x}"))
                })
            })
            .transpose()?
            .unwrap_or(false);
        let text = TextConfig {
            vocab_size: t.usize("vocab_size").or_else(|_| top.usize("vocab_size"))?,
            hidden_size,
            intermediate_size: t.usize("intermediate_size")?,
            num_hidden_layers: t.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps: t.f64_or("rms_norm_eps", Some(1e-6))?,
            rope_theta,
            mrope_section: [sec[0], sec[1], sec[2]],
            tie_word_embeddings: tie,
        };

        let vision = VisionConfig {
            depth: v.usize("depth")?,
            hidden_size: v.usize("hidden_size")?,
            intermediate_size: v.usize("intermediate_size")?,
            num_heads: v.usize("num_heads")?,
            in_channels: v.usize_or(&["in_chans", "in_channels"], Some(3))?,
            out_hidden_size: v.usize_or(&["out_hidden_size"], Some(text.hidden_size))?,
            patch_size: v.usize_or(&["patch_size", "spatial_patch_size"], Some(14))?,
            temporal_patch_size: v.usize_or(&["temporal_patch_size"], Some(2))?,
            spatial_merge_size: v.usize_or(&["spatial_merge_size"], Some(2))?,
            window_size: v.usize_or(&["window_size"], Some(112))?,
            fullatt_block_indexes: match v.get("fullatt_block_indexes") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect(),
                Some(other) => {
                    return Err(v.err(
                        "fullatt_block_indexes",
                        format!("expected a list, got {other}"),
                    ))
                }
                None => return Err(v.err("fullatt_block_indexes", "missing".into())),
            },
        };
        if vision.num_heads == 0
            || vision.hidden_size % vision.num_heads != 0
            || vision.head_dim() % 4 != 0
        {
            return Err(v.err(
                "num_heads",
                format!(
                    "{} heads do not split hidden_size {} into a head_dim divisible by 4",
                    vision.num_heads, vision.hidden_size
                ),
            ));
        }
        if vision.out_hidden_size != text.hidden_size {
            return Err(v.err(
                "out_hidden_size",
                format!(
                    "{} != text hidden_size {}",
                    vision.out_hidden_size, text.hidden_size
                ),
            ));
        }
        if vision.window_size % (vision.spatial_merge_size * vision.patch_size) != 0 {
            return Err(v.err(
                "window_size",
                format!("{} is not a multiple of merge·patch", vision.window_size),
            ));
        }
        let id = |k: &str, d: u32| -> Result<u32, ModelError> {
            Ok(top.usize_or(&[k], Some(d as usize))? as u32)
        };
        Ok(Config {
            text,
            vision,
            image_token_id: id("image_token_id", 151655)?,
            vision_start_token_id: id("vision_start_token_id", 151652)?,
        })
    }

    /// Qwen2.5-VL-3B-Instruct (= Rex-Omni) hyper-parameters, spec §2.1 and §3.1; used by the random-weights
    /// benchmark so it needs no download.
    pub fn qwen25_vl_3b() -> Self {
        Config {
            text: TextConfig {
                vocab_size: 151936,
                hidden_size: 2048,
                intermediate_size: 11008,
                num_hidden_layers: 36,
                num_attention_heads: 16,
                num_key_value_heads: 2,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                mrope_section: [16, 24, 24],
                tie_word_embeddings: true,
            },
            vision: VisionConfig {
                depth: 32,
                hidden_size: 1280,
                intermediate_size: 3420,
                num_heads: 16,
                in_channels: 3,
                out_hidden_size: 2048,
                patch_size: 14,
                temporal_patch_size: 2,
                spatial_merge_size: 2,
                window_size: 112,
                fullatt_block_indexes: vec![7, 15, 23, 31],
            },
            image_token_id: 151655,
            vision_start_token_id: 151652,
        }
    }
}
