//! The executor: runs a plan's SPMD graph on `tp × dp` ranks, one thread each.
//!
//! ```text
//! full weights + batch ─► each rank takes its shards (ParamShard ranges, batch slice)
//!   ─► every node in program order: a kernel (cpu::kernels), or a collective over the rank's
//!      tp or dp group (comm), or a rank-dependent op (vocabulary-parallel embedding and
//!      cross-entropy, dropout masks of the full tensor)
//!   ─► the values asked for, per rank; `gather` puts them back to full shape
//! ```
//!
//! Tensors are freed after their last use, and each rank's live bytes are tracked, so the
//! measured peak can be set beside the partitioner's estimate. If any rank fails (an error or a
//! panic), it aborts every group it belongs to: the others stop at their next collective with
//! that error instead of waiting forever.

use crate::backend::{Backend, Cpu};
use crate::comm::{CommError, ReduceOp};
use crate::cpu::kernels::{self, KernelError, Local};
use crate::fuse::{Fused, Program, StepOp};
use crate::Tensor;
use ferrotron_ir::graph::{EntityRef, SecondaryMap};
use ferrotron_ir::{Dim, MeshAxis, NodeId, Op, ValueDef, ValueId};
use ferrotron_partitioner::{value_blocks, Layout, MeshLayout, Plan};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why a run failed.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum ExecError {
    /// A full weight or input is missing or has the wrong shape.
    #[error("{what} `{name}`: {problem}")]
    Feed {
        /// `parameter` or `input`.
        what: &'static str,
        /// Its name.
        name: String,
        /// What is wrong (with both shapes).
        problem: String,
    },
    /// A kernel failed on a node.
    #[error("rank (tp {t}, dp {d}), node `{node}`: {error}")]
    Kernel {
        /// Tensor-parallel index.
        t: usize,
        /// Data-parallel index.
        d: usize,
        /// The node.
        node: String,
        /// What the kernel said.
        error: KernelError,
    },
    /// A collective failed (another rank failed, or they disagree).
    #[error("rank (tp {t}, dp {d}), node `{node}`: {error}")]
    Comm {
        /// Tensor-parallel index.
        t: usize,
        /// Data-parallel index.
        d: usize,
        /// The node.
        node: String,
        /// What the communicator said.
        error: CommError,
    },
    /// The plan cannot be run as it is.
    #[error("{0}")]
    Plan(String),
    /// A node produced a NaN or an infinity (with `check_finite`).
    #[error("rank (tp {t}, dp {d}): node `{node}` produced {value} (the first non-finite value)")]
    NonFinite {
        /// Tensor-parallel index.
        t: usize,
        /// Data-parallel index.
        d: usize,
        /// The node.
        node: String,
        /// The value.
        value: f32,
    },
    /// A rank's thread panicked.
    #[error("rank (tp {t}, dp {d}) panicked: {why}")]
    Panic {
        /// Tensor-parallel index.
        t: usize,
        /// Data-parallel index.
        d: usize,
        /// The panic message.
        why: String,
    },
}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Threads each rank's matmuls may use.
    pub threads_per_rank: usize,
    /// The longest any rank waits for the others at a collective.
    pub timeout: Duration,
    /// Dropout masks differ per seed (0 gives the reference evaluator's masks).
    pub dropout_seed: u64,
    /// Keep every value (to find where two runs diverge), not only those asked for.
    pub keep_all: bool,
    /// Run only the forward part (inference: the loss and the outputs, no gradients).
    pub forward_only: bool,
    /// Fail at the first node that produces a NaN or an infinity, naming it.
    pub check_finite: bool,
    /// Record every node's start and duration on every rank (see [`Run::trace_json`]).
    pub trace: bool,
    /// Run fusable op pairs (bias + activation, scale + softmax) as one kernel each
    /// ([`crate::fuse`]). Off with `keep_all`, which must see every intermediate value.
    pub fuse: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            threads_per_rank: 1,
            timeout: Duration::from_secs(60),
            dropout_seed: 0,
            keep_all: false,
            forward_only: false,
            check_finite: false,
            trace: false,
            fuse: true,
        }
    }
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

/// A finished run: every rank's results, indexed `t + tp · d`.
#[derive(Clone, Debug)]
pub struct Run<'p, B: Backend = Cpu> {
    /// The plan that ran.
    pub plan: &'p Plan,
    /// Each rank's results.
    pub ranks: Vec<RankResult<B::Tensor>>,
    blocks: SecondaryMap<ValueId, u32>,
    backend: B,
}

/// Runs `plan` on full weights (`params`, model shapes, by name) and a full batch (`inputs`, by
/// name), keeping the loss, the graph outputs and the gradients (and everything with
/// `keep_all`).
pub fn run<'p>(
    plan: &'p Plan,
    params: &HashMap<String, Tensor>,
    inputs: &HashMap<String, Tensor>,
    opts: &RunOptions,
) -> Result<Run<'p>, ExecError> {
    run_sharded(plan, &shard_params(plan, params)?, inputs, opts)
}

/// Runs `plan` on weights already sharded (`params[rank][param]`, as [`shard_params`] makes
/// them; a trainer keeps them so between steps) and a full batch.
pub fn run_sharded<'p>(
    plan: &'p Plan,
    params: &[Vec<Tensor>],
    inputs: &HashMap<String, Tensor>,
    opts: &RunOptions,
) -> Result<Run<'p>, ExecError> {
    run_on(Cpu, plan, params, inputs, opts)
}

