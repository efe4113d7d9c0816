//! The CPU backend: `f32` kernels for every op of the IR, forward and backward, and the
//! reference every other backend is held to.
//!
//! ```text
//! rank program (ferrotron-exec) ─► Cpu: Backend
//!     eval ─► kernels::eval (a Placement: where the rank's shards sit in the full tensors)
//!     vocabulary-parallel cross-entropy ─► kernels::ce_row_max, ce_row_sums, ce_grad
//!   ─► CpuComm: Comm ─► a HostCollectives: ThreadGroup (ranks as threads) or, under
//!     `ferrotron launch`, the launcher's TcpGroup (ranks as processes)
//! ```
//!
//! Every kernel agrees with the reference evaluator ([`ferrotron_ir::reference`], `f64`) to
//! ~1e-6 relative (`tests/kernels.rs` checks each op). Matmuls run through the `gemm` crate
//! (`benches/matmul.rs` races it against OpenBLAS).
#![warn(missing_docs)]

mod attention;
pub mod kernels;
pub(crate) mod layout;
pub(crate) mod math;
mod matmul;
mod par;

use ferrotron_exec::backend::{AdamW, Backend};
use ferrotron_exec::comm::{Comm, CommError, HostCollectives, ReduceOp};
use ferrotron_exec::fuse::Fused;
use ferrotron_exec::kernel::{
    ce_loss, invalid, AttentionSaved, AttentionSpec, CeStats, KernelError, Placement, RowStats,
    VocabShard,
};
use ferrotron_exec::{Tensor, ThreadGroup};
use ferrotron_ir::{DType, Dim, Op};
use ferrotron_partitioner::Region;
use std::sync::Arc;
use std::time::Duration;

/// The CPU backend: host tensors and the `f32` kernels.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    /// Threads each rank's kernels may use (matmuls through `gemm`'s rayon pool, large
    /// elementwise and row-wise ops split into that many chunks on the same pool).
    pub threads: usize,
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu { threads: 1 }
    }
}

impl Cpu {
    /// The CPU backend with `threads` threads per rank (at least 1).
    pub fn with_threads(threads: usize) -> Cpu {
        Cpu {
            threads: threads.max(1),
        }
    }
}

/// A CPU rank's membership of a group: host collectives (threads of this process, or processes
/// over TCP) and its index there.
#[derive(Clone, Debug)]
pub struct CpuComm {
    group: Arc<dyn HostCollectives>,
    index: usize,
}

impl CpuComm {
    /// Member `index` of `group`.
    pub fn new(group: Arc<dyn HostCollectives>, index: usize) -> CpuComm {
        CpuComm { group, index }
    }
}

impl Comm<Cpu> for CpuComm {
    fn in_process(members: &[Cpu], timeout: Duration) -> Vec<CpuComm> {
        let group: Arc<dyn HostCollectives> = ThreadGroup::new(members.len().max(1), timeout);
        (0..members.len())
            .map(|index| CpuComm::new(group.clone(), index))
            .collect()
    }

    fn size(&self) -> usize {
        self.group.size()
    }

    fn index(&self) -> usize {
        self.index
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        self.group.all_reduce(self.index, &mut t.data, op)
    }

    fn all_reduce_host(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.group.all_reduce(self.index, buf, op)
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor, CommError> {
        let members = self.group.size();
        let n = t.numel();
        let mut flat = vec![0.0f32; n * members];
        self.group.all_gather(self.index, &t.data, &mut flat)?;
        // Member m's tensor is part m of the result along `dim`.
        let mut shape = t.shape.clone();
        shape[dim] *= members;
        let mut out = Tensor::zeros(shape);
        for (m, part) in flat.chunks_exact(n.max(1)).enumerate().take(members) {
            Region::part(&out.shape, dim, members, m).place(part, &mut out.data, &out.shape);
        }
        Ok(out)
    }

    fn reduce_scatter(&self, t: &Tensor, dim: usize) -> Result<Tensor, CommError> {
        let members = self.group.size();
        // Laid out part after part along `dim`: the chunks the group reduces and hands out.
        let mut chunks = Vec::with_capacity(t.numel());
        for m in 0..members {
            chunks.extend(Region::part(&t.shape, dim, members, m).extract(&t.data, &t.shape));
        }
        let mut shape = t.shape.clone();
        shape[dim] /= members;
        let mut out = Tensor::zeros(shape);
        self.group
            .reduce_scatter(self.index, &chunks, &mut out.data)?;
        Ok(out)
    }

    fn abort(&self, why: &str) {
        self.group.abort(self.index, why)
    }
}

impl Backend for Cpu {
    type Tensor = Tensor;
    type Comm = CpuComm;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, t: &Tensor, _dtype: DType) -> Result<Tensor, KernelError> {
        Ok(Tensor {
            shape: t.shape.clone(),
            data: layout::copied(&t.data),
        })
    }

