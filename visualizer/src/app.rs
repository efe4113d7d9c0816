//! The desktop viewer: the [`GraphLayout`] of a plan drawn with egui, the same colours and labels
//! as the SVG export ([`TpClass`], [`collective_label`], [`shape_text`], [`export::title`]), a
//! control panel (tp, dp, sequence parallelism, forward or forward + backward, search), a
//! property panel for the selected box (with its FLOPs and bytes, full and per rank, from
//! [`stats`]) and the plan's summary ([`Report`]) drawn as a small bar chart. With pipeline
//! stages every box has a band in its stage's colour, and the schedule view ([`View::Schedule`])
//! draws the pipeline's timeline as the SVG of [`schedule`] does.
//!
//! All state lives in [`Viewer`]; [`Viewer::show`] draws it into any [`egui::Ui`], so the tests
//! drive it headless with `egui_kittest`, and [`run`] opens it in a native window (OpenGL through
//! glow, which Mesa's llvmpipe renders in software). [`RunOptions::bench_frames`] times the
//! window's frames while the graph pans.

use crate::export::{self, ExportOptions, STAGE_BAND_W};
use crate::layout::{
    collective_label, is_collective_like, layout, shape_text, GraphLayout, Item, LayoutOptions,
    TpClass, LINE_H,
};
use crate::schedule::{self, stage_colour, stage_label};
use crate::stats::{self, human_bytes, human_count, Cost, Costs, NodeCosts, SummaryChart};
use eframe::egui::{
    self, Align2, Color32, FontId, Pos2, Rect, Sense, Shape, Stroke, StrokeKind, Vec2,
};
use ferrotron_ir::{load_model, Graph, LoadOptions, ValueId};
use ferrotron_partitioner::{partition, PartitionOptions, Plan, Report};
use std::path::{Path, PathBuf};

/// Outline of collectives (the SVG export's purple).
const COLLECTIVE_STROKE: Color32 = Color32::from_rgb(0x7b, 0x2c, 0xbf);
/// Fill of a collapsed layer.
const LAYER_FILL: Color32 = Color32::from_rgb(0xf7, 0xf3, 0xff);
const INPUT_FILL: Color32 = Color32::WHITE;
const EDGE: Color32 = Color32::from_rgb(0x66, 0x66, 0x66);
/// The canvas's background.
const CANVAS: Color32 = Color32::WHITE;
const SELECTED: Color32 = Color32::from_rgb(0xe0, 0x1e, 0x5a);
/// Under the schedule's hatching.
const IDLE_FILL: Color32 = Color32::WHITE;

/// Parses the SVG export's `#rrggbb` colours.
fn hex(c: &str) -> Color32 {
    let v = u32::from_str_radix(c.trim_start_matches('#'), 16).unwrap_or(0xcccccc);
    Color32::from_rgb((v >> 16) as u8, (v >> 8) as u8, v as u8)
}

/// A [`TpClass`]'s colour, as in the SVG.
pub fn class_colour(c: TpClass) -> Color32 {
    hex(c.colour())
}

/// What the central area draws.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum View {
    /// The plan's graph.
    #[default]
    Graph,
    /// The pipeline schedule in time: a row per stage, a box per step.
    Schedule,
}

/// What is loaded: a model (re-partitioned on every change) or a saved plan (fixed).
enum Source {
    Model(Box<Graph>),
    Plan,
    None,
}

/// The viewer's state.
pub struct Viewer {
    /// The model (or plan) file.
    pub model: PathBuf,
    /// Tensor-parallel degree, data-parallel degree, sequence parallelism.
    pub options: PartitionOptions,
    /// Draw the backward pass too.
    pub backward: bool,
    /// The graph or the pipeline schedule.
    pub view: View,
    /// Layers drawn op by op.
    pub expand: Vec<usize>,
    /// How model files are read (`--dim` overrides).
    load_options: LoadOptions,
    source: Source,
    /// The plan, or why there is none (a located model-file error or the partitioner's error).
    plan: Result<Plan, String>,
    report: Option<Report>,
    /// The plan's node costs and summary chart.
    costs: Option<NodeCosts>,
    chart: Option<SummaryChart>,
    layout: GraphLayout,
    /// The selected box, by what it stands for (it survives re-layouts).
    selected: Option<Item>,
    /// The tensor-parallel rank whose parameter slice the property panel shows.
    pub rank: u64,
    /// The search box.
    pub search: String,
    /// Screen offset of the layout's origin from the canvas's top left.
    pan: Vec2,
    /// Screen pixels per layout unit.
    zoom: f32,
    /// How to frame the graph at the next frame, if it is to be re-framed.
    fit_pending: Option<Fit>,
    /// The last canvas rectangle.
    canvas: Rect,
    /// Paint the panels' and the canvas's backgrounds. The window turns this off, clears the
    /// frame to white and uses egui's light theme instead: a software renderer shades every
    /// pixel of a filled rectangle, and those window-sized fills cost more than all the rest
    /// of a frame.
    pub paint_background: bool,
}

/// The smallest zoom the viewer opens at: box labels are drawn from 0.35, edge labels from 0.6.
const READABLE_ZOOM: f32 = 0.6;

/// How to frame the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fit {
    /// All of it, however small.
    All,
    /// All of it if that is readable, else its top at a readable zoom.
    Opening,
}

fn empty_layout() -> GraphLayout {
    GraphLayout {
        nodes: Vec::new(),
        edges: Vec::new(),
        ranks: 0,
        width: 0.0,
        height: 0.0,
    }
}

impl Viewer {
    /// Loads `model` (a model file, or failing that a saved plan) and partitions it; errors end
    /// up in the error panel, never in a panic.
    pub fn new(model: impl Into<PathBuf>, tp: u64, dp: u64, sequence_parallel: bool) -> Viewer {
        let options = PartitionOptions {
            tp,
            dp,
            sequence_parallel,
            ..PartitionOptions::default()
        };
        Viewer::with_options(model, LoadOptions::default(), options)
    }

    /// Like [`Self::new`], with every load option (`--dim` overrides) and partition option
    /// (`--pin`, `--vocab-multiple`) that `ferrotron partition` takes.
    pub fn with_options(
        model: impl Into<PathBuf>,
        load_options: LoadOptions,
        options: PartitionOptions,
    ) -> Viewer {
        let model = model.into();
        let mut v = Viewer {
            options,
            backward: false,
            view: View::Graph,
            expand: Vec::new(),
            load_options,
            source: Source::None,
            plan: Err(String::new()),
            report: None,
            costs: None,
            chart: None,
            layout: empty_layout(),
            selected: None,
            rank: 0,
            search: String::new(),
            pan: Vec2::ZERO,
            zoom: 1.0,
            fit_pending: Some(Fit::Opening),
            canvas: Rect::from_min_size(Pos2::ZERO, Vec2::new(800.0, 600.0)),
            paint_background: true,
            model: model.clone(),
        };
        v.load(&model);
        v
    }

