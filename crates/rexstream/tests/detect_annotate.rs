//! `rexstream detect --annotate`'s drawing (issue 17 item 13): known detections drawn on a flat image,
//! the PNG written, decoded again and checked pixel by pixel. The end-to-end run of the command on a
//! checkpoint is tests/e2e/detect_cli.rs; this test exists because the tiny random fixture checkpoints
//! answer without coordinate tokens, so that run has nothing to draw.
//!
//! In: synthetic detections (a box, a point, a polygon; two labels). Out: pass/fail. Test thread only;
//! writes one PNG under the system temp folder.

use rexomni::protocol::{Detection, Geometry};
use rexstream::detect::{annotate, PALETTE};

const GREY: [u8; 3] = [128, 128, 128];

fn det(label: &str, geometry: Geometry) -> Detection {
    Detection {
        label: label.into(),
        geometry,
        score: None,
    }
}

#[test]
fn annotate_draws_each_detection_in_its_label_colour_and_nothing_else() {
    let (w, h) = (64u32, 48u32);
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(GREY));
    let dets = vec![
        det(
            "cat",
            Geometry::Box {
                coords: [10.0, 8.0, 40.0, 30.0],
                norm: [0.0; 4],
            },
        ),
        det(
            "cup",
            Geometry::Point {
                coords: [52.0, 20.0],
                norm: [0.0; 2],
            },
        ),
        det(
            "cat",
            Geometry::Polygon {
                coords: vec![5.0, 40.0, 20.0, 40.0, 12.0, 46.0],
                norm: vec![0.0; 6],
            },
        ),
    ];
    let path = std::env::temp_dir().join(format!("rexstream-annotate-{}.png", std::process::id()));
    annotate(img, &dets, &path).unwrap();
    let out = image::open(&path).expect("a decodable PNG").to_rgb8();
    std::fs::remove_file(&path).ok();
    assert_eq!(out.dimensions(), (w, h));
    let at = |x: u32, y: u32| out.get_pixel(x, y).0;
    let (cat, cup) = (PALETTE[0], PALETTE[1]);
    // The box outline: corners and edge midpoints, in the first label's colour.
    for (x, y) in [
        (10, 8),
        (40, 8),
        (40, 30),
        (10, 30),
        (25, 8),
        (40, 19),
        (25, 30),
        (10, 19),
    ] {
        assert_eq!(at(x, y), cat, "box outline at ({x}, {y})");
    }
    // Inside and outside the box: untouched.
    for (x, y) in [(25, 19), (14, 12), (36, 26), (2, 2), (62, 2), (45, 45)] {
        assert_eq!(at(x, y), GREY, "({x}, {y}) should be untouched");
    }
    // The point: a cross in the second label's colour.
    for (x, y) in [(52, 20), (48, 20), (56, 20), (52, 16), (52, 24)] {
        assert_eq!(at(x, y), cup, "point cross at ({x}, {y})");
    }
    // The polygon shares the first label, hence its colour.
    for (x, y) in [(5, 40), (20, 40), (12, 46), (12, 40)] {
        assert_eq!(at(x, y), cat, "polygon at ({x}, {y})");
    }
    // Every changed pixel is one of the two label colours.
    let changed: Vec<[u8; 3]> = out.pixels().map(|p| p.0).filter(|p| *p != GREY).collect();
    assert!(changed.len() > 100, "only {} pixels drawn", changed.len());
    assert!(
        changed.iter().all(|p| *p == cat || *p == cup),
        "a drawn pixel has a colour outside the labels' palette entries"
    );
}
