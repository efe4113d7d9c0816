//! Training: AdamW with decoupled weight decay, a linear warm-up then cosine learning-rate
//! schedule, and gradient clipping by the global norm, on weights that stay sharded across the
//! ranks between steps.
//!
//! ```text
//! tokens ─► Batches (consecutive windows, a resumable position)
//!        ─► Trainer::step on every rank: its part of the step (Rank::run) ─► its gradient shards
//!        ─► global norm (split parameters summed over tp, replicated ones counted once)
//!        ─► clip ─► AdamW on its shards, in place, on its device (Backend::adamw)
//! ```
//!
//! Every rank's gradients are already reduced over both mesh axes and laid out like its
//! parameters (the plan does that), so each rank updates its own shards with no further
//! communication, and data-parallel replicas stay identical. Dropout masks change with the
//! step, so a run resumed at step `k` replays exactly the masks of the uninterrupted one.

use crate::backend::{AdamW, Backend};
use crate::comm::Comm;
use crate::error::ExecError;
use crate::kernel::KernelError;
use crate::link::Tag;
use crate::program::{Executable, RunOptions};
use crate::rank::Rank;
use crate::run::{gather_stage_params, shard_params_for, upload_rank, ParamSource};
use crate::zero;
use crate::Tensor;
use ferrotron_ir::{MeshAxis, ParamId};
use ferrotron_partitioner::{Coord, Layout, Plan};
use std::collections::HashMap;

/// Optimizer and schedule settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup: u64,
    /// Total steps (the cosine reaches `min_lr` here).
    pub steps: u64,
    /// Decoupled weight decay, applied to matrices and embeddings (rank ≥ 2), not to biases or
    /// norm weights.
    pub weight_decay: f64,
    /// Adam's β₁.
    pub beta1: f64,
    /// Adam's β₂.
    pub beta2: f64,
    /// Adam's ε.
    pub eps: f64,
    /// Largest global gradient norm; larger gradients are scaled down to it (0: no clipping).
    pub clip: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 10,
            steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip: 1.0,
        }
    }
}

impl TrainConfig {
    /// The learning rate at `step` (counted from 0).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.lr - self.min_lr) * cosine
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// The step's index (from 0).
    pub step: u64,
    /// The loss before the update.
    pub loss: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
    /// Wall time of the step in seconds.
    pub seconds: f64,
    /// The most bytes the forward and backward pass held at once: the weights it computed with
    /// and its values (the optimizer's moments and, under mixed precision, the `f32` masters
    /// apart). [`Trainer::memory_plan`] plans the same figure.
    pub peak_bytes: usize,
    /// On a backend with an arena and a memory plan: the rank's arena, and how many of the
    /// step's values were placed in it and missed ([`crate::arena`]).
    pub arena: Option<crate::arena::ArenaStats>,
}

/// One rank of a model being trained: its weight shards and AdamW moments on its device, and
/// its groups. Every rank of the job (threads of this process under [`crate::launch`], or
/// processes under `ferrotron launch`) runs the same trainer with the same batches: each takes its
/// shard of the batch, the global gradient norm is summed over the tensor-parallel group
/// (replicated parameters counted on tp rank 0 only), so every rank clips by the same factor,
/// and each updates its own shards (the plan already reduced the gradients over both axes), so
/// data-parallel replicas stay identical.
pub struct Trainer<'p, B: Backend> {
    /// The plan it runs.
    pub plan: &'p Plan,
    /// The settings.
    pub config: TrainConfig,
    /// The rank this trainer is: its place in the mesh, its device and its groups.
    pub rank: Rank<B>,
    /// The plan prepared to run (its options: how to run each step).
    exe: Executable<'p>,
    /// This rank's master weight shards (`f32`), in parameter order.
    pub weights: Vec<B::Tensor>,
    /// AdamW's first moments, laid out like `weights`; under the distributed optimizer, of
    /// this rank's share of each (1-D, [`Plan::optimizer_share`]).
    pub m: Vec<B::Tensor>,
    /// AdamW's second moments, laid out like `m`.
    pub v: Vec<B::Tensor>,
    /// Steps taken.
    pub step: u64,
}

