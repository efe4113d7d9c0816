//! Training: AdamW with decoupled weight decay, a linear warm-up then cosine learning-rate
//! schedule, and gradient clipping by the global norm, on weights that stay sharded across the
//! ranks between steps.
//!
//! ```text
//! tokens ─► Batches (consecutive windows, a resumable position)
//!        ─► step: run the plan (exec::run_on, on the trainer's backend) ─► each rank's gradient shards
//!        ─► global norm (split parameters summed over tp, replicated ones counted once)
//!        ─► clip ─► AdamW on every rank's shards, in place, on the device (Backend::adamw)
//! ```
//!
//! Every rank's gradients are already reduced over both mesh axes and laid out like its
//! parameters (the plan does that), so each rank updates its own shards with no further
//! communication, and data-parallel replicas stay identical. Dropout masks change with the
//! step, so a run resumed at step `k` replays exactly the masks of the uninterrupted one.

use crate::backend::{AdamW, Backend, Cpu};
use crate::checkpoint::{self, CheckpointError, CheckpointMeta};
use crate::cpu::kernels::KernelError;
use crate::exec::{gather_params, run_on, shard_params, ExecError, RunOptions};
use crate::Tensor;
use ferrotron_ir::graph::EntityRef;
use ferrotron_partitioner::{Layout, Plan};
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
}

/// A model being trained: its plan, every rank's weight shards and AdamW moments, on a backend
/// (the CPU's by default; on the CUDA backend they live in GPU memory and the update runs there).
pub struct Trainer<'p, B: Backend = Cpu> {
    /// The plan it runs.
    pub plan: &'p Plan,
    /// The settings.
    pub config: TrainConfig,
    /// Where the ranks compute.
    pub backend: B,
    /// `[rank][param]` weight shards: the master weights, `f32`.
    pub shards: Vec<Vec<B::Tensor>>,
    /// AdamW's first moments, laid out like `shards`.
    pub m: Vec<Vec<B::Tensor>>,
    /// AdamW's second moments, laid out like `shards`.
    pub v: Vec<Vec<B::Tensor>>,
    /// Steps taken.
    pub step: u64,
    /// How to run each step.
    pub run: RunOptions,
}

impl<'p> Trainer<'p, Cpu> {
    /// A trainer on CPU threads starting from full weights (model shapes, by name).
    pub fn new(
        plan: &'p Plan,
        config: TrainConfig,
        params: &HashMap<String, Tensor>,
        run: RunOptions,
    ) -> Result<Trainer<'p>, ExecError> {
        Trainer::on(Cpu, plan, config, params, run)
    }
}

