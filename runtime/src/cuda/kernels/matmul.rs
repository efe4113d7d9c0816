//! `MatMul` through cuBLAS on the rank's handle: `f32` operands with `cublasSgemm` (cuBLAS's
//! default math mode: true `f32`, no TF32), bf16 operands with `cublasGemmEx` (bf16 in and out,
//! `CUBLAS_COMPUTE_32F` accumulation).
//!
//! Row-major `C = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLAS gets `b` as its
//! first operand and `a` as its second, each transposed iff the IR transposes it, with the
//! stored row lengths as leading dimensions. Batch axes broadcast: `[.., m, k]·[k, n]` folds into
//! one tall GEMM; otherwise the batch axes (merged where both operands stay evenly strided) end
//! in one strided-batched call (stride 0 for a broadcast operand), looped over any outer axes
//! that cannot merge.

use super::launch::{Buf, Result};
use super::{as_dtype, broadcast_strides, common_dtype, merge_axes, numel};
use crate::cpu::kernels::{invalid, KernelError, OrInvalid};
use crate::cuda::device::RankDevice;
use crate::cuda::tensor::{CudaTensor, DeviceData};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, DeviceRepr};
use ferrotron_ir::index;

const OP: &str = "MatMul";

/// One cuBLAS call's geometry, in cuBLAS's (column-major) terms.
#[derive(Clone, Copy, Debug)]
struct Call {
    /// Transposes of cuBLAS's first (`b`) and second (`a`) operands.
    trans_b: bool,
    trans_a: bool,
    /// cuBLAS's m, n, k: the product's columns, rows, and the contraction.
    m: i32,
    n: i32,
    k: i32,
    ldb: i32,
    lda: i32,
    ldc: i32,
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        invalid(
            OP,
            format!("{what} {v} exceeds what one cuBLAS call takes (2^31 − 1)"),
        )
    })
}

