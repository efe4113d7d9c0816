//! Pipeline parallelism: the plan's program cut into stages, and the order each stage runs its
//! micro-batches in. Data in the plan, as the layouts are, so the runtime executes it, the cost
//! model prices it and the viewer draws it.
//!
//! ```text
//! Plan (one SPMD program: forward + backward of one micro-batch)
//!   ─► layers (the Repeat's copies) cut into P contiguous stages, balanced by work per layer;
//!      what precedes the layers (the embedding) on the first, what follows (the final norm,
//!      the output layer, the loss) on the last; every backward node on its forward node's
//!      stage (autodiff's origin)
//!   ─► transfers: each value produced on one stage and read on another (a forward activation,
//!      a backward gradient), per micro-batch
//!   ─► tied parameters: a parameter read on several stages (GPT-2's embedding, also the output
//!      layer) is held by each; its gradient is summed on one and sent to the others
//!   ─► schedule: per stage, its forward and backward micro-batch steps (GPipe or 1F1B)
//! ```
//!
//! Every rank of stage `s` (its tp × dp ranks) runs stage `s`'s nodes of the program, in program
//! order, once forward and once backward per micro-batch, and sums its parameters' gradients
//! over the micro-batches. A stage receives a value just before the step that first needs it and
//! sends one as soon as its step made it; a send never waits, so a schedule whose steps respect
//! the data dependencies cannot deadlock.

use crate::layout::Layout;
use crate::mesh::Mesh;
use crate::plan::{PartitionOptions, Plan};
use crate::PartitionError;
use ferrotron_ir::count::node_flops;
use ferrotron_ir::graph::{EntityRef, SecondaryMap};
use ferrotron_ir::{Graph, NodeId, ParamId, ScopeId, ValueDef, ValueId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// The order the stages run their micro-batches in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// Every micro-batch forward, then every one backward (GPipe): the first stage holds all
    /// `M` micro-batches' activations.
    GPipe,
    /// One forward, one backward (PipeDream-flush, Megatron's default): after `P − 1 − s`
    /// warm-up forwards, stage `s` alternates, holding at most `P − s` micro-batches.
    #[default]
    OneFOneB,
    /// Interleaved 1F1B (Narayanan et al. 2021): each stage holds `V` chunks of layers (model
    /// chunk `c` of stage `s` is virtual stage `c·P + s`) and runs 1F1B over (micro-batch,
    /// chunk) pairs, in groups of `P` micro-batches: the bubble shrinks `V`-fold for `V` times
    /// the transfers.
    Interleaved,
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::GPipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
            Schedule::Interleaved => "interleaved",
        })
    }
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Schedule, String> {
        match s {
            "gpipe" => Ok(Schedule::GPipe),
            "1f1b" => Ok(Schedule::OneFOneB),
            "interleaved" => Ok(Schedule::Interleaved),
            other => Err(format!(
                "`{other}`: a schedule is `1f1b` (the default), `gpipe` or `interleaved` (with \
                 --virtual-stages)"
            )),
        }
    }
}

/// One step of a stage's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipeStep {
    /// The stage's forward nodes on micro-batch `m`.
    Forward(u32),
    /// The stage's backward nodes on micro-batch `m`.
    Backward(u32),
}

/// A value produced on one stage and read on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The value (shard-local, as the plan's graph types it).
    pub value: ValueId,
    /// The stage that makes it.
    pub from: u32,
    /// The stage that reads it.
    pub to: u32,
    /// Made in the backward part (a gradient) rather than the forward part.
    pub backward: bool,
    /// A value every tensor-parallel rank holds whole goes in pieces (the 2021 paper's
    /// scatter/gather): each sender sends its `1/tp` part along this dimension, and the
    /// receivers all-gather the parts over their tp group. `None`: each rank sends what it
    /// holds (its own slice of a split value, or a whole value at tp = 1).
    #[serde(default)]
    pub scatter: Option<usize>,
}

