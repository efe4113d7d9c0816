//! Operator fusion (`fuse.rs`): which pairs the executor fuses, that it leaves alone what it
//! must, and that a fused run computes exactly what the unfused one does.

use ferrotron_cpu::{kernels, Cpu};
use ferrotron_exec::fuse::{Fused, Fusions, Program, StepOp};
use ferrotron_exec::init::{init_params, random_batch};
use ferrotron_exec::{run, Backend, KernelError, Placement, RunOptions, Tensor};
use ferrotron_ir::op::Activation;
use ferrotron_ir::{load_model, parse_model, Dim, Graph, LoadOptions, Op};
use ferrotron_partitioner::{partition, PartitionOptions, Plan};
use std::path::PathBuf;

fn model(file: &str) -> Graph {
    model_with(file, &[])
}

fn model_with(file: &str, dims: &[(&str, u64)]) -> Graph {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")).join(file);
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap()
}

fn plan(g: &Graph, tp: u64, dp: u64, sequence_parallel: bool) -> Plan {
    partition(
        g,
        &PartitionOptions {
            tp,
            dp,
            sequence_parallel,
            ..PartitionOptions::default()
        },
    )
    .unwrap()
}

/// Each fused step as (the node it runs as, the nodes it absorbed joined by `+`, the fused op's
/// name).
fn fused_steps(plan: &Plan, program: &Program) -> Vec<(String, String, &'static str)> {
    let g = &plan.graph;
    program
        .steps
        .iter()
        .filter_map(|s| match &s.op {
            StepOp::Fused { op, absorbed, .. } => Some((
                g.nodes[s.node].name.clone(),
                absorbed
                    .iter()
                    .map(|&n| g.nodes[n].name.as_str())
                    .collect::<Vec<_>>()
                    .join("+"),
                op.mnemonic(),
            )),
            StepOp::Node => None,
        })
        .collect()
}

#[test]
fn without_attention_the_program_fuses_bias_activation_scaled_softmax_bias_dropout_add_and_the_tied_embedding_gradient(
) {
    let g = model("tiny-gpt.ron");
    let p = plan(&g, 2, 1, false);
    let program = Program::fused(&p, &|_| false, Fusions::PAIRS);
    let steps = fused_steps(&p, &program);
    for layer in 0..2 {
        let at = |s: &str| format!("h.{layer}.{s}");
        for want in [
            (at("act"), at("fc"), "BiasAct"),
            (format!("bwd.h.{layer}.act.0"), at("fc"), "BiasActGrad"),
            (at("probs"), at("scaled"), "ScaledSoftmax"),
            (
                format!("bwd.h.{layer}.scaled.0"),
                format!("bwd.h.{layer}.probs.0"),
                "ScaledSoftmaxGrad",
            ),
            // The bias, dropout and residual sum after the attention and after the MLP.
            (
                at("res1"),
                format!("{}+{}", at("attn_out"), at("attn_drop")),
                "BiasDropoutAdd",
            ),
            (
                at("y"),
                format!("{}+{}", at("proj"), at("mlp_drop")),
                "BiasDropoutAdd",
            ),
        ] {
            assert!(steps.contains(&want), "{want:?} missing from {steps:?}");
        }
    }
    // The tied table's gradients: the embedding's added into the output layer's.
    let tied = (
        "bwd.wte.acc0".into(),
        "bwd.tok_emb.0".into(),
        "EmbeddingGradAdd",
    );
    assert!(steps.contains(&tied), "{steps:?}");
    assert_eq!(steps.len(), 13, "{steps:?}");
    assert_eq!(program.fused_count(), 13);
    // The absorbed nodes no longer run: seven per layer (the bias add before the activation
    // serves two fused steps, each bias-dropout-residual sum absorbs two), and the embedding's
    // gradient.
    assert_eq!(program.steps.len(), p.graph.order.len() - 15);
    // The backward starts at the same node.
    let first_backward = p.graph.order[p.backward_start];
    assert_eq!(program.steps[program.backward_start].node, first_backward);
    // The absorbed nodes are gone from the program.
    let names: Vec<&str> = program
        .steps
        .iter()
        .map(|s| p.graph.nodes[s.node].name.as_str())
        .collect();
    for gone in [
        "h.0.fc",
        "h.1.scaled",
        "bwd.h.0.probs.0",
        "h.0.attn_drop",
        "h.1.proj",
    ] {
        assert!(!names.contains(&gone), "{gone} still runs");
    }
}

