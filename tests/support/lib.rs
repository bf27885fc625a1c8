//! Shared helpers for the end-to-end tests: start real services (mosquitto, Prometheus, an RTSP
//! server, the `rexstream` binary itself) on free loopback ports, wait until each is ready, and stop
//! each by its PID when its guard is dropped.
//!
//! Layout:
//! - [`free_port`], [`wait_until`], [`http_get`], [`TempDir`]: small building blocks.
//! - [`Mosquitto`]: a broker process with its own config file (`allow_anonymous`, one listener).
//! - [`Subscriber`]: a `mosquitto_sub` process whose lines arrive on a channel; `start` returns only
//!   once the subscription is live (a probe message has come back), so no message is missed.
//! - [`Prometheus`]: the Debian `prometheus` scraping one target, with [`Prometheus::query`] on its
//!   HTTP API.
//! - [`RtspServer`]: the `rtsp-serve` helper binary of this crate (gstreamer-rtsp-server), a separate
//!   process so tests can kill or SIGSTOP it like a real camera.
//! - [`Rexstream`]: the real `rexstream` binary run as a child process, its log kept in a file.
//!
//! No sleeps stand in for readiness: every `start` polls the thing it needs (a TCP accept, an HTTP
//! 200, a probe message) with a deadline, and fails with the service's own log if the deadline passes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Fault injection and measurement helpers for the reliability tests (issue 6).
pub mod faults;

/// A free TCP port on 127.0.0.1, found by binding port 0 and releasing it.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Poll `cond` every 50 ms until it returns `Some`, or fail after `timeout` naming `what`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True once something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// A minimal HTTP/1.0 GET against `127.0.0.1:port` (no client crate needed for loopback tests).
/// Returns (status code, body).
pub fn http_get(port: u16, path_and_query: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connect 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from :{port}{path_and_query}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status line in response: {head}"))?;
    Ok((status, body.to_string()))
}

/// Percent-encode a query value (RFC 3986 unreserved characters pass through).
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A fresh directory under the system temp dir, removed on drop (unless `REXSTREAM_E2E_KEEP` is set,
/// for post-mortems).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rexstream-e2e-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self(dir))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("REXSTREAM_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard {
    pub name: String,
    pub child: Option<Child>,
    /// Where its stdout+stderr go, when captured to a file.
    pub log: Option<PathBuf>,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    /// Send a signal by name (`INT`, `TERM`, `STOP`, `CONT`, `KILL`) with `/bin/kill`.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let st = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .context("run kill")?;
        if !st.success() {
            bail!("kill -s {sig} {} failed", self.pid());
        }
        Ok(())
    }
    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
    /// Wait for exit up to `timeout`; returns the exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let name = self.name.clone();
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("{name} not running"))?;
        let status = wait_until(&format!("{name} to exit"), timeout, || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(status.code())
    }
    /// SIGKILL and reap now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped process must be continued to die promptly on some kernels' bookkeeping.
            let _ = Command::new("kill")
                .args(["-s", "CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// The captured log so far (empty when not captured).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_logged(name: &str, mut cmd: Command, log: &Path) -> Result<ChildGuard> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawn {name} ({cmd:?})"))?;
    Ok(ChildGuard {
        name: name.to_string(),
        child: Some(child),
        log: Some(log.to_path_buf()),
    })
}

fn wait_port(guard: &mut ChildGuard, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if port_open(port) {
            return Ok(());
        }
        if !guard.running() {
            bail!(
                "{} exited before listening on {port}; log:\n{}",
                guard.name,
                guard.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{} not listening on {port} after {timeout:?}; log:\n{}",
        guard.name,
        guard.log_text()
    )
}

// ---------------------------------------------------------------------------------------------
// mosquitto

/// A mosquitto broker on 127.0.0.1:`port`, anonymous access, no persistence.
pub struct Mosquitto {
    pub port: u16,
    pub proc: ChildGuard,
    dir: TempDir,
    extra_conf: String,
}

impl Mosquitto {
    /// Start on a free port.
    pub fn start() -> Result<Self> {
        Self::start_with(free_port()?, "")
    }

    /// Start on `port` with extra lines appended to the config (TLS listeners, password files…).
    /// The default listener is `listener <port> 127.0.0.1` with `allow_anonymous true`; when
    /// `extra_conf` mentions `allow_anonymous` the default line is left out.
    pub fn start_with(port: u16, extra_conf: &str) -> Result<Self> {
        let dir = TempDir::new("mosquitto")?;
        let proc = Self::spawn(&dir, port, extra_conf)?;
        Ok(Self {
            port,
            proc,
            dir,
            extra_conf: extra_conf.to_string(),
        })
    }

    fn spawn(dir: &TempDir, port: u16, extra_conf: &str) -> Result<ChildGuard> {
        let conf = dir.path().join("mosquitto.conf");
        let mut text = format!("listener {port} 127.0.0.1\npersistence false\n");
        if !extra_conf.contains("allow_anonymous") {
            text.push_str("allow_anonymous true\n");
        }
        text.push_str(extra_conf);
        text.push('\n');
        std::fs::write(&conf, text)?;
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(&conf);
        let mut guard = spawn_logged("mosquitto", cmd, &dir.path().join("mosquitto.log"))?;
        wait_port(&mut guard, port, Duration::from_secs(10))?;
        Ok(guard)
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Kill the broker (SIGKILL: like a crash, no clean disconnects).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Start it again on the same port with the same config.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(&self.dir, self.port, &self.extra_conf)?;
        Ok(())
    }
}

/// One message seen by [`Subscriber`].
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: String,
    /// `mosquitto_sub -F` reports the retain flag, so retained state can be asserted.
    pub retained: bool,
}

