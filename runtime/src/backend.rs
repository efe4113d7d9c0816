//! The backend abstraction: what the executor needs from a device. Kernels for every op's
//! local computation, the vocabulary-parallel cross-entropy's per-row statistics, moving tensors
//! to and from the host, and the collectives over a group of ranks, all on the device's own
//! tensor type. The executor ([`crate::exec`]) is generic over it: [`Cpu`] is the reference
//! implementation (host `f32` tensors, [`crate::cpu::kernels`], the in-process [`Group`]); the
//! CUDA backend (issue 5) implements the same trait over device memory and NCCL.

use crate::comm::{CommError, Group, ReduceOp};
use crate::cpu::kernels::{self, KernelError, Local};
use crate::exec::{deinterleave, interleave, slice};
use crate::fuse::Fused;
use crate::launch::TcpGroup;
use crate::Tensor;
use ferrotron_ir::{DType, Dim, Op};
use std::sync::Arc;
use std::time::Duration;

/// A device the executor runs a plan's ranks on.
#[allow(clippy::too_many_arguments)] // the cross-entropy statistics take what the op takes
pub trait Backend: Clone + Send + Sync {
    /// A tensor held on the device.
    type Tensor: Clone + Send + Sync;
    /// A group of ranks that communicate (a tensor- or data-parallel group).
    type Group: Send + Sync;

