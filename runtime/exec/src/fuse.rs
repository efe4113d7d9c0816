//! Operator fusion: the executor's program, with each op pair that pays to run as one kernel,
//! each attention, and the output layer with its loss, merged into one step.
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
//! | `Add(m, bias)` read only by a `Dropout` whose output only a residual `Add` reads (its gradient reads only its place) | [`Fused::BiasDropoutAdd`] | the bias-added and the dropped tensors are never written: one pass over memory instead of three |
//! | `EmbeddingGrad` read only by an `Add` (a tied table's other gradient) | [`Fused::EmbeddingGradAdd`] | the embedding's own `[vocab, width]` gradient: its rows are added into the other gradient's buffer ([`crate::Backend::embedding_grad_add`]) |
//! | `MatMul(q, kᵀ)` → `Scale` → `Softmax` → `Dropout`? → `MatMul(·, v)`, and the seven backward nodes autodiff makes of it | [`Fused::Attention`] forward, [`Fused::AttentionGrad`] backward | the `[..., queries, keys]` scores, probabilities and their dropout, forward and backward: the forward keeps each query row's log-sum-exp (a [`Saved`] value of the program's own) and the backward recomputes the probabilities a tile at a time from it (flash attention) |
//! | `CrossEntropy(MatMul(h, wᵀ))` and, differentiated, its gradient with the two products autodiff makes of it (`dlogits · w`, `dlogitsᵀ · h`) | [`Fused::OutputLoss`], one step at the gradient's place (or the loss's, forward only) | the `[..., vocabulary]` logits and their gradient: the executor makes them a chunk of rows at a time ([`crate::kernel::OutputLossDims`]), reduces the chunk's row statistics over the tp group, and uses the chunk's gradient at once for its rows of `dh` and its addend to `dw` ([`crate::Backend::matmul_acc`]) |
//!
//! The attention is found in the partitioned plan, so it is split by heads exactly as the
//! unfused graph is, and model files keep writing attention as its ops. Where `q`, `k` and `v`
//! are transposes of `[..., seq, heads, d]` values and the output is transposed back (a GPT's
//! head split and merge), the fused steps read and write those values in place
//! ([`AttentionSpec::seq_first`]): the eight transposes between the layouts, forward and
//! backward, are never made. A chain is fused only
//! whole: if any intermediate is read outside it or kept, it runs unfused; a forward without a
//! backward of its own (inference, or a forward that recomputation repeats in the backward,
//! where the repeat is a chain of its own) is fused alone.
//!
//! Numerics: a fused pair computes exactly the unfused pair's operations in the same order (the
//! intermediate is rounded to `f32` as it would have been stored), so on the CPU a run with the
//! pairs fused is bit-identical to an unfused one (test `fused_runs_are_bit_identical_to_unfused`
//! in `runtime/cpu/tests/fusion.rs`; one difference, equal in value: rows of a tied table that no
//! id looks up keep the other gradient's `-0.0` where the unfused sum adds `+0.0`). In bf16
//! storage the GPU's fused step skips the intermediate's rounding to bf16, which only makes it
//! closer to the `f32` reference. The fused attention sums in another order (its online softmax
//! a tile of keys at a time), so it agrees with the unfused chain within `f32` rounding (the
//! tolerances of `--verify`; `runtime/cpu/tests/fused_attention.rs`), not to the bit;
//! [`crate::RunOptions::fuse_attention`] (`--no-fuse-attention`) leaves it out. The fused loss
//! adds its chunks' losses, so it too agrees within `f32` rounding
//! (`runtime/cpu/tests/fused_loss.rs`); [`crate::RunOptions::fuse_loss`] (`--no-fuse-loss`)
//! leaves it out, and a run that keeps the logits never fuses it.
//!
//! The plan itself (what the partitioner, the cost model and the viewer see) is unchanged; a
//! fusion never crosses a collective, and a value that is kept (an output, a gradient) or read
//! by anything else is never fused away.

