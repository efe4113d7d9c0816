//! The planner: how to run a model on a number of GPUs — tensor parallelism × pipeline stages
//! (with model chunks, interleaved) × data parallelism, the micro-batch size and schedule,
//! sequence parallelism, activation recomputation (none, selective, full) and the distributed
//! optimizer (ZeRO stage 0 or 1) — ranked by the cost model's predicted throughput among the
//! candidates that fit in memory, with the reasons the winner wins and why the others do not
//! run.
//!
//! ```text
//! model + cluster + GPUs ─► every tp dividing the GPUs that the model allows
//!     × pp (any stage count up to the layers, tp·pp dividing the GPUs; dp = GPUs / (tp·pp))
//!     × V model chunks per stage (1, or interleaved where the layers divide into pp·V chunks)
//!     × micro-batches M (a few divisors of the replica's batch, from pp up, most first: the
//!       micro-batch size is the replica's batch / M)
//!     × sequence parallelism ─► partition: one plan per (tp, pp, V, M, SP)
//!     × recomputation × ZeRO stage × schedule (pricing options of the one plan:
//!       cost::estimate_variants)
//!     ─► ranked candidates + explanation
//! ```
//!
//! The global batch stays fixed (the model's `batch` dimension, unless given): dp replicas each
//! take `batch / dp` sequences, run as `M` micro-batches, so the plan's graph is one
//! micro-batch's (`batch / M` sequences over the dp replicas) and candidates are compared on the
//! same work. Any of the dimensions can be fixed ([`Space`]), so a published configuration is
//! priced as written.
//!
//! What keeps the search short (a 128-layer model on thousands of GPUs has thousands of
//! configurations, each a partition of the whole graph):
//!
//! - recomputation and the ZeRO stage are priced on one plan partitioned without them (the cost
//!   model prices both analytically, [`EstimateOptions`]), and so is the schedule;
//! - a (tp, pp) whose parameters alone, spread evenly over its `tp · pp` GPUs (their Adam state
//!   over dp too where the distributed optimizer is searched), exceed a GPU's memory is not
//!   partitioned (no cut of the layers beats the even spread);
//! - one micro-batch's work on one rank of every stage ([`Work`]) is the same for every stage
//!   count, model chunk count, replica count and ZeRO stage with the same tp, sequence
//!   parallelism, recomputation and micro-batch size, and bounds it for larger micro-batches;
//!   it puts a floor under the step of every configuration sharing them. The search prices one
//!   chain per tp and sequence parallelism first (the fewest stages whose parameters take at
//!   most half a GPU), then the others, fewest-floor first, a few at a time, skipping any whose
//!   floor (with the lightest recomputation searched) is above the best step so far — skipped
//!   ones are provably slower than the winner, not listed, and counted in [`Choice::skipped`];
//! - micro-batch counts are tried most first (the least memory and bubble); fewer are tried
//!   only while the last one fit, and with the floor of the lightest recomputation that fit;
//! - each micro-batch size's graph is loaded once; chains run on every core.
//!
//! [`choose`] keeps the one-stage search of the 2019 paper (tp × dp × sequence parallelism ×
//! full recomputation or none); [`choose_in`] takes the [`Space`].

use crate::cost::{estimate_variants, Cluster, Estimate, EstimateOptions, Work};
use crate::pipeline::Schedule;
use crate::recompute::Recompute;
use crate::{partition, PartitionError, PartitionOptions};
use ferrotron_ir::{DType, Graph};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Which configurations the planner tries. The `Option` fields fix a dimension (`None`: search
/// it); the lists are the choices searched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Space {
    /// Pipeline stages and micro-batches (with every schedule); off: one stage, one
    /// micro-batch (tp × dp only) unless the micro-batch size is fixed.
    pub pipeline: bool,
    /// Micro-batch counts tried per (tp, pp) at most, besides one sequence per micro-batch.
    pub micro_batch_counts: usize,
    /// The most model chunks per stage tried for the interleaved schedule (every `V` from 2 up
    /// to it where the layers divide into `pp × V` equal chunks); 1: no interleaving.
    pub max_virtual_stages: u64,
    /// The recomputation choices.
    pub recompute: Vec<Recompute>,
    /// The ZeRO stages (1, the distributed optimizer, only where dp > 1).
    pub zero: Vec<u8>,
    /// Sequence parallelism, without and with.
    pub sequence_parallel: Vec<bool>,
    /// Tensor-parallel degree, fixed.
    pub tp: Option<u64>,
    /// Pipeline stages, fixed.
    pub pp: Option<u64>,
    /// Model chunks per stage, fixed (above 1: the interleaved schedule).
    pub virtual_stages: Option<u64>,
    /// Sequences per micro-batch on each replica (Megatron's `--micro-batch-size`), fixed.
    pub micro_batch_size: Option<u64>,
}

impl Space {
    /// tp × dp × sequence parallelism × full recomputation or none, one stage, one micro-batch,
    /// the optimizer state replicated: the 2019 paper's choices.
    pub fn one_stage() -> Space {
        Space {
            pipeline: false,
            micro_batch_counts: 1,
            max_virtual_stages: 1,
            recompute: vec![Recompute::None, Recompute::Full],
            zero: vec![0],
            ..Space::full()
        }
    }

