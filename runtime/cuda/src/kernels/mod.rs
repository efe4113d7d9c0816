//! Every op's local computation on the GPU, and the device-side pieces of the communicators and
//! the optimizer.
//!
//! Where it sits: the CUDA backend ([`crate::Cuda`]) answers the rank program's `eval` with
//! [`eval`], which does exactly what the CPU backend's `eval` does (`ferrotron-cpu`, the
//! reference the backend tests hold it to), on device tensors ([`CudaTensor`], `f32` or bf16
//! storage), on the rank's stream and cuBLAS handle ([`RankDevice`]). The same inputs are
//! refused with the same [`KernelError`]s (the shape checks are [`ferrotron_ir::index`]'s and
//! `ferrotron_exec::kernel`'s, shared with the CPU; ids and targets are checked on the device,
//! the first bad one reported). Fused steps (`Backend::eval_fused`, see
//! [`ferrotron_exec::fuse`]) go to [`eval_fused`]: bias + activation and its gradient in one
//! elementwise kernel, the attention scale folded into the softmax kernels. The
//! communicators use [`reduce_buffers`], [`interleave`], [`deinterleave`] and [`local_slice`];
//! the vocabulary-parallel cross-entropy's phases are [`ce_row_max`], [`ce_row_sums`] and
//! [`ce_grad`]; training uses [`adamw`] and [`scale_in_place`], and a weight's gradient summed
//! over chunks of rows [`matmul_acc`] (a GEMM accumulating into the sum's buffer).
//!
//! How a launch works: [`Kernels`] holds the functions of the modules [`super::nvrtc`] compiled
//! (`cu/*.cu`); [`spec::KERNELS`] lists each with its parameters, and every launch goes through
//! a builder that checks its arguments against that list (which the compile test checks against
//! the PTX). Kernels write fresh output buffers; tensors are never written through a shared
//! buffer (the in-place functions, [`matmul_acc`] among them, first make theirs unique).
//!
//! Numerics: elementwise kernels reproduce the CPU backend's formulas operation for operation
//! (no FMA contraction; the CPU's `exp`, normal CDF and SplitMix64 ported), so they agree to the
//! bit in `f32`; the norms accumulate their row statistics and normalize in `f64`, as the CPU
//! (an RMSNorm gradient of a short row, or a LayerNorm of values far from zero, cancels too
//! much for `f32`), and so does softmax's gradient (a peaked row's `dy − Σ dy·y` cancels to
//! nothing in `f32`); the other reductions (softmax and cross-entropy row sums, `SumTo`, the norms'
//! parameter gradients across rows) accumulate in `f32` over warp and block trees where the CPU
//! uses `f64`, and agree to a few `f32` ulps of the summands. Every reduction is deterministic
//! (its order fixed by the launch shape, which depends on the shapes only) except
//! `EmbeddingGrad`'s scatter-add (`f32` atomics). Matmuls are cuBLAS: `f32` GEMMs
//! (cuBLAS's default math mode: no TF32), bf16 GEMMs with `f32` accumulation. In bf16 storage
//! every kernel loads bf16, computes in `f32` and rounds the result to bf16 once (ids, targets
//! and the cross-entropy statistics stay `f32`); an op whose floating inputs mix `f32` and bf16
//! computes in `f32` and returns `f32`.
//!
//! Buffers: a tensor's buffer holds exactly its shape's elements, except that an empty tensor
//! made here holds one unused element (CUDA cannot allocate 0 bytes): count elements by the
//! shape ([`CudaTensor::numel`]), not by the buffer's length.
//!
//! Host synchronization: only where a result must reach the host: the id and target checks
//! (one 8-byte read), the cross-entropy statistics and loss, [`download`] and
//! [`first_non_finite`].

mod attention;
mod cross_entropy;
mod elementwise;
mod embedding;
mod launch;
mod layout;
mod matmul;
mod norm;
mod optim;
pub mod spec;
mod structs;
#[cfg(test)]
mod tests;

pub use cross_entropy::{
    ce_grad, ce_grad_dev, ce_grad_in_place_dev, ce_loss_dev, ce_row_max, ce_row_max_dev,
    ce_row_sums, ce_row_sums_dev,
};
pub use elementwise::{add_into, bias_dropout_add};
pub use matmul::matmul_acc;
pub use optim::{
    adamw, first_non_finite, reduce_buffers, scale_in_place, sum_squares, sum_squares_all,
};
pub use spec::{KernelSpec, Param, KERNELS};

