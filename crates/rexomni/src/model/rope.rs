//! Position bookkeeping, all on the host in plain integers / f32: the vision 2-D RoPE table, the window index
//! (spec §2.2-2.3), the text M-RoPE position ids with the rope delta (spec §3.4) and their cos/sin tables
//! (spec §3.3).
//!
//! In: grid sizes, prompt ids, positions. Out: `Vec`s and small f32 tensors handed to `vision` / `text`.
//! Called from the thread that runs the model; no device work except the final upload.

use candle_core::{Device, Result, Tensor};

/// `inv_freq[j] = 1 / theta^(2j/dim)`, computed in f32 like HF (`theta ** (arange(0, dim, 2).float() / dim)`).
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|j| 1.0f32 / (theta as f32).powf((2 * j) as f32 / dim as f32))
        .collect()
}

/// Row and column of each `pixel_values` row, in the merge-group order of spec §1.6.
pub fn patch_positions(gh: usize, gw: usize, merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(gh * gw);
    for bh in 0..gh / merge {
        for bw in 0..gw / merge {
            for mh in 0..merge {
                for mw in 0..merge {
                    out.push((bh * merge + mh, bw * merge + mw));
                }
            }
        }
    }
    out
}

/// Vision rotary angles: row `n` is `concat(r·inv_freq, c·inv_freq)`, width `head_dim / 2` (spec §2.2 step 2).
/// Returned flat `[n_patches * head_dim/2]` in the given patch order.
pub fn vision_angles(positions: &[(usize, usize)], head_dim: usize) -> Vec<f32> {
    let inv = inv_freq(head_dim / 2, 10000.0);
    let mut out = Vec::with_capacity(positions.len() * head_dim / 2);
    for &(r, c) in positions {
        out.extend(inv.iter().map(|f| r as f32 * f));
        out.extend(inv.iter().map(|f| c as f32 * f));
    }
    out
}

/// Result of HF `get_window_index` for one image (spec §2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowIndex {
    /// Merged-token order: position `i` of the permuted sequence holds merged token `index[i]`.
    pub index: Vec<usize>,
    /// Window boundaries in patches, zero-length windows dropped (`unique_consecutive`).
    pub cu_seqlens: Vec<usize>,
}

/// `vws = window_size / merge / patch` merged tokens per window side. Note `pad = vws - l % vws` pads a whole
/// empty window when `l % vws == 0`; those windows have length 0 and vanish from `cu_seqlens`, as in HF.
pub fn window_index(gh: usize, gw: usize, merge: usize, vws: usize) -> WindowIndex {
    let (lh, lw) = (gh / merge, gw / merge);
    let unit = merge * merge;
    let (ph, pw) = (lh + vws - lh % vws, lw + vws - lw % vws);
    let mut index = Vec::with_capacity(lh * lw);
    let mut cu = vec![0usize];
    for wy in 0..ph / vws {
        for wx in 0..pw / vws {
            let mut n = 0;
            for iy in 0..vws {
                for ix in 0..vws {
                    let (y, x) = (wy * vws + iy, wx * vws + ix);
                    if y < lh && x < lw {
                        index.push(y * lw + x);
                        n += 1;
                    }
                }
            }
            let last = *cu.last().unwrap_or(&0);
            if n > 0 {
                cu.push(last + n * unit);
            }
        }
    }
    WindowIndex {
        index,
        cu_seqlens: cu,
    }
}

/// M-RoPE position ids (t, h, w) for one prompt holding at most one image whose `<|image_pad|>` run has
/// `lh·lw` tokens (HF `get_rope_index`, spec §3.4). Returns `(positions[3][L], rope_delta)`.
pub fn mrope_positions(
    ids: &[u32],
    image_token_id: u32,
    lh: usize,
    lw: usize,
) -> (Vec<[u32; 3]>, i64) {
    let mut pos = Vec::with_capacity(ids.len());
    let mut next: u32 = 0; // max position so far + 1
    let mut i = 0;
    while i < ids.len() {
        if ids[i] == image_token_id {
            let s = next;
            let n = ids[i..]
                .iter()
                .take_while(|&&t| t == image_token_id)
                .count();
            for k in 0..n {
                let (r, c) = ((k / lw.max(1)) as u32, (k % lw.max(1)) as u32);
                pos.push([s, s + r, s + c]);
            }
            next = s + lh.max(lw) as u32;
            i += n;
        } else {
            pos.push([next; 3]);
            next += 1;
            i += 1;
        }
    }
    let delta = next as i64 - ids.len() as i64;
    (pos, delta)
}

/// cos/sin half tables `[L, head_dim/2]` for sectioned M-RoPE: half-dimension `j` takes its angle from
/// component t, h or w by `mrope_section` (spec §3.3), angles and cos/sin in f32.
pub fn mrope_cos_sin(
    positions: &[[u32; 3]],
    head_dim: usize,
    theta: f64,
    section: [usize; 3],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv = inv_freq(head_dim, theta);
    let comp: Vec<usize> = (0..head_dim / 2)
        .map(|j| {
            if j < section[0] {
                0
            } else if j < section[0] + section[1] {
                1
            } else {
                2
            }
        })
        .collect();
    let mut cos = Vec::with_capacity(positions.len() * inv.len());
    let mut sin = Vec::with_capacity(positions.len() * inv.len());
    for p in positions {
        for (j, f) in inv.iter().enumerate() {
            let a = p[comp[j]] as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let shape = (positions.len(), inv.len());
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_index_matches_spec_example() {
        // spec §2.3: grid (1,12,20)
        let w = window_index(12, 20, 2, 4);
        assert_eq!(
            &w.index[..16],
            &[0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33]
        );
        assert_eq!(&w.index[32..40], &[8, 9, 18, 19, 28, 29, 38, 39]);
        assert_eq!(&w.index[w.index.len() - 4..], &[48, 49, 58, 59]);
        assert_eq!(w.cu_seqlens, vec![0, 64, 128, 160, 192, 224, 240]);
        assert_eq!(
            window_index(16, 16, 2, 4).cu_seqlens,
            vec![0, 64, 128, 192, 256]
        );
    }

    #[test]
    fn mrope_positions_match_spec_example() {
        // spec §3.4: s=14, lh=2, lw=3, m=4
        let mut ids = vec![1u32; 14];
        ids.extend([151655; 6]);
        ids.extend([2u32; 4]);
        let (p, d) = mrope_positions(&ids, 151655, 2, 3);
        assert_eq!(
            &p[14..20],
            &[
                [14, 14, 14],
                [14, 14, 15],
                [14, 14, 16],
                [14, 15, 14],
                [14, 15, 15],
                [14, 15, 16]
            ]
        );
        assert_eq!(&p[20..], &[[17; 3], [18; 3], [19; 3], [20; 3]]);
        assert_eq!(d, -3);
    }
}
