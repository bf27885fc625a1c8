//! Temporal duplication and patch flattening (rex-omni-spec.md §1.6): the resized uint8 RGB image
//! (W'×H', packed) in, `pixel_values` [N = gh·gw, 1176] f32 row-major out, with normalisation fused in
//! through the lookup table of `normalize`.
//!
//! Rows come in 2×2 merge groups (four consecutive rows = one future LLM token); columns are
//! `((c * 2 + t) * 14 + py) * 14 + px` with both temporal copies identical.

use crate::normalize;

/// ViT patch side (spec §1.6).
pub const PATCH: usize = 14;
/// Spatial merge (2×2 patches → one token).
pub const MERGE: usize = 2;
/// Frames per temporal patch; a still image is repeated once.
pub const TEMPORAL: usize = 2;
/// Values per row of `pixel_values`: 3 · 2 · 14 · 14.
pub const ROW: usize = 3 * TEMPORAL * PATCH * PATCH;

/// `<|image_pad|>` copies in the prompt for a `grid_thw`: t·gh·gw / 4, one per 2×2 merge group
/// (spec §1.6).
pub fn num_image_tokens(grid_thw: [usize; 3]) -> usize {
    grid_thw.iter().product::<usize>() / (MERGE * MERGE)
}

/// Patchify a packed RGB image whose sides are multiples of 28.
///
/// # Panics
/// If the sides are not multiples of 28 or `rgb` is not `3·w·h` bytes (smart_resize guarantees both).
pub fn patchify(rgb: &[u8], w: usize, h: usize) -> Vec<f32> {
    assert!(
        w % (PATCH * MERGE) == 0 && h % (PATCH * MERGE) == 0,
        "{w}x{h} not 28-aligned"
    );
    assert_eq!(rgb.len(), w * h * 3);
    let lut = normalize::lut();
    let (gh, gw) = (h / PATCH, w / PATCH);
    let mut out = vec![0f32; gh * gw * ROW];
    let mut rows = out.chunks_exact_mut(ROW);
    for bh in 0..gh / MERGE {
        for bw in 0..gw / MERGE {
            for mh in 0..MERGE {
                for mw in 0..MERGE {
                    let row = rows.next().expect("gh*gw rows");
                    let (r, c) = (bh * MERGE + mh, bw * MERGE + mw);
                    for ch in 0..3 {
                        let table = &lut[ch * 256..ch * 256 + 256];
                        for py in 0..PATCH {
                            let src = &rgb[((r * PATCH + py) * w + c * PATCH) * 3..];
                            let dst0 = ((ch * TEMPORAL) * PATCH + py) * PATCH;
                            for px in 0..PATCH {
                                row[dst0 + px] = table[src[px * 3 + ch] as usize];
                            }
                            // t = 1 is the repeated frame.
                            let (t0, t1) = row.split_at_mut(dst0 + PATCH * PATCH);
                            t1[..PATCH].copy_from_slice(&t0[dst0..dst0 + PATCH]);
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index formula of spec §1.6, element by element.
    #[test]
    fn matches_spec_index_formula() {
        let (w, h) = (56usize, 84usize);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 131 % 256) as u8).collect();
        let pv = patchify(&rgb, w, h);
        let (gh, gw) = (h / 14, w / 14);
        assert_eq!(pv.len(), gh * gw * ROW);
        let lut = normalize::lut();
        for bh in 0..gh / 2 {
            for bw in 0..gw / 2 {
                for mh in 0..2 {
                    for mw in 0..2 {
                        let n = (bh * (gw / 2) + bw) * 4 + mh * 2 + mw;
                        let (r, c) = (2 * bh + mh, 2 * bw + mw);
                        for ch in 0..3 {
                            for tt in 0..2 {
                                for py in 0..14 {
                                    for px in 0..14 {
                                        let k = ((ch * 2 + tt) * 14 + py) * 14 + px;
                                        let (y, x) = (r * 14 + py, c * 14 + px);
                                        let v = rgb[(y * w + x) * 3 + ch];
                                        assert_eq!(pv[n * ROW + k], lut[ch * 256 + v as usize]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
