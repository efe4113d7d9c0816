//! `ferrotron reshard`: a checkpoint rewritten for another tensor-parallel degree.

use crate::args::PlanArgs;
use anyhow::Result;
use clap::Args;
use ferrotron_io::checkpoint;
use ferrotron_partitioner::partition;
use std::path::PathBuf;

/// The arguments of `ferrotron reshard`.
#[derive(Args)]
pub struct ReshardArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// The checkpoint to read.
    #[arg(long)]
    from: PathBuf,
    /// Where to write the re-sharded one.
    #[arg(long)]
    to: PathBuf,
}

/// `ferrotron reshard`.
pub fn reshard(args: ReshardArgs) -> Result<()> {
    let graph = args.plan.load()?;
    let plan = partition(&graph, &args.plan.options())?;
    checkpoint::reshard(&args.from, &args.to, &plan)?;
    println!(
        "{} → {} for tp = {}, pp = {}",
        args.from.display(),
        args.to.display(),
        plan.mesh.tp,
        plan.mesh.pp
    );
    Ok(())
}
