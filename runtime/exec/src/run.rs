//! A step of a plan with every rank in this process, and its results put back at full shape.
//!
//! ```text
//! ParamSource (full weights in memory, or a checkpoint read region by region)
//!   ─► shard_params (each rank's regions, vocabulary padding as zeros) ─► upload
//!   ─► launch::ranks + each: Rank::run on every rank ─► Run: gather any value, the loss, the
//!      outputs, every gradient (mesh::assemble), times, peak memory, a trace
//! ```

use crate::backend::Backend;
use crate::error::ExecError;
use crate::launch;
use crate::program::{Executable, RunOptions};
use crate::rank::{Rank, RankResult};
use crate::Tensor;
use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{NodeId, ValueDef, ValueId};
use ferrotron_partitioner::pipeline::PipeStep;
use ferrotron_partitioner::{mesh, Coord, Mesh, MeshLayout, ParamShard, Plan, Region};
use std::collections::HashMap;
use std::time::Duration;

/// A finished step: every rank's results, in rank order.
#[derive(Clone, Debug)]
pub struct Run<'p, B: Backend> {
    /// The plan that ran.
    pub plan: &'p Plan,
    /// Each rank's results.
    pub ranks: Vec<RankResult<B::Tensor>>,
    blocks: SecondaryMap<ValueId, u32>,
    backend: B,
}

/// Runs `plan` on `backend` from host weights (full tensors by name, or a checkpoint) and a
/// full batch: shards the weights, uploads each rank's through the rank's own backend, then
/// runs as [`run_sharded`].
pub fn run<'p, B: Backend, S: ParamSource + ?Sized>(
    backend: B,
    plan: &'p Plan,
    params: &S,
    inputs: &HashMap<String, Tensor>,
    opts: &RunOptions,
) -> Result<Run<'p, B>, ExecError> {
    let shards = shard_params(plan, params)?;
    let on_device = upload_params(&backend, plan, &shards)?;
    run_sharded(backend, plan, &on_device, inputs, opts)
}

/// Runs `plan` with every rank a thread of this process, on weights already sharded and on the
/// device (`params[rank][param]`) and a full host batch (each rank takes its shard).
pub fn run_sharded<'p, B: Backend>(
    backend: B,
    plan: &'p Plan,
    params: &[Vec<B::Tensor>],
    inputs: &HashMap<String, Tensor>,
    opts: &RunOptions,
) -> Result<Run<'p, B>, ExecError> {
    let exe = Executable::new(plan, opts)?;
    if params.len() != plan.mesh.ranks() {
        return Err(ExecError::Plan(format!(
            "{} ranks of weights given for a mesh of {}",
            params.len(),
            plan.mesh.ranks()
        )));
    }
    let mut ranks = launch::ranks(&backend, plan.mesh, opts.timeout);
    let results = launch::each(&mut ranks, |rank| {
        rank.run(&exe, &params[rank.index()], inputs)
    })?;
    Ok(Run::new(&exe, backend, results))
}

/// Where a rank's weight shards come from: full tensors in memory, or a checkpoint read region
/// by region (so that a rank of a launched job never holds more of the model than its shards).
/// Shared by the ranks of a process, which take their shards concurrently.
pub trait ParamSource: Sync {
    /// The part `region` of parameter `name`'s full tensor, whose shape in the model is `model`
    /// and in the plan `padded` (the vocabulary padded: `region` is over `padded`, and what lies
    /// outside `model` is zero). A missing parameter, or one of another shape than `model`, is
    /// an [`ExecError::Feed`].
    fn shard(
        &self,
        name: &str,
        model: &[usize],
        padded: &[usize],
        region: &Region,
    ) -> Result<Tensor, ExecError>;
}

/// Full weights, model shapes, by name.
impl ParamSource for HashMap<String, Tensor> {
    fn shard(
        &self,
        name: &str,
        model: &[usize],
        padded: &[usize],
        region: &Region,
    ) -> Result<Tensor, ExecError> {
        let full = self.get(name).ok_or_else(|| ExecError::Feed {
            what: "parameter",
            name: name.to_owned(),
            problem: "missing".into(),
        })?;
        if full.shape != model || full.data.len() != model.iter().product::<usize>() {
            return Err(ExecError::Feed {
                what: "parameter",
                name: name.to_owned(),
                problem: format!("has shape {:?}, the model says {:?}", full.shape, model),
            });
        }
        Ok(full.padded(padded).take(region))
    }
}

