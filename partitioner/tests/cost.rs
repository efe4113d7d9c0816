//! The cost model: ring formulas against hand-computed values, the memory model against
//! Report's per-rank figures, the calibrated one-GPU baseline, memory monotone in tp, cluster
//! file errors located, and the paper's weak-scaling study.

use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::cost::{
    collective_time, memory, ring_time, simulate, simulate_against, weak_scaling_table, Cluster,
    ClusterError, Collective, Group, SimOptions,
};
use ferrotron_partitioner::{partition, PartitionOptions, Plan, Report};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn cluster(name: &str) -> Cluster {
    Cluster::load(&root().join("clusters").join(name)).unwrap_or_else(|e| panic!("{e}"))
}

fn model(name: &str, dims: &[(&str, u64)]) -> Graph {
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&root().join("models").join(name), &opts).unwrap_or_else(|e| panic!("{e}"))
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
    .unwrap_or_else(|e| panic!("{e}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1e-30)
}

#[test]
fn ring_formulas_match_hand_computed_values() {
    // All-reduce of 1 GB over 8 ranks at 100 GB/s, 1 µs per hop: 2·7/8 · 10 ms + 14 µs.
    let t = ring_time(Collective::AllReduce, 8, 1e9, 100e9, 1e-6);
    assert!(close(t, 0.0175 + 14e-6), "{t}");
    // All-gather / reduce-scatter: 7/8 · 10 ms + 7 µs.
    for kind in [Collective::AllGather, Collective::ReduceScatter] {
        let t = ring_time(kind, 8, 1e9, 100e9, 1e-6);
        assert!(close(t, 0.00875 + 7e-6), "{t}");
    }
    // A group of one costs nothing; two ranks: all-reduce moves the whole buffer once.
    assert_eq!(ring_time(Collective::AllReduce, 1, 1e9, 1e9, 1.0), 0.0);
    assert!(close(
        ring_time(Collective::AllReduce, 2, 1e9, 1e9, 0.0),
        1.0
    ));
    assert!(close(Collective::AllReduce.bus_factor(4), 1.5));
    assert!(close(Collective::AllGather.bus_factor(4), 0.75));
}

#[test]
fn collectives_inside_a_node_and_across_nodes() {
    let c = cluster("dgx2h.ron");
    let intra = c.intra_node.bandwidth * c.intra_node.efficiency;
    let inter = c.inter_node.bandwidth * c.inter_node.efficiency;
    // tp = 8 (consecutive ranks): one node, a flat NVSwitch ring.
    let g = Group {
        size: 8,
        stride: 1,
        world: 8,
    };
    assert_eq!(g.placement(16), (8, 1));
    let t = collective_time(&c, Collective::AllReduce, g, 1e9);
    assert!(close(t, 1.75e9 / intra + 14.0 * c.intra_node.latency_s));
    // dp = 64 at tp = 1: 16 members per node on 4 nodes. Reduce-scatter and all-gather inside
    // (15/16 each), all-reduce of 1/16 across 4 nodes at the node's bandwidth shared by 16 GPUs.
    let g = Group {
        size: 64,
        stride: 1,
        world: 64,
    };
    assert_eq!(g.placement(16), (16, 4));
    let inside = 2.0 * (15.0 / 16.0 * 1e9 / intra + 15.0 * c.intra_node.latency_s);
    let across = 1.5 * (1e9 / 16.0) / (inter / 16.0) + 6.0 * c.inter_node.latency_s;
    let t = collective_time(&c, Collective::AllReduce, g, 1e9);
    assert!(close(t, inside + across), "{t} vs {}", inside + across);
    // dp = 64 at tp = 8: members 8 apart, 2 per node, 32 nodes.
    let g = Group {
        size: 64,
        stride: 8,
        world: 512,
    };
    assert_eq!(g.placement(16), (2, 32));
    // dp = 4 at tp = 16: every member on its own node, a flat inter-node ring.
    let g = Group {
        size: 4,
        stride: 16,
        world: 64,
    };
    assert_eq!(g.placement(16), (1, 4));
    let t = collective_time(&c, Collective::AllGather, g, 1e9);
    assert!(close(
        t,
        0.75e9 / (inter / 16.0) + 3.0 * c.inter_node.latency_s
    ));
}

#[test]
fn memory_equals_report_per_rank() {
    let g = model("megatron-1.2b.ron", &[("layers", 2), ("batch", 4)]);
    for (tp, dp) in [(1, 1), (2, 1), (4, 2)] {
        let p = plan(&g, tp, dp);
        let r = Report::of(&p).per_rank;
        let m = memory(&p, &SimOptions::default());
        assert_eq!(m.weights, r.weights_bytes);
        assert_eq!(m.gradients, r.gradients_bytes);
        assert_eq!(m.optimizer, r.optimizer_bytes);
        assert_eq!(m.activations, r.activations_bytes);
        assert_eq!(m.total, r.memory_bytes);
        let s = simulate(&p, &cluster("dgx2h.ron"), &SimOptions::default());
        assert_eq!(s.memory_bytes_per_gpu, r.memory_bytes);
        // fp16 with an f32 master copy: 2 + 2 + 12 bytes per parameter, the Megatron figure.
        let h = memory(&p, &SimOptions::megatron());
        assert_eq!(h.weights + h.gradients + h.optimizer, 16 * r.parameters);
        // Recomputation keeps less.
        assert!(h.activations < r.activations_bytes / 2);
    }
}

#[test]
fn more_tp_never_needs_more_memory_per_gpu() {
    let g = model("megatron-1.2b.ron", &[("layers", 2), ("batch", 4)]);
    for opts in [SimOptions::default(), SimOptions::megatron()] {
        let mut last = u64::MAX;
        for tp in [1, 2, 4, 8] {
            let m = memory(&plan(&g, tp, 1), &opts).total;
            assert!(m <= last, "tp = {tp}: {m} > {last}");
            last = m;
        }
    }
}

#[test]
fn the_calibrated_baseline_sustains_39_tflops() {
    // The paper's one-GPU baseline: 1.2B, batch 8, fp16, recomputation: 39 TFLOP/s, 30% of peak.
    let p = plan(&model("megatron-1.2b.ron", &[]), 1, 1);
    let c = cluster("dgx2h.ron");
    let s = simulate(&p, &c, &SimOptions::megatron());
    assert!(
        (s.tflops_per_gpu - 39.0).abs() / 39.0 < 0.05,
        "{} TFLOP/s",
        s.tflops_per_gpu
    );
    assert!((s.share_of_peak - 0.31).abs() < 0.02, "{}", s.share_of_peak);
    assert!(s.fits);
    assert!(close(s.scaling_efficiency, 1.0));
    // Without recomputation the same model does not fit in 32 GB (why the paper recomputes).
    assert!(
        !simulate(
            &p,
            &c,
            &SimOptions {
                recompute: false,
                ..SimOptions::megatron()
            }
        )
        .fits
    );
    // Against itself as baseline: 100%.
    let a = simulate_against(&p, Some(&p), &c, &SimOptions::megatron());
    assert!(close(a.scaling_efficiency, 1.0));
}

#[test]
fn communication_lowers_efficiency() {
    let g = model("megatron-1.2b.ron", &[("layers", 2), ("batch", 16)]);
    let c = cluster("dgx2h.ron");
    let s = simulate(&plan(&g, 8, 2), &c, &SimOptions::megatron());
    assert!(s.tp_comm_s > 0.0 && s.dp_comm_s > 0.0);
    assert!(s.scaling_efficiency < 1.0 && s.scaling_efficiency > 0.3);
    assert!(s.dp_exposed_s <= s.dp_comm_s, "{s:#?}");
    let no = simulate(
        &plan(&g, 8, 2),
        &c,
        &SimOptions {
            overlap_dp: false,
            ..SimOptions::megatron()
        },
    );
    assert!(close(no.dp_exposed_s, no.dp_comm_s));
    assert!(no.step_time_s >= s.step_time_s);
}

#[test]
fn every_cluster_file_loads() {
    for f in ["dgx2h.ron", "dgx-a100.ron", "dgx-h100.ron", "h200.ron"] {
        let c = cluster(f);
        assert!(c.gpus_per_node >= 8, "{f}");
    }
}

#[test]
fn a_broken_cluster_file_is_located() {
    let text = std::fs::read_to_string(root().join("clusters/dgx2h.ron")).unwrap();
    let broken = text.replace(
        "gpus_per_node: 16,",
        "gpus_per_node: 16,\n    gpus_per_nod: 3,",
    );
    let line = broken
        .lines()
        .position(|l| l.contains("gpus_per_nod:"))
        .unwrap()
        + 1;
    let dir = std::env::temp_dir().join(format!("ferrotron-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.ron");
    std::fs::write(&path, &broken).unwrap();
    let err = Cluster::load(&path).unwrap_err();
    let msg = err.to_string();
    std::fs::remove_dir_all(&dir).ok();
    match err {
        ClusterError::Parse { line: l, col, .. } => {
            assert_eq!(l, line, "{msg}");
            assert!(col >= 5, "{msg}");
        }
        e => panic!("{e}"),
    }
    assert!(
        msg.starts_with(&format!("{}:{line}:", path.display())),
        "{msg}"
    );
    assert!(msg.contains("gpus_per_nod"), "{msg}");
    // Out of range.
    let bad = text.replace("memory_efficiency: 0.8", "memory_efficiency: 1.8");
    assert!(matches!(
        Cluster::from_ron(&bad, "x.ron"),
        Err(ClusterError::Invalid { .. })
    ));
}

#[test]
fn weak_scaling_study() {
    for overlap in [true, false] {
        let opts = SimOptions {
            overlap_dp: overlap,
            ..SimOptions::megatron()
        };
        let (rows, md) =
            weak_scaling_table(&root().join("models"), &cluster("dgx2h.ron"), &opts).unwrap();
        println!("overlap_dp = {overlap}\n{md}");
        assert_eq!(rows.len(), 8);
        assert!(rows.iter().all(|r| r.simulation.fits));
        assert!(close(rows[0].simulation.scaling_efficiency, 1.0));
    }
}

#[test]
fn calibration_reproduces_the_files_figure() {
    // The cluster file's gemm.max is calibrate_gemm's answer for the paper's baseline.
    let p = plan(&model("megatron-1.2b.ron", &[]), 1, 1);
    let c = cluster("dgx2h.ron");
    let max = ferrotron_partitioner::cost::calibrate_gemm(&p, &c, &SimOptions::megatron(), 39.0);
    assert!(
        (max - c.gemm.max).abs() < 0.01,
        "calibrated {max}, file {}",
        c.gemm.max
    );
}

#[test]
#[ignore]
fn scratch_breakdown() {
    let c = cluster("dgx2h.ron");
    for overlap in [false] {
        let opts = SimOptions {
            overlap_dp: overlap,
            ..SimOptions::megatron()
        };
        let (rows, _) = weak_scaling_table(&root().join("models"), &c, &opts).unwrap();
        for r in &rows {
            let s = &r.simulation;
            println!(
                "{:>14} tp{} dp{:>2} step {:.3} fwd {:.3} bwd {:.3} rec {:.3} opt {:.3} gemm {:.3} mem {:.3} tp {:.3} dp {:.3}/{:.3} flops {:.3e} eff {:.1} paper {:.0}",
                r.model, r.tp, r.dp, s.step_time_s, s.forward_s, s.backward_s, s.recompute_s, s.optimizer_s,
                s.gemm_s, s.memory_bound_s, s.tp_comm_s, s.dp_exposed_s, s.dp_comm_s, s.flops_per_gpu,
                100.0 * s.scaling_efficiency, 100.0 * r.paper_efficiency
            );
        }
    }
}

#[test]
#[ignore]
fn scratch_strong() {
    let c = cluster("dgx2h.ron");
    let g = model("megatron-1.2b.ron", &[]);
    let opts = SimOptions::megatron();
    let base = simulate(&plan(&g, 1, 1), &c, &opts).step_time_s;
    for tp in [1, 2, 4, 8] {
        let s = simulate(&plan(&g, tp, 1), &c, &opts);
        println!(
            "tp{tp} step {:.3} speedup {:.2} gemm {:.3} mem {:.3} tp {:.3} opt {:.3}",
            s.step_time_s, base / s.step_time_s, s.gemm_s, s.memory_bound_s, s.tp_comm_s, s.optimizer_s
        );
    }
}

#[test]
#[ignore]
fn scratch_shapes() {
    let g = model("megatron-4.2b.ron", &[("layers", 1)]);
    let p = plan(&g, 4, 1);
    for &n in &p.graph.order {
        let node = &p.graph.nodes[n];
        if let ferrotron_ir::Op::MatMul { a, b, transpose_a, transpose_b } = &node.op {
            println!(
                "{} {:?} x {:?} ta={} tb={} -> {:?}",
                node.name,
                p.graph.ty(*a).shape.sizes(),
                p.graph.ty(*b).shape.sizes(),
                transpose_a, transpose_b,
                p.graph.ty(node.outputs[0]).shape.sizes()
            );
        }
    }
}
