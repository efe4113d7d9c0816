//! `ferrotron plan`: every tp × pp × dp × model chunks × micro-batch size × schedule ×
//! sequence parallelism × recomputation × ZeRO stage for a number of GPUs priced by the cost
//! model, the best that fits first, why it wins, and why the rejected ones cannot run. Any of
//! them can be fixed in Megatron's terms, so a published configuration is priced as written.

use crate::args::load_options;
use crate::commands::simulate::{parse_dtype, read_cluster};
use anyhow::{anyhow, Result};
use clap::Args;
use ferrotron_ir::lang::parse_dim_override;
use ferrotron_ir::load_model;
use ferrotron_partitioner::cost::EstimateOptions;
use ferrotron_partitioner::planner::{choose_in, Space};
use ferrotron_partitioner::Recompute;
use std::path::PathBuf;

/// The arguments of `ferrotron plan`.
#[derive(Args)]
pub struct PlanCommandArgs {
    /// The model file.
    model: PathBuf,
    /// The cluster specification.
    #[arg(long)]
    cluster: PathBuf,
    /// GPUs to use.
    #[arg(long)]
    gpus: u64,
    /// The global batch: sequences per step over all replicas (default: the model's `batch`).
    #[arg(long, alias = "batch")]
    global_batch: Option<u64>,
    /// Fix the sequences per replica in one micro-batch (Megatron's `--micro-batch-size`).
    #[arg(long)]
    micro_batch_size: Option<u64>,
    /// Fix the tensor-parallel degree.
    #[arg(long)]
    tp: Option<u64>,
    /// Fix the pipeline stages.
    #[arg(long)]
    pp: Option<u64>,
    /// Fix the model chunks per stage (above 1: the interleaved schedule).
    #[arg(long)]
    virtual_stages: Option<u64>,
    /// Fix the recomputation: `none`, `selective` or `full` (default: search all three).
    #[arg(long)]
    recompute: Option<Recompute>,
    /// Fix the ZeRO stage: 0 or 1 (default: search both).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=1))]
    zero: Option<u8>,
    /// Fix sequence parallelism on (default: search with and without).
    #[arg(long)]
    sequence_parallel: bool,
    /// Price every float at this dtype (`f16`, `bf16`, `f32`; default: the model's).
    #[arg(long)]
    dtype: Option<String>,
    /// Override a named dimension.
    #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
    dims: Vec<(String, u64)>,
    /// One pipeline stage and one micro-batch only (tp × dp).
    #[arg(long)]
    no_pipeline: bool,
    /// Candidates to list, and rejected ones.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `ferrotron plan`.
pub fn plan(args: PlanCommandArgs) -> Result<()> {
    let cluster = read_cluster(&args.cluster)?;
    let opts = EstimateOptions {
        compute_dtype: parse_dtype(args.dtype.as_deref())?,
        ..EstimateOptions::default()
    };
    let started = std::time::Instant::now();
    let load = |batch: Option<u64>| {
        let mut dims = args.dims.clone();
        if let Some(b) = batch {
            dims.retain(|(n, _)| n != "batch");
            dims.push(("batch".into(), b));
        }
        load_model(&args.model, &load_options(&dims)).map_err(|e| e.to_string())
    };
    let mut space = if args.no_pipeline {
        Space::one_stage()
    } else {
        Space::full()
    };
    space.tp = args.tp;
    space.pp = args.pp;
    space.virtual_stages = args.virtual_stages;
    space.micro_batch_size = args.micro_batch_size;
    if let Some(r) = args.recompute {
        space.recompute = vec![r];
    }
    if let Some(z) = args.zero {
        space.zero = vec![z];
    }
    if args.sequence_parallel {
        space.sequence_parallel = vec![true];
    }
    let choice = choose_in(load, &cluster, args.gpus, args.global_batch, &opts, &space)
        .map_err(|e| anyhow!(e))?;
    let took = started.elapsed();
    if args.json {
        println!("{}", serde_json::to_string(&choice)?);
        return Ok(());
    }
    println!(
        "{:>5} {:>4} {:>2} {:>6} {:>5} {:>5} {:>11} {:>3} {:>9} {:>4} {:>12} {:>9} {:>7} {:>8} \
         {:>5}",
        "tp",
        "pp",
        "V",
        "dp",
        "mbs",
        "micro",
        "schedule",
        "SP",
        "recompute",
        "zero",
        "tokens/s",
        "step (s)",
        "bubble",
        "GiB/GPU",
        "fits"
    );
    let priced: Vec<_> = choice
        .candidates
        .iter()
        .filter_map(|c| c.estimate.as_ref().map(|s| (c, s)))
        .collect();
    for &(c, s) in priced.iter().take(args.top) {
        println!(
            "{:>5} {:>4} {:>2} {:>6} {:>5} {:>5} {:>11} {:>3} {:>9} {:>4} {:>12.0} {:>9.3} \
             {:>6.1}% {:>8.1} {:>5}",
            c.tp,
            c.pp,
            c.virtual_stages,
            c.dp,
            c.micro_batch_size,
            c.micro_batches,
            c.schedule.map_or("-".to_owned(), |s| s.to_string()),
            if c.sequence_parallel { "yes" } else { "no" },
            c.recompute.to_string(),
            c.zero,
            c.tokens_per_second,
            s.step_time_s,
            100.0 * s.bubble_fraction,
            s.memory_bytes_per_gpu as f64 / f64::from(1 << 30),
            if s.fits { "yes" } else { "no" }
        );
    }
    // Why the others cannot run: those priced that do not fit (by how much they are over),
    // then those refused outright (divisibility, the partitioner's errors).
    let over: Vec<_> = choice
        .candidates
        .iter()
        .filter(|c| c.estimate.as_ref().is_some_and(|s| !s.fits))
        .collect();
    let refused: Vec<_> = choice
        .candidates
        .iter()
        .filter(|c| c.estimate.is_none())
        .collect();
    if !over.is_empty() {
        println!(
            "\ndo not fit in memory ({} priced; the fastest {}):",
            over.len(),
            args.top.min(over.len())
        );
        for c in over.iter().take(args.top) {
            println!(
                "  tp {} pp {} V {} dp {} mbs {}{} recompute {} zero {}: {}",
                c.tp,
                c.pp,
                c.virtual_stages,
                c.dp,
                c.micro_batch_size,
                if c.sequence_parallel { " SP" } else { "" },
                c.recompute,
                c.zero,
                c.why_not().unwrap_or_default()
            );
        }
    }
    if !refused.is_empty() {
        println!("\ncannot run ({}):", refused.len());
        for c in refused.iter().take(args.top) {
            println!(
                "  tp {} pp {} dp {}: {}",
                c.tp,
                c.pp,
                c.dp,
                c.why_not().unwrap_or_default()
            );
        }
    }
    println!("\n{}", choice.explanation);
    eprintln!(
        "{} candidates priced in {:.0} ms ({} more skipped: they could not be faster or fit)",
        choice.candidates.len(),
        took.as_secs_f64() * 1e3,
        choice.skipped
    );
    Ok(())
}
