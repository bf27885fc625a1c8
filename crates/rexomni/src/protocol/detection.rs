//! Detection types: what the parsers produce and what the detections document carries.
//!
//! In: coordinate bins from the parsers and the ORIGINAL frame size. Out: `Detection`s that
//! serialize to design.md's detections entries:
//! `{"label": "person", "geometry": {"type": "box", "coords": [x0, y0, x1, y1], "norm": [..]}, "score": 0.93}`.
//! `coords` are pixels of the original frame (`bin / 999 * size`, rex-omni-spec.md §5.3), `norm` the
//! same in 0..1 (`bin / 999`); flat `[x, y, x, y, ...]` for every geometry type.

use serde::{Deserialize, Serialize};

use super::bins::{bin_to_norm, bin_to_pixel};

/// One named keypoint of a keypoints geometry. Points the model marks "unvisible" are kept, with
/// `visible: false` and no coordinates, so a consumer sees the full skeleton.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keypoint {
    /// Keypoint name from the prompt's list (rex-omni-spec.md §5.2), e.g. "left eye".
    pub name: String,
    /// Whether the model gave coordinates for it.
    pub visible: bool,
    /// `[x, y]` in pixels; absent when not visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coords: Option<[f64; 2]>,
    /// `[x, y]` in 0..1; absent when not visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm: Option<[f64; 2]>,
}

/// The shape of one detection. Serialized with a `type` tag: box | point | polygon | keypoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Geometry {
    /// `[x0, y0, x1, y1]`.
    Box { coords: [f64; 4], norm: [f64; 4] },
    /// `[x, y]`.
    Point { coords: [f64; 2], norm: [f64; 2] },
    /// `[x0, y0, x1, y1, x2, y2, ...]`, at least 3 points.
    Polygon { coords: Vec<f64>, norm: Vec<f64> },
    /// The instance box `[x0, y0, x1, y1]` in `coords`/`norm`, and its named points.
    Keypoints {
        coords: [f64; 4],
        norm: [f64; 4],
        points: Vec<Keypoint>,
    },
}

fn pixels(bins: &[u16], w: u32, h: u32) -> Vec<f64> {
    bins.iter()
        .enumerate()
        .map(|(i, &b)| bin_to_pixel(b, if i % 2 == 0 { w } else { h }))
        .collect()
}

fn norms(bins: &[u16]) -> Vec<f64> {
    bins.iter().map(|&b| bin_to_norm(b)).collect()
}

impl Geometry {
    /// A standard-grammar shape from its bins: 2 → point, 4 → box, an even count > 4 → polygon,
    /// anything else → `None` (dropped, as the official parser does; rex-omni-spec.md §5.4).
    pub fn from_bins(bins: &[u16], image_w: u32, image_h: u32) -> Option<Geometry> {
        match bins.len() {
            2 => Some(Geometry::Point {
                coords: [
                    bin_to_pixel(bins[0], image_w),
                    bin_to_pixel(bins[1], image_h),
                ],
                norm: [bin_to_norm(bins[0]), bin_to_norm(bins[1])],
            }),
            4 => Some(Geometry::Box {
                coords: box_pixels(bins, image_w, image_h),
                norm: [
                    bin_to_norm(bins[0]),
                    bin_to_norm(bins[1]),
                    bin_to_norm(bins[2]),
                    bin_to_norm(bins[3]),
                ],
            }),
            n if n > 4 && n % 2 == 0 => Some(Geometry::Polygon {
                coords: pixels(bins, image_w, image_h),
                norm: norms(bins),
            }),
            _ => None,
        }
    }

    /// The geometry's `type` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Geometry::Box { .. } => "box",
            Geometry::Point { .. } => "point",
            Geometry::Polygon { .. } => "polygon",
            Geometry::Keypoints { .. } => "keypoints",
        }
    }

    /// The pixel coordinates, flat.
    pub fn coords(&self) -> &[f64] {
        match self {
            Geometry::Box { coords, .. } | Geometry::Keypoints { coords, .. } => coords,
            Geometry::Point { coords, .. } => coords,
            Geometry::Polygon { coords, .. } => coords,
        }
    }
}

/// `[x0, y0, x1, y1]` bins → pixels. `bins` must hold 4 values.
pub(crate) fn box_pixels(bins: &[u16], w: u32, h: u32) -> [f64; 4] {
    [
        bin_to_pixel(bins[0], w),
        bin_to_pixel(bins[1], h),
        bin_to_pixel(bins[2], w),
        bin_to_pixel(bins[3], h),
    ]
}

/// One thing the model found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// The phrase the model answered with: the category or referring text; for OCR the recognised
    /// text; for keypoints the instance category (`person1` → `person`).
    pub label: String,
    /// Where, in pixels of the original frame and normalised.
    pub geometry: Geometry,
    /// Confidence in 0..1 from the token probabilities of the shape's coordinate tokens (see
    /// `parse::shape_score`); `null` when the output was parsed from text without log-probabilities.
    pub score: Option<f32>,
}

/// Everything parsed from one model answer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ParsedOutput {
    /// Detections in the order their shapes appear in the answer.
    pub detections: Vec<Detection>,
    /// The answer did not end with `<|im_end|>` (nor `<|endoftext|>`): cut by `max_new_tokens`. The
    /// detections are those complete so far (the official parser keeps a truncated last item too).
    pub truncated: bool,
    /// Distinct phrases the model answered, in first-appearance order, including those answered
    /// `None` (the official parser's dict keys; a `None` answer is a real "looked, found nothing").
    pub phrases: Vec<String>,
}
