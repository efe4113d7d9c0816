//! `ferrotron train`: a model trained on a text file, on CPU threads or a GPU (virtual ranks
//! on one device; master weights, moments and the AdamW update on the device, in `f32`, the
//! step computing in bf16 with `--dtype bf16`).
//!
//! Data flow: text → tokenizer → [`Batches`] → [`Trainer::step`] (the partitioned step on the
//! backend, the global gradient norm, clipping, AdamW) → progress line, CSV log, checkpoints.

use crate::execute::{check_world, cpu_groups, nccl_groups, BackendKind, Precision};
use crate::{batches_len, progress_bar, PlanArgs};
use anyhow::Result;
use clap::Args;
use ferrotron_ir::{Graph, ValueId};
use ferrotron_partitioner::{partition, Plan};
use ferrotron_runtime::backend::{Backend, Cpu};
use ferrotron_runtime::cuda::{Cuda, DType};
use ferrotron_runtime::init::init_params;
use ferrotron_runtime::launch::WorkerEnv;
use ferrotron_runtime::tokenizer::Tokenizer;
use ferrotron_runtime::train::{Batches, RankTrainer, TrainConfig, Trainer};
use ferrotron_runtime::RunOptions;
use std::path::PathBuf;
use std::sync::Arc;

/// The arguments of `ferrotron train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// The training text.
    #[arg(long)]
    data: PathBuf,
    /// `bytes` (any vocabulary ≥ 256) or `gpt2` (GPT-2's BPE, vocabulary 50,257).
    #[arg(long, default_value = "bytes")]
    tokenizer: String,
    /// Steps to take.
    #[arg(long, default_value_t = 100)]
    steps: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Final learning rate of the cosine decay.
    #[arg(long, default_value_t = 1e-4)]
    min_lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Decoupled weight decay (matrices and embeddings).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: never).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads each rank's matmuls may use.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Run every op on its own, without fusing bias + activation and scale + softmax into one
    /// kernel each (for comparison; the results are the same to the bit on the CPU).
    #[arg(long)]
    no_fuse: bool,
    /// Append `step,loss,lr,grad_norm,tokens_per_second` lines here.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Write a checkpoint here at the end (and every `--save-every` steps).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Steps between checkpoints (0: only at the end).
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// Continue from this checkpoint (its weights, optimizer state, step and data
    /// position; it may have been written at another tp).
    #[arg(long)]
    resume: Option<PathBuf>,

    /// Where the ranks compute.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    backend: BackendKind,
    /// The GPU (CUDA backend): every rank runs on it as a virtual rank; under
    /// `ferrotron launch` the default is the process's local rank.
    #[arg(long)]
    device: Option<usize>,
    /// What the step computes in on the CUDA backend (master weights stay `f32`).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
}

impl TrainArgs {
    fn storage(&self) -> DType {
        match self.dtype {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::Bf16,
        }
    }
}

