//! The CUDA backend computes what the CPU backend computes: the tiny GPT, BERT and Llama-style
//! models, partitioned at tp = 1, 2, 4, 8 and 3 (virtual ranks on one GPU, each on its own stream),
//! with data parallelism and sequence parallelism, run on the GPU and compared with the
//! unpartitioned model on the CPU on the same weights and batch: the loss, every output and
//! every gradient, within the `f32` tolerances; in bf16 storage within bf16's. Pipelined plans
//! too: stages of virtual ranks passing their activations and gradients on the device.
//!
//! Without a GPU (or without the CUDA libraries) every test prints why it was skipped, on
//! stderr, and returns; `cuda_emulated.rs` runs them all again on the CPU stand-in for the driver
//! (`cuda-emu`), and the NVRTC compile test (`runtime/cuda/tests/compile.rs`) checks what NVRTC
//! makes of the kernels.

use ferrotron_cpu::Cpu;
use ferrotron_cuda::{Cuda, CudaError, Storage};
use ferrotron_exec::init::{random_batch, test_params};
use ferrotron_exec::verify::{compare, reference_plan, Tolerances};
use ferrotron_exec::{launch, run, Backend, RunOptions, StepStats, Tensor, Trainer};
use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::{partition, PartitionOptions, Plan};
use std::collections::HashMap;
use std::path::PathBuf;

/// The model files: `$FERROTRON_MODELS` (a test executable carried to a GPU machine runs away
/// from its build tree), else the repository's `models/`.
fn model(name: &str, dims: &[(&str, u64)]) -> Graph {
    let dir = std::env::var("FERROTRON_MODELS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models").to_owned());
    let path = PathBuf::from(dir).join(name);
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The backend with `ranks` virtual ranks on GPU 0, or `None` (after saying why) without one.
fn gpu(ranks: usize, dtype: Storage) -> Option<Cuda> {
    // Compiled into `cuda_emulated.rs`, whose first process only starts these tests again on
    // the CPU stand-in: return at once, quietly.
    if env!("CARGO_CRATE_NAME") == "cuda_emulated"
        && std::env::var_os("FERROTRON_CUDA_EMU_CHILD").is_none()
    {
        return None;
    }
    match Cuda::new(0, ranks, dtype) {
        Ok(c) => Some(c),
        Err(CudaError::Unavailable(why)) => {
            // On the GPU check (scripts/gpu-check.sh) a missing device is a failure.
            assert!(
                std::env::var_os("FERROTRON_REQUIRE_GPU").is_none(),
                "FERROTRON_REQUIRE_GPU is set but: {why}"
            );
            // Straight to stderr: the test harness captures `eprintln!`, and a skip must show.
            use std::io::Write;
            let elsewhere = if ferrotron_cuda_emu::lib_dir().is_some() {
                "; cuda_emulated runs it on the CPU stand-in"
            } else {
                ""
            };
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED here: no CUDA device ({why}){elsewhere}"
            );
            None
        }
        Err(e) => panic!("the GPU is there but the backend could not start: {e}"),
    }
}

/// Runs `g` partitioned as (tp, dp, sp) on the GPU and compares it with the CPU reference.
/// Returns false when there is no GPU.
fn check(g: &Graph, tp: u64, dp: u64, sp: bool, dtype: Storage) -> bool {
    let cfg = format!("{} tp={tp} dp={dp} sp={sp} {dtype:?}", g.name);
    let Some(cuda) = gpu((tp * dp) as usize, dtype) else {
        return false;
    };
    let o = PartitionOptions {
        tp,
        dp,
        sequence_parallel: sp,
        ..PartitionOptions::default()
    };
    let plan = partition(g, &o).unwrap_or_else(|e| panic!("{cfg}: {e}"));
    let reference = reference_plan(g).unwrap();
    let params = test_params(g, 7);
    let batch = random_batch(g, 7);
    let opts = RunOptions::default();
    let ours = run(cuda, &plan, &params, &batch, &opts).unwrap_or_else(|e| panic!("{cfg}: {e}"));
    let theirs = run(Cpu::default(), &reference, &params, &batch, &opts).unwrap();
    let tolerances = match dtype {
        Storage::F32 => Tolerances::F32,
        Storage::Bf16 => Tolerances::BF16,
    };
    let v = compare(&ours, &theirs, &params, &batch, &opts, tolerances)
        .unwrap_or_else(|e| panic!("{cfg}: {e}"));
    assert!(
        v.passed(),
        "{cfg}: first divergence {:?}: {:#?}",
        v.first_divergence,
        v.entries.iter().filter(|e| !e.ok()).collect::<Vec<_>>()
    );
    assert!(v.entries.len() > 3, "{cfg}: compared too little");
    eprintln!("{cfg}: max relative error {:.2e}", v.max_rel_error());
    true
}

