//! The memory plan (`memory.rs`) against the rank program: the peak it plans is the peak every
//! rank measures, to the byte, for every model at tp 1, 2, 3, 4 and 8, with sequence and data
//! parallelism, recomputation, fused or not (the loss too), forward only or whole; and its arena gives no two
//! values alive at once the same bytes.

mod common;

use common::{model, pipelined};
use ferrotron_cpu::Cpu;
use ferrotron_exec::init::{random_batch, test_params};
use ferrotron_exec::memory::{self, MemoryPlan};
use ferrotron_exec::{run, Executable, RunOptions};
use ferrotron_ir::Graph;
use ferrotron_partitioner::{partition, PartitionOptions, Plan, Recompute};

/// A model file, its dimension overrides and a mesh.
type Case<'a> = (&'a str, &'a [(&'a str, u64)], PartitionOptions);

/// No two slots alive at one step share a byte, unless one continues the other's buffer in
/// place; every slot lies inside the arena at an aligned offset, and the arena holds at least the most bytes live at once.
fn check_offsets(what: &str, m: &MemoryPlan) {
    // The slots of one buffer: a slot made in place joins its input's.
    let mut buffer: Vec<usize> = (0..m.slots.len()).collect();
    for (k, s) in m.slots.iter().enumerate() {
        if let Some(from) = s.reuses {
            buffer[k] = buffer[from];
        }
    }
    for (a, sa) in m.slots.iter().enumerate().filter(|(_, s)| s.placed) {
        assert!(
            sa.offset + sa.bytes <= m.arena,
            "{what}: slot outside the arena"
        );
        assert_eq!(sa.offset % memory::ALIGN, 0, "{what}: slot {a} misaligned");
        for (b, sb) in m
            .slots
            .iter()
            .enumerate()
            .skip(a + 1)
            .filter(|(_, s)| s.placed)
        {
            let at_once = sa.from <= sb.to && sb.from <= sa.to;
            let share = sa.offset < sb.offset + sb.bytes && sb.offset < sa.offset + sa.bytes;
            assert!(
                !(at_once && share) || buffer[a] == buffer[b],
                "{what}: slots {a} and {b} overlap: {sa:?} {sb:?}"
            );
        }
    }
    // Values another stage holds are not in the arena.
    if m.slots.iter().all(|s| s.placed) {
        assert!(m.arena >= m.live_peak, "{what}: arena below the live peak");
    }
}

/// Runs `plan` with `opts` and checks each rank's measured peak against its stage's plan; the
/// first stage's plan.
fn planned_is_measured(what: &str, g: &Graph, plan: &Plan, opts: &RunOptions) -> MemoryPlan {
    planned_is_measured_on(what, g, plan, opts)
}

