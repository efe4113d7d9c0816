//! Hugging Face GPT-2 weights: a `GPT2LMHeadModel`-layout safetensors file for tiny-gpt's
//! dimensions loads into our names, runs at tp = 1 and tp = 2 on a batch read from a token
//! file with the same gradients, and bad files fail naming the tensor and both shapes.

mod common;

use common::{model, TempDir};
use ferrotron_cpu::Cpu;
use ferrotron_exec::init::init_params;
use ferrotron_exec::{run, RunOptions, Tensor};
use ferrotron_io::hf::{
    load_gpt2, load_gpt2_named, read_safetensors, read_tokens, to_hf_names, write_safetensors,
    HfError,
};
use ferrotron_ir::Graph;
use ferrotron_partitioner::{partition, PartitionOptions};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

fn tiny_gpt() -> Graph {
    model(&[])
}

/// A `GPT2LMHeadModel` state dict for `g`'s weights: `transformer.*` names, the tied
/// `lm_head.weight`, and each layer's causal-mask buffer.
fn hf_state(g: &Graph, params: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut hf = to_hf_names(params);
    assert!(hf.contains_key("transformer.wte.weight"));
    assert!(hf.contains_key("transformer.h.0.attn.c_attn.weight"));
    hf.insert("lm_head.weight".into(), params["wte"].clone());
    let n = 32;
    let mask: Vec<f32> = (0..n * n)
        .map(|i| if i % n <= i / n { 1.0 } else { 0.0 })
        .collect();
    let layers = g
        .params
        .values()
        .filter(|p| p.name.ends_with(".ln_1.weight"))
        .count();
    assert_eq!(layers, 2);
    for l in 0..layers {
        hf.insert(
            format!("transformer.h.{l}.attn.bias"),
            Tensor::new(vec![1, 1, n, n], mask.clone()).unwrap(),
        );
    }
    hf
}

