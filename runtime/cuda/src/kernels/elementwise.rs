//! Launches of `cu/elementwise.cu`: Scale and the activations, their gradients, the fused bias
//! and activation (BiasAct) and its gradient, the broadcasting binary ops, Fill, dropout and the
//! fused bias + dropout + residual add (BiasDropoutAdd), and a sum into its first operand's
//! buffer (`add_into`).

use super::launch::{cfg_1d, device, i64_of, on, Buf, Launch, Result};
use super::structs::{DropShape, Strided2};
use super::{
    as_dtype, broadcast_strides, common_dtype, dims_array, is_trailing, merge_axes, numel, spec,
};
use crate::device::RankDevice;
use crate::tensor::{CudaTensor, DeviceData, Storage};
use cudarc::driver::DevicePtrMut;
use ferrotron_exec::kernel::{check_bias, invalid, OrInvalid, Placement};
use ferrotron_ir::index;
use std::sync::Arc;

/// The unary ops of the `unary` kernel.
#[derive(Clone, Copy, Debug)]
pub(super) enum UnaryOp {
    Scale(f64),
    Gelu,
    GeluTanh,
    Silu,
    Relu,
}

pub(super) fn unary(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    u: UnaryOp,
) -> Result<CudaTensor> {
    let (code, factor): (i32, f64) = match u {
        UnaryOp::Scale(f) => (0, f),
        UnaryOp::Gelu => (1, 0.0),
        UnaryOp::GeluTanh => (2, 0.0),
        UnaryOp::Silu => (3, 0.0),
        UnaryOp::Relu => (4, 0.0),
    };
    let n = x.numel();
    let mut out = Buf::uninit(dev, op, x.dtype(), n)?;
    if n > 0 {
        let n64 = i64_of(op, n)?;
        Launch::new(dev, op, &spec::UNARY, x.dtype())?
            .output(&mut out)
            .input(&x.data)
            .val(&n64)
            .val(&code)
            .val(&factor)
            .launch(cfg_1d(dev, n))?;
    }
    Ok(out.into_tensor(x.shape.clone()))
}

/// `dy · act'(x)`, `act` in the order of the IR's `Activation` (shapes checked by the caller).
pub(super) fn act_grad(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    dy: &CudaTensor,
    act: i32,
) -> Result<CudaTensor> {
    let dtype = common_dtype(&[x, dy]);
    let (x, dy) = (as_dtype(dev, op, x, dtype)?, as_dtype(dev, op, dy, dtype)?);
    let n = x.numel();
    let mut out = Buf::uninit(dev, op, dtype, n)?;
    if n > 0 {
        let n64 = i64_of(op, n)?;
        Launch::new(dev, op, &spec::ACT_GRAD, dtype)?
            .output(&mut out)
            .input(&x.data)
            .input(&dy.data)
            .val(&n64)
            .val(&act)
            .launch(cfg_1d(dev, n))?;
    }
    Ok(out.into_tensor(x.shape.clone()))
}

/// `act(x + bias)` (the fused BiasAct), `bias` a vector along `x`'s last axis (checked by the
/// caller); the sum stays `f32`.
pub(super) fn bias_act(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    bias: &CudaTensor,
    act: i32,
) -> Result<CudaTensor> {
    let dtype = common_dtype(&[x, bias]);
    let (x, bias) = (
        as_dtype(dev, op, x, dtype)?,
        as_dtype(dev, op, bias, dtype)?,
    );
    let n = x.numel();
    let mut out = Buf::uninit(dev, op, dtype, n)?;
    if n > 0 {
        let (n64, nb) = (i64_of(op, n)?, i64_of(op, bias.numel())?);
        Launch::new(dev, op, &spec::BIAS_ACT, dtype)?
            .output(&mut out)
            .input(&x.data)
            .input(&bias.data)
            .val(&n64)
            .val(&nb)
            .val(&act)
            .launch(cfg_1d(dev, n))?;
    }
    Ok(out.into_tensor(x.shape.clone()))
}

