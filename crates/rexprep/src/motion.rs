//! Motion gate: is this frame worth a model call? (issue 12, design.md "motion gate").
//!
//! In: decoded [`Frame`]s of one stream, in order, each with its capture time in seconds, and whether the
//! prompt changed since the last served frame. Out: a [`GateDecision`] per frame (serve it, and why, or drop
//! it) plus the motion state. Pure computation with no I/O and no GStreamer, so `rexbench` can replay
//! generated frame sequences through exactly the code that runs in `rexstream`; there it runs on the
//! stream's GStreamer streaming thread, which is why one frame reads at most [`ROWS_PER_BLOCK`] source rows
//! per small-image row and then makes a few passes over a ≤ 320-pixel-wide image (`benches/motion.rs`
//! measures it at 1080p).
//!
//! The detector ([`MotionDetector`]) follows Frigate's motion detector (frigate/motion/improved_motion.py),
//! re-derived, not copied: luma on a small image, a slowly updated running-average background, a per-pixel
//! noise threshold (Frigate's default 30 of 255), a minimum changed area, and a "lightning" rule (a frame
//! where most pixels changed resets the background). Two differences, both for a gate in front of a slow
//! model rather than in front of a fast one:
//! - a *global brightness offset* (the median of frame − background) is removed before thresholding, so
//!   slow or sudden uniform brightness changes (clouds, auto exposure, a drifting sensor) are not motion;
//! - the background time constant is in seconds, not per frame, so the gate behaves the same whatever
//!   frame rate the camera delivers.
//!
//! The gate ([`MotionGate`]) applies the serve rule of issue 12: a frame is served when it is the stream's
//! first (or the first after a size change), when motion is active (raw motion within the last
//! [`MOTION_HOLD_S`]), when there was motion since the last served frame, when motion has just stopped (one
//! frame records the settled scene), when the prompt changed, or when the last served frame is older than
//! `refresh_s`. Everything else is dropped.

use crate::{Frame, PixelFormat, PrepError};

/// The small luma image is at most this many pixels wide (issue 12: "at most ~320 px"). Frigate works at
/// 1/6 of the frame height by default (180 rows for 1080p); 320 × 180 is the same size for 16:9.
pub const MAX_LUMA_WIDTH: u32 = 320;

/// Source rows read per small-image row. Averaging whole blocks (6 × 6 source pixels at 1080p) read every
/// byte of the frame and cost 1.3 ms (NV12) to 2.3 ms (RGB) per 1080p frame, over issue 12's 1 ms budget,
/// the pass being bound by memory traffic. Two evenly spaced rows of every block, all their columns, still
/// average 12 source pixels per small-image pixel at 1080p: more than Frigate's own downscale (cv2.resize
/// with linear interpolation reads 2 × 2 source pixels per output pixel), so sensor noise is still averaged
/// well below the 30-level threshold while a third of the bytes are read.
pub const ROWS_PER_BLOCK: usize = 2;

/// Time constant of the running-average background, in seconds. Frigate's `frame_alpha` of 0.01 per frame
/// at its default 5 detect frames/s is a time constant of 1 / (0.01 · 5) = 20 s. Expressed in seconds the
/// gate does not change behaviour when a camera sends 30 frames/s instead of 5.
pub const BACKGROUND_TAU_S: f64 = 20.0;

/// Fraction of changed pixels above which the frame counts as a global change (lights switched, the camera
/// switched to infrared, the lens was knocked): the background is reset to the frame. Frigate's
/// `lightning_threshold` default.
pub const LIGHTNING_FRACTION: f32 = 0.8;

/// Motion stays active this long after the last frame with motion, so an object that pauses for a frame
/// does not flap the MQTT motion topic ON/OFF, and the "settled" frame is taken once the scene is still.
pub const MOTION_HOLD_S: f64 = 1.0;

/// Frigate's default per-pixel threshold (`motion.threshold`: 30 on 0..255).
pub const DEFAULT_THRESHOLD: u8 = 30;

/// Default minimum changed area, as a fraction of the frame: Frigate's default `contour_area` of 10 pixels
/// in its 100-row motion image (≈ 178 × 100 for 16:9) is 0.056 % of the frame.
pub const DEFAULT_MIN_AREA: f64 = 0.0005;

/// Default `refresh_s`: a still scene is still looked at this often (issue 12).
pub const DEFAULT_REFRESH_S: f64 = 30.0;

