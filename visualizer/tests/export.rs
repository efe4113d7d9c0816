//! The headless export and the layout it draws, on tiny-gpt at tp = 2 and on the 72-layer
//! Megatron 8.3B at tp = 8.

use ferrotron_ir::{load_model, LoadOptions};
use ferrotron_partitioner::{partition, PartitionOptions, Plan};
use ferrotron_visualizer::export::{dot, svg, ExportOptions};
use ferrotron_visualizer::layout::{layout, GraphLayout, Item, LayoutOptions};
use std::path::PathBuf;
use std::time::Instant;

fn plan(model: &str, tp: u64) -> Plan {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")).join(model);
    let g = load_model(&path, &LoadOptions::default()).expect("model loads");
    partition(
        &g,
        &PartitionOptions {
            tp,
            ..Default::default()
        },
    )
    .expect("model partitions")
}

/// A tiny XML well-formedness check: tags balance, attributes are quoted and unique, text and
/// attribute values hold no raw `<` and only known entities. Returns the start tags, each as
/// (name, attributes).
type Element = (String, Vec<(String, String)>);

fn parse_xml(doc: &str) -> Result<Vec<Element>, String> {
    fn check_text(t: &str) -> Result<(), String> {
        let mut rest = t;
        while let Some(i) = rest.find('&') {
            let after = &rest[i + 1..];
            let end = after.find(';').ok_or("unterminated entity")?;
            let ent = &after[..end];
            let ok = matches!(ent, "amp" | "lt" | "gt" | "quot" | "apos")
                || (ent.starts_with('#') && ent.len() > 1);
            if !ok {
                return Err(format!("unknown entity &{ent};"));
            }
            rest = &after[end + 1..];
        }
        if t.contains('<') {
            return Err("raw < in text".into());
        }
        Ok(())
    }
    let mut stack: Vec<String> = Vec::new();
    let mut elements = Vec::new();
    let mut rest = doc.trim_start();
    if let Some(r) = rest.strip_prefix("<?xml") {
        rest = &r[r.find("?>").ok_or("unterminated declaration")? + 2..];
    }
    let mut seen_root = false;
    loop {
        let Some(lt) = rest.find('<') else {
            check_text(rest)?;
            if !rest.trim().is_empty() {
                return Err("text after the root".into());
            }
            break;
        };
        let text = &rest[..lt];
        check_text(text)?;
        if stack.is_empty() && !text.trim().is_empty() {
            return Err("text outside the root".into());
        }
        rest = &rest[lt..];
        if let Some(r) = rest.strip_prefix("<!--") {
            rest = &r[r.find("-->").ok_or("unterminated comment")? + 3..];
            continue;
        }
        let gt = rest.find('>').ok_or("unterminated tag")?;
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().ok_or("close without open")?;
            if open != name.trim() {
                return Err(format!("</{name}> closes <{open}>"));
            }
            continue;
        }
        if stack.is_empty() && seen_root {
            return Err("second root element".into());
        }
        seen_root = true;
        let (body, self_closing) = match tag.strip_suffix('/') {
            Some(b) => (b, true),
            None => (tag, false),
        };
        let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
        let name = &body[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || "-_:.".contains(c))
        {
            return Err(format!("bad element name {name:?}"));
        }
        let mut attrs: Vec<(String, String)> = Vec::new();
        let mut a = body[name_end..].trim_start();
        while !a.is_empty() {
            let eq = a
                .find('=')
                .ok_or(format!("attribute without value in <{name}>"))?;
            let key = a[..eq].trim();
            let v = a[eq + 1..].trim_start();
            let quote = v.chars().next().ok_or("missing value")?;
            if quote != '"' && quote != '\'' {
                return Err(format!("unquoted attribute {key} in <{name}>"));
            }
            let close = v[1..].find(quote).ok_or("unterminated attribute")?;
            let value = &v[1..1 + close];
            check_text(value)?;
            if attrs.iter().any(|(k, _)| k == key) {
                return Err(format!("duplicate attribute {key} in <{name}>"));
            }
            attrs.push((key.to_string(), value.to_string()));
            a = v[close + 2..].trim_start();
        }
        elements.push((name.to_string(), attrs));
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    if !stack.is_empty() {
        return Err(format!("unclosed elements {stack:?}"));
    }
    Ok(elements)
}

