//! The `ferrotron` command line: parses arguments and calls the libraries. It holds no logic of
//! its own; each subcommand is one file of `commands/` over the crates, and `ranks.rs` says
//! which ranks of a job this process runs (all of them as threads, or the one `ferrotron
//! launch` gave it). The CUDA backend and the desktop viewer are cargo features (`cuda`, `gui`),
//! both on by default.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod args;
mod commands;
mod ranks;

use commands::{
    check, export, generate, launch, partition, plan, reshard, run, simulate, train, view,
};

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
    Check(check::CheckArgs),
    /// Write a model file from a Hugging Face `config.json` (GPT-2, Llama, Mistral, Qwen2,
    /// BERT) with the zoo's blocks, and check that it loads.
    Import(commands::import::ImportArgs),
    /// Partition a model for tensor (× data) parallelism, differentiate it, verify the plan,
    /// and print what it communicates and stores per rank.
    Partition(partition::PartitionArgs),
    /// Partition a model and run one forward + backward step, on CPU threads or a GPU (one
    /// thread per rank; under `ferrotron launch`, one process per rank), on deterministic
    /// weights and a random batch; with `--verify`, compare the loss, the outputs and every
    /// gradient with the unpartitioned model's.
    Run(run::RunArgs),
    /// Train a model on a text file: AdamW with warm-up and cosine decay, gradient clipping,
    /// on CPU threads or a GPU (one thread per rank). Batch and sequence length are the model's
    /// `batch` and `seq` dimensions.
    Train(train::TrainArgs),
    /// Predict a plan's step time, throughput and memory on a cluster (a cost model over the
    /// plan); or, with `--weak-scaling`, reproduce the Megatron paper's weak-scaling study.
    Simulate(simulate::SimulateArgs),
    /// Choose how to run a model on a cluster: every tp × dp (× sequence parallelism ×
    /// recomputation) priced by the cost model, ranked by throughput among those that fit.
    Plan(plan::PlanCommandArgs),
    /// Draw how a model was partitioned, headless: layouts coloured by layout (replicated,
    /// split by column or row, partial sum), collectives labelled (the paper's f and g), edges
    /// with shard-local shapes; layers collapsed unless expanded.
    Export(export::ExportArgs),
    /// Open the desktop viewer: the partitioned graph coloured by layout, layers that expand
    /// on click, a property panel, and tp / dp / sequence parallelism changed live.
    View(view::ViewArgs),
    /// Rewrite a checkpoint for another tensor-parallel degree.
    Reshard(reshard::ReshardArgs),
    /// Write a checkpoint as a Hugging Face model directory (`config.json` +
    /// `model.safetensors`, the family's names) that `transformers` and `run --weights` load.
    ExportHf(commands::export_hf::ExportHfArgs),
    /// Sample text from a trained checkpoint (greedy, or with `--temperature`).
    Generate(generate::GenerateArgs),
    /// Start N worker processes on this node (like torchrun), each told its rank, meeting the
    /// other nodes' launchers at a rendezvous store; if any rank fails, stop every rank.
    Launch(launch::LaunchArgs),
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check(a) => check::check(a),
        Command::Import(a) => commands::import::import(a),
        Command::Partition(a) => partition::partition(a),
        Command::Run(a) => run::run(a),
        Command::Train(a) => train::train(a),
        Command::Simulate(a) => simulate::simulate(a),
        Command::Plan(a) => plan::plan(a),
        Command::Export(a) => export::export(a),
        Command::View(a) => view::view(a),
        Command::Reshard(a) => reshard::reshard(a),
        Command::ExportHf(a) => commands::export_hf::export_hf(a),
        Command::Generate(a) => generate::generate(a),
        Command::Launch(a) => launch::launch(a),
    }
}

fn main() -> ExitCode {
    ferrotron_cpu::tune_allocator();
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if stopped_by_peer(&e) {
                ExitCode::from(ferrotron_launch::PEER_FAILED_EXIT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Whether this rank failed only because another rank did: the launcher then reports the other.
fn stopped_by_peer(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<ferrotron_exec::ExecError>(),
            Some(ferrotron_exec::ExecError::Comm {
                error: ferrotron_exec::CommError::PeerFailed { .. },
                ..
            })
        ) || matches!(
            cause.downcast_ref::<ferrotron_exec::CommError>(),
            Some(ferrotron_exec::CommError::PeerFailed { .. })
        )
    })
}
