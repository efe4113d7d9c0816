//! Shape arithmetic and the strided copies: broadcasting, row iteration over strided operands,
//! `Transpose`, `Expand` and `SumTo`. Hot loops run over whole rows (the last axis) with a fixed
//! stride; the multi-index bookkeeping happens once per row.

use super::par::{par_chunks, par_ranges};
use ferrotron_exec::arena::{self, Buffer};
use ferrotron_exec::kernel::{invalid, KernelError, OrInvalid};
use ferrotron_exec::Tensor;
use ferrotron_ir::index;
pub(crate) use ferrotron_ir::index::{broadcast_strides, contiguous_strides};

pub(crate) type Result<T, E = KernelError> = std::result::Result<T, E>;

/// The most elements one tensor may have (256 GiB of `f32`): an attribute asking for more is an
/// error, not an allocation that aborts the process.
pub(crate) const MAX_ELEMENTS: usize = 1 << 36;

/// The number of elements of `shape`, or an error when it overflows or exceeds
/// [`MAX_ELEMENTS`].
pub(crate) fn numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    match index::numel(shape) {
        Some(n) if n <= MAX_ELEMENTS => Ok(n),
        _ => Err(invalid(
            op,
            format!("a tensor of shape {shape:?} is too large"),
        )),
    }
}

/// A zero tensor of `shape` (checked, see [`numel`]).
pub(crate) fn zeros(op: &'static str, shape: Vec<usize>) -> Result<Tensor> {
    let n = numel(op, &shape)?;
    Ok(Tensor {
        shape,
        data: buffer(n),
    })
}

/// A tensor of `shape` (checked, see [`numel`]) that the kernel overwrites in full: see
/// [`output`].
pub(crate) fn output_tensor(op: &'static str, shape: Vec<usize>) -> Result<Tensor> {
    let n = numel(op, &shape)?;
    Ok(Tensor {
        shape,
        data: output(n),
    })
}

/// Allocations from this size on are always fresh `mmap`s (glibc's largest mmap threshold), so
/// every page of an output is a page fault on first write.
const HUGE_PAGE_MIN_BYTES: usize = 32 << 20;

/// `n` zeros for an output: the output's place in the rank's arena where the rank program
/// offers one ([`arena::placing`]), else a fresh buffer.
pub(crate) fn buffer(n: usize) -> Buffer {
    match arena::placed(n) {
        Some(mut b) => {
            b.fill(0.0);
            b
        }
        None => fresh(n).into(),
    }
}

/// `n` elements for an output the kernel writes every element of: [`buffer`] without zeroing a
/// placed one (it holds what its place last held).
pub(crate) fn output(n: usize) -> Buffer {
    arena::placed(n).unwrap_or_else(|| fresh(n).into())
}

/// `n` zeros on the heap. A large buffer is marked for transparent huge pages before it is
/// touched: on a kernel whose THP mode is `madvise` (the usual default) that makes first writes
/// 512× fewer page faults, which halves the time of a large elementwise kernel (numpy does the
/// same).
fn fresh(n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    if n * std::mem::size_of::<f32>() >= HUGE_PAGE_MIN_BYTES {
        arena::advise_huge_pages(v.as_mut_ptr().cast(), n * std::mem::size_of::<f32>());
    }
    v
}

/// A copy of `xs` in an [`output`] buffer.
pub(crate) fn copied(xs: &[f32]) -> Buffer {
    let mut v = output(xs.len());
    v.copy_from_slice(xs);
    v
}

/// Whether `small` broadcast to `out` is `small`'s elements repeated: its shape without leading
/// ones is a suffix of `out` (a bias, a scalar).
pub(crate) fn is_trailing(small: &[usize], out: &[usize]) -> bool {
    let first = small.iter().position(|&s| s != 1).unwrap_or(small.len());
    let tail = &small[first..];
    tail.len() <= out.len() && out[out.len() - tail.len()..] == *tail
}

