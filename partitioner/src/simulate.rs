//! The executable semantics of a plan: [`simulate`] runs a [`Plan`] on `tp × dp` simulated ranks,
//! in one thread, in `f64`, and [`Simulation`] reassembles any value, the loss and every
//! gradient at full shape.
//!
//! ```text
//! Plan (SPMD graph, layouts, parameter shards) ─┐
//! full parameters (model shapes) + full inputs ─┴─► simulate: every rank, node by node,
//!     in lockstep over plan.graph.order ─► Simulation ─► loss, gradients, values (full shape)
//!         │                                   ▲
//!         └─ compared with ir::reference::eval_graph on the unpartitioned graph + autodiff
//! ```
//!
//! It is slow and exact on purpose, the ground truth the runtimes (threads, NCCL) are held to:
//! each rank holds its local tensors; every rank-independent op is
//! [`ferrotron_ir::reference::eval_op`] on them, so an op means here exactly what it means on
//! one device. What depends on the rank is spelled out once, here:
//!
//! - Rank `(t, d)` is tensor-parallel rank `t` of data-parallel rank `d`. A collective over `Tp`
//!   runs over the ranks with the same `d`, over `Dp` over those with the same `t`, in rank
//!   order.
//! - Parameters: the full tensor is the model's, zero-padded at the end of each dimension up to
//!   the shard's shape (the vocabulary); rank `t` holds the slices
//!   [`ParamShard::ranges`](crate::ParamShard::ranges) gives, concatenated. Inputs and every
//!   other value: rank `r` of a group holds the `r`-th contiguous slice of a split dimension.
//! - `F` is the identity; `G` and `AllReduce` sum over the group; `AllGather` concatenates the
//!   group's tensors along `dim`; `ReduceScatter` sums and keeps this rank's slice;
//!   `LocalSlice` keeps this rank's slice.
//! - `Embedding` of a table split by rows (vocabulary-parallel) looks up the ids in this rank's
//!   row range and yields zeros for the others; `EmbeddingGrad` scatters only those.
//! - `CrossEntropy` on logits split along the class axis is vocabulary-parallel: per token, the
//!   maximum, the sum of exponentials and the target's logit are combined across the group
//!   (the logits are never gathered), classes at or past `classes` are padding. On logits split
//!   along another axis (the batch, over data parallelism) the mean divides by the global number
//!   of predicting positions, so each rank holds its addend of the loss. `CrossEntropyGrad`
//!   likewise.
//! - `Dropout` and `DropoutGrad` draw the reference mask by each element's flat index in the
//!   full tensor, so a shard is masked exactly as the unpartitioned graph is.
//!
//! Every local result is checked against the shape the plan declares, and a value reassembled
//! from replicas that disagree is an error: both are partitioner bugs this executor exists to
//! expose.

use crate::layout::{Layout, MeshLayout};
use crate::mesh::{self, Coord, Region};
use crate::plan::Plan;
use ferrotron_ir::graph::EntityRef;
use ferrotron_ir::reference::{dropout_keeps, eval_op, EvalError, Tensor};
use ferrotron_ir::{Dim, MeshAxis, Op, ValueId};
use std::collections::HashMap;
use thiserror::Error;

/// Why a plan cannot be simulated, or a value not reassembled.
#[derive(Debug, Error)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum SimError {
    /// A parameter or graph input without a value.
    #[error("no value was given for {kind} `{name}`")]
    MissingFeed { kind: &'static str, name: String },
    /// A parameter or input given at the wrong (full) shape.
    #[error("{kind} `{name}` was given with shape {found:?}, but its full shape is {expected:?}")]
    FeedShape {
        kind: &'static str,
        name: String,
        expected: Vec<u64>,
        found: Vec<usize>,
    },
    /// An op that failed on one rank.
    #[error("node `{node}` on rank (tp {t}, dp {d}): {source}")]
    Eval {
        node: String,
        t: u64,
        d: u64,
        source: EvalError,
    },
    /// A local result whose shape is not the one the plan declares.
    #[error(
        "`{value}` on rank (tp {t}, dp {d}) has shape {found:?}, the plan declares {expected:?}"
    )]
    Shape {
        value: String,
        t: u64,
        d: u64,
        expected: Vec<u64>,
        found: Vec<usize>,
    },
    /// A node this executor does not know how to run on its layouts (or a malformed plan).
    #[error("node `{node}`: {what}")]
    Unsupported { node: String, what: String },
    /// No value, output or parameter of that name.
    #[error("the plan has no {kind} named `{name}`")]
    Unknown { kind: &'static str, name: String },
    /// A value recorded as replicated whose copies differ.
    #[error("`{value}` is replicated over {axis}, but its copies differ by up to {diff:e}")]
    Diverged {
        value: String,
        axis: &'static str,
        diff: f64,
    },
}

