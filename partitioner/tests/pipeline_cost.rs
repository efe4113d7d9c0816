//! The cost model and the planner with pipeline stages: the bubble of equal stages against
//! `(P − 1)/(M + P − 1)`, more micro-batches for the same global batch giving a smaller bubble
//! and a shorter step, 1F1B holding no more than GPipe, per-stage memory against Report's,
//! point-to-point links inside and across nodes, gradient accumulation, one stage and one
//! micro-batch priced as before, and the planner cutting a model into stages when tensor
//! parallelism inside a node cannot hold it.

use ferrotron_ir::{load_model, DType, Graph, LoadOptions};
use ferrotron_partitioner::cost::{
    estimate, memory, p2p_time, stage_memory, work, Cluster, Estimate, EstimateOptions,
};
use ferrotron_partitioner::planner::{choose_in, micro_batch_counts, Candidate, Space};
use ferrotron_partitioner::{partition, Mesh, PartitionOptions, Plan, Recompute, Report, Schedule};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn cluster(name: &str) -> Cluster {
    let text = std::fs::read_to_string(root().join("clusters").join(name)).unwrap();
    Cluster::from_ron(&text, name).unwrap_or_else(|e| panic!("{e}"))
}

fn model(name: &str, dims: &[(&str, u64)]) -> Graph {
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&root().join("models").join(name), &opts).unwrap_or_else(|e| panic!("{e}"))
}

/// GPT-2 with wide layers and a tiny vocabulary: the embedding and the output layer are a
/// fraction of a percent of a stage's layers, so stages of equal layer counts are equal stages.
fn balanced(layers: u64, batch: u64) -> Graph {
    model(
        "gpt2-small.ron",
        &[
            ("hidden", 8192),
            ("heads", 64),
            ("vocab", 128),
            ("seq", 512),
            ("layers", layers),
            ("batch", batch),
        ],
    )
}

