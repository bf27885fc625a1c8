//! Q8_0 `x · Wᵀ` on the CPU (`[model] weights = "q8"`): decode steps and drafts' verification blocks.
//!
//! Why: candle 0.11.1's CPU `QMatMul` widens the activation to f32 and quantizes it on every call, then runs
//! one 256-bit AVX2 dot product per (activation row, weight row) with one accumulator per block chain, and reads
//! every weight once per activation row. A decode step is a pass over the weights, so it should run at the
//! machine's memory bandwidth: Q8_0 holds 34 bytes per 32 weights (0.53× of bf16).
//!
//! How: each activation row is quantized ONCE per call to int8 per 32-value block (`d = max|x| / 127`,
//! `q = round(x / d)`, as ggml does for Q8_0's dot partner, but `d` kept in f32), then every weight block is
//! read once from candle's own Q8_0 blocks (the `QTensor`'s bytes, no second copy) and dotted with all rows of
//! the call in registers: int8·int8 products summed exactly in int32 (AVX-512 VNNI `vpdpbusd` on two weight
//! rows per 512-bit register, AVX-VNNI or AVX2 `vpmaddubsw` on 256 bits, chosen at run time; a portable scalar
//! version), each block's lane sums widened to f32 and accumulated with the block's scale `d_w · d_x`.
//!
//! Same bits everywhere: the sum order is fixed by `k` alone ("canonical order", [`dot_scalar`] spells it):
//! for every (activation row, weight row) 8 f32 lanes, lane `l` covering bytes `4l..4l+4` of each block;
//! block by block in order, `acc[l] = fma(lane sum as f32, d_w · d_x, acc[l])` (the lane sums are exact
//! integers below 2^24); then `(a_i + a_{i+4})`, `(h_0 + h_2, h_1 + h_3)`, `g_0 + g_1`; then `+ bias`. Every
//! instruction-set level computes exactly that, and no step depends on `m` or on the other rows of the call,
//! so a row alone and the same row inside an m-row call give the same bits (the drafts' contract, engine.rs).
//!
//! In: `x` `[m, k]` bf16 or f32 (contiguous), a Q8_0 weight `[n, k]` (k a multiple of 32), an optional f32
//! bias. Out: `[m, n]` in `x`'s dtype (rounded once from f32), or f32 for the lm_head. Runs on the rayon pool
//! candle already uses for CPU ops; the quantized activation is the only allocation besides the output.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Bytes of one Q8_0 block: an f16 scale, then 32 int8 values.
pub const BLOCK_BYTES: usize = 34;
/// Values per Q8_0 block.
pub const BLOCK: usize = 32;

/// Weight rows per task at least (a multiple of every tile's height).
const MIN_ROWS_PER_TASK: usize = 16;
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

    /// VNNI levels take the activation as `q + 128` (unsigned, `vpdpbusd`'s first operand); the others as `q`.
    fn unsigned_x(self) -> bool {
        matches!(self, Level::Avx512Vnni | Level::AvxVnni)
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
    /// `[m, k]`: `q` as i8 bits, or `q + 128` for the VNNI levels (same bits as `q ^ 0x80`).
    q: Vec<u8>,
    /// `[m, k / 32]` block scales.
    d: Vec<f32>,
}

impl QuantRows {
    /// Quantizes `x [m, k]` (k a multiple of 32) for `level`. Scalar code, so every level sees the same `q`, `d`.
    pub fn new<T: Activation>(x: &[T], m: usize, k: usize, level: Level) -> QuantRows {
        assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
        assert_eq!(k % BLOCK, 0, "k = {k} is not a multiple of {BLOCK}");
        let flip = if level.unsigned_x() { 0x80u8 } else { 0 };
        let mut q = vec![0u8; m * k];
        let mut d = vec![0f32; m * k / BLOCK];
        let mut v = [0f32; BLOCK];
        for ((xb, qb), db) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(&mut d)
        {
            let mut amax = 0f32;
            for (vi, &xi) in v.iter_mut().zip(xb) {
                *vi = xi.to_f32();
                amax = amax.max(vi.abs());
            }
            let scale = amax / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            for (qi, &vi) in qb.iter_mut().zip(&v) {
                // |v · inv| ≤ 127 up to rounding, never 127.5: the i8 cast does not saturate.
                *qi = ((vi * inv).round() as i8 as u8) ^ flip;
            }
            *db = scale;
        }
        QuantRows { m, k, q, d }
    }
}

/// A Q8_0 weight `[n, k]` as candle stores it: `n · k / 32` blocks of [`BLOCK_BYTES`], row after row.
#[derive(Clone, Copy)]
pub struct Q8Weight<'a> {
    pub blocks: &'a [u8],
    pub n: usize,
    pub k: usize,
}

