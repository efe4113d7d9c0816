//! Verification: run a partitioned plan and the unpartitioned model on the same weights and
//! batch, and compare the loss, every graph output and every gradient, gathered to full shape.
//! When they differ, find the first op (in the model's program order) whose output diverges —
//! the question every user of tensor parallelism asks ("why does my loss differ at TP=2?").
//!
//! The unpartitioned model is the same graph partitioned for one rank without vocabulary
//! padding: its f and g are identities, so it is the model itself (the plan simulator's tests
//! prove plans equal to the model in exact arithmetic; this checks the runtime's threads,
//! collectives and kernels in `f32`). Tolerances follow the dtype: relative 1e-5 on the forward
//! values and 1e-4 on gradients in `f32`, measured against the largest magnitude of the
//! reference tensor.

use crate::backend::Backend;
use crate::error::ExecError;
use crate::program::RunOptions;
use crate::run::{run, Run};
use crate::Tensor;
use ferrotron_ir::Graph;
use ferrotron_partitioner::{partition, PartitionError, PartitionOptions, Plan};
use std::collections::HashMap;
use thiserror::Error;

/// Relative tolerance of `f32` forward values.
pub const FORWARD_TOLERANCE: f64 = 1e-5;
/// Relative tolerance of `f32` gradients.
pub const GRADIENT_TOLERANCE: f64 = 1e-4;

/// The tolerances a comparison holds the partitioned run to, relative to the reference's largest
/// magnitude; they follow the dtype the run computed in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerances {
    /// The loss and the graph outputs.
    pub forward: f64,
    /// The gradients.
    pub gradient: f64,
}

impl Tolerances {
    /// `f32` throughout (the CPU backend, the CUDA backend's verification mode).
    pub const F32: Tolerances = Tolerances {
        forward: FORWARD_TOLERANCE,
        gradient: GRADIENT_TOLERANCE,
    };
    /// bf16 storage with `f32` arithmetic: bf16 keeps 8 significant bits (relative rounding
    /// 2^-9 ≈ 2e-3 per stored value), and a layer stores a few dozen values on each path.
    pub const BF16: Tolerances = Tolerances {
        forward: 3e-2,
        gradient: 6e-2,
    };
}

/// What verification compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The scalar loss.
    Loss,
    /// A graph output.
    Output,
    /// A parameter's gradient.
    Gradient,
}

/// One compared tensor.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Entry {
    /// Its name (`loss`, `logits`, a parameter's name).
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// `max |partitioned − reference| / max |reference|`.
    pub max_rel_error: f64,
    /// The tolerance it is held to.
    pub tolerance: f64,
}

impl Entry {
    /// Whether it is within tolerance.
    pub fn ok(&self) -> bool {
        self.max_rel_error <= self.tolerance
    }
}

/// The outcome of a verification.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Verification {
    /// Every compared tensor, loss first, then outputs, then gradients by parameter order.
    pub entries: Vec<Entry>,
    /// The loss of the partitioned run.
    pub loss: f32,
    /// The loss of the reference run.
    pub reference_loss: f32,
    /// On a mismatch: the first node whose output diverges, with its error.
    pub first_divergence: Option<(String, f64)>,
}

impl Verification {
    /// Whether everything is within tolerance.
    pub fn passed(&self) -> bool {
        self.entries.iter().all(Entry::ok)
    }

    /// The largest relative error of all.
    pub fn max_rel_error(&self) -> f64 {
        self.entries
            .iter()
            .map(|e| e.max_rel_error)
            .fold(0.0, f64::max)
    }
}

/// Why verification could not run.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// Partitioning failed.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// A run failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// `max |a − b| / max |b|` (the reference `b`).
pub fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    rel_error_floor(a, b, 0.0)
}

fn max_abs(t: &Tensor) -> f64 {
    t.data
        .iter()
        .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()))
}

/// `max |a − b| / max(max |b|, floor)`: a tensor whose true value is (nearly) zero — BERT's
/// attention key bias, whose gradient softmax cancels — is measured against the scale of its
/// peers rather than its own round-off.
pub fn rel_error_floor(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    if a.shape != b.shape {
        return f64::INFINITY;
    }
    let scale = max_abs(b).max(floor).max(1e-30);
    let diff = a.data.iter().zip(&b.data).fold(0.0f64, |m, (&x, &y)| {
        m.max((f64::from(x) - f64::from(y)).abs())
    });
    if a.data.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale
}

