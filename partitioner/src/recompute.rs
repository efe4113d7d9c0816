//! Activation recomputation as a graph transformation: forward values the backward pass reads
//! are computed again inside the backward pass instead of being kept from the forward.
//!
//! ```text
//! SPMD graph (forward + backward) ─► groups: each layer (full) or each attention core
//!   (selective) ─► in each group, the values the backward reads that nothing outside the group
//!   reads in the forward ─► duplicates of the nodes that make them (and of what those need
//!   inside the group), inserted just before the group's first backward reader, which reads the
//!   duplicates instead ─► the forward values die at their last forward use
//! ```
//!
//! - **full** keeps only what crosses a layer's boundary (its input, what later layers or the
//!   head read) and recomputes the rest of the layer, its tensor-parallel collectives included,
//!   one layer at a time in the backward pass.
//! - **selective** (Korthikanti et al. 2022, *Reducing Activation Recomputation in Large
//!   Transformer Models*) recomputes only the attention core: from the scores `Q·Kᵀ` through
//!   the scaling, the softmax and its dropout, whose `[batch, heads, seq, seq]` values are the
//!   largest a layer saves and the cheapest to remake; `Q`, `K`, `V` and the context are kept.
//!
//! Dropout masks are a function of the element's index and the step ([`ferrotron_ir::reference::dropout_keeps`]),
//! so a recomputed dropout draws the forward's mask. The duplicates are ordinary nodes of the
//! plan (named `recompute.<node>`, in the original's scope): the verifier, the simulator, the
//! runtimes, the report and the cost model see them as they see any other.

use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{Graph, NodeId, Op, ScopeId, ValueDef, ValueId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What the backward pass recomputes instead of keeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Recompute {
    /// Keep every forward value the backward reads.
    #[default]
    None,
    /// Recompute each layer's attention core (scores, softmax, dropout).
    Selective,
    /// Keep only each layer's inputs and recompute the layer.
    Full,
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        })
    }
}

impl std::str::FromStr for Recompute {
    type Err = String;

    fn from_str(s: &str) -> Result<Recompute, String> {
        match s {
            "none" => Ok(Recompute::None),
            "selective" => Ok(Recompute::Selective),
            "full" => Ok(Recompute::Full),
            other => Err(format!(
                "`{other}`: recomputation is `none` (the default), `selective` (the attention \
                 core) or `full` (every layer but its inputs)"
            )),
        }
    }
}

/// The layer (a copy made by `Repeat`, [`Graph::layers`]) each scope belongs to.
pub fn layer_of_scope(g: &Graph) -> SecondaryMap<ScopeId, Option<ScopeId>> {
    let layers: std::collections::HashSet<ScopeId> = g.layers().map(|(s, _)| s).collect();
    let mut of = SecondaryMap::with_capacity(g.scopes.len());
    for (s, _) in g.scopes.iter() {
        let mut at = Some(s);
        while let Some(x) = at {
            if layers.contains(&x) {
                of[s] = Some(x);
                break;
            }
            at = g.scopes[x].parent;
        }
    }
    of
}

/// The node defining `v`, if a node does.
fn producer(g: &Graph, v: ValueId) -> Option<NodeId> {
    match g.values[v].def {
        ValueDef::Node { node, .. } => Some(node),
        _ => None,
    }
}