/// `ferrotron train`.
pub fn train(args: TrainArgs) -> Result<()> {
    let graph = args.plan.load()?;
    let plan = partition(&graph, &args.plan.options())?;
    let tokenizer = Tokenizer::named(&args.tokenizer)?;
    let input = graph
        .inputs
        .iter()
        .copied()
        .find(|&v| graph.ty(v).dtype.is_int() && graph.ty(v).shape.rank() == 2)
        .ok_or_else(|| anyhow::anyhow!("the model has no [batch, seq] token input"))?;
    let dims = graph.ty(input).shape.sizes();
    let (batch, seq) = (dims[0] as usize, dims[1] as usize);
    // The classes the loss predicts over: what every token must index.
    let vocab = graph
        .order
        .iter()
        .find_map(|&n| match &graph.nodes[n].op {
            ferrotron_ir::Op::CrossEntropy { logits, .. } => {
                graph.ty(*logits).shape.last().map(|d| d.size)
            }
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("the model has no cross-entropy loss to train"))?;
    tokenizer.check(vocab)?;
    let text = std::fs::read_to_string(&args.data)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.data.display()))?;
    let tokens = tokenizer.encode(&text);
    if tokens.len() < batch * seq {
        anyhow::bail!(
            "{}: {} tokens, fewer than one batch ({batch} × {seq})",
            args.data.display(),
            tokens.len()
        );
    }
    let config = TrainConfig {
        lr: args.lr,
        min_lr: args.min_lr,
        warmup: args.warmup,
        steps: args.steps,
        weight_decay: args.weight_decay,
        clip: args.clip,
        ..TrainConfig::default()
    };
    let run = RunOptions {
        threads_per_rank: args.threads,
        fuse: !args.no_fuse,
        ..RunOptions::default()
    };
    let prepared = Prepared {
        graph: &graph,
        plan: &plan,
        tokenizer: &tokenizer,
        tokens,
        input,
        batch,
        seq,
        config,
        run,
    };
    if let Some(worker) = WorkerEnv::from_env()? {
        return train_worker(&args, &worker, prepared);
    }
    match args.backend {
        BackendKind::Cpu => train_on(&args, Cpu, prepared),
        BackendKind::Cuda => {
            let ranks = (plan.mesh.tp * plan.mesh.dp) as usize;
            let dtype = args.storage();
            train_on(
                &args,
                Cuda::new(args.device.unwrap_or(0), ranks, dtype)?,
                prepared,
            )
        }
    }
}

/// Under `ferrotron launch`: this process trains one rank (CPU ranks over TCP, GPU ranks over
/// NCCL); rank 0 prints the progress, writes the log and writes the checkpoints (gathered from
/// the tensor-parallel ranks).
fn train_worker(args: &TrainArgs, worker: &WorkerEnv, p: Prepared<'_>) -> Result<()> {
    let (tp, dp) = (p.plan.mesh.tp as usize, p.plan.mesh.dp as usize);
    check_world(worker, tp, dp)?;
    match args.backend {
        BackendKind::Cpu => {
            let groups = cpu_groups(worker, tp, dp)?;
            rank_loop(args, Cpu, worker.rank, groups, p)
        }
        BackendKind::Cuda => {
            let cuda = Cuda::new(args.device.unwrap_or(worker.local_rank), 1, args.storage())?;
            let groups = nccl_groups(&cuda, worker, tp, dp)?;
            rank_loop(args, cuda, worker.rank, groups, p)
        }
    }
}

/// The training loop of one rank in its own process.
fn rank_loop<B: Backend>(
    args: &TrainArgs,
    backend: B,
    rank: usize,
    groups: (Arc<B::Group>, Arc<B::Group>),
    p: Prepared<'_>,
) -> Result<()> {
    let config = p.config.clone();
    let run = p.run.clone();
    let (mut trainer, position) = match &args.resume {
        Some(dir) => {
            let (t, meta) = RankTrainer::resume(backend, p.plan, dir, config, rank, groups, run)?;
            if rank == 0 {
                eprintln!("resuming from {} at step {}", dir.display(), meta.step);
            }
            (t, meta.data_position)
        }
        None => {
            let params = init_params(p.graph, args.seed);
            let t = RankTrainer::new(backend, p.plan, config, &params, rank, groups, run)?;
            (t, 0)
        }
    };
    let extra = serde_json::json!({
        "data": args.data.display().to_string(),
        "tokenizer": p.tokenizer.name(),
        "config": trainer.config,
    });
    let lead = trainer.rank == 0;
    let mut log = match (&args.log, lead) {
        (Some(path), true) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        ),
        _ => None,
    };
    let mut batches = Batches::new(p.tokens, position);
    let input_name = p.graph.values[p.input].name.clone();
    let steps = args.steps;
    while trainer.step < steps {
        let b = batches.next(&input_name, p.batch, p.seq);
        let s = trainer.step(&b)?;
        if lead {
            let tps = (p.batch * p.seq) as f64 / s.seconds.max(1e-9);
            eprint!(
                "\r{} {:>5}/{steps}  loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tokens/s   ",
                progress_bar(s.step + 1, steps, 24),
                s.step + 1,
                s.loss,
                s.lr,
                s.grad_norm,
                tps
            );
            if let Some(f) = log.as_mut() {
                use std::io::Write;
                writeln!(f, "{},{},{},{},{tps}", s.step, s.loss, s.lr, s.grad_norm)?;
            }
        }
        if !s.loss.is_finite() {
            anyhow::bail!("the loss became {} at step {}", s.loss, s.step);
        }
        if let Some(dir) = &args.save {
            let due = args.save_every > 0 && trainer.step % args.save_every == 0;
            if due || trainer.step == steps {
                trainer.save(dir, args.seed, batches.position, extra.clone())?;
            }
        }
    }
    if lead {
        eprintln!();
        if let Some(dir) = &args.save {
            eprintln!("checkpoint: {}", dir.display());
        }
    }
    Ok(())
}

