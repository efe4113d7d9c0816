//! `ferrotron train`: a model trained on a text file, every rank a thread of this process or,
//! under `ferrotron launch`, one rank per process; on CPU threads or a GPU (master weights,
//! moments and the AdamW update on the device, in `f32`, the step computing in bf16 with
//! `--dtype bf16`).
//!
//! Data flow: text → tokenizer → [`Batches`] → on every rank, the same loop: [`Trainer::step`]
//! (its part of the step, the global gradient norm, clipping, AdamW) → rank 0: the progress
//! bar (on a terminal only) and the CSV log; every rank: checkpoints (written by rank 0,
//! [`ferrotron_io::training`]).

use crate::args::{parse_dropout, resident_bytes, steady_step, BackendArgs, PlanArgs, Usage};
use crate::ranks::{with_ranks, Job, OnRanks};
use anyhow::Result;
use clap::Args;
use ferrotron_exec::init::init_params;
use ferrotron_exec::{
    launch, Backend, Batches, ExecError, ParamSource, Rank, RunOptions, TrainConfig, Trainer,
};
use ferrotron_io::tokenizer::Tokenizer;
use ferrotron_io::training::{resume, save};
use ferrotron_ir::{Graph, ValueId};
use ferrotron_partitioner::report::human_bytes;
use ferrotron_partitioner::{partition, Plan};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// The arguments of `ferrotron train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// The training text.
    #[arg(long)]
    data: PathBuf,
    /// `bytes` (any vocabulary ≥ 256), `gpt2` (GPT-2's BPE, vocabulary 50,257), or a Hugging
    /// Face tokenizer: a directory holding `tokenizer.json` (Llama 3, Qwen2, …) or the file.
    #[arg(long, default_value = "bytes", value_name = "NAME|PATH")]
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
    /// Run every op on its own, without fusing bias + activation, scale + softmax and the
    /// attention into one kernel each (for comparison: the pairs give the same bits on the CPU,
    /// the attention agrees within `f32` rounding).
    #[arg(long)]
    no_fuse: bool,
    /// Fuse as usual but run each attention as its separate ops (scores, scale, softmax,
    /// dropout, product with the values), holding the scores: for comparison with the fused
    /// attention, which agrees within `f32` rounding.
    #[arg(long)]
    no_fuse_attention: bool,
    /// Fuse as usual but run the output layer and its cross-entropy as their separate ops,
    /// holding the full logits (and their gradient): for comparison with the fused loss, which
    /// computes them a chunk of rows at a time and agrees within `f32` rounding.
    #[arg(long)]
    no_fuse_loss: bool,
    /// Allocate every value on its own, as an eager framework does, instead of placing the
    /// step's values in one arena per rank at the memory plan's offsets (allocated once, reused
    /// every step): for comparison.
    #[arg(long)]
    no_arena: bool,
    /// Append `step,loss,lr,grad_norm,tokens_per_second` lines here.
    #[arg(long)]
    log: Option<PathBuf>,
    /// At the end, print one JSON object: the steps taken, every loss, the last gradient norm,
    /// the speed: the median step after the first (`step_s`, `tokens_per_second`), the first
    /// apart (`first_step_s`: it pays for the first allocations), the process's CPU time and
    /// page faults per step counted the same way (`user_s_per_step`, `system_s_per_step`,
    /// `minor_faults_per_step`), the process's resident memory at the end (`resident_bytes`),
    /// and rank 0's memory: the
    /// step's measured peak (`peak_bytes_per_rank`), the memory plan's
    /// (`planned_peak_bytes_per_rank`, `arena_bytes_per_rank`; of the last step's values, how
    /// many the arena held and missed: `arena_placed_last_step`, `arena_missed_last_step`) and
    /// the moments (`optimizer_bytes_per_rank`).
    #[arg(long)]
    json: bool,
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
    /// Start from a Hugging Face checkpoint instead of the seeded initialisation: a model
    /// directory (`config.json` + `model.safetensors` or a sharded index) or one
    /// `.safetensors` file, as `run --weights` reads it.
    #[arg(long, value_name = "DIR|FILE.safetensors", conflicts_with = "resume")]
    weights: Option<PathBuf>,
    /// Every dropout's probability instead of the model file's, in [0, 1); 0 takes the
    /// dropouts out.
    #[arg(long, value_name = "P", value_parser = parse_dropout)]
    dropout: Option<f64>,

    #[command(flatten)]
    backend: BackendArgs,
}

