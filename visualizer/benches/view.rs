//! Benchmark: the viewer on the 72-layer Megatron 8.3B (`models/megatron-8.3b.ron`, tp = 8).
//! `cargo bench -p ferrotron-visualizer --bench view`; results go in BENCHMARKS.md.
//!
//! 1. **Layout**: [`layout`] of the plan, collapsed (how the window opens) and with every layer
//!    expanded, forward and forward + backward; plus what opening the window costs before the
//!    first frame ([`Viewer::new`]: load, partition, report, node costs, layout).
//! 2. **Frames, headless**: the viewer's UI pass ([`Viewer::show`] in an `egui::Context`) and
//!    egui's tessellation into triangles, while the graph pans, at the opening view and fitted
//!    to a 1400 × 900 window. This is the CPU work of a frame short of rasterising: the real
//!    window's frame time on Mesa's software renderer, rasterising included, comes from
//!    `ferrotron view ... --bench-frames N` under Xvfb (see BENCHMARKS.md).

use eframe::egui;
use ferrotron_ir::{load_model, LoadOptions};
use ferrotron_partitioner::{partition, PartitionOptions};
use ferrotron_visualizer::app::{pan_step, FrameStats, Viewer};
use ferrotron_visualizer::layout::{layout, LayoutOptions};
use std::path::Path;
use std::time::{Duration, Instant};

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/megatron-8.3b.ron");
    let options = PartitionOptions {
        tp: 8,
        ..PartitionOptions::default()
    };
    let graph = load_model(&model, &LoadOptions::default()).expect("the model loads");
    let plan = partition(&graph, &options).expect("the model partitions");
    println!(
        "megatron-8.3b, tp = 8: {} layers, {} nodes ({} forward); median of 21 runs (3 when slow)",
        plan.graph.layers().count(),
        plan.graph.order.len(),
        plan.backward_start
    );
    println!(
        "{:<44} {:>7} {:>7} {:>11}",
        "layout", "boxes", "edges", "median ms"
    );
    for (name, backward, expand_all, expand) in [
        ("collapsed, forward (opening view)", false, false, vec![]),
        ("collapsed, forward + backward", true, false, vec![]),
        (
            "layers 0 and 36 expanded, forward",
            false,
            false,
            vec![0, 36],
        ),
        (
            "layers 0 and 36 expanded, forward + backward",
            true,
            false,
            vec![0, 36],
        ),
        ("expanded, forward", false, true, vec![]),
        ("expanded, forward + backward", true, true, vec![]),
    ] {
        let opts = LayoutOptions {
            backward,
            expand_all,
            expand,
            ..LayoutOptions::default()
        };
        let mut times = Vec::new();
        let mut sizes = (0, 0);
        // 21 runs, or 3 of a layout slower than a fifth of a second.
        let mut runs = 21;
        while times.len() < runs {
            let t = Instant::now();
            let l = layout(&plan, &opts);
            times.push(t.elapsed());
            sizes = (l.nodes.len(), l.edges.len());
            if times[0] > Duration::from_millis(200) {
                runs = 3;
            }
        }
        println!(
            "{:<44} {:>7} {:>7} {:>11.2}",
            name,
            sizes.0,
            sizes.1,
            median(times).as_secs_f64() * 1e3
        );
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let v = Viewer::new(&model, 8, 1, false);
        times.push(t.elapsed());
        assert!(v.plan().is_some());
    }
    println!(
        "opening (load, partition, report, costs, layout): {:.1} ms (median of 5)",
        median(times).as_secs_f64() * 1e3
    );

    println!("\nheadless frames while panning, 1400 × 900 points (UI pass + tessellation):");
    for (name, backward) in [("forward", false), ("forward + backward", true)] {
        for fit in [false, true] {
            let mut viewer = Viewer::new(&model, 8, 1, false);
            if backward {
                viewer.set_backward(true);
            }
            let ctx = egui::Context::default();
            let input = || egui::RawInput {
                screen_rect: Some(egui::Rect::from_min_size(
                    egui::Pos2::ZERO,
                    egui::vec2(1400.0, 900.0),
                )),
                ..Default::default()
            };
            // Warm up (fonts, the first layout), and apply the fit.
            for _ in 0..10 {
                let out = ctx.run_ui(input(), |ui| viewer.show(ui));
                let _ = ctx.tessellate(out.shapes, out.pixels_per_point);
            }
            if fit {
                viewer.fit_to_window();
                let out = ctx.run_ui(input(), |ui| viewer.show(ui));
                let _ = ctx.tessellate(out.shapes, out.pixels_per_point);
            }
            let (mut ui_pass, mut total) = (Vec::new(), Vec::new());
            let mut triangles = 0;
            for k in 0..300 {
                viewer.pan_by(pan_step(k));
                let t = Instant::now();
                let out = ctx.run_ui(input(), |ui| viewer.show(ui));
                let ui_t = t.elapsed().as_secs_f64();
                let prims = ctx.tessellate(out.shapes, out.pixels_per_point);
                total.push(t.elapsed().as_secs_f64());
                ui_pass.push(ui_t);
                triangles = prims
                    .iter()
                    .map(|p| match &p.primitive {
                        egui::epaint::Primitive::Mesh(m) => m.indices.len() / 3,
                        egui::epaint::Primitive::Callback(_) => 0,
                    })
                    .sum::<usize>();
            }
            let view = if fit {
                "fitted to the window"
            } else {
                "opening view"
            };
            println!(
                "{name}, {view} (zoom {:.3}, {} boxes, {triangles} triangles):",
                viewer.zoom(),
                viewer.graph_layout().nodes.len()
            );
            if let (Some(u), Some(t)) = (FrameStats::of(&ui_pass), FrameStats::of(&total)) {
                println!("  UI pass              {u}");
                println!("  UI + tessellation    {t}");
            }
        }
    }
}