    fn uses_arena(&self) -> bool {
        true
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

    fn eval(&self, op: &Op<&Tensor, Dim>, at: &Placement) -> Result<Vec<Tensor>, KernelError> {
        kernels::eval(op, at, self.threads)
    }

    fn eval_fused(&self, op: &Fused<&Tensor>) -> Result<Tensor, KernelError> {
        kernels::eval_fused(op, self.threads)
    }

    fn add_into(&self, acc: Tensor, x: &Tensor) -> Result<Tensor, KernelError> {
        kernels::add_into(acc, x, self.threads)
    }

    fn bias_dropout_add(
        &self,
        operands: (&Tensor, &Tensor, &Tensor),
        p: f64,
        at: &Placement,
    ) -> Result<Tensor, KernelError> {
        kernels::bias_dropout_add(operands, p, at, self.threads)
    }

    fn matmul_acc(
        &self,
        mut acc: Tensor,
        operands: (&Tensor, &Tensor),
        transposed: (bool, bool),
    ) -> Result<Tensor, KernelError> {
        matmul::matmul_acc(&mut acc, operands, transposed, self.threads)?;
        Ok(acc)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        spec: &AttentionSpec,
        at: &Placement,
    ) -> Result<(Tensor, Tensor), KernelError> {
        attention::forward(q, k, v, spec, at, self.threads)
    }

    fn attention_grad(
        &self,
        saved: AttentionSaved<&Tensor>,
        spec: &AttentionSpec,
        at: &Placement,
    ) -> Result<[Tensor; 3], KernelError> {
        let (dq, dk, dv) = attention::backward(saved, spec, at, self.threads)?;
        Ok([dq, dk, dv])
    }

    fn embedding_grad_add(
        &self,
        acc: Tensor,
        inputs: (&Tensor, &Tensor, &Tensor),
        at: &Placement,
    ) -> Result<Tensor, KernelError> {
        kernels::embedding_grad_add(acc, inputs, at, self.threads)
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
        if dim >= t.rank() || parts == 0 || index >= parts {
            return Err(invalid(
                "LocalSlice",
                format!("part {index} of {parts} along {dim} of {:?}", t.shape),
            ));
        }
        Ok(t.take(&Region::part(&t.shape, dim, parts, index)))
    }

    fn ce_row_max(&self, logits: &Tensor, shard: &VocabShard) -> Result<Tensor, KernelError> {
        Ok(rows_tensor(kernels::ce_row_max(
            logits,
            shard,
            self.threads,
        )?))
    }

    fn ce_row_sums(
        &self,
        logits: &Tensor,
        max: &Tensor,
        targets: &Tensor,
        shard: &VocabShard,
    ) -> Result<Tensor, KernelError> {
        let (mut sums, target) =
            kernels::ce_row_sums(logits, &max.data, targets, shard, self.threads)?;
        let rows = sums.len();
        sums.extend_from_slice(&target);
        Ok(Tensor {
            shape: vec![2, rows],
            data: sums.into(),
        })
    }

    fn ce_loss(
        &self,
        stats: &CeStats<Tensor>,
        logits_shape: &[usize],
        shard: &VocabShard,
    ) -> Result<Tensor, KernelError> {
        let stats = RowStats::of(&stats.max.data, &stats.sums.data);
        let loss = ce_loss(&stats, logits_shape, shard)?;
        Ok(Tensor::full(Vec::new(), loss))
    }

    fn ce_grad(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        stats: &CeStats<Tensor>,
        shard: &VocabShard,
        dloss: &Tensor,
    ) -> Result<Tensor, KernelError> {
        let dloss = self.read_scalar(dloss)?;
        let stats = RowStats::of(&stats.max.data, &stats.sums.data);
        kernels::ce_grad(logits, targets, &stats, shard, dloss, self.threads)
    }

    fn ce_grad_in_place(
        &self,
        logits: Tensor,
        targets: &Tensor,
        stats: &CeStats<Tensor>,
        shard: &VocabShard,
        dloss: &Tensor,
    ) -> Result<Tensor, KernelError> {
        let dloss = self.read_scalar(dloss)?;
        let stats = RowStats::of(&stats.max.data, &stats.sums.data);
        kernels::ce_grad_in_place(logits, targets, &stats, shard, dloss, self.threads)
    }

    fn sum_squares(&self, t: &Tensor) -> Result<f64, KernelError> {
        Ok(par::sum_squares(self.threads, &t.data))
    }

    fn adamw(
        &self,
        w: &mut Tensor,
        g: &Tensor,
        (m, v): (&mut Tensor, &mut Tensor),
        update: AdamW,
    ) -> Result<(), KernelError> {
        let n = w.data.len();
        if g.data.len() != n || m.data.len() != n || v.data.len() != n {
            return Err(invalid(
                "AdamW",
                format!(
                    "the weight has {n} elements, the gradient {}, the moments {} and {}",
                    g.data.len(),
                    m.data.len(),
                    v.data.len()
                ),
            ));
        }
        par::adamw(
            self.threads,
            (&mut w.data, &g.data),
            (&mut m.data, &mut v.data),
            update,
        );
        Ok(())
    }
}

/// Per-row statistics as a `[rows]` tensor.
fn rows_tensor(v: Vec<f32>) -> Tensor {
    Tensor {
        shape: vec![v.len()],
        data: v.into(),
    }
}

/// Hands the memory freed so far back to the system (glibc keeps it for reuse, as
/// [`tune_allocator`] asks): for a program that has finished setting up (the full weights
/// sharded and dropped) and from then on holds its steps' values in the ranks' arenas, which
/// would never reuse it.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tunes glibc's allocator for this process's pattern: the rank program frees every activation
/// at its last use and allocates the same sizes again in the next step. By default glibc serves
/// large blocks with fresh `mmap`s and returns freed heap memory to the system, so every step
/// page-faults its activations in again (a third of a training step's CPU time in system
/// calls). Up to 32 MiB now comes from the heap, and freed memory is kept for reuse
/// (BENCHMARKS.md has the effect). Call once at start-up, before the work; a library should
/// leave the choice to its program, so only the CLI calls it.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc malloc parameters; any value is valid to pass, and a
    // refused one leaves the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
