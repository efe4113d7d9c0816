//! Fused scaled dot-product attention on the device: launches of `cu/attention.cu`.
//!
//! Where it sits: the executor's `Fused::Attention` step (`ferrotron_exec::fuse`) replaces the
//! chain `q·kᵀ → Scale → Softmax → Dropout → ·v` with [`Backend::attention`], and its gradient
//! chain with [`Backend::attention_grad`] (`ferrotron_exec::Backend`); the CUDA backend answers
//! both here. The forward returns the output and each query row's log-sum-exp of its scaled
//! scores, which is all the backward needs to recompute the probabilities: neither pass ever
//! holds the `[batch, queries, keys]` scores.
//!
//! The kernels (FlashAttention-2's split, one warp per output row and group of up to 256 of its
//! columns, 4 warps a block, grid-strided over the rows):
//! * `attn_fwd`: per query row, an online softmax over the visible keys, 32 at a time;
//! * `attn_row_dot`: per query row, `D = dout·out` (in `f64`);
//! * `attn_bwd_dq`: per query row, `dq = factor Σⱼ dS·k` over the keys it sees;
//! * `attn_bwd_dkv`: per key row, `dk = factor Σᵢ dS·q` and `dv = Σᵢ Z·dout` over the queries
//!   that see it.
//!
//! Every sum runs in an order fixed by the shapes (no atomics), so the results are deterministic.
//! Dropout is the unfused `Dropout`'s mask on the probabilities `[..., heads, queries, keys]`
//! ([`AttentionDims::probs_shape`]) at the [`Placement`] passed in ([`dropout_plan`] of that
//! shape), so fused and unfused runs drop the same elements.
//!
//! Layout ([`AttentionSpec::seq_first`]): heads first, `q` `[..., queries, d]` and so on; sequence
//! first, `q` `[..., queries, heads, d]`, `k` `[..., keys, heads, d]`, `v` `[..., keys, heads,
//! dv]`, the output, its gradient and `dq`, `dk`, `dv` likewise, read and written in place (the
//! kernels take the heads, [`AttnShape::heads`], and find batch entry `b`'s rows as
//! [`AttentionDims::rows_of`] does; 1 head is the heads-first layout). The log-sum-exps are
//! `[..., heads, queries]` either way.
//!
//! Operands stored in bf16 are computed in `f32`; an attention whose operands mix `f32` and bf16
//! computes in `f32` and returns `f32`, as every kernel of the backend.

use super::elementwise::{dropout_plan, keep_threshold};
use super::launch::{i64_of, scratch_f64, Buf, KernelValue, Launch, Result};
use super::spec::{Param, ATTN_BWD_DKV, ATTN_BWD_DQ, ATTN_FWD, ATTN_ROW_DOT};
use super::structs::{AttnShape, DropShape};
use super::{as_dtype, check, common_dtype, numel};
use crate::device::RankDevice;
use crate::tensor::{CudaTensor, Storage};
use cudarc::driver::LaunchConfig;
use ferrotron_exec::kernel::{
    attention_dims, invalid, AttentionDims, AttentionSaved, AttentionSpec, KernelError, OrInvalid,
    Placement,
};
use ferrotron_ir::index;

// Its kind for `Launch::val`, kept beside its only user (the other structs' are in launch.rs).
impl KernelValue for AttnShape {
    const KIND: Param = Param::Struct(std::mem::size_of::<AttnShape>());
}

/// Warps per block (`FT_ATT_WARPS` in attention.cu).
const WARPS: u32 = 4;

/// Columns one warp owns of an output row (`FT_ATT_GROUP`): wider rows take several warps.
const GROUP: usize = 256;

/// Column groups of a row `width` wide (at least one: the forward's also writes the lse).
fn groups(width: usize) -> usize {
    width.div_ceil(GROUP).max(1)
}

