//! What a plan costs each rank per training step: the collectives it runs (by kind, direction and
//! mesh axis, with their count and size) and the memory it holds (weights, gradients, Adam
//! state, activations saved for the backward pass). `ferrotron partition` prints this; the cost
//! model will price it.
//!
//! Sizes are the size of the full buffer a collective works on — the all-reduced tensor, the
//! gathered result, the tensor before reduce-scatter — the convention of NCCL's own tests; the
//! bytes a rank puts on the wire follow from the algorithm (a ring moves `2(p−1)/p` of it for an
//! all-reduce, `(p−1)/p` for the others). f and local slices move nothing. The vocabulary-parallel
//! cross-entropy's per-token all-reduces (max, sum of exponentials and target logit forward; max
//! and sum again for the gradient) are counted with the cross-entropy node that runs them.

use crate::layout::Layout;
use crate::pipeline::{PipeStep, Pipeline};
use crate::plan::Plan;
use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{DType, MeshAxis, NodeId, Op, ParamId, ScopeId, ValueDef, ValueId};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;

/// One group of identical collectives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Collectives {
    /// `all_reduce`, `all_gather` or `reduce_scatter`.
    pub kind: &'static str,
    /// `forward` or `backward`.
    pub direction: &'static str,
    /// `tp` or `dp`.
    pub axis: &'static str,
    /// How many per step.
    pub count: u64,
    /// Their total size per step, in bytes (see the module docs).
    pub bytes_per_rank: u64,
}

/// What one rank holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PerRank {
    /// Parameter elements held.
    pub parameters: u64,
    /// All of the below.
    pub memory_bytes: u64,
    /// The parameters.
    pub weights_bytes: u64,
    /// Their gradients.
    pub gradients_bytes: u64,
    /// Adam's two moments in f32 (plus an f32 master copy for lower-precision weights).
    pub optimizer_bytes: u64,
    /// Forward values the backward pass reads.
    pub activations_bytes: u64,
}

/// A plan's per-step costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// The model.
    pub model: String,
    /// Tensor-parallel degree.
    pub tp: u64,
    /// Data-parallel degree.
    pub dp: u64,
    /// Whether activations between regions are split along the sequence.
    pub sequence_parallel: bool,
    /// `[vocabulary, padded]` when padded.
    pub vocab_padding: Option<(u64, u64)>,
    /// Nodes in the forward and backward parts of the SPMD graph.
    pub nodes: (usize, usize),
    /// Collectives per step.
    pub collectives: Vec<Collectives>,
    /// Memory and parameters per rank (with pipeline stages: on the most loaded stage).
    pub per_rank: PerRank,
    /// Every rank's coordinates, in rank order (tp fastest, then dp, then pp).
    pub ranks: Vec<RankCoord>,
    /// How the layers are cut into stages and run over micro-batches, if they are.
    pub pipeline: Option<PipelineReport>,
}

/// A rank's place in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RankCoord {
    /// Its number in the job.
    pub rank: usize,
    /// Index in its tensor-parallel group.
    pub tp: usize,
    /// Index in its data-parallel group.
    pub dp: usize,
    /// Its pipeline stage.
    pub pp: usize,
}

/// The pipeline part of a plan's costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PipelineReport {
    /// Stages.
    pub stages: u32,
    /// Micro-batches per step.
    pub micro_batches: u32,
    /// `1f1b`, `gpipe` or `interleaved`.
    pub schedule: String,
    /// Model chunks per stage (the interleaved schedule's; 1 otherwise).
    pub virtual_stages: u32,
    /// The fraction of a step a stage idles while the pipeline fills and drains.
    pub bubble_fraction: f64,
    /// Each stage's layers, parameters and memory per rank.
    pub per_stage: Vec<StageReport>,
    /// The values sent between stages, per micro-batch.
    pub transfers: Vec<TransferReport>,
    /// Parameters held on several stages, and how their gradients agree.
    pub tied: Vec<TiedReport>,
}

/// One stage.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageReport {
    /// Its layers (indices into the Repeat's copies), `[first, end)`, one range per model
    /// chunk (one but for the interleaved schedule).
    pub layers: Vec<(u32, u32)>,
    /// Micro-batches whose activations it holds at once under the schedule.
    pub in_flight: u32,
    /// Memory and parameters per rank of the stage (activations: all those in flight).
    pub per_rank: PerRank,
}

