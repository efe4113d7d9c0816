//! `run --weights` on checkpoints that `transformers` wrote (tests/fixtures/hf/<family>/, made by
//! tests/fixtures/make_hf_fixtures.py; no Python here): for every family, the imported model
//! on the fixture's checkpoint and batch gives transformers' loss and every gradient, at tp = 1
//! and tp = 2 (llama3 has one key/value head, fewer than the ranks), dumped under the
//! checkpoint's names; a bf16 copy and a sharded copy load to the same numbers; a wrong shape
//! or a missing tensor is named. `export-hf` writes back what was loaded (every family), and a
//! checkpoint trained one step from the weights exports to the loss of the checkpoint's model.

use ferrotron_exec::verify::rel_error_floor;
use ferrotron_exec::{RunOptions, Tensor};
use ferrotron_io::checkpoint::{self, CheckpointMeta};
use ferrotron_io::hf::{read_safetensors, read_tokens, write_safetensors};
use ferrotron_io::import::{hf_name, hf_names, Family, Transform};
use ferrotron_io::weights::Index;
use ferrotron_ir::{load_model, LoadOptions};
use ferrotron_partitioner::{partition, PartitionOptions};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fixtures with weights, and their families.
const FIXTURES: [(&str, Family); 7] = [
    ("gpt2", Family::Gpt2),
    ("llama2", Family::Llama),
    ("llama3", Family::Llama),
    ("llama3.1", Family::Llama),
    ("mistral", Family::Mistral),
    ("qwen2", Family::Qwen2),
    ("bert", Family::Bert),
];

/// What `expected.safetensors` holds besides the gradients.
const NOT_GRADIENTS: [&str; 3] = ["input_ids", "loss", "logits"];

/// `--verify`'s tolerances for f32: the loss, the gradients.
const LOSS_TOLERANCE: f64 = 1e-5;
const GRADIENT_TOLERANCE: f64 = 1e-4;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("ferrotron-hfw-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn fixture(name: &str) -> PathBuf {
    Path::new("tests/fixtures/hf").join(name)
}

fn ferrotron(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .output()
        .expect("the ferrotron binary runs")
}

fn ok(args: &[&str]) -> String {
    let o = ferrotron(args);
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `ferrotron import` of fixture `name` into `dir`.
fn import(name: &str, dir: &Path) -> PathBuf {
    let model = dir.join(format!("{name}.ron"));
    ok(&[
        "import",
        fixture(name).to_str().unwrap(),
        "-o",
        model.to_str().unwrap(),
    ]);
    model
}

/// `run MODEL --weights WEIGHTS --tokens <fixture's> --dropout 0 --dump-grads OUT --json`:
/// the loss and the dump.
fn run(
    model: &Path,
    weights: &Path,
    tokens: &Path,
    tp: u32,
    out: &Path,
) -> (f64, HashMap<String, Tensor>) {
    let tp = tp.to_string();
    let stdout = ok(&[
        "run",
        model.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--tp",
        &tp,
        "--dropout",
        "0",
        "--dump-grads",
        out.to_str().unwrap(),
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    (
        json["loss"].as_f64().unwrap(),
        read_safetensors(out).unwrap(),
    )
}

fn max_abs(t: &Tensor) -> f64 {
    t.data
        .iter()
        .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()))
}

/// The checkpoint tensors a dump holds: every tensor of the checkpoint but the family's unused
/// buffers and the tied copies no parameter is read from.
fn dumpable(family: Family, model: &Path, checkpoint: &Index) -> BTreeSet<String> {
    let g = load_model(model, &LoadOptions::default()).unwrap();
    let read: BTreeSet<String> = g
        .params
        .values()
        .filter_map(|p| hf_name(family, &p.name))
        .collect();
    let table = hf_names(family);
    let fits = |pattern: &str, name: &str| match pattern.split_once("{i}") {
        None => pattern == name,
        Some((a, b)) => name
            .strip_prefix(a)
            .and_then(|r| r.strip_suffix(b))
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|c| c.is_ascii_digit())),
    };
    checkpoint
        .names()
        .filter(|n| !table.unused.iter().any(|u| fits(u, n)))
        .filter(|n| {
            read.contains(*n)
                || !table
                    .params
                    .iter()
                    .any(|(_, t, how)| *how == Transform::Tied && fits(t, n))
        })
        .map(str::to_owned)
        .collect()
}

