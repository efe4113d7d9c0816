//! The PTD-P table: its transcription checked against itself (GPUs, aggregate throughput, share
//! of peak, the paper's parameter formula), and the two smallest rows predicted from the zoo
//! model (structure only: the figures live in docs/ptd-p.md).

use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::cost::Cluster;
use ferrotron_partitioner::published::{
    ptd_p_table, StudyOptions, MODEL_FILE, SEQUENCE, TABLE_1, VOCABULARY,
};
use ferrotron_partitioner::{Recompute, Schedule};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn cluster(name: &str) -> Cluster {
    let text = std::fs::read_to_string(root().join("clusters").join(name)).unwrap();
    Cluster::from_ron(&text, name).unwrap_or_else(|e| panic!("{e}"))
}

/// A zoo model by file name with dimensions overridden.
fn zoo(file: &str, dims: &[(&str, u64)]) -> Result<Graph, String> {
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&root().join("models").join(file), &opts).map_err(|e| e.to_string())
}

/// `|x − y| ≤ max(rtol·(|x| + |y|), atol)`.
fn near(x: f64, y: f64, rtol: f64, atol: f64) -> bool {
    (x - y).abs() <= (rtol * (x.abs() + y.abs())).max(atol)
}

#[test]
fn the_table_is_consistent_with_itself() {
    for r in &TABLE_1 {
        let name = r.billions;
        assert_eq!(r.dp() * r.tp * r.pp, r.gpus, "{name}B");
        assert_eq!(
            r.micro_batches() * r.micro_batch * r.dp(),
            r.batch,
            "{name}B"
        );
        assert_eq!(r.layers % (r.pp * r.virtual_stages), 0, "{name}B");
        assert_eq!(r.hidden % r.heads, 0, "{name}B");
        if r.schedule() == Some(Schedule::Interleaved) {
            assert_eq!(r.micro_batches() % r.pp, 0, "{name}B");
        }
        // The paper's columns agree: aggregate = per GPU × GPUs, share = per GPU / 312.
        assert!(
            near(
                r.aggregate_pflops,
                r.tflops * r.gpus as f64 / 1e3,
                0.005,
                0.0
            ),
            "{name}B"
        );
        assert!(
            near(r.share_of_peak, r.tflops / 312.0, 0.0, 0.006),
            "{name}B"
        );
        // The paper's equation 2 gives the parameters it prints.
        let (l, h) = (r.layers as f64, r.hidden as f64);
        let (v, s) = (VOCABULARY as f64, SEQUENCE as f64);
        let p = 12.0 * l * h * h * (1.0 + 13.0 / (12.0 * h) + (v + s) / (12.0 * l * h));
        assert!(near(p / 1e9, r.billions, 0.0, 0.051), "{name}B: {p}");
        // Equation 3 is 4 passes over the layers' GEMMs and 3 over the logit layer's.
        let layers = 4.0 * (24.0 * h * h * s + 4.0 * s * s * h) * l * r.batch as f64;
        let logits = 6.0 * s * h * v * r.batch as f64;
        assert!(
            near(r.paper_flops(), layers + logits, 1e-12, 0.0),
            "{name}B"
        );
    }
    // The trillion-parameter row's degrees.
    assert_eq!(TABLE_1[9].tflops, 163.0);
    assert_eq!((TABLE_1[9].tp, TABLE_1[9].pp, TABLE_1[9].dp()), (8, 64, 6));
}

#[test]
fn the_two_smallest_rows_are_predicted() {
    let c = cluster("dgx-a100.ron");
    let runs = &TABLE_1[..2];
    let study = StudyOptions {
        planner: false,
        calibration: false,
    };
    let (rows, md) = ptd_p_table(zoo, &c, runs, study).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.len(), 2);
    for (r, run) in rows.iter().zip(runs) {
        let s = &r.estimate;
        assert_eq!(r.paper, *run);
        // dp = GPUs / (tp · pp), as the plan was partitioned.
        assert_eq!(run.dp(), 32);
        assert_eq!((s.tp, s.dp, s.pp, s.gpus), (run.tp, 32, 1, run.gpus));
        assert_eq!(s.micro_batches, 1);
        assert!(s.schedule.is_none());
        // The zoo model at the row's sizes has the paper's parameters (printed to 0.1B).
        assert!(near(r.parameters as f64 / 1e9, run.billions, 0.0, 0.051));
        for x in [r.predicted_tflops, s.tflops_per_gpu, s.step_time_s] {
            assert!(x.is_finite() && x > 0.0, "{x}");
        }
        // Full recomputation is priced (the paper's setting).
        assert!(s.recompute_s > 0.0);
        // Both throughputs count nearly the same FLOPs (equation 3 against executed).
        let executed = s.flops_per_gpu * s.gpus as f64;
        assert!(near(executed, r.paper_flops, 0.02, 0.0));
        assert!(near(
            r.error,
            r.predicted_tflops / run.tflops - 1.0,
            1e-12,
            0.0
        ));
        assert!(r.planner.is_none());
        assert!(md.contains(&format!("| {} | ", run.billions)), "{md}");
    }
    assert!(
        md.contains(MODEL_FILE) && md.contains("rows within 10%"),
        "{md}"
    );
}

/// The planner's pick for the trillion-parameter row is priced no slower than the paper's own
/// configuration of it. The paper's tp, pp, dp, model chunks, micro-batch size and
/// recomputation are in the planner's space (its stages cut by work rather than into equal
/// layers), so a slower pick is a search that missed them.
#[test]
fn the_planner_beats_the_paper_on_the_largest_row() {
    let c = cluster("dgx-a100.ron");
    let runs = &TABLE_1[TABLE_1.len() - 1..];
    let study = StudyOptions {
        planner: true,
        calibration: false,
    };
    let (rows, md) = ptd_p_table(zoo, &c, runs, study).unwrap_or_else(|e| panic!("{e}"));
    let r = &rows[0];
    let k = r
        .planner
        .as_ref()
        .expect("the planner finds a configuration that fits");
    let (paper, pick) = (r.estimate.step_time_s, k.estimate.step_time_s);
    assert!(
        paper.is_finite() && pick.is_finite() && pick > 0.0,
        "{paper} {pick}"
    );
    assert!(
        pick <= paper,
        "the pick ({} × {} × {}, V = {}, micro-batch {}, {}, ZeRO {}) takes {pick:.3} s, the \
         paper's configuration {paper:.3} s",
        k.tp,
        k.pp,
        k.dp,
        k.virtual_stages,
        k.micro_batch_size,
        k.recompute,
        k.zero
    );
    assert!(k.estimate.fits);
    // The pick runs the row's GPUs and global batch.
    assert_eq!(k.tp * k.pp * k.dp, runs[0].gpus);
    assert_eq!(k.micro_batch_size * k.micro_batches * k.dp, runs[0].batch);
    assert_eq!(k.estimate.recompute, k.recompute);
    assert_eq!(k.estimate.zero, k.zero);
    assert!(near(k.speedup, paper / pick, 1e-12, 0.0));
    // The layout alone is priced with the paper's settings and is no faster than the pick.
    let alone = k
        .paper_settings
        .as_ref()
        .expect("the pick's plan at full recomputation");
    assert_eq!((alone.recompute, alone.zero), (Recompute::Full, 0));
    assert!(alone.step_time_s >= pick * (1.0 - 1e-12));
    assert!(md.contains("## What the planner would run"), "{md}");
    assert!(md.contains("ZeRO-3: not predicted"), "{md}");
}