/// Every rank's every value after running a plan.
#[derive(Debug)]
pub struct Simulation<'p> {
    plan: &'p Plan,
    /// `values[rank][value]`, ranks numbered as [`crate::Mesh::coord`] numbers them.
    values: Vec<Vec<Option<Tensor>>>,
    /// The fused-weight blocks of each tensor-parallel split value (1: contiguous).
    blocks: Vec<u32>,
}

/// Runs `plan` on its `tp × dp` ranks. `params` holds every parameter's full value in its model
/// shape (without vocabulary padding), by name; `inputs` every graph input's full value (the
/// global batch), by name.
pub fn simulate<'p>(
    plan: &'p Plan,
    params: &HashMap<String, Tensor>,
    inputs: &HashMap<String, Tensor>,
) -> Result<Simulation<'p>, SimError> {
    let g = &plan.graph;
    let (tp, dp) = (plan.mesh.tp, plan.mesh.dp);
    if tp == 0 || dp == 0 {
        return Err(SimError::Unsupported {
            node: String::new(),
            what: format!("an empty mesh ({tp} × {dp})"),
        });
    }
    let mut sim = Simulation {
        plan,
        values: vec![vec![None; g.values.len()]; (tp * dp) as usize],
        blocks: vec![1; g.values.len()],
    };
    for &v in &g.inputs {
        let name = &g.values[v].name;
        let full = inputs.get(name).ok_or_else(|| SimError::MissingFeed {
            kind: "input",
            name: name.clone(),
        })?;
        let layout = plan.layouts[v];
        let expected = plan.mesh.global_sizes(&g.ty(v).shape.sizes(), layout);
        check_feed("input", name, &expected, full)?;
        for c in plan.mesh.coords() {
            let region = Region::of(&full.shape, layout, 1, plan.mesh, c);
            let local = Tensor::new(region.shape(), region.extract(&full.data, &full.shape));
            sim.store(v, c, local)?;
        }
    }
    for (p, data) in g.params.iter() {
        let shard = plan
            .params
            .get(p.index())
            .ok_or_else(|| SimError::Unsupported {
                node: data.name.clone(),
                what: "the plan has no shard for this parameter".into(),
            })?;
        let model = params
            .get(&shard.name)
            .ok_or_else(|| SimError::MissingFeed {
                kind: "parameter",
                name: shard.name.clone(),
            })?;
        check_feed("parameter", &shard.name, &shard.model_shape, model)?;
        let padded = pad_to(model, &shard.shape);
        sim.blocks[data.value.index()] = shard.blocks.max(1);
        for c in plan.mesh.coords() {
            let region = shard.region(plan.mesh, c);
            let local = Tensor::new(region.shape(), region.extract(&padded.data, &padded.shape));
            sim.store(data.value, c, local)?;
        }
    }
    for &n in &g.order {
        sim.node(n)?;
    }
    Ok(sim)
}

fn check_feed(
    kind: &'static str,
    name: &str,
    expected: &[u64],
    found: &Tensor,
) -> Result<(), SimError> {
    let fits = found.shape.len() == expected.len()
        && found
            .shape
            .iter()
            .zip(expected)
            .all(|(&a, &b)| a as u64 == b)
        && found.data.len() == found.shape.iter().product::<usize>();
    if fits {
        Ok(())
    } else {
        Err(SimError::FeedShape {
            kind,
            name: name.to_owned(),
            expected: expected.to_vec(),
            found: found.shape.clone(),
        })
    }
}

