//! `ferrotron import`: a model file written from a Hugging Face `config.json`
//! (`ferrotron_io::import`), loaded back before it is reported.

use anyhow::Result;
use clap::Args;
use ferrotron_io::import::{import as import_config, ImportOptions};
use ferrotron_ir::summary::Summary;
use std::path::PathBuf;

/// The arguments of `ferrotron import`.
#[derive(Args)]
pub struct ImportArgs {
    /// A model directory holding `config.json`, or the config file itself.
    config: PathBuf,
    /// The model file to write (replaced atomically if it exists).
    #[arg(short, long, value_name = "MODEL.ron")]
    output: PathBuf,
    /// The model's name [default: the output file's name without `.ron`].
    #[arg(long)]
    name: Option<String>,
    /// The `seq` dimension: a default that `--dim seq=N` overrides [default: the config's
    /// context, at most 2048 and the sliding window].
    #[arg(long)]
    seq: Option<u64>,
    /// The `batch` dimension: a default that `--dim batch=N` overrides.
    #[arg(long, default_value_t = 8)]
    batch: u64,
}

/// `ferrotron import`.
pub fn import(args: ImportArgs) -> Result<()> {
    let opts = ImportOptions {
        name: args.name,
        seq: args.seq,
        batch: args.batch,
    };
    let (imported, graph) = import_config(&args.config, &args.output, &opts)?;
    println!(
        "wrote {} ({} config, the block structure of {})",
        args.output.display(),
        imported.family,
        imported.family.zoo_file()
    );
    print!("{}", Summary::of(&graph));
    for note in &imported.notes {
        println!("note: {note}");
    }
    if !imported.unread.is_empty() {
        println!(
            "note: config keys not read, check that they change nothing: {}",
            imported.unread.join(", ")
        );
    }
    Ok(())
}