#[test]
fn tiny_gpt_f32_at_tp_1_2_4_8() {
    let g = model("tiny-gpt.ron", &[("batch", 4)]);
    for tp in [1, 2, 4] {
        if !check(&g, tp, 1, false, Storage::F32) {
            return;
        }
    }
    check(&g, 2, 2, false, Storage::F32);
    check(&g, 2, 1, true, Storage::F32);
    check(&g, 4, 2, true, Storage::F32);
    // Eight ranks need eight heads.
    let eight = model("tiny-gpt.ron", &[("batch", 4), ("heads", 8)]);
    check(&eight, 8, 1, false, Storage::F32);
}

#[test]
fn pipeline_stages_on_virtual_ranks() {
    // The whole batch of 4 in two micro-batches of 2, over two stages of two tp ranks each.
    let whole = model("tiny-gpt.ron", &[("batch", 4), ("layers", 4)]);
    let micro = model("tiny-gpt.ron", &[("batch", 2), ("layers", 4)]);
    for (tp, pp) in [(2, 2), (1, 4)] {
        let cfg = format!("tiny-gpt tp={tp} pp={pp} M=2");
        let Some(cuda) = gpu((tp * pp) as usize, Storage::F32) else {
            return;
        };
        let o = PartitionOptions {
            tp,
            pp,
            micro_batches: 2,
            ..PartitionOptions::default()
        };
        let plan = partition(&micro, &o).unwrap_or_else(|e| panic!("{cfg}: {e}"));
        let reference = reference_plan(&whole).unwrap();
        let params = test_params(&whole, 7);
        let batch = random_batch(&whole, 7);
        let opts = RunOptions::default();
        let ours =
            run(cuda, &plan, &params, &batch, &opts).unwrap_or_else(|e| panic!("{cfg}: {e}"));
        let theirs = run(Cpu::default(), &reference, &params, &batch, &opts).unwrap();
        let v = compare(&ours, &theirs, &params, &batch, &opts, Tolerances::F32)
            .unwrap_or_else(|e| panic!("{cfg}: {e}"));
        assert!(
            v.passed(),
            "{cfg}: {:#?}",
            v.entries.iter().filter(|e| !e.ok()).collect::<Vec<_>>()
        );
        eprintln!("{cfg}: max relative error {:.2e}", v.max_rel_error());
    }
}

#[test]
fn tiny_bert_and_llama_f32() {
    let bert = model("tiny-bert.ron", &[("batch", 4)]);
    for (tp, dp, sp) in [(1, 1, false), (2, 1, false), (4, 1, false), (2, 2, true)] {
        if !check(&bert, tp, dp, sp, Storage::F32) {
            return;
        }
    }
    let llama = model("tiny-llama.ron", &[]);
    for (tp, dp, sp) in [(1, 1, false), (2, 1, false), (2, 2, true)] {
        check(&llama, tp, dp, sp, Storage::F32);
    }
    // Six query heads do not split four ways: eight do, with the two key/value heads
    // replicated (grouped-query attention with fewer key/value heads than ranks).
    let llama8 = model("tiny-llama.ron", &[("heads", 8), ("hidden", 64)]);
    check(&llama8, 4, 1, false, Storage::F32);
}

#[test]
fn tiny_gpt_bf16_mixed_precision() {
    let g = model("tiny-gpt.ron", &[("batch", 4)]);
    for tp in [1, 2, 4] {
        if !check(&g, tp, 1, false, Storage::Bf16) {
            return;
        }
    }
}

#[test]
fn odd_tensor_parallel_degree() {
    let odd = model("tiny-gpt.ron", &[("hidden", 96), ("heads", 3), ("seq", 12)]);
    check(&odd, 3, 1, false, Storage::F32);
}

