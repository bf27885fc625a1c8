//! Pillow 10.4.0 `Image.resize(size, BICUBIC)` on 8-bit RGB, bit for bit (rex-omni-spec.md §1.4, a port of
//! the algorithm in Pillow's `libImaging/Resample.c`, written from the spec).
//!
//! In: packed RGB rows (any stride) and the target size. Out: a tightly packed RGB `Vec<u8>`.
//! Filter taps depend only on (input length, output length), so they are computed once per pair and kept
//! in a small process-wide cache ([`Coeffs::cached`]); the per-frame work is integer multiply-adds.
//! Runs on the thread that prepares the frame (the detector worker).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Pillow's `PRECISION_BITS` = 32 − 8 − 2: weights are fixed point with 22 fractional bits.
const PRECISION_BITS: u32 = 22;
/// Keys cubic a = −0.5, support 2 (Pillow's `bicubic_filter`).
const SUPPORT: f64 = 2.0;
/// Distinct (in, out) pairs kept; a deployment has a handful of stream sizes, so this never churns.
const CACHE_ENTRIES: usize = 32;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// (in_len, out_len) → taps.
type CoeffCache = HashMap<(u32, u32), Arc<Coeffs>>;

/// Fixed-point taps for one axis: output index `i` reads inputs `start[i] .. start[i] + count[i]`
/// with weights `weights[i * ksize ..][.. count[i]]`.
#[derive(Debug)]
pub struct Coeffs {
    pub in_len: u32,
    pub out_len: u32,
    pub ksize: usize,
    pub start: Vec<u32>,
    pub count: Vec<u32>,
    pub weights: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
    pub fn new(in_len: u32, out_len: u32) -> Coeffs {
        // Pillow computes `(double)(in1 - in0) / outSize` with float box corners; exact for our sizes.
        let scale = in_len as f64 / out_len as f64;
        // Antialiasing: when shrinking, stretch the kernel by the scale.
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale; // Pillow multiplies by 1/filterscale; dividing can differ in the last bit.
        let n = out_len as usize;
        let mut start = Vec::with_capacity(n);
        let mut count = Vec::with_capacity(n);
        let mut weights = vec![0i32; n * ksize];
        let mut k = vec![0f64; ksize];
        for xx in 0..n {
            let center = (xx as f64 + 0.5) * scale;
            // `(int)` truncates toward zero, then clamp (Pillow rounds with +0.5 before truncating).
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_len as i64);
            let taps = (xmax - xmin).max(0) as usize;
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(taps) {
                let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            let row = &mut weights[xx * ksize..(xx + 1) * ksize];
            for x in 0..taps {
                let w = if ww != 0.0 { k[x] / ww } else { k[x] };
                // Round half away from zero, as `(int)(±0.5 + w * (1 << 22))`.
                let f = w * (1u32 << PRECISION_BITS) as f64;
                row[x] = if w < 0.0 {
                    (f - 0.5) as i32
                } else {
                    (f + 0.5) as i32
                };
            }
            start.push(xmin as u32);
            count.push(taps as u32);
        }
        Coeffs {
            in_len,
            out_len,
            ksize,
            start,
            count,
            weights,
        }
    }

    /// Shared taps for (in_len, out_len), computed on first use.
    pub fn cached(in_len: u32, out_len: u32) -> Arc<Coeffs> {
        static CACHE: OnceLock<Mutex<CoeffCache>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        // A poisoned lock only means another thread panicked while inserting; the map is still valid.
        let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&(in_len, out_len)) {
            return c.clone();
        }
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
        let c = Arc::new(Coeffs::new(in_len, out_len));
        map.insert((in_len, out_len), c.clone());
        c
    }

    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let n = self.count[i] as usize;
        (
            self.start[i] as usize,
            &self.weights[i * self.ksize..i * self.ksize + n],
        )
    }
}

/// Pillow's `clip8`: arithmetic shift, then clamp to 0..=255.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding bias `1 << (PRECISION_BITS - 1)` that every accumulator starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resize packed RGB (`src_stride` bytes per row) from `src_w`×`src_h` to `dst_w`×`dst_h` like Pillow 10.4:
/// horizontal pass first (only over the source rows the vertical pass reads, into an 8-bit clamped
/// intermediate), then the vertical pass. An axis whose length does not change is not filtered; if neither
/// changes the pixels are copied (Pillow returns a copy).
///
/// # Panics
/// If `src` is shorter than `src_stride * (src_h - 1) + 3 * src_w` (callers validate frames first).
pub fn resize_rgb(
    src: &[u8],
    src_w: u32,
    src_h: u32,
    src_stride: usize,
    dst_w: u32,
    dst_h: u32,
) -> Vec<u8> {
    let (sw, sh, dw, dh) = (
        src_w as usize,
        src_h as usize,
        dst_w as usize,
        dst_h as usize,
    );
    let plan = ResizePlan::new(src_w, src_h, dst_w, dst_h);
    match (&plan.horizontal, &plan.vertical) {
        (None, None) => {
            let mut out = Vec::with_capacity(sw * sh * 3);
            for y in 0..sh {
                out.extend_from_slice(&src[y * src_stride..y * src_stride + sw * 3]);
            }
            out
        }
        // Horizontal only: straight into the output.
        (Some(horiz), None) => {
            let mut out = vec![0u8; dw * 3 * sh];
            horizontal(src, src_stride, plan.rows, horiz, &mut out);
            out
        }
        (Some(horiz), Some(vert)) => {
            let mut tmp = vec![0u8; dw * 3 * plan.rows.len()];
            horizontal(src, src_stride, plan.rows.clone(), horiz, &mut tmp);
            let mut out = vec![0u8; dw * 3 * dh];
            vertical(&tmp, dw * 3, plan.rows.start, vert, &mut out, dw * 3);
            out
        }
        (None, Some(vert)) => {
            let mut out = vec![0u8; sw * 3 * dh];
            vertical(src, src_stride, 0, vert, &mut out, sw * 3);
            out
        }
    }
}