/// Calls `f` with the offsets of `K` strided operands at every multi-index of `shape`, in
/// row-major order (once for a scalar shape, never for one with a zero size). `strides[k][i]`
/// is operand `k`'s stride along axis `i`.
pub(crate) fn for_each_offset<const K: usize>(
    shape: &[usize],
    strides: [&[usize]; K],
    mut f: impl FnMut([usize; K]),
) {
    if shape.contains(&0) {
        return;
    }
    let r = shape.len();
    let mut idx = vec![0usize; r];
    let mut off = [0usize; K];
    loop {
        f(off);
        let mut i = r;
        loop {
            if i == 0 {
                return;
            }
            i -= 1;
            idx[i] += 1;
            for k in 0..K {
                off[k] += strides[k][i];
            }
            if idx[i] < shape[i] {
                break;
            }
            for k in 0..K {
                off[k] -= strides[k][i] * shape[i];
            }
            idx[i] = 0;
        }
    }
}

/// Axis permutation (output axis `i` is input axis `perm[i]`).
///
/// Size-1 axes are dropped and input axes that stay adjacent are merged first, so most
/// transposes become either copies of contiguous runs (attention's `[b, s, h, d] → [b, h, s, d]`)
/// or a 2-D transpose done in cache-sized tiles.
pub(crate) fn transpose(
    op: &'static str,
    x: &Tensor,
    perm: &[usize],
    threads: usize,
) -> Result<Tensor> {
    let shape = index::transpose(&x.shape, perm).or_invalid(op)?;
    let in_strides = contiguous_strides(&x.shape);
    // Output axes as (size, input stride), without size-1 axes, adjacent runs merged.
    let mut axes: Vec<(usize, usize)> = Vec::new();
    for &p in perm {
        let (n, s) = (x.shape[p], in_strides[p]);
        if n == 1 {
            continue;
        }
        match axes.last_mut() {
            Some(last) if last.1 == s * n => *last = (last.0 * n, s),
            _ => axes.push((n, s)),
        }
    }
    let mut out = output_tensor(op, shape)?;
    if out.data.is_empty() {
        return Ok(out);
    }
    let r = axes.len();
    if r <= 1 || axes[r - 1].1 == 1 && axes.windows(2).all(|w| w[0].1 == w[1].0 * w[1].1) {
        out.data.copy_from_slice(&x.data);
        return Ok(out);
    }
    let sizes: Vec<usize> = axes.iter().map(|a| a.0).collect();
    let src_strides: Vec<usize> = axes.iter().map(|a| a.1).collect();
    let dst_strides = contiguous_strides(&sizes);
    let src = &x.data[..];
    if src_strides[r - 1] == 1 {
        // Contiguous runs along the last axis: row copies.
        let run = sizes[r - 1];
        let outer = &sizes[..r - 1];
        let ss = &src_strides[..r - 1];
        let mut starts = Vec::with_capacity(out.data.len() / run);
        for_each_offset(outer, [ss], |[o]| starts.push(o));
        par_chunks(
            threads,
            &mut out.data,
            run,
            #[inline(always)]
            |first, chunk| {
                for (row, dst) in chunk.chunks_exact_mut(run).enumerate() {
                    let s = starts[first + row];
                    dst.copy_from_slice(&src[s..s + run]);
                }
            },
        );
        return Ok(out);
    }
    // A tiled 2-D transpose between the output's last axis (b) and the output axis the input
    // reads contiguously (a), looped over the other axes.
    let a = src_strides
        .iter()
        .position(|&s| s == 1)
        .expect("a contiguous input has an axis of stride 1");
    let b = r - 1;
    let others: Vec<usize> = (0..r).filter(|&i| i != a && i != b).collect();
    let o_sizes: Vec<usize> = others.iter().map(|&i| sizes[i]).collect();
    let o_src: Vec<usize> = others.iter().map(|&i| src_strides[i]).collect();
    let o_dst: Vec<usize> = others.iter().map(|&i| dst_strides[i]).collect();
    let (na, nb) = (sizes[a], sizes[b]);
    let (sa_dst, sb_src) = (dst_strides[a], src_strides[b]);
    const TILE: usize = 32;
    let dst = out.data.as_mut_ptr() as usize;
    let dst_len = out.data.len();
    let mut bases = Vec::new();
    for_each_offset(&o_sizes, [&o_src, &o_dst], |[s, d]| bases.push((s, d)));
    // Work items: (base, tile of a). Each tile goes through a buffer, so that both the reads
    // (along a) and the writes (along b) are whole runs of cache lines: with one side strided
    // by a power of two the lines of a direct tile copy would fight over one cache set.
    let a_tiles = na.div_ceil(TILE);
    let work = |range: std::ops::Range<usize>| {
        let mut buf = [[0f32; TILE]; TILE];
        for item in range {
            let (s0, d0) = bases[item / a_tiles];
            let a0 = (item % a_tiles) * TILE;
            let a1 = (a0 + TILE).min(na);
            for b0 in (0..nb).step_by(TILE) {
                let b1 = (b0 + TILE).min(nb);
                for (bi, row) in (b0..b1).zip(buf.iter_mut()) {
                    let s = s0 + bi * sb_src;
                    row[..a1 - a0].copy_from_slice(&src[s + a0..s + a1]);
                }
                for ai in a0..a1 {
                    let d = d0 + ai * sa_dst + b0;
                    debug_assert!(d + (b1 - b0) <= dst_len);
                    for (j, row) in buf[..b1 - b0].iter().enumerate() {
                        // SAFETY: `d + j` indexes the output (an injective map of output
                        // multi-indices), and the work items write disjoint sets of them.
                        unsafe { *(dst as *mut f32).add(d + j) = row[ai - a0] };
                    }
                }
            }
        }
    };
    par_ranges(threads, bases.len() * a_tiles, dst_len, work);
    Ok(out)
}

