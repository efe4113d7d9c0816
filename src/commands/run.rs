//! `ferrotron run`: one forward + backward step of a partitioned model, on the CPU backend or the
//! CUDA backend, every rank a thread of this process or, under `ferrotron launch`, one rank per
//! process; with `--verify`, checked against the unpartitioned model on the CPU on the same
//! weights and batch.
//!
//! Data flow: model file → partition → weights (seeded, test-scaled, or Hugging Face) and batch
//! → this process's ranks ([`crate::ranks`]) → the rank program on each → with every rank here,
//! their results gathered (loss, times, memory, trace, gradients, the comparison); with one,
//! its own loss and gradient shards checked.

use crate::args::{parse_dropout, steady_step, write_atomically, BackendArgs, PlanArgs};
use crate::ranks::{tolerances, with_ranks, Job, OnRanks};
use anyhow::{anyhow, bail, Result};
use clap::Args;
use ferrotron_cpu::Cpu;
use ferrotron_exec::init::{init_params, random_batch, test_params};
use ferrotron_exec::verify::{compare, compare_rank, reference_plan, Entry, Kind, Verification};
use ferrotron_exec::{launch, memory, run as run_all, weights_for, Backend, Executable, Rank, Run};
use ferrotron_exec::{RunOptions, Tensor};
use ferrotron_io::hf::{read_tokens, write_safetensors, FileNames};
use ferrotron_io::weights::Weights;
use ferrotron_ir::{Graph, MeshAxis};
use ferrotron_partitioner::{partition, Plan, Report};
use std::collections::HashMap;
use std::path::PathBuf;

/// The arguments of `ferrotron run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    plan: PlanArgs,
    #[command(flatten)]
    backend: BackendArgs,
    /// Compare with the unpartitioned model; exit non-zero on a mismatch. The loss and every
    /// gradient, and the outputs (the logits) unless the output layer runs fused with its loss
    /// and never makes them whole (`--no-fuse-loss` compares them too).
    #[arg(long)]
    verify: bool,
    /// Seed of the weights and the batch.
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
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Stop at the first op that produces a NaN or an infinity, naming it.
    #[arg(long)]
    check_finite: bool,
    /// Write a Chrome / Perfetto trace of every op and collective on every rank.
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// Weights from a Hugging Face checkpoint instead of the seeded initialisation: a model
    /// directory (`config.json` + `model.safetensors` or a sharded
    /// `model.safetensors.index.json`; GPT-2, Llama, Mistral, Qwen2, BERT) or one
    /// `.safetensors` file (its family from the model's parameter names).
    #[arg(long, value_name = "DIR|FILE.safetensors")]
    weights: Option<PathBuf>,
    /// The batch: one sequence per line, space-separated token ids, equal lengths (sets
    /// the model's `batch` and `seq` dimensions). A model whose loss reads its targets from
    /// another input of that shape (BERT's `labels`) gets the same ids there, every position a
    /// target; any other integer input of that shape (`token_types`) gets zeros.
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Write every gradient (full shape, unpadded): under the names the `--weights` file gave
    /// the parameters (`transformer.wte.weight`, in the file's layout), else the model's.
    #[arg(long, value_name = "OUT.safetensors")]
    dump_grads: Option<PathBuf>,
    /// Write every graph output (the logits, the loss) at the model's full shape (a padded
    /// vocabulary cropped), under its name.
    #[arg(long, value_name = "OUT.safetensors")]
    dump_outputs: Option<PathBuf>,
    /// Run the step this many times on the same weights and batch: tokens/s is then the median
    /// step after the first (the steady state), the first reported apart (it pays for the first
    /// allocations and page faults); the results reported are the last step's.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    steps: u32,
    /// Every dropout's probability instead of the model file's, in [0, 1); 0 takes the
    /// dropouts out (evaluation: the loss of the model without dropout). `--verify` compares
    /// with the unpartitioned model at the same rate.
    #[arg(long, value_name = "P", value_parser = parse_dropout)]
    dropout: Option<f64>,
}

/// The wall time of each repeated step ([`RunArgs::steps`]).
struct Timing {
    walls: Vec<std::time::Duration>,
}

impl Timing {
    fn first(&self) -> std::time::Duration {
        self.walls[0]
    }

    /// The median step after the first; `None` for a single step.
    fn steady(&self) -> Option<std::time::Duration> {
        let seconds: Vec<f64> = self.walls.iter().map(|w| w.as_secs_f64()).collect();
        steady_step(&seconds).map(std::time::Duration::from_secs_f64)
    }