/// [`planned_is_measured`] on a batch of `full`'s shape (a pipelined plan's graph is one
/// micro-batch's).
fn planned_is_measured_on(what: &str, full: &Graph, plan: &Plan, opts: &RunOptions) -> MemoryPlan {
    let g = full;
    let exe = Executable::new(plan, opts).unwrap();
    let stages: Vec<MemoryPlan> = (0..plan.mesh.pp as usize)
        .map(|s| memory::plan(&exe, s, &|_| 4))
        .collect();
    let ran = run(
        Cpu::default(),
        plan,
        &test_params(g, 2),
        &random_batch(g, 2),
        opts,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    for (r, rank) in ran.ranks.iter().enumerate() {
        let stage = plan.mesh.coord(r).pp;
        let m = &stages[stage];
        assert_eq!(
            rank.peak_bytes as u64, m.peak,
            "{what}: rank {r} (stage {stage}) measured {} bytes, the plan says {}",
            rank.peak_bytes, m.peak
        );
    }
    for (s, m) in stages.iter().enumerate() {
        check_offsets(&format!("{what}, stage {s}"), m);
    }
    stages.into_iter().next().unwrap()
}

#[test]
fn the_planned_peak_is_the_measured_peak() {
    let eight_heads: &[(&str, u64)] = &[("heads", 8)];
    let three_heads: &[(&str, u64)] = &[("heads", 3), ("hidden", 48)];
    let mesh = |tp: u64, dp: u64, sp: bool, recompute: Recompute| PartitionOptions {
        tp,
        dp,
        sequence_parallel: sp,
        recompute,
        ..PartitionOptions::default()
    };
    let cases: &[Case] = &[
        ("tiny-gpt.ron", &[], mesh(1, 1, false, Recompute::None)),
        ("tiny-gpt.ron", &[], mesh(2, 1, false, Recompute::None)),
        ("tiny-gpt.ron", &[], mesh(4, 1, true, Recompute::None)),
        (
            "tiny-gpt.ron",
            eight_heads,
            mesh(8, 1, false, Recompute::None),
        ),
        (
            "tiny-gpt.ron",
            three_heads,
            mesh(3, 1, false, Recompute::None),
        ),
        ("tiny-gpt.ron", &[], mesh(2, 2, true, Recompute::None)),
        ("tiny-gpt.ron", &[], mesh(2, 1, false, Recompute::Selective)),
        ("tiny-gpt.ron", &[], mesh(1, 1, false, Recompute::Full)),
        ("tiny-bert.ron", &[], mesh(2, 1, false, Recompute::None)),
        ("tiny-llama.ron", &[], mesh(2, 1, false, Recompute::None)),
        // Two chunks of the fused loss's rows.
        (
            "tiny-gpt.ron",
            &[("batch", 9), ("seq", 24)],
            mesh(2, 1, false, Recompute::None),
        ),
    ];
    for (file, dims, opts) in cases {
        let g = model(file, dims);
        let p = partition(&g, opts).unwrap();
        for (mode, run_opts) in [
            ("fused", RunOptions::default()),
            (
                "pairs fused",
                RunOptions {
                    fuse_attention: false,
                    ..RunOptions::default()
                },
            ),
            (
                "unfused",
                RunOptions {
                    fuse: false,
                    ..RunOptions::default()
                },
            ),
            (
                "forward only",
                RunOptions {
                    forward_only: true,
                    ..RunOptions::default()
                },
            ),
            // The logits not kept: the output layer and its loss run fused.
            (
                "loss fused",
                RunOptions {
                    keep_outputs: false,
                    ..RunOptions::default()
                },
            ),
            (
                "forward only, loss fused",
                RunOptions {
                    forward_only: true,
                    keep_outputs: false,
                    ..RunOptions::default()
                },
            ),
        ] {
            let what = format!(
                "{file} tp={} dp={} sp={} recompute={} {mode}",
                opts.tp, opts.dp, opts.sequence_parallel, opts.recompute
            );
            planned_is_measured(&what, &g, &p, &run_opts);
        }
    }
}

#[test]
fn the_arena_is_close_to_the_live_peak() {
    // Largest first, lowest fit: on a transformer's lifetimes it wastes little.
    for file in ["tiny-gpt.ron", "tiny-llama.ron"] {
        let g = model(file, &[]);
        let p = partition(&g, &PartitionOptions::default()).unwrap();
        let exe = Executable::new(&p, &RunOptions::default()).unwrap();
        let m = memory::plan(&exe, 0, &|_| 4);
        assert!(
            m.arena as f64 <= 1.25 * m.live_peak as f64,
            "{file}: arena {} for a live peak of {}",
            m.arena,
            m.live_peak
        );
        // The peak is the weights with the live values at their most.
        assert_eq!(m.peak, m.weights + m.live_peak, "{file}");
    }
}

#[test]
fn a_dropout_gradient_does_not_hold_the_dropout_output() {
    // A dropout's output was once held from the forward to its gradient's step, which reads
    // only its place; now the residual path's dropouts (read by a sum, whose gradient needs no
    // operand) are freed in the forward. The attention's is read by the backward's product,
    // the embedding's by the first layer norm's gradient.
    let g = model("tiny-gpt.ron", &[]);
    let p = partition(&g, &PartitionOptions::default()).unwrap();
    let exe = Executable::new(
        &p,
        &RunOptions {
            fuse: false,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let m = memory::plan(&exe, 0, &|_| 4);
    let g2 = &p.graph;
    for node in g2.order.iter().map(|&n| &g2.nodes[n]) {
        let residual = ["attn_drop", "mlp_drop"]
            .iter()
            .any(|n| node.name.ends_with(n));
        if let (ferrotron_ir::Op::Dropout { .. }, true) = (&node.op, residual) {
            let out = node.outputs[0];
            let slot = m.slots.iter().find(|s| s.value == Some(out)).unwrap();
            assert!(
                slot.to < exe.program.backward_start,
                "`{}` is held into the backward (to step {})",
                node.name,
                slot.to
            );
        }
    }
}

#[test]
fn the_planned_peak_of_each_pipeline_stage_is_its_measured_peak() {
    let pipe = |tp, dp, pp, micro_batches, virtual_stages| {
        pipelined((tp, dp, pp), micro_batches, virtual_stages)
    };
    // Micro-batches of 2 of a batch of 2 × M: the plan's graph is a micro-batch's.
    let gpt =
        |batch: u64, layers: u64| model("tiny-gpt.ron", &[("batch", batch), ("layers", layers)]);
    for (what, layers, o) in [
        ("pp 2, 2 micro-batches", 2, pipe(1, 1, 2, 2, 1)),
        ("pp 2, 4 micro-batches", 2, pipe(1, 1, 2, 4, 1)),
        ("tp 2 pp 2, 4 micro-batches", 2, pipe(2, 1, 2, 4, 1)),
        ("pp 2 dp 2, 2 micro-batches", 2, pipe(1, 2, 2, 2, 1)),
        ("pp 2 interleaved, 4 micro-batches", 4, pipe(1, 1, 2, 4, 2)),
    ] {
        let p = partition(&gpt(2, layers), &o).unwrap_or_else(|e| panic!("{what}: {e}"));
        let full = gpt(2 * o.micro_batches, layers);
        for opts in [
            RunOptions::default(),
            RunOptions {
                forward_only: true,
                ..RunOptions::default()
            },
        ] {
            let m = planned_is_measured_on(what, &full, &p, &opts);
            // Every micro-batch's steps are walked.
            let last = m.positions.iter().map(|&(mb, _)| mb).max();
            assert_eq!(last, Some(p.micro_batches() - 1), "{what}");
        }
    }
}
