//! The pipeline schedule as time: when each stage runs each of its steps, and how long it idles
//! (the pipeline bubble). It reads the schedule the plan holds as data ([`Pipeline::steps`]) and
//! prices each step by its stage's FLOPs, so the picture the viewer draws follows from the same
//! plan the runtime executes.
//!
//! ```text
//! Plan ─► per stage (and model chunk): FLOPs of its forward and backward nodes for one
//!         micro-batch ─► durations
//!      ─► simulate Pipeline::steps (each stage in its order, waiting on its neighbours)
//!      ─► Timeline: per stage its boxes (step, chunk, start, end), idle time; the makespan
//!      ─► visualizer (the schedule picture, as figures 3 and 4 of Narayanan et al. 2021)
//! ```
//!
//! A step waits for what it consumes. With one model chunk per stage: `Forward(m)` on stage
//! `s > 0` for `Forward(m)` on `s − 1`, `Backward(m)` on stage `s < P − 1` for `Backward(m)` on
//! `s + 1`, each plus the transfer time, and `Backward(m)` on the last stage for its own
//! `Forward(m)`. With `V` chunks per stage (the interleaved schedule) the same holds along the
//! virtual stages `c·P + s` (chunk `c` of stage `s`). Stages run their steps in the order given,
//! one at a time, each as early as that allows. Communication inside a stage (the tensor- and
//! data-parallel collectives) is not priced.

use crate::pipeline::{PipeStep, Pipeline};
use crate::plan::Plan;
use ferrotron_ir::count::node_flops;
use thiserror::Error;

/// How long one micro-batch's forward and backward take on one stage (or one model chunk of
/// it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTime {
    /// The forward step.
    pub forward: f64,
    /// The backward step.
    pub backward: f64,
}

/// How steps are priced.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TimelineOptions {
    /// FLOPs per unit of time of one rank. `None`: relative units, in which a stage's forward
    /// of one micro-batch (all its chunks) takes 1 on average over the stages.
    pub flops_per_unit: Option<f64>,
    /// Time to move a micro-batch's activation (or its gradient) to the next (previous) stage,
    /// in the same units.
    pub transfer: f64,
}

/// One step drawn in time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slot {
    /// The step.
    pub step: PipeStep,
    /// The model chunk it runs (0 with one chunk per stage).
    pub chunk: u32,
    /// When it starts.
    pub start: f64,
    /// When it ends.
    pub end: f64,
}

/// A simulated step of the pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    /// Each stage's slots, in the order it runs them.
    pub stages: Vec<Vec<Slot>>,
    /// The durations the slots were priced with, per stage and model chunk.
    pub times: Vec<Vec<StageTime>>,
    /// When the last step ends (every stage starts at 0).
    pub makespan: f64,
}

impl Timeline {
    /// Time stage `s` spends neither computing nor done: the makespan less its steps.
    pub fn idle(&self, s: usize) -> f64 {
        let busy: f64 = self.stages[s].iter().map(|b| b.end - b.start).sum();
        self.makespan - busy
    }

    /// Stage `s`'s idle time as a fraction of the makespan (0 for an empty timeline).
    pub fn idle_fraction(&self, s: usize) -> f64 {
        if self.makespan > 0.0 {
            self.idle(s) / self.makespan
        } else {
            0.0
        }
    }

    /// The stages' mean idle fraction: the share of all ranks' time lost to the bubble.
    pub fn mean_idle_fraction(&self) -> f64 {
        let p = self.stages.len();
        if p == 0 || self.makespan <= 0.0 {
            return 0.0;
        }
        (0..p).map(|s| self.idle(s)).sum::<f64>() / (p as f64 * self.makespan)
    }
}