use super::device::RankDevice;
use super::nvrtc::{self, Compiled};
use super::tensor::{CudaTensor, DeviceBuffer, DeviceData, Storage};
use super::CudaError;
pub use attention::{attention, attention_grad};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaSlice};
use cudarc::nvrtc::Ptx;
use ferrotron_exec::fuse::Fused;
use ferrotron_exec::kernel::{check_bias, invalid, KernelError, OrInvalid, Placement};
use ferrotron_exec::Tensor;
use ferrotron_ir::index;
use ferrotron_ir::op::{Activation, Op};
use ferrotron_ir::Dim;
use half::bf16;
use launch::{on, Buf, Result};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// The loaded kernels

/// The compiled kernels of one GPU: every function of [`KERNELS`], loaded into its context.
pub struct Kernels {
    functions: HashMap<String, CudaFunction>,
    sm_count: u32,
    target: String,
    cached: bool,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Kernels({} functions for {}, {} SMs)",
            self.functions.len(),
            self.target,
            self.sm_count
        )
    }
}

impl Kernels {
    /// Compiles (or loads from the cache, see [`nvrtc::compile`]) every kernel for `arch`
    /// (`sm_90`) and loads them into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Kernels, CudaError> {
        let compiled = nvrtc::compile(arch)?;
        Kernels::from_compiled(ctx, &compiled)
    }

    /// Loads already compiled modules into `ctx`: each one's cubin, or its PTX (JIT-compiled by
    /// the driver) when there is no cubin or the driver refuses it.
    pub fn from_compiled(
        ctx: &Arc<CudaContext>,
        compiled: &Compiled,
    ) -> Result<Kernels, CudaError> {
        let mut modules: HashMap<&str, Arc<CudaModule>> = HashMap::new();
        for m in &compiled.modules {
            let from_cubin = m
                .cubin
                .as_ref()
                .map(|c| ctx.load_module(Ptx::from_binary(c.clone())));
            let module = match from_cubin {
                Some(Ok(module)) => module,
                other => {
                    let cubin_err = match other {
                        Some(Err(e)) => format!("its cubin: {e}; "),
                        _ => String::new(),
                    };
                    ctx.load_module(Ptx::from_src(m.ptx.clone())).map_err(|e| {
                        CudaError::Unavailable(format!(
                            "the driver cannot load the kernels of {} compiled for {} by NVRTC \
                             {}.{} ({cubin_err}its PTX: {e}); the driver may be older than \
                             NVRTC: update the driver or use an NVRTC of the driver's CUDA \
                             version",
                            m.source,
                            compiled.target,
                            compiled.nvrtc_version.0,
                            compiled.nvrtc_version.1
                        ))
                    })?
                }
            };
            modules.insert(m.source, module);
        }
        let mut functions = HashMap::new();
        for spec in KERNELS {
            let module = modules.get(spec.source).ok_or_else(|| CudaError::Compile {
                source_name: spec.source.into(),
                arch: compiled.target.clone(),
                log: format!("no module for `{}`", spec.name),
            })?;
            for symbol in spec.symbols() {
                let f = module
                    .load_function(&symbol)
                    .map_err(|e| CudaError::Compile {
                        source_name: spec.source.into(),
                        arch: compiled.target.clone(),
                        log: format!("kernel `{symbol}` is not in the module: {e}"),
                    })?;
                functions.insert(symbol, f);
            }
        }
        let sm_count =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        Ok(Kernels {
            functions,
            sm_count: sm_count.max(1) as u32,
            target: compiled.target.clone(),
            cached: compiled.modules.iter().all(|m| m.cached),
        })
    }

    /// The function named `symbol` (`gelu_f32`).
    pub fn function(&self, symbol: &str) -> Option<&CudaFunction> {
        self.functions.get(symbol)
    }

    /// The device's number of streaming multiprocessors (launch shapes scale with it).
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// What NVRTC compiled for (`sm_90`, or `compute_XX` for a device newer than NVRTC).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether every module came from the disk cache.
    pub fn from_cache(&self) -> bool {
        self.cached
    }
}