    /// The backend's name (`cpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// The backend that rank `rank` (`t + tp · d`) computes with: the CUDA backend gives each
    /// virtual rank its own stream; the CPU backend is the same for every rank. Tensors a rank
    /// uses should be uploaded through its own backend.
    fn on_rank(&self, rank: usize) -> Self {
        let _ = rank;
        self.clone()
    }
    /// Copies a host tensor to the device. `dtype` is the IR's type of the value: integer ids
    /// must stay exact whatever the backend's storage type (the CUDA backend keeps them `f32`
    /// in bf16 mode).
    fn upload(&self, t: &Tensor, dtype: DType) -> Result<Self::Tensor, KernelError>;
    /// Copies a device tensor to the host.
    fn download(&self, t: &Self::Tensor) -> Result<Tensor, KernelError>;
    /// Waits until the device has finished the work queued so far (for timing; the CPU computes
    /// synchronously).
    fn synchronize(&self) -> Result<(), KernelError> {
        Ok(())
    }
    /// A tensor's shape.
    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize];
    /// The bytes a tensor occupies.
    fn bytes(&self, t: &Self::Tensor) -> usize;
    /// The first NaN or infinity in a tensor, if any (`None` also when the check itself fails on
    /// the device: the next device call reports that failure).
    fn first_non_finite(&self, t: &Self::Tensor) -> Option<f32>;
    /// A scalar tensor.
    fn scalar(&self, value: f32) -> Result<Self::Tensor, KernelError>;
    /// A scalar tensor's value.
    fn read_scalar(&self, t: &Self::Tensor) -> Result<f32, KernelError>;

    /// One op's local computation (no communication).
    fn eval(
        &self,
        op: &Op<&Self::Tensor, Dim>,
        local: &Local,
    ) -> Result<Vec<Self::Tensor>, KernelError>;
    /// A fused op's computation (see [`crate::fuse`]): what the two ops it replaces compute.
    fn eval_fused(
        &self,
        op: &Fused<&Self::Tensor>,
        local: &Local,
    ) -> Result<Self::Tensor, KernelError>;
    /// The same elements under a new shape (the element count unchanged).
    fn reshape(&self, t: Self::Tensor, shape: Vec<usize>) -> Self::Tensor;
    /// Part `index` of `parts` equal contiguous parts along `dim`.
    fn local_slice(
        &self,
        t: &Self::Tensor,
        dim: usize,
        index: usize,
        parts: usize,
    ) -> Result<Self::Tensor, KernelError>;

    /// See [`kernels::ce_row_max`].
    fn ce_row_max(
        &self,
        logits: &Self::Tensor,
        class_offset: usize,
        real_classes: usize,
        threads: usize,
    ) -> Result<Vec<f32>, KernelError>;
    /// See [`kernels::ce_row_sums`].
    fn ce_row_sums(
        &self,
        logits: &Self::Tensor,
        max: &[f32],
        targets: &Self::Tensor,
        shift: bool,
        class_offset: usize,
        real_classes: usize,
        threads: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), KernelError>;
    /// See [`kernels::ce_grad`].
    fn ce_grad(
        &self,
        logits: &Self::Tensor,
        max: &[f32],
        sum: &[f32],
        targets: &Self::Tensor,
        shift: bool,
        class_offset: usize,
        real_classes: usize,
        dloss: f32,
        token_parts: usize,
        threads: usize,
    ) -> Result<Self::Tensor, KernelError>;

    /// `Σ x²` over a tensor, accumulated in `f64` (the global gradient norm).
    fn sum_squares(&self, t: &Self::Tensor) -> Result<f64, KernelError>;
    /// Copies full-precision weights to the device as the optimizer's master weights (`f32`
    /// whatever the backend computes in).
    fn upload_master(&self, t: &Tensor) -> Result<Self::Tensor, KernelError> {
        self.upload(t, DType::F32)
    }
    /// The weights a step computes with, made from the master weights: the same tensor when
    /// the backend computes in `f32`, a bf16 copy under mixed precision.
    fn compute_weights(&self, master: &Self::Tensor) -> Result<Self::Tensor, KernelError> {
        Ok(master.clone())
    }
    /// One AdamW step on master weights `w` with gradient `g` (multiplied by `grad_scale`, the
    /// clipping factor, in `f64`) and moments `m`, `v` (`f32`, shaped like `w`), in place.
    /// `step` counts from 1; the arithmetic is [`adamw_cpu`]'s, in `f64`.
    #[allow(clippy::too_many_arguments)] // the tensors, the settings, the step and the scale
    fn adamw(
        &self,
        w: &mut Self::Tensor,
        g: &Self::Tensor,
        m: &mut Self::Tensor,
        v: &mut Self::Tensor,
        hyper: AdamW,
        step: u32,
        grad_scale: f64,
    ) -> Result<(), KernelError>;

    /// A group of `size` ranks; every wait is bounded by `timeout`.
    fn group(&self, size: usize, timeout: Duration) -> Arc<Self::Group>;
    /// The number of ranks in a group.
    fn group_size(&self, g: &Self::Group) -> usize;
    /// Reduces a device tensor over the group, in place.
    fn all_reduce(
        &self,
        g: &Self::Group,
        rank: usize,
        t: &mut Self::Tensor,
        op: ReduceOp,
    ) -> Result<(), CommError>;
    /// Reduces a host buffer (per-row statistics) over the group, in place.
    fn all_reduce_host(
        &self,
        g: &Self::Group,
        rank: usize,
        buf: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError>;
    /// The group's tensors joined along `dim`, in rank order.
    fn all_gather(
        &self,
        g: &Self::Group,
        rank: usize,
        t: &Self::Tensor,
        dim: usize,
    ) -> Result<Self::Tensor, CommError>;
    /// The group's tensors summed, this rank keeping its part along `dim`.
    fn reduce_scatter(
        &self,
        g: &Self::Group,
        rank: usize,
        t: &Self::Tensor,
        dim: usize,
    ) -> Result<Self::Tensor, CommError>;
    /// Fails the group: every member's pending and later collectives return an error.
    fn abort(&self, g: &Self::Group, rank: usize, why: &str);
}

/// AdamW's settings for one update of one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// The learning rate of this step.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (0 for biases and norm weights).
    pub weight_decay: f64,
}