fn write_tokens(path: &Path, lines: &[Vec<u64>]) {
    let text: String = lines
        .iter()
        .map(|l| {
            let ids: Vec<String> = l.iter().map(u64::to_string).collect();
            ids.join(" ") + "\n"
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// `max |a - b| / max |b|`.
fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let scale = b
        .data
        .iter()
        .fold(1e-30f64, |m, &x| m.max(f64::from(x).abs()));
    let diff = a.data.iter().zip(&b.data).fold(0.0f64, |m, (&x, &y)| {
        m.max((f64::from(x) - f64::from(y)).abs())
    });
    diff / scale
}

#[test]
fn gpt2_weights_give_the_same_gradients_at_tp1_and_tp2() {
    let g = tiny_gpt();
    let tmp = TempDir::new("grads");
    let params = init_params(&g, 2024);
    let weights = tmp.join("model.safetensors");
    write_safetensors(&weights, &hf_state(&g, &params)).unwrap();
    let loaded = load_gpt2(&weights, &g).unwrap();
    assert_eq!(loaded, params, "loads back exactly, by our names");

    // Two sequences of 16 ids below 97.
    let seqs: Vec<Vec<u64>> = (0..2u64)
        .map(|s| (0..16u64).map(|i| (s * 53 + i * 31 + 7) % 97).collect())
        .collect();
    let tokens_file = tmp.join("batch.txt");
    write_tokens(&tokens_file, &seqs);
    let tokens = read_tokens(&tokens_file).unwrap();
    assert_eq!(tokens.shape, [2, 16]);
    assert_eq!(tokens.data[17], seqs[1][1] as f32);
    let inputs = HashMap::from([("tokens".to_owned(), tokens)]);

    let mut losses = Vec::new();
    let mut dumps = Vec::new();
    for tp in [1, 2] {
        let plan = partition(
            &g,
            &PartitionOptions {
                tp,
                ..Default::default()
            },
        )
        .unwrap();
        let r = run(
            Cpu::default(),
            &plan,
            &loaded,
            &inputs,
            &RunOptions::default(),
        )
        .unwrap();
        losses.push(r.loss().unwrap());
        let grads: HashMap<String, Tensor> = g
            .params
            .values()
            .map(|p| (p.name.clone(), r.grad(&p.name).unwrap()))
            .collect();
        let dump = tmp.join(&format!("grads-tp{tp}.safetensors"));
        write_safetensors(&dump, &grads).unwrap();
        dumps.push(dump);
    }
    let (a, b) = (
        read_safetensors(&dumps[0]).unwrap(),
        read_safetensors(&dumps[1]).unwrap(),
    );
    assert_eq!(a.len(), g.params.len());
    assert_eq!(b.len(), g.params.len());
    assert!(
        (losses[0] - losses[1]).abs() <= 1e-4 * losses[0].abs(),
        "{losses:?}"
    );
    assert!(
        (losses[0] - (97f32).ln()).abs() < 0.5,
        "near-uniform at init: {losses:?}"
    );
    for (name, ga) in &a {
        let gb = &b[name];
        assert_eq!(ga.shape, params[name].shape, "{name}: full, unpadded");
        assert!(ga.data.iter().any(|&x| x != 0.0), "{name}: a gradient");
        let e = rel_error(gb, ga);
        assert!(
            e <= 1e-4,
            "{name}: tp = 2 differs from tp = 1 by {e:.2e} relative"
        );
    }
}

/// The bytes of `values` rounded to bfloat16 (by truncation) and their exact `f32` values.
fn bf16(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bits: Vec<u16> = values.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
    let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let exact = bits
        .iter()
        .map(|&b| f32::from_bits(u32::from(b) << 16))
        .collect();
    (bytes, exact)
}

#[test]
fn half_precision_weights_are_converted() {
    let g = tiny_gpt();
    let tmp = TempDir::new("half");
    let params = init_params(&g, 3);
    // Every tensor in bfloat16, but the ln_f weight in float16 with known values.
    let mut expected: HashMap<String, Tensor> = HashMap::new();
    let mut bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
    for (ours, t) in &params {
        let name = to_hf_names(&HashMap::from([(ours.clone(), t.clone())]))
            .into_keys()
            .next()
            .unwrap();
        let ours = ours.clone();
        if ours == "ln_f.weight" {
            let halves: [(u16, f32); 4] = [
                (0x3c00, 1.0),
                (0xbc00, -1.0),
                (0x3800, 0.5),
                (0x3555, 0.333_251_95),
            ];
            let raw: Vec<u8> = (0..64)
                .flat_map(|i| halves[i % 4].0.to_le_bytes())
                .collect();
            let vals = (0..64).map(|i| halves[i % 4].1).collect();
            expected.insert(ours, Tensor::new(vec![64], vals).unwrap());
            bytes.push((name.clone(), t.shape.clone(), Dtype::F16, raw));
        } else {
            let (raw, exact) = bf16(&t.data);
            expected.insert(ours, Tensor::new(t.shape.clone(), exact).unwrap());
            bytes.push((name.clone(), t.shape.clone(), Dtype::BF16, raw));
        }
    }
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = tmp.join("half.safetensors");
    std::fs::write(&path, safetensors::serialize(views, &None).unwrap()).unwrap();
    let loaded = load_gpt2(&path, &g).unwrap();
    assert_eq!(loaded, expected);

    // An integer tensor is not a weight.
    let ints = vec![0u8; 64 * 4];
    let mut views: Vec<(String, TensorView)> = bytes
        .iter()
        .filter(|(n, ..)| n != "transformer.ln_f.bias")
        .map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    views.push((
        "transformer.ln_f.bias".into(),
        TensorView::new(Dtype::I32, vec![64], &ints).unwrap(),
    ));
    std::fs::write(&path, safetensors::serialize(views, &None).unwrap()).unwrap();
    let msg = load_gpt2(&path, &g).unwrap_err().to_string();
    assert!(
        msg.contains("transformer.ln_f.bias") && msg.contains("I32"),
        "{msg}"
    );
}

#[test]
fn a_missing_tensor_is_named_with_its_shape() {
    let g = tiny_gpt();
    let tmp = TempDir::new("missing");
    let params = init_params(&g, 1);
    let mut hf = hf_state(&g, &params);
    hf.remove("transformer.h.1.mlp.c_fc.bias").unwrap();
    let path = tmp.join("model.safetensors");
    write_safetensors(&path, &hf).unwrap();
    let err = load_gpt2(&path, &g).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HfError::Missing { .. }), "{msg}");
    for part in [
        "model.safetensors",
        "`h.1.mlp.c_fc.bias` [256]",
        "`transformer.h.1.mlp.c_fc.bias`",
    ] {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }
}

#[test]
fn a_wrong_shape_names_the_tensor_and_both_shapes() {
    let g = tiny_gpt();
    let tmp = TempDir::new("shape");
    let params = init_params(&g, 1);
    let mut hf = hf_state(&g, &params);
    hf.insert(
        "transformer.h.0.attn.c_attn.weight".into(),
        Tensor::zeros(vec![64, 96]),
    );
    let path = tmp.join("model.safetensors");
    write_safetensors(&path, &hf).unwrap();
    let err = load_gpt2(&path, &g).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HfError::Shape { .. }), "{msg}");
    for part in [
        "transformer.h.0.attn.c_attn.weight",
        "[64, 96]",
        "[64, 192]",
    ] {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }

    // The embedding of a bigger vocabulary.
    let mut hf = hf_state(&g, &params);
    hf.insert(
        "transformer.wte.weight".into(),
        Tensor::zeros(vec![50257, 64]),
    );
    write_safetensors(&path, &hf).unwrap();
    let msg = load_gpt2(&path, &g).unwrap_err().to_string();
    assert!(msg.contains("`transformer.wte.weight` (parameter `wte`) has shape [50257, 64], the model says [97, 64]"), "{msg}");
}