impl Transfer {
    /// The bytes each sending rank sends per micro-batch.
    pub fn bytes(&self, plan: &Plan) -> u64 {
        let size = plan.graph.ty(self.value).size_bytes();
        match self.scatter {
            Some(_) => size / plan.mesh.tp.max(1),
            None => size,
        }
    }
}

/// A parameter several stages hold (tied weights): each computes with its copy, the gradient is
/// summed on `owner` (the stage where the program sums its contributions), and the sum is sent
/// to the others before the optimizer step, so the copies stay identical.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tied {
    /// The parameter.
    pub param: ParamId,
    /// The stage whose program completes its gradient.
    pub owner: u32,
    /// Every stage holding it, `owner` included.
    pub holders: Vec<u32>,
}

/// How a plan's program is cut into stages and run over micro-batches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Stages (the mesh's `pp`).
    pub stages: u32,
    /// Micro-batches per step.
    pub micro_batches: u32,
    /// The schedule's kind.
    pub schedule: Schedule,
    /// Model chunks per stage (`V` of the interleaved schedule; 1 otherwise).
    #[serde(default = "one")]
    pub virtual_stages: u32,
    /// Layers (the Repeat's copies, in order) on each virtual stage `c·P + s` (chunk `c` of
    /// stage `s`); with one chunk per stage, on each stage.
    pub layers: Vec<u32>,
    /// Each node's stage.
    pub stage_of: SecondaryMap<NodeId, u32>,
    /// Each node's model chunk on its stage (all 0 with one chunk per stage).
    #[serde(default)]
    pub chunk_of: SecondaryMap<NodeId, u32>,
    /// Each parameter's stages (those that read it).
    pub holders: Vec<Vec<u32>>,
    /// Parameters held by more than one stage.
    pub tied: Vec<Tied>,
    /// Values crossing stages, in the program order of their first reader.
    pub transfers: Vec<Transfer>,
    /// Each stage's steps, in order.
    pub steps: Vec<Vec<PipeStep>>,
    /// The model chunk of each step of `steps` (interleaved schedule); empty: chunk 0.
    #[serde(default)]
    pub chunks: Vec<Vec<u32>>,
}

fn one() -> u32 {
    1
}

impl Pipeline {
    /// Whether stage `s` holds parameter `p`.
    pub fn holds(&self, s: u32, p: ParamId) -> bool {
        self.holders[p.index()].contains(&s)
    }

    /// The stage whose program completes `p`'s gradient (where it is summed, for a tied one).
    pub fn grad_owner(&self, p: ParamId) -> Option<u32> {
        match self.tied.iter().find(|t| t.param == p) {
            Some(t) => Some(t.owner),
            None => self.holders[p.index()].first().copied(),
        }
    }

    /// The fraction of a step a stage idles in the fill and drain of the pipeline, for equal
    /// stages: `(P − 1) / (M + P − 1)` of the step (GPipe and 1F1B alike), so `(P − 1) / M`
    /// of the ideal time; `(P − 1) / (V·M + P − 1)` interleaved, `(P − 1) / (V·M)` of the
    /// ideal.
    pub fn bubble_fraction(&self) -> f64 {
        let (p, m) = (f64::from(self.stages), f64::from(self.micro_batches));
        let v = f64::from(self.virtual_stages.max(1));
        (p - 1.0) / (v * m + p - 1.0)
    }

    /// The model chunk step `i` of stage `s` runs.
    pub fn chunk(&self, s: usize, i: usize) -> u32 {
        self.chunks
            .get(s)
            .and_then(|c| c.get(i))
            .copied()
            .unwrap_or(0)
    }
}