/// Why a timeline cannot be made.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum TimelineError {
    /// The plan is one stage and one micro-batch.
    #[error("the plan has no pipeline: pass --pp P and/or --micro-batches M")]
    NoPipeline,
    /// Steps and durations disagree on the number of stages.
    #[error("{steps} stages of steps but {times} stages of durations")]
    Stages {
        /// Stages with steps.
        steps: usize,
        /// Stages with durations.
        times: usize,
    },
    /// Stages with different numbers of model chunks.
    #[error("stage {stage} has durations for {chunks} model chunks, stage 0 for {first}")]
    Chunks {
        /// The stage.
        stage: usize,
        /// Its chunks.
        chunks: usize,
        /// Stage 0's chunks.
        first: usize,
    },
    /// A step runs a model chunk the stages do not have.
    #[error("stage {stage}: {step:?} runs model chunk {chunk}, but stages have {chunks}")]
    Chunk {
        /// The stage.
        stage: usize,
        /// The step.
        step: PipeStep,
        /// The chunk it names.
        chunk: u32,
        /// Chunks per stage.
        chunks: usize,
    },
    /// A duration is negative or not a number.
    #[error("stage {stage}: the {what} duration {value} is not a non-negative number")]
    Duration {
        /// The stage.
        stage: usize,
        /// `forward` or `backward`.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// Every unfinished stage waits on a step that never comes.
    #[error("the schedule cannot proceed: {0}")]
    Deadlock(String),
}

/// Each stage's FLOPs per micro-batch on one rank, per model chunk: (forward, backward).
pub fn stage_flops(plan: &Plan, pipe: &Pipeline) -> Vec<Vec<(f64, f64)>> {
    let g = &plan.graph;
    let chunks = pipe.virtual_stages.max(1) as usize;
    let mut out = vec![vec![(0.0, 0.0); chunks]; pipe.stages as usize];
    for (i, &n) in g.order.iter().enumerate() {
        let (mm, other) = node_flops(g, &g.nodes[n].op, &g.nodes[n].outputs);
        let flops = mm.saturating_add(other) as f64;
        let chunk = (pipe.chunk_of[n] as usize).min(chunks - 1);
        // A plan file's stage out of range is the verifier's to report, not a panic here.
        let Some(s) = out.get_mut(pipe.stage_of[n] as usize) else {
            continue;
        };
        if i < plan.backward_start {
            s[chunk].0 += flops;
        } else {
            s[chunk].1 += flops;
        }
    }
    out
}

/// Each stage's step durations in `plan` (per model chunk), priced as `opts` says.
pub fn stage_times(
    plan: &Plan,
    opts: &TimelineOptions,
) -> Result<Vec<Vec<StageTime>>, TimelineError> {
    let pipe = plan.pipeline.as_ref().ok_or(TimelineError::NoPipeline)?;
    let flops = stage_flops(plan, pipe);
    let rate = match opts.flops_per_unit {
        Some(r) => r,
        None => {
            let forward: f64 = flops.iter().flatten().map(|f| f.0).sum();
            let mean = forward / flops.len().max(1) as f64;
            if mean > 0.0 {
                mean
            } else {
                1.0
            }
        }
    };
    Ok(flops
        .iter()
        .map(|chunks| {
            chunks
                .iter()
                .map(|&(f, b)| StageTime {
                    forward: f / rate,
                    backward: b / rate,
                })
                .collect()
        })
        .collect())
}

/// The timeline of `plan`'s pipeline, its steps priced by their FLOPs.
pub fn of_plan(plan: &Plan, opts: &TimelineOptions) -> Result<Timeline, TimelineError> {
    let pipe = plan.pipeline.as_ref().ok_or(TimelineError::NoPipeline)?;
    let steps: Vec<Vec<(PipeStep, u32)>> = pipe
        .steps
        .iter()
        .enumerate()
        .map(|(s, steps)| {
            steps
                .iter()
                .enumerate()
                .map(|(i, &step)| (step, pipe.chunk(s, i)))
                .collect()
        })
        .collect();
    simulate_chunks(&steps, &stage_times(plan, opts)?, opts.transfer)
}

