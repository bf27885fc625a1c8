//! bf16 GEMM on the CPU: `y = x · Wᵀ (+ b)` with the weight packed once at load time.
//!
//! In: a linear layer's weight `W [n, k]` bf16 (packed by [`PackedBf16::pack`] when the layer loads), then per
//! call `x [m, k]` bf16 and an optional bias `[n]`. Out: `y [m, n]` bf16, accumulated in f32 and rounded once
//! (the bias is added in f32 before that rounding). Runs on the caller's thread and candle's rayon pool.
//!
//! Why our own kernel: candle 0.11.1 has no CPU bf16 GEMM (it widens both operands to f32 on every call), and
//! this CPU class has AVX-512 BF16, whose `vdpbf16ps` multiplies 32 bf16 pairs and adds them into 16 f32 lanes
//! in one instruction. The weight is stored the way that instruction wants it: panels of [`NR`] output
//! columns, and inside a panel, for each pair of input features `(2p, 2p+1)`, the [`NR`] columns' two values
//! side by side (one `u32` per column). A register-blocked micro-kernel then keeps `R ≤ MR` rows × 32
//! columns of f32 accumulators in zmm registers and, per feature pair, loads two weight vectors and
//! broadcasts one `u32` of `x` per row. docs/benchmarks.md compares this against the `gemmkit` crate.
//!
//! The instruction set is chosen at run time ([`Level::best`]): AMX tiles (`tdpbf16ps`, reading the same
//! panels as tiles; see [`amx`]), else AVX-512 BF16, else AVX2+FMA (the same packed layout, each bf16 widened
//! to f32 by a shift), else portable scalar code. Levels round a pair's products differently, so their bits
//! differ slightly; one process uses one level for every call. Whatever the level, every
//! output is one sequential chain over the feature pairs in order — independent of `m`, of the row block it
//! falls in and of the thread that computes it — so a row's result does not depend on the other rows of the
//! call (engine.rs's draft blocks rely on that; tested below).

use half::bf16;
use rayon::prelude::*;

use super::bf16_lanes;
use super::huge_pages::HugeBuf;

/// Output columns per packed panel (two zmm registers of 16 f32 lanes).
pub const NR: usize = 32;
/// Most rows per micro-kernel call: 12 × 2 accumulators + 2 weight vectors fit AVX-512's 32 registers.
pub const MR: usize = 12;
/// Feature pairs per K block: one panel slice (`KC · NR · 4` = 32 KiB) stays in L1 while the rows pass.
const KC: usize = 256;
/// Rows per task: an `MC × KC` slice of packed `x` (96 KiB) stays in L2.
const MC: usize = 8 * MR;
/// Most columns per task; fewer when that leaves too few tasks for the pool.
const NC_MAX: usize = 8 * NR;

/// The instruction set a call runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// AMX tiles (`tdpbf16ps`: a 16 × 32 bf16 tile times a 32 × 16 tile into 16 × 16 f32 in one instruction).
    Amx,
    /// `vdpbf16ps` (AVX-512F + AVX-512 BF16).
    Avx512Bf16,
    /// bf16 widened to f32 by a shift, 256-bit FMA.
    Avx2Fma,
    /// Portable Rust.
    Scalar,
}

impl Level {
    /// The fastest level this CPU runs, detected once. `REXOMNI_BF16_LEVEL=<name>` (a [`Level::name`]) picks a
    /// slower one instead, so one binary measures the levels against each other end to end.
    pub fn best() -> Level {
        static BEST: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let all = Level::available();
            match std::env::var("REXOMNI_BF16_LEVEL") {
                Ok(want) => match all.iter().find(|l| l.name() == want) {
                    Some(&l) => l,
                    None => {
                        tracing::warn!(
                            requested = %want,
                            available = ?all.iter().map(|l| l.name()).collect::<Vec<_>>(),
                            "REXOMNI_BF16_LEVEL names no level this CPU runs; using the fastest."
                        );
                        all[0]
                    }
                },
                Err(_) => all[0],
            }
        })
    }

    /// Every level this CPU runs, fastest first (tests run each).
    pub fn available() -> Vec<Level> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if amx::usable() {
                v.push(Level::Amx);
            }
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bf16")
            {
                v.push(Level::Avx512Bf16);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                v.push(Level::Avx2Fma);
            }
        }
        v.push(Level::Scalar);
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Amx => "amx",
            Level::Avx512Bf16 => "avx512bf16",
            Level::Avx2Fma => "avx2+fma",
            Level::Scalar => "scalar",
        }
    }
}

/// A `[n, k]` weight in the pair-interleaved panel layout (see the module header).
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// Pairs per panel as stored: `ceil(k / 2)` (an odd `k` pads the last pair with a zero) rounded up to a
    /// whole AMX tile ([`amx::PAIRS`]), the padding zero, so a tile load never reads past a panel and the
    /// padded pairs add exact zeros.
    kps: usize,
    /// `ceil(n / NR)` panels of `kps × NR` words; columns past `n` are zero. In huge pages where Linux allows:
    /// a decode step streams the whole weight (huge_pages.rs).
    data: HugeBuf<u32>,
}

/// `bits` of two bf16 values as one little-endian word: `lo` in the low half, which `vdpbf16ps` pairs with the
/// low half of the other operand.
fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | ((hi.to_bits() as u32) << 16)
}

fn lo_f32(w: u32) -> f32 {
    f32::from_bits(w << 16)
}

fn hi_f32(w: u32) -> f32 {
    f32::from_bits(w & 0xffff_0000)
}

impl PackedBf16 {
    /// Packs a row-major `[n, k]` weight (a `Linear` weight: one row per output feature).
    pub fn pack(w: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "weight is {} values, not [{n}, {k}]",
            w.len()
        );
        let kp = k.div_ceil(2);
        let kps = kp.next_multiple_of(amx::PAIRS);
        let panels = n.div_ceil(NR);
        let mut data = HugeBuf::new(panels * kps * NR, 0u32);
        data.par_chunks_mut(kps * NR)
            .enumerate()
            .for_each(|(panel, out)| {
                for c in 0..NR.min(n - panel * NR) {
                    let row = &w[(panel * NR + c) * k..(panel * NR + c + 1) * k];
                    for p in 0..kp {
                        let hi = row.get(2 * p + 1).copied().unwrap_or(bf16::ZERO);
                        out[p * NR + c] = pair(row[2 * p], hi);
                    }
                }
            });
        Self { n, k, kps, data }
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes of the packed panels (what one call reads of the weight).
    pub fn packed_bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// The weight back in row-major `[n, k]` (exact: packing only moves values).
    pub fn unpack(&self) -> Vec<bf16> {
        let mut w = vec![bf16::ZERO; self.n * self.k];
        for (j, row) in w.chunks_mut(self.k.max(1)).enumerate().take(self.n) {
            let (panel, c) = (j / NR, j % NR);
            for (i, v) in row.iter_mut().enumerate() {
                let word = self.data[panel * self.kps * NR + (i / 2) * NR + c];
                *v = bf16::from_bits(if i % 2 == 0 {
                    word as u16
                } else {
                    (word >> 16) as u16
                });
            }
        }
        w
    }

