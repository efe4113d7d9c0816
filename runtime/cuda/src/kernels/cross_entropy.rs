//! Launches of `cu/cross_entropy.cu`: the cross-entropy's per-row statistics and the logits'
//! gradient, for a whole (`eval`) or vocabulary-parallel (the executor's phases around its
//! reductions) cross-entropy. The same meaning, checks and errors as the CPU backend's: logits
//! `[..., seq, vocab]`, this rank's classes global `class_offset + j`, classes at or past
//! `real_classes` excluded ([`VocabShard`]); with `shift` row `t` predicts target `t + 1` and the
//! last position of each sequence predicts nothing. The logits may be a window of consecutive rows
//! of larger logits ([`VocabShard::window`], a chunk of a fused output layer): the launches cover
//! the window's rows, while the targets (the full rows'), the rows' sequence positions and the
//! mean's count are the full logits', so the windows' losses add up to the whole loss and their
//! gradients are the whole gradient's rows. For the executor's phases the statistics stay
//! on the device ([`ce_row_max_dev`], [`ce_row_sums_dev`], [`ce_loss_dev`], [`ce_grad_dev`] and
//! [`ce_grad_in_place_dev`], which writes over the logits: the group reduces them as tensors,
//! the loss is computed by a kernel, the backward's seed is read where it is); the host forms
//! ([`ce_row_max`], ...) serve `eval` and the op tests, with the loss's mean the core's
//! ([`ferrotron_exec::kernel::ce_loss`]), on the host in `f64`.

use super::launch::{cfg_2d, cfg_rows, device, i64_of, on, scratch, to_host, Buf, Launch, Result};
use super::{as_dtype, check, defer_index_check, first_bad_index, index_buffer, spec};
use crate::device::RankDevice;
use crate::tensor::{CudaTensor, DeviceData, Storage};
use cudarc::driver::CudaSlice;
use ferrotron_exec::kernel::{
    ce_rows_of, check_targets_shape, invalid, mean_count, CeRows, CeStats, KernelError, OrInvalid,
    Placement, RowStats, VocabShard,
};
use ferrotron_ir::index;
use ferrotron_ir::Dim;
use std::sync::Arc;

/// The logits' shape facts: their rows and where those sit in the full rows ([`CeRows`]: the
/// launches cover `rows`, the targets and the mean are `total`'s), the vocabulary and this
/// rank's real classes.
struct Geometry {
    rows: usize,
    at: CeRows,
    vocab: usize,
    nr: usize,
}

fn geometry(op: &'static str, logits: &CudaTensor, shard: &VocabShard) -> Result<Geometry> {
    check(op, logits)?;
    let at = ce_rows_of(op, &logits.shape, shard)?;
    let vocab = logits.shape[logits.shape.len() - 1];
    Ok(Geometry {
        rows: at.rows,
        at,
        vocab,
        nr: shard.local_real(vocab),
    })
}

/// The targets' shape (the logits' leading axes, or the full rows' for a window) and buffer.
fn targets_of<'t>(
    op: &'static str,
    logits: &CudaTensor,
    targets: &'t CudaTensor,
    g: &Geometry,
    shard: &VocabShard,
) -> Result<&'t CudaSlice<f32>> {
    check(op, targets)?;
    check_targets_shape(op, &targets.shape, &logits.shape, &g.at, shard)?;
    Ok(index_buffer(op, "targets", targets)?.as_ref())
}

