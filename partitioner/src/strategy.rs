//! Phase 1 of partitioning: the Megatron strategy, found from the dataflow rather than from op
//! or parameter names.
//!
//! The pass walks the one-device graph in program order with every activation replicated on the
//! tensor-parallel axis and decides each parameter's layout where it is first used:
//! - a table indexed by `Embedding` whose rows are the vocabulary the loss predicts over is split
//!   by rows (vocabulary-parallel: its output is a partial sum, closed by g);
//! - a 2-D weight of a `MatMul` whose activation is split on the contracted dimension is split by
//!   rows (row-parallel: the product is a partial sum, closed by g); if the activation is
//!   replicated, the weight is tentatively split by columns (column-parallel);
//! - a parameter combined elementwise with a split value (a bias) is split the same way;
//! - everything else (norm weights, position tables) is replicated.
//!
//! The sharding rules ([`crate::rules`]) give every other value's layout. A column-parallel
//! choice only pays if its split output reaches something that accepts a split — a row-parallel
//! weight, the vocabulary-parallel cross-entropy — before anything that needs the whole tensor (a
//! LayerNorm over the split axis, a residual add). So every split value remembers the column
//! choices it came from (its *origins*); when a rule rejects a split input, those origins are
//! demoted to replicated and the pass runs again. A few passes settle (BERT's MLM transform is
//! demoted once; GPT's and Llama's regions never fail). Nothing here depends on the number of
//! ranks: the strategy is structural, and [`crate::lower`] applies it to a mesh.
//!
//! Fused projections (GPT-2's `c_attn`, q|k|v in one weight) are found the same way: a column
//! split whose value is cut by a `Split` along the split axis into `k` equal pieces becomes a
//! *blocked* split — each rank holds its slice of each of the `k` blocks — and the weight and
//! bias that produced it are sliced block-wise.

use crate::layout::Layout;
use crate::rules::{output_layouts_on, RuleError, Sharded};
use crate::PartitionError;
use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{Dim, Graph, MeshAxis, NodeId, Op, ParamId, ValueDef, ValueId};
use serde::{Deserialize, Serialize};

/// A parameter's tensor-parallel layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    /// How it is held across the tensor-parallel group.
    pub layout: Layout,
    /// For a split parameter, the number of equal blocks its split dimension is made of (3 for a
    /// fused q|k|v weight): rank `r` holds the `r`-th slice of every block. 1 otherwise.
    pub blocks: u32,
}

/// The strategy for one graph: a tensor-parallel layout for every value and parameter.
#[derive(Clone, Debug)]
pub struct Strategy {
    /// The layout each value is produced in (consumers may convert it).
    pub values: SecondaryMap<ValueId, Layout>,
    /// The blocks of each split value (1 unless it is a fused projection's output).
    pub blocks: SecondaryMap<ValueId, u32>,
    /// Every parameter's layout.
    pub params: SecondaryMap<ParamId, ParamLayout>,
    /// Split values whose split may be repeated instead when there are fewer units than ranks
    /// (grouped-query keys and values, repeated for their queries by an `Expand`).
    pub repeatable: SecondaryMap<ValueId, bool>,
    /// The vocabulary size (the cross-entropy's class count), if the graph has a loss.
    pub vocab: Option<u64>,
    /// How many passes it took to settle.
    pub passes: usize,
}

/// Finds the Megatron strategy for `g` on `tp` ranks, honouring `pins` (parameters whose layout
/// the user fixed).
pub fn megatron(
    g: &Graph,
    pins: &[(ParamId, Layout)],
    tp: u64,
) -> Result<Strategy, PartitionError> {
    let mut pinned: SecondaryMap<ParamId, Option<Layout>> = SecondaryMap::new();
    for &(p, l) in pins {
        pinned[p] = Some(l);
    }
    let vocab = g.order.iter().find_map(|&n| match &g.nodes[n].op {
        Op::CrossEntropy { logits, .. } => g.ty(*logits).shape.last().map(|d| d.size),
        _ => None,
    });
    let mut demoted: SecondaryMap<NodeId, bool> = SecondaryMap::new();
    let mut passes = 0;
    loop {
        passes += 1;
        let mut pass = Pass::new(g, &pinned, &demoted, vocab, tp);
        pass.run()?;
        let fresh: Vec<NodeId> = pass
            .failed
            .iter()
            .copied()
            .filter(|&n| !demoted[n])
            .collect();
        if fresh.is_empty() {
            return Ok(pass.finish(vocab, passes));
        }
        drop(pass);
        for n in fresh {
            demoted[n] = true;
        }
    }
}

