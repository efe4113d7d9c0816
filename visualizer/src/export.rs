//! Headless export of a laid-out plan: a self-contained SVG and a Graphviz DOT file, with the
//! same colours and labels the GUI uses.
//!
//! - Every op and parameter is filled by its tensor-parallel layout ([`TpClass`]): replicated,
//!   split by column (its last axis), split by row (another axis), partial sum; a legend says
//!   which is which.
//! - Collectives (and local slices) are octagons with a thick purple outline, labelled with what
//!   they do forward and backward, the paper's f and g by name.
//! - A collapsed layer is a double-outlined box with its op count and its collectives.
//! - Edges carry the shard-local shape of the value they carry (`[8,1024,384]`, `×k` when one
//!   edge stands for `k` values).
//! - With pipeline stages, a band left of every box in its stage's colour
//!   ([`crate::schedule::stage_colour`]), one per holding stage for a tied
//!   parameter, and a legend entry per stage.
//!
//! In the SVG every box is a `<g class="node KIND" id="vI">` with KIND one of `op`, `collective`,
//! `param`, `input`, `layer`, so tools and tests can find them.

use crate::layout::{
    collective_label, is_collective_like, layout, shape_text, GraphLayout, Item, LayoutOptions,
    Node, TpClass, CHAR_W, FONT_SIZE, LINE_H,
};
use crate::schedule::{stage_colour, stage_label};
use ferrotron_ir::graph::EntityRef;
use ferrotron_partitioner::Plan;
use std::fmt::Write;

/// What to export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Which part of the graph, and which layers expanded.
    pub layout: LayoutOptions,
}

const COLLECTIVE_STROKE: &str = "#7b2cbf";
const LAYER_FILL: &str = "#f7f3ff";
const INPUT_FILL: &str = "#ffffff";

pub use crate::svg::xml_escape;

fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The title line: model, mesh, view.
pub fn title(plan: &Plan, opts: &ExportOptions) -> String {
    format!(
        "{}: tp = {}, dp = {}{}{}, {}",
        plan.model,
        plan.mesh.tp,
        plan.mesh.dp,
        match &plan.pipeline {
            Some(p) => format!(
                ", pp = {} ({} micro-batches, {})",
                p.stages, p.micro_batches, p.schedule
            ),
            None => String::new(),
        },
        if plan.options.sequence_parallel {
            ", sequence parallel"
        } else {
            ""
        },
        if opts.layout.backward {
            "forward + backward"
        } else {
            "forward"
        }
    )
}

/// The kind a box is drawn as: `op`, `collective`, `param`, `input` or `layer`.
pub fn kind(plan: &Plan, node: &Node) -> &'static str {
    match &node.item {
        Item::Op(n) if is_collective_like(&plan.graph.nodes[*n].op) => "collective",
        Item::Op(_) => "op",
        Item::Param(_) => "param",
        Item::Input(_) => "input",
        Item::Layer { .. } => "layer",
    }
}

/// The pipeline stages whose ranks run a box: one for an op or a layer, every holder of a
/// parameter (several for a tied one); none for a graph input, and none without pipeline
/// stages.
pub fn stages_of(plan: &Plan, node: &Node) -> Vec<u32> {
    let Some(pipe) = plan.pipeline.as_ref().filter(|p| p.stages > 1) else {
        return Vec::new();
    };
    match &node.item {
        Item::Op(n) => vec![pipe.stage_of[*n]],
        Item::Layer { nodes, .. } => nodes.iter().take(1).map(|&n| pipe.stage_of[n]).collect(),
        Item::Param(p) => pipe.holders[p.index()].clone(),
        Item::Input(_) => Vec::new(),
    }
}

/// The layout class a box is coloured by (`None` for layers and inputs).
pub fn class_of(plan: &Plan, node: &Node) -> Option<TpClass> {
    let g = &plan.graph;
    match &node.item {
        Item::Op(n) => g.nodes[*n].outputs.first().map(|&v| TpClass::of(plan, v)),
        Item::Param(p) => Some(TpClass::of(plan, g.params[*p].value)),
        Item::Input(_) | Item::Layer { .. } => None,
    }
}

fn fill_of(plan: &Plan, node: &Node) -> &'static str {
    match (&node.item, class_of(plan, node)) {
        (Item::Layer { .. }, _) => LAYER_FILL,
        (_, Some(c)) => c.colour(),
        _ => INPUT_FILL,
    }
}

