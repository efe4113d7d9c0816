//! A rank's peak memory by liveness: the plan's program walked in order, every value held from
//! the node that makes it to its last reader (of its data: a dropout's gradient reads only its
//! forward's place, [`ferrotron_ir::Op::data_inputs`]), as a runtime that frees a tensor after
//! its last use holds it. The weights stay resident; the loss, the graph outputs and the gradients are
//! kept to the end.
//!
//! ```text
//! Plan (order, shard-local types) ─► walk: + outputs of each node, − inputs at their last use,
//!   − outputs nothing reads ─► the largest sum on the way: the peak bytes of one rank
//! ```
//!
//! This is the estimate that recomputation's savings show in: a recomputed value is made in the
//! backward pass just before its reader and freed after it, so it is no longer held from the
//! forward pass. A runtime that fuses op pairs or updates in place holds less; one that keeps
//! buffers for reuse holds more.

use crate::plan::Plan;
use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{ValueDef, ValueId};

/// The peak bytes one rank holds while running `plan`'s step (forward and backward), by
/// liveness; `None` for a plan of several micro-batches or stages, whose ranks hold several
/// micro-batches' values at once as their schedule says.
pub fn peak_bytes(plan: &Plan) -> Option<u64> {
    if plan.pipeline.is_some() {
        return None;
    }
    let g = &plan.graph;
    let mut keep: SecondaryMap<ValueId, bool> = SecondaryMap::with_capacity(g.values.len());
    keep[plan.loss] = true;
    for &(_, v) in &g.outputs {
        keep[v] = true;
    }
    for &(_, v) in &plan.grads {
        keep[v] = true;
    }
    let mut last: SecondaryMap<ValueId, Option<usize>> =
        SecondaryMap::with_capacity(g.values.len());
    for (i, &n) in g.order.iter().enumerate() {
        for &v in g.nodes[n].op.data_inputs() {
            last[v] = Some(i);
        }
    }
    let bytes = |v: ValueId| g.ty(v).size_bytes();
    // The weights and the inputs the step reads, from the start.
    let mut live: u64 = g.params.iter().map(|(_, p)| bytes(p.value)).sum();
    live += g
        .inputs
        .iter()
        .filter(|&&v| last[v].is_some())
        .map(|&v| bytes(v))
        .sum::<u64>();
    let mut peak = live;
    for (i, &n) in g.order.iter().enumerate() {
        let node = &g.nodes[n];
        for &v in &node.outputs {
            live += bytes(v);
        }
        peak = peak.max(live);
        let mut freed: Vec<ValueId> = Vec::new();
        for &v in node.op.data_inputs() {
            let resident = matches!(g.values[v].def, ValueDef::Param(_));
            if last[v] == Some(i) && !keep[v] && !resident && !freed.contains(&v) {
                freed.push(v);
                live -= bytes(v);
            }
        }
        for &v in &node.outputs {
            if last[v].is_none() && !keep[v] {
                live -= bytes(v);
            }
        }
    }
    Some(peak)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{partition, PartitionOptions, Recompute};
    use ferrotron_ir::{load_model, LoadOptions};

    fn tiny_gpt(batch: u64) -> ferrotron_ir::Graph {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-gpt.ron");
        let opts = LoadOptions {
            overrides: [("layers", 2), ("seq", 32), ("batch", batch)]
                .map(|(n, v)| (n.to_owned(), v))
                .into(),
            ..LoadOptions::default()
        };
        load_model(std::path::Path::new(path), &opts).expect("tiny-gpt loads")
    }

    /// On a model whose activations outweigh its weights and gradients, each mode's peak is
    /// below the one before.
    #[test]
    fn the_peak_holds_what_is_kept_and_drops_with_recomputation() {
        let g = tiny_gpt(8);
        for (tp, sp) in [(1, false), (2, false), (2, true)] {
            let mut last = u64::MAX;
            for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
                let opts = PartitionOptions {
                    tp,
                    sequence_parallel: sp,
                    recompute,
                    ..PartitionOptions::default()
                };
                let plan = partition(&g, &opts).expect("tiny-gpt partitions");
                let peak = peak_bytes(&plan).expect("one stage, one micro-batch");
                let pg = &plan.graph;
                let bytes = |v: ValueId| pg.ty(v).size_bytes();
                // The weights and every gradient are held at the end of the step.
                let end: u64 = pg.params.iter().map(|(_, p)| bytes(p.value)).sum::<u64>()
                    + plan.grads.iter().map(|&(_, v)| bytes(v)).sum::<u64>();
                assert!(peak > end, "tp {tp} sp {sp} {recompute}: {peak} <= {end}");
                assert!(peak < last, "tp {tp} sp {sp} {recompute}: {peak} >= {last}");
                last = peak;
            }
        }
    }

    #[test]
    fn several_micro_batches_or_stages_have_no_single_program_peak() {
        let g = tiny_gpt(2);
        for (pp, micro_batches) in [(1, 2), (2, 1)] {
            let opts = PartitionOptions {
                pp,
                micro_batches,
                ..PartitionOptions::default()
            };
            let plan = partition(&g, &opts).expect("tiny-gpt partitions");
            assert_eq!(
                peak_bytes(&plan),
                None,
                "pp {pp}, {micro_batches} micro-batches"
            );
        }
    }
}
