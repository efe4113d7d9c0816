//! Phase 2 of partitioning: apply a [`Strategy`] to a mesh and build the plan.
//!
//! ```text
//! Graph (one device) ─► strategy (layouts) ─► lower: SPMD graph with local shapes,
//!     conversions where layouts mismatch (g, all-gather, reduce-scatter, local slice) and f at
//!     every entry into a tensor-parallel region ─► ir::autodiff (f ↔ g conjugates)
//!     ─► gradient reductions (tp for replicated parameters used in split regions, dp always)
//!     ─► verify_plan ─► Plan
//! ```
//!
//! Each node is rebuilt with its inputs' local values. Where an input's layout is not one the
//! node's rule accepts with the layout the strategy wants for its outputs, the cheapest
//! conversion is inserted: a partial sum is all-reduced (the paper's g) — or, with sequence
//! parallelism, reduce-scattered along the sequence —, a split value is all-gathered, a
//! replicated one sliced locally. A replicated activation that enters a computation whose result
//! is split or partial gets the paper's f (identity forward, all-reduce of its gradient
//! backward); with sequence parallelism the all-gather that rebuilds the sequence plays f's part
//! and reduce-scatters the gradient instead. Autodiff then runs on the SPMD graph itself, so the
//! backward collectives are exactly the conjugates of the forward ones.

use crate::check::{from_inputs, global_type, infer_local, node_layouts, verify_plan, In};
use crate::layout::{Layout, MeshLayout};
use crate::mesh::Mesh;
use crate::plan::{ParamShard, PartitionOptions, Plan};
use crate::strategy::{megatron, rule_on, Strategy};
use crate::PartitionError;
use ferrotron_ir::graph::{EntityRef, SecondaryMap};
use ferrotron_ir::{
    backward, Dim, Graph, MeshAxis, NodeId, Op, ParamId, ScopeId, Shape, TensorType, ValueDef,
    ValueId,
};
use std::collections::HashMap;

/// Partitions `g` for `opts`: strategy, lowering, autodiff, verification.
pub fn partition(g: &Graph, opts: &PartitionOptions) -> Result<Plan, PartitionError> {
    let counts = [
        ("tp", opts.tp),
        ("dp", opts.dp),
        ("pp", opts.pp),
        ("micro-batches", opts.micro_batches),
        ("virtual stages", opts.virtual_stages),
        ("the vocabulary multiple", opts.vocab_multiple),
    ];
    if counts.iter().any(|&(_, n)| n == 0) {
        let all: Vec<String> = counts
            .iter()
            .map(|(name, n)| format!("{name} ({n})"))
            .collect();
        return Err(PartitionError::Options(format!(
            "{} must each be at least 1",
            all.join(", ")
        )));
    }
    if opts.zero > 1 {
        return Err(PartitionError::Options(format!(
            "ZeRO stage {}: only 0 (replicated optimizer state) and 1 (the distributed \
             optimizer) are supported",
            opts.zero
        )));
    }
    let pins = resolve_pins(g, &opts.pins)?;
    let strategy = megatron(g, &pins, opts.tp)?;
    lower(g, &strategy, opts)
}

/// The model file's pins, then the options' (which win).
fn resolve_pins(
    g: &Graph,
    pins: &[(String, Layout)],
) -> Result<Vec<(ParamId, Layout)>, PartitionError> {
    let from_model = g.params.iter().filter_map(|(p, data)| {
        data.pin.map(|pin| {
            let layout = match pin {
                ferrotron_ir::Pin::Replicated => Layout::Replicated,
                ferrotron_ir::Pin::Split(d) => Layout::Split(d),
            };
            Ok((p, layout))
        })
    });
    let from_options = pins.iter().map(|(name, layout)| {
        let Some((p, data)) = g.params.iter().find(|(_, d)| &d.name == name) else {
            let suggestion = ferrotron_ir::lang::syntax::closest(
                name,
                g.params.values().map(|d| d.name.as_str()),
            );
            return Err(PartitionError::UnknownParam {
                name: name.clone(),
                suggestion,
            });
        };
        let rank = g.ty(data.value).shape.rank();
        match layout {
            Layout::Split(d) if *d >= rank => Err(PartitionError::Options(format!(
                "pin {name}={layout}: the parameter has rank {rank}, so split(0..{rank}) \
                     or replicated"
            ))),
            Layout::Partial => Err(PartitionError::Options(format!(
                "pin {name}=partial: a parameter is replicated or split, never partial"
            ))),
            _ => Ok((p, *layout)),
        }
    });
    from_model.chain(from_options).collect()
}

/// An output's layout and fused-weight blocks.
type LaidOut = (MeshLayout, u32);

/// What a conversion is keyed by, so consumers share one collective.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Conv {
    To(Layout, bool),
    F,
}

