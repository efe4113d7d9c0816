//! Launches of `cu/cross_entropy.cu`: the cross-entropy's per-row statistics and the logits'
//! gradient, for a whole (`eval`) or vocabulary-parallel (the executor's phases around its
//! reductions) cross-entropy. The same meaning, checks and errors as the CPU backend's
//! `ce_row_max`, `ce_row_sums`, `ce_loss` and `ce_grad`: logits `[..., seq, vocab]`, this rank's
//! classes global `class_offset + j`, classes at or past `real_classes` excluded; with `shift`
//! row `t` predicts target `t + 1` and the last position of each sequence predicts nothing.

use super::launch::{cfg_2d, cfg_rows, i64_of, on, scratch, to_host, Buf, Launch, Result};
use super::{as_dtype, check, first_bad_index, index_buffer, spec};
use crate::cpu::kernels::{self as cpu, invalid, KernelError, Local, OrInvalid};
use crate::cuda::device::RankDevice;
use crate::cuda::tensor::{CudaTensor, DType};
use cudarc::driver::CudaSlice;
use ferrotron_ir::index;
use ferrotron_ir::Dim;

/// `(rows, seq)` of logits `[..., seq, vocab]`.
fn ce_rows(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    if shape.len() < 2 {
        return Err(invalid(
            op,
            format!("the logits ([..., seq, vocab]) must have rank at least 2, found {shape:?}"),
        ));
    }
    let r = shape.len();
    let rows = shape[..r - 1]
        .iter()
        .try_fold(1usize, |n, &s| n.checked_mul(s))
        .ok_or_else(|| invalid(op, format!("the logits {shape:?} are too large")))?;
    Ok((rows, shape[r - 2]))
}

/// The number of this rank's real classes: global classes `offset + j` below `real`.
fn local_real(vocab: usize, offset: usize, real: usize) -> usize {
    real.saturating_sub(offset).min(vocab)
}

/// The positions the mean divides by (predicting rows), checked non-zero, with `token_parts`.
fn mean_count(
    op: &'static str,
    rows: usize,
    seq: usize,
    shift: bool,
    token_parts: usize,
    shape: &[usize],
) -> Result<usize> {
    if token_parts == 0 {
        return Err(invalid(op, "token_parts must be at least 1"));
    }
    let count = if shift && seq > 0 {
        rows - rows / seq
    } else {
        rows
    };
    if count == 0 {
        return Err(invalid(
            op,
            format!("no position predicts a target (logits {shape:?}, shift {shift}): no mean"),
        ));
    }
    Ok(count)
}

/// The logits' shape facts: rows, seq, vocab, this rank's real classes.
struct Geometry {
    rows: usize,
    seq: usize,
    vocab: usize,
    nr: usize,
}

fn geometry(
    op: &'static str,
    logits: &CudaTensor,
    class_offset: usize,
    real_classes: usize,
) -> Result<Geometry> {
    check(op, logits)?;
    let (rows, seq) = ce_rows(op, &logits.shape)?;
    let vocab = logits.shape[logits.shape.len() - 1];
    Ok(Geometry {
        rows,
        seq,
        vocab,
        nr: local_real(vocab, class_offset, real_classes),
    })
}

/// The targets' shape (the logits' leading axes) and buffer.
fn targets_of<'t>(
    op: &'static str,
    logits: &CudaTensor,
    targets: &'t CudaTensor,
) -> Result<&'t CudaSlice<f32>> {
    check(op, targets)?;
    let r = logits.shape.len();
    index::same_shape("the targets", &logits.shape[..r - 1], &targets.shape).or_invalid(op)?;
    Ok(index_buffer(op, "targets", targets)?.as_ref())
}

/// That every target a row reads is an integer in `0..real_classes`: the first that is not.
fn check_targets(
    dev: &RankDevice,
    op: &'static str,
    targets: &CudaSlice<f32>,
    g: &Geometry,
    shift: bool,
    real_classes: usize,
) -> Result<()> {
    match first_bad_index(dev, op, targets, g.rows, real_classes, g.seq, shift)? {
        None => Ok(()),
        Some((element, value)) => Err(KernelError::Index {
            op,
            what: "target",
            value,
            element,
            bound: real_classes,
        }),
    }
}

fn row_max_dev(
    dev: &RankDevice,
    op: &'static str,
    logits: &CudaTensor,
    g: &Geometry,
) -> Result<CudaSlice<f32>> {
    let mut max = scratch(dev, op, g.rows)?;
    if g.rows > 0 {
        let v = [g.rows, g.vocab, g.nr]
            .map(|x| i64_of(op, x))
            .into_iter()
            .collect::<Result<Vec<i64>>>()?;
        Launch::new(dev, op, &spec::CE_ROW_MAX, logits.dtype())?
            .slice_mut(&mut max)
            .input(&logits.data)
            .val(&v[0])
            .val(&v[1])
            .val(&v[2])
            .launch(cfg_rows(dev, g.rows, g.nr))?;
    }
    Ok(max)
}

