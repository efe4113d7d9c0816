//! Published runs, predicted: the cost model and the planner against the weak-scaling table of
//! Narayanan et al., *Efficient Large-Scale Language Model Training on GPU Clusters Using
//! Megatron-LM* (SC21, arXiv 2104.04473, table 1), as [`crate::cost::weak_scaling_table`] does
//! for the 2019 paper.
//!
//! ```text
//! TABLE_1 row ─► the zoo's GPT model (vocabulary 51,200) with the row's hidden size, heads and
//!   layers, sequence 2,048, one micro-batch's batch ─► partition at the row's tp × pp × dp,
//!   micro-batches, schedule, equal layers per model chunk (Megatron's split)
//!   ─► cost::estimate (fp16, full recomputation, the row's gradient all-reduce) ─► step time
//!   ─► the paper's FLOPs (its equation 3) / step / GPUs, beside the paper's TFLOP/s
//!   └► planner::choose_in on the same GPUs and global batch (tp × pp × V × dp × micro-batch
//!      size × schedule × SP × recomputation × ZeRO stage 0/1) ─► its pick, its step against the
//!      paper's configuration's, and the pick's plan priced with the paper's settings
//! ```
//!
//! Each row runs as the paper's own script ran it (Megatron-LM's `examples/sc21/run_table_1.sh`:
//! micro-batch size, model chunks per stage, PyTorch's overlapped DDP or Megatron's local DDP).
//! Both throughput columns count FLOPs the paper's way (equation 3), so they compare the same
//! thing; the model's own count of what the GPU executes is shown beside them. The paper's
//! comparison with ZeRO-3 (its §5.2) is quoted in the report, not predicted: the cost model
//! prices ZeRO stages 0 and 1 only.

use crate::cost::{calibrate_gemm, estimate, Cluster, Estimate, EstimateOptions};
use crate::pipeline::Schedule;
use crate::planner::{choose_in, Space};
use crate::recompute::Recompute;
use crate::{partition, PartitionOptions, Plan};
use ferrotron_ir::Graph;
use std::fmt::Write as _;

/// The zoo model every row loads (GPT-2's layer, vocabulary 51,200), its dimensions overridden.
pub const MODEL_FILE: &str = "megatron-8.3b.ron";
/// Every row's sequence length (and position table).
pub const SEQUENCE: u64 = 2048;
/// Every row's vocabulary.
pub const VOCABULARY: u64 = 51200;

/// One row of the paper's table 1, with how the paper's script ran it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PaperRun {
    /// Parameters in billions, as the paper prints them.
    pub billions: f64,
    /// Attention heads.
    pub heads: u64,
    /// Hidden size.
    pub hidden: u64,
    /// Transformer layers.
    pub layers: u64,
    /// Tensor-parallel size.
    pub tp: u64,
    /// Pipeline-parallel size.
    pub pp: u64,
    /// GPUs in all.
    pub gpus: u64,
    /// Global batch, sequences.
    pub batch: u64,
    /// Sequences per micro-batch (the script's `MBS`).
    pub micro_batch: u64,
    /// Model chunks per pipeline stage: above 1 the interleaved schedule (the script's
    /// `--num-layers-per-virtual-pipeline-stage`), else 1F1B.
    pub virtual_stages: u64,
    /// The data-parallel gradient all-reduce overlapped with the backward pass (`--DDP-impl
    /// torch`) rather than run after it (`--DDP-impl local`).
    pub overlap_dp: bool,
    /// The paper's achieved TFLOP/s per GPU (equation 3's FLOPs).
    pub tflops: f64,
    /// The paper's share of the A100's 312 TFLOP/s.
    pub share_of_peak: f64,
    /// The paper's aggregate PFLOP/s.
    pub aggregate_pflops: f64,
}

impl PaperRun {
    /// Data-parallel size: GPUs / (tp · pp).
    pub fn dp(&self) -> u64 {
        self.gpus / (self.tp * self.pp).max(1)
    }

    /// Micro-batches per step on every pipeline: batch / (micro-batch · dp).
    pub fn micro_batches(&self) -> u64 {
        self.batch / (self.micro_batch * self.dp()).max(1)
    }

    /// The pipeline schedule; `None` without stages.
    pub fn schedule(&self) -> Option<Schedule> {
        match (self.pp, self.virtual_stages) {
            (1, _) => None,
            (_, 1) => Some(Schedule::OneFOneB),
            _ => Some(Schedule::Interleaved),
        }
    }

    /// The paper's FLOPs per step (its equation 3: the GEMMs of the forward and backward passes
    /// and of the recomputed forward, the logit layer's without recomputation):
    /// `96·B·s·l·h²·(1 + s/6h + V/16lh)`.
    pub fn paper_flops(&self) -> f64 {
        let (b, s, l, h, v) = (
            self.batch as f64,
            SEQUENCE as f64,
            self.layers as f64,
            self.hidden as f64,
            VOCABULARY as f64,
        );
        96.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))
    }

    /// The dimensions to load one micro-batch's model with: the row's sizes, and `batch` the
    /// micro-batch over every data-parallel replica.
    pub fn dims(&self) -> Vec<(&'static str, u64)> {
        self.dims_with_batch(self.micro_batch * self.dp())
    }

    fn dims_with_batch(&self, batch: u64) -> Vec<(&'static str, u64)> {
        vec![
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("layers", self.layers),
            ("seq", SEQUENCE),
            ("positions", SEQUENCE),
            ("vocab", VOCABULARY),
            ("batch", batch),
        ]
    }

    fn name(&self) -> String {
        format!("{}B", self.billions)
    }
}

const fn run(
    (billions, heads, hidden, layers): (f64, u64, u64, u64),
    (tp, pp, gpus, batch): (u64, u64, u64, u64),
    (micro_batch, virtual_stages, overlap_dp): (u64, u64, bool),
    (tflops, share_of_peak, aggregate_pflops): (f64, f64, f64),
) -> PaperRun {
    PaperRun {
        billions,
        heads,
        hidden,
        layers,
        tp,
        pp,
        gpus,
        batch,
        micro_batch,
        virtual_stages,
        overlap_dp,
        tflops,
        share_of_peak,
        aggregate_pflops,
    }
}

