//! Q8_0 `x · Wᵀ` on the CPU (`[model] weights = "q8"`): every CPU q8 linear layer, whatever the row count.
//!
//! Why: candle 0.11.1's CPU `QMatMul` widens the activation to f32 and quantizes it on every call, then runs
//! one 256-bit AVX2 dot product per (activation row, weight row) and reads every weight once per activation
//! row. A decode step is a pass over the weights, so it should run at the machine's memory bandwidth: Q8_0
//! holds 34 bytes per 32 weights (0.53× of bf16).
//!
//! How: at load the Q8_0 blocks are repacked once ([`PackedQ8`], which replaces candle's `QTensor`: one copy,
//! the same 34 bytes per 32 weights): rows in groups of four, per group and block the four rows' 32 values
//! side by side in two 64-byte-aligned lines, stored `+ 128` (unsigned, `vpdpbusd`'s first operand), and the
//! four f16 scales in a separate array. Per call each activation row is quantized ONCE to int8 per 32-value
//! block (`d = max|x| / 127`, `q = round(x / d)`, `d` rounded to f16: exactly what ggml and candle do), with `−128 · (sums of each
//! 4 values)` per block, which turns `Σ (w + 128) · x` back into `Σ w · x`. Then every weight line is read
//! once and dotted with all rows of the call in registers: int8 products summed exactly in int32 (AVX-512 VNNI
//! `vpdpbusd` on two weight rows per 512-bit register, AVX-VNNI or AVX2 `vpmaddubsw` on 256 bits, chosen at
//! run time; a portable scalar version), each block's sums widened to f32 and accumulated with `d_w · d_x`.
//!
//! Same bits everywhere: the sum order is fixed by `k` alone ("canonical order", [`dot_scalar`] spells it):
//! for every (activation row, weight row) 8 f32 lanes, lane `l` covering values `4l..4l+4` of each block;
//! block by block in order, `acc[l] = fma(lane sum as f32, d_w · d_x, acc[l])` (the lane sums are exact
//! integers below 2^24); then `(a_i + a_{i+4})`, `(h_0 + h_2, h_1 + h_3)`, `g_0 + g_1`; then `+ bias`. Every
//! instruction-set level computes exactly that, and no step depends on `m` or on the other rows of the call,
//! so a row alone and the same row inside an m-row call give the same bits (the drafts' contract, engine.rs).
//!
//! In: `x` `[m, k]` bf16 or f32 (contiguous), a [`PackedQ8`] `[n, k]` (k a multiple of 32), an optional f32
//! bias. Out: `[m, n]` in `x`'s dtype (rounded once from f32), or f32 for the lm_head. Runs on the rayon pool
//! candle already uses for CPU ops; the quantized activation is the only allocation besides the output.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::huge_pages::HugeBuf;

/// Bytes of one ggml Q8_0 block: an f16 scale, then 32 int8 values.
pub const BLOCK_BYTES: usize = 34;
/// Values per Q8_0 block.
pub const BLOCK: usize = 32;
/// Weight rows per packed group (and per register tile).
const GROUP: usize = 4;
/// Activation rows per register tile (AVX-512).
const TILE_X: usize = 4;

/// Weight groups per task at least.
const MIN_GROUPS_PER_TASK: usize = 4;
/// Weight bytes one rayon task reads at most before the rows are split further (amortises scheduling).
const TASK_BYTES: usize = 256 * 1024;

/// An instruction-set level of the kernel. All levels give the same bits (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// AVX-512 VNNI: `vpdpbusd` on 512 bits, two weight rows per register.
    Avx512Vnni,
    /// AVX-VNNI: `vpdpbusd` on 256 bits (VEX), one weight row per register.
    AvxVnni,
    /// AVX2: `vpmaddubsw` + `vpmaddwd` with the sign trick, 256 bits.
    Avx2,
    /// Portable Rust, the canonical order spelled out.
    Scalar,
}

impl Level {
    /// The fastest level this CPU runs, detected once.
    pub fn best() -> Level {
        static BEST: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Level::available()[0])
    }

    /// Every level this CPU runs, fastest first (tests run each).
    pub fn available() -> Vec<Level> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
            {
                v.push(Level::Avx512Vnni);
            }
            if avx2 && has!("avxvnni") {
                v.push(Level::AvxVnni);
            }
            if avx2 {
                v.push(Level::Avx2);
            }
        }
        v.push(Level::Scalar);
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Avx512Vnni => "avx512vnni",
            Level::AvxVnni => "avxvnni",
            Level::Avx2 => "avx2",
            Level::Scalar => "scalar",
        }
    }
}

