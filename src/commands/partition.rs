//! `ferrotron partition`: a model partitioned, differentiated and verified; what the plan
//! communicates and stores per rank, and the plan itself written as RON.

use crate::args::{write_atomically, PlanArgs};
use anyhow::Result;
use clap::Args;
use ferrotron_partitioner::{partition as make_plan, verify_plan, Report};
use std::path::PathBuf;

/// The arguments of `ferrotron partition`.
#[derive(Args)]
pub struct PartitionArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Write the plan (RON) here.
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also print how long each phase took.
    #[arg(long)]
    timings: bool,
}

/// `ferrotron partition`.
pub fn partition(args: PartitionArgs) -> Result<()> {
    let start = std::time::Instant::now();
    let graph = args.plan.load()?;
    let loaded = start.elapsed();
    let plan = make_plan(&graph, &args.plan.options())?;
    let partitioned = start.elapsed() - loaded;
    verify_plan(&plan)?;
    let verified = start.elapsed() - loaded - partitioned;
    if let Some(path) = &args.output {
        write_atomically(path, plan.to_ron().as_bytes())?;
    }
    let report = Report::of(&plan);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
        if let Some(path) = &args.output {
            println!("plan written to {}", path.display());
        }
    }
    if args.timings {
        eprintln!(
            "load {:.1} ms, partition + autodiff {:.1} ms, verify {:.1} ms",
            loaded.as_secs_f64() * 1e3,
            partitioned.as_secs_f64() * 1e3,
            verified.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
