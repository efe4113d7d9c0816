//! Layout inference over the SPMD graph, and the layout verifier that re-runs it on a finished
//! plan.
//!
//! [`node_layouts`] is the one place that says what layouts (on both mesh axes) and what block
//! structure a node's outputs have: the sharding rules of [`crate::rules`] plus the one thing
//! they cannot see, fused weights. A value cut into `k` blocks (each rank holds its slice of each
//! block, as a fused q|k|v projection is) may be `Split` into its `k` pieces locally; a contiguous
//! shard may not, and the two may never be combined. The lowering pass uses it to lay out the
//! backward graph; [`verify_plan`] uses it to re-check every node of a plan, read back from disk
//! or edited by hand, and names the first node whose recorded layout does not follow.

use crate::layout::{Layout, MeshLayout};
use crate::mesh::Mesh;
use crate::plan::Plan;
use crate::rules::{output_layouts_on, RuleError, Sharded};
use ferrotron_ir::graph::EntityRef;
use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{Dim, Graph, MeshAxis, Op, TensorType, ValueId};
use thiserror::Error;

/// One input of a node as layout inference sees it.
pub(crate) struct In {
    /// The value's full (unpartitioned) type.
    pub ty: TensorType,
    pub layout: MeshLayout,
    pub blocks: u32,
}

/// The full type of a value held locally as `local` under `layout`.
pub(crate) fn global_type(mesh: Mesh, local: &TensorType, layout: MeshLayout) -> TensorType {
    let full = mesh.global_sizes(&local.shape.sizes(), layout);
    let mut shape = local.shape.clone();
    for (dim, size) in shape.0.iter_mut().zip(full) {
        dim.size = size;
    }
    TensorType::new(local.dtype, shape)
}

/// The layouts and blocks of a node's outputs, from its inputs'. `op`'s size attributes
/// (reshape targets, split sizes) are the full, unpartitioned ones, like the inputs' types.
pub(crate) fn node_layouts(op: &Op, ins: &[In]) -> Result<Vec<(MeshLayout, u32)>, RuleError> {
    let name = op.mnemonic();
    let tp = match blocked(op, ins) {
        Some(done) => done,
        None => {
            let layouts = output_layouts_on(MeshAxis::Tp, &sharded(op, ins, MeshAxis::Tp))?;
            // Every split input must be cut the same way; outputs inherit it.
            let mut common: Option<u32> = None;
            for x in ins {
                if let Layout::Split(_) = x.layout.tp {
                    match common {
                        None => common = Some(x.blocks),
                        Some(b) if b != x.blocks => {
                            return Err(RuleError::MismatchedBlocks {
                                op: name,
                                blocks: b.max(x.blocks),
                            })
                        }
                        _ => {}
                    }
                }
            }
            let blocks = common.unwrap_or(1);
            if blocks > 1 && !keeps_blocks(op, ins, &layouts) {
                return Err(RuleError::MismatchedBlocks { op: name, blocks });
            }
            layouts
                .into_iter()
                .map(|l| {
                    (
                        l,
                        if matches!(l, Layout::Split(_)) {
                            blocks
                        } else {
                            1
                        },
                    )
                })
                .collect()
        }
    };
    let dp = output_layouts_on(MeshAxis::Dp, &sharded(op, ins, MeshAxis::Dp))?;
    Ok(tp
        .into_iter()
        .zip(dp)
        .map(|((tp, blocks), dp)| (MeshLayout { tp, dp }, blocks))
        .collect())
}

/// `op` (from the SPMD graph, its sizes shard-local) with its size attributes made full, given
/// its outputs' local types and layouts.
fn globalize(mesh: Mesh, op: &Op, outs: &[(&TensorType, MeshLayout)]) -> Op {
    let full = |i: usize| global_type(mesh, outs[i].0, outs[i].1).shape.0;
    let mut op = op.clone();
    match &mut op {
        Op::Reshape { shape, .. }
        | Op::SumTo { shape, .. }
        | Op::Fill { shape, .. }
        | Op::Expand { shape, .. } => *shape = full(0),
        Op::Split {
            dim: axis, sizes, ..
        } => {
            if let Some(a) = outs[0].0.shape.axis(*axis) {
                for (i, size) in sizes.iter_mut().enumerate() {
                    *size = full(i)[a].clone();
                }
            }
        }
        _ => {}
    }
    op
}