/// One 64-byte cache line of packed values.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// One activation block in one 64-byte line: its 32 int8 values, then `−128 ·` the sum of values `4l..4l+4`
/// for l = 0..8 (`vpdpbusd`'s starting value, turning `Σ (w + 128) · x` into `Σ w · x`).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct XLine {
    q: [u8; 32],
    corr: [i32; 8],
}

/// A Q8_0 weight `[n, k]` repacked for the kernel (module doc): per group of 4 rows and per block, two lines
/// (rows 0 and 1, rows 2 and 3; 32 values each, stored `w + 128`), and the 4 f16 scales. Rows past `n` (the last
/// group's padding) are zero.
pub struct PackedQ8 {
    n: usize,
    k: usize,
    /// `[n / 4 (rounded up)][k / 32][2]` lines, in huge pages where the kernel allows ([`HugeBuf`]).
    q: HugeBuf<Line>,
    /// `[n / 4 (rounded up)][k / 32][4]` f16 bits.
    d: Vec<u16>,
}

impl PackedQ8 {
    /// From ggml Q8_0 blocks (`n · k / 32` blocks of [`BLOCK_BYTES`], row after row: candle's `QTensor` bytes).
    pub fn from_q8_0(blocks: &[u8], n: usize, k: usize) -> Result<PackedQ8> {
        if k % BLOCK != 0 || blocks.len() != n * k / BLOCK * BLOCK_BYTES {
            candle_core::bail!(
                "q8_0 weight [{n}, {k}]: {} bytes, expected {} (k a multiple of {BLOCK})",
                blocks.len(),
                n * k / BLOCK * BLOCK_BYTES
            )
        }
        let (nb, groups) = (k / BLOCK, n.div_ceil(GROUP));
        let mut q = HugeBuf::new(groups * nb * 2, Line([0x80; 64]));
        let mut d = vec![0u16; groups * nb * GROUP];
        for j in 0..n {
            let (g, r) = (j / GROUP, j % GROUP);
            for b in 0..nb {
                let blk = &blocks[(j * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                d[(g * nb + b) * GROUP + r] = u16::from_le_bytes([blk[0], blk[1]]);
                let line = &mut q[(g * nb + b) * 2 + r / 2].0[(r % 2) * BLOCK..][..BLOCK];
                for (o, &v) in line.iter_mut().zip(&blk[2..]) {
                    *o = v ^ 0x80;
                }
            }
        }
        Ok(PackedQ8 { n, k, q, d })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held (padding rows included): 34 per 32 weights.
    pub fn packed_bytes(&self) -> usize {
        self.q.len() * 64 + self.d.len() * 2
    }

    /// Reads every packed line once on the rayon pool, as the kernel does, and does nothing else (a sum of
    /// the lines): the memory-bandwidth ceiling for this weight, for rexbench-gemm.
    #[doc(hidden)]
    pub fn read_all(&self) -> u64 {
        self.q
            .par_chunks(TASK_BYTES / 64)
            .map(|c| {
                let mut acc = [0u64; 8];
                for l in c {
                    for (a, w) in acc.iter_mut().zip(l.0.chunks_exact(8)) {
                        *a = a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
                    }
                }
                acc.iter().fold(0, |a, &b| a ^ b)
            })
            .reduce(|| 0, |a, b| a ^ b)
            ^ self.d.iter().fold(0u64, |a, &b| a.wrapping_add(b as u64))
    }

    /// The weight as `[n, k]` f32: `d · q` per block, exactly what Q8_0 dequantizes to.
    pub fn dequantize(&self) -> Vec<f32> {
        let nb = self.k / BLOCK;
        let mut out = vec![0f32; self.n * self.k];
        for (j, row) in out.chunks_exact_mut(self.k.max(1)).enumerate() {
            let (g, r) = (j / GROUP, j % GROUP);
            for (b, o) in row.chunks_exact_mut(BLOCK).enumerate() {
                let dw = f16::from_bits(self.d[(g * nb + b) * GROUP + r]).to_f32();
                let line = &self.q[(g * nb + b) * 2 + r / 2].0[(r % 2) * BLOCK..][..BLOCK];
                for (o, &v) in o.iter_mut().zip(line) {
                    *o = dw * ((v ^ 0x80) as i8) as f32;
                }
            }
        }
        out
    }
}

/// An activation value the kernel accepts.
pub trait Activation: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}

impl Activation for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

impl Activation for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// `m` activation rows quantized to int8 per 32-value block, once per call.
pub struct QuantRows {
    m: usize,
    k: usize,
    /// `[m, k / 32]` blocks (a row of k = 11008 is 22 KiB: it stays in L1 while the weights stream past).
    q: Vec<XLine>,
    /// `[m, k / 32]` block scales.
    d: Vec<f32>,
}

impl QuantRows {
    /// Quantizes `x [m, k]` (k a multiple of 32). The same values on every CPU: the x86 entry only lets the
    /// compiler vectorize the very same code (see [`round_half_away`]).
    pub fn new<T: Activation>(x: &[T], m: usize, k: usize) -> QuantRows {
        assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
        assert_eq!(k % BLOCK, 0, "k = {k} is not a multiple of {BLOCK}");
        let zero = XLine {
            q: [0; 32],
            corr: [0; 8],
        };
        let mut q = vec![zero; m * k / BLOCK];
        let mut d = vec![0f32; m * k / BLOCK];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just checked.
            unsafe { quantize_blocks_avx2(x, &mut q, &mut d) };
            return QuantRows { m, k, q, d };
        }
        quantize_blocks(x, &mut q, &mut d);
        QuantRows { m, k, q, d }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_blocks_avx2<T: Activation>(x: &[T], q: &mut [XLine], d: &mut [f32]) {
    quantize_blocks(x, q, d)
}

/// Each 32-value block of `x` to int8 as ggml's Q8_0 does: `scale = max|x| / 127`, `q = round(x / scale)`.
#[inline(always)]
fn quantize_blocks<T: Activation>(x: &[T], q: &mut [XLine], d: &mut [f32]) {
    let mut v = [0f32; BLOCK];
    for ((xb, xl), db) in x.chunks_exact(BLOCK).zip(q).zip(d) {
        let (qb, cb) = (&mut xl.q, &mut xl.corr);
        let mut amax = 0f32;
        for (vi, &xi) in v.iter_mut().zip(xb) {
            *vi = xi.to_f32();
            amax = amax.max(vi.abs());
        }
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for (qi, &vi) in qb.iter_mut().zip(&v) {
            // |v · inv| ≤ 127 up to rounding, never 127.5: the i8 cast does not saturate.
            *qi = round_half_away(vi * inv) as i8 as u8;
        }
        for (c, q4) in cb.iter_mut().zip(qb.chunks_exact(4)) {
            *c = -128 * q4.iter().map(|&b| b as i8 as i32).sum::<i32>();
        }
        // The scale as ggml keeps it for Q8_0's dot partner (f16), so that the quantized activation is
        // exactly candle's and only the summation order differs from `QMatMul` (the f16 rounding, 2^-11
        // relative, is far below the 8-bit rounding of the values).
        *db = f16::from_f32(scale).to_f32();
    }
}

/// `v.round()` (halves away from zero), bit for bit, in operations that vectorize: `f32::round` is a libm call
/// per value (ggml's `roundf`); with the scalar loop around it, 4.7 % of a q8 decode step at the real config,
/// a quarter of what was not the weight stream. `v − trunc(v)` is exact, so
/// comparing it with 0.5 decides exactly where `round` does (unlike `floor(|v| + 0.5)`, which rounds
/// 0.49999997 up).
#[inline(always)]
fn round_half_away(v: f32) -> f32 {
    let t = v.trunc();
    if (v - t).abs() >= 0.5 {
        t + 1f32.copysign(v)
    } else {
        t
    }
}

/// Output element types.
pub trait Output: Copy + Send + Sync + Default {
    fn from_f32(v: f32) -> Self;
}

impl Output for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Output for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// `y [m, n] = x [m, k] · Wᵀ (+ bias)` at `level`, outputs rounded once from f32 to `O`.
pub fn matmul_on<T: Activation, O: Output>(
    level: Level,
    w: &PackedQ8,
    x: &[T],
    m: usize,
    bias: Option<&[f32]>,
) -> Vec<O> {
    let xq = QuantRows::new(x, m, w.k);
    matmul_quantized(level, w, &xq, bias)
}

/// [`matmul_on`] with the activation already quantized.
pub fn matmul_quantized<O: Output>(
    level: Level,
    w: &PackedQ8,
    x: &QuantRows,
    bias: Option<&[f32]>,
) -> Vec<O> {
    let (m, n, k) = (x.m, w.n, w.k);
    assert_eq!(x.k, k, "x has {} features, the weight {k}", x.k);
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            n,
            "bias has {} values, the weight {n} rows",
            b.len()
        );
    }
    let mut out = vec![O::default(); m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let nb = k / BLOCK;
    let groups = n.div_ceil(GROUP);
    let group_bytes = nb * BLOCK_BYTES * GROUP;
    let threads = rayon::current_num_threads().max(1);
    // Enough tasks to balance the pool, each a contiguous run of groups.
    let per_task = (TASK_BYTES / group_bytes.max(1))
        .min(groups.div_ceil(2 * threads))
        .max(MIN_GROUPS_PER_TASK);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..groups.div_ceil(per_task))
        .into_par_iter()
        .with_max_len(super::cpu_pool::max_tasks_per_job())
        .for_each(|t| {
            let mut tile = [[0f32; TILE_X]; GROUP];
            // Activation tiles outside, weight groups inside: the task's weights (≤ TASK_BYTES) stay in L2 while
            // each tile of activation rows passes over them (with many rows the quantized activation is larger
            // than L2 and would otherwise be streamed again for every group). With m ≤ 4 there is one tile.
            let mut i = 0;
            while i < m {
                let rx = (m - i).min(TILE_X);
                for g in t * per_task..((t + 1) * per_task).min(groups) {
                    let rw = (n - g * GROUP).min(GROUP);
                    compute_tile(level, w, x, g, i, rx, &mut tile);
                    for (jj, col) in tile.iter().enumerate().take(rw) {
                        let j = g * GROUP + jj;
                        let b = bias.map_or(0.0, |b| b[j]);
                        for (ii, &v) in col.iter().enumerate().take(rx) {
                            // SAFETY: tasks own disjoint column ranges of `out` ([m, n]); i + ii < m, j < n.
                            unsafe { *out_ptr.at((i + ii) * n + j) = O::from_f32(v + b) };
                        }
                    }
                }
                i += rx;
            }
        });
    out
}

#[derive(Clone, Copy)]
struct SendPtr<O>(*mut O);
unsafe impl<O> Send for SendPtr<O> {}
unsafe impl<O> Sync for SendPtr<O> {}
impl<O> SendPtr<O> {
    /// # Safety
    /// `i` in bounds of the allocation, no other thread writing element `i`.
    unsafe fn at(self, i: usize) -> *mut O {
        unsafe { self.0.add(i) }
    }
}

/// `tile[r][ii]` = dot of weight row `4g + r` with activation row `i + ii` (ii < rx), canonical order.
fn compute_tile(
    level: Level,
    w: &PackedQ8,
    x: &QuantRows,
    g: usize,
    i: usize,
    rx: usize,
    tile: &mut [[f32; TILE_X]; GROUP],
) {
    let nb = w.k / BLOCK;
    let wq = &w.q[g * nb * 2..(g + 1) * nb * 2];
    let wd = &w.d[g * nb * GROUP..(g + 1) * nb * GROUP];
    let xq = &x.q[i * nb..(i + rx) * nb];
    let xd = &x.d[i * nb..(i + rx) * nb];
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni => {
            // SAFETY: `Level::available` checked the features; the slices hold `rx` rows of `nb` blocks.
            unsafe {
                match rx {
                    1 => x86::tile_avx512::<1>(wq, wd, xq, xd, nb, tile),
                    2 => x86::tile_avx512::<2>(wq, wd, xq, xd, nb, tile),
                    3 => x86::tile_avx512::<3>(wq, wd, xq, xd, nb, tile),
                    _ => x86::tile_avx512::<4>(wq, wd, xq, xd, nb, tile),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Level::AvxVnni | Level::Avx2 => {
            for ii in 0..rx {
                let (q, d) = (&xq[ii * nb..], &xd[ii * nb..]);
                // SAFETY: as above; one activation row per call (16 ymm registers).
                let r = unsafe {
                    if level == Level::AvxVnni {
                        x86::tile_avxvnni(wq, wd, q, d, nb)
                    } else {
                        x86::tile_avx2(wq, wd, q, d, nb)
                    }
                };
                for (row, v) in tile.iter_mut().zip(r) {
                    row[ii] = v;
                }
            }
        }
        _ => {
            for (r, row) in tile.iter_mut().enumerate() {
                for (ii, o) in row.iter_mut().enumerate().take(rx) {
                    *o = dot_scalar(wq, wd, r, &xq[ii * nb..(ii + 1) * nb], &xd[ii * nb..]);
                }
            }
        }
    }
}

/// The canonical order (module doc) for row `r` of a packed group (`wq`, `wd`) and one activation row
/// (`xq` its blocks, `xd` scales): the reference every level meets.
fn dot_scalar(wq: &[Line], wd: &[u16], r: usize, xq: &[XLine], xd: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, xl) in xq.iter().enumerate() {
        let xb = &xl.q;
        let dw = f16::from_bits(wd[b * GROUP + r]).to_f32();
        let s = dw * xd[b];
        let wb = &wq[b * 2 + r / 2].0[(r % 2) * BLOCK..][..BLOCK];
        for (l, a) in acc.iter_mut().enumerate() {
            let mut sum = 0i32;
            for t in 4 * l..4 * l + 4 {
                sum += ((wb[t] ^ 0x80) as i8 as i32) * (xb[t] as i8 as i32);
            }
            *a = (sum as f32).mul_add(s, *a);
        }
    }
    reduce8(acc)
}

/// The canonical final sum of 8 lanes.
fn reduce8(a: [f32; 8]) -> f32 {
    let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let g = [h[0] + h[2], h[1] + h[3]];
    g[0] + g[1]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::prefetch;
    use super::{Line, XLine, BLOCK, GROUP, TILE_X};
    use std::arch::x86_64::*;

    // Loads are intrinsics that take pointers (`lddqu`, `load_si512`, `loadl_epi64`) and pointers advance by
    // `wrapping_add` of constants: the dev profile keeps debug assertions and overflow checks, and
    // `_mm256_loadu_si256` (`ptr::read_unaligned`), `ptr::add`, `*p` and index arithmetic then carry run-time
    // checks in the inner loop (measured: the first version ran at half the bandwidth because of them).
    macro_rules! load256 {
        ($p:expr) => {
            _mm256_lddqu_si256($p as *const __m256i)
        };
    }

    /// The canonical 8-lane reduction of a 256-bit accumulator (`reduce8`).
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn reduce256(a: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let g = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(g, _mm_shuffle_ps(g, g, 1)))
    }

    /// The group's 4 scales of one block as f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scales(d: *const u16) -> __m128 {
        unsafe { _mm_cvtph_ps(_mm_loadl_epi64(d as *const __m128i)) }
    }

