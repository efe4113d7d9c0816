// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

//! What the CPU runtime's fusion tests share: a model file from the zoo with its dimensions
//! overridden, and one plan run two ways (fused and not) held to the same loss and gradients.

use ferrotron_cpu::Cpu;
use ferrotron_exec::init::{random_batch, test_params};
use ferrotron_exec::verify::{compare_runs, Outputs, Tolerances, FORWARD_TOLERANCE};
use ferrotron_exec::{run, RunOptions};
use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::Plan;
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