/// One propagation pass under a fixed set of demoted column choices.
struct Pass<'a> {
    g: &'a Graph,
    pinned: &'a SecondaryMap<ParamId, Option<Layout>>,
    demoted: &'a SecondaryMap<NodeId, bool>,
    vocab: Option<u64>,
    layout: SecondaryMap<ValueId, Option<Layout>>,
    /// The column-parallel matmuls each split value descends from.
    origins: SecondaryMap<ValueId, Vec<NodeId>>,
    /// Whether a split value still has the block structure of its origins' output (only
    /// elementwise ops since), so a `Split` along the split axis may make it blocked.
    flexible: SecondaryMap<ValueId, bool>,
    param_origins: SecondaryMap<ParamId, Vec<NodeId>>,
    /// Blocks decided for each column-parallel matmul's output (0: not cut yet).
    origin_blocks: SecondaryMap<NodeId, u32>,
    column: SecondaryMap<NodeId, bool>,
    failed: Vec<NodeId>,
    /// Column choices whose split has fewer units than ranks (and the ranks a multiple of them).
    too_few: Vec<NodeId>,
    /// Column choices whose output is repeated by an `Expand` (grouped-query keys and values):
    /// those, and only those, may stay whole when they have too few units.
    expanded: SecondaryMap<NodeId, bool>,
    tp: u64,
}