/// What one frame showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MotionSample {
    /// Fraction of the small image's pixels that changed (isolated single pixels do not count).
    pub changed: f32,
    /// `changed ≥ min_area`, or a global change (lightning rule).
    pub motion: bool,
    /// The first frame of the stream, or the first after the frame size or format changed: no background
    /// to compare with yet.
    pub first: bool,
}

/// Frame difference against a slowly updated background on a small luma image.
#[derive(Debug, Clone)]
pub struct MotionDetector {
    threshold: f32,
    min_area: f32,
    /// (width, height, format) of the frames the state below belongs to.
    geometry: Option<(u32, u32, PixelFormat)>,
    /// Source pixels per small-image pixel, horizontally and vertically.
    step: (usize, usize),
    /// Small-image size.
    size: (usize, usize),
    /// Per source column (times 3 for RGB) sums over the sampled rows of one block row; reused between
    /// frames. u16 holds [`ROWS_PER_BLOCK`] × 255 and doubles the lanes of the vectorised add.
    cols: Vec<u16>,
    /// The current small luma image.
    luma: Vec<u8>,
    /// Running-average background, same size.
    background: Vec<f32>,
    /// 1 where a pixel changed; reused.
    mask: Vec<u8>,
    last_t: f64,
}

impl MotionDetector {
    /// `threshold`: per-pixel difference (0..255 luma) that counts as changed; `min_area`: fraction of the
    /// frame that must change for motion.
    pub fn new(threshold: u8, min_area: f64) -> Self {
        Self {
            threshold: f32::from(threshold),
            min_area: min_area as f32,
            geometry: None,
            step: (1, 1),
            size: (0, 0),
            cols: Vec::new(),
            luma: Vec::new(),
            background: Vec::new(),
            mask: Vec::new(),
            last_t: 0.0,
        }
    }

    /// The small image's size (width, height); (0, 0) before the first frame.
    pub fn luma_size(&self) -> (usize, usize) {
        self.size
    }

    /// Compare `frame`, captured at `t` seconds (any origin, non-decreasing), with the background and fold
    /// it into the background.
    ///
    /// # Errors
    /// The frame's planes do not fit its buffer ([`Frame::check`]).
    pub fn detect(&mut self, frame: &Frame, t: f64) -> Result<MotionSample, PrepError> {
        frame.check()?;
        let geometry = (frame.width, frame.height, frame.format);
        if self.geometry != Some(geometry) {
            self.reset(frame);
            self.downscale(frame);
            self.background = self.luma.iter().map(|&v| f32::from(v)).collect();
            self.last_t = t;
            return Ok(MotionSample {
                changed: 0.0,
                motion: false,
                first: true,
            });
        }
        self.downscale(frame);
        let offset = self.brightness_offset();
        let changed = self.changed_fraction(offset);
        let dt = (t - self.last_t).clamp(0.0, BACKGROUND_TAU_S);
        self.last_t = t;
        if changed > LIGHTNING_FRACTION {
            // A global change: the old background says nothing about the new scene.
            for (b, &v) in self.background.iter_mut().zip(&self.luma) {
                *b = f32::from(v);
            }
            return Ok(MotionSample {
                changed,
                motion: true,
                first: false,
            });
        }
        // Exponential moving average with a time constant in seconds (see BACKGROUND_TAU_S).
        let alpha = (1.0 - (-dt / BACKGROUND_TAU_S).exp()) as f32;
        for (b, &v) in self.background.iter_mut().zip(&self.luma) {
            *b += alpha * (f32::from(v) - *b);
        }
        Ok(MotionSample {
            changed,
            motion: changed >= self.min_area,
            first: false,
        })
    }

    fn reset(&mut self, frame: &Frame) {
        let (w, h) = (frame.width as usize, frame.height as usize);
        let sx = w.div_ceil(MAX_LUMA_WIDTH as usize).max(1);
        let sy = sx.min(h).max(1);
        self.geometry = Some((frame.width, frame.height, frame.format));
        self.step = (sx, sy);
        self.size = ((w / sx).max(1), (h / sy).max(1));
        let n = self.size.0 * self.size.1;
        self.luma = vec![0; n];
        self.mask = vec![0; n];
        let channels = if frame.format == PixelFormat::Rgb {
            3
        } else {
            1
        };
        self.cols = vec![0; w * channels];
    }

