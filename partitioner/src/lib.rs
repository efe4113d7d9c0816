//! The partitioner: turns the one-device [`ferrotron_ir::Graph`] into a tensor-parallel ×
//! data-parallel [`Plan`]: an SPMD graph every rank runs, a layout for every value.
//!
//! ```text
//! Graph ─► strategy (Megatron layouts from the dataflow, user pins) ─► lower (SPMD graph,
//!       conversions, f/g, sequence parallelism) ─► ir::autodiff ─► gradient reductions
//!       ─► recompute ─► cut (pipeline stages) ─► check::verify_plan ─► Plan ─► report (collectives, memory per rank)
//! ```
//!
//! - [`layout`]: the layout algebra (replicated / split / partial).
//! - [`liveness`]: a rank's peak memory by liveness over the plan's program.
//! - [`mesh`]: the device mesh (rank ↔ coordinates) and shard geometry (which indices a rank
//!   holds): the one place that slices by rank.
//! - [`rules`]: each op's sharding rules on one mesh axis.
//! - [`strategy`]: phase 1, the Megatron strategy found from the dataflow.
//! - [`lower`]: phase 2, the SPMD plan for a mesh, with autodiff.
//! - [`check`]: layout inference with fused-weight blocks, and the plan verifier.
//! - [`cut`]: the program cut into pipeline stages, balanced by work.
//! - [`pipeline`]: the stages, the values crossing them, and each stage's schedule.
//! - [`timeline`]: the pipeline schedule in time: each stage's steps priced by FLOPs, its bubble.
//! - [`recompute`]: activation recomputation (full, selective) as a rewrite of the plan graph.
//! - [`plan`]: the plan and its parameter shards.
//! - [`planfile`]: plans as RON text, verified when read.
//! - [`planner`]: which tp × pp × dp (× micro-batches × schedule × sequence parallelism ×
//!   recomputation) to run on a cluster.
//! - [`report`]: what a plan communicates and stores per rank.
//! - [`simulate`]: the executable semantics of a plan, run on simulated ranks in `f64`.
//! - [`cost`]: the cost model: cluster files, step time, throughput, memory, weak scaling.
//! - [`published`]: the cost model and the planner against published runs (the PTD-P table).
#![warn(missing_docs)]

pub mod check;
pub mod cost;
pub mod cut;
pub mod layout;
pub mod liveness;
pub mod lower;
pub mod mesh;
pub mod pipeline;
pub mod plan;
pub mod planfile;
pub mod planner;
pub mod published;
pub mod recompute;
pub mod report;
pub mod rules;
pub mod simulate;
pub mod strategy;
pub mod timeline;

pub use check::{value_blocks, verify_plan, PlanError};
pub use layout::{Layout, MeshLayout};
pub use lower::partition;
pub use mesh::{Coord, Mesh, Region};
pub use pipeline::{Pipeline, Schedule};
pub use plan::{ParamShard, PartitionOptions, Plan};
pub use planfile::PlanFileError;
pub use recompute::Recompute;
pub use report::Report;

use ferrotron_ir::{AutodiffError, Dim};
use rules::RuleError;
use thiserror::Error;

/// Why a graph cannot be partitioned as asked.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum PartitionError {
    /// The options are out of range.
    #[error("{0}")]
    Options(String),
    /// A pin names no parameter.
    #[error("no parameter is named `{name}`{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownParam {
        /// The name given.
        name: String,
        /// The closest parameter name.
        suggestion: Option<String>,
    },
    /// A dimension that must be split does not divide by the group.
    #[error(
        "`{value}`: dimension {dim} is split across the {parts} ranks of the {axis} group, \
         but is not divisible by {parts}; valid {axis} sizes for this model: {valid}"
    )]
    Indivisible {
        /// The value or parameter whose dimension it is.
        value: String,
        /// The dimension (with its model-file name).
        dim: Dim,
        /// `tp` or `dp`.
        axis: &'static str,
        /// The group size.
        parts: u64,
        /// The group sizes that would work.
        valid: String,
    },
    /// No op can run on its inputs' layouts, even after conversions.
    #[error("node `{node}` ({op}): {error}")]
    Rule {
        /// The node's name.
        node: String,
        /// Its op's name (`MatMul`).
        op: &'static str,
        /// Why.
        error: RuleError,
    },
    /// The graph has no scalar loss to differentiate.
    #[error("the model has no scalar output (name it `loss`) to differentiate")]
    NoLoss,
    /// Autodiff failed.
    #[error("autodiff: {0}")]
    Autodiff(AutodiffError),
    /// A bug: the partitioner produced something it cannot lay out.
    #[error("internal error at `{node}`: {what} (please report this with the model file)")]
    Internal {
        /// Where.
        node: String,
        /// What went wrong.
        what: String,
    },
}
