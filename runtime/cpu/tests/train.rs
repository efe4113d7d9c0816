//! Training: twenty AdamW steps at tp = 2 (and tp = 2 × dp = 2) follow tp = 1's loss curve,
//! every rank (a thread each, running the one rank program) reporting the same step and the
//! data-parallel replicas staying identical; so do two pipeline stages (with tp and dp, over
//! micro-batches), whose tied embedding copies stay identical; a trainer resumed from a copy of its state
//! continues bit-identically; the schedule and clipping behave as documented.

use ferrotron_cpu::Cpu;
use ferrotron_exec::init::init_params;
use ferrotron_exec::{launch, Batches, RunOptions, StepStats, Tensor, TrainConfig, Trainer};
use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::{partition, PartitionOptions, Plan};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

fn tiny_gpt() -> Graph {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/tiny-gpt.ron"
    ));
    let opts = LoadOptions {
        overrides: vec![("batch".into(), 4), ("seq".into(), 16)],
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap()
}

fn plan(g: &Graph, tp: u64, dp: u64) -> Plan {
    partition(
        g,
        &PartitionOptions {
            tp,
            dp,
            ..PartitionOptions::default()
        },
    )
    .unwrap()
}

/// A token stream with structure to learn: a repeating pattern with some noise.
fn corpus() -> Vec<u32> {
    (0..4000u32).map(|i| (i * 7 + (i / 13) % 5) % 97).collect()
}

fn config() -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        min_lr: 3e-4,
        warmup: 4,
        steps: 20,
        ..TrainConfig::default()
    }
}

/// Every rank's trainer, the ranks threads of this process.
fn trainers<'p>(plan: &'p Plan, params: &HashMap<String, Tensor>) -> Vec<Trainer<'p, Cpu>> {
    launch::ranks(&Cpu::default(), plan.mesh, Duration::from_secs(60))
        .into_iter()
        .map(|rank| Trainer::new(rank, plan, config(), params, RunOptions::default()).unwrap())
        .collect()
}

/// One step on every rank at once; every rank reports the same.
fn step(trainers: &mut [Trainer<Cpu>], batch: &HashMap<String, Tensor>) -> StepStats {
    let stats = launch::each(trainers, |t| t.step(batch)).unwrap();
    for s in &stats[1..] {
        assert_eq!(
            (s.step, s.loss.to_bits(), s.grad_norm.to_bits(), s.lr),
            (
                stats[0].step,
                stats[0].loss.to_bits(),
                stats[0].grad_norm.to_bits(),
                stats[0].lr
            )
        );
    }
    stats[0]
}

fn curve(g: &Graph, tp: u64, dp: u64) -> Vec<(f32, f64)> {
    let plan = plan(g, tp, dp);
    let mut ranks = trainers(&plan, &init_params(g, 5));
    let mut data = Batches::new(corpus(), 0);
    let curve = (0..20)
        .map(|_| {
            let s = step(&mut ranks, &data.next("tokens", 4, 16));
            (s.loss, s.grad_norm)
        })
        .collect();
    // Data-parallel replicas hold the same shards, to the bit.
    let tp = tp as usize;
    for (i, t) in ranks.iter().enumerate().skip(tp) {
        assert!(t.weights == ranks[i % tp].weights && t.m == ranks[i % tp].m);
    }
    curve
}

