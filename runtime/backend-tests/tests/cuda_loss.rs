//! The fused output layer and loss on the CUDA backend (`ferrotron_exec::fuse::Fused::OutputLoss`,
//! the executor's loop of chunks over the device's windowed cross-entropy kernels, its matmuls
//! and `matmul_acc`): a model's step with the loss fused gives the unfused step's loss and
//! gradients within the tolerances of its storage type, at tp 1, 2 and 4 and in bf16, over
//! chunks that cross sequence boundaries, a shorter last chunk and a padded vocabulary.
//! On a GPU, or on the CPU stand-in through `cuda_emulated.rs`.

use ferrotron_backend_tests::zoo_model;
use ferrotron_cuda::{Cuda, RankDevice, Storage};
use ferrotron_exec::init::{random_batch, test_params};
use ferrotron_exec::verify::{compare_runs, Outputs, Tolerances};
use ferrotron_exec::{run, RunOptions};
use ferrotron_partitioner::{partition, PartitionOptions};

fn device(test: &str) -> Option<RankDevice> {
    ferrotron_backend_tests::device(test, env!("CARGO_CRATE_NAME"))
}

#[test]
fn fused_loss_in_a_model_equals_the_unfused_output_layer() {
    if device("loss_in_a_model").is_none() {
        return;
    }
    // GPT-2 small's graph, shrunk: 15 sequences of 9 are 135 rows, two chunks of 68 and 67
    // rows, the first ending inside a sequence; 97 classes padded for the vocabulary split.
    let dims = [
        ("vocab", 97),
        ("positions", 16),
        ("seq", 9),
        ("batch", 15),
        ("hidden", 24),
        ("heads", 4),
        ("layers", 1),
    ];
    let g = zoo_model("gpt2-small.ron", &dims);
    let params = test_params(&g, 5);
    let batch = random_batch(&g, 5);
    for (tp, dtype) in [
        (1, Storage::F32),
        (2, Storage::F32),
        (4, Storage::F32),
        (2, Storage::Bf16),
    ] {
        let what = format!("tp {tp} {dtype:?}");
        let options = PartitionOptions {
            tp,
            ..PartitionOptions::default()
        };
        let plan = partition(&g, &options).unwrap_or_else(|e| panic!("{what}: {e}"));
        let cuda = Cuda::new(0, tp as usize, dtype).unwrap_or_else(|e| panic!("{what}: {e}"));
        // The logits are not kept, so the output layer runs fused by default.
        let fused = RunOptions {
            dropout_seed: 3,
            keep_outputs: false,
            ..RunOptions::default()
        };
        let exe = ferrotron_exec::Executable::new(&plan, &fused).unwrap();
        assert!(
            exe.program
                .steps
                .iter()
                .any(|s| plan.graph.nodes[s.node].name == "bwd.loss.0"
                    && matches!(
                        &s.op,
                        ferrotron_exec::fuse::StepOp::Fused {
                            op: ferrotron_exec::fuse::Fused::OutputLoss { .. },
                            ..
                        }
                    )),
            "{what}: the loss is not fused"
        );
        let unfused = RunOptions {
            fuse_loss: false,
            ..fused.clone()
        };
        let ours = run(cuda.clone(), &plan, &params, &batch, &fused)
            .unwrap_or_else(|e| panic!("{what}: fused: {e}"));
        let theirs = run(cuda, &plan, &params, &batch, &unfused)
            .unwrap_or_else(|e| panic!("{what}: unfused: {e}"));
        let tol = match dtype {
            Storage::F32 => Tolerances::F32,
            Storage::Bf16 => Tolerances::BF16,
        };
        let v = compare_runs(&ours, &theirs, tol, Outputs::Skipped)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let failed: Vec<_> = v.entries.iter().filter(|e| !e.ok()).collect();
        assert!(failed.is_empty(), "{what}: {failed:#?}");
        assert!(v.entries.len() > 3, "{what}: compared too little");
    }
}
