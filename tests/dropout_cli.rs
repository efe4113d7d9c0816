//! `--dropout P` on `run` and `train`, and `generate` without dropout: tiny-gpt declares its
//! dropouts at 0.1. `--dropout 0` gives the loss of the model whose dropouts keep every element
//! (the same at any dropout seed) and verifies against the unpartitioned model, partitioned and
//! pipelined; `--dropout 0.1` is the model's own loss, `--dropout 0.5` another; a rate outside
//! [0, 1) is refused by name; `generate` continues text as the model without dropout does.

use ferrotron_cpu::Cpu;
use ferrotron_exec::init::{init_params, random_batch, test_params};
use ferrotron_exec::verify::reference_plan;
use ferrotron_exec::{run, RunOptions};
use ferrotron_ir::{load_model, Graph, LoadOptions, Op};
use std::path::Path;
use std::process::{Command, Output};

const MODEL: &str = "models/tiny-gpt.ron";

fn ferrotron(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .output()
        .expect("the ferrotron binary runs")
}

/// `ferrotron run MODEL --json` with `extra`, which must succeed.
fn run_json(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["run", MODEL, "--json"];
    args.extend_from_slice(extra);
    let out = ferrotron(&args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `|a − b| ≤ max(rtol·(|a| + |b|), atol)`.
fn close(a: f64, b: f64, rtol: f64, atol: f64) -> bool {
    (a - b).abs() <= (rtol * (a.abs() + b.abs())).max(atol)
}

/// `g` with every dropout's rate set to `p` in place (the graph keeps its dropout nodes).
fn with_rate(mut g: Graph, p: f64) -> Graph {
    let mut count = 0;
    for node in g.nodes.values_mut() {
        if let Op::Dropout { p: rate, .. } = &mut node.op {
            *rate = p;
            count += 1;
        }
    }
    assert!(count > 0, "tiny-gpt has dropouts");
    g
}

/// The unpartitioned model's loss on `run`'s weights and batch (seed 0; the test-scaled weights
/// of `--verify` when `verify`) at dropout seed `dropout_seed`.
fn reference_loss(g: &Graph, verify: bool, dropout_seed: u64) -> f64 {
    let opts = RunOptions {
        dropout_seed,
        ..RunOptions::default()
    };
    let params = match verify {
        true => test_params(g, 0),
        false => init_params(g, 0),
    };
    let plan = reference_plan(g).unwrap();
    let r = run(Cpu::default(), &plan, &params, &random_batch(g, 0), &opts).unwrap();
    f64::from(r.loss().unwrap())
}

#[test]
fn dropout_zero_is_the_loss_without_dropout_and_verifies() {
    let g = with_rate(
        load_model(Path::new(MODEL), &LoadOptions::default()).unwrap(),
        0.0,
    );
    let (a, b) = (reference_loss(&g, false, 0), reference_loss(&g, false, 7));
    assert_eq!(a, b, "a rate of 0 keeps every element at any seed");
    let off = run_json(&["--dropout", "0"])["loss"].as_f64().unwrap();
    assert!(
        close(off, a, 1e-5, 1e-6),
        "--dropout 0: {off}, reference {a}"
    );

    // Partitioned, with sequence parallelism, and pipelined: verified, and the loss of the
    // model without dropout on the test-scaled weights `--verify` uses.
    let a = reference_loss(&g, true, 0);
    assert_eq!(a, reference_loss(&g, true, 3));
    for mesh in [
        &["--tp", "2"][..],
        &[
            "--tp",
            "2",
            "--sequence-parallel",
            "--recompute",
            "selective",
        ],
        &["--pp", "2", "--micro-batches", "2"],
    ] {
        let mut extra = vec!["--dropout", "0", "--verify"];
        extra.extend_from_slice(mesh);
        let j = run_json(&extra);
        assert_eq!(j["verified"], true, "{mesh:?}: {j}");
        let loss = j["loss"].as_f64().unwrap();
        assert!(
            close(loss, a, 1e-5, 1e-6),
            "{mesh:?}: {loss}, reference {a}"
        );
    }
}

#[test]
fn dropout_overrides_the_model_files_rate() {
    let default = run_json(&["--tp", "2"])["loss"].as_f64().unwrap();
    let same = run_json(&["--tp", "2", "--dropout", "0.1"])["loss"]
        .as_f64()
        .unwrap();
    assert_eq!(same, default, "tiny-gpt's own rate is 0.1");
    let off = run_json(&["--tp", "2", "--dropout", "0"])["loss"]
        .as_f64()
        .unwrap();
    let verified = run_json(&["--tp", "2", "--dropout", "0.5", "--verify"]);
    assert_eq!(verified["verified"], true, "{verified}");
    let half = run_json(&["--tp", "2", "--dropout", "0.5"])["loss"]
        .as_f64()
        .unwrap();
    assert!(half.is_finite() && half > 0.0);
    assert!(
        !close(half, default, 1e-4, 0.0),
        "0.5: {half}, 0.1: {default}"
    );
    assert!(!close(off, default, 1e-4, 0.0), "0: {off}, 0.1: {default}");

    // The reference at 0.5, with the dropout nodes kept.
    let g = with_rate(
        load_model(Path::new(MODEL), &LoadOptions::default()).unwrap(),
        0.5,
    );
    let r = reference_loss(&g, false, 0);
    assert!(
        close(half, r, 1e-5, 1e-6),
        "--dropout 0.5: {half}, reference {r}"
    );
}

#[test]
fn a_rate_outside_zero_to_one_is_refused() {
    for (command, extra) in [
        ("run", &[][..]),
        ("train", &["--data", "README.md", "--steps", "1"][..]),
    ] {
        for bad in ["1", "1.5", "-0.1", "nan", "x"] {
            let flag = format!("--dropout={bad}");
            let mut args = vec![command, MODEL, &flag];
            args.extend_from_slice(extra);
            let out = ferrotron(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(
                err.contains("--dropout") && err.contains(bad),
                "{args:?}: {err}"
            );
            let why = if bad == "x" {
                "not a number"
            } else {
                "at least 0 and below 1"
            };
            assert!(err.contains(why), "{args:?}: {err}");
        }
    }
}

#[test]
fn train_takes_dropout_and_generate_never_drops() {
    let dir = std::env::temp_dir().join(format!("ferrotron-dropout-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("ck");
    let log = dir.join("log.csv");
    let dims = ["--dim", "vocab=256"];
    let mut train = vec!["train", MODEL, "--data", "README.md", "--steps", "3"];
    train.extend(dims);
    train.extend(["--dropout", "0.2", "--save", ckpt.to_str().unwrap()]);
    train.extend(["--log", log.to_str().unwrap()]);
    let out = ferrotron(&train);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: no progress drawn, one line where training ended.
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("step 3/3").count(), 1, "{err}");
    assert!(!err.contains('\r'), "{err}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.lines().count(), 3, "{logged}");

    // Sampled, so that any change to the logits shows in the text.
    let mut generate = vec!["generate", MODEL];
    generate.extend(dims);
    generate.extend(["--checkpoint", ckpt.to_str().unwrap(), "--prompt", "ferro"]);
    generate.extend(["--tokens", "24", "--temperature", "1", "--seed", "3"]);
    let out = ferrotron(&generate);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();

    let g = load_model(
        Path::new(MODEL),
        &LoadOptions {
            overrides: vec![("vocab".into(), 256)],
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let continued = |g: &Graph| {
        let plan = reference_plan(g).unwrap();
        let tokenizer = ferrotron_io::tokenizer::Tokenizer::named("bytes").unwrap();
        let sampling = ferrotron_io::generate::Sampling {
            tokens: 24,
            temperature: 1.0,
            seed: 3,
        };
        ferrotron_io::generate::generate(
            Cpu::default(),
            (g, &plan),
            &ckpt,
            &tokenizer,
            "ferro",
            sampling,
        )
    };
    let without = continued(&with_rate(g.clone(), 0.0)).unwrap();
    assert_eq!(text, without.trim_end(), "generate applies no dropout");
    // The library refuses a plan that still drops, naming the dropout.
    let err = continued(&g).unwrap_err().to_string();
    assert!(err.contains("drops activations"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
