//! The pipeline schedule drawn in time, as figures 3 and 4 of Narayanan et al. (2021): one row per
//! stage, a box per forward and backward step labelled with its micro-batch, the idle time
//! (the bubble) hatched; with the interleaved schedule, each model chunk in its own shade. It
//! draws the [`Timeline`] the partitioner simulates from the plan's
//! schedule ([`ferrotron_partitioner::Pipeline::steps`]), each stage's steps priced by its FLOPs,
//! so the picture shows the plan's own stage balance; the title sets the bubble of equal stages,
//! `(P − 1)/(M + P − 1)` (`(P − 1)/(V·M + P − 1)` interleaved), beside the idle fraction this
//! timeline measures.
//!
//! ```text
//! Plan ─► partitioner::timeline (stage FLOPs ─► simulated steps) ─► schedule_svg (what
//!      `ferrotron export --timeline` writes) and the viewer's schedule view
//! ```
//!
//! In the SVG every step is a `<g class="step forward">` or `<g class="step backward">` with
//! `data-stage`, `data-chunk` and `data-micro-batch` (from 0), so tools and tests can find them;
//! the numbers drawn count micro-batches from 1, as the paper's figures do.

use crate::layout::{CHAR_W, FONT_SIZE};
use crate::svg::xml_escape;
use ferrotron_partitioner::pipeline::{PipeStep, Pipeline, Schedule};
use ferrotron_partitioner::timeline::{self, Timeline, TimelineOptions};
use ferrotron_partitioner::Plan;
use std::fmt::Write;

/// Fills of forward steps (blues): with one model chunk per stage the first two alternate by
/// micro-batch so neighbours stay apart; interleaved, chunk `c` takes shade `c` (darker later).
pub const FORWARD_FILL: [&str; 4] = ["#9ecae1", "#6baed6", "#4292c6", "#2171b5"];
/// Fills of backward steps (greens), shaded as [`FORWARD_FILL`].
pub const BACKWARD_FILL: [&str; 4] = ["#a1d99b", "#74c476", "#41ab5d", "#238b45"];
/// The hatching's stroke over idle time.
pub const IDLE_STROKE: &str = "#c8c8c8";

/// Stage colours (the graph drawing's stage bands): a qualitative palette, repeating after 8.
const STAGE_COLOURS: [&str; 8] = [
    "#e15759", "#f28e2b", "#edc948", "#59a14f", "#76b7b2", "#4e79a7", "#b07aa1", "#9c755f",
];

/// Stage `s`'s colour in the graph drawing.
pub fn stage_colour(s: u32) -> &'static str {
    STAGE_COLOURS[s as usize % STAGE_COLOURS.len()]
}

/// The fill of `step` on model chunk `chunk` of `chunks` per stage.
pub fn step_fill(step: PipeStep, chunk: u32, chunks: u32) -> &'static str {
    let (m, fills) = match step {
        PipeStep::Forward(m) => (m, &FORWARD_FILL),
        PipeStep::Backward(m) => (m, &BACKWARD_FILL),
    };
    if chunks > 1 {
        fills[chunk as usize % fills.len()]
    } else {
        fills[m as usize % 2]
    }
}

/// The schedule's name as the paper writes it.
pub fn schedule_name(s: Schedule) -> &'static str {
    match s {
        Schedule::OneFOneB => "1F1B",
        Schedule::GPipe => "GPipe",
        Schedule::Interleaved => "interleaved 1F1B",
    }
}

/// The ranks of stage `s`, as a label: `stage 1 (ranks 4–7)`, `stage 1 (rank 1)`.
pub fn stage_label(plan: &Plan, s: u32) -> String {
    let per = plan.mesh.stage_ranks();
    let first = s as usize * per;
    if per == 1 {
        format!("stage {s} (rank {first})")
    } else {
        format!("stage {s} (ranks {first}–{})", first + per - 1)
    }
}

/// The title: model, mesh, micro-batches, schedule.
pub fn schedule_title(plan: &Plan, pipe: &Pipeline) -> String {
    let v = pipe.virtual_stages;
    format!(
        "{}: tp = {}, dp = {}, pp = {}{}, M = {} micro-batches, {} schedule",
        plan.model,
        plan.mesh.tp,
        plan.mesh.dp,
        pipe.stages,
        if v > 1 {
            format!(", V = {v} chunks per stage")
        } else {
            String::new()
        },
        pipe.micro_batches,
        schedule_name(pipe.schedule)
    )
}

/// The bubble of equal stages (the formula, with its numbers) beside the idle fraction of `t`.
pub fn bubble_text(pipe: &Pipeline, t: &Timeline) -> String {
    let (p, m, v) = (pipe.stages, pipe.micro_batches, pipe.virtual_stages.max(1));
    let (formula, denominator) = if v > 1 {
        ("(P − 1)/(V·M + P − 1)", v * m + p - 1)
    } else {
        ("(P − 1)/(M + P − 1)", m + p - 1)
    };
    format!(
        "bubble {formula} = {}/{denominator} = {:.1}% of the step for equal stages; \
         this timeline idles {:.1}% (stages priced by their FLOPs)",
        p - 1,
        100.0 * pipe.bubble_fraction(),
        100.0 * t.mean_idle_fraction()
    )
}

