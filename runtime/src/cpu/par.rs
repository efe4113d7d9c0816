//! Data parallelism for the non-matmul kernels: an op's output split into chunks of whole rows,
//! one chunk per scoped thread (`std::thread::scope`), when the tensor is large enough that the
//! spawns pay for themselves. Matmuls use `gemm`'s own rayon parallelism instead.

use std::ops::Range;

/// Fewer elements than this per thread are not worth a thread (a spawn costs ~10–20 µs, about
/// what this many elements of a simple kernel take).
const MIN_PER_THREAD: usize = 1 << 15;

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
    if row_len == 0 || out.is_empty() {
        return Vec::new(); // nothing to compute (and no rows to cut)
    }
    let rows = out.len() / row_len;
    let t = threads_for(threads, rows, out.len());
    if t <= 1 {
        return vec![f(0, out)];
    }
    let per = rows.div_ceil(t);
    std::thread::scope(|s| {
        let mut chunks = out.chunks_mut(per * row_len).enumerate();
        let first = chunks.next();
        let handles: Vec<_> = chunks
            .map(|(i, c)| {
                let f = &f;
                s.spawn(move || f(i * per, c))
            })
            .collect();
        let mut results = Vec::with_capacity(t);
        if let Some((_, c)) = first {
            results.push(f(0, c));
        }
        for h in handles {
            results.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        results
    })
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
        return vec![f(0..items)];
    }
    let per = items.div_ceil(t);
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..t)
            .map(|i| {
                let f = &f;
                let range = (i * per).min(items)..((i + 1) * per).min(items);
                s.spawn(move || f(range))
            })
            .collect();
        let mut results = Vec::with_capacity(t);
        results.push(f(0..per.min(items)));
        for h in handles {
            results.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        results
    })
}