use crate::kernel::{AttentionSaved, AttentionSpec, OutputLossDims};
use ferrotron_ir::graph::EntityRef;
use ferrotron_ir::op::Activation;
use ferrotron_ir::{index, DType, NodeId, Op, ValueId};
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
    /// Scaled dot-product attention, `dropout(softmax(factor · q·kᵀ)) · v`, computed without
    /// holding the scores ([`crate::Backend::attention`]). Its step makes two values: the
    /// output and the rows' log-sum-exps (a value of the program's own, see
    /// [`Program::saved`]).
    Attention {
        /// The queries.
        q: V,
        /// The keys.
        k: V,
        /// The values.
        v: V,
        /// Scale, causality, dropout.
        spec: AttentionSpec,
    },
    /// The attention's backward: `(dq, dk, dv)` from what the forward saved
    /// ([`crate::Backend::attention_grad`]).
    AttentionGrad {
        /// The forward's operands, output and log-sum-exps, and the output's gradient.
        saved: AttentionSaved<V>,
        /// As the forward's.
        spec: AttentionSpec,
    },
    /// `residual + dropout(x + bias)`, `bias` repeated along the leading axes: a linear
    /// layer's bias, the dropout after it and the residual sum, in one pass (Megatron's
    /// bias-dropout-add). The dropout's mask is the unfused `Dropout`'s at its place
    /// ([`crate::Backend::bias_dropout_add`]).
    BiasDropoutAdd {
        /// The GEMM's output.
        x: V,
        /// The bias, `[last axis of x]`.
        bias: V,
        /// The residual stream, shaped like `x`.
        residual: V,
        /// The drop probability.
        p: f64,
    },
    /// The output layer and its cross-entropy, `CrossEntropy(h · wᵀ, targets)`, computed a
    /// chunk of rows at a time so that the full `[..., vocabulary]` logits never exist (the
    /// executor's loop, chunks of [`crate::kernel::OutputLossDims`]). With `dloss` (the backward's
    /// seed) each chunk's logits also give that chunk's rows of the hidden states' gradient and
    /// its addend to the weight's gradient while they are at hand: the step makes
    /// `[loss, dh, dw]`; without, `[loss]`. The cross-entropy's node, among the step's
    /// absorbed ones, gives its attributes and where its logits' classes sit.
    OutputLoss {
        /// The hidden states `[..., seq, hidden]`.
        h: V,
        /// The output weight `[vocabulary, hidden]` (this rank's classes).
        w: V,
        /// The targets `[..., seq]`.
        targets: V,
        /// The loss's gradient (a scalar), when the step also makes the gradients.
        dloss: Option<V>,
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
            Fused::Attention { q, k, v, .. } => vec![q, k, v],
            Fused::AttentionGrad { saved, .. } => {
                let AttentionSaved {
                    q,
                    k,
                    v,
                    out,
                    lse,
                    dout,
                } = saved;
                vec![q, k, v, out, lse, dout]
            }
            Fused::BiasDropoutAdd {
                x, bias, residual, ..
            } => vec![x, bias, residual],
            Fused::OutputLoss {
                h,
                w,
                targets,
                dloss,
            } => [h, w, targets].into_iter().chain(dloss).collect(),
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
            Fused::Attention { .. } => "Attention",
            Fused::AttentionGrad { .. } => "AttentionGrad",
            Fused::BiasDropoutAdd { .. } => "BiasDropoutAdd",
            Fused::OutputLoss { dloss: None, .. } => "OutputLoss",
            Fused::OutputLoss { dloss: Some(_), .. } => "OutputLossGrad",
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
            Fused::Attention { q, k, v, spec } => Fused::Attention {
                q: f(q)?,
                k: f(k)?,
                v: f(v)?,
                spec: *spec,
            },
            Fused::AttentionGrad { saved, spec } => Fused::AttentionGrad {
                saved: AttentionSaved {
                    q: f(&saved.q)?,
                    k: f(&saved.k)?,
                    v: f(&saved.v)?,
                    out: f(&saved.out)?,
                    lse: f(&saved.lse)?,
                    dout: f(&saved.dout)?,
                },
                spec: *spec,
            },
            Fused::BiasDropoutAdd {
                x,
                bias,
                residual,
                p,
            } => Fused::BiasDropoutAdd {
                x: f(x)?,
                bias: f(bias)?,
                residual: f(residual)?,
                p: *p,
            },
            Fused::OutputLoss {
                h,
                w,
                targets,
                dloss,
            } => Fused::OutputLoss {
                h: f(h)?,
                w: f(w)?,
                targets: f(targets)?,
                dloss: dloss.as_ref().map(&mut f).transpose()?,
            },
        })
    }
}

/// What one step of the program runs.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOp {
    /// The node's own op.
    Node,
    /// A fused op in place of the node's. `absorbed` are the nodes whose work it took over
    /// (and which the program no longer runs).
    Fused {
        /// The fused computation.
        op: Fused<ValueId>,
        /// The nodes fused into this one.
        absorbed: Vec<NodeId>,
        /// The values it makes, in the fused op's order of results: the node's outputs for a
        /// fused pair; an attention's output and log-sum-exps (a [`Program::saved`] value), or
        /// its three gradients.
        outputs: Vec<ValueId>,
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
    /// The values this step reads (a dropout's gradient reads only its forward's place, not
    /// its data: [`Op::data_inputs`]).
    pub fn inputs<'a>(&'a self, plan: &'a Plan) -> Vec<ValueId> {
        match &self.op {
            StepOp::Node => plan.graph.nodes[self.node]
                .op
                .data_inputs()
                .into_iter()
                .copied()
                .collect(),
            StepOp::Fused { op, .. } => op.inputs().into_iter().copied().collect(),
        }
    }

    /// The values this step makes.
    pub fn outputs<'a>(&'a self, plan: &'a Plan) -> &'a [ValueId] {
        match &self.op {
            StepOp::Node => &plan.graph.nodes[self.node].outputs,
            StepOp::Fused { outputs, .. } => outputs,
        }
    }
}

/// A value the program makes that the plan does not have: a fused attention's row
/// log-sum-exps, saved from its forward step for its backward step. Its id follows the plan's
/// values ([`Program::saved_id`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Saved {
    /// A name for errors and traces.
    pub name: String,
    /// Its shape (its type is `f32`).
    pub shape: Vec<u64>,
}

/// Which fusions [`Program::fused`] makes besides the op pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fusions {
    /// Each attention chain ([`Fused::Attention`], [`Fused::AttentionGrad`]).
    pub attention: bool,
    /// Each output layer with its cross-entropy ([`Fused::OutputLoss`]).
    pub loss: bool,
    /// The program is run forward only: a loss is fused without its backward.
    pub forward_only: bool,
}

impl Fusions {
    /// The op pairs only.
    pub const PAIRS: Fusions = Fusions {
        attention: false,
        loss: false,
        forward_only: false,
    };
    /// Every fusion, for a forward and backward run.
    pub const ALL: Fusions = Fusions {
        attention: true,
        loss: true,
        forward_only: false,
    };
}

