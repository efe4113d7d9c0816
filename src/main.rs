//! The `ferrotron` command line: parses arguments and calls the libraries. It holds no logic of
//! its own; each subcommand is a few lines over `ferrotron-ir` (and, as they land, the
//! partitioner and the runtimes).

use anyhow::Result;
use clap::{Parser, Subcommand};
use ferrotron_ir::lang::parse_dim_override;
use ferrotron_ir::summary::Summary;
use ferrotron_ir::{load_model, LoadOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// A compiler and runtime for Megatron-style tensor model parallelism.
#[derive(Parser)]
#[command(name = "ferrotron", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse a model file, expand its blocks, infer every shape, verify, and print a summary.
    Check {
        /// The model file (`models/gpt2-small.ron`).
        model: PathBuf,
        /// Override a named dimension: `--dim layers=2 --dim hidden=128`.
        #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
        dims: Vec<(String, u64)>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check { model, dims, json } => {
            let opts = LoadOptions {
                overrides: dims,
                ..LoadOptions::default()
            };
            let graph = load_model(&model, &opts)?;
            let summary = Summary::of(&graph);
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print!("{summary}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
