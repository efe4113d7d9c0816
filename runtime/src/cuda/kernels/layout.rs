//! Launches of `cu/layout.cu`: slices, concatenation, padding, transposes, broadcasts and
//! `SumTo`. Views that need no copy (a whole-axis slice, an identity transpose, an expand or
//! sum to the same elements) share the input's buffer.

use super::launch::{cfg_2d, i64_of, scratch, Buf, Launch, Result};
use super::norm::{cfg_partial, sum_partials};
use super::structs::{Gather, SumToShape, Tile};
use super::{
    as_dtype, broadcast_strides, common_dtype, contiguous_strides, dims_array, merge_axes, numel,
    spec,
};
use crate::cpu::kernels::{invalid, OrInvalid};
use crate::cuda::device::RankDevice;
use crate::cuda::tensor::{CudaTensor, DeviceData};
use cudarc::driver::LaunchConfig;
use ferrotron_ir::index::{self, around};

/// A rows copy: `dst[o·dst_ld + dst_off + j] = src[o·src_ld + src_off + j]`, `o < outer`,
/// `j < len`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rows {
    pub outer: usize,
    pub len: usize,
    pub src_ld: usize,
    pub src_off: usize,
    pub dst_ld: usize,
    pub dst_off: usize,
}

fn data_len(d: &DeviceData) -> usize {
    match d {
        DeviceData::F32(s) => s.len(),
        DeviceData::Bf16(s) => s.len(),
    }
}

fn buf_len(b: &Buf) -> usize {
    match b {
        Buf::F32(s) => s.len(),
        Buf::Bf16(s) => s.len(),
    }
}

/// One `copy_rows` launch (both buffers of one storage type; the ranges are checked to lie in
/// them, so a wrong layout is an error, never a stray write).
pub(super) fn copy_rows(
    dev: &RankDevice,
    op: &'static str,
    dst: &mut Buf,
    src: &DeviceData,
    r: Rows,
) -> Result<()> {
    if r.outer == 0 || r.len == 0 {
        return Ok(());
    }
    let end = |ld: usize, off: usize| {
        (r.outer - 1)
            .checked_mul(ld)
            .and_then(|v| v.checked_add(off))
            .and_then(|v| v.checked_add(r.len))
    };
    let fits_src = end(r.src_ld, r.src_off).is_some_and(|e| e <= data_len(src));
    let fits_dst = end(r.dst_ld, r.dst_off).is_some_and(|e| e <= buf_len(dst));
    let same_type = matches!(
        (&*dst, src),
        (Buf::F32(_), DeviceData::F32(_)) | (Buf::Bf16(_), DeviceData::Bf16(_))
    );
    if !(fits_src && fits_dst && same_type) {
        return Err(invalid(op, format!("a copy {r:?} does not fit its buffers")));
    }
    let dtype = match src {
        DeviceData::F32(_) => crate::cuda::DType::F32,
        DeviceData::Bf16(_) => crate::cuda::DType::Bf16,
    };
    let v = [r.outer, r.len, r.src_ld, r.src_off, r.dst_ld, r.dst_off]
        .map(|x| i64_of(op, x))
        .into_iter()
        .collect::<Result<Vec<i64>>>()?;
    Launch::new(dev, op, &spec::COPY_ROWS, dtype)?
        .output(dst)
        .input(src)
        .val(&v[0])
        .val(&v[1])
        .val(&v[2])
        .val(&v[3])
        .val(&v[4])
        .val(&v[5])
        .launch(cfg_2d(dev, r.outer, r.len))
}

/// `x[start..end]` along axis `a` (bounds checked by the caller). The whole axis shares the
/// buffer.
pub(super) fn slice_axis(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    a: usize,
    start: usize,
    end: usize,
) -> Result<CudaTensor> {
    let mut shape = x.shape.clone();
    shape[a] = end - start;
    if start == 0 && end == x.shape[a] {
        return Ok(CudaTensor {
            shape,
            data: x.data.clone(),
        });
    }
    let (outer, n, inner) = around(&x.shape, a);
    let len = (end - start) * inner;
    let mut out = Buf::uninit(dev, op, x.dtype(), outer * len)?;
    copy_rows(
        dev,
        op,
        &mut out,
        &x.data,
        Rows {
            outer,
            len,
            src_ld: n * inner,
            src_off: start * inner,
            dst_ld: len,
            dst_off: 0,
        },
    )?;
    Ok(out.into_tensor(shape))
}

