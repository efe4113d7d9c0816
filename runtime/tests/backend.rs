//! The executor is generic over its backend: a backend that wraps the CPU one and counts what
//! the executor asks of it runs a plan to the same results, and the counts show every local op
//! went through `eval` and every collective through the backend's communication.

use ferrotron_ir::{load_model, LoadOptions, Op};
use ferrotron_partitioner::{partition, PartitionOptions};
use ferrotron_runtime::backend::{AdamW, Backend, Cpu, CpuGroup};
use ferrotron_runtime::comm::{CommError, ReduceOp};
use ferrotron_runtime::cpu::kernels::{KernelError, Local};
use ferrotron_runtime::exec::run_on;
use ferrotron_runtime::fuse::{Fused, Program};
use ferrotron_runtime::init::{init_params, random_batch};
use ferrotron_runtime::{run_sharded, shard_params, RunOptions, Tensor};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Default)]
struct Counting {
    evals: Arc<AtomicUsize>,
    fused: Arc<AtomicUsize>,
    reshapes: Arc<AtomicUsize>,
    collectives: Arc<AtomicUsize>,
}

#[allow(clippy::too_many_arguments)]
impl Backend for Counting {
    type Tensor = Tensor;
    type Group = CpuGroup;
    fn name(&self) -> &'static str {
        "counting"
    }
    fn upload(&self, t: &Tensor, dtype: ferrotron_ir::DType) -> Result<Tensor, KernelError> {
        Cpu.upload(t, dtype)
    }
    fn download(&self, t: &Tensor) -> Result<Tensor, KernelError> {
        Cpu.download(t)
    }
    fn shape<'t>(&self, t: &'t Tensor) -> &'t [usize] {
        Cpu.shape(t)
    }
    fn bytes(&self, t: &Tensor) -> usize {
        Cpu.bytes(t)
    }
    fn first_non_finite(&self, t: &Tensor) -> Option<f32> {
        Cpu.first_non_finite(t)
    }
    fn scalar(&self, value: f32) -> Result<Tensor, KernelError> {
        Cpu.scalar(value)
    }
    fn read_scalar(&self, t: &Tensor) -> Result<f32, KernelError> {
        Cpu.read_scalar(t)
    }
    fn eval(
        &self,
        op: &Op<&Tensor, ferrotron_ir::Dim>,
        local: &Local,
    ) -> Result<Vec<Tensor>, KernelError> {
        self.evals.fetch_add(1, Ordering::Relaxed);
        Cpu.eval(op, local)
    }
    fn eval_fused(&self, op: &Fused<&Tensor>, local: &Local) -> Result<Tensor, KernelError> {
        self.fused.fetch_add(1, Ordering::Relaxed);
        Cpu.eval_fused(op, local)
    }
    fn reshape(&self, t: Tensor, shape: Vec<usize>) -> Tensor {
        self.reshapes.fetch_add(1, Ordering::Relaxed);
        Cpu.reshape(t, shape)
    }
    fn local_slice(
        &self,
        t: &Tensor,
        dim: usize,
        index: usize,
        parts: usize,
    ) -> Result<Tensor, KernelError> {
        Cpu.local_slice(t, dim, index, parts)
    }
    fn ce_row_max(
        &self,
        l: &Tensor,
        o: usize,
        r: usize,
        th: usize,
    ) -> Result<Vec<f32>, KernelError> {
        Cpu.ce_row_max(l, o, r, th)
    }
    fn ce_row_sums(
        &self,
        l: &Tensor,
        m: &[f32],
        t: &Tensor,
        s: bool,
        o: usize,
        r: usize,
        th: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
        Cpu.ce_row_sums(l, m, t, s, o, r, th)
    }
    fn ce_grad(
        &self,
        l: &Tensor,
        m: &[f32],
        su: &[f32],
        t: &Tensor,
        s: bool,
        o: usize,
        r: usize,
        d: f32,
        p: usize,
        th: usize,
    ) -> Result<Tensor, KernelError> {
        Cpu.ce_grad(l, m, su, t, s, o, r, d, p, th)
    }
    fn group(&self, size: usize, timeout: Duration) -> Arc<CpuGroup> {
        Cpu.group(size, timeout)
    }
    fn group_size(&self, g: &CpuGroup) -> usize {
        Cpu.group_size(g)
    }
    fn all_reduce(
        &self,
        g: &CpuGroup,
        rank: usize,
        t: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.collectives.fetch_add(1, Ordering::Relaxed);
        Cpu.all_reduce(g, rank, t, op)
    }
    fn all_reduce_host(
        &self,
        g: &CpuGroup,
        rank: usize,
        b: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        Cpu.all_reduce_host(g, rank, b, op)
    }
    fn all_gather(
        &self,
        g: &CpuGroup,
        rank: usize,
        t: &Tensor,
        dim: usize,
    ) -> Result<Tensor, CommError> {
        self.collectives.fetch_add(1, Ordering::Relaxed);
        Cpu.all_gather(g, rank, t, dim)
    }
    fn reduce_scatter(
        &self,
        g: &CpuGroup,
        rank: usize,
        t: &Tensor,
        dim: usize,
    ) -> Result<Tensor, CommError> {
        self.collectives.fetch_add(1, Ordering::Relaxed);
        Cpu.reduce_scatter(g, rank, t, dim)
    }
    fn sum_squares(&self, t: &Tensor) -> Result<f64, KernelError> {
        Cpu.sum_squares(t)
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
        Cpu.adamw(w, g, m, v, hyper, step, grad_scale)
    }
    fn abort(&self, g: &CpuGroup, rank: usize, why: &str) {
        Cpu.abort(g, rank, why)
    }
}

