//! A layered (Sugiyama-style) layout of a plan's graph, top to bottom, shared by the SVG/DOT
//! export and the GUI.
//!
//! 1. **Items.** Every op of the plan is an item, and so (optionally) is every parameter and graph
//!    input. The ops (and parameters) whose scope lies inside transformer layer `i` are
//!    *collapsed* into one item per layer and direction (`h.3 (gpt_layer)`, and in the
//!    forward + backward view `h.3 (gpt_layer) backward`), unless layer `i` is expanded.
//!    Several values between the same two items become one edge.
//! 2. **Ranks.** Items are placed in program order (a collapsed layer at its first op), so every
//!    edge joins an earlier item to a later one; longest-path layering over those edges gives each
//!    item a rank, and each source (parameter, input) sits one rank above its first consumer.
//!    Edges spanning several ranks get one dummy vertex per crossed rank.
//! 3. **Order.** Barycentre sweeps, down then up, order each rank to reduce crossings.
//! 4. **Coordinates.** Each rank is one row; within a row, boxes are kept in order with a gap
//!    between them and pulled toward the mean centre of their neighbours (a least-squares
//!    projection, pool-adjacent-violators), down, up and down again. No two boxes overlap, and
//!    every edge runs from the bottom of one box to the top of a lower one.
//!
//! Everything is linear or `n log n` in the number of items plus dummy vertices: the 72-layer
//! 8.3B plan, collapsed, lays out in milliseconds.

use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{MeshAxis, NodeId, Op, ParamId, ScopeId, ValueId};
use ferrotron_partitioner::{Layout as TpLayout, Plan};
use std::collections::HashMap;

/// What to lay out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutOptions {
    /// Include the backward pass (`plan.backward_start..`), not only the forward.
    pub backward: bool,
    /// Expand every layer (one item per op).
    pub expand_all: bool,
    /// Layers (by index in [`ferrotron_ir::Graph::layers`]) to expand when not `expand_all`.
    pub expand: Vec<usize>,
    /// Draw parameters and graph inputs as small source items (those inside a collapsed layer
    /// are part of its box).
    pub sources: bool,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            backward: false,
            expand_all: false,
            expand: Vec::new(),
            sources: true,
        }
    }
}

/// What one laid-out box stands for.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// One op of the plan (a collective among them).
    Op(NodeId),
    /// A parameter.
    Param(ParamId),
    /// A graph input.
    Input(ValueId),
    /// A collapsed transformer layer: its forward or its backward ops.
    Layer {
        /// Index among the graph's layers.
        index: usize,
        /// The layer's scope.
        scope: ScopeId,
        /// Whether these are the layer's backward ops.
        backward: bool,
        /// Its ops, in program order.
        nodes: Vec<NodeId>,
        /// Its collectives by short name (`f`, `g`, `all-gather`, ...) with their counts.
        collectives: Vec<(&'static str, usize)>,
    },
}

/// A box.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// What it stands for.
    pub item: Item,
    /// Its text, one entry per line.
    pub lines: Vec<String>,
    /// Its rank (row), 0 at the top.
    pub rank: usize,
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
}

impl Node {
    /// The centre of the box.
    pub fn centre(&self) -> (f64, f64) {
        (self.x + self.w / 2.0, self.y + self.h / 2.0)
    }
}

/// An edge: one or more values flowing from one box to another.
#[derive(Clone, Debug, PartialEq)]
pub struct Edge {
    /// Source box (index into [`GraphLayout::nodes`]).
    pub from: usize,
    /// Target box.
    pub to: usize,
    /// The first value it carries (its shard-local shape labels the edge).
    pub value: ValueId,
    /// How many values it carries.
    pub count: usize,
    /// The route: bottom centre of `from`, one point per crossed rank, top centre of `to`.
    pub points: Vec<(f64, f64)>,
}

/// A laid-out graph.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphLayout {
    /// The boxes.
    pub nodes: Vec<Node>,
    /// The edges between the boxes, with their routes.
    pub edges: Vec<Edge>,
    /// Number of ranks (rows).
    pub ranks: usize,
    /// Total width.
    pub width: f64,
    /// Total height.
    pub height: f64,
}

