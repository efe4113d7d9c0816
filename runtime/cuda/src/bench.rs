//! The GPU benchmark as a library: forward + backward of one GPT layer in bf16 on one GPU, its
//! achieved TFLOP/s, the ratio to a large bf16 GEMM measured in the same run, and where a traced
//! step spends its time. `benches/gpu_layer.rs` runs it at the Megatron paper's 8.3B shape
//! ([`LayerBench::PAPER`]); a test runs it at [`LayerBench::SMOKE`] (on the CPU stand-in in CI),
//! so the benchmark's own code is checked before a GPU session spends its minutes on it. The
//! caller loads the model (`models/megatron-8.3b.ron`) with the dimensions the benchmark sets.
//!
//! One layer's time is the difference between the whole model (embedding, layers, LM head,
//! cross-entropy) with two layers and with one, each run forward + backward through the
//! executor and the CUDA backend; its FLOPs are the standard count 72·b·s·h²·(1 + s/6h) (three
//! times the forward's 24·b·s·h² + 4·b·s²·h; Narayanan et al. 2021).

use super::Cuda;
use ferrotron_exec::backend::Backend;
use ferrotron_exec::init::{init_params, random_batch};
use ferrotron_exec::kernel::Placement;
use ferrotron_exec::{run_sharded, shard_params, upload_params, RunOptions, Tensor};
use ferrotron_ir::{Dim, Graph, Op};
use ferrotron_partitioner::{partition, PartitionOptions};
use std::time::{Duration, Instant};

type BenchError = Box<dyn std::error::Error>;

/// The shape the benchmark runs `models/megatron-8.3b.ron` at, and how much it measures.
#[derive(Clone, Copy, Debug)]
pub struct LayerBench {
    /// Micro-batch.
    pub batch: u64,
    /// Sequence length.
    pub seq: u64,
    /// Hidden size (`None`: the model's, 3072).
    pub hidden: Option<u64>,
    /// Attention heads (`None`: the model's, 32).
    pub heads: Option<u64>,
    /// Vocabulary (`None`: the model's, 51,200).
    pub vocab: Option<u64>,
    /// The reference GEMM's size (n × n × n).
    pub gemm_n: usize,
    /// Timed steps per model (after two untimed ones).
    pub runs: usize,
}

impl LayerBench {
    /// The paper's 8.3B shape: hidden 3072, 32 heads, sequence 1024, micro-batch 8; an
    /// 8192³ GEMM.
    pub const PAPER: LayerBench = LayerBench {
        batch: 8,
        seq: 1024,
        hidden: None,
        heads: None,
        vocab: None,
        gemm_n: 8192,
        runs: 5,
    };

    /// A shape small enough for the CPU stand-in: the same code paths, in seconds.
    pub const SMOKE: LayerBench = LayerBench {
        batch: 2,
        seq: 32,
        hidden: Some(64),
        heads: Some(4),
        vocab: Some(256),
        gemm_n: 96,
        runs: 1,
    };

    fn model(
        &self,
        load: &impl Fn(&[(String, u64)]) -> Result<Graph, String>,
        layers: u64,
    ) -> Result<Graph, BenchError> {
        let mut overrides = vec![
            ("layers".to_owned(), layers),
            ("batch".to_owned(), self.batch),
            ("seq".to_owned(), self.seq),
        ];
        for (name, v) in [
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("vocab", self.vocab),
        ] {
            if let Some(v) = v {
                overrides.push((name.to_owned(), v));
            }
        }
        Ok(load(&overrides)?)
    }
}

/// Runs the benchmark on `cuda` (bf16 storage) and returns its report (what `gpu_layer.json`
/// holds). `load` gives the 8.3B model with the named dimensions overridden.
pub fn run(
    cuda: &Cuda,
    load: impl Fn(&[(String, u64)]) -> Result<Graph, String>,
    bench: &LayerBench,
) -> Result<serde_json::Value, BenchError> {
    let gemm = gemm_tflops(cuda, bench.gemm_n)?;
    let one_layer = bench.model(&load, 1)?;
    let two_layers = bench.model(&load, 2)?;
    let one = step_time(cuda, &one_layer, bench.runs)?;
    let two = step_time(cuda, &two_layers, bench.runs)?;
    let layer = two.saturating_sub(one);
    let dim = |name: &str| {
        two_layers
            .dims
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
    };
    let hidden = dim("hidden").ok_or("the model has no `hidden` dimension")?;
    let heads = dim("heads").unwrap_or(0);
    let (b, s, h) = (bench.batch as f64, bench.seq as f64, hidden as f64);
    let flops = 72.0 * b * s * h * h * (1.0 + s / (6.0 * h));
    let layer_tflops = flops / layer.as_secs_f64().max(1e-9) / 1e12;
    let profile = profile(cuda, &two_layers)?;
    Ok(serde_json::json!({
        "device": cuda.gpu().name,
        "arch": cuda.gpu().arch,
        "dtype": "bf16",
        "shape": {"batch": bench.batch, "seq": bench.seq, "hidden": hidden, "heads": heads},
        "gemm_n": bench.gemm_n,
        "gemm_tflops": gemm,
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
    }))
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
    let run = run_sharded(cuda.clone(), &plan, &weights, &batch, &opts)?;
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
        let run = run_sharded(cuda.clone(), &plan, &weights, &batch, &opts)?;
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
    // Values in [-0.5, 0.5) from a multiplicative hash: what they are does not matter, that
    // they are not all alike might (some GEMM paths short-cut zeros).
    let host = Tensor {
        shape: vec![n, n],
        data: (0..n * n)
            .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 8 & 1023) as f32 / 1024.0 - 0.5)
            .collect(),
    };
    let a = cuda.upload(&host, ferrotron_ir::DType::BF16)?;
    let b = cuda.upload(&host, ferrotron_ir::DType::BF16)?;
    let op: Op<&_, Dim> = Op::MatMul {
        a: &a,
        b: &b,
        transpose_a: false,
        transpose_b: false,
    };
    let local = Placement::default();
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
