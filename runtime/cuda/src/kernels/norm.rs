//! Launches of `cu/norm.cu`: LayerNorm and RMSNorm forward and backward (row statistics and
//! normalization in `f64`, as the CPU), softmax and its gradient (optionally scaled: the fused
//! ScaledSoftmax and ScaledSoftmaxGrad), one block per row.

use super::launch::{cfg_1d, cfg_rows, i64_of, scratch, scratch_f64, Buf, Launch, Result};
use super::{as_dtype, common_dtype, spec};
use crate::device::RankDevice;
use crate::tensor::{CudaTensor, Storage};
use cudarc::driver::{CudaSlice, LaunchConfig};
use ferrotron_exec::kernel::OrInvalid;
use ferrotron_ir::index;
use std::borrow::Cow;

/// The optional tensors of a norm in the norm's compute type.
fn opt_as<'t>(
    dev: &RankDevice,
    op: &'static str,
    t: Option<&'t CudaTensor>,
    dtype: Storage,
) -> Result<Option<Cow<'t, CudaTensor>>> {
    t.map(|t| as_dtype(dev, op, t, dtype)).transpose()
}

/// LayerNorm (`centered`) or RMSNorm over the last axis.
pub(super) fn forward(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    weight: Option<&CudaTensor>,
    bias: Option<&CudaTensor>,
    eps: f64,
    centered: bool,
) -> Result<CudaTensor> {
    let shape_of = |t: Option<&CudaTensor>| t.map(|t| t.shape.clone());
    let (ws, bs) = (shape_of(weight), shape_of(bias));
    let (rows, n) =
        index::norm(&x.shape, eps, None, ws.as_deref(), bs.as_deref()).or_invalid(op)?;
    let mut all = vec![x];
    all.extend(weight);
    all.extend(bias);
    let dtype = common_dtype(&all);
    let x = as_dtype(dev, op, x, dtype)?;
    let (w, b) = (
        opt_as(dev, op, weight, dtype)?,
        opt_as(dev, op, bias, dtype)?,
    );
    let total = x.numel();
    let mut out = Buf::uninit(dev, op, dtype, total)?;
    if total > 0 {
        let (rows64, n64) = (i64_of(op, rows)?, i64_of(op, n)?);
        let (c, hw, hb) = (
            i32::from(centered),
            i32::from(w.is_some()),
            i32::from(b.is_some()),
        );
        // An absent weight or bias: the flag says so, and x stands in as a never-read pointer.
        let wd = w.as_deref().unwrap_or(&x).data.clone();
        let bd = b.as_deref().unwrap_or(&x).data.clone();
        Launch::new(dev, op, &spec::NORM_FWD, dtype)?
            .output(&mut out)
            .input(&x.data)
            .input(&wd)
            .input(&bd)
            .val(&rows64)
            .val(&n64)
            .val(&eps)
            .val(&c)
            .val(&hw)
            .val(&hb)
            .launch(cfg_rows(dev, rows, n))?;
    }
    Ok(out.into_tensor(x.shape.clone()))
}

/// Rows per chunk of the parameter gradients' partial sums: at least 64 (8 per lane), and at
/// most 2^20 partial sums in all. Depends on the shape only, so results do not depend on the
/// device.
fn param_chunk(rows: usize, n: usize) -> usize {
    let max_chunks = ((1usize << 20) / n.max(1)).clamp(1, 4096);
    rows.div_ceil(max_chunks).max(64)
}