    /// (Re)loads a file.
    pub fn load(&mut self, path: &Path) {
        self.model = path.to_path_buf();
        self.selected = None;
        self.expand.clear();
        match load_model(path, &self.load_options) {
            Ok(g) => {
                self.source = Source::Model(Box::new(g));
                self.repartition();
            }
            Err(model_err) => match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    Plan::from_ron(&text, &path.display().to_string()).map_err(|e| e.to_string())
                }) {
                Ok(plan) => {
                    self.options = plan.options.clone();
                    self.source = Source::Plan;
                    self.set_plan(Ok(plan));
                }
                Err(_) => {
                    self.source = Source::None;
                    self.set_plan(Err(model_err.to_string()));
                }
            },
        }
    }

    /// Whether tp, dp and sequence parallelism can be changed (a model, not a saved plan).
    pub fn can_repartition(&self) -> bool {
        matches!(self.source, Source::Model(_))
    }

    /// Re-runs the partitioner with [`Self::options`].
    pub fn repartition(&mut self) {
        if let Source::Model(g) = &self.source {
            let plan = partition(g, &self.options).map_err(|e| e.to_string());
            self.set_plan(plan);
        }
    }

    fn set_plan(&mut self, plan: Result<Plan, String>) {
        self.report = plan.as_ref().ok().map(Report::of);
        self.costs = plan.as_ref().ok().map(NodeCosts::new);
        self.chart = match (&plan, &self.report) {
            (Ok(p), Some(r)) => Some(stats::summary_chart(p, r)),
            _ => None,
        };
        self.plan = plan;
        self.rank = self.rank.min(self.options.tp.max(1) - 1);
        self.relayout();
        self.fit_pending = Some(Fit::Opening);
    }

    /// Lays the plan out again (after a change of view or of the expanded layers).
    pub fn relayout(&mut self) {
        self.layout = match &self.plan {
            Ok(p) => layout(p, &self.layout_options()),
            Err(_) => empty_layout(),
        };
    }

    fn layout_options(&self) -> LayoutOptions {
        LayoutOptions {
            backward: self.backward,
            expand: self.expand.clone(),
            ..LayoutOptions::default()
        }
    }

    /// Sets the tensor-parallel degree and re-partitions.
    pub fn set_tp(&mut self, tp: u64) {
        self.options.tp = tp;
        self.repartition();
    }

    /// Sets the data-parallel degree and re-partitions.
    pub fn set_dp(&mut self, dp: u64) {
        self.options.dp = dp;
        self.repartition();
    }

    /// Switches sequence parallelism and re-partitions.
    pub fn set_sequence_parallel(&mut self, on: bool) {
        self.options.sequence_parallel = on;
        self.repartition();
    }

    /// Switches between the forward and the forward + backward graph.
    pub fn set_backward(&mut self, backward: bool) {
        self.backward = backward;
        self.relayout();
        self.fit_pending = Some(Fit::Opening);
    }

    /// The plan, if there is one.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref().ok()
    }

    /// The error shown instead of a graph, if any.
    pub fn error(&self) -> Option<&str> {
        self.plan.as_ref().err().map(String::as_str)
    }

    /// The current layout.
    pub fn graph_layout(&self) -> &GraphLayout {
        &self.layout
    }

    /// The index of the selected box in [`Self::graph_layout`].
    pub fn selected(&self) -> Option<usize> {
        let s = self.selected.as_ref()?;
        self.layout.nodes.iter().position(|n| &n.item == s)
    }

    /// Selects a box by index.
    pub fn select(&mut self, i: Option<usize>) {
        self.selected = i
            .and_then(|i| self.layout.nodes.get(i))
            .map(|n| n.item.clone());
    }

    /// Expands a collapsed layer.
    pub fn expand_layer(&mut self, index: usize) {
        if !self.expand.contains(&index) {
            self.expand.push(index);
            self.relayout();
        }
    }

    /// Collapses every layer.
    pub fn collapse_all(&mut self) {
        self.expand.clear();
        self.relayout();
    }

    fn item_name(&self, item: &Item) -> String {
        let Ok(plan) = &self.plan else {
            return String::new();
        };
        let g = &plan.graph;
        match item {
            Item::Op(n) => g.nodes[*n].name.clone(),
            Item::Param(p) => g.params[*p].name.clone(),
            Item::Input(v) => g.values[*v].name.clone(),
            Item::Layer { .. } => self
                .layout
                .nodes
                .iter()
                .find(|n| &n.item == item)
                .and_then(|n| n.lines.first().cloned())
                .unwrap_or_default(),
        }
    }

    /// Selects the first box whose name contains `text`; an op inside a collapsed layer expands
    /// that layer. Returns whether something was found.
    pub fn search(&mut self, text: &str) -> bool {
        self.search = text.to_string();
        let text = text.trim();
        if text.is_empty() {
            return false;
        }
        let items: Vec<Item> = self.layout.nodes.iter().map(|n| n.item.clone()).collect();
        if let Some(item) = items
            .into_iter()
            .find(|it| self.item_name(it).contains(text))
        {
            self.selected = Some(item);
            self.centre_on_selected();
            return true;
        }
        // An op hidden in a collapsed layer.
        let Ok(plan) = &self.plan else {
            return false;
        };
        let hidden = plan
            .graph
            .order
            .iter()
            .copied()
            .find(|&n| plan.graph.nodes[n].name.contains(text));
        let Some(n) = hidden else {
            return self.search_in_layers(text);
        };
        let layer = self.layout.nodes.iter().find_map(|b| match &b.item {
            Item::Layer { index, nodes, .. } if nodes.contains(&n) => Some(*index),
            _ => None,
        });
        if let Some(index) = layer {
            self.expand_layer(index);
            self.selected = Some(Item::Op(n));
            self.centre_on_selected();
            return self.selected().is_some();
        }
        false
    }

    /// A parameter inside a collapsed layer: expand the layers one by one until its box shows.
    fn search_in_layers(&mut self, text: &str) -> bool {
        let layers: Vec<usize> = self
            .layout
            .nodes
            .iter()
            .filter_map(|b| match &b.item {
                Item::Layer { index, .. } => Some(*index),
                _ => None,
            })
            .collect();
        for index in layers {
            if self.expand.contains(&index) {
                continue;
            }
            self.expand.push(index);
            self.relayout();
            let found = self
                .layout
                .nodes
                .iter()
                .map(|n| n.item.clone())
                .find(|it| self.item_name(it).contains(text));
            if let Some(item) = found {
                self.selected = Some(item);
                self.centre_on_selected();
                return true;
            }
            self.expand.pop();
        }
        self.relayout();
        false
    }

    fn centre_on_selected(&mut self) {
        if let Some(i) = self.selected() {
            let (cx, cy) = self.layout.nodes[i].centre();
            self.fit_pending = None;
            self.pan = self.canvas.size() / 2.0 - Vec2::new(cx as f32, cy as f32) * self.zoom;
        }
    }

    /// The property panel's rows for the selected box: op, name, layout, shapes, and for a
    /// parameter the slice of the full tensor that tensor-parallel rank [`Self::rank`] holds.
    pub fn selected_properties(&self) -> Vec<(String, String)> {
        let (Ok(plan), Some(item)) = (&self.plan, &self.selected) else {
            return Vec::new();
        };
        let g = &plan.graph;
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        let value_rows = |row: &mut dyn FnMut(&str, String), v: ValueId, prefix: &str| {
            let layout = plan.layouts[v];
            let local = g.values[v].ty.shape.sizes().to_vec();
            let full = plan.mesh.global_sizes(&local, layout);
            let class = TpClass::of(plan, v).description();
            row(&format!("{prefix}layout"), format!("{class} ({layout})"));
            row(&format!("{prefix}local shape"), shape_text(plan, v));
            let full: Vec<String> = full.iter().map(|s| s.to_string()).collect();
            row(
                &format!("{prefix}full shape"),
                format!("[{}]", full.join(",")),
            );
            row(
                &format!("{prefix}dtype"),
                format!("{:?}", g.values[v].ty.dtype).to_lowercase(),
            );
        };
        match item {
            Item::Op(n) => {
                let nd = &g.nodes[*n];
                row("name", nd.name.clone());
                row("op", nd.op.mnemonic().to_string());
                if let Some(c) = collective_label(&nd.op) {
                    row("collective", c);
                }
                let idx = g.order.iter().position(|&m| m == *n).unwrap_or(0);
                let dir = if idx >= plan.backward_start {
                    "backward"
                } else {
                    "forward"
                };
                row("pass", dir.to_string());
                let many = nd.outputs.len() > 1;
                for (i, &v) in nd.outputs.iter().enumerate() {
                    let prefix = if many {
                        format!("output {i} ")
                    } else {
                        String::new()
                    };
                    value_rows(&mut row, v, &prefix);
                }
                if let Some(c) = self.selected_costs() {
                    cost_rows(&mut row, c);
                }
            }
            Item::Param(p) => {
                let pd = &g.params[*p];
                let shard = plan.shard(*p);
                row("name", pd.name.clone());
                row("op", "parameter".to_string());
                value_rows(&mut row, pd.value, "");
                if let Some(c) = self.selected_costs() {
                    bytes_rows(&mut row, c, "");
                }
                let tp = plan.mesh.tp;
                let slice = match shard.ranges(self.rank, tp) {
                    None => "all of it (replicated)".to_string(),
                    Some((d, ranges)) => {
                        let r: Vec<String> = ranges
                            .iter()
                            .map(|r| format!("{}..{}", r.start, r.end))
                            .collect();
                        format!("dim {d}: {}", r.join(", "))
                    }
                };
                row(&format!("rank {} holds", self.rank), slice);
                if shard.blocks > 1 {
                    row("blocks", shard.blocks.to_string());
                }
            }
            Item::Input(v) => {
                row("name", g.values[*v].name.clone());
                row("op", "input".to_string());
                value_rows(&mut row, *v, "");
                if let Some(c) = self.selected_costs() {
                    bytes_rows(&mut row, c, "");
                }
            }
            Item::Layer {
                index,
                nodes,
                collectives,
                backward,
                ..
            } => {
                row("name", self.item_name(item));
                row("op", "layer (collapsed)".to_string());
                row("layer", index.to_string());
                row(
                    "pass",
                    if *backward { "backward" } else { "forward" }.to_string(),
                );
                row("ops", nodes.len().to_string());
                let c: Vec<String> = collectives
                    .iter()
                    .map(|(k, n)| format!("{k} ×{n}"))
                    .collect();
                row(
                    "collectives",
                    if c.is_empty() {
                        "none".to_string()
                    } else {
                        c.join(", ")
                    },
                );
                if let Some(c) = self.selected_costs() {
                    cost_rows(&mut row, c);
                }
            }
        }
        rows
    }

    /// The FLOPs and bytes of the selected box, full and per rank: an op's own, a collapsed
    /// layer's summed over its ops, a parameter's or input's bytes (no FLOPs).
    pub fn selected_costs(&self) -> Option<Costs> {
        let (Ok(plan), Some(costs), Some(item)) = (&self.plan, &self.costs, &self.selected) else {
            return None;
        };
        let value = |v: ValueId| {
            let (full, per_rank) = costs.value_bytes(plan, v);
            let c = |b: u64| Cost {
                bytes: b as u128,
                ..Cost::default()
            };
            Costs {
                full: c(full),
                per_rank: c(per_rank),
            }
        };
        Some(match item {
            Item::Op(n) => costs.node(plan, *n),
            Item::Layer { nodes, .. } => costs.nodes(plan, nodes),
            Item::Param(p) => value(plan.graph.params[*p].value),
            Item::Input(v) => value(*v),
        })
    }

    /// The summary chart's bars (what [`Self::show`] draws in the summary panel).
    pub fn summary_chart(&self) -> Option<&SummaryChart> {
        self.chart.as_ref()
    }

    /// The summary panel's rows: parameters and memory per rank, collectives per step by kind.
    pub fn summary(&self) -> Vec<(String, String)> {
        let Some(r) = &self.report else {
            return Vec::new();
        };
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
        let mut rows = vec![
            (
                "parameters per rank".to_string(),
                r.per_rank.parameters.to_string(),
            ),
            ("memory per rank".to_string(), mib(r.per_rank.memory_bytes)),
            ("weights".to_string(), mib(r.per_rank.weights_bytes)),
            ("gradients".to_string(), mib(r.per_rank.gradients_bytes)),
            ("optimizer".to_string(), mib(r.per_rank.optimizer_bytes)),
            ("activations".to_string(), mib(r.per_rank.activations_bytes)),
            (
                "nodes".to_string(),
                format!("{} forward, {} backward", r.nodes.0, r.nodes.1),
            ),
        ];
        if r.collectives.is_empty() {
            rows.push(("collectives".to_string(), "none".to_string()));
        }
        for c in &r.collectives {
            rows.push((
                format!("{} {} [{}]", c.kind, c.direction, c.axis),
                format!("×{}, {}", c.count, mib(c.bytes_per_rank)),
            ));
        }
        rows
    }

    /// Draws the whole viewer into `ui`: the control, property and summary panel on the left,
    /// the graph (or the error) in the middle.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let mut side = egui::Frame::side_top_panel(ui.style());
        if !self.paint_background {
            side = side.fill(Color32::TRANSPARENT);
        }
        egui::Panel::left("ferrotron-controls")
            .frame(side)
            .default_size(320.0)
            .resizable(true)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.side_panel(ui));
            });
        let mut central = egui::Frame::central_panel(ui.style());
        if !self.paint_background && self.error().is_none() {
            // The frame was cleared to the canvas's white.
            central = central.fill(Color32::TRANSPARENT);
        }
        egui::CentralPanel::default_margins()
            .frame(central)
            .show(ui, |ui| match self.error() {
                Some(e) => {
                    let e = e.to_string();
                    ui.heading("error");
                    ui.label(egui::RichText::new(e).color(ui.visuals().error_fg_color));
                }
                None if self.view == View::Schedule => self.schedule_view(ui),
                None => self.canvas(ui),
            });
    }

    fn side_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("ferrotron");
        ui.label(self.model.display().to_string());
        if let Ok(plan) = &self.plan {
            let opts = ExportOptions {
                layout: self.layout_options(),
            };
            ui.label(export::title(plan, &opts));
        }
        ui.separator();

        let editable = self.can_repartition();
        let mut tp = self.options.tp;
        let mut dp = self.options.dp;
        let mut sp = self.options.sequence_parallel;
        egui::Grid::new("mesh").num_columns(2).show(ui, |ui| {
            let l = ui.label("tp");
            let r = ui.add_enabled(editable, egui::DragValue::new(&mut tp).range(1..=1024));
            let r = r.labelled_by(l.id);
            if r.changed() && tp != self.options.tp {
                self.set_tp(tp);
            }
            ui.end_row();
            let l = ui.label("dp");
            let r = ui.add_enabled(editable, egui::DragValue::new(&mut dp).range(1..=4096));
            if r.labelled_by(l.id).changed() && dp != self.options.dp {
                self.set_dp(dp);
            }
            ui.end_row();
        });
        if ui
            .add_enabled(editable, egui::Checkbox::new(&mut sp, "sequence parallel"))
            .changed()
        {
            self.set_sequence_parallel(sp);
        }
        if !editable && self.plan.is_ok() {
            ui.label("a saved plan: tp, dp and sequence parallelism are fixed");
        }
        ui.horizontal(|ui| {
            let mut bw = self.backward;
            ui.radio_value(&mut bw, false, "forward");
            ui.radio_value(&mut bw, true, "forward + backward");
            if bw != self.backward {
                self.set_backward(bw);
            }
        });
        ui.horizontal(|ui| {
            ui.radio_value(&mut self.view, View::Graph, "graph");
            let pipelined = self.plan().is_some_and(|p| p.pipeline.is_some());
            ui.add_enabled_ui(pipelined, |ui| {
                ui.radio_value(&mut self.view, View::Schedule, "schedule")
                    .on_disabled_hover_text("needs pipeline stages (--pp) or micro-batches");
            });
        });
        ui.horizontal(|ui| {
            if ui.button("fit to window").clicked() {
                self.fit_to_window();
            }
            if ui.button("collapse all").clicked() {
                self.collapse_all();
            }
        });
        ui.horizontal(|ui| {
            let l = ui.label("search");
            let mut text = self.search.clone();
            let r = ui.text_edit_singleline(&mut text).labelled_by(l.id);
            if r.changed() {
                self.search(&text);
            }
        });
        ui.separator();

        ui.heading("legend");
        for c in TpClass::ALL {
            ui.horizontal(|ui| {
                let (rect, _) = ui.allocate_exact_size(Vec2::splat(12.0), Sense::hover());
                ui.painter().rect(
                    rect,
                    2.0,
                    class_colour(c),
                    Stroke::new(1.0, Color32::DARK_GRAY),
                    StrokeKind::Inside,
                );
                ui.label(c.description());
            });
        }
        ui.horizontal(|ui| {
            let (rect, _) = ui.allocate_exact_size(Vec2::splat(12.0), Sense::hover());
            ui.painter().rect(
                rect,
                2.0,
                Color32::WHITE,
                Stroke::new(2.5, COLLECTIVE_STROKE),
                StrokeKind::Inside,
            );
            ui.label("collective (f, g, all-reduce, ...)");
        });
        if let Some(plan) = self.plan() {
            let p = plan.pipeline.as_ref().map_or(0, |p| p.stages);
            for st in (0..p).filter(|_| p > 1) {
                ui.horizontal(|ui| {
                    let (rect, _) = ui.allocate_exact_size(Vec2::new(5.0, 12.0), Sense::hover());
                    ui.painter().rect_filled(rect, 0.0, hex(stage_colour(st)));
                    ui.label(format!("band: {}", stage_label(plan, st)));
                });
            }
        }
        ui.separator();

        ui.heading("selected");
        let props = self.selected_properties();
        if props.is_empty() {
            ui.label("nothing selected: click a box or search");
        }
        for (k, v) in &props {
            ui.label(format!("{k}: {v}"));
        }
        if let Some(Item::Param(_)) = &self.selected {
            let tp = self.plan().map(|p| p.mesh.tp).unwrap_or(1);
            ui.horizontal(|ui| {
                let l = ui.label("rank");
                ui.add(egui::DragValue::new(&mut self.rank).range(0..=tp.max(1) - 1))
                    .labelled_by(l.id);
            });
        }
        if let Some(Item::Layer { index, .. }) = &self.selected {
            let index = *index;
            if ui.button("expand layer").clicked() {
                self.expand_layer(index);
                self.selected = None;
            }
        }
        ui.separator();

        ui.heading("summary");
        if let Some(r) = &self.report {
            ui.label(format!(
                "nodes: {} forward, {} backward",
                r.nodes.0, r.nodes.1
            ));
        }
        match &self.chart {
            Some(chart) => draw_chart(ui, chart),
            None => {
                ui.label("no plan");
            }
        }
    }

    /// The schedule view: the pipeline's timeline (what [`schedule::schedule_svg`] draws), a row
    /// per stage scaled to the panel's width, the idle time hatched.
    fn schedule_view(&mut self, ui: &mut egui::Ui) {
        let Ok(plan) = &self.plan else {
            return;
        };
        let (pipe, t) = match schedule::plan_timeline(plan) {
            Ok(x) => x,
            Err(e) => {
                ui.label(e);
                return;
            }
        };
        ui.heading(schedule::schedule_title(plan, pipe));
        ui.label(schedule::bubble_text(pipe, &t));
        ui.horizontal(|ui| {
            for (fill, text) in [
                (hex(schedule::FORWARD_FILL[0]), "forward of micro-batch n"),
                (hex(schedule::BACKWARD_FILL[0]), "backward of micro-batch n"),
                (IDLE_FILL, "idle (the bubble)"),
            ] {
                let (rect, _) = ui.allocate_exact_size(Vec2::new(24.0, 14.0), Sense::hover());
                ui.painter().rect(
                    rect,
                    0.0,
                    fill,
                    Stroke::new(1.0, Color32::from_gray(70)),
                    StrokeKind::Inside,
                );
                ui.label(text);
            }
        });
        let (response, painter) = ui.allocate_painter(ui.available_size(), Sense::hover());
        let rect = response.rect;
        if self.paint_background {
            painter.rect_filled(rect, 0.0, CANVAS);
        }
        let font = FontId::monospace(11.0);
        let ink = Color32::from_gray(30);
        let labels: Vec<String> = (0..pipe.stages).map(|s| stage_label(plan, s)).collect();
        let label_w = labels
            .iter()
            .map(|l| {
                painter
                    .layout_no_wrap(l.clone(), font.clone(), ink)
                    .size()
                    .x
            })
            .fold(0.0, f32::max)
            + 16.0;
        let (left, right) = (rect.left() + 8.0 + label_w, rect.right() - 90.0);
        let makespan = if t.makespan > 0.0 { t.makespan } else { 1.0 };
        let scale = ((right - left).max(40.0) as f64 / makespan) as f32;
        let x_at = |time: f64| left + time as f32 * scale;
        let (row_h, gap) = (28.0, 8.0);
        let mut y = rect.top() + 12.0;
        for (stage, slots) in t.stages.iter().enumerate() {
            let row = Rect::from_min_max(Pos2::new(left, y), Pos2::new(x_at(makespan), y + row_h));
            painter.text(
                Pos2::new(left - 8.0, row.center().y),
                Align2::RIGHT_CENTER,
                &labels[stage],
                font.clone(),
                ink,
            );
            // Idle: the row hatched; the steps cover what is not idle.
            painter.rect_filled(row, 0.0, IDLE_FILL);
            let hatch = painter.with_clip_rect(row.intersect(rect));
            let mut hx = row.left() - row_h;
            while hx < row.right() {
                hatch.line_segment(
                    [
                        Pos2::new(hx, row.bottom()),
                        Pos2::new(hx + row_h, row.top()),
                    ],
                    Stroke::new(1.0, hex(schedule::IDLE_STROKE)),
                );
                hx += 7.0;
            }
            for b in slots {
                let r = Rect::from_min_max(
                    Pos2::new(x_at(b.start), row.top()),
                    Pos2::new(x_at(b.end), row.bottom()),
                );
                painter.rect(
                    r,
                    0.0,
                    hex(schedule::step_fill(b.step, b.chunk, pipe.virtual_stages)),
                    Stroke::new(0.8, Color32::from_gray(50)),
                    StrokeKind::Inside,
                );
                if r.width() >= 10.0 {
                    painter.text(
                        r.center(),
                        Align2::CENTER_CENTER,
                        schedule::step_text(b.step),
                        font.clone(),
                        ink,
                    );
                }
            }
            painter.rect_stroke(
                row,
                0.0,
                Stroke::new(1.0, Color32::from_gray(140)),
                StrokeKind::Outside,
            );
            painter.text(
                Pos2::new(row.right() + 8.0, row.center().y),
                Align2::LEFT_CENTER,
                format!("idle {:.1}%", 100.0 * t.idle_fraction(stage)),
                font.clone(),
                Color32::from_gray(90),
            );
            y += row_h + gap;
        }
        // The time axis.
        let axis = y + 2.0;
        let stroke = Stroke::new(1.0, Color32::from_gray(70));
        painter.line_segment(
            [Pos2::new(left, axis), Pos2::new(x_at(makespan), axis)],
            stroke,
        );
        let step = schedule::tick_step(makespan, 10.0);
        let mut k = 0u32;
        while f64::from(k) * step <= makespan * (1.0 + 1e-9) {
            let tv = f64::from(k) * step;
            let x = x_at(tv);
            painter.line_segment([Pos2::new(x, axis), Pos2::new(x, axis + 5.0)], stroke);
            painter.text(
                Pos2::new(x, axis + 7.0),
                Align2::CENTER_TOP,
                format!("{}", (tv * 100.0).round() / 100.0),
                font.clone(),
                ink,
            );
            k += 1;
        }
        painter.text(
            Pos2::new((left + x_at(makespan)) / 2.0, axis + 24.0),
            Align2::CENTER_TOP,
            "time (1 = a stage's mean forward of one micro-batch)",
            font,
            ink,
        );
    }

    fn to_screen(&self, origin: Pos2, x: f64, y: f64) -> Pos2 {
        origin + self.pan + Vec2::new(x as f32, y as f32) * self.zoom
    }

    /// Fits the whole graph to the canvas at the next frame.
    pub fn fit_to_window(&mut self) {
        self.fit_pending = Some(Fit::All);
    }

    /// Moves the graph by `delta` screen pixels (what dragging does).
    pub fn pan_by(&mut self, delta: Vec2) {
        self.pan += delta;
    }

    /// Screen pixels per layout unit.
    pub fn zoom(&self) -> f32 {
        self.zoom
    }

    /// The graph's area at the last frame, in screen points.
    pub fn canvas_rect(&self) -> Rect {
        self.canvas
    }

    /// Where box `i` of [`Self::graph_layout`] is drawn, in screen points.
    pub fn screen_rect(&self, i: usize) -> Option<Rect> {
        let n = self.layout.nodes.get(i)?;
        let origin = self.canvas.min;
        Some(Rect::from_min_max(
            self.to_screen(origin, n.x, n.y),
            self.to_screen(origin, n.x + n.w, n.y + n.h),
        ))
    }

    fn fit(&mut self, rect: Rect, fit: Fit) {
        let (w, h) = (self.layout.width as f32, self.layout.height as f32);
        if w <= 0.0 || h <= 0.0 {
            return;
        }
        let all = (rect.width() / w).min(rect.height() / h).clamp(0.02, 2.0);
        if fit == Fit::All || all >= READABLE_ZOOM {
            self.zoom = all;
            self.pan = (rect.size() - Vec2::new(w, h) * self.zoom) / 2.0;
            return;
        }
        // Too tall (or wide) to read whole: open at the top, as wide as fits but readable,
        // centred on the boxes of the first screenful.
        self.zoom = (rect.width() / w).clamp(READABLE_ZOOM, 1.0);
        let bottom = (rect.height() / self.zoom) as f64;
        let (l, r) = self
            .layout
            .nodes
            .iter()
            .filter(|n| n.y + n.h <= bottom)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, r), n| {
                (l.min(n.x), r.max(n.x + n.w))
            });
        let cx = if l.is_finite() && r.is_finite() {
            ((l + r) / 2.0) as f32
        } else {
            w / 2.0
        };
        self.pan = Vec2::new(rect.width() / 2.0 - cx * self.zoom, 0.0);
    }

    fn canvas(&mut self, ui: &mut egui::Ui) {
        let (response, painter) = ui.allocate_painter(ui.available_size(), Sense::click_and_drag());
        let rect = response.rect;
        self.canvas = rect;
        if let Some(fit) = self.fit_pending.take() {
            self.fit(rect, fit);
        }
        // Pan by dragging, zoom by scrolling (about the pointer).
        if response.dragged() {
            self.pan += response.drag_delta();
        }
        if response.hovered() {
            let (scroll, pinch, pointer) = ui.input(|i| {
                (
                    i.smooth_scroll_delta.y,
                    i.zoom_delta(),
                    i.pointer.hover_pos(),
                )
            });
            let factor = pinch * (scroll / 400.0).exp();
            if (factor - 1.0).abs() > 1e-4 {
                if let Some(p) = pointer {
                    let new_zoom = (self.zoom * factor).clamp(0.02, 8.0);
                    let at = p - rect.min;
                    self.pan = at - (at - self.pan) * (new_zoom / self.zoom);
                    self.zoom = new_zoom;
                }
            }
        }
        let origin = rect.min;
        let hit = response
            .interact_pointer_pos()
            .filter(|_| response.clicked())
            .and_then(|p| {
                self.layout.nodes.iter().position(|n| {
                    Rect::from_min_max(
                        self.to_screen(origin, n.x, n.y),
                        self.to_screen(origin, n.x + n.w, n.y + n.h),
                    )
                    .contains(p)
                })
            });
        if response.clicked() {
            match hit.map(|i| self.layout.nodes[i].item.clone()) {
                Some(Item::Layer { index, .. }) => {
                    self.expand_layer(index);
                    self.selected = None;
                }
                Some(item) => self.selected = Some(item),
                None => self.selected = None,
            }
        }
        let Ok(plan) = &self.plan else {
            return;
        };
        let painter = painter.with_clip_rect(rect);
        if self.paint_background {
            painter.rect_filled(rect, 0.0, CANVAS);
        }
        let z = self.zoom;
        let text = z >= 0.35;
        let font = FontId::monospace((11.0 * z).clamp(4.0, 40.0));
        let clip = rect.expand(20.0);
        // Edge labels go where they cover neither a box nor another label.
        let mut taken: Vec<Rect> = Vec::new();
        if z >= 0.6 {
            taken.extend(self.layout.nodes.iter().filter_map(|n| {
                let r = Rect::from_min_max(
                    self.to_screen(origin, n.x, n.y),
                    self.to_screen(origin, n.x + n.w, n.y + n.h),
                );
                r.intersects(clip).then_some(r)
            }));
        }
        let label_font = FontId::monospace((9.0 * z).clamp(4.0, 30.0));

        for e in &self.layout.edges {
            let pts: Vec<Pos2> = e
                .points
                .iter()
                .map(|&(x, y)| self.to_screen(origin, x, y))
                .collect();
            let bb = Rect::from_points(&pts);
            if !bb.intersects(clip) {
                continue;
            }
            painter.add(Shape::line(simplify(&pts, 0.5), Stroke::new(1.0, EDGE)));
            if let (Some(&end), Some(&before)) = (pts.last(), pts.iter().rev().nth(1)) {
                let dir = (end - before).normalized() * (6.0 * z.clamp(0.5, 2.0));
                let side = Vec2::new(-dir.y, dir.x) * 0.5;
                painter.add(Shape::convex_polygon(
                    vec![end, end - dir + side, end - dir - side],
                    EDGE,
                    Stroke::NONE,
                ));
            }
            if z >= 0.6 && pts.len() >= 2 {
                let mut label = shape_text(plan, e.value);
                if e.count > 1 {
                    label.push_str(&format!(" ×{}", e.count));
                }
                let colour = Color32::from_gray(90);
                let galley = painter.layout_no_wrap(label, label_font.clone(), colour);
                let spot = [0.5f32, 0.3, 0.7, 0.15, 0.85].into_iter().find_map(|t| {
                    let at = pts[0] + (pts[1] - pts[0]) * t + Vec2::new(4.0, 0.0);
                    let r = Align2::LEFT_CENTER.anchor_size(at, galley.size());
                    (!taken.iter().any(|o| o.intersects(r))).then_some(r)
                });
                if let Some(r) = spot {
                    taken.push(r);
                    painter.galley(r.min, galley, colour);
                }
            }
        }

        let selected = self.selected();
        for (i, n) in self.layout.nodes.iter().enumerate() {
            let r = Rect::from_min_max(
                self.to_screen(origin, n.x, n.y),
                self.to_screen(origin, n.x + n.w, n.y + n.h),
            );
            if !r.intersects(clip) {
                continue;
            }
            let fill = match (&n.item, export::class_of(plan, n)) {
                (Item::Layer { .. }, _) => LAYER_FILL,
                (_, Some(c)) => class_colour(c),
                _ => INPUT_FILL,
            };
            let collective =
                matches!(&n.item, Item::Op(id) if is_collective_like(&plan.graph.nodes[*id].op));
            let stroke = if Some(i) == selected {
                Stroke::new(3.0, SELECTED)
            } else if collective {
                Stroke::new(2.5, COLLECTIVE_STROKE)
            } else {
                Stroke::new(1.0, Color32::from_gray(60))
            };
            if collective {
                // An octagon, as in the SVG.
                let c = (r.height() * 0.3).min(r.width() * 0.2);
                let pts = vec![
                    Pos2::new(r.left() + c, r.top()),
                    Pos2::new(r.right() - c, r.top()),
                    Pos2::new(r.right(), r.top() + c),
                    Pos2::new(r.right(), r.bottom() - c),
                    Pos2::new(r.right() - c, r.bottom()),
                    Pos2::new(r.left() + c, r.bottom()),
                    Pos2::new(r.left(), r.bottom() - c),
                    Pos2::new(r.left(), r.top() + c),
                ];
                painter.add(Shape::convex_polygon(pts, fill, stroke));
            } else {
                painter.rect(r, 3.0 * z, fill, stroke, StrokeKind::Inside);
                if matches!(n.item, Item::Layer { .. }) {
                    painter.rect_stroke(
                        r.shrink(3.0 * z),
                        2.0 * z,
                        Stroke::new(1.0, Color32::from_gray(60)),
                        StrokeKind::Inside,
                    );
                }
            }
            // As in the SVG: right to left from the box, a tied parameter's holders side by side.
            for (j, st) in export::stages_of(plan, n).into_iter().enumerate() {
                let right = r.left() - (j as f32 * (STAGE_BAND_W as f32 + 2.0) + 2.0) * z;
                let band = Rect::from_min_max(
                    Pos2::new(right - STAGE_BAND_W as f32 * z, r.top()),
                    Pos2::new(right, r.bottom()),
                );
                painter.rect_filled(band, 0.0, hex(stage_colour(st)));
            }
            if text {
                let top = r.top() + (r.height() - n.lines.len() as f32 * LINE_H as f32 * z) / 2.0;
                for (k, line) in n.lines.iter().enumerate() {
                    painter.text(
                        Pos2::new(r.center().x, top + (k as f32 + 0.5) * LINE_H as f32 * z),
                        Align2::CENTER_CENTER,
                        line,
                        font.clone(),
                        Color32::BLACK,
                    );
                }
            }
        }
    }
}

