//! `ferrotron partition` end to end: every model in the zoo partitions (or says which tensor-
//! parallel sizes would work), `--json` has the documented fields, the paper's 8.3B model at
//! tp = 8 has the per-rank parameters the split implies, and a plan file round-trips.

use std::path::PathBuf;
use std::process::{Command, Output};

fn ferrotron(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .output()
        .expect("the ferrotron binary runs")
}

fn zoo() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("models")
        .expect("models/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    files.sort();
    files
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

#[test]
fn every_model_partitions_or_names_the_valid_sizes() {
    for f in zoo() {
        let file = f.to_str().unwrap();
        // Two layers keep the big models quick; the strategy does not depend on depth.
        let base = ["partition", file, "--dim", "layers=2", "--json"];
        let j = json(&ferrotron(&base));
        assert_eq!(j["tp"], 1, "{file}");
        for tp in ["2", "4", "8"] {
            let mut args = base.to_vec();
            args.extend(["--tp", tp]);
            let out = ferrotron(&args);
            if out.status.success() {
                let j = json(&out);
                assert_eq!(j["tp"].as_u64().unwrap().to_string(), tp);
                let fwd = j["collectives"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["kind"] == "all_reduce" && c["direction"] == "forward")
                    .unwrap_or_else(|| panic!("{file} tp={tp}: {j}"));
                // Two per layer, the embedding's g, the cross-entropy's two of per-token
                // statistics (the row maxima, then the sums with the target logits).
                assert_eq!(fwd["count"].as_u64(), Some(2 * 2 + 1 + 2), "{file}");
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    err.contains("valid tp sizes for this model"),
                    "{file} tp={tp}: {err}"
                );
                assert!(!err.contains("panicked"), "{err}");
            }
        }
    }
}

#[test]
fn json_report_of_the_papers_8b_model() {
    let out = ferrotron(&[
        "partition",
        "models/megatron-8.3b.ron",
        "--tp",
        "8",
        "--dp",
        "64",
        "--dim",
        "batch=512",
        "--json",
    ]);
    let j = json(&out);
    assert_eq!((j["tp"].as_u64(), j["dp"].as_u64()), (Some(8), Some(64)));
    let colls = j["collectives"].as_array().unwrap();
    for c in colls {
        for key in ["kind", "direction", "count", "bytes_per_rank"] {
            assert!(!c[key].is_null(), "{c}");
        }
    }
    let find = |kind: &str, dir: &str, axis: &str| {
        colls
            .iter()
            .find(|c| c["kind"] == kind && c["direction"] == dir && c["axis"] == axis)
            .unwrap_or_else(|| panic!("no {kind} {dir} {axis} in {j}"))
    };
    // 72 layers × 2 + the embedding's g, plus the cross-entropy's 2 all-reduces of its 3
    // per-token statistics.
    assert_eq!(find("all_reduce", "forward", "tp")["count"], 72 * 2 + 1 + 2);
    let (b, s, h) = (512 / 64, 1024u64, 3072u64);
    assert_eq!(
        find("all_reduce", "forward", "tp")["bytes_per_rank"].as_u64(),
        Some((72 * 2 + 1) * b * s * h * 4 + 3 * b * s * 4)
    );
    // One gradient all-reduce per parameter over the data-parallel group.
    let params_per_layer = 12;
    assert_eq!(
        find("all_reduce", "backward", "dp")["count"],
        72 * params_per_layer + 4
    );
    // 8.3B parameters: the split ones over 8, the replicated ones (norms, row-parallel biases,
    // positions) whole; the vocabulary 51,200 is already a multiple of 128 × 8.
    let (v, p, l) = (51_200u64, 1024u64, 72u64);
    let split = v * h + l * (h * 3 * h + 3 * h + h * h + h * 4 * h + 4 * h + 4 * h * h);
    let replicated = p * h + 2 * h + l * (2 * h + h + 2 * h + h);
    assert_eq!(split + replicated, 8_317_040_640);
    assert_eq!(
        j["per_rank"]["parameters"].as_u64(),
        Some(split / 8 + replicated)
    );
    assert!(j["per_rank"]["memory_bytes"].as_u64().unwrap() > 16 * (split / 8 + replicated));
}