fn has_size_attributes(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. }
            | Op::SumTo { .. }
            | Op::Fill { .. }
            | Op::Split { .. }
            | Op::Expand { .. }
    )
}

/// The layouts of a node of the SPMD graph (local sizes in its attributes, outputs of the given
/// local types). An op that spells out sizes is consistent with the output layouts that make its
/// full sizes work; a dimension split down to local size 1 can make more than one consistent, so
/// `hint` (the layout of the forward value a gradient belongs to) is tried first, as is and as a
/// partial sum, then readings that keep the input's split dimension in place.
pub(crate) fn infer_local(
    mesh: Mesh,
    op: &Op,
    ins: &[In],
    outs: &[&TensorType],
    hint: Option<MeshLayout>,
) -> Result<Vec<(MeshLayout, u32)>, RuleError> {
    if !has_size_attributes(op) {
        return node_layouts(op, ins);
    }
    let consistent = |cand: MeshLayout| -> Option<Vec<(MeshLayout, u32)>> {
        let with: Vec<(&TensorType, MeshLayout)> = outs.iter().map(|&t| (t, cand)).collect();
        let res = node_layouts(&globalize(mesh, op, &with), ins).ok()?;
        res.iter().all(|(l, _)| *l == cand).then_some(res)
    };
    if let Some(h) = hint {
        let partial = |l: Layout, yes: bool| if yes { Layout::Partial } else { l };
        for (tp, dp) in [(false, false), (false, true), (true, false), (true, true)] {
            let cand = MeshLayout {
                tp: partial(h.tp, tp),
                dp: partial(h.dp, dp),
            };
            if let Some(res) = consistent(cand) {
                return Ok(res);
            }
        }
    }
    let guess = node_layouts(op, ins);
    let guess_dp = guess.as_ref().map_or(Layout::Replicated, |g| g[0].0.dp);
    // A dimension split down to local size 1 makes local sizes ambiguous, so the reading that
    // keeps the input's split dimension in place (same local size after the same local prefix)
    // is tried first, then the guess from local sizes, then splits before the rest.
    if let Some(x) = ins.first() {
        if let (Layout::Split(d), Op::Reshape { .. } | Op::SumTo { .. }) = (x.layout.tp, op) {
            let local_in = mesh.local_sizes(&x.ty.shape.sizes(), x.layout);
            let local_out = outs[0].shape.sizes();
            let mapped: Option<usize> = match op {
                Op::SumTo { .. } => {
                    let offset = local_in.len().saturating_sub(local_out.len());
                    (d >= offset && local_out[d - offset] == local_in[d]).then(|| d - offset)
                }
                _ => {
                    let before: u64 = local_in[..d].iter().product();
                    let mut acc = 1u64;
                    local_out.iter().position(|&size| {
                        let hit = acc == before && size == local_in[d];
                        acc = acc.saturating_mul(size);
                        hit
                    })
                }
            };
            if let Some(j) = mapped {
                let cand = MeshLayout {
                    tp: Layout::Split(j),
                    dp: guess_dp,
                };
                if let Some(res) = consistent(cand) {
                    return Ok(res);
                }
            }
        }
    }
    if let Some(res) = guess.as_ref().ok().and_then(|g| consistent(g[0].0)) {
        return Ok(res);
    }
    let rank = outs.first().map_or(0, |t| t.shape.rank());
    let choices: Vec<Layout> = (0..rank)
        .map(Layout::Split)
        .chain([Layout::Replicated, Layout::Partial])
        .collect();
    let dp_choices: Vec<Layout> = std::iter::once(guess_dp)
        .chain(choices.iter().copied().filter(|&l| l != guess_dp))
        .collect();
    for &tp in &choices {
        for &dp in &dp_choices {
            if let Some(res) = consistent(MeshLayout { tp, dp }) {
                return Ok(res);
            }
        }
    }
    // Nothing is consistent: report what reading the sizes as they are gives.
    let res = guess?;
    let with: Vec<(&TensorType, MeshLayout)> = outs.iter().map(|&t| (t, res[0].0)).collect();
    node_layouts(&globalize(mesh, op, &with), ins)
}