impl<'p, B: Backend> Trainer<'p, B> {
    /// A trainer on `backend` starting from full weights (model shapes, by name): each rank's
    /// shards go to the device through the rank's backend, with zero moments.
    pub fn on(
        backend: B,
        plan: &'p Plan,
        config: TrainConfig,
        params: &HashMap<String, Tensor>,
        run: RunOptions,
    ) -> Result<Trainer<'p, B>, ExecError> {
        let host = shard_params(plan, params)?;
        let zeros: Vec<Vec<Tensor>> = host
            .iter()
            .map(|r| r.iter().map(|t| Tensor::zeros(t.shape.clone())).collect())
            .collect();
        Ok(Trainer {
            plan,
            config,
            shards: upload_masters(&backend, plan, &host)?,
            m: upload_masters(&backend, plan, &zeros)?,
            v: upload_masters(&backend, plan, &zeros)?,
            backend,
            step: 0,
            run,
        })
    }

    /// One step on a full batch (every graph input, by name).
    pub fn step(&mut self, batch: &HashMap<String, Tensor>) -> Result<StepStats, ExecError> {
        let started = std::time::Instant::now();
        let opts = RunOptions {
            dropout_seed: self.step + 1,
            ..self.run.clone()
        };
        let plan = self.plan;
        let device = |e: KernelError| ExecError::Plan(format!("the optimizer step failed: {e}"));
        // The weights the step computes with (a bf16 copy of the masters under mixed precision).
        let weights = self
            .shards
            .iter()
            .enumerate()
            .map(|(r, rank)| {
                let be = self.backend.on_rank(r);
                rank.iter().map(|w| be.compute_weights(w)).collect()
            })
            .collect::<Result<Vec<Vec<B::Tensor>>, _>>()
            .map_err(device)?;
        let result = run_on(self.backend.clone(), plan, &weights, batch, &opts)?;
        drop(weights);
        let loss = result.loss()?;
        let (tp, dp) = (plan.mesh.tp as usize, plan.mesh.dp as usize);
        // Each rank's gradient shards, in parameter order.
        let mut grads: Vec<Vec<Option<B::Tensor>>> = Vec::with_capacity(tp * dp);
        for rank in result.ranks {
            grads.push(take_grads(plan, rank.values)?);
        }
        // The global norm: a split parameter's shards over the tp ranks, a replicated one once.
        let mut sumsq = 0.0f64;
        for (p, _) in plan.graph.params.iter() {
            let i = p.index();
            let split = matches!(plan.shard(p).layout.tp, Layout::Split(_));
            let ranks = if split { tp } else { 1 };
            for (r, rank) in grads.iter().enumerate().take(ranks) {
                if let Some(g) = &rank[i] {
                    sumsq += self.backend.on_rank(r).sum_squares(g).map_err(device)?;
                }
            }
        }
        let norm = sumsq.sqrt();
        let clip = clip_factor(&self.config, norm);
        let lr = self.config.lr_at(self.step);
        let step = u32::try_from(self.step + 1)
            .map_err(|_| ExecError::Plan("more than 2^32 steps".into()))?;
        for (r, rank_grads) in grads.into_iter().enumerate() {
            update_rank(
                &self.backend.on_rank(r),
                &self.config,
                Moments {
                    w: &mut self.shards[r],
                    m: &mut self.m[r],
                    v: &mut self.v[r],
                },
                rank_grads,
                lr,
                step,
                clip,
            )
            .map_err(device)?;
        }
        self.step += 1;
        Ok(StepStats {
            step: self.step - 1,
            loss,
            grad_norm: norm,
            lr,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Every rank's tensors of `which` (`shards`, `m` or `v`) copied to the host.
    fn host(&self, which: &[Vec<B::Tensor>]) -> Result<Vec<Vec<Tensor>>, ExecError> {
        which
            .iter()
            .enumerate()
            .map(|(r, rank)| {
                let be = self.backend.on_rank(r);
                rank.iter()
                    .map(|t| {
                        be.download(t).map_err(|e| {
                            ExecError::Plan(format!("copying the weights to the host: {e}"))
                        })
                    })
                    .collect()
            })
            .collect()
    }
}

/// One rank's master weights and AdamW moments, in parameter order.
struct Moments<'a, T> {
    w: &'a mut [T],
    m: &'a mut [T],
    v: &'a mut [T],
}

/// AdamW on one rank's shards with its gradients (`None`: a parameter the loss ignores),
/// clipped by `clip`; matrices and embeddings decay, biases and norm weights do not.
#[allow(clippy::too_many_arguments)] // a rank's state and the step's settings
fn update_rank<B: Backend>(
    be: &B,
    c: &TrainConfig,
    state: Moments<'_, B::Tensor>,
    grads: Vec<Option<B::Tensor>>,
    lr: f64,
    step: u32,
    clip: f64,
) -> Result<(), KernelError> {
    for (i, g) in grads.into_iter().enumerate() {
        let Some(g) = g else { continue };
        let w = &mut state.w[i];
        let decay = if be.shape(w).len() >= 2 {
            c.weight_decay
        } else {
            0.0
        };
        let hyper = AdamW {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: decay,
        };
        be.adamw(w, &g, &mut state.m[i], &mut state.v[i], hyper, step, clip)?;
    }
    Ok(())
}

/// The clipping factor for a global gradient norm.
fn clip_factor(config: &TrainConfig, norm: f64) -> f64 {
    if config.clip > 0.0 && norm > config.clip {
        config.clip / norm
    } else {
        1.0
    }
}

/// One rank of a model being trained in its own process (under `ferrotron launch`): its weight
/// shards and moments, its tensor- and data-parallel groups. Every rank of the job calls
/// [`RankTrainer::step`] with the same batch; the global gradient norm is summed over the
/// tensor-parallel group (replicated parameters counted on tp rank 0 only), so every rank clips
/// by the same factor and the data-parallel replicas stay identical, as with [`Trainer`].
pub struct RankTrainer<'p, B: Backend = Cpu> {
    /// The plan it runs.
    pub plan: &'p Plan,
    /// The settings.
    pub config: TrainConfig,
    /// Where this rank computes.
    pub backend: B,
    /// This rank, `t + tp · d`.
    pub rank: usize,
    tp_group: std::sync::Arc<B::Group>,
    dp_group: std::sync::Arc<B::Group>,
    /// This rank's master weight shards, in parameter order.
    pub shards: Vec<B::Tensor>,
    /// AdamW's first moments.
    pub m: Vec<B::Tensor>,
    /// AdamW's second moments.
    pub v: Vec<B::Tensor>,
    /// Steps taken.
    pub step: u64,
    /// How to run each step.
    pub run: RunOptions,
}