/// The steps of stage `s` of `p` under `schedule` with `m` micro-batches.
pub fn steps(schedule: Schedule, p: u32, s: u32, m: u32) -> Vec<PipeStep> {
    match schedule {
        Schedule::GPipe => (0..m)
            .map(PipeStep::Forward)
            .chain((0..m).map(PipeStep::Backward))
            .collect(),
        // One chunk per stage: interleaving has nothing to interleave.
        Schedule::OneFOneB | Schedule::Interleaved => {
            let warmup = (p - 1 - s).min(m);
            let mut out: Vec<PipeStep> = (0..warmup).map(PipeStep::Forward).collect();
            for i in 0..m - warmup {
                out.push(PipeStep::Forward(warmup + i));
                out.push(PipeStep::Backward(i));
            }
            out.extend((m - warmup..m).map(PipeStep::Backward));
            out
        }
    }
}

/// The steps of stage `s` of `p` under the interleaved schedule with `m` micro-batches (a
/// multiple of `p`) and `v` model chunks per stage, each with its chunk: Megatron's order.
/// Forward step `k` runs chunk `(k mod pv) / p` on micro-batch `(k / pv)·p + k mod p`; backward
/// step `k` the same micro-batch on chunk `v − 1 − (k mod pv) / p`. After
/// `2(p − 1 − s) + (v − 1)·p` warm-up forwards (all of them when `m = p`), one forward and one
/// backward alternate.
pub fn interleaved_steps(p: u32, s: u32, m: u32, v: u32) -> Vec<(PipeStep, u32)> {
    let total = m * v;
    let group = p * v;
    let place = |k: u32| ((k / group) * p + k % p, (k % group) / p);
    let forward = |k: u32| {
        let (mb, c) = place(k);
        (PipeStep::Forward(mb), c)
    };
    let backward = |k: u32| {
        let (mb, c) = place(k);
        (PipeStep::Backward(mb), v - 1 - c)
    };
    let warmup = if m == p {
        total
    } else {
        (2 * (p - 1 - s) + (v - 1) * p).min(total)
    };
    let mut out: Vec<(PipeStep, u32)> = (0..warmup).map(forward).collect();
    for i in 0..total - warmup {
        out.push(forward(warmup + i));
        out.push(backward(i));
    }
    out.extend((total - warmup..total).map(backward));
    out
}