impl<'a> Q8Weight<'a> {
    pub fn new(blocks: &'a [u8], n: usize, k: usize) -> Result<Self> {
        if k % BLOCK != 0 || blocks.len() != n * k / BLOCK * BLOCK_BYTES {
            candle_core::bail!(
                "q8_0 weight [{n}, {k}]: {} bytes, expected {} (k a multiple of {BLOCK})",
                blocks.len(),
                n * k / BLOCK * BLOCK_BYTES
            )
        }
        Ok(Self { blocks, n, k })
    }

    /// A CPU Q8_0 `QTensor`'s blocks, borrowed (candle's CPU `data()` does not copy).
    pub fn of(q: &'a QTensor, data: &'a [u8]) -> Result<Self> {
        let (n, k) = q.shape().dims2()?;
        Self::new(data, n, k)
    }

    fn row(&self, j: usize) -> &'a [u8] {
        let rb = self.k / BLOCK * BLOCK_BYTES;
        &self.blocks[j * rb..(j + 1) * rb]
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
    w: Q8Weight,
    x: &[T],
    m: usize,
    bias: Option<&[f32]>,
) -> Vec<O> {
    let xq = QuantRows::new(x, m, w.k, level);
    matmul_quantized(level, w, &xq, bias)
}

/// [`matmul_on`] with the activation already quantized (for `level`).
pub fn matmul_quantized<O: Output>(
    level: Level,
    w: Q8Weight,
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
    let row_bytes = k / BLOCK * BLOCK_BYTES;
    let threads = rayon::current_num_threads().max(1);
    // Enough tasks to balance the pool, each a contiguous run of weight rows (a multiple of 4).
    let rows = (TASK_BYTES / row_bytes.max(1))
        .min(n.div_ceil(2 * threads))
        .max(MIN_ROWS_PER_TASK)
        .next_multiple_of(4);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(rows)).into_par_iter().for_each(|t| {
        let (j0, j1) = (t * rows, ((t + 1) * rows).min(n));
        let mut tile = [[0f32; TILE_X]; TILE_W];
        let mut j = j0;
        while j < j1 {
            let rw = (j1 - j).min(TILE_W);
            let mut i = 0;
            while i < m {
                let rx = (m - i).min(TILE_X);
                compute_tile(level, w, x, j, rw, i, rx, &mut tile);
                for (jj, col) in tile.iter().enumerate().take(rw) {
                    let b = bias.map_or(0.0, |b| b[j + jj]);
                    for (ii, &v) in col.iter().enumerate().take(rx) {
                        // SAFETY: tasks own disjoint column ranges `j0..j1` of `out` ([m, n]); i < m, j + jj < n.
                        unsafe { *out_ptr.at((i + ii) * n + j + jj) = O::from_f32(v + b) };
                    }
                }
                i += rx;
            }
            j += rw;
        }
    });
    out
}

/// Weight rows per register tile.
const TILE_W: usize = 4;
/// Activation rows per register tile.
const TILE_X: usize = 4;

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

