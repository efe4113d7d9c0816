//! A plan prepared for its ranks: the steps they run (the plan's nodes, fused pairs merged by
//! [`crate::fuse`]), each step's pipeline stage, the values every rank keeps to the end, where
//! each value is last read on each stage (so it is freed there), and the fused-weight blocks of
//! every value (for shard geometry). Made once
//! and shared by every rank of a process; the rank program ([`crate::Rank::run`]) walks it.

use crate::arena::{ElementSizes, Placements};
use crate::error::ExecError;
use crate::fuse::{Fusions, Program, StepOp};
use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{MeshAxis, NodeId, Op, ValueDef, ValueId};
use ferrotron_partitioner::pipeline::PipeStep;
use ferrotron_partitioner::{value_blocks, Plan};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The longest any rank waits for the others at a collective (groups the in-process
    /// launcher forms).
    pub timeout: Duration,
    /// Dropout masks differ per seed (0 gives the reference evaluator's masks).
    pub dropout_seed: u64,
    /// Keep every value (to find where two runs diverge), not only those asked for.
    pub keep_all: bool,
    /// Run only the forward part (inference: the loss and the outputs, no gradients).
    pub forward_only: bool,
    /// Fail at the first node that produces a NaN or an infinity, naming it.
    pub check_finite: bool,
    /// Record every node's start and duration on every rank (see [`crate::Run::trace_json`]).
    pub trace: bool,
    /// Run fusable op pairs (bias + activation, scale + softmax) as one kernel each
    /// ([`crate::fuse`]). Off with `keep_all`, which must see every intermediate value.
    pub fuse: bool,
    /// With `fuse`, also run each attention (scores, scale, softmax, dropout and the product
    /// with the values, and their backward) as one fused op ([`crate::fuse::Fused::Attention`]):
    /// equal to the unfused chain within `f32` rounding, not to the bit.
    pub fuse_attention: bool,
    /// With `fuse`, also run each output layer with its cross-entropy as one fused step that
    /// never holds the full logits ([`crate::fuse::Fused::OutputLoss`]); where it is
    /// differentiated, the step also makes the hidden states' and the weight's gradients. Equal
    /// to the unfused nodes within `f32` rounding. A run that keeps the logits (an output
    /// asked for) leaves it out by itself.
    pub fuse_loss: bool,
    /// Keep the graph's outputs (the logits) to the end of the step for the caller. A trainer,
    /// which reads only the loss and the gradients, sets it off, so they are freed at their
    /// last reader like any value.
    pub keep_outputs: bool,
    /// On a backend that uses an arena ([`crate::Backend::uses_arena`]), place the
    /// step's values in one arena per rank at the memory plan's offsets
    /// ([`crate::arena::Placements`]), allocated once and reused every step; off, every
    /// output is a fresh allocation.
    pub arena: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Duration::from_secs(60),
            dropout_seed: 0,
            keep_all: false,
            forward_only: false,
            check_finite: false,
            trace: false,
            fuse: true,
            fuse_attention: true,
            fuse_loss: true,
            keep_outputs: true,
            arena: true,
        }
    }
}

/// A plan prepared for execution with given options.
#[derive(Debug)]
pub struct Executable<'p> {
    /// The plan the steps come from.
    pub plan: &'p Plan,
    /// The options.
    pub opts: RunOptions,
    /// The steps, in order.
    pub program: Program,
    /// The values every rank keeps to the end: the loss, the outputs, the gradients (everything
    /// with `keep_all`).
    pub keep: SecondaryMap<ValueId, bool>,
    /// Gradients whose reductions run once a step, after the micro-batches (their steps are
    /// not in `program`).
    pub deferred: Vec<Deferred>,
    /// Transfers that go once a step, after the micro-batches.
    pub late: Vec<Late>,
    /// Values summed over a step's micro-batches: the gradients, or where a gradient's
    /// reductions are deferred, the unreduced gradient they start from.
    pub accumulate: SecondaryMap<ValueId, bool>,
    /// The pipeline stage of each step (0 without a pipeline).
    pub stage_of: Vec<usize>,
    /// The model chunk of each step on its stage (interleaved schedule; 0 otherwise).
    pub chunk_of: Vec<u32>,
    /// Per pipeline stage, for each value, the position in the program of its last reader on
    /// that stage (0 also for "never read"; see [`Executable::is_read_after`]).
    pub last_use: Vec<SecondaryMap<ValueId, usize>>,
    /// The fused-weight blocks of every value's tensor-parallel split (1: contiguous).
    pub blocks: SecondaryMap<ValueId, u32>,
    /// Per pipeline stage, the arena's places for each storage they were asked for, planned at
    /// the first run that asks ([`crate::memory::placements`]).
    pub(crate) placements: Vec<Mutex<PlacementsBySize>>,
}

