//! Launches of `cu/optim.cu` and `cu/reduce.cu`: AdamW and the gradient-clipping scale on the
//! rank's shards, the virtual-rank communicator's elementwise reduction, and the executor's
//! non-finite check. The in-place functions first make their tensors' buffers unique
//! ([`CudaTensor::make_unique`]), so a buffer another tensor shares is never written.

use super::launch::{cfg_1d, device, i64_of, on, to_host, Launch, Result};
use super::structs::{AdamWParams, Inputs, MAX_INPUTS};
use super::{check, spec};
use crate::device::RankDevice;
use crate::tensor::{CudaTensor, DeviceData};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use ferrotron_exec::backend::AdamW;
use ferrotron_exec::comm::ReduceOp;
use ferrotron_exec::kernel::{invalid, KernelError};
use half::bf16;
use std::sync::Arc;

/// The unique `f32` buffer of `t` (copied first if shared), for writing in place.
fn f32_mut<'t>(
    dev: &RankDevice,
    op: &'static str,
    what: &str,
    t: &'t mut CudaTensor,
) -> Result<&'t mut CudaSlice<f32>> {
    t.make_unique(&dev.stream).map_err(on(op))?;
    match &mut t.data {
        DeviceData::F32(s) => Arc::get_mut(s)
            .map(|s| &mut **s)
            .ok_or_else(|| device(op, format!("the {what} buffer is shared"))),
        DeviceData::Bf16(_) => Err(invalid(
            op,
            format!("the {what} must be f32 (master weights)"),
        )),
    }
}

/// One AdamW update of `param` (`f32` master weights) with `grad` (`f32` or bf16) and the
/// moments `m`, `v` (`f32`), in place: exactly [`ferrotron_exec::backend::adamw_host`]'s
/// update, in `f64`, so the results are bit-identical to the CPU's. `update.step` counts from 1
/// (0 is refused); the gradient is multiplied by `update.grad_scale` (the clipping factor)
/// inside the update.
pub fn adamw(
    dev: &RankDevice,
    param: &mut CudaTensor,
    grad: &CudaTensor,
    (m, v): (&mut CudaTensor, &mut CudaTensor),
    update: AdamW,
) -> Result<(), KernelError> {
    const OP: &str = "AdamW";
    let AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step: t,
        grad_scale,
    } = update;
    for x in [&*param, grad, &*m, &*v] {
        check(OP, x)?;
    }
    let n = param.numel();
    if grad.numel() != n || m.numel() != n || v.numel() != n {
        return Err(invalid(
            OP,
            format!(
                "the weight has {n} elements, the gradient {}, the moments {} and {}",
                grad.numel(),
                m.numel(),
                v.numel()
            ),
        ));
    }
    let t = i32::try_from(t)
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| invalid(OP, format!("step number {t} (counted from 1)")))?;
    // The constants as the host update computes them (powi on the host: the same bits).
    let params = AdamWParams {
        lr,
        beta1,
        one_minus_beta1: 1.0 - beta1,
        beta2,
        one_minus_beta2: 1.0 - beta2,
        bc1: 1.0 - beta1.powi(t),
        bc2: 1.0 - beta2.powi(t),
        eps,
        decay: weight_decay,
        grad_scale,
    };
    if n == 0 {
        return Ok(());
    }
    let n64 = i64_of(OP, n)?;
    let w = f32_mut(dev, OP, "weight", param)?;
    let m = f32_mut(dev, OP, "first moment", m)?;
    let v = f32_mut(dev, OP, "second moment", v)?;
    Launch::new(dev, OP, &spec::ADAMW, grad.dtype())?
        .slice_mut(w)
        .slice_mut(m)
        .slice_mut(v)
        .input(&grad.data)
        .val(&n64)
        .val(&params)
        .launch(cfg_1d(dev, n))
}

