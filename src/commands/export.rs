//! `ferrotron export`: a plan drawn as SVG and/or Graphviz DOT, headless; with `--timeline`, its
//! pipeline schedule drawn in time instead.

use crate::args::{write_atomically, PlanArgs};
use anyhow::{anyhow, bail, Result};
use clap::Args;
use ferrotron_partitioner::partition;
use ferrotron_visualizer::export::{self as draw, ExportOptions};
use ferrotron_visualizer::layout::LayoutOptions;
use ferrotron_visualizer::schedule::schedule_svg;
use std::path::PathBuf;

/// The arguments of `ferrotron export`.
#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Write an SVG picture here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Write a Graphviz DOT file here.
    #[arg(long)]
    dot: Option<PathBuf>,
    /// Layers to draw op by op (`--expand 0,3`); `all` for every one.
    #[arg(long, value_delimiter = ',')]
    expand: Vec<String>,
    /// Draw the backward pass too.
    #[arg(long)]
    backward: bool,
    /// Draw the pipeline schedule in time instead of the graph (SVG only): a row per stage, a
    /// box per micro-batch's forward and backward step, the bubble. Needs `--pp` and/or
    /// `--micro-batches`.
    #[arg(long)]
    timeline: bool,
}

/// `ferrotron export`.
pub fn export(args: ExportArgs) -> Result<()> {
    if args.svg.is_none() && args.dot.is_none() {
        bail!("nothing to write: give --svg OUT.svg and/or --dot OUT.dot");
    }
    if args.timeline && args.dot.is_some() {
        bail!("--timeline draws SVG only: give --svg OUT.svg, not --dot");
    }
    let graph = args.plan.load()?;
    let plan = partition(&graph, &args.plan.options())?;
    if args.timeline {
        let doc = schedule_svg(&plan).map_err(anyhow::Error::msg)?;
        if let Some(path) = &args.svg {
            write_atomically(path, doc.as_bytes())?;
            println!("{}", path.display());
        }
        return Ok(());
    }
    let expand_all = args.expand.iter().any(|e| e == "all");
    let expand = args
        .expand
        .iter()
        .filter(|e| *e != "all")
        .map(|e| {
            e.parse::<usize>()
                .map_err(|_| anyhow!("--expand {e}: a layer index or `all`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = ExportOptions {
        layout: LayoutOptions {
            backward: args.backward,
            expand_all,
            expand,
            ..LayoutOptions::default()
        },
    };
    if let Some(path) = &args.svg {
        write_atomically(path, draw::svg(&plan, &opts).as_bytes())?;
        println!("{}", path.display());
    }
    if let Some(path) = &args.dot {
        write_atomically(path, draw::dot(&plan, &opts).as_bytes())?;
        println!("{}", path.display());
    }
    Ok(())
}