/// Bar colours of the summary chart: per rank / model; weights, gradients, optimizer,
/// activations; collectives.
const PARAM_BARS: [Color32; 2] = [
    Color32::from_rgb(0x6b, 0xae, 0xd6),
    Color32::from_rgb(0x9e, 0x9e, 0x9e),
];
const MEMORY_BARS: [Color32; 4] = [
    Color32::from_rgb(0x6b, 0xae, 0xd6),
    Color32::from_rgb(0x74, 0xc4, 0x76),
    Color32::from_rgb(0xfd, 0x8d, 0x3c),
    Color32::from_rgb(0x9e, 0x9a, 0xc8),
];
const COLLECTIVE_BAR: Color32 = Color32::from_rgb(0x9d, 0x6b, 0xd8);

/// Draws the summary chart: per group a title, then per bar its label and value on one line and
/// the bar (to the group's scale) under it. Each bar is an AccessKit label `LABEL: VALUE`.
fn draw_chart(ui: &mut egui::Ui, chart: &SummaryChart) {
    let groups: [(&stats::BarGroup, &[Color32]); 3] = [
        (&chart.parameters, &PARAM_BARS),
        (&chart.memory, &MEMORY_BARS),
        (&chart.collectives, &[COLLECTIVE_BAR]),
    ];
    let font = FontId::proportional(12.5);
    for (group, colours) in groups {
        ui.add_space(4.0);
        ui.label(egui::RichText::new(&group.title).strong());
        if group.bars.is_empty() {
            ui.label("none");
        }
        for (i, bar) in group.bars.iter().enumerate() {
            let width = ui.available_width().max(120.0);
            let (rect, response) = ui.allocate_exact_size(Vec2::new(width, 24.0), Sense::hover());
            let text = format!("{}: {}", bar.label, bar.text);
            response
                .widget_info(|| egui::WidgetInfo::labeled(egui::Role::Label, true, text.clone()));
            if !ui.is_rect_visible(rect) {
                continue;
            }
            let painter = ui.painter();
            let colour = ui.visuals().text_color();
            painter.text(
                rect.left_top(),
                Align2::LEFT_TOP,
                &bar.label,
                font.clone(),
                colour,
            );
            painter.text(
                rect.right_top(),
                Align2::RIGHT_TOP,
                &bar.text,
                font.clone(),
                colour,
            );
            let track = Rect::from_min_max(
                Pos2::new(rect.left(), rect.bottom() - 7.0),
                Pos2::new(rect.right(), rect.bottom() - 1.0),
            );
            painter.rect_filled(track, 2.0, ui.visuals().extreme_bg_color);
            let fill = Rect::from_min_max(
                track.min,
                Pos2::new(
                    track.left() + track.width() * bar.fraction.clamp(0.0, 1.0),
                    track.bottom(),
                ),
            );
            let c = colours.get(i).or(colours.last()).copied();
            painter.rect_filled(fill, 2.0, c.unwrap_or(COLLECTIVE_BAR));
        }
    }
}

