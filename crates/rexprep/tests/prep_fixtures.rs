//! Golden tests against tests/fixtures/prep (made by tests/reference/gen_prep_fixtures.py with Pillow 10.4.0,
//! transformers 4.51.3's slow Qwen2VLImageProcessor and GStreamer 1.22 videoconvert). No Python here: the
//! fixtures are committed.

mod common;

use std::path::Path;

use common::{dir, manifest, png_rgb, yuv_data, yuv_frame};
use rexprep::{patchify::ROW, prepare, resize_frame, Frame};
use serde_json::Value;

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn u(v: &Value, k: &str) -> u32 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("manifest: {k} missing in {v}")) as u32
}

/// spec §1.4 / issue 4: 0 differing bytes against Pillow 10.4 on every fixture; pixel_values within 1e-6
/// of the HF processor (all rows for small cases, the stored sample of rows for big ones).
#[test]
fn rgb_matches_pillow_and_hf_processor() {
    let m = manifest();
    let cases = m["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8, "manifest has {} cases", cases.len());
    for c in cases {
        let name = c["case"].as_str().unwrap();
        let (w, h, rgb) = png_rgb(&dir().join(format!("{name}.png")));
        assert_eq!((w, h), (u(c, "width"), u(c, "height")), "{name}");
        let frame = Frame::rgb(w, h, &rgb);

        let (resized, (w2, h2)) = resize_frame(&frame).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (ew, eh, expected) = png_rgb(&dir().join(format!("{name}.resized.png")));
        assert_eq!((w2, h2), (ew, eh), "{name}: smart_resize");
        let differing = resized
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing,
            0,
            "{name}: {differing} bytes differ from Pillow 10.4 of {}",
            expected.len()
        );

        let p = prepare(&frame).unwrap();
        let grid: Vec<usize> = c["grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(p.grid_thw.to_vec(), grid, "{name}: grid_thw");
        let n = grid[1] * grid[2];
        assert_eq!(p.pixel_values.len(), n * ROW);
        let rows: Vec<usize> = match &c["pv_rows"] {
            Value::String(s) if s == "all" => (0..n).collect(),
            Value::Array(a) => a.iter().map(|v| v.as_u64().unwrap() as usize).collect(),
            other => panic!("{name}: bad pv_rows {other}"),
        };
        let hf = read_f32(&dir().join(format!("{name}.pv.f32")));
        assert_eq!(hf.len(), rows.len() * ROW, "{name}: pv.f32 size");
        let mut max = 0f32;
        for (i, &r) in rows.iter().enumerate() {
            let ours = &p.pixel_values[r * ROW..(r + 1) * ROW];
            for (a, b) in ours.iter().zip(&hf[i * ROW..(i + 1) * ROW]) {
                max = max.max((a - b).abs());
            }
        }
        println!("{name}: {w}x{h} -> {w2}x{h2}: 0 differing bytes, pixel_values max |d| {max:e} over {} rows", rows.len());
        assert!(max <= 1e-6, "{name}: pixel_values max |d| {max}");
    }
}

/// NV12/I420 → pixel_values against (GStreamer 1.22 videoconvert → RGB, then the RGB path).
///
/// Issue 4 allows one uint8 level; the conversion reproduces videoconvert's fixed-point matrix and chroma
/// upsampling (src/color.rs), so the bound asserted is 0: every RGB byte, every resized byte and every
/// pixel_values float equal. Cases cover NV12 and I420, BT.601/BT.709/full range, padded strides, odd
/// widths and both chroma sitings.
#[test]
fn yuv_matches_videoconvert() {
    let m = manifest();
    let cases = m["yuv"].as_array().expect("yuv");
    let mut sites = std::collections::BTreeSet::new();
    for c in cases {
        let file = c["file"].as_str().unwrap();
        let data = yuv_data(c);
        let frame = yuv_frame(c, &data);
        let (w, h, chroma_site) = (frame.width, frame.height, frame.chroma_site);
        sites.insert(format!("{chroma_site:?}"));
        frame.check().unwrap();

        let (_, _, vc_rgb) = png_rgb(&dir().join("yuv").join(format!("{file}.rgb.png")));
        let ours_rgb = rexprep::yuv_to_rgb(&frame);
        assert_eq!(ours_rgb.len(), vc_rgb.len(), "{file}");
        let differing = ours_rgb.iter().zip(&vc_rgb).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing, 0,
            "{file}: {differing} RGB bytes differ from videoconvert"
        );

        let (ours, _) = resize_frame(&frame).unwrap();
        let (reference, _) = resize_frame(&Frame::rgb(w, h, &vc_rgb)).unwrap();
        assert!(ours == reference, "{file}: resized bytes differ");
        let a = prepare(&frame).unwrap().pixel_values;
        let b = prepare(&Frame::rgb(w, h, &vc_rgb)).unwrap().pixel_values;
        assert!(a == b, "{file}: pixel_values differ");
        println!(
            "{file} ({chroma_site:?}): 0 of {} RGB bytes and 0 of {} pixel_values differ",
            vc_rgb.len(),
            a.len()
        );
    }
    assert_eq!(sites.len(), 2, "both chroma sitings covered: {sites:?}");
}