    /// One group (4 weight rows: rows 0|1 in one register, 2|3 in the other, as packed) × `RX` activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn tile_avx512<const RX: usize>(
        wq: &[Line],
        wd: &[u16],
        xq: &[XLine],
        xd: &[f32],
        nb: usize,
        out: &mut [[f32; TILE_X]; GROUP],
    ) {
        unsafe {
            let lo = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
            let hi = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
            let mut acc = [[_mm512_setzero_ps(); RX]; 2];
            let mut wp = wq.as_ptr() as *const u8;
            let mut dp = wd.as_ptr();
            let mut xp: [*const XLine; RX] =
                std::array::from_fn(|r| xq.as_ptr().wrapping_add(r * nb));
            let mut sp: [*const f32; RX] =
                std::array::from_fn(|r| xd.as_ptr().wrapping_add(r * nb));
            for _ in 0..nb {
                prefetch::two_lines_ahead(wp);
                let w = [
                    _mm512_load_si512(wp as *const __m512i),
                    _mm512_load_si512(wp.wrapping_add(64) as *const __m512i),
                ];
                let d4 = _mm512_castps128_ps512(scales(dp));
                let dw = [_mm512_permutexvar_ps(lo, d4), _mm512_permutexvar_ps(hi, d4)];
                for r in 0..RX {
                    // Aligned 256-bit loads broadcast to both halves (one `vbroadcasti64x4` each).
                    let xv = _mm512_broadcast_i64x4(_mm256_load_si256(xp[r] as *const __m256i));
                    let cv = _mm512_broadcast_i64x4(_mm256_load_si256(
                        (xp[r] as *const __m256i).wrapping_add(1),
                    ));
                    let dx = _mm512_broadcastss_ps(_mm_load_ss(sp[r]));
                    for p in 0..2 {
                        let sum = _mm512_dpbusd_epi32(cv, w[p], xv);
                        let s = _mm512_mul_ps(dw[p], dx);
                        acc[p][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, acc[p][r]);
                    }
                    xp[r] = xp[r].wrapping_add(1);

                    sp[r] = sp[r].wrapping_add(1);
                }
                wp = wp.wrapping_add(128);
                dp = dp.wrapping_add(GROUP);
            }
            for p in 0..2 {
                for r in 0..RX {
                    let a = acc[p][r];
                    out[2 * p][r] = reduce256(_mm512_castps512_ps256(a));
                    out[2 * p + 1][r] = reduce256(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                        _mm512_castps_pd(a),
                        1,
                    )));
                }
            }
        }
    }

    /// One group × one activation row, AVX-VNNI on 256 bits.
    #[target_feature(enable = "avxvnni,avx2,fma,f16c")]
    pub unsafe fn tile_avxvnni(
        wq: &[Line],
        wd: &[u16],
        xq: &[XLine],
        xd: &[f32],
        nb: usize,
    ) -> [f32; GROUP] {
        unsafe {
            let idx: [__m256i; GROUP] = std::array::from_fn(|r| _mm256_set1_epi32(r as i32));
            let mut acc = [_mm256_setzero_ps(); GROUP];
            let (mut wp, mut dp) = (wq.as_ptr() as *const u8, wd.as_ptr());
            let (mut xp, mut sp) = (xq.as_ptr(), xd.as_ptr());
            for _ in 0..nb {
                prefetch::two_lines_ahead(wp);
                let d4 = _mm256_castps128_ps256(scales(dp));
                let xv = load256!(xp);
                let cv = load256!((xp as *const u8).wrapping_add(32));
                let dx = _mm256_broadcastss_ps(_mm_load_ss(sp));
                for r in 0..GROUP {
                    let wv = load256!(wp.wrapping_add(r * BLOCK));
                    let s = _mm256_mul_ps(_mm256_permutevar8x32_ps(d4, idx[r]), dx);
                    let sum = _mm256_dpbusd_avx_epi32(cv, wv, xv);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), s, acc[r]);
                }
                wp = wp.wrapping_add(128);
                dp = dp.wrapping_add(GROUP);
                xp = xp.wrapping_add(1);
                sp = sp.wrapping_add(1);
            }
            std::array::from_fn(|r| reduce256(acc[r]))
        }
    }

    /// One group × one activation row, AVX2: the stored `w + 128` back to `w` (xor), then |w| · (x with w's
    /// sign) by `vpmaddubsw` (pairs of products stay within i16: 2 · 128 · 127 < 32767), then `vpmaddwd` by ones
    /// into the same 8 lanes as `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_avx2(
        wq: &[Line],
        wd: &[u16],
        xq: &[XLine],
        xd: &[f32],
        nb: usize,
    ) -> [f32; GROUP] {
        unsafe {
            let idx: [__m256i; GROUP] = std::array::from_fn(|r| _mm256_set1_epi32(r as i32));
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(0x80u8 as i8);
            let mut acc = [_mm256_setzero_ps(); GROUP];
            let (mut wp, mut dp) = (wq.as_ptr() as *const u8, wd.as_ptr());
            let (mut xp, mut sp) = (xq.as_ptr(), xd.as_ptr());
            for _ in 0..nb {
                prefetch::two_lines_ahead(wp);
                let d4 = _mm256_castps128_ps256(scales(dp));
                let xv = load256!(xp);
                let dx = _mm256_broadcastss_ps(_mm_load_ss(sp));
                for r in 0..GROUP {
                    let wv = _mm256_xor_si256(load256!(wp.wrapping_add(r * BLOCK)), flip);
                    let s = _mm256_mul_ps(_mm256_permutevar8x32_ps(d4, idx[r]), dx);
                    let p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
                    let sum = _mm256_madd_epi16(p16, ones);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), s, acc[r]);
                }
                wp = wp.wrapping_add(128);
                dp = dp.wrapping_add(GROUP);
                xp = xp.wrapping_add(1);
                sp = sp.wrapping_add(1);
            }
            std::array::from_fn(|r| reduce256(acc[r]))
        }
    }
}