/// `dy · act'(x + bias)` (the fused BiasActGrad; shapes checked by the caller).
pub(super) fn bias_act_grad(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    bias: &CudaTensor,
    dy: &CudaTensor,
    act: i32,
) -> Result<CudaTensor> {
    let dtype = common_dtype(&[x, bias, dy]);
    let (x, bias, dy) = (
        as_dtype(dev, op, x, dtype)?,
        as_dtype(dev, op, bias, dtype)?,
        as_dtype(dev, op, dy, dtype)?,
    );
    let n = x.numel();
    let mut out = Buf::uninit(dev, op, dtype, n)?;
    if n > 0 {
        let (n64, nb) = (i64_of(op, n)?, i64_of(op, bias.numel())?);
        Launch::new(dev, op, &spec::BIAS_ACT_GRAD, dtype)?
            .output(&mut out)
            .input(&x.data)
            .input(&bias.data)
            .input(&dy.data)
            .val(&n64)
            .val(&nb)
            .val(&act)
            .launch(cfg_1d(dev, n))?;
    }
    Ok(out.into_tensor(x.shape.clone()))
}

/// The binary ops, as the kernels number them.
#[derive(Clone, Copy, Debug)]
pub(super) enum BinOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

/// How a broadcasting binary op reads its operands.
#[derive(Debug)]
pub(super) enum BinaryPlan {
    /// Each operand is the output's shape or its trailing elements repeated (a bias, a
    /// scalar): element `i` reads `a[i % na]`, `b[i % nb]`.
    Repeat { na: usize, nb: usize },
    /// Anything else: both through strides over the (merged) output axes.
    Strided(Strided2),
}

/// The plan of `a ⊕ b` for operand shapes `sa`, `sb` broadcast to `shape`.
pub(super) fn binary_plan(
    op: &'static str,
    sa: &[usize],
    sb: &[usize],
    shape: &[usize],
) -> Result<BinaryPlan> {
    if is_trailing(sa, shape) && is_trailing(sb, shape) {
        return Ok(BinaryPlan::Repeat {
            na: sa.iter().product(),
            nb: sb.iter().product(),
        });
    }
    let st_a = broadcast_strides(sa, shape);
    let st_b = broadcast_strides(sb, shape);
    let (sizes, [st_a, st_b]) = merge_axes(op, shape, [&st_a, &st_b])?;
    Ok(BinaryPlan::Strided(Strided2 {
        rank: sizes.len() as i32,
        pad: 0,
        size: dims_array(&sizes),
        sa: dims_array(&st_a),
        sb: dims_array(&st_b),
    }))
}

/// `a ⊕ b` with NumPy broadcasting (see [`binary_plan`]).
pub(super) fn binary(
    dev: &RankDevice,
    op: &'static str,
    a: &CudaTensor,
    b: &CudaTensor,
    bop: BinOp,
) -> Result<CudaTensor> {
    let shape = index::binary(&a.shape, &b.shape).or_invalid(op)?;
    let n = numel(op, &shape)?;
    let dtype = common_dtype(&[a, b]);
    let (a, b) = (as_dtype(dev, op, a, dtype)?, as_dtype(dev, op, b, dtype)?);
    let mut out = Buf::uninit(dev, op, dtype, n)?;
    if n == 0 {
        return Ok(out.into_tensor(shape));
    }
    let (n64, code) = (i64_of(op, n)?, bop as i32);
    match binary_plan(op, &a.shape, &b.shape, &shape)? {
        BinaryPlan::Repeat { na, nb } => {
            let (na, nb) = (i64_of(op, na)?, i64_of(op, nb)?);
            Launch::new(dev, op, &spec::BINARY, dtype)?
                .output(&mut out)
                .input(&a.data)
                .input(&b.data)
                .val(&n64)
                .val(&na)
                .val(&nb)
                .val(&code)
                .launch(cfg_1d(dev, n))?;
        }
        BinaryPlan::Strided(s) => {
            Launch::new(dev, op, &spec::BINARY_STRIDED, dtype)?
                .output(&mut out)
                .input(&a.data)
                .input(&b.data)
                .val(&s)
                .val(&n64)
                .val(&code)
                .launch(cfg_1d(dev, n))?;
        }
    }
    Ok(out.into_tensor(shape))
}