impl<'p> Simulation<'p> {
    /// The plan that was run.
    pub fn plan(&self) -> &'p Plan {
        self.plan
    }

    /// The true loss: the plan's loss summed over the data-parallel group where each rank holds
    /// an addend.
    pub fn loss(&self) -> Result<f64, SimError> {
        let t = self.assemble(self.plan.loss, self.blocks[self.plan.loss.index()])?;
        Ok(t.data[0])
    }

    /// Parameter `name`'s gradient at full model shape (vocabulary padding stripped).
    pub fn grad(&self, name: &str) -> Result<Tensor, SimError> {
        let (full, shard) = self.grad_with_shard(name)?;
        let model: Vec<usize> = shard.model_shape.iter().map(|&s| s as usize).collect();
        Ok(crop(&full, &model))
    }

    /// Parameter `name`'s gradient at the plan's full shape, vocabulary padding included.
    pub fn grad_padded(&self, name: &str) -> Result<Tensor, SimError> {
        Ok(self.grad_with_shard(name)?.0)
    }

    fn grad_with_shard(&self, name: &str) -> Result<(Tensor, &'p crate::ParamShard), SimError> {
        let unknown = |kind| SimError::Unknown {
            kind,
            name: name.to_owned(),
        };
        let g = &self.plan.graph;
        let (p, _) = g
            .params
            .iter()
            .find(|(_, d)| d.name == name)
            .ok_or_else(|| unknown("parameter"))?;
        let shard = &self.plan.params[p.index()];
        let &(_, grad) = self
            .plan
            .grads
            .iter()
            .find(|(q, _)| *q == p)
            .ok_or_else(|| unknown("gradient of a parameter"))?;
        Ok((self.assemble(grad, shard.blocks.max(1))?, shard))
    }

    /// A value at full shape, by graph output name (`logits`) or value name
    /// (`h.0.attn.qkv`): split values concatenated, partial ones summed, replicated ones checked
    /// to agree. Padded dimensions keep their padding.
    pub fn value(&self, name: &str) -> Result<Tensor, SimError> {
        let v = self.value_id(name)?;
        self.assemble(v, self.blocks[v.index()])
    }

    /// The value of that name (graph outputs first).
    pub fn value_id(&self, name: &str) -> Result<ValueId, SimError> {
        let g = &self.plan.graph;
        g.output(name)
            .or_else(|| g.value_named(name))
            .ok_or_else(|| SimError::Unknown {
                kind: "value",
                name: name.to_owned(),
            })
    }

    /// What the rank at `c` holds of value `v` (its local shape), for comparing a runtime rank
    /// by rank.
    pub fn local(&self, c: Coord, v: ValueId) -> Option<&Tensor> {
        let mesh = self.plan.mesh;
        if c.tp as u64 >= mesh.tp || c.dp as u64 >= mesh.dp {
            return None;
        }
        self.values[mesh.rank(c)].get(v.index())?.as_ref()
    }

    fn ranks(&self) -> Vec<Coord> {
        self.plan.mesh.coords().collect()
    }

    /// The groups of `axis`: each its members in group order.
    fn groups(&self, axis: MeshAxis) -> Vec<Vec<Coord>> {
        let mesh = self.plan.mesh;
        mesh.coords()
            .filter(|c| c.on(axis) == 0)
            .map(|c| {
                let members = mesh.group(axis, c);
                members.into_iter().map(|r| mesh.coord(r)).collect()
            })
            .collect()
    }

    fn get(&self, v: ValueId, c: Coord) -> Result<&Tensor, SimError> {
        self.values[self.plan.mesh.rank(c)][v.index()]
            .as_ref()
            .ok_or_else(|| SimError::Unsupported {
                node: self.plan.graph.values[v].name.clone(),
                what: "read before it is defined".into(),
            })
    }

    fn store(&mut self, v: ValueId, c: Coord, x: Tensor) -> Result<(), SimError> {
        let expected = self.plan.graph.ty(v).shape.sizes();
        let fits = x.shape.len() == expected.len()
            && x.shape.iter().zip(&expected).all(|(&a, &b)| a as u64 == b);
        if !fits {
            return Err(SimError::Shape {
                value: self.plan.graph.values[v].name.clone(),
                t: c.tp as u64,
                d: c.dp as u64,
                expected,
                found: x.shape,
            });
        }
        let r = self.plan.mesh.rank(c);
        self.values[r][v.index()] = Some(x);
        Ok(())
    }

    /// Runs one node on every rank.
    fn node(&mut self, n: ferrotron_ir::NodeId) -> Result<(), SimError> {
        let plan = self.plan;
        let node = &plan.graph.nodes[n];
        let unsupported = |what: String| SimError::Unsupported {
            node: node.name.clone(),
            what,
        };
        let eval_err = |c: Coord| {
            move |source: EvalError| SimError::Eval {
                node: node.name.clone(),
                t: c.tp as u64,
                d: c.dp as u64,
                source,
            }
        };
        let layout = |v: &ValueId| plan.layouts[*v];
        // Per rank (in `ranks()` order), the node's outputs.
        let ranks = self.ranks();
        let mut outs: HashMap<Coord, Vec<Tensor>> = HashMap::with_capacity(ranks.len());
        match &node.op {
            Op::F { x, .. } => {
                for &c in &ranks {
                    outs.insert(c, vec![self.get(*x, c)?.clone()]);
                }
            }
            Op::G { x, axis } | Op::AllReduce { x, axis } => {
                for group in self.groups(*axis) {
                    let xs = self.gather_group(*x, &group)?;
                    let sum = sum(&xs).map_err(eval_err(group[0]))?;
                    for &r in &group {
                        outs.insert(r, vec![sum.clone()]);
                    }
                }
            }
            Op::AllGather {
                x,
                dim,
                axis,
                parts,
                ..
            } => {
                for group in self.groups(*axis) {
                    check_parts(&group, *parts).map_err(unsupported)?;
                    let xs = self.gather_group(*x, &group)?;
                    let a = resolve_axis(xs[0].rank(), *dim).map_err(unsupported)?;
                    let all = concat(&xs, a).map_err(eval_err(group[0]))?;
                    for &r in &group {
                        outs.insert(r, vec![all.clone()]);
                    }
                }
            }
            Op::ReduceScatter {
                x,
                dim,
                axis,
                parts,
            } => {
                for group in self.groups(*axis) {
                    check_parts(&group, *parts).map_err(unsupported)?;
                    let xs = self.gather_group(*x, &group)?;
                    let a = resolve_axis(xs[0].rank(), *dim).map_err(unsupported)?;
                    let total = sum(&xs).map_err(eval_err(group[0]))?;
                    for (i, &c) in group.iter().enumerate() {
                        let part = own_slice(&total, a, i, group.len()).map_err(eval_err(c))?;
                        outs.insert(c, vec![part]);
                    }
                }
            }
            Op::LocalSlice {
                x,
                dim,
                axis,
                parts,
            } => {
                for group in self.groups(*axis) {
                    check_parts(&group, *parts).map_err(unsupported)?;
                    for (i, &c) in group.iter().enumerate() {
                        let xt = self.get(*x, c)?;
                        let a = resolve_axis(xt.rank(), *dim).map_err(unsupported)?;
                        let part = own_slice(xt, a, i, group.len()).map_err(eval_err(c))?;
                        outs.insert(c, vec![part]);
                    }
                }
            }
            Op::Embedding { table, ids } if split_rows(layout(table)) => {
                for &c in &ranks {
                    let tab = self.get(*table, c)?;
                    let off = self
                        .offsets(*table, c)
                        .map_err(unsupported)?
                        .first()
                        .copied()
                        .unwrap_or(0);
                    let ids = self.get(*ids, c)?;
                    let out = embedding_rows(tab, ids, off).map_err(eval_err(c))?;
                    outs.insert(c, vec![out]);
                }
            }
            Op::EmbeddingGrad { table, ids, dy } if split_rows(layout(table)) => {
                for &c in &ranks {
                    let tab = self.get(*table, c)?;
                    let off = self
                        .offsets(*table, c)
                        .map_err(unsupported)?
                        .first()
                        .copied()
                        .unwrap_or(0);
                    let (ids, dy) = (self.get(*ids, c)?, self.get(*dy, c)?);
                    let out = embedding_grad_rows(tab, ids, dy, off).map_err(eval_err(c))?;
                    outs.insert(c, vec![out]);
                }
            }
            Op::CrossEntropy {
                logits,
                targets,
                shift,
                classes,
            } => {
                let ce = CrossEntropyArgs {
                    logits: *logits,
                    targets: *targets,
                    dloss: None,
                    shift: *shift,
                    classes: classes.as_ref(),
                };
                self.cross_entropy(node, ce, &mut outs)?;
            }
            Op::CrossEntropyGrad {
                logits,
                targets,
                dloss,
                shift,
                classes,
            } => {
                let ce = CrossEntropyArgs {
                    logits: *logits,
                    targets: *targets,
                    dloss: Some(*dloss),
                    shift: *shift,
                    classes: classes.as_ref(),
                };
                self.cross_entropy(node, ce, &mut outs)?;
            }
            // The masked tensor's own layout places its elements in the full tensor: a gradient
            // is laid out like its forward value, or is a full-shaped partial sum of it.
            Op::Dropout { x: m, p } | Op::DropoutGrad { dy: m, p, .. } => {
                let scale = if (0.0..1.0).contains(p) {
                    1.0 / (1.0 - p)
                } else {
                    return Err(unsupported(format!(
                        "dropout probability {p} must be in [0, 1)"
                    )));
                };
                if let Op::DropoutGrad { forward, .. } = &node.op {
                    for &c in &ranks {
                        let (f, g) = (self.get(*forward, c)?, self.get(*m, c)?);
                        if f.shape != g.shape {
                            return Err(unsupported(format!(
                                "the gradient {:?} is not shaped like the forward {:?}",
                                g.shape, f.shape
                            )));
                        }
                    }
                }
                for &c in &ranks {
                    let x = self.get(*m, c)?;
                    let out = self.dropout(*m, x, c, *p, scale).map_err(unsupported)?;
                    outs.insert(c, vec![out]);
                }
            }
            op => {
                for &c in &ranks {
                    let local = op.try_map::<&Tensor, Dim, SimError, _, _>(
                        |v| self.get(*v, c),
                        |dim| Ok(dim.clone()),
                    )?;
                    outs.insert(c, eval_op(&local).map_err(eval_err(c))?);
                }
            }
        }
        for (c, results) in &outs {
            if results.len() != node.outputs.len() {
                return Err(unsupported(format!(
                    "{} outputs on rank ({c}), the node has {}",
                    results.len(),
                    node.outputs.len()
                )));
            }
        }
        for c in ranks {
            let results = outs
                .remove(&c)
                .ok_or_else(|| unsupported(format!("rank ({c}) computed nothing")))?;
            for (&v, x) in node.outputs.iter().zip(results) {
                self.store(v, c, x)?;
            }
        }
        let blocks = self.out_blocks(&node.op, &node.outputs);
        for (&v, b) in node.outputs.iter().zip(blocks) {
            self.blocks[v.index()] = b;
        }
        Ok(())
    }

    fn gather_group(&self, v: ValueId, group: &[Coord]) -> Result<Vec<&Tensor>, SimError> {
        group.iter().map(|&c| self.get(v, c)).collect()
    }

    /// The fused-weight blocks of a node's outputs (what `check::node_layouts` derives): a split
    /// of a blocked value into its blocks is contiguous, a concatenation of contiguous shards
    /// along their split axis is blocked, anything else keeps its split inputs' blocks.
    fn out_blocks(&self, op: &Op, outputs: &[ValueId]) -> Vec<u32> {
        let plan = self.plan;
        let ins: Vec<ValueId> = op.inputs().into_iter().copied().collect();
        let rank_of = |v: ValueId| plan.graph.ty(v).shape.rank();
        match op {
            Op::Split {
                x,
                dim: axis,
                sizes,
            } => {
                if let Layout::Split(d) = plan.layouts[*x].tp {
                    let k = sizes.len() as u32;
                    let equal = sizes.iter().all(|s| s.size == sizes[0].size);
                    let along = resolve_axis(rank_of(*x), *axis) == Ok(d);
                    if along && k > 1 && equal && self.blocks[x.index()] == k {
                        return vec![1; outputs.len()];
                    }
                }
            }
            Op::Concat { xs, dim: axis } if xs.len() > 1 => {
                if let Layout::Split(d) = plan.layouts[xs[0]].tp {
                    let along = resolve_axis(rank_of(xs[0]), *axis) == Ok(d);
                    let same = xs.iter().all(|&x| {
                        plan.layouts[x].tp == Layout::Split(d)
                            && self.blocks[x.index()] == 1
                            && plan.graph.ty(x).shape == plan.graph.ty(xs[0]).shape
                    });
                    if along && same {
                        return vec![xs.len() as u32];
                    }
                }
            }
            _ => {}
        }
        let common = ins
            .iter()
            .filter(|&&v| matches!(plan.layouts[v].tp, Layout::Split(_)))
            .map(|&v| self.blocks[v.index()])
            .max()
            .unwrap_or(1);
        outputs
            .iter()
            .map(|&v| match plan.layouts[v].tp {
                Layout::Split(_) => common,
                _ => 1,
            })
            .collect()
    }

    /// What the rank at `c` holds of value `v`, which must be one box of the full tensor.
    fn region(&self, v: ValueId, c: Coord) -> Result<Region, String> {
        let g = &self.plan.graph;
        let layout = self.plan.layouts[v];
        let full: Vec<usize> = self
            .plan
            .mesh
            .global_sizes(&g.ty(v).shape.sizes(), layout)
            .into_iter()
            .map(|s| s as usize)
            .collect();
        let region = Region::of(&full, layout, self.blocks[v.index()], self.plan.mesh, c);
        if !region.is_box() {
            return Err(format!(
                "`{}` is a fused value cut into {} blocks; its elements have no contiguous \
                 place in the full tensor",
                g.values[v].name,
                self.blocks[v.index()]
            ));
        }
        Ok(region)
    }

    /// Where the rank at `c`'s local tensor of value `v` starts in the full tensor, per
    /// dimension.
    fn offsets(&self, v: ValueId, c: Coord) -> Result<Vec<usize>, String> {
        Ok(self.region(v, c)?.offsets())
    }

    /// The full shape of `v`, held locally as `x`.
    fn full_shape(&self, v: ValueId, x: &Tensor) -> Vec<usize> {
        let local: Vec<u64> = x.shape.iter().map(|&s| s as u64).collect();
        self.plan
            .mesh
            .global_sizes(&local, self.plan.layouts[v])
            .into_iter()
            .map(|s| s as usize)
            .collect()
    }

    /// The reference dropout mask applied to a shard (or a partial addend) of `v`.
    fn dropout(
        &self,
        v: ValueId,
        x: &Tensor,
        c: Coord,
        p: f64,
        scale: f64,
    ) -> Result<Tensor, String> {
        let off = self.offsets(v, c)?;
        let full = self.full_shape(v, x);
        let mut out = x.clone();
        let mut idx = vec![0usize; x.rank()];
        for o in out.data.iter_mut() {
            // `idx` is the multi-index of this element.
            let flat = idx
                .iter()
                .zip(&off)
                .zip(&full)
                .fold(0u64, |f, ((&i, &o), &s)| f * s as u64 + (i + o) as u64);
            *o = if dropout_keeps(flat, p) {
                *o * scale
            } else {
                0.0
            };
            for a in (0..idx.len()).rev() {
                idx[a] += 1;
                if idx[a] < x.shape[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        Ok(out)
    }

    /// `CrossEntropy` (no `dloss`) or `CrossEntropyGrad` on every rank.
    fn cross_entropy(
        &self,
        node: &ferrotron_ir::graph::NodeData,
        ce: CrossEntropyArgs,
        outs: &mut HashMap<Coord, Vec<Tensor>>,
    ) -> Result<(), SimError> {
        let CrossEntropyArgs {
            logits,
            targets,
            dloss,
            shift,
            classes,
        } = ce;
        let plan = self.plan;
        let unsupported = |what: String| SimError::Unsupported {
            node: node.name.clone(),
            what,
        };
        let layout = plan.layouts[logits];
        let rank = plan.graph.ty(logits).shape.rank();
        if rank < 2 {
            return Err(unsupported(format!("logits of rank {rank}")));
        }
        let class_axis = rank - 1;
        if layout.dp == Layout::Split(class_axis) {
            return Err(unsupported(
                "logits split along the class axis over data parallelism".into(),
            ));
        }
        let vocab_parallel = layout.tp == Layout::Split(class_axis);
        // Split along another axis, each rank averages its positions over the global count.
        let mut spread = 1u64;
        for (l, size) in [(layout.tp, plan.mesh.tp), (layout.dp, plan.mesh.dp)] {
            if matches!(l, Layout::Split(k) if k != class_axis) {
                spread *= size;
            }
        }
        if !vocab_parallel && spread == 1 {
            // Nothing depends on the rank: the reference op itself.
            for c in self.ranks() {
                let (l, y) = (self.get(logits, c)?, self.get(targets, c)?);
                let op = match dloss {
                    None => Op::CrossEntropy {
                        logits: l,
                        targets: y,
                        shift,
                        classes: classes.cloned(),
                    },
                    Some(dl) => Op::CrossEntropyGrad {
                        logits: l,
                        targets: y,
                        dloss: self.get(dl, c)?,
                        shift,
                        classes: classes.cloned(),
                    },
                };
                let out = eval_op(&op).map_err(|source| SimError::Eval {
                    node: node.name.clone(),
                    t: c.tp as u64,
                    d: c.dp as u64,
                    source,
                })?;
                outs.insert(c, out);
            }
            return Ok(());
        }
        let groups = if vocab_parallel {
            self.groups(MeshAxis::Tp)
        } else {
            self.ranks().into_iter().map(|r| vec![r]).collect()
        };
        for group in groups {
            let c0 = group[0];
            let fail = |msg: String| SimError::Eval {
                node: node.name.clone(),
                t: c0.tp as u64,
                d: c0.dp as u64,
                source: EvalError::Invalid {
                    op: if dloss.is_some() {
                        "CrossEntropyGrad"
                    } else {
                        "CrossEntropy"
                    },
                    msg,
                },
            };
            let ls = self.gather_group(logits, &group)?;
            let ys = self.gather_group(targets, &group)?;
            if ys.iter().any(|y| y.data != ys[0].data) {
                return Err(fail(
                    "the targets differ across the vocabulary-parallel group".into(),
                ));
            }
            let ce = VocabCe::new(&ls, ys[0], shift, classes).map_err(fail)?;
            let count = ce.rows.len() as f64 * spread as f64;
            match dloss {
                None => {
                    let total: f64 = ce
                        .rows
                        .iter()
                        .map(|&(row, target)| ce.lse(row) - ce.logit(row, target))
                        .sum();
                    let loss = Tensor::scalar(total / count);
                    for &r in &group {
                        outs.insert(r, vec![loss.clone()]);
                    }
                }
                Some(dl) => {
                    let dl = self.get(dl, c0)?;
                    if !dl.shape.is_empty() {
                        return Err(fail(format!(
                            "the loss gradient has shape {:?}, expected a scalar",
                            dl.shape
                        )));
                    }
                    let scale = dl.data[0] / count;
                    for (m, &r) in group.iter().enumerate() {
                        outs.insert(r, vec![ce.grad(m, scale)]);
                    }
                }
            }
        }
        Ok(())
    }

    /// Value `v` at full shape from every rank's local tensor, after checking that the copies
    /// of a replicated value agree.
    fn assemble(&self, v: ValueId, blocks: u32) -> Result<Tensor, SimError> {
        let mesh = self.plan.mesh;
        let layout = self.plan.layouts[v];
        let parts = self
            .ranks()
            .into_iter()
            .map(|c| self.get(v, c))
            .collect::<Result<Vec<_>, _>>()?;
        for axis in crate::Mesh::AXES {
            if layout.on(axis) != Layout::Replicated {
                continue;
            }
            for c in self.ranks().into_iter().filter(|c| c.on(axis) != 0) {
                let first = parts[mesh.group(axis, c)[0]];
                let copy = parts[mesh.rank(c)];
                let diff = copy.max_abs_diff(first).unwrap_or(f64::INFINITY);
                if diff > 1e-12 * first.max_abs().max(1.0) {
                    return Err(SimError::Diverged {
                        value: self.plan.graph.values[v].name.clone(),
                        axis: match axis {
                            MeshAxis::Tp => "tp",
                            MeshAxis::Dp => "dp",
                        },
                        diff,
                    });
                }
            }
        }
        let local = self.plan.graph.ty(v).shape.sizes();
        let full: Vec<usize> = mesh
            .global_sizes(&local, layout)
            .into_iter()
            .map(|s| s as usize)
            .collect();
        let data: Vec<&[f64]> = parts.iter().map(|p| p.data.as_slice()).collect();
        let data = mesh::assemble(mesh, layout, blocks, &full, &data);
        Ok(Tensor::new(full, data))
    }
}

/// A cross-entropy node's inputs and attributes (`dloss` for its gradient).
struct CrossEntropyArgs<'a> {
    logits: ValueId,
    targets: ValueId,
    dloss: Option<ValueId>,
    shift: bool,
    classes: Option<&'a Dim>,
}

/// Whether a table is held by rows (vocabulary-parallel) on some axis.
fn split_rows(l: MeshLayout) -> bool {
    l.tp == Layout::Split(0) || l.dp == Layout::Split(0)
}

fn check_parts(group: &[Coord], parts: u64) -> Result<(), String> {
    if group.len() as u64 == parts {
        Ok(())
    } else {
        Err(format!(
            "a collective over {parts} parts in a group of {} ranks",
            group.len()
        ))
    }
}

fn resolve_axis(rank: usize, axis: i64) -> Result<usize, String> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if (0..rank as i64).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

fn one(mut out: Vec<Tensor>) -> Tensor {
    out.swap_remove(0)
}

fn sum(xs: &[&Tensor]) -> Result<Tensor, EvalError> {
    let mut acc = xs[0].clone();
    for x in &xs[1..] {
        if x.shape != acc.shape {
            return Err(EvalError::Invalid {
                op: "AllReduce",
                msg: format!("shards of shapes {:?} and {:?}", acc.shape, x.shape),
            });
        }
        acc = one(eval_op(&Op::Add(&acc, *x))?);
    }
    Ok(acc)
}

fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor, EvalError> {
    Ok(one(eval_op(&Op::Concat {
        xs: xs.to_vec(),
        dim: axis as i64,
    })?))
}

fn slice(x: &Tensor, axis: usize, start: usize, end: usize) -> Result<Tensor, EvalError> {
    Ok(one(eval_op(&Op::Slice {
        x,
        dim: axis as i64,
        start: Dim::new(start as u64),
        end: Dim::new(end as u64),
    })?))
}

/// Part `i` of `parts` equal contiguous parts of `x` along `axis`.
fn own_slice(x: &Tensor, axis: usize, i: usize, parts: usize) -> Result<Tensor, EvalError> {
    let n = x.shape[axis];
    if !n.is_multiple_of(parts) {
        return Err(EvalError::Invalid {
            op: "LocalSlice",
            msg: format!("axis {axis} of {:?} does not divide into {parts}", x.shape),
        });
    }
    let part = mesh::part(n, parts, i);
    slice(x, axis, part.start, part.end)
}

/// `x` zero-padded at the end of each dimension up to `shape`.
fn pad_to(x: &Tensor, shape: &[u64]) -> Tensor {
    let shape: Vec<usize> = shape.iter().map(|&s| s as usize).collect();
    if shape == x.shape {
        return x.clone();
    }
    Tensor::from_fn(shape, |idx| {
        if idx.iter().zip(&x.shape).all(|(i, s)| i < s) {
            x.at(idx)
        } else {
            0.0
        }
    })
}

/// The leading `shape` corner of `x`.
fn crop(x: &Tensor, shape: &[usize]) -> Tensor {
    if shape == x.shape {
        return x.clone();
    }
    Tensor::from_fn(shape.to_vec(), |idx| x.at(idx))
}

/// An id held in an `f64`, checked to be an integer in `0..bound`.
fn id(
    op: &'static str,
    what: &'static str,
    value: f64,
    k: usize,
    bound: usize,
) -> Result<usize, EvalError> {
    if value.fract() == 0.0 && value >= 0.0 && value < bound as f64 {
        Ok(value as usize)
    } else {
        Err(EvalError::Index {
            op,
            what,
            value,
            element: k,
            bound,
        })
    }
}

fn table_shape(op: &'static str, table: &Tensor) -> Result<(usize, usize), EvalError> {
    match table.shape[..] {
        [rows, width] => Ok((rows, width)),
        _ => Err(EvalError::Invalid {
            op,
            msg: format!("the table must be [rows, width], found {:?}", table.shape),
        }),
    }
}

/// Vocabulary-parallel lookup: this rank's rows start at full row `offset`; other ids give zeros.
fn embedding_rows(table: &Tensor, ids: &Tensor, offset: usize) -> Result<Tensor, EvalError> {
    let (rows, width) = table_shape("Embedding", table)?;
    let mut shape = ids.shape.clone();
    shape.push(width);
    let mut out = Tensor::zeros(shape);
    for (k, &v) in ids.data.iter().enumerate() {
        let i = id("Embedding", "id", v, k, usize::MAX)?;
        if (offset..offset + rows).contains(&i) {
            let r = i - offset;
            out.data[k * width..(k + 1) * width]
                .copy_from_slice(&table.data[r * width..(r + 1) * width]);
        }
    }
    Ok(out)
}

/// Vocabulary-parallel table gradient: `dy` rows of this rank's ids scatter-added.
fn embedding_grad_rows(
    table: &Tensor,
    ids: &Tensor,
    dy: &Tensor,
    offset: usize,
) -> Result<Tensor, EvalError> {
    let (rows, width) = table_shape("EmbeddingGrad", table)?;
    let mut expected = ids.shape.clone();
    expected.push(width);
    if dy.shape != expected {
        return Err(EvalError::Invalid {
            op: "EmbeddingGrad",
            msg: format!(
                "the output gradient has shape {:?}, expected {expected:?}",
                dy.shape
            ),
        });
    }
    let mut out = Tensor::zeros(table.shape.clone());
    for (k, &v) in ids.data.iter().enumerate() {
        let i = id("EmbeddingGrad", "id", v, k, usize::MAX)?;
        if (offset..offset + rows).contains(&i) {
            let r = i - offset;
            let src = &dy.data[k * width..(k + 1) * width];
            for (o, g) in out.data[r * width..(r + 1) * width].iter_mut().zip(src) {
                *o += g;
            }
        }
    }
    Ok(out)
}

/// A cross-entropy over logits split along the class axis across a group (one member: whole).
struct VocabCe<'a> {
    /// Each member's logits `[..., seq, local]`.
    logits: Vec<&'a Tensor>,
    /// Classes per member.
    local: usize,
    /// Real classes (the rest is padding).
    classes: usize,
    /// `(row, target)` of every predicting position.
    rows: Vec<(usize, usize)>,
    /// Per row of the logits: the log-sum-exp over the real classes of all members.
    lse: Vec<f64>,
}

