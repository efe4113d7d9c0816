//! Data parallelism for the non-matmul kernels: an op's output split into chunks of whole rows,
//! one chunk per task on rayon's pool (the one `gemm` runs its matmuls on), when the tensor is
//! large enough that splitting pays. The pool's threads live for the process: no thread is
//! started per op. The chunks are the same whatever runs them, so are the results.
//!
//! Each chunk's work also runs through [`simd`], which compiles it (the kernel's closure, marked
//! `#[inline(always)]`, is inlined into a function built for the extension) for AVX-512 or AVX2
//! when the CPU has them:
//! the crate itself targets baseline x86-64 (SSE2), and the elementwise loops are 2–3× faster
//! with the wider vectors. No fused multiply-adds are formed (Rust does not contract `a * b + c`),
//! so every path computes bit-identical results.

use rayon::prelude::*;
use std::ops::Range;

/// Fewer elements than this per chunk are not worth handing to another thread.
const MIN_PER_THREAD: usize = 1 << 15;

/// Runs `f`, compiled for the widest vector extension this CPU has (see the module docs).
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has every feature the function is compiled for.
            return unsafe { x86::avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { x86::avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,avx,fma,sse4.1,sse4.2")]
    pub(super) unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    #[target_feature(enable = "avx2,avx,fma,sse4.1,sse4.2")]
    pub(super) unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// How many threads `items` items of `work` elements in all deserve.
fn threads_for(threads: usize, items: usize, work: usize) -> usize {
    threads.min(items).min(work / MIN_PER_THREAD).max(1)
}

/// Calls `f(first_row, chunk)` on consecutive chunks of whole rows (`row_len` elements each) of
/// `out`, on up to `threads` threads; returns each chunk's result in order (none for an empty
/// `out`).
pub(crate) fn par_chunks<T, F>(threads: usize, out: &mut [f32], row_len: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &mut [f32]) -> T + Sync,
{
    let work = out.len();
    par_chunks_work(threads, out, row_len, work, f)
}

/// [`par_chunks`] for kernels whose work is not the size of their output (`work` elements in
/// all: a row reduction).
pub(crate) fn par_chunks_work<T, F>(
    threads: usize,
    out: &mut [f32],
    row_len: usize,
    work: usize,
    f: F,
) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &mut [f32]) -> T + Sync,
{
    if row_len == 0 || out.is_empty() {
        return Vec::new(); // nothing to compute (and no rows to cut)
    }
    let rows = out.len() / row_len;
    let t = threads_for(threads, rows, work);
    if t <= 1 {
        return vec![simd(
            #[inline(always)]
            || f(0, out),
        )];
    }
    let per = rows.div_ceil(t);
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .map(|(i, c)| {
            simd(
                #[inline(always)]
                || f(i * per, c),
            )
        })
        .collect()
}

/// Calls `f(range)` on consecutive ranges covering `0..items` (`work` elements in all), on up
/// to `threads` threads; returns each range's result in order.
pub(crate) fn par_ranges<T, F>(threads: usize, items: usize, work: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(Range<usize>) -> T + Sync,
{
    let t = threads_for(threads, items, work);
    if t <= 1 {
        return vec![simd(
            #[inline(always)]
            || f(0..items),
        )];
    }
    let per = items.div_ceil(t);
    (0..t)
        .into_par_iter()
        .map(|i| {
            let range = (i * per).min(items)..((i + 1) * per).min(items);
            simd(
                #[inline(always)]
                || f(range),
            )
        })
        .collect()
}
