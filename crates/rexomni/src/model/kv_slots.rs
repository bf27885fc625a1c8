//! A preallocated key/value cache with one slot per decode row and a length per slot, for continuous batching
//! (`engine::continuous`).
//!
//! In: a row's prefill [`KvCache`] (`insert`), then one key/value per layer per decode step (or `l` for a draft
//! verification pass, rolled back to the accepted ones with `truncate`), written in place at that row's own
//! length (`TextModel::forward_slots`). Out: strided views of the live columns for attention.
//! Runs on the decode thread (the detector worker); plain data owned by one session.
//!
//! Layout per layer: keys and values `[slots, kv_heads, capacity, head_dim]` in the model dtype, contiguous.
//! Row `s` holds its tokens in columns `0..len[s]`; columns past it are stale (a previous occupant's, or
//! zeros) and hidden from attention by the mask. A step writes each row's new key at its own column with
//! `slice_set` (a copy of `[1, kv_heads, 1, head_dim]`), so nothing is concatenated or reallocated per step
//! — unlike [`KvCache`], which grows by `Tensor::cat` and rebuilds the whole `[B, kvh, T, hd]` each step. A
//! slot is freed by setting its length to 0: no copy. The capacity grows (one copy) only when a row would
//! outgrow it, doubling so that it happens a logarithmic number of times per session.

use candle_core::{DType, Device, Result, Tensor};

use super::text::KvCache;

pub struct KvSlots {
    /// Per layer: (keys, values), `[slots, kv_heads, capacity, head_dim]`.
    pub(super) layers: Vec<(Tensor, Tensor)>,
    /// Live columns per slot (0 = free or empty).
    lens: Vec<usize>,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl KvSlots {
    /// `slots` rows of `capacity` columns each, for `n_layers` layers (zero-filled).
    pub fn new(
        n_layers: usize,
        slots: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (slots, kv_heads, capacity.max(1), head_dim);
        let layers = (0..n_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            lens: vec![0; slots],
            capacity: capacity.max(1),
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
        })
    }

    pub fn slots(&self) -> usize {
        self.lens.len()
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Live columns of slot `s`.
    pub fn len(&self, s: usize) -> usize {
        self.lens[s]
    }
    pub fn is_empty(&self, s: usize) -> bool {
        self.lens[s] == 0
    }

    /// Copy a one-row prefill cache (`[1, kv_heads, L, head_dim]` per layer) into slot `s`, columns `0..L`.
    pub fn insert(&mut self, s: usize, cache: &KvCache) -> Result<()> {
        if cache.layers.len() != self.layers.len() {
            candle_core::bail!(
                "kv slots: a cache of {} layers for {} layers",
                cache.layers.len(),
                self.layers.len()
            );
        }
        let l = cache.len();
        self.reserve(l)?;
        for ((k_all, v_all), src) in self.layers.iter().zip(&cache.layers) {
            let Some((k, v)) = src else {
                candle_core::bail!("kv slots: empty prefill cache layer")
            };
            if k.dim(0)? != 1 {
                candle_core::bail!(
                    "kv slots: insert takes a one-row cache, got {} rows",
                    k.dim(0)?
                );
            }
            k_all.narrow(0, s, 1)?.slice_set(&k.contiguous()?, 2, 0)?;
            v_all.narrow(0, s, 1)?.slice_set(&v.contiguous()?, 2, 0)?;
        }
        self.lens[s] = l;
        Ok(())
    }

    /// Free slot `s` (its columns become stale; nothing is copied).
    pub fn free(&mut self, s: usize) {
        self.lens[s] = 0;
    }

    /// Make room for `need` columns per slot, doubling the capacity (one copy of the live data).
    pub fn reserve(&mut self, need: usize) -> Result<()> {
        if need <= self.capacity {
            return Ok(());
        }
        let cap = need.max(self.capacity * 2);
        let shape = (self.lens.len(), self.kv_heads, cap, self.head_dim);
        for (k_all, v_all) in self.layers.iter_mut() {
            let k = Tensor::zeros(shape, self.dtype, &self.device)?;
            let v = Tensor::zeros(shape, self.dtype, &self.device)?;
            k.slice_set(k_all, 2, 0)?;
            v.slice_set(v_all, 2, 0)?;
            *k_all = k;
            *v_all = v;
        }
        self.capacity = cap;
        Ok(())
    }

    /// After a pass that wrote `l` columns to each slot in `rows`.
    pub(super) fn advance(&mut self, rows: &[usize], l: usize) {
        for &s in rows {
            self.lens[s] += l;
        }
    }

    /// Roll slot `s` back to its first `len` columns (a draft verification pass keeps only the accepted ids;
    /// the columns past `len` become stale, nothing is copied). Fails when the slot has fewer columns.
    pub fn truncate(&mut self, s: usize, len: usize) -> Result<()> {
        if len > self.lens[s] {
            candle_core::bail!(
                "kv slots: cannot truncate slot {s} of {} columns to {len}",
                self.lens[s]
            );
        }
        self.lens[s] = len;
        Ok(())
    }
}