    /// `x [m, k] · Wᵀ (+ bias)` → `[m, n]` on the best level of this CPU.
    pub fn matmul(&self, x: &[bf16], m: usize, bias: Option<&[f32]>) -> Vec<bf16> {
        self.matmul_on(Level::best(), x, m, bias)
    }

    /// [`Self::matmul`] on a given level (tests and the micro-benchmark force each one).
    pub fn matmul_on(&self, level: Level, x: &[bf16], m: usize, bias: Option<&[f32]>) -> Vec<bf16> {
        self.matmul_into(level, x, m, bias, self.n, self.k)
    }

    /// [`Self::matmul`] without the final rounding: the f32 sums plus bias (the lm_head's logits).
    pub fn matmul_f32(&self, x: &[bf16], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        self.matmul_into(Level::best(), x, m, bias, self.n, self.k)
    }

    /// `x [m, k] · Wᵀ` for the first `cols` output features only (`cols ≤ n`), as f32 sums `[m, cols]`: each
    /// the same bits as in a full call (every output is its own chain). The prefill attention's scores: a
    /// block of positions sees a prefix of the keys.
    pub fn matmul_f32_cols(&self, x: &[bf16], m: usize, cols: usize) -> Vec<f32> {
        assert!(cols <= self.n, "{cols} columns of a weight with {}", self.n);
        self.matmul_into(Level::best(), x, m, None, cols, self.k)
    }

    /// `x [m, k] · Wᵀ` over the weight's first `k ≤ self.k()` input features only, as f32 sums `[m, n]`: the
    /// same bits as a full call with `x` padded by zeros (a zero pair adds exactly nothing to a chain). The
    /// prefill attention's weighted sum: a block of positions sees a prefix of the values.
    pub fn matmul_f32_within(&self, x: &[bf16], m: usize, k: usize) -> Vec<f32> {
        assert!(
            k <= self.k,
            "{k} input features of a weight with {}",
            self.k
        );
        self.matmul_into(Level::best(), x, m, None, self.n, k)
    }

    /// The f32 sums before the final rounding (tests compare them bit for bit).
    #[cfg(test)]
    fn matmul_f32_on(&self, level: Level, x: &[bf16], m: usize) -> Vec<f32> {
        self.matmul_into(level, x, m, None, self.n, self.k)
    }

