//! Pipeline parallelism: the plan's program in stages, and the order each stage runs its
//! micro-batches in. Data in the plan, as the layouts are, so the runtime executes it, the cost
//! model prices it and the viewer draws it; [`crate::cut`] makes it.
//!
//! ```text
//! Plan (one SPMD program: forward + backward of one micro-batch)
//!   ─► stages: each node's stage (and model chunk, interleaved)
//!   ─► transfers: each value produced on one stage and read on another (a forward activation,
//!      a backward gradient), per micro-batch; a value every tp rank holds whole goes in parts
//!   ─► tied parameters: a parameter read on several stages (GPT-2's embedding, also the output
//!      layer) is held by each; its gradient is summed on one and sent to the others
//!   ─► schedule: per stage, its forward and backward micro-batch steps (GPipe, 1F1B, or
//!      interleaved 1F1B over model chunks)
//! ```
//!
//! Every rank of stage `s` (its tp × dp ranks) runs stage `s`'s nodes of the program, in program
//! order, once forward and once backward per micro-batch, and sums its parameters' gradients
//! over the micro-batches. A stage receives a value just before the step that first needs it and
//! sends one as soon as its step made it; a send never waits, so a schedule whose steps respect
//! the data dependencies cannot deadlock.

use ferrotron_ir::graph::{EntityRef, SecondaryMap};
use ferrotron_ir::{Graph, NodeId, ParamId, ValueId};
use serde::{Deserialize, Serialize};

/// The order the stages run their micro-batches in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// Every micro-batch forward, then every one backward (GPipe): the first stage holds all
    /// `M` micro-batches' activations.
    GPipe,
    /// One forward, one backward (PipeDream-flush, Megatron's default): after `P − 1 − s`
    /// warm-up forwards, stage `s` alternates, holding at most `P − s` micro-batches.
    #[default]
    OneFOneB,
    /// Interleaved 1F1B (Narayanan et al. 2021): each stage holds `V` chunks of layers (model
    /// chunk `c` of stage `s` is virtual stage `c·P + s`) and runs 1F1B over (micro-batch,
    /// chunk) pairs, in groups of `P` micro-batches: the bubble shrinks `V`-fold for `V` times
    /// the transfers.
    Interleaved,
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::GPipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
            Schedule::Interleaved => "interleaved",
        })
    }
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Schedule, String> {
        match s {
            "gpipe" => Ok(Schedule::GPipe),
            "1f1b" => Ok(Schedule::OneFOneB),
            "interleaved" => Ok(Schedule::Interleaved),
            other => Err(format!(
                "`{other}`: a schedule is `1f1b` (the default), `gpipe` or `interleaved` (with \
                 --virtual-stages)"
            )),
        }
    }
}

/// One step of a stage's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipeStep {
    /// The stage's forward nodes on micro-batch `m`.
    Forward(u32),
    /// The stage's backward nodes on micro-batch `m`.
    Backward(u32),
}

/// A value produced on one stage and read on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The value (shard-local, as the plan's graph types it).
    pub value: ValueId,
    /// The stage that makes it.
    pub from: u32,
    /// The stage that reads it.
    pub to: u32,
    /// Made in the backward part (a gradient) rather than the forward part.
    pub backward: bool,
    /// A value every tensor-parallel rank holds whole goes in pieces (the 2021 paper's
    /// scatter/gather): each sender sends its `1/tp` part along this dimension, and the
    /// receivers all-gather the parts over their tp group. `None`: each rank sends what it
    /// holds (its own slice of a split value, or a whole value at tp = 1).
    #[serde(default)]
    pub scatter: Option<usize>,
    /// Sent once a step rather than once a micro-batch: a tied parameter's gradient
    /// contribution, summed over the micro-batches where it is made and added to the owner's
    /// sum after the last one (each micro-batch the owner's sum takes its own part only).
    #[serde(default)]
    pub once_a_step: bool,
}

impl Transfer {
    /// The bytes each sending rank sends per micro-batch (per step, `once_a_step`), for a plan
    /// of graph `g` at `tp`.
    pub fn bytes(&self, g: &Graph, tp: u64) -> u64 {
        let size = g.ty(self.value).size_bytes();
        match self.scatter {
            Some(_) => size / tp.max(1),
            None => size,
        }
    }
}

/// A parameter several stages hold (tied weights): each computes with its copy, the gradient is
/// summed on `owner` (the stage where the program sums its contributions), and the sum is sent
/// to the others before the optimizer step, so the copies stay identical.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tied {
    /// The parameter.
    pub param: ParamId,
    /// The stage whose program completes its gradient.
    pub owner: u32,
    /// Every stage holding it, `owner` included.
    pub holders: Vec<u32>,
}