impl<'a> VocabCe<'a> {
    fn new(
        logits: &[&'a Tensor],
        targets: &Tensor,
        shift: bool,
        classes: Option<&Dim>,
    ) -> Result<VocabCe<'a>, String> {
        let first = logits[0];
        if logits.iter().any(|l| l.shape != first.shape) {
            return Err("the logits' shards differ in shape".into());
        }
        let r = first.rank();
        if r < 2 || targets.shape[..] != first.shape[..r - 1] {
            return Err(format!(
                "targets {:?} do not fit logits {:?}",
                targets.shape, first.shape
            ));
        }
        let (seq, local) = (first.shape[r - 2], first.shape[r - 1]);
        let total = local * logits.len();
        let classes = classes.map_or(total, |c| c.size as usize);
        if classes == 0 || classes > total {
            return Err(format!("{classes} real classes do not fit {total} columns"));
        }
        let mut rows = Vec::new();
        for row in 0..targets.numel() {
            let at = if shift {
                if row % seq + 1 == seq {
                    continue;
                }
                row + 1
            } else {
                row
            };
            let target = id("CrossEntropy", "target", targets.data[at], at, classes)
                .map_err(|e| e.to_string())?;
            rows.push((row, target));
        }
        if rows.is_empty() {
            return Err("no position predicts a target: no mean".into());
        }
        let mut ce = VocabCe {
            logits: logits.to_vec(),
            local,
            classes,
            rows,
            lse: Vec::new(),
        };
        let n_rows = targets.numel();
        ce.lse = (0..n_rows).map(|row| ce.row_lse(row)).collect();
        Ok(ce)
    }

