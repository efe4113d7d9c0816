//! `ferrotron simulate`: the cost model's estimate of a plan's step time, throughput and
//! memory on a cluster (with pipeline stages: the bubble, and each stage's time and memory); or,
//! with `--weak-scaling`, the Megatron paper's weak-scaling study; with `--ptd-p`, the PTD-P
//! paper's (`docs/ptd-p.md`).

use crate::args::{load_options, megatron_batch};
use anyhow::{anyhow, Result};
use clap::Args;
use ferrotron_ir::lang::parse_dim_override;
use ferrotron_ir::{load_model, DType};
use ferrotron_partitioner::cost::{estimate, weak_scaling_table, Cluster, EstimateOptions};
use ferrotron_partitioner::published::{ptd_p_table, StudyOptions, TABLE_1};
use ferrotron_partitioner::{partition, PartitionOptions, Recompute, Schedule};
use std::path::{Path, PathBuf};

/// The arguments of `ferrotron simulate`.
#[derive(Args)]
pub struct SimulateArgs {
    /// The model file (not needed with `--weak-scaling` or `--ptd-p`).
    model: Option<PathBuf>,
    /// The cluster specification (`clusters/dgx2h.ron`).
    #[arg(long)]
    cluster: PathBuf,
    /// Tensor-parallel degree.
    #[arg(long, default_value_t = 1)]
    tp: u64,
    /// Data-parallel degree.
    #[arg(long, default_value_t = 1)]
    dp: u64,
    /// The global batch: sequences per step over all replicas (default: the model's `batch`).
    #[arg(long, alias = "batch")]
    global_batch: Option<u64>,
    /// Sequences per data-parallel replica in one micro-batch (Megatron's `--micro-batch-size`):
    /// micro-batches per step become the global batch / (dp × this); without
    /// `--global-batch`, the global batch becomes this × dp × micro-batches.
    #[arg(long, alias = "micro-batch")]
    micro_batch_size: Option<u64>,
    /// Pipeline stages: the layers cut into this many stages, each on its own tp × dp ranks.
    #[arg(long, default_value_t = 1)]
    pp: u64,
    /// Micro-batches per step: the global batch is split into this many (implied by
    /// `--global-batch` with `--micro-batch-size`).
    #[arg(long)]
    micro_batches: Option<u64>,
    /// The pipeline schedule: `1f1b` (one forward, one backward), `gpipe` or `interleaved`.
    #[arg(long, default_value = "1f1b")]
    schedule: Schedule,
    /// Model chunks per stage for `--schedule interleaved`.
    #[arg(long, default_value_t = 1)]
    virtual_stages: u64,
    /// Layers per stage (`--stage-layers 5,4,4,3`) instead of balancing them by their work.
    #[arg(long, value_delimiter = ',')]
    stage_layers: Vec<u32>,
    /// Split the activations between regions along the sequence.
    #[arg(long)]
    sequence_parallel: bool,
    /// Price every float at this dtype (`f16`, `bf16`, `f32`; default: the model's).
    #[arg(long)]
    dtype: Option<String>,
    /// Activation recomputation to price: `none`, `selective` (the attention cores) or `full`
    /// (each layer but its input; a bare `--recompute` means this).
    #[arg(long, default_value = "none", default_missing_value = "full", num_args = 0..=1)]
    recompute: Recompute,
    /// ZeRO stage: 1 prices the distributed optimizer (reduce-scattered gradients, Adam on each
    /// replica's 1/dp share, the all-gather after it).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    zero: u8,
    /// Run the data-parallel gradient all-reduce after the backward pass instead of
    /// overlapping it.
    #[arg(long)]
    no_overlap: bool,
    /// Override a named dimension.
    #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
    dims: Vec<(String, u64)>,
    /// The paper's study (1.2B..8.3B on 1..8 GPUs, and with 64-way data parallelism),
    /// as a markdown table, fp16 with recomputation.
    #[arg(long)]
    weak_scaling: bool,
    /// The PTD-P paper's weak-scaling table (1.7B on 32 A100s … 1T on 3,072), each row as the
    /// paper's script ran it, with the planner's pick for each (tp × pp × model chunks × dp ×
    /// micro-batch size × SP × recomputation × ZeRO stage) and how much faster it is predicted
    /// to be, as markdown; the paper's ZeRO-3 comparison is quoted, not predicted.
    #[arg(long)]
    ptd_p: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// A cluster file.
pub fn read_cluster(path: &Path) -> Result<Cluster> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(Cluster::from_ron(&text, &path.display().to_string())?)
}

/// `--dtype` of the cost model.
pub fn parse_dtype(dtype: Option<&str>) -> Result<Option<DType>> {
    Ok(match dtype {
        None => None,
        Some("f16") => Some(DType::F16),
        Some("bf16") => Some(DType::BF16),
        Some("f32") => Some(DType::F32),
        Some(other) => anyhow::bail!("--dtype {other}: expected f16, bf16 or f32"),
    })
}

