//! `ferrotron view`: the desktop viewer (cargo feature `gui`, on by default), opened on a model
//! or a plan file.

use crate::args::{load_options, PlanArgs};
use anyhow::Result;
use clap::Args;

/// The arguments of `ferrotron view`.
#[derive(Args)]
pub struct ViewArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Layers to open drawn op by op (`--expand 0,3`); the others open collapsed.
    #[arg(long, value_delimiter = ',')]
    expand: Vec<usize>,
    /// Open with the backward pass drawn.
    #[arg(long)]
    backward: bool,
    /// Time N frames while the graph pans (at the opening view, then fitted to the window),
    /// print the frame times and close.
    #[arg(long, value_name = "N")]
    bench_frames: Option<usize>,
}

/// `ferrotron view`.
#[cfg(feature = "gui")]
pub fn view(args: ViewArgs) -> Result<()> {
    use ferrotron_visualizer::app;
    let view = app::RunOptions {
        expand: args.expand,
        backward: args.backward,
        bench_frames: args.bench_frames,
    };
    // The plan runs one micro-batch's model.
    let load = load_options(&args.plan.micro_batch_dims()?);
    app::run(args.plan.model.clone(), load, args.plan.options(), view).map_err(anyhow::Error::msg)
}

/// `ferrotron view` in a build without the viewer.
#[cfg(not(feature = "gui"))]
pub fn view(args: ViewArgs) -> Result<()> {
    let _ = (load_options, args);
    anyhow::bail!(
        "this ferrotron was built without the viewer: build it with the cargo feature `gui` (on \
         by default), or draw the plan with `ferrotron export`"
    )
}