/// Font size the box sizes assume (monospace).
pub const FONT_SIZE: f64 = 11.0;
/// Width of one character at [`FONT_SIZE`] (monospace).
pub const CHAR_W: f64 = 6.7;
/// Height of one text line.
pub const LINE_H: f64 = 14.0;
const PAD_X: f64 = 8.0;
const PAD_Y: f64 = 6.0;
const GAP_X: f64 = 24.0;
const GAP_Y: f64 = 44.0;
const DUMMY_W: f64 = 4.0;
const MARGIN: f64 = 20.0;

/// A layout class of a value on the tensor-parallel axis, as the overlay colours it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TpClass {
    /// Every rank holds all of it.
    Replicated,
    /// Split along its last axis (column-parallel).
    Column,
    /// Split along another axis (row-parallel weights, sequence-parallel activations).
    Row,
    /// Each rank holds an addend of it.
    Partial,
}

impl TpClass {
    /// All classes, in legend order.
    pub const ALL: [TpClass; 4] = [
        TpClass::Replicated,
        TpClass::Column,
        TpClass::Row,
        TpClass::Partial,
    ];

    /// The class of a value.
    pub fn of(plan: &Plan, v: ValueId) -> TpClass {
        let rank = plan.graph.values[v].ty.shape.rank();
        match plan.layouts[v].tp {
            TpLayout::Replicated => TpClass::Replicated,
            TpLayout::Partial => TpClass::Partial,
            TpLayout::Split(d) if rank > 0 && d + 1 == rank => TpClass::Column,
            TpLayout::Split(_) => TpClass::Row,
        }
    }

    /// The legend's text.
    pub fn description(self) -> &'static str {
        match self {
            TpClass::Replicated => "replicated",
            TpClass::Column => "split by column (last axis)",
            TpClass::Row => "split by row (other axis)",
            TpClass::Partial => "partial sum",
        }
    }

    /// Fill colour.
    pub fn colour(self) -> &'static str {
        match self {
            TpClass::Replicated => "#e6e6e6",
            TpClass::Column => "#9ecae1",
            TpClass::Row => "#a1d99b",
            TpClass::Partial => "#fdae6b",
        }
    }
}

/// The short name of a collective (or local slice) op: `f`, `g`, `all-reduce`, ...
pub fn collective_short(op: &Op) -> Option<&'static str> {
    Some(match op {
        Op::F { .. } => "f",
        Op::G { .. } => "g",
        Op::AllReduce { .. } => "all-reduce",
        Op::AllGather { .. } => "all-gather",
        Op::ReduceScatter { .. } => "reduce-scatter",
        Op::LocalSlice { .. } => "local-slice",
        _ => return None,
    })
}

fn axis_name(axis: &MeshAxis) -> &'static str {
    match axis {
        MeshAxis::Tp => "tp",
        MeshAxis::Dp => "dp",
    }
}

/// What a collective (or local slice) does, forward and backward, with the paper's names for f
/// and g: `f (fwd: identity, bwd: all-reduce)`. `None` for other ops.
pub fn collective_label(op: &Op) -> Option<String> {
    let s = match op {
        Op::F { axis, .. } => {
            format!("f (fwd: identity, bwd: all-reduce) [{}]", axis_name(axis))
        }
        Op::G { axis, .. } => {
            format!("g (fwd: all-reduce, bwd: identity) [{}]", axis_name(axis))
        }
        Op::AllReduce { axis, .. } => {
            format!(
                "all-reduce (fwd: sum, bwd: all-reduce) [{}]",
                axis_name(axis)
            )
        }
        Op::AllGather {
            dim,
            axis,
            partial_grad,
            ..
        } => format!(
            "all-gather dim {dim} (fwd: concat, bwd: {}) [{}]",
            if *partial_grad {
                "reduce-scatter"
            } else {
                "slice"
            },
            axis_name(axis)
        ),
        Op::ReduceScatter { dim, axis, .. } => format!(
            "reduce-scatter dim {dim} (fwd: sum + slice, bwd: all-gather) [{}]",
            axis_name(axis)
        ),
        Op::LocalSlice { dim, axis, .. } => format!(
            "local slice dim {dim} (fwd: no comm, bwd: all-gather) [{}]",
            axis_name(axis)
        ),
        _ => return None,
    };
    Some(s)
}

/// Whether the op is drawn as a collective (the communicating ops plus local slices, which are
/// layout conversions too).
pub fn is_collective_like(op: &Op) -> bool {
    collective_short(op).is_some()
}