    /// The last step's wall time.
    fn last(&self) -> std::time::Duration {
        *self.walls.last().expect("at least one step")
    }

    /// With several steps, the first and the steady one.
    fn print(&self) {
        if let Some(steady) = self.steady() {
            println!(
                "{} steps: the first {:.1} ms, the median of the rest {:.1} ms",
                self.walls.len(),
                self.first().as_secs_f64() * 1e3,
                steady.as_secs_f64() * 1e3
            );
        }
    }
}

/// What a step needs, made the same way in every process.
struct Step {
    /// The model at the step's whole batch (the reference, the weights and the batch).
    graph: Graph,
    plan: Plan,
    /// Whole in memory (seeded, or read whole for `--verify`'s reference), or a checkpoint
    /// each rank reads its own shards of.
    params: Weights,
    batch: HashMap<String, Tensor>,
    opts: RunOptions,
    /// With `--weights`, the file's name of each parameter (what `--dump-grads` writes).
    file_names: Option<FileNames>,
}

impl RunArgs {
    /// Loads and partitions the model, and makes the weights and the batch.
    fn step(&self) -> Result<Step> {
        let mut args = self.plan.clone();
        args.dropout = self.dropout;
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
        // The plan runs one micro-batch's graph; the step is the whole batch.
        let plan = partition(&args.load()?, &args.options())?;
        let graph = args.load_global()?;
        let (params, file_names) = match (&self.weights, self.verify) {
            (Some(path), _) => {
                let (weights, names) = ferrotron_io::weights::open(path, &graph)?;
                // The unpartitioned reference runs on the whole model; the ranks alone read
                // only their shards.
                let weights = match self.verify {
                    true => Weights::Full(weights.into_full()?),
                    false => weights,
                };
                (weights, Some(names))
            }
            (None, true) => (Weights::Full(test_params(&graph, self.seed)), None),
            (None, false) => (Weights::Full(init_params(&graph, self.seed)), None),
        };
        let mut batch = random_batch(&graph, self.seed);
        if let Some(t) = token_batch {
            let mut ids = graph
                .inputs
                .iter()
                .filter(|&&v| graph.ty(v).dtype.is_int() && graph.ty(v).shape.rank() == 2)
                .map(|&v| graph.values[v].name.clone());
            let input = ids
                .next()
                .ok_or_else(|| anyhow!("the model has no [batch, seq] token input"))?;
            // The loss's targets, where they are an input of their own (BERT's `labels`).
            let targets: Vec<&str> = graph
                .order
                .iter()
                .filter_map(|&n| match &graph.nodes[n].op {
                    ferrotron_ir::Op::CrossEntropy { targets, .. } => {
                        Some(graph.values[*targets].name.as_str())
                    }
                    _ => None,
                })
                .collect();
            for other in ids {
                let value = match targets.contains(&other.as_str()) {
                    true => t.clone(),
                    false => Tensor::zeros(t.shape.clone()),
                };
                batch.insert(other, value);
            }
            batch.insert(input, t);
        }
        let mut opts = RunOptions {
            check_finite: self.check_finite,
            fuse: !self.no_fuse,
            fuse_attention: !self.no_fuse_attention,
            fuse_loss: !self.no_fuse_loss,
            arena: !self.no_arena,
            // The outputs (the logits) are kept only where they are read: `--dump-outputs`
            // writes them. Otherwise the output layer may run fused with the loss, never
            // holding them.
            keep_outputs: self.dump_outputs.is_some(),
            trace: self.trace.is_some(),
            timeout: self.backend.timeout(),
            ..RunOptions::default()
        };
        // `--verify` checks the step that runs: where the output layer runs fused with its
        // loss, that step's loss and gradients; otherwise the logits too, which exist anyway.
        if self.verify && !Executable::new(&plan, &opts)?.program.fuses_output_loss() {
            opts.keep_outputs = true;
        }
        Ok(Step {
            graph,
            plan,
            params,
            batch,
            opts,
            file_names,
        })
    }
}

impl Step {
    /// The weights whole, as `--verify`'s reference needs them ([`RunArgs::step`] reads them
    /// so then).
    fn whole(&self) -> Result<&HashMap<String, Tensor>> {
        match &self.params {
            Weights::Full(params) => Ok(params),
            Weights::Checkpoint(_) => bail!("the weights were not read whole for the reference"),
        }
    }
}