/// The worst relative error of the loss and of the gradients against transformers'; panics
/// past `--verify`'s f32 tolerances or on a different key set.
fn check(
    name: &str,
    loss: f64,
    grads: &HashMap<String, Tensor>,
    expected: &HashMap<String, Tensor>,
) -> (f64, f64) {
    let want_loss = f64::from(expected["loss"].data[0]);
    let loss_err = (loss - want_loss).abs() / want_loss.abs();
    assert!(
        loss_err <= LOSS_TOLERANCE,
        "{name}: loss {loss} vs transformers' {want_loss} (relative error {loss_err:.2e})"
    );
    let want: HashMap<&str, &Tensor> = expected
        .iter()
        .filter(|(k, _)| !NOT_GRADIENTS.contains(&k.as_str()))
        .map(|(k, t)| (k.as_str(), t))
        .collect();
    let got: BTreeSet<&str> = grads.keys().map(String::as_str).collect();
    assert_eq!(
        got,
        want.keys().copied().collect::<BTreeSet<_>>(),
        "{name}: the dumped gradients' names are transformers' parameters'"
    );
    // As `--verify` measures gradients: against the largest one's scale at least.
    let floor = 1e-3 * want.values().map(|t| max_abs(t)).fold(0.0, f64::max);
    let mut worst = 0.0f64;
    for (k, w) in &want {
        let g = &grads[*k];
        assert_eq!(g.shape, w.shape, "{name}: `{k}`'s shape");
        let err = rel_error_floor(g, w, floor);
        assert!(
            err <= GRADIENT_TOLERANCE,
            "{name}: gradient of `{k}` differs from transformers' (relative error {err:.2e})"
        );
        worst = worst.max(err);
    }
    (loss_err, worst)
}

#[test]
fn every_family_gives_transformers_loss_and_gradients_at_tp1_and_tp2() {
    let dir = scratch("families");
    for (name, family) in FIXTURES {
        let model = import(name, &dir.0);
        let weights = fixture(name);
        let tokens = weights.join("tokens.txt");
        let expected = read_safetensors(&weights.join("expected.safetensors")).unwrap();
        let checkpoint = Index::of_dir(&weights).unwrap();
        let keys = dumpable(family, &model, &checkpoint);
        for tp in [1, 2] {
            let out = dir.0.join(format!("{name}-tp{tp}.safetensors"));
            let (loss, grads) = run(&model, &weights, &tokens, tp, &out);
            let (loss_err, grad_err) = check(name, loss, &grads, &expected);
            let dumped: BTreeSet<String> = grads.keys().cloned().collect();
            assert_eq!(
                dumped, keys,
                "{name}: the checkpoint's names, less unused and tied"
            );
            eprintln!(
                "{name} tp {tp}: loss relative error {loss_err:.2e}, gradients {grad_err:.2e}"
            );
        }
    }
}

