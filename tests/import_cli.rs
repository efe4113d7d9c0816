//! `ferrotron import` end to end: each family's fixture (`tests/fixtures/hf/<family>/`, the key
//! sets of real `config.json` files at test sizes) becomes a model file that loads with the
//! config's dimensions and the parameter count the config implies, partitions and verifies at
//! tp 2, and builds the same graph as the zoo file whose blocks it reuses; what the IR cannot
//! express is refused with the key and value, and leaves no file behind.

use ferrotron_io::import::{hf_name, hf_names, Family, Transform};
use ferrotron_ir::count::count_params;
use ferrotron_ir::{load_model, Graph, Init, LoadOptions, Op};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ferrotron(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .output()
        .expect("the ferrotron binary runs")
}

/// A fresh directory for one test's files, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("ferrotron-import-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn fixture(family: &str) -> Value {
    let path = format!("tests/fixtures/hf/{family}/config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn write_config(dir: &Path, config: &Value) -> PathBuf {
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(config).unwrap()).unwrap();
    path
}

fn import(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "import",
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
    ];
    args.extend(extra);
    ferrotron(&args)
}

fn int(c: &Value, key: &str) -> u64 {
    c[key].as_u64().unwrap_or_else(|| panic!("{key} in {c}"))
}

fn flag(c: &Value, key: &str, default: bool) -> bool {
    c[key].as_bool().unwrap_or(default)
}

/// The dimensions the config fixes, by the names the model file gives them.
fn expected_dims(c: &Value) -> Vec<(&'static str, u64)> {
    match c["model_type"].as_str().unwrap() {
        "gpt2" => vec![
            ("vocab", int(c, "vocab_size")),
            ("positions", int(c, "n_positions")),
            ("hidden", int(c, "n_embd")),
            ("heads", int(c, "n_head")),
            ("ffn", c["n_inner"].as_u64().unwrap_or(4 * int(c, "n_embd"))),
            ("layers", int(c, "n_layer")),
        ],
        "bert" => vec![
            ("vocab", int(c, "vocab_size")),
            ("positions", int(c, "max_position_embeddings")),
            ("type_vocab", int(c, "type_vocab_size")),
            ("hidden", int(c, "hidden_size")),
            ("heads", int(c, "num_attention_heads")),
            ("ffn", int(c, "intermediate_size")),
            ("layers", int(c, "num_hidden_layers")),
        ],
        _ => vec![
            ("vocab", int(c, "vocab_size")),
            ("hidden", int(c, "hidden_size")),
            ("heads", int(c, "num_attention_heads")),
            ("kv_heads", int(c, "num_key_value_heads")),
            ("ffn", int(c, "intermediate_size")),
            ("layers", int(c, "num_hidden_layers")),
        ],
    }
}

/// The parameter count the config implies, by each family's formula.
fn expected_params(c: &Value) -> u64 {
    match c["model_type"].as_str().unwrap() {
        "gpt2" => {
            let (v, p, h, l) = (
                int(c, "vocab_size"),
                int(c, "n_positions"),
                int(c, "n_embd"),
                int(c, "n_layer"),
            );
            let f = c["n_inner"].as_u64().unwrap_or(4 * h);
            let layer =
                2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * f + f) + (f * h + h);
            let head = if flag(c, "tie_word_embeddings", true) {
                0
            } else {
                v * h
            };
            v * h + p * h + 2 * h + l * layer + head
        }
        "bert" => {
            let (v, p, t, h, f, l) = (
                int(c, "vocab_size"),
                int(c, "max_position_embeddings"),
                int(c, "type_vocab_size"),
                int(c, "hidden_size"),
                int(c, "intermediate_size"),
                int(c, "num_hidden_layers"),
            );
            let embeddings = v * h + p * h + t * h + 2 * h;
            let mlm = (h * h + h) + 2 * h + v;
            let decoder = if flag(c, "tie_word_embeddings", true) {
                0
            } else {
                v * h
            };
            let layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h;
            embeddings + mlm + decoder + l * layer
        }
        family => {
            let (v, h, heads, kv, f, l) = (
                int(c, "vocab_size"),
                int(c, "hidden_size"),
                int(c, "num_attention_heads"),
                int(c, "num_key_value_heads"),
                int(c, "intermediate_size"),
                int(c, "num_hidden_layers"),
            );
            let kv_dim = kv * (h / heads);
            let (qkv_bias, o_bias) = match family {
                "qwen2" => (true, false),
                "llama" => {
                    let b = flag(c, "attention_bias", false);
                    (b, b)
                }
                _ => (false, false),
            };
            let mut layer = 2 * h + 2 * h * h + 2 * kv_dim * h + 3 * h * f;
            if qkv_bias {
                layer += h + 2 * kv_dim;
            }
            if o_bias {
                layer += h;
            }
            let head = if flag(c, "tie_word_embeddings", false) {
                0
            } else {
                v * h
            };
            v * h + h + head + l * layer
        }
    }
}