fn pipelined(g: &Graph, tp: u64, pp: u64, m: u64, schedule: Schedule) -> Plan {
    partition(
        g,
        &PartitionOptions {
            tp,
            pp,
            micro_batches: m,
            schedule,
            ..PartitionOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("pp = {pp}, M = {m}: {e}"))
}

fn f16() -> EstimateOptions {
    EstimateOptions {
        compute_dtype: Some(DType::F16),
        ..EstimateOptions::default()
    }
}

/// `|x − y| ≤ max(rtol·(|x| + |y|), atol)`.
fn near(x: f64, y: f64, rtol: f64, atol: f64) -> bool {
    (x - y).abs() <= (rtol * (x.abs() + y.abs())).max(atol)
}

fn formula(p: u64, m: u64) -> f64 {
    (p - 1) as f64 / (m + p - 1) as f64
}

#[test]
fn the_bubble_of_equal_stages_is_the_formula() {
    let c = cluster("dgx-a100.ron");
    let g = balanced(32, 1);
    for (p, m) in [(2, 1), (2, 4), (4, 4), (4, 16), (8, 8)] {
        let plan = pipelined(&g, 1, p, m, Schedule::OneFOneB);
        let s = estimate(&plan, &c, &f16());
        // Within 1% of the formula (0.5% of the sum).
        assert!(
            near(s.bubble_fraction, formula(p, m), 0.005, 1e-4),
            "P = {p}, M = {m}: {} against {}",
            s.bubble_fraction,
            formula(p, m)
        );
        // The step is put together from its parts.
        let parts =
            s.forward_s + s.backward_s + s.bubble_s + s.p2p_s + s.dp_exposed_s + s.optimizer_s;
        assert!(near(s.step_time_s, parts, 1e-12, 0.0), "{s:?}");
        assert!(near(
            s.bubble_s,
            (p - 1) as f64 * (s.forward_s + s.backward_s) / m as f64,
            1e-12,
            0.0
        ));
        assert_eq!(s.stages.len(), p as usize);
        assert_eq!((s.pp, s.micro_batches), (p, m as u32));
        assert_eq!(s.gpus, p);
    }
}

#[test]
fn interleaving_divides_the_fill_and_drain_by_the_chunks() {
    let c = cluster("dgx-a100.ron");
    let g = balanced(32, 1);
    for (p, v, m) in [(2u64, 2u64, 4u64), (4, 2, 8), (4, 4, 8)] {
        let plan = partition(
            &g,
            &PartitionOptions {
                pp: p,
                virtual_stages: v,
                micro_batches: m,
                schedule: Schedule::Interleaved,
                ..PartitionOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s = estimate(&plan, &c, &f16());
        let want = (p - 1) as f64 / (v * m + p - 1) as f64;
        // Within 3% (the same small imbalance against a smaller bubble, and `V·P − 1`
        // boundaries to cross at fill and drain, whose transfers weigh more the faster the
        // GEMMs).
        assert!(
            near(s.bubble_fraction, want, 0.015, 1e-4),
            "P = {p}, V = {v}, M = {m}: {} against {want}",
            s.bubble_fraction
        );
        assert_eq!(s.stages[0].layers.len(), v as usize);
    }
}

#[test]
fn more_micro_batches_shrink_the_bubble_and_the_step() {
    let c = cluster("dgx-a100.ron");
    // The same global batch of 64 sequences in 4, 8 and 16 micro-batches on 4 stages.
    let mut last: Option<Estimate> = None;
    for m in [4u64, 8, 16] {
        let plan = pipelined(&balanced(8, 64 / m), 1, 4, m, Schedule::OneFOneB);
        let s = estimate(&plan, &c, &f16());
        if let Some(l) = &last {
            assert!(s.bubble_fraction < l.bubble_fraction, "M = {m}");
            assert!(s.bubble_s < l.bubble_s, "M = {m}");
            assert!(s.step_time_s < l.step_time_s, "M = {m}");
            // The work is the same (but for the tied embedding's gradient sum, once per
            // micro-batch).
            assert!(near(s.flops_per_gpu, l.flops_per_gpu, 1e-6, 0.0));
        }
        last = Some(s);
    }
}

#[test]
fn one_f_one_b_holds_no_more_than_gpipe() {
    let c = cluster("dgx-a100.ron");
    let g = balanced(8, 2);
    let (p, m) = (4u64, 8u64);
    for opts in [f16(), EstimateOptions::megatron()] {
        let a = estimate(&pipelined(&g, 2, p, m, Schedule::OneFOneB), &c, &opts);
        let b = estimate(&pipelined(&g, 2, p, m, Schedule::GPipe), &c, &opts);
        for (s, (x, y)) in a.stages.iter().zip(&b.stages).enumerate() {
            assert_eq!(x.in_flight as u64, (p - s as u64).min(m));
            assert_eq!(y.in_flight as u64, m);
            assert!(x.memory.total <= y.memory.total, "stage {s}");
            assert_eq!(x.memory.weights, y.memory.weights);
        }
        assert!(a.memory_bytes_per_gpu < b.memory_bytes_per_gpu);
        // The order of the micro-batches changes what is held, not how long a step takes.
        assert_eq!(a.step_time_s, b.step_time_s);
    }
}

#[test]
fn stage_memory_equals_the_reports_per_stage_figures() {
    for (file, tp, p, m, schedule, v) in [
        ("tiny-gpt.ron", 1, 2, 4, Schedule::OneFOneB, 1),
        ("tiny-gpt.ron", 2, 4, 4, Schedule::GPipe, 1),
        ("tiny-llama.ron", 2, 2, 3, Schedule::OneFOneB, 1),
        ("megatron-1.2b.ron", 4, 3, 6, Schedule::OneFOneB, 1),
        ("tiny-gpt.ron", 2, 2, 4, Schedule::Interleaved, 3),
    ] {
        let g = model(file, &[("layers", 6), ("batch", 2)]);
        let plan = partition(
            &g,
            &PartitionOptions {
                tp,
                pp: p,
                micro_batches: m,
                schedule,
                virtual_stages: v,
                ..PartitionOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        let report = Report::of(&plan);
        let stages = report.pipeline.expect("a pipeline").per_stage;
        let mem = stage_memory(&plan, &EstimateOptions::default());
        assert_eq!(mem.len(), stages.len());
        for (s, (x, r)) in mem.iter().zip(&stages).enumerate() {
            let r = &r.per_rank;
            assert_eq!(
                (x.weights, x.gradients, x.optimizer, x.activations, x.total),
                (
                    r.weights_bytes,
                    r.gradients_bytes,
                    r.optimizer_bytes,
                    r.activations_bytes,
                    r.memory_bytes
                ),
                "{file}, stage {s}"
            );
        }
        // The plan's memory is the heaviest stage's, as the report's per-rank figure is.
        let heaviest = memory(&plan, &EstimateOptions::default());
        assert_eq!(heaviest.total, report.per_rank.memory_bytes, "{file}");
        // Recomputation keeps less on every stage.
        let re = stage_memory(
            &plan,
            &EstimateOptions {
                recompute: Recompute::Full,
                ..EstimateOptions::default()
            },
        );
        for (x, y) in re.iter().zip(&mem) {
            assert!(x.activations <= y.activations, "{file}");
        }
    }
}

#[test]
fn stages_talk_inside_a_node_until_a_stage_fills_one() {
    let c = cluster("dgx-a100.ron");
    let intra = c.intra_node.bandwidth * c.intra_node.efficiency;
    let inter = c.inter_node.bandwidth * c.inter_node.efficiency;
    let hop = |l: f64| l + c.kernel_overhead_s;
    // tp · dp = 4 on 8-GPU nodes: stages 0 and 1 share a node, 1 and 2 do not.
    let mesh = Mesh {
        tp: 2,
        dp: 2,
        pp: 4,
    };
    let t01 = p2p_time(&c, mesh, 0, 1, 1e9);
    assert!(near(
        t01,
        1e9 / intra + hop(c.intra_node.latency_s),
        1e-12,
        0.0
    ));
    assert_eq!(t01, p2p_time(&c, mesh, 1, 0, 1e9));
    let t12 = p2p_time(&c, mesh, 1, 2, 1e9);
    assert!(near(
        t12,
        1e9 / (inter / 8.0) + hop(c.inter_node.latency_s),
        1e-12,
        0.0
    ));
    // tp · dp = 8: every stage is a node of its own.
    let mesh = Mesh {
        tp: 8,
        dp: 1,
        pp: 2,
    };
    assert_eq!(p2p_time(&c, mesh, 0, 1, 1e9), t12);
    // Nothing to send to oneself.
    assert_eq!(p2p_time(&c, mesh, 1, 1, 1e9), 0.0);
}

#[test]
fn gradient_accumulation_has_no_bubble() {
    let c = cluster("dgx-a100.ron");
    let whole = estimate(
        &partition(&balanced(2, 8), &PartitionOptions::default()).unwrap(),
        &c,
        &f16(),
    );
    let plan = pipelined(&balanced(2, 2), 1, 1, 4, Schedule::OneFOneB);
    let s = estimate(&plan, &c, &f16());
    assert_eq!((s.bubble_s, s.bubble_fraction, s.p2p_s), (0.0, 0.0, 0.0));
    assert_eq!(s.stages.len(), 1);
    let st = &s.stages[0];
    assert!(near(
        s.step_time_s,
        4.0 * (st.forward_s + st.backward_s) + st.dp_exposed_s + st.optimizer_s,
        1e-12,
        0.0
    ));
    // Four micro-batches of 2 do the whole batch's work, a little slower (smaller GEMMs, more
    // launches), and keep a quarter of its activations.
    assert!(near(s.flops_per_gpu, whole.flops_per_gpu, 1e-6, 0.0));
    assert!(s.step_time_s >= whole.step_time_s);
    assert!(s.step_time_s < 1.1 * whole.step_time_s);
    assert!(4 * s.memory.activations <= whole.memory.activations + 4 * 1024);
}

#[test]
fn one_stage_and_one_micro_batch_is_priced_as_before() {
    let c = cluster("dgx2h.ron");
    let g = model("megatron-1.2b.ron", &[("layers", 2), ("batch", 8)]);
    let plan = partition(
        &g,
        &PartitionOptions {
            tp: 2,
            dp: 2,
            pp: 1,
            micro_batches: 1,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    assert!(plan.pipeline.is_none());
    for opts in [EstimateOptions::default(), EstimateOptions::megatron()] {
        let s = estimate(&plan, &c, &opts);
        assert_eq!((s.pp, s.micro_batches, s.schedule), (1, 1, None));
        assert_eq!((s.bubble_s, s.p2p_s, s.bubble_fraction), (0.0, 0.0, 0.0));
        assert!(s.stages.is_empty());
        // Bit for bit the one-stage sum.
        assert_eq!(
            s.step_time_s,
            s.forward_s + s.backward_s + (s.dp_exposed_s + s.optimizer_s + s.dp_gather_s)
        );
        assert_eq!(s.dp_gather_s, 0.0);
        assert_eq!(s.memory, memory(&plan, &opts));
    }
}

#[test]
fn the_work_floor_is_under_every_step() {
    // The planner skips a configuration whose floor, from the work of one micro-batch of the
    // same tp and sequence parallelism at a smaller size, is above a step it has: the floor must
    // hold whatever the stage count, the replicas, the micro-batch count and its size.
    let c = cluster("dgx-a100.ron");
    for (tp, sp) in [(1, false), (2, false), (2, true)] {
        let options = |dp, pp, m| PartitionOptions {
            tp,
            dp,
            sequence_parallel: sp,
            pp,
            micro_batches: m,
            ..PartitionOptions::default()
        };
        // One sequence per replica and micro-batch, 2 replicas, 2 stages, 4 micro-batches.
        let at_one = partition(&balanced(8, 2), &options(2, 2, 4)).unwrap();
        for recompute in [Recompute::None, Recompute::Full] {
            let opts = EstimateOptions {
                recompute,
                ..EstimateOptions::megatron()
            };
            let w = work(&at_one, &c, &opts);
            // (dp, pp, micro-batches, sequences per replica and micro-batch)
            for (dp, pp, m, b) in [
                (2, 2, 4, 1),
                (1, 4, 8, 1),
                (4, 1, 1, 1),
                (2, 4, 4, 2),
                (1, 2, 2, 4),
                (2, 8, 8, 2),
            ] {
                let plan = partition(&balanced(8, dp * b), &options(dp, pp, m)).unwrap();
                let step = estimate(&plan, &c, &opts).step_time_s;
                let floor = w.floor(pp, m, b as f64);
                assert!(
                    floor <= step,
                    "tp {tp}, sp {sp}, recompute {recompute}, dp {dp}, pp {pp}, M {m}, b {b}: \
                     floor {floor} above step {step}"
                );
            }
        }
    }
}

#[test]
fn micro_batch_counts_start_at_the_stage_count() {
    let full = Space::full();
    assert_eq!(micro_batch_counts(512, 64, &full), vec![512, 256, 128, 64]);
    assert_eq!(micro_batch_counts(512, 1, &full), vec![512, 8, 4, 2, 1]);
    assert_eq!(micro_batch_counts(48, 5, &full), vec![48, 24, 12, 6]);
    // Fewer sequences than stages: one sequence per micro-batch.
    assert_eq!(micro_batch_counts(4, 8, &full), vec![4]);
    assert_eq!(micro_batch_counts(512, 64, &Space::one_stage()), vec![1]);
}

#[test]
fn the_planner_cuts_a_model_that_tp_inside_a_node_cannot_hold() {
    // About 60B parameters (16 bytes each with mixed-precision Adam: ~120 GB per GPU at
    // tp = 8); 40 heads allow tp = 1, 2, 4 or 8 only.
    let c = cluster("dgx-a100.ron");
    let load = |batch: Option<u64>| {
        let mut overrides = vec![
            ("hidden".to_owned(), 20480),
            ("heads".to_owned(), 40),
            ("layers".to_owned(), 12),
            ("seq".to_owned(), 512),
        ];
        overrides.extend(batch.map(|b| ("batch".to_owned(), b)));
        let opts = LoadOptions {
            overrides,
            ..LoadOptions::default()
        };
        load_model(&root().join("models/megatron-8.3b.ron"), &opts).map_err(|e| e.to_string())
    };
    let opts = EstimateOptions::megatron();
    // Without pipelines nothing fits.
    let flat = choose_in(load, &c, 16, Some(16), &opts, &Space::one_stage()).unwrap();
    assert!(flat.candidates.iter().all(|c| !c.feasible()));
    let choice = choose_in(load, &c, 16, Some(16), &opts, &Space::full()).unwrap();
    let best = &choice.candidates[0];
    assert!(best.feasible(), "{}", choice.explanation);
    assert!(best.pp > 1 && best.tp <= 8, "tp {} pp {}", best.tp, best.pp);
    assert_eq!(best.tp * best.pp * best.dp, 16);
    assert!(best.micro_batches >= best.pp);
    assert!(
        choice.explanation.starts_with(&format!(
            "tp = {}, dp = {}, pp = {}",
            best.tp, best.dp, best.pp
        )),
        "{}",
        choice.explanation
    );
    // Every configuration with fewer GPUs per replica is refused or does not fit with the Adam
    // state on every replica; the distributed optimizer lets some fit, slower.
    let smaller = |c: &&Candidate| c.tp * c.pp < best.tp * best.pp;
    assert!(choice
        .candidates
        .iter()
        .filter(smaller)
        .filter(|c| c.zero == 0)
        .all(|c| !c.feasible()));
    assert!(choice
        .candidates
        .iter()
        .filter(smaller)
        .filter(|c| c.feasible())
        .all(|c| c.zero == 1 && c.tokens_per_second <= best.tokens_per_second));
    // 1F1B wins on memory: where both schedules were priced, it never holds more.
    for c in choice
        .candidates
        .iter()
        .filter(|c| c.schedule == Some(Schedule::OneFOneB) && c.pp > 1)
    {
        let gpipe = choice.candidates.iter().find(|g| {
            g.schedule == Some(Schedule::GPipe)
                && (
                    g.tp,
                    g.pp,
                    g.micro_batches,
                    g.sequence_parallel,
                    g.recompute,
                    g.zero,
                ) == (
                    c.tp,
                    c.pp,
                    c.micro_batches,
                    c.sequence_parallel,
                    c.recompute,
                    c.zero,
                )
        });
        let (a, b) = (
            c.estimate.as_ref().unwrap(),
            gpipe.unwrap().estimate.as_ref().unwrap(),
        );
        assert!(a.memory_bytes_per_gpu <= b.memory_bytes_per_gpu);
    }
    // Candidates are ranked: feasible first, by throughput.
    for w in choice.candidates.windows(2) {
        if w[0].feasible() == w[1].feasible() {
            assert!(w[0].tokens_per_second >= w[1].tokens_per_second);
        } else {
            assert!(w[0].feasible());
        }
    }
}