#[test]
fn f16_bf16_and_sharded_checkpoints_load_to_the_same_numbers() {
    let dir = scratch("copies");
    // llama2's weights are bf16 values, so its bf16 copy is the same checkpoint.
    let model = import("llama2", &dir.0);
    let tokens = fixture("llama2").join("tokens.txt");
    let f32_run = run(
        &model,
        &fixture("llama2"),
        &tokens,
        2,
        &dir.0.join("a.safetensors"),
    );
    let bf16_run = run(
        &model,
        &fixture("llama2").join("model.bf16.safetensors"),
        &tokens,
        2,
        &dir.0.join("b.safetensors"),
    );
    assert_eq!(f32_run, bf16_run, "llama2 from its bf16 single file");

    // An f16 copy reads as the f32 checkpoint of the same (f16-rounded) values: the loss and
    // every gradient.
    let f32_file = fixture("llama2").join("model.safetensors");
    let rounded: HashMap<String, Tensor> = read_safetensors(&f32_file)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let data = t.data.iter().map(|&x| half::f16::from_f32(x).to_f32());
            let data = data.collect();
            (k, Tensor { data, ..t })
        })
        .collect();
    let rounded_file = dir.0.join("rounded.safetensors");
    write_safetensors(&rounded_file, &rounded).unwrap();
    let f16_file = dir.0.join("model.f16.safetensors");
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = rounded
        .iter()
        .map(|(k, t)| {
            let b = t
                .data
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes());
            (k.clone(), t.shape.clone(), b.collect())
        })
        .collect();
    let views = bytes.iter().map(|(k, shape, b)| {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, shape.clone(), b);
        (k.as_str(), view.unwrap())
    });
    safetensors::tensor::serialize_to_file(views, &None, &f16_file).unwrap();
    let from_f16 = run(&model, &f16_file, &tokens, 2, &dir.0.join("e.safetensors"));
    let from_rounded = run(
        &model,
        &rounded_file,
        &tokens,
        2,
        &dir.0.join("f.safetensors"),
    );
    assert_eq!(from_f16, from_rounded, "llama2 from an f16 single file");

    let model = import("gpt2", &dir.0);
    let tokens = fixture("gpt2").join("tokens.txt");
    assert!(fixture("gpt2-sharded")
        .join("model.safetensors.index.json")
        .is_file());
    let whole = run(
        &model,
        &fixture("gpt2"),
        &tokens,
        1,
        &dir.0.join("c.safetensors"),
    );
    let sharded = run(
        &model,
        &fixture("gpt2-sharded"),
        &tokens,
        1,
        &dir.0.join("d.safetensors"),
    );
    assert_eq!(whole, sharded, "gpt2 from its shards");
}

