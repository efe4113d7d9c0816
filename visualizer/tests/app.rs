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
