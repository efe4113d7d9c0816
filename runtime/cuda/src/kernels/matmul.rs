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
//!
//! [`matmul_acc`] runs the same calls with β = 1 into an accumulator's buffer: a weight's
//! gradient summed over chunks of rows costs no product buffer and no addition per chunk.

use super::launch::{on, Buf, Result};
use super::{as_dtype, broadcast_strides, check, common_dtype, merge_axes, numel};
use crate::device::RankDevice;
use crate::tensor::{CudaTensor, DeviceData};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, DeviceRepr};
use ferrotron_exec::kernel::{invalid, KernelError, OrInvalid};
use ferrotron_ir::index;
use std::sync::Arc;

const OP: &str = "MatMul";

/// One cuBLAS call's geometry, in cuBLAS's (column-major) terms.
#[derive(Clone, Copy, Debug)]
pub(super) struct Call {
    /// Transposes of cuBLAS's first (`b`) and second (`a`) operands.
    pub(super) trans_b: bool,
    pub(super) trans_a: bool,
    /// cuBLAS's m, n, k: the product's columns, rows, and the contraction.
    pub(super) m: i32,
    pub(super) n: i32,
    pub(super) k: i32,
    pub(super) ldb: i32,
    pub(super) lda: i32,
    pub(super) ldc: i32,
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
pub(super) struct Batch {
    pub(super) offsets: (usize, usize, usize),
    pub(super) count: usize,
    pub(super) strides: (i64, i64, i64),
}

/// One cuBLAS call in cuBLAS's own terms: its first operand `A` is our `b`, its second `B` our
/// `a` (offsets and batch strides in elements of each buffer).
#[derive(Clone, Copy, Debug)]
pub(super) struct CublasCall {
    pub(super) trans_a: bool,
    pub(super) trans_b: bool,
    pub(super) m: i32,
    pub(super) n: i32,
    pub(super) k: i32,
    pub(super) lda: i32,
    pub(super) ldb: i32,
    pub(super) ldc: i32,
    /// Offsets of A (in our `b`), B (in our `a`) and C.
    pub(super) offsets: (usize, usize, usize),
    pub(super) count: usize,
    /// Batch strides of A, B and C.
    pub(super) strides: (i64, i64, i64),
}

/// The row-major product's batch as the column-major call cuBLAS gets.
pub(super) fn cublas_call(call: &Call, batch: &Batch) -> CublasCall {
    let (oa, ob, oc) = batch.offsets;
    let (sa, sb, sc) = batch.strides;
    CublasCall {
        trans_a: call.trans_b,
        trans_b: call.trans_a,
        m: call.m,
        n: call.n,
        k: call.k,
        lda: call.ldb,
        ldb: call.lda,
        ldc: call.ldc,
        offsets: (ob, oa, oc),
        count: batch.count,
        strides: (sb, sa, sc),
    }
}

/// The GEMMs of one product on buffers of one element type: `c = α·op(a)·op(b) + β·c` (β = 0:
/// `c` is only written).
fn run<T: DeviceRepr + Copy>(
    blas: &CudaBlas,
    (a, b, c): (&CudaSlice<T>, &CudaSlice<T>, &mut CudaSlice<T>),
    call: Call,
    batches: &[Batch],
    (alpha, beta): (T, T),
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let fail = |e: cudarc::cublas::result::CublasError| KernelError::Device {
        op: OP,
        msg: format!("cuBLAS: {e:?}"),
    };
    for batch in batches {
        let cc = cublas_call(&call, batch);
        let gemm = GemmConfig {
            transa: op_of(cc.trans_a),
            transb: op_of(cc.trans_b),
            m: cc.m,
            n: cc.n,
            k: cc.k,
            alpha,
            lda: cc.lda,
            ldb: cc.ldb,
            beta,
            ldc: cc.ldc,
        };
        // cuBLAS's A is our b, its B our a.
        let (o_first, o_second, oc) = cc.offsets;
        let first = b.slice(o_first..);
        let second = a.slice(o_second..);
        let mut cv = c.slice_mut(oc..);
        // SAFETY: the views start at offsets computed from the checked shapes, and cuBLAS reads
        // `count` matrices of the stored sizes at the given strides and leading dimensions, all
        // within the buffers (the offsets and strides come from the operands' own batch shapes;
        // the emulation in tests.rs checks the whole mapping against the CPU); the output view
        // is read (β ≠ 0) and written likewise and aliases neither input (it is a fresh buffer,
        // or an accumulator its tensor solely owns, which no input tensor can then share).
        unsafe {
            if cc.count == 1 {
                blas.gemm(gemm, &first, &second, &mut cv)
            } else {
                let (sa, sb, sc) = cc.strides;
                blas.gemm_strided_batched(
                    StridedBatchedConfig {
                        gemm,
                        batch_size: int("a batch of", cc.count)?,
                        stride_a: sa,
                        stride_b: sb,
                        stride_c: sc,
                    },
                    &first,
                    &second,
                    &mut cv,
                )
            }
        }
        .map_err(fail)?;
    }
    Ok(())
}

/// The cuBLAS calls of `a · b` with the shapes `mm` (non-empty, `k > 0`): the geometry and one
/// strided batch per combination of the batch axes that cannot merge.
pub(super) fn plan(mm: &index::MatMul, ta: bool, tb: bool) -> Result<(Call, Vec<Batch>)> {
    let (m, n, k) = (mm.m, mm.n, mm.k);
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
    if fold {
        // `[.., m, k] · [k, n]`: one `[batch·m, k] · [k, n]` product.
        let one = Batch {
            offsets: (0, 0, 0),
            count: 1,
            strides: (0, 0, 0),
        };
        return Ok((call, vec![one]));
    }
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
    int("a batch of", count)?;
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
    Ok((call, batches))
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
    if total == 0 || mm.k == 0 {
        // An empty product, or a sum over nothing: zeros.
        return Ok(Buf::zeros(dev, OP, dtype, total)?.into_tensor(out_shape));
    }
    let (call, batches) = plan(&mm, ta, tb)?;
    let a = as_dtype(dev, OP, a, dtype)?;
    let b = as_dtype(dev, OP, b, dtype)?;
    let mut out = Buf::uninit(dev, OP, dtype, total)?;
    // cuBLAS works in the calling thread's current context: make it this GPU's (a rank's
    // thread may not have run a kernel yet, and another device may be current).
    dev.gpu.ctx.bind_to_thread().map_err(on(OP))?;
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

/// `acc + op(a)·op(b)` (`acc` shaped like the product), accumulated in `acc`'s buffer by GEMMs
/// with β = 1: no product buffer and no separate addition. The operands compute in `acc`'s
/// storage type (converted when theirs differs); `acc`'s buffer is first made its own (copied
/// if another tensor shares it), so nothing else sees the sum. An empty product or a sum over
/// nothing (`k = 0`) leaves `acc` as it is.
pub fn matmul_acc(
    dev: &RankDevice,
    mut acc: CudaTensor,
    (a, b): (&CudaTensor, &CudaTensor),
    (ta, tb): (bool, bool),
) -> Result<CudaTensor> {
    let mm = index::matmul(&a.shape, &b.shape, ta, tb).or_invalid(OP)?;
    let out_shape = mm.out_shape();
    if acc.shape != out_shape {
        return Err(invalid(
            OP,
            format!(
                "the accumulator has shape {:?}, the product {:?} · {:?} has {:?}",
                acc.shape, a.shape, b.shape, out_shape
            ),
        ));
    }
    for t in [&acc, a, b] {
        check(OP, t)?;
    }
    let total = numel(OP, &out_shape)?;
    if total == 0 || mm.k == 0 {
        return Ok(acc);
    }
    let (call, batches) = plan(&mm, ta, tb)?;
    let dtype = acc.dtype();
    let a = as_dtype(dev, OP, a, dtype)?;
    let b = as_dtype(dev, OP, b, dtype)?;
    acc.make_unique(&dev.stream).map_err(on(OP))?;
    let shared = || KernelError::Device {
        op: OP,
        msg: "the accumulator's buffer is still shared".into(),
    };
    // As in `matmul`: cuBLAS works in the calling thread's current context.
    dev.gpu.ctx.bind_to_thread().map_err(on(OP))?;
    match (&a.data, &b.data, &mut acc.data) {
        (DeviceData::F32(x), DeviceData::F32(y), DeviceData::F32(c)) => {
            let c = Arc::get_mut(c).ok_or_else(shared)?;
            run(&dev.blas, (x, y, c), call, &batches, (1.0f32, 1.0f32))?
        }
        (DeviceData::Bf16(x), DeviceData::Bf16(y), DeviceData::Bf16(c)) => {
            let c = Arc::get_mut(c).ok_or_else(shared)?;
            let one = half::bf16::ONE;
            run(&dev.blas, (x, y, c), call, &batches, (one, one))?
        }
        _ => return Err(invalid(OP, "operands of different storage types")),
    }
    Ok(acc)
}
