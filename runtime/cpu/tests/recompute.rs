//! Activation recomputation changes what the backward pass keeps, not what it computes. On tiny
//! GPT (dropout on) at tp 1 and 2, with sequence parallelism and over pipeline stages, under a
//! nonzero dropout seed: the loss and every gradient at `selective` and `full` equal the run
//! without recomputation's within the gradient tolerance of `--verify`, and each run matches the
//! unpartitioned model. A recomputed dropout must draw the forward's mask for that to hold; a
//! plan whose recomputed dropouts draw another mask is caught. Without stages and with the
//! attention unfused (as the plan has it), the measured peak is within 10% of the liveness
//! estimate, and on this model (its activations outweigh its weights and gradients) both drop
//! with each mode.

use ferrotron_cpu::Cpu;
use ferrotron_exec::init::{random_batch, test_params};
use ferrotron_exec::verify::{self, reference_plan, Tolerances, GRADIENT_TOLERANCE};
use ferrotron_exec::{run, RunOptions, Tensor};
use ferrotron_ir::{load_model, Graph, LoadOptions, Op};
use ferrotron_partitioner::{liveness, partition, PartitionOptions, Plan, Recompute};
use std::collections::HashMap;
use std::path::PathBuf;

/// Not 0, so the masks are not the reference evaluator's defaults.
const DROPOUT_SEED: u64 = 7;

fn model(dims: &[(&str, u64)]) -> Graph {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/tiny-gpt.ron"
    ));
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap_or_else(|e| panic!("tiny-gpt: {e}"))
}