// ---------------------------------------------------------------------------------------------
// Shared checks and conversions

/// The most elements one tensor may have (as the CPU backend: 256 GiB of `f32`).
const MAX_ELEMENTS: usize = 1 << 36;

/// The number of elements of `shape`, checked not to overflow or exceed [`MAX_ELEMENTS`].
fn numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    match index::numel(shape) {
        Some(n) if n <= MAX_ELEMENTS => Ok(n),
        _ => Err(invalid(
            op,
            format!("a tensor of shape {shape:?} is too large"),
        )),
    }
}

fn buffer_len(d: &DeviceData) -> usize {
    match d {
        DeviceData::F32(s) => s.len(),
        DeviceData::Bf16(s) => s.len(),
    }
}

/// That `t`'s buffer holds its shape's elements (the CPU's `check_len`; an empty tensor's
/// buffer may hold the one spare element [`launch::alloc_len`] gives it, or none).
fn check(op: &'static str, t: &CudaTensor) -> Result<()> {
    let len = buffer_len(&t.data);
    match index::numel(&t.shape) {
        Some(n) if len == n || (n == 0 && len == 1) => Ok(()),
        _ => Err(invalid(
            op,
            format!("a tensor of shape {:?} holds {len} elements", t.shape),
        )),
    }
}

/// The type an op computes in: `f32` when any floating input is `f32`, else bf16.
fn common_dtype(ts: &[&CudaTensor]) -> Storage {
    if ts.iter().any(|t| t.dtype() == Storage::F32) {
        Storage::F32
    } else {
        Storage::Bf16
    }
}

/// `t` in `dtype` (borrowed when it already is).
fn as_dtype<'t>(
    dev: &RankDevice,
    op: &'static str,
    t: &'t CudaTensor,
    dtype: Storage,
) -> Result<Cow<'t, CudaTensor>> {
    if t.dtype() == dtype {
        Ok(Cow::Borrowed(t))
    } else {
        cast_op(dev, op, t, dtype).map(Cow::Owned)
    }
}

/// An index tensor's (ids', targets') buffer: always `f32` (bf16 holds integers only to 256).
fn index_buffer<'t>(
    op: &'static str,
    what: &str,
    t: &'t CudaTensor,
) -> Result<&'t Arc<DeviceBuffer<f32>>> {
    match &t.data {
        DeviceData::F32(s) => Ok(s),
        DeviceData::Bf16(_) => Err(invalid(
            op,
            format!("the {what} must be stored as f32, not bf16 (bf16 holds integers only to 256)"),
        )),
    }
}

/// The first element of `values` (of `n`) that is not an integer in `0..bound` (skipping the
/// first position of each sequence of `seq` when `skip_first`), as `(element, value)`. One
/// kernel, then an 8-byte read (and one more for the value when there is a bad one).
fn first_bad_index(
    dev: &RankDevice,
    op: &'static str,
    values: &CudaSlice<f32>,
    n: usize,
    bound: usize,
    seq: usize,
    skip_first: bool,
) -> Result<Option<(usize, f32)>> {
    match check_indices(dev, op, values, (n, bound, seq), skip_first)? {
        Some(first) => first_bad(dev, op, &first, values, n),
        None => Ok(None),
    }
}

/// Queues the index check of [`first_bad_index`]: its result buffer (`None` when there is
/// nothing to check).
fn check_indices(
    dev: &RankDevice,
    op: &'static str,
    values: &CudaSlice<f32>,
    (n, bound, seq): (usize, usize, usize),
    skip_first: bool,
) -> Result<Option<CudaSlice<u64>>> {
    if n == 0 {
        return Ok(None);
    }
    let mut first = dev.stream.clone_htod(&[u64::MAX]).map_err(on(op))?;
    let (n64, seq64) = (launch::i64_of(op, n)?, launch::i64_of(op, seq.max(1))?);
    let (bound, skip) = (bound as f64, i32::from(skip_first && seq > 0));
    launch::Launch::new(dev, op, &spec::CHECK_INDICES, Storage::F32)?
        .slice_mut(&mut first)
        .slice(values)
        .val(&n64)
        .val(&bound)
        .val(&seq64)
        .val(&skip)
        .launch(launch::cfg_1d(dev, n))?;
    Ok(Some(first))
}