    /// tp × pp × V × dp × micro-batch size × schedule × sequence parallelism × recomputation
    /// (none, selective, full) × ZeRO stage (0, 1).
    pub fn full() -> Space {
        Space {
            pipeline: true,
            micro_batch_counts: 4,
            max_virtual_stages: 4,
            recompute: vec![Recompute::None, Recompute::Selective, Recompute::Full],
            zero: vec![0, 1],
            sequence_parallel: vec![false, true],
            tp: None,
            pp: None,
            virtual_stages: None,
            micro_batch_size: None,
        }
    }

    /// The recomputation searched with the least work (and the most memory).
    fn lightest(&self) -> Recompute {
        self.recompute
            .iter()
            .copied()
            .min_by_key(|&r| weight(r))
            .unwrap_or(Recompute::None)
    }
}

impl Default for Space {
    fn default() -> Space {
        Space::full()
    }
}

/// Recomputation modes by the work they add (and, the other way round, the memory they keep).
fn weight(r: Recompute) -> u8 {
    match r {
        Recompute::None => 0,
        Recompute::Selective => 1,
        Recompute::Full => 2,
    }
}

/// One configuration the planner priced.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    /// Tensor-parallel degree.
    pub tp: u64,
    /// Data-parallel degree.
    pub dp: u64,
    /// Pipeline stages.
    pub pp: u64,
    /// Model chunks per stage (above 1: the interleaved schedule).
    pub virtual_stages: u64,
    /// Micro-batches per step.
    pub micro_batches: u64,
    /// Sequences per micro-batch on each replica: the global batch / (dp × micro-batches).
    pub micro_batch_size: u64,
    /// The pipeline schedule, for a plan with several micro-batches.
    #[serde(serialize_with = "schedule_name")]
    pub schedule: Option<Schedule>,
    /// Sequence parallelism.
    pub sequence_parallel: bool,
    /// Activation recomputation.
    #[serde(serialize_with = "recompute_name")]
    pub recompute: Recompute,
    /// The ZeRO stage (1: the distributed optimizer).
    pub zero: u8,
    /// Predicted tokens per second over the whole cluster (0 when it cannot run).
    pub tokens_per_second: f64,
    /// The prediction, when the model partitions at this degree.
    #[serde(rename = "simulation")]
    pub estimate: Option<Estimate>,
    /// Why it cannot run (the partitioner's error, a dimension that does not divide, or memory
    /// the parameters alone exceed), if so.
    pub error: Option<String>,
}

fn schedule_name<S: serde::Serializer>(s: &Option<Schedule>, ser: S) -> Result<S::Ok, S::Error> {
    match s {
        Some(s) => ser.serialize_some(&s.to_string()),
        None => ser.serialize_none(),
    }
}

fn recompute_name<S: serde::Serializer>(r: &Recompute, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&r.to_string())
}

impl Candidate {
    /// Whether it partitions and fits in memory.
    pub fn feasible(&self) -> bool {
        self.estimate.as_ref().is_some_and(|s| s.fits)
    }

    /// Whether it was priced and does not fit, or was refused for its parameters alone.
    pub fn exceeds_memory(&self) -> bool {
        self.estimate.as_ref().is_some_and(|s| !s.fits)
            || self
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(PARAMETERS_ALONE))
    }

    /// GPUs holding one copy of the model: tp × pp.
    pub fn model_parallel(&self) -> u64 {
        self.tp * self.pp
    }

    /// Why it cannot run, in a few words: memory (by how much it is over) or the refusal;
    /// `None` when it runs.
    pub fn why_not(&self) -> Option<String> {
        match (&self.estimate, &self.error) {
            (Some(s), _) if !s.fits => Some(format!(
                "needs {:.1} GiB per GPU, {:.1} GiB over the {:.0} GiB it has",
                gib(s.memory_bytes_per_gpu),
                gib(s.memory_bytes_per_gpu - s.memory_capacity_bytes),
                gib(s.memory_capacity_bytes)
            )),
            (Some(_), _) => None,
            (None, e) => Some(e.clone().unwrap_or_default()),
        }
    }

    fn refused(tp: u64, dp: u64, pp: u64, error: String) -> Candidate {
        Candidate {
            tp,
            dp,
            pp,
            virtual_stages: 1,
            micro_batches: 0,
            micro_batch_size: 0,
            schedule: None,
            sequence_parallel: false,
            recompute: Recompute::None,
            zero: 0,
            tokens_per_second: 0.0,
            estimate: None,
            error: Some(error),
        }
    }
}

/// How a configuration refused for its parameters alone says so.
const PARAMETERS_ALONE: &str = "the parameters alone need";

/// The planner's answer.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    /// Every candidate, best first (feasible ones before the rest).
    pub candidates: Vec<Candidate>,
    /// Configurations not partitioned: a floor under their step (see [`crate::cost::Work`])
    /// is above a step already found, or fewer micro-batches of theirs would hold more than
    /// already did not fit.
    pub skipped: usize,
    /// Why the first one wins, in a few sentences.
    pub explanation: String,
}

/// Prices every (tp, sequence parallel, recompute) for `gpus` GPUs of `cluster` at one pipeline
/// stage and one micro-batch ([`Space::one_stage`]), with the global batch `batch` (the model's
/// own when `None`). `load` gives the model graph with its `batch` dimension set to the value
/// it is passed (left as the model says for `None`). [`choose_in`] searches pipelines too.
pub fn choose(
    load: impl Fn(Option<u64>) -> Result<Graph, String>,
    cluster: &Cluster,
    gpus: u64,
    batch: Option<u64>,
    base: &EstimateOptions,
) -> Result<Choice, String> {
    choose_in(load, cluster, gpus, batch, base, &Space::one_stage())
}

