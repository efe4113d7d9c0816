//! The rank program: what one rank of a job runs, whether it is a thread of this process (the
//! in-process launcher, [`crate::launch`]) or a process of its own (`ferrotron launch`).
//!
//! ```text
//! Rank { mesh, coord, backend, groups: one Comm per mesh axis }
//!   run(Executable, its weight shards, the full batch):
//!     its shards of the batch (the mesh's regions) ─► every step in program order:
//!       a kernel (Backend::eval / eval_fused), or a collective over its tp or dp group
//!       (Comm), or a rank-dependent op (vocabulary-parallel embedding and cross-entropy,
//!       dropout masks of the full tensor, placed by the mesh's regions)
//!     ─► RankResult: the values kept, peak bytes, times, trace
//! ```
//!
//! Tensors are freed after their last use, and the rank's live bytes are tracked, so the
//! measured peak can be set beside the partitioner's estimate. If the rank fails (an error or a
//! panic), it aborts every group it belongs to: its peers stop at their next collective with
//! that error instead of waiting forever.

use crate::backend::Backend;
use crate::comm::{Comm, CommError, ReduceOp};
use crate::error::ExecError;
use crate::fuse::{Fused, StepOp};
use crate::kernel::{ce_loss, KernelError, Placement, RowStats, VocabShard};
use crate::program::Executable;
use crate::Tensor;
use ferrotron_ir::graph::EntityRef;
use ferrotron_ir::{Dim, MeshAxis, NodeId, Op, ValueId};
use ferrotron_partitioner::{Coord, Layout, Mesh, MeshLayout, Region};
use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A rank's groups, one per mesh axis.
#[derive(Debug)]
pub struct Groups<C> {
    /// The tensor-parallel group.
    pub tp: C,
    /// The data-parallel group.
    pub dp: C,
}

impl<C> Groups<C> {
    /// The group along `axis`.
    pub fn on(&self, axis: MeshAxis) -> &C {
        match axis {
            MeshAxis::Tp => &self.tp,
            MeshAxis::Dp => &self.dp,
        }
    }
}

/// One rank of a job: where it sits in the mesh, the device it computes on, and its groups.
pub struct Rank<B: Backend> {
    /// The job's mesh.
    pub mesh: Mesh,
    /// This rank's coordinates.
    pub coord: Coord,
    /// The device this rank computes on (its own view: [`Backend::on_rank`]).
    pub backend: B,
    /// Its groups, each member index its coordinate along that axis.
    pub groups: Groups<B::Comm>,
}

/// One rank's results.
#[derive(Clone, Debug)]
pub struct RankResult<T = Tensor> {
    /// The values kept, by value.
    pub values: HashMap<ValueId, T>,
    /// The most bytes of tensors alive at once (weights and inputs included).
    pub peak_bytes: usize,
    /// Time spent in the forward and the backward part.
    pub forward: Duration,
    /// See `forward`.
    pub backward: Duration,
    /// With `trace`: each step run, in order.
    pub events: Vec<TraceEvent>,
}

/// One step of a traced run.
#[derive(Clone, Copy, Debug)]
pub struct TraceEvent {
    /// The node it ran as (a fused step: the node whose outputs it produced).
    pub node: NodeId,
    /// What ran: the node's op, or the fused op (`BiasAct`, `ScaledSoftmax`, ...).
    pub op: &'static str,
    /// When it started, from the rank's start.
    pub start: Duration,
    /// How long it took.
    pub took: Duration,
}

impl<B: Backend> Rank<B> {
    /// The rank at `coord` of `mesh`, checking that its groups match the mesh.
    pub fn new(
        mesh: Mesh,
        coord: Coord,
        backend: B,
        groups: Groups<B::Comm>,
    ) -> Result<Rank<B>, ExecError> {
        for axis in Mesh::AXES {
            let g = groups.on(axis);
            if g.size() != mesh.size(axis) as usize || g.index() != coord.on(axis) {
                return Err(ExecError::Plan(format!(
                    "rank ({coord}) given a {axis:?} group where it is member {} of {}, for a \
                     {} × {} mesh",
                    g.index(),
                    g.size(),
                    mesh.tp,
                    mesh.dp
                )));
            }
        }
        Ok(Rank {
            mesh,
            coord,
            backend,
            groups,
        })
    }