#[test]
fn a_wrapping_backend_runs_the_same_plan_to_the_same_results() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tiny-gpt.ron"
    ));
    let g = load_model(&path, &LoadOptions::default()).unwrap();
    let plan = partition(
        &g,
        &PartitionOptions {
            tp: 2,
            sequence_parallel: true,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    let shards = shard_params(&plan, &init_params(&g, 4)).unwrap();
    let batch = random_batch(&g, 4);
    let opts = RunOptions::default();
    let counting = Counting::default();
    let ours = run_on(counting.clone(), &plan, &shards, &batch, &opts).unwrap();
    let cpu = run_sharded(&plan, &shards, &batch, &opts).unwrap();
    assert_eq!(
        ours.loss().unwrap().to_bits(),
        cpu.loss().unwrap().to_bits()
    );
    for (p, _) in &plan.grads {
        let name = &plan.graph.params[*p].name;
        assert_eq!(ours.grad(name).unwrap(), cpu.grad(name).unwrap(), "{name}");
    }
    // Two ranks: every node that is not communication or a vocabulary-parallel loss is one
    // `eval` per rank (or a `reshape` of its input's buffer, for a reshape at the input's last
    // use), or part of an `eval_fused` (a fused step runs its own node and, the first to absorb
    // it, a node the program drops); every all-gather, reduce-scatter, g and all-reduce one
    // collective per rank.
    let g = &plan.graph;
    let comm = |op: &Op| {
        matches!(
            op,
            Op::AllGather { .. } | Op::ReduceScatter { .. } | Op::AllReduce { .. } | Op::G { .. }
        )
    };
    let special = |op: &Op| {
        comm(op)
            || matches!(
                op,
                Op::F { .. }
                    | Op::LocalSlice { .. }
                    | Op::CrossEntropy { .. }
                    | Op::CrossEntropyGrad { .. }
            )
    };
    let local = g
        .order
        .iter()
        .filter(|&&n| !special(&g.nodes[n].op))
        .count();
    let collectives = g.order.iter().filter(|&&n| comm(&g.nodes[n].op)).count();
    let evals = counting.evals.load(Ordering::Relaxed);
    let reshapes = counting.reshapes.load(Ordering::Relaxed);
    let fused = counting.fused.load(Ordering::Relaxed);
    assert!(reshapes > 0, "reshapes reuse buffers");
    // Per layer and rank: bias + GeLU forward and backward, scale + softmax forward and backward.
    assert_eq!(fused, 2 * 4 * 2, "fused steps");
    let dropped = g.order.len() - Program::fused(&plan, &|_| false).steps.len();
    assert_eq!(
        dropped,
        2 * 3,
        "per layer: the bias add, the scale, the softmax gradient"
    );
    assert_eq!(evals + reshapes + fused + 2 * dropped, 2 * local);
    assert_eq!(
        counting.collectives.load(Ordering::Relaxed),
        2 * collectives
    );
}