#[allow(clippy::too_many_arguments)] // the logits, the statistics and the op's attributes
fn row_sums_dev(
    dev: &RankDevice,
    op: &'static str,
    logits: &CudaTensor,
    max: &CudaSlice<f32>,
    targets: &CudaSlice<f32>,
    g: &Geometry,
    shift: bool,
    class_offset: usize,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let mut sum = scratch(dev, op, g.rows)?;
    let mut tl = scratch(dev, op, g.rows)?;
    if g.rows > 0 {
        let v = [g.rows, g.seq.max(1), g.vocab, g.nr, class_offset]
            .map(|x| i64_of(op, x))
            .into_iter()
            .collect::<Result<Vec<i64>>>()?;
        let shift = i32::from(shift);
        Launch::new(dev, op, &spec::CE_ROW_SUMS, logits.dtype())?
            .slice_mut(&mut sum)
            .slice_mut(&mut tl)
            .input(&logits.data)
            .slice(max)
            .slice(targets)
            .val(&v[0])
            .val(&v[1])
            .val(&v[2])
            .val(&v[3])
            .val(&v[4])
            .val(&shift)
            .launch(cfg_rows(dev, g.rows, g.nr))?;
    }
    Ok((sum, tl))
}

/// The statistics' inputs the kernels take, and the mean's denominator.
struct GradInputs<'a> {
    max: &'a CudaSlice<f32>,
    sum: &'a CudaSlice<f32>,
    targets: &'a CudaSlice<f32>,
    dloss: &'a CudaSlice<f32>,
    denom: f64,
}

fn grad_dev(
    dev: &RankDevice,
    op: &'static str,
    logits: &CudaTensor,
    g: &Geometry,
    inputs: GradInputs,
    shift: bool,
    class_offset: usize,
) -> Result<CudaTensor> {
    let n = logits.numel();
    let mut out = Buf::uninit(dev, op, logits.dtype(), n)?;
    if n > 0 {
        let v = [g.rows, g.seq.max(1), g.vocab, g.nr, class_offset]
            .map(|x| i64_of(op, x))
            .into_iter()
            .collect::<Result<Vec<i64>>>()?;
        let shift = i32::from(shift);
        Launch::new(dev, op, &spec::CE_GRAD, logits.dtype())?
            .output(&mut out)
            .input(&logits.data)
            .slice(inputs.max)
            .slice(inputs.sum)
            .slice(inputs.targets)
            .slice(inputs.dloss)
            .val(&v[0])
            .val(&v[1])
            .val(&v[2])
            .val(&v[3])
            .val(&v[4])
            .val(&shift)
            .val(&inputs.denom)
            .launch(cfg_2d(dev, g.rows, g.vocab))?;
    }
    Ok(out.into_tensor(logits.shape.clone()))
}

/// The first `rows` elements of a device buffer, on the host.
fn host(dev: &RankDevice, op: &'static str, s: &CudaSlice<f32>, rows: usize) -> Result<Vec<f32>> {
    if rows == 0 {
        return Ok(Vec::new());
    }
    to_host(dev, op, &s.slice(..rows))
}

/// A host vector of `rows` statistics on the device.
fn device_rows(
    dev: &RankDevice,
    op: &'static str,
    v: &[f32],
    rows: usize,
    what: &str,
) -> Result<CudaSlice<f32>> {
    if v.len() != rows {
        return Err(invalid(op, format!("{} {what} for {rows} rows", v.len())));
    }
    if v.is_empty() {
        return scratch(dev, op, 0);
    }
    dev.stream.clone_htod(v).map_err(on(op))
}

/// Per row, the max over this rank's real classes (−∞ for a row with none). See
/// [`crate::cpu::kernels::ce_row_max`].
pub fn ce_row_max(
    dev: &RankDevice,
    logits: &CudaTensor,
    class_offset: usize,
    real_classes: usize,
) -> Result<Vec<f32>, KernelError> {
    const OP: &str = "CrossEntropy";
    let g = geometry(OP, logits, class_offset, real_classes)?;
    let max = row_max_dev(dev, OP, logits, &g)?;
    host(dev, OP, &max, g.rows)
}

/// Per row, `Σ exp(logit − max[row])` over this rank's real classes, and the target's logit
/// where this rank holds the target's class (else 0). See
/// [`crate::cpu::kernels::ce_row_sums`].
pub fn ce_row_sums(
    dev: &RankDevice,
    logits: &CudaTensor,
    max: &[f32],
    targets: &CudaTensor,
    shift: bool,
    class_offset: usize,
    real_classes: usize,
) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    const OP: &str = "CrossEntropy";
    let g = geometry(OP, logits, class_offset, real_classes)?;
    let t = targets_of(OP, logits, targets)?;
    if max.len() != g.rows {
        return Err(invalid(
            OP,
            format!("{} row maxima for {} rows", max.len(), g.rows),
        ));
    }
    check_targets(dev, OP, t, &g, shift, real_classes)?;
    let max = device_rows(dev, OP, max, g.rows, "row maxima")?;
    let (sum, tl) = row_sums_dev(dev, OP, logits, &max, t, &g, shift, class_offset)?;
    Ok((host(dev, OP, &sum, g.rows)?, host(dev, OP, &tl, g.rows)?))
}

