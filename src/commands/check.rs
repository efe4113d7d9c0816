//! `ferrotron check`: a model file parsed, expanded, shape-checked and summarized.

use crate::args::load_options;
use anyhow::Result;
use clap::Args;
use ferrotron_ir::lang::parse_dim_override;
use ferrotron_ir::load_model;
use ferrotron_ir::summary::Summary;
use std::path::PathBuf;

/// The arguments of `ferrotron check`.
#[derive(Args)]
pub struct CheckArgs {
    /// The model file (`models/gpt2-small.ron`).
    model: PathBuf,
    /// Override a named dimension: `--dim layers=2 --dim hidden=128`.
    #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
    dims: Vec<(String, u64)>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `ferrotron check`.
pub fn check(args: CheckArgs) -> Result<()> {
    let graph = load_model(&args.model, &load_options(&args.dims))?;
    let summary = Summary::of(&graph);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{summary}");
    }
    Ok(())
}