    /// Block means of the luma: for each block row, sum [`ROWS_PER_BLOCK`] evenly spaced source rows column
    /// by column (a widening add over contiguous bytes, which the compiler vectorises), then sum each block's
    /// columns. Y plane for NV12/I420; for RGB the luma is (R + 2G + B) / 4, close enough to BT.601/709 for
    /// change detection and computed on the column sums, so per source pixel the cost is the same byte add
    /// as for Y.
    fn downscale(&mut self, frame: &Frame) {
        let (sx, sy) = self.step;
        let (ow, oh) = self.size;
        let rgb = frame.format == PixelFormat::Rgb;
        let row_bytes = frame.width as usize * if rgb { 3 } else { 1 };
        let stride = frame.strides[0];
        let plane = frame.plane(0);
        let rows = sy.min(ROWS_PER_BLOCK);
        let n = (sx * rows) as u64;
        // Rounded block mean without a `div` per small-image pixel (a 20–30-cycle instruction, 57 600 times
        // a frame): (sum + d/2) / d as a multiply by ⌈2³²/d⌉ and a shift, exact while the dividend stays
        // below 2³²/d (here: at most 4 · 255 · 12 · 2 against d ≤ 4 · 12 · 2 at 1080p; asserted below).
        let d = if rgb { 4 * n } else { n };
        let inv = (1u64 << 32).div_ceil(d);
        let mean = |sum: u64| -> u8 {
            debug_assert!((sum + d / 2) < (1u64 << 32) / d);
            (((sum + d / 2) * inv) >> 32) as u8
        };
        // Row r of `rows`, centred in its share of the block: offsets 1 and 4 of a 6-row block.
        let row_start = |oy: usize, r: usize| (oy * sy + (2 * r + 1) * sy / (2 * rows)) * stride;
        for oy in 0..oh {
            self.cols.fill(0);
            if oy + 1 < oh {
                for r in 0..rows {
                    prefetch(&plane[row_start(oy + 1, r)..][..row_bytes]);
                }
            }
            for r in 0..rows {
                let start = row_start(oy, r);
                let row = &plane[start..start + row_bytes];
                for (c, &b) in self.cols.iter_mut().zip(row) {
                    *c += u16::from(b);
                }
            }
            let out = &mut self.luma[oy * ow..(oy + 1) * ow];
            if rgb {
                for (o, block) in out.iter_mut().zip(self.cols.chunks_exact(sx * 3)) {
                    let sum: u64 = block
                        .chunks_exact(3)
                        .map(|p| u64::from(p[0]) + 2 * u64::from(p[1]) + u64::from(p[2]))
                        .sum();
                    *o = mean(sum);
                }
            } else {
                for (o, block) in out.iter_mut().zip(self.cols.chunks_exact(sx)) {
                    let sum: u64 = block.iter().map(|&c| u64::from(c)).sum();
                    *o = mean(sum);
                }
            }
        }
    }

    /// Median of (frame − background), rounded: a uniform brightness change moves every pixel by about
    /// this much, an object only the pixels it covers (less than half the frame, or the lightning rule
    /// applies first in practice).
    fn brightness_offset(&self) -> f32 {
        let mut hist = [0u32; 511];
        for (&v, &b) in self.luma.iter().zip(&self.background) {
            // Rounded to the nearest level by truncating a positive number: `f32::round` is a libm call
            // on baseline x86-64 (no SSE4.1), once per small-image pixel. v − b lies in [−255, 255].
            let d = (f32::from(v) - b + 255.5) as usize;
            hist[d.min(510)] += 1;
        }
        let half = (self.luma.len() as u32).div_ceil(2);
        let mut seen = 0;
        for (i, &c) in hist.iter().enumerate() {
            seen += c;
            if seen >= half {
                return i as f32 - 255.0;
            }
        }
        0.0
    }

    /// Fraction of pixels whose difference from the background, less `offset`, exceeds the threshold and
    /// that have at least one changed 4-neighbour (a lone pixel is noise, not an object).
    fn changed_fraction(&mut self, offset: f32) -> f32 {
        let threshold = self.threshold;
        for ((m, &v), &b) in self.mask.iter_mut().zip(&self.luma).zip(&self.background) {
            *m = u8::from((f32::from(v) - b - offset).abs() > threshold);
        }
        let (w, h) = self.size;
        let mask = &self.mask;
        let mut count = 0usize;
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                if mask[i] == 0 {
                    continue;
                }
                let neighbour = (x > 0 && mask[i - 1] != 0)
                    || (x + 1 < w && mask[i + 1] != 0)
                    || (y > 0 && mask[i - w] != 0)
                    || (y + 1 < h && mask[i + w] != 0);
                count += usize::from(neighbour);
            }
        }
        count as f32 / mask.len().max(1) as f32
    }
}