/// Whether CPU q8 layers are packed for this kernel at load: on by default; `REXOMNI_Q8_KERNEL=candle` keeps
/// candle's `QMatMul` (only so that a benchmark can measure before and after with one binary,
/// docs/benchmarks.md).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("REXOMNI_Q8_KERNEL").is_ok_and(|v| v == "candle"))
}

/// `x [.., k] · Wᵀ + bias` → `[.., n]` in `x`'s dtype, or in f32 when `f32_out` (the lm_head). `x` on the CPU
/// in bf16 or f32.
pub fn forward(w: &PackedQ8, bias: Option<&[f32]>, x: &Tensor, f32_out: bool) -> Result<Tensor> {
    let kx = x.dim(candle_core::D::Minus1)?;
    if kx != w.k {
        candle_core::bail!(
            "q8_0 linear: input has {kx} features, the weight takes {}",
            w.k
        )
    }
    let rows = x.elem_count() / w.k.max(1);
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = w.n;
    x.reshape((rows, w.k))?
        .contiguous()?
        .apply_op1_no_bwd(&Q8Matmul { w, bias, f32_out })?
        .reshape(out_dims)
}

/// The custom op behind [`forward`].
struct Q8Matmul<'a> {
    w: &'a PackedQ8,
    bias: Option<&'a [f32]>,
    f32_out: bool,
}