/// The first few of `values`, comma-separated, with `…` when there are more.
fn listed(values: impl IntoIterator<Item = u64>) -> String {
    let values: Vec<u64> = values.into_iter().collect();
    let mut out: Vec<String> = values.iter().take(12).map(u64::to_string).collect();
    if values.len() > 12 {
        out.push("…".into());
    }
    out.join(", ")
}

/// The divisors of `n`.
fn divisors(n: u64) -> impl Iterator<Item = u64> {
    (1..=n).filter(move |d| n.is_multiple_of(*d))
}

/// Prices every configuration of `space` for `gpus` GPUs of `cluster` with the global batch
/// `batch` (the model's own when `None`); `load` as for [`choose`] (it is asked for one
/// micro-batch's graph: `batch / M` sequences). Recomputation and the ZeRO stage come from
/// `space`, whatever `base` says.
pub fn choose_in(
    load: impl Fn(Option<u64>) -> Result<Graph, String>,
    cluster: &Cluster,
    gpus: u64,
    batch: Option<u64>,
    base: &EstimateOptions,
    space: &Space,
) -> Result<Choice, String> {
    let graph = load(batch)?;
    let global = graph
        .dims
        .iter()
        .find(|(n, _)| n == "batch")
        .map(|&(_, b)| b)
        .ok_or("the model has no `batch` dimension")?;
    let tokens = ferrotron_ir::count::tokens_per_step(&graph).unwrap_or(0) as f64;
    let layers = graph.layers().count() as u64;
    let (param_bytes, state_bytes) = parameter_bytes(&graph, base.compute_dtype);
    let zero_one = space.zero.iter().any(|&z| z >= 1);
    // What a GPU holds of the parameters at least, spread evenly over tp × pp GPUs (the Adam
    // state over the replicas too where the distributed optimizer is searched).
    let least = |tp: u64, pp: u64, dp: u64| {
        let state = if zero_one {
            state_bytes / dp.max(1) as f64
        } else {
            state_bytes
        };
        (param_bytes + state) / (tp * pp) as f64
    };
    // One micro-batch's graph by its batch, loaded once.
    let mut graphs: HashMap<u64, Graph> = HashMap::new();
    graphs.insert(global, graph);
    let mut candidates = Vec::new();
    let mut chains = Vec::new();
    let tps: Vec<u64> = match space.tp {
        Some(tp) => vec![tp],
        None => (0..=gpus.trailing_zeros().min(12))
            .map(|k| 1u64 << k)
            .chain((3..=gpus).filter(|t| gpus.is_multiple_of(*t) && !t.is_power_of_two()))
            .collect(),
    };
    for tp in tps {
        if tp == 0 || !gpus.is_multiple_of(tp) {
            candidates.push(vec![Candidate::refused(
                tp,
                0,
                space.pp.unwrap_or(1),
                format!(
                    "tp = {tp} does not divide the {gpus} GPUs (valid tp: {})",
                    listed(divisors(gpus))
                ),
            )]);
            continue;
        }
        let stage_counts: Vec<u64> = match space.pp {
            Some(pp) => vec![pp],
            None if space.pipeline => (1..=layers.max(1))
                .filter(|pp| (gpus / tp).is_multiple_of(*pp))
                .collect(),
            None => vec![1],
        };
        for pp in stage_counts {
            if pp == 0 || !(gpus / tp).is_multiple_of(pp) || pp > layers.max(1) {
                candidates.push(vec![Candidate::refused(
                    tp,
                    0,
                    pp,
                    format!(
                        "pp = {pp} does not divide the {} GPUs per tp rank into stages of at \
                         least a layer (valid pp: {})",
                        gpus / tp,
                        listed(divisors(gpus / tp).filter(|&p| p <= layers.max(1)))
                    ),
                )]);
                continue;
            }
            let dp = gpus / (tp * pp);
            if !global.is_multiple_of(dp) {
                candidates.push(vec![Candidate::refused(
                    tp,
                    dp,
                    pp,
                    format!(
                        "the global batch {global} does not divide into {dp} replicas (dp: \
                         GPUs / (tp × pp); dp dividing both {global} and {gpus}: {})",
                        listed(divisors(gcd(global, gpus)))
                    ),
                )]);
                continue;
            }
            // No cut of the layers holds fewer parameters per GPU than an even spread.
            let at_least = least(tp, pp, dp);
            if space.pipeline && at_least > cluster.memory_bytes as f64 {
                candidates.push(vec![Candidate::refused(
                    tp,
                    dp,
                    pp,
                    format!(
                        "{PARAMETERS_ALONE} {:.1} GiB per GPU at tp × pp = {}, {:.1} GiB over \
                         the {:.0} GiB it has",
                        gib_f(at_least),
                        tp * pp,
                        gib_f(at_least - cluster.memory_bytes as f64),
                        gib(cluster.memory_bytes)
                    ),
                )]);
                continue;
            }
            let per_replica = global / dp;
            let counts = match space.micro_batch_size {
                Some(b) if b == 0 || !per_replica.is_multiple_of(b) => {
                    candidates.push(vec![Candidate::refused(
                        tp,
                        dp,
                        pp,
                        format!(
                            "micro-batch size {b} does not divide the {per_replica} sequences \
                             of a replica (global batch {global} / dp {dp}; valid: {})",
                            listed(divisors(per_replica))
                        ),
                    )]);
                    continue;
                }
                Some(b) => vec![per_replica / b],
                None => micro_batch_counts(per_replica, pp, space),
            };
            let chunk_counts: Vec<u64> = match space.virtual_stages {
                Some(v) => vec![v],
                None if space.pipeline && pp > 1 => std::iter::once(1)
                    .chain((2..=space.max_virtual_stages).filter(|v| layers.is_multiple_of(pp * v)))
                    .collect(),
                None => vec![1],
            };
            for v in chunk_counts {
                if v > 1 && (pp < 2 || !layers.is_multiple_of(pp * v)) {
                    candidates.push(vec![Candidate::refused(
                        tp,
                        dp,
                        pp,
                        format!(
                            "{v} model chunks per stage: the interleaved schedule needs pp ≥ 2 \
                             and the {layers} layers in pp × V equal chunks (valid V at pp = \
                             {pp}: {})",
                            listed(
                                divisors(layers / pp.max(1))
                                    .filter(|_| pp >= 2 && layers.is_multiple_of(pp))
                            )
                        ),
                    )]);
                    continue;
                }
                // The interleaved schedule runs micro-batches in groups of pp.
                let counts: Vec<u64> = counts
                    .iter()
                    .copied()
                    .filter(|m| v == 1 || m.is_multiple_of(pp))
                    .collect();
                if counts.is_empty() {
                    if space.virtual_stages.is_some() || space.micro_batch_size.is_some() {
                        candidates.push(vec![Candidate::refused(
                            tp,
                            dp,
                            pp,
                            format!(
                                "the interleaved schedule runs micro-batches in groups of pp = \
                                 {pp}: {per_replica} sequences per replica give no multiple of \
                                 {pp} micro-batches{}",
                                space
                                    .micro_batch_size
                                    .map_or(String::new(), |b| format!(" of {b}"))
                            ),
                        )]);
                    }
                    continue;
                }
                for &sp in &space.sequence_parallel {
                    chains.push(Chain {
                        tp,
                        pp,
                        dp,
                        v,
                        sp,
                        per_replica,
                        counts: counts.clone(),
                        slot: candidates.len(),
                    });
                    candidates.push(Vec::new());
                }
            }
        }
    }
    let mut search = Search {
        chains: &chains,
        global,
        tokens,
        cluster,
        base,
        space,
        graphs,
        works: HashMap::new(),
        best: f64::INFINITY,
        refused_tp: Vec::new(),
        skipped: 0,
    };
    // First, for each tp and sequence parallelism, one chain at its most micro-batches: a step
    // to beat, and the work per micro-batch that bounds the others. Fewer stages are faster
    // (less bubble for the same micro-batch) and more hold less, so the one with the fewest
    // stages whose parameters take at most half a GPU, or else the most stages; one model
    // chunk per stage before several.
    let mut leads: Vec<usize> = Vec::new();
    let roomy = |c: &Chain| least(c.tp, c.pp, c.dp) <= 0.5 * cluster.memory_bytes as f64;
    for (i, c) in chains.iter().enumerate() {
        let better = |j: usize| {
            let l = &chains[j];
            match (roomy(l), roomy(c)) {
                _ if l.v == 1 && c.v > 1 => false,
                _ if l.v > 1 && c.v == 1 => true,
                (false, true) => true,
                (true, true) => c.pp < l.pp,
                (false, false) => c.pp > l.pp,
                (true, false) => false,
            }
        };
        match leads
            .iter_mut()
            .find(|&&mut j| (chains[j].tp, chains[j].sp) == (c.tp, c.sp))
        {
            Some(j) if better(*j) => *j = i,
            Some(_) => {}
            None => leads.push(i),
        }
    }
    let first = search.round(&load, &leads)?;
    // Then every other chain's most micro-batches, unless a floor under its step (from the work
    // of the same tp, sequence parallelism and micro-batch size) is above the best step.
    let others: Vec<usize> = (0..chains.len()).filter(|i| !leads.contains(i)).collect();
    let second = search.round(&load, &others)?;
    // Then fewer, larger micro-batches, while they might fit and might beat the best step.
    let fit: Vec<(usize, Recompute)> = first
        .iter()
        .chain(&second)
        .filter_map(|(i, t)| t.lightest_fit.map(|r| (*i, r)))
        .collect();
    let third = search.fewer(&load, &fit)?;
    for (i, tried) in first.into_iter().chain(second) {
        candidates[chains[i].slot].extend(tried.candidates);
    }
    for (i, found) in third {
        candidates[chains[i].slot].extend(found);
    }
    let skipped = search.skipped;
    let mut candidates: Vec<Candidate> = candidates.into_iter().flatten().collect();
    candidates.sort_by(|a, b| {
        b.feasible()
            .cmp(&a.feasible())
            .then(b.tokens_per_second.total_cmp(&a.tokens_per_second))
    });
    let explanation = explain(&candidates, cluster);
    Ok(Choice {
        candidates,
        skipped,
        explanation,
    })
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The state of a search over chains: the graphs loaded, the work per micro-batch found, the
/// best step so far.
struct Search<'a> {
    chains: &'a [Chain],
    global: u64,
    tokens: f64,
    cluster: &'a Cluster,
    base: &'a EstimateOptions,
    space: &'a Space,
    graphs: HashMap<u64, Graph>,
    /// [`Work`] by (tp, sequence parallel, sequences per replica and micro-batch,
    /// recomputation).
    works: HashMap<(u64, bool, u64, Recompute), Work>,
    best: f64,
    refused_tp: Vec<u64>,
    skipped: usize,
}

