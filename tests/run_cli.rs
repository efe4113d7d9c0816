//! `ferrotron run` end to end: a zoo model partitioned and run on CPU threads, verified against
//! the unpartitioned model, with the JSON fields the README documents.

use std::process::Command;

fn ferrotron(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .output()
        .expect("the ferrotron binary runs")
}

#[test]
fn run_verify_json() {
    for extra in [
        vec!["--tp", "2"],
        vec!["--tp", "2", "--dp", "2", "--sequence-parallel"],
    ] {
        let mut args = vec!["run", "models/tiny-gpt.ron", "--verify", "--json"];
        args.extend(extra.iter().copied());
        let out = ferrotron(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["verified"], true, "{j}");
        let loss = j["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0);
        assert!(j["max_rel_error"].as_f64().unwrap() < 1e-4);
        assert!(j["tokens_per_second"].as_f64().unwrap() > 0.0);
        assert!(j["peak_bytes_per_rank"].as_u64().unwrap() > 0);
    }
}

#[test]
fn run_verify_checks_the_fused_loss_and_the_logits_only_where_they_exist() {
    // GPT-2's output layer runs fused with its loss by default: the logits are never whole, and
    // the verification is of the fused step's loss and gradients. `--no-fuse-loss` makes the
    // logits, and they are compared too.
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "models/tiny-gpt.ron",
            "--tp",
            "2",
            "--verify",
            "--json",
        ];
        args.extend(extra);
        let out = ferrotron(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["verified"], true, "{j}");
        (
            j["verified_outputs"].clone(),
            j["verified_tensors"].as_u64().unwrap(),
        )
    };
    let (fused_outputs, fused_count) = verify(&[]);
    let (plain_outputs, plain_count) = verify(&["--no-fuse-loss"]);
    assert_eq!(fused_outputs, false);
    assert_eq!(plain_outputs, true);
    assert_eq!(plain_count, fused_count + 1, "the logits, once");
}

