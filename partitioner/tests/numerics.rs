//! Numerical proof that a plan computes the function of the model it was made from: the loss,
//! every parameter gradient and every forward output of the unpartitioned graph (reference
//! evaluator + autodiff, `f64`) against the same quantities of the plan run on simulated ranks
//! ([`ferrotron_partitioner::simulate`]), gathered back to full shape, for the tiny models at
//! several tensor-parallel and data-parallel degrees, with and without sequence parallelism,
//! vocabulary padding and a user pin. Parameters are random (biases and norm weights included,
//! so a bias added on every rank of a row-parallel layer shows) and dropout is on, so the masks
//! of every shard must be the unpartitioned graph's.
//!
//! Run with `--nocapture` to see the largest relative error of each configuration.

use ferrotron_ir::reference::{eval_graph, Tensor};
use ferrotron_ir::{backward, load_model, Graph, Init, LoadOptions, Op, ValueId};
use ferrotron_partitioner::simulate::simulate;
use ferrotron_partitioner::{partition, Layout, PartitionError, PartitionOptions};
use std::collections::HashMap;
use std::path::PathBuf;

/// Relative tolerance: both sides compute in `f64`; only the order of sums differs.
const RTOL: f64 = 1e-9;

fn model(name: &str, dims: &[(&str, u64)]) -> Graph {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/")).join(name);
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A draw with mean 0 and standard deviation 1 (Irwin–Hall: close enough to normal).
fn normalish(rng: &mut fastrand::Rng) -> f64 {
    ((0..4).map(|_| rng.f64()).sum::<f64>() - 2.0) * 3f64.sqrt()
}

fn sizes(g: &Graph, v: ValueId) -> Vec<usize> {
    g.ty(v).shape.sizes().iter().map(|&s| s as usize).collect()
}

/// Random parameters, by name: matrices with a spread that keeps activations nonlinear, norm
/// weights near 1 and biases near 0 but not 0.
fn random_params(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = fastrand::Rng::with_seed(seed);
    g.params
        .values()
        .map(|p| {
            let (mean, std) = match p.init {
                Init::Normal { .. } => (0.0, 0.2),
                Init::Ones => (1.0, 0.1),
                Init::Zeros => (0.0, 0.1),
            };
            let t = Tensor::from_fn(sizes(g, p.value), |_| mean + std * normalish(&mut rng));
            (p.name.clone(), t)
        })
        .collect()
}

/// Random inputs, by name: an integer input gets ids below the smallest bound of its uses (the
/// rows of every table it indexes, the classes of every cross-entropy it is the target of).
fn random_inputs(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    let mut bound: HashMap<ValueId, u64> = HashMap::new();
    let mut limit = |v: ValueId, b: u64| {
        let e = bound.entry(v).or_insert(u64::MAX);
        *e = (*e).min(b);
    };
    for &n in &g.order {
        match &g.nodes[n].op {
            Op::Embedding { table, ids } => limit(*ids, g.ty(*table).shape.size(0)),
            Op::CrossEntropy {
                logits, targets, ..
            } => {
                let ty = g.ty(*logits);
                limit(*targets, ty.shape.size(ty.shape.rank() - 1));
            }
            _ => {}
        }
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    g.inputs
        .iter()
        .map(|&v| {
            let ty = g.ty(v);
            let t = if ty.dtype.is_int() {
                let b = *bound.get(&v).unwrap_or_else(|| {
                    panic!(
                        "integer input `{}` is never used as an index",
                        g.values[v].name
                    )
                });
                Tensor::from_fn(sizes(g, v), |_| rng.u64(0..b) as f64)
            } else {
                Tensor::from_fn(sizes(g, v), |_| normalish(&mut rng))
            };
            (g.values[v].name.clone(), t)
        })
        .collect()
}

/// What the unpartitioned graph computes.
struct Reference {
    loss: f64,
    grads: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
}

fn reference(
    g: &Graph,
    params: &HashMap<String, Tensor>,
    inputs: &HashMap<String, Tensor>,
) -> Reference {
    let mut g2 = g.clone();
    let loss = g2.output("loss").expect("the model has a loss");
    let bw = backward(&mut g2, loss).unwrap_or_else(|e| panic!("autodiff: {e}"));
    let mut feed = HashMap::new();
    for &v in &g2.inputs {
        feed.insert(v, inputs[&g2.values[v].name].clone());
    }
    for p in g2.params.values() {
        feed.insert(p.value, params[&p.name].clone());
    }
    let env = eval_graph(&g2, &feed).unwrap_or_else(|e| panic!("reference: {e}"));
    Reference {
        loss: env[&loss].data[0],
        grads: bw
            .param_grads
            .iter()
            .map(|&(p, v)| (g2.params[p].name.clone(), env[&v].clone()))
            .collect(),
        outputs: g
            .outputs
            .iter()
            .map(|(name, v)| (name.clone(), env[v].clone()))
            .collect(),
    }
}

/// `|a − b|∞ / max(|b|∞, floor)` (0 when they are equal). `floor` is for values that are zero
/// analytically and round-off in both computations (an attention key bias's gradient: softmax
/// ignores a shift that is the same for every key).
fn rel_err(a: &Tensor, b: &Tensor, floor: f64, what: &str) -> f64 {
    let diff = a
        .max_abs_diff(b)
        .unwrap_or_else(|| panic!("{what}: shape {:?}, expected {:?}", a.shape, b.shape));
    if diff == 0.0 {
        0.0
    } else {
        diff / b.max_abs().max(floor).max(f64::MIN_POSITIVE)
    }
}

/// The leading `shape` corner of `x` (drops vocabulary padding).
fn crop(x: &Tensor, shape: &[usize]) -> Tensor {
    assert_eq!(x.rank(), shape.len());
    Tensor::from_fn(shape.to_vec(), |idx| x.at(idx))
}

/// How many elements of `x` lie outside its leading `model` corner, and the largest of them.
fn padding(x: &Tensor, model: &[usize]) -> (usize, f64) {
    let (mut count, mut max) = (0, 0.0f64);
    let mut idx = vec![0usize; x.rank()];
    for &v in &x.data {
        if idx.iter().zip(model).any(|(i, m)| i >= m) {
            count += 1;
            max = max.max(v.abs());
        }
        for a in (0..idx.len()).rev() {
            idx[a] += 1;
            if idx[a] < x.shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    (count, max)
}

/// One model with its data and what the unpartitioned graph computes on it.
struct Case {
    g: Graph,
    params: HashMap<String, Tensor>,
    inputs: HashMap<String, Tensor>,
    reference: Reference,
}

impl Case {
    fn new(name: &str, dims: &[(&str, u64)]) -> Case {
        let g = model(name, dims);
        let params = random_params(&g, 0x5eed);
        let inputs = random_inputs(&g, 0xda7a);
        let reference = reference(&g, &params, &inputs);
        Case {
            g,
            params,
            inputs,
            reference,
        }
    }

    /// Partitions, simulates and compares everything; returns the largest relative error.
    fn check(&self, opts: PartitionOptions) -> f64 {
        let cfg = format!(
            "{} tp={} dp={} sp={} vocab_multiple={} pins={:?}",
            self.g.name, opts.tp, opts.dp, opts.sequence_parallel, opts.vocab_multiple, opts.pins
        );
        let plan = partition(&self.g, &opts).unwrap_or_else(|e| panic!("{cfg}: partition: {e}"));
        let sim = simulate(&plan, &self.params, &self.inputs)
            .unwrap_or_else(|e| panic!("{cfg}: simulate: {e}"));
        let r = &self.reference;
        let mut worst = (0.0f64, String::from("-"));
        let mut note = |err: f64, what: String| {
            assert!(
                err <= RTOL,
                "{cfg}: {what} differs from the unpartitioned graph by {err:e} (relative)"
            );
            if err > worst.0 {
                worst = (err, what);
            }
        };

        let loss = sim.loss().unwrap_or_else(|e| panic!("{cfg}: loss: {e}"));
        note((loss - r.loss).abs() / r.loss.abs(), "the loss".into());

        // A gradient is measured against the largest of all of them where it is itself tiny.
        let floor = 1e-3 * r.grads.values().map(Tensor::max_abs).fold(0.0, f64::max);
        let mut names: Vec<&String> = r.grads.keys().collect();
        names.sort();
        for name in names {
            let got = sim
                .grad(name)
                .unwrap_or_else(|e| panic!("{cfg}: gradient of `{name}`: {e}"));
            note(
                rel_err(&got, &r.grads[name], floor, name),
                format!("d/d `{name}`"),
            );
        }
        assert_eq!(
            plan.grads.len(),
            r.grads.len(),
            "{cfg}: the plan has gradients for other parameters than the model"
        );

        // Vocabulary padding gets exactly zero gradient, so it stays zero under any optimizer.
        for shard in plan.params.iter().filter(|s| s.shape != s.model_shape) {
            let padded = sim
                .grad_padded(&shard.name)
                .unwrap_or_else(|e| panic!("{cfg}: gradient of `{}`: {e}", shard.name));
            let model: Vec<usize> = shard.model_shape.iter().map(|&s| s as usize).collect();
            let (idx_outside, nonzero) = padding(&padded, &model);
            assert!(
                idx_outside > 0,
                "{cfg}: `{}` padded but no padding",
                shard.name
            );
            assert_eq!(
                nonzero, 0.0,
                "{cfg}: the vocabulary padding of `{}` gets a gradient",
                shard.name
            );
        }

        let mut outputs: Vec<&String> = r.outputs.keys().collect();
        outputs.sort();
        for name in outputs {
            let want = &r.outputs[name];
            let got = sim
                .value(name)
                .unwrap_or_else(|e| panic!("{cfg}: output `{name}`: {e}"));
            note(
                rel_err(&crop(&got, &want.shape), want, 0.0, name),
                format!("output `{name}`"),
            );
        }
        println!("{cfg}: max relative error {:.2e} ({})", worst.0, worst.1);
        worst.0
    }
}

fn opts(tp: u64, dp: u64, sp: bool) -> PartitionOptions {
    PartitionOptions {
        tp,
        dp,
        sequence_parallel: sp,
        ..PartitionOptions::default()
    }
}

fn tiny_gpt() -> Case {
    Case::new("tiny-gpt.ron", &[("layers", 1), ("seq", 8), ("batch", 2)])
}

#[test]
fn gpt_tensor_parallel() {
    let case = tiny_gpt();
    for tp in [1, 2, 4] {
        case.check(opts(tp, 1, false));
    }
    // Padding to a small multiple, and none at all.
    case.check(PartitionOptions {
        vocab_multiple: 1,
        ..opts(2, 1, false)
    });
    case.check(PartitionOptions {
        vocab_multiple: 1,
        ..opts(1, 1, false)
    });
}

#[test]
fn gpt_sequence_and_data_parallel() {
    let case = tiny_gpt();
    case.check(opts(2, 1, true));
    case.check(opts(4, 1, true));
    case.check(opts(1, 2, false));
    case.check(opts(2, 2, false));
    case.check(opts(2, 2, true));
}

#[test]
fn gpt_odd_tensor_parallel_degree() {
    let case = Case::new(
        "tiny-gpt.ron",
        &[
            ("layers", 1),
            ("hidden", 96),
            ("heads", 3),
            ("seq", 6),
            ("batch", 2),
        ],
    );
    case.check(opts(3, 1, false));
    case.check(opts(3, 1, true));
    case.check(opts(3, 2, true));
}

#[test]
fn gpt_with_a_pinned_parameter() {
    let case = tiny_gpt();
    case.check(PartitionOptions {
        pins: vec![("h.0.mlp.c_fc.weight".into(), Layout::Replicated)],
        ..opts(2, 1, false)
    });
    case.check(PartitionOptions {
        pins: vec![("h.0.mlp.c_fc.weight".into(), Layout::Replicated)],
        ..opts(2, 2, false)
    });
}

#[test]
fn gpt_with_a_pinned_parameter_and_sequence_parallelism() {
    let case = tiny_gpt();
    case.check(PartitionOptions {
        pins: vec![("h.0.mlp.c_fc.weight".into(), Layout::Replicated)],
        ..opts(2, 1, true)
    });
    case.check(PartitionOptions {
        pins: vec![("h.0.mlp.c_proj.weight".into(), Layout::Replicated)],
        ..opts(4, 2, true)
    });
}

#[test]
fn bert_tensor_and_data_parallel() {
    let case = Case::new("tiny-bert.ron", &[("layers", 1), ("batch", 4)]);
    for tp in [1, 2, 4] {
        case.check(opts(tp, 1, false));
    }
    case.check(opts(1, 2, false));
    case.check(opts(2, 2, false));
    case.check(opts(4, 2, false));
}

#[test]
fn bert_sequence_parallel() {
    let case = Case::new("tiny-bert.ron", &[("layers", 1), ("batch", 4)]);
    case.check(opts(2, 1, true));
    case.check(opts(4, 1, true));
    case.check(opts(2, 2, true));
}

#[test]
fn llama_tensor_sequence_and_data_parallel() {
    let case = Case::new("tiny-llama.ron", &[("layers", 1)]);
    case.check(opts(1, 1, false));
    case.check(opts(2, 1, false));
    case.check(opts(2, 1, true));
    case.check(opts(1, 2, false));
    case.check(opts(2, 2, true));
}

/// Fewer key/value heads than ranks: the key/value projections stay whole and each rank takes
/// the heads its queries need (one key/value head shared by 4 query heads, at 2 and 4 ranks; 2
/// shared by 2 each, at 4 ranks).
#[test]
fn llama_with_fewer_key_value_heads_than_ranks() {
    let mqa = Case::new(
        "tiny-llama.ron",
        &[("layers", 1), ("heads", 4), ("kv_heads", 1), ("ffn", 32)],
    );
    mqa.check(opts(2, 1, false));
    mqa.check(opts(4, 1, false));
    mqa.check(opts(4, 1, true));
    let gqa = Case::new(
        "tiny-llama.ron",
        &[("layers", 1), ("heads", 4), ("kv_heads", 2), ("ffn", 32)],
    );
    gqa.check(opts(4, 2, false));
}

#[test]
fn two_layers_compose() {
    let case = Case::new("tiny-llama.ron", &[("layers", 2), ("seq", 6), ("ffn", 32)]);
    case.check(opts(2, 2, true));
    let case = Case::new("tiny-gpt.ron", &[("layers", 2), ("seq", 4), ("batch", 2)]);
    case.check(opts(2, 2, true));
}

#[test]
fn degrees_the_model_does_not_allow_are_refused() {
    let g = model("tiny-llama.ron", &[("layers", 1)]);
    match partition(&g, &opts(4, 1, false)) {
        Err(PartitionError::Indivisible { axis: "tp", .. }) => {}
        other => panic!("tiny-llama at tp=4: expected Indivisible, got {other:?}"),
    }
}

/// The comparison has teeth: a plan whose first forward g (the all-reduce closing a
/// row-parallel layer) is turned into an identity computes another function, and is caught.
#[test]
fn a_plan_missing_an_all_reduce_is_caught() {
    let case = tiny_gpt();
    let mut plan = partition(&case.g, &opts(2, 1, false)).expect("tiny-gpt partitions at tp=2");
    let g_node = plan.graph.order[..plan.backward_start]
        .iter()
        .copied()
        .find(|&n| matches!(plan.graph.nodes[n].op, Op::G { .. }))
        .expect("a tensor-parallel plan has a g");
    let Op::G { x, axis } = plan.graph.nodes[g_node].op.clone() else {
        unreachable!()
    };
    plan.graph.nodes[g_node].op = Op::F { x, axis };
    let sim = simulate(&plan, &case.params, &case.inputs).expect("the broken plan still runs");
    let loss = sim.loss().expect("the loss is replicated");
    let err = (loss - case.reference.loss).abs() / case.reference.loss.abs();
    assert!(err > 1e-6, "a missing all-reduce went unnoticed ({err:e})");
}
