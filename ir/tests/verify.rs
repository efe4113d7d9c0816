//! The verifier on hand-built graphs: a correct graph passes, and each kind of corruption a pass
//! could introduce is rejected with the node named.

use ferrotron_ir::graph::{Graph, Init, ValueDef};
use ferrotron_ir::{verify, DType, Op, Shape, TensorType, VerifyError};

fn f32(sizes: &[u64]) -> TensorType {
    TensorType::new(DType::F32, Shape::from_sizes(sizes))
}

/// x·w + b, then GeLU.
fn small_graph() -> Graph {
    let mut g = Graph::new("small");
    let x = g.add_input("x", f32(&[4, 8]));
    let w = g.add_param("w", f32(&[8, 3]), Init::Normal { std: 0.02 }, None);
    let b = g.add_param("b", f32(&[3]), Init::Zeros, None);
    let y = g
        .add_node(
            "mm",
            Op::MatMul {
                a: x,
                b: w,
                transpose_a: false,
                transpose_b: false,
            },
            vec!["mm".into()],
            None,
        )
        .unwrap()[0];
    let z = g
        .add_node("bias", Op::Add(y, b), vec!["bias".into()], None)
        .unwrap()[0];
    let out = g
        .add_node("act", Op::Gelu(z), vec!["act".into()], None)
        .unwrap()[0];
    g.outputs.push(("out".into(), out));
    g
}

#[test]
fn a_well_built_graph_verifies() {
    let g = small_graph();
    verify(&g).unwrap();
    assert_eq!(g.ty(g.output("out").unwrap()).shape.sizes(), [4, 3]);
}

#[test]
fn builder_rejects_ill_typed_ops() {
    let mut g = small_graph();
    let x = g.inputs[0];
    let w = g.value_named("w").unwrap();
    let err = g
        .add_node(
            "bad",
            Op::MatMul {
                a: w,
                b: x,
                transpose_a: false,
                transpose_b: false,
            },
            vec!["bad".into()],
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("contracts 3 with 4"), "{err}");
}

#[test]
fn use_before_definition() {
    let mut g = small_graph();
    g.order.swap(0, 1);
    let err = verify(&g).unwrap_err();
    assert_eq!(
        err.to_string(),
        "node `bias` uses `mm` before it is defined"
    );
}

#[test]
fn node_missing_from_or_repeated_in_order() {
    let mut g = small_graph();
    g.order.pop();
    assert_eq!(
        verify(&g).unwrap_err(),
        VerifyError::Order {
            node: "act".into(),
            count: 0
        }
    );
    let mut g = small_graph();
    let first = g.order[0];
    g.order.push(first);
    assert!(matches!(
        verify(&g),
        Err(VerifyError::Order { count: 2, .. })
    ));
}

#[test]
fn recorded_type_must_match_inference() {
    let mut g = small_graph();
    let v = g.value_named("act").unwrap();
    g.values[v].ty = f32(&[4, 4]);
    let err = verify(&g).unwrap_err();
    assert_eq!(
        err.to_string(),
        "node `act`: output `act` is recorded as f32[4, 4], but Gelu produces f32[4, 3]"
    );
}

#[test]
fn an_op_rewritten_into_an_ill_typed_one() {
    let mut g = small_graph();
    let n = g.node_named("bias").unwrap();
    let x = g.inputs[0];
    let b = g.value_named("b").unwrap();
    g.nodes[n].op = Op::Add(x, b);
    let err = verify(&g).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Op { node, .. } if node == "bias"),
        "{err}"
    );
    assert!(err.to_string().contains("do not broadcast"), "{err}");
}

#[test]
fn duplicate_names() {
    let mut g = small_graph();
    let n = g.node_named("act").unwrap();
    g.nodes[n].name = "mm".into();
    assert_eq!(
        verify(&g).unwrap_err().to_string(),
        "duplicate node name `mm`"
    );
    let mut g = small_graph();
    let p = g.params.keys().next().unwrap();
    g.params[p].name = "b".into();
    assert!(matches!(verify(&g), Err(VerifyError::DuplicateName { .. })));
}

#[test]
fn definitions_point_back() {
    let mut g = small_graph();
    let v = g.value_named("w").unwrap();
    g.values[v].def = ValueDef::Input;
    assert!(matches!(verify(&g), Err(VerifyError::BadDef { .. })));
}

#[test]
fn dangling_value_reference() {
    let mut g = small_graph();
    let n = g.node_named("act").unwrap();
    let bogus = ferrotron_ir::ValueId::from_u32(999);
    g.nodes[n].op = Op::Gelu(bogus);
    assert!(matches!(verify(&g), Err(VerifyError::Dangling { .. })));
}

#[test]
fn a_graph_round_trips_through_ron() {
    // The partitioner's plan file is this serialization; it must read back identical and valid.
    let g = ferrotron_ir::load_model(
        std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/tiny-llama.ron"
        )),
        &Default::default(),
    )
    .unwrap();
    let text = ron::ser::to_string_pretty(&g, ron::ser::PrettyConfig::default()).unwrap();
    let back: Graph = ron::from_str(&text).unwrap();
    assert_eq!(back, g);
    // Dimension names survive (equality alone compares sizes only).
    assert_eq!(
        back.ty(back.output("logits").unwrap()).to_string(),
        "f32[batch=2, seq=12, vocab=101]"
    );
    verify(&back).unwrap();
}
