//! The visualizer: how a model was partitioned, drawn. It reads a [`Plan`] from the partitioner
//! (an SPMD graph with a layout per value, the collectives as nodes) and never touches the
//! runtime.
//!
//! ```text
//! Plan ─► layout (layered DAG: layers collapsed, ranks, barycentre order, x/y) ─► export: SVG, DOT
//!                                                                            └─► GUI (app)
//!      ─► partitioner::timeline (the pipeline schedule in time) ─► schedule: SVG, GUI (app)
//! ```
//!
//! - [`layout`]: a layered, top-to-bottom layout of the plan's graph, each transformer layer
//!   collapsed into one box unless expanded, forward only or forward + backward. The GUI will
//!   draw the same [`layout::GraphLayout`].
//! - `app` (cargo feature `gui`, on by default): the desktop viewer (egui/eframe): the same layout drawn with pan, zoom, search,
//!   live re-partitioning, a property panel (with the node's FLOPs and bytes), a summary
//!   chart, and for a pipelined plan a schedule view; `app::run` opens the window.
//! - [`stats`]: the numbers those panels show, from the IR's per-op FLOP counts and the
//!   partitioner's [`Report`](ferrotron_partitioner::Report).
//! - [`export`]: a self-contained SVG and Graphviz DOT, every op and parameter coloured by its
//!   tensor-parallel layout with a legend, the collectives as distinctive nodes labelled with the
//!   paper's f and g and with what they do forward and backward, edges labelled with shard-local
//!   shapes (what `ferrotron export` writes); with pipeline stages, a band per box in its
//!   stage's colour.
//! - [`svg`]: the SVG text both pictures share.
//! - [`schedule`]: the pipeline schedule in time (a row per stage, a box per micro-batch's forward
//!   and backward step, the bubble hatched), from the partitioner's timeline (what
//!   `ferrotron export --timeline` writes, and the viewer's schedule view).
//!
//! ```no_run
//! # use ferrotron_visualizer::{export, layout::LayoutOptions};
//! # fn f(plan: &ferrotron_partitioner::Plan) {
//! let opts = export::ExportOptions {
//!     layout: LayoutOptions { backward: true, expand: vec![0, 3], ..Default::default() },
//! };
//! std::fs::write("plan.svg", export::svg(plan, &opts)).unwrap();
//! std::fs::write("plan.dot", export::dot(plan, &opts)).unwrap();
//! # }
//! ```
//!
//! [`Plan`]: ferrotron_partitioner::Plan
#![warn(missing_docs)]

#[cfg(feature = "gui")]
pub mod app;
pub mod export;
pub mod layout;
pub mod schedule;
pub mod stats;
pub mod svg;