/// Each attention core among the forward nodes `g.order[..forward_end]`: the nodes from the
/// scores matmul through the softmax and what follows it elementwise (dropout) to the matmul
/// with the values. That last matmul is a member so that its input (the dropped-out
/// probabilities, which its backward reads) is recomputed; its output, the context, is read
/// outside the core and so kept. One group per softmax that sits between two matmuls; a
/// softmax elsewhere (a classifier) is not a core.
pub fn attention_cores(g: &Graph, forward_end: usize) -> Vec<Vec<NodeId>> {
    let forward = &g.order[..forward_end];
    let mut readers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
    for &n in forward {
        for &v in g.nodes[n].op.inputs() {
            readers.entry(v).or_default().push(n);
        }
    }
    let elementwise_on = |n: NodeId| -> Option<ValueId> {
        match &g.nodes[n].op {
            Op::Scale { x, .. } | Op::Dropout { x, .. } => Some(*x),
            _ => None,
        }
    };
    let mut cores = Vec::new();
    for &n in forward {
        let Op::Softmax { x, .. } = &g.nodes[n].op else {
            continue;
        };
        // Up to the scores matmul, through scalings.
        let mut up = vec![n];
        let mut at = *x;
        let scores = loop {
            let Some(p) = producer(g, at) else { break None };
            if matches!(g.nodes[p].op, Op::MatMul { .. }) {
                break Some(p);
            }
            match elementwise_on(p) {
                Some(x) => {
                    up.push(p);
                    at = x;
                }
                None => break None,
            }
        };
        let Some(scores) = scores else { continue };
        up.push(scores);
        up.reverse();
        // Down to the matmul with the values, through dropout.
        let mut at = g.nodes[n].outputs[0];
        let mut down = Vec::new();
        let found = loop {
            let next = readers.get(&at).map(Vec::as_slice).unwrap_or(&[]);
            let [m] = next else { break false };
            if matches!(g.nodes[*m].op, Op::MatMul { .. }) {
                down.push(*m);
                break true;
            }
            if elementwise_on(*m).is_none() {
                break false;
            }
            down.push(*m);
            at = g.nodes[*m].outputs[0];
        };
        if found {
            up.extend(down);
            cores.push(up);
        }
    }
    cores
}

/// The groups `mode` recomputes: every layer's forward nodes (full), or every attention core
/// (selective).
fn groups(g: &Graph, forward_end: usize, mode: Recompute) -> Vec<Vec<NodeId>> {
    match mode {
        Recompute::None => Vec::new(),
        Recompute::Selective => attention_cores(g, forward_end),
        Recompute::Full => {
            let layer = layer_of_scope(g);
            let mut by_layer: Vec<(ScopeId, Vec<NodeId>)> = Vec::new();
            for &n in &g.order[..forward_end] {
                let Some(l) = g.nodes[n].scope.and_then(|s| layer[s]) else {
                    continue;
                };
                match by_layer.iter_mut().find(|(s, _)| *s == l) {
                    Some((_, nodes)) => nodes.push(n),
                    None => by_layer.push((l, vec![n])),
                }
            }
            by_layer.into_iter().map(|(_, nodes)| nodes).collect()
        }
    }
}