/// A `mosquitto_sub` process (QoS 1) whose messages arrive on a channel.
pub struct Subscriber {
    pub proc: ChildGuard,
    rx: mpsc::Receiver<Message>,
}

impl Subscriber {
    /// Subscribe to `topics` on 127.0.0.1:`port` and return once the subscription is live: the
    /// helper also subscribes to a private probe topic and publishes to it until the probe comes
    /// back (the equivalent of waiting for SubAck). Probe messages are not delivered to the caller.
    pub fn start(port: u16, topics: &[&str]) -> Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let probe = format!(
            "rexstream-e2e/probe/{}/{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-V",
            "mqttv311",
        ]);
        // %r retain flag, %t topic, %p payload; tab-separated, one message per line.
        cmd.args(["-F", "%r\t%t\t%p"]);
        for t in topics
            .iter()
            .copied()
            .chain(std::iter::once(probe.as_str()))
        {
            cmd.args(["-t", t]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn mosquitto_sub (mosquitto-clients)")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        let (probe_tx, probe_rx) = mpsc::channel();
        let probe_topic = probe.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.splitn(3, '\t');
                let (Some(r), Some(topic), Some(payload)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if topic == probe_topic {
                    let _ = probe_tx.send(());
                    continue;
                }
                let msg = Message {
                    topic: topic.to_string(),
                    payload: payload.to_string(),
                    retained: r == "1",
                };
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        let proc = ChildGuard {
            name: "mosquitto_sub".into(),
            child: Some(child),
            log: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-q",
                    "1",
                    "-t",
                    &probe,
                    "-m",
                    "probe",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if probe_rx.recv_timeout(Duration::from_millis(300)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("mosquitto_sub on port {port} never received its probe message");
            }
        }
        Ok(Self { proc, rx })
    }

    /// The next message within `timeout`, or None.
    pub fn recv(&self, timeout: Duration) -> Option<Message> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Collect messages until `done` says stop (it sees everything collected so far) or the
    /// timeout passes; returns what was collected either way.
    pub fn collect_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Message]) -> bool,
    ) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some(m) = self.recv(left.min(Duration::from_millis(200))) {
                got.push(m);
            }
        }
        got
    }
}

