//! Qwen2.5-VL vision tower (rex-omni-spec.md §2): `pixel_values [N, 1176]` + `grid_thw` → image embeddings
//! `[N/4, out_hidden]`, rows in row-major order over the merged grid (what §3.4 positions assume).
//!
//! Patch embed as one matmul (the conv kernel covers its whole input, §2.2.1), 2-D RoPE in f32, window
//! permutation, 28 window-attention blocks run as one batched attention over padded windows, full-attention
//! blocks chunked over query rows (`attention::attend`), RMSNorm, SwiGLU, merger with erf GELU, reverse
//! permutation. Runs on whatever thread calls it; one image per call.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{attend, MAX_SCORE_ELEMS};
use super::bf16_lanes;
use super::config::VisionConfig;
use super::linear::{Linear, LinearLoader};
use super::numerics::{self, RmsNorm};
use super::rope;
use super::vision_cpu;

/// Per-op wall times of the vision tower, printed to stderr after each forward when `REXOMNI_VISION_PROFILE`
/// is set (docs/benchmarks.md, "bf16 vision on the CPU"): where the time goes, without a profiler. Off, each
/// timer is one cached flag test.
pub(crate) mod prof {
    use std::sync::Mutex;
    use std::time::Instant;
    static T: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());
    pub fn on() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("REXOMNI_VISION_PROFILE").is_some())
    }
    pub fn t<T>(label: &'static str, f: impl FnOnce() -> T) -> T {
        if !on() {
            return f();
        }
        let s = Instant::now();
        let r = f();
        let ms = s.elapsed().as_secs_f64() * 1e3;
        let mut v = T.lock().unwrap();
        match v.iter_mut().find(|e| e.0 == label) {
            Some(e) => e.1 += ms,
            None => v.push((label, ms)),
        }
        r
    }
    pub fn dump() {
        if !on() {
            return;
        }
        let mut v = T.lock().unwrap();
        let total: f64 = v.iter().map(|e| e.1).sum();
        for (l, ms) in v.iter() {
            eprintln!("vision-prof {l:<24} {ms:>10.1} ms");
        }
        eprintln!("vision-prof total(sum)               {total:>10.1} ms");
        v.clear();
    }
}
use prof::t;

struct Block {
    norm1: RmsNorm,
    norm2: RmsNorm,
    qkv: Linear,
    proj: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    heads: usize,
    head_dim: usize,
}

/// Attention layout shared by all blocks of one forward over `images` same-size images.
struct Layout {
    /// Images in the batch; each holds `rows / images` consecutive rows of the block input.
    images: usize,
    cos: Tensor,
    sin: Tensor,
    /// Window gather: `[n_windows * wmax]` rows of the permuted sequence (padding slots point at the image's
    /// row 0); `n_windows` counts the windows of all images.
    gather: Tensor,
    /// Rows of the padded `[n_windows * wmax]` output that are real patches, in order.
    valid: Tensor,
    /// Additive key mask `[n_windows, 1, 1, wmax]` (f32), `None` when no window is padded.
    mask: Option<Tensor>,
    n_windows: usize,
    wmax: usize,
    /// Rows per image.
    n: usize,
    /// `cos`/`sin` as `[n, head_dim / 2]` f32 values for [`vision_cpu::attention`].
    cos_v: Vec<f32>,
    sin_v: Vec<f32>,
    /// Row ranges of the windows of every image, in order (window-attention blocks).
    win_seqs: Vec<(usize, usize)>,
    /// One range per image (full-attention blocks).
    full_seqs: Vec<(usize, usize)>,
}

/// Which ops a bf16 CPU forward runs: 0 = not decided yet, 1 = `vision_cpu`'s kernels, 2 = candle's ops.
static OPS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the bf16 CPU kernels of `vision_cpu` run (default), or candle's ops as before
/// (`REXOMNI_VISION_CPU=candle`, or [`set_own_kernels`]), only so that one binary can measure both
/// (docs/benchmarks.md, "bf16 vision on the CPU").
fn own_kernels(x: &Tensor) -> bool {
    use std::sync::atomic::Ordering;
    let mut ops = OPS.load(Ordering::Relaxed);
    if ops == 0 {
        let candle = std::env::var("REXOMNI_VISION_CPU").is_ok_and(|v| v == "candle");
        ops = if candle { 2 } else { 1 };
        OPS.store(ops, Ordering::Relaxed);
    }
    ops == 1 && bf16_lanes::applies(x)
}