#[test]
fn a_plan_file_is_written_whole_and_bad_options_are_clean_errors() {
    let dir = std::env::temp_dir().join(format!("ferrotron-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plan.ron");
    let out = ferrotron(&[
        "partition",
        "models/tiny-gpt.ron",
        "--tp",
        "2",
        "--sequence-parallel",
        "-o",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("AllGather") && text.contains("ReduceScatter"));
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    std::fs::remove_dir_all(&dir).unwrap();

    for (args, needle) in [
        (vec!["--tp", "3"], "valid tp sizes for this model: 1, 2, 4"),
        (vec!["--dp", "3"], "valid dp sizes for this model: 1, 2"),
        (
            vec!["--pin", "wte=sideways"],
            "a layout is `replicated` or `split(D)`",
        ),
        (vec!["--pin", "wte=split(5)"], "the parameter has rank 2"),
        (vec!["--pin", "wtf=replicated"], "did you mean `wte`"),
    ] {
        let mut all = vec!["partition", "models/tiny-gpt.ron"];
        all.extend(args);
        let out = ferrotron(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{all:?}: {err}"
        );
    }
}

#[test]
fn simulate_prints_the_cost_models_figures() {
    let out = ferrotron(&[
        "simulate",
        "models/megatron-8.3b.ron",
        "--cluster",
        "clusters/dgx2h.ron",
        "--tp",
        "8",
        "--dp",
        "4",
        "--micro-batch",
        "8",
        "--dtype",
        "f16",
        "--recompute",
        "--dim",
        "layers=4",
        "--json",
    ]);
    let j = json(&out);
    for key in [
        "step_time_s",
        "tflops_per_gpu",
        "memory_bytes_per_gpu",
        "scaling_efficiency",
    ] {
        assert!(j[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {j}");
    }
    assert_eq!(j["gpus"], 32);
    let out = ferrotron(&["simulate", "--cluster", "clusters/nope.ron"]);
    assert!(!out.status.success());
}

#[test]
fn export_writes_svg_and_dot() {
    let dir = std::env::temp_dir().join(format!("ferrotron-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (svg, dot) = (dir.join("plan.svg"), dir.join("plan.dot"));
    let out = ferrotron(&[
        "export",
        "models/tiny-gpt.ron",
        "--tp",
        "2",
        "--svg",
        svg.to_str().unwrap(),
        "--dot",
        dot.to_str().unwrap(),
        "--expand",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("f (fwd: identity, bwd: all-reduce)"));
    assert!(std::fs::read_to_string(&dot)
        .unwrap()
        .starts_with("digraph"));
    let out = ferrotron(&["export", "models/tiny-gpt.ron", "--expand", "x"]);
    assert!(!out.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pipeline_stages_rank_coordinates_and_plan_files() {
    let j = json(&ferrotron(&[
        "partition",
        "models/tiny-gpt.ron",
        "--dim",
        "layers=4",
        "--dim",
        "batch=4",
        "--tp",
        "2",
        "--dp",
        "2",
        "--pp",
        "2",
        "--micro-batches",
        "2",
        "--json",
    ]));
    // Ranks: tp fastest, then dp, then pp.
    let ranks = j["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 8);
    assert_eq!(
        (&ranks[5]["tp"], &ranks[5]["dp"], &ranks[5]["pp"]),
        (&1.into(), &0.into(), &1.into())
    );
    let p = &j["pipeline"];
    assert_eq!(p["stages"], 2);
    assert_eq!(p["micro_batches"], 2);
    assert_eq!(p["schedule"], "1f1b");
    assert!((p["bubble_fraction"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(p["tied"][0]["param"], "wte");
    assert_eq!(p["per_stage"].as_array().unwrap().len(), 2);
    // The text report says where the tied gradient is summed.
    let out = ferrotron(&[
        "partition",
        "models/tiny-gpt.ron",
        "--dim",
        "layers=3",
        "--pp",
        "3",
        "--micro-batches",
        "2",
        "--stage-layers",
        "1,1,1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("tied: `wte` is held by stages 0 and 2; its gradient is summed on stage 0"),
        "{text}"
    );
    // A pipelined plan round-trips through a plan file.
    let dir = std::env::temp_dir().join(format!("ferrotron-pp-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("plan.ron");
    let out = ferrotron(&[
        "partition",
        "models/tiny-gpt.ron",
        "--pp",
        "2",
        "--micro-batches",
        "2",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let plan = ferrotron_partitioner::Plan::from_ron(&text, "plan.ron").unwrap();
    assert_eq!(plan.pipeline.as_ref().unwrap().stages, 2);
    std::fs::remove_dir_all(&dir).ok();
    // Impossible cuts say what would be valid.
    let out = ferrotron(&["partition", "models/tiny-gpt.ron", "--pp", "3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("valid --pp: 1 to 2"));
    let out = ferrotron(&["partition", "models/tiny-gpt.ron", "--micro-batches", "3"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("valid: 1, 2"));
}

#[test]
fn export_draws_the_schedule_timeline() {
    let dir = std::env::temp_dir().join(format!("ferrotron-timeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("schedule.svg");
    let out = ferrotron(&[
        "export",
        "models/tiny-gpt.ron",
        "--dim",
        "layers=4",
        "--pp",
        "2",
        "--micro-batches",
        "2",
        "--timeline",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") || text.contains("<svg"), "an SVG");
    assert!(
        text.contains("1F1B") && text.contains("bubble"),
        "titled with its schedule"
    );
    std::fs::remove_dir_all(&dir).ok();
    // Without stages there is no schedule to draw.
    let out = ferrotron(&[
        "export",
        "models/tiny-gpt.ron",
        "--timeline",
        "--svg",
        "x.svg",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pp"));
}

/// A published configuration typed in Megatron's terms: the global batch and the micro-batch
/// size give the micro-batch count, and recomputation and the ZeRO stage are priced as asked.
#[test]
fn simulate_and_plan_take_megatrons_terms() {
    let small = [
        "--dim",
        "layers=4",
        "--dim",
        "hidden=512",
        "--dim",
        "heads=8",
        "--dim",
        "seq=256",
        "--dim",
        "positions=256",
    ];
    let simulate = |extra: &[&str]| {
        let mut args = vec![
            "simulate",
            "models/megatron-8.3b.ron",
            "--cluster",
            "clusters/dgx-a100.ron",
            "--dtype",
            "f16",
            "--tp",
            "2",
            "--dp",
            "4",
            "--pp",
            "2",
            "--global-batch",
            "64",
            "--json",
        ];
        args.extend_from_slice(&small);
        args.extend_from_slice(extra);
        ferrotron(&args)
    };
    let plain = json(&simulate(&["--micro-batch-size", "2"]));
    // 64 sequences in micro-batches of 2 on each of 4 replicas: 8 micro-batches.
    assert_eq!(plain["micro_batches"], 8, "{plain}");
    assert_eq!(
        (plain["recompute"].as_str(), plain["zero"].as_u64()),
        (Some("none"), Some(0))
    );
    let lean = json(&simulate(&[
        "--micro-batch-size",
        "2",
        "--recompute",
        "selective",
        "--zero",
        "1",
    ]));
    assert_eq!(
        (lean["recompute"].as_str(), lean["zero"].as_u64()),
        (Some("selective"), Some(1))
    );
    assert!(lean["recompute_s"].as_f64().unwrap() > 0.0, "{lean}");
    assert!(lean["dp_gather_s"].as_f64().unwrap() > 0.0, "{lean}");
    let bytes = |j: &serde_json::Value| j["memory_bytes_per_gpu"].as_u64().unwrap();
    assert!(bytes(&lean) < bytes(&plain), "{lean}\n{plain}");
    // A micro-batch size that does not divide the replica's share names the valid ones.
    let out = simulate(&["--micro-batch-size", "3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("valid sizes: 1, 2, 4, 8, 16"), "{err}");

    let plan = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "models/megatron-8.3b.ron",
            "--cluster",
            "clusters/dgx-a100.ron",
            "--dtype",
            "f16",
            "--gpus",
            "16",
            "--global-batch",
            "32",
        ];
        args.extend_from_slice(&small);
        args.extend_from_slice(extra);
        ferrotron(&args)
    };
    // Fixed dimensions are kept in every candidate priced.
    let fixed = json(&plan(&[
        "--tp",
        "2",
        "--pp",
        "2",
        "--micro-batch-size",
        "2",
        "--recompute",
        "full",
        "--zero",
        "1",
        "--json",
    ]));
    let priced: Vec<&serde_json::Value> = fixed["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["simulation"].is_null())
        .collect();
    assert!(!priced.is_empty(), "{fixed}");
    for c in priced {
        assert_eq!(
            (
                &c["tp"],
                &c["pp"],
                &c["dp"],
                &c["micro_batch_size"],
                &c["micro_batches"]
            ),
            (&2.into(), &2.into(), &4.into(), &2.into(), &4.into()),
            "{c}"
        );
        assert_eq!(
            (c["recompute"].as_str(), c["zero"].as_u64()),
            (Some("full"), Some(1))
        );
    }
    // The table names why the rejected ones cannot run.
    let out = plan(&["--tp", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cannot run") && text.contains("tp = 3 does not divide the 16 GPUs"),
        "{text}"
    );
}
