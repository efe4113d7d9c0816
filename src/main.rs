//! The `ferrotron` command line: parses arguments and calls the libraries. It holds no logic of
//! its own; each subcommand is a few lines over `ferrotron-ir` (and, as they land, the
//! partitioner and the runtimes).

use anyhow::Result;
use clap::{Parser, Subcommand};
use ferrotron_ir::lang::parse_dim_override;
use ferrotron_ir::summary::Summary;
use ferrotron_ir::{load_model, LoadOptions};
use ferrotron_partitioner::{partition, verify_plan, Layout, PartitionOptions, Report};
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
    /// Partition a model for tensor (× data) parallelism, differentiate it, verify the plan,
    /// and print what it communicates and stores per rank.
    Partition {
        /// The model file.
        model: PathBuf,
        /// Tensor-parallel degree.
        #[arg(long, default_value_t = 1)]
        tp: u64,
        /// Data-parallel degree.
        #[arg(long, default_value_t = 1)]
        dp: u64,
        /// Split the activations between tensor-parallel regions along the sequence.
        #[arg(long)]
        sequence_parallel: bool,
        /// Pad the vocabulary to a multiple of this × tp.
        #[arg(long, default_value_t = 128)]
        vocab_multiple: u64,
        /// Fix a parameter's layout: `--pin h.0.mlp.c_fc.weight=replicated` (or `split(1)`).
        #[arg(long = "pin", value_name = "PARAM=LAYOUT", value_parser = parse_pin)]
        pins: Vec<(String, Layout)>,
        /// Override a named dimension: `--dim layers=2`.
        #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
        dims: Vec<(String, u64)>,
        /// Write the plan (RON) here.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also print how long each phase took.
        #[arg(long)]
        timings: bool,
    },
}

fn parse_pin(s: &str) -> Result<(String, Layout), String> {
    let (name, layout) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("`{s}`: expected PARAM=LAYOUT"))?;
    let layout = match layout.trim() {
        "replicated" => Layout::Replicated,
        other => {
            let d = other
                .strip_prefix("split(")
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|d| d.trim().parse().ok())
                .ok_or_else(|| {
                    format!("`{other}`: a layout is `replicated` or `split(D)` (D a dimension)")
                })?;
            Layout::Split(d)
        }
    };
    Ok((name.trim().to_owned(), layout))
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
        Command::Partition {
            model,
            tp,
            dp,
            sequence_parallel,
            vocab_multiple,
            pins,
            dims,
            output,
            json,
            timings,
        } => {
            let start = std::time::Instant::now();
            let opts = LoadOptions {
                overrides: dims,
                ..LoadOptions::default()
            };
            let graph = load_model(&model, &opts)?;
            let loaded = start.elapsed();
            let options = PartitionOptions {
                tp,
                dp,
                sequence_parallel,
                vocab_multiple,
                pins,
            };
            let plan = partition(&graph, &options)?;
            let partitioned = start.elapsed() - loaded;
            verify_plan(&plan)?;
            let verified = start.elapsed() - loaded - partitioned;
            if let Some(path) = &output {
                plan.save(path)?;
            }
            let report = Report::of(&plan);
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
                if let Some(path) = &output {
                    println!("plan written to {}", path.display());
                }
            }
            if timings {
                eprintln!(
                    "load {:.1} ms, partition + autodiff {:.1} ms, verify {:.1} ms",
                    loaded.as_secs_f64() * 1e3,
                    partitioned.as_secs_f64() * 1e3,
                    verified.as_secs_f64() * 1e3
                );
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