/// A value one stage sends another, each micro-batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TransferReport {
    /// The value.
    pub value: String,
    /// Its shape on a rank (what each rank sends: its own slice of a split value).
    pub shape: String,
    /// The sending stage.
    pub from: u32,
    /// The receiving stage.
    pub to: u32,
    /// `forward` (an activation) or `backward` (a gradient).
    pub direction: &'static str,
    /// Bytes each sending rank sends per micro-batch (its `1/tp` part of a value every tp rank
    /// holds whole: the receivers gather the parts).
    pub bytes: u64,
    /// The dimension a whole value is cut along for sending, if it is.
    pub scatter: Option<usize>,
    /// Summed over the micro-batches where it is made and sent once a step.
    pub once_a_step: bool,
}

/// A parameter several stages hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TiedReport {
    /// The parameter.
    pub param: String,
    /// The stages holding a copy.
    pub holders: Vec<u32>,
    /// The stage its gradient is summed on, which sends the sum to the others.
    pub owner: u32,
}

impl Report {
    /// Counts a plan's collectives and memory.
    pub fn of(plan: &Plan) -> Report {
        let g = &plan.graph;
        let mut forward: SecondaryMap<NodeId, bool> = SecondaryMap::with_capacity(g.nodes.len());
        for &n in &g.order[..plan.backward_start] {
            forward[n] = true;
        }
        let mut groups: Vec<Collectives> = Vec::new();
        let mut add = |kind, direction: &'static str, axis: MeshAxis, count: u64, bytes: u64| {
            if plan.mesh.size(axis) <= 1 {
                return; // a group of one communicates nothing
            }
            let axis = match axis {
                MeshAxis::Tp => "tp",
                MeshAxis::Dp => "dp",
            };
            match groups
                .iter_mut()
                .find(|c| c.kind == kind && c.direction == direction && c.axis == axis)
            {
                Some(c) => {
                    c.count += count;
                    c.bytes_per_rank += bytes;
                }
                None => groups.push(Collectives {
                    kind,
                    direction,
                    axis,
                    count,
                    bytes_per_rank: bytes,
                }),
            }
        };
        let bytes = |v: ValueId| g.ty(v).size_bytes();
        for &n in &g.order {
            let node = &g.nodes[n];
            let fwd = if forward[n] { "forward" } else { "backward" };
            match &node.op {
                Op::G { x, axis } | Op::AllReduce { x, axis } => {
                    add("all_reduce", fwd, *axis, 1, bytes(*x))
                }
                Op::AllGather { axis, .. } => {
                    add("all_gather", fwd, *axis, 1, bytes(node.outputs[0]))
                }
                Op::ReduceScatter { x, axis, .. } => {
                    add("reduce_scatter", fwd, *axis, 1, bytes(*x))
                }
                // The vocabulary-parallel cross-entropy's f32 row statistics: the row maxima,
                // then the sums of exponentials with the target logits in one call. Its
                // gradient reuses them: no collective.
                Op::CrossEntropy { logits, .. }
                    if matches!(plan.layouts[*logits].tp, Layout::Split(d)
                        if d + 1 == g.ty(*logits).shape.rank()) =>
                {
                    let ty = g.ty(*logits);
                    let tokens = ty.shape.numel().unwrap_or(0)
                        / ty.shape.last().map_or(1, |d| d.size.max(1));
                    add("all_reduce", fwd, MeshAxis::Tp, 2, 3 * tokens * 4);
                }
                _ => {}
            }
        }
        // The distributed optimizer's pair per parameter: its gradient reduce-scattered over
        // dp (unless every dp rank already holds the same one), the updated shares gathered.
        if plan.distributed_optimizer() {
            for &(p, grad) in &plan.grads {
                let (_, share) = plan.optimizer_share(p, 0);
                let padded = share as u64 * plan.mesh.dp * g.ty(grad).dtype.size_bytes();
                if plan.layouts[grad].dp == Layout::Partial {
                    add("reduce_scatter", "backward", MeshAxis::Dp, 1, padded);
                }
                add("all_gather", "optimizer", MeshAxis::Dp, 1, padded);
            }
        }