/// `tile[jj][ii]` = dot of weight row `j + jj` (jj < rw) with activation row `i + ii` (ii < rx), canonical order.
#[allow(clippy::too_many_arguments)]
fn compute_tile(
    level: Level,
    w: Q8Weight,
    x: &QuantRows,
    j: usize,
    rw: usize,
    i: usize,
    rx: usize,
    tile: &mut [[f32; TILE_X]; TILE_W],
) {
    let nb = w.k / BLOCK;
    let wrows: [&[u8]; TILE_W] = std::array::from_fn(|jj| w.row(j + jj.min(rw - 1)));
    let xq = &x.q[i * w.k..(i + rx) * w.k];
    let xd = &x.d[i * nb..(i + rx) * nb];
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni => {
            // SAFETY: `Level::available` checked the features; slices are in bounds (lengths asserted above).
            unsafe {
                match rx {
                    1 => x86::tile_avx512::<1>(&wrows, xq, xd, nb, tile),
                    2 => x86::tile_avx512::<2>(&wrows, xq, xd, nb, tile),
                    3 => x86::tile_avx512::<3>(&wrows, xq, xd, nb, tile),
                    _ => x86::tile_avx512::<4>(&wrows, xq, xd, nb, tile),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Level::AvxVnni => unsafe {
            // SAFETY: as above. 16 ymm registers: tiles of 2 × 2.
            for jj in (0..rw).step_by(2) {
                for ii in (0..rx).step_by(2) {
                    let r = x86::tile_avxvnni(
                        [wrows[jj], wrows[(jj + 1).min(rw - 1)]],
                        [&xq[ii * w.k..], &xq[(ii + 1).min(rx - 1) * w.k..]],
                        [&xd[ii * nb..], &xd[(ii + 1).min(rx - 1) * nb..]],
                        nb,
                    );
                    store2(tile, jj, ii, rw, rx, r);
                }
            }
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe {
            // SAFETY: as above.
            for jj in (0..rw).step_by(2) {
                for ii in (0..rx).step_by(2) {
                    let r = x86::tile_avx2(
                        [wrows[jj], wrows[(jj + 1).min(rw - 1)]],
                        [&xq[ii * w.k..], &xq[(ii + 1).min(rx - 1) * w.k..]],
                        [&xd[ii * nb..], &xd[(ii + 1).min(rx - 1) * nb..]],
                        nb,
                    );
                    store2(tile, jj, ii, rw, rx, r);
                }
            }
        },
        _ => {
            for (jj, row) in tile.iter_mut().enumerate().take(rw) {
                for (ii, o) in row.iter_mut().enumerate().take(rx) {
                    let xs = &xq[ii * w.k..(ii + 1) * w.k];
                    *o = dot_scalar(
                        wrows[jj],
                        xs,
                        &xd[ii * nb..(ii + 1) * nb],
                        level.unsigned_x(),
                    );
                }
            }
        }
    }
}

/// Writes a 2 × 2 sub-tile `r[w][x]`, skipping the duplicated rows of a ragged edge.
#[cfg(target_arch = "x86_64")]
fn store2(
    tile: &mut [[f32; TILE_X]; TILE_W],
    jj: usize,
    ii: usize,
    rw: usize,
    rx: usize,
    r: [[f32; 2]; 2],
) {
    for (a, ra) in r.iter().enumerate() {
        for (b, &v) in ra.iter().enumerate() {
            if jj + a < rw && ii + b < rx {
                tile[jj + a][ii + b] = v;
            }
        }
    }
}

/// The canonical order (module doc) for one weight row and one activation row: the reference every level meets.
/// `xq` holds `q` (or `q + 128` when `unsigned_x`).
pub fn dot_scalar(wrow: &[u8], xq: &[u8], xd: &[f32], unsigned_x: bool) -> f32 {
    let flip = if unsigned_x { 0x80u8 } else { 0 };
    let mut acc = [0f32; 8];
    for (b, (wb, &dx)) in wrow.chunks_exact(BLOCK_BYTES).zip(xd).enumerate() {
        let dw = f16::from_bits(u16::from_le_bytes([wb[0], wb[1]])).to_f32();
        let s = dw * dx;
        let xb = &xq[b * BLOCK..(b + 1) * BLOCK];
        for (l, a) in acc.iter_mut().enumerate() {
            let mut sum = 0i32;
            for t in 4 * l..4 * l + 4 {
                sum += (wb[2 + t] as i8 as i32) * ((xb[t] ^ flip) as i8 as i32);
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
    use super::{BLOCK, BLOCK_BYTES, TILE_W, TILE_X};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn scale_bits(p: *const u8) -> i16 {
        unsafe { (p as *const i16).read_unaligned() }
    }

    /// The canonical 8-lane reduction of a 256-bit accumulator (`reduce8`).
    #[inline(always)]
    unsafe fn reduce256(a: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let g = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(g, _mm_shuffle_ps(g, g, 1)))
    }

    /// Four weight rows (two per 512-bit register: row 2p in the low half, 2p+1 in the high half, the same
    /// block) × `RX` activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn tile_avx512<const RX: usize>(
        w: &[&[u8]; TILE_W],
        xq: &[u8],
        xd: &[f32],
        nb: usize,
        out: &mut [[f32; TILE_X]; TILE_W],
    ) {
        unsafe {
            let k = nb * BLOCK;
            let c80 = _mm512_set1_epi8(0x80u8 as i8);
            let zero = _mm512_setzero_si512();
            let mut acc = [[_mm512_setzero_ps(); RX]; 2];
            let wp: [*const u8; TILE_W] = std::array::from_fn(|r| w[r].as_ptr());
            let (xp, dp) = (xq.as_ptr(), xd.as_ptr());
            for b in 0..nb {
                let off = b * BLOCK_BYTES;
                let mut wv = [zero; 2];
                let mut nc = [zero; 2];
                let mut dw = [_mm512_setzero_ps(); 2];
                for p in 0..2 {
                    let (lo, hi) = (wp[2 * p].add(off), wp[2 * p + 1].add(off));
                    wv[p] = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_loadu_si256(lo.add(2) as *const __m256i)),
                        _mm256_loadu_si256(hi.add(2) as *const __m256i),
                        1,
                    );
                    // −128 · (lane sums of w): with x + 128 as the unsigned operand, vpdpbusd then adds Σ x·w.
                    nc[p] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c80, wv[p]));
                    let bits = _mm256_inserti128_si256(
                        _mm256_castsi128_si256(_mm_set1_epi16(scale_bits(lo))),
                        _mm_set1_epi16(scale_bits(hi)),
                        1,
                    );
                    dw[p] = _mm512_cvtph_ps(bits);
                }
                for r in 0..RX {
                    let xv = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        xp.add(r * k + b * BLOCK) as *const __m256i
                    ));
                    let dx = _mm512_set1_ps(*dp.add(r * nb + b));
                    for p in 0..2 {
                        let s = _mm512_mul_ps(dw[p], dx);
                        let sum = _mm512_dpbusd_epi32(nc[p], xv, wv[p]);
                        acc[p][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, acc[p][r]);
                    }
                }
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

    /// Two weight rows × two activation rows, AVX-VNNI on 256 bits.
    #[target_feature(enable = "avxvnni,avx2,fma,f16c")]
    pub unsafe fn tile_avxvnni(
        w: [&[u8]; 2],
        xq: [&[u8]; 2],
        xd: [&[f32]; 2],
        nb: usize,
    ) -> [[f32; 2]; 2] {
        unsafe {
            let c80 = _mm256_set1_epi8(0x80u8 as i8);
            let zero = _mm256_setzero_si256();
            let mut acc = [[_mm256_setzero_ps(); 2]; 2];
            for b in 0..nb {
                let off = b * BLOCK_BYTES;
                let mut wv = [zero; 2];
                let mut nc = [zero; 2];
                let mut dw = [_mm256_setzero_ps(); 2];
                for j in 0..2 {
                    let p = w[j].as_ptr().add(off);
                    wv[j] = _mm256_loadu_si256(p.add(2) as *const __m256i);
                    nc[j] = _mm256_sub_epi32(zero, _mm256_dpbusd_avx_epi32(zero, c80, wv[j]));
                    dw[j] = _mm256_cvtph_ps(_mm_set1_epi16(scale_bits(p)));
                }
                for i in 0..2 {
                    let xv = _mm256_loadu_si256(xq[i].as_ptr().add(b * BLOCK) as *const __m256i);
                    let dx = _mm256_set1_ps(*xd[i].as_ptr().add(b));
                    for j in 0..2 {
                        let s = _mm256_mul_ps(dw[j], dx);
                        let sum = _mm256_dpbusd_avx_epi32(nc[j], xv, wv[j]);
                        acc[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), s, acc[j][i]);
                    }
                }
            }
            let mut out = [[0f32; 2]; 2];
            for j in 0..2 {
                for i in 0..2 {
                    out[j][i] = reduce256(acc[j][i]);
                }
            }
            out
        }
    }

    /// Two weight rows × two activation rows, AVX2: |w| · (x with w's sign) by `vpmaddubsw` (pairs of products
    /// stay within i16: 2 · 128 · 127 < 32767), then `vpmaddwd` by ones into the same 8 lanes as `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_avx2(
        w: [&[u8]; 2],
        xq: [&[u8]; 2],
        xd: [&[f32]; 2],
        nb: usize,
    ) -> [[f32; 2]; 2] {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[_mm256_setzero_ps(); 2]; 2];
            for b in 0..nb {
                let off = b * BLOCK_BYTES;
                let mut wv = [_mm256_setzero_si256(); 2];
                let mut aw = [_mm256_setzero_si256(); 2];
                let mut dw = [_mm256_setzero_ps(); 2];
                for j in 0..2 {
                    let p = w[j].as_ptr().add(off);
                    wv[j] = _mm256_loadu_si256(p.add(2) as *const __m256i);
                    aw[j] = _mm256_abs_epi8(wv[j]);
                    dw[j] = _mm256_cvtph_ps(_mm_set1_epi16(scale_bits(p)));
                }
                for i in 0..2 {
                    let xv = _mm256_loadu_si256(xq[i].as_ptr().add(b * BLOCK) as *const __m256i);
                    let dx = _mm256_set1_ps(*xd[i].as_ptr().add(b));
                    for j in 0..2 {
                        let s = _mm256_mul_ps(dw[j], dx);
                        let p16 = _mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(xv, wv[j]));
                        let sum = _mm256_madd_epi16(p16, ones);
                        acc[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), s, acc[j][i]);
                    }
                }
            }
            let mut out = [[0f32; 2]; 2];
            for j in 0..2 {
                for i in 0..2 {
                    out[j][i] = reduce256(acc[j][i]);
                }
            }
            out
        }
    }
}

