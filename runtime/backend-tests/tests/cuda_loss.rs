//! The fused output layer and loss on the CUDA backend (`ferrotron_exec::fuse::Fused::OutputLoss`,
//! the executor's loop of chunks over the device's windowed cross-entropy kernels, its matmuls
//! and `matmul_acc`): a model's step with the loss fused gives the unfused step's loss and
//! gradients within the tolerances of its storage type, at tp 1, 2 and 4 and in bf16, over
//! chunks that cross sequence boundaries, a shorter last chunk and a padded vocabulary.
//! On a GPU, or on the CPU stand-in through `cuda_emulated.rs`.

use ferrotron_backend_tests::{runs_agree_on_the_gpu, zoo_model};
use ferrotron_cuda::RankDevice;
use ferrotron_exec::fuse::{Fused, StepOp};
use ferrotron_exec::verify::Outputs;
use ferrotron_exec::RunOptions;
use ferrotron_partitioner::Plan;

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
    // The logits are not kept, so the output layer runs fused by default.
    let fused = RunOptions {
        dropout_seed: 3,
        keep_outputs: false,
        ..RunOptions::default()
    };
    let unfused = RunOptions {
        fuse_loss: false,
        ..fused.clone()
    };
    let is_fused = |what: &str, plan: &Plan| {
        let exe = ferrotron_exec::Executable::new(plan, &fused).unwrap();
        let fused_loss = exe.program.steps.iter().any(|s| {
            plan.graph.nodes[s.node].name == "bwd.loss.0"
                && matches!(
                    &s.op,
                    StepOp::Fused {
                        op: Fused::OutputLoss { .. },
                        ..
                    }
                )
        });
        assert!(fused_loss, "{what}: the loss is not fused");
    };
    runs_agree_on_the_gpu((&g, 5), (&fused, &unfused), Outputs::Skipped, is_fused);
}