/// That every target a row of the full logits reads is an integer in `0..real_classes`: the
/// first that is not. A window's call checks the full targets, so that every window reports a
/// bad target as the whole logits' call does.
fn check_targets(
    dev: &RankDevice,
    op: &'static str,
    targets: &CudaSlice<f32>,
    g: &Geometry,
    shift: bool,
    real_classes: usize,
) -> Result<()> {
    let CeRows { total, seq, .. } = g.at;
    match first_bad_index(dev, op, targets, total, real_classes, seq, shift)? {
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

/// [`check_targets`] without waiting: a bad target is reported by the rank's next read from
/// the device (the loss, at the latest); the kernels skip it meanwhile.
fn defer_target_check(
    dev: &RankDevice,
    op: &'static str,
    targets: &CudaTensor,
    g: &Geometry,
    shard: &VocabShard,
) -> Result<()> {
    let buffer = index_buffer(op, "targets", targets)?;
    let range = (g.at.total, shard.real_classes, g.at.seq);
    defer_index_check(dev, op, "target", buffer, range, shard.shift)
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

/// The statistics' row buffers on the device.
struct Rows<'a> {
    max: &'a CudaSlice<f32>,
    targets: &'a CudaSlice<f32>,
}

/// The sums of exponentials, then the target logits: one `[2, rows]` buffer.
fn row_sums_dev(
    dev: &RankDevice,
    op: &'static str,
    logits: &CudaTensor,
    rows: Rows,
    g: &Geometry,
    shard: &VocabShard,
) -> Result<CudaSlice<f32>> {
    let Rows { max, targets } = rows;
    let (shift, class_offset) = (shard.shift, shard.class_offset);
    let mut sums = scratch(dev, op, 2 * g.rows)?;
    if g.rows > 0 {
        let v = [
            g.rows,
            g.at.first,
            g.at.seq.max(1),
            g.vocab,
            g.nr,
            class_offset,
        ]
        .map(|x| i64_of(op, x))
        .into_iter()
        .collect::<Result<Vec<i64>>>()?;
        let shift = i32::from(shift);
        Launch::new(dev, op, &spec::CE_ROW_SUMS, logits.dtype())?
            .slice_mut(&mut sums)
            .input(&logits.data)
            .slice(max)
            .slice(targets)
            .val(&v[0])
            .val(&v[1])
            .val(&v[2])
            .val(&v[3])
            .val(&v[4])
            .val(&v[5])
            .val(&shift)
            .launch(cfg_rows(dev, g.rows, g.nr))?;
    }
    Ok(sums)
}

/// The statistics' inputs the gradient kernel takes.
struct GradInputs<'a> {
    max: &'a CudaSlice<f32>,
    sum: &'a CudaSlice<f32>,
    targets: &'a CudaSlice<f32>,
    dloss: &'a CudaSlice<f32>,
}

/// The gradient kernels' scalar arguments, after their statistics' buffers: the rows, the
/// first full row, the sequence length, the vocabulary, the real local classes and the class
/// offset; the shift; the mean's denominator.
struct GradScalars {
    v: [i64; 6],
    shift: i32,
    denom: f64,
}

fn grad_scalars(
    op: &'static str,
    logits_shape: &[usize],
    g: &Geometry,
    shard: &VocabShard,
) -> Result<GradScalars> {
    let (shift, class_offset) = (shard.shift, shard.class_offset);
    // The mean's denominator: the full rows' predicting rows × token parts.
    let (total, seq) = (g.at.total, g.at.seq);
    let count = mean_count(op, (total, seq), shift, shard.token_parts, logits_shape)?;
    let denom = count as f64 * shard.token_parts as f64;
    let mut v = [0i64; 6];
    for (v, x) in v
        .iter_mut()
        .zip([g.rows, g.at.first, seq.max(1), g.vocab, g.nr, class_offset])
    {
        *v = i64_of(op, x)?;
    }
    Ok(GradScalars {
        v,
        shift: i32::from(shift),
        denom,
    })
}

/// The arguments the two gradient kernels share, after the logits' buffer(s), then the launch.
fn launch_grad<'a>(
    dev: &RankDevice,
    l: &mut Launch<'a>,
    inputs: &GradInputs<'a>,
    s: &'a GradScalars,
    g: &Geometry,
) -> Result<()> {
    l.slice(inputs.max)
        .slice(inputs.sum)
        .slice(inputs.targets)
        .slice(inputs.dloss);
    for v in &s.v {
        l.val(v);
    }
    l.val(&s.shift)
        .val(&s.denom)
        .launch(cfg_2d(dev, g.rows, g.vocab))
}

fn grad_dev(
    dev: &RankDevice,
    op: &'static str,
    logits: &CudaTensor,
    g: &Geometry,
    inputs: GradInputs,
    shard: &VocabShard,
) -> Result<CudaTensor> {
    let s = grad_scalars(op, &logits.shape, g, shard)?;
    let n = logits.numel();
    let mut out = Buf::uninit(dev, op, logits.dtype(), n)?;
    if n > 0 {
        let mut l = Launch::new(dev, op, &spec::CE_GRAD, logits.dtype())?;
        l.output(&mut out).input(&logits.data);
        launch_grad(dev, &mut l, &inputs, &s, g)?;
    }
    Ok(out.into_tensor(logits.shape.clone()))
}

