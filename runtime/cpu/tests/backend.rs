//! The rank program is generic over its backend and its communicator: a backend that wraps the
//! CPU one, with a communicator that wraps the CPU's, each counting what the rank program asks
//! of it, runs a plan to the same results, and the counts show every local op went through
//! `eval` and every collective through the communicator.

use ferrotron_cpu::{Cpu, CpuComm};
use ferrotron_exec::fuse::{Fused, Fusions, Program};
use ferrotron_exec::init::{init_params, random_batch};
use ferrotron_exec::kernel::{
    AttentionSaved, AttentionSpec, CeStats, KernelError, Placement, VocabShard,
};
use ferrotron_exec::{run_sharded, shard_params, AdamW, Backend, Comm, CommError, ReduceOp};
use ferrotron_exec::{RunOptions, Tensor};
use ferrotron_ir::{load_model, LoadOptions, Op};
use ferrotron_partitioner::{partition, PartitionOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The op pairs and the attention, not the loss.
const ATTENTION: Fusions = Fusions {
    attention: true,
    ..Fusions::PAIRS
};

#[derive(Clone, Default)]
struct Counting {
    cpu: Cpu,
    evals: Arc<AtomicUsize>,
    fused: Arc<AtomicUsize>,
    reshapes: Arc<AtomicUsize>,
    adds_in_place: Arc<AtomicUsize>,
    collectives: Arc<AtomicUsize>,
    host: Arc<AtomicUsize>,
}

/// The CPU's communicator, counting the collectives on tensors and on host buffers.
struct CountingComm {
    cpu: CpuComm,
    collectives: Arc<AtomicUsize>,
    host: Arc<AtomicUsize>,
}

impl Comm<Counting> for CountingComm {
    fn in_process(members: &[Counting], timeout: Duration) -> Vec<CountingComm> {
        let cpus: Vec<Cpu> = members.iter().map(|m| m.cpu).collect();
        CpuComm::in_process(&cpus, timeout)
            .into_iter()
            .zip(members)
            .map(|(cpu, m)| CountingComm {
                cpu,
                collectives: m.collectives.clone(),
                host: m.host.clone(),
            })
            .collect()
    }
    fn size(&self) -> usize {
        self.cpu.size()
    }
    fn index(&self) -> usize {
        self.cpu.index()
    }
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        self.collectives.fetch_add(1, Ordering::Relaxed);
        self.cpu.all_reduce(t, op)
    }
    fn all_reduce_host(&self, b: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.host.fetch_add(1, Ordering::Relaxed);
        self.cpu.all_reduce_host(b, op)
    }
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor, CommError> {
        self.collectives.fetch_add(1, Ordering::Relaxed);
        self.cpu.all_gather(t, dim)
    }
    fn reduce_scatter(&self, t: &Tensor, dim: usize) -> Result<Tensor, CommError> {
        self.collectives.fetch_add(1, Ordering::Relaxed);
        self.cpu.reduce_scatter(t, dim)
    }
    fn abort(&self, why: &str) {
        self.cpu.abort(why)
    }
}

