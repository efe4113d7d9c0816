//! What several subcommands take or do alike: the model and how to partition it
//! ([`PlanArgs`], with its dropout override), the backend a step runs on
//! ([`BackendArgs`]), and writing a file whole.

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};
use ferrotron_ir::lang::parse_dim_override;
use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::{Layout, PartitionOptions, Recompute, Schedule};
use std::path::{Path, PathBuf};

/// The model and how to partition it.
#[derive(Args, Clone, Debug)]
pub struct PlanArgs {
    /// The model file.
    pub model: PathBuf,
    /// Tensor-parallel degree.
    #[arg(long, default_value_t = 1)]
    pub tp: u64,
    /// Data-parallel degree.
    #[arg(long, default_value_t = 1)]
    pub dp: u64,
    /// Split the activations between tensor-parallel regions along the sequence.
    #[arg(long)]
    pub sequence_parallel: bool,
    /// Pad the vocabulary to a multiple of this × tp.
    #[arg(long, default_value_t = 128)]
    pub vocab_multiple: u64,
    /// Fix a parameter's layout: `--pin h.0.mlp.c_fc.weight=replicated` (or `split(1)`).
    #[arg(long = "pin", value_name = "PARAM=LAYOUT", value_parser = parse_pin)]
    pub pins: Vec<(String, Layout)>,
    /// Override a named dimension: `--dim layers=2`.
    #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
    pub dims: Vec<(String, u64)>,
    /// Pipeline stages: the layers cut into this many stages, each on its own tp × dp ranks.
    #[arg(long, default_value_t = 1)]
    pub pp: u64,
    /// Micro-batches per step: the model's `batch` (the global batch) is split into this many,
    /// run through the stages in the schedule's order, their gradients summed.
    #[arg(long, default_value_t = 1)]
    pub micro_batches: u64,
    /// The pipeline schedule: `1f1b` (one forward, one backward), `gpipe`, or `interleaved`
    /// (1F1B over model chunks, with --virtual-stages).
    #[arg(long, default_value = "1f1b")]
    pub schedule: Schedule,
    /// Model chunks per stage for the interleaved schedule (layers are dealt to the stages in
    /// `pp × virtual-stages` contiguous chunks, round robin).
    #[arg(long, default_value_t = 1)]
    pub virtual_stages: u64,
    /// Layers per stage (`--stage-layers 5,4,4,3`) instead of balancing them by their work.
    #[arg(long, value_delimiter = ',')]
    pub stage_layers: Vec<u32>,
    /// ZeRO stage: 1 is the distributed optimizer (each data-parallel rank keeps the Adam state
    /// and master weights of 1/dp of every parameter; gradients are reduce-scattered over dp
    /// and the updated weights all-gathered), 0 replicates the optimizer state.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub zero: u8,
    /// What the backward pass recomputes instead of keeping: `none`, `selective` (each layer's
    /// attention core: scores, softmax, dropout) or `full` (each layer but its input).
    #[arg(long, default_value = "none")]
    pub recompute: Recompute,
    /// Every dropout's probability instead of the model file's, 0 taking the dropouts out of
    /// the graph: set by the subcommand (`run --dropout`, `train --dropout`; `generate` always
    /// 0), never parsed here.
    #[arg(skip)]
    pub dropout: Option<f64>,
}

impl PlanArgs {
    /// The model as the plan runs it: with the dimensions overridden, and its `batch` one
    /// micro-batch's.
    pub fn load(&self) -> Result<Graph> {
        if self.micro_batches <= 1 {
            return self.load_global();
        }
        let g = load_model(&self.model, &load_options(&self.micro_batch_dims()?))?;
        self.with_dropout(g)
    }

    /// The dimension overrides of one micro-batch's model: `--dim`s, with `batch` the step's
    /// divided by `--micro-batches`.
    pub fn micro_batch_dims(&self) -> Result<Vec<(String, u64)>> {
        micro_batch_dims(&self.model, &self.dims, self.micro_batches)
    }

    /// The model with the dimensions overridden: the whole batch of a step.
    pub fn load_global(&self) -> Result<Graph> {
        let g = load_model(&self.model, &load_options(&self.dims))?;
        self.with_dropout(g)
    }

    /// `g` with [`PlanArgs::dropout`] applied, if set.
    fn with_dropout(&self, g: Graph) -> Result<Graph> {
        match self.dropout {
            Some(p) => Ok(ferrotron_ir::dropout::with_dropout(&g, p)?),
            None => Ok(g),
        }
    }