/// [`grad_dev`] written over the logits' buffer (`ce_grad_inplace`: `ce_grad`'s arithmetic with
/// the output the input, so the same values to the bit). The buffer is made this tensor's own
/// first ([`CudaTensor::make_unique`]): a tensor sharing it (the statistics' or targets' too)
/// keeps the logits.
fn grad_in_place_dev(
    dev: &RankDevice,
    op: &'static str,
    mut logits: CudaTensor,
    g: &Geometry,
    inputs: GradInputs,
    shard: &VocabShard,
) -> Result<CudaTensor> {
    let s = grad_scalars(op, &logits.shape, g, shard)?;
    if logits.numel() == 0 {
        return Ok(logits);
    }
    logits.make_unique(&dev.stream).map_err(on(op))?;
    let shared = || device(op, "the logits' buffer is still shared");
    {
        let mut l = Launch::new(dev, op, &spec::CE_GRAD_INPLACE, logits.dtype())?;
        match &mut logits.data {
            DeviceData::F32(x) => l.slice_mut(Arc::get_mut(x).ok_or_else(shared)?),
            DeviceData::Bf16(x) => l.slice_mut(Arc::get_mut(x).ok_or_else(shared)?),
        };
        launch_grad(dev, &mut l, &inputs, &s, g)?;
    }
    Ok(logits)
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

/// Per row, the max over this rank's real classes (−∞ for a row with none).
pub fn ce_row_max(
    dev: &RankDevice,
    logits: &CudaTensor,
    shard: &VocabShard,
) -> Result<Vec<f32>, KernelError> {
    const OP: &str = "CrossEntropy";
    let g = geometry(OP, logits, shard)?;
    let max = row_max_dev(dev, OP, logits, &g)?;
    host(dev, OP, &max, g.rows)
}

/// Per row, `Σ exp(logit − max[row])` over this rank's real classes, and the target's logit
/// where this rank holds the target's class (else 0).
pub fn ce_row_sums(
    dev: &RankDevice,
    logits: &CudaTensor,
    max: &[f32],
    targets: &CudaTensor,
    shard: &VocabShard,
) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    const OP: &str = "CrossEntropy";
    let g = geometry(OP, logits, shard)?;
    let t = targets_of(OP, logits, targets, &g, shard)?;
    if max.len() != g.rows {
        return Err(invalid(
            OP,
            format!("{} row maxima for {} rows", max.len(), g.rows),
        ));
    }
    check_targets(dev, OP, t, &g, shard.shift, shard.real_classes)?;
    let max = device_rows(dev, OP, max, g.rows, "row maxima")?;
    let rows = Rows {
        max: &max,
        targets: t,
    };
    let sums = row_sums_dev(dev, OP, logits, rows, &g, shard)?;
    let sums = host(dev, OP, &sums, 2 * g.rows)?;
    let (sum, tl) = sums.split_at(g.rows);
    Ok((sum.to_vec(), tl.to_vec()))
}

/// The local logits' gradient from the group-reduced statistics.
pub fn ce_grad(
    dev: &RankDevice,
    logits: &CudaTensor,
    targets: &CudaTensor,
    stats: &RowStats,
    shard: &VocabShard,
    dloss: f32,
) -> Result<CudaTensor, KernelError> {
    const OP: &str = "CrossEntropyGrad";
    let (max, sum) = (&stats.max, &stats.sum);
    let g = geometry(OP, logits, shard)?;
    let t = targets_of(OP, logits, targets, &g, shard)?;
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
    check_targets(dev, OP, t, &g, shard.shift, shard.real_classes)?;
    let max = device_rows(dev, OP, max, g.rows, "maxima")?;
    let sum = device_rows(dev, OP, sum, g.rows, "sums")?;
    let dloss = dev.stream.clone_htod(&[dloss]).map_err(on(OP))?;
    let inputs = GradInputs {
        max: &max,
        sum: &sum,
        targets: t,
        dloss: &dloss,
    };
    grad_dev(dev, OP, logits, &g, inputs, shard)
}

/// The shard of a whole cross-entropy: every class, `classes` of them real.
pub(super) fn whole(
    op: &'static str,
    logits: &CudaTensor,
    classes: Option<&Dim>,
    shift: bool,
    local: &Placement,
) -> Result<VocabShard> {
    index::min_rank("the logits ([..., seq, vocab])", &logits.shape, 2).or_invalid(op)?;
    Ok(VocabShard {
        class_offset: 0,
        real_classes: index::ce_classes(&logits.shape, classes).or_invalid(op)?,
        shift,
        token_parts: local.n_token_parts(),
        window: None,
    })
}

/// `CrossEntropy` on whole logits: the statistics on the device, the mean on the host (in
/// `f64`), returned as a device scalar.
pub(super) fn loss_op(
    dev: &RankDevice,
    op: &'static str,
    logits: &CudaTensor,
    targets: &CudaTensor,
    shard: &VocabShard,
) -> Result<CudaTensor> {
    let g = geometry(op, logits, shard)?;
    let t = targets_of(op, logits, targets, &g, shard)?;
    let max = row_max_dev(dev, op, logits, &g)?;
    defer_target_check(dev, op, targets, &g, shard)?;
    let rows = Rows {
        max: &max,
        targets: t,
    };
    let sums = row_sums_dev(dev, op, logits, rows, &g, shard)?;
    loss_dev(dev, op, (&max, &sums), &logits.shape, shard)
}