    fn matmul_into<T: Out>(
        &self,
        level: Level,
        x: &[bf16],
        m: usize,
        bias: Option<&[f32]>,
        n: usize,
        k: usize,
    ) -> Vec<T> {
        // `kp` pairs of `x` (a prefix of the weight's when `k < self.k`); panels stay `self.kps` pairs apart.
        let (kp, stride) = (k.div_ceil(2), self.kps);
        assert_eq!(x.len(), m * k, "x is {} values, not [{m}, {k}]", x.len());
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "bias is {} values, not {n}", b.len());
        }
        assert!(
            level == Level::Scalar || Level::available().contains(&level),
            "{level:?} is not supported on this CPU"
        );
        let mut out = vec![T::from_f32(0.0); m * n];
        if m == 0 || n == 0 {
            return out;
        }
        let out_ptr = SendPtr(out.as_mut_ptr());
        #[cfg(target_arch = "x86_64")]
        if level == Level::Amx {
            self.matmul_amx(x, m, (n, k), bias, out_ptr);
            return out;
        }
        let a = pack_rows(x, m, k, kp);
        let (row_blocks, nc, col_blocks) = split(m, MC, n);
        (0..row_blocks * col_blocks)
            .into_par_iter()
            .with_max_len(super::cpu_pool::max_tasks_per_job())
            .for_each(|t| {
                let (ib, jb) = (t / col_blocks, t % col_blocks);
                let (i0, j0) = (ib * MC, jb * nc);
                let (rows, cols) = (MC.min(m - i0), nc.min(n - j0));
                let panels = cols.div_ceil(NR);
                let ldc = panels * NR;
                let mut c = LineAligned::<f32>::zeroed(rows * ldc);
                for p0 in (0..kp).step_by(KC) {
                    let kc = KC.min(kp - p0);
                    for pj in 0..panels {
                        let b = &self.data[((j0 / NR + pj) * stride + p0) * NR..][..kc * NR];
                        for r0 in (0..rows).step_by(MR) {
                            let rb = MR.min(rows - r0);
                            // Rows `i0 + r0 ..` sit in their MR block of `a` (MC is a multiple of MR).
                            let ablk = &a[(i0 + r0) * kp + p0 * rb..][..kc * rb];
                            let cblk = &mut c[r0 * ldc + pj * NR..];
                            micro(level, rb, ablk, b, kc, cblk, ldc);
                        }
                    }
                }
                // SAFETY: task `t` alone writes rows i0..i0+rows × columns j0..j0+cols of `out`.
                unsafe { store_block(out_ptr, n, (i0, rows), (j0, cols), &c, ldc, bias) };
            });
        out
    }

    /// [`Self::matmul_into`] on AMX tiles. `x` is copied into whole tiles first (rows padded to 16, pairs to
    /// [`amx::PAIRS`], both with zeros; each tile's 1 KiB contiguous and cache-line aligned), so every tile load
    /// is a full one straight from memory; each task then runs 32 × 32 (or, for a last odd block of 16 rows,
    /// 16 × 32) output blocks through K in blocks of [`KC`] pairs, the f32 sums held in tiles within a K block
    /// and in the task's (aligned) buffer between them.
    /// Every output is one chain over the pairs in order, tile by tile, whatever `m` is: rows stay
    /// independent of each other, as on the other levels.
    #[cfg(target_arch = "x86_64")]
    fn matmul_amx<T: Out>(
        &self,
        x: &[bf16],
        m: usize,
        (n, k): (usize, usize),
        bias: Option<&[f32]>,
        out_ptr: SendPtr<T>,
    ) {
        // `kps` padded pairs of `x` (a prefix of the weight's when `k < self.k`); panels `self.kps` pairs apart.
        let kps = k.div_ceil(2).next_multiple_of(amx::PAIRS).min(self.kps);
        let stride = self.kps;
        let a = amx::pack_rows(x, m, k, kps);
        let mp = m.next_multiple_of(amx::ROWS);
        let (row_blocks, mc, nc, col_blocks) = if mp <= 2 * amx::ROWS {
            // Few rows (decode): the call is one stream over the weight, so tasks are cut by weight bytes
            // (about `amx::TASK_BYTES` of panels each) rather than into a few per thread: the last task of a call
            // otherwise leaves the other core idle while it streams several MiB (a 704 KiB panel of `down_proj`
            // times eight), at every one of the ~250 calls of a real-config step.
            let panels = (amx::TASK_BYTES / (kps * NR * 4)).clamp(1, NC_MAX / NR);
            let nc = panels * NR;
            (1, mp, nc, n.div_ceil(nc))
        } else {
            // As few row blocks as [`amx::MC_MAX`] allows, of equal size: each row block streams the whole
            // weight from memory again, and a prefill's weights (6 GB at the real config) do not stay cached
            // between row blocks.
            let cap = amx::row_cap();
            let mc = mp
                .div_ceil(mp.div_ceil(cap))
                .next_multiple_of(2 * amx::ROWS);
            let (row_blocks, nc, col_blocks) = split(mp, mc, n);
            (row_blocks, mc, nc, col_blocks)
        };
        (0..row_blocks * col_blocks)
            .into_par_iter()
            .with_max_len(super::cpu_pool::max_tasks_per_job())
            .for_each(|t| {
                let (ib, jb) = (t / col_blocks, t % col_blocks);
                let (i0, j0) = (ib * mc, jb * nc);
                // Padded rows of this task (a multiple of 16) and the real ones among them.
                let (rows_p, cols) = (mc.min(mp - i0), nc.min(n - j0));
                let rows = rows_p.min(m - i0);
                let panels = cols.div_ceil(NR);
                let ldc = panels * NR;
                let _tiles = amx::Tiles::configure();
                // The task's f32 sums: this thread's buffer from earlier tasks, its stale values never read (the
                // first K block starts the sums from zero tiles); a fresh zeroed one per task was a pass over
                // megabytes per prefill call.
                amx::SUMS.with_borrow_mut(|c| {
                    if c.len() < rows_p * ldc {
                        *c = LineAligned::zeroed(rows_p * ldc);
                    }
                    // Few rows (decode): the weight streams from memory once, so each panel is read front to
                    // back in one go (one long sequential run per panel), the sums staying in tiles throughout,
                    // and its lines are asked for 4 KiB ahead (prefetch.rs): a tile load waits for all 32 lines
                    // of its two tiles at once, and without the hint a real-config decode step took 1.2–1.8×
                    // as long in place. More rows: K blocks outermost, so a block of `x` and of each panel stay
                    // cached while they are reused.
                    let stream = rows_p <= 2 * amx::ROWS;
                    let kc_max = if stream { kps } else { KC };
                    for p0 in (0..kps).step_by(kc_max) {
                        let kc = kc_max.min(kps - p0);
                        for pj in 0..panels {
                            let b = &self.data[((j0 / NR + pj) * stride + p0) * NR..][..kc * NR];
                            for r0 in (0..rows_p).step_by(2 * amx::ROWS) {
                                let two = rows_p - r0 >= 2 * amx::ROWS;
                                let ablk = &a[(i0 + r0) * kps + p0 * amx::ROWS..];
                                let cblk = &mut c[r0 * ldc + pj * NR..];
                                let block = if two {
                                    amx::block::<2>
                                } else {
                                    amx::block::<1>
                                };
                                // SAFETY: tiles are configured on this thread; `ablk` starts at the tile of rows
                                // `i0 + r0` and pair `p0` (`kc` pairs of tiles follow, and the next 16 rows' `16 · kps`
                                // words on when `two`), `b` holds `kc` pairs of a panel, `cblk` as many rows of `ldc`.
                                let (lower, fresh) = (amx::ROWS * kps, p0 == 0);
                                let prefetch_b = stream;
                                unsafe {
                                    block(
                                        ablk.as_ptr(),
                                        lower,
                                        b.as_ptr(),
                                        kc,
                                        cblk.as_mut_ptr(),
                                        ldc,
                                        fresh,
                                        prefetch_b,
                                    )
                                }
                            }
                        }
                    }
                    // SAFETY: task `t` alone writes rows i0..i0+rows × columns j0..j0+cols of `out`.
                    unsafe { store_block(out_ptr, n, (i0, rows), (j0, cols), c, ldc, bias) };
                });
            });
    }
}

/// Sets the most rows per AMX task for the following calls (a multiple of 32, at least 32; `None`: the
/// default [`amx::MC_MAX`]), only so that `rexbench-gemm --vision-sweep` and `rexbench --batch-ab` can compare
/// caps in one process.
/// Results do not depend on it (every output is one chain over the pairs in order).
pub fn set_amx_row_cap(rows: Option<usize>) {
    amx::set_row_cap(rows.map_or(amx::MC_MAX, |r| r.max(32).next_multiple_of(32)));
}

/// How a call splits into tasks: `(row blocks, columns per block, column blocks)` for `m` rows in blocks of
/// `mc`. Enough column blocks that every thread gets several tasks even for one row block (decode).
fn split(m: usize, mc: usize, n: usize) -> (usize, usize, usize) {
    let row_blocks = m.div_ceil(mc);
    let want = rayon::current_num_threads() * 4;
    let col_tasks = want.div_ceil(row_blocks).max(1);
    let nc = (n.div_ceil(col_tasks))
        .next_multiple_of(NR)
        .clamp(NR, NC_MAX);
    (row_blocks, nc, n.div_ceil(nc))
}