impl<'a> Pass<'a> {
    fn new(
        g: &'a Graph,
        pinned: &'a SecondaryMap<ParamId, Option<Layout>>,
        demoted: &'a SecondaryMap<NodeId, bool>,
        vocab: Option<u64>,
        tp: u64,
    ) -> Pass<'a> {
        let mut layout = SecondaryMap::with_capacity(g.values.len());
        for &v in &g.inputs {
            layout[v] = Some(Layout::Replicated);
        }
        Pass {
            g,
            pinned,
            demoted,
            vocab,
            layout,
            origins: SecondaryMap::new(),
            flexible: SecondaryMap::new(),
            param_origins: SecondaryMap::new(),
            origin_blocks: SecondaryMap::new(),
            column: SecondaryMap::new(),
            failed: Vec::new(),
            too_few: Vec::new(),
            expanded: SecondaryMap::new(),
            tp,
        }
    }

    fn param_of(&self, v: ValueId) -> Option<ParamId> {
        match self.g.values[v].def {
            ValueDef::Param(p) => Some(p),
            _ => None,
        }
    }

    fn rank(&self, v: ValueId) -> usize {
        self.g.ty(v).shape.rank()
    }

    fn run(&mut self) -> Result<(), PartitionError> {
        self.propagate()?;
        // Keys and values with too few heads are settled first: the rules they broke downstream
        // (against the queries' shards) may be nothing but a consequence.
        let repeated: Vec<NodeId> = self
            .too_few
            .iter()
            .copied()
            .filter(|&o| self.expanded[o] && !self.demoted[o])
            .collect();
        if !repeated.is_empty() {
            self.failed = repeated;
        }
        Ok(())
    }

    fn propagate(&mut self) -> Result<(), PartitionError> {
        let g = self.g;
        let mut lay = Vec::new();
        for &n in &g.order {
            let node = &g.nodes[n];
            let ins: Vec<ValueId> = node.op.inputs().into_iter().copied().collect();
            for &v in &ins {
                if self.layout[v].is_none() {
                    self.decide_param(n, v);
                }
            }
            lay.clear();
            lay.extend(ins.iter().map(|&v| self.layout[v].unwrap_or_default()));

            if let Some(outs) = self.blocked_split(n, &ins, &lay) {
                self.record(n, &ins, &lay, outs);
                continue;
            }
            let outs = match rule(g, &node.op, &lay) {
                Ok(outs) => outs,
                Err(_) => {
                    // g: a partial sum is all-reduced before an op that cannot take it.
                    for l in lay.iter_mut().filter(|l| **l == Layout::Partial) {
                        *l = Layout::Replicated;
                    }
                    match rule(g, &node.op, &lay)
                        .or_else(|e| self.slice_to_match(n, &mut lay).ok_or(e))
                    {
                        Ok(outs) => outs,
                        Err(_) => {
                            // A split reached an op that needs it whole: the column choices it
                            // came from do not pay. Gather for now; the next pass demotes them.
                            for (i, l) in lay.iter_mut().enumerate() {
                                if let Layout::Split(_) = l {
                                    self.failed.extend_from_slice(&self.origins[ins[i]]);
                                    *l = Layout::Replicated;
                                }
                            }
                            rule(g, &node.op, &lay).map_err(|error| PartitionError::Rule {
                                node: node.name.clone(),
                                op: node.op.mnemonic(),
                                error,
                            })?
                        }
                    }
                }
            };
            self.record(n, &ins, &lay, outs);
        }
        Ok(())
    }

    /// A replicated activation combined with a split one is sliced locally (free) when that makes
    /// the node work with a split result: keys and values held whole, because there are fewer
    /// of their heads than ranks, meet the queries' shards this way.
    fn slice_to_match(&self, n: NodeId, lay: &mut [Layout]) -> Option<Vec<Layout>> {
        let g = self.g;
        let op = &g.nodes[n].op;
        if !lay.iter().any(|l| matches!(l, Layout::Split(_))) {
            return None;
        }
        let ins: Vec<ValueId> = op.inputs().into_iter().copied().collect();
        for i in 0..lay.len() {
            let v = ins[i];
            if lay[i] != Layout::Replicated
                || self.param_of(v).is_some()
                || !g.ty(v).dtype.is_float()
            {
                continue;
            }
            for d in 0..self.rank(v) {
                let mut trial = lay.to_vec();
                trial[i] = Layout::Split(d);
                if let Ok(outs) = rule(g, op, &trial) {
                    if outs.iter().all(|l| matches!(l, Layout::Split(_))) {
                        lay[i] = Layout::Split(d);
                        return Some(outs);
                    }
                }
            }
        }
        None
    }

    /// Records a node's output layouts and what their splits descend from.
    fn record(&mut self, n: NodeId, ins: &[ValueId], lay: &[Layout], outs: Vec<Layout>) {
        let node = &self.g.nodes[n];
        let mut origins: Vec<NodeId> = Vec::new();
        let mut flexible = false;
        if self.column[n] {
            origins.push(n);
            flexible = true;
        } else {
            for (&v, l) in ins.iter().zip(lay) {
                if let Layout::Split(_) = l {
                    for &o in &self.origins[v] {
                        if !origins.contains(&o) {
                            origins.push(o);
                        }
                    }
                    flexible |= self.flexible[v];
                }
            }
            flexible &= keeps_blocks(self.g, &node.op, node.outputs[0], lay);
        }
        for (&v, l) in node.outputs.iter().zip(outs) {
            self.layout[v] = Some(l);
            if let Layout::Split(d) = l {
                // Fewer units than ranks (key/value heads under grouped-query attention): the
                // columns they came from stay whole, and each rank slices what its queries need.
                let size = self.g.ty(v).shape.size(d);
                if (!size.is_multiple_of(self.tp) && self.tp.is_multiple_of(size))
                    || self.split_passed_a_unit(n, lay)
                {
                    self.too_few.extend_from_slice(&origins);
                }
                if matches!(node.op, Op::Expand { .. }) {
                    for &o in &origins {
                        self.expanded[o] = true;
                    }
                }
                self.origins[v] = origins.clone();
                self.flexible[v] = flexible && node.outputs.len() == 1;
            }
        }
    }

    /// Whether a reshape moved its input's split past a new unit dimension that stands where the
    /// split was (`[b, s, kv·hd] → [b, s, 1, hd]` with one key/value head): the split then cuts
    /// the head's features instead of whole heads, which is a single unit across all ranks.
    fn split_passed_a_unit(&self, n: NodeId, lay: &[Layout]) -> bool {
        let node = &self.g.nodes[n];
        let (Op::Reshape { x, .. }, Some(Layout::Split(d))) = (&node.op, lay.first()) else {
            return false;
        };
        let from = self.g.ty(*x).shape.sizes();
        let to = self.g.ty(node.outputs[0]).shape.sizes();
        let before: u64 = from[..*d].iter().product();
        let mut acc = 1u64;
        for &size in &to {
            if acc == before {
                return size == 1;
            }
            acc = acc.saturating_mul(size);
        }
        false
    }

    /// A `Split` along the axis its input is split on: legal when the input is a column-parallel
    /// output cut into equal pieces, which makes that output blocked.
    fn blocked_split(&mut self, n: NodeId, ins: &[ValueId], lay: &[Layout]) -> Option<Vec<Layout>> {
        let Op::Split {
            x,
            dim: axis,
            sizes,
        } = &self.g.nodes[n].op
        else {
            return None;
        };
        let Layout::Split(d) = lay[0] else {
            return None;
        };
        if self.g.ty(*x).shape.axis(*axis) != Some(d) {
            return None;
        }
        let k = sizes.len() as u32;
        let equal = sizes.iter().all(|s| s.size == sizes[0].size);
        let origins = &self.origins[ins[0]];
        let fits = equal
            && k > 1
            && self.flexible[ins[0]]
            && origins
                .iter()
                .all(|&o| matches!(self.origin_blocks[o], 0) || self.origin_blocks[o] == k);
        if !fits {
            return None; // the rule rejects it; the caller demotes the origins
        }
        for &o in origins {
            self.origin_blocks[o] = k;
        }
        Some(vec![Layout::Split(d); sizes.len()])
    }

    /// Chooses the layout of parameter value `v` at its first use, by node `n`.
    fn decide_param(&mut self, n: NodeId, v: ValueId) {
        let Some(p) = self.param_of(v) else {
            self.layout[v] = Some(Layout::Replicated);
            return;
        };
        if let Some(pin) = self.pinned[p] {
            self.layout[v] = Some(pin);
            return;
        }
        let g = self.g;
        let decided = match &g.nodes[n].op {
            Op::Embedding { table, .. } if *table == v => {
                let rows = g.ty(v).shape.size(0);
                if Some(rows) == self.vocab {
                    Layout::Split(0)
                } else {
                    Layout::Replicated
                }
            }
            Op::MatMul {
                a,
                b,
                transpose_a,
                transpose_b,
            } if *b == v && self.rank(v) == 2 && self.param_of(*a).is_none() => {
                let ra = self.rank(*a);
                let contracted_a = if *transpose_a { ra - 2 } else { ra - 1 };
                let (contracted_b, free_b) = if *transpose_b { (1, 0) } else { (0, 1) };
                match self.layout[*a].unwrap_or_default() {
                    Layout::Split(d) if d == contracted_a => Layout::Split(contracted_b),
                    Layout::Replicated | Layout::Partial if !self.demoted[n] => {
                        self.column[n] = true;
                        self.param_origins[p] = vec![n];
                        Layout::Split(free_b)
                    }
                    _ => Layout::Replicated,
                }
            }
            Op::Add(x, y) | Op::Sub(x, y) | Op::Mul(x, y) | Op::Div(x, y) => {
                let other = if *x == v { *y } else { *x };
                self.match_split(p, v, other)
            }
            _ => Layout::Replicated,
        };
        self.layout[v] = Some(decided);
    }

    /// A parameter combined elementwise with `other` is split like it, where it has the split
    /// dimension (a bias); otherwise replicated.
    fn match_split(&mut self, p: ParamId, v: ValueId, other: ValueId) -> Layout {
        let Some(Layout::Split(d)) = self.layout[other] else {
            return Layout::Replicated;
        };
        let (rv, ro) = (self.rank(v), self.rank(other));
        let out_rank = rv.max(ro);
        let d_out = d + out_rank - ro;
        if d_out < out_rank - rv {
            return Layout::Replicated;
        }
        let dv = d_out - (out_rank - rv);
        let size = self.g.ty(v).shape.size(dv);
        if size == self.g.ty(other).shape.size(d) && size > 1 {
            self.param_origins[p] = self.origins[other].clone();
            Layout::Split(dv)
        } else {
            Layout::Replicated
        }
    }

    fn finish(self, vocab: Option<u64>, passes: usize) -> Strategy {
        let g = self.g;
        let blocks_of = |origins: &[NodeId]| {
            origins
                .iter()
                .map(|&o| self.origin_blocks[o])
                .max()
                .unwrap_or(0)
                .max(1)
        };
        let mut values = SecondaryMap::with_capacity(g.values.len());
        let mut blocks = SecondaryMap::with_capacity(g.values.len());
        let mut repeatable = SecondaryMap::with_capacity(g.values.len());
        for (v, _) in g.values.iter() {
            let l = self.layout[v].unwrap_or_default();
            values[v] = l;
            repeatable[v] = self.origins[v].iter().any(|&o| self.expanded[o]);
            blocks[v] = if matches!(l, Layout::Split(_)) && self.flexible[v] {
                blocks_of(&self.origins[v])
            } else {
                1
            };
        }
        let mut params = SecondaryMap::with_capacity(g.params.len());
        for (p, data) in g.params.iter() {
            let layout = self.layout[data.value].unwrap_or_default();
            let b = match layout {
                Layout::Split(_) => blocks_of(&self.param_origins[p]),
                _ => 1,
            };
            params[p] = ParamLayout { layout, blocks: b };
            blocks[data.value] = b;
        }
        Strategy {
            values,
            blocks,
            params,
            repeatable,
            vocab,
            passes,
        }
    }
}