fn class_count(elements: &[Element], class: &str) -> usize {
    elements
        .iter()
        .filter(|(_, attrs)| attrs.iter().any(|(k, v)| k == "class" && v == class))
        .count()
}

fn expanded(backward: bool) -> ExportOptions {
    ExportOptions {
        layout: LayoutOptions {
            backward,
            expand_all: true,
            ..Default::default()
        },
    }
}

fn assert_sound(l: &GraphLayout) {
    // No two boxes overlap (boxes in different rows are apart by construction; check all pairs
    // in each row, and rows against each other through their y extents).
    let mut by_rank: Vec<Vec<usize>> = vec![Vec::new(); l.ranks];
    for (i, n) in l.nodes.iter().enumerate() {
        by_rank[n.rank].push(i);
        assert!(n.x >= 0.0 && n.y >= 0.0 && n.x + n.w <= l.width && n.y + n.h <= l.height);
    }
    for row in &by_rank {
        let mut row = row.clone();
        row.sort_by(|&a, &b| l.nodes[a].x.total_cmp(&l.nodes[b].x));
        for w in row.windows(2) {
            let (a, b) = (&l.nodes[w[0]], &l.nodes[w[1]]);
            assert!(a.x + a.w <= b.x, "{:?} overlaps {:?}", a.lines, b.lines);
        }
    }
    for r in 1..l.ranks {
        let above = by_rank[r - 1].iter().map(|&i| l.nodes[i].y + l.nodes[i].h);
        let below = by_rank[r].iter().map(|&i| l.nodes[i].y);
        let bottom = above.fold(f64::MIN, f64::max);
        let top = below.fold(f64::MAX, f64::min);
        assert!(bottom < top, "rows {} and {r} overlap", r - 1);
    }
    // Every edge goes downward.
    for e in &l.edges {
        let (a, b) = (&l.nodes[e.from], &l.nodes[e.to]);
        assert!(
            a.rank < b.rank,
            "edge {:?} -> {:?} is not downward",
            a.lines,
            b.lines
        );
        assert!(a.y + a.h <= b.y);
        for w in e.points.windows(2) {
            assert!(w[0].1 < w[1].1, "edge route goes up");
        }
        assert_eq!(e.points.len(), b.rank - a.rank + 1);
    }
}

