//! `MatMul` through the `gemm` crate: row-major operands read through strides (the transposes
//! cost nothing), batch axes broadcast by offsets, a right operand without batch axes folded
//! into one tall product, and threads either inside one `gemm` (rayon) or across the batch.

use super::layout::{broadcast_strides, for_each_offset, output_tensor, Result};
use super::par::par_chunks_work;
use ferrotron_exec::kernel::OrInvalid;
use ferrotron_exec::Tensor;
use ferrotron_ir::index;
use gemm::Parallelism;

/// Products smaller than this many multiply-adds run on one thread.
const PAR_MIN_FLOPS: usize = 1 << 18;

/// One matrix operand: element `(i, l)` at `data[offset + i * rs + l * cs]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
    offset: usize,
}

impl<'a> Operand<'a> {
    /// The same strides, starting at `offset` (one matrix of a batch).
    fn at(self, offset: usize) -> Operand<'a> {
        Operand { offset, ..self }
    }
}

/// `dst[m × n]` (row-major, contiguous) `= A[m × k] · B[k × n]`.
fn gemm_into(
    dst: &mut [f32],
    a: Operand,
    b: Operand,
    (m, n, k): (usize, usize, usize),
    threads: usize,
) {
    gemm_at(dst, a, b, (m, n, k), threads, false)
}

/// `dst[m × n] (+)= A[m × k] · B[k × n]`: with `accumulate`, the product is added to `dst`.
fn gemm_at(
    dst: &mut [f32],
    a: Operand,
    b: Operand,
    (m, n, k): (usize, usize, usize),
    threads: usize,
    accumulate: bool,
) {
    let (a_off, b_off) = (a.offset, b.offset);
    assert_eq!(dst.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // Bounds of the last elements read, so the unsafe call below stays inside the slices.
    assert!(a_off + (m - 1) * a.rs + (k - 1) * a.cs < a.data.len());
    assert!(b_off + (k - 1) * b.rs + (n - 1) * b.cs < b.data.len());
    let parallelism = if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= PAR_MIN_FLOPS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every element read or written lies within the slices (checked above; strides and
    // sizes are non-negative), and `dst` does not alias the inputs (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr().add(a_off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b_off),
            b.cs as isize,
            b.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The operand `x` (`[rows, cols]` as stored), read transposed or not.
fn operand(x: &[f32], cols: usize, transposed: bool) -> Operand<'_> {
    let (rs, cs) = if transposed { (1, cols) } else { (cols, 1) };
    Operand {
        data: x,
        rs,
        cs,
        offset: 0,
    }
}

/// `acc += op(a) · op(b)` for matrices, in `acc`'s buffer (the GEMM reads it: β = 1).
pub(crate) fn matmul_acc(
    acc: &mut Tensor,
    (a, b): (&Tensor, &Tensor),
    (ta, tb): (bool, bool),
    threads: usize,
) -> Result<()> {
    const OP: &str = "MatMul";
    let mm = index::matmul(&a.shape, &b.shape, ta, tb).or_invalid(OP)?;
    if a.shape.len() != 2 || b.shape.len() != 2 || acc.shape != mm.out_shape() {
        return Err(ferrotron_exec::kernel::invalid(
            OP,
            format!(
                "accumulating {:?} · {:?} (transposed: {ta}, {tb}) into {:?}: matrices whose \
                 product has the accumulator's shape",
                a.shape, b.shape, acc.shape
            ),
        ));
    }
    let (ao, bo) = (
        operand(&a.data, mm.a_cols, ta),
        operand(&b.data, mm.b_cols, tb),
    );
    gemm_at(&mut acc.data, ao, bo, (mm.m, mm.n, mm.k), threads, true);
    Ok(())
}

/// Batched `a · b` (after the optional transposes of the last two axes), batch axes broadcasting.
pub(crate) fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool, threads: usize) -> Result<Tensor> {
    const OP: &str = "MatMul";
    let mm = index::matmul(&a.shape, &b.shape, ta, tb).or_invalid(OP)?;
    let mut out = output_tensor(OP, mm.out_shape())?;
    if out.data.is_empty() {
        return Ok(out);
    }
    let (m, n, k) = (mm.m, mm.n, mm.k);
    let (a_rows, a_cols, b_rows, b_cols) = (mm.a_rows, mm.a_cols, mm.b_rows, mm.b_cols);
    let (batch_a, batch_b, batch) = (mm.batch_a, mm.batch_b, &mm.batch);
    let (ao, bo) = (operand(&a.data, a_cols, ta), operand(&b.data, b_cols, tb));
    let nbatch: usize = batch.iter().product();
    let nbatch_a: usize = batch_a.iter().product();
    let nbatch_b: usize = batch_b.iter().product();
    // `[..., m, k] · [k, n]`: one `[batch · m, k] · [k, n]` product.
    if nbatch_b == 1 && !ta && nbatch_a == nbatch {
        gemm_into(&mut out.data, ao, bo, (nbatch * m, n, k), threads);
        return Ok(out);
    }
    let (a_mat, b_mat) = (a_rows * a_cols, b_rows * b_cols);
    let sa: Vec<usize> = broadcast_strides(batch_a, batch)
        .into_iter()
        .map(|s| s * a_mat)
        .collect();
    let sb: Vec<usize> = broadcast_strides(batch_b, batch)
        .into_iter()
        .map(|s| s * b_mat)
        .collect();
    let mut offsets = Vec::with_capacity(nbatch);
    for_each_offset(batch, [&sa, &sb], |[oa, ob]| offsets.push((oa, ob)));
    let mn = m * n;
    if threads > 1 && nbatch >= threads {
        // Many products: the threads share out the batch, each product on one thread.
        // Work in multiply-adds, scaled to what a thread does in the time of a simple kernel's
        // element.
        let work = out.data.len().saturating_mul(k) / 16;
        par_chunks_work(threads, &mut out.data, mn, work, |first, chunk| {
            for (i, dst) in chunk.chunks_exact_mut(mn).enumerate() {
                let (oa, ob) = offsets[first + i];
                gemm_into(dst, ao.at(oa), bo.at(ob), (m, n, k), 1);
            }
        });
    } else {
        for (dst, &(oa, ob)) in out.data.chunks_exact_mut(mn).zip(&offsets) {
            gemm_into(dst, ao.at(oa), bo.at(ob), (m, n, k), threads);
        }
    }
    Ok(out)
}