/// The loss curve of `g` (its whole batch 4) cut into `pp` stages of `micro_batches`.
fn pipelined_curve(tp: u64, pp: u64, dp: u64, micro_batches: u64) -> Vec<(f32, f64)> {
    let whole = tiny_gpt();
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/tiny-gpt.ron"
    ));
    let opts = LoadOptions {
        overrides: vec![("batch".into(), 4 / micro_batches), ("seq".into(), 16)],
        ..LoadOptions::default()
    };
    let g = load_model(&path, &opts).unwrap();
    let plan = partition(
        &g,
        &PartitionOptions {
            tp,
            dp,
            pp,
            micro_batches,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    let mut ranks = trainers(&plan, &init_params(&whole, 5));
    let mut data = Batches::new(corpus(), 0);
    let curve = (0..20)
        .map(|_| {
            let s = step(&mut ranks, &data.next("tokens", 4, 16));
            (s.loss, s.grad_norm)
        })
        .collect();
    let per_stage = (tp * dp) as usize;
    for (i, t) in ranks.iter().enumerate() {
        // Data-parallel replicas hold the same shards, to the bit.
        let first = i - i % per_stage + i % tp as usize;
        assert!(t.weights == ranks[first].weights && t.m == ranks[first].m);
    }
    // The embedding's copies on the first and last stage, to the bit.
    let pipe = plan.pipeline.as_ref().unwrap();
    for tied in &pipe.tied {
        let at = |s: u32| {
            let held = plan.params_on(s as usize);
            let k = held.iter().position(|&p| p == tied.param).unwrap();
            &ranks[s as usize * per_stage].weights[k]
        };
        for &h in &tied.holders {
            assert!(at(h) == at(tied.owner), "tied copies differ");
        }
    }
    curve
}

#[test]
fn pipelined_training_follows_the_one_rank_curve() {
    let one = curve(&tiny_gpt(), 1, 1);
    for (tp, pp, dp, m) in [(1, 2, 1, 2), (2, 2, 1, 4), (1, 2, 2, 2)] {
        let other = pipelined_curve(tp, pp, dp, m);
        for (step, (a, b)) in one.iter().zip(&other).enumerate() {
            let cfg = format!("tp={tp} pp={pp} dp={dp} M={m} step {step}");
            assert!(
                ((a.0 - b.0) / a.0).abs() < 1e-3,
                "{cfg}: loss {} vs {}",
                b.0,
                a.0
            );
            assert!(
                ((a.1 - b.1) / a.1).abs() < 1e-2,
                "{cfg}: norm {} vs {}",
                b.1,
                a.1
            );
        }
    }
}

#[test]
fn tensor_parallel_training_follows_the_one_rank_curve() {
    let g = tiny_gpt();
    let one = curve(&g, 1, 1);
    assert!(
        one.last().unwrap().0 < one[0].0 * 0.8,
        "the loss falls: {one:?}"
    );
    for (tp, dp) in [(2, 1), (2, 2)] {
        let other = curve(&g, tp, dp);
        for (step, (a, b)) in one.iter().zip(&other).enumerate() {
            let rel = ((a.0 - b.0) / a.0).abs();
            assert!(
                rel < 1e-3,
                "tp={tp} dp={dp} step {step}: loss {} vs {}",
                b.0,
                a.0
            );
            let rel = ((a.1 - b.1) / a.1).abs();
            assert!(
                rel < 1e-2,
                "tp={tp} dp={dp} step {step}: grad norm {} vs {}",
                b.1,
                a.1
            );
        }
    }
}

#[test]
fn resuming_from_a_copy_of_the_state_is_bit_identical() {
    let g = tiny_gpt();
    let plan = plan(&g, 2, 1);
    let mut a = trainers(&plan, &init_params(&g, 9));
    let mut data = Batches::new(corpus(), 0);
    for _ in 0..5 {
        step(&mut a, &data.next("tokens", 4, 16));
    }
    // Copy everything a checkpoint holds.
    let mut b = trainers(&plan, &init_params(&g, 1));
    for (a, b) in a.iter().zip(&mut b) {
        b.weights = a.weights.clone();
        b.m = a.m.clone();
        b.v = a.v.clone();
        b.step = a.step;
    }
    let mut data_b = Batches::new(corpus(), data.position);
    for _ in 0..5 {
        let sa = step(&mut a, &data.next("tokens", 4, 16));
        let sb = step(&mut b, &data_b.next("tokens", 4, 16));
        assert_eq!(sa.loss.to_bits(), sb.loss.to_bits());
    }
    for (a, b) in a.iter().zip(&b) {
        assert!(a.weights == b.weights && a.m == b.m && a.v == b.v);
    }
}

#[test]
fn schedule_warms_up_then_decays_to_the_minimum() {
    let c = config();
    assert!((c.lr_at(0) - c.lr / 4.0).abs() < 1e-12);
    assert!((c.lr_at(3) - c.lr).abs() < 1e-12);
    assert!((c.lr_at(4) - c.lr).abs() < 1e-12);
    assert!((c.lr_at(20) - c.min_lr).abs() < 1e-12);
    assert!(c.lr_at(12) < c.lr && c.lr_at(12) > c.min_lr);
}

/// Twenty steps with every rank's trainer of `opts`: the loss per step, and the trainers.
fn train_with(g: &Graph, opts: &PartitionOptions) -> (Plan, Vec<f32>) {
    let plan = partition(g, opts).unwrap();
    let mut ranks = trainers(&plan, &init_params(g, 5));
    let mut data = Batches::new(corpus(), 0);
    let losses = (0..20)
        .map(|_| step(&mut ranks, &data.next("tokens", 4, 16)).loss)
        .collect();
    (plan, losses)
}

#[test]
fn the_distributed_optimizer_follows_the_replicated_one_with_1_over_dp_of_its_state() {
    let g = tiny_gpt();
    for (tp, dp) in [(2, 2), (1, 4), (4, 2)] {
        let opts = |zero| PartitionOptions {
            tp,
            dp,
            zero,
            ..PartitionOptions::default()
        };
        let (_, replicated) = train_with(&g, &opts(0));
        let (_, sharded) = train_with(&g, &opts(1));
        for (step, (a, b)) in replicated.iter().zip(&sharded).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "tp={tp} dp={dp} step {step}: loss {b} with --zero 1, {a} without"
            );
        }
        // The state each rank holds: the moments of its share only.
        let replicated_plan = plan(&g, tp, dp);
        let full = trainers(&replicated_plan, &init_params(&g, 5));
        let zero = partition(&g, &opts(1)).unwrap();
        let shared = trainers(&zero, &init_params(&g, 5));
        for (a, b) in full.iter().zip(&shared) {
            let expected: usize = zero
                .params_on(0)
                .into_iter()
                .map(|p| 2 * 4 * zero.optimizer_share(p, b.rank.coord.dp).1)
                .sum();
            assert_eq!(b.optimizer_bytes(), expected);
            let ratio = a.optimizer_bytes() as f64 / b.optimizer_bytes() as f64;
            assert!(
                (ratio - dp as f64).abs() < 0.01 * dp as f64,
                "tp={tp} dp={dp}: the state shrinks {ratio}×"
            );
        }
    }
}

