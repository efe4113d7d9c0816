//! `ferrotron run`: one forward + backward step of a partitioned model, on the CPU backend
//! (ranks as threads) or the CUDA backend (virtual ranks on one GPU), or, under
//! `ferrotron launch`, one rank per process (TCP between CPU ranks, NCCL between GPUs); with
//! `--verify`, checked against the unpartitioned model on the CPU on the same weights and batch.
//!
//! Data flow: model file → partition → weights (seeded, test-scaled, or Hugging Face) and batch →
//! [`ferrotron_runtime::exec`] on the chosen backend → loss, times, memory, and the comparison.

use crate::{print_verification, write_atomically, PlanArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ferrotron_ir::graph::EntityRef;
use ferrotron_ir::Graph;
use ferrotron_partitioner::{partition, Plan, Report};
use ferrotron_runtime::backend::{Backend, Cpu, CpuGroup};
use ferrotron_runtime::cuda::comm::CudaGroup;
use ferrotron_runtime::cuda::{Cuda, DType};
use ferrotron_runtime::exec::{run_rank, run_with, upload_params, Run};
use ferrotron_runtime::hf::{load_gpt2, read_tokens, write_safetensors};
use ferrotron_runtime::init::{init_params, random_batch, test_params};
use ferrotron_runtime::launch::{TcpGroup, WorkerEnv};
use ferrotron_runtime::verify::{
    compare_on, reference_plan, rel_error, rel_error_floor, Tolerances,
};
use ferrotron_runtime::{shard_params, RunOptions, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the ranks compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// CPU threads (the reference).
    Cpu,
    /// NVIDIA GPUs: cuBLAS, NVRTC kernels, NCCL.
    Cuda,
}

/// The element type of weights and activations on the CUDA backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// `f32` throughout (verification).
    F32,
    /// bf16 storage, `f32` arithmetic and statistics (mixed precision).
    Bf16,
}

/// The arguments of `ferrotron run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Compare with the unpartitioned model; exit non-zero on a mismatch.
    #[arg(long)]
    verify: bool,
    /// Seed of the weights and the batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads each rank's matmuls may use (CPU backend).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Run every op on its own, without fusing bias + activation and scale + softmax into one
    /// kernel each (for comparison; the results are the same to the bit on the CPU).
    #[arg(long)]
    no_fuse: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Stop at the first op that produces a NaN or an infinity, naming it.
    #[arg(long)]
    check_finite: bool,
    /// Write a Chrome / Perfetto trace of every op and collective on every rank.
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// Weights from a Hugging Face GPT2LMHeadModel safetensors file
    /// (`transformer.h.0.attn.c_attn.weight`, ...) instead of the seeded initialisation.
    #[arg(long, value_name = "FILE.safetensors")]
    weights: Option<PathBuf>,
    /// The batch: one sequence per line, space-separated token ids, equal lengths (sets
    /// the model's `batch` and `seq` dimensions).
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Write every gradient (full shape, unpadded, under the parameters' names).
    #[arg(long, value_name = "OUT.safetensors")]
    dump_grads: Option<PathBuf>,
    /// Where the ranks compute.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    backend: BackendKind,
    /// The GPU (CUDA backend): all ranks share it as virtual ranks; under `ferrotron launch`
    /// the default is the process's local rank.
    #[arg(long)]
    device: Option<usize>,
    /// Weights and activations on the CUDA backend.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
}

/// What a step needs, built the same way on every backend and every process.
struct Step {
    graph: Graph,
    plan: Plan,
    params: HashMap<String, Tensor>,
    batch: HashMap<String, Tensor>,
    opts: RunOptions,
}

impl RunArgs {
    fn storage(&self) -> DType {
        match self.dtype {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::Bf16,
        }
    }

    fn tolerances(&self) -> Tolerances {
        match (self.backend, self.dtype) {
            (BackendKind::Cuda, Precision::Bf16) => Tolerances::BF16,
            _ => Tolerances::F32,
        }
    }

