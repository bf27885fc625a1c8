//! `rtsp-serve`: a small RTSP camera for the end-to-end tests (gstreamer-rtsp-server).
//!
//! In: `--port P --width W --height H --fps F --pattern NAME`, and what real cameras vary in
//! (issue 16):
//! - `--protocols all|tcp|udp|udp-mcast`: the lower transports the server accepts (the media
//!   factory's `protocols`); a UDP-only server answers a TCP SETUP with 461, like VLC's and some
//!   NVRs; a multicast-only one refuses both unicast transports;
//! - `--auth basic|digest --user U --password P`: an `RTSPAuth` that demands credentials (without
//!   them, or with wrong ones, every request is answered 401);
//! - `--codec h264|h265|mjpeg`;
//! - `--audio`: a G.711 A-law audio track beside the video, offered as the first stream;
//! - `--resize-after-s S --width2 W2 --height2 H2`: the video size changes S seconds after the
//!   media starts (the first client's DESCRIBE), mid-stream, like a camera reconfigured.
//!
//! Out: the stream at `rtsp://127.0.0.1:P/cam`, shared by all clients, encoded live (videotestsrc
//! `is-live=true`, so frames come at the stated rate like a real camera). On stdout, one line per
//! event the tests count: `rtsp-serve: client connected`, `rtsp-serve: describe` (every DESCRIBE,
//! before the auth check), `rtsp-serve: describe accepted`, `rtsp-serve: resized to WxH`.
//! Runs the glib main loop on the main thread. It is a separate process, not a thread in the
//! test, so tests can SIGKILL it (camera gone) or SIGSTOP it (hung camera, build-env.md "How RTSP
//! failures look to the client").

use std::io::Write;

use anyhow::{bail, Context, Result};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::gst_rtsp;
use gstreamer_rtsp_server::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    H264,
    H265,
    Mjpeg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthKind {
    Basic,
    Digest,
}

struct Args {
    port: u16,
    width: u32,
    height: u32,
    fps: u32,
    pattern: String,
    protocols: gst_rtsp::RTSPLowerTrans,
    auth: Option<AuthKind>,
    user: String,
    password: String,
    codec: Codec,
    audio: bool,
    resize_after_s: Option<u32>,
    width2: u32,
    height2: u32,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        port: 8554,
        width: 320,
        height: 240,
        fps: 15,
        pattern: "ball".into(),
        protocols: gst_rtsp::RTSPLowerTrans::TCP
            | gst_rtsp::RTSPLowerTrans::UDP
            | gst_rtsp::RTSPLowerTrans::UDP_MCAST,
        auth: None,
        user: "viewer".into(),
        password: String::new(),
        codec: Codec::H264,
        audio: false,
        resize_after_s: None,
        width2: 0,
        height2: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--audio" {
            a.audio = true;
            continue;
        }
        let val = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u32>().with_context(|| format!("{flag} {v}"));
        match flag.as_str() {
            "--port" => a.port = val.parse().with_context(|| format!("--port {val}"))?,
            "--width" => a.width = num(&val)?,
            "--height" => a.height = num(&val)?,
            "--fps" => a.fps = num(&val)?,
            "--pattern" => a.pattern = val,
            "--protocols" => {
                a.protocols = match val.as_str() {
                    "all" => a.protocols,
                    "tcp" => gst_rtsp::RTSPLowerTrans::TCP,
                    "udp" => gst_rtsp::RTSPLowerTrans::UDP | gst_rtsp::RTSPLowerTrans::UDP_MCAST,
                    "udp-mcast" => gst_rtsp::RTSPLowerTrans::UDP_MCAST,
                    other => bail!("--protocols {other}: expected all, tcp, udp or udp-mcast"),
                }
            }
            "--auth" => {
                a.auth = Some(match val.as_str() {
                    "basic" => AuthKind::Basic,
                    "digest" => AuthKind::Digest,
                    other => bail!("--auth {other}: expected basic or digest"),
                })
            }
            "--user" => a.user = val,
            "--password" => a.password = val,
            "--codec" => {
                a.codec = match val.as_str() {
                    "h264" => Codec::H264,
                    "h265" => Codec::H265,
                    "mjpeg" => Codec::Mjpeg,
                    other => bail!("--codec {other}: expected h264, h265 or mjpeg"),
                }
            }
            "--resize-after-s" => a.resize_after_s = Some(num(&val)?),
            "--width2" => a.width2 = num(&val)?,
            "--height2" => a.height2 = num(&val)?,
            other => bail!("unknown flag {other}"),
        }
    }
    if a.resize_after_s.is_some() && (a.width2 == 0 || a.height2 == 0) {
        bail!("--resize-after-s needs --width2 and --height2");
    }
    Ok(a)
}

