//! The `ferrotron` command line: parses arguments and calls the libraries. It holds no logic of
//! its own; each subcommand is a few lines over `ferrotron-ir` (and, as they land, the
//! partitioner and the runtimes).

use anyhow::Result;
use clap::{Parser, Subcommand};
use ferrotron_ir::lang::parse_dim_override;
use ferrotron_ir::summary::Summary;
use ferrotron_ir::{load_model, LoadOptions};
use ferrotron_partitioner::cost::{estimate, weak_scaling_table, Cluster, EstimateOptions};
use ferrotron_partitioner::{partition, verify_plan, Layout, PartitionOptions, Report};
use ferrotron_runtime::tokenizer::Tokenizer;
use ferrotron_runtime::train::Batches;
use ferrotron_runtime::verify::Verification;
use ferrotron_visualizer::export::{self, ExportOptions};
use ferrotron_visualizer::layout::LayoutOptions;
use std::path::PathBuf;
use std::process::ExitCode;

mod execute;
mod launch;
mod training;

/// A compiler and runtime for Megatron-style tensor model parallelism.
#[derive(Parser)]
#[command(name = "ferrotron", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse a model file, expand its blocks, infer every shape, verify, and print a summary.
    Check {
        /// The model file (`models/gpt2-small.ron`).
        model: PathBuf,
        /// Override a named dimension: `--dim layers=2 --dim hidden=128`.
        #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
        dims: Vec<(String, u64)>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Partition a model for tensor (× data) parallelism, differentiate it, verify the plan,
    /// and print what it communicates and stores per rank.
    Partition {
        #[command(flatten)]
        plan: PlanArgs,
        /// Write the plan (RON) here.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also print how long each phase took.
        #[arg(long)]
        timings: bool,
    },
    /// Partition a model and run one forward + backward step, on CPU threads or a GPU (one
    /// thread per rank; under `ferrotron launch`, one process per rank), on deterministic
    /// weights and a random batch; with `--verify`, compare the loss, the outputs and every
    /// gradient with the unpartitioned model's.
    Run(execute::RunArgs),
    /// Train a model on a text file: AdamW with warm-up and cosine decay, gradient clipping,
    /// on CPU threads or a GPU (one thread per rank). Batch and sequence length are the model's
    /// `batch` and `seq` dimensions.
    Train(training::TrainArgs),
    /// Predict a plan's step time, throughput and memory on a cluster (a cost model over the
    /// plan); or, with `--weak-scaling`, reproduce the Megatron paper's weak-scaling study.
    Simulate {
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
    },
    /// Choose how to run a model on a cluster: every tp × dp (× sequence parallelism ×
    /// recomputation) priced by the cost model, ranked by throughput among those that fit.
    Plan {
        /// The model file.
        model: PathBuf,
        /// The cluster specification.
        #[arg(long)]
        cluster: PathBuf,
        /// GPUs to use.
        #[arg(long)]
        gpus: u64,
        /// The global batch (default: the model's `batch`).
        #[arg(long)]
        batch: Option<u64>,
        /// Price every float at this dtype (`f16`, `bf16`, `f32`; default: the model's).
        #[arg(long)]
        dtype: Option<String>,
        /// Override a named dimension.
        #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
        dims: Vec<(String, u64)>,
        /// Candidates to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Draw how a model was partitioned, headless: layouts coloured by layout (replicated,
    /// split by column or row, partial sum), collectives labelled (the paper's f and g), edges
    /// with shard-local shapes; layers collapsed unless expanded.
    Export {
        #[command(flatten)]
        plan: PlanArgs,
        /// Write an SVG picture here.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Write a Graphviz DOT file here.
        #[arg(long)]
        dot: Option<PathBuf>,
        /// Layers to draw op by op (`--expand 0,3`); `all` for every one.
        #[arg(long, value_delimiter = ',')]
        expand: Vec<String>,
        /// Draw the backward pass too.
        #[arg(long)]
        backward: bool,
    },
    /// Open the desktop viewer: the partitioned graph coloured by layout, layers that expand
    /// on click, a property panel, and tp / dp / sequence parallelism changed live.
    View {
        #[command(flatten)]
        plan: PlanArgs,
        /// Layers to open drawn op by op (`--expand 0,3`); the others open collapsed.
        #[arg(long, value_delimiter = ',')]
        expand: Vec<usize>,
        /// Open with the backward pass drawn.
        #[arg(long)]
        backward: bool,
        /// Time N frames while the graph pans (at the opening view, then fitted to the
        /// window), print the frame times and close.
        #[arg(long, value_name = "N")]
        bench_frames: Option<usize>,
    },
    /// Rewrite a checkpoint for another tensor-parallel degree.
    Reshard {
        #[command(flatten)]
        plan: PlanArgs,
        /// The checkpoint to read.
        #[arg(long)]
        from: PathBuf,
        /// Where to write the re-sharded one.
        #[arg(long)]
        to: PathBuf,
    },
    /// Sample text from a trained checkpoint (greedy, or with `--temperature`).
    Generate {
        #[command(flatten)]
        plan: PlanArgs,
        /// The checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The text to continue.
        #[arg(long, default_value = "")]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// `bytes` or `gpt2`, as trained.
        #[arg(long, default_value = "bytes")]
        tokenizer: String,
        /// Softmax temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Start N worker processes on this node (like torchrun), each told its rank, meeting the
    /// other nodes' launchers at a rendezvous store; if any rank fails, stop every rank.
    Launch(launch::LaunchArgs),
}

/// The model and how to partition it, shared by `partition` and `run`.
#[derive(clap::Args, Clone, Debug)]
struct PlanArgs {
    /// The model file.
    model: PathBuf,
    /// Tensor-parallel degree.
    #[arg(long, default_value_t = 1)]
    tp: u64,
    /// Data-parallel degree.
    #[arg(long, default_value_t = 1)]
    dp: u64,
    /// Split the activations between tensor-parallel regions along the sequence.
    #[arg(long)]
    sequence_parallel: bool,
    /// Pad the vocabulary to a multiple of this × tp.
    #[arg(long, default_value_t = 128)]
    vocab_multiple: u64,
    /// Fix a parameter's layout: `--pin h.0.mlp.c_fc.weight=replicated` (or `split(1)`).
    #[arg(long = "pin", value_name = "PARAM=LAYOUT", value_parser = parse_pin)]
    pins: Vec<(String, Layout)>,
    /// Override a named dimension: `--dim layers=2`.
    #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim_override)]
    dims: Vec<(String, u64)>,
}

impl PlanArgs {
    fn load(&self) -> Result<ferrotron_ir::Graph> {
        let opts = LoadOptions {
            overrides: self.dims.clone(),
            ..LoadOptions::default()
        };
        Ok(load_model(&self.model, &opts)?)
    }

    fn options(&self) -> PartitionOptions {
        PartitionOptions {
            tp: self.tp,
            dp: self.dp,
            sequence_parallel: self.sequence_parallel,
            vocab_multiple: self.vocab_multiple,
            pins: self.pins.clone(),
        }
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check { model, dims, json } => {
            let opts = LoadOptions {
                overrides: dims,
                ..LoadOptions::default()
            };
            let graph = load_model(&model, &opts)?;
            let summary = Summary::of(&graph);
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print!("{summary}");
            }
        }
        Command::Partition {
            plan: args,
            output,
            json,
            timings,
        } => {
            let start = std::time::Instant::now();
            let graph = args.load()?;
            let loaded = start.elapsed();
            let options = args.options();
            let plan = partition(&graph, &options)?;
            let partitioned = start.elapsed() - loaded;
            verify_plan(&plan)?;
            let verified = start.elapsed() - loaded - partitioned;
            if let Some(path) = &output {
                write_atomically(path, plan.to_ron().as_bytes())?;
            }
            let report = Report::of(&plan);
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
                if let Some(path) = &output {
                    println!("plan written to {}", path.display());
                }
            }
            if timings {
                eprintln!(
                    "load {:.1} ms, partition + autodiff {:.1} ms, verify {:.1} ms",
                    loaded.as_secs_f64() * 1e3,
                    partitioned.as_secs_f64() * 1e3,
                    verified.as_secs_f64() * 1e3
                );
            }
        }
        Command::Run(args) => execute::run(args)?,
        Command::Train(args) => training::train(args)?,
        Command::Simulate {
            model,
            cluster,
            tp,
            dp,
            micro_batch,
            sequence_parallel,
            dtype,
            recompute,
            no_overlap,
            dims,
            weak_scaling,
            json,
        } => {
            let cluster = read_cluster(&cluster)?;
            let compute_dtype = parse_dtype(dtype.as_deref())?;
            let opts = EstimateOptions {
                compute_dtype,
                recompute,
                overlap_dp: !no_overlap,
                ..EstimateOptions::default()
            };
            if weak_scaling {
                let opts = EstimateOptions {
                    compute_dtype: opts.compute_dtype.or(Some(ferrotron_ir::DType::F16)),
                    recompute: true,
                    ..opts
                };
                // The paper's models, from the zoo in the working directory.
                let zoo = |file: &str, dims: &[(&str, u64)]| {
                    let opts = LoadOptions {
                        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
                        ..LoadOptions::default()
                    };
                    let path = std::path::Path::new("models").join(file);
                    load_model(&path, &opts).map_err(|e| e.to_string())
                };
                let (_, table) =
                    weak_scaling_table(zoo, &cluster, &opts).map_err(|e| anyhow::anyhow!(e))?;
                print!("{table}");
                return Ok(());
            }
            let model = model.ok_or_else(|| anyhow::anyhow!("simulate needs a model file"))?;
            let load = |batch: Option<u64>| -> Result<ferrotron_ir::Graph> {
                let mut overrides = dims.clone();
                if let Some(b) = batch {
                    overrides.retain(|(n, _)| n != "batch");
                    overrides.push(("batch".into(), b));
                }
                let opts = LoadOptions {
                    overrides,
                    ..LoadOptions::default()
                };
                Ok(load_model(&model, &opts)?)
            };
            let graph = load(micro_batch.map(|b| b * dp))?;
            let options = PartitionOptions {
                tp,
                dp,
                sequence_parallel,
                ..PartitionOptions::default()
            };
            let plan = partition(&graph, &options)?;
            // Scaling efficiency against the one-GPU run of the same per-GPU work: this rank's
            // program, on the same shard shapes, with nothing to communicate.
            let sim = estimate(&plan, &cluster, &opts);
            if json {
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
        }
        Command::Plan {
            model,
            cluster,
            gpus,
            batch,
            dtype,
            dims,
            top,
            json,
        } => {
            let cluster = read_cluster(&cluster)?;
            let opts = EstimateOptions {
                compute_dtype: parse_dtype(dtype.as_deref())?,
                ..EstimateOptions::default()
            };
            let started = std::time::Instant::now();
            let load = |batch: Option<u64>| {
                let mut overrides = dims.clone();
                if let Some(b) = batch {
                    overrides.retain(|(n, _)| n != "batch");
                    overrides.push(("batch".into(), b));
                }
                let opts = LoadOptions {
                    overrides,
                    ..LoadOptions::default()
                };
                load_model(&model, &opts).map_err(|e| e.to_string())
            };
            let choice = ferrotron_partitioner::planner::choose(load, &cluster, gpus, batch, &opts)
                .map_err(|e| anyhow::anyhow!(e))?;
            let took = started.elapsed();
            if json {
                println!("{}", serde_json::to_string(&choice)?);
            } else {
                println!(
                    "{:>5} {:>6} {:>3} {:>9} {:>12} {:>9} {:>10} {:>5}",
                    "tp", "dp", "SP", "recompute", "tokens/s", "step (s)", "GiB/GPU", "fits"
                );
                for c in choice.candidates.iter().take(top) {
                    match &c.estimate {
                        Some(s) => println!(
                            "{:>5} {:>6} {:>3} {:>9} {:>12.0} {:>9.3} {:>10.1} {:>5}",
                            c.tp,
                            c.dp,
                            if c.sequence_parallel { "yes" } else { "no" },
                            if c.recompute { "yes" } else { "no" },
                            c.tokens_per_second,
                            s.step_time_s,
                            s.memory_bytes_per_gpu as f64 / f64::from(1 << 30),
                            if s.fits { "yes" } else { "no" }
                        ),
                        None => println!(
                            "{:>5} {:>6}  -- {}",
                            c.tp,
                            c.dp,
                            c.error.as_deref().unwrap_or("")
                        ),
                    }
                }
                println!("\n{}", choice.explanation);
                eprintln!(
                    "{} candidates priced in {:.0} ms",
                    choice.candidates.len(),
                    took.as_secs_f64() * 1e3
                );
            }
        }
        Command::Export {
            plan: args,
            svg,
            dot,
            expand,
            backward,
        } => {
            if svg.is_none() && dot.is_none() {
                anyhow::bail!("nothing to write: give --svg OUT.svg and/or --dot OUT.dot");
            }
            let graph = args.load()?;
            let plan = partition(&graph, &args.options())?;
            let expand_all = expand.iter().any(|e| e == "all");
            let expand = expand
                .iter()
                .filter(|e| *e != "all")
                .map(|e| {
                    e.parse::<usize>()
                        .map_err(|_| anyhow::anyhow!("--expand {e}: a layer index or `all`"))
                })
                .collect::<Result<Vec<_>>>()?;
            let opts = ExportOptions {
                layout: LayoutOptions {
                    backward,
                    expand_all,
                    expand,
                    ..LayoutOptions::default()
                },
            };
            if let Some(path) = &svg {
                write_atomically(path, export::svg(&plan, &opts).as_bytes())?;
                println!("{}", path.display());
            }
            if let Some(path) = &dot {
                write_atomically(path, export::dot(&plan, &opts).as_bytes())?;
                println!("{}", path.display());
            }
        }
        Command::View {
            plan: args,
            expand,
            backward,
            bench_frames,
        } => {
            let load = LoadOptions {
                overrides: args.dims.clone(),
                ..LoadOptions::default()
            };
            let view = ferrotron_visualizer::app::RunOptions {
                expand,
                backward,
                bench_frames,
            };
            ferrotron_visualizer::app::run(args.model.clone(), load, args.options(), view)
                .map_err(anyhow::Error::msg)?;
        }
        Command::Reshard {
            plan: args,
            from,
            to,
        } => {
            let graph = args.load()?;
            let plan = partition(&graph, &args.options())?;
            ferrotron_runtime::checkpoint::reshard(&from, &to, &plan)?;
            println!(
                "{} → {} for tp = {}",
                from.display(),
                to.display(),
                plan.mesh.tp
            );
        }
        Command::Launch(args) => launch::launch(args)?,
        Command::Generate {
            plan: args,
            checkpoint,
            prompt,
            tokens,
            tokenizer,
            temperature,
            seed,
        } => {
            let graph = args.load()?;
            let plan = partition(&graph, &args.options())?;
            let tokenizer = Tokenizer::named(&tokenizer)?;
            let text = ferrotron_runtime::generate::generate(
                &graph,
                &plan,
                &checkpoint,
                &tokenizer,
                &prompt,
                tokens,
                temperature,
                seed,
            )?;
            println!("{text}");
        }
    }
    Ok(())
}

fn parse_dtype(dtype: Option<&str>) -> Result<Option<ferrotron_ir::DType>> {
    Ok(match dtype {
        None => None,
        Some("f16") => Some(ferrotron_ir::DType::F16),
        Some("bf16") => Some(ferrotron_ir::DType::BF16),
        Some("f32") => Some(ferrotron_ir::DType::F32),
        Some(other) => anyhow::bail!("--dtype {other}: expected f16, bf16 or f32"),
    })
}

/// `[#######.........]`: `done` of `total` in `width` characters.
fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let filled = (done.min(total) as usize * width) / total.max(1) as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// Writes a file whole or not at all: a temporary sibling, then a rename.
/// A cluster file.
fn read_cluster(path: &std::path::Path) -> Result<Cluster> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Cluster::from_ron(&text, &path.display().to_string())?)
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("{}: {e}", path.display())
    })
}