#[test]
fn a_kept_value_is_never_fused_away() {
    let g = model("tiny-gpt.ron");
    let p = plan(&g, 1, 1, false);
    let fc = p.graph.value_named("h.0.fc").unwrap();
    let program = Program::fused(&p, &|v| v == fc, Fusions::PAIRS);
    let steps = fused_steps(&p, &program);
    assert!(
        !steps.iter().any(|(_, absorbed, _)| absorbed == "h.0.fc"),
        "{steps:?}"
    );
    // The other layer's pair still fuses.
    assert!(steps.contains(&("h.1.act".into(), "h.1.fc".into(), "BiasAct")));
}

#[test]
fn a_pre_activation_read_by_anything_else_is_not_fused() {
    // `pre` feeds the GeLU and a residual: it must be stored, so nothing is fused for it.
    // `pre2` feeds only the ReLU: fused. The scale feeds two softmaxes: not fused.
    let src = r#"Model(
        name: "mlp", dims: {"b": 2, "s": 4, "h": 8, "f": 8, "v": 8},
        inputs: {"tokens": Input(shape: ["b", "s"], dtype: I64)},
        params: {
            "emb": Param(shape: ["v", "h"], init: Normal(std: 0.5)),
            "w1": Param(shape: ["h", "f"], init: Normal(std: 0.5)),
            "b1": Param(shape: ["f"], init: Normal(std: 0.5)),
            "b2": Param(shape: ["f"], init: Normal(std: 0.5)),
            "out": Param(shape: ["f", "v"], init: Normal(std: 0.5)),
        },
        body: {
            "x": Embedding(table: "emb", ids: "tokens"),
            "up": MatMul(a: "x", b: "w1"),
            "pre": Add("up", "b1"),
            "act": Gelu("pre"),
            "res": Add("act", "pre"),
            "pre2": Add("b2", "res"),
            "act2": Relu("pre2"),
            "sc": Scale(x: "act2", factor: Const(0.5)),
            "p1": Softmax(x: "sc", causal: false),
            "p2": Softmax(x: "sc", causal: false),
            "both": Add("p1", "p2"),
            "logits": MatMul(a: "both", b: "out"),
            "loss": CrossEntropy(logits: "logits", targets: "tokens"),
        },
        outputs: ["loss"],
    )"#;
    let g = parse_model(src, "mlp.ron", &LoadOptions::default()).unwrap();
    let p = plan(&g, 1, 1, false);
    let program = Program::fused(&p, &|_| false, Fusions::PAIRS);
    let steps = fused_steps(&p, &program);
    assert!(
        steps.contains(&("act2".into(), "pre2".into(), "BiasAct")),
        "{steps:?}"
    );
    assert!(
        steps
            .iter()
            .any(|(n, a, op)| n.starts_with("bwd.act2") && a == "pre2" && *op == "BiasActGrad"),
        "{steps:?}"
    );
    for (_, absorbed, _) in &steps {
        assert!(absorbed != "pre" && absorbed != "sc", "{steps:?}");
    }
    // And the run is the same with and without.
    same_run(&p, &g, 1);
}

