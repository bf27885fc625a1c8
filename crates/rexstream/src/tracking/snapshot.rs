//! Snapshots: the frame an object looked best in, as a JPEG with its shape drawn.
//!
//! In: a decoded [`Frame`] (RGB, NV12 or I420, host memory) and the object's [`Geometry`] in
//! pixels of that frame. Out: JPEG bytes. Runs on the events thread, only when an object's best
//! frame improves (not per frame).

use image::{codecs::jpeg::JpegEncoder, Rgb, RgbImage};
use rexomni::protocol::Geometry;

use crate::ingest::frame::Frame;
use rexprep::PixelFormat;

/// JPEG quality: snapshots are for people to look at, not for re-detection.
const JPEG_QUALITY: u8 = 85;
/// Line colour of the drawn shape (Frigate draws per-label colours; one visible colour suffices).
const COLOUR: Rgb<u8> = Rgb([255, 48, 48]);

/// Packed RGB of a host frame; `None` if its planes are shorter than its size says.
pub fn to_rgb(frame: &Frame) -> Option<RgbImage> {
    let (w, h) = (frame.width as usize, frame.height as usize);
    let data = match frame.format {
        PixelFormat::Rgb => {
            let mut out = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                let start = frame.offsets[0] + y * frame.strides[0];
                out.extend_from_slice(frame.data.get(start..start + w * 3)?);
            }
            out
        }
        _ => {
            let p = frame.as_prep();
            p.check().ok()?;
            rexprep::yuv_to_rgb(&p)
        }
    };
    RgbImage::from_raw(frame.width, frame.height, data)
}

/// Draw `g` on `img` (2 px lines; points and keypoints as small squares).
pub fn draw(img: &mut RgbImage, g: &Geometry) {
    let seg = |img: &mut RgbImage, a: [f64; 2], b: [f64; 2]| line(img, a, b);
    match g {
        Geometry::Box { coords: c, .. } => rect(img, *c),
        Geometry::Keypoints {
            coords: c, points, ..
        } => {
            rect(img, *c);
            for p in points.iter().filter_map(|p| p.coords) {
                dot(img, p);
            }
        }
        Geometry::Point { coords, .. } => dot(img, *coords),
        Geometry::Polygon { coords, .. } => {
            let pts: Vec<[f64; 2]> = coords.chunks_exact(2).map(|p| [p[0], p[1]]).collect();
            for i in 0..pts.len() {
                seg(img, pts[i], pts[(i + 1) % pts.len()]);
            }
        }
    }
}

fn rect(img: &mut RgbImage, c: [f64; 4]) {
    let (a, b, cc, d) = ([c[0], c[1]], [c[2], c[1]], [c[2], c[3]], [c[0], c[3]]);
    line(img, a, b);
    line(img, b, cc);
    line(img, cc, d);
    line(img, d, a);
}

fn put(img: &mut RgbImage, x: i64, y: i64) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, COLOUR);
    }
}

fn dot(img: &mut RgbImage, p: [f64; 2]) {
    let (x, y) = (p[0].round() as i64, p[1].round() as i64);
    for dy in -3..=3 {
        for dx in -3..=3 {
            put(img, x + dx, y + dy);
        }
    }
}

/// A 2-px line by sampling (shapes are short; no need for Bresenham's exactness).
fn line(img: &mut RgbImage, a: [f64; 2], b: [f64; 2]) {
    let n = (b[0] - a[0])
        .abs()
        .max((b[1] - a[1]).abs())
        .ceil()
        .clamp(1.0, 1e5) as usize;
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t);
        let (x, y) = (x.round() as i64, y.round() as i64);
        put(img, x, y);
        put(img, x + 1, y);
        put(img, x, y + 1);
    }
}

/// The JPEG of `frame` with `g` drawn; `None` if the frame is unreadable or encoding fails.
pub fn jpeg(frame: &Frame, g: &Geometry) -> Option<Vec<u8>> {
    let mut img = to_rgb(frame)?;
    draw(&mut img, g);
    encode(&img)
}

pub fn encode(img: &RgbImage) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
        .encode_image(img)
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawn_box_survives_jpeg_round_trip() {
        let mut img = RgbImage::from_pixel(64, 48, Rgb([0, 0, 0]));
        draw(
            &mut img,
            &Geometry::Box {
                coords: [10.0, 10.0, 40.0, 30.0],
                norm: [0.0; 4],
            },
        );
        let bytes = encode(&img).unwrap();
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!((back.width(), back.height()), (64, 48));
        // On the edge: red; in the middle: black.
        let edge = back.get_pixel(25, 10);
        assert!(edge[0] > 150 && edge[1] < 120, "{edge:?}");
        let mid = back.get_pixel(25, 20);
        assert!(mid[0] < 60, "{mid:?}");
    }
}