fn batches_len(b: &Batches) -> usize {
    b.len()
}

fn print_verification(v: &Verification) {
    println!(
        "verify against the unpartitioned model: loss {:.6} vs {:.6}",
        v.loss, v.reference_loss
    );
    let mut worst: Vec<&ferrotron_runtime::verify::Entry> = v.entries.iter().collect();
    worst.sort_by(|a, b| b.max_rel_error.total_cmp(&a.max_rel_error));
    println!(
        "  {:<44} {:>12} {:>10}",
        "tensor (largest errors first)", "rel. error", "tolerance"
    );
    for e in worst.iter().take(12) {
        println!(
            "  {:<44} {:>12.3e} {:>10.0e} {}",
            e.name,
            e.max_rel_error,
            e.tolerance,
            if e.ok() { "ok" } else { "MISMATCH" }
        );
    }
    if worst.len() > 12 {
        println!("  ... and {} more, all within tolerance", worst.len() - 12);
    }
    if let Some((node, err)) = &v.first_divergence {
        println!("  first op whose output diverges: `{node}` (relative error {err:.3e})");
    }
    println!(
        "  {} ({} tensors, max relative error {:.3e})",
        if v.passed() { "verified" } else { "MISMATCH" },
        v.entries.len(),
        v.max_rel_error()
    );
}

fn main() -> ExitCode {
    ferrotron_runtime::cpu::tune_allocator();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