    /// The rank's number in the job.
    pub fn index(&self) -> usize {
        self.mesh.rank(self.coord)
    }

    /// Fails every group this rank belongs to, so its peers stop.
    pub fn abort(&self, why: &str) {
        self.groups.tp.abort(why);
        self.groups.dp.abort(why);
    }

    /// Runs `f` as this rank's part of the job: an error, or a panic (which becomes
    /// [`ExecError::Panic`]), aborts the rank's groups so its peers stop instead of waiting.
    pub fn guard<R>(&self, f: impl FnOnce() -> Result<R, ExecError>) -> Result<R, ExecError> {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(ExecError::Panic {
                    at: self.coord,
                    why,
                })
            });
        if let Err(e) = &outcome {
            self.abort(&e.to_string());
        }
        outcome
    }

    /// Runs one step of `exe` on this rank: forward and backward (or forward only) on its weight
    /// shards (`weights`, in the plan's parameter order, on this rank's device) and its shard of
    /// the full batch `batch`. The other ranks of the job run the same call at the same time.
    pub fn run(
        &self,
        exe: &Executable,
        weights: &[B::Tensor],
        batch: &HashMap<String, Tensor>,
    ) -> Result<RankResult<B::Tensor>, ExecError> {
        self.guard(|| {
            let plan = exe.plan;
            if plan.mesh != self.mesh || weights.len() != plan.graph.params.len() {
                return Err(ExecError::Plan(format!(
                    "rank ({}) of a {} × {} mesh with {} weights, for a {} × {} plan of {} \
                     parameters",
                    self.coord,
                    self.mesh.tp,
                    self.mesh.dp,
                    weights.len(),
                    plan.mesh.tp,
                    plan.mesh.dp,
                    plan.graph.params.len()
                )));
            }
            let feed = shard_inputs(exe, batch, self.coord)?;
            Runner { rank: self, exe }.run(weights, feed)
        })
    }

    /// Sums a host scalar over this rank's group along `axis` (a loss addend, a norm).
    pub fn sum_over(&self, axis: MeshAxis, x: &mut [f32], what: &str) -> Result<(), ExecError> {
        self.groups
            .on(axis)
            .all_reduce_host(x, ReduceOp::Sum)
            .map_err(|error| ExecError::Comm {
                at: self.coord,
                node: what.to_owned(),
                error,
            })
    }
}

/// What the rank at `c` holds of every graph input of a full batch.
fn shard_inputs(
    exe: &Executable,
    batch: &HashMap<String, Tensor>,
    c: Coord,
) -> Result<Vec<(ValueId, Tensor)>, ExecError> {
    let plan = exe.plan;
    let g = &plan.graph;
    let mut feed = Vec::with_capacity(g.inputs.len());
    for &v in &g.inputs {
        let name = &g.values[v].name;
        let full = batch.get(name).ok_or_else(|| ExecError::Feed {
            what: "input",
            name: name.clone(),
            problem: "missing".into(),
        })?;
        let layout = plan.layouts[v];
        let full_shape = full_shape(plan.mesh, &g.ty(v).shape.sizes(), layout);
        if full.shape != full_shape || full.data.len() != full_shape.iter().product::<usize>() {
            return Err(ExecError::Feed {
                what: "input",
                name: name.clone(),
                problem: format!(
                    "has shape {:?}, the model says {:?}",
                    full.shape, full_shape
                ),
            });
        }
        let region = Region::of(&full_shape, layout, exe.blocks[v].max(1), plan.mesh, c);
        feed.push((v, full.take(&region)));
    }
    Ok(feed)
}

/// The full shape of a value held locally as `local` under `layout`.
fn full_shape(mesh: Mesh, local: &[u64], layout: MeshLayout) -> Vec<usize> {
    mesh.global_sizes(local, layout)
        .into_iter()
        .map(|s| s as usize)
        .collect()
}

/// One run of the program on one rank.
struct Runner<'a, B: Backend> {
    rank: &'a Rank<B>,
    exe: &'a Executable<'a>,
}

/// The vocabulary-parallel cross-entropy's statistics on this rank, reduced over the group.
struct VocabStats {
    stats: RowStats,
    shard: VocabShard,
}