/// Switches the bf16 CPU vision ops for the following forwards (`rexbench --vision-ab`: before and after in
/// one process, alternating).
pub fn set_own_kernels(on: bool) {
    OPS.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder, lin: &LinearLoader) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            norm1: numerics::rms_norm(h, 1e-6, vb.pp("norm1"))?,
            norm2: numerics::rms_norm(h, 1e-6, vb.pp("norm2"))?,
            qkv: lin.load(h, 3 * h, true, vb.pp("attn").pp("qkv"))?,
            proj: lin.load(h, h, true, vb.pp("attn").pp("proj"))?,
            gate: lin.load(h, i, true, vb.pp("mlp").pp("gate_proj"))?,
            up: lin.load(h, i, true, vb.pp("mlp").pp("up_proj"))?,
            down: lin.load(i, h, true, vb.pp("mlp").pp("down_proj"))?,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, x: &Tensor, lay: &Layout, full: bool) -> Result<Tensor> {
        let own = own_kernels(x);
        let add = |a: &Tensor, b: &Tensor| {
            if own {
                bf16_lanes::add(a, b)
            } else {
                a.add(b)
            }
        };
        let n1 = t("norm", || self.norm1.forward(x))?;
        let a = self.attn(&n1, lay, full)?;
        let h = t("residual", || add(x, &a))?;
        let n = t("norm", || self.norm2.forward(&h))?;
        let g = t("mlp gate/up linear", || self.gate.forward(&n))?;
        let u = t("mlp gate/up linear", || self.up.forward(&n))?;
        let gu = t("mlp silu*mul", || {
            if own {
                bf16_lanes::silu_mul(&g, &u)
            } else {
                numerics::silu(&g)? * u
            }
        })?;
        let m = t("mlp down linear", || self.down.forward(&gu))?;
        t("residual", || add(&h, &m))
    }

    fn attn(&self, x: &Tensor, lay: &Layout, full: bool) -> Result<Tensor> {
        let (rows, hidden) = x.dims2()?;
        let (imgs, n) = (lay.images, rows / lay.images);
        let dtype = x.dtype();
        // qkv rows are [q | k | v], each heads × head_dim (spec §2.4).
        let qkv = t("qkv linear", || self.qkv.forward(x))?;
        if own_kernels(x) {
            let seqs = if full { &lay.full_seqs } else { &lay.win_seqs };
            let out = t("attend (own)", || {
                vision_cpu::attention(
                    &qkv,
                    &lay.cos_v,
                    &lay.sin_v,
                    lay.n,
                    seqs,
                    self.heads,
                    self.head_dim,
                )
            })?;
            return t("proj linear", || self.proj.forward(&out));
        }
        let qkv = qkv.reshape((imgs, n, 3, self.heads, self.head_dim))?;
        // [images, heads, N, hd]; RoPE in f32 then back to the model dtype (HF apply_rotary_pos_emb_vision).
        let part = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let rot = |t: Tensor| -> Result<Tensor> {
            candle_nn::rotary_emb::rope(&t.to_dtype(DType::F32)?, &lay.cos, &lay.sin)?
                .to_dtype(dtype)
        };
        let q = t("rope+split", || rot(part(0)?))?;
        let k = t("rope+split", || rot(part(1)?))?;
        let v = t("rope+split", || part(2))?;
        let out = if full {
            // One sequence per image: cu_seqlens = [0, N] (spec §2.2 step 5), no mask.
            t("attend full", || {
                attend(&q, &k, &v, MAX_SCORE_ELEMS, |_, _| Ok(None))
            })?
            .transpose(1, 2)?
        } else {
            // Batch the windows: [nw, heads, wmax, hd], padded keys masked out, padded query rows dropped.
            let (nw, w) = (lay.n_windows, lay.wmax);
            let win = |t: &Tensor| -> Result<Tensor> {
                t.transpose(1, 2)?
                    .contiguous()?
                    .reshape((rows, self.heads, self.head_dim))?
                    .index_select(&lay.gather, 0)?
                    .reshape((nw, w, self.heads, self.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (wq, wk, wv) = t("window gather", || -> Result<_> {
                Ok((win(&q)?, win(&k)?, win(&v)?))
            })?;
            let o = t("attend windows", || {
                attend(&wq, &wk, &wv, MAX_SCORE_ELEMS, |_, _| Ok(lay.mask.clone()))
            })?;
            t("window scatter", || {
                o.transpose(1, 2)?
                    .reshape((nw * w, self.heads, self.head_dim))?
                    .index_select(&lay.valid, 0)
            })?
        };
        t("proj linear", || {
            self.proj.forward(&out.reshape((rows, hidden))?)
        })
    }
}

pub struct VisionTower {
    patch_w: Tensor,
    blocks: Vec<Block>,
    ln_q: RmsNorm,
    mlp0: Linear,
    mlp2: Linear,
    cfg: VisionConfig,
}

impl VisionTower {
    pub fn new(cfg: &VisionConfig, vb: VarBuilder, lin: &LinearLoader) -> Result<Self> {
        let (h, t, p, c) = (
            cfg.hidden_size,
            cfg.temporal_patch_size,
            cfg.patch_size,
            cfg.in_channels,
        );
        // Conv3d weight (out, in, kt, kh, kw) flattened in (c, t, py, px) order = the pixel_values column order.
        let patch_w = vb
            .pp("patch_embed")
            .pp("proj")
            .get((h, c, t, p, p), "weight")?
            .reshape((h, cfg.patch_dim()))?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, vb.pp("blocks").pp(i), lin))
            .collect::<Result<Vec<_>>>()?;
        let unit = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let m = vb.pp("merger");
        Ok(Self {
            patch_w,
            blocks,
            ln_q: numerics::rms_norm(h, 1e-6, m.pp("ln_q"))?,
            mlp0: lin.load(h * unit, h * unit, true, m.pp("mlp").pp("0"))?,
            mlp2: lin.load(h * unit, cfg.out_hidden_size, true, m.pp("mlp").pp("2"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.patch_w.dtype()
    }

    /// `pixel_values`: `[gh·gw, patch_dim]` (any float dtype, any device); `grid_thw = [1, gh, gw]`.
    pub fn forward(&self, pixel_values: &Tensor, grid_thw: [usize; 3]) -> Result<Tensor> {
        Ok(self.forward_batch(&[pixel_values], grid_thw)?.remove(0))
    }

    /// Several images of the same `grid_thw` in one pass: the linear layers see all rows at once (one
    /// weight read per layer instead of one per image), attention stays within each image. Returns one
    /// `[gh·gw/4, out_hidden]` tensor per image.
    pub fn forward_batch(
        &self,
        pixel_values: &[&Tensor],
        grid_thw: [usize; 3],
    ) -> Result<Vec<Tensor>> {
        let cfg = &self.cfg;
        let [gt, gh, gw] = grid_thw;
        let merge = cfg.spatial_merge_size;
        let n = gt * gh * gw;
        let imgs = pixel_values.len();
        for pv in pixel_values {
            let (rows, cols) = pv.dims2()?;
            if gt != 1 || gh % merge != 0 || gw % merge != 0 || rows != n || cols != cfg.patch_dim()
            {
                candle_core::bail!(
                    "vision input: pixel_values {rows}x{cols} with grid_thw {grid_thw:?}; expected [gh*gw, {}] with t=1 and even gh, gw",
                    cfg.patch_dim()
                );
            }
        }
        let dev = self.patch_w.device().clone();
        let unit = merge * merge;
        let lay = t("layout", || self.layout(gh, gw, imgs, &dev))?;
        let widx = rope::window_index(gh, gw, merge, cfg.window_size / merge / cfg.patch_size);
        let perm: Vec<u32> = (0..imgs)
            .flat_map(|img| {
                widx.index
                    .iter()
                    .flat_map(move |&g| (0..unit).map(move |u| (img * n + g * unit + u) as u32))
            })
            .collect();
        let perm = Tensor::from_vec(perm, imgs * n, &dev)?;

        let xs = pixel_values
            .iter()
            .map(|pv| pv.to_device(&dev)?.to_dtype(self.dtype()))
            .collect::<Result<Vec<_>>>()?;
        let x = if imgs == 1 {
            xs[0].clone()
        } else {
            Tensor::cat(&xs, 0)?
        };
        // The patch embedding stays on candle's matmul in bf16 too: on the packed GEMM (another summation
        // order) the tiny detector's bf16 greedy answers agreed with f32 on 29/32 frames instead of 30/32.
        let mut x = t("patch embed", || x.matmul(&self.patch_w.t()?))?;
        x = t("permute", || x.index_select(&perm, 0))?;
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(&x, &lay, cfg.fullatt_block_indexes.contains(&i))?;
        }
        let m = n / unit;
        let x = t("merger norm", || self.ln_q.forward(&x))?
            .reshape((imgs * m, cfg.hidden_size * unit))?;
        let x0 = t("merger linear", || self.mlp0.forward(&x))?;
        let x0 = t("merger gelu", || x0.gelu_erf())?;
        let x = t("merger linear", || self.mlp2.forward(&x0))?;
        // reverse = argsort(window_index) (spec §2.2 step 8), per image.
        let mut rev = vec![0u32; imgs * m];
        for img in 0..imgs {
            for (i, &g) in widx.index.iter().enumerate() {
                rev[img * m + g] = (img * m + i) as u32;
            }
        }
        let x = x.index_select(&Tensor::from_vec(rev, imgs * m, &dev)?, 0)?;
        prof::dump();
        (0..imgs).map(|img| x.narrow(0, img * m, m)).collect()
    }

    fn layout(&self, gh: usize, gw: usize, images: usize, dev: &Device) -> Result<Layout> {
        let cfg = &self.cfg;
        let merge = cfg.spatial_merge_size;
        let unit = merge * merge;
        let half = cfg.head_dim() / 2;
        let widx = rope::window_index(gh, gw, merge, cfg.window_size / merge / cfg.patch_size);
        // RoPE angles in patch order, then permuted with the tokens (spec §2.2 step 3).
        let pos = rope::patch_positions(gh, gw, merge);
        let permuted: Vec<(usize, usize)> = widx
            .index
            .iter()
            .flat_map(|&g| (0..unit).map(move |u| g * unit + u))
            .map(|i| pos[i])
            .collect();
        let ang = Tensor::from_vec(
            rope::vision_angles(&permuted, cfg.head_dim()),
            (permuted.len(), half),
            dev,
        )?;
        let cu = &widx.cu_seqlens;
        let nw = cu.len() - 1;
        let wmax = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let n = gh * gw;
        let mut gather = Vec::with_capacity(images * nw * wmax);
        let mut valid = Vec::new();
        let mut mask = Vec::with_capacity(images * nw * wmax);
        // Image `img`'s windows follow those of the images before it; its rows start at img·n.
        for img in 0..images {
            for (wi, w) in cu.windows(2).enumerate() {
                for j in 0..wmax {
                    let real = w[0] + j < w[1];
                    gather.push((img * n + if real { w[0] + j } else { 0 }) as u32);
                    mask.push(if real { 0f32 } else { f32::NEG_INFINITY });
                    if real {
                        valid.push(((img * nw + wi) * wmax + j) as u32);
                    }
                }
            }
        }
        let padded = mask.iter().any(|m| m.is_infinite());
        let win_seqs = (0..images)
            .flat_map(|img| cu.windows(2).map(move |w| (img * n + w[0], img * n + w[1])))
            .collect();
        let full_seqs = (0..images).map(|img| (img * n, (img + 1) * n)).collect();
        let cos = ang.cos()?;
        let sin = ang.sin()?;
        Ok(Layout {
            images,
            n,
            cos_v: cos.flatten_all()?.to_vec1::<f32>()?,
            sin_v: sin.flatten_all()?.to_vec1::<f32>()?,
            win_seqs,
            full_seqs,
            cos,
            sin,
            gather: Tensor::from_vec(gather, images * nw * wmax, dev)?,
            valid: Tensor::from_vec(valid, images * n, dev)?,
            mask: if padded {
                Some(Tensor::from_vec(mask, (images * nw, 1, 1, wmax), dev)?)
            } else {
                None
            },
            n_windows: images * nw,
            wmax,
        })
    }
}