/// Cuts `plan`'s program into `opts.pp` stages with `opts.micro_batches` micro-batches;
/// `origin` maps each backward node to its forward node (autodiff's).
pub fn cut(
    plan: &Plan,
    origin: &[(NodeId, NodeId)],
    opts: &PartitionOptions,
) -> Result<Pipeline, PartitionError> {
    let (p, m) = (opts.pp, opts.micro_batches);
    let bad = |msg: String| PartitionError::Options(msg);
    if p == 0 || m == 0 {
        return Err(bad(format!(
            "--pp {p} --micro-batches {m}: both must be at least 1"
        )));
    }
    let (p, m) = (
        u32::try_from(p).map_err(|_| bad(format!("--pp {p} is too large")))?,
        u32::try_from(m).map_err(|_| bad(format!("--micro-batches {m} is too large")))?,
    );
    let v = u32::try_from(opts.virtual_stages.max(1)).map_err(|_| {
        bad(format!(
            "--virtual-stages {} is too large",
            opts.virtual_stages
        ))
    })?;
    match opts.schedule {
        Schedule::Interleaved if v < 2 || p < 2 => {
            return Err(bad(format!(
                "the interleaved schedule needs --pp 2 or more and --virtual-stages 2 or more \
                 (model chunks per stage); given --pp {p} --virtual-stages {v}"
            )))
        }
        Schedule::Interleaved if !m.is_multiple_of(p) => {
            return Err(bad(format!(
                "the interleaved schedule runs micro-batches in groups of --pp {p}: \
                 --micro-batches {m} is not a multiple of {p} (valid: {p}, {}, {}, ...)",
                2 * p,
                3 * p
            )))
        }
        Schedule::GPipe | Schedule::OneFOneB if v > 1 => {
            return Err(bad(format!(
                "--virtual-stages {v} is for --schedule interleaved, not {}",
                opts.schedule
            )))
        }
        _ => {}
    }
    let g = &plan.graph;
    let fwd = &g.order[..plan.backward_start];
    let layer_of = layer_index(g);
    let layers = g.layers().count();
    // Virtual stage `c·P + s` is model chunk `c` of stage `s`: layers go to virtual stages in
    // order, so each stage holds `V` chunks spread through the model.
    let nv = p * v;
    if p > 1 && layers == 0 {
        return Err(bad(format!(
            "`{}` has no repeated layers (a `Repeat` of a block) to cut into {p} stages",
            g.name
        )));
    }
    if nv as usize > layers.max(1) {
        return Err(bad(if v > 1 {
            format!(
                "{p} stages of {v} chunks for {layers} layers: every chunk needs a layer (valid: \
                 --pp × --virtual-stages up to {layers})"
            )
        } else {
            format!(
                "{p} stages for {layers} layers: every stage needs a layer (valid --pp: 1 to \
                 {layers})"
            )
        }));
    }
    // Work per layer, and before and after the layers: the program's FLOPs on one rank,
    // forward and backward (each node counted where the stage cut will put it).
    let region = forward_regions(g, fwd, &layer_of);
    let mut work = vec![0f64; layers + 2];
    let origins: HashMap<NodeId, NodeId> = origin.iter().copied().collect();
    for &n in &g.order {
        let f = origins.get(&n).copied().unwrap_or(n);
        if let Some(&r) = region.get(&f) {
            let (mm, other) = node_flops(g, &g.nodes[n].op, &g.nodes[n].outputs);
            work[r] += (mm + other) as f64;
        }
    }
    let counts = match &opts.stage_layers {
        Some(counts) => {
            let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
            if counts.len() != nv as usize || total != layers as u64 || counts.contains(&0) {
                return Err(bad(format!(
                    "--stage-layers {}: {nv} positive counts (one per stage{}) adding up to the \
                     model's {layers} layers",
                    counts
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    if v > 1 { " and chunk" } else { "" }
                )));
            }
            counts.clone()
        }
        None => balance(&work, nv as usize),
    };
    // Region r (0: before the layers, 1..=L: layer r − 1, L + 1: after) → virtual stage.
    let mut virtual_of_region = vec![0u32; layers + 2];
    let mut at = 1;
    for (vs, &c) in counts.iter().enumerate() {
        for _ in 0..c {
            virtual_of_region[at] = vs as u32;
            at += 1;
        }
    }
    virtual_of_region[layers + 1] = nv - 1;
    let mut virtual_of: SecondaryMap<NodeId, u32> = SecondaryMap::with_capacity(g.nodes.len());
    for &n in fwd {
        virtual_of[n] = virtual_of_region[region[&n]];
    }
    // Backward nodes on their forward node's stage; the seed on the loss's, and what the
    // partitioner added after autodiff (gradient reductions) on its inputs' lowest stage (a
    // gradient flows down the stages).
    let loss_stage = match g.values[plan.loss].def {
        ValueDef::Node { node, .. } => virtual_of[node],
        _ => nv - 1,
    };
    for &n in &g.order[plan.backward_start..] {
        virtual_of[n] = match origins.get(&n) {
            Some(f) => virtual_of[*f],
            None => g.nodes[n]
                .op
                .inputs()
                .iter()
                .filter_map(|&&v| match g.values[v].def {
                    ValueDef::Node { node, .. } => Some(virtual_of[node]),
                    _ => None,
                })
                .min()
                .unwrap_or(loss_stage),
        };
    }
    let mut stage_of: SecondaryMap<NodeId, u32> = SecondaryMap::with_capacity(g.nodes.len());
    let mut chunk_of: SecondaryMap<NodeId, u32> = SecondaryMap::with_capacity(g.nodes.len());
    for &n in &g.order {
        stage_of[n] = virtual_of[n] % p;
        chunk_of[n] = virtual_of[n] / p;
    }
    // Who reads what.
    let mut holders: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); g.params.len()];
    let param_of: HashMap<ValueId, ParamId> = g.params.iter().map(|(p, d)| (d.value, p)).collect();
    let mut position: SecondaryMap<NodeId, usize> = SecondaryMap::with_capacity(g.nodes.len());
    for (i, &n) in g.order.iter().enumerate() {
        position[n] = i;
    }
    let mut transfers = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, &n) in g.order.iter().enumerate() {
        let s = stage_of[n];
        for &&value in g.nodes[n].op.inputs().iter() {
            let ValueDef::Node { node, .. } = g.values[value].def else {
                if let ValueDef::Param(_) = g.values[value].def {
                    holders[param_of[&value].index()].insert(s);
                }
                continue;
            };
            if virtual_of[node] == virtual_of[n] {
                continue;
            }
            let made_bw = position[node] >= plan.backward_start;
            let read_bw = i >= plan.backward_start;
            let (from, to) = (virtual_of[node], virtual_of[n]);
            // Forward activations flow up the (virtual) stages, gradients down; a forward
            // value may be read by any stage's backward part (every forward of a micro-batch
            // precedes its backward). Anything else would wait on itself.
            let flows = match (made_bw, read_bw) {
                (false, false) => from < to,
                (true, true) => from > to,
                (false, true) => true,
                (true, false) => false,
            };
            if !flows {
                return Err(bad(format!(
                    "`{}` is made on stage {} and read by `{}` on stage {s}, against the \
                     pipeline's flow: this model's layers cannot be cut into stages there",
                    g.values[value].name, stage_of[node], g.nodes[n].name
                )));
            }
            // Another chunk of the same stage has it already (a micro-batch's values are one
            // store on a stage); another stage receives it once.
            if stage_of[node] != s && seen.insert((value, s)) {
                // Whole on every tp rank: its last dimension cut over them, if it divides.
                let ty = g.ty(value);
                let tp = plan.mesh.tp.max(1);
                let scatter = (tp > 1
                    && plan.layouts[value].tp == Layout::Replicated
                    && ty.shape.rank() > 0
                    && ty.shape.size(ty.shape.rank() - 1).is_multiple_of(tp))
                .then(|| ty.shape.rank() - 1);
                transfers.push(Transfer {
                    value,
                    from: stage_of[node],
                    to: s,
                    backward: made_bw,
                    scatter,
                });
            }
        }
    }
    let holders: Vec<Vec<u32>> = holders
        .into_iter()
        .map(|h| h.into_iter().collect())
        .collect();
    let mut tied = Vec::new();
    for &(param, grad) in &plan.grads {
        let h = &holders[param.index()];
        let owner = match g.values[grad].def {
            ValueDef::Node { node, .. } => stage_of[node],
            _ => continue,
        };
        if h.len() > 1 || h.first() != Some(&owner) {
            let mut all = h.clone();
            if !all.contains(&owner) {
                all.push(owner);
                all.sort_unstable();
            }
            tied.push(Tied {
                param,
                owner,
                holders: all,
            });
        }
    }
    let (steps, chunks) = match opts.schedule {
        Schedule::Interleaved => (0..p)
            .map(|s| interleaved_steps(p, s, m, v).into_iter().unzip())
            .unzip(),
        schedule => (
            (0..p).map(|s| steps(schedule, p, s, m)).collect(),
            Vec::new(),
        ),
    };
    Ok(Pipeline {
        stages: p,
        micro_batches: m,
        schedule: opts.schedule,
        virtual_stages: v,
        layers: counts,
        stage_of,
        chunk_of,
        holders,
        tied,
        transfers,
        steps,
        chunks,
    })
}