/// The polyline without the points it can do without: every dropped point lies within `tol`
/// screen points of the segment that replaces it. A long edge has a point per row it crosses;
/// zoomed out, those are a few pixels apart and nearly collinear, and each one costs the
/// software renderer triangles.
fn simplify(pts: &[Pos2], tol: f32) -> Vec<Pos2> {
    /// Longest run of points dropped in a row (bounds the work per point).
    const RUN: usize = 32;
    let Some((&first, rest)) = pts.split_first() else {
        return Vec::new();
    };
    let mut out = vec![first];
    let mut start = 0; // index of the last kept point
    for j in 1..rest.len() {
        // Drop pts[j] if every point after `start` up to j is within tol of start → pts[j + 1].
        let (a, b) = (pts[start], pts[j + 1]);
        let ab = b - a;
        let len = ab.length();
        let off = |p: Pos2| {
            if len < 1e-6 {
                (p - a).length()
            } else {
                (ab.x * (p.y - a.y) - ab.y * (p.x - a.x)).abs() / len
            }
        };
        let fits = j - start < RUN && pts[start + 1..=j].iter().all(|&p| off(p) <= tol);
        if !fits {
            out.push(pts[j]);
            start = j;
        }
    }
    if pts.len() > 1 {
        out.push(pts[pts.len() - 1]);
    }
    out
}