/// The steps a rank runs: the plan's nodes in order, some fused.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    /// The steps in order.
    pub steps: Vec<Step>,
    /// Index of the first backward step.
    pub backward_start: usize,
    /// Values of the program's own, in id order after the plan's.
    pub saved: Vec<Saved>,
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
            saved: Vec::new(),
        }
    }

    /// The id of the `k`-th [`Program::saved`] value.
    pub fn saved_id(plan: &Plan, k: usize) -> ValueId {
        ValueId::new(plan.graph.values.len() + k)
    }

    /// How many values a rank's store holds: the plan's and the program's own.
    pub fn value_count(&self, plan: &Plan) -> usize {
        plan.graph.values.len() + self.saved.len()
    }

    /// The program's own value `v`, if it is one.
    pub fn saved_value(&self, plan: &Plan, v: ValueId) -> Option<&Saved> {
        v.index()
            .checked_sub(plan.graph.values.len())
            .and_then(|k| self.saved.get(k))
    }

    /// A value's name, the plan's or the program's.
    pub fn value_name<'a>(&'a self, plan: &'a Plan, v: ValueId) -> &'a str {
        match self.saved_value(plan, v) {
            Some(s) => &s.name,
            None => &plan.graph.values[v].name,
        }
    }

    /// A value's shape, the plan's or the program's.
    pub fn value_shape(&self, plan: &Plan, v: ValueId) -> Vec<u64> {
        match self.saved_value(plan, v) {
            Some(s) => s.shape.clone(),
            None => plan.graph.ty(v).shape.sizes(),
        }
    }

    /// The plan's nodes with every fusable pair fused, and the chains `fusions` asks for (see
    /// the module docs). `kept` are the values the run must keep (outputs, gradients, the
    /// loss): never fused away.
    pub fn fused(plan: &Plan, kept: &dyn Fn(ValueId) -> bool, fusions: Fusions) -> Program {
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
        // Attention first: its chain holds pairs the loop below would otherwise fuse.
        let mut saved = Vec::new();
        let chains = match fusions.attention {
            true => attention_chains(plan, kept, &readers_of),
            false => Vec::new(),
        };
        for found in chains {
            let lse = Program::saved_id(plan, saved.len());
            // `[..., heads, queries]`: the probabilities' rows.
            let probs = g.ty(found.probs).shape.sizes();
            saved.push(Saved {
                name: format!("{}.lse", g.values[found.probs].name),
                shape: probs[..probs.len() - 1].to_vec(),
            });
            for &m in found
                .forward_absorbed
                .iter()
                .chain(&found.backward_absorbed)
            {
                removed[position[&m]] = true;
            }
            replaced.insert(
                found.forward,
                StepOp::Fused {
                    op: Fused::Attention {
                        q: found.q,
                        k: found.k,
                        v: found.v,
                        spec: found.spec,
                    },
                    absorbed: found.forward_absorbed.clone(),
                    outputs: vec![found.out, lse],
                },
            );
            if let Some(bw) = found.backward {
                replaced.insert(
                    bw.step,
                    StepOp::Fused {
                        op: Fused::AttentionGrad {
                            saved: AttentionSaved {
                                q: found.q,
                                k: found.k,
                                v: found.v,
                                out: found.out,
                                lse,
                                dout: bw.dout,
                            },
                            spec: found.spec,
                        },
                        absorbed: found.backward_absorbed.clone(),
                        outputs: vec![bw.dq, bw.dk, bw.dv],
                    },
                );
            }
        }
        if fusions.loss {
            for found in output_loss_chains(plan, kept, &readers_of, fusions.forward_only) {
                for &m in &found.absorbed {
                    removed[position[&m]] = true;
                }
                replaced.insert(
                    found.step,
                    StepOp::Fused {
                        op: found.op,
                        absorbed: found.absorbed,
                        outputs: found.outputs,
                    },
                );
            }
        }
        for found in bias_dropout_adds(plan, kept, &readers_of) {
            if [found.add, found.dropout, found.sum]
                .iter()
                .any(|n| replaced.contains_key(n) || removed[position[n]])
            {
                continue;
            }
            removed[position[&found.add]] = true;
            removed[position[&found.dropout]] = true;
            let outputs = g.nodes[found.sum].outputs.clone();
            replaced.insert(
                found.sum,
                StepOp::Fused {
                    op: found.op,
                    absorbed: vec![found.add, found.dropout],
                    outputs,
                },
            );
        }
        for &n in &g.order {
            if replaced.contains_key(&n) || removed[position[&n]] {
                continue; // already the consumer half of a pair, or in an attention or a loss
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
                                absorbed: vec![n],
                                outputs: g.nodes[r].outputs.clone(),
                            },
                        );
                    }
                    removed[position[&n]] = true;
                }
                Op::Scale { x, factor } => {
                    let (&[r], Ok(factor)) = (uses, index::scale(factor)) else {
                        continue;
                    };
                    if replaced.contains_key(&r) || removed[position[&r]] {
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
                                absorbed: vec![n],
                                outputs: g.nodes[r].outputs.clone(),
                            },
                        );
                        removed[position[&n]] = true;
                    }
                }
                Op::EmbeddingGrad { table, ids, dy } => {
                    // Read only by a sum with a gradient of the table's shape (a tied table's).
                    let &[r] = uses else { continue };
                    if replaced.contains_key(&r) || removed[position[&r]] {
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
                            absorbed: vec![n],
                            outputs: g.nodes[r].outputs.clone(),
                        },
                    );
                    removed[position[&n]] = true;
                }
                Op::SoftmaxGrad { y, dy } => {
                    let &[r] = uses else { continue };
                    if replaced.contains_key(&r) || removed[position[&r]] {
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
                                absorbed: vec![n],
                                outputs: g.nodes[r].outputs.clone(),
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
            saved,
        }
    }

    /// The shape of step `i` on its rank when it is a fused output layer.
    pub fn output_loss_dims(&self, plan: &Plan, i: usize) -> Option<OutputLossDims> {
        let StepOp::Fused {
            op: Fused::OutputLoss { h, w, .. },
            ..
        } = &self.steps.get(i)?.op
        else {
            return None;
        };
        let (h, w) = (self.value_shape(plan, *h), self.value_shape(plan, *w));
        let (&hidden, lead) = h.split_last()?;
        Some(OutputLossDims {
            rows: lead.iter().product::<u64>() as usize,
            hidden: hidden as usize,
            vocab: *w.first()? as usize,
        })
    }

    /// The bytes step `i` holds while it runs besides its inputs and outputs (a fused output
    /// layer's chunks: [`OutputLossDims::scratch_bytes`]), with `element_bytes` per element of
    /// each dtype as the backend stores it; 0 for any other step.
    pub fn scratch_bytes(
        &self,
        plan: &Plan,
        i: usize,
        element_bytes: &dyn Fn(DType) -> u64,
    ) -> u64 {
        let Some(dims) = self.output_loss_dims(plan, i) else {
            return 0;
        };
        let StepOp::Fused {
            op: Fused::OutputLoss { h, dloss, .. },
            ..
        } = &self.steps[i].op
        else {
            return 0;
        };
        dims.scratch_bytes(dloss.is_some(), element_bytes(plan.graph.ty(*h).dtype))
    }

    /// Whether an output layer runs fused with its loss ([`Fused::OutputLoss`]): the logits are
    /// then never whole.
    pub fn fuses_output_loss(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(
                s.op,
                StepOp::Fused {
                    op: Fused::OutputLoss { .. },
                    ..
                }
            )
        })
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

