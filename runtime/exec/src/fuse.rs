//! Operator fusion: the executor's program, with each op pair that pays to run as one kernel
//! merged into one step.
//!
//! ```text
//! Plan (forward + backward SPMD graph, in order) ─► program(): steps, each an IR node or a Fused op
//!   ─► exec runs the steps; Backend::eval_fused computes a fused step in one pass over memory
//! ```
//!
//! The pairs are the ones Megatron fuses by hand, found in the plan by their shape in the graph:
//!
//! | pattern | fused | what it saves |
//! |---|---|---|
//! | `Add(m, bias)` read only by an activation (and its `ActGrad`s) | [`Fused::BiasAct`] forward, [`Fused::BiasActGrad`] backward | the pre-activation tensor is never written; the backward recomputes `m + bias` |
//! | `Scale(x)` read only by a `Softmax` | [`Fused::ScaledSoftmax`] | one write and read of the scores |
//! | `SoftmaxGrad` read only by a `Scale` | [`Fused::ScaledSoftmaxGrad`] | the same, backward |
//! | `EmbeddingGrad` read only by an `Add` (a tied table's other gradient) | [`Fused::EmbeddingGradAdd`] | the embedding's own `[vocab, width]` gradient: its rows are added into the other gradient's buffer ([`crate::Backend::embedding_grad_add`]) |
//!
//! Numerics: a fused step computes exactly the unfused pair's operations in the same order (the
//! intermediate is rounded to `f32` as it would have been stored), so on the CPU a fused run is
//! bit-identical to an unfused one (test `fused_runs_are_bit_identical_to_unfused` in
//! `runtime/cpu/tests/fusion.rs`; the one exception, equal in value: rows of a tied table that no
//! id looks up keep the other gradient's `-0.0` where the unfused sum adds `+0.0`). In bf16 storage the GPU's fused step skips the intermediate's
//! rounding to bf16, which only makes it closer to the `f32` reference.
//!
//! The plan itself (what the partitioner, the cost model and the viewer see) is unchanged; a
//! fusion never crosses a collective, and a value that is kept (an output, a gradient) or read
//! by anything else is never fused away.

use ferrotron_ir::op::Activation;
use ferrotron_ir::{index, NodeId, Op, ValueId};
use ferrotron_partitioner::Plan;
use std::collections::HashMap;

/// A fused op: what two IR ops compute, in one kernel. `V` is how inputs are referred to
/// (value ids in the program, tensors when evaluated).
#[derive(Clone, Debug, PartialEq)]
pub enum Fused<V> {
    /// `act(x + bias)`, `bias` repeated along the leading axes (`[last axis]`): a bias add and
    /// the activation it feeds (Megatron's bias-GeLU).
    BiasAct {
        /// The activation.
        act: Activation,
        /// The GEMM's output.
        x: V,
        /// The bias, shaped like `x`'s last axis.
        bias: V,
    },
    /// `dy · act'(x + bias)`: the activation's gradient, recomputing its input.
    BiasActGrad {
        /// The activation.
        act: Activation,
        /// The GEMM's output.
        x: V,
        /// The bias, shaped like `x`'s last dimension.
        bias: V,
        /// The gradient of the activation's output.
        dy: V,
    },
    /// `softmax(x · factor)` over the last axis (causal as [`Op::Softmax`]): the attention
    /// scores' scaling and softmax.
    ScaledSoftmax {
        /// The unscaled scores.
        x: V,
        /// The scale (`1/√head_dim`).
        factor: f64,
        /// Causal masking.
        causal: bool,
    },
    /// `factor · y · (dy − Σ dy·y)`: softmax's gradient, then the scale's.
    ScaledSoftmaxGrad {
        /// The softmax's output.
        y: V,
        /// The gradient of the softmax's output.
        dy: V,
        /// The scale.
        factor: f64,
    },
    /// `acc + EmbeddingGrad { table, ids, dy }`: the embedding's gradient summed with a tied
    /// table's other gradient (the output layer's), the ids' rows added into `acc`.
    EmbeddingGradAdd {
        /// The table's other gradient.
        acc: V,
        /// The table (its shape and this rank's rows).
        table: V,
        /// The ids the embedding looked up.
        ids: V,
        /// The gradient of the embedding's output.
        dy: V,
    },
}