impl Search<'_> {
    /// The highest floor the known work (with recomputation `recompute`) puts under chain
    /// `c`'s step at `m` micro-batches (0 when nothing is known).
    fn floor(&self, c: &Chain, m: u64, recompute: Recompute, own: &[(u64, Work)]) -> f64 {
        let b = c.per_replica / m;
        self.works
            .iter()
            .filter(|(&(tp, sp, _, r), _)| (tp, sp, r) == (c.tp, c.sp, recompute))
            .map(|(&(_, _, b0, _), &w)| (b0, w))
            .chain(own.iter().copied())
            .filter(|&(b0, _)| b0 <= b)
            .map(|(b0, w)| w.floor_interleaved(c.pp, c.v, m, b as f64 / b0 as f64))
            .fold(0.0, f64::max)
    }

    fn load(
        &mut self,
        load: &impl Fn(Option<u64>) -> Result<Graph, String>,
        m: u64,
    ) -> Result<(), String> {
        let batch = self.global / m;
        if let std::collections::hash_map::Entry::Vacant(e) = self.graphs.entry(batch) {
            e.insert(load(Some(batch))?);
        }
        Ok(())
    }

    /// Tries `chains`' most micro-batches, the lowest floor first, a few at a time in parallel,
    /// skipping those whose floor is above the best step so far or whose tp the model refused;
    /// takes in what each few found before the next.
    fn round(
        &mut self,
        load: &impl Fn(Option<u64>) -> Result<Graph, String>,
        chains: &[usize],
    ) -> Result<Vec<(usize, Tried)>, String> {
        let lightest = self.space.lightest();
        let mut order: Vec<(f64, usize)> = chains
            .iter()
            .map(|&i| {
                let c = &self.chains[i];
                (self.floor(c, c.counts[0], lightest, &[]), i)
            })
            .collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut out = Vec::new();
        for few in order.chunks(BATCH) {
            let mut run = Vec::new();
            for &(_, i) in few {
                let c = &self.chains[i];
                if self.refused_tp.contains(&c.tp) {
                    continue;
                }
                if self.floor(c, c.counts[0], lightest, &[]) > self.best {
                    self.skipped += c.counts.len();
                    continue;
                }
                self.load(load, c.counts[0])?;
                run.push(i);
            }
            let this = &*self;
            let tried = parallel_map(&run, |&i| {
                let c = &this.chains[i];
                let m = c.counts[0];
                c.try_count(&this.graphs[&(this.global / m)], m, this)
            });
            for (i, mut t) in run.into_iter().zip(tried) {
                let c = &self.chains[i];
                if let Some((error, whole_tp)) = t.error.take() {
                    // A degree the model does not allow is listed once, not per stage count.
                    if !c.sp && !self.refused_tp.contains(&c.tp) {
                        t.candidates
                            .push(Candidate::refused(c.tp, c.dp, c.pp, error));
                        if whole_tp {
                            self.refused_tp.push(c.tp);
                        }
                    }
                }
                self.take(c, &t);
                out.push((i, t));
            }
        }
        Ok(out)
    }

    /// Tries the later micro-batch counts of `chains` (each in order, the chains in parallel),
    /// each while its floor is under the best step so far and the one before fit. A chain that
    /// fit only with some recomputation at more micro-batches needs at least as much at fewer
    /// (they hold more), so its floors are those of the lightest recomputation that fit.
    fn fewer(
        &mut self,
        load: &impl Fn(Option<u64>) -> Result<Graph, String>,
        chains: &[(usize, Recompute)],
    ) -> Result<Vec<(usize, Vec<Candidate>)>, String> {
        let mut run = Vec::new();
        for &(i, recompute) in chains {
            let c = &self.chains[i];
            let open: Vec<u64> = c.counts[1..]
                .iter()
                .copied()
                .take_while(|&m| self.floor(c, m, recompute, &[]) <= self.best)
                .collect();
            self.skipped += c.counts.len() - 1 - open.len();
            for &m in &open {
                self.load(load, m)?;
            }
            if !open.is_empty() {
                run.push((i, recompute, open));
            }
        }
        let this = &*self;
        let found = parallel_map(&run, |(i, recompute, open)| {
            let c = &this.chains[*i];
            let mut recompute = *recompute;
            // The work of the counts tried here: (sequences per micro-batch, per recomputation).
            let mut own: Vec<(u64, Vec<(Recompute, Work)>)> = Vec::new();
            let mut out = Vec::new();
            let mut skipped = 0;
            for (k, &m) in open.iter().enumerate() {
                let known: Vec<(u64, Work)> = own
                    .iter()
                    .filter_map(|(b, works)| {
                        works
                            .iter()
                            .find(|(r, _)| *r == recompute)
                            .map(|&(_, w)| (*b, w))
                    })
                    .collect();
                if this.floor(c, m, recompute, &known) > this.best {
                    skipped = open.len() - k;
                    break;
                }
                let t = c.try_count(&this.graphs[&(this.global / m)], m, this);
                if let Some(r) = t.lightest_fit.filter(|&r| weight(r) > weight(recompute)) {
                    recompute = r;
                }
                own.push((c.per_replica / m, t.works.clone()));
                out.extend(t.candidates);
                // Fewer, larger micro-batches only hold more activations.
                if t.lightest_fit.is_none() {
                    skipped = open.len() - k - 1;
                    break;
                }
            }
            (out, skipped)
        });
        let mut out = Vec::new();
        for ((i, _, _), (found, skipped)) in run.into_iter().zip(found) {
            self.skipped += skipped;
            out.push((i, found));
        }
        Ok(out)
    }

    /// Takes in a tried count's work and best step.
    fn take(&mut self, c: &Chain, t: &Tried) {
        if let Some(m) = t.m {
            let b = c.per_replica / m;
            for &(r, w) in &t.works {
                self.works.insert((c.tp, c.sp, b, r), w);
            }
        }
        for cand in t.candidates.iter().filter(|c| c.feasible()) {
            if let Some(e) = &cand.estimate {
                self.best = self.best.min(e.step_time_s);
            }
        }
    }
}