/// A tooltip: the layouts and shapes of what the box defines, and its pipeline stage.
fn tooltip(plan: &Plan, node: &Node) -> String {
    let mut s = item_tooltip(plan, node);
    for st in stages_of(plan, node) {
        s.push('\n');
        s.push_str(&stage_label(plan, st));
    }
    s
}

fn item_tooltip(plan: &Plan, node: &Node) -> String {
    let g = &plan.graph;
    let value_line = |v| {
        format!(
            "{}: {} local {} ({})",
            g.values[v].name,
            g.values[v].ty.dtype_name(),
            shape_text(plan, v),
            plan.layouts[v]
        )
    };
    match &node.item {
        Item::Op(n) => {
            let nd = &g.nodes[*n];
            let mut s = format!("{} = {}", nd.name, nd.op.mnemonic());
            if let Some(c) = collective_label(&nd.op) {
                let _ = write!(s, ": {c}");
            }
            for &v in &nd.outputs {
                s.push('\n');
                s.push_str(&value_line(v));
            }
            s
        }
        Item::Param(p) => value_line(g.params[*p].value),
        Item::Input(v) => value_line(*v),
        Item::Layer { .. } => node.lines.join("\n"),
    }
}

trait DTypeName {
    fn dtype_name(&self) -> String;
}

impl DTypeName for ferrotron_ir::TensorType {
    fn dtype_name(&self) -> String {
        format!("{:?}", self.dtype).to_lowercase()
    }
}

fn edge_label(plan: &Plan, l: &GraphLayout, e: usize) -> String {
    let edge = &l.edges[e];
    let mut s = shape_text(plan, edge.value);
    if edge.count > 1 {
        let _ = write!(s, " ×{}", edge.count);
    }
    s
}

const LEGEND_ROW: f64 = 18.0;
/// Width of the stage band left of a box (within the layout's gap between boxes).
pub const STAGE_BAND_W: f64 = 5.0;

/// The pipeline stages the graph drawing marks (none for one stage).
fn stages(plan: &Plan) -> impl Iterator<Item = u32> {
    let p = plan.pipeline.as_ref().map_or(0, |p| p.stages);
    let marked = if p > 1 { p } else { 0 };
    0..marked
}

/// The graph as a self-contained SVG document.
pub fn svg(plan: &Plan, opts: &ExportOptions) -> String {
    let l = layout(plan, &opts.layout);
    svg_of_layout(plan, opts, &l)
}

