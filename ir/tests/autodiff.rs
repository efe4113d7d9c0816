//! Reverse-mode autodiff: the backward pass of the zoo's tiny models verifies and gives every
//! parameter a gradient of its own type; collectives differentiate into their conjugates; the
//! weight gradients of batched matmuls stay 2-D; and the errors name what is wrong.

use ferrotron_ir::graph::{Graph, Init, NodeId, ValueDef};
use ferrotron_ir::op::{Factor, MeshAxis};
use ferrotron_ir::{
    backward, load_model, verify, AutodiffError, Backward, DType, LoadOptions, Op, Shape,
    TensorType, ValueId,
};
use std::path::Path;

fn f32(sizes: &[u64]) -> TensorType {
    TensorType::new(DType::F32, Shape::from_sizes(sizes))
}

fn i64(sizes: &[u64]) -> TensorType {
    TensorType::new(DType::I64, Shape::from_sizes(sizes))
}

fn zoo(name: &str, overrides: &[(&str, u64)]) -> Graph {
    let path = format!("{}/../models/{name}.ron", env!("CARGO_MANIFEST_DIR"));
    let opts = LoadOptions {
        overrides: overrides.iter().map(|&(d, v)| (d.into(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(Path::new(&path), &opts).unwrap()
}

/// Adds a node with one output named like it.
fn node(g: &mut Graph, name: &str, op: Op) -> ValueId {
    g.add_node(name, op, vec![name.into()], None).unwrap()[0]
}

fn mm(a: ValueId, b: ValueId, transpose_a: bool, transpose_b: bool) -> Op {
    Op::MatMul {
        a,
        b,
        transpose_a,
        transpose_b,
    }
}

/// A scalar loss on a `[rows, classes]` value: mean cross-entropy against an integer input.
fn ce_loss(g: &mut Graph, logits: ValueId) -> ValueId {
    let sizes = g.ty(logits).shape.sizes();
    let targets = g.add_input("targets", i64(&sizes[..sizes.len() - 1]));
    let loss = node(
        g,
        "loss",
        Op::CrossEntropy {
            logits,
            targets,
            shift: false,
            classes: None,
        },
    );
    g.outputs.push(("loss".into(), loss));
    loss
}

/// The node defining `v`.
fn def(g: &Graph, v: ValueId) -> NodeId {
    match g.values[v].def {
        ValueDef::Node { node, .. } => node,
        other => panic!("{} is not a node output ({other:?})", g.values[v].name),
    }
}

fn grad_of(g: &Graph, bwd: &Backward, v: ValueId) -> ValueId {
    let ValueDef::Param(p) = g.values[v].def else {
        panic!("not a parameter")
    };
    bwd.param_grads
        .iter()
        .find(|&&(q, _)| q == p)
        .unwrap_or_else(|| panic!("no gradient for {}", g.values[v].name))
        .1
}

fn backward_ops(g: &Graph, bwd: &Backward) -> Vec<&'static str> {
    g.order[bwd.start..]
        .iter()
        .map(|&n| g.nodes[n].op.mnemonic())
        .collect()
}

fn check_backward(g: &mut Graph) -> Backward {
    let forward_nodes = g.order.len();
    let loss = g.output("loss").unwrap();
    let bwd = backward(g, loss).unwrap();
    verify(g).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    assert_eq!(bwd.start, forward_nodes);
    let seed = def(g, bwd.seed);
    assert_eq!(g.order[bwd.start], seed);
    assert_eq!(g.nodes[seed].name, "bwd.seed");
    assert_eq!(
        g.nodes[seed].op,
        Op::Fill {
            shape: vec![],
            value: 1.0,
            dtype: DType::F32
        }
    );
    // Every parameter of these models reaches the loss, in ParamId order, with its own type.
    let params: Vec<_> = g.params.keys().collect();
    let with_grads: Vec<_> = bwd.param_grads.iter().map(|&(p, _)| p).collect();
    assert_eq!(with_grads, params, "{}", g.name);
    for &(p, d) in &bwd.param_grads {
        let value = g.params[p].value;
        let (have, want) = (g.ty(d), g.ty(value));
        assert_eq!(have.dtype, want.dtype, "gradient of {}", g.params[p].name);
        assert_eq!(
            have.shape.sizes(),
            want.shape.sizes(),
            "gradient of {}",
            g.params[p].name
        );
    }
    for &n in &g.order[bwd.start..] {
        assert!(g.nodes[n].name.starts_with("bwd."), "{}", g.nodes[n].name);
    }
    bwd
}

#[test]
fn zoo_models_differentiate_and_verify() {
    for name in ["tiny-gpt", "tiny-bert", "tiny-llama"] {
        let mut g = zoo(name, &[]);
        let bwd = check_backward(&mut g);
        let ops = backward_ops(&g, &bwd);
        // No forward-only work leaks into the backward pass, and nothing is differentiated twice.
        assert!(!ops.contains(&"CrossEntropy"), "{name}");
        assert_eq!(
            ops.iter().filter(|&&o| o == "CrossEntropyGrad").count(),
            1,
            "{name}"
        );
    }
}

#[test]
fn backward_nodes_share_the_forward_nodes_scope_and_names() {
    let mut g = zoo("tiny-gpt", &[]);
    let bwd = check_backward(&mut g);
    let fc = g.node_named("h.1.fc_mm").unwrap();
    let scope = g.nodes[fc].scope;
    assert!(scope.is_some());
    let grads: Vec<_> = g.order[bwd.start..]
        .iter()
        .filter(|&&n| g.nodes[n].name.starts_with("bwd.h.1.fc_mm."))
        .collect();
    assert!(!grads.is_empty());
    for &&n in &grads {
        assert_eq!(g.nodes[n].scope, scope, "{}", g.nodes[n].name);
    }
    // The tied embedding's two contributions (lookup and output layer) are summed once.
    let wte = g.value_named("wte").unwrap();
    let d = grad_of(&g, &bwd, wte);
    assert_eq!(g.values[d].name, "bwd.wte.acc0");
    assert!(matches!(g.nodes[def(&g, d)].op, Op::Add(..)));
    // The residual stream's gradient is accumulated where it forks.
    assert!(g.value_named("bwd.h.0.y.acc0").is_some());
    // The 3-output LayerNormGrad's outputs are numbered after their node.
    assert!(g.value_named("bwd.h.0.ln1.0.2").is_some());
    // Every backward node but the seed has the forward node it belongs to: the node it
    // differentiates, or, for a sum, the node whose contribution it adds (the tied embedding's
    // sum: the lookup, reached last in reverse order).
    let origin: std::collections::HashMap<_, _> = bwd.origin.iter().copied().collect();
    for &n in &g.order[bwd.start..] {
        let name = &g.nodes[n].name;
        if name == "bwd.seed" {
            assert!(!origin.contains_key(&n));
            continue;
        }
        let f = origin[&n];
        assert!(g.order[..bwd.start].contains(&f), "{name}");
        if !name.contains(".acc") {
            assert!(
                name.starts_with(&format!("bwd.{}.", g.nodes[f].name)),
                "{name}"
            );
        }
    }
    assert_eq!(g.nodes[origin[&def(&g, d)]].name, "tok_emb");
}

#[test]
fn inputs_and_integer_values_get_no_gradient() {
    let mut g = zoo("tiny-bert", &[]);
    let bwd = check_backward(&mut g);
    // Only the embedding tables' gradients read the ids; nothing is computed for the ids.
    for &n in &g.order[bwd.start..] {
        for &o in &g.nodes[n].outputs {
            assert!(g.ty(o).dtype.is_float(), "{}", g.nodes[n].name);
        }
    }
    assert!(g.value_named("bwd.tokens.acc0").is_none());
}

/// `w` through `op(w)`, then a cross-entropy loss; returns (graph, w, the collective's output).
fn through(make: impl FnOnce(ValueId) -> Op, w_sizes: &[u64]) -> (Graph, ValueId, ValueId) {
    let mut g = Graph::new("collective");
    let w = g.add_param("w", f32(w_sizes), Init::Normal { std: 1.0 }, None);
    let y = node(&mut g, "c", make(w));
    ce_loss(&mut g, y);
    (g, w, y)
}

fn differentiate(g: &mut Graph) -> Backward {
    let loss = g.output("loss").unwrap();
    let bwd = backward(g, loss).unwrap();
    verify(g).unwrap();
    bwd
}

/// The gradient of `w` in a graph made by `through`, and the gradient of the collective's output.
fn collective_grad(make: impl FnOnce(ValueId) -> Op, w_sizes: &[u64]) -> (Graph, Op, ValueId) {
    let (mut g, w, _) = through(make, w_sizes);
    let bwd = differentiate(&mut g);
    let dw = grad_of(&g, &bwd, w);
    let dy = g.value_named("bwd.loss.0").unwrap();
    let op = match g.values[dw].def {
        ValueDef::Node { node, .. } => g.nodes[node].op.clone(),
        _ => unreachable!(),
    };
    (g, op, dy)
}

#[test]
fn f_differentiates_into_an_all_reduce_and_g_into_the_identity() {
    let (_, op, dy) = collective_grad(
        |x| Op::F {
            x,
            axis: MeshAxis::Tp,
        },
        &[4, 6],
    );
    assert_eq!(
        op,
        Op::AllReduce {
            x: dy,
            axis: MeshAxis::Tp
        }
    );

    for make in [
        (|x| Op::G {
            x,
            axis: MeshAxis::Tp,
        }) as fn(ValueId) -> Op,
        |x| Op::AllReduce {
            x,
            axis: MeshAxis::Dp,
        },
    ] {
        let (mut g, w, _) = through(make, &[4, 6]);
        let bwd = differentiate(&mut g);
        let dy = g.value_named("bwd.loss.0").unwrap();
        assert_eq!(grad_of(&g, &bwd, w), dy, "the gradient passes through");
        assert_eq!(backward_ops(&g, &bwd), ["Fill", "CrossEntropyGrad"]);
    }
}

#[test]
fn gathers_slices_and_scatters_differentiate_into_each_other() {
    let gather = |partial_grad| {
        move |x| Op::AllGather {
            x,
            dim: -1,
            axis: MeshAxis::Tp,
            parts: 2,
            partial_grad,
        }
    };
    let (_, op, dy) = collective_grad(gather(false), &[4, 3]);
    assert_eq!(
        op,
        Op::LocalSlice {
            x: dy,
            dim: -1,
            axis: MeshAxis::Tp,
            parts: 2
        }
    );
    let (_, op, dy) = collective_grad(gather(true), &[4, 3]);
    assert_eq!(
        op,
        Op::ReduceScatter {
            x: dy,
            dim: -1,
            axis: MeshAxis::Tp,
            parts: 2
        }
    );
    let back = |dy| Op::AllGather {
        x: dy,
        dim: 0,
        axis: MeshAxis::Dp,
        parts: 2,
        partial_grad: false,
    };
    let (_, op, dy) = collective_grad(
        |x| Op::ReduceScatter {
            x,
            dim: 0,
            axis: MeshAxis::Dp,
            parts: 2,
        },
        &[4, 6],
    );
    assert_eq!(op, back(dy));
    let (_, op, dy) = collective_grad(
        |x| Op::LocalSlice {
            x,
            dim: 0,
            axis: MeshAxis::Dp,
            parts: 2,
        },
        &[4, 6],
    );
    assert_eq!(op, back(dy));
}

#[test]
fn a_megatron_mlp_gets_one_all_reduce_backward() {
    // The paper's MLP: f, column-parallel matmul, GeLU, row-parallel matmul, g. Backward has
    // exactly one all-reduce (f's), and g costs nothing.
    let mut g = Graph::new("mlp");
    let x = g.add_param("x", f32(&[2, 3, 8]), Init::Normal { std: 1.0 }, None);
    let a = g.add_param("a", f32(&[8, 4]), Init::Normal { std: 1.0 }, None);
    let b = g.add_param("b", f32(&[4, 8]), Init::Normal { std: 1.0 }, None);
    let fx = node(
        &mut g,
        "f",
        Op::F {
            x,
            axis: MeshAxis::Tp,
        },
    );
    let h = node(&mut g, "h", mm(fx, a, false, false));
    let act = node(&mut g, "act", Op::Gelu(h));
    let o = node(&mut g, "o", mm(act, b, false, false));
    let y = node(
        &mut g,
        "g",
        Op::G {
            x: o,
            axis: MeshAxis::Tp,
        },
    );
    ce_loss(&mut g, y);
    let bwd = differentiate(&mut g);
    let ops = backward_ops(&g, &bwd);
    assert_eq!(ops.iter().filter(|&&o| o == "AllReduce").count(), 1);
    assert_eq!(bwd.param_grads.len(), 3);
    let dx = grad_of(&g, &bwd, x);
    assert!(matches!(g.nodes[def(&g, dx)].op, Op::AllReduce { .. }));
}

#[test]
fn weight_gradients_of_batched_matmuls_are_two_dimensional() {
    for transpose_b in [false, true] {
        let mut g = Graph::new("linear");
        let x = g.add_input("x", f32(&[2, 3, 4]));
        let w_sizes: &[u64] = if transpose_b { &[5, 4] } else { &[4, 5] };
        let w = g.add_param("w", f32(w_sizes), Init::Normal { std: 1.0 }, None);
        let y = node(&mut g, "y", mm(x, w, false, transpose_b));
        ce_loss(&mut g, y);
        let bwd = differentiate(&mut g);
        let dw = grad_of(&g, &bwd, w);
        assert_eq!(g.ty(dw), g.ty(w));
        let Op::MatMul { a, b, .. } = g.nodes[def(&g, dw)].op else {
            panic!("the weight gradient is not a matmul")
        };
        for v in [a, b] {
            assert_eq!(g.ty(v).shape.sizes(), [6, g.ty(v).shape.size(1)]);
            assert!(matches!(g.nodes[def(&g, v)].op, Op::Reshape { .. }));
        }
        let ops = backward_ops(&g, &bwd);
        assert!(!ops.contains(&"SumTo"), "{ops:?}");
        for &n in &g.order[bwd.start..] {
            if let Op::MatMul { a, b, .. } = g.nodes[n].op {
                assert_eq!(g.ty(a).shape.rank(), 2);
                assert_eq!(g.ty(b).shape.rank(), 2);
            }
        }
        assert_eq!(g.nodes[def(&g, dw)].name, "bwd.y.2");
    }
}

#[test]
fn the_zoo_weight_gradients_need_no_sum_to() {
    // Every weight in these models is rank 2 and used by rank-3 activations: no gradient needs a
    // batched matmul followed by a SumTo. (SumTo remains for broadcast adds: biases and the
    // position embedding.)
    for name in ["tiny-gpt", "tiny-bert", "tiny-llama"] {
        let mut g = zoo(name, &[]);
        let bwd = check_backward(&mut g);
        for &n in &g.order[bwd.start..] {
            if let Op::SumTo { x, .. } = g.nodes[n].op {
                let from = &g.nodes[def(&g, x)];
                // tiny-llama's grouped-query attention broadcasts keys and values over the group:
                // those (rank-5) matmul gradients are legitimately summed.
                let gqa = g.ty(x).shape.rank() == 5;
                assert!(
                    !matches!(from.op, Op::MatMul { .. }) || gqa,
                    "{name}: {} sums the matmul {}",
                    g.nodes[n].name,
                    from.name
                );
            }
            if let Op::MatMul { a, b, .. } = g.nodes[n].op {
                if g.ty(g.nodes[n].outputs[0]).shape.rank() == 2 {
                    assert_eq!(g.ty(a).shape.rank(), 2);
                    assert_eq!(g.ty(b).shape.rank(), 2);
                }
            }
        }
        // Each rank-2 matmul weight's gradient is a 2-D matmul of reshaped operands.
        for &(p, d) in &bwd.param_grads {
            let name = &g.params[p].name;
            if name.ends_with("weight") && g.ty(d).shape.rank() == 2 && !name.contains("emb") {
                let node = &g.nodes[def(&g, d)];
                assert!(
                    matches!(node.op, Op::MatMul { .. }),
                    "{name}: {}",
                    node.name
                );
            }
        }
    }
}

#[test]
fn broadcast_matmul_operands_are_summed_back() {
    let mut g = Graph::new("bmm");
    let a = g.add_param("a", f32(&[2, 3, 4, 5]), Init::Normal { std: 1.0 }, None);
    let b = g.add_param("b", f32(&[3, 6, 5]), Init::Normal { std: 1.0 }, None);
    let y = node(&mut g, "y", mm(a, b, false, true));
    let flat = node(
        &mut g,
        "flat",
        Op::Reshape {
            x: y,
            shape: vec![24u64.into(), 6u64.into()],
        },
    );
    ce_loss(&mut g, flat);
    let bwd = differentiate(&mut g);
    assert_eq!(g.ty(grad_of(&g, &bwd, a)), g.ty(a));
    let db = grad_of(&g, &bwd, b);
    assert_eq!(g.ty(db), g.ty(b));
    assert!(matches!(g.nodes[def(&g, db)].op, Op::SumTo { .. }));
}

#[test]
fn split_outputs_without_a_gradient_contribute_zeros() {
    let mut g = Graph::new("split");
    let w = g.add_param("w", f32(&[4, 9]), Init::Normal { std: 1.0 }, None);
    let parts = g
        .add_node(
            "s",
            Op::Split {
                x: w,
                dim: -1,
                sizes: vec![3u64.into(), 2u64.into(), 4u64.into()],
            },
            vec!["s.0".into(), "s.1".into(), "s.2".into()],
            None,
        )
        .unwrap()
        .to_vec();
    ce_loss(&mut g, parts[1]);
    let bwd = differentiate(&mut g);
    let dw = grad_of(&g, &bwd, w);
    let Op::Concat { xs, dim: axis } = &g.nodes[def(&g, dw)].op else {
        panic!()
    };
    assert_eq!(*axis, -1);
    for i in [0, 2] {
        assert!(matches!(
            g.nodes[def(&g, xs[i])].op,
            Op::Fill { value: 0.0, .. }
        ));
    }
    assert_eq!(xs[1], g.value_named("bwd.loss.0").unwrap());
}

#[test]
fn repeated_uses_are_summed() {
    // y = w·w + w: three contributions to dw, two sums.
    let mut g = Graph::new("sum");
    let w = g.add_param("w", f32(&[3, 4]), Init::Normal { std: 1.0 }, None);
    let sq = node(&mut g, "sq", Op::Mul(w, w));
    let y = node(&mut g, "y", Op::Add(sq, w));
    ce_loss(&mut g, y);
    let bwd = differentiate(&mut g);
    let dw = grad_of(&g, &bwd, w);
    assert_eq!(g.values[dw].name, "bwd.w.acc1");
    assert!(g.value_named("bwd.w.acc0").is_some());
}

#[test]
fn generated_names_never_clash_with_existing_ones() {
    // A forward node already called `bwd.seed`, and node names `a` / `a.0` whose generated
    // multi-output names would collide (`bwd.a.0` has outputs `bwd.a.0.0`...).
    let mut g = Graph::new("names");
    let w = g.add_param("w", f32(&[2, 4]), Init::Normal { std: 1.0 }, None);
    let a = node(
        &mut g,
        "a",
        Op::LayerNorm {
            x: w,
            weight: None,
            bias: None,
            eps: 1e-5,
        },
    );
    let a0 = node(&mut g, "a.0", Op::Relu(a));
    let seed = node(&mut g, "bwd.seed", Op::Gelu(a0));
    let seed0 = node(&mut g, "bwd.a.0.0", Op::Silu(seed));
    ce_loss(&mut g, seed0);
    let bwd = differentiate(&mut g);
    assert_eq!(g.values[bwd.seed].name, "bwd.seed~1");
    assert_eq!(bwd.param_grads.len(), 1);
}

#[test]
fn a_loss_that_is_not_a_float_scalar_is_rejected() {
    let mut g = zoo("tiny-gpt", &[]);
    let logits = g.output("logits").unwrap();
    let nodes = g.order.len();
    let e = backward(&mut g, logits).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the loss `logits` must be a float scalar, found f32[batch=2, seq=16, vocab=97]"
    );
    assert_eq!(g.order.len(), nodes, "nothing was added");
    let tokens = g.value_named("tokens").unwrap();
    assert!(matches!(
        backward(&mut g, tokens),
        Err(AutodiffError::LossNotScalar { .. })
    ));
}

#[test]
fn a_gradient_through_a_backward_op_is_an_error() {
    let mut g = Graph::new("bwd-op");
    let w = g.add_param("w", f32(&[4]), Init::Normal { std: 1.0 }, None);
    let act = node(
        &mut g,
        "act",
        Op::ActGrad {
            act: ferrotron_ir::Activation::Gelu,
            x: w,
            dy: w,
        },
    );
    let loss = node(
        &mut g,
        "total",
        Op::SumTo {
            x: act,
            shape: vec![],
        },
    );
    let before = g.clone();
    let e = backward(&mut g, loss).unwrap_err();
    assert_eq!(g, before, "nothing was added");
    assert_eq!(
        e,
        AutodiffError::NoVjp {
            node: "total".into(),
            op: "SumTo"
        }
    );
    assert!(e.to_string().contains("`total` (SumTo)"), "{e}");

    // Deeper in: differentiable ops downstream of the backward op change nothing either.
    let mut g = Graph::new("bwd-op-inside");
    let w = g.add_param("w", f32(&[4]), Init::Normal { std: 1.0 }, None);
    let act = node(
        &mut g,
        "act",
        Op::ActGrad {
            act: ferrotron_ir::Activation::Gelu,
            x: w,
            dy: w,
        },
    );
    let row = node(
        &mut g,
        "row",
        Op::Reshape {
            x: act,
            shape: vec![1u64.into(), 4u64.into()],
        },
    );
    let y = node(&mut g, "gelu", Op::Gelu(row));
    ce_loss(&mut g, y);
    let before = g.clone();
    let loss = g.output("loss").unwrap();
    assert_eq!(
        backward(&mut g, loss),
        Err(AutodiffError::NoVjp {
            node: "act".into(),
            op: "ActGrad"
        })
    );
    assert_eq!(g, before);
}

#[test]
fn backward_ops_no_gradient_flows_through_are_fine() {
    // A constant and a backward op over graph inputs only, added to a differentiable loss.
    let mut g = Graph::new("const");
    let x = g.add_input("x", f32(&[4]));
    let w = g.add_param("w", f32(&[4]), Init::Normal { std: 1.0 }, None);
    let c = node(
        &mut g,
        "c",
        Op::ActGrad {
            act: ferrotron_ir::Activation::Relu,
            x,
            dy: x,
        },
    );
    let s = node(&mut g, "s", Op::Mul(c, w));
    let fill = node(
        &mut g,
        "one",
        Op::Fill {
            shape: vec![4u64.into()],
            value: 1.0,
            dtype: DType::F32,
        },
    );
    let y = node(&mut g, "y", Op::Add(s, fill));
    let y2 = node(
        &mut g,
        "y2",
        Op::Reshape {
            x: y,
            shape: vec![1u64.into(), 4u64.into()],
        },
    );
    ce_loss(&mut g, y2);
    let bwd = differentiate(&mut g);
    assert_eq!(bwd.param_grads.len(), 1);
    // A loss that depends on no parameter has no parameter gradients.
    let mut g = Graph::new("none");
    let x = g.add_input("x", f32(&[2, 3]));
    let scaled = node(
        &mut g,
        "scaled",
        Op::Scale {
            x,
            factor: Factor::Const(2.0),
        },
    );
    ce_loss(&mut g, scaled);
    let bwd = differentiate(&mut g);
    assert!(bwd.param_grads.is_empty());
    assert_eq!(backward_ops(&g, &bwd), ["Fill"]);
}

#[test]
fn backward_round_trips_through_ron() {
    let mut g = zoo("tiny-llama", &[]);
    let bwd = check_backward(&mut g);
    let text = ron::to_string(&bwd).unwrap();
    assert_eq!(ron::from_str::<Backward>(&text).unwrap(), bwd);
}

// ---------------------------------------------------------------------------------------------
// Numeric gradient checks: the backward graph, run by the reference evaluator, against central
// differences of the forward graph, in f64.

mod numeric {
    use super::*;
    use ferrotron_ir::graph::ParamId;
    use ferrotron_ir::reference::{eval_graph, Tensor};
    use ferrotron_ir::{Activation, Dim};
    use std::collections::HashMap;

    const STEP: f64 = 1e-5;
    const RTOL: f64 = 1e-5;
    /// Floor for gradients that are zero up to rounding (masked or dropped elements).
    const ATOL: f64 = 1e-9;

    /// The largest id each integer input may hold: the smallest table or class count it indexes.
    fn int_bound(g: &Graph, v: ValueId) -> u64 {
        let mut bound = u64::MAX;
        for n in g.nodes.values() {
            match &n.op {
                Op::Embedding { table, ids } if *ids == v => {
                    bound = bound.min(g.ty(*table).shape.size(0));
                }
                Op::CrossEntropy {
                    logits,
                    targets,
                    classes,
                    ..
                } if *targets == v => {
                    let shape = &g.ty(*logits).shape;
                    let c = classes
                        .as_ref()
                        .map_or(shape.size(shape.rank() - 1), |c| c.size);
                    bound = bound.min(c);
                }
                _ => {}
            }
        }
        assert!(
            bound != u64::MAX,
            "integer input {} is unused",
            g.values[v].name
        );
        bound
    }

    fn random(rng: &mut fastrand::Rng, ty: &TensorType, f: impl Fn(f64) -> f64) -> Tensor {
        let shape: Vec<usize> = ty.shape.sizes().iter().map(|&s| s as usize).collect();
        Tensor::from_fn(shape, |_| f(rng.f64() * 2.0 - 1.0))
    }

    /// Random parameters (norm weights and denominators near 1, the rest in ±0.5) and inputs.
    fn feed(g: &Graph, rng: &mut fastrand::Rng) -> HashMap<ValueId, Tensor> {
        let mut feed = HashMap::new();
        for p in g.params.values() {
            let ty = g.ty(p.value);
            let t = match p.init {
                Init::Ones => random(rng, ty, |u| 1.0 + 0.2 * u),
                Init::Zeros => random(rng, ty, |u| 0.2 * u),
                Init::Normal { .. } => random(rng, ty, |u| 0.5 * u),
            };
            feed.insert(p.value, t);
        }
        for &v in &g.inputs {
            let ty = g.ty(v);
            let t = if ty.dtype.is_int() {
                let bound = int_bound(g, v);
                random(rng, ty, |_| 0.0).map_data(|_| rng.u64(0..bound) as f64)
            } else {
                random(rng, ty, |u| u)
            };
            feed.insert(v, t);
        }
        feed
    }

    trait MapData {
        fn map_data(self, f: impl FnMut(f64) -> f64) -> Self;
    }

    impl MapData for Tensor {
        fn map_data(mut self, mut f: impl FnMut(f64) -> f64) -> Tensor {
            for x in &mut self.data {
                *x = f(*x);
            }
            self
        }
    }

    fn loss_at(g: &Graph, loss: ValueId, feed: &HashMap<ValueId, Tensor>) -> f64 {
        let env = eval_graph(g, feed).unwrap_or_else(|e| panic!("{}: {e}", g.name));
        env[&loss].data[0]
    }

    fn close(analytic: f64, numeric: f64) -> bool {
        (analytic - numeric).abs() <= ATOL + RTOL * analytic.abs().max(numeric.abs())
    }

    /// Checks `samples` random elements of every parameter's gradient, and the whole gradient
    /// along one random direction per parameter; returns how many parameters were checked.
    fn gradcheck(g: &Graph, seed: u64, samples: usize) -> usize {
        let loss = g.output("loss").unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        let feed = feed(g, &mut rng);

        let mut with_grad = g.clone();
        let bwd = backward(&mut with_grad, loss).unwrap();
        verify(&with_grad).unwrap();
        let env = eval_graph(&with_grad, &feed).unwrap_or_else(|e| panic!("{}: {e}", g.name));
        let grads: HashMap<ParamId, &Tensor> = bwd
            .param_grads
            .iter()
            .map(|&(p, d)| (p, &env[&d]))
            .collect();
        assert!(!grads.is_empty(), "{}: no parameter gradients", g.name);

        let fd = |p: ParamId, dir: &dyn Fn(&mut Tensor, f64)| {
            let value = g.params[p].value;
            let mut plus = feed.clone();
            dir(plus.get_mut(&value).unwrap(), STEP);
            let mut minus = feed.clone();
            dir(minus.get_mut(&value).unwrap(), -STEP);
            (loss_at(g, loss, &plus) - loss_at(g, loss, &minus)) / (2.0 * STEP)
        };
        for (p, data) in g.params.iter() {
            let grad = grads[&p];
            let name = format!("{}: d loss / d {}", g.name, data.name);
            assert_eq!(
                grad.shape, feed[&data.value].shape,
                "{name}: gradient shape"
            );
            for _ in 0..samples.min(grad.numel()) {
                let i = rng.usize(0..grad.numel());
                let numeric = fd(p, &|t, h| t.data[i] += h);
                let analytic = grad.data[i];
                assert!(
                    close(analytic, numeric),
                    "{name}[{i}]: autodiff {analytic:e}, finite difference {numeric:e}"
                );
            }
            let dir: Vec<f64> = (0..grad.numel()).map(|_| rng.f64() * 2.0 - 1.0).collect();
            let analytic: f64 = grad.data.iter().zip(&dir).map(|(g, d)| g * d).sum();
            let numeric = fd(p, &|t, h| {
                for (x, d) in t.data.iter_mut().zip(&dir) {
                    *x += h * d;
                }
            });
            assert!(
                close(analytic, numeric),
                "{name} along a random direction: autodiff {analytic:e}, finite difference \
                 {numeric:e}"
            );
        }
        g.params.len()
    }

    /// A hand-built graph under test.
    struct Net {
        g: Graph,
    }

    impl Net {
        fn new(name: &str) -> Net {
            Net {
                g: Graph::new(name),
            }
        }

        fn param(&mut self, name: &str, sizes: &[u64]) -> ValueId {
            let init = Init::Normal { std: 0.02 };
            self.g.add_param(name, f32(sizes), init, None)
        }

        /// A parameter near 1 (a denominator or a norm weight).
        fn ones(&mut self, name: &str, sizes: &[u64]) -> ValueId {
            self.g.add_param(name, f32(sizes), Init::Ones, None)
        }

        fn op(&mut self, name: &str, op: Op) -> ValueId {
            node(&mut self.g, name, op)
        }

        fn ops(&mut self, name: &str, op: Op) -> Vec<ValueId> {
            let names = (0..op.num_outputs())
                .map(|i| format!("{name}.{i}"))
                .collect();
            self.g.add_node(name, op, names, None).unwrap().to_vec()
        }

        /// Ends with a cross-entropy loss on `v` flattened to `[rows, last]`, and checks it.
        fn check(mut self, v: ValueId, seed: u64) {
            let sizes = self.g.ty(v).shape.sizes();
            let last = *sizes.last().unwrap();
            let rows = sizes.iter().product::<u64>() / last;
            let flat = self.op(
                "flat",
                Op::Reshape {
                    x: v,
                    shape: vec![Dim::new(rows), Dim::new(last)],
                },
            );
            ce_loss(&mut self.g, flat);
            gradcheck(&self.g, seed, 3);
        }
    }

    #[test]
    fn elementwise_ops_with_broadcasting() {
        let mut n = Net::new("elementwise");
        let a = n.param("a", &[2, 3, 4]);
        let b = n.param("b", &[4]);
        let c = n.param("c", &[3, 1]);
        let d = n.param("d", &[1, 3, 1]);
        let e = n.ones("e", &[4]);
        let f = n.ones("f", &[2, 3, 4]);
        let y = n.op("add", Op::Add(a, b));
        let y = n.op("sub", Op::Sub(y, c));
        let y = n.op("rsub", Op::Sub(d, y));
        let y = n.op("mul", Op::Mul(y, d));
        let y = n.op("div", Op::Div(y, e));
        let y = n.op("rdiv", Op::Div(y, f));
        let y = n.op("sq", Op::Mul(y, y));
        let y = n.op("twice", Op::Add(y, y));
        let y = n.op(
            "scale",
            Op::Scale {
                x: y,
                factor: Factor::Const(-0.7),
            },
        );
        let y = n.op(
            "isqrt",
            Op::Scale {
                x: y,
                factor: Factor::InvSqrt(Dim::named(4, "head_dim")),
            },
        );
        let z = n.op("self_div", Op::Div(c, c));
        let y = n.op("plus_one", Op::Add(y, z));
        n.check(y, 1);
    }

    #[test]
    fn activations() {
        let mut n = Net::new("activations");
        let x = n.param("x", &[3, 8]);
        let w = n.param("w", &[8]);
        let y = n.op("shift", Op::Add(x, w));
        let mut acts = Vec::new();
        for (name, op) in [
            ("gelu", Op::Gelu(y)),
            ("gelu_tanh", Op::GeluTanh(y)),
            ("silu", Op::Silu(y)),
            ("relu", Op::Relu(y)),
        ] {
            acts.push(n.op(name, op));
        }
        let y = n.op("cat", Op::Concat { xs: acts, dim: -1 });
        n.check(y, 2);
    }

    #[test]
    fn matmuls_batched_broadcast_and_transposed() {
        // (a shape, b shape, transpose_a, transpose_b)
        let cases: &[(&[u64], &[u64], bool, bool)] = &[
            (&[2, 3, 4], &[4, 5], false, false), // weight: 2-D gradient
            (&[2, 3, 4], &[5, 4], false, true),  // weight, transposed
            (&[2, 4, 3], &[4, 5], true, false),  // weight under a transposed batch: SumTo
            (&[3, 4], &[2, 4, 5], false, false), // rank-2 a broadcast over b's batch
            (&[4, 3], &[2, 5, 4], true, true),
            (&[2, 1, 3, 4], &[3, 5, 4], false, true), // both broadcast
            (&[2, 4, 3], &[2, 5, 4], true, true),
            (&[4, 3], &[4, 5], true, false),
        ];
        for (i, &(sa, sb, ta, tb)) in cases.iter().enumerate() {
            let mut n = Net::new(&format!("matmul{i}"));
            let a = n.param("a", sa);
            let b = n.param("b", sb);
            let y = n.op("mm", mm(a, b, ta, tb));
            n.check(y, 10 + i as u64);
        }
        // The same value on both sides, and an activation (input, no gradient) times a weight.
        let mut n = Net::new("gram");
        let a = n.param("a", &[2, 3, 4]);
        let y = n.op("mm", mm(a, a, false, true));
        n.check(y, 20);
        let mut n = Net::new("linear");
        let x = n.g.add_input("x", f32(&[2, 3, 4]));
        let w = n.param("w", &[5, 4]);
        let y = n.op("mm", mm(x, w, false, true));
        n.check(y, 21);
    }

    #[test]
    fn shape_ops() {
        let mut n = Net::new("shape");
        let x = n.param("x", &[2, 10]);
        let s = n.ops(
            "split",
            Op::Split {
                x,
                dim: -1,
                sizes: vec![3u64.into(), 3u64.into(), 4u64.into()],
            },
        );
        // Part 1 unused: its gradient is zeros.
        let y = n.op(
            "cat",
            Op::Concat {
                xs: vec![s[2], s[0]],
                dim: -1,
            },
        );
        let p = n.param("p", &[2, 9]);
        let sl = n.op(
            "slice",
            Op::Slice {
                x: p,
                dim: 1,
                start: 2u64.into(),
                end: 9u64.into(),
            },
        );
        let y = n.op("add", Op::Add(y, sl));
        let q = n.param("q", &[3, 7]);
        let y = n.op(
            "rows",
            Op::Concat {
                xs: vec![y, q, y],
                dim: 0,
            },
        );
        let y = n.op(
            "r",
            Op::Reshape {
                x: y,
                shape: vec![7u64.into(), 1u64.into(), 7u64.into()],
            },
        );
        let y = n.op(
            "t",
            Op::Transpose {
                x: y,
                perm: vec![2, 0, 1],
            },
        );
        let head = n.op(
            "head",
            Op::Slice {
                x: y,
                dim: 0,
                start: 0u64.into(),
                end: 5u64.into(),
            },
        );
        n.check(head, 3);
    }

    #[test]
    fn rotary_and_its_inverse() {
        for inverse in [false, true] {
            let mut n = Net::new("rotary");
            let x = n.param("x", &[2, 4, 2, 6]);
            let y = n.op(
                "rot",
                Op::Rotary {
                    x,
                    base: 100.0,
                    inverse,
                    scaling: None,
                },
            );
            n.check(y, 4 + inverse as u64);
        }
    }

    #[test]
    fn softmax_causal_and_not() {
        for causal in [false, true] {
            let mut n = Net::new("softmax");
            let x = n.param("x", &[2, 3, 5]);
            let w = n.param("w", &[3, 5]);
            let y = n.op("softmax", Op::Softmax { x, causal });
            let y = n.op("weighted", Op::Mul(y, w));
            let y = n.op(
                "sharpen",
                Op::Scale {
                    x: y,
                    factor: Factor::Const(5.0),
                },
            );
            n.check(y, 6 + causal as u64);
        }
    }

    #[test]
    fn norms_with_and_without_affine_parameters() {
        for (weight, bias) in [(true, true), (true, false), (false, false)] {
            let mut n = Net::new("norms");
            let x = n.param("x", &[2, 3, 8]);
            let w = weight.then(|| n.ones("w", &[8]));
            let b = bias.then(|| n.param("b", &[8]));
            let y = n.op(
                "ln",
                Op::LayerNorm {
                    x,
                    weight: w,
                    bias: b,
                    eps: 1e-5,
                },
            );
            let rw = weight.then(|| n.ones("rw", &[8]));
            let y = n.op(
                "rms",
                Op::RmsNorm {
                    x: y,
                    weight: rw,
                    eps: 1e-6,
                },
            );
            let s = n.param("s", &[8]);
            let y = n.op("mix", Op::Mul(y, s));
            n.check(y, 8 + weight as u64 + bias as u64);
        }
    }

    #[test]
    fn dropout_gelu_and_collectives_on_one_process() {
        let mut n = Net::new("dropout");
        let x = n.param("x", &[4, 6]);
        let y = n.op("drop", Op::Dropout { x, p: 0.3 });
        let y = n.op(
            "f",
            Op::F {
                x: y,
                axis: MeshAxis::Tp,
            },
        );
        let y = n.op("act", Op::Gelu(y));
        let y = n.op(
            "g",
            Op::G {
                x: y,
                axis: MeshAxis::Tp,
            },
        );
        let y = n.op(
            "ar",
            Op::AllReduce {
                x: y,
                axis: MeshAxis::Dp,
            },
        );
        let y = n.op(
            "ag",
            Op::AllGather {
                x: y,
                dim: 0,
                axis: MeshAxis::Tp,
                parts: 1,
                partial_grad: true,
            },
        );
        let y = n.op(
            "ag2",
            Op::AllGather {
                x: y,
                dim: 1,
                axis: MeshAxis::Tp,
                parts: 1,
                partial_grad: false,
            },
        );
        let y = n.op(
            "rs",
            Op::ReduceScatter {
                x: y,
                dim: 0,
                axis: MeshAxis::Tp,
                parts: 1,
            },
        );
        let y = n.op(
            "ls",
            Op::LocalSlice {
                x: y,
                dim: -1,
                axis: MeshAxis::Tp,
                parts: 1,
            },
        );
        n.check(y, 11);
    }

    #[test]
    fn embedding_and_cross_entropy_with_shift_and_classes() {
        for (shift, classes) in [
            (true, None),
            (false, None),
            (true, Some(7)),
            (false, Some(5)),
        ] {
            let mut g = Graph::new("lm");
            let table = g.add_param("table", f32(&[10, 6]), Init::Normal { std: 0.02 }, None);
            let w = g.add_param("w", f32(&[9, 6]), Init::Normal { std: 0.02 }, None);
            let ids = g.add_input("ids", i64(&[2, 5]));
            let targets = g.add_input("targets", i64(&[2, 5]));
            let e = node(&mut g, "emb", Op::Embedding { table, ids });
            let logits = node(&mut g, "logits", mm(e, w, false, true));
            let loss = node(
                &mut g,
                "loss",
                Op::CrossEntropy {
                    logits,
                    targets,
                    shift,
                    classes: classes.map(Dim::new),
                },
            );
            g.outputs.push(("loss".into(), loss));
            gradcheck(&g, 30 + shift as u64, 4);
        }
        // A tied table: looked up and used as the output layer.
        let mut g = Graph::new("tied");
        let table = g.add_param("table", f32(&[10, 6]), Init::Normal { std: 0.02 }, None);
        let ids = g.add_input("ids", i64(&[2, 5]));
        let e = node(&mut g, "emb", Op::Embedding { table, ids });
        let act = node(&mut g, "act", Op::Silu(e));
        let logits = node(&mut g, "logits", mm(act, table, false, true));
        let loss = node(
            &mut g,
            "loss",
            Op::CrossEntropy {
                logits,
                targets: ids,
                shift: true,
                classes: None,
            },
        );
        g.outputs.push(("loss".into(), loss));
        gradcheck(&g, 40, 6);
    }

    #[test]
    fn activation_grads_are_checked_for_each_activation() {
        // ActGrad's `act` follows the forward op.
        let mut g = Graph::new("acts");
        let x = g.add_param("x", f32(&[2, 3]), Init::Normal { std: 0.02 }, None);
        let y = node(&mut g, "silu", Op::Silu(x));
        ce_loss(&mut g, y);
        let loss = g.output("loss").unwrap();
        let bwd = backward(&mut g, loss).unwrap();
        let d = grad_of(&g, &bwd, x);
        assert!(matches!(
            g.nodes[def(&g, d)].op,
            Op::ActGrad {
                act: Activation::Silu,
                ..
            }
        ));
    }

    fn zoo_check(name: &str, overrides: &[(&str, u64)], seed: u64) {
        let g = zoo(name, overrides);
        let checked = gradcheck(&g, seed, 2);
        assert_eq!(checked, g.params.len());
    }

    #[test]
    fn tiny_gpt_gradients_match_finite_differences() {
        zoo_check(
            "tiny-gpt",
            &[
                ("hidden", 16),
                ("heads", 2),
                ("seq", 6),
                ("positions", 8),
                ("batch", 2),
                ("vocab", 11),
            ],
            100,
        );
    }

    #[test]
    fn tiny_bert_gradients_match_finite_differences() {
        zoo_check(
            "tiny-bert",
            &[
                ("hidden", 16),
                ("heads", 2),
                ("seq", 5),
                ("positions", 7),
                ("batch", 2),
                ("vocab", 13),
            ],
            101,
        );
    }

    #[test]
    fn tiny_llama_gradients_match_finite_differences() {
        zoo_check(
            "tiny-llama",
            &[
                ("hidden", 16),
                ("heads", 4),
                ("kv_heads", 2),
                ("ffn", 24),
                ("seq", 5),
                ("batch", 2),
                ("vocab", 13),
            ],
            102,
        );
    }
}
