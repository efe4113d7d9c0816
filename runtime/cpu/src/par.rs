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

use ferrotron_exec::backend::{adamw_host, AdamW};
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

/// The elements a partial sum of [`sum_squares`] covers: fixed, so the sum is the same on any
/// number of threads.
const SUM_BLOCK: usize = 1 << 16;

/// `Σ x²` in `f64`: each block of [`SUM_BLOCK`] elements summed in eight interleaved lanes
/// (vectorisable, where one running sum waits on each addition), the lanes and then the blocks
/// added in order.
pub(crate) fn sum_squares(threads: usize, x: &[f32]) -> f64 {
    #[inline(always)]
    fn block(x: &[f32]) -> f64 {
        let mut lanes = [0.0f64; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += f64::from(v) * f64::from(v);
            }
        }
        for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
            *l += f64::from(v) * f64::from(v);
        }
        lanes.iter().sum()
    }
    let blocks = x.len().div_ceil(SUM_BLOCK);
    par_ranges(threads, blocks, x.len(), |range| {
        range
            .map(|b| block(&x[b * SUM_BLOCK..((b + 1) * SUM_BLOCK).min(x.len())]))
            .collect::<Vec<f64>>()
    })
    .into_iter()
    .flatten()
    .sum()
}

/// AdamW ([`adamw_host`]'s arithmetic, elementwise, so bit-identical however it is split) on
/// up to `threads` threads: weights `w` with gradient `g`, moments `m` and `v`.
pub(crate) fn adamw(
    threads: usize,
    (w, g): (&mut [f32], &[f32]),
    (m, v): (&mut [f32], &mut [f32]),
    update: AdamW,
) {
    let t = threads_for(threads, w.len(), w.len());
    let per = w.len().div_ceil(t).max(1);
    w.par_chunks_mut(per)
        .zip(g.par_chunks(per))
        .zip(m.par_chunks_mut(per))
        .zip(v.par_chunks_mut(per))
        .for_each(|(((w, g), m), v)| {
            simd(
                #[inline(always)]
                || adamw_host(w, g, m, v, update),
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect()
    }

    #[test]
    fn adamw_on_threads_is_the_host_update_bit_for_bit() {
        let update = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
            grad_scale: 0.5,
        };
        // Past the size one thread keeps to itself, and not a multiple of any split.
        let n = 5 * MIN_PER_THREAD + 7;
        let (w0, g, m0, v0) = (
            values(n, 1),
            values(n, 2),
            values(n, 3),
            values(n, 4).iter().map(|x| x.abs()).collect::<Vec<_>>(),
        );
        let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
        adamw_host(&mut w, &g, &mut m, &mut v, update);
        for threads in [1, 2, 3] {
            let (mut w2, mut m2, mut v2) = (w0.clone(), m0.clone(), v0.clone());
            adamw(threads, (&mut w2, &g), (&mut m2, &mut v2), update);
            assert_eq!((&w2, &m2, &v2), (&w, &m, &v), "{threads} threads");
        }
        assert_ne!(w, w0, "the update changed the weights");
    }

    #[test]
    fn sum_squares_is_the_same_on_any_thread_count() {
        let x = values(3 * SUM_BLOCK + 11, 5);
        let sequential: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let one = sum_squares(1, &x);
        for threads in [2, 3, 4] {
            assert_eq!(sum_squares(threads, &x).to_bits(), one.to_bits());
        }
        assert!(
            (one - sequential).abs() <= 1e-12 * sequential,
            "{one} vs {sequential}"
        );
        assert_eq!(sum_squares(2, &[]), 0.0);
        assert_eq!(sum_squares(2, &[3.0]), 9.0);
    }
}