impl<B: Backend> Runner<'_, B> {
    fn run<'w>(
        &self,
        weights: &'w [B::Tensor],
        feed: Vec<(ValueId, Tensor)>,
    ) -> Result<RankResult<B::Tensor>, ExecError> {
        let exe = self.exe;
        let g = &exe.plan.graph;
        let be = &self.rank.backend;
        let mut values: Vec<Option<Cow<'w, B::Tensor>>> = vec![None; g.values.len()];
        let mut live = 0usize;
        let mut peak = 0usize;
        for (p, data) in g.params.iter() {
            let x = &weights[p.index()];
            if be
                .shape(x)
                .iter()
                .map(|&s| s as u64)
                .ne(g.ty(data.value).shape.sizes())
            {
                return Err(ExecError::Feed {
                    what: "parameter shard",
                    name: data.name.clone(),
                    problem: format!(
                        "has shape {:?}, the plan says {}",
                        be.shape(x),
                        g.ty(data.value).shape
                    ),
                });
            }
            live += be.bytes(x);
            values[data.value.index()] = Some(Cow::Borrowed(x));
        }
        for (v, x) in feed {
            let x = be.upload(&x, g.ty(v).dtype).map_err(|e| ExecError::Feed {
                what: "input",
                name: g.values[v].name.clone(),
                problem: e.to_string(),
            })?;
            live += be.bytes(&x);
            values[v.index()] = Some(Cow::Owned(x));
        }
        peak = peak.max(live);
        let start = Instant::now();
        let mut forward = Duration::ZERO;
        let mut events = Vec::new();
        let steps = &exe.program.steps;
        let end = if exe.opts.forward_only {
            exe.program.backward_start
        } else {
            steps.len()
        };
        // A device runs behind the host: times are taken once its queued work is done.
        let fence = |at: &str| {
            be.synchronize()
                .map_err(|e| ExecError::Plan(format!("waiting for the device {at}: {e}")))
        };
        for (i, step) in steps[..end].iter().enumerate() {
            if i == exe.program.backward_start {
                fence("after the forward pass")?;
                forward = start.elapsed();
            }
            let n = step.node;
            let node = &g.nodes[n];
            let began = start.elapsed();
            let outs = match &step.op {
                StepOp::Fused { op, .. } => vec![self.fused(n, op, &values)?],
                StepOp::Node => match self.in_place(n, i, &mut values) {
                    Some(x) => {
                        let x = x?;
                        live -= be.bytes(&x); // the input's buffer, counted again as the output
                        vec![x]
                    }
                    None => self.node(n, &values)?,
                },
            };
            if exe.opts.trace {
                fence("for the trace")?;
                events.push(TraceEvent {
                    node: n,
                    op: match &step.op {
                        StepOp::Node => node.op.mnemonic(),
                        StepOp::Fused { op, .. } => op.mnemonic(),
                    },
                    start: began,
                    took: start.elapsed() - began,
                });
            }
            if exe.opts.check_finite {
                if let Some(bad) = outs.iter().find_map(|x| be.first_non_finite(x)) {
                    return Err(ExecError::NonFinite {
                        at: self.rank.coord,
                        node: node.name.clone(),
                        value: bad,
                    });
                }
            }
            for (&v, x) in node.outputs.iter().zip(outs) {
                let want = g.ty(v).shape.sizes();
                if be
                    .shape(&x)
                    .iter()
                    .map(|&s| s as u64)
                    .ne(want.iter().copied())
                {
                    return Err(self.plan_error(
                        n,
                        format!("produced {:?}, the plan says {:?}", be.shape(&x), want),
                    ));
                }
                live += be.bytes(&x);
                values[v.index()] = Some(Cow::Owned(x));
            }
            peak = peak.max(live);
            // Free what no later step reads (unless it is kept). A weight stays resident (the
            // caller holds it): dropping the borrow frees nothing.
            for v in step.inputs(exe.plan) {
                if exe.last_use[v] == i && !exe.keep[v] {
                    if let Some(Cow::Owned(x)) = values[v.index()].take() {
                        live -= be.bytes(&x);
                    }
                }
            }
            for &v in &node.outputs {
                if exe.last_use[v] <= i && !exe.keep[v] && !exe.is_read_after(v, i) {
                    if let Some(Cow::Owned(x)) = values[v.index()].take() {
                        live -= be.bytes(&x);
                    }
                }
            }
        }
        fence("at the end of the step")?;
        let total = start.elapsed();
        if end <= exe.program.backward_start {
            forward = total;
        }
        let kept = values
            .into_iter()
            .enumerate()
            .filter_map(|(i, x)| {
                let v = ValueId::new(i);
                (exe.keep[v])
                    .then_some(x.map(|x| (v, x.into_owned())))
                    .flatten()
            })
            .collect();
        Ok(RankResult {
            values: kept,
            peak_bytes: peak,
            forward,
            backward: total - forward,
            events,
        })
    }

    /// Ops that only relabel or reduce their single input — a reshape, f, g, an all-reduce —
    /// reuse its buffer when this node is its last reader, instead of copying it. `None` when the
    /// node is not one of them or its input is still needed.
    fn in_place(
        &self,
        n: NodeId,
        i: usize,
        values: &mut [Option<Cow<B::Tensor>>],
    ) -> Option<Result<B::Tensor, ExecError>> {
        let be = &self.rank.backend;
        let exe = self.exe;
        let g = &exe.plan.graph;
        let node = &g.nodes[n];
        let x = match &node.op {
            Op::Reshape { x, .. } | Op::F { x, .. } | Op::G { x, .. } | Op::AllReduce { x, .. } => {
                *x
            }
            _ => return None,
        };
        let owned = matches!(values[x.index()], Some(Cow::Owned(_)));
        if exe.last_use[x] != i || exe.keep[x] || !owned {
            return None;
        }
        let Some(Cow::Owned(mut t)) = values[x.index()].take() else {
            return None;
        };
        Some(match &node.op {
            Op::Reshape { .. } => {
                let shape: Vec<usize> = g
                    .ty(node.outputs[0])
                    .shape
                    .sizes()
                    .iter()
                    .map(|&s| s as usize)
                    .collect();
                if shape.iter().product::<usize>() == be.shape(&t).iter().product::<usize>() {
                    Ok(be.reshape(t, shape))
                } else {
                    Err(self.plan_error(n, "a reshape that changes the element count".into()))
                }
            }
            Op::G { axis, .. } | Op::AllReduce { axis, .. } => self
                .group(*axis)
                .all_reduce(&mut t, ReduceOp::Sum)
                .map(|()| t)
                .map_err(|e| self.comm_error(n, e)),
            _ => Ok(t),
        })
    }

    fn plan_error(&self, n: NodeId, what: String) -> ExecError {
        ExecError::Plan(format!(
            "rank ({}), node `{}`: {what}",
            self.rank.coord, self.exe.plan.graph.nodes[n].name
        ))
    }

    fn kernel_error(&self, n: NodeId, error: KernelError) -> ExecError {
        ExecError::Kernel {
            at: self.rank.coord,
            node: self.exe.plan.graph.nodes[n].name.clone(),
            error,
        }
    }

    fn comm_error(&self, n: NodeId, error: CommError) -> ExecError {
        ExecError::Comm {
            at: self.rank.coord,
            node: self.exe.plan.graph.nodes[n].name.clone(),
            error,
        }
    }

    fn group(&self, axis: MeshAxis) -> &B::Comm {
        self.rank.groups.on(axis)
    }

    fn layout(&self, v: ValueId) -> MeshLayout {
        self.exe.plan.layouts[v]
    }

    /// What this rank holds of value `v`, in the full tensor's indices.
    fn region(&self, v: ValueId) -> Region {
        let plan = self.exe.plan;
        let full = full_shape(plan.mesh, &plan.graph.ty(v).shape.sizes(), self.layout(v));
        Region::of(
            &full,
            self.layout(v),
            self.exe.blocks[v].max(1),
            plan.mesh,
            self.rank.coord,
        )
    }

    /// Runs one node on this rank.
    fn node(
        &self,
        n: NodeId,
        values: &[Option<Cow<B::Tensor>>],
    ) -> Result<Vec<B::Tensor>, ExecError> {
        let g = &self.exe.plan.graph;
        let be = &self.rank.backend;
        let node = &g.nodes[n];
        let get = |v: &ValueId| -> Result<&B::Tensor, ExecError> {
            values[v.index()].as_deref().ok_or_else(|| {
                self.plan_error(n, format!("`{}` is not available", g.values[*v].name))
            })
        };
        let dim_of = |x: &B::Tensor, dim: i64| -> Result<usize, ExecError> {
            let r = be.shape(x).len() as i64;
            let a = if dim < 0 { dim + r } else { dim };
            (0..r)
                .contains(&a)
                .then_some(a as usize)
                .ok_or_else(|| self.plan_error(n, format!("dimension {dim} out of range")))
        };
        match &node.op {
            Op::F { x, .. } => Ok(vec![get(x)?.clone()]),
            Op::G { x, axis } | Op::AllReduce { x, axis } => {
                let mut out = get(x)?.clone();
                self.group(*axis)
                    .all_reduce(&mut out, ReduceOp::Sum)
                    .map_err(|e| self.comm_error(n, e))?;
                Ok(vec![out])
            }
            Op::AllGather { x, dim, axis, .. } => {
                let x = get(x)?;
                let dim = dim_of(x, *dim)?;
                let out = self
                    .group(*axis)
                    .all_gather(x, dim)
                    .map_err(|e| self.comm_error(n, e))?;
                Ok(vec![out])
            }
            Op::ReduceScatter { x, dim, axis, .. } => {
                let x = get(x)?;
                let dim = dim_of(x, *dim)?;
                let group = self.group(*axis);
                if be.shape(x)[dim] % group.size() != 0 {
                    return Err(
                        self.plan_error(n, "the scattered dimension does not divide".into())
                    );
                }
                let out = group
                    .reduce_scatter(x, dim)
                    .map_err(|e| self.comm_error(n, e))?;
                Ok(vec![out])
            }
            Op::LocalSlice {
                x,
                dim,
                axis,
                parts,
            } => {
                let x = get(x)?;
                let dim = dim_of(x, *dim)?;
                let parts = *parts as usize;
                if be.shape(x)[dim] % parts != 0 {
                    return Err(self.plan_error(n, "the sliced dimension does not divide".into()));
                }
                let part = be
                    .local_slice(x, dim, self.rank.coord.on(*axis), parts)
                    .map_err(|e| self.kernel_error(n, e))?;
                Ok(vec![part])
            }
            Op::CrossEntropy {
                logits,
                targets,
                shift,
                classes,
            } if self.vocab_parallel(*logits) => {
                let ce = self.vocab_ce(n, *logits, get(logits)?, get(targets)?, *shift, classes)?;
                let loss = ce_loss(
                    &ce.stats,
                    be.shape(get(logits)?),
                    *shift,
                    ce.shard.token_parts,
                )
                .map_err(|e| self.kernel_error(n, e))?;
                Ok(vec![be
                    .scalar(loss)
                    .map_err(|e| self.kernel_error(n, e))?])
            }
            Op::CrossEntropyGrad {
                logits,
                targets,
                dloss,
                shift,
                classes,
            } if self.vocab_parallel(*logits) => {
                let x = get(logits)?;
                let ce = self.vocab_ce(n, *logits, x, get(targets)?, *shift, classes)?;
                let dl = be
                    .read_scalar(get(dloss)?)
                    .map_err(|e| self.kernel_error(n, e))?;
                let grad = be
                    .ce_grad(x, get(targets)?, &ce.stats, &ce.shard, dl)
                    .map_err(|e| self.kernel_error(n, e))?;
                Ok(vec![grad])
            }
            op => {
                let at = self.placement(op)?;
                let mapped =
                    op.try_map::<&B::Tensor, Dim, ExecError, _, _>(get, |d| Ok(d.clone()))?;
                be.eval(&mapped, &at).map_err(|e| self.kernel_error(n, e))
            }
        }
    }

    /// Runs a fused step (its node's outputs, computed by the fused op).
    fn fused(
        &self,
        n: NodeId,
        op: &Fused<ValueId>,
        values: &[Option<Cow<B::Tensor>>],
    ) -> Result<B::Tensor, ExecError> {
        let g = &self.exe.plan.graph;
        let mapped = op.try_map(|v| {
            values[v.index()].as_deref().ok_or_else(|| {
                self.plan_error(n, format!("`{}` is not available", g.values[*v].name))
            })
        })?;
        self.rank
            .backend
            .eval_fused(&mapped)
            .map_err(|e| self.kernel_error(n, e))
    }

    /// Whether a cross-entropy's logits are split over the classes (vocabulary-parallel).
    fn vocab_parallel(&self, logits: ValueId) -> bool {
        let rank = self.exe.plan.graph.ty(logits).shape.rank();
        self.layout(logits).tp == Layout::Split(rank - 1) && self.exe.plan.mesh.tp > 1
    }

    /// How many equal token shards a cross-entropy's mean spans.
    fn token_parts(&self, logits: ValueId) -> usize {
        match self.layout(logits).dp {
            Layout::Split(_) => self.exe.plan.mesh.dp as usize,
            _ => 1,
        }
    }

    /// Where this rank's tensors sit in the full ones, for the op's kernel.
    fn placement(&self, op: &Op) -> Result<Placement, ExecError> {
        let mut at = Placement {
            dropout_seed: self.exe.opts.dropout_seed,
            token_parts: 1,
            ..Placement::default()
        };
        match op {
            Op::Embedding { table, .. } | Op::EmbeddingGrad { table, .. }
                if self.layout(*table).tp == Layout::Split(0) =>
            {
                let region = self.region(*table);
                at.vocab_offset = region.dim(0).first().map_or(0, |r| r.start);
                at.vocab_rows = Some(
                    full_shape(
                        self.exe.plan.mesh,
                        &self.exe.plan.graph.ty(*table).shape.sizes(),
                        self.layout(*table),
                    )[0],
                );
            }
            Op::Dropout { x, .. } => self.place(*x, &mut at)?,
            Op::DropoutGrad { forward, .. } => self.place(*forward, &mut at)?,
            Op::CrossEntropy { logits, .. } | Op::CrossEntropyGrad { logits, .. } => {
                at.token_parts = self.token_parts(*logits);
            }
            _ => {}
        }
        Ok(at)
    }

    /// Where this rank's shard of `v` sits in the full tensor (for dropout masks).
    fn place(&self, v: ValueId, at: &mut Placement) -> Result<(), ExecError> {
        let region = self.region(v);
        if !region.is_box() {
            return Err(ExecError::Plan(format!(
                "dropout on `{}`, a fused value cut into blocks",
                self.exe.plan.graph.values[v].name
            )));
        }
        let plan = self.exe.plan;
        at.full_shape = Some(full_shape(
            plan.mesh,
            &plan.graph.ty(v).shape.sizes(),
            self.layout(v),
        ));
        at.offsets = Some(region.offsets());
        Ok(())
    }

    /// The vocabulary-parallel cross-entropy's per-row statistics, reduced over the tp group.
    fn vocab_ce(
        &self,
        n: NodeId,
        v: ValueId,
        logits: &B::Tensor,
        targets: &B::Tensor,
        shift: bool,
        classes: &Option<Dim>,
    ) -> Result<VocabStats, ExecError> {
        let be = &self.rank.backend;
        let plan = self.exe.plan;
        let region = self.region(v);
        let last = region.rank() - 1;
        let full = full_shape(plan.mesh, &plan.graph.ty(v).shape.sizes(), self.layout(v))[last];
        let shard = VocabShard {
            class_offset: region.dim(last).first().map_or(0, |r| r.start),
            real_classes: classes.as_ref().map_or(full, |c| c.size as usize),
            shift,
            token_parts: self.token_parts(v),
        };
        let tp = self.group(MeshAxis::Tp);
        let mut max = be
            .ce_row_max(logits, &shard)
            .map_err(|e| self.kernel_error(n, e))?;
        tp.all_reduce_host(&mut max, ReduceOp::Max)
            .map_err(|e| self.comm_error(n, e))?;
        let (sum, target) = be
            .ce_row_sums(logits, &max, targets, &shard)
            .map_err(|e| self.kernel_error(n, e))?;
        let rows = sum.len();
        let mut both = sum;
        both.extend_from_slice(&target);
        tp.all_reduce_host(&mut both, ReduceOp::Sum)
            .map_err(|e| self.comm_error(n, e))?;
        let target = both.split_off(rows);
        Ok(VocabStats {
            stats: RowStats {
                max,
                sum: both,
                target,
            },
            shard,
        })
    }
}