/// An attention chain found in a plan: `ctx = dropout?(softmax(factor · q·kᵀ)) · v` and, where
/// the plan differentiates it, the backward nodes autodiff made of it.
struct AttentionChain {
    /// The `ctx` matmul: the fused forward step runs as it.
    forward: NodeId,
    /// The scores' matmul, the scale, the softmax and the dropout (if any).
    forward_absorbed: Vec<NodeId>,
    q: ValueId,
    k: ValueId,
    v: ValueId,
    /// The softmax's output (names the saved log-sum-exps).
    probs: ValueId,
    /// `ctx`.
    out: ValueId,
    spec: AttentionSpec,
    backward: Option<AttentionBackward>,
    /// Every backward node of the chain but `backward.step`.
    backward_absorbed: Vec<NodeId>,
}

/// The backward half of an [`AttentionChain`].
struct AttentionBackward {
    /// The first of the chain's backward nodes in the plan's order: the fused step runs as it.
    step: NodeId,
    dout: ValueId,
    dq: ValueId,
    dk: ValueId,
    dv: ValueId,
}

/// Every attention chain whose intermediates nothing else reads (and none is kept), all on one
/// pipeline stage and model chunk. The forward half is fused alone where the plan has no
/// backward of it (a forward-only run, or a forward that recomputation repeats in the backward:
/// the repeat is a chain of its own); a backward that does not match exactly leaves the whole
/// chain unfused.
fn attention_chains<'r>(
    plan: &Plan,
    kept: &dyn Fn(ValueId) -> bool,
    readers_of: &dyn Fn(ValueId) -> &'r [NodeId],
) -> Vec<AttentionChain> {
    let g = &plan.graph;
    let out_of = |n: NodeId| match g.nodes[n].outputs.as_slice() {
        &[v] if !kept(v) => Some(v),
        _ => None,
    };
    // The node that makes `v`.
    let maker = |v: ValueId| match g.values[v].def {
        ferrotron_ir::ValueDef::Node { node, .. } => Some(node),
        _ => None,
    };
    let place = |n: NodeId| {
        plan.pipeline
            .as_ref()
            .map_or((0, 0), |p| (p.stage_of[n], p.chunk_of[n]))
    };
    let mut chains = Vec::new();
    for &ctx_node in &g.order {
        let Op::MatMul {
            a: pd,
            b: v,
            transpose_a: false,
            transpose_b: false,
        } = g.nodes[ctx_node].op
        else {
            continue;
        };
        let Some(found) = (|| {
            let out = *g.nodes[ctx_node].outputs.first()?;
            // probs_drop = Dropout(probs), or the probabilities themselves.
            let pd_node = maker(pd)?;
            let (probs, dropout) = match g.nodes[pd_node].op {
                Op::Dropout { x, p } => (x, Some((pd_node, p))),
                Op::Softmax { .. } => (pd, None),
                _ => return None,
            };
            let probs_node = maker(probs)?;
            let Op::Softmax { x: scaled, causal } = g.nodes[probs_node].op else {
                return None;
            };
            let scale_node = maker(scaled)?;
            let Op::Scale {
                x: scores,
                ref factor,
            } = g.nodes[scale_node].op
            else {
                return None;
            };
            let factor = index::scale(factor).ok()?;
            let scores_node = maker(scores)?;
            let Op::MatMul {
                a: q,
                b: k,
                transpose_a: false,
                transpose_b: true,
            } = g.nodes[scores_node].op
            else {
                return None;
            };
            // Plain tensors of one dtype, one leading shape (no broadcast batch axes).
            let (tq, tk, tv) = (g.ty(q), g.ty(k), g.ty(v));
            let (sq, sk, sv) = (tq.shape.sizes(), tk.shape.sizes(), tv.shape.sizes());
            let r = sq.len();
            if r < 3
                || sk.len() != r
                || sv.len() != r
                || sq[..r - 2] != sk[..r - 2]
                || sq[..r - 2] != sv[..r - 2]
                || tq.dtype != tk.dtype
                || tq.dtype != tv.dtype
                || (causal && sq[r - 2] > sk[r - 2])
            {
                return None;
            }
            let mut forward_absorbed = vec![scores_node, scale_node, probs_node];
            forward_absorbed.extend(dropout.map(|(n, _)| n));
            let here = place(ctx_node);
            if forward_absorbed.iter().any(|&n| place(n) != here) {
                return None;
            }
            for &n in &forward_absorbed {
                out_of(n)?;
            }
            if readers_of(scores) != [scale_node] || readers_of(scaled) != [probs_node] {
                return None;
            }
            let spec = AttentionSpec {
                factor,
                causal,
                dropout: dropout.map_or(0.0, |(_, p)| p),
                seq_first: false,
            };
            if index::dropout_scale(spec.dropout).is_err() {
                return None;
            }
            let mut chain = AttentionChain {
                forward: ctx_node,
                forward_absorbed,
                q,
                k,
                v,
                probs,
                out,
                spec,
                backward: None,
                backward_absorbed: Vec::new(),
            };
            // The forward alone: its intermediates read by nothing beyond the chain.
            let forward_only = match dropout {
                Some((d, _)) => readers_of(probs) == [d] && readers_of(pd) == [ctx_node],
                None => readers_of(probs) == [ctx_node],
            };
            let (core, recomputed) = if forward_only {
                // Recomputation may repeat the core (scores to dropout) for the backward: the
                // fused backward recomputes the probabilities itself, so the repeat is absorbed.
                match recomputed_core(plan, &chain, readers_of) {
                    Some(found) => found,
                    None => return Some(chain),
                }
            } else {
                let core = Core {
                    probs,
                    pd,
                    dropout: dropout.map(|(n, _)| n),
                    ctx: Some(ctx_node),
                };
                (core, Vec::new())
            };
            // The step runs where the first node reading the output's gradient ran (a
            // recomputed core may come earlier, before that gradient is made).
            let (step, mut absorbed, bw) = attention_backward(plan, &chain, &core, readers_of)?;
            absorbed.extend(recomputed);
            if absorbed.iter().any(|&n| place(n) != here) || place(step) != here {
                return None;
            }
            for &n in absorbed.iter().chain([&step]) {
                if g.nodes[n].outputs.iter().any(|&o| kept(o))
                    && ![bw.dq, bw.dk, bw.dv].contains(&g.nodes[n].outputs[0])
                {
                    return None;
                }
            }
            chain.backward = Some(AttentionBackward { step, ..bw });
            chain.backward_absorbed = absorbed;
            Some(chain)
        })() else {
            continue;
        };
        chains.push(found);
    }
    for chain in &mut chains {
        if let Some(seq_first) = seq_first(plan, chain, kept, readers_of) {
            let here = place(chain.forward);
            if seq_first.nodes().all(|n| place(n) == here) {
                seq_first.apply(chain);
            }
        }
    }
    chains
}