/// Whether an op moves no element across a blocked split axis, so a blocked input stays blocked
/// (gathering one would interleave the blocks; a reshape may only keep the split axis whole).
fn keeps_blocks(op: &Op, ins: &[In], outs: &[Layout]) -> bool {
    match op {
        Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::LocalSlice { .. }
        | Op::Slice { .. }
        | Op::Pad { .. } => false,
        Op::Reshape { shape, .. } => match (ins[0].layout.tp, outs.first()) {
            (Layout::Split(d), Some(Layout::Split(j))) => shape
                .get(*j)
                .is_some_and(|dim| dim.size == ins[0].ty.shape.size(d)),
            _ => true,
        },
        _ => true,
    }
}

/// `Split` of a blocked value into its blocks, and `Concat` of contiguous shards into a blocked
/// value (the gradient of that split), along the tensor-parallel split axis.
fn blocked(op: &Op, ins: &[In]) -> Option<Vec<(Layout, u32)>> {
    match op {
        Op::Split {
            dim: axis, sizes, ..
        } => {
            let x = &ins[0];
            let Layout::Split(d) = x.layout.tp else {
                return None;
            };
            let k = sizes.len() as u32;
            let equal = sizes.iter().all(|s| s.size == sizes[0].size);
            (x.ty.shape.axis(*axis) == Some(d) && k > 1 && x.blocks == k && equal)
                .then(|| vec![(Layout::Split(d), 1); sizes.len()])
        }
        Op::Concat { dim: axis, .. } => {
            let Layout::Split(d) = ins.first()?.layout.tp else {
                return None;
            };
            let along = ins[0].ty.shape.axis(*axis) == Some(d);
            let same = ins.iter().all(|x| {
                x.layout.tp == Layout::Split(d) && x.blocks == 1 && x.ty.shape == ins[0].ty.shape
            });
            (along && same && ins.len() > 1).then(|| vec![(Layout::Split(d), ins.len() as u32)])
        }
        _ => None,
    }
}

fn sharded(op: &Op, ins: &[In], axis: MeshAxis) -> Op<Sharded, Dim> {
    let mut i = 0;
    op.try_map::<Sharded, Dim, (), _, _>(
        |_| {
            let x = &ins[i];
            i += 1;
            Ok(Sharded {
                ty: x.ty.clone(),
                layout: x.layout.on(axis),
            })
        },
        |d| Ok(d.clone()),
    )
    .expect("mapping values cannot fail")
}

/// A plan whose layouts do not hold together.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum PlanError {
    /// The SPMD graph itself is ill-formed.
    #[error(transparent)]
    Graph(#[from] ferrotron_ir::VerifyError),
    /// A node cannot run on the layouts its inputs have.
    #[error("node `{node}`: {error}")]
    Rule {
        /// The node's name.
        node: String,
        /// Why.
        error: RuleError,
    },
    /// A recorded layout is not the one the inputs give.
    #[error("value `{value}` is recorded as {recorded}, but its inputs make it {inferred}")]
    Layout {
        /// The value's name.
        value: String,
        /// What the plan says.
        recorded: MeshLayout,
        /// What follows from the inputs.
        inferred: MeshLayout,
    },
    /// A parameter's shard does not match its value.
    #[error("parameter `{param}`: {problem}")]
    Param {
        /// The parameter.
        param: String,
        /// What is wrong.
        problem: String,
    },
}

/// Re-checks a plan from scratch: the SPMD graph verifies, every parameter's value has the
/// layout and local shape its shard says, every node's inputs are laid out as its rule accepts
/// and its outputs as recorded, and the loss and the gradients end up where the optimizer needs
/// them (replicated loss on the tensor-parallel axis, each gradient laid out like its
/// parameter).
pub fn verify_plan(plan: &Plan) -> Result<(), PlanError> {
    ferrotron_ir::verify(&plan.graph)?;
    value_blocks(plan).map(|_| ())
}