/// A (32, 8) block launch over `groups` column groups and `chunks` row chunks.
pub(super) fn cfg_partial(dev: &RankDevice, groups: usize, chunks: usize) -> LaunchConfig {
    let cap = (dev.kernels().sm_count().max(1) as usize) * 32;
    let gx = groups.clamp(1, cap);
    let gy = chunks.clamp(1, 65_535);
    LaunchConfig {
        grid_dim: (gx as u32, gy as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// out[i] = the sum over `chunks` of `part[c * n + i]`, in order.
pub(super) fn sum_partials(
    dev: &RankDevice,
    op: &'static str,
    out: &mut Buf,
    dtype: Storage,
    part: &CudaSlice<f32>,
    chunks: usize,
    n: usize,
) -> Result<()> {
    let (chunks64, n64) = (i64_of(op, chunks)?, i64_of(op, n)?);
    Launch::new(dev, op, &spec::SUM_PARTIALS, dtype)?
        .output(out)
        .slice(part)
        .val(&chunks64)
        .val(&n64)
        .launch(cfg_1d(dev, n))
}

/// LayerNorm's (`centered`: dx, dweight, dbias) or RMSNorm's (dx, dweight) VJP; the parameter
/// gradients sum over every row, in row-chunk partials added in a fixed order.
pub(super) fn grad(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    weight: Option<&CudaTensor>,
    dy: &CudaTensor,
    eps: f64,
    centered: bool,
) -> Result<Vec<CudaTensor>> {
    let ws = weight.map(|w| w.shape.clone());
    let (rows, n) =
        index::norm(&x.shape, eps, Some(&dy.shape), ws.as_deref(), None).or_invalid(op)?;
    let mut all = vec![x, dy];
    all.extend(weight);
    let dtype = common_dtype(&all);
    let (x, dy) = (as_dtype(dev, op, x, dtype)?, as_dtype(dev, op, dy, dtype)?);
    let w = opt_as(dev, op, weight, dtype)?;
    let total = x.numel();
    let mut dx = Buf::uninit(dev, op, dtype, total)?;
    let mut dw = Buf::uninit(dev, op, dtype, n)?;
    let mut db = Buf::uninit(dev, op, dtype, n)?;
    if total > 0 {
        let (rows64, n64) = (i64_of(op, rows)?, i64_of(op, n)?);
        let (c, hw) = (i32::from(centered), i32::from(w.is_some()));
        let wd = w.as_deref().unwrap_or(&x).data.clone();
        let mut stats = scratch_f64(dev, op, 2 * rows)?;
        Launch::new(dev, op, &spec::NORM_BWD, dtype)?
            .output(&mut dx)
            .slice_mut(&mut stats)
            .input(&x.data)
            .input(&wd)
            .input(&dy.data)
            .val(&rows64)
            .val(&n64)
            .val(&eps)
            .val(&c)
            .val(&hw)
            .launch(cfg_rows(dev, rows, n))?;
        let chunk = param_chunk(rows, n);
        let chunks = rows.div_ceil(chunk);
        let mut pw = scratch(dev, op, chunks * n)?;
        let mut pb = scratch(dev, op, if centered { chunks * n } else { 1 })?;
        let chunk64 = i64_of(op, chunk)?;
        Launch::new(dev, op, &spec::NORM_PARAM_PARTIAL, dtype)?
            .slice_mut(&mut pw)
            .slice_mut(&mut pb)
            .input(&x.data)
            .input(&dy.data)
            .slice(&stats)
            .val(&rows64)
            .val(&n64)
            .val(&chunk64)
            .val(&c)
            .launch(cfg_partial(dev, n.div_ceil(32), chunks))?;
        sum_partials(dev, op, &mut dw, dtype, &pw, chunks, n)?;
        if centered {
            sum_partials(dev, op, &mut db, dtype, &pb, chunks, n)?;
        }
    } else if n > 0 {
        // No rows: the parameter gradients are sums over nothing.
        dw = Buf::zeros(dev, op, dtype, n)?;
        db = Buf::zeros(dev, op, dtype, n)?;
    }
    let dx = dx.into_tensor(x.shape.clone());
    let dw = dw.into_tensor(vec![n]);
    Ok(if centered {
        vec![dx, dw, db.into_tensor(vec![n])]
    } else {
        vec![dx, dw]
    })
}

/// Softmax over the last axis (causal: query i sees keys 0 ..= i + keys − queries); with
/// `factor`, of `x · factor` (the fused ScaledSoftmax: each product as Scale computes it, kept
/// in `f32`).
pub(super) fn softmax(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    causal: bool,
    factor: Option<f64>,
) -> Result<CudaTensor> {
    let (rows, keys, queries) = index::softmax(&x.shape, causal).or_invalid(op)?;
    let total = x.numel();
    let mut out = Buf::uninit(dev, op, x.dtype(), total)?;
    if total > 0 {
        let (rows64, keys64, q64) = (
            i64_of(op, rows)?,
            i64_of(op, keys)?,
            i64_of(op, queries.max(1))?,
        );
        let c = i32::from(causal);
        let (scaled, f) = (i32::from(factor.is_some()), factor.unwrap_or(1.0));
        Launch::new(dev, op, &spec::SOFTMAX, x.dtype())?
            .output(&mut out)
            .input(&x.data)
            .val(&rows64)
            .val(&keys64)
            .val(&q64)
            .val(&c)
            .val(&scaled)
            .val(&f)
            .launch(cfg_rows(dev, rows, keys))?;
    }
    Ok(out.into_tensor(x.shape.clone()))
}

/// Softmax's VJP from its output: `y · (dy − Σ dy·y)` per row; with `factor`, that times
/// `factor` (the fused ScaledSoftmaxGrad: scaled as Scale does, from the `f32` result).
pub(super) fn softmax_grad(
    dev: &RankDevice,
    op: &'static str,
    y: &CudaTensor,
    dy: &CudaTensor,
    factor: Option<f64>,
) -> Result<CudaTensor> {
    index::min_rank("the softmax output", &y.shape, 1).or_invalid(op)?;
    index::same_shape("the gradient", &y.shape, &dy.shape).or_invalid(op)?;
    let dtype = common_dtype(&[y, dy]);
    let (y, dy) = (as_dtype(dev, op, y, dtype)?, as_dtype(dev, op, dy, dtype)?);
    let (rows, n) = index::rows(&y.shape);
    let total = y.numel();
    let mut out = Buf::uninit(dev, op, dtype, total)?;
    if total > 0 {
        let (rows64, n64) = (i64_of(op, rows)?, i64_of(op, n)?);
        let (scaled, f) = (i32::from(factor.is_some()), factor.unwrap_or(1.0));
        Launch::new(dev, op, &spec::SOFTMAX_GRAD, dtype)?
            .output(&mut out)
            .input(&y.data)
            .input(&dy.data)
            .val(&rows64)
            .val(&n64)
            .val(&scaled)
            .val(&f)
            .launch(cfg_rows(dev, rows, n))?;
    }
    Ok(out.into_tensor(y.shape.clone()))
}