fn op_of(t: bool) -> cublasOperation_t {
    if t {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// One strided batch: `count` products at element offsets `(a, b, c)` and batch strides.
#[derive(Clone, Copy, Debug)]
struct Batch {
    offsets: (usize, usize, usize),
    count: usize,
    strides: (i64, i64, i64),
}

/// The GEMMs of one product on buffers of one element type; `(one, zero)` are α and β.
fn run<T: DeviceRepr + Copy>(
    blas: &CudaBlas,
    (a, b, c): (&CudaSlice<T>, &CudaSlice<T>, &mut CudaSlice<T>),
    call: Call,
    batches: &[Batch],
    (one, zero): (T, T),
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let fail = |e: cudarc::cublas::result::CublasError| KernelError::Device {
        op: OP,
        msg: format!("cuBLAS: {e:?}"),
    };
    let gemm = GemmConfig {
        transa: op_of(call.trans_b),
        transb: op_of(call.trans_a),
        m: call.m,
        n: call.n,
        k: call.k,
        alpha: one,
        lda: call.ldb,
        ldb: call.lda,
        beta: zero,
        ldc: call.ldc,
    };
    for batch in batches {
        let (oa, ob, oc) = batch.offsets;
        let av = a.slice(oa..);
        let bv = b.slice(ob..);
        let mut cv = c.slice_mut(oc..);
        // SAFETY: the operands' views start at offsets computed from the checked shapes, and
        // cuBLAS reads `count` matrices of the stored sizes at the given strides and leading
        // dimensions, all within the buffers (the batch offsets and strides come from the
        // operands' own batch shapes); the output view is written likewise and aliases neither
        // input (it is a fresh buffer).
        unsafe {
            if batch.count == 1 {
                blas.gemm(gemm, &bv, &av, &mut cv)
            } else {
                let (sa, sb, sc) = batch.strides;
                blas.gemm_strided_batched(
                    StridedBatchedConfig {
                        gemm,
                        batch_size: int("a batch of", batch.count)?,
                        stride_a: sb,
                        stride_b: sa,
                        stride_c: sc,
                    },
                    &bv,
                    &av,
                    &mut cv,
                )
            }
        }
        .map_err(fail)?;
    }
    Ok(())
}

/// Batched `a · b` (after the optional transposes of the last two axes), batch axes
/// broadcasting; `f32` or bf16 (mixed operands compute in `f32`).
pub(super) fn matmul(
    dev: &RankDevice,
    a: &CudaTensor,
    b: &CudaTensor,
    ta: bool,
    tb: bool,
) -> Result<CudaTensor> {
    let mm = index::matmul(&a.shape, &b.shape, ta, tb).or_invalid(OP)?;
    let out_shape = mm.out_shape();
    let total = numel(OP, &out_shape)?;
    let dtype = common_dtype(&[a, b]);
    let (m, n, k) = (mm.m, mm.n, mm.k);
    if total == 0 || k == 0 {
        // An empty product, or a sum over nothing: zeros.
        return Ok(Buf::zeros(dev, OP, dtype, total)?.into_tensor(out_shape));
    }
    let a = as_dtype(dev, OP, a, dtype)?;
    let b = as_dtype(dev, OP, b, dtype)?;
    let nbatch: usize = mm.batch.iter().product();
    let nbatch_a: usize = mm.batch_a.iter().product();
    let nbatch_b: usize = mm.batch_b.iter().product();
    let (a_mat, b_mat) = (mm.a_rows * mm.a_cols, mm.b_rows * mm.b_cols);
    let fold = nbatch_b == 1 && !ta && nbatch_a == nbatch && i32::try_from(nbatch * m).is_ok();
    let call = Call {
        trans_b: tb,
        trans_a: ta,
        m: int("n", n)?,
        n: int("m", if fold { nbatch * m } else { m })?,
        k: int("k", k)?,
        ldb: int("a row of b", mm.b_cols.max(1))?,
        lda: int("a row of a", mm.a_cols.max(1))?,
        ldc: int("n", n)?,
    };
    let batches = if fold {
        // `[.., m, k] · [k, n]`: one `[batch·m, k] · [k, n]` product.
        vec![Batch {
            offsets: (0, 0, 0),
            count: 1,
            strides: (0, 0, 0),
        }]
    } else {
        let sa: Vec<usize> = broadcast_strides(mm.batch_a, &mm.batch)
            .into_iter()
            .map(|s| s * a_mat)
            .collect();
        let sb: Vec<usize> = broadcast_strides(mm.batch_b, &mm.batch)
            .into_iter()
            .map(|s| s * b_mat)
            .collect();
        let sc: Vec<usize> = super::contiguous_strides(&mm.batch)
            .into_iter()
            .map(|s| s * m * n)
            .collect();
        let (sizes, [sa, sb, sc]) = merge_axes(OP, &mm.batch, [&sa, &sb, &sc])?;
        // The last merged axis is one strided batch; the others are looped over.
        let r = sizes.len();
        let (count, strides) = if r == 0 {
            (1, (0, 0, 0))
        } else {
            (sizes[r - 1] as usize, (sa[r - 1], sb[r - 1], sc[r - 1]))
        };
        let outer = &sizes[..r.saturating_sub(1)];
        let outer_n: usize = outer.iter().map(|&s| s as usize).product();
        let mut batches = Vec::with_capacity(outer_n);
        for i in 0..outer_n {
            // The multi-index of outer batch `i`, row-major.
            let (mut idx, mut off) = (i, (0usize, 0usize, 0usize));
            for d in (0..outer.len()).rev() {
                let s = outer[d] as usize;
                let j = idx % s;
                idx /= s;
                off.0 += j * sa[d] as usize;
                off.1 += j * sb[d] as usize;
                off.2 += j * sc[d] as usize;
            }
            batches.push(Batch {
                offsets: off,
                count,
                strides,
            });
        }
        batches
    };
    let mut out = Buf::uninit(dev, OP, dtype, total)?;
    match (&a.data, &b.data, &mut out) {
        (DeviceData::F32(x), DeviceData::F32(y), Buf::F32(c)) => {
            run(&dev.blas, (x, y, c), call, &batches, (1.0f32, 0.0f32))?
        }
        (DeviceData::Bf16(x), DeviceData::Bf16(y), Buf::Bf16(c)) => run(
            &dev.blas,
            (x, y, c),
            call,
            &batches,
            (half::bf16::ONE, half::bf16::ZERO),
        )?,
        _ => return Err(invalid(OP, "operands of different storage types")),
    }
    Ok(out.into_tensor(out_shape))
}