/// Runs `p` with and without fusion and checks the loss, the outputs and every gradient agree
/// to the bit; returns the fused and unfused peak bytes of rank 0.
fn same_run(p: &Plan, g: &Graph, seed: u64) -> (usize, usize) {
    let params = init_params(g, seed);
    let batch = random_batch(g, seed);
    // The pairs only: a fused attention agrees within rounding (tests/fused_attention.rs).
    let pairs = RunOptions {
        fuse_attention: false,
        ..RunOptions::default()
    };
    let fused = run(Cpu::default(), p, &params, &batch, &pairs).unwrap();
    let unfused = run(
        Cpu::default(),
        p,
        &params,
        &batch,
        &RunOptions {
            fuse: false,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let model = &p.model;
    assert_eq!(
        fused.loss().unwrap().to_bits(),
        unfused.loss().unwrap().to_bits(),
        "{model}: loss"
    );
    for (name, _) in &p.graph.outputs {
        assert_eq!(
            fused.output(name).unwrap(),
            unfused.output(name).unwrap(),
            "{model}: output {name}"
        );
    }
    for (param, _) in &p.grads {
        let name = &p.graph.params[*param].name;
        assert_eq!(
            fused.grad(name).unwrap(),
            unfused.grad(name).unwrap(),
            "{model}: gradient of {name}"
        );
    }
    (fused.ranks[0].peak_bytes, unfused.ranks[0].peak_bytes)
}

#[test]
fn fused_runs_are_bit_identical_to_unfused() {
    let eight_heads: &[(&str, u64)] = &[("heads", 8)];
    let three_heads: &[(&str, u64)] = &[("heads", 3), ("hidden", 48)];
    for (file, dims, tp, dp, sp) in [
        ("tiny-gpt.ron", &[][..], 1, 1, false),
        ("tiny-gpt.ron", &[], 2, 1, false),
        ("tiny-gpt.ron", &[], 4, 1, true),
        ("tiny-gpt.ron", &[], 2, 2, true),
        ("tiny-gpt.ron", eight_heads, 8, 1, false),
        ("tiny-gpt.ron", three_heads, 3, 1, false),
        ("tiny-bert.ron", &[], 2, 1, false),
        ("tiny-llama.ron", &[], 2, 1, false),
    ] {
        let g = model_with(file, dims);
        let p = plan(&g, tp, dp, sp);
        let program = Program::fused(&p, &|_| false, Fusions::PAIRS);
        assert!(program.fused_count() > 0, "{file}: nothing fused");
        let (fused_peak, unfused_peak) = same_run(&p, &g, 7);
        assert!(
            fused_peak <= unfused_peak,
            "{file} tp {tp}: fusion raised the peak from {unfused_peak} to {fused_peak} bytes"
        );
    }
}

#[test]
fn a_forward_only_fused_run_gives_the_unfused_loss() {
    let g = model("tiny-gpt.ron");
    let p = plan(&g, 2, 1, false);
    let (params, batch) = (init_params(&g, 3), random_batch(&g, 3));
    let opts = RunOptions {
        forward_only: true,
        fuse_attention: false,
        ..RunOptions::default()
    };
    let fused = run(Cpu::default(), &p, &params, &batch, &opts).unwrap();
    let unfused = run(
        Cpu::default(),
        &p,
        &params,
        &batch,
        &RunOptions {
            fuse: false,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(
        fused.loss().unwrap().to_bits(),
        unfused.loss().unwrap().to_bits()
    );
}

// ---------------------------------------------------------------------------------------------
// The CPU's fused kernels against the pairs they replace

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
    let data = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect();
    Tensor {
        shape: shape.to_vec(),
        data,
    }
}

fn eval1(op: Op<&Tensor, Dim>) -> Tensor {
    kernels::eval(&op, &Placement::default(), 1)
        .unwrap()
        .pop()
        .unwrap()
}

fn activation(act: Activation, x: &Tensor) -> Tensor {
    eval1(match act {
        Activation::Gelu => Op::Gelu(x),
        Activation::GeluTanh => Op::GeluTanh(x),
        Activation::Silu => Op::Silu(x),
        Activation::Relu => Op::Relu(x),
    })
}

#[test]
fn fused_kernels_equal_the_pairs_they_replace() {
    let x = tensor(&[3, 5, 24], 1);
    let bias = tensor(&[24], 2);
    let dy = tensor(&[3, 5, 24], 3);
    let sum = eval1(Op::Add(&x, &bias));
    for threads in [1, 4] {
        let cpu = Cpu::with_threads(threads);
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Silu,
            Activation::Relu,
        ] {
            let fused = cpu
                .eval_fused(&Fused::BiasAct {
                    act,
                    x: &x,
                    bias: &bias,
                })
                .unwrap();
            assert_eq!(fused, activation(act, &sum), "{act:?}");
            let fused = cpu
                .eval_fused(&Fused::BiasActGrad {
                    act,
                    x: &x,
                    bias: &bias,
                    dy: &dy,
                })
                .unwrap();
            let unfused = eval1(Op::ActGrad {
                act,
                x: &sum,
                dy: &dy,
            });
            assert_eq!(fused, unfused, "{act:?} gradient");
        }
        // Causal with fewer queries than keys (the rows see `keys − queries` more keys).
        for (shape, causal) in [(&[2, 3, 4, 7][..], true), (&[2, 5, 9][..], false)] {
            let x = tensor(shape, 4);
            let factor = 0.35355339059327373;
            let scaled = eval1(Op::Scale {
                x: &x,
                factor: ferrotron_ir::op::Factor::Const(factor),
            });
            let y = eval1(Op::Softmax { x: &scaled, causal });
            let fused = cpu
                .eval_fused(&Fused::ScaledSoftmax {
                    x: &x,
                    factor,
                    causal,
                })
                .unwrap();
            assert_eq!(fused, y, "softmax {shape:?}");
            let dy = tensor(shape, 5);
            let grad = eval1(Op::SoftmaxGrad { y: &y, dy: &dy });
            let unfused = eval1(Op::Scale {
                x: &grad,
                factor: ferrotron_ir::op::Factor::Const(factor),
            });
            let fused = cpu
                .eval_fused(&Fused::ScaledSoftmaxGrad {
                    y: &y,
                    dy: &dy,
                    factor,
                })
                .unwrap();
            assert_eq!(fused, unfused, "softmax gradient {shape:?}");
        }
    }
}

/// `residual + dropout(x + bias)` in one pass equals the three ops to the bit, its mask drawn
/// at the shard's place in the full tensor under a seed, on any thread count; bad shapes are
/// errors naming the op.
#[test]
fn bias_dropout_add_equals_the_three_ops() {
    let x = tensor(&[3, 5, 200], 1);
    let bias = tensor(&[200], 2);
    let residual = tensor(&[3, 5, 200], 3);
    let cpu = Cpu::default();
    for (p, at) in [
        (0.1, Placement::default()),
        (0.0, Placement::default()),
        (
            0.3,
            Placement {
                full_shape: Some(vec![6, 5, 400]),
                offsets: Some(vec![3, 0, 200]),
                dropout_seed: 7,
                ..Placement::default()
            },
        ),
    ] {
        let summed = eval1(Op::Add(&x, &bias));
        let dropped = kernels::eval(&Op::Dropout { x: &summed, p }, &at, 1)
            .unwrap()
            .pop()
            .unwrap();
        let want = eval1(Op::Add(&residual, &dropped));
        for threads in [1, 3] {
            let got = kernels::bias_dropout_add((&x, &bias, &residual), p, &at, threads).unwrap();
            assert_eq!(got, want, "p {p}, {threads} threads");
        }
        // Through the backend too.
        assert_eq!(
            cpu.bias_dropout_add((&x, &bias, &residual), p, &at)
                .unwrap(),
            want
        );
    }
    for (bias, residual) in [
        (tensor(&[199], 2), residual.clone()),
        (bias.clone(), tensor(&[3, 5, 199], 3)),
    ] {
        let err = kernels::bias_dropout_add((&x, &bias, &residual), 0.1, &Placement::default(), 1)
            .unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::Invalid {
                    op: "BiasDropoutAdd",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn a_fused_op_on_bad_shapes_is_an_error_naming_the_shapes() {
    let x = tensor(&[2, 6], 1);
    let cpu = Cpu::default();
    for bias in [tensor(&[5], 2), tensor(&[1, 6], 2)] {
        let err = cpu
            .eval_fused(&Fused::BiasAct {
                act: Activation::Gelu,
                x: &x,
                bias: &bias,
            })
            .unwrap_err();
        match &err {
            KernelError::Invalid { op, msg } => {
                assert_eq!(*op, "BiasAct");
                assert!(msg.contains("expected [6]"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }
    let err = cpu
        .eval_fused(&Fused::BiasActGrad {
            act: Activation::Relu,
            x: &x,
            bias: &tensor(&[6], 2),
            dy: &tensor(&[3, 6], 3),
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Invalid {
                op: "BiasActGrad",
                ..
            }
        ),
        "{err}"
    );
    let err = cpu
        .eval_fused(&Fused::ScaledSoftmaxGrad {
            y: &x,
            dy: &tensor(&[6, 2], 3),
            factor: 0.5,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Invalid {
                op: "ScaledSoftmaxGrad",
                ..
            }
        ),
        "{err}"
    );
}