/// The result of a queued index check, read back: the first bad element and its value.
fn first_bad(
    dev: &RankDevice,
    op: &'static str,
    first: &CudaSlice<u64>,
    values: &CudaSlice<f32>,
    n: usize,
) -> Result<Option<(usize, f32)>> {
    let at = launch::read_back(dev, op, &first.as_view())?
        .first()
        .copied()
        .unwrap_or(u64::MAX);
    if at == u64::MAX {
        return Ok(None);
    }
    // A device-made index: checked before slicing with it (a bad one would panic).
    let at = usize::try_from(at)
        .ok()
        .filter(|&at| at < n && at < values.len())
        .ok_or_else(|| {
            launch::device(op, format!("the index check reported element {at} of {n}"))
        })?;
    let value = launch::read_back(dev, op, &values.slice(at..at + 1))?
        .first()
        .copied()
        .unwrap_or(f32::NAN);
    Ok(Some((at, value)))
}

/// Checks that the indices `values` are integers in `0..bound` without waiting for the answer
/// ([`RankDevice::checks`]): a bad one is reported by the rank's next read from the device.
/// (An index the kernels would read past their tensors with is never used: they skip it.)
fn defer_index_check(
    dev: &RankDevice,
    op: &'static str,
    what: &'static str,
    values: &Arc<DeviceBuffer<f32>>,
    (n, bound, seq): (usize, usize, usize),
    skip_first: bool,
) -> Result<()> {
    /// Past this many unread checks (a loop that never reads from the device), they are read.
    const MAX_UNREAD: usize = 64;
    if let Some(first) = check_indices(dev, op, values, (n, bound, seq), skip_first)? {
        let unread = {
            let mut checks = dev.checks.lock().unwrap_or_else(|e| e.into_inner());
            checks.push(crate::device::DeferredCheck {
                op,
                what,
                bound,
                n,
                first,
                values: values.clone(),
            });
            checks.len()
        };
        if unread > MAX_UNREAD {
            read_checks(dev)?;
        }
    }
    Ok(())
}

/// Reads the rank's deferred index checks (they ran before anything read after them): the
/// first that failed, as the error its op would have given at once.
pub(crate) fn read_checks(dev: &RankDevice) -> Result<()> {
    let checks = std::mem::take(&mut *dev.checks.lock().unwrap_or_else(|e| e.into_inner()));
    for c in checks {
        if let Some((element, value)) = first_bad(dev, c.op, &c.first, &c.values, c.n)? {
            return Err(KernelError::Index {
                op: c.op,
                what: c.what,
                value,
                element,
                bound: c.bound,
            });
        }
    }
    Ok(())
}

// The CPU backend's stride arithmetic, shared.
pub(crate) use ferrotron_ir::index::{broadcast_strides, contiguous_strides};

/// Whether `small` broadcast to `out` is `small`'s elements repeated (its shape without
/// leading ones is a suffix of `out`).
fn is_trailing(small: &[usize], out: &[usize]) -> bool {
    let first = small.iter().position(|&s| s != 1).unwrap_or(small.len());
    let tail = &small[first..];
    tail.len() <= out.len() && out[out.len() - tail.len()..] == *tail
}

/// Axes of sizes `sizes`, read by `K` operands at `strides[k]`: size-1 axes dropped, and
/// neighbours merged where every operand reads them as one run. At most
/// [`structs::MAX_DIMS`] may remain.
fn merge_axes<const K: usize>(
    op: &'static str,
    sizes: &[usize],
    strides: [&[usize]; K],
) -> Result<(Vec<i64>, [Vec<i64>; K])> {
    let mut out_sizes: Vec<usize> = Vec::new();
    let mut out_strides: [Vec<usize>; K] = std::array::from_fn(|_| Vec::new());
    for (i, &n) in sizes.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let mergeable = out_sizes.last().is_some_and(|_| {
            (0..K).all(|k| *out_strides[k].last().unwrap_or(&0) == strides[k][i].wrapping_mul(n))
        });
        if mergeable {
            let last = out_sizes.len() - 1;
            out_sizes[last] *= n;
            for k in 0..K {
                out_strides[k][last] = strides[k][i];
            }
        } else {
            out_sizes.push(n);
            for k in 0..K {
                out_strides[k].push(strides[k][i]);
            }
        }
    }
    if out_sizes.len() > structs::MAX_DIMS {
        return Err(invalid(
            op,
            format!(
                "{sizes:?} has {} axes that cannot be merged; the CUDA kernels take at most {}",
                out_sizes.len(),
                structs::MAX_DIMS
            ),
        ));
    }
    let as_i64 = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
    Ok((
        as_i64(&out_sizes),
        std::array::from_fn(|k| as_i64(&out_strides[k])),
    ))
}