struct Lower<'a> {
    g: &'a Graph,
    s: &'a Strategy,
    mesh: Mesh,
    pg: Graph,
    layouts: SecondaryMap<ValueId, MeshLayout>,
    blocks: SecondaryMap<ValueId, u32>,
    needs_grad: SecondaryMap<ValueId, bool>,
    /// Global value → its local value.
    map: Vec<Option<ValueId>>,
    cache: HashMap<(ValueId, Conv), ValueId>,
    /// Global values held as sequence shards under sequence parallelism.
    in_stream: SecondaryMap<ValueId, bool>,
    /// For a gradient value, its forward value's layout.
    hint: SecondaryMap<ValueId, Option<MeshLayout>>,
    from_inputs: SecondaryMap<ValueId, bool>,
    /// (batch, seq): the leading axes of a sequence-parallel stream value.
    stream: Option<(u64, u64)>,
    vocab: Option<(u64, u64)>,
    /// Gradients stay partial sums over dp (ZeRO stage 1 at dp > 1).
    distributed_optimizer: bool,
}

fn lower(g: &Graph, s: &Strategy, opts: &PartitionOptions) -> Result<Plan, PartitionError> {
    let mesh = Mesh {
        tp: opts.tp,
        dp: opts.dp,
        pp: opts.pp,
    };
    let batch_seq = batch_and_seq(g)?;
    let vocab = s.vocab.map(|v| {
        let m = opts.vocab_multiple * opts.tp;
        (v, v.div_ceil(m) * m)
    });
    let mut lw = Lower {
        g,
        s,
        mesh,
        pg: Graph::new(g.name.clone()),
        layouts: SecondaryMap::with_capacity(g.values.len() * 3),
        blocks: SecondaryMap::with_capacity(g.values.len() * 3),
        needs_grad: SecondaryMap::with_capacity(g.values.len() * 3),
        map: vec![None; g.values.len()],
        cache: HashMap::new(),
        in_stream: SecondaryMap::new(),
        hint: SecondaryMap::new(),
        from_inputs: from_inputs(g),
        stream: opts.sequence_parallel.then_some(batch_seq).flatten(),
        vocab,
        distributed_optimizer: opts.zero >= 1 && opts.dp > 1,
    };
    if opts.sequence_parallel && lw.stream.is_none() {
        return Err(PartitionError::Options(
            "sequence parallelism needs an integer input shaped [batch, seq] (the tokens)".into(),
        ));
    }
    lw.find_stream();
    lw.check_divisibility(batch_seq.map(|(b, _)| b))?;
    lw.pg.dims = g.dims.clone();
    for (_, scope) in g.scopes.iter() {
        lw.pg.add_scope(scope.clone());
    }
    let shards = lw.inputs_and_params();
    for &n in &g.order {
        lw.node(n)?;
    }
    lw.pg.outputs = g
        .outputs
        .iter()
        .map(|(name, v)| (name.clone(), lw.local(*v)))
        .collect();
    let loss = lw.loss()?;
    let bw = backward(&mut lw.pg, loss).map_err(PartitionError::Autodiff)?;
    // A step's loss is the mean of its micro-batches' losses: each micro-batch's backward pass
    // starts from d(step loss) / d(its loss) = 1 / M, and the step's gradient is their sum.
    if opts.micro_batches > 1 {
        if let ValueDef::Node { node, .. } = lw.pg.values[bw.seed].def {
            if let Op::Fill { value, .. } = &mut lw.pg.nodes[node].op {
                *value = 1.0 / opts.micro_batches as f64;
            }
        }
    }
    // A gradient is laid out like its forward value, or as a partial sum of it: the hint that
    // settles what shard-local sizes alone leave ambiguous.
    for &(grad, of) in &bw.grad_of {
        lw.hint[grad] = Some(lw.layouts[of]);
    }
    for i in bw.start..lw.pg.order.len() {
        let n = lw.pg.order[i];
        lw.lay_out(n)?;
    }
    let grads = bw
        .param_grads
        .iter()
        .map(|&(p, grad)| lw.reduce_grad(p, grad))
        .collect::<Result<Vec<_>, _>>()?;
    issue_collectives_early(&mut lw.pg, bw.start);
    let mut origin = bw.origin.clone();
    let copies = crate::recompute::apply(&mut lw.pg, bw.start, opts.recompute).map_err(|e| {
        PartitionError::Internal {
            node: String::new(),
            what: format!("recomputation: {e}"),
        }
    })?;
    for (copy, original) in copies {
        let outs = lw.pg.nodes[copy].outputs.clone();
        for (c, o) in outs.into_iter().zip(lw.pg.nodes[original].outputs.clone()) {
            lw.layouts[c] = lw.layouts[o];
            lw.blocks[c] = lw.blocks[o];
        }
        origin.push((copy, original));
    }
    let mut plan = Plan {
        model: g.name.clone(),
        mesh,
        options: opts.clone(),
        graph: lw.pg,
        layouts: lw.layouts,
        params: shards,
        backward_start: bw.start,
        loss,
        grads,
        vocab_padding: vocab.filter(|(v, p)| v != p),
        pipeline: None,
    };
    if opts.pp > 1 || opts.micro_batches > 1 {
        plan.pipeline = Some(crate::cut::cut(&plan, &origin, opts)?);
    }
    // Every node's layouts came from its rule as it was added, so the plan is checked by
    // construction; `verify_plan` re-checks one from scratch (plan files, tests, the CLI).
    if cfg!(debug_assertions) {
        verify_plan(&plan).map_err(|e| PartitionError::Internal {
            node: String::new(),
            what: format!("the plan does not verify: {e}"),
        })?;
    }
    Ok(plan)
}

