//! Readers for tests/fixtures/prep shared by the fixture, host-kernel and GPU tests.

// Each test binary uses its own subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rexprep::{ChromaSite, Colorimetry, Frame, PixelFormat};
use serde_json::Value;

/// The fixture folder; `REXPREP_FIXTURES` overrides the compile-time path, for a test binary copied to a
/// GPU host.
pub fn dir() -> PathBuf {
    match std::env::var_os("REXPREP_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/prep"),
    }
}

pub fn manifest() -> Value {
    let p = dir().join("manifest.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn png_rgb(path: &Path) -> (u32, u32, Vec<u8>) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

/// The raw planes of one `yuv` manifest entry.
pub fn yuv_data(case: &Value) -> Vec<u8> {
    let p = dir().join("yuv").join(case["file"].as_str().expect("file"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// One `yuv` manifest entry as a `Frame` over `data`, with the colorimetry and chroma siting GStreamer
/// put on the caps of its reference conversion.
pub fn yuv_frame<'a>(case: &Value, data: &'a [u8]) -> Frame<'a> {
    let file = &case["file"];
    let field = |k: &str| {
        case[k]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: {k} missing"))
    };
    let arr3 = |k: &str| [0, 1, 2].map(|i| case[k][i].as_u64().expect(k) as usize);
    Frame {
        width: case["width"].as_u64().expect("width") as u32,
        height: case["height"].as_u64().expect("height") as u32,
        format: match field("format") {
            "nv12" => PixelFormat::Nv12,
            "i420" => PixelFormat::I420,
            f => panic!("{file}: format {f}"),
        },
        data,
        strides: arr3("strides"),
        offsets: arr3("offsets"),
        colorimetry: match field("colorimetry") {
            "bt601" => Colorimetry::BT601,
            "bt709" => Colorimetry::BT709,
            "1:4:0:0" => Colorimetry::JPEG,
            o => panic!("{file}: colorimetry {o}"),
        },
        chroma_site: match field("chroma_site") {
            "jpeg" => ChromaSite::Centered,
            "mpeg2" => ChromaSite::HCosited,
            o => panic!("{file}: chroma_site {o}"),
        },
    }
}