/// Asks the CPU to start loading `bytes` into cache. The sampled rows are thousands of bytes apart, so the
/// hardware prefetcher, which follows one stream within a 4 KiB page, sees each row as a fresh stream and
/// the pass waits on memory; announcing the next block row's rows while the current one is summed hides
/// that latency. A hint only: no effect on results, and a no-op off x86-64.
#[inline]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: prefetching is a hint that never faults, and the pointer is in bounds anyway.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Why a frame goes to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeReason {
    /// The stream's first frame, or the first after a size or format change.
    First,
    /// Motion is active (raw motion within the last [`MOTION_HOLD_S`]).
    Motion,
    /// There was motion since the last served frame.
    MotionSinceServed,
    /// Motion just stopped: this frame records the settled scene.
    Settled,
    /// The prompt changed since the last served frame.
    PromptChanged,
    /// The last served frame is older than `refresh_s`.
    Refresh,
}

impl ServeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ServeReason::First => "first",
            ServeReason::Motion => "motion",
            ServeReason::MotionSinceServed => "motion_since_served",
            ServeReason::Settled => "settled",
            ServeReason::PromptChanged => "prompt_changed",
            ServeReason::Refresh => "refresh",
        }
    }
}

/// The gate's answer for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateDecision {
    /// `Some(why)`: send the frame on; `None`: drop it (no motion).
    pub serve: Option<ServeReason>,
    /// Motion active after this frame (the MQTT `motion` topic and the `motion_active` gauge).
    pub active: bool,
    /// What the detector saw.
    pub sample: MotionSample,
}

/// The per-stream serve rule over a [`MotionDetector`].
#[derive(Debug, Clone)]
pub struct MotionGate {
    detector: MotionDetector,
    refresh_s: f64,
    last_served: Option<f64>,
    last_motion: Option<f64>,
    active: bool,
    motion_since_served: bool,
}

impl MotionGate {
    /// `threshold` and `min_area` as [`MotionDetector::new`]; `refresh_s`: serve a frame at least this often.
    pub fn new(threshold: u8, min_area: f64, refresh_s: f64) -> Self {
        Self {
            detector: MotionDetector::new(threshold, min_area),
            refresh_s,
            last_served: None,
            last_motion: None,
            active: false,
            motion_since_served: false,
        }
    }

    /// Frigate's defaults (threshold 30, min_area 0.0005) and `refresh_s` 30.
    pub fn with_defaults() -> Self {
        Self::new(DEFAULT_THRESHOLD, DEFAULT_MIN_AREA, DEFAULT_REFRESH_S)
    }

    /// Whether motion is active (after the last frame decided).
    pub fn active(&self) -> bool {
        self.active
    }

    /// The source was reconnected: forget the background, so the next frame is served as a first frame
    /// (the scene may have changed while nothing arrived). The motion state is kept until that frame.
    pub fn restart(&mut self) {
        self.detector.geometry = None;
    }

    /// Decide for `frame`, captured at `t` seconds (non-decreasing). `prompt_changed`: the stream's prompt
    /// differs from the one in force when the last served frame was decided.
    ///
    /// # Errors
    /// The frame's planes do not fit its buffer; the gate's state is unchanged.
    pub fn decide(
        &mut self,
        frame: &Frame,
        t: f64,
        prompt_changed: bool,
    ) -> Result<GateDecision, PrepError> {
        let sample = self.detector.detect(frame, t)?;
        if sample.motion {
            self.last_motion = Some(t);
            self.motion_since_served = true;
        }
        let was_active = self.active;
        self.active = self.last_motion.is_some_and(|m| t - m < MOTION_HOLD_S);
        let serve = if sample.first || self.last_served.is_none() {
            Some(ServeReason::First)
        } else if self.active {
            Some(ServeReason::Motion)
        } else if self.motion_since_served {
            Some(ServeReason::MotionSinceServed)
        } else if was_active {
            Some(ServeReason::Settled)
        } else if prompt_changed {
            Some(ServeReason::PromptChanged)
        } else if self.last_served.is_some_and(|s| t - s >= self.refresh_s) {
            Some(ServeReason::Refresh)
        } else {
            None
        };
        if serve.is_some() {
            self.last_served = Some(t);
            self.motion_since_served = false;
        }
        Ok(GateDecision {
            serve,
            active: self.active,
            sample,
        })
    }
}