/// The token input's shape `[batch, seq]`, if there is one; every input must lead with the
/// batch axis.
/// Moves every backward collective to just after the node that produces its input, keeping the
/// other nodes' order. A runtime whose collectives run on their own stream (NCCL) then overlaps
/// each with the computation that does not need it: f's backward all-reduce of dX with the
/// weight-gradient GEMM dW = xᵀ·dY that autodiff emits after dX (as Megatron issues it), and
/// each data-parallel gradient all-reduce with the rest of the backward pass. Every rank runs
/// the same order, so every group still sees its collectives in one order; the forward part is
/// left as it is.
fn issue_collectives_early(g: &mut Graph, start: usize) {
    let is_collective = |op: &Op<ValueId, Dim>| {
        matches!(
            op,
            Op::AllReduce { .. } | Op::AllGather { .. } | Op::ReduceScatter { .. } | Op::G { .. }
        )
    };
    // The collectives to issue right after each node, and those whose inputs all come from
    // before the backward part (issued first).
    let mut after: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    let mut first = Vec::new();
    let position: HashMap<NodeId, usize> =
        g.order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut rest = Vec::with_capacity(g.order.len() - start);
    for &n in &g.order[start..] {
        if !is_collective(&g.nodes[n].op) {
            rest.push(n);
            continue;
        }
        let anchor = g.nodes[n]
            .op
            .inputs()
            .into_iter()
            .filter_map(|v| match g.values[*v].def {
                ValueDef::Node { node, .. } if position[&node] >= start => Some(node),
                _ => None,
            })
            .max_by_key(|m| position[m]);
        match anchor {
            Some(m) => after.entry(m).or_default().push(n),
            None => first.push(n),
        }
    }
    let mut order = g.order[..start].to_vec();
    fn emit(n: NodeId, after: &HashMap<NodeId, Vec<NodeId>>, order: &mut Vec<NodeId>) {
        order.push(n);
        for &c in after.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
            emit(c, after, order);
        }
    }
    for n in first.into_iter().chain(rest) {
        emit(n, &after, &mut order);
    }
    debug_assert_eq!(order.len(), g.order.len());
    g.order = order;
}

fn batch_and_seq(g: &Graph) -> Result<Option<(u64, u64)>, PartitionError> {
    let tokens = g
        .inputs
        .iter()
        .map(|&v| g.ty(v))
        .find(|t| t.dtype.is_int() && t.shape.rank() == 2);
    Ok(tokens.map(|t| (t.shape.size(0), t.shape.size(1))))
}