/// The leading corner of `x` shaped like `like` (drops vocabulary padding).
fn crop_like(x: &Tensor, like: &Tensor) -> Tensor {
    if x.shape == like.shape
        || x.rank() != like.rank()
        || x.shape.iter().zip(&like.shape).any(|(a, b)| a < b)
    {
        return x.clone();
    }
    x.cropped(&like.shape)
}

/// The reference plan: the model on one rank, no padding.
pub fn reference_plan(g: &Graph) -> Result<Plan, PartitionError> {
    partition(
        g,
        &PartitionOptions {
            vocab_multiple: 1,
            ..PartitionOptions::default()
        },
    )
}

/// Compares a finished run of a partitioned plan (on any backend) with a finished run of the
/// reference plan (on any backend: the CPU's, for the CLI) on the same weights and batch, both
/// run with `opts`: the loss, every gradient, and the graph's outputs where `opts` keeps them
/// (a run that does not may have run its output layer fused with the loss, never making the
/// logits whole). On a mismatch, both run again keeping every value, to find the first
/// divergent op.
pub fn compare<B: Backend, R: Backend>(
    ours: &Run<B>,
    theirs: &Run<R>,
    params: &HashMap<String, Tensor>,
    batch: &HashMap<String, Tensor>,
    opts: &RunOptions,
    tolerances: Tolerances,
) -> Result<Verification, VerifyError> {
    let outputs = match opts.keep_outputs {
        true => Outputs::Compared,
        false => Outputs::Skipped,
    };
    let mut v = compare_runs(ours, theirs, tolerances, outputs)?;
    // The search keeps every value of one micro-batch; a step of several has no such run.
    if !v.passed() && ours.plan.micro_batches() == 1 && theirs.plan.micro_batches() == 1 {
        let keep = RunOptions {
            keep_all: true,
            ..opts.clone()
        };
        let ours = run(ours.backend().clone(), ours.plan, params, batch, &keep)?;
        let theirs = run(theirs.backend().clone(), theirs.plan, params, batch, &keep)?;
        v.first_divergence = first_divergence(&ours, &theirs, tolerances)?;
    }
    Ok(v)
}

/// Whether [`compare_runs`] compares the graph's outputs (the logits) too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outputs {
    /// Both runs kept them: compared.
    Compared,
    /// Left out: runs that did not keep them (a fused loss never makes the logits whole).
    Skipped,
}

/// Compares two finished runs of one model on the same weights and batch (a partitioned plan
/// and the reference, fused and unfused steps, two backends): the loss, the outputs when asked,
/// and every gradient, held to the scale of the largest gradient. No search for a divergent op
/// ([`compare`] does that).
pub fn compare_runs<B: Backend, R: Backend>(
    ours: &Run<B>,
    theirs: &Run<R>,
    tol: Tolerances,
    outputs: Outputs,
) -> Result<Verification, VerifyError> {
    let mut entries = Vec::new();
    let (loss, reference_loss) = (ours.loss()?, theirs.loss()?);
    entries.push(Entry {
        name: "loss".into(),
        kind: Kind::Loss,
        max_rel_error: rel_error(
            &Tensor::full(Vec::new(), loss),
            &Tensor::full(Vec::new(), reference_loss),
        ),
        tolerance: tol.forward,
    });
    let plan = theirs.plan;
    for (name, v) in &plan.graph.outputs {
        if *v == plan.loss || outputs == Outputs::Skipped {
            continue;
        }
        let b = theirs.output(name)?;
        let a = crop_like(&ours.output(name)?, &b);
        entries.push(Entry {
            name: name.clone(),
            kind: Kind::Output,
            max_rel_error: rel_error(&a, &b),
            tolerance: tol.forward,
        });
    }
    let mut grads = Vec::with_capacity(plan.grads.len());
    for (p, _) in &plan.grads {
        let name = &plan.graph.params[*p].name;
        grads.push((name, ours.grad(name)?, theirs.grad(name)?));
    }
    // Gradients are held to the scale of the largest one (see `rel_error_floor`).
    let floor = 1e-3 * grads.iter().map(|(_, _, b)| max_abs(b)).fold(0.0, f64::max);
    for (name, a, b) in grads {
        entries.push(Entry {
            name: name.clone(),
            kind: Kind::Gradient,
            max_rel_error: rel_error_floor(&a, &b, floor),
            tolerance: tol.gradient,
        });
    }
    Ok(Verification {
        entries,
        loss,
        reference_loss,
        first_divergence: None,
    })
}

