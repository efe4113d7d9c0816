//! The fused attention in the executor's program (`fuse.rs`): which chains it takes, what it
//! leaves alone, and that a run with it gives the unfused graph's loss and gradients within the
//! `f32` tolerances at every mesh the models run on (tensor, sequence, data and pipeline
//! parallelism, recomputation, micro-batches, dropout under a non-zero seed), while holding less.

mod common;

use common::model;
use ferrotron_exec::fuse::{Fused, Fusions, Program, StepOp};
use ferrotron_exec::RunOptions;
use ferrotron_ir::graph::EntityRef;
use ferrotron_ir::{Graph, Op};
use ferrotron_partitioner::{partition, PartitionOptions, Plan, Recompute};

/// The op pairs and the attention, not the loss.
const ATTENTION: Fusions = Fusions {
    attention: true,
    ..Fusions::PAIRS
};

/// A model file, its dimension overrides and a mesh.
type Case<'a> = (&'a str, &'a [(&'a str, u64)], PartitionOptions);

/// Each attention step of `program`: (its node, the fused op's name).
fn attention_steps(plan: &Plan, program: &Program) -> Vec<(String, &'static str)> {
    program
        .steps
        .iter()
        .filter_map(|s| match &s.op {
            StepOp::Fused {
                op: op @ (Fused::Attention { .. } | Fused::AttentionGrad { .. }),
                ..
            } => Some((plan.graph.nodes[s.node].name.clone(), op.mnemonic())),
            _ => None,
        })
        .collect()
}

