//! The GPU benchmark of issue 5: forward + backward of one GPT layer at the Megatron paper's
//! 8.3B shape (hidden 3072, 32 heads, sequence 1024, micro-batch 8) in bf16 on one GPU, its
//! achieved TFLOP/s, and the ratio to a large cuBLAS bf16 GEMM measured in the same run.
//!
//! One layer's time is the difference between the whole model (embedding, layers, LM head,
//! cross-entropy) with two layers and with one, each run forward + backward through the
//! executor and the CUDA backend; its FLOPs are the standard count 72·b·s·h²·(1 + s/6h) (three
//! times the forward's 24·b·s·h² + 4·b·s²·h; Narayanan et al. 2021).
//!
//! `cargo bench -p ferrotron-runtime --bench gpu_layer` prints one JSON object (and writes it to
//! `$OUT/gpu_layer.json` when `OUT` is set); without a GPU it says so and exits 0.

use ferrotron_ir::{load_model, Dim, Graph, LoadOptions, Op};
use ferrotron_partitioner::{partition, PartitionOptions};
use ferrotron_runtime::backend::Backend;
use ferrotron_runtime::cpu::kernels::Local;
use ferrotron_runtime::cuda::{Cuda, CudaError, DType};
use ferrotron_runtime::exec::{run_on, upload_params};
use ferrotron_runtime::init::{init_params, random_batch};
use ferrotron_runtime::{shard_params, RunOptions, Tensor};
use std::path::PathBuf;
use std::time::{Duration, Instant};

type BenchError = Box<dyn std::error::Error>;

const BATCH: u64 = 8;
const SEQ: u64 = 1024;
const HIDDEN: u64 = 3072;

fn model(layers: u64) -> Graph {
    let dir = std::env::var("FERROTRON_MODELS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../models").to_owned());
    let path = PathBuf::from(dir).join("megatron-8.3b.ron");
    let opts = LoadOptions {
        overrides: vec![
            ("layers".into(), layers),
            ("batch".into(), BATCH),
            ("seq".into(), SEQ),
        ],
        ..LoadOptions::default()
    };
    load_model(&path, &opts).expect("models/megatron-8.3b.ron")
}

/// Where one traced step of `g` spends its time, by op kind: `(mnemonic, ms, share)`, largest
/// first. Tracing waits for the device after every op, so the step runs slower than untraced;
/// the shares are what the profile is for.
fn profile(cuda: &Cuda, g: &Graph) -> Result<Vec<(String, f64, f64)>, BenchError> {
    let plan = partition(g, &PartitionOptions::default())?;
    let params = init_params(g, 1);
    let weights = upload_params(cuda, &plan, &shard_params(&plan, &params)?)?;
    let batch = random_batch(g, 1);
    let opts = RunOptions {
        trace: true,
        ..RunOptions::default()
    };
    let run = run_on(cuda.clone(), &plan, &weights, &batch, &opts)?;
    let mut by_kind: std::collections::BTreeMap<String, f64> = Default::default();
    for e in &run.ranks[0].events {
        let direction = if plan.graph.order[..plan.backward_start].contains(&e.node) {
            "fwd"
        } else {
            "bwd"
        };
        *by_kind
            .entry(format!("{} ({direction})", e.op))
            .or_default() += e.took.as_secs_f64() * 1e3;
    }
    let total: f64 = by_kind.values().sum();
    let mut rows: Vec<_> = by_kind
        .into_iter()
        .map(|(k, ms)| (k, ms, ms / total.max(1e-12)))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(rows)
}

/// The median of `runs` timed forward + backward steps of `g` (after two untimed ones).
fn step_time(cuda: &Cuda, g: &Graph, runs: usize) -> Result<Duration, BenchError> {
    let plan = partition(g, &PartitionOptions::default())?;
    let params = init_params(g, 1);
    let shards = shard_params(&plan, &params)?;
    let weights = upload_params(cuda, &plan, &shards)?;
    let batch = random_batch(g, 1);
    let opts = RunOptions::default();
    let mut times = Vec::new();
    for i in 0..runs + 2 {
        cuda.synchronize()?;
        let start = Instant::now();
        let run = run_on(cuda.clone(), &plan, &weights, &batch, &opts)?;
        cuda.synchronize()?;
        let took = start.elapsed();
        let loss = run.loss()?;
        if !loss.is_finite() {
            return Err(format!("the loss is {loss}").into());
        }
        if i >= 2 {
            times.push(took);
        }
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// TFLOP/s of an n×n×n bf16 GEMM through the backend's MatMul (cuBLAS, f32 accumulation).
fn gemm_tflops(cuda: &Cuda, n: usize) -> Result<f64, BenchError> {
    let mut rng = fastrand::Rng::with_seed(3);
    let host = Tensor {
        shape: vec![n, n],
        data: (0..n * n).map(|_| rng.f32() - 0.5).collect(),
    };
    let a = cuda.upload(&host, ferrotron_ir::DType::BF16)?;
    let b = cuda.upload(&host, ferrotron_ir::DType::BF16)?;
    let op: Op<&_, Dim> = Op::MatMul {
        a: &a,
        b: &b,
        transpose_a: false,
        transpose_b: false,
    };
    let local = Local::default();
    for _ in 0..3 {
        cuda.eval(&op, &local)?;
    }
    cuda.synchronize()?;
    let reps = 10;
    let start = Instant::now();
    for _ in 0..reps {
        cuda.eval(&op, &local)?;
    }
    cuda.synchronize()?;
    let secs = start.elapsed().as_secs_f64() / reps as f64;
    Ok(2.0 * (n as f64).powi(3) / secs / 1e12)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cuda = match Cuda::new(0, 1, DType::Bf16) {
        Ok(c) => c,
        Err(CudaError::Unavailable(why)) => {
            // On the GPU check (scripts/gpu-check.sh) a missing device is a failure.
            if std::env::var_os("FERROTRON_REQUIRE_GPU").is_some() {
                return Err(format!("FERROTRON_REQUIRE_GPU is set but: {why}").into());
            }
            println!("SKIPPED: no CUDA device ({why})");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let gemm = gemm_tflops(&cuda, 8192)?;
    let one = step_time(&cuda, &model(1), 5)?;
    let two = step_time(&cuda, &model(2), 5)?;
    let layer = two.saturating_sub(one);
    let (b, s, h) = (BATCH as f64, SEQ as f64, HIDDEN as f64);
    let flops = 72.0 * b * s * h * h * (1.0 + s / (6.0 * h));
    let layer_tflops = flops / layer.as_secs_f64().max(1e-9) / 1e12;
    let profile = profile(&cuda, &model(2))?;
    let report = serde_json::json!({
        "device": cuda.gpu().name,
        "arch": cuda.gpu().arch,
        "dtype": "bf16",
        "shape": {"batch": BATCH, "seq": SEQ, "hidden": HIDDEN, "heads": 32},
        "gemm_8192_tflops": gemm,
        "model_1_layer_step_ms": one.as_secs_f64() * 1e3,
        "model_2_layer_step_ms": two.as_secs_f64() * 1e3,
        "layer_fwd_bwd_ms": layer.as_secs_f64() * 1e3,
        "layer_tflop": flops / 1e12,
        "layer_tflops": layer_tflops,
        "ratio_to_gemm": layer_tflops / gemm,
        "profile_2_layers_traced": profile
            .iter()
            .take(16)
            .map(|(k, ms, share)| serde_json::json!({"op": k, "ms": ms, "share": share}))
            .collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Ok(out) = std::env::var("OUT") {
        let path = PathBuf::from(out).join("gpu_layer.json");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}