/// `ferrotron train`.
pub fn train(mut args: TrainArgs) -> Result<()> {
    let job = Job::from_env()?;
    args.plan.dropout = args.dropout;
    let graph = args.plan.load()?;
    let plan = partition(&graph, &args.plan.options())?;
    // Opened and checked once here; every rank reads its own shards of it.
    let weights = match &args.weights {
        Some(path) => Some(ferrotron_io::weights::open(path, &graph)?.0),
        None => None,
    };
    let tokenizer = Tokenizer::named(&args.tokenizer)?;
    let input = graph
        .inputs
        .iter()
        .copied()
        .find(|&v| graph.ty(v).dtype.is_int() && graph.ty(v).shape.rank() == 2)
        .ok_or_else(|| anyhow::anyhow!("the model has no [batch, seq] token input"))?;
    let dims = graph.ty(input).shape.sizes();
    // The graph is one micro-batch's; a step reads them all.
    let (batch, seq) = (
        dims[0] as usize * plan.micro_batches() as usize,
        dims[1] as usize,
    );
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
    let tokens = tokenizer
        .encode(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.data.display()))?;
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
        fuse: !args.no_fuse,
        fuse_attention: !args.no_fuse_attention,
        fuse_loss: !args.no_fuse_loss,
        arena: !args.no_arena,
        timeout: args.backend.timeout(),
        ..RunOptions::default()
    };
    if job.is_whole() {
        eprintln!(
            "training {} at tp = {}, dp = {}, pp = {}: {} tokens of {}, batch {batch} × {seq} \
             in {} micro-batches",
            graph.name,
            plan.mesh.tp,
            plan.mesh.dp,
            plan.mesh.pp,
            tokens.len(),
            args.data.display(),
            plan.micro_batches()
        );
    }
    let prepared = Prepared {
        args: &args,
        graph: &graph,
        weights: weights.as_ref().map(|w| w as &dyn ParamSource),
        plan: &plan,
        tokenizer: &tokenizer,
        tokens: &tokens,
        input,
        batch,
        seq,
        config,
        run,
    };
    let timeout = prepared.run.timeout;
    with_ranks(&job, &args.backend, plan.mesh, timeout, prepared)
}

/// What the training loop needs, made once in every process.
struct Prepared<'a> {
    args: &'a TrainArgs,
    graph: &'a Graph,
    /// `--weights`: where each rank reads its shards from.
    weights: Option<&'a dyn ParamSource>,
    plan: &'a Plan,
    tokenizer: &'a Tokenizer,
    tokens: &'a [u32],
    input: ValueId,
    batch: usize,
    seq: usize,
    config: TrainConfig,
    run: RunOptions,
}

impl OnRanks for Prepared<'_> {
    fn on<B: Backend>(self, ranks: Vec<Rank<B>>) -> Result<()> {
        let mut ranks: Vec<Option<Rank<B>>> = ranks.into_iter().map(Some).collect();
        launch::each(&mut ranks, |rank| {
            let rank = rank.take().expect("each rank runs once");
            // A rank's own error stays what it is, so that the one that started a failure is
            // reported rather than a peer's that stopped because of it.
            train_rank(&self, rank).map_err(|e| match e.downcast::<ExecError>() {
                Ok(e) => e,
                Err(e) => ExecError::Plan(e.to_string()),
            })
        })?;
        Ok(())
    }
}

