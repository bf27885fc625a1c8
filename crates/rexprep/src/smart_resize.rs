//! smart_resize: original (height, width) in, model input size (h', w') out, both multiples of 28
//! (rex-omni-spec.md §1.3, transcribed from transformers 4.51.3 `Qwen2VLImageProcessor`). Pure function,
//! runs on whichever thread prepares the frame.

use crate::PrepError;

/// Patch size 14 × spatial merge 2 (rex-omni-spec.md §1.3).
pub const FACTOR: u32 = 28;
/// `16*28*28`: Rex-Omni sets this on the processor, overriding preprocessor_config.json (spec §1.1).
pub const MIN_PIXELS: u64 = 12544;
/// `2560*28*28` (spec §1.1).
pub const MAX_PIXELS: u64 = 2007040;
/// smart_resize refuses more extreme aspect ratios (spec §1.3).
pub const MAX_RATIO: f64 = 200.0;

/// `(h', w')` for an image of `height` × `width`, exactly as the HF slow processor computes it with
/// Rex-Omni's bounds.
///
/// All arithmetic is f64 as in Python; `round` is Python's round-half-to-even, so 854/28 = 30.5 → 30
/// (width 840, not 868).
pub fn smart_resize(height: u32, width: u32) -> Result<(u32, u32), PrepError> {
    smart_resize_within(height, width, MAX_PIXELS)
}

/// Whether `max_pixels` can cap the model input: from [`MIN_PIXELS`] (one 112 × 112 image, 16 image tokens)
/// up to Rex-Omni's own [`MAX_PIXELS`] (2560 image tokens; the model was not trained above it). The error is
/// the sentence a config or command-line error shows after the field's name.
pub fn check_max_pixels(max_pixels: u64) -> Result<(), String> {
    if (MIN_PIXELS..=MAX_PIXELS).contains(&max_pixels) {
        Ok(())
    } else {
        Err(format!(
            "{max_pixels} is not in {MIN_PIXELS}..={MAX_PIXELS} (16·28·28 up to Rex-Omni's 2560·28·28 pixels)"
        ))
    }
}