/// `CrossEntropyGrad` on whole logits, `dloss` read on the device.
pub(super) fn grad_op(
    dev: &RankDevice,
    op: &'static str,
    (logits, targets, dloss): (&CudaTensor, &CudaTensor, &CudaTensor),
    shard: &VocabShard,
) -> Result<CudaTensor> {
    index::same_shape("the loss gradient", &[], &dloss.shape).or_invalid(op)?;
    let g = geometry(op, logits, shard)?;
    let t = targets_of(op, logits, targets, &g, shard)?;
    let max = row_max_dev(dev, op, logits, &g)?;
    defer_target_check(dev, op, targets, &g, shard)?;
    let rows = Rows {
        max: &max,
        targets: t,
    };
    let sum = row_sums_dev(dev, op, logits, rows, &g, shard)?;
    let dloss = as_dtype(dev, op, dloss, Storage::F32)?;
    let dloss = index_buffer(op, "loss gradient", &dloss)?.as_ref();
    let inputs = GradInputs {
        max: &max,
        sum: &sum,
        targets: t,
        dloss,
    };
    grad_dev(dev, op, logits, &g, inputs, shard)
}

/// A statistics tensor's buffer: `f32`, of shape `shape`.
fn stats_buffer<'t>(
    op: &'static str,
    what: &str,
    t: &'t CudaTensor,
    shape: &[usize],
) -> Result<&'t CudaSlice<f32>> {
    if t.shape != shape {
        return Err(invalid(
            op,
            format!("the {what} have shape {:?}, not {shape:?}", t.shape),
        ));
    }
    Ok(index_buffer(op, what, t)?.as_ref())
}

/// The loss from the statistics on the device (`max` `[rows]`, `sums` `[2, rows]`), a device
/// scalar: [`ferrotron_exec::kernel::ce_loss`]'s arithmetic, in one block of a kernel (a
/// window's rows summed, divided by the full rows' count).
fn loss_dev(
    dev: &RankDevice,
    op: &'static str,
    (max, sums): (&CudaSlice<f32>, &CudaSlice<f32>),
    logits_shape: &[usize],
    shard: &VocabShard,
) -> Result<CudaTensor> {
    let CeRows {
        rows,
        first,
        total,
        seq,
    } = ce_rows_of(op, logits_shape, shard)?;
    let count = mean_count(
        op,
        (total, seq),
        shard.shift,
        shard.token_parts,
        logits_shape,
    )?;
    let mut out = scratch(dev, op, 1)?;
    let v = [rows, first, seq.max(1)]
        .map(|x| i64_of(op, x))
        .into_iter()
        .collect::<Result<Vec<i64>>>()?;
    let shift = i32::from(shard.shift);
    let denom = count as f64 * shard.token_parts as f64;
    Launch::new(dev, op, &spec::CE_LOSS, Storage::F32)?
        .slice_mut(&mut out)
        .slice(max)
        .slice(sums)
        .val(&v[0])
        .val(&v[1])
        .val(&v[2])
        .val(&shift)
        .val(&denom)
        .launch(cudarc::driver::LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (super::launch::BLOCK, 1, 1),
            shared_mem_bytes: 0,
        })?;
    Ok(CudaTensor::f32(Vec::new(), out))
}

/// [`ce_row_max`], kept on the device: `[rows]`.
pub fn ce_row_max_dev(
    dev: &RankDevice,
    logits: &CudaTensor,
    shard: &VocabShard,
) -> Result<CudaTensor> {
    const OP: &str = "CrossEntropy";
    let g = geometry(OP, logits, shard)?;
    let max = row_max_dev(dev, OP, logits, &g)?;
    Ok(CudaTensor::f32(vec![g.rows], max))
}

/// [`ce_row_sums`] from device maxima, kept on the device: `[2, rows]`, the sums of
/// exponentials then the target logits.
pub fn ce_row_sums_dev(
    dev: &RankDevice,
    logits: &CudaTensor,
    max: &CudaTensor,
    targets: &CudaTensor,
    shard: &VocabShard,
) -> Result<CudaTensor> {
    const OP: &str = "CrossEntropy";
    let g = geometry(OP, logits, shard)?;
    let t = targets_of(OP, logits, targets, &g, shard)?;
    let max = stats_buffer(OP, "row maxima", max, &[g.rows])?;
    defer_target_check(dev, OP, targets, &g, shard)?;
    let rows = Rows { max, targets: t };
    let sums = row_sums_dev(dev, OP, logits, rows, &g, shard)?;
    Ok(CudaTensor::f32(vec![2, g.rows], sums))
}