/// A stage's arena places, by the element sizes they were planned for.
pub(crate) type PlacementsBySize = Vec<(ElementSizes, Arc<Placements>)>;

/// A gradient whose reductions run once a step.
#[derive(Clone, Debug)]
pub struct Deferred {
    /// The unreduced gradient, summed over the micro-batches.
    pub sum: ValueId,
    /// The gradient the plan makes of it.
    pub grad: ValueId,
    /// The plan's all-reduces from `sum` to `grad`, in order: the node and its group's axis.
    pub reductions: Vec<(NodeId, MeshAxis)>,
}

/// A tied parameter's gradient contribution made on another stage than the one that sums it:
/// summed where it is made and sent once a step.
#[derive(Clone, Debug)]
pub struct Late {
    /// Its transfer in the plan's pipeline.
    pub transfer: usize,
    /// The contribution.
    pub contribution: ValueId,
    /// The node that adds it to the owner's sum; each micro-batch it passes `other` on.
    pub add: NodeId,
    /// The owner's own part of that sum.
    pub other: ValueId,
    /// The sum (the gradient, or the value its deferred reductions start from).
    pub sum: ValueId,
}

impl<'p> Executable<'p> {
    /// The late transfer whose sum `n` adds, if `n` is one's.
    pub fn late_add(&self, n: NodeId) -> Option<&Late> {
        self.late.iter().find(|l| l.add == n)
    }

    /// Whether transfer `k` goes once a step.
    pub fn is_late(&self, k: usize) -> bool {
        self.late.iter().any(|l| l.transfer == k)
    }

