//! `ferrotron generate`: text continued from a prompt with a trained checkpoint, the forward
//! pass on the plan's ranks (CPU threads), without dropout whatever the model file says.

use crate::args::PlanArgs;
use anyhow::Result;
use clap::Args;
use ferrotron_cpu::Cpu;
use ferrotron_io::checkpoint;
use ferrotron_io::generate::{generate as continue_text, Sampling};
use ferrotron_io::tokenizer::Tokenizer;
use ferrotron_partitioner::partition;
use std::path::PathBuf;

/// The arguments of `ferrotron generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// The checkpoint directory (`train --save`) whose weights generate.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// `bytes`, `gpt2`, or a Hugging Face tokenizer's directory or `tokenizer.json`, as
    /// trained: it encodes the prompt and decodes what is printed. Default: the one the
    /// checkpoint was trained with (its `meta.json`), else `bytes`.
    #[arg(long, value_name = "NAME|PATH")]
    tokenizer: Option<String>,
    /// Softmax temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// `ferrotron generate`.
pub fn generate(mut args: GenerateArgs) -> Result<()> {
    // Inference: whatever rates the model file gives its dropouts, none is applied.
    args.plan.dropout = Some(0.0);
    let graph = args.plan.load()?;
    let plan = partition(&graph, &args.plan.options())?;
    let name = match &args.tokenizer {
        Some(name) => name.clone(),
        None => checkpoint::read_meta(&args.checkpoint)?
            .extra
            .get("tokenizer")
            .and_then(|t| t.as_str())
            .unwrap_or("bytes")
            .to_owned(),
    };
    let tokenizer = Tokenizer::named(&name)?;
    // Every prompt token must index the embedding, and every id the model predicts is one the
    // tokenizer may decode.
    if let Some(d) = graph
        .output("logits")
        .and_then(|v| graph.ty(v).shape.last().map(|d| d.size))
    {
        tokenizer.check(d)?;
    }
    let sampling = Sampling {
        tokens: args.tokens,
        temperature: args.temperature,
        seed: args.seed,
    };
    let text = continue_text(
        Cpu::default(),
        (&graph, &plan),
        &args.checkpoint,
        &tokenizer,
        &args.prompt,
        sampling,
    )?;
    println!("{text}");
    Ok(())
}