/// The local logits' gradient from the group-reduced statistics. See
/// [`crate::cpu::kernels::ce_grad`].
#[allow(clippy::too_many_arguments)] // the op's attributes and the phase's statistics
pub fn ce_grad(
    dev: &RankDevice,
    logits: &CudaTensor,
    max: &[f32],
    sum: &[f32],
    targets: &CudaTensor,
    shift: bool,
    class_offset: usize,
    real_classes: usize,
    dloss: f32,
    token_parts: usize,
) -> Result<CudaTensor, KernelError> {
    const OP: &str = "CrossEntropyGrad";
    let g = geometry(OP, logits, class_offset, real_classes)?;
    let t = targets_of(OP, logits, targets)?;
    if max.len() != g.rows || sum.len() != g.rows {
        return Err(invalid(
            OP,
            format!(
                "{} maxima and {} sums for {} rows",
                max.len(),
                sum.len(),
                g.rows
            ),
        ));
    }
    let count = mean_count(OP, g.rows, g.seq, shift, token_parts, &logits.shape)?;
    check_targets(dev, OP, t, &g, shift, real_classes)?;
    let max = device_rows(dev, OP, max, g.rows, "maxima")?;
    let sum = device_rows(dev, OP, sum, g.rows, "sums")?;
    let dloss = dev.stream.clone_htod(&[dloss]).map_err(on(OP))?;
    let inputs = GradInputs {
        max: &max,
        sum: &sum,
        targets: t,
        dloss: &dloss,
        denom: count as f64 * token_parts as f64,
    };
    grad_dev(dev, OP, logits, &g, inputs, shift, class_offset)
}

/// The real classes of a whole cross-entropy (the CPU's `ce_classes`).
fn ce_classes(op: &'static str, logits: &CudaTensor, classes: Option<&Dim>) -> Result<usize> {
    index::min_rank("the logits ([..., seq, vocab])", &logits.shape, 2).or_invalid(op)?;
    index::ce_classes(&logits.shape, classes).or_invalid(op)
}

/// `CrossEntropy` on whole logits: the statistics on the device, the mean on the host (the
/// CPU's `ce_loss`, in `f64`), returned as a device scalar.
pub(super) fn loss_op(
    dev: &RankDevice,
    op: &'static str,
    logits: &CudaTensor,
    targets: &CudaTensor,
    shift: bool,
    classes: Option<&Dim>,
    local: &Local,
) -> Result<CudaTensor> {
    let real = ce_classes(op, logits, classes)?;
    let g = geometry(op, logits, 0, real)?;
    let t = targets_of(op, logits, targets)?;
    let max = row_max_dev(dev, op, logits, &g)?;
    check_targets(dev, op, t, &g, shift, real)?;
    let (sum, tl) = row_sums_dev(dev, op, logits, &max, t, &g, shift, 0)?;
    let (max, sum, tl) = (
        host(dev, op, &max, g.rows)?,
        host(dev, op, &sum, g.rows)?,
        host(dev, op, &tl, g.rows)?,
    );
    let loss = cpu::ce_loss(
        &max,
        &sum,
        &tl,
        &logits.shape,
        shift,
        local.token_parts.max(1),
    )?;
    super::scalar(dev, loss)
}

/// `CrossEntropyGrad` on whole logits, `dloss` read on the device.
#[allow(clippy::too_many_arguments)] // the op's inputs and attributes
pub(super) fn grad_op(
    dev: &RankDevice,
    op: &'static str,
    logits: &CudaTensor,
    targets: &CudaTensor,
    dloss: &CudaTensor,
    shift: bool,
    classes: Option<&Dim>,
    local: &Local,
) -> Result<CudaTensor> {
    let real = ce_classes(op, logits, classes)?;
    index::same_shape("the loss gradient", &[], &dloss.shape).or_invalid(op)?;
    let g = geometry(op, logits, 0, real)?;
    let t = targets_of(op, logits, targets)?;
    let max = row_max_dev(dev, op, logits, &g)?;
    check_targets(dev, op, t, &g, shift, real)?;
    let (sum, _) = row_sums_dev(dev, op, logits, &max, t, &g, shift, 0)?;
    let token_parts = local.token_parts.max(1);
    let count = mean_count(op, g.rows, g.seq, shift, token_parts, &logits.shape)?;
    let dloss = as_dtype(dev, op, dloss, DType::F32)?;
    let dloss = index_buffer(op, "loss gradient", &dloss)?.as_ref();
    let inputs = GradInputs {
        max: &max,
        sum: &sum,
        targets: t,
        dloss,
        denom: count as f64 * token_parts as f64,
    };
    grad_dev(dev, op, logits, &g, inputs, shift, 0)
}