/// What the training loop needs, made once whatever the backend.
struct Prepared<'a> {
    graph: &'a Graph,
    plan: &'a Plan,
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    input: ValueId,
    batch: usize,
    seq: usize,
    config: TrainConfig,
    run: RunOptions,
}

/// The training loop on `backend`.
fn train_on<B: Backend>(args: &TrainArgs, backend: B, p: Prepared<'_>) -> Result<()> {
    let Prepared {
        graph,
        plan,
        tokenizer,
        tokens,
        input,
        batch,
        seq,
        config,
        run,
    } = p;
    let TrainArgs {
        data,
        steps,
        seed,
        log,
        save,
        save_every,
        resume,
        ..
    } = args;
    let (steps, seed, save_every) = (*steps, *seed, *save_every);
    let (mut trainer, position) = match resume {
        Some(dir) => {
            let (t, meta) = Trainer::resume(backend, plan, dir, config, run)?;
            eprintln!("resuming from {} at step {}", dir.display(), meta.step);
            (t, meta.data_position)
        }
        None => (
            Trainer::on(backend, plan, config, &init_params(graph, seed), run)?,
            0,
        ),
    };
    let mut batches = Batches::new(tokens, position);
    let extra = serde_json::json!({
        "data": data.display().to_string(),
        "tokenizer": tokenizer.name(),
        "config": trainer.config,
    });
    let mut log = match log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        ),
        None => None,
    };
    eprintln!(
        "training {} at tp = {}, dp = {}: {} tokens of {}, batch {batch} × {seq}",
        graph.name,
        plan.mesh.tp,
        plan.mesh.dp,
        batches_len(&batches),
        data.display()
    );
    let input_name = graph.values[input].name.clone();
    while trainer.step < steps {
        let b = batches.next(&input_name, batch, seq);
        let s = trainer.step(&b)?;
        let tps = (batch * seq) as f64 / s.seconds.max(1e-9);
        eprint!(
            "\r{} {:>5}/{steps}  loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tokens/s   ",
            progress_bar(s.step + 1, steps, 24),
            s.step + 1,
            s.loss,
            s.lr,
            s.grad_norm,
            tps
        );
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            writeln!(f, "{},{},{},{},{tps}", s.step, s.loss, s.lr, s.grad_norm)?;
        }
        if !s.loss.is_finite() {
            eprintln!();
            anyhow::bail!("the loss became {} at step {}", s.loss, s.step);
        }
        if let Some(dir) = &save {
            let due = save_every > 0 && trainer.step % save_every == 0;
            if due || trainer.step == steps {
                trainer.save(dir, seed, batches.position, extra.clone())?;
            }
        }
    }
    eprintln!();
    if let Some(dir) = &save {
        eprintln!("checkpoint: {}", dir.display());
    }
    Ok(())
}
