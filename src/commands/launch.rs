//! `ferrotron launch`: the arguments, turned into a [`LaunchConfig`] for `ferrotron-launch`
//! (which holds the logic: rendezvous, workers, failure propagation).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use ferrotron_launch::LaunchConfig;

/// Like `torchrun`: `ferrotron launch --nproc-per-node 2 -- run models/tiny-gpt.ron --tp 2`.
#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Worker processes to start on this node (one per GPU on the CUDA backend).
    #[arg(long, value_name = "N")]
    nproc_per_node: usize,
    /// Nodes in the job; run one launcher on each.
    #[arg(long, default_value_t = 1, value_name = "M")]
    nnodes: usize,
    /// This node's rank, 0..nnodes. Node 0 hosts the rendezvous store.
    #[arg(long, default_value_t = 0, value_name = "R")]
    node_rank: usize,
    /// Node 0's address, as every node reaches it.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    master_addr: String,
    /// The store's port on node 0 (default: any free port on a single node, 29500 on several).
    #[arg(long, value_name = "PORT")]
    master_port: Option<u16>,
    /// Seconds the nodes wait for each other; also the workers' bound on every wait for a peer.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    timeout: u64,
    /// Seconds a stopped worker gets between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    grace: f64,
    /// Launch this program instead of ferrotron (like torchrun's `--no-python`).
    #[arg(long, value_name = "PROGRAM")]
    exec: Option<PathBuf>,
    /// Pass the workers' output through as is, without the `[rank R] ` prefixes.
    #[arg(long)]
    no_prefix: bool,
    /// The job's id (default: node 0 makes one up); workers see it as FERROTRON_RUN_ID.
    #[arg(long)]
    run_id: Option<String>,
    /// The worker's arguments, after `--`: a ferrotron subcommand (`run MODEL.ron --tp 2`), or
    /// the program's arguments with `--exec`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

/// Runs this node's part of the job; fails (naming the rank) unless every rank exits 0.
pub fn launch(args: LaunchArgs) -> Result<()> {
    let program = match args.exec {
        Some(p) => p,
        None => {
            if args.args.is_empty() {
                bail!(
                    "nothing to launch: give the ferrotron subcommand after `--` \
                     (`ferrotron launch --nproc-per-node 2 -- run MODEL.ron --tp 2`), \
                     or a program with --exec"
                );
            }
            std::env::current_exe()
                .map_err(|e| anyhow!("cannot find the ferrotron binary to re-execute: {e}"))?
        }
    };
    if !(args.grace.is_finite() && args.grace >= 0.0) {
        bail!("--grace {} is not a number of seconds", args.grace);
    }
    let config = LaunchConfig {
        nproc_per_node: args.nproc_per_node,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master_addr: args.master_addr,
        master_port: args
            .master_port
            .unwrap_or(if args.nnodes > 1 { 29500 } else { 0 }),
        program,
        args: args.args,
        timeout: Duration::from_secs(args.timeout),
        grace: Duration::from_secs_f64(args.grace.min(1e6)),
        prefix_output: !args.no_prefix,
        run_id: args.run_id,
    };
    ferrotron_launch::launch(&config)?;
    Ok(())
}