/// Writes a task's f32 sums (`c`, rows of `ldc`) into `out [.., n]` at rows `i0..i0 + rows` and columns
/// `j0..j0 + cols`, adding the bias in f32 before the one rounding to `T`.
///
/// SAFETY: `out` holds at least `(i0 + rows) · n` values and outlives the call, and no other thread writes
/// that block meanwhile.
unsafe fn store_block<T: Out>(
    out: SendPtr<T>,
    n: usize,
    (i0, rows): (usize, usize),
    (j0, cols): (usize, usize),
    c: &[f32],
    ldc: usize,
    bias: Option<&[f32]>,
) {
    for r in 0..rows {
        let dst = std::slice::from_raw_parts_mut(out.get().add((i0 + r) * n + j0), cols);
        T::store(dst, &c[r * ldc..][..cols], bias.map(|b| &b[j0..j0 + cols]));
    }
}

/// The output element: bf16 for the model, f32 (the sums unrounded) for the lm_head and tests.
trait Out: Copy + Send + Sync {
    fn from_f32(v: f32) -> Self;
    /// `dst[i] = from_f32(src[i] + bias[i])`.
    fn store(dst: &mut [Self], src: &[f32], bias: Option<&[f32]>);
}

impl Out for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn store(dst: &mut [Self], src: &[f32], bias: Option<&[f32]>) {
        // Vectorised; `half`'s scalar rounding here was 14 % of a bf16 frame once the products ran on AMX.
        bf16_lanes::round_into(dst, src, bias)
    }
}

impl Out for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn store(dst: &mut [Self], src: &[f32], bias: Option<&[f32]>) {
        match bias {
            Some(b) => dst
                .iter_mut()
                .zip(src.iter().zip(b))
                .for_each(|(d, (s, b))| *d = s + b),
            None => dst.copy_from_slice(src),
        }
    }
}

/// A buffer of 4-byte values (`u32` or `f32`) that starts on a cache line. Every AMX tile row is 64
/// bytes, so a tile load from a buffer that does not (malloc's 16-byte alignment) reads each row across two
/// lines, and such a load cost 24 ns against 3.2 ns aligned on this VM: with the packed rows of `x` and the f32
/// sums misaligned, four tile loads per four `tdpbf16ps` held a core at 0.8 TFLOP/s instead of 2.3. The weight
/// panels were aligned all along ([`HugeBuf`]); the per-call buffers now are too.
pub(crate) struct LineAligned<T: Copy> {
    lines: Vec<Line<T>>,
    len: usize,
}

/// 16 four-byte values: one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line<T: Copy>([T; 16]);

impl<T: Copy + Default> LineAligned<T> {
    pub(crate) fn zeroed(len: usize) -> Self {
        const { assert!(size_of::<T>() == 4, "a line holds 16 four-byte values") };
        Self {
            lines: vec![Line([T::default(); 16]); len.div_ceil(16)],
            len,
        }
    }
}

impl<T: Copy + Default + Send + Sync> LineAligned<T> {
    /// `blocks · lines_per_block` lines of 16 values, each block's lines zeros then `fill(block, lines)`, blocks
    /// in parallel on the rayon pool: a block is zeroed just before its fill, while its lines are in cache, instead
    /// of a zeroing pass over the whole buffer first.
    pub(crate) fn from_line_blocks(
        blocks: usize,
        lines_per_block: usize,
        fill: impl Fn(usize, &mut [[T; 16]]) + Sync,
    ) -> Self {
        const { assert!(size_of::<T>() == 4, "a line holds 16 four-byte values") };
        let lines = blocks * lines_per_block;
        let mut v: Vec<Line<T>> = Vec::with_capacity(lines);
        if lines > 0 {
            v.spare_capacity_mut()
                .par_chunks_mut(lines_per_block)
                .enumerate()
                .for_each(|(blk, slots)| {
                    for slot in slots.iter_mut() {
                        slot.write(Line([T::default(); 16]));
                    }
                    // SAFETY: every slot of this block was initialised just above; `Line<T>` is `repr(C)`
                    // over `[T; 16]`.
                    let block: &mut [[T; 16]] = unsafe {
                        std::slice::from_raw_parts_mut(slots.as_mut_ptr().cast(), slots.len())
                    };
                    fill(blk, block);
                });
        }
        // SAFETY: all `lines` slots of the spare capacity were written above.
        unsafe { v.set_len(lines) };
        Self {
            lines: v,
            len: lines * 16,
        }
    }
}

impl<T: Copy> std::ops::Deref for LineAligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `Line<T>` is `repr(C)` over `[T; 16]` of 64 bytes (asserted in `zeroed`) with 64-byte
        // alignment, so the lines are `16 · lines.len() ≥ len` contiguous initialised values.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl<T: Copy> std::ops::DerefMut for LineAligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// A raw pointer the tasks of one call share; each writes its own disjoint block.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: only used for disjoint writes within one `matmul_on` call, which outlives its tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// `x [m, k]` as blocks of MR rows, each `[kp][rows]` words (a feature pair of every row of the block side by
/// side), so the micro-kernel reads `x` sequentially; the block of rows `r0..` starts at word `r0 · kp`.
/// Written in output order, each pair read as one word, into memory that is not zeroed first (every word of a
/// block is written once): written row by row, at a stride of `rows` words, with a bounds-checked read per
/// value, packing was 1.8 % of a real-config prefill (`perf`).
fn pack_rows(x: &[bf16], m: usize, k: usize, kp: usize) -> Vec<u32> {
    // A pair's two bf16 read as one little-endian word is `pair(lo, hi)`.
    const { assert!(cfg!(target_endian = "little")) };
    assert_eq!(kp, k.div_ceil(2), "{kp} pairs for {k} features");
    assert_eq!(x.len(), m * k, "x is {} values, not [{m}, {k}]", x.len());
    let pairs = k / 2;
    let mut a: Vec<u32> = Vec::with_capacity(m * kp);
    a.spare_capacity_mut()[..m * kp]
        .par_chunks_mut(MR * kp)
        .enumerate()
        .for_each(|(blk, out)| {
            let r0 = blk * MR;
            let rb = MR.min(m - r0);
            let rows = &x[r0 * k..(r0 + rb) * k];
            for (p, dst) in out.chunks_exact_mut(rb).take(pairs).enumerate() {
                for (r, d) in dst.iter_mut().enumerate() {
                    // SAFETY: `2p + 1 < k`, so both values of the pair lie in row `r` of `rows`.
                    let w = unsafe {
                        rows.as_ptr()
                            .add(r * k + 2 * p)
                            .cast::<u32>()
                            .read_unaligned()
                    };
                    d.write(w);
                }
            }
            if k % 2 == 1 {
                for (r, d) in out[pairs * rb..].iter_mut().enumerate() {
                    d.write(pair(rows[r * k + k - 1], bf16::ZERO));
                }
            }
        });
    // SAFETY: each block of `rb` rows is `kp · rb` words: the `pairs` full pairs and the odd feature's pair
    // above wrote every one.
    unsafe { a.set_len(m * kp) };
    a
}

