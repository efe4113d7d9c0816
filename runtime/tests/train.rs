//! Training: twenty AdamW steps at tp = 2 (and tp = 2 × dp = 2) follow tp = 1's loss curve; a
//! trainer resumed from a copy of its state continues bit-identically; the schedule and
//! clipping behave as documented.

use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::{partition, PartitionOptions, Plan};
use ferrotron_runtime::init::init_params;
use ferrotron_runtime::train::{Batches, TrainConfig, Trainer};
use ferrotron_runtime::RunOptions;
use std::path::PathBuf;

fn tiny_gpt() -> Graph {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tiny-gpt.ron"
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

fn curve(g: &Graph, tp: u64, dp: u64) -> Vec<(f32, f64)> {
    let plan = plan(g, tp, dp);
    let mut trainer =
        Trainer::new(&plan, config(), &init_params(g, 5), RunOptions::default()).unwrap();
    let mut data = Batches::new(corpus(), 0);
    (0..20)
        .map(|_| {
            let s = trainer.step(&data.next("tokens", 4, 16)).unwrap();
            (s.loss, s.grad_norm)
        })
        .collect()
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
    let mut a = Trainer::new(&plan, config(), &init_params(&g, 9), RunOptions::default()).unwrap();
    let mut data = Batches::new(corpus(), 0);
    for _ in 0..5 {
        a.step(&data.next("tokens", 4, 16)).unwrap();
    }
    // Copy everything a checkpoint holds.
    let mut b = Trainer::new(&plan, config(), &init_params(&g, 1), RunOptions::default()).unwrap();
    b.shards = a.shards.clone();
    b.m = a.m.clone();
    b.v = a.v.clone();
    b.step = a.step;
    let mut data_b = Batches::new(corpus(), data.position);
    for _ in 0..5 {
        let sa = a.step(&data.next("tokens", 4, 16)).unwrap();
        let sb = b.step(&data_b.next("tokens", 4, 16)).unwrap();
        assert_eq!(sa.loss.to_bits(), sb.loss.to_bits());
    }
    assert!(a.shards == b.shards && a.m == b.m && a.v == b.v);
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
