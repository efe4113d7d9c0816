//! End-to-end over the model zoo: every file checks through the CLI, the counts match the
//! published figures, the FLOP count matches the Megatron paper's formula, and a broken file is
//! a clean error with a location, never a panic.

use ferrotron_ir::count::{count_params, forward_flops};
use ferrotron_ir::{load_model, LoadOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

fn zoo() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("models")
        .expect("models/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    files.sort();
    files
}

fn ferrotron(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .output()
        .expect("the ferrotron binary runs")
}

fn check_json(model: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["check", model, "--json"];
    args.extend_from_slice(extra);
    let out = ferrotron(&args);
    assert!(
        out.status.success(),
        "check {model} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

#[test]
fn every_model_in_the_zoo_checks() {
    let files = zoo();
    assert!(files.len() >= 13, "the zoo has {} files", files.len());
    for f in files {
        let json = check_json(f.to_str().unwrap(), &[]);
        assert!(json["name"].is_string(), "{f:?}");
        assert!(json["parameters"].as_u64().unwrap() > 0, "{f:?}");
        assert!(json["layers"].as_u64().unwrap() >= 2, "{f:?}");
    }
}

#[test]
fn parameter_counts_match_the_reference_implementations() {
    // GPT-2 figures as Hugging Face counts them (tied embedding once); BERT-large with the MLM
    // head and without the pooler; Llama 3 8B as published.
    let expected = [
        ("gpt2-small", 124_439_808u64, 12u64),
        ("gpt2-medium", 354_823_168, 24),
        ("gpt2-large", 774_030_080, 36),
        ("gpt2-xl", 1_557_611_200, 48),
        ("bert-large", 335_174_458, 24),
        ("llama3-8b", 8_030_261_248, 32),
        ("megatron-1.2b", 1_213_479_936, 40),
        ("megatron-2.5b", 2_490_408_960, 54),
        ("megatron-4.2b", 4_199_109_120, 64),
        ("megatron-8.3b", 8_317_040_640, 72),
    ];
    for (name, params, layers) in expected {
        let json = check_json(&format!("models/{name}.ron"), &[]);
        assert_eq!(json["name"], name);
        assert_eq!(json["parameters"].as_u64(), Some(params), "{name}");
        assert_eq!(json["layers"].as_u64(), Some(layers), "{name}");
    }
}

#[test]
fn the_paper_configurations_have_the_paper_shapes() {
    for (name, hidden, heads, layers) in [
        ("megatron-1.2b", 1536, 16, 40),
        ("megatron-2.5b", 1920, 20, 54),
        ("megatron-4.2b", 2304, 24, 64),
        ("megatron-8.3b", 3072, 32, 72),
    ] {
        let dims = &check_json(&format!("models/{name}.ron"), &[])["dims"];
        assert_eq!(dims["hidden"], hidden);
        assert_eq!(dims["heads"], heads);
        assert_eq!(dims["layers"], layers);
        assert_eq!(dims["vocab"], 51200);
        assert_eq!(dims["seq"], 1024);
    }
}

#[test]
fn gpt_matmul_flops_match_the_megatron_formula() {
    // Forward matmul FLOPs of a GPT: 24·B·s·l·h²·(1 + s/6h) in the layers plus 2·B·s·h·V for
    // the logits (the paper's formula, eq. in its appendix, is 3× this for forward + backward).
    for name in ["tiny-gpt", "gpt2-small", "megatron-8.3b"] {
        let g = load_model(
            Path::new(&format!("models/{name}.ron")),
            &LoadOptions::default(),
        )
        .unwrap();
        let dim = |n: &str| g.dims.iter().find(|(d, _)| d == n).unwrap().1 as u128;
        let (b, s, l, h, v) = (
            dim("batch"),
            dim("seq"),
            dim("layers"),
            dim("hidden"),
            dim("vocab"),
        );
        let expected = 24 * b * s * l * h * h + 4 * b * s * s * h * l + 2 * b * s * h * v;
        assert_eq!(forward_flops(&g).matmul, expected, "{name}");
    }
}

#[test]
fn dim_overrides_resize_the_model() {
    let json = check_json(
        "models/gpt2-small.ron",
        &[
            "--dim",
            "layers=2",
            "--dim",
            "hidden=128",
            "--dim",
            "heads=4",
        ],
    );
    assert_eq!(json["layers"], 2);
    assert_eq!(json["dims"]["hidden"], 128);
    assert_eq!(
        json["dims"]["ffn"], 512,
        "ffn = 4 * hidden follows the override"
    );
    let g = load_model(
        Path::new("models/gpt2-small.ron"),
        &LoadOptions {
            overrides: vec![
                ("layers".into(), 2),
                ("hidden".into(), 128),
                ("heads".into(), 4),
            ],
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(json["parameters"].as_u64(), Some(count_params(&g).total));
}

#[test]
fn tied_embedding_is_counted_once() {
    let g = load_model(Path::new("models/tiny-gpt.ron"), &LoadOptions::default()).unwrap();
    let wte = g.value_named("wte").unwrap();
    let uses = g
        .order
        .iter()
        .filter(|&&n| g.nodes[n].op.inputs().contains(&&wte))
        .count();
    assert_eq!(
        uses, 2,
        "the embedding lookup and the output layer share wte"
    );
    let per_param: u64 = g
        .params
        .values()
        .map(|p| g.ty(p.value).shape.numel().unwrap())
        .sum();
    assert_eq!(count_params(&g).total, per_param);
}

#[test]
fn a_broken_model_fails_cleanly_through_the_cli() {
    let dir = std::env::temp_dir().join(format!("ferrotron-zoo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = std::fs::read_to_string("models/gpt2-small.ron").unwrap();
    let broken = dir.join("broken.ron");
    std::fs::write(
        &broken,
        src.replace("\"act\": GeluTanh(\"fc\")", "\"act\": GeluTanh(\"fcc\")"),
    )
    .unwrap();
    let out = ferrotron(&["check", broken.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(
            "broken.ron:74:17: in `h.0.act`: `fcc` is not defined here (did you mean `fc`?)"
        ),
        "{stderr}"
    );
    let out = ferrotron(&["check", "models/tiny-gpt.ron", "--dim", "layers"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected NAME=VALUE"));
    let out = ferrotron(&["check", "models/tiny-gpt.ron", "--dim", "hidden=66"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("66 / 4 is not a whole number"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn extends_errors_are_located_in_the_extending_file() {
    let dir = std::env::temp_dir().join(format!("ferrotron-ext-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = std::fs::canonicalize("models/gpt2-small.ron").unwrap();
    let child = dir.join("child.ron");
    std::fs::write(
        &child,
        format!(
            "Model(\n    name: \"child\",\n    extends: {:?},\n    dims: {{\n        \"hiddn\": 8,\n    }},\n)\n",
            base.display()
        ),
    )
    .unwrap();
    let e = load_model(&child, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("child.ron:5:9: in `hiddn`:"), "{e}");
    assert!(
        e.contains("has no dimension `hiddn` (did you mean `hidden`?)"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