/// Publish one message with `mosquitto_pub` (QoS 1, optionally retained).
pub fn mosquitto_pub(port: u16, topic: &str, payload: &str, retain: bool) -> Result<()> {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        payload,
    ]);
    if retain {
        cmd.arg("-r");
    }
    let st = cmd.status().context("run mosquitto_pub")?;
    if !st.success() {
        bail!("mosquitto_pub to {topic} on port {port} failed: {st}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Prometheus

/// The Debian `prometheus` server scraping `127.0.0.1:<target_port>/metrics` every second.
pub struct Prometheus {
    pub port: u16,
    pub proc: ChildGuard,
    _dir: TempDir,
}

impl Prometheus {
    pub fn start(target_port: u16) -> Result<Self> {
        let dir = TempDir::new("prometheus")?;
        let port = free_port()?;
        let conf = dir.path().join("prometheus.yml");
        std::fs::write(
            &conf,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: rexstream\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let mut proc = spawn_logged("prometheus", cmd, &dir.path().join("prometheus.log"))?;
        wait_port(&mut proc, port, Duration::from_secs(20))?;
        wait_until("prometheus /-/ready", Duration::from_secs(20), || {
            matches!(http_get(port, "/-/ready"), Ok((200, _))).then_some(())
        })
        .with_context(|| proc.log_text())?;
        Ok(Self {
            port,
            proc,
            _dir: dir,
        })
    }

    /// An instant query on the HTTP API; returns `data.result` (a JSON array).
    pub fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>> {
        let (status, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", url_encode(expr)),
        )?;
        if status != 200 {
            bail!("prometheus query {expr:?}: HTTP {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The first sample's value of an instant query, as f64 (None when the result is empty).
    pub fn query_scalar(&self, expr: &str) -> Result<Option<f64>> {
        let r = self.query(expr)?;
        Ok(r.first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok()))
    }

    /// Poll `expr` until its first value satisfies `pred` (Prometheus scrapes every second but its
    /// first scrape comes a few seconds after start; build-env.md).
    pub fn wait_value(
        &self,
        expr: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        wait_until(&format!("prometheus {expr}"), timeout, || {
            self.query_scalar(expr).ok().flatten().filter(|v| pred(*v))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// RTSP server

/// What the `rtsp-serve` helper streams.
#[derive(Debug, Clone)]
pub struct RtspSource {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// videotestsrc pattern name (`ball`, `smpte`, `snow`…).
    pub pattern: String,
    /// Further `rtsp-serve` flags (`--protocols udp`, `--auth digest --password …`, `--codec h265`,
    /// `--audio`, `--resize-after-s …`; see support/bin/rtsp_serve.rs).
    pub extra: Vec<String>,
}

impl Default for RtspSource {
    fn default() -> Self {
        Self {
            width: 320,
            height: 240,
            fps: 15,
            pattern: "ball".into(),
            extra: Vec::new(),
        }
    }
}

/// The `rtsp-serve` binary of this crate: an H.264 RTSP stream at `rtsp://127.0.0.1:<port>/cam`.
pub struct RtspServer {
    pub port: u16,
    pub source: RtspSource,
    pub proc: ChildGuard,
    dir: TempDir,
}

/// Path of the `rtsp-serve` helper binary (built by cargo with this crate's tests).
pub fn rtsp_serve_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CARGO_BIN_EXE_rtsp-serve") {
        return p.into();
    }
    target_dir().join("debug").join("rtsp-serve")
}

impl RtspServer {
    pub fn start(source: RtspSource) -> Result<Self> {
        Self::start_on(free_port()?, source)
    }

    pub fn start_on(port: u16, source: RtspSource) -> Result<Self> {
        let dir = TempDir::new("rtsp")?;
        let proc = Self::spawn(&dir, port, &source)?;
        Ok(Self {
            port,
            source,
            proc,
            dir,
        })
    }

    fn spawn(dir: &TempDir, port: u16, s: &RtspSource) -> Result<ChildGuard> {
        let mut cmd = Command::new(rtsp_serve_bin());
        cmd.args([
            "--port",
            &port.to_string(),
            "--width",
            &s.width.to_string(),
            "--height",
            &s.height.to_string(),
            "--fps",
            &s.fps.to_string(),
            "--pattern",
            &s.pattern,
        ]);
        cmd.args(&s.extra);
        let mut guard = spawn_logged("rtsp-serve", cmd, &dir.path().join("rtsp.log"))?;
        wait_port(&mut guard, port, Duration::from_secs(15))?;
        Ok(guard)
    }

    pub fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/cam", self.port)
    }

    /// The server's output so far: one `rtsp-serve: …` line per client connection, DESCRIBE, …
    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Start again on the same port (a camera coming back).
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(&self.dir, self.port, &self.source)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// rexstream itself

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Path to a built `rexstream` binary. `REXSTREAM_BIN` wins; otherwise this runs
/// `cargo build -p rexstream --bin rexstream` once per test process (a no-op when up to date) —
/// `CARGO_BIN_EXE_*` only covers binaries of the test's own package.
pub fn rexstream_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let cell = BIN.get_or_init(|| Mutex::new(None));
    let mut guard = cell.lock().map_err(|_| anyhow!("poisoned"))?;
    if let Some(p) = guard.as_ref() {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("REXSTREAM_BIN") {
        let p = PathBuf::from(p);
        *guard = Some(p.clone());
        return Ok(p);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "rexstream", "--bin", "rexstream"])
        .current_dir(workspace_root());
    // The test process carries the variables cargo set for *this* package (CARGO_PKG_*,
    // CARGO_MANIFEST_DIR, …). Build scripts that watch the environment (cc, ring) would see them
    // change and rebuild: hand the nested cargo a clean environment instead.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR")
            || k == "OUT_DIR"
            || k.starts_with("RUST_TEST")
        {
            cmd.env_remove(&k);
        }
    }
    let st = cmd.status().context("run cargo build -p rexstream")?;
    if !st.success() {
        bail!("cargo build -p rexstream failed: {st}");
    }
    let p = target_dir().join("debug").join("rexstream");
    *guard = Some(p.clone());
    Ok(p)
}

/// The tiny random fixture checkpoint `tests/fixtures/tiny-tied` (made by the fixture generator), or
/// `REXSTREAM_E2E_MODEL`. Tests that want the trained `tiny-detector` name it.
pub fn tiny_model() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REXSTREAM_E2E_MODEL") {
        return Ok(p.into());
    }
    // Named, not picked by directory order: other fixtures (tiny-detector answers only its own
    // three-shape prompt, tiny-awq is an AWQ checkpoint) sit beside it.
    let dir = workspace_root().join("tests/fixtures/tiny-tied");
    if !dir.join("config.json").exists() {
        return Err(anyhow!("{}/config.json is missing", dir.display()));
    }
    Ok(dir)
}

/// A running `rexstream` child process.
pub struct Rexstream {
    pub proc: ChildGuard,
    /// Metrics/health HTTP port, when the test configured one.
    pub http_port: Option<u16>,
    _dir: TempDir,
}

impl Rexstream {
    /// Run `rexstream <args…>` with `RUST_LOG` defaulting to `info,rumqttd=warn`; `env` adds variables.
    /// Returns at once; use [`Rexstream::wait_healthy`] or a subscriber to wait for readiness.
    pub fn spawn(
        args: &[&str],
        env: &HashMap<String, String>,
        http_port: Option<u16>,
    ) -> Result<Self> {
        let dir = TempDir::new("rexstream")?;
        let mut cmd = Command::new(rexstream_bin()?);
        cmd.args(args).current_dir(workspace_root());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,rumqttd=warn");
        }
        cmd.envs(env);
        let proc = spawn_logged("rexstream", cmd, &dir.path().join("rexstream.log"))?;
        Ok(Self {
            proc,
            http_port,
            _dir: dir,
        })
    }

    /// Run `rexstream run <config> --model <model>`.
    pub fn run(config: &Path, model: &Path, http_port: Option<u16>) -> Result<Self> {
        let c = config.to_string_lossy().into_owned();
        let m = model.to_string_lossy().into_owned();
        Self::spawn(&["run", &c, "--model", &m], &HashMap::new(), http_port)
    }

    /// Wait until `/healthz` answers 200 on the HTTP port (fails early, with the log, if the
    /// process exits).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<String> {
        let port = self
            .http_port
            .ok_or_else(|| anyhow!("no http port configured"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = http_get(port, "/healthz") {
                return Ok(body);
            }
            if !self.proc.running() {
                bail!("rexstream exited early; log:\n{}", self.proc.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "rexstream /healthz not 200 after {timeout:?}; log:\n{}",
                    self.proc.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The current `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        let port = self
            .http_port
            .ok_or_else(|| anyhow!("no http port configured"))?;
        let (status, body) = http_get(port, "/metrics")?;
        if status != 200 {
            bail!("/metrics: HTTP {status}");
        }
        Ok(body)
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}

/// Sum of every sample of `name` in Prometheus text whose labels contain all `labels`
/// (`[("stream","cam"),("reason","superseded")]`). Histogram/summary suffixes must be spelled out.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // a longer metric name sharing the prefix
        };
        let ok = labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")));
        if ok {
            if let Some(v) = value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            {
                total += v;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_matches_labels_and_exact_names() {
        let text =
            "# HELP x\nrexstream_frames_dropped_total{stream=\"a\",reason=\"superseded\"} 3\n\
                    rexstream_frames_dropped_total{stream=\"b\",reason=\"superseded\"} 4\n\
                    rexstream_frames_dropped_total_other 100\nrexstream_up 1\n";
        assert_eq!(metric_sum(text, "rexstream_frames_dropped_total", &[]), 7.0);
        assert_eq!(
            metric_sum(text, "rexstream_frames_dropped_total", &[("stream", "b")]),
            4.0
        );
        assert_eq!(metric_sum(text, "rexstream_up", &[]), 1.0);
    }

    #[test]
    fn url_encode_escapes_promql() {
        assert_eq!(url_encode("a{b=\"c\"}"), "a%7Bb%3D%22c%22%7D");
    }
}