/// The paper's table 1 (checked against its text): parameters, heads, hidden size, layers; tp,
/// pp, GPUs, global batch; then from Megatron-LM's `examples/sc21/run_table_1.sh`, the script
/// that produced it: micro-batch size, model chunks per stage (layers / (pp × the script's
/// layers per virtual stage); 1: no interleaving) and whether the gradient all-reduce overlaps
/// the backward pass (`DDP=torch`) or follows it (`DDP=local`); then the paper's TFLOP/s per
/// GPU, share of peak and aggregate PFLOP/s.
pub const TABLE_1: [PaperRun; 10] = [
    run(
        (1.7, 24, 2304, 24),
        (1, 1, 32, 512),
        (16, 1, true),
        (137.0, 0.44, 4.4),
    ),
    run(
        (3.6, 32, 3072, 30),
        (2, 1, 64, 512),
        (16, 1, true),
        (138.0, 0.44, 8.8),
    ),
    run(
        (7.5, 32, 4096, 36),
        (4, 1, 128, 512),
        (16, 1, true),
        (142.0, 0.46, 18.2),
    ),
    run(
        (18.4, 48, 6144, 40),
        (8, 1, 256, 1024),
        (8, 1, true),
        (135.0, 0.43, 34.6),
    ),
    run(
        (39.1, 64, 8192, 48),
        (8, 2, 512, 1536),
        (4, 1, false),
        (138.0, 0.44, 70.8),
    ),
    run(
        (76.1, 80, 10240, 60),
        (8, 4, 1024, 1792),
        (2, 3, false),
        (140.0, 0.45, 143.8),
    ),
    run(
        (145.6, 96, 12288, 80),
        (8, 8, 1536, 2304),
        (2, 2, false),
        (148.0, 0.47, 227.1),
    ),
    run(
        (310.1, 128, 16384, 96),
        (8, 16, 1920, 2160),
        (1, 2, false),
        (155.0, 0.50, 297.4),
    ),
    run(
        (529.6, 128, 20480, 105),
        (8, 35, 2520, 2520),
        (1, 3, false),
        (163.0, 0.52, 410.2),
    ),
    run(
        (1008.0, 160, 25600, 128),
        (8, 64, 3072, 3072),
        (1, 1, false),
        (163.0, 0.52, 502.0),
    ),
];

/// The row the cluster's GEMM efficiency is calibrated against (the 1.7B model: no tensor or
/// pipeline parallelism, the nearest thing in the table to the 2019 paper's one-GPU baseline).
pub const CALIBRATION_ROW: usize = 0;

/// How a row is priced: the paper's fp16 with full recomputation, its gradient all-reduce.
/// (The one place that names the recomputation setting, so a change of its type is one line.)
pub fn run_options(run: &PaperRun) -> EstimateOptions {
    EstimateOptions {
        overlap_dp: run.overlap_dp,
        ..EstimateOptions::megatron()
    }
}

/// What the planner picks for a row's GPUs and global batch.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannerPick {
    /// Tensor-parallel degree.
    pub tp: u64,
    /// Pipeline stages.
    pub pp: u64,
    /// Data-parallel degree.
    pub dp: u64,
    /// Model chunks per stage (above 1: the interleaved schedule).
    pub virtual_stages: u64,
    /// Micro-batches per step.
    pub micro_batches: u64,
    /// Sequences per micro-batch on each replica.
    pub micro_batch_size: u64,
    /// The schedule, with several micro-batches.
    pub schedule: Option<Schedule>,
    /// Sequence parallelism.
    pub sequence_parallel: bool,
    /// Activation recomputation.
    pub recompute: Recompute,
    /// The ZeRO stage (1: the distributed optimizer).
    pub zero: u8,
    /// The prediction.
    pub estimate: Estimate,
    /// The paper's configuration's predicted step over the pick's: above 1, the pick is faster.
    pub speedup: f64,
    /// The pick's plan (tp, pp, model chunks, micro-batches, schedule, sequence parallelism)
    /// priced with the paper's full recomputation and replicated optimizer state, when the
    /// planner priced it: what the layout alone is worth, apart from recomputation and ZeRO.
    pub paper_settings: Option<Estimate>,
    /// Candidates priced: plans under each recomputation, ZeRO stage and schedule.
    pub priced: usize,
    /// Plans not partitioned, a floor under their step being above the best step found.
    pub skipped: usize,
}

impl PlannerPick {
    /// The paper's configuration's predicted step over [`PlannerPick::paper_settings`]'s.
    pub fn layout_speedup(&self, paper: &Estimate) -> Option<f64> {
        self.paper_settings
            .as_ref()
            .map(|s| paper.step_time_s / s.step_time_s)
    }

    /// Whether the pick runs the paper's layout: its tp, pp, dp, model chunks and micro-batch
    /// size.
    pub fn same_layout(&self, run: &PaperRun) -> bool {
        (
            self.tp,
            self.pp,
            self.dp,
            self.virtual_stages,
            self.micro_batch_size,
        ) == (
            run.tp,
            run.pp,
            run.dp(),
            run.virtual_stages,
            run.micro_batch,
        )
    }
}

/// One row predicted.
#[derive(Clone, Debug, PartialEq)]
pub struct PtdpRow {
    /// The paper's row.
    pub paper: PaperRun,
    /// The zoo model's parameters at the row's sizes.
    pub parameters: u64,
    /// The prediction of the paper's configuration.
    pub estimate: Estimate,
    /// The paper's FLOPs per step (equation 3).
    pub paper_flops: f64,
    /// The paper's FLOPs over the predicted step, per GPU, in TFLOP/s: the column to compare
    /// with [`PaperRun::tflops`].
    pub predicted_tflops: f64,
    /// `predicted_tflops / paper.tflops − 1`.
    pub error: f64,
    /// The planner's pick, when asked for.
    pub planner: Option<PlannerPick>,
}