/// Re-derives every value's layout (as [`verify_plan`] does, without re-checking the graph's
/// types) and returns each value's fused-weight blocks: how a runtime reassembles a value from
/// its shards.
pub fn value_blocks(plan: &Plan) -> Result<SecondaryMap<ValueId, u32>, PlanError> {
    let g = &plan.graph;
    let mesh = plan.mesh;
    let mut blocks: SecondaryMap<ValueId, u32> = SecondaryMap::with_capacity(g.values.len());
    for (p, data) in g.params.iter() {
        let shard = plan.params.get(p.index()).ok_or_else(|| PlanError::Param {
            param: data.name.clone(),
            problem: "the plan has no shard for it".into(),
        })?;
        let recorded = plan.layouts[data.value];
        if recorded != shard.layout {
            return Err(PlanError::Param {
                param: data.name.clone(),
                problem: format!(
                    "its value is recorded as {recorded}, its shard as {}",
                    shard.layout
                ),
            });
        }
        let local = g.ty(data.value).shape.sizes();
        if local != shard.local_shape(mesh) {
            return Err(PlanError::Param {
                param: data.name.clone(),
                problem: format!(
                    "its local shape is {:?}, but its shard {:?} split as {} gives {:?}",
                    local,
                    shard.shape,
                    shard.layout,
                    shard.local_shape(mesh)
                ),
            });
        }
        blocks[data.value] = shard.blocks;
    }
    for &v in &g.inputs {
        blocks[v] = 1;
    }
    for &n in &g.order {
        let node = &g.nodes[n];
        let ins: Vec<In> = node
            .op
            .inputs()
            .into_iter()
            .map(|&v| In {
                ty: global_type(mesh, g.ty(v), plan.layouts[v]),
                layout: plan.layouts[v],
                blocks: blocks[v].max(1),
            })
            .collect();
        let recorded: Vec<(&TensorType, MeshLayout)> = node
            .outputs
            .iter()
            .map(|&v| (g.ty(v), plan.layouts[v]))
            .collect();
        let outs = node_layouts(&globalize(mesh, &node.op, &recorded), &ins).map_err(|error| {
            PlanError::Rule {
                node: node.name.clone(),
                error,
            }
        })?;
        for (&v, (inferred, b)) in node.outputs.iter().zip(outs) {
            let recorded = plan.layouts[v];
            if recorded != inferred {
                return Err(PlanError::Layout {
                    value: g.values[v].name.clone(),
                    recorded,
                    inferred,
                });
            }
            blocks[v] = b;
        }
    }
    let loss = plan.layouts[plan.loss];
    if loss.tp != Layout::Replicated {
        return Err(PlanError::Layout {
            value: g.values[plan.loss].name.clone(),
            recorded: loss,
            inferred: MeshLayout {
                tp: Layout::Replicated,
                dp: loss.dp,
            },
        });
    }
    for &(p, grad) in &plan.grads {
        let param = &g.params[p];
        let want = MeshLayout {
            dp: Layout::Replicated,
            ..plan.layouts[param.value]
        };
        // The distributed optimizer sums the data-parallel partial sums itself.
        let partial = MeshLayout {
            dp: Layout::Partial,
            ..want
        };
        let laid_out = plan.layouts[grad] == want
            || (plan.distributed_optimizer() && plan.layouts[grad] == partial);
        if !laid_out || g.ty(grad) != g.ty(param.value) {
            return Err(PlanError::Param {
                param: param.name.clone(),
                problem: format!(
                    "its gradient `{}` is {} {}, but the parameter is {} {}",
                    g.values[grad].name,
                    g.ty(grad),
                    plan.layouts[grad],
                    g.ty(param.value),
                    want
                ),
            });
        }
    }
    Ok(blocks)
}

/// Whether a value is computed from the graph's inputs (not from parameters alone).
pub(crate) fn from_inputs(g: &Graph) -> SecondaryMap<ValueId, bool> {
    let mut from = SecondaryMap::with_capacity(g.values.len());
    for &v in &g.inputs {
        from[v] = true;
    }
    for &n in &g.order {
        let node = &g.nodes[n];
        let any = node.op.inputs().iter().any(|&&v| from[v]);
        for &o in &node.outputs {
            from[o] = any;
        }
    }
    from
}