/// The layers stage `s` holds, in order: `0–6`, or one range per model chunk (`0–1, 8–9`).
pub fn stage_layers(pipe: &Pipeline, s: u32) -> String {
    let p = pipe.stages.max(1) as usize;
    // One count per virtual stage c·P + s, in layer order.
    let mut first = 0u32;
    let mut out = Vec::new();
    for (vs, &count) in pipe.layers.iter().enumerate() {
        if vs % p == s as usize && count > 0 {
            out.push(if count == 1 {
                first.to_string()
            } else {
                format!("{first}–{}", first + count - 1)
            });
        }
        first += count;
    }
    out.join(", ")
}

/// The timeline the picture draws: `plan`'s schedule in relative time units (a stage's forward
/// of one micro-batch takes 1 on average). Errors say what to pass for a plan without a pipeline.
pub fn plan_timeline(plan: &Plan) -> Result<(&Pipeline, Timeline), String> {
    let pipe = plan.pipeline.as_ref().ok_or_else(|| {
        format!(
            "`{}` was partitioned without a pipeline: pass --pp P (stages) and/or \
             --micro-batches M to draw its schedule",
            plan.model
        )
    })?;
    let t = timeline::of_plan(plan, &TimelineOptions::default()).map_err(|e| e.to_string())?;
    Ok((pipe, t))
}

/// A step's text: the micro-batch, from 1.
pub fn step_text(step: PipeStep) -> String {
    match step {
        PipeStep::Forward(m) | PipeStep::Backward(m) => (m + 1).to_string(),
    }
}

/// Tick spacing for an axis of length `span`: 1, 2 or 5 × 10^k, about `ticks` of them.
pub fn tick_step(span: f64, ticks: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / ticks;
    let k = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|f| f * k)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * k)
}