    /// Loads and partitions the model, and makes the weights and the batch.
    fn step(&self) -> Result<Step> {
        let mut args = self.plan.clone();
        let token_batch = match &self.tokens {
            Some(path) => {
                let t = read_tokens(path)?;
                // The file decides the batch: its lines and their length.
                args.dims.retain(|(n, _)| n != "batch" && n != "seq");
                args.dims.push(("batch".into(), t.shape[0] as u64));
                args.dims.push(("seq".into(), t.shape[1] as u64));
                Some(t)
            }
            None => None,
        };
        let graph = args.load()?;
        let plan = partition(&graph, &args.options())?;
        let params = match (&self.weights, self.verify) {
            (Some(path), _) => load_gpt2(path, &graph)?,
            (None, true) => test_params(&graph, self.seed),
            (None, false) => init_params(&graph, self.seed),
        };
        let mut batch = random_batch(&graph, self.seed);
        if let Some(t) = token_batch {
            let input = graph
                .inputs
                .iter()
                .find(|&&v| graph.ty(v).dtype.is_int() && graph.ty(v).shape.rank() == 2)
                .map(|&v| graph.values[v].name.clone())
                .ok_or_else(|| anyhow::anyhow!("the model has no [batch, seq] token input"))?;
            batch.insert(input, t);
        }
        let opts = RunOptions {
            threads_per_rank: self.threads,
            check_finite: self.check_finite,
            fuse: !self.no_fuse,
            trace: self.trace.is_some(),
            ..RunOptions::default()
        };
        Ok(Step {
            graph,
            plan,
            params,
            batch,
            opts,
        })
    }
}

/// `ferrotron run`.
pub fn run(args: RunArgs) -> Result<()> {
    if let Some(worker) = WorkerEnv::from_env()? {
        return run_worker(&args, &worker);
    }
    let step = args.step()?;
    match args.backend {
        BackendKind::Cpu => finish(&args, &step, Cpu),
        BackendKind::Cuda => {
            let ranks = (step.plan.mesh.tp * step.plan.mesh.dp) as usize;
            let cuda = Cuda::new(args.device.unwrap_or(0), ranks, args.storage())?;
            finish(&args, &step, cuda)
        }
    }
}

/// Runs the step on `backend` (every rank in this process), then reports and verifies.
fn finish<B: Backend>(args: &RunArgs, step: &Step, backend: B) -> Result<()> {
    let Step {
        graph,
        plan,
        params,
        batch,
        opts,
    } = step;
    let report = Report::of(plan);
    let started = std::time::Instant::now();
    let run: Run<B> = run_with(backend, plan, params, batch, opts)?;
    let loss = run.loss()?;
    let wall = started.elapsed();
    if let Some(path) = &args.trace {
        write_atomically(path, run.trace_json().as_bytes())?;
    }
    if let Some(path) = &args.dump_grads {
        let grads = plan
            .grads
            .iter()
            .map(|(p, _)| {
                let name = plan.graph.params[*p].name.clone();
                run.grad(&name).map(|g| (name, g))
            })
            .collect::<Result<HashMap<_, _>, _>>()?;
        write_safetensors(path, &grads)?;
    }
    let (fwd, bwd) = run.times();
    let tokens = ferrotron_ir::count::tokens_per_step(graph).unwrap_or(0);
    let tokens_per_second = tokens as f64 / (fwd + bwd).as_secs_f64().max(1e-9);
    let checked = if args.verify {
        let reference = reference_plan(graph)?;
        Some(compare_on(
            &run,
            &reference,
            params,
            batch,
            opts,
            args.tolerances(),
        )?)
    } else {
        None
    };
    let estimate = report.per_rank.memory_bytes - report.per_rank.optimizer_bytes;
    if args.json {
        let mut j = serde_json::json!({
            "model": graph.name,
            "backend": run.backend().name(),
            "tp": plan.mesh.tp,
            "dp": plan.mesh.dp,
            "loss": loss,
            "forward_ms": fwd.as_secs_f64() * 1e3,
            "backward_ms": bwd.as_secs_f64() * 1e3,
            "tokens_per_second": tokens_per_second,
            "peak_bytes_per_rank": run.peak_bytes(),
            "estimated_bytes_per_rank": estimate,
            "report": report,
        });
        if let Some(v) = &checked {
            j["verified"] = v.passed().into();
            j["max_rel_error"] = v.max_rel_error().into();
            j["comparison"] = serde_json::to_value(v)?;
        }
        println!("{j}");
    } else {
        print!("{report}");
        println!(
            "run ({}): loss {loss:.6}, forward {:.1} ms, backward {:.1} ms ({:.1} ms wall), \
             {tokens_per_second:.0} tokens/s",
            run.backend().name(),
            fwd.as_secs_f64() * 1e3,
            bwd.as_secs_f64() * 1e3,
            wall.as_secs_f64() * 1e3
        );
        println!(
            "peak tensor memory per rank: {:.2} MiB measured, {:.2} MiB estimated \
             (weights + gradients + saved activations)",
            run.peak_bytes() as f64 / (1 << 20) as f64,
            estimate as f64 / (1 << 20) as f64
        );
        if let Some(v) = &checked {
            print_verification(v);
        }
    }
    if let Some(v) = checked {
        if !v.passed() {
            bail!(
                "the partitioned run differs from the unpartitioned model (max relative \
                 error {:.3e})",
                v.max_rel_error()
            );
        }
    }
    Ok(())
}