/// The AdamW update on host `f32` tensors, in `f64`: the CPU backend's, and the reference the
/// CUDA kernel reproduces bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn adamw_cpu(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hyper: AdamW,
    step: u32,
    grad_scale: f64,
) {
    let AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
    } = hyper;
    let t = step as i32;
    let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
    for k in 0..w.len() {
        let gk = f64::from(g[k]) * grad_scale;
        let mk = beta1 * f64::from(m[k]) + (1.0 - beta1) * gk;
        let vk = beta2 * f64::from(v[k]) + (1.0 - beta2) * gk * gk;
        m[k] = mk as f32;
        v[k] = vk as f32;
        let update = (mk / bc1) / ((vk / bc2).sqrt() + eps);
        let wk = f64::from(w[k]);
        w[k] = (wk - lr * (update + weight_decay * wk)) as f32;
    }
}

/// The CPU backend: host tensors, the `f32` kernels, ranks as threads of one process (or, under
/// `ferrotron launch`, one rank per process, communicating over TCP).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// A communicator group of the CPU backend.
#[derive(Debug)]
pub enum CpuGroup {
    /// Ranks that are threads of this process.
    Threads(Arc<Group>),
    /// Ranks that are processes, connected by TCP (`ferrotron launch`).
    Tcp(TcpGroup),
}

impl CpuGroup {
    fn all_reduce(&self, rank: usize, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        match self {
            CpuGroup::Threads(g) => g.all_reduce(rank, buf, op),
            CpuGroup::Tcp(g) => g.all_reduce(rank, buf, op),
        }
    }

    fn all_gather(&self, rank: usize, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        match self {
            CpuGroup::Threads(g) => g.all_gather(rank, local, out),
            CpuGroup::Tcp(g) => g.all_gather(rank, local, out),
        }
    }

    fn reduce_scatter(
        &self,
        rank: usize,
        chunks: &[f32],
        out: &mut [f32],
    ) -> Result<(), CommError> {
        match self {
            CpuGroup::Threads(g) => g.reduce_scatter(rank, chunks, out),
            CpuGroup::Tcp(g) => g.reduce_scatter(rank, chunks, out),
        }
    }

    /// The number of members.
    pub fn size(&self) -> usize {
        match self {
            CpuGroup::Threads(g) => g.size(),
            CpuGroup::Tcp(g) => g.size(),
        }
    }

    fn abort(&self, rank: usize, why: &str) {
        match self {
            CpuGroup::Threads(g) => g.abort(rank, why),
            CpuGroup::Tcp(g) => g.abort(rank, why),
        }
    }
}