/// Training on the GPU follows training on the CPU: the same plan (tp = 2, virtual ranks), the
/// same weights and batches, five AdamW steps with clipping; in `f32` the losses and gradient
/// norms agree to `f32` rounding and the updated weights closely; in bf16 the loss curve stays
/// within bf16's tolerance.
#[test]
fn training_on_the_gpu_follows_the_cpu() {
    use ferrotron_exec::init::init_params;
    use ferrotron_exec::TrainConfig;
    let g = model("tiny-gpt.ron", &[("batch", 4)]);
    let plan = partition(
        &g,
        &PartitionOptions {
            tp: 2,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    let config = TrainConfig {
        steps: 5,
        warmup: 2,
        ..TrainConfig::default()
    };
    let params = init_params(&g, 3);
    let batches: Vec<_> = (0..5).map(|i| random_batch(&g, 100 + i)).collect();
    let mut cpu = trainers(Cpu::default(), &plan, &config, &params);
    let cpu_stats: Vec<_> = batches.iter().map(|b| step(&mut cpu, b)).collect();
    for (dtype, tol) in [(Storage::F32, 1e-4), (Storage::Bf16, 3e-2)] {
        let Some(cuda) = gpu(2, dtype) else {
            return;
        };
        let mut gpu_trainer = trainers(cuda, &plan, &config, &params);
        for (b, want) in batches.iter().zip(&cpu_stats) {
            let got = step(&mut gpu_trainer, b);
            let rel = ((got.loss - want.loss) / want.loss).abs() as f64;
            assert!(
                rel <= tol,
                "{dtype:?} step {}: loss {} vs {}",
                want.step,
                got.loss,
                want.loss
            );
            let rel = (got.grad_norm - want.grad_norm).abs() / want.grad_norm;
            assert!(
                rel <= 10.0 * tol,
                "{dtype:?} step {}: |g| {} vs {}",
                want.step,
                got.grad_norm,
                want.grad_norm
            );
        }
        eprintln!("{dtype:?}: five steps follow the CPU trainer");
    }
}

/// The distributed optimizer on the GPU (tp = 2 × dp = 2, `--zero 1`: the gradients
/// reduce-scattered and the updated shares all-gathered by NCCL) follows the CPU trainer with
/// replicated optimizer state.
#[test]
fn the_distributed_optimizer_on_the_gpu_follows_the_cpu() {
    use ferrotron_exec::init::init_params;
    use ferrotron_exec::TrainConfig;
    let g = model("tiny-gpt.ron", &[("batch", 4)]);
    let plan = |zero| {
        partition(
            &g,
            &PartitionOptions {
                tp: 2,
                dp: 2,
                zero,
                ..PartitionOptions::default()
            },
        )
        .unwrap()
    };
    let (replicated, sharded) = (plan(0), plan(1));
    let config = TrainConfig {
        steps: 4,
        warmup: 2,
        ..TrainConfig::default()
    };
    let params = init_params(&g, 3);
    let batches: Vec<_> = (0..4).map(|i| random_batch(&g, 200 + i)).collect();
    let mut cpu = trainers(Cpu::default(), &replicated, &config, &params);
    let cpu_stats: Vec<_> = batches.iter().map(|b| step(&mut cpu, b)).collect();
    let Some(cuda) = gpu(4, Storage::F32) else {
        return;
    };
    let mut gpu_trainer = trainers(cuda, &sharded, &config, &params);
    for (b, want) in batches.iter().zip(&cpu_stats) {
        let got = step(&mut gpu_trainer, b);
        let rel = ((got.loss - want.loss) / want.loss).abs();
        assert!(
            rel <= 1e-4,
            "step {}: loss {} vs {}",
            want.step,
            got.loss,
            want.loss
        );
    }
    let ratio = cpu[0].optimizer_bytes() as f64 / gpu_trainer[0].optimizer_bytes() as f64;
    assert!((ratio - 2.0).abs() < 0.02, "the state shrinks {ratio}×");
}

/// The GPU benchmark's own code (`cuda::bench`, what `benches/gpu_layer.rs` runs at the 8.3B
/// shape) at a small shape: it runs to a report with finite numbers and a per-op profile, so a
/// GPU session does not spend its minutes finding a bug in it.
#[test]
fn the_gpu_layer_benchmark_runs_at_a_small_shape() {
    use ferrotron_cuda::bench::{self, LayerBench};
    let Some(cuda) = gpu(1, Storage::Bf16) else {
        return;
    };
    let load = |overrides: &[(String, u64)]| {
        let dims: Vec<(&str, u64)> = overrides.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        Ok(model("megatron-8.3b.ron", &dims))
    };
    let report = bench::run(&cuda, load, &LayerBench::SMOKE).unwrap();
    for key in [
        "gemm_tflops",
        "model_1_layer_step_ms",
        "model_2_layer_step_ms",
        "layer_tflop",
    ] {
        let v = report[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{key} = {v}: {report}");
    }
    assert_eq!(report["shape"]["hidden"], 64, "{report}");
    let profile = report["profile_2_layers_traced"].as_array().unwrap();
    assert!(
        profile
            .iter()
            .any(|r| r["op"].as_str().is_some_and(|o| o.starts_with("MatMul"))),
        "{report}"
    );
}

/// The GPU places a step's values in one device allocation per rank (the arena, at the memory
/// plan's offsets): training with it is training without it, to the bit (the same losses,
/// gradient norms, peaks and weights), and every step after the first places every planned
/// value, in an arena of the plan's size (planned with the backend's bytes per element: half
/// as large in bf16 storage). At tp 1 and 2, in `f32` and bf16, with the
/// distributed optimizer (its collectives through NCCL's own stream), and over two pipeline
/// stages of two micro-batches (virtual ranks passing their values on the device).
#[test]
fn the_gpu_places_a_steps_values_in_one_arena_per_rank() {
    use ferrotron_exec::init::init_params;
    use ferrotron_exec::{memory, Executable, TrainConfig};
    let g = model("tiny-gpt.ron", &[("batch", 4)]);
    // A pipelined plan's graph is one micro-batch's.
    let micro = model("tiny-gpt.ron", &[("batch", 2)]);
    let config = TrainConfig {
        steps: 3,
        warmup: 0,
        ..TrainConfig::default()
    };
    let params = init_params(&g, 3);
    let batch = random_batch(&g, 11);
    for (tp, dp, pp, zero, dtype) in [
        (1, 1, 1, 0, Storage::F32),
        (2, 1, 1, 0, Storage::F32),
        (2, 1, 1, 0, Storage::Bf16),
        (2, 2, 1, 1, Storage::F32),
        (1, 1, 2, 0, Storage::F32),
    ] {
        let what = format!("tp {tp} dp {dp} pp {pp} zero {zero} {dtype:?}");
        let o = PartitionOptions {
            tp,
            dp,
            pp,
            micro_batches: pp,
            zero,
            ..PartitionOptions::default()
        };
        let plan = partition(if pp > 1 { &micro } else { &g }, &o).unwrap();
        let mut runs = Vec::new();
        for arena in [true, false] {
            let Some(cuda) = gpu((tp * dp * pp) as usize, dtype) else {
                return;
            };
            let opts = RunOptions {
                arena,
                ..RunOptions::default()
            };
            let mut ranks: Vec<Trainer<Cuda>> =
                launch::ranks(&cuda, plan.mesh, std::time::Duration::from_secs(60))
                    .into_iter()
                    .map(|rank| {
                        Trainer::new(rank, &plan, config.clone(), &params, opts.clone()).unwrap()
                    })
                    .collect();
            let stats: Vec<StepStats> = (0..3).map(|_| step(&mut ranks, &batch)).collect();
            let weights: Vec<Vec<Vec<f32>>> = ranks
                .iter()
                .map(|t| {
                    t.weights
                        .iter()
                        .map(|w| cuda.download(w).unwrap().data.into_vec())
                        .collect()
                })
                .collect();
            runs.push((stats, weights));
        }
        let ((with, weights_with), (without, weights_without)) = (&runs[0], &runs[1]);
        for (s, t) in with.iter().zip(without) {
            assert_eq!(
                (s.loss.to_bits(), s.grad_norm.to_bits(), s.peak_bytes),
                (t.loss.to_bits(), t.grad_norm.to_bits(), t.peak_bytes),
                "{what}: step {} differs with the arena",
                s.step
            );
            assert_eq!(t.arena, None, "{what}: no arena asked for");
        }
        assert!(
            weights_with == weights_without,
            "{what}: the weights differ after training with the arena"
        );
        let exe = Executable::new(
            &plan,
            &RunOptions {
                keep_outputs: false,
                ..RunOptions::default()
            },
        )
        .unwrap();
        // Planned with the bytes the backend stores each dtype in (bf16: 2).
        let cuda = gpu(1, dtype).unwrap();
        let planned = memory::plan(&exe, 0, &|d| cuda.element_bytes(d)).arena;
        for s in &with[1..] {
            let arena = s.arena.unwrap_or_else(|| panic!("{what}: no arena"));
            assert_eq!(arena.bytes, planned, "{what}: the arena is the plan's");
            assert!(arena.placed > 0, "{what}: nothing placed");
            assert_eq!(arena.missed, 0, "{what}: step {} missed places", s.step);
        }
        eprintln!("{what}: {:?}", with[2].arena);
    }
}

/// Every rank's trainer on `backend`, the ranks threads of this process.
fn trainers<'p, B: Backend>(
    backend: B,
    plan: &'p Plan,
    config: &ferrotron_exec::TrainConfig,
    params: &HashMap<String, Tensor>,
) -> Vec<Trainer<'p, B>> {
    launch::ranks(&backend, plan.mesh, std::time::Duration::from_secs(60))
        .into_iter()
        .map(|rank| {
            Trainer::new(rank, plan, config.clone(), params, RunOptions::default()).unwrap()
        })
        .collect()
}

/// One step on every rank at once: rank 0's report.
fn step<B: Backend>(trainers: &mut [Trainer<B>], batch: &HashMap<String, Tensor>) -> StepStats {
    launch::each(trainers, |t| t.step(batch)).unwrap()[0]
}

/// A rank that never arrives at a collective: the one waiting for it on the GPU stops after the
/// timeout, naming the plan node, the group, the collective and the missing rank, as on the CPU.
#[test]
fn a_collective_a_rank_never_joins_names_the_missing_rank() {
    let Some(cuda) = gpu(2, Storage::F32) else {
        return;
    };
    let g = model("tiny-gpt.ron", &[]);
    let plan = partition(
        &g,
        &PartitionOptions {
            tp: 2,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    let timeout = std::time::Duration::from_millis(500);
    let opts = RunOptions {
        timeout,
        ..RunOptions::default()
    };
    let exe = ferrotron_exec::Executable::new(&plan, &opts).unwrap();
    let mut ranks = launch::ranks(&cuda, plan.mesh, timeout);
    // Rank 1 is kept (its groups stay open) but never runs.
    let _stuck = ranks.pop().unwrap();
    let waiting = ranks.pop().unwrap();
    let weights = ferrotron_exec::weights_for(&waiting, &plan, &test_params(&g, 0)).unwrap();
    let started = std::time::Instant::now();
    let err = waiting
        .run(&exe, &weights, &random_batch(&g, 0))
        .unwrap_err();
    let took = started.elapsed();
    assert!(took >= timeout && took < 20 * timeout, "took {took:?}");
    let text = err.to_string();
    match &err {
        ferrotron_exec::ExecError::Comm {
            node,
            group: Some(group),
            error: ferrotron_exec::CommError::Timeout { missing, .. },
            ..
        } => {
            assert!(plan.graph.nodes.values().any(|n| &n.name == node), "{text}");
            assert_eq!(group.ranks, [0, 1]);
            assert_eq!(missing, &[1]);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        text.contains("tp group of ranks 0, 1") && text.contains("rank 1 had not arrived"),
        "{text}"
    );
}

/// A rendezvous store in memory, standing in for the launcher's.
#[derive(Default)]
struct MemoryStore(std::sync::Mutex<HashMap<String, Vec<u8>>>);

impl ferrotron_exec::Rendezvous for MemoryStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.lock().unwrap().get(key).cloned())
    }
}

/// Two NCCL members on GPUs 0 and 1, each with its own watchdog: a collective both join is never
/// reported; one that member 1 joins only long after the timeout is reported by member 0's
/// watchdog, naming the op, the node noted before it, its sequence number and member 1 as
/// missing; and it still completes once member 1 arrives.
#[test]
fn the_nccl_watchdog_names_a_collective_a_member_did_not_join() {
    use ferrotron_exec::{Comm, ReduceOp};
    use std::sync::{mpsc, Arc};
    use std::time::{Duration, Instant};
    let Some(first) = gpu(1, Storage::F32) else {
        return;
    };
    let Ok(second) = Cuda::new(1, 1, Storage::F32) else {
        // One GPU cannot hold two members of an NCCL group.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED here: an NCCL group needs two GPUs"
        );
        return;
    };
    let timeout = Duration::from_millis(400);
    let store: Arc<MemoryStore> = Arc::default();
    let id = Cuda::new_nccl_id().unwrap();
    let (hangs, reported) = mpsc::channel();
    let member = |cuda: Cuda, index: usize, late: Duration| {
        let (store, id, hangs) = (store.clone(), id, hangs.clone());
        std::thread::spawn(move || {
            let dog = cuda.watchdog(timeout, store, move |h| {
                let _ = hangs.send(h);
            });
            let comm = cuda
                .nccl_group(&id, index, 2, Some((&dog, "tp/dp0")))
                .unwrap();
            let mut sums = Vec::new();
            for (step, wait) in [Duration::ZERO, late].into_iter().enumerate() {
                std::thread::sleep(wait);
                comm.note(&format!("node{step}"));
                let host = Tensor {
                    shape: vec![3],
                    data: vec![1.0 + index as f32; 3].into(),
                };
                let mut t = cuda.upload(&host, ferrotron_ir::DType::F32).unwrap();
                comm.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                sums.push(cuda.download(&t).unwrap().data);
                if step == 0 {
                    // Long enough for the first collective's completion to be seen.
                    std::thread::sleep(3 * timeout);
                }
            }
            drop(dog);
            sums
        })
    };
    let started = Instant::now();
    let a = member(first, 0, Duration::ZERO);
    let b = member(second, 1, 5 * timeout);
    let hang = reported
        .recv_timeout(20 * timeout)
        .expect("no hang reported");
    let when = started.elapsed();
    for sums in [a.join().unwrap(), b.join().unwrap()] {
        assert_eq!(sums, [vec![3.0; 3], vec![3.0; 3]]);
    }
    assert_eq!(hang.group, "tp/dp0");
    assert_eq!((hang.member, hang.op, hang.seq), (0, "all_reduce", 2));
    assert_eq!(hang.node, "node1");
    assert_eq!(hang.missing, [1]);
    assert!(hang.waited >= timeout, "{:?}", hang.waited);
    // Reported after the second collective began (past the first's wait), before member 1 came.
    assert!(when < 3 * timeout + 5 * timeout, "{when:?}");
    // Nothing else: the first collective completed, and member 1 was never left waiting.
    assert!(reported.try_recv().is_err());
}