    /// Member `m`'s real classes of `row`.
    fn real(&self, m: usize, row: usize) -> &'a [f64] {
        let n = self.classes.saturating_sub(m * self.local).min(self.local);
        &self.logits[m].data[row * self.local..row * self.local + n]
    }

    /// Each member's maximum and sum of exponentials, combined: no logit leaves its rank.
    fn row_lse(&self, row: usize) -> f64 {
        let stats: Vec<(f64, f64)> = (0..self.logits.len())
            .map(|m| {
                let r = self.real(m, row);
                let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum = if max == f64::NEG_INFINITY || max.is_nan() {
                    0.0
                } else {
                    r.iter().map(|x| (x - max).exp()).sum::<f64>()
                };
                (max, sum)
            })
            .collect();
        let max = stats.iter().map(|s| s.0).fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY || max.is_nan() {
            return max;
        }
        let sum: f64 = stats
            .iter()
            .filter(|s| s.1 > 0.0)
            .map(|&(m, s)| s * (m - max).exp())
            .sum();
        max + sum.ln()
    }

    fn lse(&self, row: usize) -> f64 {
        self.lse[row]
    }

    /// The target's logit, from the member that holds its class.
    fn logit(&self, row: usize, target: usize) -> f64 {
        let (m, j) = (target / self.local, target % self.local);
        self.logits[m].data[row * self.local + j]
    }

    /// Member `m`'s gradient of the logits, `scale · (softmax − onehot)` on predicting rows and
    /// real classes, zero elsewhere.
    fn grad(&self, m: usize, scale: f64) -> Tensor {
        let mut out = Tensor::zeros(self.logits[m].shape.clone());
        let base = m * self.local;
        for &(row, target) in &self.rows {
            let lse = self.lse(row);
            let r = self.real(m, row);
            let g = &mut out.data[row * self.local..row * self.local + r.len()];
            for (j, (g, &l)) in g.iter_mut().zip(r).enumerate() {
                let hit = if base + j == target { 1.0 } else { 0.0 };
                *g = scale * ((l - lse).exp() - hit);
            }
        }
        out
    }
}