    /// The partitioner's options.
    pub fn options(&self) -> PartitionOptions {
        PartitionOptions {
            tp: self.tp,
            dp: self.dp,
            sequence_parallel: self.sequence_parallel,
            vocab_multiple: self.vocab_multiple,
            pins: self.pins.clone(),
            pp: self.pp,
            micro_batches: self.micro_batches,
            schedule: self.schedule,
            virtual_stages: self.virtual_stages,
            stage_layers: (!self.stage_layers.is_empty()).then(|| self.stage_layers.clone()),
            zero: self.zero,
            recompute: self.recompute,
        }
    }
}

/// The dimension overrides `dims` of `model` for one micro-batch, and the micro-batches per
/// step, from Megatron's terms: the global batch (`global`, else the model's `batch`), the
/// sequences per replica in a micro-batch (`micro_batch_size`) over `dp` replicas, and the
/// micro-batch count (`micro_batches`, implied by the other two when both are given). With the
/// micro-batch size alone, the global batch is it × dp × micro-batches.
pub fn megatron_batch(
    model: &Path,
    dims: &[(String, u64)],
    dp: u64,
    global: Option<u64>,
    micro_batch_size: Option<u64>,
    micro_batches: Option<u64>,
) -> Result<(Vec<(String, u64)>, u64)> {
    let with_batch = |batch: u64| {
        let mut dims = dims.to_vec();
        dims.retain(|(n, _)| n != "batch");
        dims.push(("batch".into(), batch));
        dims
    };
    match (global, micro_batch_size) {
        (Some(b), Some(mbs)) => {
            let per_step = mbs.saturating_mul(dp);
            if per_step == 0 || !b.is_multiple_of(per_step) {
                let valid: Vec<String> = (1..=b / dp.max(1))
                    .filter(|s| b.is_multiple_of(s * dp.max(1)))
                    .map(|s| s.to_string())
                    .collect();
                anyhow::bail!(
                    "--micro-batch-size {mbs}: the global batch of {b} does not split into \
                     micro-batches of {mbs} sequences on each of {dp} replicas; valid sizes: {}",
                    valid.join(", ")
                );
            }
            let m = b / per_step;
            if let Some(given) = micro_batches.filter(|&g| g != m) {
                anyhow::bail!(
                    "--micro-batches {given}: the global batch of {b} in micro-batches of {mbs} \
                     on {dp} replicas makes {m}"
                );
            }
            Ok((with_batch(per_step), m))
        }
        (None, Some(mbs)) => {
            let m = micro_batches.unwrap_or(1);
            Ok((with_batch(mbs.saturating_mul(dp)), m))
        }
        (global, None) => {
            let dims = match global {
                Some(b) => with_batch(b),
                None => dims.to_vec(),
            };
            let m = micro_batches.unwrap_or(1);
            Ok((micro_batch_dims(model, &dims, m)?, m))
        }
    }
}

/// The dimension overrides `dims` of `model` for one of `micro_batches` equal micro-batches:
/// its `batch` (the step's) divided by their number, or a clear error listing the counts that
/// divide it.
pub fn micro_batch_dims(
    model: &Path,
    dims: &[(String, u64)],
    micro_batches: u64,
) -> Result<Vec<(String, u64)>> {
    if micro_batches <= 1 {
        return Ok(dims.to_vec());
    }
    let global = load_model(model, &load_options(dims))?;
    let batch = global
        .dims
        .iter()
        .find(|(n, _)| n == "batch")
        .map(|&(_, b)| b)
        .ok_or_else(|| anyhow!("--micro-batches needs the model's `batch` dimension"))?;
    if !batch.is_multiple_of(micro_batches) {
        let valid: Vec<String> = (1..=batch)
            .filter(|m| batch.is_multiple_of(*m))
            .map(|m| m.to_string())
            .collect();
        anyhow::bail!(
            "--micro-batches {micro_batches}: the batch of {batch} does not split into that many \
             equal micro-batches; valid: {}",
            valid.join(", ")
        );
    }
    let mut dims = dims.to_vec();
    dims.retain(|(n, _)| n != "batch");
    dims.push(("batch".into(), batch / micro_batches));
    Ok(dims)
}

/// Loading options overriding `dims`.
pub fn load_options(dims: &[(String, u64)]) -> LoadOptions {
    LoadOptions {
        overrides: dims.to_vec(),
        ..LoadOptions::default()
    }
}