/// Whether a layer's forward takes this kernel: on by default; `REXOMNI_Q8_KERNEL=candle` keeps candle's
/// `QMatMul` (only so that a benchmark can measure before and after with one binary, docs/benchmarks.md).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("REXOMNI_Q8_KERNEL").is_ok_and(|v| v == "candle"))
}

/// Whether `x · q` runs here: a CPU Q8_0 weight, a bf16 or f32 activation on the CPU.
pub fn applies(q: &QTensor, x: &Tensor) -> bool {
    enabled()
        && q.dtype() == GgmlDType::Q8_0
        && q.device().is_cpu()
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::BF16 | DType::F32)
}

/// `x [.., k] · qᵀ + bias` → `[.., n]` in `x`'s dtype, or in f32 when `f32_out` (the lm_head). Call only where
/// [`applies`] holds.
pub fn forward(q: &QTensor, bias: Option<&[f32]>, x: &Tensor, f32_out: bool) -> Result<Tensor> {
    let (n, k) = q.shape().dims2()?;
    let kx = x.dim(candle_core::D::Minus1)?;
    if kx != k {
        candle_core::bail!("q8_0 linear: input has {kx} features, the weight takes {k}")
    }
    let rows = x.elem_count() / k.max(1);
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = n;
    x.reshape((rows, k))?
        .contiguous()?
        .apply_op1_no_bwd(&Q8Matmul { q, bias, f32_out })?
        .reshape(out_dims)
}