/// `v` in a fixed-size array of [`structs::MAX_DIMS`] (zeros after it).
fn dims_array(v: &[i64]) -> [i64; structs::MAX_DIMS] {
    let mut a = [0i64; structs::MAX_DIMS];
    a[..v.len()].copy_from_slice(v);
    a
}

// ---------------------------------------------------------------------------------------------
// Moving tensors

/// Copies a host tensor to the device, stored as `dtype` (bf16: rounded to nearest even).
pub fn upload(dev: &RankDevice, t: &Tensor, dtype: Storage) -> Result<CudaTensor, KernelError> {
    const OP: &str = "upload";
    index::check_len(&t.shape, t.data.len()).or_invalid(OP)?;
    numel(OP, &t.shape)?;
    let buf = match dtype {
        Storage::F32 => {
            let mut b = Buf::uninit(dev, OP, Storage::F32, t.data.len())?;
            if let Buf::F32(s) = &mut b {
                if !t.data.is_empty() {
                    dev.stream
                        .memcpy_htod(t.data.as_slice(), &mut **s)
                        .map_err(on(OP))?;
                }
            }
            b
        }
        Storage::Bf16 => {
            let host: Vec<bf16> = t.data.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut b = Buf::uninit(dev, OP, Storage::Bf16, t.data.len())?;
            if let Buf::Bf16(s) = &mut b {
                if !host.is_empty() {
                    dev.stream.memcpy_htod(&host, &mut **s).map_err(on(OP))?;
                }
            }
            b
        }
    };
    Ok(buf.into_tensor(t.shape.clone()))
}

/// Copies a device tensor to the host (bf16 widened to `f32`, exactly). Waits for the rank's
/// stream up to the copy.
pub fn download(dev: &RankDevice, t: &CudaTensor) -> Result<Tensor, KernelError> {
    const OP: &str = "download";
    check(OP, t)?;
    let n = t.numel();
    let data = if n == 0 {
        Vec::new()
    } else {
        match &t.data {
            DeviceData::F32(s) => launch::to_host(dev, OP, &s.slice(..n))?,
            DeviceData::Bf16(s) => launch::to_host(dev, OP, &s.slice(..n))?
                .into_iter()
                .map(f32::from)
                .collect(),
        }
    };
    Ok(Tensor {
        shape: t.shape.clone(),
        data: data.into(),
    })
}

fn cast_op(
    dev: &RankDevice,
    op: &'static str,
    t: &CudaTensor,
    dtype: Storage,
) -> Result<CudaTensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    let n = t.numel();
    let mut out = Buf::uninit(dev, op, dtype, n)?;
    if n > 0 {
        let spec = match dtype {
            Storage::Bf16 => &spec::CAST_F32_BF16,
            Storage::F32 => &spec::CAST_BF16_F32,
        };
        let n64 = launch::i64_of(op, n)?;
        launch::Launch::new(dev, op, spec, dtype)?
            .output(&mut out)
            .input(&t.data)
            .val(&n64)
            .launch(launch::cfg_1d(dev, n))?;
    }
    Ok(out.into_tensor(t.shape.clone()))
}

/// `t` stored as `dtype` (a new buffer; the same tensor when it already is).
pub fn cast(dev: &RankDevice, t: &CudaTensor, dtype: Storage) -> Result<CudaTensor, KernelError> {
    check("cast", t)?;
    cast_op(dev, "cast", t, dtype)
}

/// A scalar (shape `[]`) `f32` tensor.
pub fn scalar(dev: &RankDevice, v: f32) -> Result<CudaTensor, KernelError> {
    let s = dev.stream.clone_htod(&[v]).map_err(on("scalar"))?;
    Ok(CudaTensor::f32(Vec::new(), s))
}