/// Runs `plan` on `backend` from full host weights (model shapes, by name) and a full batch:
/// shards the weights and uploads each rank's through the rank's own backend
/// ([`Backend::on_rank`]), then runs as [`run_on`].
pub fn run_with<'p, B: Backend>(
    backend: B,
    plan: &'p Plan,
    params: &HashMap<String, Tensor>,
    inputs: &HashMap<String, Tensor>,
    opts: &RunOptions,
) -> Result<Run<'p, B>, ExecError> {
    let shards = shard_params(plan, params)?;
    let on_device = upload_params(&backend, plan, &shards)?;
    run_on(backend, plan, &on_device, inputs, opts)
}

/// Copies every rank's weight shards to the device, each through its rank's backend.
pub fn upload_params<B: Backend>(
    backend: &B,
    plan: &Plan,
    shards: &[Vec<Tensor>],
) -> Result<Vec<Vec<B::Tensor>>, ExecError> {
    shards
        .iter()
        .enumerate()
        .map(|(i, rank)| {
            let be = backend.on_rank(i);
            rank.iter()
                .zip(plan.graph.params.values())
                .map(|(t, data)| {
                    be.upload(t, plan.graph.ty(data.value).dtype)
                        .map_err(|e| ExecError::Feed {
                            what: "parameter",
                            name: data.name.clone(),
                            problem: format!("could not be copied to the device: {e}"),
                        })
                })
                .collect()
        })
        .collect()
}