impl<V> Fused<V> {
    /// The inputs, in order.
    pub fn inputs(&self) -> Vec<&V> {
        match self {
            Fused::BiasAct { x, bias, .. } => vec![x, bias],
            Fused::BiasActGrad { x, bias, dy, .. } => vec![x, bias, dy],
            Fused::ScaledSoftmax { x, .. } => vec![x],
            Fused::ScaledSoftmaxGrad { y, dy, .. } => vec![y, dy],
            Fused::EmbeddingGradAdd {
                acc,
                table,
                ids,
                dy,
            } => vec![acc, table, ids, dy],
        }
    }

    /// A short name for errors and traces.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Fused::BiasAct { .. } => "BiasAct",
            Fused::BiasActGrad { .. } => "BiasActGrad",
            Fused::ScaledSoftmax { .. } => "ScaledSoftmax",
            Fused::ScaledSoftmaxGrad { .. } => "ScaledSoftmaxGrad",
            Fused::EmbeddingGradAdd { .. } => "EmbeddingGradAdd",
        }
    }

    /// The same op with each input mapped.
    pub fn map<W>(&self, mut f: impl FnMut(&V) -> W) -> Fused<W> {
        match self.try_map(|v| Ok::<W, std::convert::Infallible>(f(v))) {
            Ok(op) => op,
            Err(never) => match never {},
        }
    }

    /// The same op with each input mapped, or the first error.
    pub fn try_map<W, E>(&self, mut f: impl FnMut(&V) -> Result<W, E>) -> Result<Fused<W>, E> {
        Ok(match self {
            Fused::BiasAct { act, x, bias } => Fused::BiasAct {
                act: *act,
                x: f(x)?,
                bias: f(bias)?,
            },
            Fused::BiasActGrad { act, x, bias, dy } => Fused::BiasActGrad {
                act: *act,
                x: f(x)?,
                bias: f(bias)?,
                dy: f(dy)?,
            },
            Fused::ScaledSoftmax { x, factor, causal } => Fused::ScaledSoftmax {
                x: f(x)?,
                factor: *factor,
                causal: *causal,
            },
            Fused::ScaledSoftmaxGrad { y, dy, factor } => Fused::ScaledSoftmaxGrad {
                y: f(y)?,
                dy: f(dy)?,
                factor: *factor,
            },
            Fused::EmbeddingGradAdd {
                acc,
                table,
                ids,
                dy,
            } => Fused::EmbeddingGradAdd {
                acc: f(acc)?,
                table: f(table)?,
                ids: f(ids)?,
                dy: f(dy)?,
            },
        })
    }
}

/// What one step of the program runs.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOp {
    /// The node's own op.
    Node,
    /// A fused op in place of the node's, producing the node's outputs. `absorbed` is the node
    /// whose work it took over (and which the program no longer runs).
    Fused {
        /// The fused computation.
        op: Fused<ValueId>,
        /// The node fused into this one.
        absorbed: NodeId,
    },
}

/// One step: a node of the plan and what runs for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The node whose outputs this step produces (and whose name it is traced under).
    pub node: NodeId,
    /// Its op, or the fused op that replaces it.
    pub op: StepOp,
}

impl Step {
    /// The values this step reads.
    pub fn inputs<'a>(&'a self, plan: &'a Plan) -> Vec<ValueId> {
        match &self.op {
            StepOp::Node => plan.graph.nodes[self.node]
                .op
                .inputs()
                .into_iter()
                .copied()
                .collect(),
            StepOp::Fused { op, .. } => op.inputs().into_iter().copied().collect(),
        }
    }
}