        let mut per_rank = PerRank {
            parameters: 0,
            memory_bytes: 0,
            weights_bytes: 0,
            gradients_bytes: 0,
            optimizer_bytes: 0,
            activations_bytes: 0,
        };
        for p in g.params.keys() {
            add_param(&mut per_rank, plan, p);
        }
        let mut saved: SecondaryMap<ValueId, bool> = SecondaryMap::with_capacity(g.values.len());
        for &n in &g.order[plan.backward_start..] {
            for &v in g.nodes[n].op.inputs() {
                if let ValueDef::Node { node, .. } = g.values[v].def {
                    if forward[node] && !saved[v] {
                        saved[v] = true;
                        per_rank.activations_bytes += bytes(v);
                    }
                }
            }
        }
        per_rank.memory_bytes = per_rank.weights_bytes
            + per_rank.gradients_bytes
            + per_rank.optimizer_bytes
            + per_rank.activations_bytes;
        let pipeline = plan
            .pipeline
            .as_ref()
            .map(|pipe| pipeline_report(plan, pipe, &forward));
        if let Some(heaviest) = pipeline
            .as_ref()
            .and_then(|p| p.per_stage.iter().max_by_key(|s| s.per_rank.memory_bytes))
        {
            per_rank = heaviest.per_rank.clone();
        }
        Report {
            model: plan.model.clone(),
            tp: plan.mesh.tp,
            dp: plan.mesh.dp,
            sequence_parallel: plan.options.sequence_parallel,
            vocab_padding: plan.vocab_padding,
            nodes: (plan.backward_start, g.order.len() - plan.backward_start),
            collectives: groups,
            per_rank,
            ranks: plan
                .mesh
                .coords()
                .enumerate()
                .map(|(rank, c)| RankCoord {
                    rank,
                    tp: c.tp,
                    dp: c.dp,
                    pp: c.pp,
                })
                .collect(),
            pipeline,
        }
    }

    /// The collectives of one kind, direction and axis.
    pub fn find(&self, kind: &str, direction: &str, axis: &str) -> Option<&Collectives> {
        self.collectives
            .iter()
            .find(|c| c.kind == kind && c.direction == direction && c.axis == axis)
    }
}

/// The forward values the backward pass reads, each once, in the order the forward makes them:
/// the values [`PerRank::activations_bytes`] counts (for a plan without pipeline stages, whose
/// activations are those of one micro-batch). A value a recomputed duplicate replaces is no
/// longer read by the backward, so it is not among them; the duplicates themselves are backward
/// nodes and never are.
pub fn saved_activations(plan: &Plan) -> Vec<ValueId> {
    let g = &plan.graph;
    let mut read: SecondaryMap<ValueId, bool> = SecondaryMap::with_capacity(g.values.len());
    for &n in &g.order[plan.backward_start..] {
        for &v in g.nodes[n].op.inputs() {
            read[v] = true;
        }
    }
    g.order[..plan.backward_start]
        .iter()
        .flat_map(|&n| g.nodes[n].outputs.iter().copied())
        .filter(|&v| read[v])
        .collect()
}

/// The saved activations ([`saved_activations`]) made inside one layer: by nodes whose scope is
/// `layer` (one of [`ferrotron_ir::Graph::layers`]) or nested in it. The layer's input is made by
/// the layer before (or the embedding) and counted there; its output, which the next layer's
/// backward (or the head's) reads, is counted here.
pub fn layer_activations(plan: &Plan, layer: ScopeId) -> Vec<ValueId> {
    let g = &plan.graph;
    let layer_of = crate::recompute::layer_of_scope(g);
    saved_activations(plan)
        .into_iter()
        .filter(|&v| match g.values[v].def {
            ValueDef::Node { node, .. } => {
                g.nodes[node].scope.and_then(|s| layer_of[s]) == Some(layer)
            }
            _ => false,
        })
        .collect()
}

/// Bytes of one layer's saved activations ([`layer_activations`]) on a rank, every element
/// priced at `dtype` whatever the plan's own dtype (the model files are `f32`; Korthikanti et
/// al. count 16-bit activations). Dropout keeps no mask here (the backward regenerates it from
/// the element's index, [`ferrotron_ir::reference::dropout_keeps`]), so there is no 1-byte mask
/// term to price; its gradient does name the forward output (for its shape and place in the full
/// tensor), so that output is counted at full price.
pub fn layer_activation_bytes(plan: &Plan, layer: ScopeId, dtype: DType) -> u64 {
    let g = &plan.graph;
    layer_activations(plan, layer)
        .into_iter()
        .map(|v| g.ty(v).shape.numel().unwrap_or(0) * dtype.size_bytes())
        .sum()
}