/// Chains tried at once between updates of the best step: enough for every core here, few
/// enough that a good step found early spares the rest.
const BATCH: usize = 4;

/// One (tp, pp, model chunks, sequence parallelism) and the micro-batch counts to try, most
/// first.
struct Chain {
    tp: u64,
    pp: u64,
    dp: u64,
    /// Model chunks per stage (above 1: interleaved).
    v: u64,
    sp: bool,
    /// Sequences per data-parallel replica in a step.
    per_replica: u64,
    /// Micro-batch counts to try, most first.
    counts: Vec<u64>,
    /// Where its candidates go in the listing (the order the search enumerates them in).
    slot: usize,
}

/// What partitioning and pricing one micro-batch count gave.
struct Tried {
    candidates: Vec<Candidate>,
    /// The recomputation with the least work among the pricings that fit in memory, if any
    /// does.
    lightest_fit: Option<Recompute>,
    /// The partitioner's error, and whether it refuses the tp degree itself.
    error: Option<(String, bool)>,
    /// The micro-batch count tried and its plan's work under each recomputation searched,
    /// when it partitioned.
    m: Option<u64>,
    works: Vec<(Recompute, Work)>,
}

impl Chain {
    /// Partitions `graph` (one micro-batch's) for `m` micro-batches and prices it under every
    /// recomputation, ZeRO stage and schedule the space searches.
    fn try_count(&self, graph: &Graph, m: u64, search: &Search) -> Tried {
        let (cluster, base, tokens, space) =
            (search.cluster, search.base, search.tokens, search.space);
        let opts = PartitionOptions {
            tp: self.tp,
            dp: self.dp,
            sequence_parallel: self.sp,
            pp: self.pp,
            micro_batches: m,
            schedule: if self.v > 1 {
                Schedule::Interleaved
            } else {
                Schedule::OneFOneB
            },
            virtual_stages: self.v,
            ..PartitionOptions::default()
        };
        let plan = match partition(graph, &opts) {
            Ok(p) => p,
            Err(error) => {
                let whole_tp = matches!(error, PartitionError::Indivisible { axis: "tp", .. });
                return Tried {
                    candidates: Vec::new(),
                    lightest_fit: None,
                    error: Some((error.to_string(), whole_tp)),
                    m: None,
                    works: Vec::new(),
                };
            }
        };
        let schedules: &[Schedule] = if self.v > 1 {
            &[Schedule::Interleaved]
        } else if self.pp > 1 {
            &[Schedule::OneFOneB, Schedule::GPipe]
        } else {
            &[Schedule::OneFOneB]
        };
        // The distributed optimizer is the same as none on one replica.
        let mut zeros: Vec<u8> = space
            .zero
            .iter()
            .map(|&z| if self.dp > 1 { z.min(1) } else { 0 })
            .collect();
        zeros.dedup();
        let variants: Vec<(Recompute, u8)> = space
            .recompute
            .iter()
            .flat_map(|&r| zeros.iter().map(move |&z| (r, z)))
            .collect();
        let priced = estimate_variants(&plan, schedules, cluster, base, &variants);
        let mut candidates = Vec::new();
        for (&(recompute, zero), estimates) in variants.iter().zip(priced.estimates) {
            for sim in estimates {
                candidates.push(Candidate {
                    tp: self.tp,
                    dp: self.dp,
                    pp: self.pp,
                    virtual_stages: self.v,
                    micro_batches: m,
                    micro_batch_size: self.per_replica / m,
                    schedule: sim.schedule,
                    sequence_parallel: self.sp,
                    recompute,
                    zero,
                    tokens_per_second: tokens / sim.step_time_s.max(1e-12),
                    estimate: Some(sim),
                    error: None,
                });
            }
        }
        Tried {
            lightest_fit: candidates
                .iter()
                .filter(|c| c.feasible())
                .map(|c| c.recompute)
                .min_by_key(|&r| weight(r)),
            candidates,
            error: None,
            m: Some(m),
            works: priced.works,
        }
    }
}