/// `run --weights` on a copy of llama3's fixture whose `model.safetensors` is `tensors`.
fn run_err(dir: &Path, model: &Path, tensors: &HashMap<String, Tensor>) -> String {
    let weights = dir.join("weights");
    std::fs::create_dir_all(&weights).unwrap();
    std::fs::copy(
        fixture("llama3").join("config.json"),
        weights.join("config.json"),
    )
    .unwrap();
    write_safetensors(&weights.join("model.safetensors"), tensors).unwrap();
    let o = ferrotron(&[
        "run",
        model.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--tokens",
        fixture("llama3").join("tokens.txt").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_wrong_shape_or_a_missing_tensor_is_named() {
    let dir = scratch("errors");
    let model = import("llama3", &dir.0);
    let good = read_safetensors(&fixture("llama3").join("model.safetensors")).unwrap();

    let mut bad = good.clone();
    let name = "model.layers.1.self_attn.k_proj.weight";
    bad.insert(name.into(), Tensor::zeros(vec![48, 8]));
    let msg = run_err(&dir.0, &model, &bad);
    assert!(
        msg.contains(name) && msg.contains("[48, 8]") && msg.contains("[8, 48]"),
        "{msg}"
    );

    let mut bad = good.clone();
    bad.remove("model.layers.0.mlp.up_proj.weight");
    let msg = run_err(&dir.0, &model, &bad);
    assert!(
        msg.contains("model.layers.0.mlp.up_proj.weight")
            && msg.contains("layers.0.mlp.up_proj.weight")
            && msg.contains("[112, 48]"),
        "{msg}"
    );

    let mut bad = good;
    bad.insert(
        "model.layers.2.mlp.up_proj.weight".into(),
        Tensor::zeros(vec![112, 48]),
    );
    let msg = run_err(&dir.0, &model, &bad);
    assert!(msg.contains("model.layers.2.mlp.up_proj.weight"), "{msg}");
}

/// `export-hf CHECKPOINT --config <fixture> -o OUT`.
fn export(checkpoint: &Path, name: &str, out: &Path) {
    ok(&[
        "export-hf",
        checkpoint.to_str().unwrap(),
        "--config",
        fixture(name).to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    // tests/fixtures/make_hf_fixtures.py --check-export loads these with transformers.
    if let Some(keep) = std::env::var_os("FERROTRON_KEEP_HF_EXPORTS") {
        let keep = Path::new(&keep).join(name);
        std::fs::create_dir_all(&keep).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(out.join(f), keep.join(f)).unwrap();
        }
    }
}

#[test]
fn every_family_exports_what_it_loaded() {
    let dir = scratch("export");
    for (name, _) in FIXTURES {
        let model = import(name, &dir.0);
        let opts = LoadOptions {
            overrides: vec![("batch".into(), 2), ("seq".into(), 16)],
            ..LoadOptions::default()
        };
        let g = load_model(&model, &opts).unwrap();
        let (params, _) = ferrotron_io::weights::load(&fixture(name), &g).unwrap();
        let plan = partition(
            &g,
            &PartitionOptions {
                tp: 2,
                ..PartitionOptions::default()
            },
        )
        .unwrap();
        let ck = dir.0.join(format!("{name}-ck"));
        let meta = CheckpointMeta {
            model: g.name.clone(),
            ..CheckpointMeta::default()
        };
        checkpoint::save(&ck, &plan, &meta, &[("params", &params)]).unwrap();
        let out = dir.0.join(format!("{name}-hf"));
        export(&ck, name, &out);

        let tokens = fixture(name).join("tokens.txt");
        let original = run(
            &model,
            &fixture(name),
            &tokens,
            1,
            &dir.0.join("a.safetensors"),
        );
        let exported = run(&model, &out, &tokens, 1, &dir.0.join("b.safetensors"));
        assert_eq!(
            original, exported,
            "{name}: the export loads to the same numbers"
        );
        // And the export's logits are the ones transformers computed for the fixture.
        let outputs = dir.0.join("outputs.safetensors");
        ok(&[
            "run",
            model.to_str().unwrap(),
            "--weights",
            out.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--tp",
            "2",
            "--dropout",
            "0",
            "--dump-outputs",
            outputs.to_str().unwrap(),
        ]);
        let ours = read_safetensors(&outputs)
            .unwrap()
            .remove("logits")
            .unwrap();
        let theirs = read_safetensors(&fixture(name).join("expected.safetensors"))
            .unwrap()
            .remove("logits")
            .unwrap();
        assert_eq!(ours.shape, theirs.shape, "{name}: logits");
        let worst = ours
            .data
            .iter()
            .zip(&theirs.data)
            .fold(0.0f64, |m, (&a, &b)| m.max(f64::from(a - b).abs()));
        assert!(
            worst <= 1e-5 * max_abs(&theirs),
            "{name}: the export's logits differ from transformers' by {worst:e}"
        );
    }
}

#[test]
fn a_trained_checkpoint_exports_to_its_own_loss() {
    let dir = scratch("trained");
    let model = import("llama3", &dir.0);
    let text = dir.0.join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(8),
    )
    .unwrap();
    let ck = dir.0.join("ck");
    ok(&[
        "train",
        model.to_str().unwrap(),
        "--dim",
        "batch=2",
        "--dim",
        "seq=16",
        "--tp",
        "2",
        "--data",
        text.to_str().unwrap(),
        "--steps",
        "1",
        "--lr",
        "1e-2",
        "--warmup",
        "0",
        "--dropout",
        "0",
        "--weights",
        fixture("llama3").to_str().unwrap(),
        "--save",
        ck.to_str().unwrap(),
    ]);
    let out = dir.0.join("hf");
    export(&ck, "llama3", &out);
    // Trained from the model directory, the checkpoint recorded its config.json: an export
    // without --config writes the same weights and an equal config.
    let recorded = dir.0.join("hf-recorded");
    ok(&[
        "export-hf",
        ck.to_str().unwrap(),
        "-o",
        recorded.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(recorded.join("model.safetensors")).unwrap()
    );
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        json(recorded.join("config.json")),
        json(fixture("llama3").join("config.json"))
    );
    let tokens_file = fixture("llama3").join("tokens.txt");
    let (loss, _) = run(&model, &out, &tokens_file, 2, &dir.0.join("g.safetensors"));

    // The checkpoint's model, here: its weights on the unpartitioned plan.
    let opts = LoadOptions {
        overrides: vec![("batch".into(), 2), ("seq".into(), 16)],
        ..LoadOptions::default()
    };
    let g = load_model(&model, &opts).unwrap();
    let (_, mut groups) = checkpoint::load(&ck).unwrap();
    let params = groups.remove("params").unwrap();
    let plan = partition(&g, &PartitionOptions::default()).unwrap();
    let inputs = HashMap::from([("tokens".to_owned(), read_tokens(&tokens_file).unwrap())]);
    let want = ferrotron_exec::run(
        ferrotron_cpu::Cpu::default(),
        &plan,
        &params,
        &inputs,
        &RunOptions::default(),
    )
    .unwrap()
    .loss()
    .unwrap();
    let err = (loss - f64::from(want)).abs() / f64::from(want).abs();
    assert!(err <= LOSS_TOLERANCE, "{loss} vs the checkpoint's {want}");
    let before =
        read_safetensors(&fixture("llama3").join("expected.safetensors")).unwrap()["loss"].data[0];
    assert_ne!(want, before, "the step changed the weights");

    // A config the checkpoint's model was not imported from is refused, naming a parameter.
    let o = ferrotron(&[
        "export-hf",
        ck.to_str().unwrap(),
        "--config",
        fixture("mistral").to_str().unwrap(),
        "-o",
        dir.0.join("wrong").to_str().unwrap(),
    ]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && msg.contains("`embed_tokens.weight`") && msg.contains("[257, 48]"),
        "{msg}"
    );
    assert!(!dir.0.join("wrong").exists(), "nothing written");
}

/// Under `ferrotron launch`, each process opens the checkpoint and reads only its rank's shards
/// (a Llama with a gate|up MLP and a Qwen2 with q/k/v biases, at tp 2): the loss is
/// transformers'.
#[test]
fn launched_ranks_read_their_own_shards_to_transformers_loss() {
    let dir = scratch("launched");
    for name in ["llama2", "qwen2"] {
        let model = import(name, &dir.0);
        let weights = fixture(name);
        let tokens = weights.join("tokens.txt");
        let stdout = ok(&[
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "run",
            model.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--tp",
            "2",
            "--dropout",
            "0",
        ]);
        let loss: f64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("[rank 0] ")?.split("loss ").nth(1))
            .and_then(|rest| rest.split(',').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name}: no loss in {stdout}"));
        let expected = read_safetensors(&weights.join("expected.safetensors")).unwrap();
        let want = f64::from(expected["loss"].data[0]);
        let err = (loss - want).abs() / want.abs();
        // Printed to 6 decimals.
        assert!(
            err <= LOSS_TOLERANCE.max(1e-6 / want.abs()),
            "{name}: loss {loss} vs transformers' {want} ({err:.2e})"
        );
    }
}

/// A checkpoint trained from seeded weights records no config.json: `export-hf` without
/// `--config` says so, and writes nothing.
#[test]
fn export_without_a_recorded_config_asks_for_one() {
    let dir = scratch("unrecorded");
    let model = import("llama3", &dir.0);
    let text = dir.0.join("text.txt");
    std::fs::write(&text, "abcdefgh ".repeat(20)).unwrap();
    let ck = dir.0.join("ck");
    ok(&[
        "train",
        model.to_str().unwrap(),
        "--dim",
        "batch=2",
        "--dim",
        "seq=8",
        "--data",
        text.to_str().unwrap(),
        "--steps",
        "1",
        "--save",
        ck.to_str().unwrap(),
    ]);
    let out = dir.0.join("hf");
    let run = ferrotron(&[
        "export-hf",
        ck.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("does not record the config.json") && stderr.contains("--config"),
        "{stderr}"
    );
    assert!(!out.exists());
}
