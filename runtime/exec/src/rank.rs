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
//! measured peak can be set beside the partitioner's estimate. On a backend that uses an arena
//! (the CPU's in host memory, CUDA's in device memory) each step's new outputs are offered
//! their places in the rank's arena ([`crate::arena`]), kept from one step to the next. If the
//! rank fails (an error or a panic), it aborts every group it belongs to: its peers stop at
//! their next collective with that error instead of waiting forever.

use crate::arena::{self, Arena, ArenaStats, Place, Placements};
use crate::backend::Backend;
use crate::comm::{Comm, CommError, ReduceOp};
use crate::error::{ExecError, GroupRanks};
use crate::fuse::{Fused, StepOp};
use crate::kernel::{CeStats, KernelError, OutputLossDims, Placement, RowWindow, VocabShard};
use crate::link::{Link, Tag};
use crate::program::Executable;
use crate::Tensor;
use ferrotron_ir::graph::{EntityRef, SecondaryMap};
use ferrotron_ir::{Dim, MeshAxis, NodeId, Op, ParamId, ValueId};
use ferrotron_partitioner::pipeline::PipeStep;
use ferrotron_partitioner::{Coord, Layout, Mesh, MeshLayout, Region};
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    /// Its link to the other pipeline stages (`None` without a pipeline).
    pub link: Option<Arc<dyn Link<B::Tensor>>>,
    /// Its arena where the backend uses one, kept from one step to the next ([`crate::arena`]).
    pub(crate) arena: Mutex<Option<Arc<Arena>>>,
}

/// One rank's results.
#[derive(Clone, Debug)]
pub struct RankResult<T = Tensor> {
    /// The values kept, by value: a step of several micro-batches keeps the loss (their mean)
    /// and the gradients (their sum) here.
    pub values: HashMap<ValueId, T>,
    /// A step of several micro-batches: each one's graph outputs (empty for a step of one).
    pub micro_batches: Vec<HashMap<ValueId, T>>,
    /// The most bytes of tensors alive at once (weights and inputs included).
    pub peak_bytes: usize,
    /// Time spent in the forward and the backward part.
    pub forward: Duration,
    /// See `forward`.
    pub backward: Duration,
    /// Each pipeline step run (a micro-batch's forward or backward part), in order; one
    /// forward and one backward without a pipeline.
    pub spans: Vec<Span>,
    /// With `trace`: each step run, in order.
    pub events: Vec<TraceEvent>,
    /// On a backend with an arena and a memory plan: the rank's arena, and how many values
    /// this run placed in it and missed ([`crate::arena`]).
    pub arena: Option<ArenaStats>,
}

/// One micro-batch's forward or backward part on a rank, as it ran.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    /// Which.
    pub step: PipeStep,
    /// The model chunk it ran (interleaved schedule; 0 otherwise).
    pub chunk: u32,
    /// When it started, from the rank's start.
    pub start: Duration,
    /// How long it took.
    pub took: Duration,
    /// Of that, the time spent waiting for another stage's transfer.
    pub waited: Duration,
}

/// One step of a traced run.
#[derive(Clone, Copy, Debug)]
pub struct TraceEvent {
    /// The node it ran as (a fused step: the node whose outputs it produced).
    pub node: NodeId,
    /// What ran: the node's op, or the fused op (`BiasAct`, `ScaledSoftmax`, ...).
    pub op: &'static str,
    /// The micro-batch it ran on.
    pub micro_batch: u32,
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
            link: None,
            arena: Mutex::new(None),
        })
    }

    /// The rank with `link` to the other pipeline stages.
    pub fn with_link(self, link: Arc<dyn Link<B::Tensor>>) -> Rank<B> {
        Rank {
            link: Some(link),
            ..self
        }
    }

    /// The rank's number in the job.
    pub fn index(&self) -> usize {
        self.mesh.rank(self.coord)
    }

    /// Fails every group this rank belongs to, so its peers stop.
    pub fn abort(&self, why: &str) {
        self.groups.tp.abort(why);
        self.groups.dp.abort(why);
        if let Some(link) = &self.link {
            link.abort(self.index(), why);
        }
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
    /// shards (`weights`: its stage's parameters, [`ferrotron_partitioner::Plan::params_on`],
    /// on this rank's device) and its shard of the full batch `batch`, every micro-batch in its
    /// stage's schedule order. The other ranks of the job run the same call at the same time.
    pub fn run(
        &self,
        exe: &Executable,
        weights: &[B::Tensor],
        batch: &HashMap<String, Tensor>,
    ) -> Result<RankResult<B::Tensor>, ExecError> {
        self.guard(|| {
            let plan = exe.plan;
            let params = plan.params_on(self.coord.pp);
            if plan.mesh != self.mesh || weights.len() != params.len() {
                return Err(ExecError::Plan(format!(
                    "rank ({}) of a {} mesh with {} weights, for a {} plan whose stage {} holds \
                     {} parameters",
                    self.coord,
                    mesh_name(self.mesh),
                    weights.len(),
                    mesh_name(plan.mesh),
                    self.coord.pp,
                    params.len()
                )));
            }
            if self.mesh.pp > 1 && self.link.is_none() {
                return Err(ExecError::Plan(format!(
                    "rank ({}) of a pipeline has no link to the other stages",
                    self.coord
                )));
            }
            let arena = self.arena_for(exe)?;
            Runner {
                rank: self,
                exe,
                arena,
                stage: self.coord.pp,
                micro_batch: Cell::new(0),
                position: Cell::new(0),
                waited: Cell::new(Duration::ZERO),
                landed: RefCell::new(Vec::new()),
                ce_stats: RefCell::new(HashMap::new()),
                sums: RefCell::new(HashMap::new()),
            }
            .run(&params, weights, batch)
        })
    }

    /// The rank's arena and where `exe` places its values there, on a backend that uses one,
    /// with a memory plan (made at the first step, or grown for a larger plan).
    fn arena_for(&self, exe: &Executable) -> Result<Option<RankArena>, ExecError> {
        if !self.backend.uses_arena() {
            return Ok(None);
        }
        let be = &self.backend;
        let Some(places) = crate::memory::placements(exe, self.coord.pp, &|d| be.element_bytes(d))
        else {
            return Ok(None);
        };
        let bytes = places.bytes as u64;
        let mut held = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        let arena = match &*held {
            Some(a) if a.bytes() >= bytes => a.clone(),
            _ => {
                // The old arena goes once the values placed in it do.
                let a = self.backend.new_arena(bytes).map_err(|e| {
                    ExecError::Plan(format!("rank ({}) has no arena: {e}", self.coord))
                })?;
                *held = Some(a.clone());
                a
            }
        };
        Ok(Some((arena, places)))
    }

    /// Sums `x` over the pipeline stages (this rank and its peers at the same tensor- and
    /// data-parallel place), exactly and in stage order, so every stage gets the same sums: the
    /// gradient norm's addends, the last stage's loss. `seq` tells successive calls apart.
    pub fn sum_over_stages<const N: usize>(
        &self,
        x: [f64; N],
        seq: u32,
    ) -> Result<[f64; N], ExecError> {
        let (Some(link), true) = (&self.link, self.mesh.pp > 1) else {
            return Ok(x);
        };
        let be = &self.backend;
        let failed = |e: String| ExecError::Plan(format!("summing over the stages: {e}"));
        let comm = |error| ExecError::Comm {
            at: self.coord,
            node: "the sums over the stages".into(),
            group: None,
            error,
        };
        // Each f64 travels as four 16-bit pieces in an integer tensor: exact on any backend.
        let pieces: Vec<f32> = x
            .iter()
            .flat_map(|v| (0..4).map(move |k| ((v.to_bits() >> (16 * k)) & 0xffff) as f32))
            .collect();
        let tensor = Tensor {
            shape: vec![pieces.len()],
            data: pieces.into(),
        };
        let tag = Tag {
            transfer: u32::MAX,
            micro_batch: seq,
        };
        let me = self.index();
        let stages = self.mesh.pp as usize;
        for s in (0..stages).filter(|&s| s != self.coord.pp) {
            let t = be
                .upload(&tensor, ferrotron_ir::DType::I32)
                .map_err(|e| failed(e.to_string()))?;
            link.send(me, self.mesh.peer(self.coord, s), tag, t)
                .map_err(comm)?;
        }
        let mut sums = [0f64; N];
        for s in 0..stages {
            let part = if s == self.coord.pp {
                x
            } else {
                let t = link
                    .recv(self.mesh.peer(self.coord, s), me, tag)
                    .map_err(comm)?;
                let t = be.download(&t).map_err(|e| failed(e.to_string()))?;
                let mut part = [0f64; N];
                for (i, v) in part.iter_mut().enumerate() {
                    let bits =
                        (0..4).fold(0u64, |b, k| b | ((t.data[4 * i + k] as u64) << (16 * k)));
                    *v = f64::from_bits(bits);
                }
                part
            };
            for (sum, v) in sums.iter_mut().zip(part) {
                *sum += v;
            }
        }
        Ok(sums)
    }

    /// This rank's group along `axis`, by its members' job ranks.
    pub fn group_ranks(&self, axis: MeshAxis) -> GroupRanks {
        GroupRanks {
            axis,
            ranks: self.mesh.group(axis, self.coord),
        }
    }

    /// Sums a host scalar over this rank's group along `axis` (a loss addend, a norm).
    pub fn sum_over(&self, axis: MeshAxis, x: &mut [f32], what: &str) -> Result<(), ExecError> {
        let group = self.groups.on(axis);
        group.note(what);
        group
            .all_reduce_host(x, ReduceOp::Sum)
            .map_err(|error| ExecError::Comm {
                at: self.coord,
                node: what.to_owned(),
                group: Some(Box::new(self.group_ranks(axis))),
                error,
            })
    }
}