/// A token id past the vocabulary, on the GPU at tp 1 and 2: the run fails with the CPU's
/// error naming the bad id, though the check (the embedding's, the loss's targets') was only
/// read back with the step's results.
#[test]
fn a_bad_token_id_fails_the_run_as_on_the_cpu() {
    let g = model("tiny-gpt.ron", &[]);
    let params = test_params(&g, 3);
    let mut batch = random_batch(&g, 3);
    let tokens = batch.get_mut("tokens").unwrap();
    let vocab = g
        .params
        .values()
        .find(|p| p.name == "wte")
        .map(|p| g.ty(p.value).shape.extents()[0])
        .unwrap();
    tokens.data[3] = vocab as f32 + 5.0;
    for tp in [1, 2] {
        let Some(cuda) = gpu(tp, Storage::F32) else {
            return;
        };
        let o = PartitionOptions {
            tp: tp as u64,
            ..PartitionOptions::default()
        };
        let plan = partition(&g, &o).unwrap();
        let opts = RunOptions::default();
        let err = run(cuda, &plan, &params, &batch, &opts).unwrap_err();
        let want = run(Cpu::default(), &plan, &params, &batch, &opts).unwrap_err();
        let index = |e: &ferrotron_exec::ExecError| match e {
            ferrotron_exec::ExecError::Kernel {
                error: ferrotron_exec::KernelError::Index { what, value, .. },
                ..
            } => Some((*what, *value)),
            _ => None,
        };
        assert!(index(&err).is_some(), "tp {tp}: {err}");
        assert_eq!(index(&err), index(&want), "tp {tp}: {err} vs {want}");
    }
}
