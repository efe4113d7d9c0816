//! The plan: what the partitioner produces and the runtimes execute.
//!
//! One SPMD graph — forward then backward, with shard-local shapes, a layout on both mesh axes for
//! every value, and the collectives as ordinary nodes — plus, for each parameter, how rank `r`
//! instantiates it: which slice of the full (possibly vocabulary-padded) tensor it holds. The
//! graph is the same at 8 ranks or 4,096; only the shard index differs per rank. A plan
//! serialises to RON and reads back unchanged ([`crate::planfile`]).

use crate::layout::{Layout, MeshLayout};
use crate::mesh::{Coord, Mesh, Region};
use crate::pipeline::{Pipeline, Schedule};
use crate::recompute::Recompute;
use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{Graph, ParamId, ValueId};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// How the plan was asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartitionOptions {
    /// Tensor-parallel degree.
    pub tp: u64,
    /// Data-parallel degree.
    pub dp: u64,
    /// Hold the activations between tensor-parallel regions split along the sequence.
    pub sequence_parallel: bool,
    /// Pad the vocabulary to a multiple of `vocab_multiple × tp` (Megatron's 128).
    pub vocab_multiple: u64,
    /// Parameters whose tensor-parallel layout the user fixed, by name.
    pub pins: Vec<(String, Layout)>,
    /// Pipeline stages the layers are cut into.
    #[serde(default = "one")]
    pub pp: u64,
    /// Micro-batches per step: the model's batch is one micro-batch's, and a step's gradients
    /// are summed over them (over the pipeline, or as gradient accumulation at pp = 1).
    #[serde(default = "one")]
    pub micro_batches: u64,
    /// The order the stages run their micro-batches in.
    #[serde(default)]
    pub schedule: Schedule,
    /// Model chunks per stage, for the interleaved schedule.
    #[serde(default = "one")]
    pub virtual_stages: u64,
    /// Layers per stage, fixed by hand; `None`: balanced by the plan's work per layer.
    #[serde(default)]
    pub stage_layers: Option<Vec<u32>>,
    /// The ZeRO stage: 0 keeps the optimizer state replicated over the data-parallel group
    /// (gradients all-reduced); 1 is the distributed optimizer (Megatron's
    /// `--use-distributed-optimizer`): each data-parallel rank keeps the master weights and
    /// Adam moments of only its share of every parameter, the gradients are reduce-scattered
    /// over dp instead of all-reduced, and the updated shares are all-gathered after the step.
    #[serde(default)]
    pub zero: u8,
    /// What the backward pass recomputes instead of keeping from the forward
    /// ([`crate::recompute`]).
    #[serde(default)]
    pub recompute: Recompute,
}

fn one() -> u64 {
    1
}

impl Default for PartitionOptions {
    fn default() -> Self {
        PartitionOptions {
            tp: 1,
            dp: 1,
            sequence_parallel: false,
            vocab_multiple: 128,
            pins: Vec::new(),
            pp: 1,
            micro_batches: 1,
            schedule: Schedule::default(),
            virtual_stages: 1,
            stage_layers: None,
            zero: 0,
            recompute: Recompute::None,
        }
    }
}

/// How every rank holds one parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamShard {
    /// The parameter's name.
    pub name: String,
    /// Its full shape in the plan (the vocabulary dimension padded).
    pub shape: Vec<u64>,
    /// Its shape in the model file (differs from `shape` only by vocabulary padding, always at
    /// the end of the split dimension; the padding is zero and never reaches the loss).
    pub model_shape: Vec<u64>,
    /// Its layout (parameters are always replicated across the data-parallel group).
    pub layout: MeshLayout,
    /// Blocks of the split dimension (3 for a fused q|k|v weight), 1 otherwise.
    pub blocks: u32,
}

impl ParamShard {
    /// The shape each rank holds.
    pub fn local_shape(&self, mesh: Mesh) -> Vec<u64> {
        mesh.local_sizes(&self.shape, self.layout)
    }

    /// What the rank at `c` holds of the full (vocabulary-padded) tensor.
    pub fn region(&self, mesh: Mesh, c: Coord) -> Region {
        let full: Vec<usize> = self.shape.iter().map(|&s| s as usize).collect();
        Region::of(&full, self.layout, self.blocks, mesh, c)
    }