#[test]
fn each_attention_becomes_one_forward_and_one_backward_step() {
    let g = model("tiny-gpt.ron", &[]);
    let p = partition(
        &g,
        &PartitionOptions {
            tp: 2,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    let program = Program::fused(&p, &|_| false, ATTENTION);
    let steps = attention_steps(&p, &program);
    assert_eq!(
        steps,
        [
            ("h.0.ctx".to_string(), "Attention"),
            ("h.1.ctx".into(), "Attention"),
            ("bwd.h.1.ctx_t.0".into(), "AttentionGrad"),
            ("bwd.h.0.ctx_t.0".into(), "AttentionGrad"),
        ]
    );
    // Sequence first: the steps read q, k, v as the projections make them and write the
    // output and the gradients back so; the transposes between the layouts are gone.
    for step in &program.steps {
        if let StepOp::Fused {
            op: Fused::Attention { spec, .. } | Fused::AttentionGrad { spec, .. },
            ..
        } = &step.op
        {
            assert!(spec.seq_first, "{}", p.graph.nodes[step.node].name);
        }
    }
    // One saved log-sum-exp per layer, `[batch, local heads, seq]`, after the plan's values.
    assert_eq!(program.saved.len(), 2);
    let dims = |name: &str| g.dims.iter().find(|d| d.0 == name).unwrap().1;
    let (batch, heads, seq) = (dims("batch"), dims("heads"), dims("seq"));
    assert_eq!(program.saved[0].shape, [batch, heads / 2, seq]);
    assert_eq!(program.saved[0].name, "h.0.probs.lse");
    assert_eq!(
        Program::saved_id(&p, 1).index(),
        p.graph.values.len() + 1,
        "saved values follow the plan's"
    );
    // The scores are made nowhere.
    let names: Vec<&str> = program
        .steps
        .iter()
        .map(|s| p.graph.nodes[s.node].name.as_str())
        .collect();
    for gone in [
        "h.0.scores",
        "h.0.probs",
        "h.1.probs_drop",
        "bwd.h.0.probs.0",
        "h.0.q_t",
        "h.1.ctx_t",
        "bwd.h.0.q_t.0",
        "bwd.h.1.ctx.0",
    ] {
        assert!(!names.contains(&gone), "{gone} still runs");
    }
    // Without attention fusion the chain is the pairs' again.
    let pairs = Program::fused(&p, &|_| false, Fusions::PAIRS);
    assert!(attention_steps(&p, &pairs).is_empty());
    assert!(pairs.saved.is_empty());
}

#[test]
fn an_attention_whose_probabilities_are_kept_is_not_fused() {
    let g = model("tiny-gpt.ron", &[]);
    let p = partition(&g, &PartitionOptions::default()).unwrap();
    let probs = p.graph.value_named("h.0.probs").unwrap();
    let program = Program::fused(&p, &|v| v == probs, ATTENTION);
    let steps = attention_steps(&p, &program);
    assert_eq!(
        steps,
        [
            ("h.1.ctx".to_string(), "Attention"),
            ("bwd.h.1.ctx_t.0".into(), "AttentionGrad"),
        ]
    );
}

/// Runs `plan` on `whole`'s weights and batch with the attention fused and with nothing fused;
/// the loss and every gradient agree within the `f32` tolerances ([`common::agree`]); returns
/// the two peaks of rank 0.
fn agree(what: &str, whole: &Graph, plan: &Plan, forward_only: bool) -> (usize, usize) {
    let fused = RunOptions {
        dropout_seed: 5,
        forward_only,
        ..RunOptions::default()
    };
    let unfused = RunOptions {
        fuse: false,
        ..fused.clone()
    };
    common::agree(what, (whole, plan, 11), &fused, &unfused)
}

#[test]
fn fused_attention_runs_agree_with_the_unfused_graph_on_every_mesh() {
    let eight_heads: &[(&str, u64)] = &[("heads", 8)];
    let three_heads: &[(&str, u64)] = &[("heads", 3), ("hidden", 48)];
    let cases: &[Case] = &[
        ("tiny-gpt.ron", &[], PartitionOptions::default()),
        (
            "tiny-gpt.ron",
            &[],
            PartitionOptions {
                tp: 2,
                ..PartitionOptions::default()
            },
        ),
        (
            "tiny-gpt.ron",
            &[],
            PartitionOptions {
                tp: 4,
                sequence_parallel: true,
                ..PartitionOptions::default()
            },
        ),
        (
            "tiny-gpt.ron",
            eight_heads,
            PartitionOptions {
                tp: 8,
                ..PartitionOptions::default()
            },
        ),
        (
            "tiny-gpt.ron",
            three_heads,
            PartitionOptions {
                tp: 3,
                ..PartitionOptions::default()
            },
        ),
        (
            "tiny-gpt.ron",
            &[],
            PartitionOptions {
                tp: 2,
                dp: 2,
                sequence_parallel: true,
                ..PartitionOptions::default()
            },
        ),
        (
            "tiny-gpt.ron",
            &[],
            PartitionOptions {
                tp: 2,
                recompute: Recompute::Selective,
                ..PartitionOptions::default()
            },
        ),
        (
            "tiny-gpt.ron",
            &[],
            PartitionOptions {
                recompute: Recompute::Full,
                ..PartitionOptions::default()
            },
        ),
        // Bidirectional attention, and grouped-query attention with rotary positions.
        (
            "tiny-bert.ron",
            &[],
            PartitionOptions {
                tp: 2,
                ..PartitionOptions::default()
            },
        ),
        (
            "tiny-llama.ron",
            &[],
            PartitionOptions {
                tp: 2,
                ..PartitionOptions::default()
            },
        ),
    ];
    for (file, dims, opts) in cases {
        let g = model(file, dims);
        let what = format!(
            "{file} tp={} dp={} sp={} recompute={}",
            opts.tp, opts.dp, opts.sequence_parallel, opts.recompute
        );
        let p = partition(&g, opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        let program = Program::fused(&p, &|_| false, ATTENTION);
        let steps = attention_steps(&p, &program);
        assert!(
            steps.iter().any(|s| s.1 == "AttentionGrad"),
            "{what}: no attention fused: {steps:?}"
        );
        // Every softmax is inside a fused attention, a recomputed one (selective or full
        // recomputation's copy for the backward) too: no step holds the scores.
        for step in &program.steps {
            let op = &p.graph.nodes[step.node].op;
            let plain = matches!(step.op, StepOp::Node);
            assert!(
                !(plain && matches!(op, Op::Softmax { .. } | Op::SoftmaxGrad { .. })),
                "{what}: `{}` runs unfused",
                p.graph.nodes[step.node].name
            );
        }
        agree(&what, &g, &p, false);
        agree(&what, &g, &p, true);
    }
}

#[test]
fn fused_attention_runs_agree_over_pipeline_stages_and_micro_batches() {
    let g = model("tiny-gpt.ron", &[("batch", 4)]);
    let micro = model("tiny-gpt.ron", &[("batch", 2)]);
    let p = partition(
        &micro,
        &PartitionOptions {
            tp: 2,
            pp: 2,
            micro_batches: 2,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    agree("tp=2 pp=2 M=2", &g, &p, false);
}

#[test]
fn the_fused_attention_holds_less_than_the_scores() {
    // At a sequence of 64 the scores (`[batch, heads, 64, 64]` per layer, kept for the
    // backward) outweigh everything the fused attention keeps instead.
    let g = model("tiny-gpt.ron", &[("seq", 64), ("positions", 64)]);
    let p = partition(&g, &PartitionOptions::default()).unwrap();
    let (fused, unfused) = agree("seq 64", &g, &p, false);
    assert!(
        fused < unfused,
        "the fused attention's peak {fused} is not below the unfused {unfused}"
    );
}