/// Under `ferrotron launch`: this process runs one rank of the plan (the job's world size must
/// be tp × dp), its groups formed through the launcher's store; rank 0 prints the loss, and with
/// `--verify` every rank checks its own shards of every gradient against the unpartitioned
/// model run here on the CPU.
fn run_worker(args: &RunArgs, worker: &WorkerEnv) -> Result<()> {
    let step = args.step()?;
    let (tp, dp) = (step.plan.mesh.tp as usize, step.plan.mesh.dp as usize);
    check_world(worker, tp, dp)?;
    let rank = worker.rank;
    let shards = shard_params(&step.plan, &step.params)?;
    match args.backend {
        BackendKind::Cpu => {
            let groups = cpu_groups(worker, tp, dp)?;
            worker_step(args, &step, Cpu, rank, &shards[rank], groups)
        }
        BackendKind::Cuda => {
            let device = args.device.unwrap_or(worker.local_rank);
            let cuda = Cuda::new(device, 1, args.storage())?;
            let groups = nccl_groups(&cuda, worker, tp, dp)?;
            let weights = upload_params(&cuda, &step.plan, &shards[rank..rank + 1])?
                .pop()
                .unwrap_or_default();
            worker_step(args, &step, cuda, rank, &weights, groups)
        }
    }
}

/// Checks that the launcher started tp × dp ranks.
pub(crate) fn check_world(worker: &WorkerEnv, tp: usize, dp: usize) -> Result<()> {
    if worker.world_size != tp * dp {
        bail!(
            "the launcher started {} ranks, the plan needs tp × dp = {tp} × {dp} = {}",
            worker.world_size,
            tp * dp
        );
    }
    Ok(())
}

/// This worker's tensor- and data-parallel groups as CPU ranks in separate processes (TCP),
/// formed through the launcher's store.
pub(crate) fn cpu_groups(
    worker: &WorkerEnv,
    tp: usize,
    dp: usize,
) -> Result<(Arc<CpuGroup>, Arc<CpuGroup>)> {
    let store = worker
        .connect_store()
        .context("connecting to the launcher's store")?;
    let (t, d) = (worker.rank % tp, worker.rank / tp);
    let tp_group = TcpGroup::connect(&store, &format!("tp/dp{d}"), t, tp, worker.timeout)?;
    let dp_group = TcpGroup::connect(&store, &format!("dp/tp{t}"), d, dp, worker.timeout)?;
    Ok((
        Arc::new(CpuGroup::Tcp(tp_group)),
        Arc::new(CpuGroup::Tcp(dp_group)),
    ))
}

/// This worker's tensor- and data-parallel NCCL groups, each group's unique id made by its
/// member 0 and shared through the launcher's store.
pub(crate) fn nccl_groups(
    cuda: &Cuda,
    worker: &WorkerEnv,
    tp: usize,
    dp: usize,
) -> Result<(Arc<CudaGroup>, Arc<CudaGroup>)> {
    let store = worker
        .connect_store()
        .context("connecting to the launcher's store")?;
    let (t, d) = (worker.rank % tp, worker.rank / tp);
    let nccl = |name: String, member: usize, size: usize| -> Result<_> {
        let key = format!("nccl/{name}");
        let id = if member == 0 {
            let id = Cuda::new_nccl_id()?;
            store.set(&key, &id)?;
            id.to_vec()
        } else {
            store.get(&key, worker.timeout)?
        };
        Ok(cuda.nccl_group(&id, member, size)?)
    };
    Ok((
        nccl(format!("tp/dp{d}"), t, tp)?,
        nccl(format!("dp/tp{t}"), d, dp)?,
    ))
}