/// [`smart_resize`] with the model input capped at `max_pixels` instead of [`MAX_PIXELS`]: the processor's
/// `max_pixels` argument (`RexOmniWrapper(max_pixels=…)` in the official wrapper), for when fewer image tokens
/// are worth less detail (vision and prefill cost grows with the pixel count). Callers keep `max_pixels` in
/// `MIN_PIXELS..=MAX_PIXELS`.
///
/// Where transformers would return a side of 0 (an aspect ratio near 200 under a small cap; it then fails in
/// the resize), this is an error naming the frame and the cap.
pub fn smart_resize_within(
    height: u32,
    width: u32,
    max_pixels: u64,
) -> Result<(u32, u32), PrepError> {
    if height < FACTOR || width < FACTOR {
        return Err(PrepError::TooSmall {
            width,
            height,
            factor: FACTOR,
        });
    }
    let (h, w) = (height as f64, width as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_RATIO {
        return Err(PrepError::AspectRatio {
            width,
            height,
            ratio,
        });
    }
    let f = FACTOR as f64;
    let mut h_bar = (h / f).round_ties_even() as u64 * FACTOR as u64;
    let mut w_bar = (w / f).round_ties_even() as u64 * FACTOR as u64;
    if h_bar * w_bar > max_pixels {
        // Divide by beta, THEN by 28: the order matters for the last bit (spec §1.3).
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = (h / beta / f).floor() as u64 * FACTOR as u64;
        w_bar = (w / beta / f).floor() as u64 * FACTOR as u64;
    } else if h_bar * w_bar < MIN_PIXELS {
        let beta = (MIN_PIXELS as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() as u64 * FACTOR as u64;
        w_bar = (w * beta / f).ceil() as u64 * FACTOR as u64;
    }
    if h_bar == 0 || w_bar == 0 {
        return Err(PrepError::MaxPixelsTooSmall {
            width,
            height,
            max_pixels,
        });
    }
    Ok((h_bar as u32, w_bar as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked examples of rex-omni-spec.md §1.3 (W×H in → W'×H' out).
    #[test]
    fn spec_table() {
        type WxH = (u32, u32);
        let table: &[(WxH, WxH)] = &[
            ((640, 480), (644, 476)),
            ((800, 600), (812, 588)),
            ((1280, 720), (1288, 728)),
            ((1440, 810), (1428, 812)),
            ((1920, 1080), (1876, 1036)),
            ((2048, 1536), (1624, 1204)),
            ((4000, 3000), (1624, 1204)),
            ((1024, 1024), (1036, 1036)),
            ((854, 480), (840, 476)),
            ((500, 375), (504, 364)),
            ((70, 42), (168, 112)),
            ((100, 100), (112, 112)),
        ];
        for &((w, h), (w2, h2)) in table {
            assert_eq!(smart_resize(h, w).unwrap(), (h2, w2), "input {w}x{h}");
        }
    }

    /// Smaller caps, against transformers 4.51.3's own `smart_resize(h, w, factor=28, min_pixels=12544,
    /// max_pixels=cap)` (values printed by it, W×H in → W'×H' out).
    #[test]
    fn a_smaller_cap_follows_transformers() {
        type WxH = (u32, u32);
        let table: &[(WxH, u64, WxH)] = &[
            ((640, 480), 200_704, (504, 364)),
            ((640, 480), 50_176, (252, 168)),
            ((1920, 1080), 401_408, (840, 448)),
            ((1280, 720), 100_352, (420, 224)),
            ((854, 480), 200_704, (588, 308)),
            ((100, 3000), 50_176, (28, 1204)),
        ];
        for &((w, h), cap, (w2, h2)) in table {
            assert_eq!(
                smart_resize_within(h, w, cap).unwrap(),
                (h2, w2),
                "input {w}x{h}, max_pixels {cap}"
            );
        }
        // The default cap is Rex-Omni's.
        assert_eq!(
            smart_resize_within(480, 640, MAX_PIXELS).unwrap(),
            smart_resize(480, 640).unwrap()
        );
    }

    #[test]
    fn caps_outside_the_models_range_are_refused_with_the_value() {
        assert!(check_max_pixels(MIN_PIXELS).is_ok() && check_max_pixels(MAX_PIXELS).is_ok());
        assert!(check_max_pixels(200_704).is_ok());
        let e = check_max_pixels(5000).unwrap_err();
        assert!(e.contains("5000") && e.contains("12544..=2007040"), "{e}");
        assert!(check_max_pixels(MAX_PIXELS + 1).is_err());
    }

    #[test]
    fn a_cap_that_leaves_no_row_is_an_error_naming_it() {
        // Ratio 150 under the smallest cap: 28 px × 150 would need 117 600 px; the short side floors to 0.
        let e = smart_resize_within(28, 4200, MIN_PIXELS).unwrap_err();
        assert!(
            matches!(
                e,
                PrepError::MaxPixelsTooSmall {
                    width: 4200,
                    height: 28,
                    max_pixels: MIN_PIXELS
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("12544"), "{e}");
    }

    /// 854/28 = 30.5 exactly: half-to-even gives 30 (840); half-up would give 868.
    #[test]
    fn ties_round_to_even() {
        assert_eq!(smart_resize(480, 854).unwrap().1, 840);
        // 42/28 = 1.5 → 2 (even), 70/28 = 2.5 → 2 (even): both ties, then the min_pixels branch.
        assert_eq!(smart_resize(42, 70).unwrap(), (112, 168));
        // 98/28 = 3.5 → 4 (even) on a size that stays in the plain branch.
        assert_eq!(smart_resize(98, 1000).unwrap(), (112, 1008));
    }

    #[test]
    fn too_small_names_both_sides() {
        let e = smart_resize(27, 640).unwrap_err();
        assert!(
            matches!(
                e,
                PrepError::TooSmall {
                    width: 640,
                    height: 27,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("27") && msg.contains("640") && msg.contains("28"),
            "{msg}"
        );
        assert!(smart_resize(28, 28).is_ok());
    }

    #[test]
    fn ratio_over_200_fails_with_the_ratio() {
        assert!(
            smart_resize(28, 5600).is_ok(),
            "ratio exactly 200 is allowed"
        );
        let e = smart_resize(28, 5601).unwrap_err();
        match &e {
            PrepError::AspectRatio {
                width: 5601,
                height: 28,
                ratio,
            } => assert!(*ratio > 200.0),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("200.03"), "{e}");
    }

    #[test]
    fn outputs_are_28_aligned_and_bounded() {
        for h in (28..3000).step_by(97) {
            for w in (28..3000).step_by(89) {
                let Ok((h2, w2)) = smart_resize(h, w) else {
                    continue;
                };
                assert_eq!(h2 % 28, 0);
                assert_eq!(w2 % 28, 0);
                let px = h2 as u64 * w2 as u64;
                assert!(
                    (MIN_PIXELS..=MAX_PIXELS).contains(&px),
                    "{w}x{h} -> {w2}x{h2}"
                );
            }
        }
    }
}