/// One warp per task, [`WARPS`] a block, at most 64 blocks per SM (grid-strided beyond). The
/// work of a warp does not depend on the grid, so neither do the results.
fn cfg_warps(dev: &RankDevice, tasks: usize) -> LaunchConfig {
    let cap = dev.kernels().sm_count().max(1) as usize * 64;
    let blocks = tasks.div_ceil(WARPS as usize).clamp(1, cap) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The shapes an attention with queries `q` (checked by [`attention_dims`]) gives its output
/// (`[..., queries, dv]` or `[..., queries, heads, dv]`, as `q`) and its log-sum-exps
/// (`[..., heads, queries]`, the probabilities' without the keys).
fn out_and_lse_shapes(q: &[usize], dims: &AttentionDims, spec: &AttentionSpec) -> [Vec<usize>; 2] {
    let mut out = q.to_vec();
    *out.last_mut().expect("attention_dims checked the rank") = dims.dv;
    let mut lse = dims.probs_shape(q, spec.seq_first);
    lse.pop();
    [out, lse]
}

/// The kernels' view of one attention: sizes, layout, scale, causality and (when
/// `spec.dropout > 0`) the dropout mask of the probabilities `[..., heads, queries, keys]` at
/// `at`.
fn attn_shape(
    op: &'static str,
    q: &[usize],
    dims: &AttentionDims,
    spec: &AttentionSpec,
    at: &Placement,
) -> Result<AttnShape> {
    let mut a = AttnShape {
        batch: i64_of(op, dims.batch)?,
        queries: i64_of(op, dims.queries)?,
        keys: i64_of(op, dims.keys)?,
        d: i64_of(op, dims.d)?,
        dv: i64_of(op, dims.dv)?,
        heads: i64_of(op, dims.heads)?,
        factor: spec.factor,
        first: 0,
        threshold: 0,
        scale: 1.0,
        causal: i32::from(spec.causal),
        dropout: 0,
        pad: 0,
        drop: DropShape::default(),
    };
    if spec.dropout > 0.0 {
        let probs = dims.probs_shape(q, spec.seq_first);
        let (drop, first) = dropout_plan(op, &probs, at)?;
        a.drop = drop;
        a.first = first;
        a.threshold = keep_threshold(spec.dropout);
        a.scale = index::dropout_scale(spec.dropout).or_invalid(op)? as f32;
        a.dropout = 1;
    }
    Ok(a)
}

/// The forward pass: `(out [..., queries, dv], lse f32 [..., queries])` (sequence first,
/// `(out [..., queries, heads, dv], lse [..., heads, queries])`), out stored as the operands
/// (see the module docs for mixed storage). A query row that sees no key (no keys at all) has
/// output 0 and lse −∞.
pub fn attention(
    dev: &RankDevice,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    spec: &AttentionSpec,
    at: &Placement,
) -> Result<(CudaTensor, CudaTensor), KernelError> {
    const OP: &str = "Attention";
    let dims = attention_dims(OP, &q.shape, &k.shape, &v.shape, spec)?;
    for t in [q, k, v] {
        check(OP, t)?;
    }
    let [out_shape, lse_shape] = out_and_lse_shapes(&q.shape, &dims, spec);
    let a = attn_shape(OP, &q.shape, &dims, spec, at)?;
    let dtype = common_dtype(&[q, k, v]);
    let (q, k, v) = (
        as_dtype(dev, OP, q, dtype)?,
        as_dtype(dev, OP, k, dtype)?,
        as_dtype(dev, OP, v, dtype)?,
    );
    let rows = numel(OP, &lse_shape)?;
    let mut out = Buf::uninit(dev, OP, dtype, numel(OP, &out_shape)?)?;
    let mut lse = Buf::uninit(dev, OP, Storage::F32, rows)?;
    if rows > 0 {
        Launch::new(dev, OP, &ATTN_FWD, dtype)?
            .output(&mut out)
            .output(&mut lse)
            .input(&q.data)
            .input(&k.data)
            .input(&v.data)
            .val(&a)
            .launch(cfg_warps(dev, rows * groups(dims.dv)))?;
    }
    Ok((out.into_tensor(out_shape), lse.into_tensor(lse_shape)))
}

/// That a saved tensor has the shape the operands imply.
fn expect_shape(op: &'static str, what: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(invalid(
            op,
            format!("{what} has shape {got:?}; the operands' shapes make it {want:?}"),
        ))
    }
}

