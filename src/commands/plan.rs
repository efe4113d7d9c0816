//! `ferrotron plan`: every tp × pp × dp × micro-batches × schedule (× sequence parallelism ×
//! recomputation) for a number of GPUs priced by the cost model, the best that fits first, and
//! why it wins.

use crate::args::load_options;
use crate::commands::simulate::{parse_dtype, read_cluster};
use anyhow::{anyhow, Result};
use clap::Args;
use ferrotron_ir::lang::parse_dim_override;
use ferrotron_ir::load_model;
use ferrotron_partitioner::cost::EstimateOptions;
use ferrotron_partitioner::planner::{choose_in, Space};
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
    /// The global batch (default: the model's `batch`).
    #[arg(long)]
    batch: Option<u64>,
    /// Price every float at this dtype (`f16`, `bf16`, `f32`; default: the model's).
    #[arg(long)]
    dtype: Option<String>,
    /// Override a named dimension.
    #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
    dims: Vec<(String, u64)>,
    /// One pipeline stage and one micro-batch only (tp × dp).
    #[arg(long)]
    no_pipeline: bool,
    /// Candidates to list.
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
    let space = if args.no_pipeline {
        Space::one_stage()
    } else {
        Space::full()
    };
    let choice =
        choose_in(load, &cluster, args.gpus, args.batch, &opts, &space).map_err(|e| anyhow!(e))?;
    let took = started.elapsed();
    if args.json {
        println!("{}", serde_json::to_string(&choice)?);
        return Ok(());
    }
    println!(
        "{:>5} {:>4} {:>6} {:>6} {:>8} {:>3} {:>9} {:>12} {:>9} {:>7} {:>10} {:>5}",
        "tp",
        "pp",
        "dp",
        "micro",
        "schedule",
        "SP",
        "recompute",
        "tokens/s",
        "step (s)",
        "bubble",
        "GiB/GPU",
        "fits"
    );
    for c in choice.candidates.iter().take(args.top) {
        match &c.estimate {
            Some(s) => println!(
                "{:>5} {:>4} {:>6} {:>6} {:>8} {:>3} {:>9} {:>12.0} {:>9.3} {:>6.1}% {:>10.1} {:>5}",
                c.tp,
                c.pp,
                c.dp,
                c.micro_batches,
                c.schedule.map_or("-".to_owned(), |s| s.to_string()),
                if c.sequence_parallel { "yes" } else { "no" },
                if c.recompute { "yes" } else { "no" },
                c.tokens_per_second,
                s.step_time_s,
                100.0 * s.bubble_fraction,
                s.memory_bytes_per_gpu as f64 / f64::from(1 << 30),
                if s.fits { "yes" } else { "no" }
            ),
            None => println!(
                "{:>5} {:>4} {:>6}  -- {}",
                c.tp,
                c.pp,
                c.dp,
                c.error.as_deref().unwrap_or("")
            ),
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
