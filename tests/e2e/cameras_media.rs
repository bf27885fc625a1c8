//! What real cameras send (issue 16 item 3), each from an `rtsp-serve` camera into one `rexstream`
//! (tiny fixture checkpoint, default settings), documents read from its MQTT broker:
//! - `audio`: H.264 video with a G.711 audio track offered first (a client that links only its
//!   first stream would get no video);
//! - `h265`: H.265 video; `mjpeg`: JPEG over RTP;
//! - `resize`: H.264 whose size changes from 320x240 to 256x192 mid-stream.
//!
//! Asserted: each stream's documents carry its camera's `frame.width/height`; the resized
//! stream's documents go from the first size to the second (never back, never another size);
//! no stream reconnects and no frame is dropped as `invalid` (nothing dropped silently or loudly).
//!
//! Run: `cargo test -p rexstream-e2e --test cameras_media -- --nocapture`.

#[path = "cameras_common.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Result};
use common::{pipeline, Stream};
use rexstream_e2e::faults::metric;
use rexstream_e2e::{
    free_port, tiny_model, Rexstream, RtspServer, RtspSource, Subscriber, TempDir,
};
use serde_json::Value;

fn server(w: u32, h: u32, pattern: &str, extra: &[&str]) -> Result<RtspServer> {
    RtspServer::start(RtspSource {
        width: w,
        height: h,
        fps: 10,
        pattern: pattern.into(),
        extra: extra.iter().map(|s| s.to_string()).collect(),
    })
}

#[test]
fn audio_h265_mjpeg_and_a_size_change_keep_documents_coming() -> Result<()> {
    let dir = TempDir::new("cameras-media")?;
    let audio = server(320, 240, "ball", &["--audio"])?;
    let h265 = server(288, 224, "smpte", &["--codec", "h265"])?;
    let mjpeg = server(224, 160, "snow", &["--codec", "mjpeg"])?;
    let resize = server(
        320,
        240,
        "ball",
        &[
            "--resize-after-s",
            "8",
            "--width2",
            "256",
            "--height2",
            "192",
        ],
    )?;
    let (http, broker) = (free_port()?, free_port()?);
    let cfg = pipeline(
        dir.path(),
        http,
        broker,
        &[
            Stream {
                name: "audio",
                uri: audio.url(),
                extra: "",
            },
            Stream {
                name: "h265",
                uri: h265.url(),
                extra: "",
            },
            Stream {
                name: "mjpeg",
                uri: mjpeg.url(),
                extra: "",
            },
            Stream {
                name: "resize",
                uri: resize.url(),
                extra: "",
            },
        ],
    )?;
    let mut rex = Rexstream::run(&cfg, &tiny_model()?, Some(http))?;
    rex.wait_healthy(Duration::from_secs(180))?;
    let sub = Subscriber::start(broker, &["rexstream/+/detections"])?;

    // (stream → sizes of its documents, in order)
    let mut sizes: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    let want = |s: &BTreeMap<String, Vec<(u64, u64)>>| {
        let n = |k: &str| s.get(k).map_or(0, Vec::len);
        n("audio") >= 3
            && n("h265") >= 3
            && n("mjpeg") >= 3
            && s.get("resize")
                .is_some_and(|v| v.iter().filter(|d| **d == (256, 192)).count() >= 3)
    };
    let msgs = sub.collect_until(Duration::from_secs(120), |got| {
        sizes.clear();
        for m in got {
            let d: Value = serde_json::from_str(&m.payload).unwrap_or_default();
            let (Some(s), Some(w), Some(h)) = (
                d["stream"].as_str(),
                d["frame"]["width"].as_u64(),
                d["frame"]["height"].as_u64(),
            ) else {
                continue;
            };
            sizes.entry(s.to_string()).or_default().push((w, h));
        }
        want(&sizes)
    });
    for (s, v) in &sizes {
        println!("{s}: {} documents, sizes {:?}", v.len(), dedup(v));
    }
    if !want(&sizes) {
        return Err(anyhow!(
            "documents missing after {} messages: {sizes:?}\nresize server: {}\nlog:\n{}",
            msgs.len(),
            resize.log(),
            rex.log()
        ));
    }
    for (s, size) in [
        ("audio", (320, 240)),
        ("h265", (288, 224)),
        ("mjpeg", (224, 160)),
    ] {
        assert!(sizes[s].iter().all(|d| *d == size), "{s}: {:?}", sizes[s]);
    }
    let r = dedup(&sizes["resize"]);
    // The camera's media starts at rexstream's DESCRIBE, after the model has loaded, so
    // documents of the first size come during the 8 s before the change.
    assert_eq!(r, vec![(320, 240), (256, 192)], "resize");
    assert!(
        resize.log().contains("rtsp-serve: resized to 256x192"),
        "{}",
        resize.log()
    );
    for s in ["audio", "h265", "mjpeg", "resize"] {
        let reconnects = metric(&rex, "rexstream_reconnects_total", &[("stream", s)])?;
        let invalid = metric(
            &rex,
            "rexstream_frames_dropped_total",
            &[("stream", s), ("reason", "invalid")],
        )?;
        assert_eq!(
            (reconnects, invalid),
            (0.0, 0.0),
            "{s}; log:\n{}",
            rex.log()
        );
    }
    rex.proc.signal("INT")?;
    rex.proc.wait_exit(Duration::from_secs(30))?;
    Ok(())
}

/// Runs of equal sizes collapsed: [(a), (a), (b)] → [(a), (b)].
fn dedup(v: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for d in v {
        if out.last() != Some(d) {
            out.push(*d);
        }
    }
    out
}