/// The backward pass: `(dq, dk, dv)`, shaped as `q`, `k`, `v` (in their layout) and stored as
/// the operands, recomputing the probabilities from `saved.lse` with the forward's dropout mask.
pub fn attention_grad(
    dev: &RankDevice,
    saved: AttentionSaved<&CudaTensor>,
    spec: &AttentionSpec,
    at: &Placement,
) -> Result<(CudaTensor, CudaTensor, CudaTensor), KernelError> {
    const OP: &str = "AttentionGrad";
    let AttentionSaved {
        q,
        k,
        v,
        out,
        lse,
        dout,
    } = saved;
    let dims = attention_dims(OP, &q.shape, &k.shape, &v.shape, spec)?;
    let [out_shape, lse_shape] = out_and_lse_shapes(&q.shape, &dims, spec);
    expect_shape(OP, "the output", &out.shape, &out_shape)?;
    expect_shape(OP, "the output's gradient", &dout.shape, &out_shape)?;
    expect_shape(OP, "the log-sum-exps", &lse.shape, &lse_shape)?;
    if lse.dtype() != Storage::F32 {
        return Err(invalid(OP, "the log-sum-exps must be stored as f32"));
    }
    for t in [q, k, v, out, lse, dout] {
        check(OP, t)?;
    }
    let a = attn_shape(OP, &q.shape, &dims, spec, at)?;
    let dtype = common_dtype(&[q, k, v, out, dout]);
    let (q, k, v, out, dout) = (
        as_dtype(dev, OP, q, dtype)?,
        as_dtype(dev, OP, k, dtype)?,
        as_dtype(dev, OP, v, dtype)?,
        as_dtype(dev, OP, out, dtype)?,
        as_dtype(dev, OP, dout, dtype)?,
    );
    let rows = numel(OP, &lse_shape)?;
    let key_rows = dims
        .batch
        .checked_mul(dims.keys)
        .ok_or_else(|| invalid(OP, "too many key rows"))?;
    let (nq, nk, nv) = (q.numel(), k.numel(), v.numel());
    let mut dq = Buf::uninit(dev, OP, dtype, nq)?;
    let (mut dk, mut dv) = if rows == 0 {
        // No query sees any key: their gradients are sums over nothing.
        (
            Buf::zeros(dev, OP, dtype, nk)?,
            Buf::zeros(dev, OP, dtype, nv)?,
        )
    } else {
        (
            Buf::uninit(dev, OP, dtype, nk)?,
            Buf::uninit(dev, OP, dtype, nv)?,
        )
    };
    if rows > 0 {
        let mut d_rows = scratch_f64(dev, OP, rows)?;
        Launch::new(dev, OP, &ATTN_ROW_DOT, dtype)?
            .slice_mut(&mut d_rows)
            .input(&out.data)
            .input(&dout.data)
            .val(&a)
            .launch(cfg_warps(dev, rows))?;
        if nq > 0 {
            Launch::new(dev, OP, &ATTN_BWD_DQ, dtype)?
                .output(&mut dq)
                .input(&q.data)
                .input(&k.data)
                .input(&v.data)
                .input(&dout.data)
                .input(&lse.data)
                .slice(&d_rows)
                .val(&a)
                .launch(cfg_warps(dev, rows * groups(dims.d)))?;
        }
        if nk + nv > 0 {
            Launch::new(dev, OP, &ATTN_BWD_DKV, dtype)?
                .output(&mut dk)
                .output(&mut dv)
                .input(&q.data)
                .input(&k.data)
                .input(&v.data)
                .input(&dout.data)
                .input(&lse.data)
                .slice(&d_rows)
                .val(&a)
                .launch(cfg_warps(dev, key_rows * groups(dims.d.max(dims.dv))))?;
        }
    }
    Ok((
        dq.into_tensor(q.shape.clone()),
        dk.into_tensor(k.shape.clone()),
        dv.into_tensor(v.shape.clone()),
    ))
}