/// Generated clips for tests and benchmarks: a still "photo" with sensor noise, optional brightness drift
/// and an object crossing. Deterministic (a fixed xorshift generator), so results are reproducible.
pub mod synth {
    /// A scene description; [`Scene::frame`] renders frame `i` as packed RGB.
    #[derive(Debug, Clone)]
    pub struct Scene {
        pub width: u32,
        pub height: u32,
        pub fps: f64,
        /// Gaussian-ish sensor noise, standard deviation in luma levels.
        pub noise: f64,
        /// Uniform brightness change over the whole clip, in levels per second.
        pub drift_per_s: f64,
        /// Brightness change that grows from 0 on the left edge to this many levels per second on the right
        /// edge (a slow non-uniform lighting change: the sun moving across a room).
        pub gradient_drift_per_s: f64,
        /// An object crossing the frame left to right: (start s, duration s).
        pub crossing: Option<(f64, f64)>,
        pub seed: u64,
    }

    impl Scene {
        /// A still 640×480 scene at 5 fps with noise σ = 3 and a slow drift of 10 levels per minute.
        pub fn still() -> Self {
            Self {
                width: 640,
                height: 480,
                fps: 5.0,
                noise: 3.0,
                drift_per_s: 10.0 / 60.0,
                gradient_drift_per_s: 0.0,
                crossing: None,
                seed: 1,
            }
        }

        /// The "photo": smooth gradients plus texture, deterministic.
        fn base(&self, x: u32, y: u32) -> [f64; 3] {
            let (fx, fy) = (
                f64::from(x) / f64::from(self.width),
                f64::from(y) / f64::from(self.height),
            );
            let texture = (((x / 8) * 7 + (y / 8) * 13) % 17) as f64 * 3.0;
            [
                60.0 + 90.0 * fx + texture,
                80.0 + 60.0 * fy + texture,
                70.0 + 40.0 * (1.0 - fx) + texture,
            ]
        }

        /// Time of frame `i` in seconds.
        pub fn time(&self, i: usize) -> f64 {
            i as f64 / self.fps
        }

        /// The crossing object's box (x0, y0, x1, y1) at frame `i`, if it is in view.
        pub fn object(&self, i: usize) -> Option<(u32, u32, u32, u32)> {
            let (start, dur) = self.crossing?;
            let t = self.time(i);
            if t < start || t > start + dur {
                return None;
            }
            let (w, h) = (f64::from(self.width), f64::from(self.height));
            let ow = w * 0.12;
            let x0 = -ow + (w + ow) * (t - start) / dur;
            let x1 = x0 + ow;
            let (x0, x1) = (x0.max(0.0) as u32, x1.min(w).max(0.0) as u32);
            (x1 > x0).then_some((x0, (h * 0.35) as u32, x1, (h * 0.85) as u32))
        }