/// ` (full / 4)` when the per-rank figure is an exact fraction of the full one.
fn ratio(full: u128, per_rank: u128) -> String {
    if per_rank == 0 || full == 0 {
        String::new()
    } else if full == per_rank {
        " (= full)".to_string()
    } else if full.is_multiple_of(per_rank) {
        format!(" (full / {})", full / per_rank)
    } else {
        format!(" ({:.1}% of full)", 100.0 * per_rank as f64 / full as f64)
    }
}

/// The property panel's FLOPs and bytes rows.
fn cost_rows(row: &mut dyn FnMut(&str, String), c: Costs) {
    row("FLOPs full", human_count(c.full.flops));
    row(
        "FLOPs per rank",
        format!(
            "{}{}",
            human_count(c.per_rank.flops),
            ratio(c.full.flops, c.per_rank.flops)
        ),
    );
    bytes_rows(row, c, " (in + out)");
    if c.per_rank.communicated > 0 {
        row(
            "communicated per rank",
            human_bytes(c.per_rank.communicated),
        );
    }
}

/// Bytes rows; `what` says what was counted (` (in + out)` for an op).
fn bytes_rows(row: &mut dyn FnMut(&str, String), c: Costs, what: &str) {
    row(&format!("bytes full{what}"), human_bytes(c.full.bytes));
    row(
        &format!("bytes per rank{what}"),
        format!(
            "{}{}",
            human_bytes(c.per_rank.bytes),
            ratio(c.full.bytes, c.per_rank.bytes)
        ),
    );
}