/// The first forward node, in the reference's program order, whose output differs between two
/// runs made with `keep_all`.
fn first_divergence<B: Backend, R: Backend>(
    ours: &Run<B>,
    theirs: &Run<R>,
    tol: Tolerances,
) -> Result<Option<(String, f64)>, VerifyError> {
    let g = &theirs.plan.graph;
    for &n in &g.order[..theirs.plan.backward_start] {
        let node = &g.nodes[n];
        for &v in &node.outputs {
            let Some(mine) = ours.value_named(&g.values[v].name) else {
                continue;
            };
            let b = theirs.gather(v)?;
            let a = crop_like(&ours.gather(mine)?, &b);
            let err = rel_error(&a, &b);
            if err > tol.forward {
                return Ok(Some((node.name.clone(), err)));
            }
        }
    }
    Ok(None)
}

/// One rank's own results checked against the unpartitioned model (what a rank running as a
/// process can check without the other ranks' values): its loss, summed over the data-parallel
/// group, and its shard of every gradient, against the reference's gradients sharded as its
/// parameters are.
#[derive(Clone, Debug)]
pub struct RankVerification {
    /// The gradients compared.
    pub gradients: usize,
    /// The loss's relative error.
    pub loss_error: f64,
    /// The largest relative error of a gradient shard.
    pub max_rel_error: f64,
    /// What is out of tolerance, one line each.
    pub failures: Vec<String>,
}

/// Compares the rank at `rank`'s results of a step (`values`, on `backend`; `loss` already
/// summed over its data-parallel group, and with pipeline stages the last stage's) with a
/// reference run on the same weights and batch: the gradients of the parameters its stage
/// holds ([`Plan::params_on`]).
pub fn compare_rank<B: Backend, R: Backend>(
    (plan, rank): (&Plan, ferrotron_partitioner::Coord),
    values: &HashMap<ferrotron_ir::ValueId, B::Tensor>,
    loss: f32,
    backend: &B,
    theirs: &Run<R>,
    tol: Tolerances,
) -> Result<RankVerification, VerifyError> {
    let mut failures = Vec::new();
    let loss_error = rel_error(
        &Tensor::full(Vec::new(), loss),
        &Tensor::full(Vec::new(), theirs.loss()?),
    );
    if loss_error > tol.forward {
        failures.push(format!("loss: relative error {loss_error:.3e}"));
    }
    // A gradient is laid out as its parameter: shard the reference's as the weights are.
    let mut full = HashMap::new();
    for (p, _) in &plan.grads {
        let name = plan.graph.params[*p].name.clone();
        let g = theirs.grad(&name)?;
        full.insert(name, g);
    }
    // The rank's stage's parameters, in `plan.params_on` order, as the shards are.
    let held = plan.params_on(rank.pp);
    let expected = crate::run::shard_params_for(plan, &full, rank)?;
    // Gradients are held to the scale of the largest one (see `rel_error_floor`).
    let floor = 1e-3 * full.values().map(max_abs).fold(0.0, f64::max);
    let mut worst = 0.0f64;
    let mut gradients = 0;
    for (p, want) in held.iter().zip(&expected) {
        let Some((_, v)) = plan.grads.iter().find(|(q, _)| q == p) else {
            continue;
        };
        gradients += 1;
        let name = &plan.graph.params[*p].name;
        let mine = values
            .get(v)
            .ok_or_else(|| ExecError::Plan(format!("the gradient of `{name}` was not kept")))?;
        let mine = backend
            .download(mine)
            .map_err(|e| ExecError::Plan(format!("copying a gradient to the host: {e}")))?;
        let err = rel_error_floor(&mine, want, floor);
        worst = worst.max(err);
        if err > tol.gradient {
            failures.push(format!("gradient of `{name}`: relative error {err:.3e}"));
        }
    }
    Ok(RankVerification {
        gradients,
        loss_error,
        max_rel_error: worst,
        failures,
    })
}