/// A parameter's memory per rank: weights, gradients, Adam's moments (and an f32 master copy
/// for lower-precision weights), those of its share under the distributed optimizer.
fn add_param(r: &mut PerRank, plan: &Plan, p: ParamId) {
    let ty = plan.graph.ty(plan.graph.params[p].value);
    let n = ty.shape.numel().unwrap_or(0);
    r.parameters += n;
    r.weights_bytes += ty.size_bytes();
    r.gradients_bytes += ty.size_bytes();
    let master = if ty.dtype == ferrotron_ir::DType::F32 {
        0
    } else {
        4
    };
    let (_, share) = plan.optimizer_share(p, 0);
    r.optimizer_bytes += share as u64 * (8 + master);
}

/// The stages' layers, memory, transfers and tied parameters.
fn pipeline_report(
    plan: &Plan,
    pipe: &Pipeline,
    forward: &SecondaryMap<NodeId, bool>,
) -> PipelineReport {
    let g = &plan.graph;
    let stages = pipe.stages as usize;
    let mut per_stage: Vec<StageReport> = Vec::with_capacity(stages);
    // Where each virtual stage's layers start.
    let starts: Vec<u32> = pipe
        .layers
        .iter()
        .scan(0, |at, &n| {
            let first = *at;
            *at += n;
            Some(first)
        })
        .collect();
    for s in 0..stages {
        let mut r = PerRank {
            parameters: 0,
            memory_bytes: 0,
            weights_bytes: 0,
            gradients_bytes: 0,
            optimizer_bytes: 0,
            activations_bytes: 0,
        };
        for p in plan.params_on(s) {
            add_param(&mut r, plan, p);
        }
        // Forward values this stage's backward nodes read, per model chunk: held from the
        // chunk's forward step of a micro-batch to its backward step.
        let chunks = pipe.virtual_stages.max(1) as usize;
        let mut saved_bytes = vec![0u64; chunks];
        let mut saved: SecondaryMap<ValueId, bool> = SecondaryMap::with_capacity(g.values.len());
        for &n in &g.order[plan.backward_start..] {
            if pipe.stage_of[n] as usize != s {
                continue;
            }
            for &v in g.nodes[n].op.inputs() {
                if let ValueDef::Node { node, .. } = g.values[v].def {
                    if forward[node] && !saved[v] {
                        saved[v] = true;
                        saved_bytes[pipe.chunk_of[node] as usize] += g.ty(v).size_bytes();
                    }
                }
            }
        }
        let mut live = vec![0u64; chunks];
        let mut in_flight: HashMap<u32, u32> = HashMap::new();
        let (mut peak_bytes, mut peak_micro) = (0u64, 0usize);
        for (i, step) in pipe.steps[s].iter().enumerate() {
            let c = pipe.chunk(s, i) as usize;
            match *step {
                PipeStep::Forward(m) => {
                    live[c] += 1;
                    *in_flight.entry(m).or_default() += 1;
                }
                PipeStep::Backward(m) => {
                    live[c] = live[c].saturating_sub(1);
                    if let Some(k) = in_flight.get_mut(&m) {
                        *k -= 1;
                        if *k == 0 {
                            in_flight.remove(&m);
                        }
                    }
                }
            }
            let bytes: u64 = live.iter().zip(&saved_bytes).map(|(n, b)| n * b).sum();
            peak_bytes = peak_bytes.max(bytes);
            peak_micro = peak_micro.max(in_flight.len());
        }
        r.activations_bytes = peak_bytes;
        let in_flight = peak_micro;
        r.memory_bytes =
            r.weights_bytes + r.gradients_bytes + r.optimizer_bytes + r.activations_bytes;
        let layers = (0..pipe.virtual_stages.max(1) as usize)
            .map(|c| c * stages + s)
            .filter(|&vs| vs < pipe.layers.len())
            .map(|vs| (starts[vs], starts[vs] + pipe.layers[vs]))
            .collect();
        per_stage.push(StageReport {
            layers,
            in_flight: in_flight as u32,
            per_rank: r,
        });
    }
    PipelineReport {
        stages: pipe.stages,
        micro_batches: pipe.micro_batches,
        schedule: pipe.schedule.to_string(),
        virtual_stages: pipe.virtual_stages,
        bubble_fraction: pipe.bubble_fraction(),
        per_stage,
        transfers: pipe
            .transfers
            .iter()
            .map(|t| TransferReport {
                value: g.values[t.value].name.clone(),
                shape: g.ty(t.value).shape.to_string(),
                from: t.from,
                to: t.to,
                direction: if t.backward { "backward" } else { "forward" },
                bytes: t.bytes(g, plan.mesh.tp),
                scatter: t.scatter,
                once_a_step: t.once_a_step,
            })
            .collect(),
        tied: pipe
            .tied
            .iter()
            .map(|t| TiedReport {
                param: g.params[t.param].name.clone(),
                holders: t.holders.clone(),
                owner: t.owner,
            })
            .collect(),
    }
}

