//! `ferrotron simulate`: the cost model's estimate of a plan's step time, throughput and
//! memory on a cluster; or, with `--weak-scaling`, the Megatron paper's weak-scaling study.

use crate::args::load_options;
use anyhow::{anyhow, Result};
use clap::Args;
use ferrotron_ir::lang::parse_dim_override;
use ferrotron_ir::{load_model, DType};
use ferrotron_partitioner::cost::{estimate, weak_scaling_table, Cluster, EstimateOptions};
use ferrotron_partitioner::{partition, PartitionOptions};
use std::path::{Path, PathBuf};

/// The arguments of `ferrotron simulate`.
#[derive(Args)]
pub struct SimulateArgs {
    /// The model file (not needed with `--weak-scaling`).
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
    /// Sequences per data-parallel replica (the model's `batch` becomes this × dp).
    #[arg(long)]
    micro_batch: Option<u64>,
    /// Split the activations between regions along the sequence.
    #[arg(long)]
    sequence_parallel: bool,
    /// Price every float at this dtype (`f16`, `bf16`, `f32`; default: the model's).
    #[arg(long)]
    dtype: Option<String>,
    /// Recompute activations in the backward pass (keep only layer inputs).
    #[arg(long)]
    recompute: bool,
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
        overlap_dp: !args.no_overlap,
        ..EstimateOptions::default()
    };
    if args.weak_scaling {
        let opts = EstimateOptions {
            compute_dtype: opts.compute_dtype.or(Some(DType::F16)),
            recompute: true,
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
    let mut dims = args.dims.clone();
    if let Some(b) = args.micro_batch {
        dims.retain(|(n, _)| n != "batch");
        dims.push(("batch".into(), b * args.dp));
    }
    let graph = load_model(&model, &load_options(&dims))?;
    let options = PartitionOptions {
        tp: args.tp,
        dp: args.dp,
        sequence_parallel: args.sequence_parallel,
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
            "{} on {} × {} (tp = {}, dp = {}):",
            sim.model, sim.gpus, cluster.gpu, sim.tp, sim.dp
        );
        println!(
            "  step {:.3} s (forward {:.3}, backward {:.3}, tp communication {:.3}, \
             exposed dp {:.3} of {:.3})",
            sim.step_time_s,
            sim.forward_s,
            sim.backward_s,
            sim.tp_comm_s,
            sim.dp_exposed_s,
            sim.dp_comm_s
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
    }
    Ok(())
}