/// Runs `steps` (each stage's, in order; one model chunk per stage) with the given durations
/// and `transfer` time between neighbouring stages, every step as early as its stage and its
/// input allow.
pub fn simulate(
    steps: &[Vec<PipeStep>],
    times: &[StageTime],
    transfer: f64,
) -> Result<Timeline, TimelineError> {
    let steps: Vec<Vec<(PipeStep, u32)>> = steps
        .iter()
        .map(|s| s.iter().map(|&step| (step, 0)).collect())
        .collect();
    let times: Vec<Vec<StageTime>> = times.iter().map(|&t| vec![t]).collect();
    simulate_chunks(&steps, &times, transfer)
}

/// [`simulate`] with model chunks: each step with the chunk it runs, `times[s][c]` the
/// durations of chunk `c` of stage `s` (every stage with as many chunks).
pub fn simulate_chunks(
    steps: &[Vec<(PipeStep, u32)>],
    times: &[Vec<StageTime>],
    transfer: f64,
) -> Result<Timeline, TimelineError> {
    let p = steps.len();
    if times.len() != p {
        return Err(TimelineError::Stages {
            steps: p,
            times: times.len(),
        });
    }
    let v = times.first().map_or(1, Vec::len);
    for (stage, chunks) in times.iter().enumerate() {
        if chunks.len() != v || v == 0 {
            return Err(TimelineError::Chunks {
                stage,
                chunks: chunks.len(),
                first: v,
            });
        }
        for t in chunks {
            for (what, value) in [("forward", t.forward), ("backward", t.backward)] {
                if !(value >= 0.0 && value.is_finite()) {
                    return Err(TimelineError::Duration { stage, what, value });
                }
            }
        }
    }
    if !(transfer >= 0.0 && transfer.is_finite()) {
        return Err(TimelineError::Duration {
            stage: 0,
            what: "transfer",
            value: transfer,
        });
    }
    for (stage, st) in steps.iter().enumerate() {
        if let Some(&(step, chunk)) = st.iter().find(|x| x.1 as usize >= v) {
            return Err(TimelineError::Chunk {
                stage,
                step,
                chunk,
                chunks: v,
            });
        }
    }
    // When each step of virtual stage c·P + s ended, per micro-batch, once it has.
    let micro = steps
        .iter()
        .flatten()
        .map(|(s, _)| match s {
            PipeStep::Forward(m) | PipeStep::Backward(m) => *m as usize + 1,
        })
        .max()
        .unwrap_or(0);
    let nv = p * v;
    // A value crossing to another stage (not to another chunk of the same one) takes `transfer`.
    let moved = |from: usize, to: usize, end: f64| {
        if from % p == to % p {
            end
        } else {
            end + transfer
        }
    };
    let mut fwd_end = vec![vec![None::<f64>; micro]; nv];
    let mut bwd_end = vec![vec![None::<f64>; micro]; nv];
    let mut next = vec![0usize; p];
    let mut free = vec![0f64; p];
    let mut stages: Vec<Vec<Slot>> = steps.iter().map(|s| Vec::with_capacity(s.len())).collect();
    loop {
        let mut progressed = false;
        for s in 0..p {
            while let Some(&(step, chunk)) = steps[s].get(next[s]) {
                let vs = chunk as usize * p + s;
                let t = times[s][chunk as usize];
                // When what the step consumes is here, if it has been made.
                let (ready, duration) = match step {
                    PipeStep::Forward(_) if vs == 0 => (Some(0.0), t.forward),
                    PipeStep::Forward(m) => (
                        fwd_end[vs - 1][m as usize].map(|e| moved(vs - 1, vs, e)),
                        t.forward,
                    ),
                    PipeStep::Backward(m) if vs == nv - 1 => (fwd_end[vs][m as usize], t.backward),
                    PipeStep::Backward(m) => (
                        bwd_end[vs + 1][m as usize].map(|e| moved(vs + 1, vs, e)),
                        t.backward,
                    ),
                };
                let Some(ready) = ready else { break };
                let start = free[s].max(ready);
                let end = start + duration;
                free[s] = end;
                match step {
                    PipeStep::Forward(m) => fwd_end[vs][m as usize] = Some(end),
                    PipeStep::Backward(m) => bwd_end[vs][m as usize] = Some(end),
                }
                stages[s].push(Slot {
                    step,
                    chunk,
                    start,
                    end,
                });
                next[s] += 1;
                progressed = true;
            }
        }
        if (0..p).all(|s| next[s] == steps[s].len()) {
            break;
        }
        if !progressed {
            let blocked: Vec<String> = (0..p)
                .filter_map(|s| {
                    steps[s]
                        .get(next[s])
                        .map(|(step, c)| format!("stage {s} waits at {step:?} of chunk {c}"))
                })
                .collect();
            return Err(TimelineError::Deadlock(blocked.join(", ")));
        }
    }
    let makespan = stages
        .iter()
        .filter_map(|s| s.last().map(|b| b.end))
        .fold(0.0, f64::max);
    Ok(Timeline {
        stages,
        times: times.to_vec(),
        makespan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{interleaved_steps, steps, Schedule};

    fn pipeline_steps(schedule: Schedule, p: u32, m: u32) -> Vec<Vec<PipeStep>> {
        (0..p).map(|s| steps(schedule, p, s, m)).collect()
    }

    fn bubble(p: u32, m: u32) -> f64 {
        let (p, m) = (f64::from(p), f64::from(m));
        (p - 1.0) / (m + p - 1.0)
    }

    /// Every slot starts after what it consumes ended (along the virtual stages `c·P + s`),
    /// and a stage's slots do not overlap.
    fn check_dependencies(t: &Timeline, transfer: f64) {
        let p = t.stages.len();
        let nv = p * t.times[0].len();
        let end_of = |vs: usize, step: PipeStep| {
            let (s, c) = (vs % p, (vs / p) as u32);
            t.stages[s]
                .iter()
                .find(|b| b.step == step && b.chunk == c)
                .map(|b| b.end)
                .unwrap_or_else(|| panic!("stage {s} has no {step:?} of chunk {c}"))
        };
        let hop = if p > 1 { transfer } else { 0.0 };
        for (s, slots) in t.stages.iter().enumerate() {
            for w in slots.windows(2) {
                assert!(w[1].start >= w[0].end, "stage {s}: {w:?} overlap");
            }
            for b in slots {
                assert!(b.start >= 0.0 && b.end >= b.start);
                let vs = b.chunk as usize * p + s;
                let after = match b.step {
                    PipeStep::Forward(_) if vs == 0 => 0.0,
                    PipeStep::Forward(m) => end_of(vs - 1, PipeStep::Forward(m)) + hop,
                    PipeStep::Backward(m) if vs == nv - 1 => end_of(vs, PipeStep::Forward(m)),
                    PipeStep::Backward(m) => end_of(vs + 1, PipeStep::Backward(m)) + hop,
                };
                assert!(b.start >= after, "stage {s}: {b:?} starts before {after}");
            }
        }
    }

    #[test]
    fn equal_stages_idle_exactly_the_bubble() {
        let times = |p| {
            vec![
                StageTime {
                    forward: 1.0,
                    backward: 2.0,
                };
                p as usize
            ]
        };
        for (p, m) in [(2, 4), (4, 8), (3, 3), (4, 2), (1, 3), (5, 7)] {
            let mut spans = Vec::new();
            for schedule in [Schedule::OneFOneB, Schedule::GPipe] {
                let t = simulate(&pipeline_steps(schedule, p, m), &times(p), 0.0)
                    .expect("a valid schedule runs");
                assert_eq!(t.makespan, f64::from(m + p - 1) * 3.0, "{schedule} {p} {m}");
                for s in 0..p as usize {
                    assert_eq!(t.stages[s].len(), 2 * m as usize);
                    assert_eq!(t.idle_fraction(s), bubble(p, m), "{schedule} {p} {m} {s}");
                }
                assert_eq!(t.mean_idle_fraction(), bubble(p, m));
                check_dependencies(&t, 0.0);
                spans.push(t.makespan);
            }
            assert_eq!(spans[0], spans[1], "1F1B and GPipe take as long ({p}, {m})");
        }
    }

    #[test]
    fn interleaving_shrinks_the_bubble_by_the_chunks() {
        // Each chunk takes 1 forward and 2 backward, so a stage's micro-batch takes V and 2V.
        for (p, m, v) in [(2, 4, 2), (4, 8, 2), (4, 4, 3), (3, 6, 2), (2, 8, 4)] {
            let per: Vec<Vec<(PipeStep, u32)>> =
                (0..p).map(|s| interleaved_steps(p, s, m, v)).collect();
            let times = vec![
                vec![
                    StageTime {
                        forward: 1.0,
                        backward: 2.0,
                    };
                    v as usize
                ];
                p as usize
            ];
            let t = simulate_chunks(&per, &times, 0.0).expect("the interleaved schedule runs");
            check_dependencies(&t, 0.0);
            // The paper's (P − 1)/(V·M + P − 1): the fill and drain take (P − 1) chunks' steps.
            let (pf, mf, vf) = (f64::from(p), f64::from(m), f64::from(v));
            assert_eq!(t.makespan, (vf * mf + pf - 1.0) * 3.0, "({p}, {m}, {v})");
            let bubble = (pf - 1.0) / (vf * mf + pf - 1.0);
            for s in 0..p as usize {
                assert_eq!(t.stages[s].len(), 2 * (m * v) as usize);
                assert_eq!(t.idle_fraction(s), bubble, "({p}, {m}, {v}) stage {s}");
            }
            // With transfers every hop between stages costs, chunks of one stage do not.
            let t = simulate_chunks(&per, &times, 0.5).expect("runs");
            check_dependencies(&t, 0.5);
        }
    }

    #[test]
    fn transfers_and_uneven_stages_keep_the_dependencies() {
        let times = [
            StageTime {
                forward: 1.5,
                backward: 3.0,
            },
            StageTime {
                forward: 1.0,
                backward: 2.5,
            },
            StageTime {
                forward: 2.0,
                backward: 4.5,
            },
        ];
        for schedule in [Schedule::OneFOneB, Schedule::GPipe] {
            let t = simulate(&pipeline_steps(schedule, 3, 5), &times, 0.25).expect("runs");
            check_dependencies(&t, 0.25);
            // The slowest stage bounds the step from below.
            assert!(t.makespan >= 5.0 * 6.5);
            // Unequal stages idle unequally: the slowest least.
            let least = (0..3)
                .min_by(|&a, &b| t.idle(a).total_cmp(&t.idle(b)))
                .expect("three stages");
            assert_eq!(least, 2, "{schedule}");
        }
    }

    #[test]
    fn schedules_that_wait_on_themselves_are_reported() {
        use PipeStep::{Backward as B, Forward as F};
        let times = vec![
            StageTime {
                forward: 1.0,
                backward: 1.0,
            };
            2
        ];
        // Stage 0 waits for B(0) before running F(0), which stage 1 needs for B(0).
        let err = simulate(&[vec![B(0), F(0)], vec![F(0), B(0)]], &times, 0.0).unwrap_err();
        assert!(
            matches!(&err, TimelineError::Deadlock(s) if s.contains("stage 0")),
            "{err}"
        );
        let err = simulate(&[vec![F(0)]], &times, 0.0).unwrap_err();
        assert_eq!(err, TimelineError::Stages { steps: 1, times: 2 });
        let one = vec![vec![times[0]]];
        let err = simulate_chunks(&[vec![(F(0), 1)]], &one, 0.0).unwrap_err();
        assert!(
            matches!(err, TimelineError::Chunk { chunk: 1, .. }),
            "{err}"
        );
        let bad = [StageTime {
            forward: f64::NAN,
            backward: 1.0,
        }];
        assert!(matches!(
            simulate(&[vec![F(0)]], &bad, 0.0),
            Err(TimelineError::Duration { .. })
        ));
    }
}