/// The SVG of an existing layout (what [`svg`] draws).
pub fn svg_of_layout(plan: &Plan, opts: &ExportOptions, l: &GraphLayout) -> String {
    let title = title(plan, opts);
    // Header: the title, then the legend (one row per entry).
    let legend: Vec<(&str, String)> = TpClass::ALL
        .iter()
        .map(|c| ("class", c.description().to_string()))
        .chain([
            (
                "collective",
                "collective: f, g, all-reduce, all-gather, reduce-scatter, local slice".to_string(),
            ),
            (
                "layer",
                "collapsed transformer layer (op count, collectives)".to_string(),
            ),
            ("edge", "edge: shard-local shape on each rank".to_string()),
        ])
        .chain(stages(plan).map(|s| ("stage", format!("band: {}", stage_label(plan, s)))))
        .collect();
    let header = 40.0 + legend.len() as f64 * LEGEND_ROW + 16.0;
    let legend_w = legend
        .iter()
        .map(|(_, t)| t.chars().count() as f64 * CHAR_W + 60.0)
        .fold(0.0, f64::max);
    // The title is set at 15 px, the rest at FONT_SIZE.
    let title_w = title.chars().count() as f64 * CHAR_W * 15.0 / FONT_SIZE + 40.0;
    let width = l.width.max(legend_w + 40.0).max(title_w).ceil();
    let height = (l.height + header).ceil();

    let mut s = String::with_capacity(256 + l.nodes.len() * 400 + l.edges.len() * 200);
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="{FONT_SIZE}">"#
    );
    let _ = writeln!(s, "<title>{}</title>", xml_escape(&title));
    let _ = writeln!(
        s,
        r##"<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>"##
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text class="title" x="20" y="26" font-size="15" font-weight="bold">{}</text>"#,
        xml_escape(&title)
    );

    // Legend.
    let _ = writeln!(s, r#"<g class="legend" transform="translate(20,40)">"#);
    let mut stage = 0u32;
    for (i, (k, text)) in legend.iter().enumerate() {
        let y = i as f64 * LEGEND_ROW;
        let swatch = match *k {
            "stage" => {
                stage += 1;
                format!(
                    r#"<rect x="0" y="{y}" width="5" height="13" fill="{}"/>"#,
                    stage_colour(stage - 1)
                )
            }
            "class" => format!(
                r##"<rect x="0" y="{y}" width="28" height="13" rx="2" fill="{}" stroke="#444"/>"##,
                TpClass::ALL[i].colour()
            ),
            "collective" => format!(
                r#"<polygon points="{}" fill="white" stroke="{COLLECTIVE_STROKE}" stroke-width="2.5"/>"#,
                octagon(0.0, y, 28.0, 13.0)
            ),
            "layer" => format!(
                r##"<rect x="0" y="{y}" width="28" height="13" fill="{LAYER_FILL}" stroke="#333" stroke-width="1" stroke-dasharray="0"/><rect x="2" y="{}" width="24" height="9" fill="none" stroke="#333"/>"##,
                y + 2.0
            ),
            _ => format!(
                r##"<path d="M0,{m} L26,{m}" stroke="#555" marker-end="url(#arrow)"/>"##,
                m = y + 6.5
            ),
        };
        let _ = writeln!(
            s,
            r#"<g class="legend-entry">{swatch}<text x="36" y="{}">{}</text></g>"#,
            y + 11.0,
            xml_escape(text)
        );
    }
    let _ = writeln!(s, "</g>");

    let _ = writeln!(s, r#"<g class="graph" transform="translate(0,{header})">"#);
    // Edges first, so boxes sit on top.
    let _ = writeln!(
        s,
        r##"<g class="edges" fill="none" stroke="#555" stroke-width="1">"##
    );
    for e in &l.edges {
        let mut d = String::new();
        let (x0, y0) = e.points[0];
        let _ = write!(d, "M{x0:.1},{y0:.1}");
        for w in e.points.windows(2) {
            let ((ax, ay), (bx, by)) = (w[0], w[1]);
            let my = (ay + by) / 2.0;
            let _ = write!(d, " C{ax:.1},{my:.1} {bx:.1},{my:.1} {bx:.1},{by:.1}");
        }
        let _ = writeln!(
            s,
            r#"<path class="edge" data-from="v{}" data-to="v{}" d="{d}" marker-end="url(#arrow)"/>"#,
            e.from, e.to
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, r##"<g class="edge-labels" font-size="9" fill="#555">"##);
    for (i, e) in l.edges.iter().enumerate() {
        let ((ax, ay), (bx, by)) = (e.points[0], e.points[1]);
        let (mx, my) = ((ax + bx) / 2.0, (ay + by) / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            mx + 4.0,
            my + 3.0,
            xml_escape(&edge_label(plan, l, i))
        );
    }
    let _ = writeln!(s, "</g>");

    let _ = writeln!(s, r#"<g class="nodes">"#);
    for (i, node) in l.nodes.iter().enumerate() {
        let k = kind(plan, node);
        let fill = fill_of(plan, node);
        let (x, y, w, h) = (node.x, node.y, node.w, node.h);
        let name = node.lines.first().map(String::as_str).unwrap_or("");
        let _ = write!(
            s,
            r#"<g class="node {k}" id="v{i}" data-name="{}"><title>{}</title>"#,
            xml_escape(name),
            xml_escape(&tooltip(plan, node))
        );
        match k {
            "collective" => {
                let _ = write!(
                    s,
                    r#"<polygon points="{}" fill="{fill}" stroke="{COLLECTIVE_STROKE}" stroke-width="2.5"/>"#,
                    octagon(x, y, w, h)
                );
            }
            "layer" => {
                let _ = write!(
                    s,
                    r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" rx="4" fill="{fill}" stroke="#333" stroke-width="1.2"/><rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="3" fill="none" stroke="#333" stroke-width="0.8"/>"##,
                    x + 3.0,
                    y + 3.0,
                    w - 6.0,
                    h - 6.0
                );
            }
            "param" | "input" => {
                let _ = write!(
                    s,
                    r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" rx="{:.1}" fill="{fill}" stroke="#666" stroke-dasharray="3,2"/>"##,
                    h / 2.0
                );
            }
            _ => {
                let _ = write!(
                    s,
                    r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" rx="3" fill="{fill}" stroke="#444"/>"##
                );
            }
        }
        // Right to left from the box: a tied parameter's holders side by side.
        for (j, st) in stages_of(plan, node).into_iter().enumerate() {
            let _ = write!(
                s,
                r#"<rect class="stage-band" data-stage="{st}" x="{:.1}" y="{y:.1}" width="{STAGE_BAND_W}" height="{h:.1}" fill="{}"/>"#,
                x - (j as f64 + 1.0) * (STAGE_BAND_W + 2.0),
                stage_colour(st)
            );
        }
        let cx = x + w / 2.0;
        let top = y + (h - node.lines.len() as f64 * LINE_H) / 2.0;
        for (j, line) in node.lines.iter().enumerate() {
            let ty = top + j as f64 * LINE_H + LINE_H * 0.75;
            let style = match (k, j) {
                ("collective", 1) => format!(r#" fill="{COLLECTIVE_STROKE}" font-weight="bold""#),
                (_, 0) if k == "layer" => r#" font-weight="bold""#.to_string(),
                _ => String::new(),
            };
            let _ = write!(
                s,
                r#"<text x="{cx:.1}" y="{ty:.1}" text-anchor="middle"{style}>{}</text>"#,
                xml_escape(line)
            );
        }
        let _ = writeln!(s, "</g>");
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, "</svg>");
    s
}

fn octagon(x: f64, y: f64, w: f64, h: f64) -> String {
    let c = (h / 3.0).min(w / 4.0);
    let pts = [
        (x + c, y),
        (x + w - c, y),
        (x + w, y + c),
        (x + w, y + h - c),
        (x + w - c, y + h),
        (x + c, y + h),
        (x, y + h - c),
        (x, y + c),
    ];
    pts.iter()
        .map(|(a, b)| format!("{a:.1},{b:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The graph as Graphviz DOT: one line per box (`vI [...]`), one per edge, and a legend
/// cluster (`legend_*` nodes). Graphviz does its own layout; items, labels and colours are the
/// same as in the SVG.
pub fn dot(plan: &Plan, opts: &ExportOptions) -> String {
    let l = layout(plan, &opts.layout);
    dot_of_layout(plan, opts, &l)
}

/// The DOT of an existing layout (what [`dot`] writes).
pub fn dot_of_layout(plan: &Plan, opts: &ExportOptions, l: &GraphLayout) -> String {
    let mut s = String::with_capacity(256 + l.nodes.len() * 160 + l.edges.len() * 60);
    let _ = writeln!(s, "digraph \"{}\" {{", dot_escape(&plan.model));
    let _ = writeln!(
        s,
        "  graph [rankdir=TB, labelloc=t, fontname=\"monospace\", label=\"{}\"];",
        dot_escape(&title(plan, opts))
    );
    let _ = writeln!(s, "  node [fontname=\"monospace\", fontsize=10];");
    let _ = writeln!(
        s,
        "  edge [fontname=\"monospace\", fontsize=8, color=\"#555555\"];"
    );
    let _ = writeln!(s, "  subgraph cluster_legend {{");
    let _ = writeln!(s, "    label=\"legend\";");
    for c in TpClass::ALL {
        let _ = writeln!(
            s,
            "    legend_{:?} [label=\"{}\", shape=box, style=filled, fillcolor=\"{}\"];",
            c,
            dot_escape(c.description()),
            c.colour()
        );
    }
    let _ = writeln!(
        s,
        "    legend_Collective [label=\"collective (f, g, all-reduce, ...)\", shape=octagon, color=\"{COLLECTIVE_STROKE}\", penwidth=2.5];"
    );
    let _ = writeln!(
        s,
        "    legend_Layer [label=\"collapsed layer\", shape=box, peripheries=2, style=filled, fillcolor=\"{LAYER_FILL}\"];"
    );
    let _ = writeln!(s, "  }}");
    for (i, node) in l.nodes.iter().enumerate() {
        let label = dot_escape(&node.lines.join("\n"));
        let fill = fill_of(plan, node);
        let style = match kind(plan, node) {
            "collective" => format!(
                "shape=octagon, style=filled, fillcolor=\"{fill}\", color=\"{COLLECTIVE_STROKE}\", penwidth=2.5, fontcolor=\"{COLLECTIVE_STROKE}\""
            ),
            "layer" => format!("shape=box, peripheries=2, style=\"filled,rounded\", fillcolor=\"{fill}\""),
            "param" | "input" => {
                format!("shape=box, style=\"filled,rounded,dashed\", fillcolor=\"{fill}\"")
            }
            _ => format!("shape=box, style=filled, fillcolor=\"{fill}\""),
        };
        let _ = writeln!(
            s,
            "  v{i} [label=\"{label}\", class=\"{}\", {style}];",
            kind(plan, node)
        );
    }
    for (i, e) in l.edges.iter().enumerate() {
        let _ = writeln!(
            s,
            "  v{} -> v{} [label=\"{}\"];",
            e.from,
            e.to,
            dot_escape(&edge_label(plan, l, i))
        );
    }
    let _ = writeln!(s, "}}");
    s
}