fn divisors(n: u64) -> Vec<u64> {
    (1..=n.min(1 << 16))
        .filter(|&d| n.is_multiple_of(d))
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn list(xs: &[u64]) -> String {
    xs.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

impl Lower<'_> {
    fn local(&self, v: ValueId) -> ValueId {
        self.map[v.index()].expect("values are lowered before use")
    }

    /// The size a dimension has in the plan: the vocabulary is padded.
    fn padded(&self, p: ParamId, d: usize) -> u64 {
        let size = self.g.ty(self.g.params[p].value).shape.size(d);
        match (self.s.params[p].layout, self.vocab) {
            (Layout::Split(sd), Some((v, padded))) if sd == d && size == v => padded,
            _ => size,
        }
    }

    /// The tensor-parallel layout the plan wants a node output in: the strategy's, except that
    /// with sequence parallelism the replicated stream between regions is split along the
    /// sequence.
    fn target(&self, v: ValueId) -> Layout {
        let l = self.s.values[v];
        if l == Layout::Replicated && self.in_stream[v] {
            return Layout::Split(1);
        }
        l
    }

    /// Under sequence parallelism, which replicated values are the stream between regions and
    /// so held as sequence shards: `[batch, seq, ...]` activations whose every use works on
    /// sequence shards — norms, elementwise ops and residual adds (whose results are stream
    /// too), reshapes that keep the sequence axis, and the entry of a tensor-parallel region
    /// (which gathers the sequence). Keys and values of replicated attention heads, say, feed
    /// rotary embeddings and attention, which need the whole sequence, so they stay whole.
    fn find_stream(&mut self) {
        let Some((batch, seq)) = self.stream else {
            return;
        };
        let g = self.g;
        let mut users: Vec<Vec<ferrotron_ir::NodeId>> = vec![Vec::new(); g.values.len()];
        for &n in &g.order {
            for &v in g.nodes[n].op.inputs() {
                users[v.index()].push(n);
            }
        }
        let mut is_output: SecondaryMap<ValueId, bool> = SecondaryMap::new();
        for &(_, v) in &g.outputs {
            is_output[v] = true;
        }
        for &n in g.order.iter().rev() {
            for &v in &g.nodes[n].outputs {
                let ty = g.ty(v);
                let shaped = ty.dtype.is_float()
                    && ty.shape.rank() >= 3
                    && ty.shape.size(0) == batch
                    && ty.shape.size(1) == seq
                    && self.from_inputs[v]
                    && !self.weight_product(v);
                self.in_stream[v] = shaped
                    && self.s.values[v] == Layout::Replicated
                    && (is_output[v] || !users[v.index()].is_empty())
                    && users[v.index()].iter().all(|&u| self.takes_shards(u, v));
            }
        }
    }

    /// Whether node `u` can take `v` as sequence shards (see [`Lower::find_stream`]).
    fn takes_shards(&self, u: ferrotron_ir::NodeId, v: ValueId) -> bool {
        let node = &self.g.nodes[u];
        let outputs_stream = || {
            node.outputs.iter().all(|&w| {
                self.s.values[w] == Layout::Replicated && self.in_stream[w]
                    || matches!(self.s.values[w], Layout::Split(d) if d > 1)
            })
        };
        match &node.op {
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
            | Op::LayerNorm { .. }
            | Op::RmsNorm { .. } => outputs_stream(),
            Op::Reshape { .. } => {
                let to = self.g.ty(node.outputs[0]);
                to.shape.rank() >= 2
                    && to.shape.size(0) == self.g.ty(v).shape.size(0)
                    && to.shape.size(1) == self.g.ty(v).shape.size(1)
                    && outputs_stream()
            }
            // The entry of a column-parallel region gathers the sequence (as its f).
            Op::MatMul { a, b, .. } => {
                *a == v
                    && self.is_weight(*b)
                    && matches!(self.s.values[*b], Layout::Split(_))
                    && matches!(self.s.values[node.outputs[0]], Layout::Split(_))
            }
            _ => false,
        }
    }

    /// Whether `v` is the product of an activation and a 2-D weight that is replicated. Such a
    /// product stays whole under sequence parallelism: its weight's gradient sums over batch and
    /// sequence together, which sequence shards of a `[batch, seq, ...]` activation cannot be
    /// merged into (see [`Lower::splits_weight_rows`]).
    fn weight_product(&self, v: ValueId) -> bool {
        let ValueDef::Node { node, .. } = self.g.values[v].def else {
            return false;
        };
        match &self.g.nodes[node].op {
            Op::MatMul { b, .. } => self.is_weight(*b) && self.s.values[*b] == Layout::Replicated,
            _ => false,
        }
    }

    fn is_weight(&self, v: ValueId) -> bool {
        matches!(self.g.values[v].def, ValueDef::Param(_)) && self.g.ty(v).shape.rank() == 2
    }

    /// Whether a matmul candidate would multiply a 2-D weight by an activation split on an inner
    /// row axis (the sequence of `[batch, seq, k]`): the weight's gradient reshapes the activation
    /// to `[batch · seq, k]`, and such shards are not a contiguous split of those rows.
    fn splits_weight_rows(&self, op: &Op, pick: &[Layout]) -> bool {
        match (op, pick) {
            (Op::MatMul { a, b, .. }, [Layout::Split(d), _]) => {
                let rank = self.g.ty(*a).shape.rank();
                self.is_weight(*b) && *d > 0 && *d + 1 < rank
            }
            _ => false,
        }
    }

    /// Every split must divide by its group; the error lists the degrees that would work.
    fn check_divisibility(&self, batch: Option<u64>) -> Result<(), PartitionError> {
        let g = self.g;
        let tp = self.mesh.tp;
        let vocab = self.vocab.map(|(v, _)| v);
        // Units every valid degree must divide, and units it may instead be a multiple of.
        let mut common = 0u64;
        let mut repeatable_units: Vec<u64> = Vec::new();
        let mut first_bad: Option<(String, Dim)> = None;
        let mut visit = |name: &str, dim: &Dim, blocks: u32, padded: bool, repeatable: bool| {
            if padded {
                return;
            }
            let unit = dim.size / u64::from(blocks.max(1));
            if repeatable {
                repeatable_units.push(unit);
            } else {
                common = gcd(common, unit);
            }
            if !unit.is_multiple_of(tp) && first_bad.is_none() {
                first_bad = Some((name.to_owned(), dim.clone()));
            }
        };
        for (p, data) in g.params.iter() {
            if let Layout::Split(d) = self.s.params[p].layout {
                let dim = &g.ty(data.value).shape.0[d];
                let padded = Some(dim.size) == vocab;
                visit(&data.name, dim, self.s.params[p].blocks, padded, false);
            }
        }
        for &n in &g.order {
            for &v in &g.nodes[n].outputs {
                if let Layout::Split(d) = self.target(v) {
                    let dim = &g.ty(v).shape.0[d];
                    let padded = Some(dim.size) == vocab && d + 1 == g.ty(v).shape.rank();
                    let repeatable = self.s.repeatable[v];
                    visit(&g.values[v].name, dim, self.s.blocks[v], padded, repeatable);
                }
            }
        }
        if let Some((name, dim)) = first_bad {
            let valid: Vec<u64> = if common == 0 {
                vec![tp]
            } else {
                divisors(common)
                    .into_iter()
                    .filter(|t| {
                        repeatable_units
                            .iter()
                            .all(|&u| u.is_multiple_of(*t) || t.is_multiple_of(u))
                    })
                    .collect()
            };
            return Err(PartitionError::Indivisible {
                value: name,
                dim,
                axis: "tp",
                parts: tp,
                valid: list(&valid),
            });
        }
        if let Some(batch) = batch {
            if batch % self.mesh.dp != 0 {
                let input = g.values[g.inputs[0]].name.clone();
                return Err(PartitionError::Indivisible {
                    value: input,
                    dim: Dim::named(batch, "batch"),
                    axis: "dp",
                    parts: self.mesh.dp,
                    valid: list(&divisors(batch)),
                });
            }
        }
        Ok(())
    }

    fn inputs_and_params(&mut self) -> Vec<ParamShard> {
        let g = self.g;
        let dp = self.mesh.dp;
        for &v in &g.inputs {
            let mut ty = g.ty(v).clone();
            let layout = if dp > 1 && ty.shape.rank() > 0 {
                ty.shape.0[0] = Dim {
                    size: ty.shape.0[0].size / dp,
                    name: ty.shape.0[0].name.clone(),
                };
                MeshLayout {
                    tp: Layout::Replicated,
                    dp: Layout::Split(0),
                }
            } else {
                MeshLayout::REPLICATED
            };
            let lv = self.pg.add_input(g.values[v].name.clone(), ty);
            self.layouts[lv] = layout;
            self.blocks[lv] = 1;
            self.map[v.index()] = Some(lv);
        }
        let mut shards = Vec::with_capacity(g.params.len());
        for (p, data) in g.params.iter() {
            let model = g.ty(data.value);
            let decided = self.s.params[p];
            let shape: Vec<u64> = (0..model.shape.rank()).map(|d| self.padded(p, d)).collect();
            let shard = ParamShard {
                name: data.name.clone(),
                shape: shape.clone(),
                model_shape: model.shape.sizes(),
                layout: MeshLayout {
                    tp: decided.layout,
                    dp: Layout::Replicated,
                },
                blocks: decided.blocks,
            };
            let local = shard.local_shape(self.mesh);
            let dims = model
                .shape
                .0
                .iter()
                .zip(&local)
                .map(|(dim, &size)| Dim {
                    size,
                    name: dim.name.clone(),
                })
                .collect();
            let ty = TensorType::new(model.dtype, Shape(dims));
            let lv = self
                .pg
                .add_param(data.name.clone(), ty, data.init.clone(), data.scope);
            self.layouts[lv] = shard.layout;
            self.blocks[lv] = decided.blocks;
            self.needs_grad[lv] = true;
            self.map[data.value.index()] = Some(lv);
            shards.push(shard);
        }
        shards
    }

    /// Lowers one forward node.
    fn node(&mut self, n: ferrotron_ir::NodeId) -> Result<(), PartitionError> {
        let g = self.g;
        let node = &g.nodes[n];
        let internal = |what: String| PartitionError::Internal {
            node: node.name.clone(),
            what,
        };
        let ins: Vec<ValueId> = node.op.inputs().into_iter().copied().collect();
        let locals: Vec<ValueId> = ins.iter().map(|&v| self.local(v)).collect();
        let targets: Vec<Layout> = node.outputs.iter().map(|&v| self.target(v)).collect();

        // Data parallelism never converts: every rank's batch slice flows through unchanged.
        let dp_in: Vec<Layout> = locals.iter().map(|&v| self.layouts[v].dp).collect();
        let dp_out = rule_on(MeshAxis::Dp, g, &node.op, &dp_in)
            .map_err(|e| internal(format!("data parallelism: {e}")))?;

        // Local attributes: shapes written into the op follow the outputs' layouts.
        let out_layouts: Vec<MeshLayout> = targets
            .iter()
            .zip(&dp_out)
            .map(|(&tp, &dp)| MeshLayout { tp, dp })
            .collect();
        let local_op = self.localize(&node.op, &node.outputs, &out_layouts);

        // Choose each input's layout: the cheapest conversions that make the node's rule give
        // the wanted output layouts.
        let (chosen, laid_out) = self
            .choose(&node.op, &ins, &locals, &out_layouts)
            .ok_or_else(|| {
                let have: Vec<String> = locals
                    .iter()
                    .map(|&v| self.layouts[v].tp.to_string())
                    .collect();
                let want: Vec<String> = targets.iter().map(Layout::to_string).collect();
                internal(format!(
                    "no conversion of its inputs ({}) gives the planned output layout ({})",
                    have.join(", "),
                    want.join(", ")
                ))
            })?;

        let enters_region = out_layouts.iter().any(|l| l.tp != Layout::Replicated)
            && !node.op.is_collective()
            && !matches!(node.op, Op::LocalSlice { .. });
        let mut args = Vec::with_capacity(locals.len());
        for (&lv, &want) in locals.iter().zip(&chosen) {
            let differentiable = self.needs_grad[lv] && self.pg.ty(lv).dtype.is_float();
            let enters = enters_region && differentiable;
            let mut v = self.convert(lv, want, enters, node.scope)?;
            let is_param = matches!(self.pg.values[lv].def, ValueDef::Param(_));
            // With sequence parallelism the all-gather in front of a region is its f.
            let gathered_as_f = enters
                && want == Layout::Replicated
                && matches!(self.layouts[lv].tp, Layout::Split(_));
            if enters && want == Layout::Replicated && !is_param && !gathered_as_f {
                v = self.f(v, node.scope)?;
            }
            args.push(v);
        }

        let mut i = 0;
        let mut op = local_op
            .try_map::<ValueId, Dim, (), _, _>(
                |_| {
                    let v = args[i];
                    i += 1;
                    Ok(v)
                },
                |d| Ok(d.clone()),
            )
            .expect("mapping values cannot fail");
        if let Op::CrossEntropy {
            logits, classes, ..
        } = &mut op
        {
            *classes = self.real_classes(*logits);
        }
        let names: Vec<String> = node
            .outputs
            .iter()
            .map(|&v| g.values[v].name.clone())
            .collect();
        let outs = self
            .pg
            .add_node(node.name.clone(), op, names, node.scope)
            .map_err(|e| internal(format!("local shapes do not type-check: {e}")))?
            .to_vec();
        for (&lv, (l, b)) in outs.iter().zip(laid_out) {
            self.layouts[lv] = l;
            self.blocks[lv] = b;
            self.needs_grad[lv] =
                self.pg.ty(lv).dtype.is_float() && locals.iter().any(|&v| self.needs_grad[v]);
        }
        for (&v, &lv) in node.outputs.iter().zip(&outs) {
            if self.layouts[lv].tp != self.target(v) {
                return Err(internal(format!(
                    "its output is {} where the plan wants {}",
                    self.layouts[lv].tp,
                    self.target(v)
                )));
            }
            self.map[v.index()] = Some(lv);
        }
        Ok(())
    }

    /// The op with the sizes it spells out (reshape targets, split sizes) made shard-local.
    fn localize(&self, op: &Op, outputs: &[ValueId], layouts: &[MeshLayout]) -> Op {
        let local_dims = |v: ValueId, l: MeshLayout| -> Vec<Dim> {
            let mut dims = self.g.ty(v).shape.0.clone();
            for axis in [MeshAxis::Tp, MeshAxis::Dp] {
                if let Layout::Split(d) = l.on(axis) {
                    dims[d] = Dim {
                        size: dims[d].size / self.mesh.size(axis),
                        name: dims[d].name.clone(),
                    };
                }
            }
            dims
        };
        let mut op = op.clone();
        match &mut op {
            Op::Reshape { shape, .. } | Op::Expand { shape, .. } => {
                *shape = local_dims(outputs[0], layouts[0])
            }
            Op::Split {
                x,
                dim: axis,
                sizes,
            } => {
                if let Some(a) = self.g.ty(*x).shape.axis(*axis) {
                    for (size, (&v, &l)) in sizes.iter_mut().zip(outputs.iter().zip(layouts)) {
                        *size = local_dims(v, l)[a].clone();
                    }
                }
            }
            _ => {}
        }
        op
    }

    /// The class count of padded logits, for the cross-entropy to ignore the padding.
    fn real_classes(&self, logits: ValueId) -> Option<Dim> {
        let (vocab, padded) = self.vocab?;
        let ty = self.pg.ty(logits);
        let full = global_type(self.mesh, ty, self.layouts[logits]);
        (vocab != padded && full.shape.last().map(|d| d.size) == Some(padded))
            .then(|| Dim::named(vocab, "vocab"))
    }

    /// The cheapest input layouts under which the node yields `want`, and what it then yields.
    fn choose(
        &self,
        op: &Op,
        ins: &[ValueId],
        locals: &[ValueId],
        want: &[MeshLayout],
    ) -> Option<(Vec<Layout>, Vec<LaidOut>)> {
        let g = self.g;
        let mut options: Vec<Vec<(Layout, f64)>> = Vec::with_capacity(locals.len());
        for (&v, &lv) in ins.iter().zip(locals) {
            let cur = self.layouts[lv].tp;
            let mut opts = vec![(cur, 0.0)];
            let ty = g.ty(v);
            match cur {
                Layout::Partial => {
                    opts.push((Layout::Replicated, 2.0));
                    if self.stream.is_some() && self.target_like_stream(v) {
                        opts.push((Layout::Split(1), 1.0));
                    }
                }
                Layout::Replicated => {
                    for d in 0..ty.shape.rank() {
                        if ty.shape.size(d).is_multiple_of(self.mesh.tp) {
                            opts.push((Layout::Split(d), 0.1));
                        }
                    }
                }
                Layout::Split(_) => opts.push((Layout::Replicated, 1.0)),
            }
            options.push(opts);
        }
        let works = |pick: &[Layout]| -> Option<Vec<LaidOut>> {
            if self.splits_weight_rows(op, pick) {
                return None;
            }
            let ins: Vec<In> = ins
                .iter()
                .zip(locals)
                .zip(pick)
                .map(|((&v, &lv), &l)| In {
                    ty: g.ty(v).clone(),
                    layout: MeshLayout {
                        tp: l,
                        dp: self.layouts[lv].dp,
                    },
                    blocks: if l == self.layouts[lv].tp {
                        self.blocks[lv]
                    } else {
                        1
                    },
                })
                .collect();
            node_layouts(op, &ins)
                .ok()
                .filter(|outs| outs.iter().zip(want).all(|((l, _), w)| l == w))
        };
        let current: Vec<Layout> = options.iter().map(|o| o[0].0).collect();
        if let Some(outs) = works(&current) {
            return Some((current, outs));
        }
        let total: usize = options.iter().map(Vec::len).product();
        if total > 4096 {
            return None;
        }
        let mut combos: Vec<(f64, Vec<Layout>)> = Vec::with_capacity(total);
        for mut k in 0..total {
            let mut pick = Vec::with_capacity(options.len());
            let mut cost = 0.0;
            for o in &options {
                let (l, c) = o[k % o.len()];
                k /= o.len();
                pick.push(l);
                cost += c;
            }
            combos.push((cost, pick));
        }
        combos.sort_by(|a, b| a.0.total_cmp(&b.0));
        combos
            .into_iter()
            .find_map(|(_, pick)| works(&pick).map(|outs| (pick, outs)))
    }

    fn target_like_stream(&self, v: ValueId) -> bool {
        let Some((batch, seq)) = self.stream else {
            return false;
        };
        let ty = self.g.ty(v);
        ty.shape.rank() >= 3 && ty.shape.size(0) == batch && ty.shape.size(1) == seq
    }

    /// `v` converted to tensor-parallel layout `to` (shared between consumers).
    fn convert(
        &mut self,
        v: ValueId,
        to: Layout,
        enters: bool,
        scope: Option<ScopeId>,
    ) -> Result<ValueId, PartitionError> {
        let from = self.layouts[v].tp;
        if from == to {
            return Ok(v);
        }
        let partial_grad = enters && to == Layout::Replicated && matches!(from, Layout::Split(_));
        let key = (v, Conv::To(to, partial_grad));
        if let Some(&c) = self.cache.get(&key) {
            return Ok(c);
        }
        let (tp, name) = (self.mesh.tp, self.pg.values[v].name.clone());
        let axis = MeshAxis::Tp;
        let (op, suffix) = match (from, to) {
            (Layout::Partial, Layout::Replicated) => (Op::G { x: v, axis }, "g".to_string()),
            (Layout::Partial, Layout::Split(d)) => (
                Op::ReduceScatter {
                    x: v,
                    dim: d as i64,
                    axis,
                    parts: tp,
                },
                "reduce_scatter".to_string(),
            ),
            (Layout::Split(d), Layout::Replicated) => (
                Op::AllGather {
                    x: v,
                    dim: d as i64,
                    axis,
                    parts: tp,
                    partial_grad,
                },
                if partial_grad {
                    "all_gather_f"
                } else {
                    "all_gather"
                }
                .to_string(),
            ),
            (Layout::Replicated, Layout::Split(d)) => (
                Op::LocalSlice {
                    x: v,
                    dim: d as i64,
                    axis,
                    parts: tp,
                },
                format!("slice{d}"),
            ),
            _ => {
                return Err(PartitionError::Internal {
                    node: name,
                    what: format!("no conversion from {from} to {to}"),
                })
            }
        };
        let c = self.add(format!("{name}.{suffix}"), op, scope)?;
        self.cache.insert(key, c);
        Ok(c)
    }

    /// The paper's f in front of `v` (shared between consumers).
    fn f(&mut self, v: ValueId, scope: Option<ScopeId>) -> Result<ValueId, PartitionError> {
        if let Some(&c) = self.cache.get(&(v, Conv::F)) {
            return Ok(c);
        }
        let name = format!("{}.f", self.pg.values[v].name);
        let c = self.add(
            name,
            Op::F {
                x: v,
                axis: MeshAxis::Tp,
            },
            scope,
        )?;
        self.cache.insert((v, Conv::F), c);
        Ok(c)
    }

    /// Adds a one-output communication node, in the scope of the node it serves.
    fn add(
        &mut self,
        name: String,
        op: Op,
        scope: Option<ScopeId>,
    ) -> Result<ValueId, PartitionError> {
        let out = self
            .pg
            .add_node(name.clone(), op, vec![name.clone()], scope)
            .map_err(|e| PartitionError::Internal {
                node: name,
                what: e.to_string(),
            })?[0];
        let n = *self.pg.order.last().expect("a node was just added");
        self.lay_out(n)?;
        Ok(out)
    }

    /// Records the layouts of a node added to the plan graph (a conversion, a backward node) from
    /// its inputs'.
    fn lay_out(&mut self, n: ferrotron_ir::NodeId) -> Result<(), PartitionError> {
        let node = &self.pg.nodes[n];
        let ins: Vec<In> = node
            .op
            .inputs()
            .into_iter()
            .map(|&v| In {
                ty: global_type(self.mesh, self.pg.ty(v), self.layouts[v]),
                layout: self.layouts[v],
                blocks: self.blocks[v].max(1),
            })
            .collect();
        let out_types: Vec<&TensorType> = node.outputs.iter().map(|&v| self.pg.ty(v)).collect();
        let hint = node.outputs.first().and_then(|&v| self.hint[v]);
        let outs = infer_local(self.mesh, &node.op, &ins, &out_types, hint).map_err(|e| {
            PartitionError::Internal {
                node: node.name.clone(),
                what: e.to_string(),
            }
        })?;
        let grad = node.op.inputs().iter().any(|&&v| self.needs_grad[v]);
        for (&v, (l, b)) in node.outputs.iter().zip(outs) {
            self.layouts[v] = l;
            self.blocks[v] = b;
            self.needs_grad[v] = grad && self.pg.ty(v).dtype.is_float();
        }
        Ok(())
    }

    fn loss(&self) -> Result<ValueId, PartitionError> {
        let g = &self.pg;
        g.output("loss")
            .or_else(|| {
                g.outputs
                    .iter()
                    .map(|&(_, v)| v)
                    .find(|&v| g.ty(v).shape.rank() == 0 && g.ty(v).dtype.is_float())
            })
            .ok_or(PartitionError::NoLoss)
    }

    /// The gradient of parameter `p`, reduced so it is laid out like the parameter: summed over
    /// the tensor-parallel group where the parameter is replicated but was used in a split
    /// computation (sequence-parallel norms), and over the data-parallel group.
    fn reduce_grad(
        &mut self,
        p: ParamId,
        grad: ValueId,
    ) -> Result<(ParamId, ValueId), PartitionError> {
        let param = self.pg.params[p].value;
        let name = self.pg.params[p].name.clone();
        let scope = self.pg.params[p].scope;
        let mut v = grad;
        let want = self.layouts[param];
        let have = self.layouts[v];
        match (have.tp, want.tp) {
            (a, b) if a == b => {}
            (Layout::Partial, Layout::Replicated) => {
                v = self.add(
                    format!("{name}.grad.tp_sum"),
                    Op::AllReduce {
                        x: v,
                        axis: MeshAxis::Tp,
                    },
                    scope,
                )?;
            }
            (a, b) => {
                return Err(PartitionError::Internal {
                    node: name,
                    what: format!("its gradient is {a} but the parameter is {b}"),
                })
            }
        }
        // The distributed optimizer reduce-scatters the partial sums itself.
        if self.layouts[v].dp == Layout::Partial && !self.distributed_optimizer {
            v = self.add(
                format!("{name}.grad.dp_sum"),
                Op::AllReduce {
                    x: v,
                    axis: MeshAxis::Dp,
                },
                scope,
            )?;
        }
        Ok((p, v))
    }
}