/// `c[r][0..NR] += Σ_p a[p][r] · b[p][0..NR]` for `r < rows`: one micro-tile on `level`.
fn micro(level: Level, rows: usize, a: &[u32], b: &[u32], kc: usize, c: &mut [f32], ldc: usize) {
    debug_assert!(rows >= 1 && rows <= MR);
    debug_assert!(a.len() >= kc * rows && b.len() >= kc * NR);
    debug_assert!(c.len() >= (rows - 1) * ldc + NR);
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Bf16 => {
            macro_rules! go {
                ($($r:literal)*) => {
                    match rows {
                        // SAFETY: `matmul_on` checked the CPU has the level; slices are long enough (asserted).
                        $($r => unsafe { x86::tile_avx512bf16::<$r>(a.as_ptr(), b.as_ptr(), kc, c.as_mut_ptr(), ldc) },)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(1 2 3 4 5 6 7 8 9 10 11 12)
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2Fma => {
            // 4 rows × 16 columns of accumulators at a time (8 of AVX2's 16 registers).
            for r0 in (0..rows).step_by(4) {
                let rb = 4.min(rows - r0);
                for half in 0..2 {
                    // SAFETY: as above.
                    unsafe {
                        let (ap, bp) = (a.as_ptr().add(r0), b.as_ptr().add(half * 16));
                        let cp = c.as_mut_ptr().add(r0 * ldc + half * 16);
                        match rb {
                            1 => x86::tile_avx2::<1>(ap, rows, bp, kc, cp, ldc),
                            2 => x86::tile_avx2::<2>(ap, rows, bp, kc, cp, ldc),
                            3 => x86::tile_avx2::<3>(ap, rows, bp, kc, cp, ldc),
                            _ => x86::tile_avx2::<4>(ap, rows, bp, kc, cp, ldc),
                        }
                    }
                }
            }
        }
        _ => tile_scalar(rows, a, b, kc, c, ldc),
    }
}

/// Portable micro-tile: per output, the pair's low product then its high product, in pair order.
fn tile_scalar(rows: usize, a: &[u32], b: &[u32], kc: usize, c: &mut [f32], ldc: usize) {
    for r in 0..rows {
        let mut acc = [0f32; NR];
        acc.copy_from_slice(&c[r * ldc..r * ldc + NR]);
        for p in 0..kc {
            let w = a[p * rows + r];
            let (lo, hi) = (lo_f32(w), hi_f32(w));
            for (j, acc) in acc.iter_mut().enumerate() {
                let bw = b[p * NR + j];
                *acc = hi.mul_add(hi_f32(bw), lo.mul_add(lo_f32(bw), *acc));
            }
        }
        c[r * ldc..r * ldc + NR].copy_from_slice(&acc);
    }
}

/// AMX tiles (Intel since Sapphire Rapids): eight 1 KiB tile registers, each up to 16 rows of 64 bytes, and
/// `tdpbf16ps`, which multiplies a 16 × 32 bf16 tile by a 32 × 16 one (stored as 16 rows of pairs) into a
/// 16 × 16 f32 tile. The packed panels already hold a weight that way (per feature pair, the columns' pairs side
/// by side), so a B tile is 16 pairs of 16 columns read at the panel's row stride, with no repacking; `x` is
/// copied once per call into whole tiles. Used through inline assembly: Rust's AMX intrinsics are unstable.
mod amx {
    /// Feature pairs per tile row (64 bytes).
    pub const PAIRS: usize = 16;
    /// Rows per tile.
    pub const ROWS: usize = 16;
    /// Most rows per task. A task's `MC_MAX × KC` slice of `x` (512 KiB) and its f32 sums (512 KiB at 256
    /// columns) stay in L2 (2 MiB per core here) while its panels pass; so a prefill of up to 512 tokens reads
    /// each weight from memory once. 128 rows, as before, read it four times at a 640×480 frame's 441 tokens:
    /// on `rexbench-gemm --prefill-sweep` the least disturbed passes took 189–200 ms at 448 rows against 234–260
    /// ms at 128 (the medians moved 1.5× between passes of one setting on this shared VM).
    pub const MC_MAX: usize = 512;
    static ROW_CAP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(MC_MAX);

    /// The row cap in force ([`MC_MAX`] unless [`super::set_amx_row_cap`] changed it).
    pub fn row_cap() -> usize {
        ROW_CAP.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn set_row_cap(rows: usize) {
        ROW_CAP.store(rows, std::sync::atomic::Ordering::Relaxed);
    }
    /// Weight bytes per task for few rows (decode), where a call streams its weight once.
    pub const TASK_BYTES: usize = 512 << 10;

    /// Whether this CPU has AMX-BF16 and the OS lets this process use the tile registers (asked once).
    pub fn usable() -> bool {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *USABLE.get_or_init(|| {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                // CPUID.(EAX=7, ECX=0):EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
                #[allow(unused_unsafe)]
                let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
                if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                    return false;
                }
                // Linux gives the 8 KiB tile state only to a process that asks for it; a kernel without AMX
                // support (before 5.16) refuses, and then the CPU's flag alone does not make it usable.
                const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_ulong = 18;
                // SAFETY: a plain syscall with integer arguments.
                unsafe {
                    libc::syscall(
                        libc::SYS_arch_prctl,
                        ARCH_REQ_XCOMP_PERM,
                        XFEATURE_XTILEDATA,
                    ) == 0
                }
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            false
        })
    }

    #[cfg(target_arch = "x86_64")]
    pub use tiles::*;

    #[cfg(target_arch = "x86_64")]
    mod tiles {
        use super::super::super::prefetch;
        use super::super::{pair, LineAligned, NR};
        use super::{PAIRS, ROWS};
        use half::bf16;
        use std::arch::asm;

        /// `x [m, k]` as whole A tiles, zeros past `m` rows and `k` features: for each block of 16 rows, its
        /// `kps / 16` tiles of 16 rows × 16 feature pairs, each tile's 1 KiB contiguous (row `r`, pair `p` at word
        /// `(r / 16) · 16 · kps + (p / 16) · 256 + (r % 16) · 16 + p % 16`). So a tile load reads 16 consecutive
        /// lines, which L1 holds side by side; with one row of `x` after another (a stride of `kps` words, 4 KiB for
        /// the decoder's 2048 features) a tile's 16 lines all map to one L1 set, which has 12 ways.
        pub fn pack_rows(x: &[bf16], m: usize, k: usize, kps: usize) -> LineAligned<u32> {
            let (tiles, kp) = (kps / PAIRS, k.div_ceil(2));
            // One block of 16 rows per `fill` call: its `tiles` tiles of 16 lines, zeroed just before (so the
            // padding rows and pairs stay zero).
            LineAligned::from_line_blocks(
                m.next_multiple_of(ROWS) / ROWS,
                tiles * ROWS,
                |blk, lines| {
                    for r in 0..ROWS.min(m.saturating_sub(blk * ROWS)) {
                        let x = &x[(blk * ROWS + r) * k..][..k];
                        for (t, p0) in (0..kp).step_by(PAIRS).enumerate() {
                            let line = &mut lines[t * ROWS + r];
                            if 2 * (p0 + PAIRS) <= k {
                                let src = &x[2 * p0..][..2 * PAIRS];
                                for (j, word) in line.iter_mut().enumerate() {
                                    *word = pair(src[2 * j], src[2 * j + 1]);
                                }
                            } else {
                                for (j, word) in line.iter_mut().enumerate().take(kp - p0) {
                                    let p = p0 + j;
                                    *word = pair(
                                        x[2 * p],
                                        x.get(2 * p + 1).copied().unwrap_or(bf16::ZERO),
                                    );
                                }
                            }
                        }
                    }
                },
            )
        }

        thread_local! {
            /// The f32 sums of this thread's tasks ([`super::super::PackedBf16::matmul_amx`]), kept between
            /// calls: at most `MC_MAX` rows × `NC_MAX` columns, 512 KiB.
            pub static SUMS: std::cell::RefCell<LineAligned<f32>> =
                std::cell::RefCell::new(LineAligned::zeroed(0));
        }

        /// `ldtilecfg`'s 64-byte operand: palette 1, all eight tiles 16 rows of 64 bytes.
        #[repr(C, align(64))]
        struct Config([u8; 64]);

        static CONFIG: Config = {
            let mut c = [0u8; 64];
            c[0] = 1;
            let mut t = 0;
            while t < 8 {
                c[16 + 2 * t] = (PAIRS * 4) as u8;
                c[48 + t] = ROWS as u8;
                t += 1;
            }
            Config(c)
        };

        /// The tiles configured on this thread for the guard's lifetime (a rayon task). On drop the thread's
        /// previous tile state comes back: released if it had none (so its context switches stop saving 8 KiB
        /// of tile state), otherwise the configuration it had reloaded. Other AMX code on the same pool threads
        /// may configure a thread once and rely on it for the thread's life (candle 0.11.1's Q4K kernels do,
        /// with a thread-local flag): releasing under it made their next `tilezero` fault (SIGILL), found with
        /// `weights = "q4"` at the real-width config.
        pub struct Tiles {
            previous: Config,
        }

        impl Tiles {
            pub fn configure() -> Tiles {
                let mut previous = Config([0; 64]);
                // SAFETY: `usable()` was true (the caller runs the Amx level only then); `sttilecfg` writes the
                // current configuration (64 zero bytes when there is none) into the aligned 64-byte buffer, and
                // the `ldtilecfg` operand is a valid palette-1 configuration.
                unsafe {
                    asm!("sttilecfg [{}]", in(reg) previous.0.as_mut_ptr(), options(nostack));
                    asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
                };
                Tiles { previous }
            }
        }

        impl Drop for Tiles {
            fn drop(&mut self) {
                // SAFETY: tiles were configured by this guard on this thread; a non-zero palette byte means the
                // saved bytes are a configuration the CPU accepted before.
                unsafe {
                    if self.previous.0[0] == 0 {
                        asm!("tilerelease", options(nostack, nomem));
                    } else {
                        asm!("ldtilecfg [{}]", in(reg) self.previous.0.as_ptr(), options(nostack, readonly));
                    }
                }
            }
        }

        /// This thread's tile configuration as `sttilecfg` stores it (64 zero bytes when there is none).
        #[cfg(test)]
        pub fn current_config() -> [u8; 64] {
            let mut c = Config([0; 64]);
            // SAFETY: AMX is usable (callers check `usable()`); writes 64 bytes into the aligned buffer.
            unsafe { asm!("sttilecfg [{}]", in(reg) c.0.as_mut_ptr(), options(nostack)) };
            c.0
        }

        /// Loads `cfg` as this thread's tile configuration (tests: another library's state).
        ///
        /// SAFETY: AMX usable; `cfg` a valid configuration (palette 1, sizes within the palette's limits).
        #[cfg(test)]
        pub unsafe fn load_config(cfg: &[u8; 64]) {
            let c = Config(*cfg);
            unsafe { asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack, readonly)) };
        }

        /// `c[r][0..32] += Σ_p a[r][p] · b[p][0..32]` for `16·A` rows (`A` = 1 or 2) and `kc` pairs (a
        /// multiple of 16): C in tmm0–tmm3 (rows 0–15 then 16–31; columns 0–15, 16–31), A in tmm4–5, B in
        /// tmm6–7. Each tile instruction adds its 16 pairs to the sums in order, so an output's chain runs
        /// over the pairs in order, the same for every row.
        ///
        /// `a` is in [`pack_rows`]' layout: the tiles of rows 0–15 one after another from `a`, those of rows
        /// 16–31 from `a + lower`. `fresh`: the sums start from zero instead of `c` (the first K block; `c`'s
        /// values are then never read). `prefetch_b`: ask for the weight's lines [`prefetch::AHEAD_BYTES`]
        /// ahead of each step's (a weight streamed once, from memory).
        ///
        /// SAFETY: tiles configured on this thread ([`Tiles`]); `a` (and `a + lower` when `A` = 2) hold `kc / 16`
        /// tiles, `b` `kc` pairs of a panel (rows of [`NR`] words), `c` `16·A` rows of `ldc ≥ 32` floats.
        pub unsafe fn block<const A: usize>(
            a: *const u32,
            lower: usize,
            b: *const u32,
            kc: usize,
            c: *mut f32,
            ldc: usize,
            fresh: bool,
            prefetch_b: bool,
        ) {
            debug_assert!(A == 1 || A == 2);
            debug_assert!(kc % PAIRS == 0);
            let (sa, sb, sc) = (PAIRS * 4, NR * 4, ldc * 4);
            let c_lower = c.wrapping_add(ROWS * ldc);
            if fresh {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            } else {
                asm!(
                    "tileloadd tmm0, [{c0} + {sc}*1]",
                    "tileloadd tmm1, [{c1} + {sc}*1]",
                    c0 = in(reg) c, c1 = in(reg) c.add(16), sc = in(reg) sc, options(nostack, readonly)
                );
                if A == 2 {
                    asm!(
                        "tileloadd tmm2, [{c0} + {sc}*1]",
                        "tileloadd tmm3, [{c1} + {sc}*1]",
                        c0 = in(reg) c_lower, c1 = in(reg) c_lower.add(16), sc = in(reg) sc,
                        options(nostack, readonly)
                    );
                }
            }
            for q in 0..kc / PAIRS {
                let (ap, bp) = (a.add(q * ROWS * PAIRS), b.add(q * PAIRS * NR));
                if prefetch_b {
                    prefetch::lines_ahead(bp.cast(), PAIRS * NR * 4);
                }
                if A == 2 {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) ap, a1 = in(reg) ap.add(lower), sa = in(reg) sa,
                        b0 = in(reg) bp, b1 = in(reg) bp.add(16), sb = in(reg) sb,
                        options(nostack, readonly)
                    );
                } else {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        a0 = in(reg) ap, sa = in(reg) sa,
                        b0 = in(reg) bp, b1 = in(reg) bp.add(16), sb = in(reg) sb,
                        options(nostack, readonly)
                    );
                }
            }
            asm!(
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                c0 = in(reg) c, c1 = in(reg) c.add(16), sc = in(reg) sc, options(nostack)
            );
            if A == 2 {
                asm!(
                    "tilestored [{c0} + {sc}*1], tmm2",
                    "tilestored [{c1} + {sc}*1], tmm3",
                    c0 = in(reg) c_lower, c1 = in(reg) c_lower.add(16), sc = in(reg) sc, options(nostack)
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::prefetch;
    use super::NR;
    use std::arch::x86_64::*;

    /// `R` rows × 32 columns with `vdpbf16ps`: per feature pair, two weight loads, `R` broadcasts, `2R` dots.
    ///
    /// SAFETY: AVX-512F and AVX-512 BF16 present; `a` holds `kc · R` words, `b` `kc · NR`, `c` rows of `NR`
    /// floats at stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile_avx512bf16<const R: usize>(
        a: *const u32,
        b: *const u32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for r in 0..R {
            lo[r] = _mm512_loadu_ps(c.add(r * ldc));
            hi[r] = _mm512_loadu_ps(c.add(r * ldc + 16));
        }
        for p in 0..kc {
            prefetch::two_lines_ahead(b.add(p * NR).cast());
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
            for r in 0..R {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * R + r) as i32));
                lo[r] = _mm512_dpbf16_ps(lo[r], x, b0);
                hi[r] = _mm512_dpbf16_ps(hi[r], x, b1);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(c.add(r * ldc), lo[r]);
            _mm512_storeu_ps(c.add(r * ldc + 16), hi[r]);
        }
    }

    /// `R ≤ 4` rows × 16 columns in f32 FMA: each weight word widened by a shift (low bf16) and a mask (high).
    ///
    /// SAFETY: AVX2 and FMA present; `a` is the block's first row with `stride` words per pair (`kc` pairs),
    /// `b` a panel slice offset to its 16 columns, `c` rows of 16 floats at stride `ldc`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2<const R: usize>(
        a: *const u32,
        stride: usize,
        b: *const u32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for r in 0..R {
            acc[r][0] = _mm256_loadu_ps(c.add(r * ldc));
            acc[r][1] = _mm256_loadu_ps(c.add(r * ldc + 8));
        }
        let mask = _mm256_set1_epi32(0xffff_0000u32 as i32);
        for p in 0..kc {
            // The panel row's other half is this tile's neighbour's: one request serves both calls.
            prefetch::two_lines_ahead(b.add(p * NR).cast());
            let w0 = _mm256_loadu_si256(b.add(p * NR).cast());
            let w1 = _mm256_loadu_si256(b.add(p * NR + 8).cast());
            let (lo0, hi0) = (
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0)),
                _mm256_castsi256_ps(_mm256_and_si256(w0, mask)),
            );
            let (lo1, hi1) = (
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1)),
                _mm256_castsi256_ps(_mm256_and_si256(w1, mask)),
            );
            for r in 0..R {
                let w = *a.add(p * stride + r);
                let xl = _mm256_set1_ps(f32::from_bits(w << 16));
                let xh = _mm256_set1_ps(f32::from_bits(w & 0xffff_0000));
                acc[r][0] = _mm256_fmadd_ps(xh, hi0, _mm256_fmadd_ps(xl, lo0, acc[r][0]));
                acc[r][1] = _mm256_fmadd_ps(xh, hi1, _mm256_fmadd_ps(xl, lo1, acc[r][1]));
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(c.add(r * ldc), acc[r][0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), acc[r][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) without a random-number crate.
    fn values(n: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    }

    /// Every level against an f64 reference on shapes that are not multiples of any block (odd k, m past MR
    /// and MC, n past NR and a task's columns), with and without bias. The bound: one bf16 rounding of the
    /// result (2⁻⁸ relative) plus f32 accumulation error, scaled by Σ|x·w| so cancellation cannot hide it.
    #[test]
    fn every_level_matches_an_f64_reference_on_odd_shapes() {
        let shapes = [
            (1, 1, 1),
            (1, 37, 5),
            (3, 128, 130),
            (13, 257, 33),
            (97, 515, 70),
            (25, 1001, 257),
            // More rows than one AMX task takes (row blocks of 320 and 288 padded rows) and three K blocks.
            (600, 1100, 70),
        ];
        for level in Level::available() {
            for &(m, k, n) in &shapes {
                let (x, w) = (values(m * k, 1 + m as u64), values(n * k, 2 + k as u64));
                let bias: Vec<f32> = values(n, 3).iter().map(|v| v.to_f32()).collect();
                let packed = PackedBf16::pack(&w, n, k);
                assert_eq!(packed.unpack(), w, "unpack m={m} k={k} n={n}");
                for b in [None, Some(bias.as_slice())] {
                    let y = packed.matmul_on(level, &x, m, b);
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut mag) = (b.map_or(0.0, |b| b[j] as f64), 0f64);
                            for t in 0..k {
                                let p = x[i * k + t].to_f64() * w[j * k + t].to_f64();
                                want += p;
                                mag += p.abs();
                            }
                            let got = y[i * n + j].to_f64();
                            let tol = want.abs() * 2f64.powi(-8) + mag * 1e-6 + 1e-30;
                            assert!(
                                (got - want).abs() <= tol,
                                "{level:?} m={m} k={k} n={n} [{i},{j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A row's result is bit-identical whatever the number of rows around it (the draft-block contract in
    /// engine.rs): the f32 sums (before rounding, which would hide most differences) of rows of a 40-row call
    /// against the same rows alone and in a 5-row call, on every level.
    #[test]
    fn a_rows_result_does_not_depend_on_the_other_rows() {
        // Row `i` of `all` (the f32 sums of `x`'s `m` rows) against row `i` computed alone, bit for bit.
        let alone = |level: Level, packed: &PackedBf16, x: &[bf16], all: &[f32], i: usize| {
            let (k, n) = (packed.k(), packed.n());
            let one = packed.matmul_f32_on(level, &x[i * k..(i + 1) * k], 1);
            assert_eq!(
                all[i * n..(i + 1) * n]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{level:?} row {i}"
            );
        };
        let (m, k, n) = (40, 777, 100);
        let (x, w) = (values(m * k, 7), values(n * k, 8));
        let packed = PackedBf16::pack(&w, n, k);
        for level in Level::available() {
            let all = packed.matmul_f32_on(level, &x, m);
            let five = packed.matmul_f32_on(level, &x[35 * k..], 5);
            assert_eq!(&all[35 * n..], &five[..], "{level:?} rows 35..40");
            for i in [0, 11, 12, 39] {
                alone(level, &packed, &x, &all, i);
            }
        }
        // A row count beyond one AMX task (row blocks of 384, 384 and 320 padded rows here) and several K
        // blocks: rows in each block equal the same rows alone.
        let (m, k) = (1077, 1100);
        let x = values(m * k, 9);
        let packed = PackedBf16::pack(&values(n * k, 10), n, k);
        for level in Level::available() {
            let all = packed.matmul_f32_on(level, &x, m);
            for i in [0, 383, 384, 767, 768, 1076] {
                alone(level, &packed, &x, &all, i);
            }
        }
    }

    /// Where the kernel lists `amx_tile` and `amx_bf16` in /proc/cpuinfo (it does only when it supports the
    /// tile state), the AMX level is available: a regression in the permission request would otherwise
    /// silently fall back to AVX-512 BF16.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn column_and_feature_prefixes_equal_the_full_call() {
        // `matmul_f32_cols`: the full call's first columns; `matmul_f32_within`: the full call with `x` padded by
        // zeros; bit for bit, at few rows (one stream) and many (K blocks), for prefixes inside a tile.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (k, n) = (301, 90);
        let packed = PackedBf16::pack(&values(n * k, 21), n, k);
        for m in [5, 128] {
            let x = values(m * k, 22);
            let full = packed.matmul_f32(&x, m, None);
            for cols in [1, 33, 90] {
                let part = packed.matmul_f32_cols(&x, m, cols);
                let want: Vec<f32> = full.chunks(n).flat_map(|r| r[..cols].to_vec()).collect();
                assert_eq!(bits(&part), bits(&want), "m {m}, {cols} columns");
            }
            for kk in [1, 40, 161, 300] {
                let short: Vec<bf16> = x.chunks(k).flat_map(|r| r[..kk].to_vec()).collect();
                let padded: Vec<bf16> = x
                    .chunks(k)
                    .flat_map(|r| {
                        let mut r = r[..kk].to_vec();
                        r.resize(k, bf16::ZERO);
                        r
                    })
                    .collect();
                let part = packed.matmul_f32_within(&short, m, kk);
                let want = packed.matmul_f32(&padded, m, None);
                assert_eq!(bits(&part), bits(&want), "m {m}, {kk} features");
            }
        }
    }

    #[test]
    fn amx_is_used_where_the_kernel_lists_it() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or_default();
        let listed = ["amx_tile", "amx_bf16"]
            .iter()
            .all(|f| flags.split_whitespace().any(|w| w == *f));
        if listed {
            assert!(Level::available().contains(&Level::Amx), "flags: {flags}");
            assert_eq!(Level::available()[0], Level::Amx);
        }
    }

    /// An AMX task hands its thread back with the tile state it found: none stays none, and another
    /// library's configuration (candle's Q4K kernels configure a thread once and keep it: 8-row B tiles) is
    /// reloaded. Releasing unconditionally made candle's next `tilezero` fault.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_tasks_leave_a_threads_tile_state_as_they_found_it() {
        if !amx::usable() {
            eprintln!("skipped: this CPU or kernel has no usable AMX");
            return;
        }
        std::thread::spawn(|| {
            assert_eq!(
                amx::current_config(),
                [0; 64],
                "a new thread has no tile state"
            );
            drop(amx::Tiles::configure());
            assert_eq!(amx::current_config(), [0; 64], "none before, none after");
            let mut foreign = [0u8; 64];
            foreign[0] = 1;
            for t in 0..8 {
                foreign[16 + 2 * t] = if (4..6).contains(&t) { 32 } else { 64 };
                foreign[48 + t] = if t >= 6 { 8 } else { 16 };
            }
            // SAFETY: AMX usable; a palette-1 configuration within its limits.
            unsafe { amx::load_config(&foreign) };
            assert_eq!(amx::current_config(), foreign);
            {
                let _tiles = amx::Tiles::configure();
                assert_ne!(
                    amx::current_config(),
                    foreign,
                    "ours is loaded inside the task"
                );
            }
            assert_eq!(
                amx::current_config(),
                foreign,
                "the foreign configuration is back"
            );
        })
        .join()
        .expect("the AMX thread");
    }

    /// Levels agree with each other closely (they differ only in how a pair's two products are rounded).
    #[test]
    fn levels_agree() {
        let (m, k, n) = (5, 300, 64);
        let (x, w) = (values(m * k, 11), values(n * k, 12));
        let packed = PackedBf16::pack(&w, n, k);
        let want = packed.matmul_on(Level::Scalar, &x, m, None);
        for level in Level::available() {
            let got = packed.matmul_on(level, &x, m, None);
            for (g, w) in got.iter().zip(&want) {
                assert!((g.to_f32() - w.to_f32()).abs() <= w.to_f32().abs() * 2f32.powi(-7) + 1e-3);
            }
        }
    }
}
