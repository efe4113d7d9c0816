//! What the runtime says when something goes wrong, and what it records: a rank that fails
//! stops every rank promptly with that rank's error (never a hang); `check_finite` names the
//! first op that produces a NaN or an infinity; a trace has every rank's ops.

use ferrotron_cpu::Cpu;
use ferrotron_exec::init::{init_params, random_batch};
use ferrotron_exec::{
    launch, run, run_sharded, shard_params, weights_for, CommError, ExecError, Executable,
    RunOptions, Tensor,
};
use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::{partition, PartitionOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn tiny_gpt() -> Graph {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/tiny-gpt.ron"
    ));
    load_model(&path, &LoadOptions::default()).unwrap()
}

fn tp(n: u64) -> PartitionOptions {
    PartitionOptions {
        tp: n,
        ..PartitionOptions::default()
    }
}

#[test]
fn one_failing_rank_stops_all_of_them_with_its_error() {
    let g = tiny_gpt();
    let plan = partition(&g, &tp(4)).unwrap();
    let mut shards = shard_params(&plan, &init_params(&g, 0)).unwrap();
    // Rank 2 gets a malformed shard: it fails at once, the others wait at their first
    // collective until the failure reaches them.
    shards[2][5] = Tensor::zeros(vec![3]);
    let opts = RunOptions {
        timeout: Duration::from_secs(60),
        ..RunOptions::default()
    };
    let started = Instant::now();
    let err = run_sharded(Cpu::default(), &plan, &shards, &random_batch(&g, 0), &opts).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    match err {
        ExecError::Feed { name, .. } => {
            assert_eq!(name, plan.graph.params.values().nth(5).unwrap().name)
        }
        other => panic!("expected the failing rank's own error, got {other}"),
    }
}

#[test]
fn a_failing_stage_stops_every_stage_with_its_error() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/tiny-gpt.ron"
    ));
    let opts = LoadOptions {
        overrides: vec![("layers".into(), 4)],
        ..LoadOptions::default()
    };
    let g = load_model(&path, &opts).unwrap();
    let plan = partition(
        &g,
        &PartitionOptions {
            tp: 2,
            pp: 2,
            micro_batches: 2,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    let mut shards = shard_params(&plan, &init_params(&g, 0)).unwrap();
    // Rank 3 (tp 1 of the last stage) gets a malformed shard of its last parameter: it fails at
    // once, its tp peer at its first collective, and the first stage at its first receive.
    let bad = shards[3].len() - 1;
    let name = plan.graph.params[plan.params_on(1)[bad]].name.clone();
    shards[3][bad] = Tensor::zeros(vec![3]);
    let mut batch = random_batch(&g, 0);
    batch.insert("tokens".into(), {
        let mut t = batch["tokens"].clone();
        t.shape[0] *= 2;
        let mut data = t.data.into_vec();
        data.extend_from_within(..);
        t.data = data.into();
        t
    });
    let run_opts = RunOptions {
        timeout: Duration::from_secs(60),
        ..RunOptions::default()
    };
    let started = Instant::now();
    let err = run_sharded(Cpu::default(), &plan, &shards, &batch, &run_opts).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    match err {
        ExecError::Feed { name: n, .. } => assert_eq!(n, name),
        other => panic!("expected the failing rank's own error, got {other}"),
    }
}

#[test]
fn check_finite_names_the_first_op_that_overflows() {
    let g = tiny_gpt();
    let plan = partition(&g, &tp(2)).unwrap();
    let mut params = init_params(&g, 0);
    // A huge first-layer MLP weight overflows f32 in its matmul.
    let w = params.get_mut("h.0.mlp.c_fc.weight").unwrap();
    w.data.iter_mut().for_each(|x| *x = 1e38);
    let opts = RunOptions {
        check_finite: true,
        ..RunOptions::default()
    };
    match run(Cpu::default(), &plan, &params, &random_batch(&g, 0), &opts).unwrap_err() {
        ExecError::NonFinite { node, .. } => assert_eq!(node, "h.0.fc_mm"),
        other => panic!("{other}"),
    }
    // Without the check, the run finishes (with a non-finite loss).
    let r = run(
        Cpu::default(),
        &plan,
        &params,
        &random_batch(&g, 0),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(!r.loss().unwrap().is_finite());
}

#[test]
fn a_trace_has_every_rank_and_every_node() {
    let g = tiny_gpt();
    let plan = partition(&g, &tp(2)).unwrap();
    for fuse in [false, true] {
        let opts = RunOptions {
            trace: true,
            fuse,
            ..RunOptions::default()
        };
        let r = run(
            Cpu::default(),
            &plan,
            &init_params(&g, 0),
            &random_batch(&g, 0),
            &opts,
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&r.trace_json()).unwrap();
        let events = json["traceEvents"].as_array().unwrap();
        let slices = events.iter().filter(|e| e["ph"] == "X").count();
        // Fused, each of the 2 layers runs 23 nodes fewer (a bias add absorbed into the
        // activation's steps; the attention's scores, scale, softmax, dropout and its four
        // transposes between the heads and the sequence into its forward step, ten of its
        // eleven backward nodes into its backward step; two bias adds and their dropouts into
        // the residual sums after them), and the tied embedding's gradient is added into the
        // output layer's by the sum's step. The logits are kept: the loss runs unfused.
        let steps = plan.graph.order.len() - if fuse { 2 * 23 + 1 } else { 0 };
        assert_eq!(slices, 2 * steps, "fuse {fuse}");
        assert!(events
            .iter()
            .any(|e| e["cat"] == "collective" && e["tid"] == 1));
    }
}

/// A rank that never arrives at a collective (stuck elsewhere): the rank waiting for it stops
/// after the timeout, naming the plan node, the group, the collective and the missing rank.
#[test]
fn a_collective_a_rank_never_joins_names_the_missing_rank() {
    let g = tiny_gpt();
    let plan = partition(&g, &tp(2)).unwrap();
    let timeout = Duration::from_millis(500);
    let opts = RunOptions {
        timeout,
        ..RunOptions::default()
    };
    let exe = Executable::new(&plan, &opts).unwrap();
    let mut ranks = launch::ranks(&Cpu::default(), plan.mesh, timeout);
    // Rank 1 is kept (its groups stay open) but never runs.
    let _stuck = ranks.pop().unwrap();
    let waiting = ranks.pop().unwrap();
    let weights = weights_for(&waiting, &plan, &init_params(&g, 0)).unwrap();
    let started = Instant::now();
    let err = waiting
        .run(&exe, &weights, &random_batch(&g, 0))
        .unwrap_err();
    let took = started.elapsed();
    assert!(took >= timeout && took < 10 * timeout, "took {took:?}");
    let text = err.to_string();
    match &err {
        ExecError::Comm {
            node,
            group: Some(group),
            error: CommError::Timeout { missing, .. },
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
