//! Seeded random weights for any Rex-Omni config, so the benchmark needs no 7.5 GB download.
//!
//! In: the names and shapes the model asks its `VarBuilder` for while it is built. Out: a deterministic tensor
//! per name (the same seed and name always give the same values), optionally recorded so the whole set can be
//! written as a checkpoint that HF transformers loads too (`tests/reference/bench_hf.py`): both sides then run
//! the very same weights.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};

/// Standard deviation of the random matrices: HF's `initializer_range` for Qwen2.5-VL.
const WEIGHT_STD: f32 = 0.02;

pub struct RandomWeights {
    seed: u64,
    /// Every tensor handed out, by full name, when the set is to be saved afterwards.
    recorded: Option<Mutex<BTreeMap<String, Tensor>>>,
}

impl RandomWeights {
    pub fn new(seed: u64, record: bool) -> Self {
        Self {
            seed,
            recorded: record.then(|| Mutex::new(BTreeMap::new())),
        }
    }

    /// A `VarBuilder` at the checkpoint root (`visual.*`, `model.*` below it).
    pub fn into_var_builder(
        self,
        dtype: DType,
        device: &Device,
    ) -> (VarBuilder<'static>, RecordedWeights) {
        let shared = std::sync::Arc::new(self);
        let vb = VarBuilder::from_backend(
            Box::new(SharedRandom(shared.clone())),
            dtype,
            device.clone(),
        );
        (vb, RecordedWeights(shared))
    }

    fn values(&self, name: &str, n: usize, init: Init) -> Vec<f32> {
        match init {
            // Norm weights are built with `Init::Const(1.)`: keep them, random norms would only add noise. Biases
            // come with `VarBuilder::get`'s default hint, `Const(0.)`: zero, as HF initialises them. So do the
            // linear and patch-embedding weights (`get` without a hint): those must be random, or every
            // benchmark (and a saved checkpoint) runs all-zero layers.
            Init::Const(c) if c != 0.0 || !name.ends_with("weight") => vec![c as f32; n],
            _ => {
                // Uniform with the same variance as N(0, std²): cheap, and the benchmark only needs realistic
                // magnitudes, not a distribution.
                let a = WEIGHT_STD * 3f32.sqrt();
                let mut state = self.seed ^ fnv1a(name);
                (0..n)
                    .map(|_| {
                        let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
                        (2.0 * u - 1.0) * a
                    })
                    .collect()
            }
        }
    }
}

struct SharedRandom(std::sync::Arc<RandomWeights>);

impl SimpleBackend for SharedRandom {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let values = self.0.values(name, s.elem_count(), h);
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        if let Some(rec) = &self.0.recorded {
            rec.lock()
                .expect("weights recorder poisoned")
                .insert(name.to_string(), t.clone());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights: `{name}` was asked for without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // A separate `lm_head.weight` is never generated: the real checkpoint ties it (spec §3.1).
        !name.starts_with("lm_head")
    }
}

/// Handle on the tensors generated while building the model.
pub struct RecordedWeights(std::sync::Arc<RandomWeights>);

impl RecordedWeights {
    /// Write every generated tensor to `dir/model.safetensors` (the loader's single-file layout).
    pub fn save(&self, dir: &Path) -> anyhow::Result<usize> {
        let rec = self
            .0
            .recorded
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("weights were not recorded"))?;
        let map = rec.lock().expect("weights recorder poisoned");
        let tensors: std::collections::HashMap<String, Tensor> = map
            .iter()
            .map(|(k, v)| (k.clone(), v.to_device(&Device::Cpu).expect("copy to host")))
            .collect();
        std::fs::create_dir_all(dir)?;
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        Ok(tensors.values().map(|t| t.elem_count()).sum())
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_name_give_the_same_values() {
        let w = RandomWeights::new(7, false);
        let a = w.values(
            "model.layers.0.mlp.up_proj.weight",
            64,
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        );
        let b = w.values(
            "model.layers.0.mlp.up_proj.weight",
            64,
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        );
        let c = w.values(
            "model.layers.1.mlp.up_proj.weight",
            64,
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bound = WEIGHT_STD * 3f32.sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < bound / 2.0, "mean {mean}");
    }

    /// `VarBuilder::get` without a hint asks for `Const(0.)`: a weight still gets random values, a bias stays
    /// zero.
    #[test]
    fn weights_asked_without_a_hint_are_random() {
        let w = RandomWeights::new(7, false);
        let qkv = w.values("visual.blocks.0.attn.qkv.weight", 64, Init::Const(0.));
        assert!(qkv.iter().filter(|v| **v != 0.0).count() > 60, "{qkv:?}");
        assert_eq!(
            w.values("visual.blocks.0.attn.qkv.bias", 4, Init::Const(0.)),
            vec![0.0; 4]
        );
    }

    #[test]
    fn norms_stay_constant() {
        let w = RandomWeights::new(7, false);
        assert_eq!(
            w.values("model.norm.weight", 4, Init::Const(1.)),
            vec![1.0; 4]
        );
    }
}