/// A tensor of zeros.
pub fn zeros(dev: &RankDevice, shape: &[usize], dtype: Storage) -> Result<CudaTensor, KernelError> {
    let n = numel("zeros", shape)?;
    Ok(Buf::zeros(dev, "zeros", dtype, n)?.into_tensor(shape.to_vec()))
}

/// Part `index` of `parts` equal contiguous parts of `t` along `dim` (`shape[dim] / parts`
/// each, as the CPU backend's `local_slice`).
pub fn local_slice(
    dev: &RankDevice,
    t: &CudaTensor,
    dim: usize,
    index: usize,
    parts: usize,
) -> Result<CudaTensor, KernelError> {
    const OP: &str = "LocalSlice";
    check(OP, t)?;
    if dim >= t.shape.len() || parts == 0 || index >= parts {
        return Err(invalid(
            OP,
            format!(
                "part {index} of {parts} along axis {dim} of {:?} does not exist",
                t.shape
            ),
        ));
    }
    let part = ferrotron_partitioner::mesh::part(t.shape[dim], parts, index);
    layout::slice_axis(dev, OP, t, dim, part.start, part.end)
}

/// `members` tensors of shape `local_shape`, one after another in `flat` (rank order), joined
/// along `dim`: what an all-gather's receive buffer becomes (member `m`'s tensor is part `m`).
pub fn interleave(
    dev: &RankDevice,
    flat: &CudaTensor,
    local_shape: &[usize],
    dim: usize,
    members: usize,
) -> Result<CudaTensor, KernelError> {
    const OP: &str = "AllGather";
    check(OP, flat)?;
    let local_n = numel(OP, local_shape)?;
    if dim >= local_shape.len()
        || members == 0
        || local_n.checked_mul(members) != Some(flat.numel())
    {
        return Err(invalid(
            OP,
            format!(
                "{members} members' tensors of shape {local_shape:?} joined along axis {dim} \
                 do not fit a buffer of shape {:?}",
                flat.shape
            ),
        ));
    }
    let mut shape = local_shape.to_vec();
    shape[dim] *= members;
    let mut out = Buf::uninit(dev, OP, flat.dtype(), flat.numel())?;
    for rows in layout::interleave_rows(local_shape, dim, members) {
        layout::copy_rows(dev, OP, &mut out, &flat.data, rows)?;
    }
    Ok(out.into_tensor(shape))
}

/// The inverse of [`interleave`]: `t` cut into `members` equal parts along `dim`, laid out one
/// part after another (chunk `r` = part `r`), as a tensor of shape `[members, ..part shape]`
/// (what a reduce-scatter hands out in chunks).
pub fn deinterleave(
    dev: &RankDevice,
    t: &CudaTensor,
    dim: usize,
    members: usize,
) -> Result<CudaTensor, KernelError> {
    const OP: &str = "ReduceScatter";
    check(OP, t)?;
    if dim >= t.shape.len() || members == 0 || !t.shape[dim].is_multiple_of(members) {
        return Err(invalid(
            OP,
            format!(
                "axis {dim} of {:?} does not split into {members} equal parts",
                t.shape
            ),
        ));
    }
    let mut part_shape = t.shape.clone();
    part_shape[dim] /= members;
    numel(OP, &part_shape)?;
    let mut out = Buf::uninit(dev, OP, t.dtype(), t.numel())?;
    for rows in layout::deinterleave_rows(&t.shape, dim, members) {
        layout::copy_rows(dev, OP, &mut out, &t.data, rows)?;
    }
    let mut shape = vec![members];
    shape.extend(part_shape);
    Ok(out.into_tensor(shape))
}

// ---------------------------------------------------------------------------------------------
// The dispatcher