/// One configuration: the model's dimensions (its `batch` the whole step's) and the
/// partitioning, recomputation aside.
struct Case {
    dims: Vec<(&'static str, u64)>,
    opts: PartitionOptions,
}

impl Case {
    fn new(dims: &[(&'static str, u64)], tp: u64, sp: bool, pp: u64, micro_batches: u64) -> Case {
        Case {
            dims: dims.to_vec(),
            opts: PartitionOptions {
                tp,
                sequence_parallel: sp,
                pp,
                micro_batches,
                ..PartitionOptions::default()
            },
        }
    }

    fn name(&self, mode: Recompute) -> String {
        let o = &self.opts;
        format!(
            "tp={} sp={} pp={} M={} recompute={mode}",
            o.tp, o.sequence_parallel, o.pp, o.micro_batches
        )
    }

    /// The whole step's model (the reference's, the weights' and the batch's).
    fn whole(&self) -> Graph {
        model(&self.dims)
    }

    /// The plan at `mode`, of one micro-batch's model.
    fn plan(&self, mode: Recompute) -> Plan {
        let m = self.opts.micro_batches;
        let dims: Vec<_> = self
            .dims
            .iter()
            .map(|&(n, v)| (n, if n == "batch" { v / m } else { v }))
            .collect();
        let opts = PartitionOptions {
            recompute: mode,
            ..self.opts.clone()
        };
        partition(&model(&dims), &opts).unwrap_or_else(|e| panic!("{}: {e}", self.name(mode)))
    }
}

/// What a step gave: the loss, every gradient by name, and the measured peak per rank.
struct Step {
    loss: f32,
    grads: HashMap<String, Tensor>,
    peak: usize,
}

/// Runs `plan` on the case's weights and batch; with `check`, checks it against the
/// unpartitioned model.
fn step(case: &Case, mode: Recompute, plan: &Plan, check: bool) -> Step {
    step_with(case, mode, plan, check, RunOptions::default())
}

/// [`step`] with `opts` (their dropout seed replaced).
fn step_with(case: &Case, mode: Recompute, plan: &Plan, check: bool, opts: RunOptions) -> Step {
    let cfg = case.name(mode);
    let g = case.whole();
    let params = test_params(&g, 5);
    let batch = random_batch(&g, 5);
    let opts = RunOptions {
        dropout_seed: DROPOUT_SEED,
        ..opts
    };
    let ours =
        run(Cpu::default(), plan, &params, &batch, &opts).unwrap_or_else(|e| panic!("{cfg}: {e}"));
    if check {
        let reference = reference_plan(&g).unwrap();
        let theirs = run(Cpu::default(), &reference, &params, &batch, &opts).unwrap();
        let v = verify::compare(&ours, &theirs, &params, &batch, &opts, Tolerances::F32)
            .unwrap_or_else(|e| panic!("{cfg}: {e}"));
        assert!(
            v.passed(),
            "{cfg}: {:#?}",
            v.entries.iter().filter(|e| !e.ok()).collect::<Vec<_>>()
        );
    }
    let grads = plan
        .grads
        .iter()
        .map(|&(p, _)| {
            let name = plan.graph.params[p].name.clone();
            let grad = ours.grad(&name).unwrap_or_else(|e| panic!("{cfg}: {e}"));
            (name, grad)
        })
        .collect();
    Step {
        loss: ours.loss().unwrap(),
        grads,
        peak: ours.peak_bytes(),
    }
}

/// The largest relative difference between two steps' gradients (as `--verify` measures it).
fn grad_difference(a: &Step, b: &Step) -> f64 {
    assert_eq!(a.grads.len(), b.grads.len());
    a.grads
        .iter()
        .map(|(name, x)| verify::rel_error(x, &b.grads[name]))
        .fold(0.0, f64::max)
}

/// The recomputed dropouts of `plan` (nodes named `recompute.*`).
fn recomputed_dropouts(plan: &Plan) -> Vec<ferrotron_ir::NodeId> {
    let g = &plan.graph;
    g.order
        .iter()
        .copied()
        .filter(|&n| {
            g.nodes[n].name.starts_with("recompute.") && matches!(g.nodes[n].op, Op::Dropout { .. })
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let flat = [("layers", 2), ("seq", 32), ("batch", 4)];
    let staged = [("layers", 4), ("seq", 16), ("batch", 4)];
    vec![
        Case::new(&flat, 1, false, 1, 1),
        Case::new(&flat, 2, false, 1, 1),
        Case::new(&flat, 2, true, 1, 1),
        Case::new(&staged, 1, false, 2, 2),
        Case::new(&staged, 2, false, 2, 2),
        Case::new(&staged, 2, true, 2, 2),
    ]
}

#[test]
fn recomputed_gradients_equal_the_kept_ones() {
    for case in cases() {
        let kept_plan = case.plan(Recompute::None);
        let kept = step(&case, Recompute::None, &kept_plan, true);
        for mode in [Recompute::Selective, Recompute::Full] {
            let cfg = case.name(mode);
            let plan = case.plan(mode);
            // The dropouts a layer's backward reads are among what is remade.
            assert!(
                !recomputed_dropouts(&plan).is_empty(),
                "{cfg}: no dropout is recomputed"
            );
            let s = step(&case, mode, &plan, true);
            let loss = verify::rel_error(
                &Tensor::new(vec![], vec![s.loss]).unwrap(),
                &Tensor::new(vec![], vec![kept.loss]).unwrap(),
            );
            assert!(loss <= verify::FORWARD_TOLERANCE, "{cfg}: loss {loss:.2e}");
            let d = grad_difference(&s, &kept);
            assert!(
                d <= GRADIENT_TOLERANCE,
                "{cfg}: gradients differ by {d:.2e}"
            );
            eprintln!("{cfg}: gradients within {d:.2e} of the run without recomputation");
        }
    }
}

/// The comparison above sees the masks: the same plan with its recomputed dropouts drawing
/// another mask (another drop probability) gives other gradients.
#[test]
fn a_recomputed_dropout_with_another_mask_changes_the_gradients() {
    let case = Case::new(&[("layers", 2), ("seq", 32), ("batch", 4)], 2, false, 1, 1);
    let kept_plan = case.plan(Recompute::None);
    let kept = step(&case, Recompute::None, &kept_plan, false);
    let mut plan = case.plan(Recompute::Full);
    for n in recomputed_dropouts(&plan) {
        if let Op::Dropout { p, .. } = &mut plan.graph.nodes[n].op {
            *p = 0.5;
        }
    }
    let g = case.whole();
    let params = test_params(&g, 5);
    let batch = random_batch(&g, 5);
    let opts = RunOptions {
        dropout_seed: DROPOUT_SEED,
        ..RunOptions::default()
    };
    let ours = run(Cpu::default(), &plan, &params, &batch, &opts).unwrap();
    let d = kept
        .grads
        .iter()
        .map(|(name, x)| verify::rel_error(&ours.grad(name).unwrap(), x))
        .fold(0.0, f64::max);
    assert!(
        d > 100.0 * GRADIENT_TOLERANCE,
        "gradients differ by only {d:.2e}"
    );
}

#[test]
fn measured_peak_follows_the_liveness_estimate() {
    let dims = [("layers", 2), ("seq", 32), ("batch", 8)];
    for case in [
        Case::new(&dims, 1, false, 1, 1),
        Case::new(&dims, 2, false, 1, 1),
        Case::new(&dims, 2, true, 1, 1),
    ] {
        let mut last: Option<(usize, u64)> = None;
        for mode in [Recompute::None, Recompute::Selective, Recompute::Full] {
            let cfg = case.name(mode);
            let plan = case.plan(mode);
            let estimate = liveness::peak_bytes(&plan).expect("one stage, one micro-batch");
            // The attention unfused, as the plan is: a fused attention never holds the
            // scores, which is what selective recomputation saves (the memory plan prices the
            // fused program to the byte: tests/memory_plan.rs).
            let unfused_attention = RunOptions {
                fuse_attention: false,
                ..RunOptions::default()
            };
            let measured = step_with(&case, mode, &plan, false, unfused_attention).peak;
            let off = (measured as f64 - estimate as f64).abs() / estimate as f64;
            assert!(
                off <= 0.10,
                "{cfg}: measured {measured} B, liveness {estimate} B ({:.1}% apart)",
                100.0 * off
            );
            if let Some((m, e)) = last {
                assert!(
                    measured < m && estimate < e,
                    "{cfg}: no drop from {m} / {e} B"
                );
            }
            last = Some((measured, estimate));
        }
    }
}