impl Backend for Counting {
    type Tensor = Tensor;
    type Comm = CountingComm;
    fn name(&self) -> &'static str {
        "counting"
    }
    fn upload(&self, t: &Tensor, dtype: ferrotron_ir::DType) -> Result<Tensor, KernelError> {
        self.cpu.upload(t, dtype)
    }
    fn download(&self, t: &Tensor) -> Result<Tensor, KernelError> {
        self.cpu.download(t)
    }
    fn shape<'t>(&self, t: &'t Tensor) -> &'t [usize] {
        self.cpu.shape(t)
    }
    fn bytes(&self, t: &Tensor) -> usize {
        self.cpu.bytes(t)
    }
    fn first_non_finite(&self, t: &Tensor) -> Option<f32> {
        self.cpu.first_non_finite(t)
    }
    fn scalar(&self, value: f32) -> Result<Tensor, KernelError> {
        self.cpu.scalar(value)
    }
    fn read_scalar(&self, t: &Tensor) -> Result<f32, KernelError> {
        self.cpu.read_scalar(t)
    }
    fn eval(
        &self,
        op: &Op<&Tensor, ferrotron_ir::Dim>,
        at: &Placement,
    ) -> Result<Vec<Tensor>, KernelError> {
        self.evals.fetch_add(1, Ordering::Relaxed);
        self.cpu.eval(op, at)
    }
    fn eval_fused(&self, op: &Fused<&Tensor>) -> Result<Tensor, KernelError> {
        self.fused.fetch_add(1, Ordering::Relaxed);
        self.cpu.eval_fused(op)
    }
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        spec: &AttentionSpec,
        at: &Placement,
    ) -> Result<(Tensor, Tensor), KernelError> {
        self.fused.fetch_add(1, Ordering::Relaxed);
        self.cpu.attention(q, k, v, spec, at)
    }
    fn attention_grad(
        &self,
        saved: AttentionSaved<&Tensor>,
        spec: &AttentionSpec,
        at: &Placement,
    ) -> Result<[Tensor; 3], KernelError> {
        self.fused.fetch_add(1, Ordering::Relaxed);
        self.cpu.attention_grad(saved, spec, at)
    }
    fn add_into(&self, acc: Tensor, x: &Tensor) -> Result<Tensor, KernelError> {
        self.adds_in_place.fetch_add(1, Ordering::Relaxed);
        self.cpu.add_into(acc, x)
    }
    fn bias_dropout_add(
        &self,
        operands: (&Tensor, &Tensor, &Tensor),
        p: f64,
        at: &Placement,
    ) -> Result<Tensor, KernelError> {
        self.fused.fetch_add(1, Ordering::Relaxed);
        self.cpu.bias_dropout_add(operands, p, at)
    }
    fn embedding_grad_add(
        &self,
        acc: Tensor,
        inputs: (&Tensor, &Tensor, &Tensor),
        at: &Placement,
    ) -> Result<Tensor, KernelError> {
        self.fused.fetch_add(1, Ordering::Relaxed);
        self.cpu.embedding_grad_add(acc, inputs, at)
    }
    fn reshape(&self, t: Tensor, shape: Vec<usize>) -> Tensor {
        self.reshapes.fetch_add(1, Ordering::Relaxed);
        self.cpu.reshape(t, shape)
    }
    fn local_slice(
        &self,
        t: &Tensor,
        dim: usize,
        index: usize,
        parts: usize,
    ) -> Result<Tensor, KernelError> {
        self.cpu.local_slice(t, dim, index, parts)
    }
    fn ce_row_max(&self, l: &Tensor, shard: &VocabShard) -> Result<Tensor, KernelError> {
        self.cpu.ce_row_max(l, shard)
    }
    fn ce_row_sums(
        &self,
        l: &Tensor,
        m: &Tensor,
        t: &Tensor,
        shard: &VocabShard,
    ) -> Result<Tensor, KernelError> {
        self.cpu.ce_row_sums(l, m, t, shard)
    }
    fn ce_loss(
        &self,
        stats: &CeStats<Tensor>,
        shape: &[usize],
        shard: &VocabShard,
    ) -> Result<Tensor, KernelError> {
        self.cpu.ce_loss(stats, shape, shard)
    }
    fn ce_grad(
        &self,
        l: &Tensor,
        t: &Tensor,
        stats: &CeStats<Tensor>,
        shard: &VocabShard,
        d: &Tensor,
    ) -> Result<Tensor, KernelError> {
        self.cpu.ce_grad(l, t, stats, shard, d)
    }
    fn sum_squares(&self, t: &Tensor) -> Result<f64, KernelError> {
        self.cpu.sum_squares(t)
    }
    fn adamw(
        &self,
        w: &mut Tensor,
        g: &Tensor,
        moments: (&mut Tensor, &mut Tensor),
        update: AdamW,
    ) -> Result<(), KernelError> {
        self.cpu.adamw(w, g, moments, update)
    }
}

#[test]
fn a_wrapping_backend_runs_the_same_plan_to_the_same_results() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/tiny-gpt.ron"
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
    let ours = run_sharded(counting.clone(), &plan, &shards, &batch, &opts).unwrap();
    let cpu = run_sharded(Cpu::default(), &plan, &shards, &batch, &opts).unwrap();
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
    // use, or an `add_into` an addend's buffer, for a sum at an addend's last use), or part of an
    // `eval_fused` (a fused step runs its own node and, the first to absorb
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
    let adds = counting.adds_in_place.load(Ordering::Relaxed);
    assert!(adds > 0, "sums reuse an addend's buffer");
    // Per layer and rank: bias + GeLU forward and backward, the attention forward and
    // backward, two bias-dropout-residual sums; per rank, the tied embedding's gradient added
    // into the output layer's.
    assert_eq!(fused, 2 * 6 * 2 + 2, "fused steps");
    let dropped = g.order.len() - Program::fused(&plan, &|_| false, ATTENTION).steps.len();
    assert_eq!(
        dropped,
        2 * (1 + 8 + 10 + 4) + 1,
        "per layer: the bias add, the attention's scores, scale, softmax, dropout and four \
         transposes, ten of its eleven backward nodes, two bias adds and their dropouts; the \
         embedding's gradient"
    );
    assert_eq!(evals + reshapes + adds + fused + 2 * dropped, 2 * local);
    // The vocabulary-parallel loss reduces its row statistics in the forward, as the backend's
    // tensors (the maxima, then the sums with the target logits: two all-reduces per rank, none
    // of a host buffer), and its gradient reuses them: none in the backward.
    assert!(g
        .order
        .iter()
        .any(|&n| matches!(g.nodes[n].op, Op::CrossEntropyGrad { .. })));
    assert_eq!(
        counting.collectives.load(Ordering::Relaxed),
        2 * (collectives + 2)
    );
    assert_eq!(counting.host.load(Ordering::Relaxed), 0);
}
