//! `--tokenizer PATH` on `train` and `generate`: a Hugging Face `tokenizer.json` (the small
//! fixtures in `tests/fixtures/tokenizers/`, made by `runtime/io/tests/tokenizer.rs`) encodes the
//! training text and the prompt and decodes what `generate` prints; a model whose vocabulary is
//! too small, a directory without `tokenizer.json` and a file that is not one are refused with
//! errors that say so.

use ferrotron_cpu::Cpu;
use ferrotron_exec::verify::reference_plan;
use ferrotron_io::generate::{generate, Sampling};
use ferrotron_io::tokenizer::Tokenizer;
use ferrotron_ir::{load_model, LoadOptions, Op};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MODEL: &str = "models/tiny-gpt.ron";

fn ferrotron(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .output()
        .expect("the ferrotron binary runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotron-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A refused command: it failed without a panic, and its error says `what`.
fn refused(args: &[&str], what: &[&str]) {
    let out = ferrotron(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{err}");
    for w in what {
        assert!(err.contains(w), "{args:?}: `{w}` not in: {err}");
    }
}

/// Trains two steps with the fixture, then generates from the checkpoint: the CLI prints what
/// the library makes with the same tokenizer.
fn train_and_generate(fixture: &str, vocab: u64) {
    let dir = scratch(&format!("tokenizer-cli-{fixture}"));
    let tokenizer = format!("tests/fixtures/tokenizers/{fixture}");
    let vocab_dim = format!("vocab={vocab}");
    let ck = dir.join("ck");
    let ck = ck.to_str().unwrap();
    let dims = ["--dim", &vocab_dim, "--dim", "batch=2", "--dim", "seq=16"];

    let mut train = vec!["train", MODEL, "--data", "README.md", "--steps", "2"];
    train.extend(dims);
    train.extend(["--tokenizer", &tokenizer, "--save", ck]);
    let out = ferrotron(&train);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("step 2/2"), "{err}");
    let meta = std::fs::read_to_string(Path::new(ck).join("meta.json")).unwrap();
    assert!(meta.contains("tokenizer.json"), "the checkpoint names it");

    let prompt = "The plan splits";
    let mut cli = vec!["generate", MODEL, "--checkpoint", ck, "--prompt", prompt];
    cli.extend(dims);
    cli.extend(["--tokenizer", &tokenizer, "--tokens", "12"]);
    cli.extend(["--temperature", "1", "--seed", "5"]);
    let out = ferrotron(&cli);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).expect("UTF-8 text");
    let printed = printed
        .strip_suffix('\n')
        .expect("one line break at the end");
    // Without `--tokenizer`, the one the checkpoint was trained with.
    let recorded: Vec<&str> = cli
        .iter()
        .copied()
        .filter(|a| *a != "--tokenizer" && *a != tokenizer.as_str())
        .collect();
    let out = ferrotron(&recorded);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'),
        printed
    );

    let mut g = load_model(
        Path::new(MODEL),
        &LoadOptions {
            overrides: vec![
                ("vocab".into(), vocab),
                ("batch".into(), 2),
                ("seq".into(), 16),
            ],
            ..LoadOptions::default()
        },
    )
    .unwrap();
    // As `generate` runs it: without dropout.
    for node in g.nodes.values_mut() {
        if let Op::Dropout { p, .. } = &mut node.op {
            *p = 0.0;
        }
    }
    let plan = reference_plan(&g).unwrap();
    let t = Tokenizer::named(&tokenizer).unwrap();
    let sampling = Sampling {
        tokens: 12,
        temperature: 1.0,
        seed: 5,
    };
    let expected = generate(
        Cpu::default(),
        (&g, &plan),
        Path::new(ck),
        &t,
        prompt,
        sampling,
    )
    .unwrap();
    assert_eq!(printed, expected);
    assert!(printed.starts_with(prompt), "{printed}");
    // Decoded, not shown as the tokenizer's pieces or special tokens.
    for piece in ["Ġ", "▁", "<s>", "<|begin_of_text|>", "<0x"] {
        assert!(!printed.contains(piece), "{piece} in {printed}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_and_generate_with_a_byte_level_tokenizer_json() {
    // 320 learnt + 2 special tokens.
    train_and_generate("byte-level", 322);
}

#[test]
fn train_and_generate_with_a_sentencepiece_style_tokenizer_json() {
    // The file itself works as well as its directory.
    train_and_generate("metaspace/tokenizer.json", 447);
}

#[test]
fn a_vocabulary_too_small_for_the_tokenizer_is_refused_naming_both() {
    let tokenizer = "tests/fixtures/tokenizers/byte-level";
    let mut train = vec!["train", MODEL, "--data", "README.md", "--steps", "1"];
    train.extend(["--dim", "vocab=300", "--tokenizer", tokenizer]);
    let sizes = ["at least 322", "the model has 300", "--dim vocab=322"];
    refused(&train, &sizes);

    let mut generate = vec!["generate", MODEL, "--checkpoint", "no-such-checkpoint"];
    generate.extend(["--dim", "vocab=300", "--tokenizer", tokenizer]);
    refused(&generate, &sizes);
}

#[test]
fn a_missing_or_invalid_tokenizer_json_is_refused() {
    let dir = scratch("tokenizer-cli-bad");
    let d = dir.to_str().unwrap();
    let train = |tokenizer: &str, what: &[&str]| {
        let mut args = vec!["train", MODEL, "--data", "README.md", "--steps", "1"];
        args.extend(["--dim", "vocab=512", "--tokenizer", tokenizer]);
        refused(&args, what);
    };
    train(d, &[d, "no tokenizer.json"]);
    let file = dir.join("tokenizer.json");
    std::fs::write(&file, "{\"version\": \"1.0\", \"model\": []}").unwrap();
    train(d, &["tokenizer.json: not a readable tokenizer.json"]);
    train(file.to_str().unwrap(), &["not a readable tokenizer.json"]);
    train(
        "no/such/dir",
        &["unknown tokenizer `no/such/dir`", "`gpt2`"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