fn num(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

const ROW_H: f64 = 30.0;
const ROW_GAP: f64 = 10.0;
const MARGIN: f64 = 20.0;

/// The schedule of `plan`'s pipeline as a self-contained SVG document; an error (what to pass)
/// when the plan has no pipeline.
pub fn schedule_svg(plan: &Plan) -> Result<String, String> {
    let (pipe, t) = plan_timeline(plan)?;
    let title = schedule_title(plan, pipe);
    let bubble = bubble_text(pipe, &t);
    let p = pipe.stages;

    // Columns: stage labels, the plot, each stage's idle share.
    let label_w = (0..p)
        .map(|s| stage_label(plan, s).chars().count())
        .max()
        .unwrap_or(0) as f64
        * CHAR_W
        + 16.0;
    let idle_w = 15.0 * CHAR_W;
    // Wide enough that the shortest step holds its number.
    let shortest = t
        .times
        .iter()
        .flatten()
        .flat_map(|d| [d.forward, d.backward])
        .filter(|&d| d > 0.0)
        .fold(f64::INFINITY, f64::min);
    let digits = step_text(PipeStep::Forward(pipe.micro_batches.saturating_sub(1))).len() as f64;
    let makespan = if t.makespan > 0.0 { t.makespan } else { 1.0 };
    let mut scale = 760.0 / makespan;
    if shortest.is_finite() {
        scale = scale.max((digits * CHAR_W + 6.0) / shortest);
    }
    scale = scale.min(2400.0 / makespan);
    let plot_w = makespan * scale;
    let x0 = MARGIN + label_w;

    let header = 96.0;
    let rows_h = f64::from(p) * (ROW_H + ROW_GAP) - ROW_GAP;
    let axis_h = 44.0;
    let text_w = |s: &str, k: f64| s.chars().count() as f64 * CHAR_W * k + 2.0 * MARGIN;
    let width = (x0 + plot_w + idle_w + MARGIN)
        .max(text_w(&title, 15.0 / FONT_SIZE))
        .max(text_w(&bubble, 1.0))
        .ceil();
    let height = (header + rows_h + axis_h + MARGIN).ceil();

    let mut s = String::with_capacity(2048 + t.stages.iter().map(Vec::len).sum::<usize>() * 300);
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="{FONT_SIZE}">"#
    );
    let _ = writeln!(s, "<title>{}</title>", xml_escape(&title));
    let _ = writeln!(
        s,
        r#"<defs><pattern id="idle" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="white"/><line x1="0" y1="0" x2="0" y2="6" stroke="{IDLE_STROKE}" stroke-width="2"/></pattern></defs>"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text class="title" x="{MARGIN}" y="26" font-size="15" font-weight="bold">{}</text>"#,
        xml_escape(&title)
    );
    let _ = writeln!(
        s,
        r#"<text class="bubble" x="{MARGIN}" y="46">{}</text>"#,
        xml_escape(&bubble)
    );

    // Legend, one row: forward, backward, idle (and the chunks' shades).
    let chunks = pipe.virtual_stages.max(1);
    let mut legend = vec![
        (FORWARD_FILL[0], "forward of micro-batch n"),
        (BACKWARD_FILL[0], "backward of micro-batch n"),
        ("url(#idle)", "idle (the bubble)"),
    ];
    if chunks > 1 {
        legend.push((FORWARD_FILL[1], "darker: a later model chunk of the stage"));
    }
    let _ = writeln!(
        s,
        r#"<g class="legend" transform="translate({MARGIN},60)">"#
    );
    let mut lx = 0.0;
    for (fill, text) in legend {
        let _ = writeln!(
            s,
            r##"<g class="legend-entry"><rect x="{lx:.1}" y="0" width="28" height="16" fill="{fill}" stroke="#444"/><text x="{:.1}" y="12">{}</text></g>"##,
            lx + 36.0,
            xml_escape(text)
        );
        lx += 36.0 + text.chars().count() as f64 * CHAR_W + 24.0;
    }
    let _ = writeln!(s, "</g>");

    let _ = writeln!(
        s,
        r#"<g class="timeline" transform="translate(0,{header})">"#
    );
    for (stage, slots) in t.stages.iter().enumerate() {
        let st = stage as u32;
        let y = f64::from(st) * (ROW_H + ROW_GAP);
        let label = stage_label(plan, st);
        let (forward, backward) = t.times[stage]
            .iter()
            .fold((0.0, 0.0), |(f, b), d| (f + d.forward, b + d.backward));
        let _ = writeln!(
            s,
            r#"<g class="stage" data-stage="{stage}"><title>{}: layers {}; forward {} and backward {} per micro-batch</title>"#,
            xml_escape(&label),
            stage_layers(pipe, st),
            num(forward),
            num(backward),
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            x0 - 10.0,
            y + ROW_H / 2.0 + 4.0,
            xml_escape(&label)
        );
        // The whole row hatched; the steps cover what is not idle.
        let _ = writeln!(
            s,
            r##"<rect class="idle" x="{x0:.1}" y="{y:.1}" width="{plot_w:.1}" height="{ROW_H}" fill="url(#idle)" stroke="#888"/>"##
        );
        for b in slots {
            let (kind, m) = match b.step {
                PipeStep::Forward(m) => ("forward", m),
                PipeStep::Backward(m) => ("backward", m),
            };
            let bx = x0 + b.start * scale;
            let bw = (b.end - b.start) * scale;
            let _ = writeln!(
                s,
                r##"<g class="step {kind}" data-stage="{stage}" data-chunk="{}" data-micro-batch="{m}"><title>stage {stage}: {kind} of micro-batch {}{}, {}–{}</title><rect x="{bx:.2}" y="{y:.1}" width="{bw:.2}" height="{ROW_H}" fill="{}" stroke="#333" stroke-width="0.8"/><text x="{:.2}" y="{:.1}" text-anchor="middle">{}</text></g>"##,
                b.chunk,
                m + 1,
                if chunks > 1 {
                    format!(" on model chunk {}", b.chunk)
                } else {
                    String::new()
                },
                num(b.start),
                num(b.end),
                step_fill(b.step, b.chunk, chunks),
                bx + bw / 2.0,
                y + ROW_H / 2.0 + 4.0,
                step_text(b.step)
            );
        }
        let _ = writeln!(
            s,
            r##"<text class="idle-fraction" x="{:.1}" y="{:.1}" fill="#555">idle {:.1}%</text>"##,
            x0 + plot_w + 10.0,
            y + ROW_H / 2.0 + 4.0,
            100.0 * t.idle_fraction(stage)
        );
        let _ = writeln!(s, "</g>");
    }

    // The time axis.
    let ay = rows_h + 8.0;
    let _ = writeln!(
        s,
        r##"<g class="axis" stroke="#444" fill="#444"><line x1="{x0:.1}" y1="{ay:.1}" x2="{:.1}" y2="{ay:.1}"/>"##,
        x0 + plot_w
    );
    let step = tick_step(makespan, 10.0);
    let mut k = 0u32;
    loop {
        let tv = f64::from(k) * step;
        if tv > makespan * (1.0 + 1e-9) {
            break;
        }
        let tx = x0 + tv * scale;
        let _ = writeln!(
            s,
            r#"<line x1="{tx:.1}" y1="{ay:.1}" x2="{tx:.1}" y2="{:.1}"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" stroke="none">{}</text>"#,
            ay + 5.0,
            ay + 17.0,
            num(tv)
        );
        k += 1;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" stroke="none">time (1 = a stage's mean forward of one micro-batch; the step ends at {})</text>"#,
        x0 + plot_w / 2.0,
        ay + 34.0,
        num(t.makespan)
    );
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, "</svg>");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(tick_step(33.0, 10.0), 5.0);
        assert_eq!(tick_step(10.0, 10.0), 1.0);
        assert!((tick_step(0.7, 10.0) - 0.1).abs() < 1e-12);
        assert_eq!(tick_step(150.0, 10.0), 20.0);
        assert_eq!(num(2.50), "2.5");
        assert_eq!(num(3.0), "3");
    }
}