/// The values a sequence-first attention reads and writes in place of a heads-first one's,
/// and the transposes between the two that it absorbs.
struct SeqFirst {
    /// `q`, `k`, `v` before their transposes to heads first, and those transposes.
    operands: [(ValueId, NodeId); 3],
    /// The output's transpose back to sequence first, and its output.
    out: (NodeId, ValueId),
    /// With a backward, its transposes.
    backward: Option<SeqFirstBackward>,
}

/// The backward's transposes a sequence-first attention absorbs.
struct SeqFirstBackward {
    /// The output gradient's transpose to heads first, and its input.
    dout: (NodeId, ValueId),
    /// `dq`, `dk` and `dv`'s transposes back, and their outputs.
    grads: [(NodeId, ValueId); 3],
}

impl SeqFirst {
    fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.operands.iter().map(|o| o.1).chain([self.out.0]).chain(
            self.backward
                .iter()
                .flat_map(|b| std::iter::once(b.dout.0).chain(b.grads.iter().map(|g| g.0))),
        )
    }

    fn apply(self, chain: &mut AttentionChain) {
        let [(q, qn), (k, kn), (v, vn)] = self.operands;
        (chain.q, chain.k, chain.v) = (q, k, v);
        chain.forward_absorbed.extend([qn, kn, vn, self.out.0]);
        chain.out = self.out.1;
        chain.spec.seq_first = true;
        if let (Some(bw), Some(b)) = (chain.backward.as_mut(), self.backward) {
            let ((dn, dout), [(tq, dq), (tk, dk), (tv, dv)]) = (b.dout, b.grads);
            // The output gradient's transpose comes first: the step runs there.
            chain.backward_absorbed.extend([bw.step, tq, tk, tv]);
            *bw = AttentionBackward {
                step: dn,
                dout,
                dq,
                dk,
                dv,
            };
        }
    }
}

/// The sequence-first form of `chain`, where every one of its layout changes is a transpose
/// between `[..., seq, heads, d]` and `[..., heads, seq, d]` that only the chain reads: `q`,
/// `k` and `v` made by one each, the output read only by one, and in the backward the output's
/// gradient made by one and `dq`, `dk`, `dv` each read only by one. `None` (the chain stays
/// heads first) otherwise.
fn seq_first<'r>(
    plan: &Plan,
    chain: &AttentionChain,
    kept: &dyn Fn(ValueId) -> bool,
    readers_of: &dyn Fn(ValueId) -> &'r [NodeId],
) -> Option<SeqFirst> {
    let g = &plan.graph;
    let mut inside: Vec<NodeId> = chain.forward_absorbed.clone();
    inside.push(chain.forward);
    inside.extend(&chain.backward_absorbed);
    inside.extend(chain.backward.as_ref().map(|b| b.step));
    // Swaps the sequence and the heads (the two axes before the last).
    let swaps = |perm: &[usize]| {
        let r = perm.len();
        r >= 3
            && perm.iter().enumerate().all(|(i, &p)| {
                p == if i == r - 3 {
                    r - 2
                } else if i == r - 2 {
                    r - 3
                } else {
                    i
                }
            })
    };
    // `x` made by such a transpose of a value, and read only inside the chain.
    let made_by = |x: ValueId| -> Option<(ValueId, NodeId)> {
        let ferrotron_ir::ValueDef::Node { node, .. } = g.values[x].def else {
            return None;
        };
        let Op::Transpose { x: from, perm } = &g.nodes[node].op else {
            return None;
        };
        (swaps(perm) && !kept(x) && readers_of(x).iter().all(|r| inside.contains(r)))
            .then_some((*from, node))
    };
    // `x` read only by such a transpose: it and its output.
    let read_by = |x: ValueId| -> Option<(NodeId, ValueId)> {
        let &[t] = readers_of(x) else { return None };
        match &g.nodes[t].op {
            Op::Transpose { perm, .. } if swaps(perm) && !kept(x) => {
                Some((t, *g.nodes[t].outputs.first()?))
            }
            _ => None,
        }
    };
    let operands = [made_by(chain.q)?, made_by(chain.k)?, made_by(chain.v)?];
    let out = read_by(chain.out)?;
    let backward = match &chain.backward {
        None => None,
        Some(bw) => {
            let (dout, dn) = made_by(bw.dout)?;
            let grads = [read_by(bw.dq)?, read_by(bw.dk)?, read_by(bw.dv)?];
            Some(SeqFirstBackward {
                dout: (dn, dout),
                grads,
            })
        }
    };
    Some(SeqFirst {
        operands,
        out,
        backward,
    })
}