#[test]
fn an_untied_head_or_a_deeper_model_is_refused() {
    let g = tiny_gpt();
    let tmp = TempDir::new("untied");
    let params = init_params(&g, 1);
    let path = tmp.join("model.safetensors");

    let mut hf = hf_state(&g, &params);
    hf.get_mut("lm_head.weight").unwrap().data[70] += 1.0;
    write_safetensors(&path, &hf).unwrap();
    let msg = load_gpt2(&path, &g).unwrap_err().to_string();
    assert!(
        msg.contains("lm_head.weight") && msg.contains("[1, 6]"),
        "{msg}"
    );

    // Without lm_head it is fine (Hugging Face drops tied weights when saving).
    let mut hf = hf_state(&g, &params);
    hf.remove("lm_head.weight");
    write_safetensors(&path, &hf).unwrap();
    assert_eq!(load_gpt2(&path, &g).unwrap(), params);

    // A layer the model does not have.
    let mut hf = hf_state(&g, &params);
    hf.insert(
        "transformer.h.2.ln_1.weight".into(),
        Tensor::zeros(vec![64]),
    );
    hf.insert("transformer.h.2.ln_1.bias".into(), Tensor::zeros(vec![64]));
    write_safetensors(&path, &hf).unwrap();
    let msg = load_gpt2(&path, &g).unwrap_err().to_string();
    assert!(
        msg.contains("transformer.h.2.ln_1.bias")
            && msg.contains("and 1 more")
            && msg.contains("tiny-gpt"),
        "{msg}"
    );

    // Not a safetensors file at all.
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{").unwrap();
    let msg = load_gpt2(&path, &g).unwrap_err().to_string();
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
}

#[test]
fn a_ragged_tokens_file_names_the_line() {
    let tmp = TempDir::new("tokens");
    let path = tmp.join("batch.txt");
    std::fs::write(&path, "1 2 3 4\n5 6 7 8\n9 10 11\n12 13 14 15\n").unwrap();
    let err = read_tokens(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HfError::Tokens { line: 3, .. }), "{msg}");
    assert!(
        msg.contains("batch.txt:3:") && msg.contains("3 token ids") && msg.contains("4"),
        "{msg}"
    );

    std::fs::write(&path, "1 2\n3 x\n").unwrap();
    let msg = read_tokens(&path).unwrap_err().to_string();
    assert!(msg.contains(":2:") && msg.contains("`x`"), "{msg}");

    std::fs::write(&path, "1 2\n\n3 4\n").unwrap();
    let msg = read_tokens(&path).unwrap_err().to_string();
    assert!(msg.contains(":2:") && msg.contains("empty"), "{msg}");

    std::fs::write(&path, "1 99999999\n").unwrap();
    let msg = read_tokens(&path).unwrap_err().to_string();
    assert!(msg.contains(":1:") && msg.contains("99999999"), "{msg}");

    std::fs::write(&path, "\n \n").unwrap();
    assert!(read_tokens(&path)
        .unwrap_err()
        .to_string()
        .contains("no sequences"));

    // Trailing blank lines and extra spaces are fine.
    std::fs::write(&path, " 1  2 3\n4 5 6 \n\n").unwrap();
    let t = read_tokens(&path).unwrap();
    assert_eq!(t.shape, [2, 3]);
    assert_eq!(t.data, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

#[test]
fn the_file_names_each_parameter_was_read_from_name_its_gradient() {
    let g = tiny_gpt();
    let tmp = TempDir::new("names");
    let params = init_params(&g, 4);
    let mut hf = hf_state(&g, &params);
    let wte = hf.remove("transformer.wte.weight").unwrap();
    hf.insert("wte.weight".into(), wte);
    let path = tmp.join("model.safetensors");
    write_safetensors(&path, &hf).unwrap();
    let (loaded, names) = load_gpt2_named(&path, &g).unwrap();
    assert_eq!(loaded, params);
    assert_eq!(names.get("wte"), Some("wte.weight"));
    assert_eq!(names.get("wpe"), Some("transformer.wpe.weight"));
    assert_eq!(
        names.get("h.0.attn.c_attn.weight"),
        Some("transformer.h.0.attn.c_attn.weight")
    );
    assert_eq!(names.get("lm_head.weight"), None);
    let renamed = names.rename(params.clone());
    // Every tensor read, under its name in the file and at its shape there; no gradient for the
    // tied head or the buffers.
    assert_eq!(renamed.len(), params.len());
    for (name, t) in &renamed {
        assert_eq!(t.shape, hf[name].shape, "{name}");
    }
    let extra = names.rename(HashMap::from([(
        "not_a_param".to_owned(),
        Tensor::zeros(vec![2]),
    )]));
    assert!(extra.contains_key("not_a_param"), "unknown names stay");
}