/// The loss from device statistics, a device scalar ([`ferrotron_exec::kernel::ce_loss`]'s
/// arithmetic, by a kernel).
pub fn ce_loss_dev(
    dev: &RankDevice,
    stats: &CeStats<CudaTensor>,
    logits_shape: &[usize],
    shard: &VocabShard,
) -> Result<CudaTensor> {
    const OP: &str = "CrossEntropy";
    let rows = ce_rows_of(OP, logits_shape, shard)?.rows;
    let max = stats_buffer(OP, "row maxima", &stats.max, &[rows])?;
    let sums = stats_buffer(OP, "row sums", &stats.sums, &[2, rows])?;
    loss_dev(dev, OP, (max, sums), logits_shape, shard)
}

/// The checked inputs of [`ce_grad_dev`] and [`ce_grad_in_place_dev`]: the geometry and the
/// statistics', targets' and seed's buffers (the seed in `f32`, converted if need be).
fn grad_inputs_dev<'t>(
    dev: &RankDevice,
    op: &'static str,
    logits: &CudaTensor,
    (targets, stats, dloss): (&'t CudaTensor, &'t CeStats<CudaTensor>, &'t CudaTensor),
    shard: &VocabShard,
) -> Result<(Geometry, GradBuffers<'t>)> {
    let g = geometry(op, logits, shard)?;
    let targets = targets_of(op, logits, targets, &g, shard)?;
    let max = stats_buffer(op, "maxima", &stats.max, &[g.rows])?;
    // The grad kernel reads the first row of `[2, rows]`: the sums of exponentials.
    let sum = stats_buffer(op, "sums", &stats.sums, &[2, g.rows])?;
    index::same_shape("the loss gradient", &[], &dloss.shape).or_invalid(op)?;
    // The seed in f32 (under bf16 storage it may be held in bf16).
    let dloss = as_dtype(dev, op, dloss, Storage::F32)?;
    // The targets were checked with the statistics ([`ce_row_sums_dev`]).
    let buffers = GradBuffers {
        max,
        sum,
        targets,
        dloss,
    };
    Ok((g, buffers))
}

/// [`GradInputs`] with the seed owned where it had to be converted.
struct GradBuffers<'t> {
    max: &'t CudaSlice<f32>,
    sum: &'t CudaSlice<f32>,
    targets: &'t CudaSlice<f32>,
    dloss: std::borrow::Cow<'t, CudaTensor>,
}

impl GradBuffers<'_> {
    fn inputs(&self, op: &'static str) -> Result<GradInputs<'_>> {
        Ok(GradInputs {
            max: self.max,
            sum: self.sum,
            targets: self.targets,
            dloss: index_buffer(op, "loss gradient", &self.dloss)?.as_ref(),
        })
    }
}

/// The local logits' gradient from device statistics and the loss's gradient as a device
/// scalar (the backward's seed is never read back).
pub fn ce_grad_dev(
    dev: &RankDevice,
    logits: &CudaTensor,
    targets: &CudaTensor,
    stats: &CeStats<CudaTensor>,
    shard: &VocabShard,
    dloss: &CudaTensor,
) -> Result<CudaTensor> {
    const OP: &str = "CrossEntropyGrad";
    let (g, b) = grad_inputs_dev(dev, OP, logits, (targets, stats, dloss), shard)?;
    grad_dev(dev, OP, logits, &g, b.inputs(OP)?, shard)
}

/// [`ce_grad_dev`] written over the logits' own buffer, which the caller gives up (a fused
/// output layer's chunk then holds one `[rows, classes]` buffer, not two): the same checks,
/// errors and values, to the bit. A buffer the logits share with another tensor is copied
/// first, so that tensor is left as it was.
pub fn ce_grad_in_place_dev(
    dev: &RankDevice,
    logits: CudaTensor,
    targets: &CudaTensor,
    stats: &CeStats<CudaTensor>,
    shard: &VocabShard,
    dloss: &CudaTensor,
) -> Result<CudaTensor> {
    const OP: &str = "CrossEntropyGrad";
    let (g, b) = grad_inputs_dev(dev, OP, &logits, (targets, stats, dloss), shard)?;
    grad_in_place_dev(dev, OP, logits, &g, b.inputs(OP)?, shard)
}