impl eframe::App for Viewer {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

/// What `ferrotron view` opens besides the model and its plan options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Layers to open expanded (`--expand 0,3`).
    pub expand: Vec<usize>,
    /// Open with the backward pass drawn.
    pub backward: bool,
    /// Measure the window's frame times while the graph pans (`--bench-frames N`): `N` frames at
    /// the opening view, `N` fitted to the window, then print the figures and close.
    pub bench_frames: Option<usize>,
}

/// Frame-time figures, in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameStats {
    /// Frames measured.
    pub frames: usize,
    /// Mean frame time.
    pub mean_ms: f64,
    /// Median frame time.
    pub median_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// Slowest frame.
    pub max_ms: f64,
}

impl FrameStats {
    /// The figures of `times` (seconds each); `None` when empty.
    pub fn of(times: &[f64]) -> Option<FrameStats> {
        if times.is_empty() {
            return None;
        }
        let mut sorted = times.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize] * 1e3;
        Some(FrameStats {
            frames: times.len(),
            mean_ms: times.iter().sum::<f64>() / times.len() as f64 * 1e3,
            median_ms: at(0.5),
            p95_ms: at(0.95),
            max_ms: at(1.0),
        })
    }

    /// Frames per second at the mean frame time.
    pub fn fps(&self) -> f64 {
        if self.mean_ms > 0.0 {
            1e3 / self.mean_ms
        } else {
            f64::INFINITY
        }
    }
}

