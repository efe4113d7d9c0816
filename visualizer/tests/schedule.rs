//! The schedule picture (`ferrotron export --timeline`) of tiny-gpt cut into pipeline stages, and
//! the graph drawing's stage bands.

use ferrotron_ir::{load_model, LoadOptions};
use ferrotron_partitioner::{partition, PartitionOptions, Plan, Schedule};
use ferrotron_visualizer::export::{svg, ExportOptions};
use ferrotron_visualizer::schedule::{schedule_name, schedule_svg};
use std::path::PathBuf;

fn tiny_gpt(pp: u64, micro_batches: u64, schedule: Schedule) -> Plan {
    tiny_gpt_chunks(pp, micro_batches, schedule, 1)
}

fn tiny_gpt_chunks(pp: u64, micro_batches: u64, schedule: Schedule, virtual_stages: u64) -> Plan {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tiny-gpt.ron"
    ));
    let g = load_model(
        &path,
        &LoadOptions {
            overrides: vec![("layers".into(), 4), ("batch".into(), 2)],
            ..LoadOptions::default()
        },
    )
    .expect("tiny-gpt loads");
    partition(
        &g,
        &PartitionOptions {
            pp,
            micro_batches,
            schedule,
            virtual_stages,
            ..Default::default()
        },
    )
    .expect("tiny-gpt partitions")
}

fn count(doc: &str, what: &str) -> usize {
    doc.matches(what).count()
}

#[test]
fn the_schedule_has_a_box_per_step_and_states_the_bubble() {
    for schedule in [Schedule::OneFOneB, Schedule::GPipe] {
        let (p, m) = (2, 2);
        let doc = schedule_svg(&tiny_gpt(p, m, schedule)).expect("a pipelined plan draws");
        assert!(doc.starts_with("<?xml") && doc.trim_end().ends_with("</svg>"));
        assert_eq!(
            count(&doc, r#"<g class="step "#) as u64,
            p * 2 * m,
            "{schedule}"
        );
        assert_eq!(count(&doc, r#"<g class="step forward""#) as u64, p * m);
        assert_eq!(count(&doc, r#"<g class="step backward""#) as u64, p * m);
        // Every step of every stage, each micro-batch once per direction.
        for s in 0..p {
            for mb in 0..m {
                for kind in ["forward", "backward"] {
                    let tag = format!(
                        r#"<g class="step {kind}" data-stage="{s}" data-chunk="0" data-micro-batch="{mb}">"#
                    );
                    assert_eq!(count(&doc, &tag), 1, "{tag}");
                }
            }
        }
        // The bubble, by its formula: (2 − 1)/(2 + 2 − 1) = 1/3.
        assert!(
            doc.contains("bubble (P − 1)/(M + P − 1) = 1/3 = 33.3%"),
            "{doc}"
        );
        assert!(doc.contains("this timeline idles"));
        assert!(doc.contains("stage 0 (rank 0)") && doc.contains("stage 1 (rank 1)"));
        assert!(doc.contains(&format!(
            "tiny-gpt: tp = 1, dp = 1, pp = 2, M = 2 micro-batches, {} schedule",
            schedule_name(schedule)
        )));
        assert_eq!(count(&doc, "<g"), count(&doc, "</g>"));
    }
}

#[test]
fn the_interleaved_schedule_draws_every_chunk() {
    let (p, m, v) = (2u64, 2u64, 2u64);
    let doc = schedule_svg(&tiny_gpt_chunks(p, m, Schedule::Interleaved, v)).expect("draws");
    assert_eq!(count(&doc, r#"<g class="step "#) as u64, p * 2 * m * v);
    for c in 0..v {
        assert_eq!(
            count(&doc, &format!(r#"data-chunk="{c}""#)) as u64,
            p * 2 * m,
            "chunk {c}"
        );
    }
    // (2 − 1)/(2·2 + 2 − 1) = 1/5.
    assert!(
        doc.contains("bubble (P − 1)/(V·M + P − 1) = 1/5 = 20.0%"),
        "{doc}"
    );
    assert!(doc.contains("pp = 2, V = 2 chunks per stage, M = 2 micro-batches"));
    // Stage 0 holds layers 0 and 2, stage 1 layers 1 and 3.
    assert!(doc.contains("stage 0 (rank 0): layers 0, 2;"), "{doc}");
}

#[test]
fn a_plan_without_a_pipeline_says_what_to_pass() {
    let err = schedule_svg(&tiny_gpt(1, 1, Schedule::OneFOneB)).unwrap_err();
    assert!(
        err.contains("--pp") && err.contains("--micro-batches"),
        "{err}"
    );
}

#[test]
fn micro_batches_alone_draw_one_stage_without_a_bubble() {
    let doc = schedule_svg(&tiny_gpt(1, 3, Schedule::OneFOneB)).expect("draws");
    assert_eq!(count(&doc, r#"<g class="step "#), 6);
    assert!(doc.contains("= 0/3 = 0.0%"));
    assert!(doc.contains("this timeline idles 0.0%"));
}

#[test]
fn the_graph_drawing_bands_every_box_with_its_stage() {
    let plan = tiny_gpt(2, 2, Schedule::OneFOneB);
    let doc = svg(&plan, &ExportOptions::default());
    assert!(doc.contains("pp = 2 (2 micro-batches, 1f1b)"));
    // Collapsed layers 0 and 1 on stage 0, 2 and 3 on stage 1.
    let layers = doc.matches(r#"<g class="node layer""#).count();
    assert_eq!(layers, 4);
    for (st, want) in [(0, 2), (1, 2)] {
        let banded_layers = doc
            .split("<g class=\"node layer\"")
            .skip(1)
            .filter(|g| {
                let node = &g[..g.find("</g>").expect("closed")];
                node.contains(&format!(r#"class="stage-band" data-stage="{st}""#))
            })
            .count();
        assert_eq!(banded_layers, want, "stage {st}");
    }
    assert!(doc.contains("band: stage 1 (rank 1)"));
    // The tied embedding (read by the first stage's embedding and the last stage's output
    // layer) has a band for each.
    let wte = doc
        .split(r#"<g class="node param""#)
        .find(|g| g.contains(r#"data-name="wte""#))
        .expect("wte drawn");
    let wte = &wte[..wte.find("</g>").expect("closed")];
    assert!(wte.contains(r#"data-stage="0""#) && wte.contains(r#"data-stage="1""#));
    // One stage: no bands.
    let doc = svg(
        &tiny_gpt(1, 2, Schedule::OneFOneB),
        &ExportOptions::default(),
    );
    assert!(!doc.contains("stage-band"));
}
