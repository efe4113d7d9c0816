//! `ferrotron export-hf`: a checkpoint (`train --save`) written as a `transformers` model
//! directory, `config.json` + `model.safetensors` in the family's names and layout
//! (`ferrotron_io::export`), which `from_pretrained` and `run --weights` read.

use anyhow::Result;
use clap::Args;
use ferrotron_io::export::export_hf as export;
use std::path::PathBuf;

/// The arguments of `ferrotron export-hf`.
#[derive(Args)]
pub struct ExportHfArgs {
    /// The checkpoint directory (`meta.json` and the rank files), at any tp.
    checkpoint: PathBuf,
    /// The `config.json` the checkpoint's model was imported from (or its directory), copied
    /// into the output: the hyper-parameters the weights do not carry. Without it, the one the
    /// checkpoint recorded when it was trained from `--weights DIR`.
    #[arg(long, value_name = "DIR|config.json")]
    config: Option<PathBuf>,
    /// The model directory to write (created if missing; its two files replaced atomically).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
}

/// `ferrotron export-hf`.
pub fn export_hf(args: ExportHfArgs) -> Result<()> {
    let e = export(&args.checkpoint, args.config.as_deref(), &args.output)?;
    println!(
        "wrote {} ({} {} tensors, step {}): config.json, model.safetensors",
        args.output.display(),
        e.tensors,
        e.family.architecture(),
        e.step
    );
    Ok(())
}