/// `t *= factor` in place (the product in `f64`): gradient clipping.
pub fn scale_in_place(
    dev: &RankDevice,
    t: &mut CudaTensor,
    factor: f64,
) -> Result<(), KernelError> {
    const OP: &str = "scale";
    check(OP, t)?;
    let n = t.numel();
    if n == 0 {
        return Ok(());
    }
    t.make_unique(&dev.stream).map_err(on(OP))?;
    let dtype = t.dtype();
    let n64 = i64_of(OP, n)?;
    let mut l = Launch::new(dev, OP, &spec::SCALE_INPLACE, dtype)?;
    match &mut t.data {
        DeviceData::F32(s) => {
            l.slice_mut(Arc::get_mut(s).ok_or_else(|| device(OP, "the buffer is shared"))?)
        }
        DeviceData::Bf16(s) => {
            l.slice_mut(Arc::get_mut(s).ok_or_else(|| device(OP, "the buffer is shared"))?)
        }
    };
    l.val(&n64).val(&factor).launch(cfg_1d(dev, n))
}

/// A buffer's device address for a kernel that reads it on `stream`: the stream first waits
/// for the buffer's last write, and the guard records the read when dropped (after the launch).
fn read_ptr<'a>(d: &'a DeviceData, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    match d {
        DeviceData::F32(s) => s.as_ref().device_ptr(stream),
        DeviceData::Bf16(s) => s.as_ref().device_ptr(stream),
    }
}

/// `out = inputs[0] ⊕ inputs[1] ⊕ …` elementwise (`Sum` or `Max`, `f32::max` semantics), folded
/// left to right in rank order as the CPU communicator does: bit-identical on every member that
/// reduces the same inputs. Up to 16 inputs in one pass (accumulated in `f32`, rounded once);
/// more continue from `out`.
///
/// The inputs may live on other ranks' streams (virtual ranks on one GPU): through cudarc's
/// event tracking, this rank's stream waits for each input's last write before the kernel, and
/// records the read after it. cudarc keeps one "read" event per buffer, so when several ranks
/// read one buffer only the last read is recorded: the owner must not write or free an input
/// until every reader is done, which the virtual group's exchange of "read" events ensures.
pub fn reduce_buffers(
    dev: &RankDevice,
    out: &mut CudaTensor,
    inputs: &[&CudaTensor],
    op: ReduceOp,
) -> Result<(), KernelError> {
    const OP: &str = "reduce";
    check(OP, out)?;
    if inputs.is_empty() {
        return Err(invalid(OP, "nothing to reduce"));
    }
    for x in inputs {
        check(OP, x)?;
        if x.numel() != out.numel() || x.dtype() != out.dtype() {
            return Err(invalid(
                OP,
                format!(
                    "an input of shape {:?} ({:?}) into an output of shape {:?} ({:?})",
                    x.shape,
                    x.dtype(),
                    out.shape,
                    out.dtype()
                ),
            ));
        }
    }
    let n = out.numel();
    if n == 0 {
        return Ok(());
    }
    out.make_unique(&dev.stream).map_err(on(OP))?;
    let (dtype, n64) = (out.dtype(), i64_of(OP, n)?);
    let code: i32 = match op {
        ReduceOp::Sum => 0,
        ReduceOp::Max => 1,
    };
    let stream = &dev.stream;
    let mut guards = Vec::with_capacity(inputs.len() + 1);
    let ptrs: Vec<u64> = inputs
        .iter()
        .map(|x| {
            let (p, g) = read_ptr(&x.data, stream);
            guards.push(g);
            p
        })
        .collect();
    let (out_ptr, out_guard) = match &mut out.data {
        DeviceData::F32(s) => Arc::get_mut(s)
            .ok_or_else(|| device(OP, "the output buffer is shared"))?
            .device_ptr_mut(stream),
        DeviceData::Bf16(s) => Arc::get_mut(s)
            .ok_or_else(|| device(OP, "the output buffer is shared"))?
            .device_ptr_mut(stream),
    };
    let mut done = 0;
    while done < ptrs.len() {
        // The first pass takes up to 16 inputs; later ones continue from `out`.
        let mut list = Inputs::default();
        let mut count = 0usize;
        if done > 0 {
            list.p[0] = out_ptr;
            count = 1;
        }
        while count < MAX_INPUTS && done < ptrs.len() {
            list.p[count] = ptrs[done];
            count += 1;
            done += 1;
        }
        let count = count as i32;
        Launch::new(dev, OP, &spec::REDUCE_N, dtype)?
            .ptr(&out_ptr)
            .val(&list)
            .val(&count)
            .val(&code)
            .val(&n64)
            .launch(cfg_1d(dev, n))?;
    }
    // Dropping the guards records the reads and the write after the launches.
    drop(out_guard);
    drop(guards);
    Ok(())
}