/// `ferrotron run`.
pub fn run(args: RunArgs) -> Result<()> {
    let job = Job::from_env()?;
    let step = args.step()?;
    let (mesh, timeout) = (step.plan.mesh, step.opts.timeout);
    let work = StepOnRanks {
        args: &args,
        step: &step,
        whole: job.is_whole(),
    };
    with_ranks(&job, &args.backend, mesh, timeout, work)
}

/// One step on this process's ranks, then its report.
struct StepOnRanks<'a> {
    args: &'a RunArgs,
    step: &'a Step,
    whole: bool,
}

impl OnRanks for StepOnRanks<'_> {
    fn on<B: Backend>(self, ranks: Vec<Rank<B>>) -> Result<()> {
        let Step {
            plan,
            params,
            batch,
            opts,
            ..
        } = self.step;
        let exe = Executable::new(plan, opts)?;
        let mut ranks = ranks
            .into_iter()
            .map(|r| Ok((weights_for(&r, plan, params)?, r)))
            .collect::<Result<Vec<_>>>()?;
        // The rank program, on every rank of this process at once, `--steps` times.
        let mut walls = Vec::new();
        let mut results = Vec::new();
        for _ in 0..self.args.steps {
            let started = std::time::Instant::now();
            // The last step's values (kept to its end) give their places in the ranks' arenas
            // back before the next step takes them.
            results.clear();
            results = launch::each(&mut ranks, |(weights, rank)| rank.run(&exe, weights, batch))?;
            walls.push(started.elapsed());
        }
        let wall = Timing { walls };
        if self.whole {
            let backend = ranks.swap_remove(0).1.backend;
            report_job(
                self.args,
                self.step,
                &Run::new(&exe, backend, results),
                wall,
            )
        } else {
            let (result, rank) = (&results[0], &ranks[0].1);
            report_rank(self.args, self.step, rank, result, wall)
        }
    }
}