/// The steps a rank runs: the plan's nodes in order, some fused.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    /// The steps in order.
    pub steps: Vec<Step>,
    /// Index of the first backward step.
    pub backward_start: usize,
}

impl Program {
    /// The plan's nodes as they are, one step each.
    pub fn unfused(plan: &Plan) -> Program {
        Program {
            steps: plan
                .graph
                .order
                .iter()
                .map(|&node| Step {
                    node,
                    op: StepOp::Node,
                })
                .collect(),
            backward_start: plan.backward_start,
        }
    }

    /// The plan's nodes with every fusable pair fused (see the module docs). `kept` are the
    /// values the run must keep (outputs, gradients, the loss): never fused away.
    pub fn fused(plan: &Plan, kept: &dyn Fn(ValueId) -> bool) -> Program {
        let g = &plan.graph;
        // Every value's readers, in program order.
        let mut readers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
        for &n in &g.order {
            for &v in g.nodes[n].op.inputs() {
                readers.entry(v).or_default().push(n);
            }
        }
        let readers_of = |v: ValueId| readers.get(&v).map(Vec::as_slice).unwrap_or(&[]);
        let only_output = |n: NodeId| match g.nodes[n].outputs.as_slice() {
            &[v] if !kept(v) => Some(v),
            _ => None,
        };
        let position: HashMap<NodeId, usize> =
            g.order.iter().enumerate().map(|(i, &n)| (n, i)).collect();

        let mut replaced: HashMap<NodeId, StepOp> = HashMap::new();
        let mut removed: Vec<bool> = vec![false; g.order.len()];
        for &n in &g.order {
            if replaced.contains_key(&n) {
                continue; // already the consumer half of a pair
            }
            let Some(out) = only_output(n) else { continue };
            let uses = readers_of(out);
            match &g.nodes[n].op {
                Op::Add(a, b) => {
                    let Some((x, bias)) = bias_operands(plan, *a, *b, out) else {
                        continue;
                    };
                    let Some(act) = activation_reader(plan, uses, out) else {
                        continue;
                    };
                    for &r in uses {
                        let fused = match &g.nodes[r].op {
                            Op::ActGrad { dy, .. } => Fused::BiasActGrad {
                                act,
                                x,
                                bias,
                                dy: *dy,
                            },
                            _ => Fused::BiasAct { act, x, bias },
                        };
                        replaced.insert(
                            r,
                            StepOp::Fused {
                                op: fused,
                                absorbed: n,
                            },
                        );
                    }
                    removed[position[&n]] = true;
                }
                Op::Scale { x, factor } => {
                    let (&[r], Ok(factor)) = (uses, index::scale(factor)) else {
                        continue;
                    };
                    if replaced.contains_key(&r) {
                        continue;
                    }
                    if let Op::Softmax { causal, .. } = &g.nodes[r].op {
                        replaced.insert(
                            r,
                            StepOp::Fused {
                                op: Fused::ScaledSoftmax {
                                    x: *x,
                                    factor,
                                    causal: *causal,
                                },
                                absorbed: n,
                            },
                        );
                        removed[position[&n]] = true;
                    }
                }
                Op::EmbeddingGrad { table, ids, dy } => {
                    // Read only by a sum with a gradient of the table's shape (a tied table's).
                    let &[r] = uses else { continue };
                    if replaced.contains_key(&r) {
                        continue;
                    }
                    let Op::Add(a, b) = &g.nodes[r].op else {
                        continue;
                    };
                    let acc = if *a == out { *b } else { *a };
                    let (ta, to) = (g.ty(acc), g.ty(out));
                    if a == b || ta.shape != to.shape || ta.dtype != to.dtype {
                        continue;
                    }
                    // All on one pipeline stage: a table tied across stages has its gradients
                    // summed by the stages' exchange, not by one step.
                    let stage =
                        |node: NodeId| plan.pipeline.as_ref().map_or(0, |p| p.stage_of[node]);
                    if stage(n) != stage(r) || plan.stage_of_value(acc) != stage(r) as usize {
                        continue;
                    }
                    replaced.insert(
                        r,
                        StepOp::Fused {
                            op: Fused::EmbeddingGradAdd {
                                acc,
                                table: *table,
                                ids: *ids,
                                dy: *dy,
                            },
                            absorbed: n,
                        },
                    );
                    removed[position[&n]] = true;
                }
                Op::SoftmaxGrad { y, dy } => {
                    let &[r] = uses else { continue };
                    if replaced.contains_key(&r) {
                        continue;
                    }
                    if let Op::Scale { factor, .. } = &g.nodes[r].op {
                        let Ok(factor) = index::scale(factor) else {
                            continue;
                        };
                        replaced.insert(
                            r,
                            StepOp::Fused {
                                op: Fused::ScaledSoftmaxGrad {
                                    y: *y,
                                    dy: *dy,
                                    factor,
                                },
                                absorbed: n,
                            },
                        );
                        removed[position[&n]] = true;
                    }
                }
                _ => {}
            }
        }
        let mut steps = Vec::with_capacity(g.order.len());
        let mut backward_start = None;
        for (i, &node) in g.order.iter().enumerate() {
            if i >= plan.backward_start && backward_start.is_none() && !removed[i] {
                backward_start = Some(steps.len());
            }
            if removed[i] {
                continue;
            }
            let op = replaced.remove(&node).unwrap_or(StepOp::Node);
            steps.push(Step { node, op });
        }
        Program {
            backward_start: backward_start.unwrap_or(steps.len()),
            steps,
        }
    }