/// The first NaN or infinity of `t` (in element order), if any. Waits for the rank's stream.
pub fn first_non_finite(dev: &RankDevice, t: &CudaTensor) -> Result<Option<f32>, KernelError> {
    const OP: &str = "first_non_finite";
    check(OP, t)?;
    let n = t.numel();
    if n == 0 {
        return Ok(None);
    }
    let mut first = dev.stream.clone_htod(&[u64::MAX]).map_err(on(OP))?;
    let n64 = i64_of(OP, n)?;
    Launch::new(dev, OP, &spec::FIRST_NON_FINITE, t.dtype())?
        .slice_mut(&mut first)
        .input(&t.data)
        .val(&n64)
        .launch(cfg_1d(dev, n))?;
    let at = to_host(dev, OP, &first.as_view())?
        .first()
        .copied()
        .unwrap_or(u64::MAX);
    if at == u64::MAX {
        return Ok(None);
    }
    // A device-made index: checked before slicing with it (a bad one would panic); `check`
    // above made the buffer hold at least `n` elements.
    let at = usize::try_from(at)
        .ok()
        .filter(|&at| at < n)
        .ok_or_else(|| device(OP, format!("the search reported element {at} of {n}")))?;
    let value = match &t.data {
        DeviceData::F32(s) => to_host(dev, OP, &s.slice(at..at + 1))?.first().copied(),
        DeviceData::Bf16(s) => to_host(dev, OP, &s.slice(at..at + 1))?
            .first()
            .map(|&v: &bf16| f32::from(v)),
    };
    Ok(Some(value.unwrap_or(f32::NAN)))
}

/// Blocks of [`sum_squares`]: fixed, so the partial sums (and their total) do not depend on the
/// device.
const SUM_SQUARES_BLOCKS: usize = 256;

/// `Σ x²` over `t` in `f64` (the global gradient norm's terms): per-block partial sums in `f64`
/// on the device, added on the host in block order, the same on every run. Waits for the rank's
/// stream.
pub fn sum_squares(dev: &RankDevice, t: &CudaTensor) -> Result<f64, KernelError> {
    sum_squares_all(dev, &[t])
}

/// [`sum_squares`] of each tensor, added in order (the same bits as one call each), waiting for
/// the rank's stream once: every tensor's partial sums are queued, then copied back together.
pub fn sum_squares_all(dev: &RankDevice, ts: &[&CudaTensor]) -> Result<f64, KernelError> {
    const OP: &str = "sum_squares";
    let mut partials = Vec::with_capacity(ts.len());
    for t in ts {
        check(OP, t)?;
        let n = t.numel();
        if n == 0 {
            continue;
        }
        let blocks = n
            .div_ceil(super::launch::BLOCK as usize)
            .clamp(1, SUM_SQUARES_BLOCKS);
        let mut partial = dev.stream.alloc_zeros::<f64>(blocks).map_err(on(OP))?;
        let n64 = i64_of(OP, n)?;
        Launch::new(dev, OP, &spec::SUM_SQUARES, t.dtype())?
            .slice_mut(&mut partial)
            .input(&t.data)
            .val(&n64)
            .launch(cudarc::driver::LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (super::launch::BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })?;
        partials.push(partial);
    }
    let mut host = Vec::with_capacity(partials.len());
    for p in &partials {
        host.push(dev.stream.clone_dtoh(p).map_err(on(OP))?);
    }
    dev.stream.synchronize().map_err(on(OP))?;
    super::read_checks(dev)?;
    Ok(host.iter().map(|p| p.iter().sum::<f64>()).sum())
}