/// The inputs joined along `axis`.
pub(super) fn concat(
    dev: &RankDevice,
    op: &'static str,
    xs: &[&CudaTensor],
    axis: i64,
) -> Result<CudaTensor> {
    let shapes: Vec<&[usize]> = xs.iter().map(|x| &x.shape[..]).collect();
    let (a, shape) = index::concat(&shapes, axis).or_invalid(op)?;
    let n = numel(op, &shape)?;
    let dtype = common_dtype(xs);
    let mut out = Buf::uninit(dev, op, dtype, n)?;
    let (outer, total, inner) = around(&shape, a);
    let mut at = 0;
    for x in xs {
        let x = as_dtype(dev, op, x, dtype)?;
        let len = x.shape[a] * inner;
        copy_rows(
            dev,
            op,
            &mut out,
            &x.data,
            Rows {
                outer,
                len,
                src_ld: len,
                src_off: 0,
                dst_ld: total * inner,
                dst_off: at * inner,
            },
        )?;
        at += x.shape[a];
    }
    Ok(out.into_tensor(shape))
}

/// `before` zeros, `x`, `after` zeros along axis `a`.
pub(super) fn pad(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    a: usize,
    before: usize,
    after: usize,
) -> Result<CudaTensor> {
    let mut shape = x.shape.clone();
    shape[a] = shape[a]
        .checked_add(before)
        .and_then(|s| s.checked_add(after))
        .ok_or_else(|| invalid(op, "the padded size overflows"))?;
    let total = numel(op, &shape)?;
    let mut out = Buf::zeros(dev, op, x.dtype(), total)?;
    let (outer, n, inner) = around(&x.shape, a);
    let m = shape[a];
    copy_rows(
        dev,
        op,
        &mut out,
        &x.data,
        Rows {
            outer,
            len: n * inner,
            src_ld: n * inner,
            src_off: 0,
            dst_ld: m * inner,
            dst_off: before * inner,
        },
    )?;
    Ok(out.into_tensor(shape))
}

/// `out[i] = x[offset(i)]` over the output's (merged) axes `sizes` with input strides
/// `strides`.
fn gather(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    shape: Vec<usize>,
    sizes: &[i64],
    strides: &[i64],
) -> Result<CudaTensor> {
    let n = numel(op, &shape)?;
    let mut out = Buf::uninit(dev, op, x.dtype(), n)?;
    if n > 0 {
        let g = Gather {
            rank: sizes.len() as i32,
            pad: 0,
            size: dims_array(sizes),
            stride: dims_array(strides),
        };
        let n64 = i64_of(op, n)?;
        Launch::new(dev, op, &spec::GATHER, x.dtype())?
            .output(&mut out)
            .input(&x.data)
            .val(&g)
            .val(&n64)
            .launch(super::launch::cfg_1d(dev, n))?;
    }
    Ok(out.into_tensor(shape))
}