/// `x` broadcast to `shape` (NumPy rules).
pub(crate) fn expand(
    op: &'static str,
    x: &Tensor,
    shape: &[usize],
    threads: usize,
) -> Result<Tensor> {
    index::expand(&x.shape, shape).or_invalid(op)?;
    let mut out = zeros(op, shape.to_vec())?;
    if out.data.is_empty() {
        return Ok(out);
    }
    if is_trailing(&x.shape, shape) {
        let n = x.data.len();
        par_chunks(
            threads,
            &mut out.data,
            n,
            #[inline(always)]
            |_, chunk| {
                for row in chunk.chunks_exact_mut(n) {
                    row.copy_from_slice(&x.data);
                }
            },
        );
        return Ok(out);
    }
    let r = shape.len();
    let strides = broadcast_strides(&x.shape, shape);
    let (last, s_last) = (shape[r - 1], strides[r - 1]);
    let mut rows = out.data.chunks_exact_mut(last);
    for_each_offset(&shape[..r - 1], [&strides[..r - 1]], |[o]| {
        let row = rows.next().expect("one row per outer index");
        if s_last == 0 {
            row.fill(x.data[o]);
        } else {
            row.copy_from_slice(&x.data[o..o + last]);
        }
    });
    Ok(out)
}

/// Sums `x` over the axes it was broadcast along, down to `shape`, accumulating in `f64`.
pub(crate) fn sum_to(
    op: &'static str,
    x: &Tensor,
    shape: &[usize],
    threads: usize,
) -> Result<Tensor> {
    index::sum_to(&x.shape, shape).or_invalid(op)?;
    let mut out = zeros(op, shape.to_vec())?;
    let n = out.data.len();
    if x.data.is_empty() || n == 0 {
        return Ok(out);
    }
    if is_trailing(shape, &x.shape) {
        // x is `rows` repetitions of the target: sum the rows.
        let rows = x.data.len() / n;
        let partials = par_ranges(
            threads,
            rows,
            x.data.len(),
            #[inline(always)]
            |range| {
                let mut acc = vec![0f64; n];
                for row in x.data[range.start * n..range.end * n].chunks_exact(n) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v as f64;
                    }
                }
                acc
            },
        );
        let mut acc = vec![0f64; n];
        for p in partials {
            for (a, v) in acc.iter_mut().zip(p) {
                *a += v;
            }
        }
        for (o, a) in out.data.iter_mut().zip(acc) {
            *o = a as f32;
        }
        return Ok(out);
    }
    let r = x.rank();
    let strides = broadcast_strides(shape, &x.shape);
    let own = contiguous_strides(&x.shape);
    let (last, s_last) = (x.shape[r - 1], strides[r - 1]);
    let mut acc = vec![0f64; n];
    for_each_offset(
        &x.shape[..r - 1],
        [&own[..r - 1], &strides[..r - 1]],
        |[i, o]| {
            let row = &x.data[i..i + last];
            if s_last == 0 {
                acc[o] += row.iter().map(|&v| v as f64).sum::<f64>();
            } else {
                for (a, &v) in acc[o..o + last].iter_mut().zip(row) {
                    *a += v as f64;
                }
            }
        },
    );
    for (o, a) in out.data.iter_mut().zip(acc) {
        *o = a as f32;
    }
    Ok(out)
}