fn parse_pin(s: &str) -> Result<(String, Layout), String> {
    let (name, layout) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("`{s}`: expected PARAM=LAYOUT"))?;
    let layout = match layout.trim() {
        "replicated" => Layout::Replicated,
        other => {
            let d = other
                .strip_prefix("split(")
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|d| d.trim().parse().ok())
                .ok_or_else(|| {
                    format!("`{other}`: a layout is `replicated` or `split(D)` (D a dimension)")
                })?;
            Layout::Split(d)
        }
    };
    Ok((name.trim().to_owned(), layout))
}

/// Where the ranks compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// CPU threads (the reference).
    Cpu,
    /// NVIDIA GPUs: cuBLAS, NVRTC kernels, NCCL.
    Cuda,
}

/// The element type of weights and activations on the CUDA backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// `f32` throughout (verification).
    F32,
    /// bf16 storage, `f32` arithmetic and statistics (mixed precision).
    Bf16,
}

/// The backend a step runs on.
#[derive(Args, Clone, Debug)]
pub struct BackendArgs {
    /// Where the ranks compute.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// The GPU (CUDA backend): every rank runs on it as a virtual rank; under
    /// `ferrotron launch` the default is the process's local rank.
    #[arg(long)]
    pub device: Option<usize>,
    /// Weights and activations on the CUDA backend (master weights stay `f32` in training).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Threads each rank's kernels may use (CPU backend); default: the machine's cores split
    /// between the ranks that share it (at least one each).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds a collective or transfer waits for the other ranks before the run stops, naming
    /// the collective, its node and the ranks that had not arrived (ranks as threads; a
    /// launched job takes its launcher's `--timeout`).
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

impl BackendArgs {
    /// [`BackendArgs::timeout`].
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout)
    }

    /// Threads for each of `sharing` ranks on this machine: `--threads`, else the cores split
    /// evenly between them.
    pub fn threads_per_rank(&self, sharing: usize) -> usize {
        self.threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / sharing.max(1)).max(1)
        })
    }
}

/// The steady state of repeated steps taking `seconds` each: the median step after the first
/// (which pays for the first allocations); `None` for fewer than two.
pub fn steady_step(seconds: &[f64]) -> Option<f64> {
    let mut rest = seconds.get(1..).filter(|r| !r.is_empty())?.to_vec();
    rest.sort_by(f64::total_cmp);
    Some(rest[rest.len() / 2])
}

/// What this process has used so far (every thread: the ranks of an in-process job and their
/// kernels' pool), from `getrusage`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// CPU time in user mode, seconds.
    pub user: f64,
    /// CPU time in the kernel, seconds.
    pub system: f64,
    /// Page faults served without I/O (first touches of fresh memory).
    pub minor_faults: f64,
}

impl Usage {
    /// The process's usage now; `None` where the system cannot say.
    pub fn now() -> Option<Usage> {
        #[cfg(unix)]
        {
            let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
            // SAFETY: getrusage writes the struct it is given; RUSAGE_SELF is a valid target.
            if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
                return None;
            }
            // SAFETY: initialised by the successful call above.
            let usage = unsafe { usage.assume_init() };
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            Some(Usage {
                user: secs(usage.ru_utime),
                system: secs(usage.ru_stime),
                minor_faults: usage.ru_minflt as f64,
            })
        }
        #[cfg(not(unix))]
        None
    }

    /// What was used between `before` and this.
    pub fn since(self, before: Usage) -> Usage {
        Usage {
            user: self.user - before.user,
            system: self.system - before.system,
            minor_faults: self.minor_faults - before.minor_faults,
        }
    }
}

/// The bytes of memory this process holds now (its resident set), where the system says.
pub fn resident_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // SAFETY: sysconf only reads a system setting.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Some(pages * u64::try_from(page).ok()?)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// A file written whole or not at all: a temporary sibling, then a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("{}: {e}", path.display())
    })
}

/// `--dropout P`: a drop probability in `[0, 1)` (clap names the flag and the value).
pub fn parse_dropout(s: &str) -> Result<f64, String> {
    const RANGE: &str = "a drop probability is at least 0 and below 1 (0 turns dropout off)";
    match s.trim().parse::<f64>() {
        Ok(p) if (0.0..1.0).contains(&p) => Ok(p),
        Ok(_) => Err(RANGE.into()),
        Err(_) => Err(format!("not a number; {RANGE}")),
    }
}
