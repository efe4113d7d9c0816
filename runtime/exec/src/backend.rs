//! The backend abstraction: what the rank program needs from a device to compute. Kernels for
//! every op's local computation, the vocabulary-parallel cross-entropy's per-row statistics,
//! moving tensors to and from the host and the optimizer step, all on the device's own tensor
//! type. Communication is apart ([`crate::comm::Comm`], the backend's [`Backend::Comm`]).
//!
//! The executor core implements no backend: `ferrotron-cpu` (host `f32` tensors, the
//! reference) and `ferrotron-cuda` (NVRTC kernels, cuBLAS, NCCL) do, each in its own crate.

use crate::arena::Arena;
use crate::comm::Comm;
use crate::fuse::Fused;
use crate::kernel::{AttentionSaved, AttentionSpec, CeStats, KernelError, Placement, VocabShard};
use crate::Tensor;
use ferrotron_ir::{DType, Dim, Op};
use std::sync::Arc;

/// A device the rank program computes on.
pub trait Backend: Clone + Send + Sync {
    /// A tensor held on the device.
    type Tensor: Clone + Send + Sync + 'static;
    /// A rank's membership of a group of ranks on this backend.
    type Comm: Comm<Self>;

    /// The backend's name (`cpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// The backend that rank `rank` of the job computes with: the CUDA backend gives each
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
    /// Whether its kernels make their outputs at the places offered to them
    /// ([`crate::arena::placed`] on the host, [`crate::arena::lease`] on a device): the rank
    /// program then places the step's values in one arena per rank ([`Backend::new_arena`]) at
    /// the memory plan's offsets ([`crate::arena::Placements`]).
    fn uses_arena(&self) -> bool {
        false
    }
    /// A rank's arena of `bytes`, allocated once and kept across steps
    /// ([`Backend::uses_arena`]): host memory by default, a device allocation on a device.
    fn new_arena(&self, bytes: u64) -> Result<Arc<Arena>, KernelError> {
        Arena::new(bytes).ok_or_else(|| KernelError::Device {
            op: "arena",
            msg: format!("could not allocate {bytes} bytes of host memory"),
        })
    }
    /// Whether a clone of a tensor shares its buffer (costs no memory), so that a reshape or an
    /// f of a value still read later is a view of it, not a copy: the rank program offers such
    /// a step no place in its arena. The memory plan counts the view's bytes as a copy's.
    fn shares_on_clone(&self) -> bool {
        false
    }
    /// A tensor's shape.
    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize];
    /// The bytes a tensor occupies.
    fn bytes(&self, t: &Self::Tensor) -> usize;
    /// The bytes one element of a value of IR type `dtype` occupies as this backend stores it
    /// (the memory plan's sizes: [`crate::memory`]). `f32` storage by default.
    fn element_bytes(&self, dtype: DType) -> u64 {
        let _ = dtype;
        4
    }
    /// The first NaN or infinity in a tensor, if any (`None` also when the check itself fails on
    /// the device: the next device call reports that failure).
    fn first_non_finite(&self, t: &Self::Tensor) -> Option<f32>;
    /// A scalar tensor.
    fn scalar(&self, value: f32) -> Result<Self::Tensor, KernelError>;
    /// A scalar tensor's value.
    fn read_scalar(&self, t: &Self::Tensor) -> Result<f32, KernelError>;

    /// One op's local computation (no communication); `at` places the rank's tensors in the
    /// full ones for the ops whose result depends on it.
    fn eval(
        &self,
        op: &Op<&Self::Tensor, Dim>,
        at: &Placement,
    ) -> Result<Vec<Self::Tensor>, KernelError>;
    /// A fused op's computation (see [`crate::fuse`]): what the two ops it replaces compute.
    fn eval_fused(&self, op: &Fused<&Self::Tensor>) -> Result<Self::Tensor, KernelError>;
    /// Fused scaled dot-product attention ([`Fused::Attention`]): `softmax(factor · q·kᵀ)`
    /// (causal and with dropout as `spec` says) times `v`, computed a tile of keys at a time with
    /// an online softmax: the `[..., queries, keys]` scores are never held whole. Returns the
    /// output `[..., queries, dv]` and each query row's log-sum-exp of its scaled scores
    /// (`f32` `[..., queries]`), all the backward needs of the softmax. `at` places the
    /// probabilities `[..., queries, keys]` in the full tensor (their dropout mask).
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: &AttentionSpec,
        at: &Placement,
    ) -> Result<(Self::Tensor, Self::Tensor), KernelError>;
    /// The fused attention's backward ([`Fused::AttentionGrad`]): `[dq, dk, dv]`, recomputing
    /// the probabilities tile by tile from `saved.lse` (the same dropout mask as the forward's).
    fn attention_grad(
        &self,
        saved: AttentionSaved<&Self::Tensor>,
        spec: &AttentionSpec,
        at: &Placement,
    ) -> Result<[Self::Tensor; 3], KernelError>;
    /// `residual + dropout(x + bias)` ([`Fused::BiasDropoutAdd`]): the dropout's mask that of
    /// the unfused `Dropout` of `x + bias` placed by `at`, the same values as the three ops to
    /// the bit. By default the three ops, one after the other.
    fn bias_dropout_add(
        &self,
        (x, bias, residual): (&Self::Tensor, &Self::Tensor, &Self::Tensor),
        p: f64,
        at: &Placement,
    ) -> Result<Self::Tensor, KernelError> {
        let one = |op: Op<&Self::Tensor, ferrotron_ir::Dim>, at: &Placement| {
            Ok::<_, KernelError>(self.eval(&op, at)?.swap_remove(0))
        };
        let summed = one(Op::Add(x, bias), &Placement::default())?;
        let dropped = one(Op::Dropout { x: &summed, p }, at)?;
        one(Op::Add(residual, &dropped), &Placement::default())
    }
    /// `acc + x` (two tensors of one shape), which may be written over `acc`: the executor
    /// passes a value at its last use. The sum is [`Backend::eval`]'s `Add`, to the bit. By
    /// default a new tensor.
    fn add_into(&self, acc: Self::Tensor, x: &Self::Tensor) -> Result<Self::Tensor, KernelError> {
        Ok(self
            .eval(&Op::Add(&acc, x), &Placement::default())?
            .swap_remove(0))
    }
    /// `acc + op(a) · op(b)` for matrices (`op` transposes where `ta` / `tb` say; `acc` shaped
    /// like the product), accumulated in `acc`'s buffer where the backend can (a GEMM with
    /// β = 1): a weight's gradient summed over chunks of rows without a product of its own per
    /// chunk. By default the product, then [`Backend::add_into`].
    fn matmul_acc(
        &self,
        acc: Self::Tensor,
        (a, b): (&Self::Tensor, &Self::Tensor),
        (ta, tb): (bool, bool),
    ) -> Result<Self::Tensor, KernelError> {
        let op = Op::MatMul {
            a,
            b,
            transpose_a: ta,
            transpose_b: tb,
        };
        let product = self.eval(&op, &Placement::default())?.swap_remove(0);
        self.add_into(acc, &product)
    }
    /// The same elements under a new shape (the element count unchanged).
    fn reshape(&self, t: Self::Tensor, shape: Vec<usize>) -> Self::Tensor;
    /// Part `index` of `parts` equal contiguous parts along `dim`
    /// ([`ferrotron_partitioner::mesh::part`]).
    fn local_slice(
        &self,
        t: &Self::Tensor,
        dim: usize,
        index: usize,
        parts: usize,
    ) -> Result<Self::Tensor, KernelError>;

    /// Per row (every position of the logits' leading dimensions), the max over this rank's real
    /// classes (a row with no real local class gives −∞): an `f32` tensor `[rows]`, kept where
    /// the backend computes (the statistics never leave a GPU inside a step).
    fn ce_row_max(
        &self,
        logits: &Self::Tensor,
        shard: &VocabShard,
    ) -> Result<Self::Tensor, KernelError>;
    /// Per row, the sum over this rank's real classes of `exp(logit − max[row])`, then per row
    /// the logit of the row's target if this rank holds that class (else 0): an `f32` tensor
    /// `[2, rows]`, so that the group reduces both at once. Targets must be integers in
    /// `0..real_classes`.
    fn ce_row_sums(
        &self,
        logits: &Self::Tensor,
        max: &Self::Tensor,
        targets: &Self::Tensor,
        shard: &VocabShard,
    ) -> Result<Self::Tensor, KernelError>;
    /// The loss from the group-reduced statistics, a scalar tensor ([`crate::kernel::ce_loss`]'s
    /// arithmetic); `logits_shape`'s leading dimensions give the rows.
    fn ce_loss(
        &self,
        stats: &CeStats<Self::Tensor>,
        logits_shape: &[usize],
        shard: &VocabShard,
    ) -> Result<Self::Tensor, KernelError>;
    /// The local logits' gradient from the group-reduced statistics: `(softmax −
    /// onehot(target)) · dloss / (predicting rows × token_parts)`, zero for padded classes and
    /// rows that predict nothing; `dloss` is the loss's gradient, a scalar tensor.
    fn ce_grad(
        &self,
        logits: &Self::Tensor,
        targets: &Self::Tensor,
        stats: &CeStats<Self::Tensor>,
        shard: &VocabShard,
        dloss: &Self::Tensor,
    ) -> Result<Self::Tensor, KernelError>;
    /// [`Backend::ce_grad`] written over the logits' own buffer where the backend can (the
    /// caller reads the logits no more): a fused output layer's chunk then holds one
    /// `[rows, classes]` buffer, not two. The same values as `ce_grad`, to the bit. By default
    /// `ce_grad` into a new tensor.
    fn ce_grad_in_place(
        &self,
        logits: Self::Tensor,
        targets: &Self::Tensor,
        stats: &CeStats<Self::Tensor>,
        shard: &VocabShard,
        dloss: &Self::Tensor,
    ) -> Result<Self::Tensor, KernelError> {
        self.ce_grad(&logits, targets, stats, shard, dloss)
    }

    /// `acc +` the gradient of the embedding `table` (`EmbeddingGrad { table, ids, dy }`,
    /// placed by `at`), in `acc`'s buffer where the backend can: a tied table's two gradients
    /// summed without a `[vocab, width]` tensor of the embedding's own. The default computes
    /// that tensor and adds it.
    fn embedding_grad_add(
        &self,
        acc: Self::Tensor,
        (table, ids, dy): (&Self::Tensor, &Self::Tensor, &Self::Tensor),
        at: &Placement,
    ) -> Result<Self::Tensor, KernelError> {
        let op = ferrotron_ir::Op::EmbeddingGrad { table, ids, dy };
        let grad = self.eval(&op, at)?;
        let grad = grad
            .first()
            .ok_or_else(|| crate::kernel::invalid("EmbeddingGrad", "no output"))?;
        self.add_into(acc, grad)
    }

    /// `Σ x²` over a tensor, accumulated in `f64` (the global gradient norm).
    fn sum_squares(&self, t: &Self::Tensor) -> Result<f64, KernelError>;
    /// `Σ x²` over several tensors: each's [`Backend::sum_squares`], added in order. A backend
    /// that reads its results back from a device overrides it to wait once for all of them.
    fn sum_squares_all(&self, ts: &[&Self::Tensor]) -> Result<f64, KernelError> {
        ts.iter().map(|t| self.sum_squares(t)).sum()
    }
    /// Copies full-precision weights to the device as the optimizer's master weights (`f32`
    /// whatever the backend computes in).
    fn upload_master(&self, t: &Tensor) -> Result<Self::Tensor, KernelError> {
        self.upload(t, DType::F32)
    }
    /// The weights a step computes with, made from the master weights: `None` when the step
    /// computes with the master itself (`f32`; no copy of the weights each step), a bf16 copy
    /// under mixed precision.
    fn compute_weights(&self, _master: &Self::Tensor) -> Result<Option<Self::Tensor>, KernelError> {
        Ok(None)
    }
    /// One AdamW update of master weights `w` with gradient `g` and moments `m`, `v` (`f32`,
    /// shaped like `w`), in place; the arithmetic is [`adamw_host`]'s, in `f64`.
    fn adamw(
        &self,
        w: &mut Self::Tensor,
        g: &Self::Tensor,
        moments: (&mut Self::Tensor, &mut Self::Tensor),
        update: AdamW,
    ) -> Result<(), KernelError>;
}

/// One AdamW update of one tensor: the settings and the step.
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
    /// The step, counted from 1 (for the bias corrections).
    pub step: u32,
    /// The factor the gradient is multiplied by first (the clipping factor), in `f64`.
    pub grad_scale: f64,
}

/// The AdamW update on host `f32` tensors, in `f64`: the CPU backend's, and the reference the
/// CUDA kernel reproduces bit for bit.
#[inline]
pub fn adamw_host(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], update: AdamW) {
    let AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
        grad_scale,
    } = update;
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