/// Axis permutation (output axis `i` is input axis `perm[i]`). Size-1 axes are dropped and
/// input axes that stay adjacent merged, as on the CPU: an identity shares the buffer; runs
/// along the input's last axis are gathered; a swap of the innermost axes goes through
/// shared-memory tiles.
pub(super) fn transpose(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    perm: &[usize],
) -> Result<CudaTensor> {
    let shape = index::transpose(&x.shape, perm).or_invalid(op)?;
    let n = numel(op, &shape)?;
    let in_strides = contiguous_strides(&x.shape);
    let sizes: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let (sizes, [src]) = merge_axes(op, &sizes, [&strides])?;
    let r = sizes.len();
    if n == 0 || r <= 1 {
        // Nothing moves (a single run of the input in order).
        return Ok(CudaTensor {
            shape,
            data: x.data.clone(),
        });
    }
    if src[r - 1] == 1 {
        return gather(dev, op, x, shape, &sizes, &src);
    }
    // The tiled 2-D transpose between the output's last axis (b) and the axis the input reads
    // contiguously (a), looped over the others.
    let a = src
        .iter()
        .position(|&s| s == 1)
        .ok_or_else(|| invalid(op, "no axis of the input is contiguous"))?;
    let b = r - 1;
    let sizes_u: Vec<usize> = sizes.iter().map(|&s| s as usize).collect();
    let dst = contiguous_strides(&sizes_u);
    let others: Vec<usize> = (0..r).filter(|&i| i != a && i != b).collect();
    let pick = |v: &[i64]| others.iter().map(|&i| v[i]).collect::<Vec<i64>>();
    let dst_i64: Vec<i64> = dst.iter().map(|&s| s as i64).collect();
    let n_other: i64 = others.iter().map(|&i| sizes[i]).product();
    let t = Tile {
        rank_o: others.len() as i32,
        pad: 0,
        size_o: dims_array(&pick(&sizes)),
        src_o: dims_array(&pick(&src)),
        dst_o: dims_array(&pick(&dst_i64)),
        n_other,
        na: sizes[a],
        nb: sizes[b],
        sa_dst: dst_i64[a],
        sb_src: src[b],
    };
    let mut out = Buf::uninit(dev, op, x.dtype(), n)?;
    let cfg = LaunchConfig {
        grid_dim: (
            (sizes[b] as usize).div_ceil(32).clamp(1, 65_535) as u32,
            (sizes[a] as usize).div_ceil(32).clamp(1, 65_535) as u32,
            (n_other as usize).clamp(1, 65_535) as u32,
        ),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    Launch::new(dev, op, &spec::TRANSPOSE_TILED, x.dtype())?
        .output(&mut out)
        .input(&x.data)
        .val(&t)
        .launch(cfg)?;
    Ok(out.into_tensor(shape))
}

/// `x` broadcast to `shape` (NumPy rules).
pub(super) fn expand(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    shape: &[usize],
) -> Result<CudaTensor> {
    index::expand(&x.shape, shape).or_invalid(op)?;
    let n = numel(op, shape)?;
    if n == x.numel() {
        // Only leading or size-1 axes added: the same elements.
        return Ok(CudaTensor {
            shape: shape.to_vec(),
            data: x.data.clone(),
        });
    }
    let strides = broadcast_strides(&x.shape, shape);
    let (sizes, [st]) = merge_axes(op, shape, [&strides])?;
    gather(dev, op, x, shape.to_vec(), &sizes, &st)
}

/// Sums `x` over the axes it was broadcast along, down to `shape`: the reduction indices in
/// chunks, each chunk's sums in f32 (then the chunks' partials added in order).
pub(super) fn sum_to(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    shape: &[usize],
) -> Result<CudaTensor> {
    index::sum_to(&x.shape, shape).or_invalid(op)?;
    let out_n = numel(op, shape)?;
    let dtype = x.dtype();
    if x.numel() == 0 || out_n == 0 {
        return Ok(Buf::zeros(dev, op, dtype, out_n)?.into_tensor(shape.to_vec()));
    }
    if out_n == x.numel() {
        // Nothing is summed (only leading or size-1 axes go).
        return Ok(CudaTensor {
            shape: shape.to_vec(),
            data: x.data.clone(),
        });
    }
    // x's axes (size-1 ones dropped) as kept or reduced, neighbours of one kind merged (x is
    // contiguous, so merged axes stay single strided runs).
    let skip = x.shape.len() - shape.len();
    let own = contiguous_strides(&x.shape);
    let mut kept: Vec<(usize, usize)> = Vec::new();
    let mut reduced: Vec<(usize, usize)> = Vec::new();
    let mut last_reduced: Option<bool> = None;
    for (i, &n) in x.shape.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let is_reduced = i < skip || shape[i - skip] == 1;
        let list = if is_reduced { &mut reduced } else { &mut kept };
        match (last_reduced, list.last_mut()) {
            (Some(prev), Some(last)) if prev == is_reduced => *last = (last.0 * n, own[i]),
            _ => list.push((n, own[i])),
        }
        last_reduced = Some(is_reduced);
    }
    let inner_reduced = last_reduced == Some(true);
    if kept.len() > super::structs::MAX_DIMS || reduced.len() > super::structs::MAX_DIMS {
        return Err(invalid(
            op,
            format!("{:?} has too many alternating axes for the CUDA kernels", x.shape),
        ));
    }
    let red_n: usize = reduced.iter().map(|a| a.0).product();
    let split = |v: &[(usize, usize)]| {
        let sizes: Vec<i64> = v.iter().map(|a| a.0 as i64).collect();
        let strides: Vec<i64> = v.iter().map(|a| a.1 as i64).collect();
        (dims_array(&sizes), dims_array(&strides))
    };
    let (size_k, stride_k) = split(&kept);
    let (size_r, stride_r) = split(&reduced);
    // Reduction indices per chunk: 8 per lane at least, and at most 2^20 partial sums.
    let per_lane_min = if inner_reduced { 256 } else { 64 };
    let max_chunks = ((1usize << 20) / out_n).clamp(1, 4096);
    let chunk = red_n.div_ceil(max_chunks).max(per_lane_min);
    let chunks = red_n.div_ceil(chunk);
    let s = SumToShape {
        rank_k: kept.len() as i32,
        rank_r: reduced.len() as i32,
        inner_reduced: i32::from(inner_reduced),
        pad: 0,
        size_k,
        stride_k,
        size_r,
        stride_r,
        out_n: i64_of(op, out_n)?,
        red_n: i64_of(op, red_n)?,
        chunk: i64_of(op, chunk)?,
    };
    let mut out = Buf::uninit(dev, op, dtype, out_n)?;
    let mut part = scratch(dev, op, if chunks > 1 { chunks * out_n } else { 1 })?;
    let groups = out_n.div_ceil(if inner_reduced { 8 } else { 32 });
    Launch::new(dev, op, &spec::SUM_TO_PARTIAL, dtype)?
        .slice_mut(&mut part)
        .output(&mut out)
        .input(&x.data)
        .val(&s)
        .launch(cfg_partial(dev, groups, chunks))?;
    if chunks > 1 {
        sum_partials(dev, op, &mut out, dtype, &part, chunks, out_n)?;
    }
    Ok(out.into_tensor(shape.to_vec()))
}