/// A shape as `[8,1024,384]`.
pub fn shape_text(plan: &Plan, v: ValueId) -> String {
    let sizes = plan.graph.values[v].ty.shape.sizes();
    let inner: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    format!("[{}]", inner.join(","))
}

fn lines_of(plan: &Plan, item: &Item) -> Vec<String> {
    let g = &plan.graph;
    match item {
        Item::Op(n) => {
            let node = &g.nodes[*n];
            let second = collective_label(&node.op).unwrap_or_else(|| node.op.mnemonic().into());
            vec![node.name.clone(), second]
        }
        Item::Param(p) => vec![g.params[*p].name.clone()],
        Item::Input(v) => vec![format!("input {}", g.values[*v].name)],
        Item::Layer {
            scope,
            backward,
            nodes,
            collectives,
            ..
        } => {
            let s = &g.scopes[*scope];
            let mut title = format!("{} ({})", s.name, s.block);
            if *backward {
                title.push_str(" backward");
            }
            let comm = if collectives.is_empty() {
                "no collectives".to_string()
            } else {
                collectives
                    .iter()
                    .map(|(k, c)| format!("{k} ×{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![title, format!("{} ops", nodes.len()), comm]
        }
    }
}

/// For every scope, the index of the layer it is inside (itself included), if any.
pub fn scope_layers(plan: &Plan) -> SecondaryMap<ScopeId, Option<usize>> {
    let g = &plan.graph;
    let mut layer_of: SecondaryMap<ScopeId, Option<usize>> = SecondaryMap::new();
    for (i, (s, _)) in g.layers().enumerate() {
        layer_of[s] = Some(i);
    }
    let mut out: SecondaryMap<ScopeId, Option<usize>> = SecondaryMap::new();
    for (s, _) in g.scopes.iter() {
        let mut cur = Some(s);
        while let Some(c) = cur {
            if let Some(i) = layer_of[c] {
                out[s] = Some(i);
                break;
            }
            cur = g.scopes[c].parent;
        }
    }
    out
}

/// Lays out `plan`'s graph.
pub fn layout(plan: &Plan, opts: &LayoutOptions) -> GraphLayout {
    let g = &plan.graph;
    let layer_scopes: Vec<ScopeId> = g.layers().map(|(s, _)| s).collect();
    let in_layer = scope_layers(plan);
    let collapsed = |scope: Option<ScopeId>| -> Option<usize> {
        let i = in_layer[scope?]?;
        (!opts.expand_all && !opts.expand.contains(&i)).then_some(i)
    };
    let end = if opts.backward {
        g.order.len()
    } else {
        plan.backward_start.min(g.order.len())
    };

    // 1. Items, with a program position each (sources before every op).
    let mut items: Vec<Item> = Vec::new();
    let mut pos: Vec<usize> = Vec::new();
    let mut of_value: SecondaryMap<ValueId, u32> = SecondaryMap::with_default(u32::MAX);
    let mut layer_item: HashMap<(usize, bool), usize> = HashMap::new();
    if opts.sources {
        for &v in &g.inputs {
            of_value[v] = items.len() as u32;
            items.push(Item::Input(v));
            pos.push(0);
        }
        for (p, pd) in g.params.iter() {
            match collapsed(pd.scope) {
                Some(i) => {
                    // Part of the layer's forward box, created here so the box's position
                    // precedes its ops.
                    let idx = *layer_item.entry((i, false)).or_insert_with(|| {
                        items.push(Item::Layer {
                            index: i,
                            scope: layer_scopes[i],
                            backward: false,
                            nodes: Vec::new(),
                            collectives: Vec::new(),
                        });
                        pos.push(usize::MAX);
                        items.len() - 1
                    });
                    of_value[pd.value] = idx as u32;
                }
                None => {
                    of_value[pd.value] = items.len() as u32;
                    items.push(Item::Param(p));
                    pos.push(0);
                }
            }
        }
    }
    let mut node_item: SecondaryMap<NodeId, u32> = SecondaryMap::with_default(u32::MAX);
    for (k, &n) in g.order[..end].iter().enumerate() {
        let node = &g.nodes[n];
        let backward = k >= plan.backward_start;
        let idx = match collapsed(node.scope) {
            Some(i) => {
                let idx = *layer_item.entry((i, backward)).or_insert_with(|| {
                    items.push(Item::Layer {
                        index: i,
                        scope: layer_scopes[i],
                        backward,
                        nodes: Vec::new(),
                        collectives: Vec::new(),
                    });
                    pos.push(usize::MAX);
                    items.len() - 1
                });
                if let Item::Layer {
                    nodes, collectives, ..
                } = &mut items[idx]
                {
                    nodes.push(n);
                    if let Some(c) = collective_short(&node.op) {
                        match collectives.iter_mut().find(|(k, _)| *k == c) {
                            Some(e) => e.1 += 1,
                            None => collectives.push((c, 1)),
                        }
                    }
                }
                pos[idx] = pos[idx].min(k + 1);
                idx
            }
            None => {
                items.push(Item::Op(n));
                pos.push(k + 1);
                items.len() - 1
            }
        };
        node_item[n] = idx as u32;
        for &v in &node.outputs {
            of_value[v] = idx as u32;
        }
    }
    // A layer box holding only parameters (no ops in this view) is dropped below; give it a
    // position anyway.
    for p in pos.iter_mut() {
        if *p == usize::MAX {
            *p = 0;
        }
    }

    // Edges between items, deduplicated, in program position order.
    let mut edge_index: HashMap<(u32, u32), usize> = HashMap::new();
    let mut edges: Vec<(usize, usize, ValueId, usize)> = Vec::new();
    for &n in &g.order[..end] {
        let to = node_item[n];
        for &&v in &g.nodes[n].op.inputs() {
            let from = of_value[v];
            if from == u32::MAX || from == to {
                continue;
            }
            match edge_index.get(&(from, to)) {
                Some(&e) => edges[e].3 += 1,
                None => {
                    edge_index.insert((from, to), edges.len());
                    edges.push((from as usize, to as usize, v, 1));
                }
            }
        }
    }

    // Keep items that are ops or have an edge (a layer box of parameters alone is dropped).
    let mut used = vec![false; items.len()];
    for (i, it) in items.iter().enumerate() {
        used[i] = match it {
            Item::Op(_) => true,
            Item::Layer { nodes, .. } => !nodes.is_empty(),
            _ => false,
        };
    }
    for &(a, b, _, _) in &edges {
        if matches!(items[b], Item::Op(_) | Item::Layer { .. }) && used[b] {
            used[a] = true;
        }
    }
    let mut remap = vec![usize::MAX; items.len()];
    let mut kept: Vec<usize> = (0..items.len()).filter(|&i| used[i]).collect();
    kept.sort_by_key(|&i| (pos[i], i));
    for (new, &old) in kept.iter().enumerate() {
        remap[old] = new;
    }
    let n = kept.len();
    let is_source: Vec<bool> = kept
        .iter()
        .map(|&i| matches!(items[i], Item::Param(_) | Item::Input(_)))
        .collect();
    let mut es: Vec<(usize, usize, ValueId, usize)> = edges
        .into_iter()
        .filter(|e| used[e.0] && used[e.1])
        .map(|(a, b, v, c)| (remap[a], remap[b], v, c))
        .collect();
    // Every edge joins an earlier item to a later one (positions are a topological order of
    // the contracted graph); an edge that would not (a cycle through a collapsed box, which a
    // well-formed plan never has) is dropped.
    es.retain(|e| e.0 < e.1);

    // 2. Ranks: longest path over ops, then sources one rank above their first consumer.
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (k, e) in es.iter().enumerate() {
        preds[e.1].push(k);
    }
    let mut rank = vec![0usize; n];
    for v in 0..n {
        if is_source[v] {
            continue;
        }
        let mut r = 1;
        for &k in &preds[v] {
            let u = es[k].0;
            if !is_source[u] {
                r = r.max(rank[u] + 1);
            }
        }
        rank[v] = r;
    }
    let mut first_use = vec![usize::MAX; n];
    for e in &es {
        if is_source[e.0] {
            first_use[e.0] = first_use[e.0].min(rank[e.1]);
        }
    }
    for v in 0..n {
        if is_source[v] {
            rank[v] = first_use[v].saturating_sub(1).min(usize::MAX - 1);
        }
    }
    // Compress away empty ranks.
    let max_rank = rank.iter().copied().max().unwrap_or(0);
    let mut occupied = vec![false; max_rank + 1];
    for &r in &rank {
        occupied[r] = true;
    }
    let mut new_rank = vec![0usize; max_rank + 1];
    let mut next = 0;
    for r in 0..=max_rank {
        new_rank[r] = next;
        if occupied[r] {
            next += 1;
        }
    }
    for r in rank.iter_mut() {
        *r = new_rank[*r];
    }
    let ranks = next;

    // Vertices: the items, then one dummy per crossed rank of each long edge.
    let mut nodes: Vec<Node> = kept
        .iter()
        .map(|&i| {
            let item = items[i].clone();
            let lines = lines_of(plan, &item);
            let chars = lines.iter().map(|l| l.chars().count()).max().unwrap_or(1);
            let w = chars as f64 * CHAR_W + 2.0 * PAD_X;
            let h = lines.len() as f64 * LINE_H + 2.0 * PAD_Y;
            Node {
                item,
                lines,
                rank: 0,
                x: 0.0,
                y: 0.0,
                w,
                h,
            }
        })
        .collect();
    for (v, node) in nodes.iter_mut().enumerate() {
        node.rank = rank[v];
    }
    let mut vrank: Vec<usize> = rank.clone();
    let mut vwidth: Vec<f64> = nodes.iter().map(|nd| nd.w).collect();
    let mut up: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut down: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut chains: Vec<Vec<usize>> = Vec::with_capacity(es.len());
    for e in &es {
        let (a, b) = (e.0, e.1);
        let mut chain = vec![a];
        let mut prev = a;
        for r in vrank[a] + 1..vrank[b] {
            let d = vrank.len();
            vrank.push(r);
            vwidth.push(DUMMY_W);
            up.push(vec![prev]);
            down.push(Vec::new());
            down[prev].push(d);
            chain.push(d);
            prev = d;
        }
        down[prev].push(b);
        up[b].push(prev);
        chain.push(b);
        chains.push(chain);
    }
    let total = vrank.len();

    // 3. Order within ranks: initial by vertex index (program order), then barycentre sweeps.
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); ranks];
    for v in 0..total {
        rows[vrank[v]].push(v);
    }
    let mut idx = vec![0usize; total];
    let reindex = |rows: &Vec<Vec<usize>>, idx: &mut Vec<usize>| {
        for row in rows {
            for (i, &v) in row.iter().enumerate() {
                idx[v] = i;
            }
        }
    };
    reindex(&rows, &mut idx);
    let sweep = |rows: &mut Vec<Vec<usize>>,
                 idx: &mut Vec<usize>,
                 nbrs: &Vec<Vec<usize>>,
                 order: &mut dyn Iterator<Item = usize>| {
        let mut keys: Vec<(f64, usize)> = Vec::new();
        for r in order {
            keys.clear();
            for (i, &v) in rows[r].iter().enumerate() {
                let nb = &nbrs[v];
                let key = if nb.is_empty() {
                    i as f64
                } else {
                    nb.iter().map(|&u| idx[u] as f64).sum::<f64>() / nb.len() as f64
                };
                keys.push((key, v));
            }
            keys.sort_by(|a, b| a.0.total_cmp(&b.0));
            rows[r].clear();
            rows[r].extend(keys.iter().map(|k| k.1));
            for (i, &v) in rows[r].iter().enumerate() {
                idx[v] = i;
            }
        }
    };
    for _ in 0..4 {
        sweep(&mut rows, &mut idx, &up, &mut (1..ranks));
        sweep(
            &mut rows,
            &mut idx,
            &down,
            &mut (0..ranks.saturating_sub(1)).rev(),
        );
    }

    // 4. Coordinates. x: centred rows, then pulled toward neighbours.
    let mut xs = vec![0.0f64; total]; // left edges
    for row in &rows {
        let width: f64 = row.iter().map(|&v| vwidth[v] + GAP_X).sum::<f64>() - GAP_X;
        let mut x = -width / 2.0;
        for &v in row {
            xs[v] = x;
            x += vwidth[v] + GAP_X;
        }
    }
    let place = |xs: &mut Vec<f64>, nbrs: &Vec<Vec<usize>>, row: &Vec<usize>| {
        // Desired left edges, then the closest ordered, non-overlapping placement.
        let mut offs = Vec::with_capacity(row.len());
        let mut target = Vec::with_capacity(row.len());
        let mut o = 0.0;
        for &v in row {
            let nb = &nbrs[v];
            let want_centre = if nb.is_empty() {
                xs[v] + vwidth[v] / 2.0
            } else {
                nb.iter().map(|&u| xs[u] + vwidth[u] / 2.0).sum::<f64>() / nb.len() as f64
            };
            offs.push(o);
            target.push(want_centre - vwidth[v] / 2.0 - o);
            o += vwidth[v] + GAP_X;
        }
        let z = isotonic(&target);
        for (i, &v) in row.iter().enumerate() {
            xs[v] = z[i] + offs[i];
        }
    };
    for pass in 0..3 {
        if pass % 2 == 0 {
            for row in rows.iter().skip(1) {
                place(&mut xs, &up, row);
            }
        } else {
            for r in (0..ranks.saturating_sub(1)).rev() {
                place(&mut xs, &down, &rows[r]);
            }
        }
    }
    // y: one row per rank.
    let mut row_h = vec![0.0f64; ranks];
    for (v, node) in nodes.iter().enumerate() {
        row_h[rank[v]] = row_h[rank[v]].max(node.h);
    }
    let mut row_y = vec![0.0f64; ranks];
    let mut y = MARGIN;
    for r in 0..ranks {
        row_y[r] = y;
        y += row_h[r] + GAP_Y;
    }
    let height = if ranks == 0 {
        2.0 * MARGIN
    } else {
        y - GAP_Y + MARGIN
    };
    let min_x = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let shift = if min_x.is_finite() {
        MARGIN - min_x
    } else {
        0.0
    };
    let mut width: f64 = 2.0 * MARGIN;
    for v in 0..total {
        xs[v] += shift;
        width = width.max(xs[v] + vwidth[v] + MARGIN);
    }
    for (v, node) in nodes.iter_mut().enumerate() {
        node.x = xs[v];
        // Centre the box vertically in its row.
        node.y = row_y[node.rank] + (row_h[node.rank] - node.h) / 2.0;
    }

    let edges = es
        .iter()
        .zip(chains)
        .map(|(&(from, to, value, count), chain)| {
            let a = &nodes[from];
            let b = &nodes[to];
            let mut points = vec![(a.x + a.w / 2.0, a.y + a.h)];
            for &d in &chain[1..chain.len() - 1] {
                let r = vrank[d];
                points.push((xs[d] + DUMMY_W / 2.0, row_y[r] + row_h[r] / 2.0));
            }
            points.push((b.x + b.w / 2.0, b.y));
            Edge {
                from,
                to,
                value,
                count,
                points,
            }
        })
        .collect();

    GraphLayout {
        nodes,
        edges,
        ranks,
        width,
        height,
    }
}

/// Least-squares nondecreasing fit of `t` (pool adjacent violators).
fn isotonic(t: &[f64]) -> Vec<f64> {
    // Blocks of (mean, weight, length).
    let mut blocks: Vec<(f64, f64, usize)> = Vec::with_capacity(t.len());
    for &x in t {
        blocks.push((x, 1.0, 1));
        while blocks.len() > 1 {
            let (m2, w2, l2) = blocks[blocks.len() - 1];
            let (m1, w1, l1) = blocks[blocks.len() - 2];
            if m1 <= m2 {
                break;
            }
            blocks.pop();
            let w = w1 + w2;
            *blocks.last_mut().unwrap() = ((m1 * w1 + m2 * w2) / w, w, l1 + l2);
        }
    }
    let mut out = Vec::with_capacity(t.len());
    for (m, _, l) in blocks {
        out.resize(out.len() + l, m);
    }
    out
}

impl GraphLayout {
    /// The box of an op, if the op is drawn as its own box.
    pub fn node_of_op(&self, n: NodeId) -> Option<usize> {
        self.nodes.iter().position(|nd| nd.item == Item::Op(n))
    }

    /// How many boxes are ops (each op drawn on its own).
    pub fn op_count(&self) -> usize {
        self.nodes
            .iter()
            .filter(|nd| matches!(nd.item, Item::Op(_)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::isotonic;

    #[test]
    fn isotonic_pools_violators() {
        assert_eq!(isotonic(&[1.0, 3.0, 2.0, 4.0]), vec![1.0, 2.5, 2.5, 4.0]);
        assert_eq!(isotonic(&[3.0, 2.0, 1.0]), vec![2.0, 2.0, 2.0]);
        assert_eq!(isotonic(&[]), Vec::<f64>::new());
    }
}
