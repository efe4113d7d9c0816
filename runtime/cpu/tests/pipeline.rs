//! Pipelined plans run on threads give the unpartitioned model's loss, outputs and every
//! gradient on the whole batch, within the f32 tolerances: tiny GPT (its embedding tied across
//! the first and last stage), BERT and Llama, at (tp, pp, dp) = (1,2,1), (2,2,1), (1,3,1) with
//! uneven layers, (2,2,2), under each schedule (interleaved too, over 2 and 3 model chunks per
//! stage), with sequence parallelism, and with dropout (each micro-batch's masks are its rows'
//! of the whole batch).

use ferrotron_cpu::Cpu;
use ferrotron_exec::init::{random_batch, test_params};
use ferrotron_exec::verify::{self, reference_plan, Tolerances};
use ferrotron_exec::{run, RunOptions};
use ferrotron_ir::{load_model, Graph, LoadOptions};
use ferrotron_partitioner::{partition, PartitionOptions, Schedule};
use std::path::PathBuf;

fn model(name: &str, dims: &[(&str, u64)]) -> Graph {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/")).join(name);
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

struct Case {
    tp: u64,
    pp: u64,
    dp: u64,
    micro_batches: u64,
    schedule: Schedule,
    sequence_parallel: bool,
}

fn case(tp: u64, pp: u64, dp: u64, micro_batches: u64) -> Case {
    Case {
        tp,
        pp,
        dp,
        micro_batches,
        schedule: Schedule::OneFOneB,
        sequence_parallel: false,
    }
}

/// `file` at `dims` with its whole batch `batch`, pipelined as `c` and compared with the
/// unpartitioned model on the whole batch.
fn check(file: &str, dims: &[(&str, u64)], batch: u64, c: Case, dropout_seed: u64) {
    check_with(
        file,
        dims,
        batch,
        |o| {
            *o = PartitionOptions {
                tp: c.tp,
                dp: c.dp,
                pp: c.pp,
                micro_batches: c.micro_batches,
                schedule: c.schedule,
                sequence_parallel: c.sequence_parallel,
                ..PartitionOptions::default()
            }
        },
        dropout_seed,
    )
}

/// As [`check`], with the options `set` makes.
fn check_with(
    file: &str,
    dims: &[(&str, u64)],
    batch: u64,
    set: impl Fn(&mut PartitionOptions),
    dropout_seed: u64,
) {
    let mut o = PartitionOptions::default();
    set(&mut o);
    let mut whole = dims.to_vec();
    whole.push(("batch", batch));
    let g = model(file, &whole);
    let mut micro = dims.to_vec();
    micro.push(("batch", batch / o.micro_batches));
    let gm = model(file, &micro);
    let cfg = format!(
        "{file} tp={} pp={} dp={} M={} {} V={} sp={}",
        o.tp, o.pp, o.dp, o.micro_batches, o.schedule, o.virtual_stages, o.sequence_parallel
    );
    let plan = partition(&gm, &o).unwrap_or_else(|e| panic!("{cfg}: {e}"));
    let reference = reference_plan(&g).unwrap();
    let params = test_params(&g, 11);
    let inputs = random_batch(&g, 11);
    let opts = RunOptions {
        dropout_seed,
        ..RunOptions::default()
    };
    let ours = run(Cpu::default(), &plan, &params, &inputs, &opts)
        .unwrap_or_else(|e| panic!("{cfg}: {e}"));
    let theirs = run(Cpu::default(), &reference, &params, &inputs, &opts).unwrap();
    let v = verify::compare(&ours, &theirs, &params, &inputs, &opts, Tolerances::F32)
        .unwrap_or_else(|e| panic!("{cfg}: {e}"));
    assert!(
        v.passed(),
        "{cfg}: {:#?}",
        v.entries.iter().filter(|e| !e.ok()).collect::<Vec<_>>()
    );
    assert_eq!(
        v.entries.len(),
        2 + plan.grads.len(),
        "{cfg}: loss, logits, every gradient"
    );
    eprintln!("{cfg}: max relative error {:.2e}", v.max_rel_error());
}

#[test]
fn tiny_gpt_over_stages_with_its_tied_embedding() {
    let dims = [("layers", 4)];
    check("tiny-gpt.ron", &dims, 4, case(1, 2, 1, 1), 0);
    check("tiny-gpt.ron", &dims, 4, case(1, 2, 1, 4), 0);
    check("tiny-gpt.ron", &dims, 4, case(2, 2, 1, 2), 0);
    check("tiny-gpt.ron", &dims, 8, case(2, 2, 2, 2), 0);
    check("tiny-gpt.ron", &[("layers", 5)], 6, case(1, 3, 1, 3), 0);
}

#[test]
fn every_schedule_and_sequence_parallelism() {
    let dims = [("layers", 4)];
    for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
        check(
            "tiny-gpt.ron",
            &dims,
            8,
            Case {
                schedule,
                ..case(1, 4, 1, 8)
            },
            0,
        );
        check(
            "tiny-gpt.ron",
            &dims,
            4,
            Case {
                schedule,
                sequence_parallel: true,
                ..case(2, 2, 1, 2)
            },
            0,
        );
    }
}