/// Every rank ran here: the gathered results, and with `--verify` the full comparison.
fn report_job<B: Backend>(args: &RunArgs, step: &Step, run: &Run<B>, timing: Timing) -> Result<()> {
    let wall = timing.last();
    let Step {
        graph,
        plan,
        batch,
        opts,
        file_names,
        ..
    } = step;
    let report = Report::of(plan);
    let loss = run.loss()?;
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
        let grads = match file_names {
            Some(names) => names.rename(grads),
            None => grads,
        };
        write_safetensors(path, &grads)?;
    }
    if let Some(path) = &args.dump_outputs {
        // The unpartitioned model's shapes: without the plan's vocabulary padding.
        let outputs = graph
            .outputs
            .iter()
            .map(|(name, v)| {
                let t = run.output(name)?;
                Ok((name.clone(), t.cropped(&graph.ty(*v).shape.extents())))
            })
            .collect::<Result<HashMap<_, _>, ferrotron_exec::ExecError>>()?;
        write_safetensors(path, &outputs)?;
    }
    let (fwd, bwd) = run.times();
    let tokens = ferrotron_ir::count::tokens_per_step(graph).unwrap_or(0);
    // One step: its forward and backward (the slowest rank's); repeated: the steady step's wall.
    let tokens_per_second = match timing.steady() {
        Some(steady) => tokens as f64 / steady.as_secs_f64().max(1e-9),
        None => tokens as f64 / (fwd + bwd).as_secs_f64().max(1e-9),
    };
    let checked = if args.verify {
        // The reference: the unpartitioned model, on the CPU, on the same weights and batch.
        let params = step.whole()?;
        let reference = reference_plan(graph)?;
        let theirs = run_all(Cpu::default(), &reference, params, batch, opts)?;
        Some(compare(
            run,
            &theirs,
            params,
            batch,
            opts,
            tolerances(&args.backend),
        )?)
    } else {
        None
    };
    let estimate = report.per_rank.memory_bytes - report.per_rank.optimizer_bytes;
    // Without stages, the peak by liveness over the plan's program (transients included).
    let live_peak = ferrotron_partitioner::liveness::peak_bytes(plan);
    // The rank program's own: its steps (fused) walked as it holds tensors, with an arena.
    let exe = Executable::new(plan, opts)?;
    let memory: Vec<memory::MemoryPlan> = (0..plan.mesh.pp.max(1) as usize)
        .map(|stage| memory::plan(&exe, stage, &|d| run.backend().element_bytes(d)))
        .collect();
    if args.json {
        let mut j = serde_json::json!({
            "model": graph.name,
            "backend": run.backend().name(),
            "tp": plan.mesh.tp,
            "dp": plan.mesh.dp,
            "pp": plan.mesh.pp,
            "micro_batches": plan.micro_batches(),
            "loss": loss,
            "forward_ms": fwd.as_secs_f64() * 1e3,
            "backward_ms": bwd.as_secs_f64() * 1e3,
            "tokens_per_second": tokens_per_second,
            "steps": timing.walls.len(),
            "first_step_s": timing.first().as_secs_f64(),
            "step_s": timing.steady().unwrap_or(wall).as_secs_f64(),
            "peak_bytes_per_rank": run.peak_bytes(),
            "estimated_bytes_per_rank": estimate,
            "liveness_peak_bytes_per_rank": live_peak,
            "planned_peak_bytes_per_rank": memory[0].peak,
            "arena_bytes_per_rank": memory[0].arena,
            "weight_bytes_per_rank": memory[0].weights,
            "live_peak_bytes_per_rank": memory[0].live_peak,
            "arena_missed_last_step": run.ranks.iter().map(|r| r.arena.map(|a| a.missed)).max().flatten(),
            "report": report,
        });
        if let Some(p) = &report.pipeline {
            j["bubble_fraction"] = p.bubble_fraction.into();
            j["peak_bytes_per_stage"] = stage_peaks(run).into();
            j["planned_peak_bytes_per_stage"] =
                memory.iter().map(|m| m.peak).collect::<Vec<_>>().into();
            j["arena_bytes_per_stage"] = memory.iter().map(|m| m.arena).collect::<Vec<_>>().into();
            j["idle_fraction_per_stage"] = stage_idle(run).into();
            j["estimated_bytes_per_stage"] = p
                .per_stage
                .iter()
                .map(|s| s.per_rank.memory_bytes - s.per_rank.optimizer_bytes)
                .collect::<Vec<_>>()
                .into();
        }
        if let Some(v) = &checked {
            j["verified"] = v.passed().into();
            j["max_rel_error"] = v.max_rel_error().into();
            // What was compared: the loss, the gradients, and the outputs where they existed.
            j["verified_tensors"] = v.entries.len().into();
            j["verified_outputs"] = v.entries.iter().any(|e| e.kind == Kind::Output).into();
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
        timing.print();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        match &report.pipeline {
            None => {
                println!(
                    "peak tensor memory per rank: {:.2} MiB measured, {:.2} MiB by liveness over \
                     the plan, {:.2} MiB held through the step (weights + gradients + saved \
                     activations)",
                    mib(run.peak_bytes() as u64),
                    mib(live_peak.unwrap_or(estimate)),
                    mib(estimate)
                );
                let m = &memory[0];
                println!(
                    "memory plan of the rank program: {:.2} MiB peak ({:.2} MiB weights), \
                     its values in an arena of {:.2} MiB ({:.2} MiB live at most)",
                    mib(m.peak),
                    mib(m.weights),
                    mib(m.arena),
                    mib(m.live_peak)
                );
            }
            Some(p) => {
                println!(
                    "peak tensor memory per rank of each stage, measured / planned by the rank \
                     program's memory plan / estimated (weights + gradients + saved activations \
                     of the micro-batches in flight):"
                );
                let stages = stage_peaks(run);
                for (s, ((peak, st), m)) in stages.iter().zip(&p.per_stage).zip(&memory).enumerate()
                {
                    println!(
                        "  stage {s}: {:.2} MiB / {:.2} MiB / {:.2} MiB ({} in flight; arena \
                         {:.2} MiB)",
                        mib(*peak as u64),
                        mib(m.peak),
                        mib(st.per_rank.memory_bytes - st.per_rank.optimizer_bytes),
                        st.in_flight,
                        mib(m.arena)
                    );
                }
                let idle: Vec<String> = stage_idle(run)
                    .iter()
                    .map(|f| format!("{:.1}%", 100.0 * f))
                    .collect();
                println!(
                    "idle per stage: {} (the bubble of equal stages: {:.1}%)",
                    idle.join(", "),
                    100.0 * p.bubble_fraction
                );
            }
        }
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

/// The measured peak of live tensor bytes on each stage's ranks (the largest over its ranks).
fn stage_peaks<B: Backend>(run: &Run<B>) -> Vec<usize> {
    let per = run.plan.mesh.stage_ranks();
    run.ranks
        .chunks(per)
        .map(|stage| stage.iter().map(|r| r.peak_bytes).max().unwrap_or(0))
        .collect()
}

/// Each stage's measured idle fraction of the step (the mean over its ranks).
fn stage_idle<B: Backend>(run: &Run<B>) -> Vec<f64> {
    let per = run.plan.mesh.stage_ranks();
    run.idle_fractions()
        .chunks(per)
        .map(|stage| stage.iter().sum::<f64>() / stage.len().max(1) as f64)
        .collect()
}

/// This process is one rank of the job: rank 0 prints the loss (the last stage's, summed over
/// its data-parallel group and shared with every stage), and with `--verify` every rank checks
/// its own shards of its stage's gradients against the unpartitioned model run here on the CPU.
fn report_rank<B: Backend>(
    args: &RunArgs,
    step: &Step,
    rank: &Rank<B>,
    result: &ferrotron_exec::RankResult<B::Tensor>,
    timing: Timing,
) -> Result<()> {
    let wall = timing.last();
    let plan = &step.plan;
    let be = &rank.backend;
    // Each data-parallel rank of the last stage holds its addend of the loss; the other stages
    // learn the sum from it.
    let mut loss = [match result.values.get(&plan.loss) {
        Some(x) => be.read_scalar(x)?,
        None if rank.coord.pp + 1 < plan.mesh.pp as usize => 0.0,
        None => bail!("the loss was not kept"),
    }];
    rank.sum_over(MeshAxis::Dp, &mut loss, "the loss")?;
    let [stages] = rank.sum_over_stages([f64::from(loss[0])], 0)?;
    loss[0] = stages as f32;
    let index = rank.index();
    if index == 0 {
        println!(
            "run ({}, {} processes): loss {:.6}, forward {:.1} ms, backward {:.1} ms ({:.1} ms wall)",
            be.name(),
            plan.mesh.ranks(),
            loss[0],
            result.forward.as_secs_f64() * 1e3,
            result.backward.as_secs_f64() * 1e3,
            wall.as_secs_f64() * 1e3
        );
        timing.print();
    }
    if !args.verify {
        return Ok(());
    }
    // The reference: the unpartitioned model, here on the CPU, on the same weights and batch.
    let reference = reference_plan(&step.graph)?;
    let theirs = run_all(
        Cpu::default(),
        &reference,
        step.whole()?,
        &step.batch,
        &step.opts,
    )?;
    let v = compare_rank(
        (plan, rank.coord),
        &result.values,
        loss[0],
        be,
        &theirs,
        tolerances(&args.backend),
    )?;
    let c = rank.coord;
    let stage = match plan.mesh.pp {
        1 => String::new(),
        _ => format!(", pp {}", c.pp),
    };
    println!(
        "rank {index} (tp {}, dp {}{stage}): {} gradients and the loss against the unpartitioned \
         model: {} (max relative error {:.3e}, loss {:.3e})",
        c.tp,
        c.dp,
        v.gradients,
        if v.failures.is_empty() {
            "verified"
        } else {
            "MISMATCH"
        },
        v.max_rel_error,
        v.loss_error
    );
    if !v.failures.is_empty() {
        bail!(
            "rank {index} differs from the unpartitioned model: {}",
            v.failures.join("; ")
        );
    }
    Ok(())
}

fn print_verification(v: &Verification) {
    println!(
        "verify against the unpartitioned model: loss {:.6} vs {:.6}",
        v.loss, v.reference_loss
    );
    let mut worst: Vec<&Entry> = v.entries.iter().collect();
    worst.sort_by(|a, b| b.max_rel_error.total_cmp(&a.max_rel_error));
    println!(
        "  {:<44} {:>12} {:>10}",
        "tensor (largest errors first)", "rel. error", "tolerance"
    );
    for e in worst.iter().take(12) {
        println!(
            "  {:<44} {:>12.3e} {:>10.0e} {}",
            e.name,
            e.max_rel_error,
            e.tolerance,
            if e.ok() { "ok" } else { "MISMATCH" }
        );
    }
    if worst.len() > 12 {
        println!("  ... and {} more, all within tolerance", worst.len() - 12);
    }
    if let Some((node, err)) = &v.first_divergence {
        println!("  first op whose output diverges: `{node}` (relative error {err:.3e})");
    }
    let outputs = v.entries.iter().any(|e| e.kind == Kind::Output);
    println!(
        "  {} ({} tensors, max relative error {:.3e}{})",
        if v.passed() { "verified" } else { "MISMATCH" },
        v.entries.len(),
        v.max_rel_error(),
        if outputs {
            ""
        } else {
            "; the output layer ran fused with its loss: the logits were never whole"
        }
    );
}