/// The probabilities an attention's backward reads: the forward's, or a recomputed copy.
struct Core {
    /// The softmax's output.
    probs: ValueId,
    /// What multiplies `v`: the dropout's output, or `probs` without a dropout.
    pd: ValueId,
    /// The dropout node.
    dropout: Option<NodeId>,
    /// The forward's `ctx` product, when these are the forward's own probabilities.
    ctx: Option<NodeId>,
}

/// A copy of the chain's core (scores, scale, softmax, dropout) that recomputation made for the
/// backward, reading the same `q` and `k`: the core and its nodes.
fn recomputed_core<'r>(
    plan: &Plan,
    chain: &AttentionChain,
    readers_of: &dyn Fn(ValueId) -> &'r [NodeId],
) -> Option<(Core, Vec<NodeId>)> {
    let g = &plan.graph;
    let one = |v: ValueId| match readers_of(v) {
        &[r] => Some(r),
        _ => None,
    };
    let out = |n: NodeId| g.nodes[n].outputs.first().copied();
    let scores = readers_of(chain.q).iter().copied().find(|&r| {
        !chain.forward_absorbed.contains(&r)
            && matches!(g.nodes[r].op, Op::MatMul { a, b, transpose_a: false, transpose_b: true }
                if a == chain.q && b == chain.k)
    })?;
    let scale = one(out(scores)?)?;
    match &g.nodes[scale].op {
        Op::Scale { factor, .. } if index::scale(factor).ok()? == chain.spec.factor => {}
        _ => return None,
    }
    let softmax = one(out(scale)?)?;
    if !matches!(g.nodes[softmax].op, Op::Softmax { causal, .. } if causal == chain.spec.causal) {
        return None;
    }
    let probs = out(softmax)?;
    let mut nodes = vec![scores, scale, softmax];
    let (pd, dropout) = if chain.spec.dropout > 0.0 {
        let d = readers_of(probs)
            .iter()
            .copied()
            .find(|&r| matches!(g.nodes[r].op, Op::Dropout { p, .. } if p == chain.spec.dropout))?;
        nodes.push(d);
        (out(d)?, Some(d))
    } else {
        (probs, None)
    };
    let core = Core {
        probs,
        pd,
        dropout,
        ctx: None,
    };
    Some((core, nodes))
}

/// The backward nodes of an attention chain, reading the probabilities `core`: the first in
/// order (every one reads the output's gradient or a value made from it), the others, and the
/// gradients they make. `None` unless every intermediate is read
/// only inside it.
fn attention_backward<'r>(
    plan: &Plan,
    chain: &AttentionChain,
    core: &Core,
    readers_of: &dyn Fn(ValueId) -> &'r [NodeId],
) -> Option<(NodeId, Vec<NodeId>, AttentionBackward)> {
    let g = &plan.graph;
    let (pd, dropout_node) = (core.pd, core.dropout);
    let one = |v: ValueId| match readers_of(v) {
        &[r] => Some(r),
        _ => None,
    };
    let out = |n: NodeId| g.nodes[n].outputs.first().copied();
    // Readers of `pd` besides ctx: the dV product (and the dropout's gradient, which reads
    // the dropout's output for its mask's place).
    let mut dv_node = None;
    let mut dropout_grad = None;
    for &r in readers_of(pd) {
        match g.nodes[r].op {
            _ if Some(r) == core.ctx => {}
            Op::MatMul {
                a,
                transpose_a: true,
                transpose_b: false,
                ..
            } if a == pd && dv_node.is_none() => dv_node = Some(r),
            Op::SoftmaxGrad { y, .. } if y == pd && dropout_node.is_none() => {}
            Op::DropoutGrad { forward, .. } if forward == pd && dropout_node.is_some() => {
                if dropout_grad.replace(r).is_some() {
                    return None;
                }
            }
            _ => return None,
        }
    }
    let dv_node = dv_node?;
    let Op::MatMul { b: dout, .. } = g.nodes[dv_node].op else {
        return None;
    };
    // dpd = dout · vᵀ.
    let dpd_node = readers_of(dout).iter().copied().find(|&r| {
        matches!(g.nodes[r].op, Op::MatMul { a, b, transpose_a: false, transpose_b: true }
            if a == dout && b == chain.v)
    })?;
    let dpd = out(dpd_node)?;
    // Through the dropout's gradient, then the softmax's.
    let (dprobs, dropout_grad) = match (dropout_node, dropout_grad) {
        (Some(_), Some(dg)) => {
            let Op::DropoutGrad { dy, .. } = g.nodes[dg].op else {
                return None;
            };
            if dy != dpd || one(dpd)? != dg {
                return None;
            }
            (out(dg)?, Some(dg))
        }
        (None, None) => (dpd, None),
        _ => return None,
    };
    let sg_node = one(dprobs)?;
    if !matches!(g.nodes[sg_node].op, Op::SoftmaxGrad { y, dy } if y == core.probs && dy == dprobs)
    {
        return None;
    }
    // The probabilities are read by the chain only: the dropout (or ctx and dV) and the
    // softmax's gradient.
    let mut probs_readers: Vec<NodeId> = readers_of(core.probs).to_vec();
    probs_readers.sort();
    let mut expected = match dropout_node {
        Some(d) => vec![d, sg_node],
        None => [core.ctx, Some(dv_node), Some(sg_node)]
            .into_iter()
            .flatten()
            .collect(),
    };
    expected.sort();
    expected.dedup();
    if probs_readers != expected {
        return None;
    }
    let dscaled = out(sg_node)?;
    let scale_node = one(dscaled)?;
    match &g.nodes[scale_node].op {
        Op::Scale { x, factor } if *x == dscaled => {
            if index::scale(factor).ok()? != chain.spec.factor {
                return None;
            }
        }
        _ => return None,
    }
    let dscores = out(scale_node)?;
    let (mut dq_node, mut dk_node) = (None, None);
    for &r in readers_of(dscores) {
        match g.nodes[r].op {
            Op::MatMul {
                a,
                b,
                transpose_a: false,
                transpose_b: false,
            } if a == dscores && b == chain.k && dq_node.is_none() => dq_node = Some(r),
            Op::MatMul {
                a,
                b,
                transpose_a: true,
                transpose_b: false,
            } if a == dscores && b == chain.q && dk_node.is_none() => dk_node = Some(r),
            _ => return None,
        }
    }
    let (dq_node, dk_node) = (dq_node?, dk_node?);
    // Every intermediate is read only inside the chain.
    if one(dpd)? != dropout_grad.unwrap_or(sg_node) {
        return None;
    }
    let (dq, dk, dv) = (out(dq_node)?, out(dk_node)?, out(dv_node)?);
    let mut nodes = vec![dv_node, dpd_node, sg_node, scale_node, dq_node, dk_node];
    nodes.extend(dropout_grad);
    let position = |n: NodeId| g.order.iter().position(|&m| m == n);
    let first = *nodes.iter().min_by_key(|&&n| position(n))?;
    nodes.retain(|&n| n != first);
    Some((
        first,
        nodes,
        AttentionBackward {
            step: first,
            dout,
            dq,
            dk,
            dv,
        },
    ))
}

