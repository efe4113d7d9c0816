// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

//! What the CPU runtime's tests share: a model file from the zoo with its dimensions
//! overridden, a pipelined partitioning, and one plan run two ways (fused and not) held to the
//! same loss and gradients.

use ferrotron_cpu::Cpu;
use ferrotron_exec::init::{random_batch, test_params};
use ferrotron_exec::verify::{compare_runs, Outputs, Tolerances, FORWARD_TOLERANCE};
use ferrotron_exec::{run, RunOptions};
use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::{PartitionOptions, Plan};
use std::path::PathBuf;

/// `file` from `models/`, with `dims` overriding its named dimensions.
pub fn model(file: &str, dims: &[(&str, u64)]) -> Graph {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")).join(file);
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// A mesh of `tp` × `dp` × `pp` stages running `micro_batches` micro-batches, `virtual_stages`
/// model chunks per stage (the interleaved schedule when more than one, else 1F1B).
pub fn pipelined(
    (tp, dp, pp): (u64, u64, u64),
    micro_batches: u64,
    virtual_stages: u64,
) -> PartitionOptions {
    PartitionOptions {
        tp,
        dp,
        pp,
        micro_batches,
        virtual_stages,
        schedule: match virtual_stages {
            1 => "1f1b",
            _ => "interleaved",
        }
        .parse()
        .unwrap(),
        ..PartitionOptions::default()
    }
}

/// Runs `plan` on `whole`'s weights and batch (from `seed`) with `ours` and with `theirs`;
/// checks the losses agree within the `f32` tolerance and, unless the runs are forward only,
/// every gradient (to the scale of the largest, as `--verify` holds them); returns rank 0's
/// two peaks.
pub fn agree(
    what: &str,
    (whole, plan, seed): (&Graph, &Plan, u64),
    ours: &RunOptions,
    theirs: &RunOptions,
) -> (usize, usize) {
    let params = test_params(whole, seed);
    let batch = random_batch(whole, seed);
    let run_with = |opts| {
        run(Cpu::default(), plan, &params, &batch, opts).unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    let (a_run, b_run) = (run_with(ours), run_with(theirs));
    let (a, b) = (a_run.loss().unwrap(), b_run.loss().unwrap());
    let off = f64::from(((a - b) / b).abs());
    assert!(off <= FORWARD_TOLERANCE, "{what}: loss {a} against {b}");
    if !ours.forward_only {
        let v = compare_runs(&a_run, &b_run, Tolerances::F32, Outputs::Skipped)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let failed: Vec<_> = v.entries.iter().filter(|e| !e.ok()).collect();
        assert!(failed.is_empty(), "{what}: {failed:#?}");
    }
    (a_run.ranks[0].peak_bytes, b_run.ranks[0].peak_bytes)
}