    /// How many steps are fused ops.
    pub fn fused_count(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.op, StepOp::Fused { .. }))
            .count()
    }
}

/// For `out = Add(a, b)`: `(x, bias)` when one operand is shaped like `out` and the other is
/// a vector along `out`'s last axis, of the same dtype.
fn bias_operands(plan: &Plan, a: ValueId, b: ValueId, out: ValueId) -> Option<(ValueId, ValueId)> {
    let g = &plan.graph;
    let out_ty = g.ty(out);
    let last = *out_ty.shape.sizes().last()?;
    let is_bias = |v: ValueId| {
        let t = g.ty(v);
        t.shape.sizes() == [last] && t.dtype == out_ty.dtype
    };
    let is_full = |v: ValueId| {
        let t = g.ty(v);
        t.shape.sizes() == out_ty.shape.sizes() && t.dtype == out_ty.dtype
    };
    if out_ty.shape.rank() < 2 {
        return None;
    }
    if is_full(a) && is_bias(b) {
        Some((a, b))
    } else if is_full(b) && is_bias(a) {
        Some((b, a))
    } else {
        None
    }
}

/// The activation when `out`'s readers are exactly one activation of `out` (forward) and
/// that activation's gradients at `out` (backward; `dy` never `out` itself).
fn activation_reader(plan: &Plan, readers: &[NodeId], out: ValueId) -> Option<Activation> {
    let g = &plan.graph;
    let mut forward = None;
    for &r in readers {
        match &g.nodes[r].op {
            Op::Gelu(x) | Op::GeluTanh(x) | Op::Silu(x) | Op::Relu(x) if *x == out => {
                if forward.is_some() {
                    return None;
                }
                forward = Some(activation_of(&g.nodes[r].op)?);
            }
            Op::ActGrad { x, dy, .. } if *x == out && *dy != out => {}
            _ => return None,
        }
    }
    let act = forward?;
    // Every gradient must be of the same activation.
    readers
        .iter()
        .all(|&r| match &g.nodes[r].op {
            Op::ActGrad { act: a, .. } => *a == act,
            _ => true,
        })
        .then_some(act)
}

fn activation_of<V, D>(op: &Op<V, D>) -> Option<Activation> {
    Some(match op {
        Op::Gelu(_) => Activation::Gelu,
        Op::GeluTanh(_) => Activation::GeluTanh,
        Op::Silu(_) => Activation::Silu,
        Op::Relu(_) => Activation::Relu,
        _ => return None,
    })
}