/// `acc + x` written over `acc`'s buffer (copied first if another tensor shares it): the
/// `Add` kernel with its output and first operand the same buffer, so the same bits as
/// [`binary`]'s `Add`. Operands of different shapes or types get a new tensor from [`binary`].
pub fn add_into(dev: &RankDevice, mut acc: CudaTensor, x: &CudaTensor) -> Result<CudaTensor> {
    const OP: &str = "Add";
    if acc.shape != x.shape || acc.dtype() != x.dtype() {
        return binary(dev, OP, &acc, x, BinOp::Add);
    }
    let n = acc.numel();
    if n == 0 {
        return Ok(acc);
    }
    acc.make_unique(&dev.stream).map_err(on(OP))?;
    let (dtype, n64, code) = (acc.dtype(), i64_of(OP, n)?, BinOp::Add as i32);
    let stream = &dev.stream;
    let shared = || device(OP, "the accumulator's buffer is shared");
    let (at, written) = match &mut acc.data {
        DeviceData::F32(s) => Arc::get_mut(s).ok_or_else(shared)?.device_ptr_mut(stream),
        DeviceData::Bf16(s) => Arc::get_mut(s).ok_or_else(shared)?.device_ptr_mut(stream),
    };
    Launch::new(dev, OP, &spec::BINARY, dtype)?
        .ptr(&at)
        .ptr(&at)
        .input(&x.data)
        .val(&n64)
        .val(&n64)
        .val(&n64)
        .val(&code)
        .launch(cfg_1d(dev, n))?;
    // Dropping the guard records the write after the launch.
    drop(written);
    Ok(acc)
}

/// A constant `f32` tensor (Fill has no input to take a storage type from; an op combining it
/// with bf16 values computes in `f32`).
pub(super) fn fill(
    dev: &RankDevice,
    op: &'static str,
    shape: Vec<usize>,
    v: f32,
) -> Result<CudaTensor> {
    let n = numel(op, &shape)?;
    let mut out = Buf::uninit(dev, op, Storage::F32, n)?;
    if n > 0 {
        let n64 = i64_of(op, n)?;
        Launch::new(dev, op, &spec::FILL, Storage::F32)?
            .output(&mut out)
            .val(&n64)
            .val(&v)
            .launch(cfg_1d(dev, n))?;
    }
    Ok(out.into_tensor(shape))
}

/// The dropout threshold, exactly the CPU's (the masks must be the same bits).
pub(super) use ferrotron_ir::reference::keep_threshold;

/// Where a dropout shard's elements sit in the full tensor: the local axes (merged) with the
/// full tensor's strides, and the counter of local element 0 (the shard's corner plus the
/// seed's offset): element `i` is kept iff `splitmix64(first + offset(i)) >= threshold`,
/// exactly the CPU's masks at any partitioning. Checks the shard against `local` as the CPU.
pub(super) fn dropout_plan(
    op: &'static str,
    shape: &[usize],
    local: &Placement,
) -> Result<(DropShape, u64)> {
    let r = shape.len();
    let (full, offsets) = match (&local.full_shape, &local.offsets) {
        (None, None) => (shape.to_vec(), vec![0; r]),
        (Some(f), None) => (f.clone(), vec![0; r]),
        (Some(f), Some(o)) => (f.clone(), o.clone()),
        (None, Some(_)) => return Err(invalid(op, "shard offsets without the full shape")),
    };
    let fits = full.len() == r
        && offsets.len() == r
        && (0..r).all(|i| {
            offsets[i]
                .checked_add(shape[i])
                .is_some_and(|end| end <= full[i])
        });
    if !fits || numel(op, &full).is_err() {
        return Err(invalid(
            op,
            format!(
                "a shard of shape {shape:?} at offsets {offsets:?} does not fit the full shape \
                 {full:?}"
            ),
        ));
    }
    // The full tensor's strides (it has at most 2^36 elements: no overflow).
    let strides = super::contiguous_strides(&full);
    let corner: u64 = offsets
        .iter()
        .zip(&strides)
        .map(|(&o, &s)| o as u64 * s as u64)
        .sum();
    let first = corner.wrapping_add(local.dropout_seed.wrapping_mul(1 << 40));
    let (sizes, [st]) = merge_axes(op, shape, [&strides])?;
    let s = DropShape {
        rank: sizes.len() as i32,
        pad: 0,
        size: dims_array(&sizes),
        stride: dims_array(&st),
    };
    Ok((s, first))
}