/// `2 × 2` or `2 × 2 × 2` (tp × dp, then pp when there are stages).
fn mesh_name(mesh: Mesh) -> String {
    if mesh.pp > 1 {
        format!("{} × {} × {}", mesh.tp, mesh.dp, mesh.pp)
    } else {
        format!("{} × {}", mesh.tp, mesh.dp)
    }
}

/// What the rank at `c` holds of micro-batch `m` of every graph input of a full batch that
/// `reads` (the step's micro-batches are equal runs of each input's first dimension, `batch`).
fn shard_inputs(
    exe: &Executable,
    batch: &HashMap<String, Tensor>,
    c: Coord,
    m: u32,
    reads: &SecondaryMap<ValueId, bool>,
) -> Result<Vec<(ValueId, Tensor)>, ExecError> {
    let plan = exe.plan;
    let g = &plan.graph;
    let micro = plan.micro_batches() as usize;
    let mut feed = Vec::with_capacity(g.inputs.len());
    for &v in &g.inputs {
        let name = &g.values[v].name;
        let full = batch.get(name).ok_or_else(|| ExecError::Feed {
            what: "input",
            name: name.clone(),
            problem: "missing".into(),
        })?;
        if !reads[v] {
            continue;
        }
        let layout = plan.layouts[v];
        let micro_shape = full_shape(plan.mesh, &g.ty(v).shape.sizes(), layout);
        let mut step_shape = micro_shape.clone();
        if micro > 1 {
            if g.ty(v).shape.0.first().and_then(|d| d.name.as_deref()) != Some("batch") {
                return Err(ExecError::Feed {
                    what: "input",
                    name: name.clone(),
                    problem: "has no leading `batch` dimension to cut micro-batches from".into(),
                });
            }
            step_shape[0] *= micro;
        }
        if full.shape != step_shape || full.data.len() != step_shape.iter().product::<usize>() {
            return Err(ExecError::Feed {
                what: "input",
                name: name.clone(),
                problem: format!(
                    "has shape {:?}, the model says {:?}",
                    full.shape, step_shape
                ),
            });
        }
        // The first dimension is outermost: micro-batch `m` is one contiguous run.
        let rows = full.data.len() / micro;
        let part = Tensor {
            shape: micro_shape.clone(),
            data: full.data[m as usize * rows..(m as usize + 1) * rows]
                .to_vec()
                .into(),
        };
        let region = Region::of(&micro_shape, layout, exe.blocks[v].max(1), plan.mesh, c);
        feed.push((v, part.take(&region)));
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
    /// The rank's arena and the program's places in it, where the backend uses one.
    arena: Option<RankArena>,
    /// The rank's pipeline stage: it runs the steps of that stage only.
    stage: usize,
    /// The micro-batch being run (dropout masks are those of its rows of the full batch).
    micro_batch: Cell<u32>,
    /// The position of the step being run in the stage's run: where the memory plan's places
    /// for it are ([`crate::memory::MemoryPlan::positions`]).
    position: Cell<usize>,
    /// Time spent waiting for other stages' transfers so far.
    waited: Cell<Duration>,
    /// Received tensors this rank is done with. A tensor is freed on the device queue of the
    /// rank that made it, which does not wait for this rank's queue: they are dropped once this
    /// rank's queue has finished the step that read them.
    landed: RefCell<Vec<B::Tensor>>,
    /// The vocabulary-parallel cross-entropy's statistics from its forward, by its logits and
    /// micro-batch, for its backward: reduced over the tp group once, in the forward, so the
    /// backward needs no collective (as Megatron's saves them).
    ce_stats: RefCell<HashMap<LogitsOf, VocabStats<B::Tensor>>>,
    /// With several micro-batches, the values summed over them so far (the gradients): each
    /// micro-batch's is added in as soon as nothing else on the stage reads it, so a stage
    /// never holds two sets of gradients.
    sums: RefCell<HashMap<ValueId, B::Tensor>>,
}

/// A rank's arena and where the program places its values there.
type RankArena = (Arc<Arena>, Arc<Placements>);

/// Which logits a cross-entropy's statistics are of: the value and the micro-batch.
type LogitsOf = (ValueId, u32);

/// The vocabulary-parallel cross-entropy's statistics on this rank, reduced over the group.
struct VocabStats<T> {
    stats: CeStats<T>,
    shard: VocabShard,
}

/// A micro-batch's values on this rank, by value index; weights are borrowed.
type Store<'w, T> = Vec<Option<Cow<'w, T>>>;

/// What a rank keeps of its micro-batches as they finish.
struct Kept<T> {
    /// Values as they are (one micro-batch per step).
    values: HashMap<ValueId, T>,
    /// The sum of the micro-batches' losses.
    loss: Option<f64>,
    /// Each micro-batch's graph outputs.
    outputs: Vec<HashMap<ValueId, T>>,
}

/// Live tensor bytes on the rank, and their peak.
#[derive(Default)]
struct Bytes {
    live: usize,
    peak: usize,
}

impl Bytes {
    fn add(&mut self, n: usize) {
        self.live += n;
        self.peak = self.peak.max(self.live);
    }

    fn sub(&mut self, n: usize) {
        self.live = self.live.saturating_sub(n);
    }
}

impl<B: Backend> Runner<'_, B> {
    fn run<'w>(
        &self,
        params: &[ParamId],
        weights: &'w [B::Tensor],
        batch: &HashMap<String, Tensor>,
    ) -> Result<RankResult<B::Tensor>, ExecError> {
        let exe = self.exe;
        let plan = exe.plan;
        let g = &plan.graph;
        let be = &self.rank.backend;
        let arena_before = self.arena.as_ref().map(|(a, _)| a.stats());
        let mut bytes = Bytes::default();
        let mut base: Store<'w, B::Tensor> = vec![None; exe.program.value_count(plan)];
        for (&p, x) in params.iter().zip(weights) {
            let data = &g.params[p];
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
            bytes.add(be.bytes(x));
            base[data.value.index()] = Some(Cow::Borrowed(x));
        }
        // The inputs this stage reads.
        let mut reads: SecondaryMap<ValueId, bool> = SecondaryMap::with_capacity(g.values.len());
        for (i, step) in exe.program.steps.iter().enumerate() {
            if exe.stage_of[i] == self.stage {
                for v in step.inputs(plan) {
                    reads[v] = true;
                }
            }
        }
        // (step, model chunk) in the stage's order.
        let schedule = exe.schedule(self.stage);
        let chunks = plan
            .pipeline
            .as_ref()
            .map_or(1, |p| p.virtual_stages.max(1));
        let micro = plan.micro_batches();
        let mut kept = Kept {
            values: HashMap::new(),
            loss: None,
            outputs: (0..micro).map(|_| HashMap::new()).collect(),
        };
        let mut stores: HashMap<u32, Store<'w, B::Tensor>> = HashMap::new();
        let start = Instant::now();
        let (mut forward, mut backward) = (Duration::ZERO, Duration::ZERO);
        let mut events = Vec::new();
        let mut spans = Vec::new();
        let steps = exe.program.steps.len();
        let bw = exe.program.backward_start;
        // A device runs behind the host: times are taken once its queued work is done.
        let fence = |at: &str| {
            be.synchronize()
                .map_err(|e| self.device_wait(&format!("waiting for the device {at}"), e))
        };
        // A micro-batch's values are one store on the stage, whichever chunk made them: its
        // forward chunks run in order, then its backward chunks in reverse, so the program's
        // order still tells when a value is read last.
        for (step, chunk) in schedule {
            match step {
                PipeStep::Forward(m) => {
                    self.micro_batch.set(m);
                    let began = start.elapsed();
                    let mut values = match stores.remove(&m) {
                        Some(values) => values,
                        None => {
                            let mut values = base.clone();
                            for (v, x) in shard_inputs(exe, batch, self.rank.coord, m, &reads)? {
                                let place = self.arena.as_ref().and_then(|(_, p)| {
                                    p.inputs
                                        .iter()
                                        .find(|&&(k, u, _)| (k, u) == (m, v))
                                        .map(|&(_, _, at)| at)
                                });
                                let x = self
                                    .placing(place.as_slice(), || be.upload(&x, g.ty(v).dtype))
                                    .map_err(|e| ExecError::Feed {
                                        what: "input",
                                        name: g.values[v].name.clone(),
                                        problem: e.to_string(),
                                    })?;
                                bytes.add(be.bytes(&x));
                                values[v.index()] = Some(Cow::Owned(x));
                            }
                            values
                        }
                    };
                    self.walk(0..bw, chunk, &mut values, &mut bytes, &mut events, start)?;
                    fence("after the forward pass")?;
                    self.landed.borrow_mut().clear();
                    forward += start.elapsed() - began;
                    spans.push(self.span(step, chunk, began, start));
                    if exe.opts.forward_only && chunk + 1 == chunks {
                        self.keep(m, values, &mut kept, &mut bytes)?;
                    } else {
                        stores.insert(m, values);
                    }
                }
                PipeStep::Backward(_) if exe.opts.forward_only => {}
                PipeStep::Backward(m) => {
                    self.micro_batch.set(m);
                    let began = start.elapsed();
                    let mut values = stores.remove(&m).ok_or_else(|| {
                        ExecError::Plan(format!(
                            "stage {}'s schedule runs micro-batch {m} backward before forward",
                            self.stage
                        ))
                    })?;
                    self.walk(
                        bw..steps,
                        chunk,
                        &mut values,
                        &mut bytes,
                        &mut events,
                        start,
                    )?;
                    fence("after the backward pass")?;
                    self.landed.borrow_mut().clear();
                    backward += start.elapsed() - began;
                    spans.push(self.span(step, chunk, began, start));
                    if chunk == 0 {
                        self.keep(m, values, &mut kept, &mut bytes)?;
                    } else {
                        stores.insert(m, values);
                    }
                }
            }
        }
        let mut values = kept.values;
        values.extend(self.sums.take());
        if let Some(sum) = kept.loss {
            let loss = be
                .scalar((sum / f64::from(micro)) as f32)
                .map_err(|e| ExecError::Plan(format!("the step's loss: {e}")))?;
            values.insert(plan.loss, loss);
        }
        if !exe.opts.forward_only {
            self.join_late(&mut values)?;
            self.reduce_deferred(&mut values)?;
            self.share_tied_grads(&mut values)?;
        }
        let arena = self.arena.as_ref().zip(arena_before);
        Ok(RankResult {
            arena: arena.map(|((a, _), before)| a.stats().since(before)),
            values,
            micro_batches: if micro > 1 { kept.outputs } else { Vec::new() },
            peak_bytes: bytes.peak,
            spans,
            forward,
            backward,
            events,
        })
    }

    /// Runs `f` with `places` in the rank's arena offered to the buffers it makes
    /// ([`arena::placing`]); without an arena, just `f`.
    fn placing<R>(&self, places: &[Place], f: impl FnOnce() -> R) -> R {
        match &self.arena {
            Some((arena, _)) => arena::placing(arena, places, f),
            None => f(),
        }
    }

    /// The span of `step`, begun at `began` (from `start`), ending now; the wait it saw.
    fn span(&self, step: PipeStep, chunk: u32, began: Duration, start: Instant) -> Span {
        Span {
            step,
            chunk,
            start: began,
            took: start.elapsed() - began,
            waited: self.waited.replace(Duration::ZERO),
        }
    }

    /// Runs this stage's steps of model chunk `chunk` in `range` on one micro-batch's `values`: receives what another
    /// stage made just before a step first reads it, sends what it makes for another stage as
    /// soon as it is made, and frees each value after its last reader on this stage.
    fn walk(
        &self,
        range: std::ops::Range<usize>,
        chunk: u32,
        values: &mut Store<'_, B::Tensor>,
        bytes: &mut Bytes,
        events: &mut Vec<TraceEvent>,
        start: Instant,
    ) -> Result<(), ExecError> {
        let exe = self.exe;
        let g = &exe.plan.graph;
        let be = &self.rank.backend;
        let stage = self.stage;
        let m = self.micro_batch.get();
        for i in range {
            if exe.stage_of[i] != stage || exe.chunk_of[i] != chunk {
                continue;
            }
            let step = &exe.program.steps[i];
            let n = step.node;
            let node = &g.nodes[n];
            for v in step.inputs(exe.plan) {
                if values[v.index()].is_none() {
                    if let Some(x) = self.receive(n, v)? {
                        bytes.add(be.bytes(&x));
                        values[v.index()] = Some(Cow::Owned(x));
                    }
                }
            }
            // A watchdog that reports a stuck collective names the node it belongs to.
            let communicates = matches!(
                node.op,
                Op::CrossEntropy { .. } | Op::CrossEntropyGrad { .. }
            );
            if node.op.is_collective() || communicates {
                for group in [&self.rank.groups.tp, &self.rank.groups.dp] {
                    group.note(&node.name);
                }
            }
            let began = start.elapsed();
            let late = exe.late_add(n);
            // Where the step's new outputs go (a fused output layer places its own; a reshape,
            // an f or a late sum's pass-on of a value read later is a view of its buffer where
            // clones share it).
            let view = be.shares_on_clone()
                && (late.is_some()
                    || matches!(step.op, StepOp::Node)
                        && matches!(node.op, Op::Reshape { .. } | Op::F { .. }));
            let places = match (&self.arena, &step.op) {
                (
                    _,
                    StepOp::Fused {
                        op: Fused::OutputLoss { .. },
                        ..
                    },
                )
                | (None, _) => &[][..],
                _ if view => &[][..],
                (Some((_, p)), _) => &p.outputs[self.position.get()][..],
            };
            let outs = self.placing(places, || -> Result<Vec<B::Tensor>, ExecError> {
                Ok(match (&step.op, late) {
                    // The owner's own part, passed on: the other stage's joins once a step.
                    (_, Some(late)) => {
                        let other = late.other;
                        let moved = exe.is_last_use(stage, other, i)
                            && !exe.keep[other]
                            && matches!(values[other.index()], Some(Cow::Owned(_)));
                        let x = if moved {
                            let Some(Cow::Owned(x)) = values[other.index()].take() else {
                                unreachable!("checked to be owned")
                            };
                            bytes.sub(be.bytes(&x));
                            x
                        } else {
                            values[other.index()]
                                .as_deref()
                                .ok_or_else(|| {
                                    self.plan_error(
                                        n,
                                        format!("`{}` is not available", g.values[other].name),
                                    )
                                })?
                                .clone()
                        };
                        vec![x]
                    }
                    (
                        StepOp::Fused {
                            op: Fused::EmbeddingGradAdd { .. },
                            absorbed,
                            ..
                        },
                        None,
                    ) => {
                        let &[absorbed] = absorbed.as_slice() else {
                            return Err(self.plan_error(
                                n,
                                "an embedding gradient's sum absorbs one node".into(),
                            ));
                        };
                        let (x, reused) = self.embedding_grad_add(n, i, absorbed, values)?;
                        if reused {
                            bytes.sub(be.bytes(&x)); // the sum's buffer, counted again as the output
                        }
                        vec![x]
                    }
                    (StepOp::Fused { op, absorbed, .. }, None) => {
                        // What the step holds while it runs besides its inputs and outputs.
                        let scratch = exe
                            .program
                            .scratch_bytes(exe.plan, i, &|d| be.element_bytes(d));
                        bytes.add(scratch as usize);
                        let outs = self.fused((n, i), op, absorbed, values)?;
                        bytes.sub(scratch as usize);
                        outs
                    }
                    (StepOp::Node, None) => match self.in_place(n, i, values) {
                        Some(x) => {
                            let x = x?;
                            bytes.sub(be.bytes(&x)); // the input's buffer, counted again as the output
                            vec![x]
                        }
                        None => self.node(n, values)?,
                    },
                })
            })?;
            if exe.opts.trace {
                be.synchronize()
                    .map_err(|e| self.device_wait("waiting for the device", e))?;
                events.push(TraceEvent {
                    node: n,
                    op: match &step.op {
                        StepOp::Node => node.op.mnemonic(),
                        StepOp::Fused { op, .. } => op.mnemonic(),
                    },
                    micro_batch: m,
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
            for (&v, x) in step.outputs(exe.plan).iter().zip(outs) {
                let want = exe.program.value_shape(exe.plan, v);
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
                let size = be.bytes(&x);
                bytes.add(size);
                let needed_here = exe.keep[v] || exe.is_read_after(stage, v, i);
                match self.send(n, v, x, needed_here)? {
                    Some(x) if exe.sums_now(stage, v, i) => self.add_to_sum(v, x, bytes)?,
                    Some(x) => values[v.index()] = Some(Cow::Owned(x)),
                    None => bytes.sub(size),
                }
            }
            // Free what no later step of this stage reads (unless it is kept). A weight stays
            // resident (the caller holds it): dropping the borrow frees nothing.
            for v in step.inputs(exe.plan) {
                if exe.is_last_use(stage, v, i) && !exe.keep[v] {
                    if let Some(Cow::Owned(x)) = values[v.index()].take() {
                        bytes.sub(be.bytes(&x));
                        if self.received(v) {
                            self.landed.borrow_mut().push(x);
                        }
                    }
                }
            }
            for &v in step.outputs(exe.plan) {
                if !exe.keep[v] && !exe.is_read_after(stage, v, i) {
                    if let Some(Cow::Owned(x)) = values[v.index()].take() {
                        bytes.sub(be.bytes(&x));
                    }
                }
            }
            self.position.set(self.position.get() + 1);
        }
        Ok(())
    }

    /// Takes what is kept of micro-batch `m`'s finished `values` (the rest is dropped): as they
    /// are for a step of one micro-batch; else the loss summed on the host, the gradients summed
    /// on the device, and the graph outputs per micro-batch.
    fn keep(
        &self,
        m: u32,
        values: Store<'_, B::Tensor>,
        kept: &mut Kept<B::Tensor>,
        bytes: &mut Bytes,
    ) -> Result<(), ExecError> {
        let exe = self.exe;
        let plan = exe.plan;
        let be = &self.rank.backend;
        let several = plan.micro_batches() > 1;
        for (i, x) in values.into_iter().enumerate() {
            // A borrowed weight is the caller's: nothing to keep or free.
            let Some(Cow::Owned(x)) = x else { continue };
            let v = ValueId::new(i);
            if !exe.keep[v] {
                bytes.sub(be.bytes(&x));
                continue;
            }
            if !several {
                kept.values.insert(v, x);
            } else if v == plan.loss {
                let loss = be
                    .read_scalar(&x)
                    .map_err(|e| ExecError::Plan(format!("reading the loss: {e}")))?;
                *kept.loss.get_or_insert(0.0) += f64::from(loss);
                bytes.sub(be.bytes(&x));
            } else if exe.accumulate[v] {
                self.add_to_sum(v, x, bytes)?;
            } else {
                kept.outputs[m as usize].insert(v, x);
            }
        }
        Ok(())
    }

    /// Adds one micro-batch's `x` of value `v` into its sum over the micro-batches (the first
    /// becomes the sum).
    fn add_to_sum(&self, v: ValueId, x: B::Tensor, bytes: &mut Bytes) -> Result<(), ExecError> {
        let be = &self.rank.backend;
        let mut sums = self.sums.borrow_mut();
        let sum = match sums.remove(&v) {
            None => x,
            Some(acc) => {
                // Into the sum's buffer: the sum of every micro-batch's is the first one's.
                let sum = be.add_into(acc, &x).map_err(|e| {
                    ExecError::Plan(format!(
                        "summing `{}` over micro-batches: {e}",
                        self.exe.plan.graph.values[v].name
                    ))
                })?;
                bytes.sub(be.bytes(&x));
                sum
            }
        };
        sums.insert(v, sum);
        Ok(())
    }

    /// Whether `v` comes from another stage.
    fn received(&self, v: ValueId) -> bool {
        self.exe.receives_any(self.stage, v)
    }

    /// The value `v` another stage made for this one (micro-batch being run), if `v` crosses
    /// into this stage.
    fn receive(&self, n: NodeId, v: ValueId) -> Result<Option<B::Tensor>, ExecError> {
        let (Some(pipe), Some(link)) = (&self.exe.plan.pipeline, &self.rank.link) else {
            return Ok(None);
        };
        let Some(k) = pipe
            .transfers
            .iter()
            .position(|t| t.value == v && t.to as usize == self.stage)
            .filter(|&k| !self.exe.is_late(k))
        else {
            return Ok(None);
        };
        let mesh = self.rank.mesh;
        let from = mesh.peer(self.rank.coord, pipe.transfers[k].from as usize);
        let tag = Tag {
            transfer: k as u32,
            micro_batch: self.micro_batch.get(),
        };
        let began = Instant::now();
        let x = link.recv(from, self.rank.index(), tag);
        self.waited.set(self.waited.get() + began.elapsed());
        let x = x.map_err(|e| self.comm_error(n, e))?;
        match pipe.transfers[k].scatter {
            // Each tp rank received its part: the whole is their concatenation.
            Some(d) => {
                let whole = self
                    .group(MeshAxis::Tp)
                    .all_gather(&x, d)
                    .map_err(|e| self.group_error(n, MeshAxis::Tp, e))?;
                self.landed.borrow_mut().push(x);
                Ok(Some(whole))
            }
            None => Ok(Some(x)),
        }
    }

    /// Sends `x` (value `v`, just made) to every stage that reads it, moving it to the last one
    /// unless this stage still needs it; returns it if it stays.
    fn send(
        &self,
        n: NodeId,
        v: ValueId,
        x: B::Tensor,
        needed_here: bool,
    ) -> Result<Option<B::Tensor>, ExecError> {
        let (Some(pipe), Some(link)) = (&self.exe.plan.pipeline, &self.rank.link) else {
            return Ok(Some(x));
        };
        let out: Vec<usize> = (0..pipe.transfers.len())
            .filter(|&k| {
                pipe.transfers[k].value == v
                    && pipe.transfers[k].from as usize == self.stage
                    && !self.exe.is_late(k)
            })
            .collect();
        if out.is_empty() {
            return Ok(Some(x));
        }
        let be = &self.rank.backend;
        let me = self.rank.index();
        let tp = self.rank.mesh.tp as usize;
        let mut x = Some(x);
        for (j, &k) in out.iter().enumerate() {
            let transfer = &pipe.transfers[k];
            let to = self.rank.mesh.peer(self.rank.coord, transfer.to as usize);
            let tag = Tag {
                transfer: k as u32,
                micro_batch: self.micro_batch.get(),
            };
            let whole = x.as_ref().expect("kept until the last send");
            let t = match transfer.scatter {
                // Its part of a value every tp rank holds whole.
                Some(d) => be
                    .local_slice(whole, d, self.rank.coord.tp, tp)
                    .map_err(|e| self.kernel_error(n, e))?,
                None if j + 1 == out.len() && !needed_here => x.take().expect("sent once"),
                None => whole.clone(),
            };
            // The receiver's device work may run on another queue: the tensor must be complete.
            be.synchronize()
                .map_err(|e| self.plan_error(n, format!("waiting for the device to send: {e}")))?;
            link.send(me, to, tag, t)
                .map_err(|e| self.comm_error(n, e))?;
        }
        if !needed_here {
            x = None;
        }
        Ok(x)
    }

    /// After the last micro-batch: each late contribution, summed over the micro-batches where
    /// it is made, sent to the stage that owns its sum and added there.
    fn join_late(&self, values: &mut HashMap<ValueId, B::Tensor>) -> Result<(), ExecError> {
        let exe = self.exe;
        let (Some(pipe), Some(link)) = (&exe.plan.pipeline, &self.rank.link) else {
            return Ok(());
        };
        let be = &self.rank.backend;
        let me = self.rank.index();
        for l in &exe.late {
            let t = &pipe.transfers[l.transfer];
            let tag = Tag {
                transfer: l.transfer as u32,
                micro_batch: pipe.micro_batches,
            };
            let name = &exe.plan.graph.values[l.contribution].name;
            let missing = |v: ValueId| {
                ExecError::Plan(format!(
                    "rank ({}): `{}` was not summed over the micro-batches",
                    self.rank.coord, exe.plan.graph.values[v].name
                ))
            };
            let device = |e: KernelError| ExecError::Plan(format!("adding `{name}`: {e}"));
            if t.from as usize == self.stage {
                let x = values
                    .remove(&l.contribution)
                    .ok_or_else(|| missing(l.contribution))?;
                be.synchronize().map_err(device)?;
                let to = self.rank.mesh.peer(self.rank.coord, t.to as usize);
                link.send(me, to, tag, x)
                    .map_err(|e| self.comm_error(l.add, e))?;
            } else if t.to as usize == self.stage {
                let from = self.rank.mesh.peer(self.rank.coord, t.from as usize);
                let x = link
                    .recv(from, me, tag)
                    .map_err(|e| self.comm_error(l.add, e))?;
                let own = values.remove(&l.sum).ok_or_else(|| missing(l.sum))?;
                let sum = be
                    .eval(&Op::Add(&own, &x), &Placement::default())
                    .map_err(device)?
                    .swap_remove(0);
                // `x` is freed on its sender's device queue: the sum must have read it.
                be.synchronize().map_err(device)?;
                values.insert(l.sum, sum);
            }
        }
        Ok(())
    }

    /// After the last micro-batch: the reductions of the gradients this stage makes, on their
    /// sums over the micro-batches.
    fn reduce_deferred(&self, values: &mut HashMap<ValueId, B::Tensor>) -> Result<(), ExecError> {
        let exe = self.exe;
        for d in &exe.deferred {
            let stage = |n| {
                exe.plan
                    .pipeline
                    .as_ref()
                    .map_or(0, |p| p.stage_of[n] as usize)
            };
            if d.reductions
                .first()
                .is_none_or(|&(n, _)| stage(n) != self.stage)
            {
                continue;
            }
            let Some(mut t) = values.remove(&d.sum) else {
                let name = &exe.plan.graph.values[d.sum].name;
                return Err(ExecError::Plan(format!(
                    "rank ({}): `{name}` was not summed over the micro-batches",
                    self.rank.coord
                )));
            };
            for &(node, axis) in &d.reductions {
                self.group(axis)
                    .all_reduce(&mut t, ReduceOp::Sum)
                    .map_err(|e| self.group_error(node, axis, e))?;
            }
            values.insert(d.grad, t);
        }
        Ok(())
    }

    /// After the last micro-batch: each tied parameter's summed gradient, sent from the stage
    /// that completed it to every other stage holding the parameter, so the copies get the same
    /// update.
    fn share_tied_grads(&self, values: &mut HashMap<ValueId, B::Tensor>) -> Result<(), ExecError> {
        let plan = self.exe.plan;
        let (Some(pipe), Some(link)) = (&plan.pipeline, &self.rank.link) else {
            return Ok(());
        };
        let stage = self.stage as u32;
        let me = self.rank.index();
        // Which of the memory plan's places for the copies sent comes next.
        let mut placed_tied = 0;
        for (k, tied) in pipe.tied.iter().enumerate() {
            let Some(&(_, grad)) = plan.grads.iter().find(|(p, _)| *p == tied.param) else {
                continue;
            };
            let name = &plan.graph.params[tied.param].name;
            let tag = Tag {
                transfer: (pipe.transfers.len() + k) as u32,
                micro_batch: 0,
            };
            let comm = |error| ExecError::Comm {
                at: self.rank.coord,
                node: format!("the tied gradient of `{name}`"),
                group: None,
                error,
            };
            if stage == tied.owner {
                let x = values.get(&grad).ok_or_else(|| {
                    ExecError::Plan(format!(
                        "stage {stage} did not complete the gradient of `{name}`"
                    ))
                })?;
                self.rank
                    .backend
                    .synchronize()
                    .map_err(|e| self.device_wait("waiting for the device", e))?;
                for (j, &h) in tied.holders.iter().filter(|&&h| h != stage).enumerate() {
                    let to = self.rank.mesh.peer(self.rank.coord, h as usize);
                    // The first copy goes to its planned place (a clone that shares its buffer
                    // needs none).
                    let place = match (&self.arena, j) {
                        (Some((_, p)), 0) if !self.rank.backend.shares_on_clone() => {
                            p.sent_after.get(placed_tied).copied()
                        }
                        _ => None,
                    };
                    let copy = self.placing(place.as_slice(), || x.clone());
                    link.send(me, to, tag, copy).map_err(comm)?;
                }
                if tied.holders.len() > 1 {
                    placed_tied += 1;
                }
            } else if tied.holders.contains(&stage) {
                let from = self.rank.mesh.peer(self.rank.coord, tied.owner as usize);
                let x = link.recv(from, me, tag).map_err(comm)?;
                values.insert(grad, x);
            }
        }
        Ok(())
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
        // A value this step may take over: owned here, read for the last time, not kept.
        let free = |v: ValueId, values: &[Option<Cow<B::Tensor>>]| {
            matches!(values[v.index()], Some(Cow::Owned(_)))
                && exe.is_last_use(self.stage, v, i)
                && !exe.keep[v]
        };
        let x = match &node.op {
            Op::Reshape { x, .. } | Op::F { x, .. } | Op::G { x, .. } | Op::AllReduce { x, .. } => {
                *x
            }
            // A sum of two values of the output's shape, into whichever is free (a + b and b + a
            // are the same bits); not when one is both addends, nor into a value another stage
            // sent (its buffer is released with the step's other arrivals).
            Op::Add(a, b) if a != b => {
                let out = g.ty(node.outputs[0]);
                let whole = |v: ValueId| {
                    g.ty(v).shape == out.shape && g.ty(v).dtype == out.dtype && !self.received(v)
                };
                let (acc, other) = if whole(*a) && whole(*b) && free(*a, values) {
                    (*a, *b)
                } else if whole(*a) && whole(*b) && free(*b, values) {
                    (*b, *a)
                } else {
                    return None;
                };
                let Some(Cow::Owned(t)) = values[acc.index()].take() else {
                    return None;
                };
                let Some(y) = values[other.index()].as_deref() else {
                    values[acc.index()] = Some(Cow::Owned(t));
                    return None;
                };
                return Some(be.add_into(t, y).map_err(|e| self.kernel_error(n, e)));
            }
            _ => return None,
        };
        if !free(x, values) {
            return None;
        }
        let Some(Cow::Owned(mut t)) = values[x.index()].take() else {
            return None;
        };
        Some(match &node.op {
            Op::Reshape { .. } => {
                let shape: Vec<usize> = g.ty(node.outputs[0]).shape.extents();
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
                .map_err(|e| self.group_error(n, *axis, e)),
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

    /// A failure found while waiting for the device (`when`): a kernel's, or a check the
    /// kernels queued (a bad index), which names its op but not its node.
    fn device_wait(&self, when: &str, error: KernelError) -> ExecError {
        ExecError::Kernel {
            at: self.rank.coord,
            node: format!("({when})"),
            error,
        }
    }

    fn comm_error(&self, n: NodeId, error: CommError) -> ExecError {
        ExecError::Comm {
            at: self.rank.coord,
            node: self.exe.plan.graph.nodes[n].name.clone(),
            group: None,
            error,
        }
    }

    /// [`Runner::comm_error`] of a collective over the rank's group along `axis`.
    fn group_error(&self, n: NodeId, axis: MeshAxis, error: CommError) -> ExecError {
        match self.comm_error(n, error) {
            ExecError::Comm {
                at, node, error, ..
            } => ExecError::Comm {
                at,
                node,
                group: Some(Box::new(self.rank.group_ranks(axis))),
                error,
            },
            other => other,
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
                    .map_err(|e| self.group_error(n, *axis, e))?;
                Ok(vec![out])
            }
            Op::AllGather { x, dim, axis, .. } => {
                let x = get(x)?;
                let dim = dim_of(x, *dim)?;
                let out = self
                    .group(*axis)
                    .all_gather(x, dim)
                    .map_err(|e| self.group_error(n, *axis, e))?;
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
                    .map_err(|e| self.group_error(n, *axis, e))?;
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
                let loss = be
                    .ce_loss(&ce.stats, be.shape(get(logits)?), &ce.shard)
                    .map_err(|e| self.kernel_error(n, e))?;
                self.ce_stats
                    .borrow_mut()
                    .insert((*logits, self.micro_batch.get()), ce);
                Ok(vec![loss])
            }
            Op::CrossEntropyGrad {
                logits,
                targets,
                dloss,
                shift,
                classes,
            } if self.vocab_parallel(*logits) => {
                let x = get(logits)?;
                // The forward's statistics of these logits; reduced again only where the forward
                // did not run here (a plan holding the gradient alone).
                let saved = self
                    .ce_stats
                    .borrow_mut()
                    .remove(&(*logits, self.micro_batch.get()));
                let ce = match saved {
                    Some(ce) => ce,
                    None => self.vocab_ce(n, *logits, x, get(targets)?, *shift, classes)?,
                };
                let grad = be
                    .ce_grad(x, get(targets)?, &ce.stats, &ce.shard, get(dloss)?)
                    .map_err(|e| self.kernel_error(n, e))?;
                Ok(vec![grad])
            }
            // The forward's output is not held for this (`Op::data_inputs`): the same mask
            // drawn again at its place, over the gradient, is the dropout of the gradient.
            Op::DropoutGrad { dy, forward, p } => {
                let at = self.placement(&node.op)?;
                let dy = get(dy)?;
                let want = self.exe.plan.graph.ty(*forward).shape.sizes();
                if be
                    .shape(dy)
                    .iter()
                    .map(|&s| s as u64)
                    .ne(want.iter().copied())
                {
                    return Err(self.plan_error(
                        n,
                        format!(
                            "the gradient {:?} is not shaped like the dropout's output {want:?}",
                            be.shape(dy)
                        ),
                    ));
                }
                be.eval(&Op::Dropout { x: dy, p: *p }, &at)
                    .map_err(|e| self.kernel_error(n, e))
            }
            op => {
                let at = self.placement(op)?;
                let mapped =
                    op.try_map::<&B::Tensor, Dim, ExecError, _, _>(get, |d| Ok(d.clone()))?;
                be.eval(&mapped, &at).map_err(|e| self.kernel_error(n, e))
            }
        }
    }

    /// A tied table's gradients summed ([`Fused::EmbeddingGradAdd`] in place of `n`, the sum,
    /// which absorbed the `EmbeddingGrad` node `absorbed`): into the other gradient's buffer
    /// when this step reads it for the last time (then `true`), else into a copy.
    fn embedding_grad_add(
        &self,
        n: NodeId,
        i: usize,
        absorbed: NodeId,
        values: &mut [Option<Cow<B::Tensor>>],
    ) -> Result<(B::Tensor, bool), ExecError> {
        let exe = self.exe;
        let g = &exe.plan.graph;
        let Op::EmbeddingGrad { table, ids, dy } = &g.nodes[absorbed].op else {
            return Err(self.plan_error(n, "fused with a node that is not an EmbeddingGrad".into()));
        };
        let StepOp::Fused {
            op: Fused::EmbeddingGradAdd { acc, .. },
            ..
        } = &exe.program.steps[i].op
        else {
            return Err(self.plan_error(n, "not an embedding gradient's sum".into()));
        };
        let missing =
            |v: ValueId| self.plan_error(n, format!("`{}` is not available", g.values[v].name));
        let free = exe.is_last_use(self.stage, *acc, i)
            && !exe.keep[*acc]
            && !self.received(*acc)
            && matches!(values[acc.index()], Some(Cow::Owned(_)));
        let sum = match free {
            true => match values[acc.index()].take() {
                Some(Cow::Owned(t)) => t,
                _ => return Err(missing(*acc)),
            },
            false => values[acc.index()]
                .as_deref()
                .ok_or_else(|| missing(*acc))?
                .clone(),
        };
        let get = |v: ValueId| values[v.index()].as_deref().ok_or_else(|| missing(v));
        let at = self.placement(&g.nodes[absorbed].op)?;
        let out = self
            .rank
            .backend
            .embedding_grad_add(sum, (get(*table)?, get(*ids)?, get(*dy)?), &at)
            .map_err(|e| self.kernel_error(n, e))?;
        Ok((out, free))
    }

    /// Runs fused step `i`: its outputs (the step's), computed by the fused op. `absorbed` are
    /// the nodes it stands for besides `n` (an attention's dropout among them places its mask,
    /// a loss's cross-entropy gives its attributes).
    fn fused(
        &self,
        (n, i): (NodeId, usize),
        op: &Fused<ValueId>,
        absorbed: &[NodeId],
        values: &[Option<Cow<B::Tensor>>],
    ) -> Result<Vec<B::Tensor>, ExecError> {
        let exe = self.exe;
        let mapped = op.try_map(|v| {
            values[v.index()].as_deref().ok_or_else(|| {
                self.plan_error(
                    n,
                    format!(
                        "`{}` is not available",
                        exe.program.value_name(exe.plan, *v)
                    ),
                )
            })
        })?;
        let be = &self.rank.backend;
        let kernel = |e| self.kernel_error(n, e);
        match &mapped {
            Fused::Attention { q, k, v, spec } => {
                let at = self.dropout_placement(absorbed)?;
                let (out, lse) = be.attention(q, k, v, spec, &at).map_err(kernel)?;
                Ok(vec![out, lse])
            }
            Fused::AttentionGrad { saved, spec } => {
                let at = self.dropout_placement(absorbed)?;
                Ok(be.attention_grad(*saved, spec, &at).map_err(kernel)?.into())
            }
            Fused::BiasDropoutAdd {
                x,
                bias,
                residual,
                p,
            } => {
                let at = self.dropout_placement(absorbed)?;
                let out = be.bias_dropout_add((x, bias, residual), *p, &at);
                Ok(vec![out.map_err(kernel)?])
            }
            Fused::OutputLoss {
                h,
                w,
                targets,
                dloss,
            } => self.output_loss((n, i), absorbed, (h, w, targets), *dloss),
            _ => Ok(vec![be.eval_fused(&mapped).map_err(kernel)?]),
        }
    }

    /// Where a fused step's dropout sits in the full tensor (its mask's place: an attention's
    /// probabilities, a bias sum's): the placement of the dropout (or its gradient) among the
    /// `absorbed` nodes.
    fn dropout_placement(&self, absorbed: &[NodeId]) -> Result<Placement, ExecError> {
        let g = &self.exe.plan.graph;
        match absorbed
            .iter()
            .find(|&&m| matches!(g.nodes[m].op, Op::Dropout { .. } | Op::DropoutGrad { .. }))
        {
            Some(&m) => self.placement(&g.nodes[m].op),
            None => Ok(Placement {
                dropout_seed: self.exe.opts.dropout_seed,
                ..Placement::default()
            }),
        }
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
        let mut offsets = region.offsets();
        // A micro-batch is its rows of the step's batch: its masks are theirs.
        let micro = plan.micro_batches() as usize;
        if micro > 1 {
            let shape = &plan.graph.ty(v).shape.0;
            let d = shape
                .iter()
                .position(|d| d.name.as_deref() == Some("batch"))
                .unwrap_or(0);
            if let Some(full) = at.full_shape.as_mut() {
                offsets[d] += self.micro_batch.get() as usize * full[d];
                full[d] *= micro;
            }
        }
        at.offsets = Some(offsets);
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
    ) -> Result<VocabStats<B::Tensor>, ExecError> {
        let shard = self.vocab_shard(v, shift, classes);
        let stats = self.ce_stats(n, logits, targets, &shard, true)?;
        Ok(VocabStats { stats, shard })
    }

    /// The classes this rank holds of the cross-entropy of logits `v`, and how its mean is
    /// taken.
    fn vocab_shard(&self, v: ValueId, shift: bool, classes: &Option<Dim>) -> VocabShard {
        let plan = self.exe.plan;
        let region = self.region(v);
        let last = region.rank() - 1;
        let full = full_shape(plan.mesh, &plan.graph.ty(v).shape.sizes(), self.layout(v))[last];
        VocabShard {
            class_offset: region.dim(last).first().map_or(0, |r| r.start),
            real_classes: classes.as_ref().map_or(full, |c| c.size as usize),
            shift,
            token_parts: self.token_parts(v),
            window: None,
        }
    }

    /// A cross-entropy's per-row statistics of `logits`, reduced over the tp group when the
    /// classes are split over it (`reduce`).
    fn ce_stats(
        &self,
        n: NodeId,
        logits: &B::Tensor,
        targets: &B::Tensor,
        shard: &VocabShard,
        reduce: bool,
    ) -> Result<CeStats<B::Tensor>, ExecError> {
        let be = &self.rank.backend;
        // The statistics stay backend tensors, reduced by the group's tensor collectives (the
        // maxima, then the sums with the target logits): on a GPU they never reach the host.
        let tp = self.group(MeshAxis::Tp);
        let mut max = be
            .ce_row_max(logits, shard)
            .map_err(|e| self.kernel_error(n, e))?;
        if reduce {
            tp.all_reduce(&mut max, ReduceOp::Max)
                .map_err(|e| self.group_error(n, MeshAxis::Tp, e))?;
        }
        let mut sums = be
            .ce_row_sums(logits, &max, targets, shard)
            .map_err(|e| self.kernel_error(n, e))?;
        if reduce {
            tp.all_reduce(&mut sums, ReduceOp::Sum)
                .map_err(|e| self.group_error(n, MeshAxis::Tp, e))?;
        }
        Ok(CeStats { max, sums })
    }

    /// A fused output layer and loss ([`Fused::OutputLoss`] at step `i`, standing for node `n`
    /// and the `absorbed` ones): the logits made a chunk of rows at a time, each chunk's
    /// statistics reduced over the tp group where the classes are split, the chunks' losses
    /// added; with `dloss`, each chunk's gradient gives its rows of the hidden states' gradient
    /// and its addend to the weight's before the chunk's logits are dropped.
    fn output_loss(
        &self,
        (n, i): (NodeId, usize),
        absorbed: &[NodeId],
        (h, w, targets): (&B::Tensor, &B::Tensor, &B::Tensor),
        dloss: Option<&B::Tensor>,
    ) -> Result<Vec<B::Tensor>, ExecError> {
        let exe = self.exe;
        let g = &exe.plan.graph;
        let be = &self.rank.backend;
        let kernel = |e| self.kernel_error(n, e);
        let eval = |op: Op<&B::Tensor, Dim>| -> Result<B::Tensor, ExecError> {
            Ok(be
                .eval(&op, &Placement::default())
                .map_err(kernel)?
                .swap_remove(0))
        };
        let Some((logits, shift, classes)) =
            absorbed
                .iter()
                .chain([&n])
                .find_map(|&m| match &g.nodes[m].op {
                    Op::CrossEntropy {
                        logits,
                        shift,
                        classes,
                        ..
                    } => Some((*logits, *shift, classes.clone())),
                    _ => None,
                })
        else {
            return Err(self.plan_error(n, "a fused loss without its cross-entropy".into()));
        };
        let dims = exe
            .program
            .output_loss_dims(exe.plan, i)
            .ok_or_else(|| self.plan_error(n, "not a fused output layer".into()))?;
        let OutputLossDims { rows, hidden, .. } = dims;
        let h_shape = be.shape(h).to_vec();
        let seq = h_shape[h_shape.len() - 2];
        let split = self.vocab_parallel(logits);
        let whole = self.vocab_shard(logits, shift, &classes);
        let as_dims = |sizes: &[usize]| sizes.iter().map(|&s| Dim::new(s as u64)).collect();
        let h_rows = eval(Op::Reshape {
            x: h,
            shape: as_dims(&[rows, hidden]),
        })?;
        // The planned places of `dh` and `dw` (the step's outputs after the loss), and of the
        // chunks' logits (the step's scratch): the loop's other buffers are small.
        let (outputs, scratch) = match &self.arena {
            Some((_, p)) => {
                let t = self.position.get();
                (&p.outputs[t][..], p.scratch[t])
            }
            None => (&[][..], None),
        };
        let output = |k: usize| outputs.get(k).copied().into_iter().collect::<Vec<Place>>();
        let element = be.bytes(h) / be.shape(h).iter().product::<usize>().max(1);
        let (dh_place, dw_place) = (output(1), output(2));
        let (mut loss, mut dw) = (None::<B::Tensor>, None::<B::Tensor>);
        let mut dh_rows = Vec::new();
        let chunks = dims.chunks().count();
        for (first, count) in dims.chunks() {
            let shard = VocabShard {
                window: Some(RowWindow {
                    first,
                    total: rows,
                    seq,
                }),
                ..whole
            };
            let h_chunk = eval(Op::Slice {
                x: &h_rows,
                dim: 0,
                start: Dim::new(first as u64),
                end: Dim::new((first + count) as u64),
            })?;
            // The chunk's logits, stored as the hidden states are.
            let logits_bytes = count * dims.vocab * element;
            let logits_place: Vec<Place> = scratch
                .filter(|&(_, room)| logits_bytes <= room)
                .map(|(at, _)| (at, logits_bytes))
                .into_iter()
                .collect();
            let chunk_logits = self.placing(&logits_place, || {
                eval(Op::MatMul {
                    a: &h_chunk,
                    b: w,
                    transpose_a: false,
                    transpose_b: true,
                })
            })?;
            let stats = self.ce_stats(n, &chunk_logits, targets, &shard, split)?;
            let part = be
                .ce_loss(&stats, be.shape(&chunk_logits), &shard)
                .map_err(kernel)?;
            loss = Some(match loss {
                None => part,
                Some(sum) => be.add_into(sum, &part).map_err(kernel)?,
            });
            let Some(dloss) = dloss else { continue };
            // The chunk's logits are read no more: their buffer takes the gradient.
            let grad = be
                .ce_grad_in_place(chunk_logits, targets, &stats, &shard, dloss)
                .map_err(kernel)?;
            // One chunk's rows of `dh` are all of it.
            let place = if chunks == 1 { &dh_place[..] } else { &[] };
            dh_rows.push(self.placing(place, || {
                eval(Op::MatMul {
                    a: &grad,
                    b: w,
                    transpose_a: false,
                    transpose_b: false,
                })
            })?);
            dw = Some(match dw {
                None => self.placing(&dw_place, || {
                    eval(Op::MatMul {
                        a: &grad,
                        b: &h_chunk,
                        transpose_a: true,
                        transpose_b: false,
                    })
                })?,
                Some(sum) => be
                    .matmul_acc(sum, (&grad, &h_chunk), (true, false))
                    .map_err(kernel)?,
            });
        }
        let loss = loss.ok_or_else(|| self.plan_error(n, "a loss over no rows".into()))?;
        let Some(dw) = dw else {
            return Ok(vec![loss]);
        };
        let dh = match dh_rows.len() {
            1 => dh_rows.swap_remove(0),
            _ => self.placing(&dh_place, || {
                eval(Op::Concat {
                    xs: dh_rows.iter().collect(),
                    dim: 0,
                })
            })?,
        };
        Ok(vec![loss, be.reshape(dh, h_shape), dw])
    }
}
