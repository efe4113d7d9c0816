//! The viewer, driven headless through AccessKit with `egui_kittest` (no screen needed).

use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use ferrotron_visualizer::app::Viewer;

const TINY_GPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-gpt.ron");

fn harness(v: Viewer) -> Harness<'static, Viewer> {
    Harness::builder()
        .with_size(eframe::egui::Vec2::new(1400.0, 1000.0))
        .build_ui_state(|ui, v: &mut Viewer| v.show(ui), v)
}

#[test]
fn changing_tp_adds_all_reduces_to_the_summary() {
    let mut h = harness(Viewer::new(TINY_GPT, 1, 1, false));
    h.run();
    assert!(h
        .query_by_label_contains("all_reduce forward [tp]")
        .is_none());
    h.get_by_label("tp").set_value_accesskit(2.0);
    h.run();
    assert_eq!(h.state().options.tp, 2);
    h.get_by_label_contains("all_reduce forward [tp]: ×");
    h.get_by_label_contains("tiny-gpt: tp = 2");
}

#[test]
fn an_invalid_tp_shows_the_partitioners_error() {
    let mut h = harness(Viewer::new(TINY_GPT, 1, 1, false));
    h.run();
    h.get_by_label("tp").set_value_accesskit(3.0);
    h.run();
    h.get_by_label_contains("not divisible by 3");
}

#[test]
fn search_selects_a_node_and_the_panel_shows_its_layout() {
    let mut h = harness(Viewer::new(TINY_GPT, 2, 1, false));
    h.run();
    h.get_by_label("search").focus();
    h.run();
    h.get_by_label("search").type_text("fc_mm");
    h.run();
    let sel = h.state().selected().expect("something selected");
    assert!(h.state().graph_layout().nodes[sel].lines[0].contains("fc_mm"));
    // The search expanded the layer; the column-parallel first MLP matmul is split by column.
    assert_eq!(h.state().expand, vec![0]);
    h.get_by_label_contains("layout: split by column");
    h.get_by_label_contains("local shape: [");
}

#[test]
fn a_layer_expands_from_the_property_panel() {
    let mut h = harness(Viewer::new(TINY_GPT, 2, 1, false));
    h.run();
    let before = h.state().graph_layout().nodes.len();
    let layer = h
        .state()
        .graph_layout()
        .nodes
        .iter()
        .position(|n| matches!(n.item, ferrotron_visualizer::layout::Item::Layer { .. }))
        .expect("a collapsed layer");
    h.state_mut().select(Some(layer));
    h.run();
    h.get_by_label_contains("op: layer (collapsed)");
    h.get_by_label("expand layer").click();
    h.run();
    assert_eq!(h.state().expand.len(), 1);
    assert!(h.state().graph_layout().nodes.len() > before);
}

#[test]
fn a_parameters_slice_follows_the_rank_selector() {
    let mut v = Viewer::new(TINY_GPT, 2, 1, false);
    assert!(v.search("c_fc.weight"));
    let props = v.selected_properties();
    let holds = |p: &[(String, String)], k: &str| {
        p.iter()
            .find(|(a, _)| a == k)
            .map(|(_, b)| b.clone())
            .unwrap()
    };
    assert_eq!(holds(&props, "op"), "parameter");
    let r0 = holds(&props, "rank 0 holds");
    v.rank = 1;
    let r1 = holds(&v.selected_properties(), "rank 1 holds");
    assert_ne!(r0, r1);
    assert!(r0.starts_with("dim "), "{r0}");
}

