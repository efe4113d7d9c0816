//! The fused output layer and loss in the executor's program (`fuse.rs`, the executor's loop of
//! chunks in `rank.rs`): which nodes it takes, what it leaves alone, and that a run with it
//! gives the unfused graph's loss and gradients within the `f32` tolerances at every mesh the
//! models run on (tensor parallelism with a padded, vocabulary-parallel output layer, sequence
//! and data parallelism, recomputation, pipeline stages and micro-batches), with chunks that
//! cross sequence boundaries and a last chunk shorter than the rest, while holding less.

mod common;

use common::model;
use ferrotron_exec::fuse::{Fused, Fusions, Program, StepOp};
use ferrotron_exec::kernel::OutputLossDims;
use ferrotron_exec::RunOptions;
use ferrotron_ir::{Graph, Op};
use ferrotron_partitioner::{partition, PartitionOptions, Plan, Recompute};

/// A model file, its dimension overrides and a mesh.
type Case<'a> = (&'a str, &'a [(&'a str, u64)], PartitionOptions);

/// 9 sequences of 24: 216 rows, cut into two chunks of 108 rows (the first ends inside a
/// sequence).
const ROWS_216: &[(&str, u64)] = &[("batch", 9), ("seq", 24)];

/// Each fused loss step of `program`: (its node, the fused op's name, the nodes it absorbed).
fn loss_steps(plan: &Plan, program: &Program) -> Vec<(String, &'static str, Vec<String>)> {
    program
        .steps
        .iter()
        .filter_map(|s| match &s.op {
            StepOp::Fused {
                op: op @ Fused::OutputLoss { .. },
                absorbed,
                ..
            } => Some((
                plan.graph.nodes[s.node].name.clone(),
                op.mnemonic(),
                absorbed
                    .iter()
                    .map(|&n| plan.graph.nodes[n].name.clone())
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn the_output_layer_its_loss_and_their_backward_become_one_step() {
    let g = model("tiny-gpt.ron", &[]);
    let p = partition(
        &g,
        &PartitionOptions {
            tp: 2,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    let program = Program::fused(&p, &|_| false, Fusions::ALL);
    let steps = loss_steps(&p, &program);
    assert_eq!(steps.len(), 1, "{steps:?}");
    let (node, name, absorbed) = &steps[0];
    assert_eq!((node.as_str(), *name), ("bwd.loss.0", "OutputLossGrad"));
    // The logits' product, the loss, and the backward's products with the reshapes to rows.
    assert_eq!(
        absorbed,
        &[
            "logits",
            "loss",
            "bwd.logits.2",
            "bwd.logits.1",
            "bwd.logits.0",
            "bwd.logits.3"
        ]
    );
    let fused = &program
        .steps
        .iter()
        .find(|s| p.graph.nodes[s.node].name == "bwd.loss.0")
        .unwrap();
    let named = |s: &str| p.graph.value_named(s).unwrap();
    assert_eq!(
        fused.outputs(&p),
        [named("loss"), named("bwd.logits.0"), named("bwd.logits.3")]
    );
    // No step holds logits or their gradient.
    for step in &program.steps {
        for &v in step.outputs(&p) {
            let name = program.value_name(&p, v);
            assert!(name != "logits" && name != "bwd.loss.0", "`{name}` is made");
        }
    }

    // Forward only: the loss alone, at the cross-entropy's place.
    let forward = Program::fused(
        &p,
        &|_| false,
        Fusions {
            forward_only: true,
            ..Fusions::ALL
        },
    );
    let steps = loss_steps(&p, &forward);
    assert_eq!(
        steps,
        [("loss".to_string(), "OutputLoss", vec!["logits".to_string()])]
    );
}

#[test]
fn kept_logits_or_a_loss_fusion_turned_off_leave_the_nodes_alone() {
    let g = model("tiny-gpt.ron", &[]);
    let p = partition(&g, &PartitionOptions::default()).unwrap();
    let logits = p.graph.value_named("logits").unwrap();
    let kept = Program::fused(&p, &|v| v == logits, Fusions::ALL);
    assert!(loss_steps(&p, &kept).is_empty());
    let off = Program::fused(
        &p,
        &|_| false,
        Fusions {
            loss: false,
            ..Fusions::ALL
        },
    );
    assert!(loss_steps(&p, &off).is_empty());
    // A run that keeps its outputs (the logits, for the caller) leaves the loss unfused.
    let exe = ferrotron_exec::Executable::new(&p, &RunOptions::default()).unwrap();
    assert!(loss_steps(&p, &exe.program).is_empty());
    let exe = ferrotron_exec::Executable::new(
        &p,
        &RunOptions {
            keep_outputs: false,
            ..RunOptions::default()
        },
    )
    .unwrap();
    assert_eq!(loss_steps(&p, &exe.program).len(), 1);
}

#[test]
fn chunks_cover_the_rows_once_in_order() {
    for hidden in [8, 64, 768, 1600] {
        for rows in [1, 5, 127, 128, 129, 216, 512, 1000, 1024, 4096, 8193] {
            let dims = OutputLossDims {
                rows,
                hidden,
                vocab: 16,
            };
            let chunks: Vec<_> = dims.chunks().collect();
            let what = format!("hidden {hidden}, rows {rows}: {chunks:?}");
            let mut next = 0;
            for &(first, n) in &chunks {
                assert_eq!(first, next, "{what}");
                assert!(n >= 1, "{what}");
                next += n;
            }
            assert_eq!(next, rows, "{what}");
            // The fewest chunks of at most the target's rows, of one size but the last, which
            // is at most one row short of it; each more than half the target (or all rows).
            let target = (hidden / 2).max(OutputLossDims::MIN_CHUNK_ROWS);
            let size = chunks[0].1;
            assert_eq!(chunks.len(), rows.div_ceil(target), "{what}");
            assert!(
                size <= target && 2 * size > target.min(2 * rows - 1),
                "{what}"
            );
            let last = chunks[chunks.len() - 1].1;
            assert!(
                chunks[..chunks.len() - 1].iter().all(|c| c.1 == size),
                "{what}"
            );
            assert!(last <= size && last + chunks.len() > size, "{what}");
        }
    }
}

/// Runs `plan` on `whole`'s weights and batch with the loss fused and unfused (neither keeping
/// the logits); checks the loss and every gradient agree within the `f32` tolerances (relative
/// to the largest magnitude) and returns the two peaks of rank 0.
fn agree(what: &str, whole: &Graph, plan: &Plan, forward_only: bool) -> (usize, usize) {
    let opts = RunOptions {
        dropout_seed: 3,
        forward_only,
        keep_outputs: false,
        ..RunOptions::default()
    };
    let exe = ferrotron_exec::Executable::new(plan, &opts).unwrap();
    let fused_steps = loss_steps(plan, &exe.program);
    let want = if forward_only {
        "OutputLoss"
    } else {
        "OutputLossGrad"
    };
    assert!(
        fused_steps.iter().any(|s| s.1 == want),
        "{what}: no {want} step: {fused_steps:?}"
    );
    let unfused = RunOptions {
        fuse_loss: false,
        ..opts.clone()
    };
    common::agree(what, (whole, plan, 13), &opts, &unfused)
}

#[test]
fn fused_loss_runs_agree_with_the_unfused_graph_on_every_mesh() {
    let eight_heads: &[(&str, u64)] = &[("heads", 8), ("batch", 9), ("seq", 24)];
    let three_heads: &[(&str, u64)] = &[("heads", 3), ("hidden", 48)];
    let mesh = |tp: u64, dp: u64, sp: bool, recompute: Recompute| PartitionOptions {
        tp,
        dp,
        sequence_parallel: sp,
        recompute,
        ..PartitionOptions::default()
    };
    let cases: &[Case] = &[
        ("tiny-gpt.ron", ROWS_216, mesh(1, 1, false, Recompute::None)),
        ("tiny-gpt.ron", ROWS_216, mesh(2, 1, false, Recompute::None)),
        ("tiny-gpt.ron", ROWS_216, mesh(4, 1, true, Recompute::None)),
        // At tp 8 the padded vocabulary leaves ranks with no real class.
        (
            "tiny-gpt.ron",
            eight_heads,
            mesh(8, 1, false, Recompute::None),
        ),
        (
            "tiny-gpt.ron",
            three_heads,
            mesh(3, 1, false, Recompute::None),
        ),
        ("tiny-gpt.ron", &[], mesh(2, 2, true, Recompute::None)),
        ("tiny-gpt.ron", ROWS_216, mesh(2, 1, false, Recompute::Full)),
        // An untied output weight.
        ("tiny-llama.ron", &[], mesh(2, 1, false, Recompute::None)),
        ("tiny-llama.ron", &[], mesh(1, 1, false, Recompute::None)),
    ];
    for (file, dims, opts) in cases {
        let g = model(file, dims);
        let what = format!(
            "{file} {dims:?} tp={} dp={} sp={} recompute={}",
            opts.tp, opts.dp, opts.sequence_parallel, opts.recompute
        );
        let p = partition(&g, opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        agree(&what, &g, &p, false);
        agree(&what, &g, &p, true);
    }
}

#[test]
fn fused_loss_runs_agree_over_pipeline_stages_and_micro_batches() {
    let g = model("tiny-gpt.ron", &[("batch", 4)]);
    let micro = model("tiny-gpt.ron", &[("batch", 2)]);
    for schedule in ["1f1b", "gpipe"] {
        let p = partition(
            &micro,
            &PartitionOptions {
                tp: 2,
                pp: 2,
                micro_batches: 2,
                schedule: schedule.parse().unwrap(),
                ..PartitionOptions::default()
            },
        )
        .unwrap();
        agree(&format!("tp=2 pp=2 M=2 {schedule}"), &g, &p, false);
    }
    // Two model chunks per stage: the output layer in the last stage's second chunk.
    let g = model("tiny-gpt.ron", &[("batch", 4), ("layers", 4)]);
    let micro = model("tiny-gpt.ron", &[("batch", 2), ("layers", 4)]);
    let p = partition(
        &micro,
        &PartitionOptions {
            pp: 2,
            micro_batches: 2,
            schedule: "interleaved".parse().unwrap(),
            virtual_stages: 2,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    agree("pp=2 M=2 interleaved over 2 chunks", &g, &p, false);
}

#[test]
fn the_fused_loss_holds_less_than_the_logits() {
    // A vocabulary of 4096 over 512 rows: the logits and their gradient (8 MiB each) outweigh
    // everything else the step holds at the output layer.
    let g = model(
        "tiny-gpt.ron",
        &[("vocab", 4096), ("batch", 16), ("seq", 32)],
    );
    let p = partition(&g, &PartitionOptions::default()).unwrap();
    let (fused, unfused) = agree("vocab 4096", &g, &p, false);
    assert!(
        fused < unfused,
        "the fused loss's peak {fused} is not below the unfused {unfused}"
    );
    // The unfused graph runs no loss step of its own kind.
    assert!(p
        .graph
        .nodes
        .values()
        .any(|n| matches!(n.op, Op::CrossEntropyGrad { .. })));
}