        /// Frame `i`, packed RGB.
        pub fn frame(&self, i: usize) -> Vec<u8> {
            let t = self.time(i);
            let mut rng = self
                .seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i as u64 + 1);
            let mut noise = || {
                // Sum of 4 uniforms in [-0.5, 0.5): σ = sqrt(4/12) ≈ 0.577; scaled to `noise`.
                let mut s = 0.0;
                for _ in 0..4 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    s += (rng >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                }
                s / 0.577
            };
            let obj = self.object(i);
            let mut out = Vec::with_capacity((self.width * self.height * 3) as usize);
            for y in 0..self.height {
                for x in 0..self.width {
                    let inside = obj.is_some_and(|(x0, y0, x1, y1)| {
                        (x0..x1).contains(&x) && (y0..y1).contains(&y)
                    });
                    let light = self.drift_per_s * t
                        + self.gradient_drift_per_s * t * f64::from(x) / f64::from(self.width);
                    let px = if inside {
                        [200.0, 40.0, 40.0]
                    } else {
                        self.base(x, y)
                    };
                    let n = self.noise * noise();
                    for c in px {
                        out.push((c + light + n).round().clamp(0.0, 255.0) as u8);
                    }
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::synth::Scene;
    use super::*;

    /// Run a scene through a gate with default settings; returns the decisions.
    fn run(scene: &Scene, frames: usize, refresh_s: f64) -> Vec<GateDecision> {
        let mut gate = MotionGate::new(DEFAULT_THRESHOLD, DEFAULT_MIN_AREA, refresh_s);
        (0..frames)
            .map(|i| {
                let rgb = scene.frame(i);
                let frame = Frame::rgb(scene.width, scene.height, &rgb);
                gate.decide(&frame, scene.time(i), false).unwrap()
            })
            .collect()
    }

    #[test]
    fn still_scene_with_noise_and_drift_is_served_only_on_refresh() {
        // 300 frames at 5 fps = 60 s; issue 12: model calls ≤ 1 + 60 / refresh_s.
        for refresh_s in [30.0, 10.0] {
            let d = run(&Scene::still(), 300, refresh_s);
            let served: Vec<_> = d.iter().filter_map(|d| d.serve).collect();
            let bound = 1 + (60.0 / refresh_s) as usize;
            assert!(served.len() <= bound, "{refresh_s}: {served:?}");
            assert_eq!(served[0], ServeReason::First);
            assert!(
                served[1..].iter().all(|r| *r == ServeReason::Refresh),
                "{served:?}"
            );
            assert_eq!(served.len(), 1 + (59.8 / refresh_s) as usize);
            assert!(d.iter().all(|d| !d.active));
        }
    }

    #[test]
    fn faster_drift_and_a_moving_shadow_are_not_motion() {
        // 60 levels per minute uniformly, and up to 20 levels per minute more on the right edge.
        let scene = Scene {
            drift_per_s: 1.0,
            gradient_drift_per_s: 20.0 / 60.0,
            ..Scene::still()
        };
        let d = run(&scene, 300, 30.0);
        let served = d.iter().filter(|d| d.serve.is_some()).count();
        assert!(served <= 3, "{served}");
    }

    #[test]
    fn crossing_object_makes_every_frame_during_motion_eligible() {
        let scene = Scene {
            crossing: Some((20.0, 3.0)),
            ..Scene::still()
        };
        let d = run(&scene, 300, 30.0);
        let mut in_view = 0;
        for (i, dec) in d.iter().enumerate() {
            if scene.object(i).is_some() && i > 0 && scene.object(i - 1).is_some() {
                in_view += 1;
                assert_eq!(dec.serve, Some(ServeReason::Motion), "frame {i}: {dec:?}");
                assert!(dec.active);
            }
        }
        assert!(in_view >= 13, "{in_view}");
        // After the object left: the hold, then exactly one settled frame, then nothing until refresh.
        let last = (0..300).rev().find(|&i| scene.object(i).is_some()).unwrap();
        let after: Vec<_> = d[last + 1..].iter().map(|d| d.serve).collect();
        let settled = after
            .iter()
            .position(|s| *s == Some(ServeReason::Settled))
            .unwrap();
        assert!(
            settled as f64 <= MOTION_HOLD_S * scene.fps + 1.0,
            "{after:?}"
        );
        let rest = after[settled + 1..].iter().flatten().collect::<Vec<_>>();
        assert!(rest.iter().all(|r| **r == ServeReason::Refresh), "{rest:?}");
        // The still part before the crossing is gated like the still clip.
        assert_eq!(
            d[..100].iter().filter(|d| d.serve.is_some()).count(),
            1,
            "{:?}",
            &d[..100]
        );
    }

    #[test]
    fn prompt_change_and_size_change_are_served() {
        let scene = Scene::still();
        let mut gate = MotionGate::with_defaults();
        let a = scene.frame(0);
        let f = Frame::rgb(640, 480, &a);
        assert_eq!(
            gate.decide(&f, 0.0, false).unwrap().serve,
            Some(ServeReason::First)
        );
        assert_eq!(gate.decide(&f, 0.2, false).unwrap().serve, None);
        assert_eq!(
            gate.decide(&f, 0.4, true).unwrap().serve,
            Some(ServeReason::PromptChanged)
        );
        let small = vec![100u8; 320 * 240 * 3];
        let d = gate
            .decide(&Frame::rgb(320, 240, &small), 0.6, false)
            .unwrap();
        assert_eq!(d.serve, Some(ServeReason::First));
        assert!(d.sample.first);
        assert_eq!(
            gate.decide(&Frame::rgb(320, 240, &small), 0.8, false)
                .unwrap()
                .serve,
            None
        );
        gate.restart();
        assert_eq!(
            gate.decide(&Frame::rgb(320, 240, &small), 1.0, false)
                .unwrap()
                .serve,
            Some(ServeReason::First)
        );
    }

    /// A deterministic texture: big blocks of pseudo-random grey levels.
    fn texture(w: usize, h: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let mut r = seed ^ ((x / 4) as u64) << 20 ^ (y / 4) as u64;
                r = r.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let v = (r >> 56) as u8;
                out.extend([v, v, v]);
            }
        }
        out
    }