/// Which passes a resize runs, and the source rows the vertical pass reads (Pillow's `ybox_first ..
/// ybox_last`), which are the only rows the horizontal pass produces. One plan for the CPU path and the
/// CUDA launches, so both read the same rows.
pub struct ResizePlan {
    /// Taps of the horizontal pass; `None` when the width does not change.
    pub horizontal: Option<Arc<Coeffs>>,
    /// Taps of the vertical pass; `None` when the height does not change.
    pub vertical: Option<Arc<Coeffs>>,
    /// Source rows the horizontal pass produces (all rows without a vertical pass).
    pub rows: std::ops::Range<usize>,
}

impl ResizePlan {
    pub fn new(src_w: u32, src_h: u32, dst_w: u32, dst_h: u32) -> ResizePlan {
        let vertical = (dst_h != src_h).then(|| Coeffs::cached(src_h, dst_h));
        let rows = match &vertical {
            Some(v) => {
                let last = dst_h as usize - 1;
                v.start[0] as usize..(v.start[last] + v.count[last]) as usize
            }
            None => 0..src_h as usize,
        };
        ResizePlan {
            horizontal: (dst_w != src_w).then(|| Coeffs::cached(src_w, dst_w)),
            vertical,
            rows,
        }
    }
}

/// Horizontal pass over source rows `rows`, writing them densely into `out` (row `rows.start` first).
fn horizontal(src: &[u8], stride: usize, rows: std::ops::Range<usize>, c: &Coeffs, out: &mut [u8]) {
    let dw = c.out_len as usize;
    for (oy, y) in rows.enumerate() {
        let line = &src[y * stride..];
        let orow = &mut out[oy * dw * 3..(oy + 1) * dw * 3];
        for (xx, px) in orow.chunks_exact_mut(3).enumerate() {
            let (x0, k) = c.taps(xx);
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            // One slice for all taps: no per-tap bounds checks in the hot loop.
            let src_px = &line[x0 * 3..(x0 + k.len()) * 3];
            for (p, &w) in src_px.chunks_exact(3).zip(k) {
                r += p[0] as i32 * w;
                g += p[1] as i32 * w;
                b += p[2] as i32 * w;
            }
            px[0] = clip8(r);
            px[1] = clip8(g);
            px[2] = clip8(b);
        }
    }
}

/// Vertical pass. `src` row 0 is source row `row0` (the intermediate only holds the rows needed).
fn vertical(src: &[u8], stride: usize, row0: usize, c: &Coeffs, out: &mut [u8], row_bytes: usize) {
    let mut acc = vec![0i32; row_bytes];
    for (yy, orow) in out.chunks_exact_mut(row_bytes).enumerate() {
        let (y0, k) = c.taps(yy);
        acc.fill(HALF);
        for (i, &w) in k.iter().enumerate() {
            let line = &src[(y0 + i - row0) * stride..(y0 + i - row0) * stride + row_bytes];
            // Row-at-a-time multiply-add: the compiler vectorises this loop.
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for &(i, o) in &[
            (640u32, 644u32),
            (480, 476),
            (1920, 1876),
            (42, 112),
            (5, 3),
        ] {
            let c = Coeffs::new(i, o);
            for xx in 0..o as usize {
                let s: i64 = c.taps(xx).1.iter().map(|&w| w as i64).sum();
                assert!(
                    (s - (1 << 22)).abs() <= c.count[xx] as i64,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    #[test]
    fn unchanged_size_is_a_copy_and_constant_stays_constant() {
        let src: Vec<u8> = (0..4 * 3 * 3).map(|i| i as u8).collect();
        assert_eq!(resize_rgb(&src, 4, 3, 12, 4, 3), src);
        let flat = vec![77u8; 50 * 30 * 3];
        assert!(resize_rgb(&flat, 50, 30, 150, 112, 84)
            .iter()
            .all(|&v| v == 77));
        assert!(resize_rgb(&flat, 50, 30, 150, 28, 28)
            .iter()
            .all(|&v| v == 77));
    }

    #[test]
    fn stride_padding_is_ignored() {
        let (w, h) = (5usize, 4usize);
        let tight: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        let mut padded = vec![0xAAu8; 16 * h];
        for y in 0..h {
            padded[y * 16..y * 16 + w * 3].copy_from_slice(&tight[y * w * 3..(y + 1) * w * 3]);
        }
        assert_eq!(
            resize_rgb(&tight, 5, 4, 15, 7, 3),
            resize_rgb(&padded, 5, 4, 16, 7, 3)
        );
    }
}