/// The rank's shards of the weights, on its device.
pub fn weights_for<B: Backend, S: ParamSource + ?Sized>(
    rank: &Rank<B>,
    plan: &Plan,
    params: &S,
) -> Result<Vec<B::Tensor>, ExecError> {
    let host = shard_params_for(plan, params, rank.coord)?;
    upload_rank(&rank.backend, plan, rank.coord, &host, false)
}

/// The full (vocabulary-padded) shape of a parameter, and its shape in the model.
fn param_shapes(shard: &ParamShard) -> (Vec<usize>, Vec<usize>) {
    let to = |s: &[u64]| s.iter().map(|&x| x as usize).collect();
    (to(&shard.shape), to(&shard.model_shape))
}

/// The rank at `c`'s shards of the weights: those of its pipeline stage's parameters
/// ([`Plan::params_on`]), in the plan's order. The vocabulary padding is zero.
pub fn shard_params_for<S: ParamSource + ?Sized>(
    plan: &Plan,
    params: &S,
    c: Coord,
) -> Result<Vec<Tensor>, ExecError> {
    let g = &plan.graph;
    plan.params_on(c.pp)
        .into_iter()
        .map(|p| {
            let shard = plan.shard(p);
            let (padded, model) = param_shapes(shard);
            let region = shard.region(plan.mesh, c);
            params.shard(&g.params[p].name, &model, &padded, &region)
        })
        .collect()
}

/// Every rank's shards of the weights: `[rank][param]`.
pub fn shard_params<S: ParamSource + ?Sized>(
    plan: &Plan,
    params: &S,
) -> Result<Vec<Vec<Tensor>>, ExecError> {
    plan.mesh
        .coords()
        .map(|c| shard_params_for(plan, params, c))
        .collect()
}

/// Full weights (model shapes, by name) from shards as [`shard_params`] makes them: the inverse.
/// Data-parallel replicas hold the same shards, so each stage's parameters are read from its
/// first replica (`shards` may stop after the last rank read: at `shards[..tp]` without a
/// pipeline); a parameter several stages hold, from the first of them.
pub fn gather_params(
    plan: &Plan,
    shards: &[Vec<Tensor>],
) -> Result<HashMap<String, Tensor>, ExecError> {
    let tp = plan.mesh.tp as usize;
    let mut out = HashMap::with_capacity(plan.graph.params.len());
    for stage in (0..plan.mesh.pp.max(1) as usize).rev() {
        let first = stage * plan.mesh.stage_ranks();
        let Some(ranks) = shards.get(first..first + tp) else {
            return Err(ExecError::Plan(format!(
                "{} ranks of shards given, stage {stage}'s first are {first} to {}",
                shards.len(),
                first + tp - 1
            )));
        };
        out.extend(gather_stage_params(plan, stage, ranks)?);
    }
    Ok(out)
}

/// Full weights of stage `stage`'s parameters ([`Plan::params_on`]) from the shards of its
/// first data-parallel replica's tensor-parallel ranks (`shards[tp][k]`, the stage's `k`-th
/// parameter).
pub fn gather_stage_params(
    plan: &Plan,
    stage: usize,
    shards: &[Vec<Tensor>],
) -> Result<HashMap<String, Tensor>, ExecError> {
    let replica = Mesh::new(plan.mesh.tp, 1);
    let held = plan.params_on(stage);
    let mut out = HashMap::with_capacity(held.len());
    for (k, &p) in held.iter().enumerate() {
        let data = &plan.graph.params[p];
        let shard = plan.shard(p);
        let (padded, model) = param_shapes(shard);
        let parts = (0..replica.ranks())
            .map(|r| {
                shards
                    .get(r)
                    .and_then(|s| s.get(k))
                    .map(|t| t.data.as_slice())
                    .ok_or_else(|| {
                        ExecError::Plan(format!(
                            "`{}`: no shard from tp rank {r} of stage {stage}",
                            data.name
                        ))
                    })
            })
            .collect::<Result<Vec<&[f32]>, _>>()?;
        let full = mesh::assemble(replica, shard.layout, shard.blocks, &padded, &parts);
        let full = Tensor {
            shape: padded,
            data: full.into(),
        };
        out.insert(data.name.clone(), full.cropped(&model));
    }
    Ok(out)
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
        .map(|(r, rank)| upload_rank(&backend.on_rank(r), plan, plan.mesh.coord(r), rank, false))
        .collect()
}