/// The media's launch line: video (named `pay0`, or `pay1` after the audio track).
fn launch_line(a: &Args) -> String {
    // key-int-max bounds how long a reconnecting client waits for a keyframe (one second).
    let gop = a.fps.max(1);
    let encode = match a.codec {
        Codec::H264 => format!(
            "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} \
             ! rtph264pay config-interval=1 pt=96"
        ),
        Codec::H265 => format!(
            "x265enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} \
             ! rtph265pay config-interval=1 pt=96"
        ),
        // rtpjpegpay carries only 4:2:0 / 4:2:2 YUV JPEGs (RFC 2435), as cameras send.
        Codec::Mjpeg => {
            "video/x-raw,format=I420 ! jpegenc quality=80 ! rtpjpegpay pt=26".to_string()
        }
    };
    // Audio first when present: a client that links only its first stream gets no video.
    let (audio, video_pay) = if a.audio {
        (
            "audiotestsrc is-live=true wave=sine ! audio/x-raw,rate=8000,channels=1 ! alawenc \
             ! rtppcmapay name=pay0 pt=8 "
                .to_string(),
            "pay1",
        )
    } else {
        (String::new(), "pay0")
    };
    // The size sits in a named capsfilter after videoscale, so --resize-after-s can change it.
    format!(
        "( {audio}videotestsrc is-live=true pattern={} ! video/x-raw,framerate={}/1 ! videoscale \
         ! capsfilter name=size caps=video/x-raw,width={},height={} ! videoconvert \
         ! {encode} name={video_pay} )",
        a.pattern, a.fps, a.width, a.height
    )
}

fn say(line: &str) {
    println!("rtsp-serve: {line}");
    let _ = std::io::stdout().flush();
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
    factory.set_launch(&launch_line(&a));
    factory.set_shared(true);
    factory.set_protocols(a.protocols);

    if let Some(kind) = a.auth {
        let auth = rtsp::RTSPAuth::new();
        let token = rtsp::RTSPToken::builder()
            .field(rtsp::RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
            .build();
        match kind {
            AuthKind::Basic => {
                auth.add_basic(&rtsp::RTSPAuth::make_basic(&a.user, &a.password), &token);
                auth.set_supported_methods(gst_rtsp::RTSPAuthMethod::Basic);
            }
            AuthKind::Digest => {
                auth.add_digest(&a.user, &a.password, &token);
                auth.set_supported_methods(gst_rtsp::RTSPAuthMethod::Digest);
            }
        }
        server.set_auth(Some(&auth));
        factory.add_role_from_structure(
            &gst::Structure::builder("user")
                .field(rtsp::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
                .field(rtsp::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, true)
                .build(),
        );
    }

    server.connect_client_connected(|_, client| {
        say("client connected");
        client.connect_pre_describe_request(|_, _| {
            say("describe");
            gst_rtsp::RTSPStatusCode::Ok
        });
        client.connect_describe_request(|_, _| say("describe accepted"));
    });

    if let Some(after) = a.resize_after_s {
        let (w2, h2) = (a.width2, a.height2);
        factory.connect_media_configure(move |_, media| {
            let Some(size) = media
                .element()
                .downcast::<gst::Bin>()
                .ok()
                .and_then(|b| b.by_name("size"))
            else {
                say("no capsfilter named size");
                return;
            };
            gst::glib::timeout_add_seconds(after, move || {
                let caps = gst::Caps::builder("video/x-raw")
                    .field("width", w2 as i32)
                    .field("height", h2 as i32)
                    .build();
                size.set_property("caps", &caps);
                say(&format!("resized to {w2}x{h2}"));
                gst::glib::ControlFlow::Break
            });
        });
    }

    mounts.add_factory("/cam", factory);
    let _source = server
        .attach(None)
        .context("attach RTSP server (port in use?)")?;
    say(&format!(
        "rtsp://127.0.0.1:{}/cam {}x{}@{} {:?} audio={} protocols={:?} auth={:?}",
        a.port, a.width, a.height, a.fps, a.codec, a.audio, a.protocols, a.auth
    ));
    main_loop.run();
    Ok(())
}
