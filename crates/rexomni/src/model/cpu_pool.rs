//! Where a CPU forward pass runs: on a thread of rayon's global pool, the pool that candle's CPU ops and our
//! kernels (gemm_bf16.rs, cpu_q8.rs, cpu_f32.rs) split their work over.
//!
//! Why: called from an outside thread (the detector thread, rexbench's main), each of a decode step's ~250
//! parallel calls puts the caller to sleep, wakes the pool's threads, and wakes the caller again once they are
//! done: three threads on two cores and thousands of context switches per second. Run on a pool thread, the
//! caller works through the call's tasks itself while the other threads steal from it, so only they need waking.
//! Measured on the real 3B config (rexbench `--pool-ab`, alternating in one process, docs/benchmarks.md):
//! Q8_0 decode 121–126 against 123–131 ms/step at batch 1 and 186–190 against 214–222 at batch 4.
//!
//! The bits do not change: the same tasks run in the same order per output, only on other threads.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::Device;

/// 1 = on, 0 = off, `UNREAD` until the first call reads `REXOMNI_CPU_POOL` (`off` turns the hop off, for A/B
/// runs of whole stages; [`set_enabled`] overrides it).
static ENABLED: AtomicU8 = AtomicU8::new(UNREAD);
const UNREAD: u8 = 2;

fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        UNREAD => {
            let on = std::env::var("REXOMNI_CPU_POOL").map_or(true, |v| v != "off");
            ENABLED.store(u8::from(on), Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

/// Runs `f` on a thread of rayon's global pool when `device` is the CPU and the caller is not already on one;
/// otherwise (a GPU, a pool thread, the hop switched off: `REXOMNI_CPU_POOL=off` or [`set_enabled`]) on the
/// caller's thread. Blocks until `f` returns.
pub fn run<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() || !enabled() {
        return f();
    }
    // `scope` runs its closure on a pool thread (injected, the caller blocked until it returns); no task is
    // spawned into the scope itself.
    rayon::scope(|_| f())
}

/// Whether [`run`] moves CPU work onto the pool (default: yes). For benchmarks that time both ways.
pub fn set_enabled(on: bool) {
    ENABLED.store(u8::from(on), Ordering::Relaxed);
}

/// Off only for A/B measurements ([`set_task_jobs`]).
static TASK_JOBS: AtomicU8 = AtomicU8::new(1);

/// The `with_max_len` of a kernel's parallel iterator over coarse tasks (a GEMM's output blocks, the prefill
/// attention's blocks of positions, the vision windows, cpu_q8's weight groups): 1, every task a job of its own
/// that an idle thread can steal.
///
/// Why: rayon cuts an indexed iterator into about four pieces per thread and never splits a piece again once
/// its own thread has started it (only a stolen piece is split further). With two threads, a call's last piece
/// (up to a quarter of its tasks: ten 2.3 ms tasks of a real-config `down_proj` at 441 rows) could run on one
/// thread while the other waited: `perf` found one of the two pool threads idle 15 % of a real-config prefill,
/// and with one job per task both stay busy (docs/benchmarks.md, `rexbench --tasks-ab`). A task here is
/// tens of microseconds at least, so a job each costs nothing measurable. Which thread runs a task never
/// changes what it computes: the bits are the same either way.
pub fn max_tasks_per_job() -> usize {
    if TASK_JOBS.load(Ordering::Relaxed) == 1 {
        1
    } else {
        usize::MAX
    }
}

/// Whether [`max_tasks_per_job`] makes every task a job (default: yes) or leaves the split to rayon's
/// adaptive pieces, as before. For benchmarks that time both ways.
pub fn set_task_jobs(on: bool) {
    TASK_JOBS.store(u8::from(on), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_work_runs_on_a_pool_thread_and_nests() {
        assert!(rayon::current_thread_index().is_none());
        let (outer, inner) = run(&Device::Cpu, || {
            let outer = rayon::current_thread_index();
            (outer, run(&Device::Cpu, rayon::current_thread_index))
        });
        assert!(outer.is_some());
        assert_eq!(inner, outer, "a nested call stays on its thread");
    }
}