/// One rank's host shards on its device: as the weights a step computes with, or, with
/// `master`, as the optimizer's `f32` master weights.
pub(crate) fn upload_rank<B: Backend>(
    be: &B,
    plan: &Plan,
    at: Coord,
    shards: &[Tensor],
    master: bool,
) -> Result<Vec<B::Tensor>, ExecError> {
    shards
        .iter()
        .zip(plan.params_on(at.pp))
        .map(|(t, p)| {
            let data = &plan.graph.params[p];
            let up = if master {
                be.upload_master(t)
            } else {
                be.upload(t, plan.graph.ty(data.value).dtype)
            };
            up.map_err(|e| ExecError::Feed {
                what: "parameter",
                name: data.name.clone(),
                problem: format!("could not be copied to the device: {e}"),
            })
        })
        .collect()
}

impl<'p, B: Backend> Run<'p, B> {
    /// Every rank's results of one step of `exe`, in rank order, computed on `backend`.
    pub fn new(exe: &Executable<'p>, backend: B, ranks: Vec<RankResult<B::Tensor>>) -> Self {
        Run {
            plan: exe.plan,
            ranks,
            blocks: exe.blocks.clone(),
            backend,
        }
    }

    /// The recorded events as a Chrome / Perfetto trace (`chrome://tracing`, ui.perfetto.dev):
    /// one thread per rank, one slice per node, collectives in their own category.
    pub fn trace_json(&self) -> String {
        let mut forward: SecondaryMap<NodeId, bool> = SecondaryMap::new();
        for &n in &self.plan.graph.order[..self.plan.backward_start] {
            forward[n] = true;
        }
        let mut out = String::from("{\"traceEvents\":[");
        let mut first = true;
        for (i, r) in self.ranks.iter().enumerate() {
            let c = self.plan.mesh.coord(i);
            let meta = format!(
                "{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":0,\"tid\":{i},\
                 \"args\":{{\"name\":\"rank {i} ({c})\"}}}}"
            );
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&meta);
            // With several micro-batches, each one's forward and backward part as a slice
            // around its ops: the schedule's pattern.
            for span in r.spans.iter().filter(|_| self.plan.pipeline.is_some()) {
                let (mut name, cat) = match span.step {
                    PipeStep::Forward(m) => (format!("F{m}"), "forward step"),
                    PipeStep::Backward(m) => (format!("B{m}"), "backward step"),
                };
                if self
                    .plan
                    .pipeline
                    .as_ref()
                    .is_some_and(|p| p.virtual_stages > 1)
                {
                    name.push_str(&format!(" chunk {}", span.chunk));
                }
                out.push_str(&format!(
                    ",{{\"name\":\"{name}\",\"cat\":\"{cat}\",\"ph\":\"X\",\"pid\":0,\
                     \"tid\":{i},\"ts\":{:.3},\"dur\":{:.3},\"args\":{{\"waited_ms\":{:.3}}}}}",
                    span.start.as_secs_f64() * 1e6,
                    span.took.as_secs_f64() * 1e6,
                    span.waited.as_secs_f64() * 1e3
                ));
            }
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
                     \"tid\":{i},\"ts\":{:.3},\"dur\":{:.3},\"args\":{{\"op\":\"{}\",\
                     \"micro_batch\":{}}}}}",
                    e.start.as_secs_f64() * 1e6,
                    e.took.as_secs_f64() * 1e6,
                    e.op,
                    e.micro_batch
                ));
            }
        }
        out.push_str("]}");
        out
    }

    /// The tp × dp ranks of the stage that computes `v` (all of them without a pipeline): the
    /// ranks holding it, and the mesh they form.
    fn holders(&self, v: ValueId) -> (std::ops::Range<usize>, Mesh) {
        let plan = self.plan;
        let stage = match plan.grads.iter().find(|&&(_, g)| g == v) {
            Some(&(p, _)) => plan
                .pipeline
                .as_ref()
                .and_then(|pipe| pipe.grad_owner(p))
                .unwrap_or(0) as usize,
            None => plan.stage_of_value(v),
        };
        let n = plan.mesh.stage_ranks();
        (
            stage * n..(stage + 1) * n,
            Mesh::new(plan.mesh.tp, plan.mesh.dp),
        )
    }

    /// The holders' value `v` (of micro-batch `micro`: a step of several keeps its outputs per
    /// micro-batch), on the host.
    fn parts(&self, v: ValueId, micro: Option<usize>) -> Result<Vec<Tensor>, ExecError> {
        let name = &self.plan.graph.values[v].name;
        self.ranks[self.holders(v).0]
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let kept = match micro {
                    Some(m) => r.micro_batches.get(m),
                    None => Some(&r.values),
                };
                let x = kept.and_then(|k| k.get(&v)).ok_or_else(|| {
                    let c = self.plan.mesh.coord(self.holders(v).0.start + i);
                    ExecError::Plan(format!("`{name}` was not kept by rank ({c})"))
                })?;
                self.download(x)
            })
            .collect()
    }

    /// Value `v` put back together at full shape from the ranks that kept it (a partial sum is
    /// summed, a split placed, a replicated value taken from the first rank). A graph output of
    /// a step of several micro-batches is each one's, joined along the batch (its first
    /// dimension).
    pub fn gather(&self, v: ValueId) -> Result<Tensor, ExecError> {
        let plan = self.plan;
        let layout = plan.layouts[v];
        let full: Vec<usize> = plan
            .mesh
            .global_sizes(&plan.graph.ty(v).shape.sizes(), layout)
            .into_iter()
            .map(|s| s as usize)
            .collect();
        let mesh = self.holders(v).1;
        let assemble = |micro| -> Result<Vec<f32>, ExecError> {
            let parts = self.parts(v, micro)?;
            let parts: Vec<&[f32]> = parts.iter().map(|p| p.data.as_slice()).collect();
            Ok(mesh::assemble(
                mesh,
                layout,
                self.blocks[v].max(1),
                &full,
                &parts,
            ))
        };
        let micro = plan.micro_batches() as usize;
        let per_micro_batch = micro > 1 && plan.graph.outputs.iter().any(|&(_, o)| o == v);
        if v == plan.loss || !per_micro_batch {
            return Ok(Tensor {
                data: assemble(None)?.into(),
                shape: full,
            });
        }
        let mut data = Vec::with_capacity(full.iter().product::<usize>() * micro);
        for m in 0..micro {
            data.extend(assemble(Some(m))?);
        }
        let mut shape = full.clone();
        if let Some(rows) = shape.first_mut() {
            *rows *= micro;
        }
        Ok(Tensor {
            shape,
            data: data.into(),
        })
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
        // A gradient is laid out as its parameter is sharded, but for a partial sum over dp
        // under the distributed optimizer (summed here as the optimizer's reduce-scatter would).
        let shard = self.plan.shard(*p);
        let layout = MeshLayout {
            dp: self.plan.layouts[*grad].dp,
            ..shard.layout
        };
        let (padded, model) = param_shapes(shard);
        let parts = self.parts(*grad, None)?;
        let parts: Vec<&[f32]> = parts.iter().map(|p| p.data.as_slice()).collect();
        let data = mesh::assemble(self.holders(*grad).1, layout, shard.blocks, &padded, &parts);
        Ok(Tensor {
            shape: padded,
            data: data.into(),
        }
        .cropped(&model))
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

    /// A graph output at full shape, by name.
    pub fn output(&self, name: &str) -> Result<Tensor, ExecError> {
        let v = self
            .plan
            .graph
            .output(name)
            .ok_or_else(|| ExecError::Plan(format!("no output `{name}`")))?;
        self.gather(v)
    }

    /// Each rank's idle fraction of the step: the time it did not compute (it waited for
    /// another stage, or had nothing to run yet or any more) over the step's span, from the
    /// first rank's start to the last rank's end.
    pub fn idle_fractions(&self) -> Vec<f64> {
        let end =
            |r: &RankResult<B::Tensor>| r.spans.last().map_or(Duration::ZERO, |s| s.start + s.took);
        let step = self.ranks.iter().map(end).max().unwrap_or_default();
        self.ranks
            .iter()
            .map(|r| {
                let busy: Duration = r
                    .spans
                    .iter()
                    .map(|s| s.took.saturating_sub(s.waited))
                    .sum();
                1.0 - busy.as_secs_f64() / step.as_secs_f64().max(1e-12)
            })
            .collect()
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