#[test]
fn the_distributed_optimizer_checkpoints_whole_tensors() {
    let g = tiny_gpt();
    let run = |zero: u8| {
        let plan = partition(
            &g,
            &PartitionOptions {
                tp: 2,
                dp: 2,
                zero,
                ..PartitionOptions::default()
            },
        )
        .unwrap();
        let mut ranks = trainers(&plan, &init_params(&g, 5));
        let mut data = Batches::new(corpus(), 0);
        for _ in 0..3 {
            step(&mut ranks, &data.next("tokens", 4, 16));
        }
        let states = launch::each(&mut ranks, |t| t.gather_state()).unwrap();
        states.into_iter().flatten().next().unwrap()
    };
    let (replicated, sharded) = (run(0), run(1));
    for (which, (a, b)) in ["weights", "m", "v"]
        .iter()
        .zip(replicated.iter().zip(&sharded))
    {
        assert_eq!(a.len(), b.len(), "{which}");
        for (name, x) in a {
            let y = &b[name];
            assert_eq!(x.shape, y.shape, "{which} {name}");
            let diff = x
                .data
                .iter()
                .zip(&y.data)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-6, "{which} {name}: differs by {diff}");
        }
    }
}

#[test]
fn the_distributed_optimizer_runs_under_a_pipeline() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/tiny-gpt.ron"
    ));
    let opts = LoadOptions {
        overrides: vec![("batch".into(), 2), ("seq".into(), 16)],
        ..LoadOptions::default()
    };
    let micro = load_model(&path, &opts).unwrap();
    let whole = tiny_gpt();
    let curve = |zero: u8| {
        let plan = partition(
            &micro,
            &PartitionOptions {
                tp: 2,
                dp: 2,
                pp: 2,
                micro_batches: 2,
                zero,
                ..PartitionOptions::default()
            },
        )
        .unwrap();
        let mut ranks = trainers(&plan, &init_params(&whole, 5));
        let mut data = Batches::new(corpus(), 0);
        (0..10)
            .map(|_| step(&mut ranks, &data.next("tokens", 4, 16)).loss)
            .collect::<Vec<_>>()
    };
    let (replicated, sharded) = (curve(0), curve(1));
    for (step, (a, b)) in replicated.iter().zip(&sharded).enumerate() {
        assert!((a - b).abs() < 1e-5, "step {step}: {b} vs {a}");
    }
}