/// Evaluates one op's local computation on the rank's stream; one tensor per output. The same
/// ops, semantics and errors as the CPU backend's `eval`: collectives and `LocalSlice`
/// return [`KernelError::NotLocal`].
pub fn eval(
    dev: &RankDevice,
    op: &Op<&CudaTensor, Dim>,
    local: &Placement,
) -> Result<Vec<CudaTensor>, KernelError> {
    let name = op.mnemonic();
    for t in op.inputs() {
        check(name, t)?;
    }
    let one = |t: CudaTensor| Ok(vec![t]);
    use elementwise::{BinOp, UnaryOp};
    match op {
        Op::Embedding { table, ids } => one(embedding::embedding(dev, name, table, ids, local)?),
        Op::MatMul {
            a,
            b,
            transpose_a,
            transpose_b,
        } => one(matmul::matmul(dev, a, b, *transpose_a, *transpose_b)?),
        Op::Add(a, b) => one(elementwise::binary(dev, name, a, b, BinOp::Add)?),
        Op::Sub(a, b) => one(elementwise::binary(dev, name, a, b, BinOp::Sub)?),
        Op::Mul(a, b) => one(elementwise::binary(dev, name, a, b, BinOp::Mul)?),
        Op::Div(a, b) => one(elementwise::binary(dev, name, a, b, BinOp::Div)?),
        Op::Scale { x, factor } => {
            let f = index::scale(factor).or_invalid(name)?;
            one(elementwise::unary(dev, name, x, UnaryOp::Scale(f))?)
        }
        Op::Gelu(x) => one(elementwise::unary(dev, name, x, UnaryOp::Gelu)?),
        Op::GeluTanh(x) => one(elementwise::unary(dev, name, x, UnaryOp::GeluTanh)?),
        Op::Silu(x) => one(elementwise::unary(dev, name, x, UnaryOp::Silu)?),
        Op::Relu(x) => one(elementwise::unary(dev, name, x, UnaryOp::Relu)?),
        Op::LayerNorm {
            x,
            weight,
            bias,
            eps,
        } => one(norm::forward(dev, name, x, *weight, *bias, *eps, true)?),
        Op::RmsNorm { x, weight, eps } => {
            one(norm::forward(dev, name, x, *weight, None, *eps, false)?)
        }
        Op::Softmax { x, causal } => one(norm::softmax(dev, name, x, *causal, None)?),
        Op::Reshape { x, shape } => one(CudaTensor {
            // The same elements: the buffer is shared, never written through.
            shape: index::reshape(&x.shape, shape).or_invalid(name)?,
            data: x.data.clone(),
        }),
        Op::Transpose { x, perm } => one(layout::transpose(dev, name, x, perm)?),
        Op::Slice {
            x,
            dim: axis,
            start,
            end,
        } => {
            let (a, start, end) = index::slice(&x.shape, *axis, start, end).or_invalid(name)?;
            one(layout::slice_axis(dev, name, x, a, start, end)?)
        }
        Op::Split {
            x,
            dim: axis,
            sizes,
        } => {
            let (a, parts) = index::split(&x.shape, *axis, sizes).or_invalid(name)?;
            parts
                .into_iter()
                .map(|p| layout::slice_axis(dev, name, x, a, p.start, p.end))
                .collect()
        }
        Op::Concat { xs, dim: axis } => one(layout::concat(dev, name, xs, *axis)?),
        Op::Rotary {
            x,
            base,
            inverse,
            scaling,
        } => one(embedding::rotary(
            dev,
            name,
            x,
            (*base, scaling.as_ref()),
            *inverse,
            local,
        )?),
        Op::Dropout { x, p } => one(elementwise::dropout(dev, name, x, *p, local)?),
        Op::DropoutGrad { dy, forward, p } => {
            index::same_shape("the gradient", &forward.shape, &dy.shape).or_invalid(name)?;
            one(elementwise::dropout(dev, name, dy, *p, local)?)
        }
        Op::CrossEntropy {
            logits,
            targets,
            shift,
            classes,
        } => {
            let shard = cross_entropy::whole(name, logits, classes.as_ref(), *shift, local)?;
            one(cross_entropy::loss_op(dev, name, logits, targets, &shard)?)
        }
        Op::CrossEntropyGrad {
            logits,
            targets,
            dloss,
            shift,
            classes,
        } => {
            let shard = cross_entropy::whole(name, logits, classes.as_ref(), *shift, local)?;
            one(cross_entropy::grad_op(
                dev,
                name,
                (logits, targets, dloss),
                &shard,
            )?)
        }
        Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::F { .. }
        | Op::G { .. }
        | Op::LocalSlice { .. } => Err(KernelError::NotLocal { op: name }),
        Op::SumTo { x, shape } => {
            let shape = index::dims(shape).or_invalid(name)?;
            one(layout::sum_to(dev, name, x, &shape)?)
        }
        Op::Expand { x, shape } => {
            let shape = index::dims(shape).or_invalid(name)?;
            one(layout::expand(dev, name, x, &shape)?)
        }
        Op::Fill {
            shape,
            value,
            dtype,
        } => {
            let v = *value as f32;
            index::fill(*value, *dtype, v.is_finite()).or_invalid(name)?;
            let shape = index::dims(shape).or_invalid(name)?;
            one(elementwise::fill(dev, name, shape, v)?)
        }
        Op::Pad {
            x,
            dim: axis,
            before,
            after,
        } => {
            let (a, before, after) = index::pad(&x.shape, *axis, before, after).or_invalid(name)?;
            one(layout::pad(dev, name, x, a, before, after)?)
        }
        Op::ActGrad { act, x, dy } => {
            index::same_shape("the gradient", &x.shape, &dy.shape).or_invalid(name)?;
            one(elementwise::act_grad(dev, name, x, dy, act_code(*act))?)
        }
        Op::LayerNormGrad { x, weight, dy, eps } => {
            norm::grad(dev, name, x, *weight, dy, *eps, true)
        }
        Op::RmsNormGrad { x, weight, dy, eps } => {
            norm::grad(dev, name, x, *weight, dy, *eps, false)
        }
        Op::SoftmaxGrad { y, dy } => one(norm::softmax_grad(dev, name, y, dy, None)?),
        Op::EmbeddingGrad { table, ids, dy } => {
            one(embedding::embedding_grad(dev, name, table, ids, dy, local)?)
        }
    }
}