/// What [`ptd_p_table`] runs besides the rows' predictions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StudyOptions {
    /// Ask the planner for every row (seconds each for the largest in release builds, tens of
    /// seconds in debug builds).
    pub planner: bool,
    /// Re-run the calibration on [`CALIBRATION_ROW`] and report it beside the cluster's value,
    /// and the [`FUSED_SPEED`] sensitivity.
    pub calibration: bool,
}

impl StudyOptions {
    /// Everything: what `ferrotron simulate --ptd-p` writes.
    pub fn full() -> StudyOptions {
        StudyOptions {
            planner: true,
            calibration: true,
        }
    }
}

/// A check of why the predictions drift with model size, not a prediction: the memory-bound
/// ops made this much faster (a stand-in for the paper's fused elementwise kernels, which the
/// cost model prices one op at a time) and the GEMM efficiency re-calibrated on the same row.
pub const FUSED_SPEED: f64 = 1.25;

/// The paper's configuration of `run`, partitioned (one micro-batch's model from `load`).
pub fn paper_plan(
    load: &impl Fn(&str, &[(&str, u64)]) -> Result<Graph, String>,
    run: &PaperRun,
) -> Result<(Plan, u64), String> {
    let g = load(MODEL_FILE, &run.dims())?;
    let parameters = g
        .params
        .iter()
        .map(|(_, p)| g.ty(p.value).shape.numel().unwrap_or(0))
        .sum();
    let chunks = run.pp * run.virtual_stages.max(1);
    let plan = partition(
        &g,
        &PartitionOptions {
            tp: run.tp,
            dp: run.dp(),
            pp: run.pp,
            micro_batches: run.micro_batches(),
            schedule: run.schedule().unwrap_or_default(),
            virtual_stages: run.virtual_stages.max(1),
            // Megatron gives every model chunk the same number of layers.
            stage_layers: (run.pp > 1).then(|| vec![(run.layers / chunks) as u32; chunks as usize]),
            ..PartitionOptions::default()
        },
    )
    .map_err(|e| format!("the {} row: {e}", run.name()))?;
    Ok((plan, parameters))
}

/// The GEMM efficiency `max` under which the paper's configuration of `run` sustains the
/// paper's TFLOP/s per GPU (counted by its equation 3), everything else in `cluster` held.
pub fn calibrate(
    load: &impl Fn(&str, &[(&str, u64)]) -> Result<Graph, String>,
    cluster: &Cluster,
    run: &PaperRun,
) -> Result<f64, String> {
    let (plan, _) = paper_plan(load, run)?;
    let opts = run_options(run);
    // calibrate_gemm counts executed FLOPs; the paper's target in those terms.
    let s = estimate(&plan, cluster, &opts);
    let executed = s.flops_per_gpu * s.gpus as f64;
    let target = run.tflops * executed / run.paper_flops();
    Ok(calibrate_gemm(&plan, cluster, &opts, target))
}

/// The planner's pick for `run`'s GPUs and global batch, against `paper`'s predicted step.
fn planner_pick(
    load: &impl Fn(&str, &[(&str, u64)]) -> Result<Graph, String>,
    cluster: &Cluster,
    run: &PaperRun,
    paper: &Estimate,
) -> Result<Option<PlannerPick>, String> {
    let load_batch =
        |batch: Option<u64>| load(MODEL_FILE, &run.dims_with_batch(batch.unwrap_or(run.batch)));
    let choice = choose_in(
        load_batch,
        cluster,
        run.gpus,
        Some(run.batch),
        &run_options(run),
        &Space::full(),
    )?;
    let priced = choice
        .candidates
        .iter()
        .filter(|c| c.estimate.is_some())
        .count();
    let Some(best) = choice.candidates.iter().find(|c| c.feasible()) else {
        return Ok(None);
    };
    let Some(estimate) = best.estimate.clone() else {
        return Ok(None);
    };
    // Every plan is priced under every recomputation and ZeRO stage searched, so the pick's
    // plan with the paper's settings is among the candidates.
    let paper_settings = choice
        .candidates
        .iter()
        .find(|c| {
            (
                c.tp,
                c.pp,
                c.dp,
                c.virtual_stages,
                c.micro_batches,
                c.schedule,
                c.sequence_parallel,
            ) == (
                best.tp,
                best.pp,
                best.dp,
                best.virtual_stages,
                best.micro_batches,
                best.schedule,
                best.sequence_parallel,
            ) && c.recompute == Recompute::Full
                && c.zero == 0
        })
        .and_then(|c| c.estimate.clone());
    Ok(Some(PlannerPick {
        tp: best.tp,
        pp: best.pp,
        dp: best.dp,
        virtual_stages: best.virtual_stages,
        micro_batches: best.micro_batches,
        micro_batch_size: best.micro_batch_size,
        schedule: best.schedule,
        sequence_parallel: best.sequence_parallel,
        recompute: best.recompute,
        zero: best.zero,
        speedup: paper.step_time_s / estimate.step_time_s,
        estimate,
        paper_settings,
        priced,
        skipped: choice.skipped,
    }))
}

