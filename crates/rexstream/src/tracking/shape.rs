//! Plane geometry the tracker and the zones need: bounding boxes of every detection shape, IoU,
//! centres, the bottom-centre reference point and a point-in-polygon test.
//!
//! In: [`Geometry`] values in pixels of the original frame. Out: plain numbers. Pure functions,
//! called on the events thread.

use rexomni::protocol::Geometry;

/// `[x0, y0, x1, y1]` in pixels, `x0 <= x1`, `y0 <= y1`.
pub type BBox = [f64; 4];

/// How a shape is associated from frame to frame (issue 13 item 1): boxes and polygons by their
/// bounding box (IoU and centre distance), points and keypoint skeletons by distance only (a point
/// has no area, and a skeleton's box jumps when a limb appears or disappears).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchBy {
    Overlap,
    Distance,
}

/// The axis-aligned bounding box of a shape. A point is a zero-size box; a polygon its extent; a
/// keypoint skeleton the instance box the model gave.
pub fn bbox(g: &Geometry) -> BBox {
    match g {
        Geometry::Box { coords, .. } | Geometry::Keypoints { coords, .. } => ordered(*coords),
        Geometry::Point { coords, .. } => [coords[0], coords[1], coords[0], coords[1]],
        Geometry::Polygon { coords, .. } => {
            let mut b = [
                f64::INFINITY,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::NEG_INFINITY,
            ];
            for p in coords.chunks_exact(2) {
                b[0] = b[0].min(p[0]);
                b[1] = b[1].min(p[1]);
                b[2] = b[2].max(p[0]);
                b[3] = b[3].max(p[1]);
            }
            if b[0].is_finite() {
                b
            } else {
                [0.0; 4]
            }
        }
    }
}

/// Matching rule for a shape (see [`MatchBy`]).
pub fn match_by(g: &Geometry) -> MatchBy {
    match g {
        Geometry::Box { .. } | Geometry::Polygon { .. } => MatchBy::Overlap,
        Geometry::Point { .. } | Geometry::Keypoints { .. } => MatchBy::Distance,
    }
}

fn ordered(b: [f64; 4]) -> BBox {
    [
        b[0].min(b[2]),
        b[1].min(b[3]),
        b[0].max(b[2]),
        b[1].max(b[3]),
    ]
}

pub fn centre(b: &BBox) -> [f64; 2] {
    [(b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0]
}

pub fn area(b: &BBox) -> f64 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

/// Intersection over union; 0 when either box has no area.
pub fn iou(a: &BBox, b: &BBox) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// A box moved so its centre is at `c`, same size.
pub fn moved_to(b: &BBox, c: [f64; 2]) -> BBox {
    let (hw, hh) = ((b[2] - b[0]) / 2.0, (b[3] - b[1]) / 2.0);
    [c[0] - hw, c[1] - hh, c[0] + hw, c[1] + hh]
}

pub fn distance(a: [f64; 2], b: [f64; 2]) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

/// Where an object stands, in 0..1 of the frame: the bottom centre of its box (Frigate's zone rule:
/// feet, wheels), or the point itself for a point.
pub fn reference_point(g: &Geometry, width: u32, height: u32) -> [f64; 2] {
    let b = bbox(g);
    let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    [((b[0] + b[2]) / 2.0) / w, b[3] / h]
}

/// Even-odd point-in-polygon test with the boundary counted as inside (like OpenCV's
/// `pointPolygonTest(..) >= 0`, which Frigate uses): a box resting on a zone's edge is in it.
pub fn in_polygon(p: [f64; 2], poly: &[[f64; 2]]) -> bool {
    const EPS: f64 = 1e-9;
    let n = poly.len();
    if n < 3 {
        return false;
    }
    let mut inside = false;
    for i in 0..n {
        let a = poly[i];
        let b = poly[(i + 1) % n];
        // On the segment a-b?
        let cross = (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]);
        if cross.abs() <= EPS
            && p[0] >= a[0].min(b[0]) - EPS
            && p[0] <= a[0].max(b[0]) + EPS
            && p[1] >= a[1].min(b[1]) - EPS
            && p[1] <= a[1].max(b[1]) + EPS
        {
            return true;
        }
        if (a[1] > p[1]) != (b[1] > p[1]) {
            let x = a[0] + (p[1] - a[1]) * (b[0] - a[0]) / (b[1] - a[1]);
            if p[0] < x {
                inside = !inside;
            }
        }
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(c: [f64; 4]) -> Geometry {
        Geometry::Box {
            coords: c,
            norm: [0.0; 4],
        }
    }

    #[test]
    fn iou_of_known_boxes() {
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 10.0, 10.0]), 1.0);
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[10.0, 0.0, 20.0, 10.0]), 0.0);
        // Half overlap: 50 / 150.
        let v = iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]);
        assert!((v - 1.0 / 3.0).abs() < 1e-12, "{v}");
        assert_eq!(iou(&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0]), 0.0);
    }

    #[test]
    fn polygon_and_point_bounding_boxes() {
        let p = Geometry::Polygon {
            coords: vec![10.0, 20.0, 30.0, 5.0, 25.0, 40.0],
            norm: vec![],
        };
        assert_eq!(bbox(&p), [10.0, 5.0, 30.0, 40.0]);
        assert_eq!(match_by(&p), MatchBy::Overlap);
        let pt = Geometry::Point {
            coords: [3.0, 4.0],
            norm: [0.0; 2],
        };
        assert_eq!(bbox(&pt), [3.0, 4.0, 3.0, 4.0]);
        assert_eq!(match_by(&pt), MatchBy::Distance);
        // Reversed corners are ordered.
        assert_eq!(bbox(&boxed([10.0, 10.0, 0.0, 0.0])), [0.0, 0.0, 10.0, 10.0]);
    }

    #[test]
    fn bottom_centre_decides_zone_membership() {
        // A tall box whose top is in the upper half but whose feet are in the lower half.
        let g = boxed([40.0, 10.0, 60.0, 90.0]);
        let p = reference_point(&g, 100, 100);
        assert_eq!(p, [0.5, 0.9]);
        let lower = [[0.0, 0.5], [1.0, 0.5], [1.0, 1.0], [0.0, 1.0]];
        let upper = [[0.0, 0.0], [1.0, 0.0], [1.0, 0.5], [0.0, 0.5]];
        assert!(in_polygon(p, &lower));
        assert!(!in_polygon(p, &upper));
        // On the edge counts as inside; both sides of a shared edge contain it.
        assert!(in_polygon([0.5, 0.5], &lower));
        assert!(in_polygon([0.5, 0.5], &upper));
        // Concave polygon (an L): the notch is outside.
        let l = [
            [0.0, 0.0],
            [1.0, 0.0],
            [1.0, 0.4],
            [0.4, 0.4],
            [0.4, 1.0],
            [0.0, 1.0],
        ];
        assert!(in_polygon([0.2, 0.8], &l));
        assert!(!in_polygon([0.8, 0.8], &l));
    }
}