/// An activation as the kernels number it (the order of the IR's `Activation`).
fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Gelu => 0,
        Activation::GeluTanh => 1,
        Activation::Silu => 2,
        Activation::Relu => 3,
    }
}

/// Evaluates a fused op (see [`ferrotron_exec::fuse`]) on the rank's stream, in one kernel: the
/// same semantics and errors as the CPU backend's `eval_fused`. In `f32` storage the result is
/// bit-identical to [`eval`] running the two ops (the intermediate is the `f32` value the first
/// kernel would store); in bf16 storage the intermediate (`x + bias`, `x · factor`, the unscaled
/// gradient) is not rounded to bf16. Fused ops do not depend on the shard's place, so `_local`
/// is unused.
pub fn eval_fused(dev: &RankDevice, op: &Fused<&CudaTensor>) -> Result<CudaTensor, KernelError> {
    let name = op.mnemonic();
    for t in op.inputs() {
        check(name, t)?;
    }
    match op {
        Fused::BiasAct { act, x, bias } => {
            check_bias(name, &x.shape, &bias.shape)?;
            elementwise::bias_act(dev, name, x, bias, act_code(*act))
        }
        Fused::BiasActGrad { act, x, bias, dy } => {
            check_bias(name, &x.shape, &bias.shape)?;
            index::same_shape("the gradient", &x.shape, &dy.shape).or_invalid(name)?;
            elementwise::bias_act_grad(dev, name, x, bias, dy, act_code(*act))
        }
        Fused::ScaledSoftmax { x, factor, causal } => {
            norm::softmax(dev, name, x, *causal, Some(*factor))
        }
        Fused::ScaledSoftmaxGrad { y, dy, factor } => {
            norm::softmax_grad(dev, name, y, dy, Some(*factor))
        }
        // Its table's rows are this rank's by a placement: `Backend::embedding_grad_add` (the
        // trait's, which computes the gradient and adds it).
        Fused::EmbeddingGradAdd { .. } => Err(invalid(
            name,
            "runs through Backend::embedding_grad_add, which places the table",
        )),
        // Two or three outputs and a placed dropout mask: `Backend::attention(_grad)`.
        Fused::Attention { .. } | Fused::AttentionGrad { .. } => Err(invalid(
            name,
            "runs through Backend::attention and Backend::attention_grad",
        )),
        // A loop over chunks of rows with the group's reductions between: the executor's.
        Fused::OutputLoss { .. } => Err(invalid(name, "runs as the executor's loop of chunks")),
        // Its dropout's mask is placed: `Backend::bias_dropout_add`.
        Fused::BiasDropoutAdd { .. } => Err(invalid(
            name,
            "runs through Backend::bias_dropout_add, which places the mask",
        )),
    }
}
