//! The planner: which tp × dp (with or without sequence parallelism and activation
//! recomputation) to run a model with on a number of GPUs, ranked by the cost model's predicted
//! throughput among the candidates that fit in memory, with the reasons the winner wins.
//!
//! ```text
//! model + cluster + GPUs ─► every tp dividing the GPUs that the model allows
//!     × sequence parallelism × recomputation ─► partition (one plan per tp and SP; recomputation
//!     is a pricing option) ─► cost::estimate ─► ranked candidates + explanation
//! ```
//!
//! The global batch stays fixed (the model's `batch` dimension, unless given): dp = GPUs / tp
//! replicas each take `batch / dp` sequences, so candidates are compared on the same work.

use crate::cost::{estimate_against, Cluster, Estimate, EstimateOptions};
use crate::{partition, PartitionError, PartitionOptions, Plan};
use ferrotron_ir::Graph;
use serde::Serialize;
use std::fmt::Write as _;

/// One configuration the planner priced.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    /// Tensor-parallel degree.
    pub tp: u64,
    /// Data-parallel degree.
    pub dp: u64,
    /// Sequence parallelism.
    pub sequence_parallel: bool,
    /// Activation recomputation.
    pub recompute: bool,
    /// Predicted tokens per second over the whole cluster (0 when it cannot run).
    pub tokens_per_second: f64,
    /// The prediction, when the model partitions at this degree.
    #[serde(rename = "simulation")]
    pub estimate: Option<Estimate>,
    /// Why it cannot run (the partitioner's error), if so.
    pub error: Option<String>,
}

impl Candidate {
    /// Whether it partitions and fits in memory.
    pub fn feasible(&self) -> bool {
        self.estimate.as_ref().is_some_and(|s| s.fits)
    }
}

/// The planner's answer.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    /// Every candidate, best first (feasible ones before the rest).
    pub candidates: Vec<Candidate>,
    /// Why the first one wins, in a few sentences.
    pub explanation: String,
}

/// Prices every (tp, sequence parallel, recompute) for `gpus` GPUs of `cluster`, with the global
/// batch `batch` (the model's own when `None`). `load` gives the model graph with its `batch`
/// dimension set to the value it is passed (left as the model says for `None`).
pub fn choose(
    load: impl Fn(Option<u64>) -> Result<Graph, String>,
    cluster: &Cluster,
    gpus: u64,
    batch: Option<u64>,
    base: &EstimateOptions,
) -> Result<Choice, String> {
    let graph = load(batch)?;
    let global = graph
        .dims
        .iter()
        .find(|(n, _)| n == "batch")
        .map(|&(_, b)| b)
        .ok_or("the model has no `batch` dimension")?;
    let tokens = ferrotron_ir::count::tokens_per_step(&graph).unwrap_or(0) as f64;
    let mut candidates = Vec::new();
    for tp in (0..=gpus.trailing_zeros().min(12))
        .map(|k| 1u64 << k)
        .chain((3..=gpus).filter(|t| gpus.is_multiple_of(*t) && !t.is_power_of_two()))
    {
        if !gpus.is_multiple_of(tp) {
            continue;
        }
        let dp = gpus / tp;
        for sp in [false, true] {
            let opts = PartitionOptions {
                tp,
                dp,
                sequence_parallel: sp,
                ..PartitionOptions::default()
            };
            let planned = if global.is_multiple_of(dp) {
                partition(&graph, &opts).map_err(|e: PartitionError| e.to_string())
            } else {
                Err(format!(
                    "the global batch {global} does not divide into {dp} replicas"
                ))
            };
            let plan: Option<Plan> = match planned {
                Ok(p) => Some(p),
                Err(error) => {
                    // Degrees the model does not allow are listed once, not per option.
                    if !sp {
                        candidates.push(Candidate {
                            tp,
                            dp,
                            sequence_parallel: false,
                            recompute: false,
                            tokens_per_second: 0.0,
                            estimate: None,
                            error: Some(error),
                        });
                    }
                    None
                }
            };
            let Some(plan) = plan else { continue };
            for recompute in [false, true] {
                let opts = EstimateOptions {
                    recompute,
                    ..base.clone()
                };
                let sim = estimate_against(&plan, None, cluster, &opts);
                candidates.push(Candidate {
                    tp,
                    dp,
                    sequence_parallel: sp,
                    recompute,
                    tokens_per_second: tokens / sim.step_time_s.max(1e-12),
                    estimate: Some(sim),
                    error: None,
                });
            }
        }
    }
    candidates.sort_by(|a, b| {
        b.feasible()
            .cmp(&a.feasible())
            .then(b.tokens_per_second.total_cmp(&a.tokens_per_second))
    });
    let explanation = explain(&candidates, cluster);
    Ok(Choice {
        candidates,
        explanation,
    })
}

fn gib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 30)
}

/// Why the first candidate wins: what it costs, and what stops the alternatives.
fn explain(candidates: &[Candidate], cluster: &Cluster) -> String {
    let mut out = String::new();
    let Some(best) = candidates.first().filter(|c| c.feasible()) else {
        let _ = write!(
            out,
            "No configuration fits in {:.0} GiB per GPU; the smallest needs {:.1} GiB.",
            gib(cluster.memory_bytes),
            candidates
                .iter()
                .filter_map(|c| c.estimate.as_ref())
                .map(|s| gib(s.memory_bytes_per_gpu))
                .fold(f64::INFINITY, f64::min)
        );
        return out;
    };
    let s = best.estimate.as_ref().expect("feasible");
    let _ = write!(
        out,
        "tp = {}, dp = {}{}{}: {:.0} tokens/s, {:.3} s per step ({:.1} TFLOP/s per GPU), \
         {:.1} of {:.0} GiB per GPU.",
        best.tp,
        best.dp,
        if best.sequence_parallel {
            ", sequence parallel"
        } else {
            ""
        },
        if best.recompute {
            ", recomputation"
        } else {
            ""
        },
        best.tokens_per_second,
        s.step_time_s,
        s.tflops_per_gpu,
        gib(s.memory_bytes_per_gpu),
        gib(cluster.memory_bytes),
    );
    let smaller_tp_fails = candidates
        .iter()
        .filter(|c| c.tp < best.tp && c.estimate.as_ref().is_some_and(|s| !s.fits))
        .map(|c| c.tp)
        .max();
    if let Some(tp) = smaller_tp_fails {
        let _ = write!(
            out,
            " At tp = {tp} or below the model does not fit in memory."
        );
    }
    if let Some(next) = candidates
        .iter()
        .filter(|c| c.feasible() && c.tp > best.tp)
        .max_by(|a, b| a.tokens_per_second.total_cmp(&b.tokens_per_second))
    {
        let ns = next.estimate.as_ref().expect("feasible");
        let across = next.tp > cluster.gpus_per_node;
        let _ = write!(
            out,
            " tp = {} is {:.0}% slower: its tensor-parallel communication takes {:.3} s per step \
             against {:.3} s{}.",
            next.tp,
            (1.0 - next.tokens_per_second / best.tokens_per_second) * 100.0,
            ns.tp_comm_s,
            s.tp_comm_s,
            if across {
                format!(
                    ", because its groups span more than the {} GPUs of a node and their \
                     all-reduces cross InfiniBand",
                    cluster.gpus_per_node
                )
            } else {
                String::new()
            }
        );
    }
    if best.recompute {
        let _ = write!(
            out,
            " Recomputation is needed to fit, and costs {:.3} s per step.",
            s.recompute_s
        );
    }
    out
}
