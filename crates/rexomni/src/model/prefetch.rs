//! Software prefetch for the kernels that stream a weight once per decode step (cpu_q8.rs, gemm_bf16.rs's
//! levels).
//!
//! Why: with plain loads the hardware prefetchers kept this VM at ~21 GB/s on one decode step's weights (Q8_0
//! and packed bf16 alike, the same as a plain read loop), while AMX tile loads, which put 16 lines in flight
//! per instruction, reach ~29 GB/s on the same bf16 bytes. Asking for the line 4 KiB ahead of the one being
//! read closes that gap (`rexbench-gemm --q8-sweep` / `--bf16-sweep`, docs/benchmarks.md): Q8_0 21–22 → 27–33
//! GB/s at one row, AVX-512 BF16 19–23 → 25–31 GB/s. 1–16 KiB were tried, 4–8 KiB are flat. On the AMX level
//! the same sweep showed no gain, but in place it is what counts: a real-config decode step, with the model's
//! other work between the weight reads, took 414–516 ms at batch 1 and 498–546 at batch 4 without the hint
//! against 291–375 and 361–386 with it (two processes taking turns, 2026-12-01; 8 KiB ahead was level with 4).

/// How far ahead of the weight line being read the kernels ask for it: 32 lines, the next ~15 µs of one core's
/// stream at decode rates.
pub const AHEAD_BYTES: usize = 4096;

/// Asks for the 128 bytes (two cache lines) [`AHEAD_BYTES`] past `p` to be brought into L1. The address may lie
/// past the end of the weight: a prefetch is a hint and never faults.
#[inline(always)]
pub fn two_lines_ahead(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: prefetch instructions do not fault and do not change memory.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD_BYTES) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD_BYTES + 64) as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks for the `bytes` bytes (whole lines) [`AHEAD_BYTES`] past `p` to be brought into L1: the AMX level's
/// weight tiles, 2 KiB per step of 16 feature pairs, all of which a tile load waits for at once.
#[inline(always)]
pub fn lines_ahead(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for line in (0..bytes).step_by(64) {
            // SAFETY: prefetch instructions do not fault and do not change memory.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD_BYTES + line) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}
