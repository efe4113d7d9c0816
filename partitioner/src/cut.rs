//! The pipeline cut: a plan's program divided into stages ([`crate::pipeline::Pipeline`]).
//!
//! ```text
//! Plan + autodiff's origins ─► layers (the Repeat's copies) in P·V contiguous virtual stages,
//!   balanced by each layer's forward and backward FLOPs (or `--stage-layers`); what precedes
//!   the layers on the first, what follows on the last; virtual stage c·P + s is chunk c of
//!   stage s ─► every node's stage and chunk (a backward node on its forward node's) ─► the
//!   values that cross stages (checked to flow with the pipeline), each parameter's holders,
//!   tied parameters ─► each stage's steps under the schedule
//! ```

use crate::layout::Layout;
use crate::pipeline::{interleaved_steps, steps, Pipeline, Schedule, Tied, Transfer};
use crate::plan::{PartitionOptions, Plan};
use crate::PartitionError;
use ferrotron_ir::count::node_flops;
use ferrotron_ir::graph::{EntityRef, SecondaryMap};
use ferrotron_ir::{Graph, NodeId, ParamId, ScopeId, ValueDef, ValueId};
use std::collections::{BTreeSet, HashMap};

/// Cuts `plan`'s program into `opts.pp` stages with `opts.micro_batches` micro-batches;
/// `origin` maps each backward node to its forward node (autodiff's).
pub fn cut(
    plan: &Plan,
    origin: &[(NodeId, NodeId)],
    opts: &PartitionOptions,
) -> Result<Pipeline, PartitionError> {
    let (p, m) = (opts.pp, opts.micro_batches);
    let bad = |msg: String| PartitionError::Options(msg);
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
        None if v > 1 => rebalance_stages(&work, balance(&work, nv as usize), p as usize),
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
                    once_a_step: false,
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
    // A tied parameter's contribution from another stage goes once a step: the node that adds
    // it to the owner's sum (the gradient, or what its reductions start from) is its only
    // reader.
    if m > 1 {
        for t in &tied {
            let Some(&(_, grad)) = plan.grads.iter().find(|(p, _)| *p == t.param) else {
                continue;
            };
            let mut sum = grad;
            while let ValueDef::Node { node, .. } = g.values[sum].def {
                match g.nodes[node].op {
                    ferrotron_ir::Op::AllReduce { x, .. } => sum = x,
                    _ => break,
                }
            }
            let ValueDef::Node { node: add, .. } = g.values[sum].def else {
                continue;
            };
            let ferrotron_ir::Op::Add(a, b) = g.nodes[add].op else {
                continue;
            };
            for tr in transfers.iter_mut() {
                let only_reader = g
                    .order
                    .iter()
                    .filter(|&&n| g.nodes[n].op.inputs().contains(&&tr.value))
                    .all(|&n| n == add);
                if (tr.value == a || tr.value == b)
                    && tr.to == stage_of[add]
                    && tr.backward
                    && tr.scatter.is_none()
                    && only_reader
                {
                    tr.once_a_step = true;
                }
            }
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

/// Each stage's load: the work of its chunks (virtual stages `c·p + s`) under `counts` layers
/// per virtual stage, the first counting `work[0]`, the last `work[L + 1]`.
fn stage_loads(work: &[f64], counts: &[u32], p: usize) -> Vec<f64> {
    let layers = work.len() - 2;
    let mut loads = vec![0.0; p];
    let mut at = 1;
    for (vs, &c) in counts.iter().enumerate() {
        let mut w: f64 = work[at..at + c as usize].iter().sum();
        if vs == 0 {
            w += work[0];
        }
        if vs + 1 == counts.len() {
            w += work[layers + 1];
        }
        loads[vs % p] += w;
        at += c as usize;
    }
    loads
}

/// With several chunks per stage, a stage runs all of them: starting from virtual stages
/// balanced one by one, layers move across chunk boundaries while that lightens the most loaded
/// stage (ties: the spread of the loads), each chunk keeping a layer.
fn rebalance_stages(work: &[f64], mut counts: Vec<u32>, p: usize) -> Vec<u32> {
    let score = |counts: &[u32]| {
        let loads = stage_loads(work, counts, p);
        let max = loads.iter().copied().fold(0.0, f64::max);
        let spread = loads.iter().map(|l| l * l).sum::<f64>();
        (max, spread)
    };
    let mut best = score(&counts);
    // Each accepted move lowers the score, and there are finitely many splits: this ends; the
    // bound keeps it quick on deep models.
    for _ in 0..4 * work.len() {
        let mut improved = false;
        for b in 0..counts.len() - 1 {
            for (from, to) in [(b, b + 1), (b + 1, b)] {
                if counts[from] <= 1 {
                    continue;
                }
                counts[from] -= 1;
                counts[to] += 1;
                let s = score(&counts);
                if s.0 < best.0 - 1e-9 * best.0 || (s.0 <= best.0 && s.1 < best.1 - 1e-9 * best.1) {
                    best = s;
                    improved = true;
                } else {
                    counts[to] -= 1;
                    counts[from] += 1;
                }
            }
        }
        if !improved {
            break;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn interleaved_chunks_balance_the_stages_not_the_chunks() {
        // Sixteen equal layers, a head worth three of them, two stages of two chunks: chunk by
        // chunk the last (virtual) stage gets fewer layers, but stage 1 also holds chunk 0's
        // second quarter; what counts is each stage's sum.
        let mut work = vec![1.0; 18];
        work[0] = 0.0;
        work[17] = 3.0;
        let counts = rebalance_stages(&work, balance(&work, 4), 2);
        assert_eq!(counts.iter().sum::<u32>(), 16);
        assert!(counts.iter().all(|&c| c >= 1));
        let loads = stage_loads(&work, &counts, 2);
        assert!((loads[0] - loads[1]).abs() <= 1.0, "{counts:?}: {loads:?}");
        let before = stage_loads(&work, &balance(&work, 4), 2);
        let max = |l: &[f64]| l.iter().copied().fold(0.0, f64::max);
        assert!(max(&loads) <= max(&before));
    }
}