/// Predicts each of `runs` (rows of [`TABLE_1`]) on `cluster` and, with `study.planner`, asks
/// the planner for each; `load` gives a zoo model by file name with the named dimensions
/// overridden. Returns the rows and a markdown report.
pub fn ptd_p_table(
    load: impl Fn(&str, &[(&str, u64)]) -> Result<Graph, String>,
    cluster: &Cluster,
    runs: &[PaperRun],
    study: StudyOptions,
) -> Result<(Vec<PtdpRow>, String), String> {
    let mut rows = Vec::new();
    let mut plans = Vec::new();
    for run in runs {
        let (plan, parameters) = paper_plan(&load, run)?;
        let estimate = estimate(&plan, cluster, &run_options(run));
        let paper_flops = run.paper_flops();
        let predicted_tflops = paper_flops / (estimate.step_time_s * run.gpus as f64) / 1e12;
        let planner = if study.planner {
            planner_pick(&load, cluster, run, &estimate)?
        } else {
            None
        };
        rows.push(PtdpRow {
            paper: *run,
            parameters,
            estimate,
            paper_flops,
            predicted_tflops,
            error: predicted_tflops / run.tflops - 1.0,
            planner,
        });
        plans.push(plan);
    }
    let calibration = match runs.iter().find(|r| **r == TABLE_1[CALIBRATION_ROW]) {
        Some(r) if study.calibration => {
            // The sensitivity: faster memory-bound ops, the calibration re-run on the same row.
            let mut fused = cluster.clone();
            fused.memory_bandwidth *= FUSED_SPEED;
            fused.gemm.max = calibrate(&load, &fused, r)?;
            let errors = runs
                .iter()
                .zip(&plans)
                .map(|(run, plan)| {
                    let s = estimate(plan, &fused, &run_options(run));
                    run.paper_flops() / (s.step_time_s * run.gpus as f64) / 1e12 / run.tflops - 1.0
                })
                .collect();
            Some(Calibration {
                max: calibrate(&load, cluster, r)?,
                fused_max: fused.gemm.max,
                fused_errors: errors,
            })
        }
        _ => None,
    };
    let md = report(&rows, cluster, calibration.as_ref());
    Ok((rows, md))
}

/// The calibration re-run, and the [`FUSED_SPEED`] sensitivity.
struct Calibration {
    /// `max` from [`CALIBRATION_ROW`] on the cluster as given.
    max: f64,
    /// `max` from it with the memory-bound ops [`FUSED_SPEED`] times faster.
    fused_max: f64,
    /// Each row's error then.
    fused_errors: Vec<f64>,
}

/// A share of the step, in percent.
fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 30)
}

fn schedule_text(schedule: Option<Schedule>, virtual_stages: u64) -> String {
    match schedule {
        None => "–".to_owned(),
        Some(Schedule::Interleaved) => format!("interleaved, {virtual_stages} chunks"),
        Some(s) => s.to_string(),
    }
}

