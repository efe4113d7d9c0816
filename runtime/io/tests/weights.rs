//! `ferrotron_io::weights` on the committed transformers fixtures (tests/fixtures/hf/): a
//! checkpoint saved from the base model (no `transformer.` prefix) loads to the same weights
//! and names its gradients as it names its tensors; a shard that lacks what its index says, a
//! tied copy that differs, and a model of another family are refused, named.

use ferrotron_io::hf::{read_safetensors, write_safetensors};
use ferrotron_io::import::{model_text, ImportOptions};
use ferrotron_io::weights::load;
use ferrotron_ir::{parse_model, Graph, LoadOptions};
use std::path::{Path, PathBuf};

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ferrotron-io-weights-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf")
        .join(name)
}

/// The model `name`'s config imports to.
fn imported(name: &str) -> Graph {
    let config = fixture(name).join("config.json");
    let json = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let m = model_text(&json, "config.json", name, &ImportOptions::default()).unwrap();
    parse_model(&m.text, "model.ron", &LoadOptions::default()).unwrap()
}

/// A copy of fixture `name`'s config in `dir`.
fn with_config(dir: &Path, name: &str) {
    std::fs::copy(fixture(name).join("config.json"), dir.join("config.json")).unwrap();
}

#[test]
fn a_base_model_checkpoint_loads_under_its_own_names() {
    let tmp = TempDir::new("bare");
    let g = imported("gpt2");
    let (want, names) = load(&fixture("gpt2"), &g).unwrap();
    assert_eq!(names.get("wte"), Some("transformer.wte.weight"));

    let bare = read_safetensors(&fixture("gpt2").join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n.trim_start_matches("transformer.").to_owned(), t))
        .collect();
    with_config(&tmp.0, "gpt2");
    write_safetensors(&tmp.0.join("model.safetensors"), &bare).unwrap();
    let (got, names) = load(&tmp.0, &g).unwrap();
    assert_eq!(got, want);
    assert_eq!(names.get("wte"), Some("wte.weight"));
    assert_eq!(
        names.get("h.1.attn.c_attn.weight"),
        Some("h.1.attn.c_attn.weight")
    );
}

#[test]
fn a_shard_without_what_its_index_says_is_named() {
    let tmp = TempDir::new("shards");
    let g = imported("gpt2");
    let mut tensors = read_safetensors(&fixture("gpt2").join("model.safetensors")).unwrap();
    assert!(tensors.remove("transformer.ln_f.weight").is_some());
    write_safetensors(&tmp.0.join("a.safetensors"), &tensors).unwrap();
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": tensors
            .keys()
            .map(|k| (k.clone(), serde_json::Value::from("a.safetensors")))
            .chain([("transformer.ln_f.weight".to_owned(), "a.safetensors".into())])
            .collect::<serde_json::Map<_, _>>(),
    });
    with_config(&tmp.0, "gpt2");
    std::fs::write(
        tmp.0.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let msg = load(&tmp.0, &g).unwrap_err().to_string();
    assert!(
        msg.contains("a.safetensors") && msg.contains("transformer.ln_f.weight"),
        "{msg}"
    );
}

#[test]
fn a_tied_copy_that_differs_or_another_family_is_refused() {
    let tmp = TempDir::new("tied");
    let g = imported("gpt2");
    let mut tensors = read_safetensors(&fixture("gpt2").join("model.safetensors")).unwrap();
    let mut head = tensors["transformer.wte.weight"].clone();
    head.data[5] += 1.0;
    tensors.insert("lm_head.weight".into(), head);
    with_config(&tmp.0, "gpt2");
    write_safetensors(&tmp.0.join("model.safetensors"), &tensors).unwrap();
    let msg = load(&tmp.0, &g).unwrap_err().to_string();
    assert!(
        msg.contains("`lm_head.weight`") && msg.contains("`wte`") && msg.contains("index 5"),
        "{msg}"
    );

    let msg = load(&fixture("llama3"), &g).unwrap_err().to_string();
    assert!(
        msg.contains("LlamaForCausalLM") && msg.contains("`llama`"),
        "{msg}"
    );
}
