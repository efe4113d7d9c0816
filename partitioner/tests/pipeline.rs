//! The pipeline cut: which stage each node and parameter lands on, the values that cross stages,
//! tied parameters, hand-fixed and uneven splits, and the errors for combinations that cannot be
//! built.

use ferrotron_ir::graph::EntityRef;
use ferrotron_ir::{load_model, Graph, LoadOptions, ValueDef};
use ferrotron_partitioner::pipeline::PipeStep;
use ferrotron_partitioner::{partition, PartitionOptions, Pipeline, Plan, Schedule};
use std::path::PathBuf;

fn model(name: &str, dims: &[(&str, u64)]) -> Graph {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")).join(name);
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn options(tp: u64, pp: u64, m: u64) -> PartitionOptions {
    PartitionOptions {
        tp,
        pp,
        micro_batches: m,
        ..PartitionOptions::default()
    }
}

fn pipelined(g: &Graph, opts: &PartitionOptions) -> (Plan, Pipeline) {
    let plan = partition(g, opts).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    let pipe = plan.pipeline.clone().expect("a pipelined plan");
    (plan, pipe)
}

/// The stage of the node named `name`.
fn stage(plan: &Plan, pipe: &Pipeline, name: &str) -> u32 {
    let g = &plan.graph;
    let n = g
        .order
        .iter()
        .find(|&&n| g.nodes[n].name == name)
        .unwrap_or_else(|| panic!("no node {name}"));
    pipe.stage_of[*n]
}

fn param_stages(plan: &Plan, pipe: &Pipeline, name: &str) -> Vec<u32> {
    let (p, _) = plan
        .graph
        .params
        .iter()
        .find(|(_, d)| d.name == name)
        .unwrap_or_else(|| panic!("no parameter {name}"));
    pipe.holders[p.index()].clone()
}

#[test]
fn embedding_goes_first_head_and_loss_last_layers_in_order() {
    let g = model("tiny-gpt.ron", &[("layers", 4)]);
    let (plan, pipe) = pipelined(&g, &options(2, 2, 2));
    assert_eq!(pipe.layers.iter().sum::<u32>(), 4);
    // Layer i's nodes are on the stage its position in the split says.
    let first = pipe.layers[0] as usize;
    for n in &plan.graph.order[..plan.backward_start] {
        let name = &plan.graph.nodes[*n].name;
        if let Some(i) = name
            .strip_prefix("h.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
        {
            let want = u32::from(i >= first);
            assert_eq!(pipe.stage_of[*n], want, "{name} of layer {i}");
        }
    }
    let loss = match plan.graph.values[plan.loss].def {
        ValueDef::Node { node, .. } => node,
        _ => panic!("the loss is made by a node"),
    };
    assert_eq!(pipe.stage_of[loss], 1, "the loss is on the last stage");
    assert_eq!(param_stages(&plan, &pipe, "wpe"), vec![0]);
    assert_eq!(param_stages(&plan, &pipe, "ln_f.weight"), vec![1]);
    assert_eq!(param_stages(&plan, &pipe, "h.0.mlp.c_fc.weight"), vec![0]);
    assert_eq!(param_stages(&plan, &pipe, "h.3.mlp.c_fc.weight"), vec![1]);
    assert_eq!(
        stage(&plan, &pipe, "h.3.fc_mm"),
        1,
        "the last layer is on the last stage"
    );
}

#[test]
fn the_tied_embedding_is_held_by_the_first_and_last_stage() {
    let g = model("tiny-gpt.ron", &[("layers", 3)]);
    let (plan, pipe) = pipelined(&g, &options(1, 3, 3));
    assert_eq!(param_stages(&plan, &pipe, "wte"), vec![0, 2]);
    let wte = plan
        .graph
        .params
        .iter()
        .find(|(_, d)| d.name == "wte")
        .map(|(p, _)| p)
        .unwrap();
    let tied: Vec<_> = pipe.tied.iter().map(|t| t.param).collect();
    assert_eq!(tied, vec![wte], "only the embedding is tied");
    assert_eq!(pipe.tied[0].holders, vec![0, 2]);
    assert!(pipe.holders.iter().all(|h| !h.is_empty()));
    // The last stage's part of its gradient goes to the first once a step, not per micro-batch.
    let once: Vec<_> = pipe.transfers.iter().filter(|t| t.once_a_step).collect();
    assert_eq!(once.len(), 1);
    assert_eq!((once[0].from, once[0].to, once[0].backward), (2, 0, true));
    assert_eq!(
        plan.graph.ty(once[0].value).shape.sizes(),
        plan.graph.ty(plan.graph.params[wte].value).shape.sizes()
    );
    // With one micro-batch there is nothing to save.
    let (_, pipe) = pipelined(&g, &options(1, 3, 1));
    assert!(pipe.transfers.iter().all(|t| !t.once_a_step));
}

#[test]
fn transfers_go_forward_in_the_forward_part_and_back_in_the_backward() {
    for (file, tp, pp) in [
        ("tiny-gpt.ron", 1, 2),
        ("tiny-gpt.ron", 2, 2),
        ("tiny-gpt.ron", 1, 4),
        ("tiny-bert.ron", 2, 2),
        ("tiny-llama.ron", 2, 2),
    ] {
        let g = model(file, &[("layers", 4)]);
        let (plan, pipe) = pipelined(&g, &options(tp, pp, 4));
        assert!(!pipe.transfers.is_empty());
        for t in &pipe.transfers {
            let name = &plan.graph.values[t.value].name;
            assert_ne!(t.from, t.to, "{name}");
            if t.backward {
                assert!(
                    t.from > t.to,
                    "gradient {name} goes from {} to {}",
                    t.from,
                    t.to
                );
            } else {
                assert!(
                    t.from < t.to,
                    "activation {name} goes from {} to {}",
                    t.from,
                    t.to
                );
            }
        }
        // Each boundary passes the residual stream forward and its gradient back.
        for s in 0..pp as u32 - 1 {
            assert!(pipe
                .transfers
                .iter()
                .any(|t| !t.backward && t.from == s && t.to == s + 1));
            assert!(pipe
                .transfers
                .iter()
                .any(|t| t.backward && t.from == s + 1 && t.to == s));
        }
    }
}

#[test]
fn a_boundary_every_tp_rank_holds_whole_is_sent_in_parts() {
    let g = model("tiny-gpt.ron", &[("layers", 4)]);
    let (plan, pipe) = pipelined(&g, &options(2, 2, 2));
    let residual = |pipe: &Pipeline, plan: &Plan| {
        pipe.transfers
            .iter()
            .find(|t| !t.backward && plan.graph.values[t.value].name.ends_with(".y"))
            .cloned()
            .unwrap()
    };
    // Replicated over tp: each rank sends half of the hidden dimension.
    let t = residual(&pipe, &plan);
    assert_eq!(t.scatter, Some(2));
    assert_eq!(
        t.bytes(&plan.graph, plan.mesh.tp) * 2,
        plan.graph.ty(t.value).size_bytes()
    );
    // With sequence parallelism it is already split along the sequence: sent as held.
    let sp = PartitionOptions {
        sequence_parallel: true,
        ..options(2, 2, 2)
    };
    let (plan, pipe) = pipelined(&g, &sp);
    assert_eq!(residual(&pipe, &plan).scatter, None);
    // At tp = 1 there is nothing to scatter.
    let (plan, pipe) = pipelined(&g, &options(1, 2, 2));
    assert_eq!(residual(&pipe, &plan).scatter, None);
}

#[test]
fn uneven_and_hand_fixed_splits() {
    let g = model("tiny-gpt.ron", &[("layers", 5)]);
    let (_, pipe) = pipelined(&g, &options(1, 3, 3));
    assert_eq!(pipe.layers.len(), 3);
    assert_eq!(pipe.layers.iter().sum::<u32>(), 5);
    let opts = PartitionOptions {
        stage_layers: Some(vec![1, 3, 1]),
        ..options(1, 3, 3)
    };
    let (plan, pipe) = pipelined(&g, &opts);
    assert_eq!(pipe.layers, vec![1, 3, 1]);
    assert_eq!(stage(&plan, &pipe, "h.0.fc_mm"), 0);
    assert_eq!(stage(&plan, &pipe, "h.1.fc_mm"), 1);
    assert_eq!(stage(&plan, &pipe, "h.3.fc_mm"), 1);
    assert_eq!(stage(&plan, &pipe, "h.4.fc_mm"), 2);
}

#[test]
fn the_balance_follows_work_not_layer_count() {
    // The output layer of a large vocabulary weighs as much as several layers: the last stage
    // gets fewer layers.
    let g = model("tiny-gpt.ron", &[("layers", 8), ("vocab", 8000)]);
    let (_, pipe) = pipelined(&g, &options(1, 2, 2));
    assert!(
        pipe.layers[1] < pipe.layers[0],
        "layers per stage {:?}",
        pipe.layers
    );
}

#[test]
fn schedules_are_in_the_plan_and_every_stage_runs_every_micro_batch_both_ways() {
    let g = model("tiny-gpt.ron", &[("layers", 4)]);
    for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
        let opts = PartitionOptions {
            schedule,
            ..options(1, 4, 6)
        };
        let (_, pipe) = pipelined(&g, &opts);
        assert_eq!(pipe.steps.len(), 4);
        for steps in &pipe.steps {
            for m in 0..6 {
                let f = steps.iter().position(|&s| s == PipeStep::Forward(m));
                let b = steps.iter().position(|&s| s == PipeStep::Backward(m));
                assert!(
                    f.unwrap() < b.unwrap(),
                    "{schedule}: forward before backward"
                );
            }
            assert_eq!(steps.len(), 12);
        }
        // In flight on the first stage: P micro-batches under 1F1B, M under GPipe.
        let mut live: i32 = 0;
        let mut peak = 0;
        for s in &pipe.steps[0] {
            live += if matches!(s, PipeStep::Forward(_)) {
                1
            } else {
                -1
            };
            peak = peak.max(live);
        }
        let want = if schedule == Schedule::GPipe { 6 } else { 4 };
        assert_eq!(peak, want, "{schedule}");
    }
}

#[test]
fn interleaving_gives_each_stage_chunks_spread_through_the_model() {
    let g = model("tiny-gpt.ron", &[("layers", 8)]);
    let opts = PartitionOptions {
        schedule: Schedule::Interleaved,
        virtual_stages: 2,
        stage_layers: Some(vec![2, 2, 2, 2]),
        ..options(1, 2, 4)
    };
    let (plan, pipe) = pipelined(&g, &opts);
    // Virtual stage c·P + s: layers 0-1 on stage 0 chunk 0, 2-3 on stage 1 chunk 0, 4-5 on
    // stage 0 chunk 1, 6-7 on stage 1 chunk 1.
    for (layer, stage, chunk) in [(0, 0, 0), (3, 1, 0), (4, 0, 1), (7, 1, 1)] {
        let name = format!("h.{layer}.fc_mm");
        let n = plan.graph.node_named(&name).unwrap();
        assert_eq!(
            (pipe.stage_of[n], pipe.chunk_of[n]),
            (stage, chunk),
            "{name}"
        );
    }
    // The residual stream crosses stages three times each way, the last hop from stage 1
    // back to stage 0.
    let fwd: Vec<(u32, u32)> = pipe
        .transfers
        .iter()
        .filter(|t| !t.backward && plan.graph.values[t.value].name.ends_with(".y"))
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(fwd, [(0, 1), (1, 0), (0, 1)]);
    assert_eq!(pipe.steps[0].len(), 2 * 4 * 2);
    assert_eq!(pipe.chunks[0].len(), pipe.steps[0].len());
    assert!((pipe.bubble_fraction() - 1.0 / 9.0).abs() < 1e-12);
}

#[test]
fn impossible_cuts_say_what_would_be_valid() {
    let g = model("tiny-gpt.ron", &[("layers", 2)]);
    let err = partition(&g, &options(1, 3, 3)).unwrap_err().to_string();
    assert!(err.contains("valid --pp: 1 to 2"), "{err}");
    let opts = PartitionOptions {
        stage_layers: Some(vec![2, 1]),
        ..options(1, 2, 2)
    };
    let err = partition(&g, &opts).unwrap_err().to_string();
    assert!(err.contains("adding up to the model's 2 layers"), "{err}");
    let opts = PartitionOptions {
        stage_layers: Some(vec![2, 0]),
        ..options(1, 2, 2)
    };
    assert!(partition(&g, &opts).is_err());
    let interleaved = |pp, m, v| PartitionOptions {
        schedule: Schedule::Interleaved,
        virtual_stages: v,
        ..options(1, pp, m)
    };
    let g = model("tiny-gpt.ron", &[("layers", 4)]);
    let err = partition(&g, &interleaved(2, 3, 2))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a multiple of 2 (valid: 2, 4, 6"), "{err}");
    let err = partition(&g, &interleaved(2, 2, 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--virtual-stages 2 or more"), "{err}");
    let err = partition(&g, &interleaved(2, 2, 3))
        .unwrap_err()
        .to_string();
    assert!(err.contains("every chunk needs a layer"), "{err}");
    let err = partition(
        &g,
        &PartitionOptions {
            virtual_stages: 2,
            ..options(1, 2, 2)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("is for --schedule interleaved"), "{err}");
    assert!("zigzag".parse::<Schedule>().is_err());
    for zero in [options(1, 0, 1), options(1, 1, 0)] {
        let err = partition(&g, &zero).unwrap_err().to_string();
        assert!(err.contains("must each be at least 1"), "{err}");
    }
}