#[test]
fn pipelined_run_verify_json_reports_the_bubble_and_each_stage() {
    let out = ferrotron(&[
        "run",
        "models/tiny-gpt.ron",
        "--dim",
        "layers=4",
        "--dim",
        "batch=4",
        "--tp",
        "2",
        "--pp",
        "2",
        "--micro-batches",
        "4",
        "--verify",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["verified"], true, "{j}");
    assert!(j["max_rel_error"].as_f64().unwrap() < 1e-4);
    assert_eq!(
        (j["pp"].as_u64(), j["micro_batches"].as_u64()),
        (Some(2), Some(4))
    );
    assert!((j["bubble_fraction"].as_f64().unwrap() - 0.2).abs() < 1e-12);
    for key in ["peak_bytes_per_stage", "estimated_bytes_per_stage"] {
        let per = j[key].as_array().unwrap_or_else(|| panic!("{key}: {j}"));
        assert_eq!(per.len(), 2);
        assert!(per.iter().all(|b| b.as_u64().unwrap() > 0), "{key}: {j}");
    }
    let idle = j["idle_fraction_per_stage"].as_array().unwrap();
    assert!(idle
        .iter()
        .all(|f| (0.0..1.0).contains(&f.as_f64().unwrap())));
    // A trace shows each micro-batch's forward and backward part on every rank.
    let dir = std::env::temp_dir().join(format!("ferrotron-pp-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.json");
    let out = ferrotron(&[
        "run",
        "models/tiny-gpt.ron",
        "--pp",
        "2",
        "--micro-batches",
        "2",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let steps: Vec<(u64, String)> = t["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"].as_str().is_some_and(|c| c.ends_with(" step")))
        .map(|e| {
            (
                e["tid"].as_u64().unwrap(),
                e["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let on = |tid| -> Vec<&str> {
        steps
            .iter()
            .filter(|(t, _)| *t == tid)
            .map(|(_, n)| n.as_str())
            .collect()
    };
    assert_eq!(on(0), ["F0", "F1", "B0", "B1"], "stage 0 warms up");
    assert_eq!(on(1), ["F0", "B0", "F1", "B1"], "stage 1 alternates");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_text_and_errors() {
    let out = ferrotron(&["run", "models/tiny-llama.ron", "--tp", "2", "--verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verified ("), "{text}");
    assert!(text.contains("tokens/s"), "{text}");
    let out = ferrotron(&["run", "models/tiny-llama.ron", "--tp", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("valid tp sizes"),
        "{err}"
    );
}

/// A GPT-2-layout safetensors file (Hugging Face names, fused q|k|v, Conv1D orientation, a tied
/// `lm_head`) and a token file, run at tp = 1 and tp = 2: the dumped gradients agree.
#[test]
fn hugging_face_weights_and_token_files() {
    use ferrotron_exec::init::init_params;
    use ferrotron_io::hf::{read_safetensors, to_hf_names, write_safetensors};
    use ferrotron_ir::{load_model, LoadOptions};

    let dir = std::env::temp_dir().join(format!("ferrotron-hf-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let g = load_model(
        std::path::Path::new("models/tiny-gpt.ron"),
        &LoadOptions::default(),
    )
    .unwrap();
    let mut hf = to_hf_names(&init_params(&g, 11));
    hf.insert(
        "lm_head.weight".into(),
        hf["transformer.wte.weight"].clone(),
    );
    let weights = dir.join("model.safetensors");
    write_safetensors(&weights, &hf).unwrap();
    let tokens = dir.join("batch.txt");
    let line = |k: u32| {
        (0..16)
            .map(|i| ((i * 7 + k) % 97).to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    std::fs::write(&tokens, format!("{}\n{}\n{}\n", line(1), line(2), line(3))).unwrap();
    let mut dumps = Vec::new();
    for tp in ["1", "2"] {
        let out = dir.join(format!("grads-{tp}.safetensors"));
        let o = ferrotron(&[
            "run",
            "models/tiny-gpt.ron",
            "--tp",
            tp,
            "--weights",
            weights.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--dump-grads",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(j["loss"].as_f64().unwrap() > 0.0);
        dumps.push(read_safetensors(&out).unwrap());
    }
    assert_eq!(dumps[0].len(), g.params.len());
    for (name, a) in &dumps[0] {
        let b = &dumps[1][name];
        assert_eq!(a.shape, b.shape, "{name}");
        let scale = a.data.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        let diff = a
            .data
            .iter()
            .zip(&b.data)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff / scale < 1e-4, "{name}: {}", diff / scale);
    }
    // A weights file missing a tensor is named.
    hf.remove("transformer.h.1.mlp.c_fc.bias");
    write_safetensors(&weights, &hf).unwrap();
    let o = ferrotron(&[
        "run",
        "models/tiny-gpt.ron",
        "--weights",
        weights.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("h.1.mlp.c_fc.bias"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Fusion changes the kernels, not the results: with the pairs fused (`--no-fuse-attention
/// --no-fuse-loss`) and with nothing fused (`--no-fuse`) the loss is the same to the bit, with
/// the attention and the output layer with its loss fused too (the default) the same within
/// `f32` rounding; the traces name the fused steps.
#[test]
fn no_fuse_gives_the_same_loss_and_the_trace_shows_the_fused_steps() {
    let trace = |name: &str| {
        std::env::temp_dir().join(format!(
            "ferrotron-run-cli-trace-{name}-{}.json",
            std::process::id()
        ))
    };
    let (pairs_trace, all_trace) = (trace("pairs"), trace("all"));
    let common = ["run", "models/tiny-gpt.ron", "--tp", "2", "--json"];
    let pairs = ferrotron(
        &[
            &common[..],
            &[
                "--no-fuse-attention",
                "--no-fuse-loss",
                "--trace",
                pairs_trace.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    let all = ferrotron(&[&common[..], &["--trace", all_trace.to_str().unwrap()]].concat());
    let unfused = ferrotron(&[&common[..], &["--no-fuse"]].concat());
    for out in [&pairs, &all, &unfused] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let loss = |out: &std::process::Output| {
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        j["loss"].as_f64().unwrap()
    };
    assert_eq!(loss(&pairs), loss(&unfused));
    let off = (loss(&all) - loss(&unfused)).abs() / loss(&unfused);
    assert!(off <= 1e-5, "the fused attention's loss is {off:e} off");
    let read = |path: &std::path::Path| {
        let text = std::fs::read_to_string(path).unwrap();
        let _ = std::fs::remove_file(path);
        text
    };
    let has = |text: &str, op: &str| text.contains(&format!("\"op\":\"{op}\""));
    let (pairs_text, all_text) = (read(&pairs_trace), read(&all_trace));
    for op in [
        "BiasAct",
        "BiasActGrad",
        "ScaledSoftmax",
        "ScaledSoftmaxGrad",
    ] {
        assert!(has(&pairs_text, op), "{op} missing from the trace");
    }
    for op in [
        "BiasAct",
        "BiasActGrad",
        "Attention",
        "AttentionGrad",
        "OutputLossGrad",
    ] {
        assert!(has(&all_text, op), "{op} missing from the trace");
    }
    assert!(!has(&all_text, "ScaledSoftmax"), "an attention ran unfused");
    assert!(!has(&pairs_text, "OutputLossGrad"), "the loss ran fused");
    for op in ["CrossEntropy", "CrossEntropyGrad"] {
        assert!(!has(&all_text, op), "{op} ran unfused");
        assert!(has(&pairs_text, op), "{op} missing from the trace");
    }
}

/// `--steps N` repeats the step: the same loss as one step (the weights do not change), the
/// first step apart, tokens/s from the median of the rest; the thread count does not change the
/// results.
#[test]
fn repeated_steps_report_the_steady_state() {
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "models/tiny-gpt.ron", "--tp", "2", "--json"];
        args.extend_from_slice(extra);
        let out = ferrotron(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let once = run(&["--threads", "1"]);
    assert_eq!(once["steps"], 1);
    let repeated = run(&["--steps", "4", "--threads", "2"]);
    assert_eq!(repeated["steps"], 4);
    assert_eq!(repeated["loss"], once["loss"], "{repeated}\n{once}");
    // Each step's values give their arena places back to the next: none falls to the heap.
    assert_eq!(repeated["arena_missed_last_step"], 0, "{repeated}");
    let (first, step) = (
        repeated["first_step_s"].as_f64().unwrap(),
        repeated["step_s"].as_f64().unwrap(),
    );
    assert!(first > 0.0 && step > 0.0);
    let tokens = repeated["tokens_per_second"].as_f64().unwrap();
    let per_step = tokens * step;
    // tiny-gpt's step is batch × seq tokens; tokens/s is that over the median step.
    assert!(
        per_step > 1.0 && (per_step - per_step.round()).abs() < 1e-6 * per_step,
        "{repeated}"
    );
    let out = ferrotron(&["run", "models/tiny-gpt.ron", "--steps", "0"]);
    assert!(!out.status.success());
}