/// Whether an op keeps its split input's block structure (it does not move elements across the
/// split axis).
fn keeps_blocks(g: &Graph, op: &Op, out: ValueId, lay: &[Layout]) -> bool {
    match op {
        Op::Add(..)
        | Op::Sub(..)
        | Op::Mul(..)
        | Op::Div(..)
        | Op::Scale { .. }
        | Op::Gelu(_)
        | Op::GeluTanh(_)
        | Op::Silu(_)
        | Op::Relu(_)
        | Op::Dropout { .. }
        | Op::Transpose { .. } => true,
        Op::Reshape { x, .. } => match lay.first() {
            Some(Layout::Split(d)) => {
                let size = g.ty(*x).shape.size(*d);
                g.ty(out).shape.0.iter().any(|dim| dim.size == size)
            }
            _ => false,
        },
        _ => false,
    }
}

/// The tensor-parallel sharding rule of `op` over global types with the given input layouts.
pub(crate) fn rule(g: &Graph, op: &Op, lay: &[Layout]) -> Result<Vec<Layout>, RuleError> {
    rule_on(MeshAxis::Tp, g, op, lay)
}

/// The sharding rule of `op` on mesh axis `axis`, over global types with the given input
/// layouts.
pub(crate) fn rule_on(
    axis: MeshAxis,
    g: &Graph,
    op: &Op,
    lay: &[Layout],
) -> Result<Vec<Layout>, RuleError> {
    let mut i = 0;
    let sharded = op
        .try_map::<Sharded, Dim, (), _, _>(
            |&v| {
                let s = Sharded {
                    ty: g.ty(v).clone(),
                    layout: lay[i],
                };
                i += 1;
                Ok(s)
            },
            |d| Ok(d.clone()),
        )
        .expect("mapping values cannot fail");
    output_layouts_on(axis, &sharded)
}