/// Runs `plan` on `backend`, with weights already sharded and on the device
/// (`params[rank][param]`) and a full host batch (each rank uploads its slice).
pub fn run_on<'p, B: Backend>(
    backend: B,
    plan: &'p Plan,
    params: &[Vec<B::Tensor>],
    inputs: &HashMap<String, Tensor>,
    opts: &RunOptions,
) -> Result<Run<'p, B>, ExecError> {
    let blocks = value_blocks(plan).map_err(|e| ExecError::Plan(e.to_string()))?;
    let (tp, dp) = (plan.mesh.tp as usize, plan.mesh.dp as usize);
    if params.len() != tp * dp || params.iter().any(|p| p.len() != plan.graph.params.len()) {
        return Err(ExecError::Plan(format!(
            "{} ranks of weights given for a {tp} × {dp} mesh",
            params.len()
        )));
    }
    let shards = shard_inputs(plan, inputs, &blocks)?;
    let keep = kept_values(plan, opts.keep_all);
    let program = program(plan, &keep, opts);
    let last_use = last_uses(plan, &program);
    let tp_groups: Vec<Arc<B::Group>> = (0..dp).map(|_| backend.group(tp, opts.timeout)).collect();
    let dp_groups: Vec<Arc<B::Group>> = (0..tp).map(|_| backend.group(dp, opts.timeout)).collect();

    // Each rank computes with its own view of the device (the CUDA backend: its own stream).
    let rank_backends: Vec<B> = (0..tp * dp).map(|i| backend.on_rank(i)).collect();
    let mut results: Vec<Option<Result<RankResult<B::Tensor>, ExecError>>> =
        (0..tp * dp).map(|_| None).collect();
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (i, feed) in shards.into_iter().enumerate() {
            let (t, d) = (i % tp, i / tp);
            let weights = &params[i];
            let rank = Rank {
                backend: &rank_backends[i],
                plan,
                t,
                d,
                tp_group: tp_groups[d].clone(),
                dp_group: dp_groups[t].clone(),
                program: &program,
                blocks: &blocks,
                keep: &keep,
                last_use: &last_use,
                opts,
            };
            handles.push(scope.spawn(move || {
                let groups = (rank.tp_group.clone(), rank.dp_group.clone());
                let rank_backend = rank.backend;
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rank.run(weights, feed)
                }))
                .unwrap_or_else(|panic| {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(ExecError::Panic { t, d, why })
                });
                if let Err(e) = &outcome {
                    rank_backend.abort(&groups.0, t, &e.to_string());
                    rank_backend.abort(&groups.1, d, &e.to_string());
                }
                outcome
            }));
        }
        for (i, h) in handles.into_iter().enumerate() {
            results[i] = Some(h.join().unwrap_or_else(|_| {
                Err(ExecError::Plan("a rank thread could not be joined".into()))
            }));
        }
    });
    // Report the failure that started it, not the peers that stopped because of it.
    let mut ranks = Vec::with_capacity(tp * dp);
    let mut first_peer_error = None;
    let mut root_error = None;
    for r in results.into_iter().flatten() {
        match r {
            Ok(r) => ranks.push(r),
            Err(e @ ExecError::Comm { .. }) => {
                first_peer_error.get_or_insert(e);
            }
            Err(e) => {
                root_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = root_error.or(first_peer_error) {
        return Err(e);
    }
    Ok(Run {
        plan,
        ranks,
        blocks,
        backend,
    })
}

/// Runs one rank of `plan` in this process: rank `index` (`t + tp · d`) with its own weight
/// shards on the device and its tensor- and data-parallel groups already formed (across
/// processes: `ferrotron launch` gives each process one rank). The other ranks run the same call
/// in their processes. On failure the groups are aborted so the peers stop too.
#[allow(clippy::too_many_arguments)] // a rank's whole context
pub fn run_rank<B: Backend>(
    backend: &B,
    plan: &Plan,
    index: usize,
    weights: &[B::Tensor],
    inputs: &HashMap<String, Tensor>,
    tp_group: Arc<B::Group>,
    dp_group: Arc<B::Group>,
    opts: &RunOptions,
) -> Result<RankResult<B::Tensor>, ExecError> {
    let blocks = value_blocks(plan).map_err(|e| ExecError::Plan(e.to_string()))?;
    let (tp, dp) = (plan.mesh.tp as usize, plan.mesh.dp as usize);
    if index >= tp * dp || weights.len() != plan.graph.params.len() {
        return Err(ExecError::Plan(format!(
            "rank {index} with {} weights, for a {tp} × {dp} mesh of {} parameters",
            weights.len(),
            plan.graph.params.len()
        )));
    }
    let (t, d) = (index % tp, index / tp);
    if backend.group_size(&tp_group) != tp || backend.group_size(&dp_group) != dp {
        return Err(ExecError::Plan(format!(
            "groups of {} and {} members for a {tp} × {dp} mesh",
            backend.group_size(&tp_group),
            backend.group_size(&dp_group)
        )));
    }
    let feed = shard_inputs(plan, inputs, &blocks)?.swap_remove(index);
    let keep = kept_values(plan, opts.keep_all);
    let program = program(plan, &keep, opts);
    let last_use = last_uses(plan, &program);
    let rank = Rank {
        backend,
        plan,
        t,
        d,
        tp_group: tp_group.clone(),
        dp_group: dp_group.clone(),
        program: &program,
        blocks: &blocks,
        keep: &keep,
        last_use: &last_use,
        opts,
    };
    let outcome = rank.run(weights, feed);
    if let Err(e) = &outcome {
        backend.abort(&tp_group, t, &e.to_string());
        backend.abort(&dp_group, d, &e.to_string());
    }
    outcome
}

/// What one rank starts with: its shards of the batch.
type RankFeed = Vec<(ValueId, Tensor)>;

/// Every rank's shards of full weights (model shapes, by name): `[rank][param]`, ranks indexed
/// `t + tp · d`, parameters in the plan's order. The vocabulary padding is zero.
pub fn shard_params(
    plan: &Plan,
    params: &HashMap<String, Tensor>,
) -> Result<Vec<Vec<Tensor>>, ExecError> {
    let g = &plan.graph;
    let (tp, dp) = (plan.mesh.tp as usize, plan.mesh.dp as usize);
    let mut out: Vec<Vec<Tensor>> = vec![Vec::with_capacity(g.params.len()); tp * dp];
    for (p, data) in g.params.iter() {
        let shard = plan.shard(p);
        let full = params.get(&data.name).ok_or_else(|| ExecError::Feed {
            what: "parameter",
            name: data.name.clone(),
            problem: "missing".into(),
        })?;
        let model: Vec<usize> = shard.model_shape.iter().map(|&s| s as usize).collect();
        if full.shape != model {
            return Err(ExecError::Feed {
                what: "parameter",
                name: data.name.clone(),
                problem: format!("has shape {:?}, the model says {:?}", full.shape, model),
            });
        }
        let padded = pad_to(
            full,
            &shard.shape.iter().map(|&s| s as usize).collect::<Vec<_>>(),
        );
        for t in 0..tp {
            let local = match shard.ranges(t as u64, tp as u64) {
                None => padded.clone(),
                Some((dim, ranges)) => {
                    let pieces: Vec<Tensor> = ranges
                        .iter()
                        .map(|r| slice(&padded, dim, r.start as usize, r.end as usize))
                        .collect();
                    concat(&pieces, dim)
                }
            };
            for d in 0..dp {
                out[t + tp * d].push(local.clone());
            }
        }
    }
    Ok(out)
}

/// Full weights (model shapes, by name) from every rank's shards: the inverse of
/// [`shard_params`] (data-parallel replicas hold the same; the first is read).
pub fn gather_params(
    plan: &Plan,
    shards: &[Vec<Tensor>],
) -> Result<HashMap<String, Tensor>, ExecError> {
    let g = &plan.graph;
    let tp = plan.mesh.tp;
    let mut out = HashMap::with_capacity(g.params.len());
    for (p, data) in g.params.iter() {
        let shard = plan.shard(p);
        let i = p.index();
        let full = match shard.ranges(0, tp) {
            None => shards[0][i].clone(),
            Some(_) => {
                let shape: Vec<usize> = shard.shape.iter().map(|&s| s as usize).collect();
                let mut full = Tensor::zeros(shape);
                for t in 0..tp {
                    let local = &shards[t as usize][i];
                    let (dim, ranges) = shard.ranges(t, tp).expect("split");
                    let mut at = 0;
                    for r in ranges {
                        let len = (r.end - r.start) as usize;
                        place(
                            &mut full,
                            &slice(local, dim, at, at + len),
                            dim,
                            r.start as usize,
                        );
                        at += len;
                    }
                }
                full
            }
        };
        let model: Vec<usize> = shard.model_shape.iter().map(|&s| s as usize).collect();
        out.insert(data.name.clone(), crop(&full, &model));
    }
    Ok(out)
}

fn shard_inputs(
    plan: &Plan,
    inputs: &HashMap<String, Tensor>,
    blocks: &SecondaryMap<ValueId, u32>,
) -> Result<Vec<RankFeed>, ExecError> {
    let g = &plan.graph;
    let (tp, dp) = (plan.mesh.tp as usize, plan.mesh.dp as usize);
    let mut feeds: Vec<RankFeed> = vec![Vec::new(); tp * dp];
    for &v in &g.inputs {
        let name = &g.values[v].name;
        let full = inputs.get(name).ok_or_else(|| ExecError::Feed {
            what: "input",
            name: name.clone(),
            problem: "missing".into(),
        })?;
        let layout = plan.layouts[v];
        let full_shape: Vec<usize> = plan
            .mesh
            .global_sizes(&g.ty(v).shape.sizes(), layout)
            .into_iter()
            .map(|s| s as usize)
            .collect();
        if full.shape != full_shape {
            return Err(ExecError::Feed {
                what: "input",
                name: name.clone(),
                problem: format!(
                    "has shape {:?}, the model says {:?}",
                    full.shape, full_shape
                ),
            });
        }
        for t in 0..tp {
            for d in 0..dp {
                let local = local_part(full, layout, blocks[v].max(1), t, d, tp, dp);
                feeds[t + tp * d].push((v, local));
            }
        }
    }
    Ok(feeds)
}

/// The values every rank keeps to the end.
fn kept_values(plan: &Plan, all: bool) -> SecondaryMap<ValueId, bool> {
    let g = &plan.graph;
    let mut keep = SecondaryMap::with_capacity(g.values.len());
    if all {
        for (v, _) in g.values.iter() {
            keep[v] = true;
        }
    }
    keep[plan.loss] = true;
    for &(_, v) in &g.outputs {
        keep[v] = true;
    }
    for &(_, v) in &plan.grads {
        keep[v] = true;
    }
    keep
}

/// The steps the ranks run: the plan's nodes, fused unless `opts` says not to.
fn program(plan: &Plan, keep: &SecondaryMap<ValueId, bool>, opts: &RunOptions) -> Program {
    if opts.fuse && !opts.keep_all {
        Program::fused(plan, &|v| keep[v])
    } else {
        Program::unfused(plan)
    }
}

/// For each value, the position in the program of its last reader.
fn last_uses(plan: &Plan, program: &Program) -> SecondaryMap<ValueId, usize> {
    let mut last = SecondaryMap::with_capacity(plan.graph.values.len());
    for (i, step) in program.steps.iter().enumerate() {
        for v in step.inputs(plan) {
            last[v] = i;
        }
    }
    last
}

/// One rank's view of the run.
struct Rank<'a, B: Backend> {
    backend: &'a B,
    plan: &'a Plan,
    t: usize,
    d: usize,
    tp_group: Arc<B::Group>,
    dp_group: Arc<B::Group>,
    program: &'a Program,
    blocks: &'a SecondaryMap<ValueId, u32>,
    keep: &'a SecondaryMap<ValueId, bool>,
    last_use: &'a SecondaryMap<ValueId, usize>,
    opts: &'a RunOptions,
}

impl<B: Backend> Rank<'_, B> {
    fn run<'w>(
        &self,
        weights: &'w [B::Tensor],
        feed: RankFeed,
    ) -> Result<RankResult<B::Tensor>, ExecError> {
        let g = &self.plan.graph;
        let be = self.backend;
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
        let steps = &self.program.steps;
        let end = if self.opts.forward_only {
            self.program.backward_start
        } else {
            steps.len()
        };
        // A device runs behind the host: times are taken once its queued work is done.
        let fence = |at: &str| {
            be.synchronize()
                .map_err(|e| ExecError::Plan(format!("waiting for the device {at}: {e}")))
        };
        for (i, step) in steps[..end].iter().enumerate() {
            if i == self.program.backward_start {
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
            if self.opts.trace {
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
            if self.opts.check_finite {
                if let Some(bad) = outs.iter().find_map(|x| be.first_non_finite(x)) {
                    return Err(ExecError::NonFinite {
                        t: self.t,
                        d: self.d,
                        node: node_name(self.plan, n),
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
            for v in step.inputs(self.plan) {
                if self.last_use[v] == i && !self.keep[v] {
                    if let Some(Cow::Owned(x)) = values[v.index()].take() {
                        live -= be.bytes(&x);
                    }
                }
            }
            for &v in &node.outputs {
                if self.last_use[v] <= i && !self.keep[v] && !self.is_read_later(v, i) {
                    if let Some(Cow::Owned(x)) = values[v.index()].take() {
                        live -= be.bytes(&x);
                    }
                }
            }
        }
        fence("at the end of the step")?;
        let total = start.elapsed();
        if end <= self.program.backward_start {
            forward = total;
        }
        let kept = values
            .into_iter()
            .enumerate()
            .filter_map(|(i, x)| {
                let v = ValueId::new(i);
                (self.keep[v])
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
        let be = self.backend;
        let g = &self.plan.graph;
        let node = &g.nodes[n];
        let x = match &node.op {
            Op::Reshape { x, .. } | Op::F { x, .. } | Op::G { x, .. } | Op::AllReduce { x, .. } => {
                *x
            }
            _ => return None,
        };
        let owned = matches!(values[x.index()], Some(Cow::Owned(_)));
        if self.last_use[x] != i || self.keep[x] || !owned {
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
            Op::G { axis, .. } | Op::AllReduce { axis, .. } => {
                let (group, rank) = self.group(*axis);
                be.all_reduce(group, rank, &mut t, ReduceOp::Sum)
                    .map(|()| t)
                    .map_err(|e| self.comm_error(n, e))
            }
            _ => Ok(t),
        })
    }

    /// Whether `v` (an output of node `i`) is read by any node: `last_use` is 0 both for "read
    /// by the first node" and "never read".
    fn is_read_later(&self, v: ValueId, i: usize) -> bool {
        self.last_use[v] > i
    }

    fn plan_error(&self, n: NodeId, what: String) -> ExecError {
        ExecError::Plan(format!(
            "rank (tp {}, dp {}), node `{}`: {what}",
            self.t, self.d, self.plan.graph.nodes[n].name
        ))
    }

    fn kernel_error(&self, n: NodeId, error: KernelError) -> ExecError {
        ExecError::Kernel {
            t: self.t,
            d: self.d,
            node: self.plan.graph.nodes[n].name.clone(),
            error,
        }
    }

    fn comm_error(&self, n: NodeId, error: CommError) -> ExecError {
        ExecError::Comm {
            t: self.t,
            d: self.d,
            node: self.plan.graph.nodes[n].name.clone(),
            error,
        }
    }

    fn group(&self, axis: MeshAxis) -> (&B::Group, usize) {
        match axis {
            MeshAxis::Tp => (&self.tp_group, self.t),
            MeshAxis::Dp => (&self.dp_group, self.d),
        }
    }

    fn layout(&self, v: ValueId) -> MeshLayout {
        self.plan.layouts[v]
    }

    /// Runs one node on this rank.
    fn node(
        &self,
        n: NodeId,
        values: &[Option<Cow<B::Tensor>>],
    ) -> Result<Vec<B::Tensor>, ExecError> {
        let g = &self.plan.graph;
        let be = self.backend;
        let node = &g.nodes[n];
        let get = |v: &ValueId| -> Result<&B::Tensor, ExecError> {
            values[v.index()].as_deref().ok_or_else(|| {
                self.plan_error(n, format!("`{}` is not available", g.values[*v].name))
            })
        };
        let axis_of = |x: &B::Tensor, axis: i64| -> Result<usize, ExecError> {
            let r = be.shape(x).len() as i64;
            let a = if axis < 0 { axis + r } else { axis };
            (0..r)
                .contains(&a)
                .then_some(a as usize)
                .ok_or_else(|| self.plan_error(n, format!("axis {axis} out of range")))
        };
        match &node.op {
            Op::F { x, .. } => Ok(vec![get(x)?.clone()]),
            Op::G { x, axis } | Op::AllReduce { x, axis } => {
                let (group, rank) = self.group(*axis);
                let mut out = get(x)?.clone();
                be.all_reduce(group, rank, &mut out, ReduceOp::Sum)
                    .map_err(|e| self.comm_error(n, e))?;
                Ok(vec![out])
            }
            Op::AllGather { x, dim, axis, .. } => {
                let x = get(x)?;
                let dim = axis_of(x, *dim)?;
                let (group, rank) = self.group(*axis);
                let out = be
                    .all_gather(group, rank, x, dim)
                    .map_err(|e| self.comm_error(n, e))?;
                Ok(vec![out])
            }
            Op::ReduceScatter { x, dim, axis, .. } => {
                let x = get(x)?;
                let dim = axis_of(x, *dim)?;
                let (group, rank) = self.group(*axis);
                if be.shape(x)[dim] % be.group_size(group) != 0 {
                    return Err(self.plan_error(n, "the scattered axis does not divide".into()));
                }
                let out = be
                    .reduce_scatter(group, rank, x, dim)
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
                let dim = axis_of(x, *dim)?;
                let (_, rank) = self.group(*axis);
                let parts = *parts as usize;
                if be.shape(x)[dim] % parts != 0 {
                    return Err(self.plan_error(n, "the sliced axis does not divide".into()));
                }
                let part = be
                    .local_slice(x, dim, rank, parts)
                    .map_err(|e| self.kernel_error(n, e))?;
                Ok(vec![part])
            }
            Op::CrossEntropy {
                logits,
                targets,
                shift,
                classes,
            } if self.vocab_parallel(*logits) => {
                let ce = self.vocab_ce(n, get(logits)?, get(targets)?, *shift, classes)?;
                let loss = kernels::ce_loss(
                    &ce.max,
                    &ce.sum,
                    &ce.target,
                    be.shape(get(logits)?),
                    *shift,
                    self.token_parts(*logits),
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
                let ce = self.vocab_ce(n, x, get(targets)?, *shift, classes)?;
                let dl = be
                    .read_scalar(get(dloss)?)
                    .map_err(|e| self.kernel_error(n, e))?;
                let grad = be
                    .ce_grad(
                        x,
                        &ce.max,
                        &ce.sum,
                        get(targets)?,
                        *shift,
                        ce.offset,
                        ce.real,
                        dl,
                        self.token_parts(*logits),
                        self.opts.threads_per_rank.max(1),
                    )
                    .map_err(|e| self.kernel_error(n, e))?;
                Ok(vec![grad])
            }
            op => {
                let local = self.local_ctx(op)?;
                let mapped =
                    op.try_map::<&B::Tensor, Dim, ExecError, _, _>(get, |d| Ok(d.clone()))?;
                be.eval(&mapped, &local)
                    .map_err(|e| self.kernel_error(n, e))
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
        let g = &self.plan.graph;
        let mapped = op.try_map(|v| {
            values[v.index()].as_deref().ok_or_else(|| {
                self.plan_error(n, format!("`{}` is not available", g.values[*v].name))
            })
        })?;
        let local = Local {
            threads: self.opts.threads_per_rank.max(1),
            ..Local::default()
        };
        self.backend
            .eval_fused(&mapped, &local)
            .map_err(|e| self.kernel_error(n, e))
    }

    /// Whether a cross-entropy's logits are split over the classes (vocabulary-parallel).
    fn vocab_parallel(&self, logits: ValueId) -> bool {
        let rank = self.plan.graph.ty(logits).shape.rank();
        self.layout(logits).tp == Layout::Split(rank - 1) && self.plan.mesh.tp > 1
    }

    /// How many equal token shards a cross-entropy's mean spans.
    fn token_parts(&self, logits: ValueId) -> usize {
        match self.layout(logits).dp {
            Layout::Split(_) => self.plan.mesh.dp as usize,
            _ => 1,
        }
    }

    /// The rank-dependent facts a kernel needs.
    fn local_ctx(&self, op: &Op) -> Result<Local, ExecError> {
        let g = &self.plan.graph;
        let mut local = Local {
            threads: self.opts.threads_per_rank.max(1),
            dropout_seed: self.opts.dropout_seed,
            token_parts: 1,
            ..Local::default()
        };
        match op {
            Op::Embedding { table, .. } | Op::EmbeddingGrad { table, .. }
                if self.layout(*table).tp == Layout::Split(0) =>
            {
                let rows = g.ty(*table).shape.size(0) as usize;
                local.vocab_offset = self.t * rows;
                local.vocab_rows = Some(rows * self.plan.mesh.tp as usize);
            }
            Op::Dropout { x, .. } => self.place(*x, &mut local)?,
            Op::DropoutGrad { forward, .. } => self.place(*forward, &mut local)?,
            Op::CrossEntropy { logits, .. } | Op::CrossEntropyGrad { logits, .. } => {
                local.token_parts = self.token_parts(*logits);
            }
            _ => {}
        }
        Ok(local)
    }

    /// Where this rank's shard of `v` sits in the full tensor (for dropout masks).
    fn place(&self, v: ValueId, local: &mut Local) -> Result<(), ExecError> {
        let g = &self.plan.graph;
        let layout = self.layout(v);
        if self.blocks[v] > 1 && matches!(layout.tp, Layout::Split(_)) {
            return Err(ExecError::Plan(format!(
                "dropout on `{}`, a fused value cut into blocks",
                g.values[v].name
            )));
        }
        let local_shape = g.ty(v).shape.sizes();
        let full = self.plan.mesh.global_sizes(&local_shape, layout);
        let mut offsets = vec![0usize; local_shape.len()];
        for (l, index) in [(layout.tp, self.t), (layout.dp, self.d)] {
            if let Layout::Split(k) = l {
                offsets[k] += index * local_shape[k] as usize;
            }
        }
        local.full_shape = Some(full.into_iter().map(|s| s as usize).collect());
        local.offsets = Some(offsets);
        Ok(())
    }

    /// The vocabulary-parallel cross-entropy's per-row statistics, reduced over the tp group.
    fn vocab_ce(
        &self,
        n: NodeId,
        logits: &B::Tensor,
        targets: &B::Tensor,
        shift: bool,
        classes: &Option<Dim>,
    ) -> Result<VocabStats, ExecError> {
        let be = self.backend;
        let width = *be.shape(logits).last().unwrap_or(&0);
        let offset = self.t * width;
        let full = width * self.plan.mesh.tp as usize;
        let real = classes.as_ref().map_or(full, |c| c.size as usize);
        let threads = self.opts.threads_per_rank.max(1);
        let mut max = be
            .ce_row_max(logits, offset, real, threads)
            .map_err(|e| self.kernel_error(n, e))?;
        be.all_reduce_host(&self.tp_group, self.t, &mut max, ReduceOp::Max)
            .map_err(|e| self.comm_error(n, e))?;
        let (sum, target) = be
            .ce_row_sums(logits, &max, targets, shift, offset, real, threads)
            .map_err(|e| self.kernel_error(n, e))?;
        let rows = sum.len();
        let mut both = sum;
        both.extend_from_slice(&target);
        be.all_reduce_host(&self.tp_group, self.t, &mut both, ReduceOp::Sum)
            .map_err(|e| self.comm_error(n, e))?;
        let target = both.split_off(rows);
        Ok(VocabStats {
            max,
            sum: both,
            target,
            offset,
            real,
        })
    }
}

struct VocabStats {
    max: Vec<f32>,
    sum: Vec<f32>,
    target: Vec<f32>,
    offset: usize,
    real: usize,
}

fn node_name(plan: &Plan, n: NodeId) -> String {
    plan.graph.nodes[n].name.clone()
}

impl<B: Backend> Run<'_, B> {
    /// The recorded events as a Chrome / Perfetto trace (`chrome://tracing`, ui.perfetto.dev):
    /// one thread per rank, one slice per node, collectives in their own category.
    pub fn trace_json(&self) -> String {
        let tp = self.plan.mesh.tp as usize;
        let mut forward: SecondaryMap<NodeId, bool> = SecondaryMap::new();
        for &n in &self.plan.graph.order[..self.plan.backward_start] {
            forward[n] = true;
        }
        let mut out = String::from("{\"traceEvents\":[");
        let mut first = true;
        for (i, r) in self.ranks.iter().enumerate() {
            let (t, d) = (i % tp, i / tp);
            let meta = format!(
                "{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":0,\"tid\":{i},\
                 \"args\":{{\"name\":\"rank tp {t} dp {d}\"}}}}"
            );
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&meta);
            for e in &r.events {
                let n = e.node;
                let node = &self.plan.graph.nodes[n];
                let cat = if node.op.is_collective() {
                    "collective"
                } else if forward[n] {
                    "forward"
                } else {
                    "backward"
                };
                let name = node.name.replace('\\', "\\\\").replace('"', "\\\"");
                out.push_str(&format!(
                    ",{{\"name\":\"{name}\",\"cat\":\"{cat}\",\"ph\":\"X\",\"pid\":0,\
                     \"tid\":{i},\"ts\":{:.3},\"dur\":{:.3},\"args\":{{\"op\":\"{}\"}}}}",
                    e.start.as_secs_f64() * 1e6,
                    e.took.as_secs_f64() * 1e6,
                    e.op
                ));
            }
        }
        out.push_str("]}");
        out
    }

    /// Value `v` put back together at full shape from the ranks that kept it (a partial sum is
    /// summed, a split concatenated, a replicated value taken from the first rank).
    pub fn gather(&self, v: ValueId) -> Result<Tensor, ExecError> {
        let (tp, dp) = (self.plan.mesh.tp as usize, self.plan.mesh.dp as usize);
        let layout = self.plan.layouts[v];
        let name = &self.plan.graph.values[v].name;
        let get = |t: usize, d: usize| -> Result<Tensor, ExecError> {
            let x = self.ranks[t + tp * d].values.get(&v).ok_or_else(|| {
                ExecError::Plan(format!("`{name}` was not kept by rank (tp {t}, dp {d})"))
            })?;
            self.download(x)
        };
        let mut per_t = Vec::with_capacity(tp);
        for t in 0..tp {
            let parts = (0..dp).map(|d| get(t, d)).collect::<Result<Vec<_>, _>>()?;
            per_t.push(combine(&parts.iter().collect::<Vec<_>>(), layout.dp, 1));
        }
        Ok(combine(
            &per_t.iter().collect::<Vec<_>>(),
            layout.tp,
            self.blocks[v].max(1),
        ))
    }

    /// The backend the run computed on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A parameter's gradient at its model shape (vocabulary padding cropped).
    pub fn grad(&self, name: &str) -> Result<Tensor, ExecError> {
        let g = &self.plan.graph;
        let (p, grad) = self
            .plan
            .grads
            .iter()
            .find(|(p, _)| g.params[*p].name == name)
            .ok_or_else(|| ExecError::Plan(format!("no gradient for `{name}`")))?;
        let shard = self.plan.shard(*p);
        let tp = self.plan.mesh.tp;
        let full_shape: Vec<usize> = shard.shape.iter().map(|&s| s as usize).collect();
        // Place each tensor-parallel rank's shard at its ranges (dp ranks hold the same).
        let mut full = Tensor::zeros(full_shape.clone());
        match shard.ranges(0, tp) {
            None => full = self.rank_value(0, *grad)?,
            Some(_) => {
                for t in 0..tp as usize {
                    let local = &self.rank_value(t, *grad)?;
                    let (dim, ranges) = shard.ranges(t as u64, tp).expect("split");
                    let mut at = 0;
                    for r in ranges {
                        let len = (r.end - r.start) as usize;
                        let piece = slice(local, dim, at, at + len);
                        place(&mut full, &piece, dim, r.start as usize);
                        at += len;
                    }
                }
            }
        }
        let model: Vec<usize> = shard.model_shape.iter().map(|&s| s as usize).collect();
        Ok(crop(&full, &model))
    }

    /// Rank `(t, 0)`'s value `v`, on the host.
    fn rank_value(&self, t: usize, v: ValueId) -> Result<Tensor, ExecError> {
        let x = self.ranks[t].values.get(&v).ok_or_else(|| {
            ExecError::Plan(format!("`{}` was not kept", self.plan.graph.values[v].name))
        })?;
        self.download(x)
    }

    fn download(&self, x: &B::Tensor) -> Result<Tensor, ExecError> {
        self.backend
            .download(x)
            .map_err(|e| ExecError::Plan(format!("copying a result to the host: {e}")))
    }

    /// The loss (summed over the data-parallel group where each rank holds its addend).
    pub fn loss(&self) -> Result<f32, ExecError> {
        Ok(self
            .gather(self.plan.loss)?
            .data
            .first()
            .copied()
            .unwrap_or(f32::NAN))
    }

    /// A graph output at full shape, by name (vocabulary padding cropped to `crop_to`).
    pub fn output(&self, name: &str) -> Result<Tensor, ExecError> {
        let v = self
            .plan
            .graph
            .output(name)
            .ok_or_else(|| ExecError::Plan(format!("no output `{name}`")))?;
        self.gather(v)
    }

    /// The largest peak of live tensor bytes over the ranks.
    pub fn peak_bytes(&self) -> usize {
        self.ranks.iter().map(|r| r.peak_bytes).max().unwrap_or(0)
    }

    /// The slowest rank's forward and backward times.
    pub fn times(&self) -> (Duration, Duration) {
        let f = self
            .ranks
            .iter()
            .map(|r| r.forward)
            .max()
            .unwrap_or_default();
        let b = self
            .ranks
            .iter()
            .map(|r| r.backward)
            .max()
            .unwrap_or_default();
        (f, b)
    }

    /// The value ids of a graph's values by name, for comparing runs.
    pub fn value_named(&self, name: &str) -> Option<ValueId> {
        self.plan.graph.value_named(name)
    }

    /// Whether value `v` is a parameter.
    pub fn is_param(&self, v: ValueId) -> bool {
        matches!(self.plan.graph.values[v].def, ValueDef::Param(_))
    }
}

// ---- Layout helpers: slicing, concatenation and the collectives' data movement. ----

/// `(outer, size, inner)`: the products of the axes before `dim`, its size, and after it.
fn split_at(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    let outer = shape[..dim].iter().product();
    let inner = shape[dim + 1..].iter().product();
    (outer, shape[dim], inner)
}

/// `x[start..end]` along `dim`.
pub(crate) fn slice(x: &Tensor, dim: usize, start: usize, end: usize) -> Tensor {
    let (outer, size, inner) = split_at(&x.shape, dim);
    let len = end - start;
    let mut data = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = (o * size + start) * inner;
        data.extend_from_slice(&x.data[base..base + len * inner]);
    }
    let mut shape = x.shape.clone();
    shape[dim] = len;
    Tensor { shape, data }
}

/// The tensors joined along `dim`.
pub(crate) fn concat(xs: &[Tensor], dim: usize) -> Tensor {
    let refs: Vec<&Tensor> = xs.iter().collect();
    concat_refs(&refs, dim)
}

fn concat_refs(xs: &[&Tensor], dim: usize) -> Tensor {
    let mut shape = xs[0].shape.clone();
    shape[dim] = xs.iter().map(|x| x.shape[dim]).sum();
    let (outer, _, inner) = split_at(&shape, dim);
    let mut data = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for x in xs {
            let len = x.shape[dim] * inner;
            data.extend_from_slice(&x.data[o * len..(o + 1) * len]);
        }
    }
    Tensor { shape, data }
}

/// Writes `piece` into `full` at `start` along `dim`.
fn place(full: &mut Tensor, piece: &Tensor, dim: usize, start: usize) {
    let (outer, size, inner) = split_at(&full.shape, dim);
    let len = piece.shape[dim] * inner;
    for o in 0..outer {
        let dst = (o * size + start) * inner;
        full.data[dst..dst + len].copy_from_slice(&piece.data[o * len..(o + 1) * len]);
    }
}

/// Members' flat tensors (each of `local` shape, one after another) joined along `dim`.
pub(crate) fn interleave(flat: &[f32], local: &[usize], dim: usize, members: usize) -> Tensor {
    let n: usize = local.iter().product();
    let parts: Vec<Tensor> = (0..members)
        .map(|m| Tensor {
            shape: local.to_vec(),
            data: flat[m * n..(m + 1) * n].to_vec(),
        })
        .collect();
    concat(&parts, dim)
}

/// `x` cut into `members` parts along `dim`, laid out one part after another (the layout a
/// reduce-scatter hands out in chunks).
pub(crate) fn deinterleave(x: &Tensor, dim: usize, members: usize) -> Vec<f32> {
    let part = x.shape[dim] / members;
    let mut out = Vec::with_capacity(x.numel());
    for m in 0..members {
        out.extend_from_slice(&slice(x, dim, m * part, (m + 1) * part).data);
    }
    out
}

/// `x` zero-padded at the end of each axis up to `shape`.
fn pad_to(x: &Tensor, shape: &[usize]) -> Tensor {
    if x.shape == shape {
        return x.clone();
    }
    let mut out = x.clone();
    for dim in 0..shape.len() {
        let extra = shape[dim] - out.shape[dim];
        if extra > 0 {
            let mut zshape = out.shape.clone();
            zshape[dim] = extra;
            out = concat(&[out, Tensor::zeros(zshape)], dim);
        }
    }
    out
}

/// The leading `shape` corner of `x`.
fn crop(x: &Tensor, shape: &[usize]) -> Tensor {
    let mut out = x.clone();
    for (dim, &s) in shape.iter().enumerate() {
        if out.shape[dim] != s {
            out = slice(&out, dim, 0, s);
        }
    }
    out
}

/// The part of `full` rank `(t, d)` holds under `layout`.
fn local_part(
    full: &Tensor,
    layout: MeshLayout,
    blocks: u32,
    t: usize,
    d: usize,
    tp: usize,
    dp: usize,
) -> Tensor {
    let mut x = full.clone();
    if let Layout::Split(k) = layout.dp {
        let part = x.shape[k] / dp;
        x = slice(&x, k, d * part, (d + 1) * part);
    }
    if let Layout::Split(k) = layout.tp {
        let b = blocks.max(1) as usize;
        let block = x.shape[k] / b;
        let part = block / tp;
        let pieces: Vec<Tensor> = (0..b)
            .map(|i| slice(&x, k, i * block + t * part, i * block + (t + 1) * part))
            .collect();
        x = concat(&pieces, k);
    }
    x
}

/// One value's parts over a group put back together.
fn combine(parts: &[&Tensor], layout: Layout, blocks: u32) -> Tensor {
    match layout {
        Layout::Replicated => parts[0].clone(),
        Layout::Partial => {
            let mut acc = parts[0].clone();
            for p in &parts[1..] {
                for (a, b) in acc.data.iter_mut().zip(&p.data) {
                    *a += b;
                }
            }
            acc
        }
        Layout::Split(k) => {
            let b = blocks.max(1) as usize;
            if b == 1 {
                return concat_refs(parts, k);
            }
            // Each part holds its slice of every block: block i is every part's i-th piece.
            let mut blocks_out = Vec::with_capacity(b);
            for i in 0..b {
                let pieces: Vec<Tensor> = parts
                    .iter()
                    .map(|p| {
                        let piece = p.shape[k] / b;
                        slice(p, k, i * piece, (i + 1) * piece)
                    })
                    .collect();
                blocks_out.push(concat(&pieces, k));
            }
            concat(&blocks_out, k)
        }
    }
}
