//! The rank's arena (`ferrotron_exec::arena`) in training: every value the memory plan places
//! is placed in the steady state (no step after the first allocates a planned value on the
//! heap), and training with the arena is training without it, to the bit: the same losses,
//! gradient norms and weights, on every mesh, with the loss and attention fused or not.

mod common;

use common::{model, pipelined};
use ferrotron_cpu::Cpu;
use ferrotron_exec::arena::ArenaStats;
use ferrotron_exec::init::{random_batch, test_params};
use ferrotron_exec::memory;
use ferrotron_exec::{
    launch, run, Executable, RunOptions, StepStats, Tensor, TrainConfig, Trainer,
};
use ferrotron_ir::Graph;
use ferrotron_partitioner::{partition, PartitionOptions, Plan, Recompute};
use std::collections::HashMap;
use std::time::Duration;

/// `steps` training steps of `plan` on every rank (threads of this process), the same batch
/// each step; rank 0's stats per step and every rank's weights at the end.
fn train(
    g: &Graph,
    plan: &Plan,
    opts: &RunOptions,
    steps: usize,
) -> (Vec<StepStats>, Vec<Vec<Tensor>>) {
    let params = test_params(g, 5);
    let batch = random_batch(g, 5);
    let config = TrainConfig {
        lr: 1e-3,
        warmup: 0,
        steps: steps as u64,
        ..TrainConfig::default()
    };
    let mut trainers: Vec<Trainer<Cpu>> =
        launch::ranks(&Cpu::default(), plan.mesh, Duration::from_secs(60))
            .into_iter()
            .map(|rank| Trainer::new(rank, plan, config.clone(), &params, opts.clone()).unwrap())
            .collect();
    let mut stats = Vec::new();
    for _ in 0..steps {
        let all = launch::each(&mut trainers, |t| t.step(&batch)).unwrap();
        stats.push(all[0]);
    }
    let weights = trainers.iter().map(|t| t.weights.clone()).collect();
    (stats, weights)
}

fn options(tp: u64, dp: u64) -> PartitionOptions {
    PartitionOptions {
        tp,
        dp,
        ..PartitionOptions::default()
    }
}

/// Trains `plan` three steps with the arena and without: identical to the bit, and the arena's
/// steady-state steps place every planned value.
fn same_with_and_without(what: &str, g: &Graph, plan: &Plan, opts: &RunOptions) -> ArenaStats {
    let with = RunOptions {
        arena: true,
        ..opts.clone()
    };
    let without = RunOptions {
        arena: false,
        ..opts.clone()
    };
    let ((a, wa), (b, wb)) = (train(g, plan, &with, 3), train(g, plan, &without, 3));
    for (s, t) in a.iter().zip(&b) {
        assert_eq!(
            (s.loss.to_bits(), s.grad_norm.to_bits(), s.peak_bytes),
            (t.loss.to_bits(), t.grad_norm.to_bits(), t.peak_bytes),
            "{what}: step {} differs with the arena",
            s.step
        );
        assert_eq!(t.arena, None, "{what}: no arena asked for");
    }
    assert!(
        wa == wb,
        "{what}: the weights differ after training with the arena"
    );
    // A trainer frees the outputs at their last reader.
    let exe = Executable::new(
        plan,
        &RunOptions {
            keep_outputs: false,
            ..with
        },
    )
    .unwrap();
    let planned = memory::plan(&exe, 0, &|_| 4);
    for s in &a[1..] {
        let arena = s.arena.unwrap_or_else(|| panic!("{what}: no arena"));
        assert_eq!(
            arena.bytes, planned.arena,
            "{what}: the arena is the plan's"
        );
        assert!(arena.placed > 0, "{what}: nothing placed");
        assert_eq!(arena.missed, 0, "{what}: step {} missed places", s.step);
    }
    a[2].arena.unwrap()
}

#[test]
fn training_with_the_arena_is_training_without_it_and_places_every_value() {
    let g = model("tiny-gpt.ron", &[]);
    // Three heads of 16 for tp 3, eight for tp 8.
    let three_heads = model("tiny-gpt.ron", &[("heads", 3), ("hidden", 48)]);
    let eight_heads = model("tiny-gpt.ron", &[("heads", 8)]);
    for (tp, dp) in [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (2, 2), (1, 2)] {
        let g = match tp {
            3 => &three_heads,
            8 => &eight_heads,
            _ => &g,
        };
        let plan = partition(g, &options(tp, dp)).unwrap();
        same_with_and_without(
            &format!("tiny-gpt tp {tp} dp {dp}"),
            g,
            &plan,
            &RunOptions::default(),
        );
    }
    // The distributed optimizer: the gradients reduce-scattered over dp.
    let zero = PartitionOptions {
        zero: 1,
        ..options(2, 2)
    };
    let plan = partition(&g, &zero).unwrap();
    same_with_and_without(
        "tiny-gpt tp 2 dp 2, zero 1",
        &g,
        &plan,
        &RunOptions::default(),
    );
}