/// `x` through the dropout mask of its place in the full tensor, kept elements scaled by
/// `1/(1 − p)` (Dropout on its input, DropoutGrad on the gradient): see [`dropout_plan`].
pub(super) fn dropout(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    p: f64,
    local: &Placement,
) -> Result<CudaTensor> {
    let scale = index::dropout_scale(p).or_invalid(op)? as f32;
    let (s, first) = dropout_plan(op, &x.shape, local)?;
    let n = x.numel();
    let mut out = Buf::uninit(dev, op, x.dtype(), n)?;
    if n == 0 {
        return Ok(out.into_tensor(x.shape.clone()));
    }
    let (n64, threshold) = (i64_of(op, n)?, keep_threshold(p));
    Launch::new(dev, op, &spec::DROPOUT, x.dtype())?
        .output(&mut out)
        .input(&x.data)
        .val(&s)
        .val(&n64)
        .val(&first)
        .val(&threshold)
        .val(&scale)
        .launch(cfg_1d(dev, n))?;
    Ok(out.into_tensor(x.shape.clone()))
}

/// `residual + dropout(x + bias)` in one pass (the fused BiasDropoutAdd): the mask of the
/// unfused `Dropout` of `x + bias` placed by `local` ([`dropout_plan`] over `x`'s shape), and
/// each step rounded as the three unfused ops store it (the sum and the dropped value in the
/// storage type of `x` and `bias`, the result in that of all three), so the result equals
/// `Add`, `Dropout`, `Add` to the bit in either storage type without their two intermediate
/// tensors. `bias` must be a vector along `x`'s last axis and `residual` shaped like `x`, as
/// the CPU backend checks.
pub fn bias_dropout_add(
    dev: &RankDevice,
    (x, bias, residual): (&CudaTensor, &CudaTensor, &CudaTensor),
    p: f64,
    local: &Placement,
) -> Result<CudaTensor> {
    const OP: &str = "BiasDropoutAdd";
    check_bias(OP, &x.shape, &bias.shape)?;
    index::same_shape("the residual", &x.shape, &residual.shape).or_invalid(OP)?;
    let scale = index::dropout_scale(p).or_invalid(OP)? as f32;
    let (s, first) = dropout_plan(OP, &x.shape, local)?;
    // The unfused sum `x + bias` is stored in these two's common type; the result in all three's.
    let mid_bf16 = i32::from(common_dtype(&[x, bias]) == Storage::Bf16);
    let dtype = common_dtype(&[x, bias, residual]);
    let (x, bias, residual) = (
        as_dtype(dev, OP, x, dtype)?,
        as_dtype(dev, OP, bias, dtype)?,
        as_dtype(dev, OP, residual, dtype)?,
    );
    let n = x.numel();
    let mut out = Buf::uninit(dev, OP, dtype, n)?;
    if n == 0 {
        return Ok(out.into_tensor(x.shape.clone()));
    }
    let (n64, nb) = (i64_of(OP, n)?, i64_of(OP, bias.numel())?);
    let threshold = keep_threshold(p);
    Launch::new(dev, OP, &spec::BIAS_DROPOUT_ADD, dtype)?
        .output(&mut out)
        .input(&x.data)
        .input(&bias.data)
        .input(&residual.data)
        .val(&s)
        .val(&n64)
        .val(&nb)
        .val(&first)
        .val(&threshold)
        .val(&scale)
        .val(&mid_bf16)
        .launch(cfg_1d(dev, n))?;
    Ok(out.into_tensor(x.shape.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_threshold_decides_as_dropout_keeps() {
        for p in [0.0, 1e-9, 0.1, 0.5, 0.9] {
            let u = keep_threshold(p);
            for h in [u.wrapping_sub(1), u, u.saturating_add(1)] {
                assert_eq!(h >= u, h as f64 / 2f64.powi(64) >= p, "p {p}, h {h}");
            }
        }
    }
}