#[test]
fn the_interleaved_schedule_over_model_chunks() {
    let interleaved = |tp, pp, dp, m, v, sp| {
        move |o: &mut PartitionOptions| {
            *o = PartitionOptions {
                tp,
                pp,
                dp,
                micro_batches: m,
                schedule: Schedule::Interleaved,
                virtual_stages: v,
                sequence_parallel: sp,
                ..PartitionOptions::default()
            }
        }
    };
    check_with(
        "tiny-gpt.ron",
        &[("layers", 4)],
        4,
        interleaved(1, 2, 1, 4, 2, false),
        0,
    );
    check_with(
        "tiny-gpt.ron",
        &[("layers", 6)],
        4,
        interleaved(2, 2, 1, 2, 3, false),
        0,
    );
    check_with(
        "tiny-gpt.ron",
        &[("layers", 4)],
        8,
        interleaved(2, 2, 2, 2, 2, true),
        3,
    );
    check_with(
        "tiny-llama.ron",
        &[("layers", 4)],
        4,
        interleaved(1, 2, 1, 4, 2, false),
        0,
    );
    check_with(
        "tiny-bert.ron",
        &[("layers", 4)],
        4,
        interleaved(2, 2, 1, 2, 2, false),
        0,
    );
}

#[test]
fn micro_batches_see_their_rows_dropout_masks() {
    check("tiny-gpt.ron", &[("layers", 2)], 4, case(2, 2, 1, 4), 3);
    check("tiny-gpt.ron", &[("layers", 2)], 4, case(1, 1, 2, 2), 5);
}

#[test]
fn tiny_bert_and_llama_over_stages() {
    for file in ["tiny-bert.ron", "tiny-llama.ron"] {
        check(file, &[("layers", 2)], 4, case(1, 2, 1, 2), 0);
        check(file, &[("layers", 2)], 4, case(2, 2, 1, 2), 0);
        // Four layers over three stages: uneven.
        check(file, &[("layers", 4)], 6, case(1, 3, 1, 3), 0);
        check(file, &[("layers", 2)], 8, case(2, 2, 2, 2), 0);
        check(
            file,
            &[("layers", 2)],
            4,
            Case {
                schedule: Schedule::GPipe,
                ..case(1, 2, 1, 4)
            },
            0,
        );
        check(
            file,
            &[("layers", 2)],
            8,
            Case {
                sequence_parallel: true,
                ..case(2, 2, 2, 2)
            },
            0,
        );
    }
    check(
        "tiny-llama.ron",
        &[("layers", 2)],
        4,
        Case {
            sequence_parallel: true,
            ..case(2, 2, 1, 2)
        },
        0,
    );
}

#[test]
fn gradients_are_reduced_over_the_groups_once_a_step() {
    use ferrotron_exec::Executable;
    use ferrotron_ir::{MeshAxis, Op};
    let g = model("tiny-gpt.ron", &[("layers", 2), ("batch", 2)]);
    let plan = partition(
        &g,
        &PartitionOptions {
            tp: 2,
            dp: 2,
            pp: 2,
            micro_batches: 4,
            sequence_parallel: true,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    let dp_reductions = |exe: &Executable| {
        exe.program
            .steps
            .iter()
            .filter(|s| {
                matches!(
                    plan.graph.nodes[s.node].op,
                    Op::AllReduce {
                        axis: MeshAxis::Dp,
                        ..
                    }
                )
            })
            .count()
    };
    let exe = Executable::new(&plan, &RunOptions::default()).unwrap();
    // Every gradient's reductions wait for the micro-batches' sum: none runs per micro-batch.
    assert_eq!(dp_reductions(&exe), 0);
    assert!(exe.deferred.len() >= plan.graph.params.len() - 1);
    assert!(exe
        .deferred
        .iter()
        .any(|d| d.reductions.iter().any(|&(_, a)| a == MeshAxis::Tp)));
    // One micro-batch a step: the plan as it is.
    let one = partition(
        &g,
        &PartitionOptions {
            tp: 2,
            dp: 2,
            ..PartitionOptions::default()
        },
    )
    .unwrap();
    let exe = Executable::new(&one, &RunOptions::default()).unwrap();
    assert!(exe.deferred.is_empty());
}