#[test]
fn svg_parses_and_has_a_node_per_op_the_legend_and_f_and_g() {
    let plan = plan("tiny-gpt.ron", 2);
    for backward in [false, true] {
        let text = svg(&plan, &expanded(backward));
        let elements = parse_xml(&text).unwrap_or_else(|e| panic!("invalid SVG: {e}"));
        assert_eq!(elements[0].0, "svg");
        let ops = if backward {
            plan.graph.order.len()
        } else {
            plan.backward_start
        };
        let drawn = class_count(&elements, "node op") + class_count(&elements, "node collective");
        assert_eq!(drawn, ops, "one node element per op (backward: {backward})");
        assert_eq!(class_count(&elements, "node layer"), 0);
        assert_eq!(class_count(&elements, "legend"), 1);
        for entry in [
            "replicated",
            "split by column (last axis)",
            "split by row (other axis)",
            "partial sum",
        ] {
            assert!(
                text.contains(&format!(">{entry}</text>")),
                "legend lacks {entry}"
            );
        }
        assert!(text.contains("f (fwd: identity, bwd: all-reduce)"));
        assert!(text.contains("g (fwd: all-reduce, bwd: identity)"));
        assert!(text.contains("tp = 2, dp = 1"));
        // Edges are labelled with shard-local shapes.
        assert!(text.contains(r#"<g class="edge-labels""#));
        assert!(class_count(&elements, "edge") > 0);
    }
}

#[test]
fn collapsed_svg_has_one_box_per_layer() {
    let plan = plan("tiny-gpt.ron", 2);
    let layers = plan.graph.layers().count();
    assert!(layers > 0);
    let text = svg(&plan, &ExportOptions::default());
    let elements = parse_xml(&text).unwrap();
    assert_eq!(class_count(&elements, "node layer"), layers);
    let first = &plan.graph.layers().next().unwrap().1;
    assert!(text.contains(&format!("{} ({})", first.name, first.block)));
    // Forward + backward: a forward and a backward box per layer.
    let opts = ExportOptions {
        layout: LayoutOptions {
            backward: true,
            ..Default::default()
        },
    };
    let elements = parse_xml(&svg(&plan, &opts)).unwrap();
    assert_eq!(class_count(&elements, "node layer"), 2 * layers);
    // Expanding layer 0 only.
    let opts = ExportOptions {
        layout: LayoutOptions {
            expand: vec![0],
            ..Default::default()
        },
    };
    let l = layout(&plan, &opts.layout);
    let boxes = l
        .nodes
        .iter()
        .filter(|n| matches!(n.item, Item::Layer { .. }))
        .count();
    assert_eq!(boxes, layers - 1);
    assert!(l.op_count() > 0);
    assert_sound(&l);
}

#[test]
fn svg_escapes_text() {
    let mut plan = plan("tiny-gpt.ron", 2);
    plan.model = "a<b & \"c\"".into();
    let text = svg(&plan, &expanded(false));
    parse_xml(&text).unwrap();
    assert!(text.contains("a&lt;b &amp; &quot;c&quot;"));
}

#[test]
fn layouts_do_not_overlap_and_edges_go_down() {
    let plan = plan("tiny-gpt.ron", 2);
    for backward in [false, true] {
        for expand_all in [false, true] {
            for sources in [false, true] {
                let l = layout(
                    &plan,
                    &LayoutOptions {
                        backward,
                        expand_all,
                        sources,
                        ..Default::default()
                    },
                );
                assert!(!l.nodes.is_empty());
                assert!(!l.edges.is_empty());
                assert_sound(&l);
            }
        }
    }
}

#[test]
fn dot_has_a_line_per_node() {
    let plan = plan("tiny-gpt.ron", 2);
    let opts = expanded(true);
    let text = dot(&plan, &opts);
    assert!(text.starts_with("digraph"));
    assert!(text.trim_end().ends_with('}'));
    let l = layout(&plan, &opts.layout);
    let node_lines = text
        .lines()
        .filter(|line| {
            let t = line.trim_start();
            t.starts_with('v') && t.contains(" [label=") && !t.contains("->")
        })
        .count();
    assert_eq!(node_lines, l.nodes.len());
    assert_eq!(
        text.lines().filter(|line| line.contains(" -> ")).count(),
        l.edges.len()
    );
    assert!(text.contains("f (fwd: identity, bwd: all-reduce)"));
    assert!(text.contains("g (fwd: all-reduce, bwd: identity)"));
    assert!(text.contains("legend_Replicated"));
    // Every op is a node line of its own when expanded.
    assert_eq!(l.op_count(), plan.graph.order.len());
}

/// The 72-layer Megatron 8.3B at tp = 8, collapsed: run with
/// `cargo test --release -p ferrotron-visualizer -- --nocapture megatron` for the timing.
#[test]
fn megatron_8_3b_lays_out_collapsed() {
    let plan = plan("megatron-8.3b.ron", 8);
    assert_eq!(plan.graph.layers().count(), 72);
    for backward in [false, true] {
        let opts = LayoutOptions {
            backward,
            ..Default::default()
        };
        let start = Instant::now();
        let l = layout(&plan, &opts);
        let took = start.elapsed();
        // Well under a second even unoptimised on a loaded machine (release: about 1 ms, see
        // BENCHMARKS.md).
        assert!(took.as_secs_f64() < 1.0, "layout took {took:?}");
        println!(
            "megatron-8.3b tp=8 collapsed (backward: {backward}): {} boxes, {} edges, {} ranks, \
             layout in {:.2} ms ({} ops in the plan)",
            l.nodes.len(),
            l.edges.len(),
            l.ranks,
            took.as_secs_f64() * 1e3,
            plan.graph.order.len()
        );
        assert_sound(&l);
        let layer_boxes = l
            .nodes
            .iter()
            .filter(|n| matches!(n.item, Item::Layer { .. }))
            .count();
        assert_eq!(layer_boxes, if backward { 144 } else { 72 });
        let start = Instant::now();
        let text = svg(
            &plan,
            &ExportOptions {
                layout: opts.clone(),
            },
        );
        println!(
            "  svg: {} bytes in {:.2} ms",
            text.len(),
            start.elapsed().as_secs_f64() * 1e3
        );
        parse_xml(&text).unwrap();
    }
}

/// Each `<g class="node ...">` element of an SVG: its `data-name` and its markup up to `</g>`.
fn node_elements(svg: &str) -> Vec<(String, String)> {
    svg.match_indices(r#"<g class="node "#)
        .map(|(i, _)| {
            let rest = &svg[i..];
            let body = &rest[..rest.find("</g>").expect("node element closes")];
            let name = body
                .split(r#"data-name=""#)
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or_default()
                .to_string();
            (name, body.to_string())
        })
        .collect()
}

#[test]
fn svg_names_every_op_and_labels_every_f_and_g() {
    use ferrotron_ir::Op;
    use ferrotron_visualizer::export::xml_escape;
    use ferrotron_visualizer::layout::TpClass;
    let plan = plan("tiny-gpt.ron", 2);
    let text = svg(&plan, &expanded(true));
    parse_xml(&text).unwrap();
    let nodes = node_elements(&text);
    let g = &plan.graph;
    let (mut fs, mut gs) = (0, 0);
    for &n in &g.order {
        let node = &g.nodes[n];
        let name = xml_escape(&node.name);
        let drawn: Vec<&String> = nodes
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, body)| body)
            .collect();
        assert_eq!(
            drawn.len(),
            1,
            "op {} is drawn {} times",
            node.name,
            drawn.len()
        );
        let body = drawn[0];
        match node.op {
            Op::F { .. } => {
                fs += 1;
                assert!(body.starts_with(r#"<g class="node collective""#));
                assert!(body.contains(">f (fwd: identity, bwd: all-reduce) [tp]</text>"));
            }
            Op::G { .. } => {
                gs += 1;
                assert!(body.starts_with(r#"<g class="node collective""#));
                assert!(body.contains(">g (fwd: all-reduce, bwd: identity) [tp]</text>"));
            }
            _ => assert!(!body.contains("(fwd: identity, bwd: all-reduce)")),
        }
    }
    // Megatron's MLP and attention: one f and one g each per layer.
    let layers = g.layers().count();
    assert!(fs >= 2 * layers && gs >= 2 * layers, "f ×{fs}, g ×{gs}");
    // The legend: a swatch of each layout's fill colour beside its description.
    let legend = &text[text.find(r#"<g class="legend""#).expect("a legend")..];
    let legend = &legend[..legend.find("<g class=\"graph\"").unwrap_or(legend.len())];
    for c in TpClass::ALL {
        let entry = legend
            .split(r#"<g class="legend-entry">"#)
            .find(|e| e.contains(&format!(">{}</text>", c.description())))
            .unwrap_or_else(|| panic!("no legend entry for {}", c.description()));
        assert!(
            entry.contains(&format!(r#"fill="{}""#, c.colour())),
            "{entry}"
        );
    }
    assert!(legend.contains("collective: f, g"));
}
