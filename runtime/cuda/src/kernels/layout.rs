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
use crate::device::RankDevice;
use crate::tensor::{CudaTensor, DeviceData};
use cudarc::driver::LaunchConfig;
use ferrotron_exec::kernel::{invalid, OrInvalid};
use ferrotron_ir::index::{self, around};
use ferrotron_partitioner::mesh::part;

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
        return Err(invalid(
            op,
            format!("a copy {r:?} does not fit its buffers"),
        ));
    }
    let dtype = match src {
        DeviceData::F32(_) => crate::Storage::F32,
        DeviceData::Bf16(_) => crate::Storage::Bf16,
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

/// The rows copy of `x[start..end]` along axis `a` of `shape`.
pub(super) fn slice_rows(shape: &[usize], a: usize, start: usize, end: usize) -> Rows {
    let (outer, n, inner) = around(shape, a);
    let len = (end - start) * inner;
    Rows {
        outer,
        len,
        src_ld: n * inner,
        src_off: start * inner,
        dst_ld: len,
        dst_off: 0,
    }
}

/// The rows copies that join tensors of `shapes` along axis `a` into `out_shape`, one per
/// input.
pub(super) fn concat_rows(out_shape: &[usize], a: usize, shapes: &[&[usize]]) -> Vec<Rows> {
    let (outer, total, inner) = around(out_shape, a);
    let mut at = 0;
    shapes
        .iter()
        .map(|s| {
            let len = s[a] * inner;
            let r = Rows {
                outer,
                len,
                src_ld: len,
                src_off: 0,
                dst_ld: total * inner,
                dst_off: at * inner,
            };
            at += s[a];
            r
        })
        .collect()
}

/// The rows copy that places `x` (of `shape`) after `before` zeros along axis `a` of a tensor
/// whose axis `a` has `m` elements.
pub(super) fn pad_rows(shape: &[usize], a: usize, before: usize, m: usize) -> Rows {
    let (outer, n, inner) = around(shape, a);
    Rows {
        outer,
        len: n * inner,
        src_ld: n * inner,
        src_off: 0,
        dst_ld: m * inner,
        dst_off: before * inner,
    }
}

/// The rows copies of an interleave: member `m`'s tensor (of `local_shape`, at `m · numel` in
/// the flat buffer) to its place along `dim` of the joined tensor.
pub(super) fn interleave_rows(local_shape: &[usize], dim: usize, members: usize) -> Vec<Rows> {
    let local_n: usize = local_shape.iter().product();
    let (outer, nd, inner) = around(local_shape, dim);
    let row = nd * inner;
    (0..members)
        .map(|m| Rows {
            outer,
            len: row,
            src_ld: row,
            src_off: m * local_n,
            dst_ld: members * row,
            dst_off: part(nd * members, members, m).start * inner,
        })
        .collect()
}

/// The rows copies of a deinterleave: part `m` along `dim` of a tensor of `shape` to chunk `m`
/// of the flat buffer.
pub(super) fn deinterleave_rows(shape: &[usize], dim: usize, members: usize) -> Vec<Rows> {
    let (outer, nd, inner) = around(shape, dim);
    let len = nd / members * inner;
    let part_n = outer * len;
    (0..members)
        .map(|m| Rows {
            outer,
            len,
            src_ld: nd * inner,
            src_off: part(nd, members, m).start * inner,
            dst_ld: len,
            dst_off: m * part_n,
        })
        .collect()
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
    let rows = slice_rows(&x.shape, a, start, end);
    let mut out = Buf::uninit(dev, op, x.dtype(), rows.outer * rows.len)?;
    copy_rows(dev, op, &mut out, &x.data, rows)?;
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
    for (x, rows) in xs.iter().zip(concat_rows(&shape, a, &shapes)) {
        let x = as_dtype(dev, op, x, dtype)?;
        copy_rows(dev, op, &mut out, &x.data, rows)?;
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
    let rows = pad_rows(&x.shape, a, before, shape[a]);
    copy_rows(dev, op, &mut out, &x.data, rows)?;
    Ok(out.into_tensor(shape))
}

/// The `gather` kernel's view: the output's (merged) axes and the input's strides.
pub(super) fn gather_view(sizes: &[i64], strides: &[i64]) -> Gather {
    Gather {
        rank: sizes.len() as i32,
        pad: 0,
        size: dims_array(sizes),
        stride: dims_array(strides),
    }
}

/// `out[i] = x[offset(i)]` over the view `g`.
fn gather(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    shape: Vec<usize>,
    g: &Gather,
) -> Result<CudaTensor> {
    let n = numel(op, &shape)?;
    let mut out = Buf::uninit(dev, op, x.dtype(), n)?;
    if n > 0 {
        let n64 = i64_of(op, n)?;
        Launch::new(dev, op, &spec::GATHER, x.dtype())?
            .output(&mut out)
            .input(&x.data)
            .val(g)
            .val(&n64)
            .launch(super::launch::cfg_1d(dev, n))?;
    }
    Ok(out.into_tensor(shape))
}

/// How a transpose runs.
#[derive(Debug)]
pub(super) enum TransposePlan {
    /// The elements stay in order: the buffer is shared.
    Share,
    /// Runs along the input's last axis: a strided gather.
    Gather(Gather),
    /// The innermost axes swap: shared-memory tiles.
    Tiled(Tile),
}

/// The plan of `Transpose` of a tensor of `shape` by `perm` (checked), and the output's shape.
/// Size-1 axes are dropped and input axes that stay adjacent merged, as on the CPU.
pub(super) fn transpose_plan(
    op: &'static str,
    shape: &[usize],
    perm: &[usize],
) -> Result<(Vec<usize>, TransposePlan)> {
    let out_shape = index::transpose(shape, perm).or_invalid(op)?;
    let n = numel(op, &out_shape)?;
    let in_strides = contiguous_strides(shape);
    let sizes: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let (sizes, [src]) = merge_axes(op, &sizes, [&strides])?;
    let r = sizes.len();
    if n == 0 || r <= 1 {
        return Ok((out_shape, TransposePlan::Share));
    }
    if src[r - 1] == 1 {
        return Ok((out_shape, TransposePlan::Gather(gather_view(&sizes, &src))));
    }
    // The tiled 2-D transpose between the output's last axis (b) and the axis the input reads
    // contiguously (a), looped over the others.
    let a = src
        .iter()
        .position(|&s| s == 1)
        .ok_or_else(|| invalid(op, "no axis of the input is contiguous"))?;
    let b = r - 1;
    let sizes_u: Vec<usize> = sizes.iter().map(|&s| s as usize).collect();
    let dst: Vec<i64> = contiguous_strides(&sizes_u)
        .iter()
        .map(|&s| s as i64)
        .collect();
    let others: Vec<usize> = (0..r).filter(|&i| i != a && i != b).collect();
    let pick = |v: &[i64]| others.iter().map(|&i| v[i]).collect::<Vec<i64>>();
    let n_other: i64 = others.iter().map(|&i| sizes[i]).product();
    let t = Tile {
        rank_o: others.len() as i32,
        pad: 0,
        size_o: dims_array(&pick(&sizes)),
        src_o: dims_array(&pick(&src)),
        dst_o: dims_array(&pick(&dst)),
        n_other,
        na: sizes[a],
        nb: sizes[b],
        sa_dst: dst[a],
        sb_src: src[b],
    };
    Ok((out_shape, TransposePlan::Tiled(t)))
}

/// Axis permutation (output axis `i` is input axis `perm[i]`): an identity shares the buffer;
/// runs along the input's last axis are gathered; a swap of the innermost axes goes through
/// shared-memory tiles.
pub(super) fn transpose(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    perm: &[usize],
) -> Result<CudaTensor> {
    let (shape, plan) = transpose_plan(op, &x.shape, perm)?;
    let t = match plan {
        TransposePlan::Share => {
            return Ok(CudaTensor {
                shape,
                data: x.data.clone(),
            })
        }
        TransposePlan::Gather(g) => return gather(dev, op, x, shape, &g),
        TransposePlan::Tiled(t) => t,
    };
    let n = numel(op, &shape)?;
    let mut out = Buf::uninit(dev, op, x.dtype(), n)?;
    let cfg = LaunchConfig {
        grid_dim: (
            (t.nb as usize).div_ceil(32).clamp(1, 65_535) as u32,
            (t.na as usize).div_ceil(32).clamp(1, 65_535) as u32,
            (t.n_other as usize).clamp(1, 65_535) as u32,
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

/// The gather view of `Expand` of a tensor of shape `from` to `to` (checked); `None` when the
/// elements are the same (only leading or size-1 axes added): the buffer is shared.
pub(super) fn expand_plan(
    op: &'static str,
    from: &[usize],
    to: &[usize],
) -> Result<Option<Gather>> {
    index::expand(from, to).or_invalid(op)?;
    if numel(op, to)? == from.iter().product::<usize>() {
        return Ok(None);
    }
    let strides = broadcast_strides(from, to);
    let (sizes, [st]) = merge_axes(op, to, [&strides])?;
    Ok(Some(gather_view(&sizes, &st)))
}

/// `x` broadcast to `shape` (NumPy rules).
pub(super) fn expand(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    shape: &[usize],
) -> Result<CudaTensor> {
    match expand_plan(op, &x.shape, shape)? {
        None => Ok(CudaTensor {
            shape: shape.to_vec(),
            data: x.data.clone(),
        }),
        Some(g) => gather(dev, op, x, shape.to_vec(), &g),
    }
}

/// How a `SumTo` runs.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // made once per op and consumed at once, never stored
pub(super) enum SumToPlan {
    /// Nothing to sum: zeros.
    Zeros,
    /// Only leading or size-1 axes go: the same elements, the buffer shared.
    Share,
    /// `sum_to_partial` over `groups` × `chunks` blocks (then `sum_partials` when
    /// `chunks > 1`).
    Reduce {
        s: SumToShape,
        chunks: usize,
        groups: usize,
    },
}

/// The plan of `SumTo` of a tensor of shape `from` down to `to` (checked). x's axes (size-1
/// ones dropped) are kept or reduced, neighbours of one kind merged (x is contiguous, so merged
/// axes stay single strided runs); the reduction indices go in chunks: at least 8 per lane, at
/// most 2^20 partial sums (a function of the shape only: results do not depend on the device).
pub(super) fn sum_to_plan(op: &'static str, from: &[usize], to: &[usize]) -> Result<SumToPlan> {
    index::sum_to(from, to).or_invalid(op)?;
    let out_n = numel(op, to)?;
    let x_n = numel(op, from)?;
    if x_n == 0 || out_n == 0 {
        return Ok(SumToPlan::Zeros);
    }
    if out_n == x_n {
        return Ok(SumToPlan::Share);
    }
    let skip = from.len() - to.len();
    let own = contiguous_strides(from);
    let mut kept: Vec<(usize, usize)> = Vec::new();
    let mut reduced: Vec<(usize, usize)> = Vec::new();
    let mut last_reduced: Option<bool> = None;
    for (i, &n) in from.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let is_reduced = i < skip || to[i - skip] == 1;
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
            format!("{from:?} has too many alternating axes for the CUDA kernels"),
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
    let per_chunk_min = if inner_reduced { 256 } else { 64 };
    let max_chunks = ((1usize << 20) / out_n).clamp(1, 4096);
    let chunk = red_n.div_ceil(max_chunks).max(per_chunk_min);
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
    let groups = out_n.div_ceil(if inner_reduced { 8 } else { 32 });
    Ok(SumToPlan::Reduce { s, chunks, groups })
}

/// Sums `x` over the axes it was broadcast along, down to `shape`: each chunk of reduction
/// indices summed in f32, then the chunks' partials added in order.
pub(super) fn sum_to(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    shape: &[usize],
) -> Result<CudaTensor> {
    let dtype = x.dtype();
    let out_n = numel(op, shape)?;
    let (s, chunks, groups) = match sum_to_plan(op, &x.shape, shape)? {
        SumToPlan::Zeros => {
            return Ok(Buf::zeros(dev, op, dtype, out_n)?.into_tensor(shape.to_vec()))
        }
        SumToPlan::Share => {
            return Ok(CudaTensor {
                shape: shape.to_vec(),
                data: x.data.clone(),
            })
        }
        SumToPlan::Reduce { s, chunks, groups } => (s, chunks, groups),
    };
    let mut out = Buf::uninit(dev, op, dtype, out_n)?;
    let mut part = scratch(dev, op, if chunks > 1 { chunks * out_n } else { 1 })?;
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