    /// The ranges of the full tensor's split dimension that tensor-parallel rank `rank` of `tp`
    /// holds, in the order they are laid out locally (one range, or one per block), with that
    /// dimension; `None` for a replicated parameter.
    pub fn ranges(&self, rank: u64, tp: u64) -> Option<(usize, Vec<Range<u64>>)> {
        let Layout::Split(d) = self.layout.tp else {
            return None;
        };
        let mesh = Mesh::new(tp, 1);
        let coord = Coord {
            tp: rank as usize,
            ..Coord::default()
        };
        let region = self.region(mesh, coord);
        let ranges = region.dim(d).iter();
        Some((d, ranges.map(|r| r.start as u64..r.end as u64).collect()))
    }
}

/// A partitioned, differentiated model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The model's name.
    pub model: String,
    /// The mesh it runs on.
    pub mesh: Mesh,
    /// The options it was made with.
    pub options: PartitionOptions,
    /// The SPMD program: shard-local shapes, forward then backward.
    pub graph: Graph,
    /// Every value's layout.
    pub layouts: SecondaryMap<ValueId, MeshLayout>,
    /// Every parameter's shard, indexed like `graph.params`.
    pub params: Vec<ParamShard>,
    /// Index into `graph.order` of the first backward node.
    pub backward_start: usize,
    /// The scalar loss.
    pub loss: ValueId,
    /// Each trainable parameter's gradient, laid out like it: reduced over the tensor-parallel
    /// group, and over the data-parallel group unless the optimizer is distributed
    /// ([`Plan::distributed_optimizer`]: then still a partial sum over dp, which the optimizer
    /// step reduce-scatters into each rank's [`Plan::optimizer_share`]).
    pub grads: Vec<(ParamId, ValueId)>,
    /// The vocabulary size and what it was padded to, if padded.
    pub vocab_padding: Option<(u64, u64)>,
    /// How the program is cut into pipeline stages and run over micro-batches; `None`: one
    /// stage, one micro-batch (the program as it is).
    #[serde(default)]
    pub pipeline: Option<Pipeline>,
}

impl Plan {
    /// The parameter's shard.
    pub fn shard(&self, p: ParamId) -> &ParamShard {
        &self.params[ferrotron_ir::graph::EntityRef::index(p)]
    }

    /// The parameters the ranks of pipeline stage `stage` hold, in parameter order: every one
    /// without a pipeline. A rank's weights, gradients and optimizer state are these.
    pub fn params_on(&self, stage: usize) -> Vec<ParamId> {
        self.graph
            .params
            .keys()
            .filter(|&p| {
                self.pipeline
                    .as_ref()
                    .is_none_or(|pipe| pipe.holds(stage as u32, p))
            })
            .collect()
    }

    /// Whether the optimizer state is sharded over the data-parallel group (ZeRO stage 1 at
    /// dp > 1): the gradients leave the step as partial sums over dp.
    pub fn distributed_optimizer(&self) -> bool {
        self.options.zero >= 1 && self.mesh.dp > 1
    }

    /// The elements of parameter `p`'s local shard (flattened) whose master weights and Adam
    /// moments data-parallel rank `dp` keeps, and the length of every rank's share (the shard
    /// zero-padded to a multiple of dp, cut into equal shares): the whole shard when the
    /// optimizer is not distributed.
    pub fn optimizer_share(&self, p: ParamId, dp: usize) -> (Range<usize>, usize) {
        let n: usize = self
            .shard(p)
            .local_shape(self.mesh)
            .iter()
            .map(|&d| d as usize)
            .product();
        if !self.distributed_optimizer() {
            return (0..n, n);
        }
        let parts = self.mesh.dp as usize;
        (crate::mesh::flat_share(n, parts, dp), n.div_ceil(parts))
    }

    /// Micro-batches per step (1 without a pipeline).
    pub fn micro_batches(&self) -> u32 {
        self.pipeline.as_ref().map_or(1, |p| p.micro_batches)
    }

    /// The stage that computes value `v` (0 for inputs and without a pipeline; a parameter's
    /// first holder; a gradient's owner).
    pub fn stage_of_value(&self, v: ValueId) -> usize {
        let Some(pipe) = &self.pipeline else {
            return 0;
        };
        let stage = match self.graph.values[v].def {
            ferrotron_ir::ValueDef::Node { node, .. } => pipe.stage_of[node],
            ferrotron_ir::ValueDef::Param(p) => pipe.holders
                [ferrotron_ir::graph::EntityRef::index(p)]
            .first()
            .copied()
            .unwrap_or(0),
            ferrotron_ir::ValueDef::Input => 0,
        };
        stage as usize
    }
}