impl<'p, B: Backend> Trainer<'p, B> {
    /// `rank`'s trainer, starting from its shards of the weights `params` with zero moments.
    pub fn new<S: ParamSource + ?Sized>(
        rank: Rank<B>,
        plan: &'p Plan,
        config: TrainConfig,
        params: &S,
        run: RunOptions,
    ) -> Result<Trainer<'p, B>, ExecError> {
        if rank.mesh != plan.mesh {
            return Err(ExecError::Plan(format!(
                "a rank of a {} × {} mesh for a {} × {} plan",
                rank.mesh.tp, rank.mesh.dp, plan.mesh.tp, plan.mesh.dp
            )));
        }
        let host = shard_params_for(plan, params, rank.coord)?;
        let zeros: Vec<Tensor> = host
            .iter()
            .map(|t| Tensor::zeros(t.shape.clone()))
            .collect();
        let weights = upload_rank(&rank.backend, plan, rank.coord, &host, true)?;
        let m = upload_moments(&rank, plan, &zeros)?;
        let v = upload_moments(&rank, plan, &zeros)?;
        Ok(Trainer {
            plan,
            config,
            // A step reads the loss and the gradients: the outputs (the logits) go at their
            // last reader.
            exe: Executable::new(
                plan,
                &RunOptions {
                    keep_outputs: false,
                    ..run
                },
            )?,
            rank,
            weights,
            m,
            v,
            step: 0,
        })
    }

    /// The memory plan of a step's forward and backward pass on this rank
    /// ([`crate::memory::plan`]: its pipeline stage's).
    pub fn memory_plan(&self) -> crate::memory::MemoryPlan {
        crate::memory::plan(&self.exe, self.rank.coord.pp, &|d| {
            self.rank.backend.element_bytes(d)
        })
    }

    /// One step on a full batch (every graph input, by name; this rank takes its shard): the
    /// forward and backward pass, the global gradient norm, clipping, AdamW. On failure the
    /// rank's groups are aborted, so its peers stop too.
    pub fn step(&mut self, batch: &HashMap<String, Tensor>) -> Result<StepStats, ExecError> {
        let started = std::time::Instant::now();
        // Dropout masks change with the step (a resumed run replays the same ones).
        self.exe.opts.dropout_seed = self.step + 1;
        let (plan, rank) = (self.plan, &self.rank);
        let be = &rank.backend;
        let device = |e: KernelError| ExecError::Plan(format!("the optimizer step failed: {e}"));
        // The weights the step computes with: the masters themselves, or (under mixed
        // precision) a bf16 copy of them.
        let copies = rank.guard(|| {
            self.weights
                .iter()
                .map(|w| be.compute_weights(w))
                .collect::<Result<Vec<_>, _>>()
                .map_err(device)
        })?;
        let copies: Option<Vec<B::Tensor>> = match copies.iter().any(Option::is_some) {
            true => Some(
                copies
                    .into_iter()
                    .zip(&self.weights)
                    .map(|(c, w)| c.unwrap_or_else(|| w.clone()))
                    .collect(),
            ),
            false => None,
        };
        let result = rank.run(&self.exe, copies.as_deref().unwrap_or(&self.weights), batch)?;
        drop(copies);
        let (peak_bytes, arena) = (result.peak_bytes, result.arena);
        let (config, step) = (&self.config, self.step);
        let (w, m, v) = (&mut self.weights, &mut self.m, &mut self.v);
        let stats = rank.guard(|| {
            let values = result.values;
            // Each data-parallel rank of the last stage holds its addend of the loss.
            let mut loss = [match values.get(&plan.loss) {
                Some(x) => be.read_scalar(x).map_err(device)?,
                None if rank.coord.pp + 1 < plan.mesh.pp as usize => 0.0,
                None => return Err(ExecError::Plan("the loss was not kept".into())),
            }];
            rank.sum_over(MeshAxis::Dp, &mut loss, "the loss")?;
            let params = plan.params_on(rank.coord.pp);
            let mut grads = take_grads(plan, &params, values)?;
            let distributed = plan.distributed_optimizer();
            if distributed {
                // Each dp rank's share of the summed gradients.
                for (&p, g) in params.iter().zip(&mut grads) {
                    if let Some(t) = g.take() {
                        let summed = plan.grads.iter().find(|(q, _)| *q == p).map(|(_, v)| *v);
                        let dp_layout = summed.map_or(Layout::Replicated, |v| plan.layouts[v].dp);
                        *g = Some(zero::share(rank, plan, p, &t, dp_layout)?);
                    }
                }
            }
            // The global norm: split parameters' shards summed over the tp group, replicated ones
            // counted once (on tp rank 0), a tied one once (on the stage that summed it), then
            // the stages' sums added. Gradients are already reduced over dp (or, with the
            // distributed optimizer, each dp rank's shares summed over dp).
            let mut counted = Vec::with_capacity(grads.len());
            for (&p, g) in params.iter().zip(&grads) {
                let split = matches!(plan.shard(p).layout.tp, Layout::Split(_));
                let owner = plan
                    .pipeline
                    .as_ref()
                    .and_then(|pipe| pipe.grad_owner(p))
                    .is_none_or(|s| s as usize == rank.coord.pp);
                if let (Some(g), true) = (g, (split || rank.coord.tp == 0) && owner) {
                    counted.push(g);
                }
            }
            let sumsq = be.sum_squares_all(&counted).map_err(device)?;
            let mut stage_sumsq = all_gather_f64(rank, MeshAxis::Tp, sumsq)?
                .into_iter()
                .sum::<f64>();
            if distributed {
                stage_sumsq = all_gather_f64(rank, MeshAxis::Dp, stage_sumsq)?
                    .into_iter()
                    .sum::<f64>();
            }
            // Every stage learns the others' sums and the last stage's loss.
            let seq = u32::try_from(step).unwrap_or(u32::MAX);
            let [stage_sumsq, stage_loss] =
                rank.sum_over_stages([stage_sumsq, f64::from(loss[0])], seq)?;
            let norm = stage_sumsq.sqrt();
            loss[0] = stage_loss as f32;
            let clip = clip_factor(config, norm);
            let lr = config.lr_at(step);
            let step1 = u32::try_from(step + 1)
                .map_err(|_| ExecError::Plan("more than 2^32 steps".into()))?;
            for (i, g) in grads.iter().enumerate() {
                let Some(g) = g else { continue };
                // Tied copies receive the same summed gradient: they stay identical.
                // Matrices and embeddings decay; biases and norm weights do not.
                let decay = if be.shape(&w[i]).len() >= 2 {
                    config.weight_decay
                } else {
                    0.0
                };
                let update = AdamW {
                    lr,
                    beta1: config.beta1,
                    beta2: config.beta2,
                    eps: config.eps,
                    weight_decay: decay,
                    step: step1,
                    grad_scale: clip,
                };
                if distributed {
                    // The share of the weights updated, then every dp rank's gathered.
                    let p = params[i];
                    let mut own = zero::share(rank, plan, p, &w[i], Layout::Replicated)?;
                    be.adamw(&mut own, g, (&mut m[i], &mut v[i]), update)
                        .map_err(device)?;
                    let shape = be.shape(&w[i]).to_vec();
                    w[i] = zero::unshare(rank, plan, p, &own, &shape)?;
                } else {
                    be.adamw(&mut w[i], g, (&mut m[i], &mut v[i]), update)
                        .map_err(device)?;
                }
            }
            // A tied gradient came from another stage's device queue, which frees it when it
            // is dropped: the updates must have read it first.
            if plan.pipeline.as_ref().is_some_and(|p| !p.tied.is_empty()) {
                be.synchronize().map_err(device)?;
            }
            drop(grads);
            Ok(StepStats {
                step,
                loss: loss[0],
                grad_norm: norm,
                lr,
                seconds: started.elapsed().as_secs_f64(),
                peak_bytes,
                arena,
            })
        })?;
        self.step += 1;
        Ok(stats)
    }

    /// The whole model's state, for a checkpoint: the weights and the AdamW moments as full
    /// tensors (model shapes, by name), gathered over the tensor-parallel group to its rank 0.
    /// Every rank of the job calls it; the rank at tp 0, dp 0 gets `Some`, the others `None`
    /// (data-parallel replicas hold the same shards and do not take part).
    pub fn gather_state(&self) -> Result<Option<[HashMap<String, Tensor>; 3]>, ExecError> {
        // The distributed optimizer's moment shares are gathered over dp first (by every dp
        // rank), so a checkpoint holds whole tensors and loads at any dp, with or without it.
        let (m, v) = if self.plan.distributed_optimizer() {
            (self.unshare(&self.m)?, self.unshare(&self.v)?)
        } else {
            (Vec::new(), Vec::new())
        };
        if self.rank.coord.dp != 0 {
            return Ok(None);
        }
        let (m, v) = if self.plan.distributed_optimizer() {
            (&m, &v)
        } else {
            (&self.m, &self.v)
        };
        let mut state = Vec::with_capacity(3);
        for which in [&self.weights, m, v] {
            state.push(self.gather_to_first(which)?);
        }
        if self.rank.coord.tp != 0 {
            return Ok(None);
        }
        let stage = self.rank.coord.pp;
        let mut full = state
            .iter()
            .map(|ranks| gather_stage_params(self.plan, stage, ranks))
            .collect::<Result<Vec<_>, _>>()?;
        if self.plan.mesh.pp > 1 {
            self.gather_stages(&mut full)?;
            if stage != 0 {
                return Ok(None);
            }
        }
        let mut full = full.into_iter();
        let mut next = || full.next().unwrap_or_default();
        Ok(Some([next(), next(), next()]))
    }

    /// The stages' full tensors (`full`: this stage's, one map per group) brought to the first
    /// stage's leader: every other stage's leader (tp 0, dp 0) sends its own, the first adds
    /// them to `full`.
    fn gather_stages(&self, full: &mut [HashMap<String, Tensor>]) -> Result<(), ExecError> {
        let rank = &self.rank;
        let Some(link) = &rank.link else {
            return Err(ExecError::Plan(format!(
                "rank ({}) of a pipeline has no link to the other stages",
                rank.coord
            )));
        };
        let be = &rank.backend;
        let plan = self.plan;
        let failed = |e: String| ExecError::Plan(format!("gathering the stages' state: {e}"));
        let comm = |error| ExecError::Comm {
            at: rank.coord,
            node: "the stages' state".into(),
            group: None,
            error,
        };
        let leader = |pp| rank.mesh.rank(Coord { tp: 0, dp: 0, pp });
        let tag = |group: usize, k: usize| Tag {
            transfer: u32::MAX - 1 - group as u32,
            micro_batch: k as u32,
        };
        let me = rank.index();
        if rank.coord.pp != 0 {
            for (group, tensors) in full.iter().enumerate() {
                for (k, p) in plan.params_on(rank.coord.pp).into_iter().enumerate() {
                    let t = &tensors[&plan.graph.params[p].name];
                    let t = be.upload_master(t).map_err(|e| failed(e.to_string()))?;
                    link.send(me, leader(0), tag(group, k), t).map_err(comm)?;
                }
            }
            return Ok(());
        }
        for stage in 1..plan.mesh.pp as usize {
            for (group, tensors) in full.iter_mut().enumerate() {
                for (k, p) in plan.params_on(stage).into_iter().enumerate() {
                    let t = link.recv(leader(stage), me, tag(group, k)).map_err(comm)?;
                    let t = be.download(&t).map_err(|e| failed(e.to_string()))?;
                    tensors
                        .entry(plan.graph.params[p].name.clone())
                        .or_insert(t);
                }
            }
        }
        Ok(())
    }

    /// Every tp rank's tensors of `which`, on the host of tp rank 0 (`[tp][param]`; empty on
    /// the others): an all-gather of each flattened shard over the tensor-parallel group.
    fn gather_to_first(&self, which: &[B::Tensor]) -> Result<Vec<Vec<Tensor>>, ExecError> {
        let rank = &self.rank;
        let (be, tp) = (&rank.backend, self.plan.mesh.tp as usize);
        let first = rank.coord.tp == 0;
        let failed = |e: String| ExecError::Plan(format!("gathering the shards: {e}"));
        let mut ranks: Vec<Vec<Tensor>> = vec![Vec::with_capacity(which.len()); tp];
        rank.guard(|| {
            for x in which {
                let shape = be.shape(x).to_vec();
                let n: usize = shape.iter().product();
                let flat = be.reshape(x.clone(), vec![n]);
                let all = rank
                    .groups
                    .tp
                    .all_gather(&flat, 0)
                    .map_err(|e| failed(e.to_string()))?;
                if first {
                    let all = be.download(&all).map_err(|e| failed(e.to_string()))?;
                    for (r, shards) in ranks.iter_mut().enumerate() {
                        shards.push(Tensor {
                            shape: shape.clone(),
                            data: all.data[r * n..(r + 1) * n].to_vec().into(),
                        });
                    }
                }
            }
            Ok(())
        })?;
        Ok(if first { ranks } else { Vec::new() })
    }

    /// The whole local shards of the moments `shares` (this rank's shares of them): every dp
    /// rank's gathered.
    fn unshare(&self, shares: &[B::Tensor]) -> Result<Vec<B::Tensor>, ExecError> {
        let (plan, rank) = (self.plan, &self.rank);
        rank.guard(|| {
            plan.params_on(rank.coord.pp)
                .into_iter()
                .zip(shares)
                .map(|(p, share)| {
                    let shape: Vec<usize> = plan
                        .shard(p)
                        .local_shape(plan.mesh)
                        .iter()
                        .map(|&d| d as usize)
                        .collect();
                    zero::unshare(rank, plan, p, share, &shape)
                })
                .collect()
        })
    }

    /// Bytes of optimizer state (the Adam moments) this rank holds.
    pub fn optimizer_bytes(&self) -> usize {
        let be = &self.rank.backend;
        self.m.iter().chain(&self.v).map(|t| be.bytes(t)).sum()
    }

    /// Replaces the AdamW moments with this rank's shards of full ones (model shapes, by name),
    /// as a checkpoint holds them, and sets the step count.
    pub fn restore(
        &mut self,
        m: &HashMap<String, Tensor>,
        v: &HashMap<String, Tensor>,
        step: u64,
    ) -> Result<(), ExecError> {
        let c = self.rank.coord;
        self.m = upload_moments(&self.rank, self.plan, &shard_params_for(self.plan, m, c)?)?;
        self.v = upload_moments(&self.rank, self.plan, &shard_params_for(self.plan, v, c)?)?;
        self.step = step;
        Ok(())
    }
}

