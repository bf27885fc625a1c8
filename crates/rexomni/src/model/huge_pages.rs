//! A fixed-size array of plain values in its own allocation, 2 MiB-aligned when it is that large, which Linux is
//! asked to back with transparent huge pages (`madvise(MADV_HUGEPAGE)`, before the first write): the packed
//! weights that a decode step streams from memory once per token (gemm_bf16.rs, cpu_q8.rs).
//!
//! Why: with 4 KiB pages every page of a streamed weight costs a TLB miss and restarts the hardware prefetcher at
//! the page boundary. Transparent huge pages are often in `madvise` mode (this VM's
//! /sys/kernel/mm/transparent_hugepage/enabled says `[madvise]`), so an ordinary allocation never gets them.
//! Measured on this VM, a plain 1 GiB read loop: 11.6–12.9 GB/s with 4 KiB pages, 14.6–16.8 GB/s with huge
//! pages. Where the kernel refuses (THP off, other OSes), the array simply stays on 4 KiB pages.
//!
//! Also [`keep_freed_memory`], which stops glibc from handing a decode step's temporaries back to the kernel.
//!
//! In: a length and a fill value. Out: a buffer that dereferences to `[T]`. Filled on candle's rayon pool, so the
//! pages are first touched in parallel at load time.

use std::alloc::Layout;
use std::mem::MaybeUninit;
use std::ptr::NonNull;

use rayon::prelude::*;

/// A huge page on x86-64 Linux.
const HUGE: usize = 2 << 20;

/// `len` values of `T` (a plain `Copy` type) in one allocation of its own.
pub struct HugeBuf<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: `HugeBuf` owns its allocation like a `Box<[T]>`.
unsafe impl<T: Copy + Send> Send for HugeBuf<T> {}
unsafe impl<T: Copy + Sync> Sync for HugeBuf<T> {}

impl<T: Copy> HugeBuf<T> {
    fn layout(len: usize) -> Layout {
        let bytes = (len * size_of::<T>()).max(size_of::<T>()).max(1);
        let align = if bytes >= HUGE {
            HUGE
        } else {
            align_of::<T>().max(64)
        };
        Layout::from_size_align(bytes.next_multiple_of(align), align)
            .expect("a buffer that fits in memory has a valid layout")
    }
}

impl<T: Copy + Send + Sync> HugeBuf<T> {
    /// `len` copies of `fill`; arrays of 2 MiB or more are 2 MiB-aligned and advised to use huge pages.
    pub fn new(len: usize, fill: T) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) } as *mut T;
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if layout.align() == HUGE {
            const MADV_HUGEPAGE: libc::c_int = 14;
            // SAFETY: the range is our fresh allocation; a refusal only leaves 4 KiB pages.
            unsafe { libc::madvise(raw.cast(), layout.size(), MADV_HUGEPAGE) };
        }
        // SAFETY: the allocation holds `len` values; they are written below before anything reads them.
        let slots: &mut [MaybeUninit<T>] =
            unsafe { std::slice::from_raw_parts_mut(raw.cast(), len) };
        slots
            .par_chunks_mut((HUGE / size_of::<T>().max(1)).max(1))
            .for_each(|c| c.iter_mut().for_each(|s| _ = s.write(fill)));
        HugeBuf { ptr, len }
    }
}

impl<T: Copy> std::ops::Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised values.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> std::ops::DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), Self::layout(self.len)) }
    }
}

/// Keeps freed memory in the process instead of handing it back to the kernel (glibc malloc): every decode step
/// allocates and frees the same large temporaries (the KV-cache concatenations, f32 widenings in attention,
/// GEMM outputs and operand copies, hundreds of KiB each, per layer), and glibc's defaults serve blocks from
/// 128 KiB up with fresh `mmap`s and trim freed heap tops, so each step paid page faults and the kernel's zeroing
/// of fresh pages again (13 % of a real-config decode step in `perf`: `clear_page_erms`, `exc_page_fault`).
/// With blocks up to 32 MiB (glibc's maximum) from the heap and trimming only past 1 GiB free, they are reused:
/// the real 3B config's batch-1 decode step went from 291 to 241 ms on this VM (docs/benchmarks.md). Called
/// once per process when a model loads; a no-op other than on glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes malloc's thresholds; both values are within glibc's limits.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small and huge buffers hold their fill, are aligned as promised, and write through.
    #[test]
    fn buffers_hold_their_values() {
        for len in [1usize, 17, 1 << 20] {
            let mut b = HugeBuf::new(len, 7u32);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 7));
            let align = if len * 4 >= HUGE { HUGE } else { 64 };
            assert_eq!(b.as_ptr() as usize % align, 0, "len {len}");
            b[len - 1] = 9;
            assert_eq!(b[len - 1], 9);
        }
    }
}