/// `f` over `items` on every core, results in `items`' order.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if workers <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(done) => {
                    for (i, r) in done {
                        out[i] = Some(r);
                    }
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    out.into_iter().flatten().collect()
}

/// The micro-batch counts to try for `per_replica` sequences per data-parallel replica on `pp`
/// stages, most first: divisors of `per_replica` from the first that is at least `pp` (fewer
/// leave stages idle the whole step), each at least twice the one before, up to
/// `space.micro_batch_counts` of them, and always one sequence per micro-batch (the smallest
/// bubble and activations). One stage, one micro-batch without pipelines.
pub fn micro_batch_counts(per_replica: u64, pp: u64, space: &Space) -> Vec<u64> {
    if !space.pipeline || per_replica == 0 {
        return vec![1];
    }
    let divisors: Vec<u64> = (1..=per_replica)
        .filter(|d| per_replica.is_multiple_of(*d))
        .collect();
    let mut out = Vec::new();
    let mut next = divisors
        .iter()
        .copied()
        .find(|&d| d >= pp)
        .unwrap_or(per_replica);
    for &d in &divisors {
        if d >= next && out.len() < space.micro_batch_counts {
            out.push(d);
            next = 2 * d;
        }
    }
    if !out.contains(&per_replica) {
        out.push(per_replica);
    }
    out.reverse();
    out
}