/// The markdown report of [`ptd_p_table`].
fn report(rows: &[PtdpRow], cluster: &Cluster, calibration: Option<&Calibration>) -> String {
    let mut md = String::new();
    let cal = &TABLE_1[CALIBRATION_ROW];
    let _ = writeln!(
        md,
        "# The PTD-P paper's weak-scaling table, predicted\n\n\
         Made by `ferrotron simulate --ptd-p --cluster clusters/{}.ron > docs/ptd-p.md` \
         (`published::ptd_p_table`). The paper: Narayanan et al., *Efficient Large-Scale Language \
         Model Training on GPU Clusters Using Megatron-LM* (SC21, arXiv 2104.04473), table 1: GPT \
         models from 1.7 to 1008 billion parameters on 32 to 3,072 A100 80 GB GPUs of NVIDIA's \
         Selene (DGX A100 nodes: NVSwitch, 8 × 200 Gb/s HDR InfiniBand for the application), \
         sequence 2,048, vocabulary 51,200, mixed precision, activation recomputation. Every \
         row here is the zoo's `{MODEL_FILE}` (GPT-2's layer) with the row's hidden size, heads \
         and layers, priced on `{}` ({}).\n",
        cluster.name, cluster.name, cluster.description,
    );
    let _ = writeln!(
        md,
        "## What each row runs\n\n\
         The paper's text says only that the degrees come from its §3 heuristics and that it \
         used \"the interleaved pipeline schedule with the scatter/gather optimization\". The \
         script that produced the table, Megatron-LM's `examples/sc21/run_table_1.sh` (with \
         `CONFIG.sh`: `--fp16`, sequence 2,048), fixes the rest, and each row follows it: the \
         micro-batch size (`MBS`: 16 for the three smallest models, 8, 4, 2, 2, then 1 from \
         the 310B model on, so the micro-batches per pipeline are global batch / (micro-batch × \
         dp)); the interleaved schedule only where the script sets \
         `--num-layers-per-virtual-pipeline-stage` (the 76B, 145B, 310B and 530B models; the \
         39B and 1T models run plain 1F1B), with layers / (pp × that number) model chunks per \
         stage and the same number of layers in every chunk, as Megatron splits them; full \
         recomputation of every layer (`--activations-checkpoint-method uniform`); and the \
         gradient all-reduce overlapped with the backward pass where the script uses PyTorch's \
         DDP (`DDP=torch`, the four models without a pipeline) and after it otherwise \
         (`DDP=local`, Megatron's own, which all-reduces after the last micro-batch's backward \
         pass). Transfers between stages go as 1/tp parts all-gathered on arrival (the \
         scatter/gather optimization). fp16 everywhere, the optimizer step as the cost model \
         prices mixed precision (fp16 gradients to f32 master copies, Adam, back to fp16).\n"
    );
    let _ = writeln!(
        md,
        "## Counting FLOPs\n\n\
         The paper counts a step's FLOPs with its equation 3, `96·B·s·l·h²·(1 + s/6h + \
         V/16lh)`: the GEMMs of the transformer layers' forward, backward and recomputed \
         forward pass and of the logit layer's forward and backward pass, nothing else. The \
         cost model's own throughput counts what the GPU executes (every op of the plan's \
         forward and backward graph plus the recomputed forward, elementwise work included). \
         To compare like with like, the *predicted* column here is the paper's equation 3 over \
         the predicted step time and the GPUs, exactly how the paper turned its measured step \
         time into its column; the model's executed count is shown beside it (it is within a \
         few percent of equation 3: the attention softmax, layer norms and GeLU, and the \
         embedding's gradient).\n"
    );
    let _ = write!(
        md,
        "## Calibration\n\n\
         One number is calibrated: the cluster file's GEMM efficiency `max` ({:.4}), fitted \
         once with `cost::calibrate_gemm` so that the paper's {} configuration (tp = {}, dp = \
         {}, no pipeline) sustains the paper's {:.0} TFLOP/s per GPU. That row is the nearest \
         thing in the table to the 2019 study's one-GPU baseline: no tensor-parallel or \
         pipeline communication, its data-parallel all-reduce overlapped. Every other row is \
         out of sample; every other figure of the cluster file comes from its cited source.",
        cluster.gemm.max,
        cal.name(),
        cal.tp,
        cal.dp(),
        cal.tflops,
    );
    match calibration {
        Some(c) => {
            let _ = writeln!(
                md,
                " Re-run now, the calibration gives {:.4}{}.\n",
                c.max,
                if (c.max - cluster.gemm.max).abs() <= 5e-4 {
                    " (the file's value)"
                } else {
                    ": the model has changed since the file was calibrated"
                }
            );
        }
        None => md.push_str("\n\n"),
    }
    let _ = writeln!(
        md,
        "## Predicted against published\n\n\
         | model (B) | here (B) | GPUs | tp | pp | dp | batch | micro-batch × count | schedule | all-reduce | step (s) | memory (GiB) | executed / eq. 3 | predicted TFLOP/s | paper | Δ |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let (p, s) = (&r.paper, &r.estimate);
        let _ = writeln!(
            md,
            "| {} | {:.1} | {} | {} | {} | {} | {} | {} × {} | {} | {} | {:.2} | {:.1}{} | {:.3} | {:.1} | {:.0} | {:+.1}% |",
            p.billions,
            r.parameters as f64 / 1e9,
            p.gpus,
            p.tp,
            p.pp,
            p.dp(),
            p.batch,
            p.micro_batch,
            p.micro_batches(),
            schedule_text(p.schedule(), p.virtual_stages),
            if p.overlap_dp { "overlapped" } else { "after" },
            s.step_time_s,
            gib(s.memory_bytes_per_gpu),
            if s.fits { "" } else { " (does not fit)" },
            s.flops_per_gpu * s.gpus as f64 / r.paper_flops,
            r.predicted_tflops,
            p.tflops,
            100.0 * r.error,
        );
    }
    let outside: Vec<&PtdpRow> = rows.iter().filter(|r| r.error.abs() > 0.10).collect();
    let _ = writeln!(
        md,
        "\n{} of {} rows within 10% of the paper{}.\n",
        rows.len() - outside.len(),
        rows.len(),
        if outside.is_empty() {
            String::new()
        } else {
            format!(
                "; outside: {}",
                outside
                    .iter()
                    .map(|r| format!("{} ({:+.1}%)", r.paper.name(), 100.0 * r.error))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    let _ = writeln!(
        md,
        "### Where the predicted step goes\n\n\
         Shares of the step (with a pipeline: the slowest stage's work over all micro-batches, \
         then the fill and drain, the transfers on the critical path, the gradient all-reduce \
         the backward pass does not hide and the optimizer). GEMMs and memory-bound ops include \
         the recomputed forward pass; tp communication is the blocking all-reduces.\n\n\
         | model (B) | GEMMs | memory-bound | tp communication | of which recomputation | bubble | transfers | dp exposed | optimizer | GPUs idle | (P − 1)/(V·M + P − 1) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let s = &r.estimate;
        let t = s.step_time_s;
        let (p, v, m) = (
            r.paper.pp as f64,
            r.paper.virtual_stages as f64,
            r.paper.micro_batches() as f64,
        );
        let _ = writeln!(
            md,
            "| {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% |",
            r.paper.billions,
            pct(s.gemm_s, t),
            pct(s.memory_bound_s, t),
            pct(s.tp_comm_s, t),
            pct(s.recompute_s, t),
            pct(s.bubble_s, t),
            pct(s.p2p_s, t),
            pct(s.dp_exposed_s, t),
            pct(s.optimizer_s, t),
            100.0 * s.bubble_fraction,
            100.0 * (p - 1.0) / (v * m + p - 1.0),
        );
    }
    if let Some(c) = calibration {
        drift(&mut md, rows, c);
    }
    if rows.iter().any(|r| r.planner.is_some()) {
        planner_section(&mut md, rows, cluster);
    }
    zero_3(&mut md);
    md
}

/// The planner's pick for each row, against the paper's configuration.
fn planner_section(md: &mut String, rows: &[PtdpRow], cluster: &Cluster) {
    let space = Space::full();
    let _ = writeln!(
        md,
        "\n## What the planner would run\n\n\
         `planner::choose_in` (`Space::full()`) on the same GPUs and global batch, with the \
         same pricing (fp16, the row's gradient all-reduce), choosing everything else itself: \
         tp × pp × model chunks per stage V (1, or up to {} where the layers divide into pp × \
         V equal chunks: the interleaved schedule) × dp × micro-batch size (up to {} \
         micro-batch counts per configuration, from the first at least pp, each at least twice \
         the one before, and always one sequence per micro-batch) × 1F1B/GPipe × sequence \
         parallelism × recomputation ({}) × ZeRO stage ({}; 1 is the distributed optimizer: \
         Adam's state and the f32 \
         master weights split over the data-parallel replicas, the gradients reduce-scattered \
         and the updated parameters all-gathered). Its stages are cut by the plan's work per \
         layer rather than Megatron's equal layers per chunk. The paper's runs are full \
         recomputation, ZeRO stage 0 and no sequence parallelism throughout.\n\n\
         *Speed-up*: the paper's configuration's predicted step over the pick's (the same \
         tokens per step, so the ratio of throughputs). *Layout alone*: the same over the \
         pick's plan (tp, pp, V, micro-batches, schedule, sequence parallelism) priced with the \
         paper's full recomputation and ZeRO stage 0 (marked \"does not fit\" where that needs \
         more than the GPU's memory); the rest of the speed-up is the pick's recomputation and \
         ZeRO stage. *Priced*: the candidates the cost model priced (a plan under one \
         recomputation, ZeRO stage and schedule); *skipped*: plans not partitioned, because a \
         floor under their step was already above the best step found.\n\n\
         | model (B) | GPUs | paper: tp × pp × dp | V | micro-batch × count | step (s) | pick: tp × pp × dp | V | micro-batch × count | schedule | SP | recompute | ZeRO | step (s) | memory (GiB) | speed-up | layout alone | priced / skipped |\n\
         |---:|---:|---|---:|---:|---:|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
        space.max_virtual_stages,
        space.micro_batch_counts,
        join_or(space.recompute.iter().map(Recompute::to_string).collect()),
        join_or(space.zero.iter().map(u8::to_string).collect()),
    );
    for r in rows {
        let p = &r.paper;
        let paper = format!(
            "| {} | {} | {} × {} × {} | {} | {} × {} | {:.2} |",
            p.billions,
            p.gpus,
            p.tp,
            p.pp,
            p.dp(),
            p.virtual_stages,
            p.micro_batch,
            p.micro_batches(),
            r.estimate.step_time_s
        );
        let Some(k) = &r.planner else {
            let _ = writeln!(md, "{paper} nothing fits | | | | | | | | | | | |");
            continue;
        };
        let layout = match (&k.paper_settings, k.layout_speedup(&r.estimate)) {
            (Some(s), Some(x)) if s.fits => format!("{x:.2}×"),
            (Some(_), Some(x)) => format!("{x:.2}× (does not fit)"),
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            md,
            "{paper} {} × {} × {} | {} | {} × {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.2}× | {layout} | {} / {} |",
            k.tp,
            k.pp,
            k.dp,
            k.virtual_stages,
            k.micro_batch_size,
            k.micro_batches,
            match k.schedule {
                Some(s) if k.pp > 1 => s.to_string(),
                _ => "–".to_owned(),
            },
            if k.sequence_parallel { "yes" } else { "no" },
            k.recompute,
            k.zero,
            k.estimate.step_time_s,
            gib(k.estimate.memory_bytes_per_gpu),
            k.speedup,
            k.priced,
            k.skipped,
        );
    }
    planner_notes(md, rows, cluster);
}

/// Why the predictions drift with model size, with the [`FUSED_SPEED`] check.
fn drift(md: &mut String, rows: &[PtdpRow], c: &Calibration) {
    let share = |r: &PtdpRow| pct(r.estimate.memory_bound_s, r.estimate.step_time_s);
    let (Some(first), Some(worst)) = (
        rows.first(),
        rows.iter().max_by(|a, b| a.error.total_cmp(&b.error)),
    ) else {
        return;
    };
    // The rows besides the calibration row, smaller half and larger half, with their errors
    // as predicted and under the sensitivity.
    let others: Vec<(f64, f64)> = rows
        .iter()
        .zip(&c.fused_errors)
        .filter(|(r, _)| r.paper != TABLE_1[CALIBRATION_ROW])
        .map(|(r, &e)| (r.error, e))
        .collect();
    let half = others.len() / 2;
    let mean = |xs: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        100.0 * xs.iter().map(f).sum::<f64>() / xs.len().max(1) as f64
    };
    let (small, large) = others.split_at(half);
    let above = others.iter().filter(|(e, _)| *e > 0.0).count();
    let _ = writeln!(
        md,
        "\n### Why the larger models come out fast\n\n\
         The calibration row is exact by construction; {above} of the other {} run above the \
         paper, by {:+.1}% on average for the {} smallest and {:+.1}% for the {} largest \
         (most: the {} model, {:+.1}%). The {} row spends {:.0}% of its \
         predicted step in memory-bound ops (at hidden {} and sequence 2,048 the attention's \
         `[batch, heads, seq, seq]` scores and their scaling, softmax and dropout are as large \
         as the GEMMs' operands), the {} model {:.0}%. The cost model prices every elementwise \
         op as a kernel of its own, where the paper's code fuses bias + GeLU, bias + dropout + \
         add and scale + mask + softmax (§4.2; worth 19% and 11% of throughput on its 175B and \
         530B models, §5.8). What the model overprices on the calibration row, the calibration \
         makes up with a higher GEMM efficiency, which the GEMM-bound large models then \
         inherit. A check of that explanation, not a second prediction: with every \
         memory-bound op {FUSED_SPEED}× faster (memory bandwidth scaled) and `max` calibrated \
         again on the same row ({:.4}), the rows come to the last column: {:+.1}% on average \
         for the smallest and {:+.1}% for the largest.\n\n\
         | model (B) | memory-bound share | Δ | Δ, memory-bound ops {FUSED_SPEED}× faster |\n\
         |---:|---:|---:|---:|",
        others.len(),
        mean(small, |x| x.0),
        small.len(),
        mean(large, |x| x.0),
        large.len(),
        worst.paper.name(),
        100.0 * worst.error,
        first.paper.name(),
        share(first),
        first.paper.hidden,
        rows.last().map_or(String::new(), |r| r.paper.name()),
        rows.last().map_or(0.0, share),
        c.fused_max,
        mean(small, |x| x.1),
        mean(large, |x| x.1),
    );
    for (r, e) in rows.iter().zip(&c.fused_errors) {
        let _ = writeln!(
            md,
            "| {} | {:.1}% | {:+.1}% | {:+.1}% |",
            r.paper.billions,
            share(r),
            100.0 * r.error,
            100.0 * e
        );
    }
    let _ = writeln!(
        md,
        "\nThe pipelined rows idle more than the bubble formula where the stages are uneven: the \
         last stage also runs the output layer and the loss (vocabulary 51,200 / tp per rank), \
         which matters most where a stage has few layers (the 1T model: two per stage, no \
         interleaving). Not modelled, and reasons the model may be optimistic: the paper's \
         throughput is end to end (data loading and logging included), per-rank jitter at the \
         blocking tensor-parallel all-reduces, the 2021 schedule's blocking point-to-point \
         transfers (priced here as overlapped in the steady state), and NCCL kernels contending \
         with compute for SMs and memory."
    );
}

/// What the planner's picks have in common, and what to make of their speed-ups: every count
/// and range from the rows.
fn planner_notes(md: &mut String, rows: &[PtdpRow], cluster: &Cluster) {
    let pairs: Vec<(&PtdpRow, &PlannerPick)> = rows
        .iter()
        .filter_map(|r| r.planner.as_ref().map(|k| (r, k)))
        .collect();
    let n = pairs.len();
    if n == 0 {
        return;
    }
    type Test<'a> = &'a dyn Fn(&PtdpRow, &PlannerPick) -> bool;
    let count = |f: Test| pairs.iter().filter(|(r, k)| f(r, k)).count();
    // The rows whose pick passes `f`, when some but not all do.
    let which = |f: Test| {
        let names: Vec<String> = pairs
            .iter()
            .filter(|(r, k)| f(r, k))
            .map(|(r, _)| r.paper.name())
            .collect();
        if names.is_empty() || names.len() == n {
            String::new()
        } else {
            format!(" ({})", join(names))
        }
    };
    // "all 10" where every pick does it; the verb agreeing.
    let how_many = |k: usize, one: &str, many: &str| match k {
        1 => format!("1 {one}"),
        _ if k == n => format!("all {n} {many}"),
        _ => format!("{k} {many}"),
    };
    // What the picks change.
    let mut changes = Vec::new();
    let same: Test = &|r, k| k.same_layout(&r.paper);
    if count(same) > 0 {
        changes.push(format!(
            "{} the paper's tp, pp, dp, model chunks and micro-batch size{}",
            how_many(count(same), "keeps", "keep"),
            which(same)
        ));
    }
    let lower_tp = count(&|r, k| k.tp < r.paper.tp);
    if lower_tp > 0 {
        let wider = count(&|r, k| k.tp < r.paper.tp && k.dp > r.paper.dp());
        let deeper = count(&|r, k| k.tp < r.paper.tp && k.pp > r.paper.pp);
        changes.push(format!(
            "{} a smaller tp than the paper, trading tensor-parallel all-reduces for {}",
            how_many(lower_tp, "runs", "run"),
            join(
                [
                    (wider > 0).then(|| format!("more replicas ({wider})")),
                    (deeper > 0).then(|| format!("a deeper pipeline ({deeper})")),
                ]
                .into_iter()
                .flatten()
                .collect()
            )
        ));
    }
    let higher_tp = count(&|r, k| k.tp > r.paper.tp);
    if higher_tp > 0 {
        let across = count(&|_, k| k.tp > cluster.gpus_per_node);
        changes.push(format!(
            "{} a larger tp{}",
            how_many(higher_tp, "runs", "run"),
            if across > 0 {
                format!(
                    " ({across} beyond a node's {} GPUs, priced as hierarchical collectives \
                     over NVLink and InfiniBand)",
                    cluster.gpus_per_node
                )
            } else {
                String::new()
            }
        ));
    }
    let interleaved: Test = &|_, k| k.virtual_stages > 1;
    if count(interleaved) > 0 {
        let mut vs: Vec<u64> = pairs
            .iter()
            .map(|(_, k)| k.virtual_stages)
            .filter(|&v| v > 1)
            .collect();
        vs.sort_unstable();
        vs.dedup();
        changes.push(format!(
            "{} the model in chunks (V = {})",
            how_many(count(interleaved), "interleaves", "interleave"),
            join_or(vs.iter().map(u64::to_string).collect())
        ));
    }
    let smaller = count(&|r, k| k.micro_batch_size < r.paper.micro_batch);
    let larger = count(&|r, k| k.micro_batch_size > r.paper.micro_batch);
    if smaller + larger > 0 {
        let which_way = match (smaller, larger) {
            (_, 0) => "smaller".to_owned(),
            (0, _) => "larger".to_owned(),
            (s, l) => format!("smaller ({s}) or larger ({l})"),
        };
        changes.push(format!(
            "{} {which_way} micro-batches than the paper",
            how_many(smaller + larger, "runs", "run"),
        ));
    }
    let by_recompute = |mode: Recompute| count(&|_, k| k.recompute == mode);
    let recompute = join(
        [
            (Recompute::None, "without recomputation"),
            (
                Recompute::Selective,
                "with selective recomputation (the attention core only)",
            ),
            (Recompute::Full, "with full recomputation, as the paper"),
        ]
        .into_iter()
        .filter(|&(mode, _)| by_recompute(mode) > 0)
        .enumerate()
        .map(|(i, (mode, how))| match (i, by_recompute(mode)) {
            (0, k) => format!("{} {how}", how_many(k, "runs", "run")),
            (_, k) => format!("{k} {how}"),
        })
        .collect(),
    );
    let sp: Test = &|_, k| k.sequence_parallel;
    let zero: Test = &|_, k| k.zero >= 1;
    let _ = writeln!(
        md,
        "\nOf the {n} picks, {}. {}; {} sequence parallelism{} and {} the distributed \
         optimizer (ZeRO stage 1){}.",
        join(changes),
        capitalized(&recompute),
        how_many(count(sp), "uses", "use"),
        which(sp),
        how_many(count(zero), "uses", "use"),
        which(zero),
    );
    // Where the speed-ups come from.
    let range = |xs: &mut dyn Iterator<Item = f64>| {
        xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        })
    };
    let (lo, hi) = range(&mut pairs.iter().map(|(_, k)| k.speedup));
    let mut text =
        format!("The picks are predicted {lo:.2}–{hi:.2}× faster than the paper's configurations.");
    // (layout alone, what the pick's recomputation and ZeRO stage add, whether it fits, row)
    let layouts: Vec<(f64, f64, bool, String)> = pairs
        .iter()
        .filter_map(|(r, k)| {
            let s = k.paper_settings.as_ref()?;
            let x = k.layout_speedup(&r.estimate)?;
            Some((x, k.speedup / x, s.fits, r.paper.name()))
        })
        .collect();
    if !layouts.is_empty() {
        let (llo, lhi) = range(&mut layouts.iter().map(|l| l.0));
        let (rlo, rhi) = range(&mut layouts.iter().map(|l| l.1));
        let _ = write!(
            text,
            " Their layouts alone, with the paper's full recomputation and ZeRO stage 0, are \
             {llo:.2}–{lhi:.2}× faster; the picks' recomputation and ZeRO stage multiply that \
             by {rlo:.2}–{rhi:.2}×."
        );
        let unfit: Vec<String> = layouts
            .iter()
            .filter(|l| !l.2)
            .map(|l| l.3.clone())
            .collect();
        if !unfit.is_empty() {
            // Full recomputation holds the least: a layout that fits with the pick's
            // recomputation and not with full fits only by the distributed optimizer.
            let _ = write!(
                text,
                " {} ({}) {} not fit that way: {} with the optimizer state split over \
                 the replicas.",
                if unfit.len() == 1 {
                    "One layout".to_owned()
                } else {
                    format!("{} layouts", unfit.len())
                },
                join(unfit.clone()),
                if unfit.len() == 1 { "does" } else { "do" },
                if unfit.len() == 1 {
                    "it fits only"
                } else {
                    "they fit only"
                },
            );
        }
    }
    let lighter: Vec<f64> = pairs
        .iter()
        .filter(|(_, k)| k.recompute != Recompute::Full)
        .map(|(r, _)| pct(r.estimate.recompute_s, r.estimate.step_time_s))
        .collect();
    if !lighter.is_empty() {
        let (plo, phi) = range(&mut lighter.iter().copied());
        let _ = write!(
            text,
            " Recomputing less saves part or all of the recomputed forward pass: \
             {plo:.0}–{phi:.0}% of the paper's predicted step in the {} rows whose pick does \
             so.",
            lighter.len()
        );
    }
    // What the paper's runs lacked.
    let later: Vec<String> = [
        (count(sp) > 0, "sequence parallelism"),
        (
            by_recompute(Recompute::Selective) > 0,
            "selective recomputation",
        ),
    ]
    .into_iter()
    .filter(|&(used, _)| used)
    .map(|(_, what)| what.to_owned())
    .collect();
    let mut unused = later.clone();
    if count(zero) > 0 {
        unused.push("distributed optimizer".to_owned());
    }
    if !unused.is_empty() {
        let _ = write!(text, " The paper's runs use no {}", join_or(unused));
        let _ = write!(
            text,
            "{}.",
            match later.len() {
                0 => String::new(),
                1 => format!(
                    " ({} is from Korthikanti et al. 2022, after the paper)",
                    later[0]
                ),
                _ => format!(
                    " ({} are from Korthikanti et al. 2022, after the paper)",
                    join(later)
                ),
            }
        );
    }
    let _ = writeln!(md, "\n{text}");
    let tightest = pairs
        .iter()
        .map(|(_, k)| k.estimate.memory_bytes_per_gpu)
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        md,
        "\nThe picks' memory is the cost model's estimate, up to {:.1} GiB of the {:.0} GiB a \
         GPU has; allocator fragmentation and library workspaces are not in it, so the \
         tightest picks may not fit in practice.",
        gib(tightest),
        gib(cluster.memory_bytes),
    );
}