/// How a plan's program is cut into stages and run over micro-batches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Stages (the mesh's `pp`).
    pub stages: u32,
    /// Micro-batches per step.
    pub micro_batches: u32,
    /// The schedule's kind.
    pub schedule: Schedule,
    /// Model chunks per stage (`V` of the interleaved schedule; 1 otherwise).
    #[serde(default = "one")]
    pub virtual_stages: u32,
    /// Layers (the Repeat's copies, in order) on each virtual stage `c·P + s` (chunk `c` of
    /// stage `s`); with one chunk per stage, on each stage.
    pub layers: Vec<u32>,
    /// Each node's stage.
    pub stage_of: SecondaryMap<NodeId, u32>,
    /// Each node's model chunk on its stage (all 0 with one chunk per stage).
    #[serde(default)]
    pub chunk_of: SecondaryMap<NodeId, u32>,
    /// Each parameter's stages (those that read it).
    pub holders: Vec<Vec<u32>>,
    /// Parameters held by more than one stage.
    pub tied: Vec<Tied>,
    /// Values crossing stages, in the program order of their first reader.
    pub transfers: Vec<Transfer>,
    /// Each stage's steps, in order.
    pub steps: Vec<Vec<PipeStep>>,
    /// The model chunk of each step of `steps` (interleaved schedule); empty: chunk 0.
    #[serde(default)]
    pub chunks: Vec<Vec<u32>>,
}

fn one() -> u32 {
    1
}

impl Pipeline {
    /// Whether stage `s` holds parameter `p`.
    pub fn holds(&self, s: u32, p: ParamId) -> bool {
        self.holders[p.index()].contains(&s)
    }

    /// The stage whose program completes `p`'s gradient (where it is summed, for a tied one).
    pub fn grad_owner(&self, p: ParamId) -> Option<u32> {
        match self.tied.iter().find(|t| t.param == p) {
            Some(t) => Some(t.owner),
            None => self.holders[p.index()].first().copied(),
        }
    }

    /// The fraction of a step a stage idles in the fill and drain of the pipeline, for equal
    /// stages: `(P − 1) / (M + P − 1)` of the step (GPipe and 1F1B alike), so `(P − 1) / M`
    /// of the ideal time; `(P − 1) / (V·M + P − 1)` interleaved, `(P − 1) / (V·M)` of the
    /// ideal.
    pub fn bubble_fraction(&self) -> f64 {
        let (p, m) = (f64::from(self.stages), f64::from(self.micro_batches));
        let v = f64::from(self.virtual_stages.max(1));
        (p - 1.0) / (v * m + p - 1.0)
    }

    /// The model chunk step `i` of stage `s` runs.
    pub fn chunk(&self, s: usize, i: usize) -> u32 {
        self.chunks
            .get(s)
            .and_then(|c| c.get(i))
            .copied()
            .unwrap_or(0)
    }
}

/// The steps of stage `s` of `p` under `schedule` with `m` micro-batches.
pub fn steps(schedule: Schedule, p: u32, s: u32, m: u32) -> Vec<PipeStep> {
    match schedule {
        Schedule::GPipe => (0..m)
            .map(PipeStep::Forward)
            .chain((0..m).map(PipeStep::Backward))
            .collect(),
        // One chunk per stage: interleaving has nothing to interleave.
        Schedule::OneFOneB | Schedule::Interleaved => {
            let warmup = (p - 1 - s).min(m);
            let mut out: Vec<PipeStep> = (0..warmup).map(PipeStep::Forward).collect();
            for i in 0..m - warmup {
                out.push(PipeStep::Forward(warmup + i));
                out.push(PipeStep::Backward(i));
            }
            out.extend((m - warmup..m).map(PipeStep::Backward));
            out
        }
    }
}