/// An output layer and its loss found in a plan: `loss = CrossEntropy(h · wᵀ, targets)` and,
/// where the plan differentiates it, the backward nodes autodiff made of it.
struct OutputLossChain {
    /// The fused step runs as this node: the cross-entropy (forward only), or its gradient.
    step: NodeId,
    /// Every other node of the chain.
    absorbed: Vec<NodeId>,
    op: Fused<ValueId>,
    /// The step's values: `[loss]`, or `[loss, dh, dw]`.
    outputs: Vec<ValueId>,
}

/// Every `CrossEntropy(MatMul(h, w, transpose_b), targets)` whose logits nothing else reads
/// and are not kept, all on one pipeline stage and model chunk. With the cross-entropy's
/// gradient in the plan (and not `forward_only`), the backward must be exactly what autodiff
/// makes of it, `dh = dlogits · w` and `dw = dlogitsᵀ · h` (through reshapes to rows that only
/// it reads), with the loss read by nothing: then forward and backward are one step, at the
/// gradient's place. Without a backward the loss alone is fused; a backward that does not
/// match leaves the chain unfused.
fn output_loss_chains<'r>(
    plan: &Plan,
    kept: &dyn Fn(ValueId) -> bool,
    readers_of: &dyn Fn(ValueId) -> &'r [NodeId],
    forward_only: bool,
) -> Vec<OutputLossChain> {
    let g = &plan.graph;
    let maker = |v: ValueId| match g.values[v].def {
        ferrotron_ir::ValueDef::Node { node, .. } => Some(node),
        _ => None,
    };
    let place = |n: NodeId| {
        plan.pipeline
            .as_ref()
            .map_or((0, 0), |p| (p.stage_of[n], p.chunk_of[n]))
    };
    let only = |n: NodeId| match g.nodes[n].outputs.as_slice() {
        &[v] => Some(v),
        _ => None,
    };
    // `x` itself, or a reshape of it that only `reader` reads: what `reader` reads of `x`.
    let through_reshape = |read: ValueId, x: ValueId, reader: NodeId| -> Option<Option<NodeId>> {
        if read == x {
            return Some(None);
        }
        let r = maker(read)?;
        match &g.nodes[r].op {
            Op::Reshape { x: inner, .. }
                if *inner == x && readers_of(read) == [reader] && !kept(read) =>
            {
                Some(Some(r))
            }
            _ => None,
        }
    };
    let mut chains = Vec::new();
    for &ce in &g.order {
        let Op::CrossEntropy {
            logits,
            targets,
            shift,
            ref classes,
        } = g.nodes[ce].op
        else {
            continue;
        };
        let Some(found) = (|| {
            let loss = only(ce)?;
            let mm = maker(logits)?;
            let Op::MatMul {
                a: h,
                b: w,
                transpose_a: false,
                transpose_b: true,
            } = g.nodes[mm].op
            else {
                return None;
            };
            if kept(logits) || g.ty(w).shape.rank() != 2 || g.ty(h).shape.rank() < 2 {
                return None;
            }
            let grads: Vec<NodeId> = readers_of(logits)
                .iter()
                .copied()
                .filter(|&r| r != ce)
                .collect();
            let forward = |chains: &mut Vec<OutputLossChain>| {
                chains.push(OutputLossChain {
                    step: ce,
                    absorbed: vec![mm],
                    op: Fused::OutputLoss {
                        h,
                        w,
                        targets,
                        dloss: None,
                    },
                    outputs: vec![loss],
                })
            };
            let same_place = |nodes: &[NodeId]| nodes.iter().all(|&n| place(n) == place(ce));
            if !same_place(&[mm]) {
                return None;
            }
            let mut found = Vec::new();
            let &[cg] = grads.as_slice() else {
                if grads.is_empty() {
                    forward(&mut found);
                    return Some(found);
                }
                return None;
            };
            if forward_only {
                forward(&mut found);
                return Some(found);
            }
            // The gradient: the same attributes, and read by the two products only.
            let Op::CrossEntropyGrad {
                logits: l2,
                targets: t2,
                dloss,
                shift: s2,
                classes: ref c2,
            } = g.nodes[cg].op
            else {
                return None;
            };
            let dl = only(cg)?;
            if l2 != logits || t2 != targets || s2 != shift || c2 != classes || kept(dl) {
                return None;
            }
            if !readers_of(loss).is_empty() {
                return None;
            }
            let mut dh_node = None;
            let mut dw_node = None;
            let mut absorbed = vec![mm, ce];
            for &r in readers_of(dl) {
                match g.nodes[r].op {
                    Op::MatMul {
                        a,
                        b,
                        transpose_a: false,
                        transpose_b: false,
                    } if a == dl && b == w && dh_node.is_none() => dh_node = Some(r),
                    Op::Reshape { .. } if dw_node.is_none() => {
                        // dl reshaped to rows, read only by the weight's product.
                        let rs = only(r)?;
                        let &[p] = readers_of(rs) else { return None };
                        let Op::MatMul {
                            a,
                            b,
                            transpose_a: true,
                            transpose_b: false,
                        } = g.nodes[p].op
                        else {
                            return None;
                        };
                        if a != rs || kept(rs) {
                            return None;
                        }
                        let hr = through_reshape(b, h, p)?;
                        absorbed.push(r);
                        absorbed.extend(hr);
                        dw_node = Some(p);
                    }
                    Op::MatMul {
                        a,
                        b,
                        transpose_a: true,
                        transpose_b: false,
                    } if a == dl && dw_node.is_none() => {
                        let hr = through_reshape(b, h, r)?;
                        absorbed.extend(hr);
                        dw_node = Some(r);
                    }
                    _ => return None,
                }
            }
            let (dh_node, dw_node) = (dh_node?, dw_node?);
            absorbed.extend([dh_node, dw_node]);
            let (dh, dw) = (only(dh_node)?, only(dw_node)?);
            if g.ty(dh).shape != g.ty(h).shape || g.ty(dw).shape != g.ty(w).shape {
                return None;
            }
            if !same_place(&absorbed) || place(cg) != place(ce) {
                return None;
            }
            found.push(OutputLossChain {
                step: cg,
                absorbed,
                op: Fused::OutputLoss {
                    h,
                    w,
                    targets,
                    dloss: Some(dloss),
                },
                outputs: vec![loss, dh, dw],
            });
            Some(found)
        })() else {
            continue;
        };
        chains.extend(found);
    }
    chains
}