/// The config's numbers that are not dimensions: the norms' epsilon and the rotary base.
fn check_constants(g: &Graph, c: &Value) {
    let family = c["model_type"].as_str().unwrap();
    let eps_key = match family {
        "gpt2" => "layer_norm_epsilon",
        "bert" => "layer_norm_eps",
        _ => "rms_norm_eps",
    };
    let eps = c[eps_key].as_f64().unwrap();
    let theta = c["rope_theta"].as_f64().unwrap_or(10000.0);
    let (mut norms, mut rotaries) = (0, 0);
    for (_, node) in g.nodes.iter() {
        match &node.op {
            Op::LayerNorm { eps: e, .. } | Op::RmsNorm { eps: e, .. } => {
                assert_eq!(*e, eps, "{}: {eps_key}", node.name);
                norms += 1;
            }
            Op::Rotary { base, scaling, .. } => {
                assert_eq!(*base, theta, "{}: rope_theta", node.name);
                // Llama 3.1's rescaling, as the config gives it.
                let want = c.get("rope_scaling").filter(|s| !s.is_null()).map(|s| {
                    ferrotron_ir::RopeScaling {
                        factor: s["factor"].as_f64().unwrap(),
                        low_freq_factor: s["low_freq_factor"].as_f64().unwrap(),
                        high_freq_factor: s["high_freq_factor"].as_f64().unwrap(),
                        original_max_position: s["original_max_position_embeddings"]
                            .as_u64()
                            .unwrap(),
                    }
                });
                assert_eq!(*scaling, want, "{}: rope_scaling", node.name);
                rotaries += 1;
            }
            _ => {}
        }
    }
    assert!(norms > 0);
    let layers = g.layers().count();
    let want_rotaries = if matches!(family, "gpt2" | "bert") {
        0
    } else {
        2 * layers
    };
    assert_eq!(rotaries, want_rotaries, "{family}: rotary nodes");
}

/// Every parameter has exactly one checkpoint name in its family's table, and no two share one.
fn check_weight_names(g: &Graph, family: Family) {
    let mut seen = std::collections::HashSet::new();
    for (_, p) in g.params.iter() {
        let hf = hf_name(family, &p.name)
            .unwrap_or_else(|| panic!("{family}: no checkpoint name for `{}`", p.name));
        assert!(seen.insert(hf.clone()), "{family}: `{hf}` named twice");
    }
    let table = hf_names(family);
    assert!(table.params.iter().any(|(_, _, t)| *t == Transform::Tied));
}