    #[test]
    fn half_the_frame_changing_is_motion_a_uniform_jump_is_not() {
        let mut gate = MotionGate::new(30, 0.0005, 1e9);
        let dark = vec![20u8; 64 * 48 * 3];
        // Half the frame bright: not uniform, so the offset does not absorb it; 50 % < 80 %: motion.
        let mut half = dark.clone();
        half[..64 * 24 * 3].fill(200);
        gate.decide(&Frame::rgb(64, 48, &dark), 0.0, false).unwrap();
        let x = gate.decide(&Frame::rgb(64, 48, &half), 0.2, false).unwrap();
        assert!(x.sample.motion && x.sample.changed > 0.4, "{x:?}");
        // Uniform jump: removed by the brightness offset, no motion at all.
        let bright = vec![230u8; 64 * 48 * 3];
        let mut det = MotionDetector::new(30, 0.0005);
        det.detect(&Frame::rgb(64, 48, &dark), 0.0).unwrap();
        let s = det.detect(&Frame::rgb(64, 48, &bright), 0.2).unwrap();
        assert_eq!(s.changed, 0.0, "{s:?}");
    }

    #[test]
    fn a_whole_new_scene_resets_the_background_once() {
        // The same texture inverted (a camera switching to infrared looks like this): differences spread
        // over the whole range, so the brightness offset cannot absorb them.
        let a = texture(64, 48, 1);
        let b: Vec<u8> = a.iter().map(|v| 255 - v).collect();
        let mut det = MotionDetector::new(30, 0.0005);
        det.detect(&Frame::rgb(64, 48, &a), 0.0).unwrap();
        let s = det.detect(&Frame::rgb(64, 48, &b), 0.2).unwrap();
        assert!(s.motion && s.changed > LIGHTNING_FRACTION, "{s:?}");
        // The background is now the new scene: no motion from the next frame on.
        let s = det.detect(&Frame::rgb(64, 48, &b), 0.4).unwrap();
        assert!(!s.motion && s.changed == 0.0, "{s:?}");
    }

    #[test]
    fn nv12_and_i420_use_the_y_plane_and_small_image_is_at_most_320_wide() {
        let (w, h) = (1920usize, 1080usize);
        let mut nv12 = vec![128u8; w * h * 3 / 2];
        let mut det = MotionDetector::new(30, 0.0005);
        det.detect(&Frame::nv12(w as u32, h as u32, &nv12), 0.0)
            .unwrap();
        assert_eq!(det.luma_size(), (320, 180));
        // Chroma changes are not motion; a luma square of 5 % of the frame is.
        nv12[w * h..].fill(10);
        let s = det
            .detect(&Frame::nv12(w as u32, h as u32, &nv12), 0.2)
            .unwrap();
        assert!(!s.motion, "{s:?}");
        for y in 100..400 {
            nv12[y * w + 100..y * w + 445].fill(250);
        }
        let s = det
            .detect(&Frame::nv12(w as u32, h as u32, &nv12), 0.4)
            .unwrap();
        assert!(s.motion && (0.04..0.06).contains(&s.changed), "{s:?}");
        let i420 = vec![0u8; 100 * 50 * 3 / 2];
        let mut det = MotionDetector::new(30, 0.0005);
        det.detect(&Frame::i420(100, 50, &i420), 0.0).unwrap();
        assert_eq!(det.luma_size(), (100, 50));
        let e = det.detect(&Frame::i420(100, 50, &i420[..10]), 0.2);
        assert!(e.is_err());
    }
}