fn human(bytes: u64) -> String {
    human_bytes(u128::from(bytes), 2)
}

/// Bytes in binary units with `decimals` decimals (`121.40 MiB`); whole bytes below 1 KiB.
pub fn human_bytes(bytes: u128, decimals: usize) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = bytes as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{x:.decimals$} {}", UNITS[u])
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: tp = {}, dp = {}{}{}",
            self.model,
            self.tp,
            self.dp,
            match &self.pipeline {
                Some(p) => format!(", pp = {}", p.stages),
                None => String::new(),
            },
            if self.sequence_parallel {
                ", sequence parallel"
            } else {
                ""
            }
        )?;
        if let Some((v, p)) = self.vocab_padding {
            writeln!(f, "vocabulary padded from {v} to {p}")?;
        }
        writeln!(
            f,
            "SPMD graph: {} forward + {} backward nodes",
            self.nodes.0, self.nodes.1
        )?;
        writeln!(f, "collectives per step:")?;
        if self.collectives.is_empty() {
            writeln!(f, "  none")?;
        }
        for c in &self.collectives {
            writeln!(
                f,
                "  {:<15} {:<9} over {}  {:>6} ×  {:>12} in all",
                c.kind,
                c.direction,
                c.axis,
                c.count,
                human(c.bytes_per_rank)
            )?;
        }
        let r = &self.per_rank;
        writeln!(f, "per rank:")?;
        writeln!(f, "  parameters   {:>16}", r.parameters)?;
        writeln!(f, "  weights      {:>16}", human(r.weights_bytes))?;
        writeln!(f, "  gradients    {:>16}", human(r.gradients_bytes))?;
        writeln!(f, "  Adam state   {:>16}", human(r.optimizer_bytes))?;
        writeln!(f, "  activations  {:>16}", human(r.activations_bytes))?;
        writeln!(f, "  total        {:>16}", human(r.memory_bytes))?;
        if let Some(p) = &self.pipeline {
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl fmt::Display for PipelineReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pipeline: {} stages, {} micro-batches, {} schedule{}, bubble {:.1}% of the step",
            self.stages,
            self.micro_batches,
            self.schedule,
            if self.virtual_stages > 1 {
                format!(" over {} model chunks per stage", self.virtual_stages)
            } else {
                String::new()
            },
            100.0 * self.bubble_fraction
        )?;
        writeln!(
            f,
            "  {:<6} {:<12} {:>9} {:>12} {:>12} {:>12}",
            "stage", "layers", "in flight", "parameters", "activations", "total/rank"
        )?;
        for (s, st) in self.per_stage.iter().enumerate() {
            let layers: Vec<String> = st
                .layers
                .iter()
                .map(|&(a, b)| {
                    if b == a + 1 {
                        format!("{a}")
                    } else {
                        format!("{a}-{}", b - 1)
                    }
                })
                .collect();
            let layers = layers.join(",");
            writeln!(
                f,
                "  {s:<6} {layers:<12} {:>9} {:>12} {:>12} {:>12}",
                st.in_flight,
                st.per_rank.parameters,
                human(st.per_rank.activations_bytes),
                human(st.per_rank.memory_bytes)
            )?;
        }
        writeln!(f, "  sent between stages, per micro-batch and rank:")?;
        for t in &self.transfers {
            writeln!(
                f,
                "    {:<8} stage {} → {}  {:<28} {:<24} {:>12}{}",
                t.direction,
                t.from,
                t.to,
                t.value,
                t.shape,
                human(t.bytes),
                if t.scatter.is_some() {
                    "  (a 1/tp part each; gathered on arrival)"
                } else if t.once_a_step {
                    "  (summed over the micro-batches, sent once a step)"
                } else {
                    ""
                }
            )?;
        }
        for t in &self.tied {
            let others: Vec<String> = t
                .holders
                .iter()
                .filter(|&&h| h != t.owner)
                .map(|h| h.to_string())
                .collect();
            writeln!(
                f,
                "  tied: `{}` is held by stages {}; its gradient is summed on stage {} and sent \
                 to stage {} before the optimizer step",
                t.param,
                t.holders
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>()
                    .join(" and "),
                t.owner,
                others.join(", ")
            )?;
        }
        Ok(())
    }
}