impl std::fmt::Display for FrameStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} frames: mean {:.2} ms ({:.0} fps), median {:.2} ms, p95 {:.2} ms, max {:.2} ms",
            self.frames,
            self.mean_ms,
            self.fps(),
            self.median_ms,
            self.p95_ms,
            self.max_ms
        )
    }
}

/// The pan of frame `k` of a benchmark: the graph circles (radius 150 px, 120 frames a turn), so
/// every frame moves it and it stays on screen.
pub fn pan_step(k: usize) -> Vec2 {
    let at = |k: usize| {
        let t = k as f32 * std::f32::consts::TAU / 120.0;
        Vec2::new(t.cos(), t.sin()) * 150.0
    };
    at(k + 1) - at(k)
}

/// Frames skipped before measuring (font atlas upload, first layout).
const WARM_UP: usize = 20;

/// The window's pan benchmark: frame-to-frame wall time (the UI pass, tessellation, OpenGL
/// drawing and the buffer swap) and the UI pass alone.
struct PanBench {
    frames: usize,
    /// 0: the opening view; 1: fitted to the window.
    phase: usize,
    step: usize,
    last: Option<std::time::Instant>,
    intervals: Vec<f64>,
    ui_pass: Vec<f64>,
}

impl PanBench {
    fn frame(&mut self, viewer: &mut Viewer, ui: &mut egui::Ui, frame: &eframe::Frame) {
        let now = std::time::Instant::now();
        if self.step == 0 && self.phase == 0 {
            println!("renderer: {}", gl_renderer(frame));
        }
        if let Some(last) = self.last {
            if self.step > WARM_UP {
                self.intervals.push((now - last).as_secs_f64());
            }
        }
        self.last = Some(now);
        viewer.pan_by(pan_step(self.step));
        viewer.show(ui);
        if self.step > WARM_UP {
            self.ui_pass.push(now.elapsed().as_secs_f64());
        }
        self.step += 1;
        ui.ctx().request_repaint();
        if self.intervals.len() < self.frames {
            return;
        }
        let name = ["opening view", "fitted to the window"][self.phase.min(1)];
        let layout = viewer.graph_layout();
        println!(
            "pan, {name} (zoom {:.3}, {} boxes, {} edges):",
            viewer.zoom(),
            layout.nodes.len(),
            layout.edges.len()
        );
        if let Some(s) = FrameStats::of(&self.intervals) {
            println!("  frame time {s}");
        }
        if let Some(s) = FrameStats::of(&self.ui_pass) {
            println!("  UI pass    {s}");
        }
        self.intervals.clear();
        self.ui_pass.clear();
        self.step = 0;
        self.last = None;
        self.phase += 1;
        if self.phase == 1 {
            viewer.fit_to_window();
        } else {
            ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }
}

/// The OpenGL renderer's name (`llvmpipe (...)` when Mesa renders in software).
fn gl_renderer(frame: &eframe::Frame) -> String {
    use eframe::glow::HasContext;
    match frame.gl() {
        // SAFETY: eframe made this context current on this thread before calling the app, and
        // RENDERER is a valid string query.
        Some(gl) => unsafe { gl.get_parameter_string(eframe::glow::RENDERER) },
        None => "unknown".to_string(),
    }
}

/// The window's app: the viewer, and the pan benchmark when asked for.
struct ViewerApp {
    viewer: Viewer,
    bench: Option<PanBench>,
}

impl eframe::App for ViewerApp {
    fn clear_color(&self, _visuals: &egui::Visuals) -> [f32; 4] {
        CANVAS.to_normalized_gamma_f32()
    }

    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        match &mut self.bench {
            Some(b) => b.frame(&mut self.viewer, ui, frame),
            None => self.viewer.show(ui),
        }
    }
}