impl CustomOp1 for Q8Matmul<'_> {
    fn name(&self) -> &'static str {
        "q8_0-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, _) = l.shape().dims2()?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: x must be contiguous", self.name())
        };
        let (w, level) = (self.w, Level::best());
        let y = match (s, self.f32_out) {
            (CpuStorage::BF16(x), false) => {
                CpuStorage::BF16(matmul_on(level, w, &x[a..b], m, self.bias))
            }
            (CpuStorage::BF16(x), true) => {
                CpuStorage::F32(matmul_on(level, w, &x[a..b], m, self.bias))
            }
            (CpuStorage::F32(x), _) => CpuStorage::F32(matmul_on(level, w, &x[a..b], m, self.bias)),
            _ => candle_core::bail!("{}: x must be bf16 or f32", self.name()),
        };
        Ok((y, Shape::from((m, w.n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{DType, Device, Module};

    fn quantized(n: usize, k: usize) -> QTensor {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()
    }

    fn packed(q: &QTensor) -> PackedQ8 {
        let (n, k) = q.shape().dims2().unwrap();
        PackedQ8::from_q8_0(&q.data().unwrap(), n, k).unwrap()
    }

    /// Every level, every tile edge (n and m not multiples of the tiles, an odd number of blocks), bit for bit
    /// the scalar canonical order; and each row alone bit for bit the same row inside the m-row call.
    #[test]
    fn levels_agree_bit_for_bit_and_rows_do_not_depend_on_the_call() -> Result<()> {
        let levels = Level::available();
        eprintln!(
            "levels: {:?}",
            levels.iter().map(|l| l.name()).collect::<Vec<_>>()
        );
        for (m, k, n) in [
            (1, 32, 1),
            (3, 96, 7),
            (5, 256, 37),
            (9, 1024, 66),
            (64, 160, 21),
        ] {
            let w = packed(&quantized(n, k));
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?
                .flatten_all()?
                .to_vec1()?;
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 1.0).collect();
            let want: Vec<f32> = matmul_on(Level::Scalar, &w, &x, m, Some(&bias));
            for &level in &levels {
                let got: Vec<f32> = matmul_on(level, &w, &x, m, Some(&bias));
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{} m={m} k={k} n={n}: differs from the scalar order",
                    level.name()
                );
                for i in 0..m {
                    let alone: Vec<f32> =
                        matmul_on(level, &w, &x[i * k..(i + 1) * k], 1, Some(&bias));
                    let inside = &got[i * n..(i + 1) * n];
                    assert!(
                        alone
                            .iter()
                            .zip(inside)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{} m={m} k={k} n={n}: row {i} alone differs from the row in the call",
                        level.name()
                    );
                }
            }
        }
        Ok(())
    }

    /// `round_half_away` is `f32::round` on every kind of value the quantizer can see (its values stay within
    /// ±127.5) and beyond: all halves up to 4096 and their neighbours, values near 2^23 and 2^24, the largest
    /// value below 0.5, 10^6 random bit patterns, the specials.
    #[test]
    fn round_half_away_is_round() {
        let mut vals = vec![
            0.0,
            -0.0,
            0.49999997,
            -0.49999997,
            0.5,
            -0.5,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
        ];
        for i in 0..(1u32 << 12) {
            let h = i as f32 + 0.5;
            for v in [
                h,
                f32::from_bits(h.to_bits() - 1),
                f32::from_bits(h.to_bits() + 1),
            ] {
                vals.extend([v, -v]);
            }
        }
        vals.extend([8388607.5f32, 16777215.0, 16777216.0]);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1_000_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            vals.push(f32::from_bits((state >> 32) as u32));
        }
        for v in vals {
            let (got, want) = (round_half_away(v), v.round());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{v:e}: {got:e} != {want:e}"
            );
        }
    }

    /// The vectorized quantizer gives the scalar one's values (bf16 and f32 activations, zero blocks too).
    #[test]
    fn quantized_rows_do_not_depend_on_the_instruction_set() -> Result<()> {
        let k = 96;
        let mut x: Vec<f32> = Tensor::randn(0f32, 3.0, (3, k), &Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        x[..BLOCK].fill(0.0);
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let scalar = |x: &[f32]| {
            let mut q = vec![
                XLine {
                    q: [0; 32],
                    corr: [0; 8]
                };
                x.len() / BLOCK
            ];
            let mut d = vec![0f32; x.len() / BLOCK];
            quantize_blocks(x, &mut q, &mut d);
            (q, d)
        };
        let xbf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        for (rows, (q, d)) in [
            (QuantRows::new(&x, 3, k), scalar(&x)),
            (QuantRows::new(&xb, 3, k), scalar(&xbf)),
        ] {
            assert_eq!(rows.d, d);
            for (a, b) in rows.q.iter().zip(&q) {
                assert_eq!((a.q, a.corr), (b.q, b.corr));
            }
        }
        Ok(())
    }

    /// Packing keeps every value: the packed weight dequantizes to exactly candle's dequantized Q8_0 tensor.
    #[test]
    fn packing_is_lossless() -> Result<()> {
        for (n, k) in [(1, 32), (7, 96), (66, 1024)] {
            let q = quantized(n, k);
            let w = packed(&q);
            let want: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            assert_eq!(w.dequantize(), want, "[{n}, {k}]");
            assert_eq!(w.packed_bytes(), n.div_ceil(4) * 4 * k / 32 * 34);
        }
        Ok(())
    }

    /// Against the dequantized weight in f32 (the exact product of what is stored with the unquantized x) and
    /// against candle's `QMatMul`, bf16 and f32 activations. The only extra error is the activation's 8-bit
    /// rounding (candle does the same, with an f16 scale): relative RMS ~0.5 % per block; measured maxima
    /// 4-6e-3 of the output scale over these shapes, so the bound is 2e-2.
    #[test]
    fn close_to_the_dequantized_product_and_to_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 2048, 256), (4, 1024, 130), (17, 96, 40)] {
            let qm = QMatMul::from_qtensor(quantized(n, k))?;
            let QMatMul::QTensor(q) = &qm else {
                panic!("a Q8_0 QMatMul holds its QTensor")
            };
            let w = packed(q);
            let x = Tensor::randn(0f32, 1.0, (2, m, k), &dev)?;
            let wf = q.dequantize(&dev)?;
            let want = x.broadcast_matmul(&wf.t()?)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let candle = qm.forward(&x)?;
            for dtype in [DType::F32, DType::BF16] {
                let xd = x.to_dtype(dtype)?;
                let ours = forward(&w, None, &xd, false)?;
                assert_eq!(ours.dtype(), dtype);
                assert_eq!(ours.dims(), &[2, m, n]);
                let ours = ours.to_dtype(DType::F32)?;
                let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
                    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
                };
                let (e_ref, e_candle) = (rel(&ours, &want)?, rel(&ours, &candle)?);
                eprintln!(
                    "m={m} k={k} n={n} {dtype:?}: max |Δ| / scale vs f32 {e_ref:.1e}, vs candle {e_candle:.1e}"
                );
                assert!(e_ref < 0.02, "m={m} k={k} n={n} {dtype:?}: vs f32 {e_ref}");
                assert!(
                    e_candle < 0.02,
                    "m={m} k={k} n={n} {dtype:?}: vs candle {e_candle}"
                );
            }
            // f32 out from bf16 x is the same accumulator, unrounded.
            let xb = x.to_dtype(DType::BF16)?;
            let f = forward(&w, None, &xb, true)?;
            assert_eq!(f.dtype(), DType::F32);
            let b = forward(&w, None, &xb, false)?;
            assert_eq!(
                f.to_dtype(DType::BF16)?
                    .to_dtype(DType::F32)?
                    .to_vec3::<f32>()?,
                b.to_dtype(DType::F32)?.to_vec3::<f32>()?
            );
        }
        Ok(())
    }
}