/// The index of each scope's layer (the Repeat copy it is in), in layer order.
fn layer_index(g: &Graph) -> SecondaryMap<ScopeId, Option<usize>> {
    let index: HashMap<ScopeId, usize> = g.layers().enumerate().map(|(i, (s, _))| (s, i)).collect();
    let mut out: SecondaryMap<ScopeId, Option<usize>> = SecondaryMap::new();
    for (s, _) in g.scopes.iter() {
        let mut cur = Some(s);
        while let Some(c) = cur {
            if let Some(&i) = index.get(&c) {
                out[s] = Some(i);
                break;
            }
            cur = g.scopes[c].parent;
        }
    }
    out
}

/// Each forward node's region: 0 before the first layer, `i + 1` in layer `i`, `L + 1` after
/// the last. A node outside every layer between two layers' nodes (a collective the
/// partitioner placed there) goes with the layer before it.
fn forward_regions(
    g: &Graph,
    fwd: &[NodeId],
    layer_of: &SecondaryMap<ScopeId, Option<usize>>,
) -> HashMap<NodeId, usize> {
    let layer = |n: NodeId| g.nodes[n].scope.and_then(|s| layer_of[s]);
    let layers = g.layers().count();
    let last = fwd.iter().rposition(|&n| layer(n).is_some());
    let mut current = 0;
    fwd.iter()
        .enumerate()
        .map(|(i, &n)| {
            let r = match layer(n) {
                Some(l) => {
                    current = l + 1;
                    current
                }
                None if last.is_some_and(|last| i > last) => layers + 1,
                None => current,
            };
            (n, r)
        })
        .collect()
}

