//! `rtsp-serve`: a small RTSP camera for the end-to-end tests (gstreamer-rtsp-server).
//!
//! In: `--port P --width W --height H --fps F --pattern NAME`. Out: an H.264 stream at
//! `rtsp://127.0.0.1:P/cam`, shared by all clients, encoded live (videotestsrc `is-live=true`, so
//! frames come at the stated rate like a real camera). Runs the glib main loop on the main thread.
//! It is a separate process, not a thread in the test, so tests can SIGKILL it (camera gone) or
//! SIGSTOP it (hung camera, build-env.md "How RTSP failures look to the client").

use anyhow::{bail, Context, Result};
use gstreamer as gst;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;

struct Args {
    port: u16,
    width: u32,
    height: u32,
    fps: u32,
    pattern: String,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        port: 8554,
        width: 320,
        height: 240,
        fps: 15,
        pattern: "ball".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => a.port = val.parse().with_context(|| format!("--port {val}"))?,
            "--width" => a.width = val.parse().with_context(|| format!("--width {val}"))?,
            "--height" => a.height = val.parse().with_context(|| format!("--height {val}"))?,
            "--fps" => a.fps = val.parse().with_context(|| format!("--fps {val}"))?,
            "--pattern" => a.pattern = val,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = parse_args()?;
    gst::init()?;
    let main_loop = gst::glib::MainLoop::new(None, false);
    let server = rtsp::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&a.port.to_string());
    let mounts = server
        .mount_points()
        .context("server has no mount points")?;
    let factory = rtsp::RTSPMediaFactory::new();
    // The launch line build-env.md measured at 30 fps on loopback; key-int-max bounds how long a
    // reconnecting client waits for a keyframe.
    factory.set_launch(&format!(
        "( videotestsrc is-live=true pattern={} ! video/x-raw,width={},height={},framerate={}/1 \
         ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={} \
         ! rtph264pay name=pay0 pt=96 config-interval=1 )",
        a.pattern,
        a.width,
        a.height,
        a.fps,
        a.fps.max(1)
    ));
    factory.set_shared(true);
    mounts.add_factory("/cam", factory);
    let _source = server
        .attach(None)
        .context("attach RTSP server (port in use?)")?;
    println!(
        "rtsp-serve: rtsp://127.0.0.1:{}/cam {}x{}@{}",
        a.port, a.width, a.height, a.fps
    );
    main_loop.run();
    Ok(())
}