#[test]
fn the_arena_holds_the_values_of_every_fusion_mode_and_model() {
    let g = model("tiny-gpt.ron", &[]);
    let plan = partition(&g, &options(2, 1)).unwrap();
    let modes = [
        ("unfused", false, false, false),
        ("attention only", true, true, false),
        ("loss only", true, false, true),
    ];
    for (name, fuse, fuse_attention, fuse_loss) in modes {
        let opts = RunOptions {
            fuse,
            fuse_attention,
            fuse_loss,
            ..RunOptions::default()
        };
        same_with_and_without(&format!("tiny-gpt tp 2, {name}"), &g, &plan, &opts);
    }
    let recompute = PartitionOptions {
        recompute: Recompute::Full,
        sequence_parallel: true,
        ..options(2, 1)
    };
    let plan = partition(&g, &recompute).unwrap();
    same_with_and_without(
        "tiny-gpt tp 2, sequence parallel, full recompute",
        &g,
        &plan,
        &RunOptions::default(),
    );
    let llama = model("tiny-llama.ron", &[]);
    let plan = partition(&llama, &options(2, 1)).unwrap();
    same_with_and_without("tiny-llama tp 2", &llama, &plan, &RunOptions::default());
}

#[test]
fn values_the_caller_still_holds_are_never_overwritten() {
    // The first run's results (the gradients, kept to the end) hold their places while the
    // second runs on the same ranks: the arena must refuse those places, not hand them out
    // twice, and both runs must be what a run without the arena gives.
    let g = model("tiny-gpt.ron", &[]);
    let plan = partition(&g, &options(2, 1)).unwrap();
    let (params, batch) = (test_params(&g, 3), random_batch(&g, 3));
    let opts = RunOptions::default();
    let exe = Executable::new(&plan, &opts).unwrap();
    let weights: Vec<Vec<Tensor>> = ferrotron_exec::shard_params(&plan, &params).unwrap();
    let mut ranks = launch::ranks(&Cpu::default(), plan.mesh, opts.timeout);
    let first = launch::each(&mut ranks, |r| r.run(&exe, &weights[r.index()], &batch)).unwrap();
    let second = launch::each(&mut ranks, |r| r.run(&exe, &weights[r.index()], &batch)).unwrap();
    let reference = run(
        Cpu::default(),
        &plan,
        &params,
        &batch,
        &RunOptions {
            arena: false,
            ..opts.clone()
        },
    )
    .unwrap();
    for (r, (a, b)) in first.iter().zip(&second).enumerate() {
        let held = b.arena.unwrap();
        assert!(
            held.missed > 0,
            "rank {r}: the held values' places were handed out"
        );
        let want = &reference.ranks[r].values;
        let as_map = |x: &HashMap<_, Tensor>| x.clone();
        assert!(as_map(&a.values) == *want, "rank {r}: first run");
        assert!(as_map(&b.values) == *want, "rank {r}: second run");
    }
}

#[test]
fn pipeline_stages_place_every_micro_batch_in_their_arena() {
    // Micro-batches of 2 of a batch of 2 × M: the plan's graph is a micro-batch's.
    let gpt =
        |batch: u64, layers: u64| model("tiny-gpt.ron", &[("batch", batch), ("layers", layers)]);
    for (tp, dp, micro_batches, virtual_stages) in
        [(1, 1, 4, 1), (2, 1, 2, 1), (1, 2, 2, 1), (1, 1, 4, 2)]
    {
        let layers = 2 * virtual_stages;
        let o = pipelined((tp, dp, 2), micro_batches, virtual_stages);
        let plan = partition(&gpt(2, layers), &o).unwrap();
        let stats = same_with_and_without(
            &format!("tp {tp} dp {dp} pp 2, {micro_batches} micro-batches × {virtual_stages}"),
            &gpt(2 * micro_batches, layers),
            &plan,
            &RunOptions::default(),
        );
        assert!(stats.placed > 0);
    }
}