/// Moments on `rank`'s device from its host shards of them (its stage's parameters, in order):
/// their shares under the distributed optimizer.
fn upload_moments<B: Backend>(
    rank: &Rank<B>,
    plan: &Plan,
    shards: &[Tensor],
) -> Result<Vec<B::Tensor>, ExecError> {
    if !plan.distributed_optimizer() {
        return upload_rank(&rank.backend, plan, rank.coord, shards, true);
    }
    let shares: Vec<Tensor> = plan
        .params_on(rank.coord.pp)
        .into_iter()
        .zip(shards)
        .map(|(p, t)| zero::host_share(plan, p, rank.coord.dp, t))
        .collect();
    upload_rank(&rank.backend, plan, rank.coord, &shares, true)
}

/// Every member's `x` over this rank's group along `axis`, in group order, exactly: each `f64`
/// travels as four 16-bit pieces, which `f32` sums of zeros and one piece keep exact.
fn all_gather_f64<B: Backend>(
    rank: &Rank<B>,
    axis: MeshAxis,
    x: f64,
) -> Result<Vec<f64>, ExecError> {
    let (size, me) = {
        let g = rank.groups.on(axis);
        (g.size(), g.index())
    };
    let mut buf = vec![0f32; 4 * size];
    let bits = x.to_bits();
    for k in 0..4 {
        buf[4 * me + k] = ((bits >> (16 * k)) & 0xffff) as f32;
    }
    rank.sum_over(axis, &mut buf, "the gradient norm")?;
    Ok(buf
        .chunks_exact(4)
        .map(|p| {
            let bits = p
                .iter()
                .enumerate()
                .fold(0u64, |b, (k, &x)| b | ((x as u64) << (16 * k)));
            f64::from_bits(bits)
        })
        .collect())
}