impl<'p, B: Backend> RankTrainer<'p, B> {
    /// Rank `rank` of a trainer starting from full weights (model shapes, by name), with its
    /// groups already formed.
    pub fn new(
        backend: B,
        plan: &'p Plan,
        config: TrainConfig,
        params: &HashMap<String, Tensor>,
        rank: usize,
        (tp_group, dp_group): (std::sync::Arc<B::Group>, std::sync::Arc<B::Group>),
        run: RunOptions,
    ) -> Result<RankTrainer<'p, B>, ExecError> {
        let (tp, dp) = (plan.mesh.tp as usize, plan.mesh.dp as usize);
        if rank >= tp * dp {
            return Err(ExecError::Plan(format!(
                "rank {rank} of a {tp} × {dp} mesh"
            )));
        }
        let host = shard_params(plan, params)?.swap_remove(rank);
        let zeros: Vec<Tensor> = host
            .iter()
            .map(|t| Tensor::zeros(t.shape.clone()))
            .collect();
        let up = |h: Vec<Tensor>| -> Result<Vec<B::Tensor>, ExecError> {
            Ok(upload_masters(&backend, plan, &[h])?.swap_remove(0))
        };
        let (shards, m, v) = (up(host)?, up(zeros.clone())?, up(zeros)?);
        Ok(RankTrainer {
            plan,
            config,
            backend,
            rank,
            tp_group,
            dp_group,
            shards,
            m,
            v,
            step: 0,
            run,
        })
    }

    /// One step on the full batch (this rank takes its shard of it).
    pub fn step(&mut self, batch: &HashMap<String, Tensor>) -> Result<StepStats, ExecError> {
        let started = std::time::Instant::now();
        let opts = RunOptions {
            dropout_seed: self.step + 1,
            ..self.run.clone()
        };
        let plan = self.plan;
        let be = &self.backend;
        let tp = plan.mesh.tp as usize;
        let (t, d) = (self.rank % tp, self.rank / tp);
        let device = |e: KernelError| ExecError::Plan(format!("the optimizer step failed: {e}"));
        let comm = |e: crate::comm::CommError| ExecError::Plan(format!("the optimizer step: {e}"));
        let weights = self
            .shards
            .iter()
            .map(|w| be.compute_weights(w))
            .collect::<Result<Vec<_>, _>>()
            .map_err(device)?;
        let result = crate::exec::run_rank(
            be,
            plan,
            self.rank,
            &weights,
            batch,
            self.tp_group.clone(),
            self.dp_group.clone(),
            &opts,
        )?;
        drop(weights);
        let values = result.values;
        // Each data-parallel rank holds its addend of the loss.
        let loss_value = values
            .get(&plan.loss)
            .ok_or_else(|| ExecError::Plan("the loss was not kept".into()))?;
        let mut loss = [be.read_scalar(loss_value).map_err(device)?];
        be.all_reduce_host(&self.dp_group, d, &mut loss, crate::comm::ReduceOp::Sum)
            .map_err(comm)?;
        let grads = take_grads(plan, values)?;
        // The global norm: split parameters' shards summed over the tp group, replicated ones
        // counted once (on tp rank 0). Gradients are already reduced over dp.
        let mut sumsq = 0.0f64;
        for (p, _) in plan.graph.params.iter() {
            let split = matches!(plan.shard(p).layout.tp, Layout::Split(_));
            if let (Some(g), true) = (&grads[p.index()], split || t == 0) {
                sumsq += be.sum_squares(g).map_err(device)?;
            }
        }
        // Summed as two f32 halves, so the f64 total survives the f32 collective.
        let hi = sumsq as f32;
        let mut parts = [hi, (sumsq - f64::from(hi)) as f32];
        be.all_reduce_host(&self.tp_group, t, &mut parts, crate::comm::ReduceOp::Sum)
            .map_err(comm)?;
        let norm = (f64::from(parts[0]) + f64::from(parts[1])).max(0.0).sqrt();
        let clip = clip_factor(&self.config, norm);
        let lr = self.config.lr_at(self.step);
        let step = u32::try_from(self.step + 1)
            .map_err(|_| ExecError::Plan("more than 2^32 steps".into()))?;
        update_rank(
            be,
            &self.config,
            Moments {
                w: &mut self.shards,
                m: &mut self.m,
                v: &mut self.v,
            },
            grads,
            lr,
            step,
            clip,
        )
        .map_err(device)?;
        self.step += 1;
        Ok(StepStats {
            step: self.step - 1,
            loss: loss[0],
            grad_norm: norm,
            lr,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Every rank's host tensors uploaded as master weights through the rank's backend.
fn upload_masters<B: Backend>(
    backend: &B,
    plan: &Plan,
    host: &[Vec<Tensor>],
) -> Result<Vec<Vec<B::Tensor>>, ExecError> {
    host.iter()
        .enumerate()
        .map(|(r, rank)| {
            let be = backend.on_rank(r);
            rank.iter()
                .zip(plan.graph.params.values())
                .map(|(t, data)| {
                    be.upload_master(t).map_err(|e| ExecError::Feed {
                        what: "parameter",
                        name: data.name.clone(),
                        problem: format!("could not be copied to the device: {e}"),
                    })
                })
                .collect()
        })
        .collect()
}

/// Saving or resuming failed.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Sharding the weights for this plan failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The checkpoint is of another model, or lacks the optimizer state.
    #[error("{0}")]
    Mismatch(String),
}

impl<'p, B: Backend> Trainer<'p, B> {
    /// Writes the weights, the AdamW moments and the step to `dir` (sharded safetensors and
    /// metadata, atomically), with the data position and whatever `extra` describes the run.
    pub fn save(
        &self,
        dir: &std::path::Path,
        seed: u64,
        data_position: u64,
        extra: serde_json::Value,
    ) -> Result<(), ResumeError> {
        let params = gather_params(self.plan, &self.host(&self.shards)?)?;
        let m = gather_params(self.plan, &self.host(&self.m)?)?;
        let v = gather_params(self.plan, &self.host(&self.v)?)?;
        let meta = CheckpointMeta {
            model: self.plan.model.clone(),
            step: self.step,
            seed,
            data_position,
            extra,
            ..CheckpointMeta::default()
        };
        checkpoint::save(
            dir,
            self.plan,
            &meta,
            &[("params", &params), ("adam_m", &m), ("adam_v", &v)],
        )?;
        Ok(())
    }

    /// A trainer continuing from a checkpoint written by [`Trainer::save`] (at any tp: the
    /// full tensors are re-sharded for `plan`), and the checkpoint's metadata.
    pub fn resume(
        backend: B,
        plan: &'p Plan,
        dir: &std::path::Path,
        config: TrainConfig,
        run: RunOptions,
    ) -> Result<(Trainer<'p, B>, CheckpointMeta), ResumeError> {
        let (meta, [params, m, v]) = load_state(plan, dir)?;
        let mut trainer = Trainer::on(backend, plan, config, &params, run)?;
        trainer.m = upload_masters(&trainer.backend, plan, &shard_params(plan, &m)?)?;
        trainer.v = upload_masters(&trainer.backend, plan, &shard_params(plan, &v)?)?;
        trainer.step = meta.step;
        Ok((trainer, meta))
    }
}

/// A checkpoint's metadata and its weights and AdamW moments (full tensors), checked to be of
/// `plan`'s model.
fn load_state(
    plan: &Plan,
    dir: &std::path::Path,
) -> Result<(CheckpointMeta, [HashMap<String, Tensor>; 3]), ResumeError> {
    let (meta, mut groups) = checkpoint::load(dir)?;
    if meta.model != plan.model {
        return Err(ResumeError::Mismatch(format!(
            "{}: a checkpoint of `{}`, not of `{}`",
            dir.display(),
            meta.model,
            plan.model
        )));
    }
    let mut take = |g: &str| {
        groups.remove(g).ok_or_else(|| {
            ResumeError::Mismatch(format!("{}: no `{g}` in the checkpoint", dir.display()))
        })
    };
    Ok((meta, [take("params")?, take("adam_m")?, take("adam_v")?]))
}

impl<'p, B: Backend> RankTrainer<'p, B> {
    /// Writes the job's checkpoint (as [`Trainer::save`] does): every rank of the first
    /// data-parallel replica sends its shards to tp rank 0 over the tensor-parallel group, and
    /// rank 0 writes the files. Every rank of the job calls it (the others return at once).
    pub fn save(
        &self,
        dir: &std::path::Path,
        seed: u64,
        data_position: u64,
        extra: serde_json::Value,
    ) -> Result<(), ResumeError> {
        let tp = self.plan.mesh.tp as usize;
        let (t, d) = (self.rank % tp, self.rank / tp);
        if d != 0 {
            return Ok(()); // data-parallel replicas hold the same shards
        }
        let mut state = Vec::with_capacity(3);
        for which in [&self.shards, &self.m, &self.v] {
            state.push(self.gather_to_first(which, t, tp)?);
        }
        if t != 0 {
            return Ok(());
        }
        let full = state
            .iter()
            .map(|ranks| gather_params(self.plan, ranks))
            .collect::<Result<Vec<_>, _>>()?;
        let meta = CheckpointMeta {
            model: self.plan.model.clone(),
            step: self.step,
            seed,
            data_position,
            extra,
            ..CheckpointMeta::default()
        };
        checkpoint::save(
            dir,
            self.plan,
            &meta,
            &[
                ("params", &full[0]),
                ("adam_m", &full[1]),
                ("adam_v", &full[2]),
            ],
        )?;
        Ok(())
    }

    /// Every tp rank's tensors of `which`, on the host of tp rank 0 (`[tp][param]`; empty on
    /// the others): an all-gather of each flattened shard over the tensor-parallel group.
    fn gather_to_first(
        &self,
        which: &[B::Tensor],
        t: usize,
        tp: usize,
    ) -> Result<Vec<Vec<Tensor>>, ResumeError> {
        let be = &self.backend;
        let failed = |e: String| ResumeError::Mismatch(format!("gathering the shards: {e}"));
        let mut ranks: Vec<Vec<Tensor>> = vec![Vec::with_capacity(which.len()); tp];
        for x in which {
            let shape = be.shape(x).to_vec();
            let n: usize = shape.iter().product();
            let flat = be.reshape(x.clone(), vec![n]);
            let all = be
                .all_gather(&self.tp_group, t, &flat, 0)
                .map_err(|e| failed(e.to_string()))?;
            if t == 0 {
                let all = be.download(&all).map_err(|e| failed(e.to_string()))?;
                for (r, rank) in ranks.iter_mut().enumerate() {
                    rank.push(Tensor {
                        shape: shape.clone(),
                        data: all.data[r * n..(r + 1) * n].to_vec(),
                    });
                }
            }
        }
        Ok(if t == 0 { ranks } else { Vec::new() })
    }

    /// Rank `rank` continuing from a checkpoint written by [`Trainer::save`] or
    /// [`RankTrainer::save`] (at any tp), and the checkpoint's metadata.
    #[allow(clippy::too_many_arguments)] // a rank's whole context
    pub fn resume(
        backend: B,
        plan: &'p Plan,
        dir: &std::path::Path,
        config: TrainConfig,
        rank: usize,
        groups: (std::sync::Arc<B::Group>, std::sync::Arc<B::Group>),
        run: RunOptions,
    ) -> Result<(RankTrainer<'p, B>, CheckpointMeta), ResumeError> {
        let (meta, [params, m, v]) = load_state(plan, dir)?;
        let mut trainer = RankTrainer::new(backend, plan, config, &params, rank, groups, run)?;
        let mine = |full: &HashMap<String, Tensor>| -> Result<Vec<B::Tensor>, ResumeError> {
            let host = shard_params(plan, full)?.swap_remove(rank);
            Ok(upload_masters(&trainer.backend, plan, &[host])?.swap_remove(0))
        };
        let (m, v) = (mine(&m)?, mine(&v)?);
        trainer.m = m;
        trainer.v = v;
        trainer.step = meta.step;
        Ok((trainer, meta))
    }
}

/// A rank's gradient shards out of its kept values, at their parameter's index (`None` for a
/// parameter the loss ignores).
fn take_grads<T>(
    plan: &Plan,
    mut values: HashMap<ferrotron_ir::ValueId, T>,
) -> Result<Vec<Option<T>>, ExecError> {
    let mut out: Vec<Option<T>> = (0..plan.graph.params.len()).map(|_| None).collect();
    for (p, g) in &plan.grads {
        let x = values.remove(g).ok_or_else(|| {
            ExecError::Plan(format!("no gradient for `{}`", plan.graph.params[*p].name))
        })?;
        out[p.index()] = Some(x);
    }
    Ok(out)
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
                data,
            },
        )])
    }
}