/// The steps of stage `s` of `p` under the interleaved schedule with `m` micro-batches (a
/// multiple of `p`) and `v` model chunks per stage, each with its chunk: Megatron's order.
/// Forward step `k` runs chunk `(k mod pv) / p` on micro-batch `(k / pv)·p + k mod p`; backward
/// step `k` the same micro-batch on chunk `v − 1 − (k mod pv) / p`. After
/// `2(p − 1 − s) + (v − 1)·p` warm-up forwards (all of them when `m = p`), one forward and one
/// backward alternate.
pub fn interleaved_steps(p: u32, s: u32, m: u32, v: u32) -> Vec<(PipeStep, u32)> {
    let total = m * v;
    let group = p * v;
    let place = |k: u32| ((k / group) * p + k % p, (k % group) / p);
    let forward = |k: u32| {
        let (mb, c) = place(k);
        (PipeStep::Forward(mb), c)
    };
    let backward = |k: u32| {
        let (mb, c) = place(k);
        (PipeStep::Backward(mb), v - 1 - c)
    };
    let warmup = if m == p {
        total
    } else {
        (2 * (p - 1 - s) + (v - 1) * p).min(total)
    };
    let mut out: Vec<(PipeStep, u32)> = (0..warmup).map(forward).collect();
    for i in 0..total - warmup {
        out.push(forward(warmup + i));
        out.push(backward(i));
    }
    out.extend((total - warmup..total).map(backward));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_warms_up_then_alternates_and_drains() {
        use PipeStep::{Backward as B, Forward as F};
        assert_eq!(
            steps(Schedule::OneFOneB, 3, 0, 4),
            vec![F(0), F(1), F(2), B(0), F(3), B(1), B(2), B(3)]
        );
        assert_eq!(
            steps(Schedule::OneFOneB, 3, 2, 4),
            vec![F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3)]
        );
        // Fewer micro-batches than the warm-up would take.
        assert_eq!(
            steps(Schedule::OneFOneB, 4, 0, 2),
            vec![F(0), F(1), B(0), B(1)]
        );
        assert_eq!(
            steps(Schedule::GPipe, 2, 1, 2),
            vec![F(0), F(1), B(0), B(1)]
        );
    }

    #[test]
    fn interleaved_groups_p_micro_batches_over_the_chunks() {
        use PipeStep::{Backward as B, Forward as F};
        assert_eq!(
            interleaved_steps(2, 0, 4, 2),
            vec![
                (F(0), 0),
                (F(1), 0),
                (F(0), 1),
                (F(1), 1),
                (F(2), 0),
                (B(0), 1),
                (F(3), 0),
                (B(1), 1),
                (F(2), 1),
                (B(0), 0),
                (F(3), 1),
                (B(1), 0),
                (B(2), 1),
                (B(3), 1),
                (B(2), 0),
                (B(3), 0),
            ]
        );
    }

    /// Runs every stage's steps in order, each as soon as what it needs is done (the previous
    /// virtual stage's forward, the next one's backward); panics on a deadlock.
    fn runs_to_the_end(p: u32, m: u32, v: u32, per_stage: &[Vec<(PipeStep, u32)>]) {
        let nv = (p * v) as usize;
        let mut fwd = vec![vec![false; nv]; m as usize];
        let mut bwd = vec![vec![false; nv]; m as usize];
        let mut next = vec![0usize; p as usize];
        loop {
            let mut progressed = false;
            for s in 0..p as usize {
                let Some(&(step, c)) = per_stage[s].get(next[s]) else {
                    continue;
                };
                let vs = c as usize * p as usize + s;
                let ready = match step {
                    PipeStep::Forward(mb) => vs == 0 || fwd[mb as usize][vs - 1],
                    PipeStep::Backward(mb) => {
                        fwd[mb as usize][vs] && (vs + 1 == nv || bwd[mb as usize][vs + 1])
                    }
                };
                if ready {
                    match step {
                        PipeStep::Forward(mb) => fwd[mb as usize][vs] = true,
                        PipeStep::Backward(mb) => bwd[mb as usize][vs] = true,
                    }
                    next[s] += 1;
                    progressed = true;
                }
            }
            if next.iter().zip(per_stage).all(|(n, st)| *n == st.len()) {
                break;
            }
            assert!(progressed, "p={p} m={m} v={v}: deadlock at {next:?}");
        }
        assert!(bwd.iter().flatten().all(|&b| b), "every step ran");
    }

    #[test]
    fn every_schedule_respects_the_dependencies() {
        for (p, m) in [(2, 2), (2, 4), (3, 3), (4, 8), (4, 2), (3, 7)] {
            for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
                let per: Vec<Vec<(PipeStep, u32)>> = (0..p)
                    .map(|s| {
                        steps(schedule, p, s, m)
                            .into_iter()
                            .map(|x| (x, 0))
                            .collect()
                    })
                    .collect();
                runs_to_the_end(p, m, 1, &per);
            }
        }
        for (p, m, v) in [
            (2, 2, 2),
            (2, 4, 2),
            (4, 8, 2),
            (4, 4, 3),
            (3, 6, 2),
            (2, 8, 4),
        ] {
            let per: Vec<_> = (0..p).map(|s| interleaved_steps(p, s, m, v)).collect();
            for st in &per {
                assert_eq!(st.len(), (2 * m * v) as usize);
            }
            runs_to_the_end(p, m, v, &per);
        }
    }
}