/// Bytes the model's parameters take, priced as the cost model prices them (at `dtype` when
/// given): their weights and gradients, and their Adam state (with an f32 master copy below
/// f32), which the distributed optimizer spreads over the replicas.
fn parameter_bytes(g: &Graph, dtype: Option<DType>) -> (f64, f64) {
    g.params
        .iter()
        .map(|(_, p)| {
            let ty = g.ty(p.value);
            let n = ty.shape.numel().unwrap_or(0);
            let d = dtype.unwrap_or(ty.dtype);
            let master = if d == DType::F32 { 0 } else { 4 };
            ((2 * n * d.size_bytes()) as f64, (n * (8 + master)) as f64)
        })
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y))
}

fn gib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 30)
}

fn gib_f(b: f64) -> f64 {
    b / f64::from(1 << 30)
}

/// How a recomputation reads in a sentence.
fn recompute_words(r: Recompute) -> &'static str {
    match r {
        Recompute::None => "no recomputation",
        Recompute::Selective => "selective recomputation",
        Recompute::Full => "full recomputation",
    }
}

/// Why the first candidate wins: what it costs, and what stops the alternatives.
fn explain(candidates: &[Candidate], cluster: &Cluster) -> String {
    let mut out = String::new();
    let Some(best) = candidates.first().filter(|c| c.feasible()) else {
        let _ = write!(
            out,
            "No configuration fits in {:.0} GiB per GPU; the smallest needs {:.1} GiB.",
            gib(cluster.memory_bytes),
            candidates
                .iter()
                .filter_map(|c| c.estimate.as_ref())
                .map(|s| gib(s.memory_bytes_per_gpu))
                .fold(f64::INFINITY, f64::min)
        );
        return out;
    };
    let s = best.estimate.as_ref().expect("feasible");
    let _ = write!(
        out,
        "tp = {}, dp = {}{}{}{}{}: {:.0} tokens/s, {:.3} s per step ({:.1} TFLOP/s per GPU), \
         {:.1} of {:.0} GiB per GPU.",
        best.tp,
        best.dp,
        match best.schedule {
            Some(schedule) if best.pp > 1 => format!(
                ", pp = {}{}, {} micro-batches of {} ({schedule})",
                best.pp,
                if best.virtual_stages > 1 {
                    format!(" × {} model chunks", best.virtual_stages)
                } else {
                    String::new()
                },
                best.micro_batches,
                best.micro_batch_size
            ),
            Some(_) => format!(
                ", pp = 1, {} micro-batches of {} (gradient accumulation)",
                best.micro_batches, best.micro_batch_size
            ),
            None => String::new(),
        },
        if best.sequence_parallel {
            ", sequence parallel"
        } else {
            ""
        },
        if best.recompute == Recompute::None {
            String::new()
        } else {
            format!(", {}", recompute_words(best.recompute))
        },
        if best.zero >= 1 {
            ", distributed optimizer"
        } else {
            ""
        },
        best.tokens_per_second,
        s.step_time_s,
        s.tflops_per_gpu,
        gib(s.memory_bytes_per_gpu),
        gib(cluster.memory_bytes),
    );
    if best.pp > 1 {
        let (p, m, v) = (
            best.pp as f64,
            best.micro_batches as f64,
            best.virtual_stages as f64,
        );
        let _ = write!(
            out,
            " The pipeline idles {:.1}% of its span ((P − 1)/({}M + P − 1) = {:.1}%; the rest is \
             uneven stages and transfers).",
            100.0 * s.bubble_fraction,
            if best.virtual_stages > 1 { "V·" } else { "" },
            100.0 * (p - 1.0) / (v * m + p - 1.0)
        );
    }
    // What less model parallelism would need.
    let smaller: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.model_parallel() < best.model_parallel())
        .filter(|c| c.estimate.is_some() || c.exceeds_memory())
        .collect();
    if best.pp > 1 && !smaller.is_empty() && smaller.iter().all(|c| !c.feasible()) {
        let _ = write!(
            out,
            " Nothing with fewer than {} GPUs per model replica (tp × pp) fits in memory.",
            best.model_parallel()
        );
    } else {
        // The largest tp up to which nothing priced at this pp fits.
        let mut tps: Vec<u64> = candidates
            .iter()
            .filter(|c| c.tp < best.tp && c.pp == best.pp)
            .filter(|c| c.estimate.is_some() || c.exceeds_memory())
            .map(|c| c.tp)
            .collect();
        tps.sort_unstable();
        tps.dedup();
        let fits_at = |tp: u64| {
            candidates
                .iter()
                .any(|c| c.tp == tp && c.pp == best.pp && c.feasible())
        };
        if let Some(tp) = tps.iter().copied().take_while(|&tp| !fits_at(tp)).last() {
            let _ = write!(
                out,
                " At tp = {tp} or below the model does not fit in memory."
            );
        }
    }
    if let Some(lower) = candidates
        .iter()
        .find(|c| c.feasible() && c.tp < best.tp && c.pp == best.pp)
    {
        let _ = write!(
            out,
            " tp = {} is {:.0}% slower{}.",
            lower.tp,
            (1.0 - lower.tokens_per_second / best.tokens_per_second) * 100.0,
            if weight(lower.recompute) > weight(best.recompute) {
                format!(": it fits only with {}", recompute_words(lower.recompute))
            } else {
                String::new()
            }
        );
    }
    if let Some(next) = candidates
        .iter()
        .filter(|c| c.feasible() && c.tp > best.tp && c.pp == best.pp)
        .max_by(|a, b| a.tokens_per_second.total_cmp(&b.tokens_per_second))
    {
        let ns = next.estimate.as_ref().expect("feasible");
        let across = next.tp > cluster.gpus_per_node;
        let _ = write!(
            out,
            " tp = {} is {:.0}% slower: its tensor-parallel communication takes {:.3} s per step \
             against {:.3} s{}.",
            next.tp,
            (1.0 - next.tokens_per_second / best.tokens_per_second) * 100.0,
            ns.tp_comm_s,
            s.tp_comm_s,
            if across {
                format!(
                    ", because its groups span more than the {} GPUs of a node and their \
                     all-reduces cross InfiniBand",
                    cluster.gpus_per_node
                )
            } else {
                String::new()
            }
        );
    }
    // The same configuration but for the pricing options.
    let same = |c: &&Candidate| {
        c.tp == best.tp
            && c.pp == best.pp
            && c.virtual_stages == best.virtual_stages
            && c.sequence_parallel == best.sequence_parallel
    };
    let twin = |c: &&Candidate| {
        same(c) && c.micro_batches == best.micro_batches && c.schedule == best.schedule
    };
    if best.schedule == Some(Schedule::OneFOneB) && best.pp > 1 {
        if let Some(gpipe) = candidates
            .iter()
            .filter(same)
            .filter(|c| (c.recompute, c.zero) == (best.recompute, best.zero))
            .find(|c| c.micro_batches == best.micro_batches && c.schedule == Some(Schedule::GPipe))
            .and_then(|c| c.estimate.as_ref())
        {
            let _ = write!(
                out,
                " GPipe would need {:.1} GiB per GPU (all {} micro-batches in flight on the \
                 first stage, against at most {} under 1F1B).",
                gib(gpipe.memory_bytes_per_gpu),
                best.micro_batches,
                best.pp.min(best.micro_batches)
            );
        }
    }
    if best.pp > 1 {
        if let Some((c, e)) = candidates
            .iter()
            .filter(same)
            .filter(|c| (c.recompute, c.zero) == (best.recompute, best.zero))
            .filter(|c| c.schedule == best.schedule && c.micro_batches < best.micro_batches)
            .filter_map(|c| c.estimate.as_ref().map(|e| (c, e)))
            .max_by_key(|(c, _)| c.micro_batches)
        {
            let _ = write!(
                out,
                " With {} micro-batches the pipeline idles {:.1}% and a step takes {:.3} s{}.",
                c.micro_batches,
                100.0 * e.bubble_fraction,
                e.step_time_s,
                if e.fits { "" } else { ", but it does not fit" }
            );
        }
    }
    if best.recompute != Recompute::None {
        // Lighter recomputation of the same configuration does not fit (or it would win).
        let lighter = candidates
            .iter()
            .filter(twin)
            .filter(|c| c.zero == best.zero && weight(c.recompute) < weight(best.recompute))
            .filter_map(|c| c.estimate.as_ref().map(|e| (c.recompute, e)))
            .max_by_key(|(r, _)| weight(*r));
        let _ = write!(
            out,
            " {} is needed to fit{}, and costs {:.3} s per step.",
            if best.recompute == Recompute::Selective {
                "Selective recomputation"
            } else {
                "Full recomputation"
            },
            match lighter {
                Some((r, e)) if !e.fits => format!(
                    " ({} would need {:.1} GiB per GPU)",
                    if r == Recompute::None {
                        "without it the configuration"
                    } else {
                        "selective recomputation"
                    },
                    gib(e.memory_bytes_per_gpu)
                ),
                _ => String::new(),
            },
            s.recompute_s
        );
    }
    let other_zero = candidates
        .iter()
        .filter(twin)
        .filter(|c| c.recompute == best.recompute && c.zero != best.zero)
        .find_map(|c| c.estimate.as_ref());
    match other_zero {
        Some(e) if best.zero >= 1 && !e.fits => {
            let _ = write!(
                out,
                " The distributed optimizer is needed to fit: with the optimizer state on every \
                 replica it would need {:.1} GiB per GPU.",
                gib(e.memory_bytes_per_gpu)
            );
        }
        Some(e) if best.zero >= 1 => {
            let _ = write!(
                out,
                " The distributed optimizer saves {:.1} GiB per GPU and is {:.1}% faster than \
                 replicating the optimizer state: Adam on 1/{} of the parameters takes {:.3} s \
                 (against {:.3} s) and the all-gather after it {:.3} s.",
                gib(e
                    .memory_bytes_per_gpu
                    .saturating_sub(s.memory_bytes_per_gpu)),
                100.0 * (1.0 - s.step_time_s / e.step_time_s),
                best.dp,
                s.optimizer_s,
                e.optimizer_s,
                s.dp_gather_s
            );
        }
        Some(e) if e.fits => {
            let _ = write!(
                out,
                " The distributed optimizer would hold {:.1} GiB less per GPU but is {:.1}% \
                 slower (its all-gather after the step takes {:.3} s).",
                gib(s
                    .memory_bytes_per_gpu
                    .saturating_sub(e.memory_bytes_per_gpu)),
                100.0 * (e.step_time_s / s.step_time_s - 1.0),
                e.dp_gather_s
            );
        }
        _ => {}
    }
    out
}