#[test]
fn a_broken_model_file_shows_a_located_error() {
    let dir = std::env::temp_dir().join(format!("ferrotron-viewer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.ron");
    std::fs::write(
        &path,
        "Model(\n    name: \"broken\",\n    dims: { \"x\": },\n)\n",
    )
    .unwrap();
    let mut h = harness(Viewer::new(&path, 1, 1, false));
    h.run();
    h.get_by_label("error");
    let err = h.state().error().expect("an error").to_string();
    assert!(err.contains("broken.ron"), "{err}");
    h.get_by_label_contains("broken.ron:");
    std::fs::remove_dir_all(&dir).ok();
}

/// Selects the box of the op named `name` (outside the collapsed layers).
fn select_op(v: &mut Viewer, name: &str) {
    let plan = v.plan().expect("a plan");
    let n = plan
        .graph
        .order
        .iter()
        .copied()
        .find(|&n| plan.graph.nodes[n].name == name)
        .unwrap_or_else(|| panic!("no op {name}"));
    let i = v.graph_layout().node_of_op(n).expect("drawn on its own");
    v.select(Some(i));
}

fn row(props: &[(String, String)], key: &str) -> String {
    props
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no row {key} in {props:?}"))
}

/// Every group's longest bar is full length and the others are to the same scale.
fn assert_scaled(group: &ferrotron_visualizer::stats::BarGroup) {
    let max = group.bars.iter().map(|b| b.value).max().unwrap_or(0);
    for b in &group.bars {
        let want = if max == 0 {
            0.0
        } else {
            b.value as f64 / max as f64
        };
        assert!(
            (b.fraction as f64 - want).abs() <= 1e-6,
            "{}: fraction {} for {} of {max}",
            b.label,
            b.fraction,
            b.value
        );
    }
    if max > 0 {
        assert!(group.bars.iter().any(|b| b.fraction == 1.0));
    }
}

#[test]
fn the_summary_chart_shows_memory_and_collectives_per_rank() {
    let mut h = harness(Viewer::new(TINY_GPT, 1, 1, false));
    h.run();
    let one = h.state().summary_chart().expect("a chart").clone();
    let bar = |c: &ferrotron_visualizer::stats::SummaryChart, group: &str, label: &str| {
        let g = match group {
            "parameters" => &c.parameters,
            "memory" => &c.memory,
            _ => &c.collectives,
        };
        g.bars.iter().find(|b| b.label == label).cloned()
    };
    // tp = 1, dp = 1: no collectives; memory by kind, each bar readable through AccessKit.
    assert!(one.collectives.bars.is_empty());
    h.get_by_label_contains("collectives per step: 0");
    let labels: Vec<&str> = one.memory.bars.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(labels, ["weights", "gradients", "optimizer", "activations"]);
    let weights = bar(&one, "memory", "weights").unwrap();
    h.get_by_label(&format!("weights: {}", weights.text));
    h.get_by_label_contains("activations: ");
    h.get_by_label_contains("memory per rank: ");
    // One rank holds the whole model.
    let per_rank = bar(&one, "parameters", "per rank").unwrap();
    assert_eq!(
        per_rank.value,
        bar(&one, "parameters", "model").unwrap().value
    );
    assert!(per_rank.text.ends_with("(100.0%)"), "{}", per_rank.text);
    for g in [&one.parameters, &one.memory, &one.collectives] {
        assert_scaled(g);
    }

    // tp = 2 from the window: the tensor-parallel all-reduces appear as bars, and each rank
    // holds about half the weights.
    h.get_by_label("tp").set_value_accesskit(2.0);
    h.run();
    let two = h.state().summary_chart().expect("a chart").clone();
    let ar = bar(&two, "collectives", "all_reduce forward [tp]").expect("tp all-reduces");
    let report = ferrotron_partitioner::Report::of(h.state().plan().unwrap());
    let c = report.find("all_reduce", "forward", "tp").unwrap();
    assert_eq!(ar.value, c.bytes_per_rank);
    assert!(
        ar.text.starts_with(&format!("×{},", c.count)),
        "{}",
        ar.text
    );
    h.get_by_label(&format!("all_reduce forward [tp]: {}", ar.text));
    h.get_by_label_contains("all_reduce backward [tp]: ×");
    let w1 = bar(&one, "memory", "weights").unwrap().value;
    let w2 = bar(&two, "memory", "weights").unwrap().value;
    assert!(w2 < w1 && w2 * 2 > w1, "weights per rank {w1} → {w2}");
    assert_eq!(w2, report.per_rank.weights_bytes);
    for g in [&two.parameters, &two.memory, &two.collectives] {
        assert_scaled(g);
    }
}

#[test]
fn the_property_panel_shows_flops_and_bytes_full_and_per_rank() {
    use ferrotron_ir::count::node_flops;
    // The unpartitioned model: the full figures must be its op's.
    let g = ferrotron_ir::load_model(
        std::path::Path::new(TINY_GPT),
        &ferrotron_ir::LoadOptions::default(),
    )
    .unwrap();
    let unpartitioned = |name: &str| {
        let n = g
            .order
            .iter()
            .copied()
            .find(|&n| g.nodes[n].name == name)
            .unwrap();
        let node = &g.nodes[n];
        let (m, o) = node_flops(&g, &node.op, &node.outputs);
        m + o
    };

    let mut h = harness(Viewer::new(TINY_GPT, 2, 1, false));
    h.run();
    h.get_by_label("search").focus();
    h.run();
    h.get_by_label("search").type_text("h.0.fc_mm");
    h.run();
    // The column-parallel matmul: each of the 2 ranks does half of it.
    let c = h.state().selected_costs().expect("costs");
    assert_eq!(c.full.flops, unpartitioned("h.0.fc_mm"));
    assert!(c.full.flops > 0);
    assert_eq!(c.per_rank.flops * 2, c.full.flops);
    assert!(c.per_rank.bytes < c.full.bytes);
    assert_eq!(c.per_rank.communicated, 0);
    h.get_by_label_contains("FLOPs full: ");
    h.get_by_label_contains("FLOPs per rank: ");
    h.get_by_label_contains("(full / 2)");
    h.get_by_label_contains("bytes per rank (in + out): ");

    // A layer norm is replicated: every rank repeats all of it.
    let mut v = Viewer::new(TINY_GPT, 2, 1, false);
    select_op(&mut v, "ln_f");
    let c = v.selected_costs().unwrap();
    assert_eq!(c.full.flops, unpartitioned("ln_f"));
    assert_eq!(c.per_rank, c.full);
    assert!(row(&v.selected_properties(), "FLOPs per rank").ends_with("(= full)"));

    // A g all-reduces its whole input and computes nothing.
    let plan = v.plan().unwrap();
    let gname = plan
        .graph
        .order
        .iter()
        .map(|&n| &plan.graph.nodes[n])
        .find(|n| matches!(n.op, ferrotron_ir::Op::G { .. }))
        .map(|n| n.name.clone())
        .expect("a g");
    select_op(&mut v, &gname);
    let c = v.selected_costs().unwrap();
    assert_eq!(c.per_rank.flops, 0);
    let Some(ferrotron_ir::Op::G { x, .. }) = v
        .plan()
        .and_then(|p| {
            p.graph
                .order
                .iter()
                .map(|&n| &p.graph.nodes[n])
                .find(|n| n.name == gname)
        })
        .map(|n| n.op.clone())
    else {
        panic!("g not found")
    };
    let plan = v.plan().unwrap();
    assert_eq!(
        c.per_rank.communicated,
        plan.graph.ty(x).size_bytes() as u128
    );
    assert!(row(&v.selected_properties(), "communicated per rank").ends_with("B"));

    // A collapsed layer sums its ops; a parameter has bytes, split between the ranks.
    let mut v = Viewer::new(TINY_GPT, 2, 1, false);
    let layer = v
        .graph_layout()
        .nodes
        .iter()
        .position(|n| matches!(n.item, ferrotron_visualizer::layout::Item::Layer { .. }))
        .unwrap();
    v.select(Some(layer));
    let c = v.selected_costs().unwrap();
    assert!(c.full.flops > c.per_rank.flops && c.per_rank.flops > 0);
    assert!(c.per_rank.communicated > 0);
    assert!(v.search("c_fc.weight"));
    let c = v.selected_costs().unwrap();
    assert_eq!(c.full.flops, 0);
    assert_eq!(c.per_rank.bytes * 2, c.full.bytes);
    row(&v.selected_properties(), "bytes per rank");
}

#[test]
fn dims_and_pins_reach_the_plan() {
    let load = ferrotron_ir::LoadOptions {
        overrides: vec![("layers".into(), 1)],
        ..Default::default()
    };
    let options = ferrotron_partitioner::PartitionOptions {
        tp: 2,
        pins: vec![(
            "h.0.mlp.c_fc.weight".into(),
            ferrotron_partitioner::Layout::Replicated,
        )],
        ..Default::default()
    };
    let mut v = Viewer::with_options(TINY_GPT, load, options);
    let plan = v.plan().expect("a plan");
    assert_eq!(plan.graph.layers().count(), 1);
    let pinned = |v: &Viewer| {
        let p = v.plan().unwrap();
        p.params
            .iter()
            .find(|s| s.name == "h.0.mlp.c_fc.weight")
            .map(|s| s.layout.tp)
            .unwrap()
    };
    assert_eq!(pinned(&v), ferrotron_partitioner::Layout::Replicated);
    // Live re-partitioning keeps them.
    v.set_tp(4);
    assert_eq!(v.plan().unwrap().graph.layers().count(), 1);
    assert_eq!(pinned(&v), ferrotron_partitioner::Layout::Replicated);
}

#[test]
fn a_72_layer_model_opens_readable_at_the_top() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/megatron-8.3b.ron");
    let mut h = harness(Viewer::new(model, 8, 1, false));
    h.run();
    let opening = h.state().zoom();
    assert!(opening >= 0.6, "opens at zoom {opening}");
    // The top row is on screen, the bottom one below it.
    let v = h.state();
    let nodes = &v.graph_layout().nodes;
    let canvas = v.canvas_rect();
    let top = nodes.iter().position(|n| n.rank == 0).unwrap();
    let bottom = (0..nodes.len()).max_by_key(|&i| nodes[i].rank).unwrap();
    assert!(canvas.contains_rect(v.screen_rect(top).unwrap()));
    assert!(v.screen_rect(bottom).unwrap().top() > canvas.bottom());
    h.state_mut().fit_to_window();
    h.run();
    assert!(
        h.state().zoom() < opening / 4.0,
        "fitted: {}",
        h.state().zoom()
    );
}

#[test]
fn the_schedule_view_draws_the_pipeline_with_its_bubble() {
    let load = ferrotron_ir::LoadOptions {
        overrides: vec![("layers".into(), 4)],
        ..Default::default()
    };
    let options = ferrotron_partitioner::PartitionOptions {
        pp: 2,
        micro_batches: 2,
        ..Default::default()
    };
    let mut h = harness(Viewer::with_options(TINY_GPT, load, options));
    h.run();
    // The graph's boxes carry their stage's band, and the legend says which stage is which.
    h.get_by_label_contains("band: stage 1 (rank 1)");
    h.get_by_label("schedule").click();
    h.run();
    assert_eq!(h.state().view, ferrotron_visualizer::app::View::Schedule);
    h.get_by_label_contains("bubble (P − 1)/(M + P − 1) = 1/3 = 33.3%");
    h.get_by_label_contains("pp = 2, M = 2 micro-batches, 1F1B schedule");
    h.get_by_label("graph").click();
    h.run();
    assert_eq!(h.state().view, ferrotron_visualizer::app::View::Graph);
}