/// One rank's step on any backend: run, sum the loss over the data-parallel group, report, and
/// with `--verify` compare this rank's gradient shards with the unpartitioned model's.
fn worker_step<B: Backend>(
    args: &RunArgs,
    step: &Step,
    backend: B,
    rank: usize,
    weights: &[B::Tensor],
    (tp_group, dp_group): (Arc<B::Group>, Arc<B::Group>),
) -> Result<()> {
    let plan = &step.plan;
    let tp = plan.mesh.tp as usize;
    let (t, d) = (rank % tp, rank / tp);
    let started = std::time::Instant::now();
    let result = run_rank(
        &backend,
        plan,
        rank,
        weights,
        &step.batch,
        tp_group,
        dp_group.clone(),
        &step.opts,
    )?;
    let loss_value = result
        .values
        .get(&plan.loss)
        .ok_or_else(|| anyhow::anyhow!("the loss was not kept"))?;
    // Each data-parallel rank holds its addend of the loss.
    let mut loss = [backend.read_scalar(loss_value)?];
    backend.all_reduce_host(
        &dp_group,
        d,
        &mut loss,
        ferrotron_runtime::comm::ReduceOp::Sum,
    )?;
    let wall = started.elapsed();
    if rank == 0 {
        println!(
            "run ({}, {} processes): loss {:.6}, forward {:.1} ms, backward {:.1} ms ({:.1} ms wall)",
            backend.name(),
            plan.mesh.tp * plan.mesh.dp,
            loss[0],
            result.forward.as_secs_f64() * 1e3,
            result.backward.as_secs_f64() * 1e3,
            wall.as_secs_f64() * 1e3
        );
    }
    if !args.verify {
        return Ok(());
    }
    // The reference: the unpartitioned model, here on the CPU, on the same weights and batch.
    let reference = reference_plan(&step.graph)?;
    let theirs = ferrotron_runtime::run(&reference, &step.params, &step.batch, &step.opts)?;
    let tol = args.tolerances();
    let mut failures = Vec::new();
    let loss_error = rel_error(
        &Tensor::full(Vec::new(), loss[0]),
        &Tensor::full(Vec::new(), theirs.loss()?),
    );
    if loss_error > tol.forward {
        failures.push(format!("loss: relative error {loss_error:.3e}"));
    }
    // This rank's shard of each full reference gradient: shard the gradients as the weights
    // are sharded (a gradient has its parameter's layout).
    let mut full = HashMap::new();
    for (p, _) in &plan.grads {
        let name = plan.graph.params[*p].name.clone();
        let g = theirs.grad(&name)?;
        full.insert(name, g);
    }
    let expected = shard_params(plan, &full)?;
    let floor = 1e-3
        * full
            .values()
            .flat_map(|g| g.data.iter())
            .fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let mut worst = 0.0f64;
    for (p, v) in &plan.grads {
        let name = &plan.graph.params[*p].name;
        let mine = result
            .values
            .get(v)
            .ok_or_else(|| anyhow::anyhow!("the gradient of `{name}` was not kept"))?;
        let mine = backend.download(mine)?;
        let err = rel_error_floor(&mine, &expected[rank][p.index()], floor);
        worst = worst.max(err);
        if err > tol.gradient {
            failures.push(format!("gradient of `{name}`: relative error {err:.3e}"));
        }
    }
    println!(
        "rank {rank} (tp {t}, dp {d}): {} gradients and the loss against the unpartitioned \
         model: {} (max relative error {worst:.3e}, loss {loss_error:.3e})",
        plan.grads.len(),
        if failures.is_empty() {
            "verified"
        } else {
            "MISMATCH"
        }
    );
    if !failures.is_empty() {
        bail!(
            "rank {rank} differs from the unpartitioned model: {}",
            failures.join("; ")
        );
    }
    Ok(())
}