    /// `plan` prepared to run with `opts`.
    pub fn new(plan: &'p Plan, opts: &RunOptions) -> Result<Executable<'p>, ExecError> {
        if opts.keep_all && plan.micro_batches() > 1 {
            return Err(ExecError::Plan(
                "keeping every value is for one micro-batch per step (a step of several keeps \
                 its loss, outputs and gradients)"
                    .into(),
            ));
        }
        let blocks = value_blocks(plan).map_err(|e| ExecError::Plan(e.to_string()))?;
        let g = &plan.graph;
        let mut keep = SecondaryMap::with_capacity(g.values.len());
        if opts.keep_all {
            for (v, _) in g.values.iter() {
                keep[v] = true;
            }
        }
        keep[plan.loss] = true;
        if opts.keep_outputs {
            for &(_, v) in &g.outputs {
                keep[v] = true;
            }
        }
        for &(_, v) in &plan.grads {
            keep[v] = true;
        }
        // With several micro-batches, a gradient's reductions over the groups (the plan's
        // all-reduces that end at it) run once a step on the sum of the micro-batches'
        // unreduced gradients, not once a micro-batch: a sum of sums is the sum.
        let mut deferred = Vec::new();
        let mut accumulate: SecondaryMap<ValueId, bool> =
            SecondaryMap::with_capacity(g.values.len());
        for &(_, grad) in &plan.grads {
            let mut chain = Vec::new();
            let mut v = grad;
            while let ValueDef::Node { node, .. } = g.values[v].def {
                let Op::AllReduce { x, axis } = g.nodes[node].op else {
                    break;
                };
                if plan.micro_batches() <= 1 {
                    break;
                }
                chain.push((node, axis));
                v = x;
            }
            if chain.is_empty() {
                accumulate[grad] = true;
            } else {
                chain.reverse();
                keep[v] = true;
                accumulate[v] = true;
                deferred.push(Deferred {
                    sum: v,
                    grad,
                    reductions: chain,
                });
            }
        }
        // Transfers the plan sends once a step: summed where they are made, their adding node
        // passing the owner's own part on each micro-batch.
        let mut late = Vec::new();
        if let Some(pipe) = &plan.pipeline {
            for (transfer, t) in pipe.transfers.iter().enumerate() {
                if !t.once_a_step {
                    continue;
                }
                let add = g
                    .order
                    .iter()
                    .copied()
                    .find(|&n| g.nodes[n].op.inputs().contains(&&t.value));
                let Some((add, Op::Add(a, b))) = add.map(|n| (n, &g.nodes[n].op)) else {
                    return Err(ExecError::Plan(format!(
                        "`{}` is sent once a step but no sum adds it",
                        g.values[t.value].name
                    )));
                };
                let other = if *a == t.value { *b } else { *a };
                let sum = g.nodes[add].outputs[0];
                keep[t.value] = true;
                accumulate[t.value] = true;
                late.push(Late {
                    transfer,
                    contribution: t.value,
                    add,
                    other,
                    sum,
                });
            }
        }
        let program = if opts.fuse && !opts.keep_all {
            Program::fused(
                plan,
                &|v| keep[v],
                Fusions {
                    attention: opts.fuse_attention,
                    loss: opts.fuse_loss,
                    forward_only: opts.forward_only,
                },
            )
        } else {
            Program::unfused(plan)
        };
        let skipped: std::collections::HashSet<NodeId> = deferred
            .iter()
            .flat_map(|d| d.reductions.iter().map(|&(n, _)| n))
            .collect();
        let program = Program {
            saved: program.saved,
            backward_start: program.backward_start
                - program.steps[..program.backward_start]
                    .iter()
                    .filter(|s| skipped.contains(&s.node))
                    .count(),
            steps: program
                .steps
                .into_iter()
                .filter(|s| !skipped.contains(&s.node))
                .collect(),
        };
        let stages = plan.mesh.pp.max(1) as usize;
        let mut stage_of = Vec::with_capacity(program.steps.len());
        let mut chunk_of = Vec::with_capacity(program.steps.len());
        for step in &program.steps {
            let stage = |n| {
                plan.pipeline
                    .as_ref()
                    .map_or((0, 0), |p| (p.stage_of[n] as usize, p.chunk_of[n]))
            };
            if let StepOp::Fused { absorbed, .. } = &step.op {
                if let Some(&other) = absorbed.iter().find(|&&m| stage(m) != stage(step.node)) {
                    return Err(ExecError::Plan(format!(
                        "`{}` is fused with `{}` across a pipeline stage boundary",
                        g.nodes[step.node].name, g.nodes[other].name
                    )));
                }
            }
            let (s, c) = stage(step.node);
            stage_of.push(s);
            chunk_of.push(c);
        }
        let mut last_use = vec![SecondaryMap::with_capacity(g.values.len()); stages];
        for (i, step) in program.steps.iter().enumerate() {
            for v in step.inputs(plan) {
                last_use[stage_of[i]][v] = i;
            }
        }
        Ok(Executable {
            plan,
            opts: opts.clone(),
            program,
            keep,
            deferred,
            late,
            accumulate,
            stage_of,
            chunk_of,
            last_use,
            blocks,
            placements: (0..stages).map(|_| Mutex::default()).collect(),
        })
    }

    /// Whether `v` is read by a step of `stage` after step `i`.
    pub fn is_read_after(&self, stage: usize, v: ValueId, i: usize) -> bool {
        self.last_use[stage][v] > i
    }

    /// Whether step `i` is the last of `stage` to read `v`.
    pub fn is_last_use(&self, stage: usize, v: ValueId, i: usize) -> bool {
        self.last_use[stage][v] == i
    }

    /// What pipeline stage `stage` runs, in order: a pass (forward or backward) of a
    /// micro-batch, and the model chunk it runs it on. Without a pipeline: the forward and
    /// backward of the one micro-batch.
    pub fn schedule(&self, stage: usize) -> Vec<(PipeStep, u32)> {
        match &self.plan.pipeline {
            Some(pipe) => pipe.steps[stage]
                .iter()
                .enumerate()
                .map(|(i, &step)| (step, pipe.chunk(stage, i)))
                .collect(),
            None => vec![(PipeStep::Forward(0), 0), (PipeStep::Backward(0), 0)],
        }
    }

    /// The transfers of `v` into (`into`) or out of pipeline stage `stage`; late ones with
    /// `late`.
    fn transfers(&self, stage: usize, v: ValueId, into: bool, late: bool) -> bool {
        self.plan.pipeline.as_ref().is_some_and(|p| {
            p.transfers.iter().enumerate().any(|(k, t)| {
                let end = if into { t.to } else { t.from };
                t.value == v && end as usize == stage && (late || !self.is_late(k))
            })
        })
    }

    /// Whether `v` comes to `stage` from another stage (once a micro-batch or, late, once a
    /// step).
    pub fn receives_any(&self, stage: usize, v: ValueId) -> bool {
        self.transfers(stage, v, true, true)
    }

    /// Whether `v` comes to `stage` from another stage once a micro-batch, before its first
    /// reader there.
    pub fn receives(&self, stage: usize, v: ValueId) -> bool {
        self.transfers(stage, v, true, false)
    }

    /// Whether `stage` sends `v` to another stage once a micro-batch, as soon as it is made.
    pub fn sends(&self, stage: usize, v: ValueId) -> bool {
        self.transfers(stage, v, false, false)
    }

    /// Whether value `v`, made at step `i` on `stage`, goes into its sum over the
    /// micro-batches as soon as it is made: it is summed, and no later step of the stage reads
    /// it.
    pub fn sums_now(&self, stage: usize, v: ValueId, i: usize) -> bool {
        self.plan.micro_batches() > 1
            && self.accumulate[v]
            && !self.is_read_after(stage, v, i)
            && !self.opts.forward_only
    }
}