/// A bias add, the dropout after it and the residual sum that reads the dropout.
struct BiasDropoutAdd {
    /// `Add(x, bias)`.
    add: NodeId,
    /// `Dropout` of the sum.
    dropout: NodeId,
    /// The residual `Add`: the fused step runs as it.
    sum: NodeId,
    op: Fused<ValueId>,
}

/// Every `residual + Dropout(Add(x, bias))` whose bias sum only the dropout reads and whose
/// dropped tensor only the residual sum reads (and dropout gradients, for its place), neither
/// kept, the residual shaped like the sum, all on one pipeline stage and model chunk.
fn bias_dropout_adds<'r>(
    plan: &Plan,
    kept: &dyn Fn(ValueId) -> bool,
    readers_of: &dyn Fn(ValueId) -> &'r [NodeId],
) -> Vec<BiasDropoutAdd> {
    let g = &plan.graph;
    let place = |n: NodeId| {
        plan.pipeline
            .as_ref()
            .map_or((0, 0), |p| (p.stage_of[n], p.chunk_of[n]))
    };
    let only = |n: NodeId| match g.nodes[n].outputs.as_slice() {
        &[v] if !kept(v) => Some(v),
        _ => None,
    };
    let mut found = Vec::new();
    for &add in &g.order {
        let Op::Add(a, b) = g.nodes[add].op else {
            continue;
        };
        let Some(summed) = only(add) else { continue };
        let Some((x, bias)) = bias_operands(plan, a, b, summed) else {
            continue;
        };
        let &[dropout] = readers_of(summed) else {
            continue;
        };
        let Op::Dropout { x: dx, p } = g.nodes[dropout].op else {
            continue;
        };
        let Some(dropped) = only(dropout).filter(|_| dx == summed) else {
            continue;
        };
        // Read by one sum, and by dropout gradients only for its place.
        let mut sums = readers_of(dropped).iter().copied().filter(
            |&r| !matches!(g.nodes[r].op, Op::DropoutGrad { forward, .. } if forward == dropped),
        );
        let (Some(sum), None) = (sums.next(), sums.next()) else {
            continue;
        };
        let Op::Add(s1, s2) = g.nodes[sum].op else {
            continue;
        };
        let residual = if s1 == dropped { s2 } else { s1 };
        let (tr, td) = (g.ty(residual), g.ty(dropped));
        if s1 == s2 || tr.shape != td.shape || tr.dtype != td.dtype {
            continue;
        }
        if place(dropout) != place(add) || place(sum) != place(add) {
            continue;
        }
        found.push(BiasDropoutAdd {
            add,
            dropout,
            sum,
            op: Fused::BiasDropoutAdd {
                x,
                bias,
                residual,
                p,
            },
        });
    }
    found
}
