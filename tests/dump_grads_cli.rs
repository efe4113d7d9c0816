//! `run --weights FILE --dump-grads OUT`: the gradients are written under the names the weights
//! file gave the parameters, each at the file tensor's shape (q|k|v fused, Conv1D orientation),
//! whichever of the names the loader accepts the file used; the tied `lm_head.weight` and the
//! causal-mask buffers, which the loader reads no parameter from, get none. Without `--weights`
//! they keep the model's names.

use ferrotron_exec::init::init_params;
use ferrotron_exec::Tensor;
use ferrotron_io::hf::{read_safetensors, to_hf_names, write_safetensors};
use ferrotron_ir::{load_model, LoadOptions};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

const MODEL: &str = "models/tiny-gpt.ron";

/// Runs `ferrotron run MODEL` with `extra` and `--dump-grads out`; the dump, by name.
fn dump(extra: &[&str], out: &Path) -> HashMap<String, Tensor> {
    let mut args = vec![
        "run",
        MODEL,
        "--tp",
        "2",
        "--dump-grads",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(&args)
        .output()
        .expect("the ferrotron binary runs");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    read_safetensors(out).unwrap()
}

fn shapes(tensors: &HashMap<String, Tensor>) -> BTreeMap<String, Vec<usize>> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone()))
        .collect()
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dumped_gradients_are_named_and_shaped_as_the_weights_file() {
    let dir =
        Dir(std::env::temp_dir().join(format!("ferrotron-dump-grads-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let g = load_model(Path::new(MODEL), &LoadOptions::default()).unwrap();
    let params = init_params(&g, 5);

    // Hugging Face's names, but two tensors under other names the loader accepts: the
    // embedding without the `transformer.` prefix, a layer norm's weight likewise.
    let mut file = to_hf_names(&params);
    for (from, to) in [
        ("transformer.wte.weight", "wte.weight"),
        ("transformer.h.1.ln_2.weight", "h.1.ln_2.weight"),
    ] {
        let t = file.remove(from).unwrap();
        file.insert(to.into(), t);
    }
    let weights = dir.0.join("model.safetensors");
    write_safetensors(&weights, &file).unwrap();
    let grads = dump(
        &["--weights", weights.to_str().unwrap()],
        &dir.0.join("grads.safetensors"),
    );
    assert_eq!(shapes(&grads), shapes(&file), "the file's names and shapes");
    // q|k|v fused, `[in, out]` as Conv1D holds it.
    assert_eq!(grads["transformer.h.0.attn.c_attn.weight"].shape, [64, 192]);
    assert!(grads.values().all(|t| t.data.iter().any(|&x| x != 0.0)));

    // The same weights without --weights (seed 5 is not `run`'s, so only names and shapes
    // compare): the model's names.
    let ours = dump(&["--seed", "5"], &dir.0.join("ours.safetensors"));
    let expected: BTreeMap<String, Vec<usize>> = params
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone()))
        .collect();
    assert_eq!(shapes(&ours), expected);

    // A file as `GPT2LMHeadModel.state_dict()` has it: the tied head and each layer's mask
    // buffer as well. The gradients are those of the parameters the loader read; the head's is
    // the embedding's, which holds it whole.
    let mut full = to_hf_names(&params);
    full.insert("lm_head.weight".into(), params["wte"].clone());
    let n = 32;
    let mask: Vec<f32> = (0..n * n)
        .map(|i| if i % n <= i / n { 1.0 } else { 0.0 })
        .collect();
    for l in 0..2 {
        full.insert(
            format!("transformer.h.{l}.attn.bias"),
            Tensor::new(vec![1, 1, n, n], mask.clone()).unwrap(),
        );
    }
    write_safetensors(&weights, &full).unwrap();
    let grads = dump(
        &["--weights", weights.to_str().unwrap()],
        &dir.0.join("full.safetensors"),
    );
    let names: BTreeSet<&String> = grads.keys().collect();
    let read: BTreeSet<&String> = full
        .keys()
        .filter(|k| *k != "lm_head.weight" && !k.ends_with(".attn.bias"))
        .collect();
    assert_eq!(names, read);
    for (name, t) in &grads {
        assert_eq!(t.shape, full[name].shape, "{name}");
    }
}