/// Layers per stage: the contiguous split of the layers into `p` stages, each with at least one,
/// that makes the most loaded stage (the first counting `work[0]`, the last `work[L + 1]`) as
/// light as it can be; of equally light splits, the one with the fewest layers early (an earlier
/// stage holds more micro-batches' activations under 1F1B).
fn balance(work: &[f64], p: usize) -> Vec<u32> {
    let layers = work.len() - 2;
    let w = &work[1..=layers];
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(w.iter().scan(0.0, |acc, x| {
            *acc += x;
            Some(*acc)
        }))
        .collect();
    let load = |s: usize, from: usize, to: usize| {
        let mut x = prefix[to] - prefix[from];
        if s == 0 {
            x += work[0];
        }
        if s == p - 1 {
            x += work[layers + 1];
        }
        x
    };
    // best[s][i]: the lightest maximum load of stages 0..=s holding layers 0..i.
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; layers + 1]; p];
    let mut cut = vec![vec![0usize; layers + 1]; p];
    for (i, b) in best[0].iter_mut().enumerate().skip(1) {
        *b = load(0, 0, i);
    }
    for s in 1..p {
        for i in s + 1..=layers {
            for j in s..i {
                let v = best[s - 1][j].max(load(s, j, i));
                if v < best[s][i] {
                    best[s][i] = v;
                    cut[s][i] = j;
                }
            }
        }
    }
    let mut counts = vec![0u32; p];
    let mut i = layers;
    for s in (0..p).rev() {
        let j = if s == 0 { 0 } else { cut[s][i] };
        counts[s] = (i - j) as u32;
        i = j;
    }
    counts
}