/// Imports `config`, loads the file and checks it against the config; returns the model file.
/// The scratch directory comes back with the file, which lives as long as it does.
fn import_and_check(test: &str, config: &Value, extra: &[&str]) -> (Scratch, PathBuf, Graph) {
    let dir = scratch(test);
    let input = write_config(&dir, config);
    let output = dir.join(format!("{test}.ron"));
    let out = import(&dir, &output, extra);
    assert!(
        out.status.success(),
        "{test}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote"));
    assert!(input.exists());
    let g = load_model(&output, &LoadOptions::default()).unwrap();
    for (name, want) in expected_dims(config) {
        let found = g.dims.iter().find(|(n, _)| n == name).map(|&(_, v)| v);
        assert_eq!(found, Some(want), "{test}: dimension `{name}`");
    }
    assert_eq!(
        count_params(&g).total,
        expected_params(config),
        "{test}: parameter count"
    );
    check_constants(&g, config);
    let family = Family::from_model_type(config["model_type"].as_str().unwrap()).unwrap();
    check_weight_names(&g, family);
    (dir, output, g)
}

/// `ferrotron run --tp 2 --verify` on the imported file.
fn verifies_at_tp_2(model: &Path) {
    let out = ferrotron(&[
        "run",
        model.to_str().unwrap(),
        "--tp",
        "2",
        "--verify",
        "--dim",
        "batch=2",
        "--dim",
        "seq=16",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}: {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["verified"], true, "{j}");
    assert!(j["max_rel_error"].as_f64().unwrap() < 1e-4, "{j}");
}

fn fixture_imports_and_verifies(family: &str) {
    let (_dir, model, _) = import_and_check(family, &fixture(family), &[]);
    verifies_at_tp_2(&model);
}

#[test]
fn gpt2_imports_and_verifies_at_tp_2() {
    fixture_imports_and_verifies("gpt2");
}

#[test]
fn llama2_imports_and_verifies_at_tp_2() {
    fixture_imports_and_verifies("llama2");
}

/// One key/value head over two ranks: the partitioner keeps the key/value projections whole.
#[test]
fn llama3_with_fewer_kv_heads_than_ranks_imports_and_verifies_at_tp_2() {
    let config = fixture("llama3");
    assert_eq!(int(&config, "num_key_value_heads"), 1);
    fixture_imports_and_verifies("llama3");
}

#[test]
fn mistral_imports_and_verifies_at_tp_2() {
    fixture_imports_and_verifies("mistral");
}

#[test]
fn qwen2_imports_and_verifies_at_tp_2() {
    fixture_imports_and_verifies("qwen2");
}

#[test]
fn bert_imports_and_verifies_at_tp_2() {
    fixture_imports_and_verifies("bert");
}

/// The options each family's template has: tied and untied output layers, biases, an explicit
/// MLP width, and a model directory as well as a config file as input.
#[test]
fn variants_count_their_parameters() {
    let set = |mut c: Value, key: &str, v: Value| {
        c[key] = v;
        c
    };
    let variants = [
        (
            "gpt2-untied",
            set(fixture("gpt2"), "tie_word_embeddings", json!(false)),
        ),
        ("gpt2-n-inner", set(fixture("gpt2"), "n_inner", json!(100))),
        (
            "llama-tied",
            set(fixture("llama2"), "tie_word_embeddings", json!(true)),
        ),
        (
            "llama-bias",
            set(fixture("llama3"), "attention_bias", json!(true)),
        ),
        (
            "bert-untied",
            set(fixture("bert"), "tie_word_embeddings", json!(false)),
        ),
        (
            "qwen2-untied",
            set(fixture("qwen2"), "tie_word_embeddings", json!(false)),
        ),
    ];
    for (name, config) in &variants {
        let (_dir, model, _) = import_and_check(name, config, &[]);
        if *name == "llama-bias" || *name == "bert-untied" {
            verifies_at_tp_2(&model);
        }
    }
    // The config file itself, and the defaults a user may change.
    let dir = scratch("config-file");
    let output = dir.join("m.ron");
    let out = import(
        Path::new("tests/fixtures/hf/gpt2/config.json"),
        &output,
        &["--name", "my-gpt", "--seq", "24", "--batch", "3"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g = load_model(&output, &LoadOptions::default()).unwrap();
    assert_eq!(g.name, "my-gpt");
    let dim = |n: &str| g.dims.iter().find(|(d, _)| d == n).map(|&(_, v)| v);
    assert_eq!((dim("seq"), dim("batch")), (Some(24), Some(3)));
}

/// A config with the zoo's tiny sizes gives the zoo's graph: the same nodes, ops, values and
/// parameters in the same order (initialisation and name aside: configs have one std).
#[test]
fn imports_build_the_zoo_graphs() {
    let gpt = json!({
        "model_type": "gpt2", "vocab_size": 97, "n_positions": 32, "n_embd": 64, "n_head": 4,
        "n_layer": 2, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
    });
    let llama = json!({
        "model_type": "llama", "vocab_size": 101, "hidden_size": 48, "num_attention_heads": 6,
        "num_key_value_heads": 2, "intermediate_size": 136, "num_hidden_layers": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "hidden_act": "silu", "tie_word_embeddings": false,
    });
    let bert = json!({
        "model_type": "bert", "vocab_size": 103, "max_position_embeddings": 24,
        "type_vocab_size": 2, "hidden_size": 32, "num_attention_heads": 4,
        "intermediate_size": 128, "num_hidden_layers": 2, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    });
    for (zoo, config) in [
        ("tiny-gpt", gpt),
        ("tiny-llama", llama),
        ("tiny-bert", bert),
    ] {
        let (_dir, model, _) = import_and_check(zoo, &config, &["--name", zoo]);
        let ours = load_model(&model, &LoadOptions::default()).unwrap();
        let same_dims: Vec<(String, u64)> = ours
            .dims
            .iter()
            .filter(|(n, _)| n == "seq" || n == "batch")
            .cloned()
            .collect();
        let opts = LoadOptions {
            overrides: same_dims,
            ..LoadOptions::default()
        };
        let mut theirs = load_model(Path::new(&format!("models/{zoo}.ron")), &opts).unwrap();
        let mut ours = ours;
        for g in [&mut ours, &mut theirs] {
            for (_, p) in g.params.iter_mut() {
                p.init = Init::Zeros;
            }
        }
        assert_eq!(ours.dims, theirs.dims, "{zoo}: dims");
        let params = |g: &Graph| {
            g.params
                .values()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(params(&ours), params(&theirs), "{zoo}: parameters");
        let nodes = |g: &Graph| {
            g.order
                .iter()
                .map(|&n| format!("{} {}", g.nodes[n].name, g.nodes[n].op.mnemonic()))
                .collect::<Vec<_>>()
        };
        assert_eq!(nodes(&ours), nodes(&theirs), "{zoo}: nodes");
        assert!(ours == theirs, "{zoo}: the graphs differ");
    }
}

/// What a refused import must look like: a non-zero exit that is not a panic, an error naming
/// each of `names`, and nothing written (an existing file is kept as it was).
fn assert_refused(input: &Path, extra: &[&str], names: &[&str]) {
    let dir = scratch(&format!(
        "refused-{}",
        names.join("-").replace(|c: char| !c.is_alphanumeric(), "")
    ));
    let output = dir.join("x.ron");
    let kept = dir.join("kept.ron");
    std::fs::write(&kept, "previous contents").unwrap();
    for (target, existed) in [(&output, false), (&kept, true)] {
        let out = import(input, target, extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{names:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        for name in names {
            assert!(err.contains(name), "the error names {name}: {err}");
        }
        if existed {
            assert_eq!(
                std::fs::read_to_string(target).unwrap(),
                "previous contents"
            );
        } else {
            assert!(!target.exists(), "{} was written", target.display());
        }
    }
    let left: Vec<_> = std::fs::read_dir(&*dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["kept.ron"], "files left behind");
}

/// Llama 3.1's `llama3` rope scaling becomes the rotary ops' rescaling.
#[test]
fn llama3_1_with_its_rope_scaling_imports_and_verifies_at_tp_2() {
    fixture_imports_and_verifies("llama3.1");
}

/// A `llama3` rescaling without one of its figures, or with its thresholds the wrong way
/// round, is refused naming the key.
#[test]
fn an_incomplete_llama3_rope_scaling_is_refused() {
    let dir = scratch("rope-scaling");
    let mut config = fixture("llama3.1");
    config["rope_scaling"]
        .as_object_mut()
        .unwrap()
        .remove("low_freq_factor");
    let input = write_config(&dir, &config);
    assert_refused(&input, &[], &["`rope_scaling`", "low_freq_factor"]);
    let mut config = fixture("llama3.1");
    config["rope_scaling"]["high_freq_factor"] = json!(0.5);
    let input = write_config(&dir, &config);
    assert_refused(&input, &[], &["`rope_scaling`", "high_freq_factor"]);
}

#[test]
fn unknown_model_type_is_refused() {
    let dir = scratch("unknown-type");
    let mut config = fixture("llama2");
    config["model_type"] = json!("falcon");
    let input = write_config(&dir, &config);
    assert_refused(
        &input,
        &[],
        &["`model_type`", "\"falcon\"", "`llama`", "`bert`"],
    );
}

#[test]
fn unsupported_options_are_refused() {
    let dir = scratch("unsupported");
    let cases: [(&str, &str, Value, &[&str]); 6] = [
        (
            "llama2",
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
            &["`rope_scaling`", "linear"],
        ),
        ("llama2", "head_dim", json!(16), &["`head_dim` = 16", "8"]),
        ("llama2", "mlp_bias", json!(true), &["`mlp_bias` = true"]),
        (
            "gpt2",
            "activation_function",
            json!("quick_gelu"),
            &["`activation_function` = \"quick_gelu\""],
        ),
        (
            "bert",
            "position_embedding_type",
            json!("relative_key"),
            &["`position_embedding_type` = \"relative_key\""],
        ),
        (
            "qwen2",
            "num_key_value_heads",
            json!(3),
            &["`num_key_value_heads` = 3", "`num_attention_heads` = 14"],
        ),
    ];
    for (i, (family, key, value, names)) in cases.iter().enumerate() {
        let mut config = fixture(family);
        config[key] = value.clone();
        let case = dir.join(i.to_string());
        std::fs::create_dir_all(&case).unwrap();
        assert_refused(&write_config(&case, &config), &[], names);
    }
    // A sequence longer than Mistral's sliding window: attention the IR cannot express.
    assert_refused(
        Path::new("tests/fixtures/hf/mistral"),
        &["--seq", "64"],
        &["`sliding_window` = 32", "--seq 64"],
    );
    // A missing size, and a sequence longer than GPT-2's learned positions.
    let mut config = fixture("bert");
    config.as_object_mut().unwrap().remove("hidden_size");
    let case = dir.join("missing");
    std::fs::create_dir_all(&case).unwrap();
    assert_refused(
        &write_config(&case, &config),
        &[],
        &["`hidden_size` is missing"],
    );
    assert_refused(
        Path::new("tests/fixtures/hf/gpt2"),
        &["--seq", "33"],
        &["`n_positions` = 32", "--seq 33"],
    );
}

/// Mistral's window becomes a dimension the file checks: a longer `--dim seq` fails to load.
#[test]
fn mistral_window_guards_the_sequence() {
    let (_dir, model, g) = import_and_check("mistral-window", &fixture("mistral"), &[]);
    let seq = g.dims.iter().find(|(n, _)| n == "seq").map(|&(_, v)| v);
    assert_eq!(seq, Some(32), "the default sequence is the window");
    let out = ferrotron(&["check", model.to_str().unwrap(), "--dim", "seq=33"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("window_margin") && err.contains("32 - 33"),
        "{err}"
    );
}