/// `ferrotron simulate`.
pub fn simulate(args: SimulateArgs) -> Result<()> {
    let cluster = read_cluster(&args.cluster)?;
    let opts = EstimateOptions {
        compute_dtype: parse_dtype(args.dtype.as_deref())?,
        recompute: args.recompute,
        zero: args.zero,
        overlap_dp: !args.no_overlap,
        ..EstimateOptions::default()
    };
    if args.ptd_p {
        // The zoo in the working directory; each row's options are the paper's, not the flags.
        let zoo = |file: &str, dims: &[(&str, u64)]| {
            let dims: Vec<(String, u64)> = dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect();
            load_model(&Path::new("models").join(file), &load_options(&dims))
                .map_err(|e| e.to_string())
        };
        let (_, doc) =
            ptd_p_table(zoo, &cluster, &TABLE_1, StudyOptions::full()).map_err(|e| anyhow!(e))?;
        print!("{doc}");
        return Ok(());
    }
    if args.weak_scaling {
        let opts = EstimateOptions {
            compute_dtype: opts.compute_dtype.or(Some(DType::F16)),
            recompute: Recompute::Full,
            ..opts
        };
        // The paper's models, from the zoo in the working directory.
        let zoo = |file: &str, dims: &[(&str, u64)]| {
            let dims: Vec<(String, u64)> = dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect();
            let path = Path::new("models").join(file);
            load_model(&path, &load_options(&dims)).map_err(|e| e.to_string())
        };
        let (_, table) = weak_scaling_table(zoo, &cluster, &opts).map_err(|e| anyhow!(e))?;
        print!("{table}");
        return Ok(());
    }
    let model = args
        .model
        .ok_or_else(|| anyhow!("simulate needs a model file"))?;
    let (dims, micro_batches) = megatron_batch(
        &model,
        &args.dims,
        args.dp,
        args.global_batch,
        args.micro_batch_size,
        args.micro_batches,
    )?;
    let graph = load_model(&model, &load_options(&dims))?;
    let options = PartitionOptions {
        tp: args.tp,
        dp: args.dp,
        sequence_parallel: args.sequence_parallel,
        pp: args.pp,
        micro_batches,
        schedule: args.schedule,
        virtual_stages: args.virtual_stages,
        stage_layers: (!args.stage_layers.is_empty()).then(|| args.stage_layers.clone()),
        ..PartitionOptions::default()
    };
    let plan = partition(&graph, &options)?;
    // Scaling efficiency against the one-GPU run of the same per-GPU work: this rank's
    // program, on the same shard shapes, with nothing to communicate.
    let sim = estimate(&plan, &cluster, &opts);
    if args.json {
        println!("{}", serde_json::to_string(&sim)?);
    } else {
        println!(
            "{} on {} × {} (tp = {}, dp = {}{}):",
            sim.model,
            sim.gpus,
            cluster.gpu,
            sim.tp,
            sim.dp,
            match sim.schedule {
                Some(s) => format!(
                    ", pp = {}, {} micro-batches, {s}",
                    sim.pp, sim.micro_batches
                ),
                None => String::new(),
            }
        );
        println!(
            "  step {:.3} s (forward {:.3}, backward {:.3} with recomputation ({}) {:.3}, tp \
             communication {:.3}, exposed dp {:.3} of {:.3}, optimizer {:.3}{})",
            sim.step_time_s,
            sim.forward_s,
            sim.backward_s,
            sim.recompute,
            sim.recompute_s,
            sim.tp_comm_s,
            sim.dp_exposed_s,
            sim.dp_comm_s,
            sim.optimizer_s,
            if sim.zero >= 1 {
                format!(
                    " on each replica's share, all-gather {:.3}",
                    sim.dp_gather_s
                )
            } else {
                String::new()
            }
        );
        println!(
            "  {:.1} TFLOP/s per GPU ({:.0}% of peak), scaling efficiency {:.0}%",
            sim.tflops_per_gpu,
            sim.share_of_peak * 100.0,
            sim.scaling_efficiency * 100.0
        );
        println!(
            "  memory per GPU {:.2} GiB of {:.0} GiB: {}",
            sim.memory_bytes_per_gpu as f64 / f64::from(1 << 30),
            sim.memory_capacity_bytes as f64 / f64::from(1 << 30),
            if sim.fits { "fits" } else { "does NOT fit" }
        );
        if !sim.stages.is_empty() {
            let (p, m) = (sim.pp as f64, f64::from(sim.micro_batches));
            let v = f64::from(sim.virtual_stages);
            println!(
                "  pipeline: bubble {:.3} s, transfers {:.3} s; idle {:.1}% of the span \
                 ((P − 1)/({}M + P − 1) = {:.1}%)",
                sim.bubble_s,
                sim.p2p_s,
                100.0 * sim.bubble_fraction,
                if sim.virtual_stages > 1 { "V·" } else { "" },
                100.0 * (p - 1.0) / (v * m + p - 1.0)
            );
            println!(
                "  {:<6} {:<12} {:>9} {:>12} {:>12} {:>10} {:>11} {:>10}",
                "stage",
                "layers",
                "in flight",
                "fwd/mb (s)",
                "bwd/mb (s)",
                "send (s)",
                "dp+opt (s)",
                "GiB/GPU"
            );
            for (s, st) in sim.stages.iter().enumerate() {
                println!(
                    "  {s:<6} {:<12} {:>9} {:>12.4} {:>12.4} {:>10.4} {:>11.3} {:>10.2}",
                    st.layers
                        .iter()
                        .map(|&(a, b)| format!("{a}-{}", b.saturating_sub(1)))
                        .collect::<Vec<_>>()
                        .join(","),
                    st.in_flight,
                    st.forward_s,
                    st.backward_s,
                    st.send_s,
                    st.dp_exposed_s + st.optimizer_s + st.dp_gather_s,
                    st.memory.total as f64 / f64::from(1 << 30)
                );
            }
        }
    }
    Ok(())
}