/// Every rank's coordinates in `mesh`, for reports: `(rank, tp, dp, pp)`.
pub fn rank_coordinates(mesh: Mesh) -> Vec<(usize, usize, usize, usize)> {
    mesh.coords()
        .enumerate()
        .map(|(r, c)| (r, c.tp, c.dp, c.pp))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_warms_up_then_alternates_and_drains() {
        use PipeStep::{Backward as B, Forward as F};
        assert_eq!(
            steps(Schedule::OneFOneB, 3, 0, 4),
            vec![F(0), F(1), F(2), B(0), F(3), B(1), B(2), B(3)]
        );
        assert_eq!(
            steps(Schedule::OneFOneB, 3, 2, 4),
            vec![F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3)]
        );
        // Fewer micro-batches than the warm-up would take.
        assert_eq!(
            steps(Schedule::OneFOneB, 4, 0, 2),
            vec![F(0), F(1), B(0), B(1)]
        );
        assert_eq!(
            steps(Schedule::GPipe, 2, 1, 2),
            vec![F(0), F(1), B(0), B(1)]
        );
    }

    #[test]
    fn interleaved_groups_p_micro_batches_over_the_chunks() {
        use PipeStep::{Backward as B, Forward as F};
        assert_eq!(
            interleaved_steps(2, 0, 4, 2),
            vec![
                (F(0), 0),
                (F(1), 0),
                (F(0), 1),
                (F(1), 1),
                (F(2), 0),
                (B(0), 1),
                (F(3), 0),
                (B(1), 1),
                (F(2), 1),
                (B(0), 0),
                (F(3), 1),
                (B(1), 0),
                (B(2), 1),
                (B(3), 1),
                (B(2), 0),
                (B(3), 0),
            ]
        );
    }

    /// Runs every stage's steps in order, each as soon as what it needs is done (the previous
    /// virtual stage's forward, the next one's backward); panics on a deadlock.
    fn runs_to_the_end(p: u32, m: u32, v: u32, per_stage: &[Vec<(PipeStep, u32)>]) {
        let nv = (p * v) as usize;
        let mut fwd = vec![vec![false; nv]; m as usize];
        let mut bwd = vec![vec![false; nv]; m as usize];
        let mut next = vec![0usize; p as usize];
        loop {
            let mut progressed = false;
            for s in 0..p as usize {
                let Some(&(step, c)) = per_stage[s].get(next[s]) else {
                    continue;
                };
                let vs = c as usize * p as usize + s;
                let ready = match step {
                    PipeStep::Forward(mb) => vs == 0 || fwd[mb as usize][vs - 1],
                    PipeStep::Backward(mb) => {
                        fwd[mb as usize][vs] && (vs + 1 == nv || bwd[mb as usize][vs + 1])
                    }
                };
                if ready {
                    match step {
                        PipeStep::Forward(mb) => fwd[mb as usize][vs] = true,
                        PipeStep::Backward(mb) => bwd[mb as usize][vs] = true,
                    }
                    next[s] += 1;
                    progressed = true;
                }
            }
            if next.iter().zip(per_stage).all(|(n, st)| *n == st.len()) {
                break;
            }
            assert!(progressed, "p={p} m={m} v={v}: deadlock at {next:?}");
        }
        assert!(bwd.iter().flatten().all(|&b| b), "every step ran");
    }

    #[test]
    fn every_schedule_respects_the_dependencies() {
        for (p, m) in [(2, 2), (2, 4), (3, 3), (4, 8), (4, 2), (3, 7)] {
            for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
                let per: Vec<Vec<(PipeStep, u32)>> = (0..p)
                    .map(|s| {
                        steps(schedule, p, s, m)
                            .into_iter()
                            .map(|x| (x, 0))
                            .collect()
                    })
                    .collect();
                runs_to_the_end(p, m, 1, &per);
            }
        }
        for (p, m, v) in [
            (2, 2, 2),
            (2, 4, 2),
            (4, 8, 2),
            (4, 4, 3),
            (3, 6, 2),
            (2, 8, 4),
        ] {
            let per: Vec<_> = (0..p).map(|s| interleaved_steps(p, s, m, v)).collect();
            for st in &per {
                assert_eq!(st.len(), (2 * m * v) as usize);
            }
            runs_to_the_end(p, m, v, &per);
        }
    }

    #[test]
    fn balance_gives_lighter_end_stages_fewer_layers() {
        // Eight equal layers, a heavy embedding and a heavier head.
        let mut work = vec![1.0; 10];
        work[0] = 2.0;
        work[9] = 4.0;
        let counts = balance(&work, 2);
        assert_eq!(counts.iter().sum::<u32>(), 8);
        assert_eq!(counts, vec![5, 3]);
        assert_eq!(balance(&[0.0, 1.0, 1.0, 1.0, 0.0], 3), vec![1, 1, 1]);
        // A tie goes to fewer layers on the earlier stage, which holds more micro-batches'
        // activations under 1F1B.
        assert_eq!(balance(&[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0], 2), vec![2, 3]);
    }
}
