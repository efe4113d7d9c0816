//! Launches of `cu/embedding.cu`: the table lookup, its gradient (vocabulary-parallel tables
//! look up and scatter only the rows they hold) and rotary position embedding.

use super::launch::{cfg_1d, cfg_2d, i64_of, scratch, scratch_i64, Buf, Launch, Result};
use super::{as_dtype, defer_index_check, index_buffer, numel, spec};
use crate::device::RankDevice;
use crate::tensor::{CudaTensor, Storage};
use ferrotron_exec::kernel::{invalid, table_of, OrInvalid, Placement, Table};
use ferrotron_ir::{index, RopeScaling};

/// That every id is an integer in `0..bound`, checked without waiting: the first that is not is
/// reported as the CPU reports it by the rank's next read from the device (the kernels never
/// read past the table meanwhile: an id outside this rank's rows gives a zero row).
fn check_ids(dev: &RankDevice, op: &'static str, ids: &CudaTensor, t: &Table) -> Result<()> {
    let buf = index_buffer(op, "ids", ids)?;
    defer_index_check(dev, op, "id", buf, (ids.numel(), t.bound, 1), false)
}

/// `table[ids]`, zero rows for ids another rank holds.
pub(super) fn embedding(
    dev: &RankDevice,
    op: &'static str,
    table: &CudaTensor,
    ids: &CudaTensor,
    local: &Placement,
) -> Result<CudaTensor> {
    let t = table_of(op, &table.shape, local)?;
    check_ids(dev, op, ids, &t)?;
    let mut shape = ids.shape.clone();
    shape.push(t.width);
    let n = numel(op, &shape)?;
    let mut out = Buf::uninit(dev, op, table.dtype(), n)?;
    if n > 0 {
        let n_ids = ids.numel();
        let v = [n_ids, t.width, t.offset, t.rows]
            .map(|x| i64_of(op, x))
            .into_iter()
            .collect::<Result<Vec<i64>>>()?;
        Launch::new(dev, op, &spec::EMBEDDING, table.dtype())?
            .output(&mut out)
            .input(&table.data)
            .input(&ids.data)
            .val(&v[0])
            .val(&v[1])
            .val(&v[2])
            .val(&v[3])
            .launch(cfg_2d(dev, n_ids, t.width))?;
    }
    Ok(out.into_tensor(shape))
}

/// The table's gradient: for each row this rank holds, the sum of the `dy` rows at its ids, in
/// `f64` and in position order as the CPU adds them (no atomics: the same bits every run), in
/// the table's shape and storage type.
pub(super) fn embedding_grad(
    dev: &RankDevice,
    op: &'static str,
    table: &CudaTensor,
    ids: &CudaTensor,
    dy: &CudaTensor,
    local: &Placement,
) -> Result<CudaTensor> {
    let t = table_of(op, &table.shape, local)?;
    let mut expected = ids.shape.clone();
    expected.push(t.width);
    index::same_shape("the output gradient", &expected, &dy.shape).or_invalid(op)?;
    check_ids(dev, op, ids, &t)?;
    let n = numel(op, &table.shape)?;
    // Every element is written when there are ids; with none, the gradient is zero.
    let mut acc = if dy.numel() > 0 {
        Buf::uninit(dev, op, Storage::F32, n)?
    } else {
        Buf::zeros(dev, op, Storage::F32, n)?
    };
    if n > 0 && dy.numel() > 0 {
        let n_ids = ids.numel();
        let v = [n_ids, t.width, t.offset, t.rows]
            .map(|x| i64_of(op, x))
            .into_iter()
            .collect::<Result<Vec<i64>>>()?;
        // Each row's positions, in order; then each row's sum over them.
        let mut start = scratch_i64(dev, op, t.rows + 1)?;
        let mut cursor = scratch_i64(dev, op, t.rows)?;
        let mut order = scratch_i64(dev, op, n_ids)?;
        Launch::new(dev, op, &spec::EMBEDDING_GRAD_ORDER, Storage::F32)?
            .slice_mut(&mut start)
            .slice_mut(&mut cursor)
            .slice_mut(&mut order)
            .input(&ids.data)
            .val(&v[0])
            .val(&v[2])
            .val(&v[3])
            .launch(cfg_1d(dev, 1))?;
        Launch::new(dev, op, &spec::EMBEDDING_GRAD, dy.dtype())?
            .output(&mut acc)
            .input(&dy.data)
            .slice(&start)
            .slice(&order)
            .val(&v[1])
            .val(&v[3])
            .launch(cfg_2d(dev, t.rows, t.width))?;
    }
    let acc = acc.into_tensor(table.shape.clone());
    Ok(as_dtype(dev, op, &acc, table.dtype())?.into_owned())
}

/// Rotary position embedding of `[..., seq, heads, head_dim]`, positions starting at the
/// shard's offset along axis −3 (`local.offsets`), its frequencies rescaled by `scaling` if
/// given; `inverse` rotates by the negative angles.
pub(super) fn rotary(
    dev: &RankDevice,
    op: &'static str,
    x: &CudaTensor,
    (base, scaling): (f64, Option<&RopeScaling>),
    inverse: bool,
    local: &Placement,
) -> Result<CudaTensor> {
    let (seq, heads, head_dim) = index::rotary(&x.shape, base).or_invalid(op)?;
    if let Some(s) = scaling {
        index::rope_scaling(s).or_invalid(op)?;
    }
    // Factor 0: no rescaling.
    let (factor, low, high, context) = scaling.map_or((0.0, 1.0, 2.0, 1.0), |s| {
        (
            s.factor,
            s.low_freq_factor,
            s.high_freq_factor,
            s.original_max_position as f64,
        )
    });
    let r = x.shape.len();
    let first_pos = match &local.offsets {
        None => 0,
        Some(o) if o.len() == r => o[r - 3],
        Some(o) => {
            return Err(invalid(
                op,
                format!("offsets {o:?} do not fit the shape {:?}", x.shape),
            ))
        }
    };
    let n = x.numel();
    let mut out = Buf::uninit(dev, op, x.dtype(), n)?;
    let half = head_dim / 2;
    if n == 0 || half == 0 {
        // No pairs to rotate (head_dim 0): nothing in the tensor.
        return Ok(out.into_tensor(x.shape.clone()));
    }
    // The (cos, sin) of every (position, pair), computed once in f64 on the device.
    let mut cs = scratch(dev, op, 2 * seq * half)?;
    let v = [seq, half, first_pos, head_dim]
        .map(|x| i64_of(op, x))
        .into_iter()
        .collect::<Result<Vec<i64>>>()?;
    let sign: f64 = if inverse { -1.0 } else { 1.0 };
    Launch::new(dev, op, &spec::ROTARY_TABLE, Storage::F32)?
        .slice_mut(&mut cs)
        .val(&v[0])
        .val(&v[1])
        .val(&v[2])
        .val(&v[3])
        .val(&base)
        .val(&sign)
        .val(&factor)
        .val(&low)
        .val(&high)
        .val(&context)
        .launch(cfg_1d(dev, seq * half))?;
    let slabs = n / head_dim;
    let (slabs64, heads64) = (i64_of(op, slabs)?, i64_of(op, heads)?);
    Launch::new(dev, op, &spec::ROTARY, x.dtype())?
        .output(&mut out)
        .input(&x.data)
        .slice(&cs)
        .val(&slabs64)
        .val(&heads64)
        .val(&v[0])
        .val(&v[1])
        .launch(cfg_2d(dev, slabs, half))?;
    Ok(out.into_tensor(x.shape.clone()))
}
