//! `ferrotron_io::weights` on the committed transformers fixtures (tests/fixtures/hf/): a
//! checkpoint saved from the base model (no `transformer.` prefix) loads to the same weights
//! and names its gradients as it names its tensors; a shard that lacks what its index says, a
//! tied copy that differs, and a model of another family are refused, named. Every rank's
//! shards read from the opened checkpoint are, to the bit, those cut from the whole model (at
//! tp 1, 2, 4, a padded vocabulary, two pipeline stages), and a rank reads only its shards.

use ferrotron_exec::{shard_params_for, Tensor};
use ferrotron_io::hf::{read_safetensors, write_safetensors};
use ferrotron_io::import::{model_text, ImportOptions};
use ferrotron_io::weights::{load, open, Index, Weights};
use ferrotron_ir::{parse_model, Graph, LoadOptions};
use ferrotron_partitioner::{partition, Layout, PartitionOptions, Plan};
use std::collections::HashMap;
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

/// The fixtures with a checkpoint of their own (a directory each), and gpt2's sharded copy.
const CHECKPOINTS: [(&str, &str); 8] = [
    ("gpt2", "gpt2"),
    ("gpt2", "gpt2-sharded"),
    ("llama2", "llama2"),
    ("llama3", "llama3"),
    ("llama3.1", "llama3.1"),
    ("mistral", "mistral"),
    ("qwen2", "qwen2"),
    ("bert", "bert"),
];

/// The checkpoint at `path` opened for `g`, as the ranks read it.
fn opened(path: &Path, g: &Graph) -> ferrotron_io::weights::Opened {
    match open(path, g).unwrap().0 {
        Weights::Checkpoint(o) => o,
        Weights::Full(_) => panic!("{}: read whole, not opened", path.display()),
    }
}

/// `g` partitioned at `tp` (and `pp` stages), or `None` where the model does not divide.
fn plan(g: &Graph, tp: u64, pp: u64) -> Option<Plan> {
    let opts = PartitionOptions {
        tp,
        pp,
        micro_batches: pp,
        ..PartitionOptions::default()
    };
    partition(g, &opts).ok()
}

fn bits(shards: &[Tensor]) -> Vec<(Vec<usize>, Vec<u32>)> {
    shards
        .iter()
        .map(|t| {
            (
                t.shape.clone(),
                t.data.iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn every_rank_reads_the_shards_cut_from_the_whole_model() {
    let mut padded = 0;
    let mut plans = 0;
    for (model, dir) in CHECKPOINTS {
        let g = imported(model);
        let path = fixture(dir);
        let (full, _) = load(&path, &g).unwrap();
        for (tp, pp) in [(1, 1), (2, 1), (4, 1), (2, 2)] {
            let Some(plan) = plan(&g, tp, pp) else {
                assert!(tp > 1, "{dir} partitions at tp {tp}, pp {pp}");
                continue;
            };
            plans += 1;
            padded += plan
                .params
                .iter()
                .filter(|s| s.shape != s.model_shape)
                .count();
            let from_file = opened(&path, &g);
            for c in plan.mesh.coords() {
                let want = shard_params_for(&plan, &full, c).unwrap();
                let got = shard_params_for(&plan, &from_file, c).unwrap();
                assert!(
                    !got.is_empty(),
                    "{dir} at tp {tp}, pp {pp}: rank ({c}) holds nothing"
                );
                assert!(
                    bits(&got) == bits(&want),
                    "{dir} at tp {tp}, pp {pp}: rank ({c})'s shards differ from those cut from \
                     the whole model"
                );
            }
        }
    }
    // tp 1 of every checkpoint, and most at tp 2 and 4; vocabularies padded among them.
    assert!(plans >= 3 * CHECKPOINTS.len(), "{plans} plans");
    assert!(padded > 0, "no plan padded a vocabulary");
}

#[test]
fn a_rank_at_tp2_reads_its_shards_and_not_the_model() {
    let g = imported("gpt2");
    let path = fixture("gpt2");
    let plan = plan(&g, 2, 1).unwrap();
    let index = Index::of_dir(&path).unwrap();
    let (_, names) = load(&path, &g).unwrap();
    // Every parameter's bytes in the file (all F32 here), and what the two ranks read together:
    // a replicated parameter twice, a split one once (its vocabulary padding in no file).
    let (mut checkpoint, mut expected) = (0u64, 0u64);
    for shard in plan.params.iter() {
        let file = names.get(&shard.name).unwrap();
        let bytes = 4 * index.shape(file).unwrap().iter().product::<usize>() as u64;
        checkpoint += bytes;
        expected += match shard.layout.tp {
            Layout::Split(_) => bytes,
            _ => 2 * bytes,
        };
    }
    assert!(plan
        .params
        .iter()
        .any(|s| matches!(s.layout.tp, Layout::Split(_))));
    let mut total = 0;
    for c in plan.mesh.coords() {
        // One process per rank: each opens the checkpoint and reads its own shards.
        let from_file = opened(&path, &g);
        shard_params_for(&plan, &from_file, c).unwrap();
        let read = from_file.bytes_read();
        assert!(
            read < checkpoint * 3 / 4,
            "rank ({c}) read {read} bytes of a {checkpoint}-byte model"
        );
        total += read;
    }
    assert_eq!(total, expected);

    // Read whole, it is the checkpoint.
    let from_file = opened(&path, &g);
    let whole: HashMap<String, Tensor> = from_file.read_all().unwrap();
    assert_eq!(whole.len(), plan.params.len());
    assert_eq!(from_file.bytes_read(), checkpoint);
}