/// The training loop of one rank (every rank of the job runs it): rank 0 prints the progress,
/// writes the log, and writes the checkpoints the ranks gather to it. If the rank fails, its
/// groups are aborted so the other ranks stop too.
fn train_rank<B: Backend>(p: &Prepared<'_>, rank: Rank<B>) -> Result<()> {
    let args = p.args;
    let (config, run) = (p.config.clone(), p.run.clone());
    let lead = rank.index() == 0;
    let (mut trainer, position) = match &args.resume {
        Some(dir) => {
            let (t, meta) = resume(rank, p.plan, dir, config, run)?;
            if lead {
                eprintln!("resuming from {} at step {}", dir.display(), meta.step);
            }
            (t, meta.data_position)
        }
        None => {
            let seeded;
            let params: &dyn ParamSource = match p.weights {
                Some(w) => w,
                None => {
                    seeded = init_params(p.graph, args.seed);
                    &seeded
                }
            };
            (Trainer::new(rank, p.plan, config, params, run)?, 0)
        }
    };
    // The full weights this rank sharded are gone; the steps will not reuse their memory where
    // they place their values in an arena.
    ferrotron_cpu::release_freed_memory();
    if lead {
        let share = if p.plan.distributed_optimizer() {
            format!(", its 1/{} share (--zero 1)", p.plan.mesh.dp)
        } else {
            String::new()
        };
        eprintln!(
            "Adam state on rank 0: {}{share}",
            human_bytes(trainer.optimizer_bytes() as u128, 2)
        );
    }
    let outcome = train_loop(p, &mut trainer, position, lead);
    if let Err(e) = &outcome {
        trainer.rank.abort(&e.to_string());
    }
    outcome
}

/// Rank 0's progress bar on standard error, from step `at` of `steps`: drawn only on a
/// terminal (piped or redirected, it prints nothing per step).
fn progress(steps: u64, at: u64) -> Result<ProgressBar> {
    let style = ProgressStyle::with_template(
        "[{bar:24}] {pos:>5}/{len}  {msg}  ({elapsed} elapsed, {eta} left)",
    )?
    .progress_chars("#>.");
    Ok(ProgressBar::new(steps).with_style(style).with_position(at))
}