/// The custom op behind [`forward`].
struct Q8Matmul<'a> {
    q: &'a QTensor,
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
        let data = self.q.data()?;
        let w = Q8Weight::of(self.q, &data)?;
        let level = Level::best();
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
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    fn quantized(n: usize, k: usize) -> QTensor {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()
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
            let q = quantized(n, k);
            let data = q.data()?;
            let w = Q8Weight::of(&q, &data)?;
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?
                .flatten_all()?
                .to_vec1()?;
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 1.0).collect();
            let want: Vec<f32> = matmul_on(Level::Scalar, w, &x, m, Some(&bias));
            for &level in &levels {
                let got: Vec<f32> = matmul_on(level, w, &x, m, Some(&bias));
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
                        matmul_on(level, w, &x[i * k..(i + 1) * k], 1, Some(&bias));
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

    /// Against the dequantized weight in f32 (the exact product of what is stored with the unquantized x) and
    /// against candle's `QMatMul`, bf16 and f32 activations. The only extra error is the activation's 8-bit
    /// rounding (candle does the same, with an f16 scale): relative RMS ~0.5 % per block, so the largest error
    /// over a few hundred outputs stays below 2 % of the output scale; we and candle agree within 2 % too.
    #[test]
    fn close_to_the_dequantized_product_and_to_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 2048, 256), (4, 1024, 130), (17, 96, 40)] {
            let qm = QMatMul::from_qtensor(quantized(n, k))?;
            let QMatMul::QTensor(q) = &qm else {
                panic!("a Q8_0 QMatMul holds its QTensor")
            };
            let x = Tensor::randn(0f32, 1.0, (2, m, k), &dev)?;
            let wf = q.dequantize(&dev)?;
            let want = x.broadcast_matmul(&wf.t()?)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let candle = qm.forward(&x)?;
            for dtype in [DType::F32, DType::BF16] {
                let xd = x.to_dtype(dtype)?;
                let ours = forward(q, None, &xd, false)?;
                assert_eq!(ours.dtype(), dtype);
                assert_eq!(ours.dims(), &[2, m, n]);
                let ours = ours.to_dtype(DType::F32)?;
                let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
                    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
                };
                let (e_ref, e_candle) = (rel(&ours, &want)?, rel(&ours, &candle)?);
                eprintln!("m={m} k={k} n={n} {dtype:?}: max |Δ| / scale vs f32 {e_ref:.1e}, vs candle {e_candle:.1e}");
                assert!(e_ref < 0.02, "m={m} k={k} n={n} {dtype:?}: vs f32 {e_ref}");
                assert!(
                    e_candle < 0.02,
                    "m={m} k={k} n={n} {dtype:?}: vs candle {e_candle}"
                );
            }
            // f32 out from bf16 x is the same accumulator, unrounded.
            let f = forward(q, None, &x.to_dtype(DType::BF16)?, true)?;
            assert_eq!(f.dtype(), DType::F32);
            let b = forward(q, None, &x.to_dtype(DType::BF16)?, false)?;
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