/// Opens the viewer in a native window (OpenGL via glow; Mesa's llvmpipe renders it in
/// software). Without a display, or when the window cannot be made, a clean error.
pub fn run(
    model: PathBuf,
    load_options: LoadOptions,
    options: PartitionOptions,
    run: RunOptions,
) -> Result<(), String> {
    #[cfg(all(unix, not(target_os = "macos")))]
    if std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        return Err(
            "no display (DISPLAY is not set): run under X11 or Xvfb, or use \
                    `ferrotron export MODEL --svg OUT.svg` headless"
                .to_string(),
        );
    }
    let mut viewer = Viewer::with_options(model.clone(), load_options, options);
    if let Some(max) = viewer.plan().map(|p| p.graph.layers().count()) {
        if let Some(&bad) = run.expand.iter().find(|&&i| i >= max) {
            return Err(format!(
                "--expand {bad}: the model has {max} layers (0..={})",
                max.saturating_sub(1)
            ));
        }
    }
    viewer.paint_background = false;
    viewer.backward = run.backward;
    viewer.expand = run.expand.clone();
    viewer.relayout();
    let mut options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title(format!("ferrotron: {}", model.display()))
            .with_inner_size([1400.0, 900.0]),
        ..Default::default()
    };
    let bench = run.bench_frames.map(|frames| PanBench {
        frames: frames.max(1),
        phase: 0,
        step: 0,
        last: None,
        intervals: Vec::new(),
        ui_pass: Vec::new(),
    });
    if bench.is_some() {
        // Measure how fast frames can be made, not the display's refresh rate.
        options.glow_options.vsync = false;
    }
    let app = ViewerApp { viewer, bench };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eframe::run_native(
            "ferrotron",
            options,
            Box::new(|cc| {
                // Dark text on the white the frame is cleared to (see `paint_background`).
                cc.egui_ctx.set_theme(egui::Theme::Light);
                // Text fields and bar tracks on an unfilled panel need a fill of their own.
                cc.egui_ctx.style_mut_of(egui::Theme::Light, |style| {
                    style.visuals.extreme_bg_color = Color32::from_gray(236);
                });
                Ok(Box::new(app) as Box<dyn eframe::App>)
            }),
        )
    }));
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot open the viewer window: {e}")),
        Err(_) => Err("cannot open the viewer window (the windowing system failed)".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::simplify;
    use eframe::egui::Pos2;

    #[test]
    fn simplify_keeps_corners_and_drops_collinear_points() {
        let line: Vec<Pos2> = (0..100).map(|i| Pos2::new(3.0, i as f32 * 4.0)).collect();
        let s = simplify(&line, 0.5);
        // Runs are bounded, so a straight line keeps a point every 32.
        assert_eq!(s.first(), line.first());
        assert_eq!(s.last(), line.last());
        assert!(s.len() <= 5, "{}", s.len());
        let corner = [
            Pos2::new(0.0, 0.0),
            Pos2::new(0.0, 5.0),
            Pos2::new(0.0, 10.0),
            Pos2::new(5.0, 10.0),
            Pos2::new(10.0, 10.0),
        ];
        assert_eq!(
            simplify(&corner, 0.5),
            [corner[0], corner[2], corner[4]].to_vec()
        );
        let zigzag: Vec<Pos2> = (0..10)
            .map(|i| Pos2::new((i % 2) as f32 * 3.0, i as f32))
            .collect();
        assert_eq!(simplify(&zigzag, 0.5), zigzag);
        assert_eq!(simplify(&zigzag[..1], 0.5), zigzag[..1].to_vec());
        assert!(simplify(&[], 0.5).is_empty());
    }
}