/// Rewrites `g` (forward nodes `g.order[..backward_start]`, then the backward pass) so the
/// backward pass recomputes what `mode` says. Returns each duplicate with the node it copies
/// (in insertion order), so callers can give it the original's layouts and pipeline place.
pub fn apply(
    g: &mut Graph,
    backward_start: usize,
    mode: Recompute,
) -> Result<Vec<(NodeId, NodeId)>, ferrotron_ir::OpError> {
    let groups = groups(g, backward_start, mode);
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    let position: HashMap<NodeId, usize> =
        g.order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let outputs: std::collections::HashSet<ValueId> = g.outputs.iter().map(|&(_, v)| v).collect();
    // Who reads each value, forward and backward.
    let mut forward_readers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
    let mut backward_readers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
    for (i, &n) in g.order.iter().enumerate() {
        let readers = if i < backward_start {
            &mut forward_readers
        } else {
            &mut backward_readers
        };
        for &v in g.nodes[n].op.inputs() {
            readers.entry(v).or_default().push(n);
        }
    }
    // Per group: the duplicates to make (in forward order) and where they go.
    let mut plans: Vec<(usize, Vec<NodeId>, Vec<ValueId>)> = Vec::new();
    for group in &groups {
        let member: std::collections::HashSet<NodeId> = group.iter().copied().collect();
        // Values the backward reads that only the group reads in the forward.
        let recomputed: Vec<ValueId> = group
            .iter()
            .flat_map(|&n| g.nodes[n].outputs.iter().copied())
            .filter(|v| backward_readers.contains_key(v) && !outputs.contains(v))
            .filter(|v| {
                forward_readers
                    .get(v)
                    .is_none_or(|rs| rs.iter().all(|r| member.contains(r)))
            })
            .collect();
        if recomputed.is_empty() {
            continue;
        }
        // The nodes that remake them, and what those read inside the group and do not keep.
        let mut needed: std::collections::HashSet<NodeId> =
            recomputed.iter().filter_map(|&v| producer(g, v)).collect();
        let kept = |v: ValueId| !recomputed.contains(&v);
        let mut stack: Vec<NodeId> = needed.iter().copied().collect();
        while let Some(n) = stack.pop() {
            for &v in g.nodes[n].op.inputs() {
                let Some(p) = producer(g, v) else { continue };
                // An input made in the group is remade too unless it is kept anyway (read
                // outside the group, so alive at this point).
                let outside = forward_readers
                    .get(&v)
                    .is_some_and(|rs| rs.iter().any(|r| !member.contains(r)))
                    || outputs.contains(&v);
                if member.contains(&p) && !outside && kept(v) && needed.insert(p) {
                    stack.push(p);
                }
            }
        }
        let mut nodes: Vec<NodeId> = needed.into_iter().collect();
        nodes.sort_by_key(|n| position[n]);
        let first_reader = recomputed
            .iter()
            .flat_map(|v| &backward_readers[v])
            .map(|n| position[n])
            .min()
            .expect("every recomputed value has a backward reader");
        plans.push((first_reader, nodes, recomputed));
    }
    // Make the duplicates (appended to the order for now) and rewire the backward readers.
    let mut insert_before: HashMap<usize, Vec<NodeId>> = HashMap::new();
    let mut copies = Vec::new();
    let original_len = g.order.len();
    for (first_reader, nodes, recomputed) in plans {
        let mut remap: HashMap<ValueId, ValueId> = HashMap::new();
        let mut made = Vec::with_capacity(nodes.len());
        for n in nodes {
            let data = &g.nodes[n];
            let op = remapped(&data.op, &remap);
            let name = format!("recompute.{}", data.name);
            let names: Vec<String> = data
                .outputs
                .iter()
                .map(|&v| format!("recompute.{}", g.values[v].name))
                .collect();
            let (scope, originals) = (data.scope, data.outputs.clone());
            let outs = g.add_node(name, op, names, scope)?.to_vec();
            let copy = *g.order.last().expect("a node was just added");
            for (o, c) in originals.into_iter().zip(outs) {
                remap.insert(o, c);
            }
            made.push(copy);
            copies.push((copy, n));
        }
        for v in recomputed {
            for &r in &backward_readers[&v] {
                g.nodes[r].op = remapped(&g.nodes[r].op, &remap);
            }
        }
        insert_before.entry(first_reader).or_default().extend(made);
    }
    // Put each group's duplicates just before its first backward reader.
    let mut order = Vec::with_capacity(g.order.len());
    for (i, &n) in g.order[..original_len].iter().enumerate() {
        if let Some(made) = insert_before.get(&i) {
            order.extend(made);
        }
        order.push(n);
    }
    g.order = order;
    Ok(copies)
}

/// `op` reading `remap[v]` for every value `v` that `remap` has.
fn remapped(op: &Op, remap: &HashMap<ValueId, ValueId>) -> Op {
    let same = op.try_map::<_, _, std::convert::Infallible, _, _>(
        |v| Ok(*remap.get(v).unwrap_or(v)),
        |d| Ok(d.clone()),
    );
    match same {
        Ok(op) => op,
        Err(never) => match never {},
    }
}