fn train_loop<B: Backend>(
    p: &Prepared<'_>,
    trainer: &mut Trainer<'_, B>,
    position: u64,
    lead: bool,
) -> Result<()> {
    let args = p.args;
    let mut extra = serde_json::json!({
        "data": args.data.display().to_string(),
        "tokenizer": p.tokenizer.name(),
        "config": trainer.config,
    });
    // Started from a model directory: its config.json (or, resumed, what the checkpoint
    // recorded), so that `export-hf` needs no --config.
    if let Some(config) = hf_config(args) {
        extra[ferrotron_io::export::HF_CONFIG] = config;
    }
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
    let mut batches = Batches::new(p.tokens.to_vec(), position);
    let input_name = p.graph.values[p.input].name.clone();
    let steps = args.steps;
    let bar = match lead {
        true => progress(steps, trainer.step)?,
        false => ProgressBar::hidden(),
    };
    let mut last = None;
    // Rank 0's record of the steps taken here: (loss, gradient norm, seconds), and what the
    // process used in each.
    let mut taken: Vec<(f32, f64, f64)> = Vec::new();
    let mut used: Vec<Usage> = Vec::new();
    let mut peak = 0;
    let mut arena = None;
    while trainer.step < steps {
        let b = batches.next(&input_name, p.batch, p.seq);
        let before = Usage::now();
        let s = trainer.step(&b)?;
        if let (true, Some(b), Some(a)) = (lead, before, Usage::now()) {
            used.push(a.since(b));
        }
        if lead {
            let tps = (p.batch * p.seq) as f64 / s.seconds.max(1e-9);
            let line = format!(
                "loss {:.4}  lr {:.2e}  |g| {:.3}  {tps:.0} tokens/s",
                s.loss, s.lr, s.grad_norm
            );
            bar.set_message(line.clone());
            bar.set_position(s.step + 1);
            last = Some((s.step + 1, line));
            taken.push((s.loss, s.grad_norm, s.seconds));
            peak = peak.max(s.peak_bytes);
            arena = s.arena;
            if let Some(f) = log.as_mut() {
                use std::io::Write;
                writeln!(f, "{},{},{},{},{tps}", s.step, s.loss, s.lr, s.grad_norm)?;
            }
        }
        if !s.loss.is_finite() {
            bar.abandon();
            anyhow::bail!("the loss became {} at step {}", s.loss, s.step);
        }
        if let Some(dir) = &args.save {
            let due = args.save_every > 0 && trainer.step.is_multiple_of(args.save_every);
            if due || trainer.step == steps {
                save(trainer, dir, args.seed, batches.position, extra.clone())?;
            }
        }
    }
    if lead {
        bar.finish();
        // Without a terminal nothing was drawn: where training ended, once.
        if let (true, Some((step, line))) = (bar.is_hidden(), last) {
            eprintln!("step {step}/{steps}  {line}");
        }
        if let Some(dir) = &args.save {
            eprintln!("checkpoint: {}", dir.display());
        }
        if args.json {
            let mut j = summary(&taken, p.batch * p.seq, trainer.step);
            // The steps' median use after the first, as the step's time is taken.
            let median =
                |f: fn(&Usage) -> f64| steady_step(&used.iter().map(f).collect::<Vec<_>>());
            j["user_s_per_step"] = median(|u| u.user).into();
            j["system_s_per_step"] = median(|u| u.system).into();
            j["minor_faults_per_step"] = median(|u| u.minor_faults).into();
            // Rank 0's memory: measured, planned, and the optimizer's apart.
            let plan = trainer.memory_plan();
            j["peak_bytes_per_rank"] = peak.into();
            j["planned_peak_bytes_per_rank"] = plan.peak.into();
            j["arena_bytes_per_rank"] = plan.arena.into();
            // The last step's use of the arena (none off the host or without a plan).
            j["arena_placed_last_step"] = arena.map(|a| a.placed).into();
            j["arena_missed_last_step"] = arena.map(|a| a.missed).into();
            j["optimizer_bytes_per_rank"] = trainer.optimizer_bytes().into();
            // The whole process's memory after the last step (every rank of an in-process job).
            j["resident_bytes"] = resident_bytes().into();
            println!("{j}");
        }
    }
    Ok(())
}

/// `train --json`: the steps taken (`(loss, gradient norm, seconds)` each) of `tokens` tokens,
/// ending at step `step`.
fn summary(taken: &[(f32, f64, f64)], tokens: usize, step: u64) -> serde_json::Value {
    let seconds: Vec<f64> = taken.iter().map(|t| t.2).collect();
    // The only step, if there is one.
    let steady = steady_step(&seconds).unwrap_or(seconds.first().copied().unwrap_or(0.0));
    serde_json::json!({
        "step": step,
        "steps_taken": taken.len(),
        "losses": taken.iter().map(|t| t.0).collect::<Vec<_>>(),
        "loss": taken.last().map(|t| t.0),
        "grad_norm": taken.last().map(|t| t.1),
        "first_step_s": seconds.first(),
        "step_s": steady,
        "tokens_per_second": tokens as f64 / steady.max(1e-9),
    })
}

/// The `config.json` the model was imported from, where it is known: that of `--weights` when
/// it is a model directory, or the one the `--resume` checkpoint recorded.
fn hf_config(args: &TrainArgs) -> Option<serde_json::Value> {
    use ferrotron_io::export::HF_CONFIG;
    if let Some(dir) = &args.resume {
        let meta = ferrotron_io::checkpoint::read_meta(dir).ok()?;
        return meta.extra.get(HF_CONFIG).cloned();
    }
    let dir = args.weights.as_deref().filter(|w| w.is_dir())?;
    let text = std::fs::read_to_string(ferrotron_io::import::config_path(dir)).ok()?;
    serde_json::from_str(&text).ok()
}