impl Backend for Cpu {
    type Tensor = Tensor;
    type Group = CpuGroup;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, t: &Tensor, _dtype: DType) -> Result<Tensor, KernelError> {
        Ok(t.clone())
    }

    fn download(&self, t: &Tensor) -> Result<Tensor, KernelError> {
        Ok(t.clone())
    }

    fn shape<'t>(&self, t: &'t Tensor) -> &'t [usize] {
        &t.shape
    }

    fn bytes(&self, t: &Tensor) -> usize {
        t.bytes()
    }

    fn first_non_finite(&self, t: &Tensor) -> Option<f32> {
        t.data.iter().copied().find(|v| !v.is_finite())
    }

    fn scalar(&self, value: f32) -> Result<Tensor, KernelError> {
        Ok(Tensor::full(Vec::new(), value))
    }

    fn read_scalar(&self, t: &Tensor) -> Result<f32, KernelError> {
        Ok(t.data.first().copied().unwrap_or(0.0))
    }

    fn eval(&self, op: &Op<&Tensor, Dim>, local: &Local) -> Result<Vec<Tensor>, KernelError> {
        kernels::eval(op, local)
    }

    fn eval_fused(&self, op: &Fused<&Tensor>, local: &Local) -> Result<Tensor, KernelError> {
        kernels::eval_fused(op, local)
    }

    fn reshape(&self, mut t: Tensor, shape: Vec<usize>) -> Tensor {
        t.shape = shape;
        t
    }

    fn local_slice(
        &self,
        t: &Tensor,
        dim: usize,
        index: usize,
        parts: usize,
    ) -> Result<Tensor, KernelError> {
        let part = t.shape[dim] / parts.max(1);
        Ok(slice(t, dim, index * part, (index + 1) * part))
    }

    fn ce_row_max(
        &self,
        logits: &Tensor,
        class_offset: usize,
        real_classes: usize,
        threads: usize,
    ) -> Result<Vec<f32>, KernelError> {
        kernels::ce_row_max_threads(logits, class_offset, real_classes, threads)
    }

    fn ce_row_sums(
        &self,
        logits: &Tensor,
        max: &[f32],
        targets: &Tensor,
        shift: bool,
        class_offset: usize,
        real_classes: usize,
        threads: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
        kernels::ce_row_sums_threads(
            logits,
            max,
            targets,
            shift,
            class_offset,
            real_classes,
            threads,
        )
    }

    fn ce_grad(
        &self,
        logits: &Tensor,
        max: &[f32],
        sum: &[f32],
        targets: &Tensor,
        shift: bool,
        class_offset: usize,
        real_classes: usize,
        dloss: f32,
        token_parts: usize,
        threads: usize,
    ) -> Result<Tensor, KernelError> {
        kernels::ce_grad_threads(
            logits,
            max,
            sum,
            targets,
            shift,
            class_offset,
            real_classes,
            dloss,
            token_parts,
            threads,
        )
    }

    fn sum_squares(&self, t: &Tensor) -> Result<f64, KernelError> {
        Ok(t.data.iter().map(|&x| f64::from(x) * f64::from(x)).sum())
    }

    fn adamw(
        &self,
        w: &mut Tensor,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        hyper: AdamW,
        step: u32,
        grad_scale: f64,
    ) -> Result<(), KernelError> {
        let n = w.data.len();
        if g.data.len() != n || m.data.len() != n || v.data.len() != n {
            return Err(kernels::invalid(
                "AdamW",
                format!(
                    "the weight has {n} elements, the gradient {}, the moments {} and {}",
                    g.data.len(),
                    m.data.len(),
                    v.data.len()
                ),
            ));
        }
        adamw_cpu(
            &mut w.data,
            &g.data,
            &mut m.data,
            &mut v.data,
            hyper,
            step,
            grad_scale,
        );
        Ok(())
    }

    fn group(&self, size: usize, timeout: Duration) -> Arc<CpuGroup> {
        Arc::new(CpuGroup::Threads(Group::new(size, timeout)))
    }

    fn group_size(&self, g: &CpuGroup) -> usize {
        g.size()
    }

    fn all_reduce(
        &self,
        g: &CpuGroup,
        rank: usize,
        t: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        g.all_reduce(rank, &mut t.data, op)
    }

    fn all_reduce_host(
        &self,
        g: &CpuGroup,
        rank: usize,
        buf: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        g.all_reduce(rank, buf, op)
    }

    fn all_gather(
        &self,
        g: &CpuGroup,
        rank: usize,
        t: &Tensor,
        dim: usize,
    ) -> Result<Tensor, CommError> {
        let members = g.size();
        let mut flat = vec![0.0f32; t.numel() * members];
        g.all_gather(rank, &t.data, &mut flat)?;
        Ok(interleave(&flat, &t.shape, dim, members))
    }

    fn reduce_scatter(
        &self,
        g: &CpuGroup,
        rank: usize,
        t: &Tensor,
        dim: usize,
    ) -> Result<Tensor, CommError> {
        let members = g.size();
        let chunks = deinterleave(t, dim, members);
        let mut shape = t.shape.clone();
        shape[dim] /= members;
        let mut out = Tensor::zeros(shape);
        g.reduce_scatter(rank, &chunks, &mut out.data)?;
        Ok(out)
    }

    fn abort(&self, g: &CpuGroup, rank: usize, why: &str) {
        g.abort(rank, why)
    }
}