/// The clipping factor for a global gradient norm.
fn clip_factor(config: &TrainConfig, norm: f64) -> f64 {
    if config.clip > 0.0 && norm > config.clip {
        config.clip / norm
    } else {
        1.0
    }
}

/// A rank's gradient shards out of its kept values, one per parameter of `params` (its stage's),
/// `None` for a parameter the loss ignores.
fn take_grads<T>(
    plan: &Plan,
    params: &[ParamId],
    mut values: HashMap<ferrotron_ir::ValueId, T>,
) -> Result<Vec<Option<T>>, ExecError> {
    params
        .iter()
        .map(|&p| match plan.grads.iter().find(|(q, _)| *q == p) {
            None => Ok(None),
            Some((_, g)) => values.remove(g).map(Some).ok_or_else(|| {
                ExecError::Plan(format!("no gradient for `{}`", plan.graph.params[p].name))
            }),
        })
        .collect()
}

/// Consecutive windows of a token stream as `[batch, seq]` batches, from a position that a
/// checkpoint records (so a resumed run reads the same batches).
pub struct Batches {
    tokens: Vec<u32>,
    /// Where the next batch starts.
    pub position: u64,
}

impl Batches {
    /// Batches over `tokens`, starting at `position`.
    pub fn new(tokens: Vec<u32>, position: u64) -> Batches {
        Batches { tokens, position }
    }

    /// Tokens in the stream.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the stream is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The next `[batch, seq]` window (wrapping around the stream), as the value of the graph
    /// input `input`.
    pub fn next(&mut self, input: &str, batch: usize, seq: usize) -> HashMap<String, Tensor> {
        let n = self.tokens.len().max(1);
        let mut data = Vec::with_capacity(batch * seq);
        for _ in 0..batch * seq {
            let i = (self.position % n as u64) as usize;
            data.push(self.tokens.get(i).copied().unwrap_or(0) as f32);
            self.position += 1;
        }
        HashMap::from([(
            input.to_owned(),
            Tensor {
                shape: vec![batch, seq],
                data: data.into(),
            },
        )])
    }
}
