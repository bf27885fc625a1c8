//! RTSP authentication (issue 16 item 2): `rtsp-serve` cameras that demand Digest or Basic
//! credentials, read by one `rexstream` (tiny fixture checkpoint):
//! - `digest`: the right password from `password_env`; `basic`: the right password as `${VAR}`
//!   in the uri. Both deliver frames.
//! - `wrong`: a wrong password with `auth_retry_s = 3`. Asserted: reconnect reason
//!   `unauthorized`, `/healthz` shows the stream unauthorised, and over a 12 s window the camera
//!   sees at most 12 / 3 + 1 = 5 connection attempts (the server counts its client connections;
//!   the ordinary back-off, 0.25–1 s here, would make about 15).
//! - No password (right or wrong, plain or percent-encoded) in the log, `/metrics` or `/healthz`.
//!
//! Run: `cargo test -p rexstream-e2e --test cameras_auth -- --nocapture`.

#[path = "cameras_common.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use common::{pipeline, stream_lines, Stream};
use rexstream_e2e::faults::{metric, wait_metric};
use rexstream_e2e::{free_port, http_get, tiny_model, Rexstream, RtspServer, RtspSource, TempDir};

const USER: &str = "viewer";
const DIGEST_PW: &str = "Dig3st-pw-7Q";
const BASIC_PW: &str = "Bas1c-pw-4K";
const RIGHT_PW: &str = "R1ght-pw-9Z";
const WRONG_PW: &str = "Wr0ng-pw-2X";
const AUTH_RETRY_S: f64 = 3.0;
const WINDOW: Duration = Duration::from_secs(12);

fn server(method: &str, password: &str, pattern: &str) -> Result<RtspServer> {
    RtspServer::start(RtspSource {
        width: 160,
        height: 120,
        fps: 10,
        pattern: pattern.into(),
        extra: ["--auth", method, "--user", USER, "--password", password]
            .map(String::from)
            .to_vec(),
    })
}

fn connections(server: &RtspServer) -> usize {
    server.log().matches("rtsp-serve: client connected").count()
}

#[test]
fn digest_and_basic_work_and_a_wrong_password_is_retried_slowly() -> Result<()> {
    let dir = TempDir::new("cameras-auth")?;
    let digest = server("digest", DIGEST_PW, "ball")?;
    let basic = server("basic", BASIC_PW, "smpte")?;
    let locked = server("digest", RIGHT_PW, "snow")?;
    let (http, broker) = (free_port()?, free_port()?);
    let uri = |s: &RtspServer, pw: &str| format!("rtsp://{USER}{pw}@127.0.0.1:{}/cam", s.port);
    let cfg = pipeline(
        dir.path(),
        http,
        broker,
        &[
            Stream {
                name: "digest",
                uri: uri(&digest, ""),
                extra: "password_env = \"CAM_DIGEST_PW\"",
            },
            Stream {
                name: "basic",
                uri: uri(&basic, ":${CAM_BASIC_PW}"),
                extra: "",
            },
            Stream {
                name: "wrong",
                uri: uri(&locked, ""),
                extra: &format!("password_env = \"CAM_WRONG_PW\"\nauth_retry_s = {AUTH_RETRY_S}"),
            },
        ],
    )?;
    let env: HashMap<String, String> = [
        ("CAM_DIGEST_PW", DIGEST_PW),
        ("CAM_BASIC_PW", BASIC_PW),
        ("CAM_WRONG_PW", WRONG_PW),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg_s = cfg.to_string_lossy().into_owned();
    let model = tiny_model()?.to_string_lossy().into_owned();
    let mut rex = Rexstream::spawn(&["run", &cfg_s, "--model", &model], &env, Some(http))?;
    rex.wait_healthy(Duration::from_secs(180))?;

    for s in ["digest", "basic"] {
        wait_metric(
            &rex,
            "rexstream_frames_received_total",
            &[("stream", s)],
            Duration::from_secs(60),
            |v| v >= 10.0,
        )
        .map_err(|e| anyhow!("{s}: {e}; log:\n{}", rex.log()))?;
    }
    assert!(
        digest.log().contains("rtsp-serve: describe accepted"),
        "{}",
        digest.log()
    );
    assert!(
        basic.log().contains("rtsp-serve: describe accepted"),
        "{}",
        basic.log()
    );

    // The wrong password: the first refusal, then a window counted at the camera.
    wait_metric(
        &rex,
        "rexstream_reconnects_total",
        &[("stream", "wrong"), ("reason", "unauthorized")],
        Duration::from_secs(30),
        |v| v >= 1.0,
    )
    .map_err(|e| anyhow!("{e}; log:\n{}", rex.log()))?;
    let (c0, t0) = (connections(&locked), Instant::now());
    std::thread::sleep(WINDOW);
    let (c1, secs) = (connections(&locked), t0.elapsed().as_secs_f64());
    let bound = (secs / AUTH_RETRY_S).floor() as usize + 1;
    let unauthorized = metric(
        &rex,
        "rexstream_reconnects_total",
        &[("stream", "wrong"), ("reason", "unauthorized")],
    )?;
    println!(
        "wrong password: {} connection attempts in {secs:.1} s (bound {bound}); {} in all; \
         reconnects{{reason=\"unauthorized\"}} = {unauthorized}; describes at the camera: {}",
        c1 - c0,
        c1,
        locked.log().matches("rtsp-serve: describe\n").count()
    );
    assert!(
        c1 - c0 <= bound,
        "{} attempts in {secs:.1} s; log:\n{}",
        c1 - c0,
        rex.log()
    );
    assert!(
        c1 - c0 >= 2,
        "the stream stopped retrying: {} attempts in {secs:.1} s",
        c1 - c0
    );
    assert!(
        !locked.log().contains("describe accepted"),
        "{}",
        locked.log()
    );
    assert_eq!(
        metric(
            &rex,
            "rexstream_frames_received_total",
            &[("stream", "wrong")]
        )?,
        0.0
    );

    let (status, health) = http_get(http, "/healthz")?;
    let h: serde_json::Value = serde_json::from_str(&health)?;
    println!("/healthz ({status}): {health}");
    assert_eq!(h["streams"]["wrong"]["unauthorized"], true, "{health}");
    assert_eq!(h["streams"]["digest"]["unauthorized"], false, "{health}");
    assert_eq!(h["streams"]["digest"]["up"], true, "{health}");

    let log = rex.log();
    let refused = stream_lines(&log, "wrong")
        .into_iter()
        .filter(|l| l.contains("Camera refused the credentials; retrying later."))
        .collect::<Vec<_>>();
    assert!(!refused.is_empty(), "{log}");
    println!("{}", refused[0]);
    assert!(
        refused[0].contains("viewer") && refused[0].contains("***"),
        "{}",
        refused[0]
    );

    // Secrets never leave the process.
    let metrics = rex.metrics()?;
    for pw in [DIGEST_PW, BASIC_PW, RIGHT_PW, WRONG_PW] {
        for (what, text) in [("log", &log), ("/metrics", &metrics), ("/healthz", &health)] {
            assert!(!text.contains(pw), "{pw} in {what}:\n{text}");
        }
    }
    rex.proc.signal("INT")?;
    rex.proc.wait_exit(Duration::from_secs(30))?;
    Ok(())
}