/// The paper's comparison with ZeRO-3, and why it is not predicted here.
fn zero_3(md: &mut String) {
    let _ = writeln!(
        md,
        "\n## The paper's comparison with ZeRO-3: not predicted\n\n\
         The paper's §5.2 (table 2, figure 10) compares PTD-P with ZeRO-3 without \
         model parallelism on its 175B and 530B models, the global batch held as the GPUs \
         double. ferrotron does not predict that comparison. Its partitioner and cost model \
         have ZeRO stages 0 and 1 only (stage 1 splits the optimizer state over the \
         data-parallel replicas: gradients reduce-scattered, Adam on each replica's share, \
         the updated parameters all-gathered once per step), and the planner searches those \
         two. ZeRO-3 also splits the fp16 parameters and gradients, and pricing it would need \
         what stage 1 does not have: an all-gather of each layer's parameters over the \
         data-parallel group before its forward pass and again before its backward pass (and \
         before a recomputed forward), repeated for every micro-batch unless the gathered \
         parameters are kept; a reduce-scatter of each layer's gradients after its backward \
         pass; how much of that prefetching hides behind compute; and the memory of the \
         gathered layers and the buffers in flight. With one micro-batch per step and no \
         recomputation that is 1.5× data parallelism's traffic (the ZeRO paper's count, \
         Rajbhandari et al. 2020: two all-gathers and a reduce-scatter of the parameters \
         against an all-reduce's reduce-scatter and all-gather), and without model \
         parallelism the data-parallel group is every GPU, so every one of those collectives \
         spans the nodes and is bound by InfiniBand.\n\n\
         The paper's table 2, quoted, not predicted (TFLOP/s per GPU):\n\n\
         | model (B) | global batch | GPUs | ZeRO-3, no model parallelism | PTD-P |\n\
         |---:|---:|---:|---:|---:|\n\
         | 174.6 | 1,536 | 384 | 144 | 153 |\n\
         | 174.6 | 1,536 | 768 | 88 | 149 |\n\
         | 174.6 | 1,536 | 1,536 | 44 | 141 |\n\
         | 529.6 | 2,240 | 560 (ZeRO-3: 640, batch 2,560) | 138 | 171 |\n\
         | 529.6 | 2,240 | 1,120 | 98 | 167 |\n\
         | 529.6 | 2,240 | 2,240 | 48 | 159 |\n\n\
         PTD-P there has model-parallel size 96 (175B) and 280 (530B) with micro-batch 1; \
         ZeRO-3 runs micro-batches of 4, 2 and 1 as the GPUs double. At the fewest GPUs \
         PTD-P is 6% (175B) and 24% (530B) faster per GPU; with twice as many, about 70% for \
         both models, which the paper puts down to ZeRO-3's cross-node communication."
    );
}

/// `a`, `a and b`, `a, b and c`.
fn join(items: Vec<String>) -> String {
    match items.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => items.concat(),
    }
}

/// `a`, `a or b`, `a, b or c`.
fn join_or(items: Vec<String>) -> String {
    match items.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => items.concat(),
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map_or(String::new(), |f| f.to_uppercase().chain(c).collect())
}
